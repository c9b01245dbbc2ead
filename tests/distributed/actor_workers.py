"""Workers for actor tests: micro-batching with per-group image dedupe, logits equal to the naive batch."""

from __future__ import annotations

import torch


def dedupe_equals_naive(hf_dir: str) -> dict:
    """Logits of a batch of 2 groups x 3 samples: image_index dedupe vs every row carrying its own pixels."""
    from transformers import AutoProcessor

    from megatron_papo.actor import make_micro_batches
    from megatron_papo.config import load_config
    from megatron_papo.data.collate import collate_rollouts, repeat_interleave
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.models.qwen2_5_vl import build_model, forward_logits, load_hf_into_mcore
    from megatron_papo.parallel import init_distributed

    cfg = load_config("tiny_cpu", ["data.synthetic_train_size=8"])
    groups = init_distributed(cfg.parallel)
    proc = AutoProcessor.from_pretrained(hf_dir)
    ds = load_prompt_dataset("synthetic", cfg.data, proc, "train")
    samples = repeat_interleave([ds.encode(0), ds.encode(1)], 3)
    responses = [[10, 20], [30], [40, 50, 60], [7], [8, 9], [11, 12, 13]]
    batch = collate_rollouts(samples, responses, proc.tokenizer.pad_token_id)
    model = build_model(cfg.model, groups, hf_dir=hf_dir)
    load_hf_into_mcore([model], hf_dir, groups)
    (mb,) = make_micro_batches(batch, list(range(6)), 6)
    with torch.no_grad():
        deduped = forward_logits(model, mb)
        naive = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], pixel_values=batch.pixel_values,
                      image_grid_thw=batch.image_grid_thw)
    return {"distinct_images": int(mb["image_grid_thw"].shape[0]), "slots": mb["image_index"].tolist(),
            "max_diff": float((deduped - naive).abs().max()), "scale": float(naive.abs().max())}


def token_budget_update_equals_fixed(hf_dir: str) -> dict:
    """One PAPO update of the same mini-batch (rows of uneven lengths) through fixed 4-row micro-batches and
    through token-budget micro-batches (length-sorted): the sum contract makes loss, grad norm and the updated
    gradients agree element by element; the budgeted split must have fewer padded tokens. (Gradients, not the
    updated weights: Adam's first step is lr * g / (|g| + eps), which turns 1e-9 rounding in near-zero gradients
    into lr-sized differences.)"""
    from transformers import AutoProcessor

    from megatron_papo.actor import PolicyModel, StatsRequest, make_micro_batches
    from megatron_papo.algos import LossSpec
    from megatron_papo.config import load_config
    from megatron_papo.data.collate import collate_rollouts, repeat_interleave
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings

    cfg = load_config("tiny_cpu", ["data.synthetic_train_size=8"])
    groups = init_distributed(cfg.parallel, seed=3)
    proc = AutoProcessor.from_pretrained(hf_dir)
    ds = load_prompt_dataset("synthetic", cfg.data, proc, "train")
    samples = repeat_interleave([ds.encode(0), ds.encode(1), ds.encode(2)], 4)
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 60, 3, 7, 2, 11, 5, 9, 4, 10, 6, 8]  # one long response: the others pack in pairs beside it
    responses = [torch.randint(10, 200, (n,), generator=gen).tolist() for n in lengths]
    batch = collate_rollouts(samples, responses, proc.tokenizer.pad_token_id,
                             aug_pixel_values=[s.pixel_values.flip(0) for s in samples])
    batch.images_per_row = [int(s.image_grid_thw.shape[0]) for s in samples]
    rows = list(range(len(samples)))
    settings = OptimSettings(lr=1e-2, clip_grad=1e9)
    widths = batch.attention_mask.sum(-1).tolist()
    budget = int(max(widths)) * 2
    out: dict = {"budget": budget}
    detached = LossSpec(agg_mode="token_mean", kl_coef=0.01, use_kl_prcp=True, kl_prcp_coef=0.02)
    # paired views in one forward, live masked branch, exact KL and entropies: every token_stats output is used
    paired = LossSpec(agg_mode="seq_mean_token_mean", kl_coef=0.01, use_kl_prcp=True, kl_prcp_coef=0.02,
                      kl_prcp_estimator="exact", aug_mode="live", entropy_estimator="exact", ori_entropy_coef=0.01,
                      aug_entropy_coef=0.01)
    variants = (("fixed", {}, detached), ("budget", {"token_budget": budget}, detached),
                ("packed", {"token_budget": budget, "pack": True}, detached),
                ("fixed_paired", {}, paired), ("packed_paired", {"token_budget": budget, "pack": True}, paired))
    for name, kw, spec in variants:
        actor = PolicyModel(cfg.model, groups, hf_dir, trainable=True, optim=settings)
        init = torch.cat([p.detach().reshape(-1).clone() for p in actor.modules[0].parameters()])
        probe = make_micro_batches(batch, rows, 4, with_aug=True, **kw)
        old = torch.zeros(batch.input_ids.shape)
        aug = torch.zeros(batch.input_ids.shape)
        for mb, r_ori, r_aug in zip(probe, actor.token_stats(probe, StatsRequest("ori"), 1.0),
                                    actor.token_stats(probe, StatsRequest("aug"), 1.0)):
            old[mb["rows"], : r_ori["logprob"].shape[1]] = r_ori["logprob"]
            aug[mb["rows"], : r_aug["logprob"].shape[1]] = r_aug["logprob"]
        adv = torch.linspace(-1.0, 1.0, len(rows))
        extra = {"old_logprob": old, "ref_logprob": old - 0.01, "aug_logprob": aug, "advantages": adv}
        mbs = make_micro_batches(batch, rows, 4, extra=extra, with_aug=True, **kw)
        res = actor.train_mini_batch(mbs, spec, temperature=1.0, global_tokens=float(batch.label_mask.sum()),
                                     global_seqs=float(len(rows)), paired=spec is paired, want_exact=spec is paired)
        model_ids = [mb["packed"]["input_ids"] if "packed" in mb else mb["input_ids"] for mb in mbs]
        out[name] = {"loss": res["loss/total"], "grad_norm": res["grad_norm"], "n_micro": len(mbs),
                     "padded": sum(int(ids.numel()) for ids in model_ids),
                     "metrics": res, "packed_rows": sum(int(ids.shape[0]) for ids in model_ids),
                     "rows": sorted(r for mb in mbs for r in mb["rows"]),
                     "max_tokens": max(int(mb["input_ids"].numel()) for mb in mbs),
                     "old": old, "grads": torch.cat([getattr(p, "main_grad", p.grad).detach().reshape(-1).clone()
                                                     for p in actor.modules[0].parameters()]),
                     "init": init, "params": torch.cat([p.detach().reshape(-1) for p in actor.modules[0].parameters()])}
    f, b = out["fixed"], out["budget"]
    res = {"budget": budget, "loss": (f["loss"], b["loss"]), "grad_norm": (f["grad_norm"], b["grad_norm"]),
           "n_micro": (f["n_micro"], b["n_micro"]), "padded": (f["padded"], b["padded"]), "rows": b["rows"],
           "max_tokens": b["max_tokens"], "old_diff": float((f["old"] - b["old"]).abs().max()),
           "grad_diff": float((f["grads"] - b["grads"]).abs().max()), "grad_max": float(f["grads"].abs().max()),
           "param_step": float((f["params"] - f["init"]).abs().max())}
    for ref_name, name in (("fixed", "packed"), ("fixed_paired", "packed_paired")):
        r, p = out[ref_name], out[name]
        res[name] = {"n_micro": p["n_micro"], "rows": p["rows"], "packed_tokens": p["padded"], "ref_padded": r["padded"],
                     "packed_rows": p["packed_rows"],
                     "old_diff": float((r["old"] - p["old"]).abs().max()),
                     "grad_diff": float((r["grads"] - p["grads"]).abs().max()), "grad_max": float(r["grads"].abs().max()),
                     "metrics": {k: (r["metrics"][k], p["metrics"][k]) for k in r["metrics"]}}
    return res
