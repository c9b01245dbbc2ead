"""Qwen2.5-VL on Megatron-Core: vision tower (first pipeline stage) + M-RoPE ``GPTModel`` language model.

``Qwen25VLModel.forward(input_ids, attention_mask, position_ids, pixel_values, image_grid_thw)``
returns **vocab-parallel** logits ``[B, S, V/tp]`` on the last pipeline stage (never gathered over
the vocabulary) and the hidden states ``[S, B, H]`` to send on other stages. On the first stage the
image features are scattered into the ``<|image_pad|>`` positions (row-major over the batch, like
transformers). Padded batches: ``attention_mask`` ``[B, S]`` (1 = token, 0 = pad, anywhere in the
row) becomes a causal+padding mask; M-RoPE positions skip the padding (with Transformer Engine
layers, GPU only: right padding only, plain causal attention). The sequence is right-padded inside
the forward to :func:`seq_len_multiple` (TP under sequence parallelism, x16 with FP8) and the logits
are cut back, so the padding never reaches the loss.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_papo.models.qwen2_5_vl.config import QwenVLArch
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index, get_rope_index_packed


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """mcore attention mask ``[B, 1, S, S]`` (True = masked) for packed rows: causal within each segment (> 0)."""
    S = segment_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = causal[None] & same & (segment_ids[:, None, :] > 0)
    return (~allowed).unsqueeze(1)


def causal_padding_mask(attention_mask: Optional[torch.Tensor], seq_len: int) -> Optional[torch.Tensor]:
    """mcore attention mask ``[B, 1, S, S]`` (True = masked) from a ``[B, S]`` keep-mask; None if nothing is padded."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    keep = attention_mask.bool()
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=keep.device).tril()
    allowed = causal[None] & keep[:, None, :]
    return (~allowed).unsqueeze(1)


def seq_len_multiple(tp: int, sequence_parallel: bool, fp8: bool) -> int:
    """The multiple the language model's sequence length is padded to inside :meth:`Qwen25VLModel.forward`.

    Sequence parallelism splits the sequence over TP ranks (a multiple of TP). Transformer Engine's FP8 GEMMs
    need the product of the leading dims divisible by 8 and the last dim by 16; 16 tokens per sequence (per TP
    shard under SP, where the FP8 cast runs on the local shard) keeps every such product aligned for any batch.
    """
    m = tp if sequence_parallel and tp > 1 else 1
    return m * 16 if fp8 else m


class Qwen25VLModel(torch.nn.Module):
    """Qwen2.5-VL as one pipeline stage (``pre_process``: embeddings + vision; ``post_process``: head)."""

    def __init__(self, arch: QwenVLArch, lm_config: Any, vision_config: Any, lm_spec: Any, vision_spec: Any, *,
                 pre_process: bool, post_process: bool, pg_collection: Any, freeze_vision_tower: bool = False) -> None:
        super().__init__()
        from megatron.core.models.gpt.gpt_model import GPTModel

        from megatron_papo.models.qwen2_5_vl.vision import Qwen25VisionModel

        self.arch = arch
        self.config = lm_config
        self.pre_process = pre_process
        self.post_process = post_process
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.vision = None
        if pre_process:
            self.vision = Qwen25VisionModel(vision_config, arch.vision, arch.hidden_size, vision_spec, pg_collection)
            if freeze_vision_tower:
                for p in self.vision.parameters():
                    p.requires_grad_(False)
        self.language_model = GPTModel(
            config=lm_config, transformer_layer_spec=lm_spec, vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings, pre_process=pre_process, post_process=post_process,
            parallel_output=True, share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=arch.rope_theta, scatter_embedding_sequence_parallel=False,
            pg_collection=pg_collection,
        )
        self.model_type = self.language_model.model_type
        #: the LM pads the sequence to this multiple (right padding, cut from the logits: invisible to the loss)
        self.seq_multiple = seq_len_multiple(self.tp_group.size() if self.tp_group is not None else 1,
                                             bool(lm_config.sequence_parallel), getattr(lm_config, "fp8", None) is not None)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None) -> dict:
        """mcore dist-checkpoint view of this stage: TP-sharded layers as shards, replicated tensors once per TP group.

        The language model is an mcore ``GPTModel`` (its own layer offsets and tied-embedding handling); the
        vision tower's transformer layers are mcore layers, and its plain torch modules (patch embedding, merger
        norm and linears) are declared with the TP group so replicas are not written twice.
        """
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, sharded_state_dict_default

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = dict(self.language_model.sharded_state_dict(prefix=f"{prefix}language_model.", metadata=metadata))
        if self.vision is not None:
            v = self.vision
            out.update(sharded_state_dict_default(v.patch_embed, f"{prefix}vision.patch_embed.", (), metadata,
                                                  tp_group=self.tp_group))
            for i, layer in enumerate(v.layers):
                out.update(layer.sharded_state_dict(prefix=f"{prefix}vision.layers.{i}.", metadata=metadata))
            for name in ("ln_q", "linear_fc1", "linear_fc2"):
                out.update(sharded_state_dict_default(getattr(v.merger, name), f"{prefix}vision.merger.{name}.", (), metadata,
                                                      tp_group=self.tp_group))
        return out

    # --- pipeline plumbing (mcore schedules call these) ---
    def set_input_tensor(self, input_tensor: Any) -> None:
        """Receive the previous stage's activations (mcore pipeline schedules)."""
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        """The tied embedding / output weight (mcore's finalize_model_grads looks for it)."""
        return self.language_model.shared_embedding_or_output_weight()

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Whether input embedding and LM head are tied."""
        return self.language_model.share_embeddings_and_output_weights

    def position_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                     image_grid_thw: Optional[torch.Tensor]) -> torch.Tensor:
        """M-RoPE position ids ``[3, B, S]`` as transformers computes them."""
        return get_rope_index(input_ids, image_token_id=self.arch.image_token_id,
                              video_token_id=self.arch.video_token_id,
                              spatial_merge_size=self.arch.vision.spatial_merge_size,
                              tokens_per_second=self.arch.vision.tokens_per_second, image_grid_thw=image_grid_thw,
                              attention_mask=attention_mask)[0]

    def _embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
               image_grid_thw: Optional[torch.Tensor], image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        image_mask = input_ids == self.arch.image_token_id
        if pixel_values is None or image_grid_thw is None or image_grid_thw.numel() == 0:
            if bool(image_mask.any()):
                raise ValueError(f"{int(image_mask.sum())} <|image_pad|> tokens but no pixel_values/image_grid_thw")
            return emb
        feats = self.vision(pixel_values, image_grid_thw).to(emb.dtype)
        if image_index is not None:  # features of each distinct image once, then one copy per image slot
            merge = self.arch.vision.spatial_merge_size ** 2
            per_image = list(torch.split(feats, (image_grid_thw.prod(-1) // merge).tolist()))
            feats = torch.cat([per_image[i] for i in image_index.tolist()])
        if feats.shape[0] != int(image_mask.sum()):
            raise ValueError(f"image features and image tokens do not match: {feats.shape[0]} features, "
                             f"{int(image_mask.sum())} <|image_pad|> tokens")
        emb = emb.transpose(0, 1).masked_scatter(image_mask.unsqueeze(-1), feats)
        return emb.transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, image_index: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[B, S, V/tp]`` (last stage) or hidden states ``[S(/tp), B, H]`` (other stages).

        Args:
            input_ids: ``[B, S]`` (needed on every stage: position ids and the padding mask come from it).
            attention_mask: ``[B, S]`` 1 = token, 0 = padding; None = no padding.
            position_ids: ``[3, B, S]`` M-RoPE positions; computed from the inputs when None.
            pixel_values: ``[n_patches, 3*2*14*14]`` (processor output), first stage only.
            image_grid_thw: ``[n_images, 3]``.
            image_index: optional ``[n_image_slots]``: the image (row of ``image_grid_thw``, patches in
                ``pixel_values``) each image slot of the batch shows, in slot order. Rows that repeat a prompt
                (a GRPO group) then run the vision tower once per distinct image. None: one image per slot.
            segment_ids: ``[B, S]`` packed sequences (local layers): 0 = padding, k > 0 = k-th sample of the row;
                attention is causal within a segment and M-RoPE positions restart per segment
                (``attention_mask`` is then ignored).
        """
        from megatron.core import tensor_parallel

        B, S = input_ids.shape
        slot_grid = image_grid_thw if image_index is None or image_grid_thw is None else image_grid_thw[image_index]
        if segment_ids is not None:
            if getattr(self.config, "transformer_impl", "local") != "local":
                raise ValueError("packed sequences (segment_ids) need model.transformer_impl=local")
            attention_mask = (segment_ids > 0).long()
            if position_ids is None:
                position_ids = get_rope_index_packed(input_ids, segment_ids, image_token_id=self.arch.image_token_id,
                                                     spatial_merge_size=self.arch.vision.spatial_merge_size,
                                                     image_grid_thw=slot_grid)
        if position_ids is None:
            position_ids = self.position_ids(input_ids, attention_mask, slot_grid)
        pad = (-S) % self.seq_multiple  # SP splits the sequence over TP; FP8 GEMMs need aligned token counts
        if pad:
            input_ids = torch.nn.functional.pad(input_ids, (0, pad), value=0)
            position_ids = torch.nn.functional.pad(position_ids, (0, pad), value=0)
            keep = attention_mask if attention_mask is not None else torch.ones(B, S, dtype=torch.long,
                                                                                device=input_ids.device)
            attention_mask = torch.nn.functional.pad(keep, (0, pad), value=0)
            if segment_ids is not None:
                segment_ids = torch.nn.functional.pad(segment_ids, (0, pad), value=0)
        if getattr(self.config, "transformer_impl", "local") == "transformer_engine":
            mask = None  # TE's causal attention takes no padding mask: right padding only (exact for real tokens)
            if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
                raise ValueError("model.transformer_impl=transformer_engine supports right-padded batches only "
                                 "(a padding token precedes a real token); pad on the right")
        elif segment_ids is not None:
            mask = segment_causal_mask(segment_ids)
        else:
            mask = causal_padding_mask(attention_mask, S + pad)
        decoder_input = None
        if self.pre_process:
            decoder_input = self._embed(input_ids, pixel_values, image_grid_thw, image_index)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input, group=self.tp_group)
        out = self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                                  decoder_input=decoder_input)
        if self.post_process and pad:
            out = out[:, :S]
        return out
