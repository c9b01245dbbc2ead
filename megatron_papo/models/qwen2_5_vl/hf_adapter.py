"""THE one HF ⇄ Megatron-Core mapping of Qwen2.5-VL (loader, exporter, converter and weight sync use it).

Declarative core: ``build_plan(arch, pp)`` lists one ``ParamSpec`` per mcore parameter — its global
mcore name, the HF *checkpoint* names it is made of (``model.layers.*``, ``visual.*``, ``lm_head.*``),
how it is laid out (``Kind``), the owning pipeline stage and the full HF shapes. Two pure functions
turn one into the other:

* ``hf_to_shard(spec, read, tp_rank, tp)``: the rank's TP shard from HF tensors; ``read(name, start, stop, dim)``
  returns a slice, so loading streams only the rank's rows/columns from safetensors.
* ``shards_to_hf(spec, shards)``: the full HF tensors from all TP shards (in TP-rank order).

Layouts: mcore's fused QKV is interleaved per GQA group ``[q_1..q_g, k, v]`` per kv head and each TP
rank holds a contiguous slice of that; the fused SwiGLU ``fc1`` on rank r is ``[gate_r; up_r]``; the
vision tower's HF ``attn.qkv`` is fused ``[q; k; v]`` (MHA → one q per group). Column-parallel
tensors split dim 0, row-parallel dim 1; row-parallel biases and norms are replicated.
transformers-5 in-memory names (``model.language_model.*``, ``model.visual.*``) map to checkpoint names
with ``to_checkpoint_name`` / ``to_transformers_name``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from megatron_papo.models.qwen2_5_vl.config import QwenVLArch

_IN_MEMORY_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def to_checkpoint_name(name: str) -> str:
    """transformers-5 in-memory name → checkpoint name (idempotent on checkpoint names)."""
    for mem, ckpt in _IN_MEMORY_PREFIXES:
        if name.startswith(mem):
            return ckpt + name[len(mem):]
    return name


def to_transformers_name(name: str) -> str:
    """Checkpoint name → transformers-5 in-memory name."""
    if name.startswith("visual."):
        return "model.visual." + name[len("visual."):]
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return name


class Kind(str, enum.Enum):
    """How an mcore parameter is built from HF tensors and split over TP."""

    REPLICATED = "replicated"  # same full tensor on every TP rank
    COLUMN = "column"  # split dim 0 (vocab rows, column-parallel weights/biases)
    ROW = "row"  # split dim 1 (row-parallel weights)
    GLU = "glu"  # [gate_r; up_r] from (gate, up), each split dim 0
    QKV = "qkv"  # from (q, k, v): interleaved per GQA group, then split dim 0
    FUSED_QKV = "fused_qkv"  # from one [q; k; v] tensor (vision), MHA


@dataclass(frozen=True)
class ParamSpec:
    """One mcore parameter in HF terms (global layer numbering)."""

    mcore: str
    hf: tuple[str, ...]
    kind: Kind
    stage: int
    hf_shapes: tuple[tuple[int, ...], ...]
    heads: int = 0
    groups: int = 0
    head_dim: int = 0
    export: bool = True  # False: a duplicate (tied output layer on the last stage at PP>1)


def build_plan(arch: QwenVLArch, pp: int = 1) -> list[ParamSpec]:
    """All mcore parameters of a ``pp``-stage model, with their HF counterparts."""
    a, v = arch, arch.vision
    H, d, nh, ng, ffn = a.hidden_size, a.head_dim, a.num_heads, a.num_kv_heads, a.intermediate_size
    last = pp - 1
    per_stage = a.num_layers // pp
    plan: list[ParamSpec] = []

    def add(mcore: str, hf: list[str], kind: Kind, stage: int, shapes: list[tuple[int, ...]], **kw: Any) -> None:
        plan.append(ParamSpec(mcore, tuple(hf), kind, stage, tuple(tuple(s) for s in shapes), **kw))

    # vision tower (stage 0)
    C, vd, vnh, vf, M = v.hidden_size, v.head_dim, v.num_heads, v.intermediate_size, v.merger_hidden
    add("vision.patch_embed.proj.weight", ["visual.patch_embed.proj.weight"], Kind.REPLICATED, 0,
        [(C, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)])
    for j in range(v.depth):
        m, h = f"vision.layers.{j}.", f"visual.blocks.{j}."
        add(m + "input_layernorm.weight", [h + "norm1.weight"], Kind.REPLICATED, 0, [(C,)])
        qkv = dict(heads=vnh, groups=vnh, head_dim=vd)
        add(m + "self_attention.linear_qkv.weight", [h + "attn.qkv.weight"], Kind.FUSED_QKV, 0, [(3 * C, C)], **qkv)
        add(m + "self_attention.linear_qkv.bias", [h + "attn.qkv.bias"], Kind.FUSED_QKV, 0, [(3 * C,)], **qkv)
        add(m + "self_attention.linear_proj.weight", [h + "attn.proj.weight"], Kind.ROW, 0, [(C, C)])
        add(m + "self_attention.linear_proj.bias", [h + "attn.proj.bias"], Kind.REPLICATED, 0, [(C,)])
        add(m + "pre_mlp_layernorm.weight", [h + "norm2.weight"], Kind.REPLICATED, 0, [(C,)])
        add(m + "mlp.linear_fc1.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], Kind.GLU, 0,
            [(vf, C), (vf, C)])
        add(m + "mlp.linear_fc1.bias", [h + "mlp.gate_proj.bias", h + "mlp.up_proj.bias"], Kind.GLU, 0, [(vf,), (vf,)])
        add(m + "mlp.linear_fc2.weight", [h + "mlp.down_proj.weight"], Kind.ROW, 0, [(C, vf)])
        add(m + "mlp.linear_fc2.bias", [h + "mlp.down_proj.bias"], Kind.REPLICATED, 0, [(C,)])
    add("vision.merger.ln_q.weight", ["visual.merger.ln_q.weight"], Kind.REPLICATED, 0, [(C,)])
    add("vision.merger.linear_fc1.weight", ["visual.merger.mlp.0.weight"], Kind.COLUMN, 0, [(M, M)])
    add("vision.merger.linear_fc1.bias", ["visual.merger.mlp.0.bias"], Kind.COLUMN, 0, [(M,)])
    add("vision.merger.linear_fc2.weight", ["visual.merger.mlp.2.weight"], Kind.ROW, 0, [(H, M)])
    add("vision.merger.linear_fc2.bias", ["visual.merger.mlp.2.bias"], Kind.REPLICATED, 0, [(H,)])

    # language model
    lm = "language_model."
    add(lm + "embedding.word_embeddings.weight", ["model.embed_tokens.weight"], Kind.COLUMN, 0, [(a.vocab_size, H)])
    qkv = dict(heads=nh, groups=ng, head_dim=d)
    for i in range(a.num_layers):
        m, h, st = f"{lm}decoder.layers.{i}.", f"model.layers.{i}.", i // per_stage
        add(m + "input_layernorm.weight", [h + "input_layernorm.weight"], Kind.REPLICATED, st, [(H,)])
        add(m + "self_attention.linear_qkv.weight", [h + f"self_attn.{x}_proj.weight" for x in "qkv"], Kind.QKV, st,
            [(nh * d, H), (ng * d, H), (ng * d, H)], **qkv)
        add(m + "self_attention.linear_qkv.bias", [h + f"self_attn.{x}_proj.bias" for x in "qkv"], Kind.QKV, st,
            [(nh * d,), (ng * d,), (ng * d,)], **qkv)
        add(m + "self_attention.linear_proj.weight", [h + "self_attn.o_proj.weight"], Kind.ROW, st, [(H, nh * d)])
        add(m + "pre_mlp_layernorm.weight", [h + "post_attention_layernorm.weight"], Kind.REPLICATED, st, [(H,)])
        add(m + "mlp.linear_fc1.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"], Kind.GLU, st,
            [(ffn, H), (ffn, H)])
        add(m + "mlp.linear_fc2.weight", [h + "mlp.down_proj.weight"], Kind.ROW, st, [(H, ffn)])
    add(lm + "decoder.final_layernorm.weight", ["model.norm.weight"], Kind.REPLICATED, last, [(H,)])
    if not a.tie_word_embeddings:
        add(lm + "output_layer.weight", ["lm_head.weight"], Kind.COLUMN, last, [(a.vocab_size, H)])
    elif pp > 1:  # tied: the last stage keeps its own copy of the embedding
        add(lm + "output_layer.weight", ["model.embed_tokens.weight"], Kind.COLUMN, last, [(a.vocab_size, H)],
            export=False)
    return plan


def checkpoint_shapes(arch: QwenVLArch) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an HF checkpoint of ``arch`` with its shape (what export yields)."""
    return {n: s for spec in build_plan(arch, 1) if spec.export for n, s in zip(spec.hf, spec.hf_shapes)}


# ---------------------------------------------------------------- HF tensors <-> one TP shard
Reader = Callable[[str, int, int, int], torch.Tensor]  # (name, start, stop, dim) -> slice


def _qkv_rows(spec: ParamSpec) -> tuple[int, int]:
    """(q heads per group, rows of one interleaved group)."""
    qpg = spec.heads // spec.groups
    return qpg, (qpg + 2) * spec.head_dim


def hf_to_shard(spec: ParamSpec, read: Reader, tp_rank: int, tp: int) -> torch.Tensor:
    """The TP shard of ``spec`` for ``tp_rank``, reading only the needed slices via ``read``."""
    full = spec.hf_shapes[0]
    if spec.kind == Kind.REPLICATED:
        return read(spec.hf[0], 0, full[0], 0)
    if spec.kind in (Kind.COLUMN, Kind.ROW):
        dim = 0 if spec.kind == Kind.COLUMN else 1
        n = full[dim] // tp
        return read(spec.hf[0], tp_rank * n, (tp_rank + 1) * n, dim)
    if spec.kind == Kind.GLU:
        n = full[0] // tp
        return torch.cat([read(name, tp_rank * n, (tp_rank + 1) * n, 0) for name in spec.hf], dim=0)
    # QKV / FUSED_QKV: rank slice of the interleaved [q_1..q_g, k, v] x groups layout
    qpg, per_group = _qkv_rows(spec)
    d = spec.head_dim
    total = spec.groups * per_group
    start, stop = tp_rank * total // tp, (tp_rank + 1) * total // tp
    g0, g1 = start // per_group, -(-stop // per_group)
    if spec.kind == Kind.QKV:
        q_name, k_name, v_name = spec.hf
        k_off = v_off = 0
    else:
        q_name = k_name = v_name = spec.hf[0]
        k_off, v_off = spec.heads * d, 2 * spec.heads * d
    q = read(q_name, g0 * qpg * d, g1 * qpg * d, 0)
    k = read(k_name, k_off + g0 * d, k_off + g1 * d, 0)
    v = read(v_name, v_off + g0 * d, v_off + g1 * d, 0)
    rest = q.shape[1:]
    ng = g1 - g0
    inter = torch.cat([q.reshape(ng, qpg * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1)
    inter = inter.reshape(ng * per_group, *rest)
    return inter[start - g0 * per_group: stop - g0 * per_group].contiguous()


def shards_to_hf(spec: ParamSpec, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full HF tensors (checkpoint names) from all TP shards of ``spec`` in TP-rank order."""
    if spec.kind == Kind.REPLICATED:
        return {spec.hf[0]: shards[0]}
    if spec.kind == Kind.COLUMN:
        return {spec.hf[0]: torch.cat(shards, dim=0)}
    if spec.kind == Kind.ROW:
        return {spec.hf[0]: torch.cat(shards, dim=1)}
    if spec.kind == Kind.GLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return {spec.hf[0]: torch.cat([h[0] for h in halves]), spec.hf[1]: torch.cat([h[1] for h in halves])}
    qpg, per_group = _qkv_rows(spec)
    d = spec.head_dim
    full = torch.cat(shards, dim=0)
    rest = full.shape[1:]
    g = full.reshape(spec.groups, per_group, *rest)
    q = g[:, : qpg * d].reshape(spec.heads * d, *rest)
    k = g[:, qpg * d: (qpg + 1) * d].reshape(spec.groups * d, *rest)
    v = g[:, (qpg + 1) * d:].reshape(spec.groups * d, *rest)
    if spec.kind == Kind.QKV:
        return dict(zip(spec.hf, (q, k, v)))
    return {spec.hf[0]: torch.cat([q, k, v], dim=0)}


# ---------------------------------------------------------------- model chunks
def _chunks(model_chunks: Any) -> list[Any]:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def _unwrap(chunk: Any) -> Any:
    while not hasattr(chunk, "language_model") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _layer_offset(chunk: Any) -> int:
    layers = chunk.language_model.decoder.layers
    return (layers[0].layer_number - 1) if len(layers) else 0


# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear (layer_norm_weight);
# the plan uses the local spec's names.
_TE_ALIASES = (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
               ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


def global_param_names(chunk: Any) -> dict[str, torch.nn.Parameter]:
    """A model chunk's parameters keyed by their *global* mcore names (PP layer offset applied, local-spec names)."""
    chunk = _unwrap(chunk)
    off = _layer_offset(chunk)
    out = {}
    key = "language_model.decoder.layers."
    for name, p in chunk.named_parameters():
        if name.startswith(key):
            idx, rest = name[len(key):].split(".", 1)
            name = f"{key}{int(idx) + off}.{rest}"
        for te, local in _TE_ALIASES:
            if name.endswith(te):
                name = name[: -len(te)] + local
        out[name] = p
    return out


def _groups(chunk: Any) -> tuple[Any, Any]:
    pgc = _unwrap(chunk).pg_collection
    return pgc.tp, pgc.pp


def _size_rank(group: Any) -> tuple[int, int]:
    if group is None or not torch.distributed.is_initialized():
        return 1, 0
    return group.size(), group.rank()


class SafetensorsReader:
    """Reads slices of an HF directory's safetensors (single file or sharded with an index), by checkpoint name."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        files = sorted({*json.loads(index.read_text())["weight_map"].values()}) if index.exists() else \
            sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {self.dir}")
        self._handles = {f: safe_open(str(self.dir / f), framework="pt") for f in files}
        self.where: dict[str, tuple[str, str]] = {}  # checkpoint name -> (file, stored name)
        for f, h in self._handles.items():
            for stored in h.keys():
                self.where[to_checkpoint_name(stored)] = (f, stored)

    def shape(self, name: str) -> tuple[int, ...]:
        """Stored shape of a tensor."""
        f, stored = self.where[name]
        return tuple(self._handles[f].get_slice(stored).get_shape())

    def read(self, name: str, start: int, stop: int, dim: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) ``[start, stop)`` of a tensor; only that slice is read."""
        f, stored = self.where[name]
        sl = self._handles[f].get_slice(stored)
        return sl[start:stop] if dim == 0 else sl[:, start:stop]


def check_checkpoint(arch: QwenVLArch, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ``ValueError`` listing missing, unexpected and mis-shaped tensor names."""
    expected = checkpoint_shapes(arch)
    present = dict(shapes)
    if arch.tie_word_embeddings:
        present.pop("lm_head.weight", None)  # some tied checkpoints store the duplicate head
    missing = sorted(set(expected) - set(present))
    extra = sorted(set(present) - set(expected))
    bad = sorted(f"{n}: {list(present[n])} != expected {list(expected[n])}" for n in set(expected) & set(present)
                 if tuple(present[n]) != tuple(expected[n]))
    if missing or extra or bad:
        parts = [f"{k} ({len(v)}): {', '.join(v)}" for k, v in
                 (("missing", missing), ("unexpected", extra), ("mis-shaped", bad)) if v]
        raise ValueError("HF checkpoint does not match the Qwen2.5-VL architecture; " + "; ".join(parts))


@torch.no_grad()
def load_hf_into_mcore(model_chunks: Any, hf_dir: str | Path, pg: Any = None) -> None:
    """Copy an HF Qwen2.5-VL checkpoint into the model chunks; each rank reads only its own slices.

    ``pg`` is accepted for symmetry; TP/PP groups are taken from the model (its ``pg_collection``).
    """
    chunks = [_unwrap(c) for c in _chunks(model_chunks)]
    arch = chunks[0].arch
    reader = SafetensorsReader(hf_dir)
    check_checkpoint(arch, {n: reader.shape(n) for n in reader.where})
    tp_group, pp_group = _groups(chunks[0])
    tp, tp_rank = _size_rank(tp_group)
    pp, _ = _size_rank(pp_group)
    plan = {s.mcore: s for s in build_plan(arch, pp)}
    for chunk in chunks:
        for name, param in global_param_names(chunk).items():
            spec = plan.get(name)
            if spec is None:
                raise ValueError(f"mcore parameter {name} has no HF mapping (hf_adapter.build_plan)")
            shard = hf_to_shard(spec, reader.read, tp_rank, tp)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{name}: HF shard shape {list(shard.shape)} != mcore {list(param.shape)}")
            param.data.copy_(shard.to(param.dtype))


def load_state_dict_into_mcore(model_chunks: Any, hf_state: dict[str, torch.Tensor]) -> None:
    """Like ``load_hf_into_mcore`` from in-memory HF tensors (checkpoint or transformers-5 names)."""
    chunks = [_unwrap(c) for c in _chunks(model_chunks)]
    arch = chunks[0].arch
    state = {to_checkpoint_name(k): v for k, v in hf_state.items()}
    check_checkpoint(arch, {k: tuple(v.shape) for k, v in state.items()})
    tp_group, pp_group = _groups(chunks[0])
    tp, tp_rank = _size_rank(tp_group)
    pp, _ = _size_rank(pp_group)
    plan = {s.mcore: s for s in build_plan(arch, pp)}

    def read(name: str, start: int, stop: int, dim: int) -> torch.Tensor:
        t = state[name]
        return t[start:stop] if dim == 0 else t[:, start:stop]

    with torch.no_grad():
        for chunk in chunks:
            for name, param in global_param_names(chunk).items():
                param.data.copy_(hf_to_shard(plan[name], read, tp_rank, tp).to(param.dtype))


def export_plan(model_chunks: Any) -> list[ParamSpec]:
    """The exported parameters in order (the weight sync iterates the same list)."""
    chunk = _unwrap(_chunks(model_chunks)[0])
    pp, _ = _size_rank(_groups(chunk)[1])
    return [s for s in build_plan(chunk.arch, pp) if s.export]


def bucketize(plan: list[ParamSpec], max_bytes: int, bytes_per_element: int = 2) -> list[list[ParamSpec]]:
    """Split an export plan into consecutive buckets of at most ``max_bytes`` of full HF tensors (>= 1 spec each)."""
    buckets: list[list[ParamSpec]] = []
    size = 0
    for spec in plan:
        n = bytes_per_element * sum(int(torch.Size(s).numel()) for s in spec.hf_shapes)
        if not buckets or (size + n > max_bytes and buckets[-1]):
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += n
    return buckets


@torch.no_grad()
def export_to_hf(model_chunks: Any, pg: Any = None, *, names: str = "checkpoint",
                 plan: Optional[list[ParamSpec]] = None,
                 value: Optional[Callable[[torch.nn.Parameter], torch.Tensor]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, full tensor)`` for every HF tensor, on every rank (collective over TP and PP).

    Per parameter: the owning PP stage all-gathers the TP shards and merges them (``shards_to_hf``);
    the result is broadcast over the PP group. ``names``: ``checkpoint`` (SGLang/vLLM/save_pretrained
    files) or ``transformers`` (transformers-5 in-memory names).
    """
    chunks = [_unwrap(c) for c in _chunks(model_chunks)]
    tp_group, pp_group = _groups(chunks[0])
    tp, _ = _size_rank(tp_group)
    pp, pp_rank = _size_rank(pp_group)
    local: dict[str, torch.nn.Parameter] = {}
    for c in chunks:
        local.update(global_param_names(c))
    rename = to_transformers_name if names == "transformers" else (lambda n: n)
    for spec in plan or export_plan(chunks):
        if spec.stage == pp_rank:
            param = local[spec.mcore]
            p = (value(param) if value is not None else param).detach()
            shards = [p]
            if tp > 1 and spec.kind != Kind.REPLICATED:
                shards = [torch.empty_like(p) for _ in range(tp)]
                torch.distributed.all_gather(shards, p.contiguous(), group=tp_group)
            full = shards_to_hf(spec, shards)
            tensors = [full[n].contiguous() for n in spec.hf]
        else:
            dtype = next(iter(local.values())).dtype if local else torch.float32
            device = next(iter(local.values())).device if local else torch.device("cpu")
            tensors = [torch.empty(s, dtype=dtype, device=device) for s in spec.hf_shapes]
        if pp > 1:
            src = torch.distributed.get_global_rank(pp_group, spec.stage)
            for t in tensors:
                torch.distributed.broadcast(t, src=src, group=pp_group)
        for n, t in zip(spec.hf, tensors):
            yield rename(n), t
