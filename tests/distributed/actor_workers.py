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
