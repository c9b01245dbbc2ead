"""Token-level rules shared by the engines and the trainer: banned ids and the engine prompt form.

**Banned ids.** Sampling must never emit a multimodal placeholder (``<|image_pad|>``,
``<|video_pad|>``, ...) or any other special token except the EOS ids: a sampled placeholder breaks
the next multimodal forward. :func:`banned_token_ids` lists them; engines add ``-inf`` to their
logits (SGLang ``logit_bias``, vLLM ``logit_bias``/allowed ids) and the trainer must do the same to
its logits *before* the temperature-scaled log-softmax, or its log-probs differ from the engine's.

**Prompt ids.** The HF processor expands each image to ``N`` copies of ``<|image_pad|>`` (N = the
merged patch count). SGLang and vLLM take token ids with ONE ``<|image_pad|>`` per image and expand
it themselves (an expanded prompt hangs SGLang 0.5.23's Qwen2.5-VL processor).
:func:`to_engine_prompt_ids` converts the trainer's expanded ids to that form.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

PLACEHOLDER_TOKENS = ("<|image_pad|>", "<|video_pad|>")


def eos_token_ids(tokenizer: Any, generation_eos: Optional[Iterable[int]] = None) -> list[int]:
    """The ids a response may end with: the tokenizer's EOS plus generation_config's ``eos_token_id``."""
    ids = set(int(i) for i in (generation_eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def banned_token_ids(tokenizer: Any, vocab_size: Optional[int] = None,
                     allowed: Optional[Iterable[int]] = None) -> list[int]:
    """Ids sampling must never produce: every special added token except EOS/``allowed``, plus ids
    in ``[len(tokenizer), vocab_size)`` that have no token (padded embedding rows).

    ``allowed`` defaults to :func:`eos_token_ids` of the tokenizer; pass generation_config's EOS ids
    (e.g. ``<|im_end|>`` and ``<|endoftext|>`` for Qwen2.5-VL) to keep them all.
    """
    keep = set(int(i) for i in allowed) if allowed is not None else set(eos_token_ids(tokenizer))
    banned = {int(i) for i, tok in tokenizer.added_tokens_decoder.items() if getattr(tok, "special", False)}
    for name in PLACEHOLDER_TOKENS:  # always, even if a tokenizer does not mark them special
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            banned.add(tid)
    if vocab_size is not None:
        banned.update(range(len(tokenizer), int(vocab_size)))
    return sorted(banned - keep)


def to_engine_prompt_ids(prompt_ids: Sequence[int], pad_ids: Iterable[int]) -> list[int]:
    """Collapse every run of a placeholder id (``<|image_pad|>``/``<|video_pad|>``) to one token.

    Idempotent: already-collapsed ids are returned unchanged. Each image of a Qwen2.5-VL prompt sits
    between ``<|vision_start|>`` and ``<|vision_end|>``, so runs never merge two images.
    """
    pads = set(int(i) for i in pad_ids)
    out: list[int] = []
    for tok in prompt_ids:
        tok = int(tok)
        if tok in pads and out and out[-1] == tok:
            continue
        out.append(tok)
    return out
