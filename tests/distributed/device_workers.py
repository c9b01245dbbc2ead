"""Workers for the device-discipline test: one actor step with the model on the virtual device (tests/virtual_device.py)."""

from __future__ import annotations

import contextlib
import dataclasses

import torch


def cpu_and_virtual(hf_dir: str, pp: int = 1, tp: int = 1) -> dict:
    """:func:`actor_step` on CPU parameters, then on the virtual device, in one process."""
    return {"cpu": actor_step(hf_dir, False, pp, tp), "dev": actor_step(hf_dir, True, pp, tp)}


def actor_step(hf_dir: str, virtual: bool, pp: int = 1, tp: int = 1) -> dict:
    """A forward-only stats pass (original and masked views), the trainer's per-token gather, and one PAPO
    ``train_mini_batch`` (paired live views + exact KL/entropies, so every kernel output is used), with the
    parameters on the virtual device (``virtual``) or on the CPU. Returns numbers to compare between the two."""
    from transformers import AutoProcessor

    from megatron_papo.actor import PolicyModel, StatsRequest, gather_token_stats, make_micro_batches
    from megatron_papo.algos import LossSpec
    from megatron_papo.config import load_config
    from megatron_papo.data.collate import collate_rollouts, repeat_interleave
    from megatron_papo.data.dataset import load_prompt_dataset
    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings
    from tests.virtual_device import DeviceMismatchError, is_virtual, virtual_device

    cfg = load_config("tiny_cpu", ["data.synthetic_train_size=8", f"parallel.tp={tp}", f"parallel.pp={pp}"])
    groups = init_distributed(cfg.parallel, seed=5)
    proc = AutoProcessor.from_pretrained(hf_dir)
    ds = load_prompt_dataset("synthetic", cfg.data, proc, "train")
    samples = repeat_interleave([ds.encode(0), ds.encode(1)], 2)
    responses = [[10, 20, 30], [40], [50, 60], [70, 80, 90, 11]]
    batch = collate_rollouts(samples, responses, proc.tokenizer.pad_token_id,
                             aug_pixel_values=[s.pixel_values.flip(0) for s in samples])
    batch.images_per_row = [int(s.image_grid_thw.shape[0]) for s in samples]
    rows = list(range(len(samples)))
    spec = LossSpec(agg_mode="token_mean", kl_coef=0.01, use_kl_prcp=True, kl_prcp_coef=0.02, kl_prcp_estimator="exact",
                    aug_mode="live", entropy_estimator="exact", ori_entropy_coef=0.01, aug_entropy_coef=0.01)
    out: dict = {}
    ctx = virtual_device() if virtual else contextlib.nullcontext(groups.device)
    with ctx as device:
        g = dataclasses.replace(groups, device=device)
        actor = PolicyModel(cfg.model, g, hf_dir, trainable=True, optim=OptimSettings(lr=1e-2))
        params = list(actor.modules[0].parameters())
        before = [p.detach().clone() for p in params]
        out["params_on_device"] = all(is_virtual(p) for p in params) if virtual else None
        micro = make_micro_batches(batch, rows, 2, with_aug=True)
        old = gather_token_stats(actor.token_stats(micro, StatsRequest("ori"), 1.0), micro, batch.input_ids.shape)
        aug = gather_token_stats(actor.token_stats(micro, StatsRequest("aug"), 1.0), micro, batch.input_ids.shape)
        if g.is_last_stage:
            out["stats_on_host"] = not is_virtual(old) and old.device.type == "cpu"
            extra = {"old_logprob": old, "ref_logprob": old - 0.01, "aug_logprob": aug,
                     "advantages": torch.linspace(-1.0, 1.0, len(rows))}
        else:
            extra = {"advantages": torch.linspace(-1.0, 1.0, len(rows))}
        mbs = make_micro_batches(batch, rows, 2, extra=extra, with_aug=True, fixed_shape=pp > 1)
        res = actor.train_mini_batch(mbs, spec, temperature=1.0, global_tokens=float(batch.label_mask.sum()),
                                     global_seqs=float(len(rows)), paired=True, want_exact=True)
        out["metrics"] = res
        out["old"] = old.tolist() if old is not None else None
        out["param_step"] = max(float((p.detach() - b).abs().max()) for p, b in zip(params, before))
        if virtual and g.is_first_stage:  # the harness is not vacuous: a host batch at the model trips it
            from megatron_papo.models.qwen2_5_vl import forward_logits

            try:
                with torch.no_grad():
                    forward_logits(actor.modules[0], micro[0])
                out["host_batch_rejected"] = False
            except DeviceMismatchError as e:
                out["host_batch_rejected"] = str(e).split(":")[0]
    return out
