"""Chat messages from a dataset row, PAPO's format prompts, and the processor's chat template.

Like EasyR1/PAPO ``_build_messages``: the format prompt is rendered around the whole problem text
first, then the text is split at every ``<image>`` placeholder into alternating text / image
content parts of one user message. A problem without placeholders gets all its images first.
The processor's own chat template (default system prompt) is applied with
``add_generation_prompt=True``, so the prompt ends with ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

from typing import Any

IMAGE_PLACEHOLDER = "<image>"

# PAPO's ``examples/format_prompt/math_perception.jinja``: the trimmed problem, a blank line, then the
# instruction (papo_spec §7). The wording is taken from a public copy of a file with that name; the
# original repo was not available offline. ``math`` is EasyR1's math.jinja instruction with the same layout.
FORMAT_PROMPTS: dict[str, str] = {
    "math_perception": (
        "You first think through the reasoning process as an internal monologue, enclosed within "
        "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
    ),
    "math": (
        "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
        "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
    ),
    "short_answer": "Answer with one word.",
}


def apply_format_prompt(problem: str, format_prompt: str) -> str:
    """``problem`` with the named instruction appended (``"{problem.strip()}\\n\\n{instruction}"``).

    ``"none"`` returns the problem unchanged.
    """
    if format_prompt == "none":
        return problem
    if format_prompt not in FORMAT_PROMPTS:
        known = ", ".join(sorted([*FORMAT_PROMPTS, "none"]))
        raise ValueError(f"unknown format_prompt '{format_prompt}'; known: {known}")
    return f"{problem.strip()}\n\n{FORMAT_PROMPTS[format_prompt]}"


def count_placeholders(problem: str) -> int:
    """Number of ``<image>`` placeholders in ``problem``."""
    return problem.count(IMAGE_PLACEHOLDER)


def build_messages(problem: str, num_images: int, format_prompt: str) -> list[dict[str, Any]]:
    """One user message whose content alternates text and ``{"type": "image"}`` parts.

    Raises ``ValueError`` if the problem has placeholders but their count differs from ``num_images``.
    """
    n_ph = count_placeholders(problem)
    if n_ph and n_ph != num_images:
        raise ValueError(f"problem has {n_ph} '<image>' placeholders but {num_images} images")
    text = apply_format_prompt(problem, format_prompt)
    content: list[dict[str, Any]] = []
    if n_ph == 0:
        content.extend({"type": "image"} for _ in range(num_images))
        if text:
            content.append({"type": "text", "text": text})
    else:
        for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                content.append({"type": "image"})
            if part:
                content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def render_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The chat-templated prompt text (one ``<|image_pad|>`` per image, not yet expanded)."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
