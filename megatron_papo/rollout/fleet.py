"""The rollout fleet: every generation engine of the job, who owns it, which prompts it gets, how weights reach it.

Placement (design rule 12; :func:`plan_fleet`):

* ``rollout.placement=colocated``: one engine per ``rollout.engine_tp`` consecutive ranks of a node, on those
  ranks' own devices (``base_gpu_id`` = the group's first local rank); its owner is the group's first rank.
  ``world_size / engine_tp`` engines in all; on CPU each owner runs its own SGLang CPU engine.
* ``rollout.placement=separate``: ``rollout.num_engines`` engines on devices of their own (engine k's first GPU
  is ``engine_base_gpu + k * engine_tp``), plus the external servers of ``rollout.server_urls``; all are
  driven by global rank 0 (``rollout.mode=server``: ``sglang.launch_server`` processes behind sglang-router).

Work split (:func:`split_blocks`): prompt ``i`` of a batch of ``P`` goes to engine ``floor(i * E / P)`` -- contiguous
blocks of whole groups (a prompt's ``n`` samples share one engine's prefix and image cache), decided by the
batch alone, so resume and replay repeat it. Each owner generates and scores its blocks; one all-gather brings
every block to every rank, reassembled in prompt order: exactly the list one engine would return, so the step's
math does not depend on the number of engines. Each group records the ``engine`` that produced it.

Failure: every engine call runs inside a guard; an owner whose engine fails sends an error string in place of its
results (``engine k (owner rank r, host pid p): ...``), so the collective always completes and every rank raises
the same :class:`FleetError`. Weight syncs agree on errors the same way after the last bucket.

Weight sync (:meth:`RolloutFleet.sync`): colocated owners push each bucket into their own engine (shared memory on
CPU, CUDA IPC on GPU); owners on later pipeline stages receive the buckets by a broadcast over their PP group
(``weight_sync.iter_hf_buckets(all_stages=True)``). Separate engines get each bucket once: over one weight-update
group reaching every engine's TP workers (``transport=distributed``, see ``fleet_sync``), or written once to disk.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_papo.rollout.base import EngineDiedError

log = logging.getLogger(__name__)

#: one rank's per-engine results of a block run: ``(engine index, (ok, results or error string))``
BlockResults = list[tuple[int, tuple[bool, Any]]]


class FleetError(EngineDiedError):
    """One or more engines of the fleet failed; raised on every rank with the same message."""


@dataclass(frozen=True)
class EngineSlot:
    """One engine of the fleet: its index, the global rank that drives it and where it runs."""

    index: int
    owner: int
    base_gpu_id: int = -1  #: first GPU of the engine (-1: SGLang's default; CPU)
    tp: int = 1
    url: Optional[str] = None  #: an external server (rollout.server_urls) instead of one the owner starts


def plan_fleet(rollout_cfg: Any, world_size: int, local_world_size: int, device_type: str) -> list[EngineSlot]:
    """The engines of the job (identical on every rank). Raises ``ConfigError`` for layouts that cannot hold them."""
    from megatron_papo.config import ConfigError

    r = rollout_cfg
    tp = int(r.engine_tp)
    urls = list(getattr(r, "server_urls", None) or [])
    if r.placement == "colocated":
        if urls:
            raise ConfigError("rollout.server_urls lists external servers; they need rollout.placement=separate")
        if world_size % tp or (device_type == "cuda" and local_world_size % tp):
            raise ConfigError(f"rollout.engine_tp={tp} must divide the ranks per node ({local_world_size}) and the "
                              f"world size ({world_size}): colocated engines use engine_tp consecutive ranks of one node")
        n = world_size // tp
        if r.num_engines not in (0, n):
            raise ConfigError(f"rollout.num_engines={r.num_engines} with placement=colocated: the fleet is one engine "
                              f"per engine_tp={tp} ranks = {n}; set rollout.num_engines=0")
        return [EngineSlot(k, k * tp, (k * tp) % local_world_size if device_type == "cuda" else -1, tp) for k in range(n)]
    local = r.num_engines if r.num_engines > 0 else (0 if urls else 1)
    base = r.engine_base_gpu
    slots = [EngineSlot(k, 0, base + k * tp if (device_type == "cuda" and base >= 0) else -1, tp) for k in range(local)]
    slots += [EngineSlot(local + j, 0, -1, tp, url=u) for j, u in enumerate(urls)]
    if not slots:
        raise ConfigError("rollout.num_engines=0 and no rollout.server_urls: the separate fleet has no engine")
    return slots


def split_blocks(num_items: int, num_engines: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the items of each engine: item ``i`` goes to engine ``floor(i * E / P)``."""
    return [(math.ceil(k * num_items / num_engines), math.ceil((k + 1) * num_items / num_engines))
            for k in range(num_engines)]


def default_engine_factory(cfg: Any, hf_dir: str, slot: EngineSlot) -> Any:
    """Build and start the configured engine for ``slot`` (an external URL is attached, not started).

    Engine k samples with ``rollout.seed + k``: engines given the same seed would draw the same random numbers
    for their different prompts (correlated samples across the fleet)."""
    import dataclasses

    from megatron_papo.rollout_phase import make_engine

    rollout = dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + slot.index)
    if slot.url is not None:
        from megatron_papo.rollout.sglang_server import ExternalServerEngine

        return ExternalServerEngine.from_config(rollout, hf_dir, url=slot.url).start()
    return make_engine(rollout, hf_dir, base_gpu_id=slot.base_gpu_id).start()


def _describe(slot: EngineSlot, engine: Any, pid: Optional[int], err: BaseException) -> str:
    where = f"url {slot.url}" if slot.url else f"host pid {pid}"
    return f"engine {slot.index} (owner rank {slot.owner}, {where}): {type(err).__name__}: {err}"


class RolloutFleet:
    """The engines of a job, seen identically from every rank (collective methods must be called on all ranks)."""

    def __init__(self, slots: list[EngineSlot], rank: int, world_size: int, engines: Optional[dict[int, Any]] = None,
                 *, placement: str = "colocated", transport: str = "tensor", bucket_mb: int = 512,
                 all_stages: bool = False, device_type: str = "cpu", router: Any = None) -> None:
        self.slots = slots
        self.rank, self.world_size = rank, world_size
        self.engines: dict[int, Any] = dict(engines or {})  # index -> engine, on its owner only
        self.placement, self.transport, self.bucket_mb = placement, transport, bucket_mb
        self.all_stages = all_stages
        self.device_type = device_type
        self.router = router
        self._released = False
        self._weight_group: Any = None
        self.started = bool(self.engines)  #: the engines were started (False: mode=train_from_rollouts)
        self.routed = False  #: rollout requests pass through the router (it keeps the banned-id logit bias)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, cfg: Any, groups: Any, hf_dir: str, engine_factory: Optional[Callable[..., Any]] = None) -> RolloutFleet:
        """Plan the fleet, start this rank's engines (``engine_factory(cfg, hf_dir, slot)``), agree on success.

        With ``engine_factory=None`` (``mode=train_from_rollouts``) no engine starts. Collective.
        """
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(groups.world_size)))
        slots = plan_fleet(cfg.rollout, groups.world_size, local_world, groups.device.type)
        stages = [groups.pp_rank]
        if dist.is_initialized() and groups.world_size > 1:
            stages = [None] * groups.world_size
            dist.all_gather_object(stages, groups.pp_rank)
        all_stages = cfg.rollout.placement == "colocated" and any(stages[s.owner] != 0 for s in slots)
        fleet = cls(slots, groups.rank, groups.world_size, placement=cfg.rollout.placement,
                    transport=cfg.rollout.transport, bucket_mb=cfg.rollout.bucket_mb, all_stages=all_stages,
                    device_type=groups.device.type)
        if engine_factory is None:
            return fleet
        fleet.started = True
        # every owner starts its engine at once, no stagger: two SGLang CPU engines loading side by side on one machine
        # start fine (their KV pools are capped by max_total_tokens, not sized from the RAM left, see CPU_ENGINE_KWARGS);
        # on GPUs each engine has devices of its own
        mine = [s for s in slots if s.owner == groups.rank]
        errors: list[str] = []
        t0 = time.perf_counter()

        def start(slot: EngineSlot) -> None:
            try:
                fleet.engines[slot.index] = engine_factory(cfg, hf_dir, slot)
            except Exception as e:  # reported to every rank below
                errors.append(_describe(slot, None, None, e).replace("host pid None", "starting"))

        if len(mine) > 1:  # several engines on one rank (separate placement): start them side by side
            with ThreadPoolExecutor(len(mine)) as pool:
                list(pool.map(start, mine))
        else:
            for s in mine:
                start(s)
        if not errors and cfg.rollout.mode == "server" and cfg.rollout.placement == "separate" and cfg.rollout.router \
                and len(fleet.engines) > 0:
            try:
                from megatron_papo.rollout.router import Router

                engines = [e for _, e in sorted(fleet.engines.items())]
                fleet.router = Router([e.url for e in engines]).start()
                fleet.routed = fleet.router.keeps_logit_bias(engines[0].url)
                if fleet.routed:
                    for e in engines:
                        e.router_url = fleet.router.url
                else:
                    log.warning("sglang-router at %s drops sampling_params.logit_bias (the banned-id mask): rollout "
                                "requests go straight to their servers; the router serves other clients",
                                fleet.router.url)
            except Exception as e:
                errors.append(f"sglang-router (rank {groups.rank}): {type(e).__name__}: {e}")
        fleet._agree(errors, "start")
        if mine:
            log.info("rank %d: %d engine(s) %s up in %.1fs", groups.rank, len(mine), [s.index for s in mine],
                     time.perf_counter() - t0)
        return fleet

    @property
    def num_engines(self) -> int:
        return len(self.slots)

    def slot(self, index: int) -> EngineSlot:
        return self.slots[index]

    def _agree(self, errors: Sequence[str], what: str) -> None:
        """Every rank learns every rank's errors; raise the same FleetError everywhere if there are any.

        One all-reduce of the error count decides; the messages are gathered (an object collective: pickling and
        two rounds) only when some rank has one. Every rank takes the same branch, so the collectives match."""
        everyone: list[Any] = [list(errors)]
        if dist.is_initialized() and self.world_size > 1:
            on_gpu = dist.get_backend() == "nccl"  # the default group's backend decides where its tensors live
            count = torch.tensor([len(errors)], dtype=torch.int64,
                                 device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
            dist.all_reduce(count)
            if int(count.item()) == 0:
                return
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, list(errors))
        self._fail([e for errs in everyone for e in (errs or [])], what)

    def _fail(self, found: list[str], what: str) -> None:
        """Shut this rank's engines down and raise the fleet error (logged to this rank's log) if any."""
        if not found:
            return
        msg = f"rollout fleet: {what} failed on {len(found)} engine(s):\n  " + "\n  ".join(found)
        log.error("%s", msg)
        self.shutdown()
        raise FleetError(msg)

    # ------------------------------------------------------------------ work
    def _guarded(self, index: int, fn: Callable[[Any], Any]) -> tuple[bool, Any]:
        engine = self.engines[index]
        pid = getattr(engine, "host_pid", None)
        try:
            return True, fn(engine)
        except Exception as e:  # EngineError, a reward bug, ...: the collective below must still complete
            return False, _describe(self.slots[index], engine, pid, e)

    def map_blocks(self, items: Sequence[Any], fn: Callable[[Any, list[Any]], list[Any]], what: str = "generate"
                   ) -> list[tuple[int, Any]]:
        """Run ``fn(engine, block)`` for every engine on its block of ``items`` (:func:`split_blocks`) and return
        ``(engine index, result)`` for every item, in item order, on every rank. Collective."""
        return self.gather_blocks(len(items), self.run_blocks(items, fn), what)

    def run_blocks(self, items: Sequence[Any], fn: Callable[[Any, list[Any]], list[Any]]) -> BlockResults:
        """The local half of :meth:`map_blocks`: ``fn(engine, block)`` on this rank's engines only. No collective,
        so it may run in a background thread (:mod:`async_rollout`); an engine's failure is returned as an error
        string in the results, never raised."""
        blocks = split_blocks(len(items), self.num_engines)
        mine = sorted(self.engines)

        def run(k: int) -> tuple[int, tuple[bool, Any]]:
            a, b = blocks[k]
            if a == b:
                return k, (True, [])
            return k, self._guarded(k, lambda eng: fn(eng, list(items[a:b])))

        if len(mine) > 1:
            with ThreadPoolExecutor(len(mine)) as pool:
                return list(pool.map(run, mine))
        return [run(k) for k in mine]

    def gather_blocks(self, num_items: int, done: BlockResults, what: str = "generate") -> list[tuple[int, Any]]:
        """The collective half of :meth:`map_blocks`: every rank's :meth:`run_blocks` results to every rank, in item
        order; the same :class:`FleetError` on every rank when any engine failed. Collective."""
        blocks = split_blocks(num_items, self.num_engines)
        out: dict[int, Any] = {}
        errors = []
        for k, (ok, res) in done:
            if ok:
                if len(res) != blocks[k][1] - blocks[k][0]:
                    errors.append(f"engine {k}: returned {len(res)} results for {blocks[k][1] - blocks[k][0]} items")
                out[k] = res
            else:
                errors.append(res)
        payload: Any = {"errors": errors, "blocks": out}
        everyone: list[Any] = [payload]
        if dist.is_initialized() and self.world_size > 1:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, payload)
        self._fail([e for p in everyone for e in p["errors"]], what)
        results: list[tuple[int, Any]] = []
        merged = {k: v for p in everyone for k, v in p["blocks"].items()}
        for k, (a, b) in enumerate(blocks):
            if a == b:
                continue
            if k not in merged:
                raise FleetError(f"rollout fleet: {what}: no results from engine {k} (owner rank {self.slots[k].owner})")
            results.extend((k, r) for r in merged[k])
        return results

    def generate_groups(self, samples: Sequence[Any], *, n: int, sampling: dict[str, Any], step: int, seed: int,
                        tokenizer: Any, reward_fn: Callable, data_cfg: Any, processor: Any, make_aug: bool) -> list[Any]:
        """n scored responses per prompt from the whole fleet, as :class:`~megatron_papo.rollout_phase.Group` s in
        prompt order on every rank (masked views computed by every rank). Collective."""
        self.resume()
        done = self.generate_local(samples, n=n, sampling=sampling, step=step, seed=seed, tokenizer=tokenizer,
                                   reward_fn=reward_fn)
        return self.assemble_groups(samples, done, step=step, seed=seed, data_cfg=data_cfg, processor=processor,
                                    make_aug=make_aug)

    def generate_local(self, samples: Sequence[Any], *, n: int, sampling: dict[str, Any], step: int, seed: int,
                       tokenizer: Any, reward_fn: Callable) -> BlockResults:
        """This rank's engines generate and score their blocks of ``samples`` (no collective: background-safe)."""
        from megatron_papo.rollout_phase import generate_block

        def fn(engine: Any, block: list[Any]) -> list[Any]:
            return generate_block(engine, block, n=n, sampling=sampling, step=step, seed=seed, tokenizer=tokenizer,
                                  reward_fn=reward_fn)

        return self.run_blocks(samples, fn)

    def assemble_groups(self, samples: Sequence[Any], done: BlockResults, *, step: int, seed: int, data_cfg: Any,
                        processor: Any, make_aug: bool) -> list[Any]:
        """Every rank's :meth:`generate_local` results gathered into Groups in prompt order. Collective."""
        from megatron_papo.rollout_phase import assemble_group

        results = self.gather_blocks(len(samples), done, "generate")
        return [assemble_group(s, res, engine=k, step=step, seed=seed, data_cfg=data_cfg, processor=processor,
                               make_aug=make_aug) for s, (k, res) in zip(samples, results)]

    def score_dataset(self, dataset: Any, reward_fn: Any, *, n: int, sampling: dict[str, Any], seed: int,
                      batch_size: int = 64) -> list[Any]:
        """Validation (``evaluate.dataset_rows``) with the questions split over the fleet: every owner scores its
        block, every rank gets all rows in question order. Collective."""
        from megatron_papo.evaluate import score_questions

        self.resume()

        def fn(engine: Any, idx: list[int]) -> list[Any]:
            return [row for a in range(0, len(idx), batch_size) for row in score_questions(
                engine, [dataset.encode(i) for i in idx[a:a + batch_size]], reward_fn, n=n, sampling=sampling, seed=seed)]

        return [r for _, r in self.map_blocks(list(range(len(dataset))), fn, "evaluate")]

    # ------------------------------------------------------------------ weights
    def sync(self, model_chunks: Any, state: Any = None) -> dict[str, float]:
        """Push the actor's weights into every engine (see the module docstring). Collective."""
        from megatron_papo.rollout import fleet_sync

        self.resume()
        return fleet_sync.sync_fleet(self, model_chunks, state)

    # ------------------------------------------------------------------ memory, lifecycle
    def release(self) -> None:
        """Colocated GPU engines give their memory back while the actor trains (CPU: nothing to release)."""
        if self.placement != "colocated" or self.device_type != "cuda" or self._released:
            return
        errors = [e for k in sorted(self.engines) for ok, e in [self._guarded(k, lambda eng: eng.release_memory())]
                  if not ok]
        self._released = True
        self._agree(errors, "release_memory")  # every rank, so that the collective pairs up

    def resume(self) -> None:
        """Undo :meth:`release` before the engines are used (idempotent). Collective when it resumes: one failing
        engine fails every rank alike, before any rank enters the weight sync's collectives."""
        if not self._released:
            return
        self._released = False
        errors = [e for k in sorted(self.engines) for ok, e in [self._guarded(k, lambda eng: eng.resume_memory())]
                  if not ok]
        self._agree(errors, "resume_memory")

    def alive(self) -> dict[int, bool]:
        """Liveness of this rank's engines (pids still running), without a call into them."""
        out = {}
        for k, e in self.engines.items():
            vital = getattr(e, "_vital", None)
            out[k] = bool(e.pids()) if vital is None else all(t.alive() for t in vital) and bool(vital)
        return out

    def pids(self) -> list[int]:
        """Every live process of this rank's engines (and of the router)."""
        out = [p for e in self.engines.values() for p in (e.pids() if hasattr(e, "pids") else [])]
        if self.router is not None:
            out += self.router.pids()
        return out

    def shutdown(self) -> None:
        """Stop this rank's engines and the router (idempotent, never raises)."""
        engines, self.engines = self.engines, {}
        threads = [threading.Thread(target=_quiet_shutdown, args=(e,), daemon=True) for e in engines.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        if self.router is not None:
            _quiet_shutdown(self.router)
            self.router = None
        if self._weight_group is not None:
            self._weight_group = None


def _quiet_shutdown(obj: Any) -> None:
    try:
        obj.shutdown()
    except Exception as e:  # shutting down after a failure: report, never mask the original error
        log.warning("shutdown of %r failed: %s", obj, e)
