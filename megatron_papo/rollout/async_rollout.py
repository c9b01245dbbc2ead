"""Overlapped rollouts (``rollout.async_steps=1``): the fleet generates the next step's groups while the actor trains.

    ahead = AsyncRollout(fleet)
    ahead.submit(step + 1, samples, n=..., sampling=..., seed=..., tokenizer=..., reward_fn=...)  # returns at once
    ...                                                    # the actor trains on this step's groups meanwhile
    groups, stats = ahead.collect(data_cfg=..., processor=..., make_aug=...)  # step boundary, collective

:meth:`AsyncRollout.submit` starts one background thread that runs the owners' half of the fleet's work
(:meth:`RolloutFleet.generate_local`: engine calls over the host pipe or HTTP, reward scoring, tokenizer decoding).
It issues no ``torch.distributed`` collective -- those would interleave with the training collectives on the same
process groups and deadlock -- and touches no torch RNG. :meth:`AsyncRollout.collect` joins it in the main thread
and does the fleet's gather (``assemble_groups``: one ``all_gather_object``, the masked views) at the step
boundary, so every rank calls the collective at the same point of its program. One call is in flight at a time,
and nothing else calls the engines until it is collected (the weight sync follows the collect), which is what
``SGLangEngine`` (one pipe) and ``SGLangServerEngine`` (one pending HTTP request) support. A failure inside the
thread becomes the owner's error string in the gather, so every rank raises the same ``FleetError``.

:func:`groups_state` / :func:`groups_from_state` turn a step's gathered groups into a small JSON-able record and
back (engine outputs and rewards; the prompts are re-encoded from the data loader, the masked views recomputed
from their seeds), which is how a checkpoint keeps the rollouts generated one step ahead.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from megatron_papo.rollout.fleet import BlockResults, RolloutFleet


@dataclass
class _InFlight:
    step: int
    seed: int
    samples: list[Any]
    thread: threading.Thread
    submitted: float
    box: dict[str, Any] = field(default_factory=dict)


class AsyncRollout:
    """At most one generation in flight over a :class:`RolloutFleet` (see the module docstring)."""

    def __init__(self, fleet: RolloutFleet) -> None:
        self.fleet = fleet
        self._inflight: Optional[_InFlight] = None

    @property
    def pending(self) -> Optional[int]:
        """The step whose rollouts are in flight (None when nothing is)."""
        return self._inflight.step if self._inflight is not None else None

    def submit(self, step: int, samples: Sequence[Any], *, n: int, sampling: dict[str, Any], seed: int, tokenizer: Any,
               reward_fn: Any) -> None:
        """Start generating and scoring ``samples`` for ``step`` on this rank's engines; returns immediately.
        Not collective (every rank calls it at the same point anyway)."""
        if self._inflight is not None:
            raise RuntimeError(f"rollouts of step {self._inflight.step} are still in flight; collect() them first")
        samples = list(samples)
        box: dict[str, Any] = {}
        fleet = self.fleet

        def body() -> None:
            try:
                box["done"] = fleet.generate_local(samples, n=n, sampling=sampling, step=step, seed=seed,
                                                   tokenizer=tokenizer, reward_fn=reward_fn)
            except BaseException as e:  # noqa: BLE001 -- reported to every rank by the gather in collect()
                box["done"] = [(k, (False, f"engine {k} (owner rank {fleet.rank}): background generation of step "
                                           f"{step} failed: {type(e).__name__}: {e}")) for k in sorted(fleet.engines)]
            box["finished"] = time.perf_counter()

        thread = threading.Thread(target=body, name=f"rollout-step{step}", daemon=True)
        self._inflight = _InFlight(step, seed, samples, thread, time.perf_counter(), box)
        thread.start()

    def collect(self, *, data_cfg: Any, processor: Any, make_aug: bool) -> tuple[list[Any], dict[str, float]]:
        """Wait for the rollouts in flight and gather them into Groups in prompt order on every rank. Collective.

        Returns the groups and ``timing/rollout_wait`` (how long this call waited: generation not hidden behind
        training), ``timing/generate`` (submit to finish of this rank's engines) and ``timing/overlap`` (the part of
        it that ran while the caller worked)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            raise RuntimeError("no rollouts in flight: submit() first")
        t0 = time.perf_counter()
        inflight.thread.join()
        waited = time.perf_counter() - t0
        done: BlockResults = inflight.box["done"]
        groups = self.fleet.assemble_groups(inflight.samples, done, step=inflight.step, seed=inflight.seed,
                                            data_cfg=data_cfg, processor=processor, make_aug=make_aug)
        generate = inflight.box["finished"] - inflight.submitted
        overlap = max(0.0, min(inflight.box["finished"], t0) - inflight.submitted)
        return groups, {"timing/rollout_wait": waited, "timing/generate": generate, "timing/overlap": overlap}

    def close(self, timeout: float = 0.0) -> None:
        """Forget the rollouts in flight (the engines' shutdown ends the thread's call; it is a daemon)."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None and timeout > 0:
            inflight.thread.join(timeout)


def groups_state(groups: Sequence[Any]) -> str:
    """A step's groups as one compact JSON string: per prompt its uid, engine, response ids, engine log-probs, finish
    reasons, texts and rewards (Python floats round-trip exactly through JSON). The prompts are not stored."""
    return json.dumps([[g.sample.uid, g.engine, g.response_ids, g.engine_logprobs, g.finish_reasons, g.texts, g.rewards]
                       for g in groups], separators=(",", ":"))


def groups_from_state(state: str, samples: Sequence[Any], *, step: int, seed: int, data_cfg: Any, processor: Any,
                      make_aug: bool) -> list[Any]:
    """The Groups of :func:`groups_state` for ``samples`` (the same prompts, re-encoded in the same order) at
    ``step``: identical to the gathered ones (the masked views come from the same seeds). Not collective."""
    from megatron_papo.rollout_phase import assemble_group

    rows = json.loads(state)
    if len(rows) != len(samples):
        raise ValueError(f"saved rollouts hold {len(rows)} prompts, the data loader gave {len(samples)}")
    uids = [r[0] for r in rows]
    if uids != [s.uid for s in samples]:
        raise ValueError(f"saved rollouts are for prompts {uids[:8]}..., the data loader gave {[s.uid for s in samples][:8]}...")
    return [assemble_group(s, (ids, lps, fins, texts, rewards), engine=int(k), step=step, seed=seed, data_cfg=data_cfg,
                           processor=processor, make_aug=make_aug)
            for s, (_uid, k, ids, lps, fins, texts, rewards) in zip(samples, rows)]
