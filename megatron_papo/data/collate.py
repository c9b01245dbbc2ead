"""Collate encoded prompts + generated responses into one right-padded training batch.

Layout (B rows = prompts x n samples, S = longest prompt+response, rounded up to ``pad_to_multiple_of``)::

    row b:  [ prompt_ids (P_b) | response_ids (R_b) | pad ... ]
    input_ids        [B, S]  long, pad = pad_token_id
    attention_mask   [B, S]  1 on prompt + response tokens
    response_mask    [B, S]  1 on response tokens only
    labels           [B, S]  labels[:, t] = input_ids[:, t+1] (last column = pad): logits at position t
                             score token t+1, so ``logp_BS.gather(labels)`` gives next-token log-probs
    label_mask       [B, S]  label_mask[:, t] = response_mask[:, t+1]: 1 where labels[:, t] is a response
                             token, i.e. the positions whose log-probs enter the loss
    mm_token_type_ids[B, S]  the processor's ids on the prompt (1 on image tokens), 0 on response/pad
    pixel_values     [sum_b N_b, D]  rows' pixel_values concatenated in row order (one copy per row,
                             matching that row's image tokens); image_grid_thw [sum_b n_img_b, 3] likewise
    pixel_values_aug same shape as pixel_values (masked view), if given
    prompt_lens, response_lens, uids  [B]
    group_index      [B]     0, 0, ..., 1, 1, ...: a new group starts wherever the row's PromptSample object
                             changes (rows of a group must be adjacent). Group by this, not by ``uids``: the
                             same prompt can be drawn twice in one step (DAPO refills across an epoch end).

Rows of one group are adjacent when built with :func:`repeat_interleave` (PAPO's ``repeat(n, interleave=True)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, TypeVar, Union

import torch

from megatron_papo.data.processing import PromptSample

T = TypeVar("T")


@dataclass
class RolloutBatch:
    """A padded batch; see the module docstring for every field's layout."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    mm_token_type_ids: Optional[torch.Tensor]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    pixel_values_aug: Optional[torch.Tensor]
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor
    uids: torch.Tensor
    group_index: torch.Tensor


def repeat_interleave(items: Sequence[T], n: int) -> list[T]:
    """Each item ``n`` times in a row: ``[a, a, b, b]`` for ``n=2`` (group members adjacent)."""
    if n < 1:
        raise ValueError(f"repeat_interleave: n must be >= 1, got {n}")
    return [x for x in items for _ in range(n)]


def _as_ids(r: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
    t = r if isinstance(r, torch.Tensor) else torch.tensor(list(r), dtype=torch.long)
    if t.dim() != 1:
        raise ValueError(f"collate: response ids must be 1-D, got shape {tuple(t.shape)}")
    return t.long()


def collate_rollouts(samples: Sequence[PromptSample], responses: Sequence[Union[torch.Tensor, Sequence[int]]],
                     pad_token_id: int, aug_pixel_values: Optional[Sequence[torch.Tensor]] = None,
                     pad_to_multiple_of: int = 1) -> RolloutBatch:
    """Build the batch from one ``PromptSample`` per row (repeat it for the group) and its response ids."""
    if len(samples) != len(responses) or not samples:
        raise ValueError(f"collate: need one response per sample row, got {len(samples)} samples and {len(responses)} responses")
    if aug_pixel_values is not None and len(aug_pixel_values) != len(samples):
        raise ValueError(f"collate: got {len(aug_pixel_values)} masked views for {len(samples)} rows")
    resp = [_as_ids(r) for r in responses]
    lens = [s.prompt_ids.numel() + r.numel() for s, r in zip(samples, resp)]
    width = max(lens)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    B = len(samples)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(B, width, dtype=torch.long)
    response_mask = torch.zeros(B, width, dtype=torch.long)
    has_mm = all(s.mm_token_type_ids is not None for s in samples)
    mm = torch.zeros(B, width, dtype=torch.long) if has_mm else None
    for b, (s, r) in enumerate(zip(samples, resp)):
        p = s.prompt_ids.numel()
        input_ids[b, :p] = s.prompt_ids
        input_ids[b, p:p + r.numel()] = r
        attention_mask[b, :p + r.numel()] = 1
        response_mask[b, p:p + r.numel()] = 1
        if mm is not None:
            mm[b, :p] = s.mm_token_type_ids
    labels = torch.full_like(input_ids, pad_token_id)
    labels[:, :-1] = input_ids[:, 1:]
    label_mask = torch.zeros_like(response_mask)
    label_mask[:, :-1] = response_mask[:, 1:]
    with_images = [s for s in samples if s.image_grid_thw.numel()]
    pixel_values = torch.cat([s.pixel_values for s in with_images]) if with_images else torch.zeros(0, 0)
    grid = torch.cat([s.image_grid_thw for s in with_images]) if with_images else torch.zeros(0, 3, dtype=torch.long)
    aug = None
    if aug_pixel_values is not None:
        for b, (s, a) in enumerate(zip(samples, aug_pixel_values)):
            if a.shape != s.pixel_values.shape:
                raise ValueError(f"collate: row {b} masked view has shape {tuple(a.shape)}, original {tuple(s.pixel_values.shape)}")
        aug = torch.cat([a for s, a in zip(samples, aug_pixel_values) if s.image_grid_thw.numel()]) if with_images else pixel_values.clone()
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask, labels=labels,
        label_mask=label_mask, mm_token_type_ids=mm, pixel_values=pixel_values, image_grid_thw=grid,
        pixel_values_aug=aug, prompt_lens=torch.tensor([s.prompt_ids.numel() for s in samples]),
        response_lens=torch.tensor([r.numel() for r in resp]), uids=torch.tensor([s.uid for s in samples]),
        group_index=torch.tensor(_group_index(samples)),
    )


def _group_index(samples: Sequence[PromptSample]) -> list[int]:
    out, g = [], -1
    for b, s in enumerate(samples):
        if b == 0 or s is not samples[b - 1]:
            g += 1
        out.append(g)
    return out
