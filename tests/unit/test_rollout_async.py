"""Overlapped rollouts (rollout/async_rollout.py) in one process, with a scripted engine: submit returns while the
engine still works, collect gives exactly the groups of a synchronous fleet call, a failure in the background
surfaces as the fleet's error, the checkpoint record round-trips bit for bit, and the config rules hold."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from megatron_papo.config import ConfigError, load_config
from megatron_papo.rollout.async_rollout import AsyncRollout, groups_from_state, groups_state
from megatron_papo.rollout.base import EngineDiedError, GenerationResult
from megatron_papo.rollout.fleet import EngineSlot, FleetError, RolloutFleet
from megatron_papo.rollout_phase import sample_seed


class ScriptedEngine:
    """Answers sample k of prompt uid with ids [uid, k, seed % 97] and awkward float log-probs; can wait on a gate."""

    def __init__(self, gate: threading.Event | None = None, die: bool = False) -> None:
        self.gate, self.die = gate, die
        self.threads: list[str] = []

    def generate(self, requests, n=1, sampling=None, seeds=None):
        self.threads.append(threading.current_thread().name)
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.die:
            raise EngineDiedError("SGLang engine died during generate (host exit code -9)")
        out = []
        for (prompt, _images), row in zip(requests, seeds):
            uid = int(prompt.split()[-1])
            out.append([GenerationResult([uid, k, s % 97], [0.1 + 0.2, -1e-300, -uid / 3.0], "stop") for k, s in enumerate(row)])
        return out


TOKENIZER = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids)))


def reward_fn(responses, answers):
    return [{"overall": float(r.split()[1] == a), "accuracy": float(r.split()[1] == a)} for r, a in zip(responses, answers)]


def _samples(uids):
    return [SimpleNamespace(uid=u, prompt=f"prompt {u}", images=[], answer=str(u % 3)) for u in uids]


def _fleet(engine):
    return RolloutFleet([EngineSlot(0, 0)], rank=0, world_size=1, engines={0: engine}, placement="separate")


GEN = dict(n=3, sampling={"max_new_tokens": 3}, seed=7, tokenizer=TOKENIZER, reward_fn=reward_fn)
ASSEMBLE = dict(data_cfg=None, processor=None, make_aug=False)


def _fields(groups):
    return [(g.sample.uid, g.engine, g.response_ids, g.engine_logprobs, g.finish_reasons, g.texts, g.rewards) for g in groups]


def test_submit_returns_while_the_engine_works_and_collect_equals_a_synchronous_call():
    gate = threading.Event()
    engine = ScriptedEngine(gate)
    ahead = AsyncRollout(_fleet(engine))
    samples = _samples([5, 2, 9, 4])
    t0 = time.perf_counter()
    ahead.submit(3, samples, **GEN)
    assert time.perf_counter() - t0 < 1.0 and ahead.pending == 3  # the engine is still blocked on the gate
    with pytest.raises(RuntimeError, match="step 3 are still in flight"):
        ahead.submit(4, samples, **GEN)
    time.sleep(0.3)  # "training"
    gate.set()
    groups, stats = ahead.collect(**ASSEMBLE)
    assert ahead.pending is None and engine.threads == ["rollout-step3"]  # generated in the background thread
    assert stats["timing/generate"] >= 0.3 and stats["timing/overlap"] >= 0.3
    assert stats["timing/rollout_wait"] < stats["timing/generate"]
    sync = _fleet(ScriptedEngine()).generate_groups(samples, step=3, **GEN, **ASSEMBLE)
    assert _fields(groups) == _fields(sync)
    assert groups[0].response_ids[1] == [5, 1, sample_seed(7, 3, 5, 1) % 97]  # the step's seeds, not the submit order


def test_a_failure_in_the_background_raises_the_fleet_error_at_collect():
    ahead = AsyncRollout(_fleet(ScriptedEngine(die=True)))
    ahead.submit(2, _samples([1, 2]), **GEN)
    with pytest.raises(FleetError, match=r"engine 0 \(owner rank 0, .*EngineDiedError"):
        ahead.collect(**ASSEMBLE)
    with pytest.raises(RuntimeError, match="no rollouts in flight"):
        ahead.collect(**ASSEMBLE)


def test_checkpoint_record_round_trips_bit_for_bit():
    samples = _samples([5, 2, 9])
    groups = _fleet(ScriptedEngine()).generate_groups(samples, step=4, **GEN, **ASSEMBLE)
    state = groups_state(groups)
    assert "\n" not in state  # one compact string inside the checkpoint's JSON trainer state
    back = groups_from_state(state, _samples([5, 2, 9]), step=4, seed=7, **ASSEMBLE)
    assert _fields(back) == _fields(groups)
    assert back[0].engine_logprobs[0] == [0.1 + 0.2, -1e-300, -5 / 3.0]
    with pytest.raises(ValueError, match="saved rollouts are for prompts"):
        groups_from_state(state, _samples([5, 9, 2]), step=4, seed=7, **ASSEMBLE)


SEPARATE = ["rollout.placement=separate", "rollout.transport=distributed"]


def test_config_accepts_separate_fleets_and_rejects_the_rest_in_one_line():
    assert load_config("tiny_cpu", [*SEPARATE, "rollout.async_steps=1"]).rollout.async_steps == 1
    assert load_config("tiny_cpu", [*SEPARATE, "rollout.mode=server", "rollout.async_steps=1"]).rollout.async_steps == 1
    for extra, match in [(["rollout.async_steps=1"], r"needs rollout.placement=separate: colocated engines share"),
                         ([*SEPARATE, "rollout.async_steps=2"], r"rollout.async_steps=2: expected 0"),
                         ([*SEPARATE, "rollout.async_steps=1", "mode=rollout_only"], r"mode=rollout_only does not do both"),
                         ([*SEPARATE, "rollout.async_steps=1", "algo.dynamic_sampling=true"], r"DAPO refills")]:
        with pytest.raises(ConfigError, match=match) as e:
            load_config("tiny_cpu", extra)
        assert "\n" not in str(e.value)
