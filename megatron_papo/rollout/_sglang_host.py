"""The process that owns an in-process ``sglang.Engine`` on behalf of :class:`SGLangEngine`.

Why a separate process: ``sglang.Engine`` installs SIGTERM/SIGQUIT handlers, forces the
``spawn`` start method, and when its scheduler dies it kills its *whole* process tree including
the process that created it. Hosting it here keeps the trainer alive and lets the caller turn a
crash into an :class:`EngineDiedError`. The host reads ``(method, kwargs)`` messages from a
multiprocessing pipe and answers ``("ok", result)`` or ``("err", traceback)``; when the pipe
closes (the caller died) it shuts the engine down and exits.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Callable


def _generate(engine: Any, **kw: Any) -> list[dict]:
    out = engine.generate(**kw)
    return out if isinstance(out, list) else [out]


def _update_tensors(engine: Any, named_tensors: list, flush_cache: bool) -> Any:
    return engine.update_weights_from_tensor(named_tensors=named_tensors, flush_cache=flush_cache)


def _update_serialized(engine: Any, payloads: list, load_format: str, flush_cache: bool) -> Any:
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

    obj = UpdateWeightsFromTensorReqInput(serialized_named_tensors=payloads, load_format=load_format, flush_cache=flush_cache)
    return engine.loop.run_until_complete(engine.tokenizer_manager.update_weights_from_tensor(obj, None))


def _update_flat(engine: Any, flat: Any, meta: list, flush_cache: bool) -> Any:
    """A flattened CPU bucket (see ``weight_transport.flatten_bucket``) in SGLang's flattened_bucket format.

    One serialisation per TP rank: a shared-memory CPU tensor is pickled as a ``DupFd`` that multiprocessing's
    resource sharer hands out exactly once, so a payload repeated for a second rank fails there (EOFError).
    """
    import torch
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    from megatron_papo.rollout.weight_transport import per_rank_payloads

    metadata = [FlattenedTensorMetadata(name=n, shape=torch.Size(shape), dtype=getattr(torch, dt), start_idx=s, end_idx=e,
                                        numel=e - s) for n, shape, dt, s, e in meta]
    payloads = per_rank_payloads({"flattened_tensor": flat, "metadata": metadata}, int(engine.server_args.tp_size),
                                 lambda o: MultiprocessingSerializer.serialize(o, output_str=True))
    return _update_serialized(engine, payloads, "flattened_bucket", flush_cache)


HANDLERS: dict[str, Callable[..., Any]] = {
    "generate": _generate,
    "update_tensors": _update_tensors,
    "update_serialized": _update_serialized,
    "update_flat": _update_flat,
    "update_disk": lambda e, model_path: e.update_weights_from_disk(model_path=model_path),
    "init_group": lambda e, **kw: e.init_weights_update_group(**kw),
    "destroy_group": lambda e, group_name: e.destroy_weights_update_group(group_name=group_name),
    "update_distributed": lambda e, **kw: e.update_weights_from_distributed(**kw),
    "begin_update": lambda e: e.begin_weight_update(),
    "end_update": lambda e: e.end_weight_update(),
    "flush_cache": lambda e: e.flush_cache(),
    "release": lambda e: e.release_memory_occupation(),
    "resume": lambda e: e.resume_memory_occupation(),
    "ping": lambda e: {"pid": os.getpid()},
}


#: calls after which the host lets SGLang's event loop finish what they left behind (see :func:`settle`)
SETTLE_AFTER = frozenset({"generate"})


def settle(engine: Any) -> None:
    """Run the engine's event loop once more, after the answer has gone out.

    The host runs SGLang's asyncio loop only inside a call (``run_until_complete``). A rollout ends with hundreds of
    finished request tasks whose clean-up callbacks are still queued; without this, the next call (the weight sync's
    ``begin_weight_update``) ran them first, 1-4 ms on the CPU engine, on the sync's critical path. Here they run
    while the trainer gathers and scores the rollout."""
    import asyncio

    engine.loop.run_until_complete(asyncio.sleep(0))


_TORCHRUN_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT"}


def host_main(conn: Any, engine_kwargs: dict[str, Any], env: dict[str, str]) -> None:
    """Entry point of the host process (multiprocessing ``spawn`` target)."""
    for key in list(os.environ):  # the trainer's torchrun variables must not leak into SGLang's own groups
        if key in _TORCHRUN_VARS or key.startswith("TORCHELASTIC_"):
            del os.environ[key]
    os.environ.update(env)
    from megatron_papo.rollout import cpu_shim

    cpu_shim.activate()
    try:
        import sglang

        from megatron_papo.rollout.cpu_shim import seeded

        seeded.install()  # CPU only: per-request sampling seeds honoured (cpu_shim/seeded.py)

        engine = sglang.Engine(**engine_kwargs)
        # what start-up allocated (modules, weights, SGLang's state) leaves the garbage collector's scans in the
        # host, the scheduler and the detokenizer: unfrozen, each full collection walked all of it (~0.45 CPU-s
        # per collection on the CI machine, every few rollouts, and inside most weight syncs)
        engine.freeze_gc()
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    try:
        conn.send(("ok", {"pid": os.getpid(), "children": list(engine.get_all_child_pids())}))
        while True:
            try:
                method, kwargs = conn.recv()
            except (EOFError, OSError):
                break
            if method == "shutdown":
                break
            try:
                conn.send(("ok", HANDLERS[method](engine, **kwargs)))
            except Exception:
                conn.send(("err", traceback.format_exc()))
            if method in SETTLE_AFTER:
                settle(engine)
    finally:
        engine.shutdown()
        try:
            conn.send(("ok", "bye"))
        except Exception:
            pass
