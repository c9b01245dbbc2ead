"""Chat messages, format prompts and encode_prompt against hand-built references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_papo.config.data import DataConfig
from megatron_papo.data.images import resize_by_pixels
from megatron_papo.data.processing import encode_prompt
from megatron_papo.data.prompt import FORMAT_PROMPTS, apply_format_prompt, build_messages
from megatron_papo.data.synthetic import COLOURS


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def test_build_messages_splits_at_placeholders():
    msgs = build_messages("A <image> and <image>!", 2, "none")
    assert msgs == [{"role": "user", "content": [
        {"type": "text", "text": "A "}, {"type": "image"}, {"type": "text", "text": " and "}, {"type": "image"},
        {"type": "text", "text": "!"}]}]
    msgs = build_messages("<image>Q?", 1, "short_answer")
    assert msgs[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q?\n\nAnswer with one word."}]


def test_build_messages_without_placeholder_puts_images_first():
    assert build_messages("Q", 2, "none")[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q"}]
    assert build_messages("Q", 0, "none")[0]["content"] == [{"type": "text", "text": "Q"}]


def test_placeholder_count_mismatch_raises():
    with pytest.raises(ValueError, match="2 '<image>' placeholders but 1 images"):
        build_messages("<image><image>", 1, "none")


def test_format_prompts():
    text = apply_format_prompt("  What is 2+2?\n", "math_perception")
    assert text == ("What is 2+2?\n\nYou first think through the reasoning process as an internal monologue, enclosed within "
                    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.")
    assert apply_format_prompt("Q", "math").endswith("The final answer MUST BE put in \\boxed{}.")
    assert apply_format_prompt(" Q ", "none") == " Q "
    assert set(FORMAT_PROMPTS) == {"math_perception", "math", "short_answer"}
    with pytest.raises(ValueError, match="unknown format_prompt 'cot'; known: math, math_perception, none, short_answer"):
        apply_format_prompt("Q", "cot")


def test_encode_prompt_matches_hand_built_reference(processor):
    cfg = DataConfig(format_prompt="short_answer")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))  # 60x40 < 56*56
    row = {"uid": 9, "problem": "<image>What colour is the shape?", "images": [img], "answer": "red"}
    s = encode_prompt(processor, row, cfg, source="synthetic")
    expect_text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   "<|vision_start|><|image_pad|><|vision_end|>What colour is the shape?\n\nAnswer with one word.<|im_end|>\n"
                   "<|im_start|>assistant\n")
    assert s.prompt == expect_text
    # PAPO resize: 60*40=2400 < 3136 -> f = sqrt(3136/2400) = 1.143: 68.6 -> 68, 45.7 -> 45
    assert s.images[0].size == (68, 45) and s.raw_images[0].size == (60, 40)
    assert s.images[0].tobytes() == resize_by_pixels(img, 3136, 12544).tobytes()
    t, h, w = s.image_grid_thw[0].tolist()
    # smart_resize(45, 68): round to multiples of 28 -> 56 x 56 (3136 >= min), so 4 x 4 patches
    assert (t, h, w) == (1, 4, 4) and s.pixel_values.shape == (16, 3 * 2 * 14 * 14)
    n_tok = h * w // 4
    tok = processor.tokenizer
    ref_ids = tok(expect_text.replace("<|image_pad|>", "<|image_pad|>" * n_tok), add_special_tokens=False)["input_ids"]
    assert s.prompt_ids.dtype == torch.long and s.prompt_ids.tolist() == ref_ids
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((s.prompt_ids == pad_id).sum()) == n_tok
    assert s.mm_token_type_ids is not None and torch.equal(s.mm_token_type_ids, (s.prompt_ids == pad_id).long())
    assert s.uid == 9 and s.answer == "red" and s.pixel_range == (3136, 12544)


def test_encode_prompt_bad_row_names_uid(processor):
    row = {"uid": 4, "problem": "<image><image>Q", "images": [Image.new("RGB", (56, 56))], "answer": "x"}
    with pytest.raises(ValueError, match="row 4: problem has 2 '<image>' placeholders but 1 images"):
        encode_prompt(processor, row, DataConfig(), source="synthetic")


def test_text_only_row(processor):
    s = encode_prompt(processor, {"uid": 0, "problem": "What is 2+2?", "images": [], "answer": "4"}, DataConfig())
    assert s.image_grid_thw.shape == (0, 3) and s.images == [] and s.prompt.endswith("<|im_start|>assistant\n")


def test_synthetic_answers_are_single_tokens_after_assistant(processor):
    tok = processor.tokenizer
    head = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for colour in COLOURS:
        ids = tok(f"<|im_start|>assistant\n{colour}<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids[:len(head)] == head and len(ids) == len(head) + 2 and ids[-1] == end, (colour, ids)
        assert tok.decode(ids[len(head):len(head) + 1]) == colour
