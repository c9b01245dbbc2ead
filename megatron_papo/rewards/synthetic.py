"""Reward of the synthetic vision task: short single-word answers (colour names, small numbers).

- answer read from a response: the content of its last brace-balanced ``\\boxed{...}`` if there is
  one, else the whole stripped response;
- normalisation (both sides): strip whitespace, lower-case, drop trailing ``.`` ;
- ``accuracy`` = 1 if the normalised answer equals the normalised ground truth;
- ``format`` = 1 if the response is exactly one word of letters/digits (e.g. ``red``, ``3``),
  optionally written as ``\\boxed{word}``, with nothing else except surrounding whitespace;
- ``overall`` = 0.9 * accuracy + 0.1 * format (the math reward's weights).
"""

from __future__ import annotations

import re
from typing import Optional

from megatron_papo.rewards.registry import REWARDS, check_batch

_WORD = r"[A-Za-z0-9]+"
_FORMAT = re.compile(rf"\s*(?:\\boxed\{{\s*{_WORD}\s*\}}|{_WORD})\s*")
_BOXED = "\\boxed{"


def last_boxed(text: str) -> Optional[str]:
    """Content of the last brace-balanced ``\\boxed{...}``, or None if absent/unbalanced."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 0
    body = text[start + len(_BOXED):]
    for i, ch in enumerate(body):
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return body[:i]
            depth -= 1
    return None


def normalize_answer(text: str) -> str:
    """Strip, lower-case, drop trailing periods."""
    return text.strip().lower().rstrip(".").strip()


def extract_answer(response: str) -> str:
    """The answer in ``response``: last ``\\boxed{}`` content, else the stripped response."""
    boxed = last_boxed(response)
    return response.strip() if boxed is None else boxed.strip()


@REWARDS.register("synthetic")
def synthetic_reward(responses: list[str], answers: list[str], format_weight: float = 0.1) -> list[dict[str, float]]:
    """Batch reward: one ``{overall, format, accuracy}`` dict per response."""
    check_batch(responses, answers)
    out = []
    for response, answer in zip(responses, answers):
        gt = normalize_answer(answer)
        acc = 1.0 if gt and normalize_answer(extract_answer(response)) == gt else 0.0
        fmt = 1.0 if _FORMAT.fullmatch(response) else 0.0
        out.append({"overall": (1.0 - format_weight) * acc + format_weight * fmt, "format": fmt, "accuracy": acc})
    return out
