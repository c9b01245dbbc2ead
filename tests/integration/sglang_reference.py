"""Independent reference for the SGLang engine tests: transformers' Qwen2.5-VL, greedy, with the same
banned-id mask, plus helpers to build prompts/images and perturbed checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

QUESTIONS = ["What colour is the square?", "How many shapes are in the image?", "Where is the shape?"]


def make_image(seed: int, size: int = 112) -> Image.Image:
    """A deterministic random RGB image."""
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def encode(processor: Any, question: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Chat-template a user turn with ``images`` and run the HF processor (expanded image pads)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[text], images=images or None, return_tensors="pt")


@torch.no_grad()
def hf_greedy(model: Any, enc: dict[str, torch.Tensor], banned: list[int], eos: list[int], max_new_tokens: int
              ) -> tuple[list[int], list[float]]:
    """Greedy decoding by full re-forward each step; log-probs of the masked ``log_softmax(logits)``."""
    ids = enc["input_ids"]
    extra = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw")}
    tt = enc.get("mm_token_type_ids")
    out_ids: list[int] = []
    out_lp: list[float] = []
    for _ in range(max_new_tokens):
        kw = dict(extra)
        if tt is not None:
            kw["mm_token_type_ids"] = tt
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0, -1].double()
        logits[banned] = float("-inf")
        lp = torch.log_softmax(logits, -1)
        tok = int(torch.argmax(lp))
        out_ids.append(tok)
        out_lp.append(float(lp[tok]))
        if tok in eos:
            break
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
        if tt is not None:
            tt = torch.cat([tt, torch.zeros((1, 1), dtype=tt.dtype)], 1)
    return out_ids, out_lp


@torch.no_grad()
def hf_logprobs(model: Any, enc: dict[str, torch.Tensor], response: list[int], banned: list[int],
                temperature: float = 1.0) -> list[float]:
    """Teacher-forced log-probs of ``response`` under ``log_softmax(masked logits / T)`` (one forward)."""
    ids = torch.cat([enc["input_ids"], torch.tensor([response])], 1)
    kw = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in enc:
        kw["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros((1, len(response)), dtype=torch.long)], 1)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits[0].double()
    P = enc["input_ids"].shape[1]
    lg = logits[P - 1:P - 1 + len(response)]
    lg[:, banned] = float("-inf")
    lp = torch.log_softmax(lg / temperature, -1)
    return lp.gather(1, torch.tensor(response)[:, None])[:, 0].tolist()


def perturbed_checkpoint(src_dir: str | Path, out_dir: str | Path, seed: int, scale: float = 0.05,
                         only: Optional[str] = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Load the HF model, add seeded noise (to params whose name contains ``only``, if given), save it to
    ``out_dir``; return (model, checkpoint-named tensors read back from the saved safetensors)."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src_dir), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(out_dir))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return model, tensors
