"""mcore dist-checkpoint ⇄ HF directory conversion (the library behind ``tools/convert_checkpoint.py``).

Both directions go through the one HF mapping (``models/qwen2_5_vl/hf_adapter.py``):

* ``mcore_to_hf``: build the model from the base HF config at the process layout (TP=1, PP=1 in one
  process; dist-checkpoints reshard on load, so any saved TP/PP works), ``load_checkpoint`` into it,
  then stream ``export_to_hf`` into safetensors shards (``HFShardWriter``: one shard buffer at a time)
  and copy the base directory's non-weight files (config, tokenizer, processor, chat template,
  generation config).
* ``hf_to_mcore``: build the model at the requested TP/PP, ``load_hf_into_mcore`` (each rank reads
  only its slices), ``save_checkpoint`` (model only, step 0).

``verify_*`` compare per-token log-probs of source and result on the built-in multimodal batch of
``models/qwen2_5_vl/parity.py`` (transformers is the HF side's reference).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from megatron_papo.checkpoint.dist import TRAINER_STATE, cause_line, latest_checkpoint, load_checkpoint, save_checkpoint
from megatron_papo.utils.logging import get_logger, progress

log = get_logger("convert")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConvertError(ValueError):
    """A conversion input is wrong (the message names the path and the fix)."""


# ---------------------------------------------------------------- locating inputs
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """One complete dist-checkpoint directory from a run dir, its ``checkpoints/`` root or a ``step_*`` dir."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"--ckpt {p} does not exist")
    if (p / "metadata.json").is_file():
        if not (p / TRAINER_STATE).is_file():
            raise ConvertError(f"--ckpt {p} is an incomplete checkpoint (no {TRAINER_STATE}); pick a complete step_* dir")
        return p
    for root in (p, p / "checkpoints"):
        if (root / "latest").is_file():
            found = latest_checkpoint(root)
            assert found is not None
            return found
    raise ConvertError(f"--ckpt {p} is neither a dist-checkpoint (metadata.json) nor a checkpoint root with a 'latest' "
                       "marker; pass RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/step_XXXXXX")


def check_hf_dir(path: str | os.PathLike, *, weights: bool, flag: str) -> Path:
    """An HF directory with config.json (and safetensors when ``weights``), else ``ConvertError``."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConvertError(f"{flag} {p} is not an HF checkpoint directory (no config.json)")
    if weights and not any(p.glob("*.safetensors")):
        raise ConvertError(f"{flag} {p} has no *.safetensors weights")
    return p


class DDPNamed(torch.nn.Module):
    """A model stage under mcore DDP's checkpoint naming (``module.`` prefix), without DDP's gradient buffers.

    ``checkpoint/dist.py`` saves the trainer's DDP-wrapped actor, and mcore's DDP has no ``sharded_state_dict``
    of its own (MegatronModule's default adds ``module.``), so trainer checkpoints name tensors ``module.<name>``.
    ``hf2mcore`` writes the canonical unwrapped names (as Megatron-LM does); ``mcore2hf`` reads both.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """The wrapped model's sharded state dict under ``<prefix>module.``."""
        return self.module.sharded_state_dict(prefix=prefix + "module.", sharded_offsets=sharded_offsets, metadata=metadata)


def _model_keys(ckpt_dir: Path) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    return {k: v for k, v in meta.items() if not k.startswith("optimizer.")}


def as_saved(model: torch.nn.Module, ckpt_dir: Path) -> torch.nn.Module:
    """``model`` as the checkpoint names it: wrapped in ``DDPNamed`` when its keys carry DDP's ``module.`` prefix."""
    keys = list(_model_keys(ckpt_dir))
    if not keys:
        raise ConvertError(f"{ckpt_dir} holds no model tensors")
    return DDPNamed(model) if all(k.startswith("module.") for k in keys) else model


def checkpoint_dtype(ckpt_dir: Path) -> torch.dtype:
    """The dtype the checkpoint's model tensors were saved in (from the dist-checkpoint metadata)."""
    meta = _model_keys(ckpt_dir)
    for key, sh in meta.items():
        if key.endswith("word_embeddings.weight"):
            return sh.dtype
    dtypes = {sh.dtype for sh in meta.values() if getattr(sh, "dtype", None) is not None and sh.dtype.is_floating_point}
    if len(dtypes) != 1:
        raise ConvertError(f"cannot tell the model dtype of {ckpt_dir} (found {sorted(map(str, dtypes))}); pass --dtype")
    return dtypes.pop()


# ---------------------------------------------------------------- writing HF directories
def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy in-order packing of ``(name, nbytes)`` into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


class HFShardWriter:
    """Writes named tensors, arriving in a known order, into safetensors shards; holds one shard at a time.

    One shard → ``model.safetensors``; several → ``model-0000i-of-0000N.safetensors`` and
    ``model.safetensors.index.json`` (the layout of ``save_pretrained``).
    """

    def __init__(self, out_dir: Path, sizes: list[tuple[str, int]], max_shard_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(sizes, max_shard_bytes)
        n = len(self.shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {name: i for i, names in enumerate(self.shards) for name in names}
        self.total_size = sum(s for _, s in sizes)
        self._buf: dict[str, torch.Tensor] = {}
        self._current = 0
        self._written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer one tensor; writes the shard file when its last tensor arrives."""
        if name not in self.shard_of:
            raise ConvertError(f"unexpected tensor {name} (not in the export plan)")
        if self.shard_of[name] != self._current:
            raise ConvertError(f"tensor {name} arrived out of order (shard {self.shard_of[name]}, writing {self._current})")
        self._buf[name] = tensor.detach().to("cpu").contiguous()
        if len(self._buf) == len(self.shards[self._current]):
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._buf, str(self.out_dir / self.files[self._current]), metadata={"format": "pt"})
        self._written.update(self._buf)
        self._buf = {}
        self._current += 1

    def close(self) -> list[str]:
        """Check completeness, write the index (sharded case); returns the weight file names."""
        missing = [n for n in self.shard_of if n not in self._written]
        if missing:
            raise ConvertError(f"export ended with {len(missing)} tensors missing, e.g. {missing[:3]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {n: self.files[i] for n, i in self.shard_of.items()}}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        return list(self.files)


def copy_hf_assets(base: Path, out: Path, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Copy every non-weight file of ``base`` (config, tokenizer, processor, chat template, generation config).

    ``config.json``'s ``dtype``/``torch_dtype`` is set to ``dtype`` (the exported tensors' dtype).
    """
    copied = []
    for f in sorted(base.iterdir()):
        if not f.is_file() or f.name.endswith(WEIGHT_SUFFIXES) or f.name in WEIGHT_INDEXES:
            continue
        if f.name == "config.json" and dtype is not None:
            cfg = json.loads(f.read_text())
            name = _DTYPE_NAMES[dtype]
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]
            for k in keys:
                cfg[k] = name
            for sub in ("text_config", "vision_config"):
                if isinstance(cfg.get(sub), dict):
                    for k in ("dtype", "torch_dtype"):
                        if k in cfg[sub]:
                            cfg[sub][k] = name
            (out / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(f, out / f.name)
        copied.append(f.name)
    return copied


def write_hf(named: Iterable[tuple[str, torch.Tensor]], sizes: list[tuple[str, int]], out: Path, *,
             max_shard_bytes: int, write: bool, desc: str = "export") -> list[str]:
    """Consume the (collective) export iterator on every rank; rank ``write`` streams it into shards."""
    writer = HFShardWriter(out, sizes, max_shard_bytes) if write else None
    for name, tensor in progress(named, total=len(sizes), desc=desc, enabled=write):
        if writer is not None:
            writer.add(name, tensor)
    return writer.close() if writer is not None else []


def export_sizes(plan: list[Any], dtype: torch.dtype) -> list[tuple[str, int]]:
    """``(checkpoint name, nbytes)`` of every exported tensor, in export order."""
    item = torch.tensor([], dtype=dtype).element_size()
    out = []
    for spec in plan:
        for name, shape in zip(spec.hf, spec.hf_shapes):
            numel = 1
            for s in shape:
                numel *= s
            out.append((name, numel * item))
    return out


# ---------------------------------------------------------------- the two directions
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def build_for_conversion(hf_dir: Path, pg: Any, dtype: torch.dtype) -> Any:
    """This rank's model stage, built (uninitialised) from ``hf_dir``'s architecture."""
    from megatron_papo.config.model import ModelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_arch

    arch = load_arch(hf_dir)
    pg.dims.check_model(num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, num_layers=arch.num_layers,
                        vision_heads=arch.vision.num_heads)
    return build_model(ModelConfig(path=str(hf_dir)), pg, hf_dir=hf_dir, dtype=dtype, device=pg.device)


def mcore_to_hf(ckpt: Path, hf_base: Path, out: Path, pg: Any, *, dtype: Optional[torch.dtype] = None,
                max_shard_bytes: int = 5 << 30) -> Any:
    """Collective: load ``ckpt`` (any saved TP/PP) at ``pg``'s layout and write an HF directory to ``out``.

    Returns the loaded model stage (for ``verify_mcore_vs_hf``).
    """
    from megatron_papo.models.qwen2_5_vl import export_plan, export_to_hf

    dtype = dtype or checkpoint_dtype(ckpt)
    model = build_for_conversion(hf_base, pg, dtype)
    log.info("loading %s (%s) at tp=%d pp=%d", ckpt, _DTYPE_NAMES.get(dtype, dtype), pg.tp_size, pg.pp_size)
    try:
        load_checkpoint(ckpt, [as_saved(model, ckpt)], optimizer=None, load_rng=False)
    except Exception as e:  # shape/key mismatches surface deep inside mcore; name the likely cause
        raise ConvertError(f"loading {ckpt} into the architecture of {hf_base} failed ({cause_line(e)}); is "
                           "--hf-base the model this run was trained from?") from None
    if _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
    _barrier()
    plan = export_plan([model])
    files = write_hf(export_to_hf([model], pg, plan=plan), export_sizes(plan, dtype), out,
                     max_shard_bytes=max_shard_bytes, write=_rank() == 0, desc="mcore→HF")
    if _rank() == 0:
        copied = copy_hf_assets(hf_base, out, dtype)
        log.info("wrote %s: %d weight file(s), assets %s", out, len(files), ", ".join(copied))
    _barrier()
    return model


def hf_to_mcore(hf_dir: Path, out: Path, pg: Any, *, dtype: Optional[torch.dtype] = None) -> Any:
    """Collective: build at ``pg``'s TP/PP, load ``hf_dir`` and save a model-only dist-checkpoint (step 0) under ``out``.

    Layout: ``out/step_000000`` + ``out/latest`` (a checkpoint root, like ``<run_dir>/checkpoints``).
    Returns the model stage.
    """
    from megatron_papo.models.qwen2_5_vl import load_hf_into_mcore

    dtype = dtype or _hf_dtype(hf_dir)
    model = build_for_conversion(hf_dir, pg, dtype)
    log.info("loading %s at tp=%d pp=%d (%s)", hf_dir, pg.tp_size, pg.pp_size, _DTYPE_NAMES.get(dtype, dtype))
    load_hf_into_mcore([model], hf_dir, pg)
    state = {"source": "hf2mcore", "hf_dir": str(hf_dir), "model_only": True, "tp": pg.tp_size, "pp": pg.pp_size}
    save_checkpoint(out, 0, [model], optimizer=None, trainer_state=state)
    return model


def _hf_dtype(hf_dir: Path) -> torch.dtype:
    cfg = json.loads((hf_dir / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    return {v: k for k, v in _DTYPE_NAMES.items()}.get(name, torch.float32)


# ---------------------------------------------------------------- verification
def sample_batch(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The parity helpers' built-in multimodal batch, made with ``hf_dir``'s processor."""
    from transformers import AutoProcessor

    from megatron_papo.models.qwen2_5_vl.parity import builtin_samples, make_batch

    return make_batch(AutoProcessor.from_pretrained(str(hf_dir)), builtin_samples())


def verify_mcore_vs_hf(model: Any, hf_dir: Path, pg: Any) -> Optional[float]:
    """Collective: max |Δ log p| over real tokens between the mcore model and transformers on ``hf_dir``.

    Returned on the last pipeline stage's TP rank 0 (None elsewhere). Loads the transformers model there
    (the only step that holds a second copy of the weights).
    """
    from megatron_papo.models.qwen2_5_vl.parity import hf_token_logprobs, mcore_token_logprobs, token_mask

    model.eval()
    batch = sample_batch(hf_dir)
    on_device = {k: v.to(pg.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.no_grad():
        mc = mcore_token_logprobs([model], on_device, pg)
    if mc is None or pg.tp_rank != 0:
        return None
    ref = hf_token_logprobs(hf_dir, batch)
    mask = token_mask(batch)
    return float((mc.float().cpu() - ref.float()).abs()[mask].max())
