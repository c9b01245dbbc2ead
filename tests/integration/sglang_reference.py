"""Helpers for the SGLang engine tests: prompts/images, perturbed checkpoints, and (re-exported) the
transformers reference (greedy / teacher-forced log-probs with the engines' banned-id mask)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from megatron_papo.rollout.hf_reference import hf_greedy, hf_logprobs

__all__ = ["QUESTIONS", "encode", "hf_greedy", "hf_logprobs", "make_image", "perturbed_checkpoint"]

QUESTIONS = ["What colour is the square?", "How many shapes are in the image?", "Where is the shape?"]


def make_image(seed: int, size: int = 112) -> Image.Image:
    """A deterministic random RGB image."""
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def encode(processor: Any, question: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Chat-template a user turn with ``images`` and run the HF processor (expanded image pads)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=[text], images=images or None, return_tensors="pt")


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
