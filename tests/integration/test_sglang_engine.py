"""SGLang engine on CPU against transformers: greedy tokens/log-probs, n-sampling, weight-update transports.

One engine (module-scoped) serves every test here: an engine start costs 15-100 s on 2 shared cores.
Tests run in file order; each weight-update test pushes a complete, differently perturbed checkpoint
and compares with transformers holding exactly those weights.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch

from megatron_papo.rollout.base import EngineDiedError, EngineError
from megatron_papo.rollout.sglang_engine import SGLangEngine
from tests.integration.sglang_reference import QUESTIONS, encode, hf_greedy, hf_logprobs, make_image, perturbed_checkpoint

pytestmark = [pytest.mark.engine, pytest.mark.slow]

MAX_NEW = 12


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with SGLangEngine(str(tiny_model_dir), timeout_s=300) as eng:
        yield eng


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(processor):
    """(question, images, processor encoding): two image prompts and a text-only one."""
    items = [(QUESTIONS[0], [make_image(0)]), (QUESTIONS[1], [make_image(1, 84)]), (QUESTIONS[2], [])]
    return [(q, ims, encode(processor, q, ims)) for q, ims in items]


def _hf_model(path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()


def _assert_greedy_matches(engine, model, prompts, tag):
    reqs = [(enc["input_ids"][0].tolist(), ims) for _, ims, enc in prompts]
    res = engine.generate(reqs, n=1, sampling={"temperature": 0.0, "max_new_tokens": MAX_NEW})
    worst = 0.0
    for (q, _, enc), (r,) in zip(prompts, res):
        ref_ids, ref_lp = hf_greedy(model, enc, engine.banned_ids, engine.eos_ids, MAX_NEW)
        assert r.token_ids == ref_ids, f"{tag}: {q!r}: engine {r.token_ids} != transformers {ref_ids}"
        diff = max(abs(a - b) for a, b in zip(r.logprobs, ref_lp))
        worst = max(worst, diff)
        assert diff < 1e-5, f"{tag}: {q!r}: max |logprob diff| {diff:.2e}"
    print(f"{tag}: greedy tokens equal, max |logprob diff| {worst:.2e}")


def test_greedy_matches_transformers(engine, prompts, tiny_model_dir):
    _assert_greedy_matches(engine, _hf_model(tiny_model_dir), prompts, "initial weights")


def test_text_prompt_and_expanded_ids_agree(engine, prompts, processor):
    q, ims, enc = prompts[0]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                         add_generation_prompt=True)
    greedy = {"temperature": 0.0, "max_new_tokens": MAX_NEW}
    a = engine.generate([(text, ims)], sampling=greedy)[0][0]
    b = engine.generate([(enc["input_ids"][0].tolist(), ims)], sampling=greedy)[0][0]
    assert a.token_ids == b.token_ids
    assert a.prompt_len == b.prompt_len == enc["input_ids"].shape[1]


def test_sampling_n8_logprobs_are_temperature_scaled(engine, prompts, tiny_model_dir):
    model = _hf_model(tiny_model_dir)
    temp = 0.7
    reqs = [(enc["input_ids"][0].tolist(), ims) for _, ims, enc in prompts[:2]]
    res = engine.generate(reqs, n=8, sampling={"temperature": temp, "top_p": 1.0, "max_new_tokens": 8})
    assert [len(g) for g in res] == [8, 8]
    banned = set(engine.banned_ids)
    distinct = set()
    worst = 0.0
    for (_, _, enc), group in zip(prompts, res):
        for r in group:
            assert len(r.token_ids) == len(r.logprobs) > 0
            assert r.finish_reason in ("stop", "length")
            assert not banned & set(r.token_ids), "sampled a banned id"
            ref = hf_logprobs(model, enc, r.token_ids, engine.banned_ids, temperature=temp)
            worst = max(worst, max(abs(a - b) for a, b in zip(r.logprobs, ref)))
            distinct.add(tuple(r.token_ids))
    assert worst < 1e-5, f"sampled-token log-probs vs log_softmax(logits/T): {worst:.2e}"
    assert len(distinct) > 1, "8 samples at T=0.7 should not all be identical"


def test_seeded_samples_repeat_and_do_not_depend_on_the_batch(engine, prompts):
    """On CPU the engine honours per-request seeds (rollout/cpu_shim/seeded.py) and computes batch-invariantly
    (rollout/cpu_shim/batch_invariant.py): the same seeds give the same samples *and log-probs*, bit for bit, in
    another call (prefix cache warm), another batch and another order; other seeds give other samples. Without
    batch invariance the tokens repeat but a quarter of the samples' log-probs move by ~5e-7 (measured)."""
    assert engine.honours_seeds
    reqs = [(enc["input_ids"][0].tolist(), ims) for _, ims, enc in prompts]
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6}
    seeds = [[1000 * i + k for k in range(4)] for i in range(len(reqs))]
    a = engine.generate(reqs, n=4, sampling=sampling, seeds=seeds)
    b = engine.generate(reqs, n=4, sampling=sampling, seeds=seeds)
    alone = engine.generate(reqs[1:2], n=4, sampling=sampling, seeds=seeds[1:2])
    order = [2, 0, 1]  # another order, the text-only request first (SGLang once read the images as flat then)
    moved = engine.generate([reqs[i] for i in order], n=4, sampling=sampling, seeds=[seeds[i] for i in order])
    rev = [moved[order.index(i)] for i in range(len(reqs))]
    other = engine.generate(reqs, n=4, sampling=sampling, seeds=[[s + 7 for s in row] for row in seeds])

    def ids(res):
        return [[r.token_ids for r in group] for group in res]

    assert ids(a) == ids(b) == ids(rev)
    assert ids(alone) == ids(a)[1:2]

    def lps(res):
        return [[r.logprobs for r in group] for group in res]

    assert lps(a) == lps(b) == lps(rev)
    assert lps(alone) == lps(a)[1:2]
    assert ids(other) != ids(a)
    assert len({tuple(t) for g in ids(a) for t in g}) > 1  # samples of one prompt still differ from each other


def test_never_samples_banned_ids_even_when_favoured(engine, prompts, tmp_path, tiny_model_dir):
    """Push weights whose lm_head strongly prefers <|image_pad|>: the engine must still not emit it."""
    from safetensors.torch import load_file

    w = load_file(str(tiny_model_dir / "model.safetensors"))
    pad = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    emb = w["model.embed_tokens.weight"].clone()
    emb[pad] *= 50.0  # tied lm_head: huge logit for the pad id
    try:
        engine.update_weights([("model.embed_tokens.weight", emb)], transport="tensor")
        res = engine.generate([(enc["input_ids"][0].tolist(), ims) for _, ims, enc in prompts[:1]], n=4,
                              sampling={"temperature": 1.0, "max_new_tokens": 8})
        for r in res[0]:
            assert pad not in r.token_ids
    finally:
        engine.update_weights([("model.embed_tokens.weight", w["model.embed_tokens.weight"])], transport="tensor")


@pytest.mark.parametrize("transport,seed", [("tensor", 11), ("disk", 12), ("distributed", 13)])
def test_weight_update_transport(engine, prompts, tmp_path, tiny_model_dir, transport, seed):
    """Perturbed weights pushed by each transport: greedy tokens == transformers, log-probs within 1e-5,
    including for images the engine has already seen (stale vision-embedding cache)."""
    model, tensors = perturbed_checkpoint(tiny_model_dir, tmp_path / "ckpt", seed=seed)
    assert any(k.startswith("visual.") for k in tensors) and any(k.startswith("model.layers.") for k in tensors)
    stats = engine.update_weights(sorted(tensors.items()), transport=transport, bucket_mb=1)
    assert stats["tensors"] == len(tensors)
    _assert_greedy_matches(engine, model, prompts, f"after {transport} sync")


def test_vision_only_update_reaches_seen_image(engine, prompts, tmp_path, tiny_model_dir):
    """Only the vision tower changes; an image encoded before the sync must be re-encoded."""
    model, tensors = perturbed_checkpoint(tiny_model_dir, tmp_path / "ckpt", seed=21, scale=0.5, only="visual")
    engine.update_weights(sorted(tensors.items()), transport="tensor")  # text weights back to the original
    _assert_greedy_matches(engine, _hf_model(tiny_model_dir), prompts[2:], "text-only prompt, original text weights")
    engine.generate([(enc["input_ids"][0].tolist(), ims) for _, ims, enc in prompts[:1]], sampling={"temperature": 0.0})
    _, vis = perturbed_checkpoint(tiny_model_dir, tmp_path / "ckpt2", seed=22, scale=0.5, only="visual")
    model2, _ = perturbed_checkpoint(tiny_model_dir, tmp_path / "ckpt3", seed=22, scale=0.5, only="visual")
    engine.update_weights(sorted((k, v) for k, v in vis.items() if k.startswith("visual.")), transport="tensor")
    _assert_greedy_matches(engine, model2, prompts[:1], "vision-only sync, seen image")


def test_health_and_memory_calls(engine):
    h = engine.health()
    assert h["ok"] and len(h["pids"]) >= 3
    engine.release_memory()
    engine.resume_memory()
    assert engine.health()["ok"]


def test_idle_engine_leaves_the_cpu_to_the_trainer(engine, prompts):
    """An idle engine (every training phase) sleeps on its sockets instead of busy-polling them: without
    ``sleep_on_idle`` SGLang's scheduler held a whole core (101% measured) while it had nothing to do. It still
    answers at once after sleeping."""
    procs = [psutil.Process(p) for p in engine.pids()]
    text_only = [(prompts[2][2]["input_ids"][0].tolist(), [])]
    short = {"temperature": 0.0, "max_new_tokens": 2}
    engine.generate(text_only, n=1, sampling=short)
    time.sleep(1.0)  # let the scheduler go idle
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(4.0)
    used = {p.pid: sum(p.cpu_times()[:2]) - before[p.pid] for p in procs}
    assert max(used.values()) < 1.0, f"CPU seconds used by the idle engine's processes in 4 s: {used}"
    t0 = time.perf_counter()
    engine.generate(text_only, n=1, sampling=short)
    assert time.perf_counter() - t0 < 30.0


def test_zz_killed_scheduler_gives_clear_error_and_no_orphans(engine, prompts):
    """LAST test of the module (it ends the shared engine): SIGKILL the scheduler mid-generation."""
    tracked = engine.pids()
    sched = [p for p in tracked if any("scheduler" in part for part in psutil.Process(p).cmdline())]
    assert sched, f"no scheduler among {[(p, psutil.Process(p).cmdline()[:1]) for p in tracked]}"
    timer = threading.Timer(3.0, os.kill, (sched[0], signal.SIGKILL))
    _, ims, enc = prompts[0]
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(EngineDiedError, match="died during generate"):
            engine.generate([(enc["input_ids"][0].tolist(), ims)], n=4,
                            sampling={"temperature": 1.0, "max_new_tokens": 3000, "ignore_eos": True})
    finally:
        timer.cancel()
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"error took {elapsed:.0f}s (timeout is {engine.timeout_s:.0f}s)"
    time.sleep(0.5)
    alive = [p for p in tracked if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {alive}"
    mine = {c.pid for c in psutil.Process().children(recursive=True)}
    assert not mine & set(tracked)
    assert engine.health()["ok"] is False
    with pytest.raises(EngineError, match="not running"):
        engine.generate([(enc["input_ids"][0].tolist(), ims)])
    print(f"killed scheduler {sched[0]}: EngineDiedError after {elapsed:.1f}s, {len(tracked)} processes ended")
