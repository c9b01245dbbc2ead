"""Workers of the GPU suite (one GPU, torchrun with ``cpu:gloo,cuda:nccl``): a PolicyModel step in bf16, with
Transformer Engine, and with FP8. NOT run by CI (no GPU there): written against megatron-core 0.16.1 and TE's
sources; the printed numbers of the first GPU run justify the invariant tolerances (megatron_papo/invariants.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

#: head_dim 64 (SGLang/TE GPU attention kernels), every GEMM dim a multiple of 16 (FP8)
GPU_TINY = {"hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "num_kv_heads": 2,
            "vision_hidden_size": 128, "vision_heads": 2, "vision_intermediate_size": 256}


def policy_step(hf_dir: str, impl: str = "local", fp8: Optional[str] = None, fp8_recipe: str = "tensorwise") -> dict[str, Any]:
    """Actor and reference log-probs of a batch with an odd sequence length, the actor == reference gap, then one
    PAPO ``train_mini_batch`` (paired live views, exact KL/entropies); returns the numbers and the tolerances."""
    from transformers import AutoProcessor

    from megatron_papo.actor import PolicyModel, StatsRequest, gather_token_stats, make_micro_batches
    from megatron_papo.algos import LossSpec
    from megatron_papo.config import load_config
    from megatron_papo.data.collate import collate_rollouts, repeat_interleave
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.invariants import invariant_tolerances
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings

    over = ["data.synthetic_train_size=8", "parallel.device=cuda", "model.dtype=bfloat16", f"model.transformer_impl={impl}"]
    if fp8:
        over += [f"model.fp8={fp8}", f"model.fp8_recipe={fp8_recipe}", "model.fp8_bf16_first_last_layers=0"]
    cfg = load_config("tiny_cpu", over)
    groups = init_distributed(cfg.parallel, seed=7)
    proc = AutoProcessor.from_pretrained(hf_dir)
    ds = load_prompt_dataset("synthetic", cfg.data, proc, "train")
    samples = repeat_interleave([ds.encode(0), ds.encode(1)], 2)
    responses = [[10, 20, 30], [40], [50, 60, 61, 62, 63], [70, 80, 90, 11]]
    batch = collate_rollouts(samples, responses, proc.tokenizer.pad_token_id,
                             aug_pixel_values=[s.pixel_values.flip(0) for s in samples])
    batch.images_per_row = [int(s.image_grid_thw.shape[0]) for s in samples]
    rows = list(range(len(samples)))
    actor = PolicyModel(cfg.model, groups, hf_dir, trainable=True, optim=OptimSettings(lr=1e-4, bf16=True))
    ref = PolicyModel(cfg.model, groups, hf_dir, trainable=False)
    roundtrip = _hf_roundtrip(actor, hf_dir) if impl == "transformer_engine" else None  # before the update
    micro = make_micro_batches(batch, rows, 2, with_aug=True)
    shape = batch.input_ids.shape
    old = gather_token_stats(actor.token_stats(micro, StatsRequest("ori"), 1.0), micro, shape)
    ref_lp = gather_token_stats(ref.token_stats(micro, StatsRequest("ori"), 1.0), micro, shape)
    aug = gather_token_stats(actor.token_stats(micro, StatsRequest("aug"), 1.0), micro, shape)
    mask = batch.label_mask.bool()
    spec = LossSpec(agg_mode="token_mean", kl_coef=0.01, use_kl_prcp=True, kl_prcp_coef=0.02, kl_prcp_estimator="exact",
                    aug_mode="live", entropy_estimator="exact", ori_entropy_coef=0.01, aug_entropy_coef=0.01)
    extra = {"old_logprob": old, "ref_logprob": ref_lp, "aug_logprob": aug, "advantages": torch.linspace(-1.0, 1.0, len(rows))}
    mbs = make_micro_batches(batch, rows, 2, extra=extra, with_aug=True)
    res = actor.train_mini_batch(mbs, spec, temperature=1.0, global_tokens=float(mask.sum()), global_seqs=float(len(rows)),
                                 paired=True, want_exact=True)
    gap_tol, mean_tol = invariant_tolerances(torch.bfloat16, fp8=fp8 is not None)
    out = {"seq_len": int(shape[1]), "seq_multiple": actor.seq_multiple, "actor_ref_gap": float((old - ref_lp).abs()[mask].max()),
           "ppo_kl": res["ppo_kl"], "loss": res["loss/total"], "grad_norm": res["grad_norm"],
           "logprob_mean": float(old[mask].mean()), "gap_tol": gap_tol, "mean_tol": mean_tol,
           "params_on_cuda": all(p.is_cuda for p in actor.modules[0].parameters()),
           "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
    if roundtrip is not None:
        out["hf_roundtrip_max_diff"] = roundtrip
    return out


def _hf_roundtrip(model: Any, hf_dir: str) -> float:
    """Largest |exported - checkpoint| over every HF tensor (names must match one to one; bf16 rounding)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from megatron_papo.models.qwen2_5_vl import export_to_hf

    ckpt = {k: v for f in sorted(Path(hf_dir).glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    exported = dict(export_to_hf(model.modules))
    if set(exported) != set(ckpt):
        raise AssertionError(f"HF names differ: missing {sorted(set(ckpt) - set(exported))[:5]}, "
                             f"extra {sorted(set(exported) - set(ckpt))[:5]}")
    return max(float((exported[k].float().cpu() - ckpt[k].to(torch.bfloat16).float()).abs().max()) for k in ckpt)
