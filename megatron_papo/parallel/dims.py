"""``ParallelDims``: the validated tp × pp × cp × dp layout of a job."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_papo.config.base import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Parallel sizes; ``dp`` is derived from the world size."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def validate(self) -> ParallelDims:
        """Raise ConfigError naming every factor when the layout does not fit the world size."""
        for name in ("tp", "pp", "cp", "ep"):
            v = getattr(self, name)
            if v < 1:
                raise ConfigError(f"parallel.{name}={v} must be >= 1")
        if self.cp != 1:
            raise ConfigError(f"parallel.cp={self.cp}: context parallelism is not supported yet; set parallel.cp=1")
        if self.ep != 1:
            raise ConfigError(f"parallel.ep={self.ep}: Qwen2.5-VL is dense; set parallel.ep=1")
        model = self.tp * self.pp * self.cp
        if self.world_size % model:
            raise ConfigError(
                f"parallel: tp({self.tp})*pp({self.pp})*cp({self.cp})={model} does not divide world_size "
                f"{self.world_size}; choose sizes whose product divides the number of processes")
        return self

    def check_model(self, *, num_heads: int, num_kv_heads: int, num_layers: int, vision_heads: int | None = None) -> None:
        """Raise ConfigError when the model cannot be split this way (names both numbers)."""
        if num_heads % self.tp:
            raise ConfigError(f"model: attention heads ({num_heads}) not divisible by parallel.tp ({self.tp})")
        if num_kv_heads % self.tp and self.tp % num_kv_heads:
            raise ConfigError(f"model: KV heads ({num_kv_heads}) and parallel.tp ({self.tp}) must divide one another")
        if vision_heads is not None and vision_heads % self.tp:
            raise ConfigError(f"model: vision heads ({vision_heads}) not divisible by parallel.tp ({self.tp})")
        if num_layers % self.pp:
            raise ConfigError(f"model: layers ({num_layers}) not divisible by parallel.pp ({self.pp})")
