"""The building blocks of MegatronBERT: embeddings, attention, MLP, the pre-LN layer, the pooler.

Module and parameter names follow `transformers` (``attention.self.query``, ``attention.ln``,
``ln``, ``intermediate.dense``, ``output.dense``...) so state dicts interchange byte for byte.
Every block works on padded activations (batch, seq, hidden) and on packed ones
(total_tokens, hidden): the attention plan says which.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megabert.config import MegatronBertConfig
from megabert.errors import UserError
from megabert.modeling.attention import AttentionPlan, eager_attention, sdpa_attention, varlen_attention


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _gelu_erf_python(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": _gelu_erf_python,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}

# One cached key/value pair per attention block: (batch, heads, seq, head_dim) each.
KeyValue = tuple[torch.Tensor, torch.Tensor]


class MegatronBertEmbeddings(nn.Module):
    """word + position + token type embeddings, then dropout.

    Unlike BERT there is no LayerNorm here: MegatronBERT normalises inside each layer instead.
    """

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.use_absolute_positions = config.position_embedding_type == "absolute"

    def forward(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor,
        position_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Ids of any shape (*) -> embeddings (*, hidden)."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        if self.use_absolute_positions:
            embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(embeddings)


class MegatronBertSelfAttention(nn.Module):
    """Q, K and V projections (separate Linears, as in the HF layout) and the attention itself."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # The original numbers of the heads this block still has (prune_heads removes some).
        self.kept_heads: tuple[int, ...] = tuple(range(config.num_attention_heads))
        inner = self.num_heads * self.head_dim
        self.query = nn.Linear(config.hidden_size, inner)
        self.key = nn.Linear(config.hidden_size, inner)
        self.value = nn.Linear(config.hidden_size, inner)
        self.attention_dropout = nn.Dropout(config.attention_probs_dropout_prob)  # on the attention weights
        self.position_embedding_type = config.position_embedding_type
        self.max_position_embeddings = config.max_position_embeddings
        if self.position_embedding_type != "absolute":
            self.distance_embedding = nn.Embedding(2 * config.max_position_embeddings - 1, self.head_dim)
        self.is_decoder = config.is_decoder

    def _project_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (..., 3, heads, dim): queries, keys and values side by side."""
        qkv = torch.cat([self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)], dim=-1)
        return qkv.view(*qkv.shape[:-1], 3, -1, self.head_dim)

    def _mask_of_kept_heads(self, head_mask: torch.Tensor | None) -> torch.Tensor | None:
        """A layer's head mask (1 or batch, original heads, ...) cut to the heads this block kept.

        head_mask is given per original head (config.num_attention_heads wide), whatever was
        pruned, so the same mask means the same heads before and after pruning; the entries of
        pruned heads are dropped.
        """
        if head_mask is None or head_mask.shape[-3] == self.num_heads:
            return head_mask
        index = torch.tensor(self.kept_heads, dtype=torch.long, device=head_mask.device)
        return head_mask.index_select(-3, index)

    @torch.no_grad()
    def prune(self, heads: set[int]) -> list[int]:
        """Remove the heads numbered ``heads`` (original numbers; ones already gone are skipped).

        Drops their rows of the Q, K and V projections; returns the indices of the features
        (columns of the attention output projection) that remain, for the caller to cut those.
        """
        if heads and set(self.kept_heads) <= set(heads):
            raise UserError(f"cannot prune every head of an attention block (it has heads {list(self.kept_heads)})")
        keep = [i for i, head in enumerate(self.kept_heads) if head not in heads]
        features = [i * self.head_dim + d for i in keep for d in range(self.head_dim)]
        if len(keep) == self.num_heads:
            return features
        self.query = keep_features(self.query, features, dim=0)
        self.key = keep_features(self.key, features, dim=0)
        self.value = keep_features(self.value, features, dim=0)
        self.kept_heads = tuple(self.kept_heads[i] for i in keep)
        self.num_heads = len(keep)
        return features

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, seq, heads * dim) -> (batch, heads, seq, dim)
        return x.view(*x.shape[:-1], -1, self.head_dim).transpose(-3, -2)

    def _relative_scores(
        self, query: torch.Tensor, key: torch.Tensor, cached: bool
    ) -> torch.Tensor:
        """Relative-position terms of the scores (added before scaling), as in the 4.37 reference."""
        q_len, k_len = query.shape[-2], key.shape[-2]
        device = query.device
        if cached:
            # With a KV cache the reference places the (single) new query at the last key position.
            left = torch.tensor([[k_len - 1]], dtype=torch.long, device=device)
        else:
            left = torch.arange(q_len, dtype=torch.long, device=device).view(-1, 1)
        right = torch.arange(k_len, dtype=torch.long, device=device).view(1, -1)
        distance = self.distance_embedding(left - right + self.max_position_embeddings - 1)
        distance = distance.to(query.dtype)  # (q_len, k_len, dim)
        scores = torch.einsum("bhld,lrd->bhlr", query, distance)
        if self.position_embedding_type == "relative_key_query":
            scores = scores + torch.einsum("bhrd,lrd->bhlr", key, distance)
        return scores

    def forward(
        self,
        hidden_states: torch.Tensor,
        plan: AttentionPlan,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        past_key_value: KeyValue | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KeyValue | None]:
        """Returns (context, attention weights or None, this block's key/value for the cache or None)."""
        head_mask = self._mask_of_kept_heads(head_mask)

        if plan.mode == "varlen":
            # packed (tokens, hidden) -> (tokens, 3, heads, dim) -> context (tokens, heads, dim)
            context = varlen_attention(self._project_qkv(hidden_states), plan, self._dropout_p(), self._sdpa)
            return context.reshape(hidden_states.shape[0], -1), None, None

        is_cross = encoder_hidden_states is not None
        if not is_cross and past_key_value is None:
            # (batch, seq, 3, heads, dim) -> three (batch, heads, seq, dim) views
            query, key, value = self._project_qkv(hidden_states).permute(2, 0, 3, 1, 4).unbind(0)
            present = (key, value) if self.is_decoder else None
            return self._attend(query, key, value, plan, head_mask, output_attentions, present, cached=False)

        query = self._split_heads(self.query(hidden_states))
        if is_cross and past_key_value is not None:
            key, value = past_key_value  # the encoder's keys/values do not change while decoding
        elif is_cross:
            key = self._split_heads(self.key(encoder_hidden_states))
            value = self._split_heads(self.value(encoder_hidden_states))
        else:
            key = self._split_heads(self.key(hidden_states))
            value = self._split_heads(self.value(hidden_states))
            if past_key_value is not None:
                key = torch.cat([past_key_value[0], key], dim=2)
                value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value) if self.is_decoder else None
        return self._attend(query, key, value, plan, head_mask, output_attentions, present, past_key_value is not None)

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        plan: AttentionPlan,
        head_mask: torch.Tensor | None,
        output_attentions: bool,
        present: KeyValue | None,
        cached: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KeyValue | None]:
        """Padded attention on (batch, heads, seq, dim); returns (batch, seq, hidden) context."""
        weights = None
        if plan.mode == "eager":
            score_bias = None
            if self.position_embedding_type != "absolute":
                score_bias = self._relative_scores(query, key, cached=cached)
            context, weights = self._eager(query, key, value, plan.additive_mask, head_mask, score_bias)
        else:
            context = self._sdpa(query, key, value, plan.additive_mask, self._dropout_p())
        # (batch, heads, seq, dim) -> (batch, seq, heads * dim)
        context = context.transpose(1, 2).reshape(*context.shape[:1], context.shape[2], -1)
        return context, (weights if output_attentions else None), present

    def _dropout_p(self) -> float:
        return self.attention_dropout.p if self.training else 0.0

    def _eager(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        additive_mask: torch.Tensor | None,
        head_mask: torch.Tensor | None = None,
        score_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Explicit attention with this block's dropout on the weights: (context, weights)."""
        return eager_attention(query, key, value, additive_mask, self.attention_dropout, head_mask, score_bias)

    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        additive_mask: torch.Tensor | None,
        dropout_p: float,
    ) -> torch.Tensor:
        """Fused attention (torch's SDPA) on (batch, heads, seq, dim): the context."""
        return sdpa_attention(query, key, value, additive_mask, dropout_p)


def keep_features(layer: nn.Linear, index: list[int], dim: int) -> nn.Linear:
    """A new Linear holding only the output (``dim=0``) or input (``dim=1``) features ``index`` of ``layer``.

    Same dtype, device and requires_grad; the bias follows the output features.
    """
    positions = torch.tensor(index, dtype=torch.long, device=layer.weight.device)
    weight = layer.weight.index_select(dim, positions)
    out_features, in_features = weight.shape
    new = nn.Linear(
        in_features, out_features, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias if dim == 1 else layer.bias.index_select(0, positions))
    new.requires_grad_(layer.weight.requires_grad)
    return new


class ResidualProjection(nn.Module):
    """dense -> dropout -> + residual (un-normalised): the end of the attention and MLP blocks."""

    def __init__(self, in_features: int, config: MegatronBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual + self.dropout(self.dense(hidden_states))


class MegatronBertAttention(nn.Module):
    """LayerNorm -> self (or cross) attention -> output projection + residual."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        # MegatronBERT: LayerNorm *before* attention (BERT has it after the residual).
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self = MegatronBertSelfAttention(config)
        self.output = ResidualProjection(config.hidden_size, config)  # attention output
        self.total_heads = config.num_attention_heads  # before any pruning

    @property
    def pruned_heads(self) -> set[int]:
        """The original numbers of the heads prune_heads removed from this block."""
        return set(range(self.total_heads)) - set(self.self.kept_heads)

    def prune_heads(self, heads: set[int] | list[int]) -> None:
        """Remove attention heads (original numbers; already-pruned ones are skipped).

        Their Q/K/V rows and the matching input columns of the output projection go; the
        outputs equal those of the unpruned block under a head_mask zeroing those heads.
        """
        features = self.self.prune(set(heads))
        if len(features) != self.output.dense.in_features:
            self.output.dense = keep_features(self.output.dense, features, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        plan: AttentionPlan,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        past_key_value: KeyValue | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, KeyValue | None]:
        context, weights, present = self.self(
            self.ln(hidden_states), plan, head_mask, encoder_hidden_states, past_key_value, output_attentions
        )
        return self.output(context, hidden_states), weights, present


class MegatronBertIntermediate(nn.Module):
    """MLP in: hidden -> intermediate, activation."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden_states))


class MegatronBertLayer(nn.Module):
    """One pre-LN transformer layer (optionally with cross-attention, for decoders)."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.attention = MegatronBertAttention(config)
        self.is_decoder = config.is_decoder
        if config.add_cross_attention:
            self.crossattention = MegatronBertAttention(config)
        # MegatronBERT: LayerNorm *before* the MLP.
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = MegatronBertIntermediate(config)
        self.output = ResidualProjection(config.intermediate_size, config)  # MLP out

    def forward(
        self,
        hidden_states: torch.Tensor,
        plan: AttentionPlan,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_plan: AttentionPlan | None = None,
        past_key_value: tuple[torch.Tensor, ...] | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """Returns (hidden, self-attention weights, cross-attention weights, cache entry)."""
        self_past = past_key_value[:2] if past_key_value is not None else None
        hidden_states, self_weights, present = self.attention(
            hidden_states, plan, head_mask, None, self_past, output_attentions
        )
        cross_weights = None
        if self.is_decoder and encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError(
                    "encoder_hidden_states were given but the model has no cross-attention layers "
                    "(build it with config.add_cross_attention=True)"
                )
            cross_past = past_key_value[-2:] if past_key_value is not None and len(past_key_value) == 4 else None
            assert encoder_plan is not None
            hidden_states, cross_weights, cross_present = self.crossattention(
                hidden_states, encoder_plan, head_mask, encoder_hidden_states, cross_past, output_attentions
            )
            if present is not None and cross_present is not None:
                present = present + cross_present
        mlp_out = self.output(self.intermediate(self.ln(hidden_states)), hidden_states)
        return mlp_out, self_weights, cross_weights, present


class MegatronBertPooler(nn.Module):
    """tanh(dense(first token)): the input of the NSP and sequence-level heads."""

    def __init__(self, config: MegatronBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))  # (batch, hidden)
