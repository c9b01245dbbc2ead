"""Tensor-parallel Qwen2.5-VL vision tower on Megatron-Core modules.

Faithful to transformers' ``Qwen2_5_VisionTransformerPretrainedModel``:
3-D patch embedding (a ``Conv3d`` with stride = kernel, computed as one matmul) → window
reordering of the patches (groups of ``merge**2`` patches) → ``depth`` mcore ``TransformerLayer``s
(RMSNorm, column/row-parallel qkv/proj with bias, 2-D rotary, SwiGLU MLP with bias) attending
within windows, except the ``fullatt_block_indexes`` blocks which attend within whole images →
patch merger (RMSNorm, ``merge**2`` patches concatenated, column/row-parallel MLP with GELU) →
inverse window order. Input/activation layout inside the tower is mcore's ``[s, 1, h]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_papo.models.qwen2_5_vl.config import VisionArch


def vision_window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Window order of the merged patches and the cumulative window lengths (in patches).

    Returns ``window_index`` (``[n_merged]``: position of each merged patch in window order) and
    ``cu_window_seqlens`` (``[n_windows + 1]``, empty windows removed).
    """
    win = window_size // merge // patch_size
    unit = merge * merge
    index_all, cu, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ph, pw = (win - gh % win) % win, (win - gw % win) % win
        padded = F.pad(idx, (0, pw, 0, ph), value=-1)
        nh, nw = (gh + ph) // win, (gw + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        lens = (padded >= 0).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        index_all.append(flat[flat >= 0] + offset)
        for n in lens.tolist():
            if n:
                cu.append(cu[-1] + n * unit)
        offset += t * gh * gw
    return torch.cat(index_all), torch.tensor(cu, dtype=torch.long)


def vision_rotary_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """``[n_patches, 2]`` (row, col) of every patch, laid out block-major over ``merge x merge`` blocks."""
    out = []
    for t, h, w in grid_thw.tolist():
        hp = torch.arange(h).view(h, 1).expand(h, w)
        wp = torch.arange(w).view(1, w).expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        hp = hp.reshape(shape).transpose(1, 2).flatten()
        wp = wp.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
    return torch.cat(out)


class PatchMerger(torch.nn.Module):
    """RMSNorm → concat ``merge**2`` neighbouring patches → column-parallel fc1 → GELU → row-parallel fc2."""

    def __init__(self, config: Any, arch: VisionArch, out_hidden: int, norm_cls: Any, tp_group: Any) -> None:
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        self.in_hidden = arch.merger_hidden
        self.ln_q = norm_cls(config=config, hidden_size=arch.hidden_size, eps=arch.rms_norm_eps)
        self.linear_fc1 = ColumnParallelLinear(self.in_hidden, self.in_hidden, config=config, init_method=config.init_method,
                                               bias=True, gather_output=False, tp_group=tp_group)
        self.linear_fc2 = RowParallelLinear(self.in_hidden, out_hidden, config=config,
                                            init_method=config.output_layer_init_method, bias=True,
                                            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[n_patches, hidden]`` → ``[n_patches / merge**2, out_hidden]``."""
        x = self.ln_q(x).reshape(-1, self.in_hidden)
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x


class Qwen25VisionModel(torch.nn.Module):
    """The vision tower; ``forward(pixel_values, grid_thw)`` returns merged features in image order."""

    def __init__(self, config: Any, arch: VisionArch, out_hidden: int, layer_spec: Any, pg_collection: Any) -> None:
        super().__init__()
        from megatron.core.transformer.spec_utils import build_module

        self.config = config
        self.arch = arch
        self.pg_collection = pg_collection
        self.patch_embed = torch.nn.Module()
        k = (arch.temporal_patch_size, arch.patch_size, arch.patch_size)
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.patch_embed.proj = torch.nn.Conv3d(arch.in_channels, arch.hidden_size, kernel_size=k, stride=k, bias=False,
                                                device=device, dtype=config.params_dtype)
        self.layers = torch.nn.ModuleList(
            [build_module(layer_spec, config=config, layer_number=i + 1, pg_collection=pg_collection)
             for i in range(arch.depth)])
        norm_cls = layer_spec.submodules.input_layernorm
        self.merger = PatchMerger(config, arch, out_hidden, norm_cls, pg_collection.tp)
        head_dim = arch.head_dim
        spatial = head_dim // 2
        inv = 1.0 / (arch.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))
        self.register_buffer("inv_freq", inv, persistent=False)

    def _rotary(self, grid_thw: torch.Tensor, device: torch.device) -> torch.Tensor:
        pos = vision_rotary_positions(grid_thw, self.arch.spatial_merge_size).to(device)
        freqs = pos[..., None].float() * self.inv_freq.to(device)  # [n, 2, d/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [n, d/2]
        return torch.cat([freqs, freqs], dim=-1)  # [n, d]

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` ``[n_patches, C*tps*p*p]``, ``grid_thw`` ``[n_images, 3]`` → ``[n_patches/merge**2, out]``."""
        from megatron.core import tensor_parallel

        a = self.arch
        w = self.patch_embed.proj.weight
        x = F.linear(pixel_values.to(w.dtype).reshape(-1, w[0].numel()), w.reshape(w.shape[0], -1))
        n = x.shape[0]
        unit = a.spatial_merge_size ** 2
        window_index, cu_window = vision_window_index(grid_thw, a.spatial_merge_size, a.window_size, a.patch_size)
        window_index = window_index.to(x.device)
        x = x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)
        rot = self._rotary(grid_thw, x.device)
        rot = rot.reshape(n // unit, unit, -1)[window_index].reshape(n, 1, 1, -1)
        cu_full = F.pad(torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(0), (1, 0))
        # the core attention takes 1-D cu_seqlens as its "attention_mask": attention within each segment
        masks = {"window": cu_window, "full": cu_full.long()}
        x = x.unsqueeze(1)  # [s, 1, h]
        recompute = self.config.recompute_granularity == "full" and self.training
        for i, layer in enumerate(self.layers):
            mask = masks["full" if i in a.fullatt_block_indexes else "window"]
            if recompute:
                x = tensor_parallel.checkpoint(_layer_fn(layer), False, x, mask, rot)
            else:
                x, _ = layer(x, attention_mask=mask, rotary_pos_emb=rot)
        merged = self.merger(x.squeeze(1))
        return merged[torch.argsort(window_index)]


def _layer_fn(layer: Any):
    def fn(x: torch.Tensor, mask: torch.Tensor, rot: Optional[torch.Tensor]) -> torch.Tensor:
        return layer(x, attention_mask=mask, rotary_pos_emb=rot)[0]
    return fn
