"""PAPO's math reward (papo_spec §7; EasyR1 ``examples/reward_function/math.py``).

Per response:
1. whitespace around ``<``, ``>``, ``/`` is removed (regex ``\\s*(<|>|/)\\s*`` -> the char), and the
   normalised text is used for both checks below;
2. ``format`` = 1 if the whole response matches ``<think>.*</think>.*\\boxed{.*}.*`` (DOTALL, full match);
3. ``accuracy`` = 1 if ``mathruler.grader.grade_answer(extract_boxed_content(response), answer)``;
   ``extract_boxed_content`` takes the **last** ``\\boxed{...}`` (brace-balanced) and returns the
   string ``"None"`` when there is none; ground truths are expected without a ``\\boxed{}`` wrapper;
4. ``overall`` = (1 - format_weight) * accuracy + format_weight * format, format_weight = 0.1.
"""

from __future__ import annotations

import re

from mathruler.grader import extract_boxed_content, grade_answer

from megatron_papo.rewards.registry import REWARDS, check_batch

_WS_AROUND_TAG_CHARS = re.compile(r"\s*(<|>|/)\s*")
_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def normalize_response(response: str) -> str:
    """Drop whitespace around ``<``, ``>`` and ``/`` (handles ``< think >``-style outputs)."""
    return _WS_AROUND_TAG_CHARS.sub(r"\1", response)


def format_score(response: str) -> float:
    """1.0 if the (normalised) response is ``<think>...</think>...\\boxed{...}...``, else 0.0."""
    return 1.0 if _FORMAT.fullmatch(response) else 0.0


def accuracy_score(response: str, answer: str) -> float:
    """1.0 if the last ``\\boxed{}`` content grades equal to ``answer`` (mathruler), else 0.0."""
    return 1.0 if grade_answer(extract_boxed_content(response), answer) else 0.0


@REWARDS.register("math")
def math_reward(responses: list[str], answers: list[str], format_weight: float = 0.1) -> list[dict[str, float]]:
    """Batch math reward: one ``{overall, format, accuracy}`` dict per response."""
    check_batch(responses, answers)
    out = []
    for response, answer in zip(responses, answers):
        text = normalize_response(response)
        fmt, acc = format_score(text), accuracy_score(text, answer)
        out.append({"overall": (1.0 - format_weight) * acc + format_weight * fmt, "format": fmt, "accuracy": acc})
    return out
