"""Loss aggregation modes with explicit, global normalisers (papo_spec §2.7).

The trainer computes one micro-batch at a time and **sums** the resulting losses over the
micro-batches of a mini-batch and (via gradient all-reduce with SUM, not average) over the
data-parallel ranks. Every mode below is written so that this sum equals the mode's
mini-batch objective, given normalisers that describe the *whole* mini-batch:

- ``global_tokens``: number of response tokens (mask == 1) in the mini-batch, summed over
  all its micro-batches and all DP ranks;
- ``global_seqs``: number of responses with at least one response token in the mini-batch,
  summed likewise;
- ``num_microbatches``: number of micro-batches in the mini-batch summed over DP ranks
  (= micro-batches per rank x DP size when every rank runs the same count).

:func:`count_normalisers` gives a micro-batch's local (tokens, seqs); the trainer sums them over
micro-batches and all-reduces (SUM) across DP before the first backward of the mini-batch.

Modes (``v`` values, ``m`` mask, sums over the micro-batch):

- ``token_mean``: ``sum(v m) / global_tokens`` -> the mini-batch token mean.
- ``microbatch_token_mean``: ``[sum(v m) / max(sum(m), 1)] / num_microbatches`` -> the mean over
  micro-batches of their token means: the reference code's behaviour (token mean per
  micro-batch, divided by gradient accumulation, FSDP-averaged over ranks). The reference uses
  ``sum(m) + 1e-8`` as the denominator; ``max(sum(m), 1)`` differs by < 1e-8 relative.
- ``seq_mean_token_mean``: ``sum_i [sum_t v m / max(sum_t m, 1)] / global_seqs`` -> mean over
  responses of their token means (the paper's 1/|o_i| form; the reference's ``seq`` mode).
- ``seq_mean_token_sum``: ``sum_i sum_t v m / global_seqs`` -> mean over responses of their
  token sums.

With Megatron-Core's ``forward_backward_func`` (0.16) the SUM contract needs care, because by
default mcore divides each micro-batch loss by ``num_microbatches`` (2-tuple loss_func) and DDP
averages gradients over DP. Either (a) set ``config.calculate_per_token_loss=True`` (DDP then sums,
the schedule does not divide a 3-tuple loss) and make ``finalize_model_grads_func`` call
``finalize_model_grads(model, None, ...)`` so it does not divide by mcore's own token count; or
(b) keep the defaults and return ``loss * num_microbatches`` (global count, i.e. per-rank count x
DP size) from the 2-tuple loss_func, which undoes both divisions.

When a normaliser is ``None`` the local micro-batch count is used, which is exact only for a
single micro-batch on a single rank (handy in tests and offline analysis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, Union

import torch

from megatron_papo.algos.registry import Registry

Number = Union[int, float, torch.Tensor]
AGGREGATIONS: Registry[Callable[..., torch.Tensor]] = Registry("loss aggregation mode")


def count_normalisers(mask_BT: torch.Tensor) -> tuple[int, int]:
    """Local (response tokens, responses with >= 1 token) of one micro-batch."""
    m = mask_BT.detach() > 0
    return int(m.sum().item()), int(m.any(dim=-1).sum().item())


def _or_local(value: Optional[Number], local: torch.Tensor) -> Number:
    return local if value is None else value


@AGGREGATIONS.register("token_mean")
def _token_mean(v: torch.Tensor, m: torch.Tensor, global_tokens: Optional[Number], global_seqs: Optional[Number],
                num_microbatches: int) -> torch.Tensor:
    denom = _or_local(global_tokens, m.sum().clamp(min=1))
    return (v * m).sum() / denom


@AGGREGATIONS.register("microbatch_token_mean")
def _microbatch_token_mean(v: torch.Tensor, m: torch.Tensor, global_tokens: Optional[Number],
                           global_seqs: Optional[Number], num_microbatches: int) -> torch.Tensor:
    return (v * m).sum() / m.sum().clamp(min=1) / num_microbatches


@AGGREGATIONS.register("seq_mean_token_mean")
def _seq_mean_token_mean(v: torch.Tensor, m: torch.Tensor, global_tokens: Optional[Number],
                         global_seqs: Optional[Number], num_microbatches: int) -> torch.Tensor:
    per_seq = (v * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_seq.sum() / _or_local(global_seqs, (m.sum(-1) > 0).sum().clamp(min=1))


@AGGREGATIONS.register("seq_mean_token_sum")
def _seq_mean_token_sum(v: torch.Tensor, m: torch.Tensor, global_tokens: Optional[Number],
                        global_seqs: Optional[Number], num_microbatches: int) -> torch.Tensor:
    per_seq = (v * m).sum(-1)
    return per_seq.sum() / _or_local(global_seqs, (m.sum(-1) > 0).sum().clamp(min=1))


def aggregate(values_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, *, global_tokens: Optional[Number] = None,
              global_seqs: Optional[Number] = None, num_microbatches: int = 1) -> torch.Tensor:
    """This micro-batch's additive share of the mini-batch objective ``mode`` (see module docstring)."""
    if values_BT.shape != mask_BT.shape:
        raise ValueError(f"values {tuple(values_BT.shape)} and mask {tuple(mask_BT.shape)} differ in shape")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    fn = AGGREGATIONS.get(mode)
    m = mask_BT.to(values_BT.dtype)
    # padded positions may hold inf/nan (e.g. log-probs of padding): zero them, not multiply them
    v = torch.where(mask_BT > 0, values_BT, torch.zeros_like(values_BT))
    return fn(v, m, global_tokens, global_seqs, num_microbatches)
