"""transformers as the independent reference for rollout engines: greedy decoding and teacher-forced
log-probs of Qwen2.5-VL under the engines' rule (banned ids at ``-inf``, logits divided by T).

Used by ``tools/check_weight_sync.py`` and the engine tests. ``enc`` is the HF processor output of ONE
prompt (expanded image pads, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``); the
model is called with ``attention_mask`` and ``mm_token_type_ids`` (0 for generated tokens) so its
M-RoPE positions are the engine's.
"""

from __future__ import annotations

from typing import Any

import torch


def _mm_kwargs(enc: dict[str, torch.Tensor], extra_tokens: int) -> dict[str, torch.Tensor]:
    kw = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
    if "mm_token_type_ids" in enc:
        tt = enc["mm_token_type_ids"]
        kw["mm_token_type_ids"] = torch.cat([tt, torch.zeros((1, extra_tokens), dtype=tt.dtype)], 1)
    return kw


@torch.no_grad()
def hf_greedy(model: Any, enc: dict[str, torch.Tensor], banned: list[int], eos: list[int], max_new_tokens: int
              ) -> tuple[list[int], list[float]]:
    """Greedy decoding (full re-forward per step); returns tokens and ``log_softmax(masked logits)`` of each."""
    ids = enc["input_ids"]
    out_ids: list[int] = []
    out_lp: list[float] = []
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **_mm_kwargs(enc, step)).logits[0, -1].double()
        logits[banned] = float("-inf")
        lp = torch.log_softmax(logits, -1)
        tok = int(torch.argmax(lp))
        out_ids.append(tok)
        out_lp.append(float(lp[tok]))
        if tok in eos:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return out_ids, out_lp


@torch.no_grad()
def hf_logprobs(model: Any, enc: dict[str, torch.Tensor], response: list[int], banned: list[int],
                temperature: float = 1.0) -> list[float]:
    """Teacher-forced ``log_softmax(masked logits / T)`` of each response token (one forward)."""
    ids = torch.cat([enc["input_ids"], torch.tensor([response])], 1)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **_mm_kwargs(enc, len(response))).logits[0].double()
    P = enc["input_ids"].shape[1]
    lg = logits[P - 1:P - 1 + len(response)]
    lg[:, banned] = float("-inf")
    lp = torch.log_softmax(lg / temperature, -1)
    return lp.gather(1, torch.tensor(response)[:, None])[:, 0].tolist()
