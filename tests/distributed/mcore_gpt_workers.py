"""Workers for the foundation tests: a tiny mcore GPTModel trained under TP/PP/DP on gloo."""

from __future__ import annotations

import torch

from megatron_papo.config.parallel import ParallelConfig

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 64, 32, 4, 4, 16
GLOBAL_BATCH, MICRO = 4, 1


def _build(groups, pre_process: bool, post_process: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=2, ffn_hidden_size=64,
        tensor_model_parallel_size=groups.tp_size, pipeline_model_parallel_size=groups.pp_size,
        sequence_parallel=groups.tp_size > 1 and _SP[0], use_cpu_initialization=True, perform_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, params_dtype=torch.float32,
        bf16=False, pipeline_dtype=torch.float32, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, bias_dropout_fusion=False, init_method_std=0.02,
    )
    torch.manual_seed(1234)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
                    share_embeddings_and_output_weights=False, position_embedding_type="rope",
                    pg_collection=groups.mcore)


_SP = [False]


def train_gpt(tp: int = 1, pp: int = 1, steps: int = 5, distopt: bool = False, sp: bool = False) -> dict:
    """Train 5 steps on fixed data; return the per-step losses (last stage of DP rank 0 reports)."""
    import torch.distributed as dist

    from megatron_papo.parallel import init_distributed
    from megatron_papo.parallel.training import OptimSettings, build_optimizer, forward_backward, wrap_ddp

    _SP[0] = sp
    groups = init_distributed(ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp), seed=1)
    model = _build(groups, groups.is_first_stage, groups.is_last_stage)
    # identical init across layouts: load a full state dict sliced per rank is what hf_adapter does for Qwen;
    # here mcore's use_cpu_initialization makes TP slices of one master weight, and PP stages build their
    # own layers, so we re-seed each layer deterministically by its global name instead.
    _reseed_by_global_name(model, groups)
    chunks = wrap_ddp([model], groups, use_distributed_optimizer=distopt)
    opt = build_optimizer(chunks, OptimSettings(lr=1e-2, clip_grad=1.0, use_distributed_optimizer=distopt), groups)

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (steps, GLOBAL_BATCH, SEQ + 1), generator=g)
    per_dp = GLOBAL_BATCH // groups.dp_size
    losses, norms = [], []
    for step in range(steps):
        batch = data[step, groups.dp_rank * per_dp:(groups.dp_rank + 1) * per_dp]
        micro = [batch[i:i + MICRO] for i in range(0, per_dp, MICRO)]
        it = iter(micro)

        def fwd(data_it, m):
            tokens = next(data_it)
            inp, labels = tokens[:, :-1], tokens[:, 1:]
            pos = torch.arange(SEQ).unsqueeze(0).expand_as(inp)
            out = m(inp, pos, None, labels=labels)

            def loss_fn(output):
                loss = output.float().mean()
                return loss, {"loss": loss.detach().clone()}

            return out, loss_fn

        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        res = forward_backward(chunks, fwd, it, len(micro), groups, seq_length=SEQ, micro_batch_size=MICRO)
        _, gnorm, _ = opt.step()
        norms.append(float(gnorm))
        if groups.is_last_stage:
            val = torch.stack([r["loss"] for r in res]).mean()
            dist.all_reduce(val, group=groups.dp_group)
            losses.append(val.item() / groups.dp_size)
    return {"losses": losses, "grad_norms": norms, "last": groups.is_last_stage and groups.tp_rank == 0 and groups.dp_rank == 0}


def _reseed_by_global_name(model, groups) -> None:
    """Give every parameter the values of the TP=1/PP=1 model (same seed per global name), sliced per rank."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    layers_per_stage = LAYERS // groups.pp_size
    offset = groups.pp_rank * layers_per_stage
    part_dim = {}
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
                part_dim[full] = 0
            elif isinstance(mod, RowParallelLinear) and p_name == "weight":
                part_dim[full] = 1
    with torch.no_grad():
        for name, p in model.named_parameters():
            gname = name
            if ".layers." in name:
                pre, rest = name.split(".layers.", 1)
                idx, tail = rest.split(".", 1)
                gname = f"{pre}.layers.{int(idx) + offset}.{tail}"
            seed = sum(ord(c) * (i + 1) for i, c in enumerate(gname)) % (2**31)
            shape = list(p.shape)
            d = part_dim.get(name)
            if d is not None:
                shape[d] *= groups.tp_size
            if "norm" in name:
                full = torch.ones(shape)
            else:
                full = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
            if d is not None and "linear_fc1" in name:
                # fused SwiGLU fc1 rows are [gate_r; up_r] per rank
                gate, up = full.chunk(2, dim=0)
                full = torch.cat([gate.chunk(groups.tp_size, 0)[groups.tp_rank], up.chunk(groups.tp_size, 0)[groups.tp_rank]])
            elif d is not None and "linear_qkv" in name:
                full = full.chunk(groups.tp_size, d)[groups.tp_rank]  # per GQA group interleaved: contiguous per rank
            elif d is not None:
                full = full.chunk(groups.tp_size, d)[groups.tp_rank]
            p.copy_(full)


def save_then_logits(tp: int = 1, pp: int = 1, ckpt: str = "", mode: str = "save") -> dict:
    """mode=save: build the reseeded model, save a dist-checkpoint, return logits.
    mode=load: build a model with a different init, load the checkpoint, return logits."""
    import torch.distributed as dist

    from megatron_papo.checkpoint.dist import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_papo.parallel import init_distributed

    groups = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=1)
    model = _build(groups, groups.is_first_stage, groups.is_last_stage)
    if mode == "save":
        _reseed_by_global_name(model, groups)
        save_checkpoint(ckpt, 3, [model], trainer_state={"note": "x"})
    else:
        state = load_checkpoint(latest_checkpoint(ckpt), [model])
        assert state["step"] == 3 and state["note"] == "x"
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        if groups.pp_size == 1:
            out = model(tokens, pos, None)
        else:  # run the two stages by hand: stage 0 sends hidden states to stage 1
            ranks = groups.pp_stage_ranks()
            if groups.is_first_stage:
                h = model(tokens, pos, None)
                dist.send(h.contiguous(), ranks[1])
                return {"logits": None}
            h = torch.empty(SEQ, 2, HIDDEN)
            dist.recv(h, ranks[0])
            model.set_input_tensor(h)
            out = model(None, pos, None)
    full = [torch.empty_like(out) for _ in range(groups.tp_size)]
    dist.all_gather(full, out.contiguous(), group=groups.tp_group)
    return {"logits": torch.cat(full, dim=-1).tolist()}
