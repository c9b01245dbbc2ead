"""SGLang server mode (``python -m sglang.launch_server`` over HTTP) on CPU against transformers: greedy tokens
and log-probs with images, a tensor-transport weight update, and a shutdown that leaves no process."""

from __future__ import annotations

import time

import psutil
import pytest
import torch

from megatron_papo.rollout.sglang_server import SGLangServerEngine
from tests.integration.sglang_reference import QUESTIONS, encode, hf_greedy, make_image, perturbed_checkpoint

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_server_mode_generate_update_shutdown(tiny_model_dir, tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    prompts = [encode(processor, QUESTIONS[0], [make_image(3)]), encode(processor, QUESTIONS[2], [])]
    images = [[make_image(3)], []]
    eng = SGLangServerEngine(str(tiny_model_dir), timeout_s=300).start()
    pids = eng.pids()
    try:
        assert eng.health()["ok"] and len(pids) >= 2
        for tag, model in [("initial", None), ("after tensor sync", "perturbed")]:
            if model is None:
                model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
            else:
                model, tensors = perturbed_checkpoint(tiny_model_dir, tmp_path / "ckpt", seed=31)
                eng.update_weights(sorted(tensors.items()), transport="tensor", bucket_mb=1)
            res = eng.generate([(e["input_ids"][0].tolist(), ims) for e, ims in zip(prompts, images)],
                               sampling={"temperature": 0.0, "max_new_tokens": 10})
            for enc, (r,) in zip(prompts, res):
                ids, lps = hf_greedy(model, enc, eng.banned_ids, eng.eos_ids, 10)
                assert r.token_ids == ids, tag
                assert max(abs(a - b) for a, b in zip(r.logprobs, lps)) < 1e-5, tag
    finally:
        eng.shutdown()
    time.sleep(0.5)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
