"""MegatronBertModel: embeddings -> (drop padding once) -> N pre-LN layers -> final LayerNorm -> pooler.

The forward pass decides once how attention runs (see :class:`AttentionPlan`):

- ``eager`` when attention weights, a head mask or relative positions are asked for;
- ``varlen`` (unpadded) when the batch has padding and ``config.unpad_inputs`` is on (None:
  in eval mode only): pad
  tokens are dropped after the embeddings, every Linear/LayerNorm/MLP runs on real tokens
  only, and the padding is put back once at the end (outputs at pad positions are zero);
- ``sdpa`` otherwise (PyTorch's fused attention), which gives the reference's values at
  every position, pad positions included.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megabert.config import MegatronBertConfig
from megabert.modeling.attention import AttentionPlan, additive_mask_from, varlen_plan
from megabert.modeling.inputs import check_head_mask, check_model_inputs
from megabert.modeling.layers import MegatronBertEmbeddings, MegatronBertLayer, MegatronBertPooler
from megabert.modeling.outputs import BaseModelOutputWithPoolingAndCrossAttentions
from megabert.modeling.pretrained import MegatronBertPreTrainedModel


class MegatronBertEncoder(nn.Module):
    """The stack of layers and the final LayerNorm."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([MegatronBertLayer(config) for _ in range(config.num_hidden_layers)])
        # MegatronBERT: one LayerNorm after the last layer (BERT has none; it normalises per layer).
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        plan: AttentionPlan,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_plan: AttentionPlan | None = None,
        past_key_values: tuple[tuple[torch.Tensor, ...], ...] | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None, tuple | None, tuple | None]:
        """Returns (hidden, hidden states per layer, self weights, cross weights, cache)."""
        all_hidden: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        all_self: tuple[torch.Tensor, ...] | None = () if output_attentions else None
        all_cross: tuple[torch.Tensor, ...] | None = (
            () if output_attentions and encoder_hidden_states is not None else None
        )
        cache: tuple[tuple[torch.Tensor, ...], ...] | None = () if use_cache else None
        for index, layer in enumerate(self.layer):
            if all_hidden is not None:
                all_hidden = all_hidden + (hidden_states,)
            layer_head_mask = head_mask[index] if head_mask is not None else None
            past = past_key_values[index] if past_key_values is not None else None
            args = (hidden_states, plan, layer_head_mask, encoder_hidden_states, encoder_plan, past, output_attentions)
            if self.gradient_checkpointing and self.training:
                hidden_states, self_w, cross_w, present = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden_states, self_w, cross_w, present = layer(*args)
            if cache is not None:
                cache = cache + (present,)
            if all_self is not None:
                all_self = all_self + (self_w,)
                if all_cross is not None:
                    all_cross = all_cross + (cross_w,)
        hidden_states = self.ln(hidden_states)
        if all_hidden is not None:
            all_hidden = all_hidden + (hidden_states,)
        return hidden_states, all_hidden, all_self, all_cross, cache


def _expand_head_mask(head_mask: torch.Tensor, num_layers: int, dtype: torch.dtype) -> torch.Tensor:
    """(heads,) or (layers, heads) -> (layers, 1, heads, 1, 1), broadcastable onto the weights.

    A 5-D mask is already expanded (its shape was checked by ``check_head_mask``).
    """
    if head_mask.dim() == 5:
        return head_mask.to(dtype)
    if head_mask.dim() == 1:
        head_mask = head_mask.unsqueeze(0).expand(num_layers, -1)
    return head_mask[:, None, :, None, None].to(dtype)


class MegatronBertModel(MegatronBertPreTrainedModel):
    """The bare MegatronBERT encoder: last hidden state and (optionally) the pooled first token."""

    def __init__(self, config: MegatronBertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.embeddings = MegatronBertEmbeddings(config)
        self.encoder = MegatronBertEncoder(config)
        self.pooler = MegatronBertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    # ------------------------------------------------------------------ masks
    def _decoder_mask(
        self, attention_mask: torch.Tensor, seq_len: int, past_len: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Causal mask combined with the padding mask: (batch, 1, seq, past + seq), additive."""
        device = attention_mask.device
        positions = torch.arange(seq_len, device=device)
        causal = positions[None, :] <= positions[:, None]  # (seq, seq)
        if past_len > 0:
            causal = torch.cat([torch.ones(seq_len, past_len, dtype=torch.bool, device=device), causal], dim=1)
        keep = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()
        return additive_mask_from(keep, dtype)

    def _attention_plan(
        self,
        attention_mask: torch.Tensor | None,
        batch: int,
        seq_len: int,
        past_len: int,
        need_eager: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> AttentionPlan:
        mode = "eager" if need_eager else "sdpa"
        if self.config.is_decoder:
            if attention_mask is None:
                attention_mask = torch.ones(batch, past_len + seq_len, device=device)
            return AttentionPlan(mode, self._decoder_mask(attention_mask, seq_len, past_len, dtype))
        if attention_mask is None:
            return AttentionPlan(mode)
        if torch.compiler.is_compiling():
            # No data-dependent branches while tracing: always take the masked padded path.
            return AttentionPlan(mode, additive_mask_from(attention_mask[:, None, None, :], dtype))
        keep = attention_mask.bool()
        if bool(keep.all()):
            return AttentionPlan(mode)
        lengths = keep.sum(dim=1)
        if self.config.unpads(self.training) and not need_eager and bool((lengths > 0).all()):
            return varlen_plan(keep, lengths)
        return AttentionPlan(mode, additive_mask_from(attention_mask[:, None, None, :], dtype))

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: tuple[tuple[torch.Tensor, ...], ...] | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple:
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = config.return_dict if return_dict is None else return_dict
        use_cache = (config.use_cache if use_cache is None else use_cache) if config.is_decoder else False
        if self.encoder.gradient_checkpointing and self.training:
            use_cache = False

        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        batch, seq_len = check_model_inputs(
            config, input_ids, inputs_embeds, attention_mask, token_type_ids, position_ids, past_len
        )
        check_head_mask(config, head_mask, batch, seq_len, past_len + seq_len)
        device = input_ids.device if input_ids is not None else inputs_embeds.device  # type: ignore[union-attr]
        dtype = self.dtype

        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=device).expand(batch, -1)

        need_eager = (
            output_attentions
            or head_mask is not None
            or config.attn_implementation == "eager"
            or config.position_embedding_type != "absolute"
        )
        plan = self._attention_plan(attention_mask, batch, seq_len, past_len, need_eager, device, dtype)

        encoder_plan = None
        if config.is_decoder and encoder_hidden_states is not None:
            enc_mask = encoder_attention_mask
            if enc_mask is None:
                enc_mask = torch.ones(encoder_hidden_states.shape[:2], device=device)
            encoder_plan = AttentionPlan(plan.mode if plan.mode != "varlen" else "sdpa",
                                         additive_mask_from(enc_mask[:, None, None, :], dtype))

        if head_mask is not None:
            head_mask = _expand_head_mask(head_mask, config.num_hidden_layers, dtype)

        if plan.mode == "varlen":
            # Drop the padding once: every layer below sees (total_tokens, hidden), longest sequence first.
            token_index = plan.token_index  # (total_tokens,) positions in the flattened (batch * seq) input
            assert token_index is not None
            packed_embeds = None
            if inputs_embeds is not None:
                packed_embeds = inputs_embeds.reshape(batch * seq_len, -1)[token_index]
            embeddings = self.embeddings(
                input_ids.reshape(-1)[token_index] if input_ids is not None else None,
                token_type_ids.reshape(-1)[token_index],
                position_ids.expand(batch, -1).reshape(-1)[token_index],
                packed_embeds,
            )
        else:
            embeddings = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)

        sequence_output, all_hidden, all_self, all_cross, cache = self.encoder(
            embeddings,
            plan,
            head_mask,
            encoder_hidden_states,
            encoder_plan,
            past_key_values,
            use_cache,
            output_attentions,
            output_hidden_states,
        )

        if plan.mode == "varlen":
            # Put the padding back once: (total_tokens, hidden) -> (batch, seq, hidden), zeros at pads.
            def restore(packed: torch.Tensor) -> torch.Tensor:
                full = packed.new_zeros(batch * seq_len, packed.shape[-1])
                return full.index_copy(0, token_index, packed).view(batch, seq_len, -1)

            sequence_output = restore(sequence_output)
            if all_hidden is not None:
                all_hidden = tuple(restore(h) for h in all_hidden)

        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None

        if not return_dict:
            extras = tuple(v for v in (cache, all_hidden, all_self, all_cross) if v is not None)
            return (sequence_output, pooled_output) + extras
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=all_hidden,
            past_key_values=cache,
            attentions=all_self,
            cross_attentions=all_cross,
        )
