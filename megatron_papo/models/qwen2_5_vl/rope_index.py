"""3-D M-RoPE position ids of Qwen2.5-VL (what transformers' ``get_rope_index`` computes).

Text tokens advance all three axes (temporal, height, width) together by one per token. A run of
``<|image_pad|>`` (or ``<|video_pad|>``) tokens of one image gets, on a ``t x (h/m) x (w/m)`` grid,
``start + (t_idx * interval, h_idx, w_idx)``; the text after it continues at
``start + max(h, w) / m``. Padding (``attention_mask == 0``) is skipped and gets position 0.
Several images per sample, images of different sizes and text-only samples in one batch are fine:
the grids in ``image_grid_thw`` are consumed in order over the batch (row-major), as the vision
tower produces them.
"""

from __future__ import annotations

from typing import Optional

import torch


def _runs(types: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(type, start, end)`` of equal values."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(types) + 1):
        if i == len(types) or types[i] != types[start]:
            out.append((types[start], start, i))
            start = i
    return out


def get_rope_index(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float = 2.0,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    second_per_grid_ts: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids ``[3, B, S]`` (long) and the per-sample deltas ``[B, 1]`` (max pos + 1 - length).

    Args:
        input_ids: ``[B, S]`` token ids.
        image_token_id / video_token_id: the ``<|image_pad|>`` / ``<|video_pad|>`` ids.
        spatial_merge_size: the vision tower's spatial merge (2 for Qwen2.5-VL).
        tokens_per_second: temporal position spacing of videos per second.
        image_grid_thw / video_grid_thw: ``[n, 3]`` patch grids (before merging), in batch order.
        second_per_grid_ts: ``[n_videos]`` seconds per temporal grid step (default 1).
        attention_mask: ``[B, S]``, 1 for real tokens, 0 for padding (anywhere in the row).
    """
    B, S = input_ids.shape
    m = int(spatial_merge_size)
    position_ids = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    grids = {1: iter((image_grid_thw if image_grid_thw is not None else torch.empty(0, 3)).tolist()),
             2: iter((video_grid_thw if video_grid_thw is not None else torch.empty(0, 3)).tolist())}
    seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    deltas = []
    ids_cpu = input_ids.cpu()
    valid_all = (attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, S, dtype=torch.bool))
    for b in range(B):
        valid = valid_all[b]
        ids = ids_cpu[b][valid]
        types = ((ids == image_token_id).long() + 2 * (ids == video_token_id).long()).tolist()
        cur = 0
        pieces = []
        for kind, start, end in _runs(types):
            n = end - start
            if kind == 0:
                pieces.append(torch.arange(cur, cur + n).view(1, -1).expand(3, -1))
                cur += n
                continue
            try:
                t, h, w = (int(x) for x in next(grids[kind]))
            except StopIteration:
                raise ValueError(f"sample {b}: more {'image' if kind == 1 else 'video'} placeholder runs than grids "
                                 "in *_grid_thw") from None
            gt, gh, gw = t, h // m, w // m
            if gt * gh * gw != n:
                raise ValueError(f"sample {b}: a run of {n} placeholder tokens does not match grid {[t, h, w]} "
                                 f"(expects {gt * gh * gw} tokens with spatial_merge_size {m})")
            interval = tokens_per_second * (next(seconds, 1.0)) if kind == 2 else 1
            tpos = (torch.arange(gt) * interval).long() + cur
            hpos = torch.arange(gh) + cur
            wpos = torch.arange(gw) + cur
            T, H, W = torch.meshgrid(tpos, hpos, wpos, indexing="ij")
            pieces.append(torch.stack([T.reshape(-1), H.reshape(-1), W.reshape(-1)]))
            cur += max(h, w) // m
        pos = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, valid.to(input_ids.device)] = pos.to(input_ids.device)
        deltas.append((int(pos.max()) + 1 - int(ids.numel())) if pos.numel() else 0)
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def get_rope_index_packed(input_ids: torch.Tensor, segment_ids: torch.Tensor, *, image_token_id: int,
                          spatial_merge_size: int, image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
    """M-RoPE positions ``[3, B, S]`` for packed rows: each segment (``segment_ids`` > 0) restarts at 0.

    ``segment_ids`` ``[B, S]``: 0 = padding, k > 0 = the k-th sample packed into that row (contiguous).
    Image grids are consumed in token order over the batch, as the vision tower produces them.
    """
    B, S = input_ids.shape
    position_ids = torch.zeros(3, B, S, dtype=torch.long, device=input_ids.device)
    grids = image_grid_thw if image_grid_thw is not None else torch.empty(0, 3, dtype=torch.long)
    used = 0
    for b in range(B):
        seg = segment_ids[b]
        order = []
        for k in seg.tolist():
            if k > 0 and (not order or order[-1] != k):
                order.append(k)
        for k in order:
            sel = seg == k
            ids = input_ids[b][sel]
            is_img = ids == image_token_id
            n_img = int((is_img & ~torch.cat([is_img.new_zeros(1), is_img[:-1]])).sum())
            pos, _ = get_rope_index(ids[None], image_token_id=image_token_id, video_token_id=-1,
                                    spatial_merge_size=spatial_merge_size, image_grid_thw=grids[used:used + n_img])
            used += n_img
            position_ids[:, b, sel] = pos[:, 0]
    return position_ids
