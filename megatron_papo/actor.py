"""The policy (actor) and reference model on Megatron-Core: per-token stats and the PPO/PAPO update.

Both run through mcore's forward-backward schedule (no pipelining, or 1F1B over the PP group), so
the same code serves TP, PP and DP. Per-token statistics always come from the vocab-parallel
``token_stats`` kernel (logits are never gathered). Results live on the last pipeline stage;
metrics are reduced there and sent to global rank 0 for logging.

Micro-batch dicts (built by ``make_micro_batches``) hold ``input_ids, attention_mask, labels``
(``-100`` outside the response), ``pixel_values(_aug), image_grid_thw``, per-row ``advantages`` and the
per-token tensors of earlier phases (``old_logprob``, ``ref_logprob``, ``aug_logprob``; the engine's
``rollout_logprob`` when a rollout correction is on), all ``[B, S]``.
With sequence packing they also hold ``packed``: the rows the model runs on (``segment_ids`` marking the
samples); the kernel's per-token outputs are moved back to the ``[B, S]`` layout before the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_papo.algos import LossInputs, LossSpec, papo_loss
from megatron_papo.data.collate import RolloutBatch
from megatron_papo.models.qwen2_5_vl import build_model, forward_logits, load_hf_into_mcore
from megatron_papo.ops.vocab_parallel import IGNORE_INDEX, TokenStats, token_stats
from megatron_papo.parallel import ParallelGroups
from megatron_papo.parallel.training import OptimSettings, build_optimizer, forward_backward, guarded_step, wrap_ddp
from megatron_papo.utils.device import to_device, to_host

PER_TOKEN_KEYS = ("old_logprob", "ref_logprob", "aug_logprob", "rollout_logprob")


@dataclass
class StatsRequest:
    """Which per-token outputs a forward-only pass should produce."""

    view: str = "ori"  # "ori" | "aug"
    entropy: bool = False


def split_by_tokens(rows: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Token-budget micro-batching: ``rows`` ordered by length (longest first, ties in row order) and cut
    greedily so that ``len(chunk) * longest_in_chunk <= budget`` (the padded size of the micro-batch); a row
    longer than the budget gets a micro-batch of its own."""
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    order = sorted(rows, key=lambda r: -lengths[r])
    chunks: list[list[int]] = []
    for r in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
            chunks[-1].append(r)
        else:
            chunks.append([r])
    return chunks


def pack_by_tokens(rows: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence packing: first-fit decreasing of ``rows`` into bins of at most ``capacity`` real tokens (a row
    longer than that gets a bin of its own); each bin lists its rows in ascending row order."""
    if capacity <= 0:
        raise ValueError(f"packing capacity must be positive, got {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []
    for r in sorted(rows, key=lambda r: (-lengths[r], r)):
        for i, free in enumerate(room):
            if lengths[r] <= free:
                bins[i].append(r)
                room[i] -= lengths[r]
                break
        else:
            bins.append([r])
            room.append(capacity - lengths[r])
    return [sorted(b) for b in bins]


def _packed_layout(bins: list[list[int]], width: int, pack_width: int, input_ids: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Packed rows ``[R, pack_width]`` of a micro-batch's right-padded rows (``[b, width]``). ``bins[j]`` lists
    the lengths of the samples packed into row j, samples numbered in order across the bins. Holds the model's
    ``input_ids``/``segment_ids``/``labels`` (0 / 0 / ignored on padding) and the index pair that moves a
    per-token tensor from the packed rows back to the ``[b, width]`` layout (:func:`unpack_tokens`)."""
    n_rows = len(bins)
    src, dst = [], []
    seg = torch.zeros(n_rows, pack_width, dtype=torch.long)
    sample = 0
    for j, lens in enumerate(bins):
        off = 0
        for k, n in enumerate(lens):
            src.append(torch.arange(n) + j * pack_width + off)
            dst.append(torch.arange(n) + sample * width)
            seg[j, off:off + n] = k + 1
            off += n
            sample += 1
    src_t, dst_t = torch.cat(src), torch.cat(dst)
    ids = torch.zeros(n_rows * pack_width, dtype=input_ids.dtype)
    ids[src_t] = input_ids.reshape(-1)[dst_t]
    lab = torch.full((n_rows * pack_width,), IGNORE_INDEX, dtype=labels.dtype)
    lab[src_t] = labels.reshape(-1)[dst_t]
    return {"input_ids": ids.view(n_rows, pack_width), "segment_ids": seg, "labels": lab.view(n_rows, pack_width),
            "unpack_src": src_t, "unpack_dst": dst_t, "shape": torch.tensor([sample, width])}


def unpack_tokens(packed: torch.Tensor, layout: dict[str, torch.Tensor]) -> torch.Tensor:
    """A per-token tensor of packed rows (``[R, pack_width]``) in the micro-batch's ``[b, width]`` layout (zeros
    on padding); differentiable. Only per-token scalars move, never logits."""
    b, w = (int(x) for x in layout["shape"])
    flat = packed.reshape(-1)[layout["unpack_src"]]
    return flat.new_zeros(b * w).scatter(0, layout["unpack_dst"], flat).view(b, w)


def make_micro_batches(batch: RolloutBatch, rows: list[int], micro_size: int, *, extra: Optional[dict[str, torch.Tensor]] = None,
                       with_aug: bool = False, fixed_shape: bool = False, token_budget: int = 0,
                       pack: bool = False) -> list[dict[str, Any]]:
    """Split ``rows`` of a RolloutBatch into micro-batch dicts: ``micro_size`` rows each in order, or, with
    ``token_budget`` > 0, rows of similar length together, at most ``token_budget`` padded tokens per
    micro-batch (:func:`split_by_tokens`; not with ``fixed_shape``). With ``pack`` (needs ``token_budget``)
    the rows are packed (:func:`pack_by_tokens`) into rows as wide as the longest of them, so attention never
    spans more than an unpacked row would, and each micro-batch takes as many packed rows as fit in
    ``token_budget``: the dict then also holds ``packed`` (the model's input, ``segment_ids`` marking the
    samples) while the per-token tensors keep the ``[b, width]`` layout that the loss reads.

    Rows of one group (same prompt) share their images: each micro-batch carries the pixels of every
    distinct image once, and ``image_index`` maps each image slot (in row order) to one of them, so the
    vision tower runs once per prompt, not once per sample. Each micro-batch is trimmed to its longest row,
    unless ``fixed_shape`` (pipeline parallelism: every micro-batch must have the shape the schedule's p2p
    buffers expect): then all keep the batch's full width and ``len(rows)`` must be a multiple of ``micro_size``.
    """
    if fixed_shape and token_budget > 0:
        raise ValueError("token-budget micro-batches have varying shapes; pipeline parallelism needs fixed ones")
    if pack and token_budget <= 0:
        raise ValueError("sequence packing needs a token budget (tokens per micro-batch of packed rows)")
    if fixed_shape and len(rows) % micro_size:
        raise ValueError(f"pipeline parallelism needs equal micro-batches: {len(rows)} rows per rank are not a multiple of "
                         f"optim.micro_batch_size={micro_size}")
    patches = (batch.image_grid_thw.prod(-1)).tolist() if batch.image_grid_thw.numel() else []
    imgs_per_row = _images_per_row(batch)
    img_start = [0]
    for n in imgs_per_row:
        img_start.append(img_start[-1] + n)
    patch_start = [0]
    for p in patches:
        patch_start.append(patch_start[-1] + p)
    group = batch.group_index.tolist() if getattr(batch, "group_index", None) is not None else list(range(len(imgs_per_row)))
    row_lens = batch.attention_mask.sum(-1).tolist()
    chunk_bins: list[list[list[int]]] = []  # with packing: each chunk's packed rows (as row lists)
    if pack:
        pack_width = int(max(row_lens[r] for r in rows))
        bins = pack_by_tokens(rows, row_lens, pack_width)
        per_micro = max(1, token_budget // pack_width)
        chunk_bins = [bins[i:i + per_micro] for i in range(0, len(bins), per_micro)]
        chunks = [[r for b in cb for r in b] for cb in chunk_bins]
    elif token_budget > 0:
        chunks = split_by_tokens(rows, row_lens, token_budget)
    else:
        chunks = [rows[i:i + micro_size] for i in range(0, len(rows), micro_size)]
    out = []
    for c, sel in enumerate(chunks):
        idx = torch.tensor(sel)
        width = batch.input_ids.shape[1] if fixed_shape else int(batch.attention_mask[idx].sum(-1).max().item())
        labels = batch.labels[idx, :width].clone()
        labels[batch.label_mask[idx, :width] == 0] = IGNORE_INDEX
        distinct: dict[tuple[int, int], int] = {}  # (group, k-th image of the row) -> position among distinct images
        first_img: list[int] = []  # global image id of each distinct image
        slot_index: list[int] = []
        for r in sel:
            for k in range(imgs_per_row[r]):
                key = (group[r], k)
                if key not in distinct:
                    distinct[key] = len(first_img)
                    first_img.append(img_start[r] + k)
                slot_index.append(distinct[key])

        def pix(source: torch.Tensor, images: list[int] = first_img) -> torch.Tensor:
            return torch.cat([source[patch_start[j]:patch_start[j + 1]] for j in images])

        mb: dict[str, Any] = {
            "input_ids": batch.input_ids[idx, :width], "attention_mask": batch.attention_mask[idx, :width],
            "labels": labels, "rows": sel,
            "image_grid_thw": batch.image_grid_thw[first_img] if first_img else None,
            "pixel_values": pix(batch.pixel_values) if first_img else None,
            "image_index": torch.tensor(slot_index, dtype=torch.long) if first_img else None,
        }
        if with_aug and batch.pixel_values_aug is not None and first_img:
            mb["pixel_values_aug"] = pix(batch.pixel_values_aug)
        if pack:
            mb["packed"] = _packed_layout([[int(row_lens[r]) for r in b] for b in chunk_bins[c]], width, pack_width,
                                          mb["input_ids"], labels)
        for key, val in (extra or {}).items():
            mb[key] = val[idx] if val.dim() == 1 else val[idx, :width]
        out.append(mb)
    return out


def gather_token_stats(results: list[dict[str, torch.Tensor]], micro_batches: list[dict[str, Any]],
                       shape: torch.Size, key: str = "logprob") -> Optional[torch.Tensor]:
    """The per-token ``key`` of every micro-batch's rows in one host tensor ``shape`` (``[B, S]``, zeros on
    rows this rank does not hold and past each micro-batch's width); None when there are no results (not the
    last pipeline stage)."""
    if not results:
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for mb, r in zip(micro_batches, results):
        v = r[key]
        out[mb["rows"], : v.shape[1]] = v
    return out


def _images_per_row(batch: RolloutBatch) -> list[int]:
    """Images of each row, read from the image-pad runs is unnecessary: rows carry equal grids per group."""
    counts = getattr(batch, "images_per_row", None)
    if counts is not None:
        return list(counts)
    n_rows = batch.input_ids.shape[0]
    n_img = batch.image_grid_thw.shape[0] if batch.image_grid_thw.numel() else 0
    if n_img % max(n_rows, 1):
        raise ValueError("make_micro_batches: set batch.images_per_row when rows have different image counts")
    return [n_img // n_rows] * n_rows


BANNED_LOGIT = -1.0e30  # finite: exp() underflows to exactly 0 and 0 * u stays 0 in entropy/KL sums


def ban_logits_(logits: torch.Tensor, banned_ids: list[int], tp_rank: int) -> torch.Tensor:
    """Set this rank's vocab-shard columns of ``banned_ids`` to a huge negative value, in place.

    The rollout engine samples with the same ids banned (``rollout.tokens.banned_token_ids``), so the
    trainer's log-softmax must exclude them too or its log-probs differ from the engine's. In place
    and safe for autograd: the output layer saves its input and weight, not its output.
    """
    if not banned_ids:
        return logits
    v_local = logits.shape[-1]
    lo = tp_rank * v_local
    local = [i - lo for i in banned_ids if lo <= i < lo + v_local]
    if local:
        logits.index_fill_(-1, torch.tensor(local, device=logits.device), BANNED_LOGIT)
    return logits


class PolicyModel:
    """One Qwen2.5-VL pipeline stage (TP-sharded) loaded from an HF dir; trainable (actor) or frozen (reference)."""

    def __init__(self, model_cfg: Any, groups: ParallelGroups, hf_dir: str, *, sequence_parallel: bool = False,
                 trainable: bool, optim: Optional[OptimSettings] = None, banned_ids: Optional[list[int]] = None) -> None:
        self.groups = groups
        self.banned_ids = list(banned_ids or [])
        self.chunk_size = getattr(model_cfg, "logits_chunk_size", 0) or None  # loss-kernel token blocks (None = all)
        model = build_model(model_cfg, groups, hf_dir=hf_dir, sequence_parallel=sequence_parallel)
        load_hf_into_mcore([model], hf_dir, groups)
        self.trainable = trainable
        if trainable:
            assert optim is not None
            self.chunks = wrap_ddp([model], groups, use_distributed_optimizer=optim.use_distributed_optimizer)
            self.optimizer = build_optimizer(self.chunks, optim, groups)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            self.chunks = [model]
            self.optimizer = None
        self.config = model.config
        #: sequence-length multiple of the model (see ``seq_len_multiple``); batches padded to it keep pipeline
        #: shapes fixed (the model pads trimmed micro-batches itself and cuts the logits back)
        self.seq_multiple = model.seq_multiple

    def move_to(self, device: torch.device) -> None:
        """Move a frozen model's parameters and buffers (reference offload between its passes); the actor's
        DDP gradient buffers pin it to its device, so only frozen models move."""
        if self.trainable:
            raise RuntimeError("only a frozen (reference) model can be offloaded; the actor's DDP buffers stay put")
        for c in self.chunks:
            c.to(device)

    def load_weights(self, ckpt: str) -> str:
        """Collective: overwrite the weights with a dist-checkpoint's model tensors (any saved TP/PP; names with or
        without DDP's ``module.`` prefix); the optimizer's main params follow. Returns the checkpoint dir used."""
        from megatron_papo.checkpoint.convert import as_saved, resolve_checkpoint
        from megatron_papo.checkpoint.dist import load_checkpoint

        path = resolve_checkpoint(ckpt)
        load_checkpoint(path, [as_saved(m, path) for m in self.modules], optimizer=None, load_rng=False)
        if self.optimizer is not None and hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()
        return str(path)

    @property
    def modules(self) -> list[torch.nn.Module]:
        """The unwrapped model chunks (for export / checkpoint naming)."""
        return [getattr(c, "module", c) for c in self.chunks]

    # ------------------------------------------------------------------ forward-only stats
    @torch.no_grad()
    def token_stats(self, micro_batches: list[dict[str, Any]], req: StatsRequest, temperature: float) -> list[dict[str, torch.Tensor]]:
        """Per-token log-probs (and entropies) of each micro-batch, on the last stage ([] elsewhere)."""
        tp_group = self.groups.tp_group

        def loss_fn(mb: dict[str, Any], logits: torch.Tensor):
            ban_logits_(logits, self.banned_ids, self.groups.tp_rank)
            st = _unpacked(mb, token_stats(logits, _fwd_labels(mb), tp_group, temperature=temperature, entropy=req.entropy,
                                           chunk_size=self.chunk_size))
            out = {"logprob": st.logprob}
            if req.entropy:
                out["entropy"] = st.entropy
            return torch.zeros((), device=logits.device), out

        def fwd(data_it, model):
            mb = next(data_it)
            inputs = _model_inputs(mb)
            if req.view == "aug":
                inputs["pixel_values"] = mb["pixel_values_aug"]
            return forward_logits(model, inputs), lambda logits: loss_fn(mb, logits)

        for c in self.chunks:
            c.eval()
        res = forward_backward(self.chunks, fwd, self._on_device(micro_batches), len(micro_batches), self.groups,
                               seq_length=_max_len(micro_batches), micro_batch_size=_max_rows(micro_batches),
                               forward_only=True)
        return to_host(res) if self.groups.is_last_stage else []

    def _on_device(self, micro_batches: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The schedule's data iterator: each host micro-batch moved to the model's device as it is consumed
        (the one host-to-device move of the training data; one micro-batch on the device at a time)."""
        return (to_device(mb, self.groups.device) for mb in micro_batches)

    # ------------------------------------------------------------------ update
    def train_mini_batch(self, micro_batches: list[dict[str, Any]], spec: LossSpec, *, temperature: float,
                         global_tokens: float, global_seqs: float, paired: bool, want_exact: bool,
                         global_micro: Optional[int] = None) -> dict[str, float]:
        """Forward-backward over the micro-batches, one optimizer step; returns mini-batch metrics (rank 0).
        ``global_micro``: micro-batches of this mini-batch summed over DP (default: this rank's count x DP size,
        right when every rank runs the same count)."""
        assert self.trainable and self.optimizer is not None
        groups, tp_group = self.groups, self.groups.tp_group
        n_micro = len(micro_batches)
        n_global = global_micro if global_micro is not None else n_micro * groups.dp_size
        live = spec.aug_mode == "live"

        def loss_fn(mb: dict[str, Any], logits: torch.Tensor):
            ban_logits_(logits, self.banned_ids, self.groups.tp_rank)
            labels = mb["labels"]
            mask = (labels != IGNORE_INDEX).long()
            fwd_labels = _fwd_labels(mb)
            if paired:
                B = fwd_labels.shape[0]
                ori, aug = logits[:B], logits[B:]
                st = _unpacked(mb, token_stats(ori, fwd_labels, tp_group, ref_logits=aug if live else aug.detach(),
                                               temperature=temperature, entropy=want_exact, ref_entropy=want_exact,
                                               kl=spec.kl_prcp_estimator == "exact", ref_requires_grad=live,
                                               chunk_size=self.chunk_size))
                aug_lp, aug_ent, kl = st.ref_logprob, st.ref_entropy, st.kl
            else:
                st = _unpacked(mb, token_stats(logits, fwd_labels, tp_group, temperature=temperature, entropy=want_exact,
                                               chunk_size=self.chunk_size))
                aug_lp, aug_ent, kl = mb.get("aug_logprob"), None, None
            inputs = LossInputs(
                logprob=st.logprob, old_logprob=mb["old_logprob"], advantages=mb["advantages"], response_mask=mask,
                ref_logprob=mb.get("ref_logprob"), aug_logprob=aug_lp, entropy=st.entropy, aug_entropy=aug_ent, kl_exact=kl,
                rollout_logprob=mb.get("rollout_logprob"))
            loss, metrics = papo_loss(inputs, spec, global_tokens=global_tokens, global_seqs=global_seqs,
                                      num_microbatches=n_global)
            # mcore divides by the number of micro-batches and DDP averages over DP; papo_loss already gives this
            # micro-batch's additive share of the mini-batch objective, so undo both.
            scaled = loss * (n_micro * groups.dp_size)
            return scaled, {k: v.detach() for k, v in metrics.items()}

        def fwd(data_it, model):
            mb = next(data_it)
            inputs = _model_inputs(mb)
            if paired:
                inputs = _pair_views(inputs)
            return forward_logits(model, inputs), lambda logits: loss_fn(mb, logits)

        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        width = _max_len(micro_batches)
        rows = _max_rows(micro_batches) * (2 if paired else 1)
        res = forward_backward(self.chunks, fwd, self._on_device(micro_batches), n_micro, groups, seq_length=width,
                               micro_batch_size=rows)
        metrics = _sum_metrics(res) if groups.is_last_stage else {}
        # non-finite loss or grad norm: skip the update (all ranks agree), counted by the trainer
        updated, grad_norm = guarded_step(self.optimizer, loss=metrics.get("loss/total"), device=groups.device)
        metrics = self._reduce_metrics(metrics)
        metrics["grad_norm"] = grad_norm
        metrics["update_skipped"] = 0.0 if updated else 1.0
        return metrics

    def _reduce_metrics(self, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
        """SUM over DP on the last stage, then hand the result to global rank 0 (first stage)."""
        g = self.groups
        if g.is_last_stage and metrics:
            keys = sorted(metrics)
            vec = torch.stack([metrics[k].float().reshape(()) for k in keys])
            if g.dp_size > 1:
                dist.all_reduce(vec, group=g.dp_group)
            out = dict(zip(keys, vec.tolist()))
        else:
            out = {}
        if g.pp_size > 1:
            obj = [out]
            src = g.pp_stage_ranks()[-1]
            dist.broadcast_object_list(obj, src=src, group=g.pp_group)
            out = obj[0]
        return out


def _model_inputs(mb: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs for a micro-batch: its padded rows, or its packed row when it has one."""
    inputs = dict(mb)
    if "packed" in mb:
        inputs.update(input_ids=mb["packed"]["input_ids"], segment_ids=mb["packed"]["segment_ids"], attention_mask=None)
    return inputs


def _fwd_labels(mb: dict[str, Any]) -> torch.Tensor:
    """Labels in the layout the model ran on (packed row or padded rows)."""
    return mb["packed"]["labels"] if "packed" in mb else mb["labels"]


def _unpacked(mb: dict[str, Any], st: TokenStats) -> TokenStats:
    """``token_stats`` results of a packed row moved to the micro-batch's ``[b, width]`` layout."""
    if "packed" not in mb:
        return st
    layout = mb["packed"]
    return TokenStats(**{f.name: None if getattr(st, f.name) is None else unpack_tokens(getattr(st, f.name), layout)
                         for f in fields(TokenStats)})


def _pair_views(mb: dict[str, Any]) -> dict[str, Any]:
    """Original and masked views of a micro-batch's model inputs as one doubled batch (one forward for both)."""
    cat = lambda a: torch.cat([a, a]) if a is not None else None  # noqa: E731
    has_img = mb.get("pixel_values") is not None
    n_distinct = mb["image_grid_thw"].shape[0] if has_img else 0
    return {
        "input_ids": cat(mb["input_ids"]), "attention_mask": cat(mb.get("attention_mask")),
        "segment_ids": cat(mb.get("segment_ids")), "image_grid_thw": cat(mb["image_grid_thw"]),
        "pixel_values": torch.cat([mb["pixel_values"], mb["pixel_values_aug"]]) if has_img else None,
        "image_index": torch.cat([mb["image_index"], mb["image_index"] + n_distinct]) if has_img else None,
    }




def _sum_metrics(results: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for r in results:
        for k, v in r.items():
            out[k] = out.get(k, 0) + v
    return out


def _max_len(mbs: list[dict[str, Any]]) -> int:
    return max(int(_model_inputs(mb)["input_ids"].shape[1]) for mb in mbs)


def _max_rows(mbs: list[dict[str, Any]]) -> int:
    return max(int(_model_inputs(mb)["input_ids"].shape[0]) for mb in mbs)
