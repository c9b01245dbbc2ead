"""Worker functions for the Qwen2.5-VL model tests (run on torchrun gloo ranks via tests/harness.py).

``check_layout`` builds the mcore model at a TP x PP layout, loads an HF checkpoint and returns:
log-prob parity against transformers, an HF→mcore→HF round trip against the safetensors files, and
(saved to disk) the HF-named gradients of a log-prob loss for comparison across layouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _setup(tp: int, pp: int, sp: bool) -> Any:
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.parallel import init_distributed

    return init_distributed(ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp, device="cpu"))


def _read_checkpoint(hf_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _allreduce_like_finalize(model: Any, pg: Any) -> None:
    """What mcore's finalize_model_grads does for plain (non-DDP) params: SP norms over TP, tied embedding over PP."""
    import torch.distributed as dist

    if pg.tp_size > 1:
        for p in model.parameters():
            if getattr(p, "sequence_parallel", False) and p.grad is not None:
                dist.all_reduce(p.grad, group=pg.tp_group)
    if pg.pp_size > 1 and model.share_embeddings_and_output_weights and (pg.is_first_stage or pg.is_last_stage):
        w = model.shared_embedding_or_output_weight()
        dist.all_reduce(w.grad, group=pg.embd_group)


def check_layout(hf_dirs: list[str], tp: int, pp: int, sp: bool = False, padding_side: str = "right",
                 grads_dir: str = "") -> dict[str, Any]:
    """Parity, round trip and (optionally) gradients for each HF dir at one layout; results per dir."""
    import torch.distributed as dist
    from transformers import AutoProcessor

    from megatron_papo.models.qwen2_5_vl import build_model, export_to_hf, load_hf_into_mcore, parity

    pg = _setup(tp, pp, sp)
    results: dict[str, Any] = {}
    for hf_dir in hf_dirs:
        tag = Path(hf_dir).parent.name
        model = build_model(None, pg, hf_dir=hf_dir, sequence_parallel=sp)
        load_hf_into_mcore([model], hf_dir)
        batch = parity.make_batch(AutoProcessor.from_pretrained(hf_dir), parity.builtin_samples(), padding_side)
        res: dict[str, Any] = {}
        # 1) log-prob parity (last stage computes; every rank gets the numbers)
        lp = parity.mcore_token_logprobs([model], batch, pg)
        stats = torch.zeros(2)
        if lp is not None:
            mask = parity.token_mask(batch)
            ref = parity.hf_token_logprobs(hf_dir, batch)
            stats = torch.tensor([float((lp - ref).abs()[mask].max()), float(mask.sum())])
        if pg.pp_size > 1:
            dist.broadcast(stats, src=dist.get_global_rank(pg.pp_group, pg.pp_size - 1), group=pg.pp_group)
        res["max_abs_logprob_diff"], res["tokens"] = float(stats[0]), int(stats[1])
        # 2) round trip: exported names and tensors equal the checkpoint's, bit for bit
        ckpt = _read_checkpoint(hf_dir)
        exported = dict(export_to_hf([model]))
        res["missing_names"] = sorted(set(ckpt) - set(exported))
        res["extra_names"] = sorted(set(exported) - set(ckpt))
        res["not_bit_exact"] = sorted(n for n in set(ckpt) & set(exported) if not torch.equal(ckpt[n], exported[n]))
        # 3) gradients of a log-prob loss, exported in HF names
        if grads_dir:
            gen = torch.Generator().manual_seed(7)
            mask = parity.token_mask(batch)
            weights = torch.rand(mask.shape, generator=gen) * mask
            weights = weights / weights.sum()  # a token-mean log-prob loss (what the trainer optimises)
            model.zero_grad(set_to_none=True)
            parity.mcore_token_logprobs([model], batch, pg, grad_scale=weights)
            _allreduce_like_finalize(model, pg)
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = dict(export_to_hf([model], value=lambda p: p.grad))
            if dist.get_rank() == 0:
                Path(grads_dir).mkdir(parents=True, exist_ok=True)
                torch.save(grads, Path(grads_dir) / f"{tag}_tp{tp}_pp{pp}_sp{int(sp)}.pt")
        results[tag] = res
    return results


def param_counts(names: list[str]) -> dict[str, int]:
    """Parameter counts of published configs built on the meta device (mcore, TP=1, one stage)."""
    from megatron_papo.models.qwen2_5_vl import build_model, load_arch

    pg = _setup(1, 1, False)
    out = {}
    for name in names:
        model = build_model(None, pg, arch=load_arch(name), meta=True)
        out[name] = sum(p.numel() for p in model.parameters())
    return out


def build_expect_error(hf_dir: str, tp: int) -> str:
    """Build at a TP that does not divide the heads; return the error message."""
    from megatron_papo.models.qwen2_5_vl import build_model

    pg = _setup(tp, 1, False)
    try:
        build_model(None, pg, hf_dir=hf_dir)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return ""


def train_steps(hf_dir: str, tp: int, pp: int, steps: int = 2) -> dict[str, Any]:
    """A few Adam steps of a token-mean log-prob loss under mcore DDP + optimizer + schedule; losses and grad norms."""
    from megatron.core.distributed import finalize_model_grads
    from transformers import AutoProcessor

    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore, make_forward_step, parity
    from megatron_papo.parallel.training import (
        OptimSettings,
        build_optimizer,
        forward_backward,
        optimizer_step,
        wrap_ddp,
        zero_grads,
    )

    pg = _setup(tp, pp, False)
    model = build_model(None, pg, hf_dir=hf_dir)
    load_hf_into_mcore([model], hf_dir)
    chunks = wrap_ddp([model], pg)
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    chunks[0].config.no_sync_func = chunks[0].no_sync
    opt = build_optimizer(chunks, OptimSettings(lr=1e-3), pg)
    batch = parity.make_batch(AutoProcessor.from_pretrained(hf_dir), parity.builtin_samples(), "left")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    mask = parity.token_mask(batch)
    weights = mask.float() / mask.sum()

    def loss_fn(b: dict[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = -(parity.vocab_parallel_logprobs(logits, b["input_ids"], pg.tp_group) * weights).sum()
        return loss, {"loss": loss.detach().clone()}

    losses, norms = [], []
    B, S = inputs["input_ids"].shape
    for _ in range(steps):
        zero_grads(chunks, opt)
        out = forward_backward(chunks, make_forward_step(loss_fn), iter([inputs]), 1, pg, seq_length=S,
                               micro_batch_size=B)
        losses.append([float(o["loss"]) for o in out])
        norms.append(optimizer_step(opt)[1])
    return {"losses": losses, "grad_norms": norms, "last_stage": pg.is_last_stage}


def packed_parity(hf_dir: str, tp: int) -> dict[str, Any]:
    """Pack the built-in samples into 2 rows (samples 0+1, sample 2; padded) and compare with transformers per sample."""
    from transformers import AutoProcessor

    from megatron_papo.models.qwen2_5_vl import build_model, forward_logits, load_hf_into_mcore, parity

    pg = _setup(tp, 1, False)
    model = build_model(None, pg, hf_dir=hf_dir)
    load_hf_into_mcore([model], hf_dir)
    batch = parity.make_batch(AutoProcessor.from_pretrained(hf_dir), parity.builtin_samples(), "right")
    ref = parity.hf_token_logprobs(hf_dir, batch)  # [3, S-1]
    lens = batch["attention_mask"].sum(1).tolist()
    rows = [[0, 1], [2]]
    width = max(sum(lens[i] for i in r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    seg = torch.zeros(len(rows), width, dtype=torch.long)
    where = {}
    for b, r in enumerate(rows):
        off = 0
        for k, i in enumerate(r):
            ids[b, off:off + lens[i]] = batch["input_ids"][i, :lens[i]]
            seg[b, off:off + lens[i]] = k + 1
            where[i] = (b, off)
            off += lens[i]
    packed = {"input_ids": ids, "segment_ids": seg, "pixel_values": batch["pixel_values"],
              "image_grid_thw": batch["image_grid_thw"]}
    lp = parity.vocab_parallel_logprobs(forward_logits(model, packed), ids, pg.tp_group)
    diff = 0.0
    for i, n in enumerate(lens):
        b, off = where[i]
        diff = max(diff, float((lp[b, off:off + n - 1] - ref[i, :n - 1]).abs().max()))
    return {"max_abs_logprob_diff": diff, "tokens": int(sum(n - 1 for n in lens))}


def recompute_check(hf_dir: str, tp: int) -> dict[str, float]:
    """Log-probs and gradients with ``model.recompute`` full / selective vs none (max abs differences)."""
    from transformers import AutoProcessor

    from megatron_papo.config.model import ModelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, forward_logits, load_hf_into_mcore, parity

    pg = _setup(tp, 1, False)
    batch = parity.make_batch(AutoProcessor.from_pretrained(hf_dir), parity.builtin_samples(), "left")
    mask = parity.token_mask(batch)
    weights = mask.float() / mask.sum()
    runs = {}
    for mode in ("none", "full", "selective"):
        model = build_model(ModelConfig(recompute=mode), pg, hf_dir=hf_dir)
        load_hf_into_mcore([model], hf_dir)
        model.train()
        lp = parity.vocab_parallel_logprobs(forward_logits(model, batch), batch["input_ids"], pg.tp_group)
        (-(lp * weights).sum()).backward()
        runs[mode] = (lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    out = {}
    for mode in ("full", "selective"):
        out[f"{mode}_logp"] = float((runs[mode][0] - runs["none"][0]).abs().max())
        out[f"{mode}_grad"] = max(float((runs[mode][1][n] - g).abs().max()) for n, g in runs["none"][1].items())
    return out


def fp8_padding_is_invisible(hf_dir: str, tp: int = 1, sp: bool = False) -> dict[str, Any]:
    """Log-probs of an odd-length batch with the model's own sequence multiple and with the FP8 one (x16): the
    language model must see an aligned length, and the log-probs must not change (padding cut from the logits).
    The FP8 multiple is set on the built model (local layers cannot run FP8 on CPU; ``seq_len_multiple`` gives it
    from the config, tested separately)."""
    from transformers import AutoProcessor

    from megatron_papo.models.qwen2_5_vl import build_model, load_hf_into_mcore, parity
    from megatron_papo.models.qwen2_5_vl.model import seq_len_multiple

    pg = _setup(tp, 1, sp)
    model = build_model(None, pg, hf_dir=hf_dir, sequence_parallel=sp)
    load_hf_into_mcore([model], hf_dir)
    batch = parity.make_batch(AutoProcessor.from_pretrained(hf_dir), parity.builtin_samples(), "right")
    seen: list[int] = []
    model.language_model.decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(int(kwargs["hidden_states"].shape[0]) * (tp if sp else 1)),
        with_kwargs=True)
    base_multiple = model.seq_multiple
    base = parity.mcore_token_logprobs([model], batch, pg)
    model.seq_multiple = seq_len_multiple(tp, sp, fp8=True)
    fp8 = parity.mcore_token_logprobs([model], batch, pg)
    mask = parity.token_mask(batch)
    return {"seq_len": int(batch["input_ids"].shape[1]), "base_multiple": base_multiple, "fp8_multiple": model.seq_multiple,
            "lm_lengths": seen, "max_diff": float((base - fp8).abs()[mask].max()), "tokens": int(mask.sum())}


def meta_build_recipes(combos: list[str]) -> dict[str, Any]:
    """Build each recipe x layout's model on the meta device at its TP x PP (this world holds the largest).

    The model is built from the recipe's ``ModelConfig`` (its TransformerConfigs, FP8 included, exactly as on GPU)
    with the local layer spec (``layer_impl="local"``: Transformer Engine cannot be built without CUDA). Combos that
    build the same model (recipes differ only in algorithm settings) share one build. Returns, per combo, the total
    parameter count over the TP group (sharded params summed over TP ranks, replicated ones once) and config facts.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import megatron_papo.parallel as par
    from megatron_papo.config import load_config
    from megatron_papo.config.parallel import ParallelConfig
    from megatron_papo.models.qwen2_5_vl import build_model, load_arch, resolve_dtype
    from tests.recipes import PUBLISHED, size_of

    cfgs = {c: load_config(c) for c in combos}
    builds: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for combo in sorted(combos, key=lambda c: (cfgs[c].parallel.tp, cfgs[c].parallel.pp, c)):
        cfg = cfgs[combo]
        p = cfg.parallel
        key = repr((size_of(combo.split(",")[0]), p.tp, p.pp, p.sequence_parallel, cfg.model))
        if key not in builds:
            if par._STATE is None or (par._STATE.tp_size, par._STATE.pp_size) != (p.tp, p.pp):
                if ps.model_parallel_is_initialized():  # a new TP x PP layout in the same gloo world
                    ps.destroy_model_parallel()
                par._STATE = None
                pg = par.init_distributed(ParallelConfig(tp=p.tp, pp=p.pp, device="cpu"))
            pg = par._STATE
            model = build_model(cfg.model, pg, arch=load_arch(PUBLISHED[size_of(combo.split(",")[0])]),
                                sequence_parallel=p.sequence_parallel, meta=True, layer_impl="local",
                                dtype=resolve_dtype(cfg.model.dtype, torch.device("cuda")))
            sharded = sum(q.numel() for q in model.parameters() if getattr(q, "tensor_model_parallel", False))
            replicated = sum(q.numel() for q in model.parameters() if not getattr(q, "tensor_model_parallel", False))
            counts = torch.tensor([sharded, replicated], dtype=torch.float64)
            dist.all_reduce(counts, group=pg.tp_group)  # replicated: the same on every TP rank
            lm = model.language_model.config
            assert all(q.device.type == "meta" for q in model.parameters())
            builds[key] = {
                "params": int(counts[0]) + int(counts[1]) // pg.tp_size, "tp": pg.tp_size,
                "dtype": str(next(model.parameters()).dtype), "fp8": lm.fp8, "fp8_recipe": lm.fp8_recipe,
                "first_last_bf16": lm.first_last_layers_bf16, "vision_fp8": model.vision.config.fp8,
                "sequence_parallel": lm.sequence_parallel, "recompute": lm.recompute_granularity,
                "layers": len(model.language_model.decoder.layers), "seq_multiple": model.seq_multiple,
            }
            del model
        out[combo] = builds[key]
    out["_builds"] = len(builds)
    return out
