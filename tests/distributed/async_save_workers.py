"""Workers for the async dist-checkpoint tests: the tiny mcore GPT of ``mcore_gpt_workers`` trained on gloo, saved
with megatron-core's async save (``checkpoint/dist.py::AsyncSaves``) while training goes on."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_papo.config.parallel import ParallelConfig
from tests.distributed.mcore_gpt_workers import GLOBAL_BATCH, MICRO, SEQ, VOCAB, _build, _reseed_by_global_name


def _setup(distopt: bool, reseed: bool = True):
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings, build_optimizer, wrap_ddp

    groups = init_distributed(ParallelConfig(tp=1, pp=1, device="cpu"), seed=1)
    model = _build(groups, True, True)
    if reseed:
        _reseed_by_global_name(model, groups)
    chunks = wrap_ddp([model], groups, use_distributed_optimizer=distopt)
    opt = build_optimizer(chunks, OptimSettings(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=distopt), groups)
    return groups, chunks, opt


def _train_step(groups, chunks, opt, step: int) -> None:
    """One Adam step on fixed random tokens (this DP rank's share of the global batch)."""
    from megatron_papo.parallel.training import forward_backward

    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))
    per_dp = GLOBAL_BATCH // groups.dp_size
    batch = data[groups.dp_rank * per_dp:(groups.dp_rank + 1) * per_dp]
    micro = iter([batch[i:i + MICRO] for i in range(0, per_dp, MICRO)])

    def fwd(data_it, m):
        tokens = next(data_it)
        pos = torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], SEQ)
        out = m(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
        return out, lambda output: (output.float().mean(), {})

    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(chunks, fwd, micro, per_dp // MICRO, groups, seq_length=SEQ, micro_batch_size=MICRO)
    updated, _, _ = opt.step()
    assert updated


def _params(chunks) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}


def _optim_state(opt) -> dict[str, torch.Tensor]:
    """This rank's optimizer tensors as the torch optimizer holds them: (main) params and Adam moments, by position."""
    out = {}
    for oi, o in enumerate(getattr(opt, "chained_optimizers", [opt])):
        for gi, group in enumerate(o.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                out[f"{oi}.{gi}.{pi}.param"] = p.detach().clone()
                for k, v in o.optimizer.state[p].items():
                    if torch.is_tensor(v):
                        out[f"{oi}.{gi}.{pi}.{k}"] = v.detach().clone()
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def async_snapshot_while_training(root: str, distopt: bool = True) -> dict:
    """Train step 1, async-save it and wait (published). Train step 2; save it synchronously (``root/sync``) and
    asynchronously (``root/async``); while its writers run (not finalised: what a process killed now leaves), look
    at what a resume would see; train step 3; publish by polling. Then save step 3 synchronously and load the async
    checkpoint of step 2 into a fresh model and optimizer. Last, an async save of step 3 is abandoned (``Trainer.close``
    on an error path). Returns what each rank saw."""
    import torch.distributed as dist

    from megatron_papo.checkpoint.dist import AsyncSaves, find_resumable, latest_checkpoint, load_checkpoint, save_checkpoint

    groups, chunks, opt = _setup(distopt)
    aroot = Path(root) / "async"
    saves = AsyncSaves()
    _train_step(groups, chunks, opt, 1)
    save_checkpoint(aroot, 1, chunks, opt, trainer_state={"loader": {"pos": 1}}, async_saves=saves)
    published_1 = saves.wait()
    _train_step(groups, chunks, opt, 2)
    at_save, optim_at_save = _params(chunks), _optim_state(opt)
    assert any(k.endswith("exp_avg_sq") for k in optim_at_save)
    state = {"loader": {"pos": 2}}
    save_checkpoint(Path(root) / "sync", 2, chunks, opt, trainer_state=state)
    final = save_checkpoint(aroot, 2, chunks, opt, trainer_state=state, async_saves=saves)
    tmp = aroot / ".tmp_step_000002"
    out = {"published_1": str(published_1), "latest_while_writing": (aroot / "latest").read_text(),
           "unpublished": not final.exists() and tmp.is_dir() and not (tmp / "manifest.json").exists(),
           "resumable_while_writing": str(find_resumable(aroot, fix_marker=False))}
    dist.barrier()
    _train_step(groups, chunks, opt, 3)  # the weights and the optimizer state change while the writers run
    polls = 0
    while saves.poll() is None:
        polls += 1
        assert polls < 6000, "async save never finished"
        time.sleep(0.01)
    out["polls"] = polls
    out["latest_after_poll"] = (Path(root) / "async" / "latest").read_text()
    save_checkpoint(Path(root) / "sync", 3, chunks, opt, trainer_state={"loader": {"pos": 3}})
    changed = {"params": _max_diff(_params(chunks), at_save), "optim": _max_diff(_optim_state(opt), optim_at_save)}
    # resume as a new process does: a freshly built (differently initialised) model and optimizer load it
    _, chunks2, opt2 = _setup(distopt, reseed=False)
    got = load_checkpoint(latest_checkpoint(Path(root) / "async"), chunks2, opt2)
    restored = {"params": _max_diff(_params(chunks2), at_save), "optim": _max_diff(_optim_state(opt2), optim_at_save)}
    dist.barrier()
    # an error path (Trainer.close without run's wait): the save in flight is dropped, never published
    save_checkpoint(aroot, 3, chunks, opt, trainer_state={"loader": {"pos": 3}}, async_saves=saves)
    saves.abandon()
    out["after_abandon"] = {"latest": (aroot / "latest").read_text(), "pending": saves.pending,
                            "published": (aroot / "step_000003").exists()}
    dist.barrier()
    return {**out, "changed_by_step3": changed, "restored_max_diff": restored, "state": got}
