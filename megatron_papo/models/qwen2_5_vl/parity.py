"""Log-prob parity helpers: a built-in multimodal batch, transformers' reference log-probs, mcore's.

Used by ``tools/compare_logprobs.py`` and the model tests. The reference is transformers'
``Qwen2_5_VLForConditionalGeneration`` called with ``attention_mask`` and ``mm_token_type_ids``
(env_notes.md: without them M-RoPE positions differ). mcore log-probs are computed from the
vocab-parallel logits with ``vocab_parallel_cross_entropy`` (no vocabulary gather) under mcore's
forward-backward schedule, so the same code runs at any TP x PP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch


def builtin_samples() -> list[dict[str, Any]]:
    """Three samples: two images of different sizes (one spans several attention windows), text-only, one image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def img(h: int, w: int) -> Any:
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    return [
        {"content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}, {"type": "image"},
                     {"type": "text", "text": "Compare the two pictures."}],
         "images": [img(224, 168), img(56, 84)], "response": "The square is red. <think> left </think>"},
        {"content": "How many shapes are in the image? Count the circles.", "images": [], "response": "2 circles"},
        {"content": [{"type": "text", "text": "Where is the shape?"}, {"type": "image"}], "images": [img(112, 56)],
         "response": "\\boxed{left}"},
    ]


def load_samples(path: str | Path) -> list[dict[str, Any]]:
    """JSONL rows ``{"prompt": str, "images": [paths], "response": str}``; images are placed before the prompt."""
    from PIL import Image

    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        images = [Image.open(p).convert("RGB") for p in row.get("images", [])]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": row["prompt"]}]
        out.append({"content": content if images else row["prompt"], "images": images, "response": row["response"]})
    return out


def make_batch(processor: Any, samples: list[dict[str, Any]], padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Prompt (chat template) + response for every sample, padded into one batch by the processor."""
    texts, images = [], []
    for s in samples:
        prompt = processor.apply_chat_template([{"role": "user", "content": s["content"]}], add_generation_prompt=True)
        texts.append(prompt + s["response"] + "<|im_end|>")
        images.extend(s["images"])
    processor.tokenizer.padding_side = padding_side
    out = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    return dict(out)


def token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, S-1]`` bool: positions whose next-token log-prob is compared (both tokens are real)."""
    am = batch["attention_mask"].bool()
    return am[:, 1:] & am[:, :-1]


@torch.no_grad()
def hf_token_logprobs(hf_dir: str | Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' log p(x_{t+1} | x_<=t) ``[B, S-1]`` in fp32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
          if k in batch}
    logits = model(**kw).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return lp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)


def vocab_parallel_logprobs(logits_BSV: torch.Tensor, input_ids: torch.Tensor, tp_group: Any) -> torch.Tensor:
    """``[B, S-1]`` next-token log-probs from vocab-parallel logits (mcore's vocab-parallel cross entropy)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = logits_BSV[:, :-1].float().contiguous()
    labels = input_ids[:, 1:].contiguous()
    return -vocab_parallel_cross_entropy(logits, labels, tp_group=tp_group) if _ce_takes_group() else \
        -vocab_parallel_cross_entropy(logits, labels)


def _ce_takes_group() -> bool:
    import inspect

    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return "tp_group" in inspect.signature(vocab_parallel_cross_entropy).parameters


def mcore_token_logprobs(model_chunks: list[Any], batch: dict[str, torch.Tensor], pg: Any,
                         grad_scale: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """mcore ``[B, S-1]`` log-probs via the forward(-backward) schedule; returned on the last stage, else None.

    With ``grad_scale`` (``[B, S-1]``) the schedule also runs backward on ``-(logp * grad_scale).sum()``
    (a log-prob loss), leaving the gradients in ``param.grad`` / ``param.main_grad``.
    """
    from megatron_papo.models.qwen2_5_vl.build import make_forward_step
    from megatron_papo.parallel.training import forward_backward

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in batch}
    result: dict[str, torch.Tensor] = {}

    def loss_fn(b: dict[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        lp = vocab_parallel_logprobs(logits, b["input_ids"], pg.tp_group)
        result["logp"] = lp.detach()
        weight = grad_scale if grad_scale is not None else torch.zeros_like(lp)
        loss = -(lp * weight).sum()
        return loss, {"loss": loss.detach().clone()}

    B, S = inputs["input_ids"].shape
    forward_backward(model_chunks, make_forward_step(loss_fn), iter([inputs]), 1, pg, seq_length=S,
                     micro_batch_size=B, forward_only=grad_scale is None)
    return result.get("logp")
