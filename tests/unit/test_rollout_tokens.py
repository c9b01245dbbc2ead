"""Banned ids and the engine prompt form (one ``<|image_pad|>`` per image) on the tiny tokenizer/processor."""

from __future__ import annotations

import pytest

from megatron_papo.rollout.base import GenerationRequest, SamplingParams
from megatron_papo.rollout.tokens import banned_token_ids, eos_token_ids, to_engine_prompt_ids


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model_dir))


def test_banned_ids_cover_specials_but_not_eos(processor):
    tok = processor.tokenizer
    eos = eos_token_ids(tok, [tok.convert_tokens_to_ids("<|endoftext|>")])
    banned = banned_token_ids(tok, vocab_size=520, allowed=eos)
    names = set(tok.convert_ids_to_tokens([i for i in banned if i < len(tok)]))
    assert {"<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|im_start|>", "<|vision_pad|>"} <= names
    assert "<|im_end|>" not in names and "<|endoftext|>" not in names
    assert set(range(len(tok), 520)) <= set(banned)  # padded rows without a token
    assert all(not tok.convert_ids_to_tokens(i).startswith("<|") for i in range(0, 400) if i not in banned)
    assert banned == sorted(banned)


def test_expanded_prompt_collapses_to_engine_form(processor):
    from PIL import Image

    from tests.integration.sglang_reference import encode, make_image

    images = [make_image(0), make_image(1, 56)]
    enc = encode(processor, "Compare the two images.", images)
    expanded = enc["input_ids"][0].tolist()
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two images."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    single = processor.tokenizer.encode(text, add_special_tokens=False)
    pads = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    assert len(expanded) > len(single)
    assert to_engine_prompt_ids(expanded, pads) == single
    assert to_engine_prompt_ids(single, pads) == single  # idempotent
    assert single.count(pads[0]) == 2
    assert isinstance(images[0], Image.Image)


def test_request_and_sampling_coercion():
    r = GenerationRequest.coerce(("hello", None))
    assert r.prompt == "hello" and r.images == []
    r = GenerationRequest.coerce(([1, 2, 3], ["img"]))
    assert r.prompt_ids == [1, 2, 3] and r.images == ["img"]
    with pytest.raises(ValueError):
        GenerationRequest()
    sp = SamplingParams.coerce({"temperature": 0.5, "max_new_tokens": 3})
    assert sp.temperature == 0.5 and sp.top_p == 1.0
    with pytest.raises(ValueError, match="unknown sampling keys"):
        SamplingParams.coerce({"temprature": 1.0})


def test_sglang_from_config_without_starting(tiny_model_dir):
    from megatron_papo.config.rollout import RolloutConfig
    from megatron_papo.rollout.sglang_engine import SGLangEngine

    eng = SGLangEngine.from_config(RolloutConfig(transport="disk", bucket_mb=4, timeout_s=7.0), str(tiny_model_dir))
    assert eng.engine_kwargs["dtype"] == "float32"  # the checkpoint's dtype, not SGLang's fp32->fp16 "auto"
    assert eng.transport == "disk" and eng.bucket_bytes == 4 << 20 and eng.timeout_s == 7.0
    assert eng.health()["ok"] is False and eng.pids() == []
    from megatron_papo.rollout.sglang_server import SGLangServerEngine, server_argv

    srv = SGLangEngine.from_config(RolloutConfig(mode="server"), str(tiny_model_dir))
    assert isinstance(srv, SGLangServerEngine) and srv.url.startswith("http://127.0.0.1:")
    argv = server_argv({"model_path": "m", "disable_cuda_graph": True, "tp_size": 2, "x": False}, "h", 1)
    assert argv[1:] == ["-m", "megatron_papo.rollout._sglang_server_main", "--host", "h", "--port", "1", "--model-path", "m",
                        "--disable-cuda-graph", "--tp-size", "2"]
