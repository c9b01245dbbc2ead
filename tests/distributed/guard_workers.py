"""Worker for the non-finite guard test: mcore's optimizer on a tiny GPT at DP=2 (gloo), one rank poisoned."""

from __future__ import annotations

import torch

from megatron_papo.config.parallel import ParallelConfig
from tests.distributed.mcore_gpt_workers import GLOBAL_BATCH, SEQ, VOCAB, _build, _reseed_by_global_name


def guarded_step_agrees(distopt: bool = False) -> dict:
    """NaN gradients on DP rank 1 only, then a NaN loss on rank 0 only: every rank must skip and keep its weights;
    a clean step afterwards must equal mcore's own ``optimizer.step()`` from the same state bit for bit."""
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings, build_optimizer, forward_backward, guarded_step, wrap_ddp

    groups = init_distributed(ParallelConfig(), seed=1)

    def setup():
        model = _build(groups, True, True)
        _reseed_by_global_name(model, groups)
        chunks = wrap_ddp([model], groups, use_distributed_optimizer=distopt)
        opt = build_optimizer(chunks, OptimSettings(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=distopt), groups)
        return chunks, opt

    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    per_dp = GLOBAL_BATCH // groups.dp_size
    batch = data[groups.dp_rank * per_dp:(groups.dp_rank + 1) * per_dp]

    def backward(chunks, opt):
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()

        def fwd(data_it, m):
            tokens = next(data_it)
            out = m(tokens[:, :-1], torch.arange(SEQ).unsqueeze(0).expand(tokens.shape[0], -1), None, labels=tokens[:, 1:])
            return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

        forward_backward(chunks, fwd, iter([batch]), 1, groups, seq_length=SEQ, micro_batch_size=per_dp)

    def params(chunks):
        return [p.detach().clone() for p in chunks[0].module.parameters()]

    ref_chunks, ref_opt = setup()
    backward(ref_chunks, ref_opt)
    ref_opt.step()
    ref = params(ref_chunks)

    chunks, opt = setup()
    before = params(chunks)
    backward(chunks, opt)
    if groups.dp_rank == 1:
        for buf in chunks[0].buffers:
            buf.grad_data.fill_(float("nan"))
    nan_grads = guarded_step(opt)
    same1 = all(torch.equal(a, b) for a, b in zip(params(chunks), before))
    backward(chunks, opt)
    nan_loss = guarded_step(opt, loss=torch.tensor(float("nan") if groups.dp_rank == 0 else 1.0))
    same2 = all(torch.equal(a, b) for a, b in zip(params(chunks), before))
    backward(chunks, opt)
    clean = guarded_step(opt)
    equal_ref = all(torch.equal(a, b) for a, b in zip(params(chunks), ref))
    moved = any(not torch.equal(a, b) for a, b in zip(params(chunks), before))
    return {"nan_grads_updated": nan_grads[0], "nan_loss_updated": nan_loss[0], "clean_updated": clean[0],
            "unchanged_after_nan_grads": same1, "unchanged_after_nan_loss": same2, "clean_equals_mcore_step": equal_ref,
            "clean_moved": moved, "clean_norm": clean[1]}
