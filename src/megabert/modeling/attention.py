"""Attention backends: eager (weights, head_mask, relative positions), SDPA, and unpadded (varlen).

All three compute softmax(q k^T / sqrt(d) + mask) v. The mask is the reference's additive
mask: 0 where a key may be attended to, the dtype's most negative value where not, so a row
whose keys are all masked gets uniform weights (finite, as in `transformers`) instead of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional CUDA kernel for unpadded attention (`pip install flash-attn`)
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_varlen_func = None


@dataclass
class AttentionPlan:
    """How attention runs in one forward pass; built once by the model, shared by all layers.

    mode "eager": explicit softmax (attention weights, head_mask, relative positions).
    mode "sdpa": torch's scaled_dot_product_attention on padded (batch, heads, seq, dim).
    mode "varlen": tokens are packed (total_tokens, hidden); attention runs per sequence.
    """

    mode: str
    # (batch, 1, query_len, key_len) additive mask, or None when nothing is masked.
    additive_mask: torch.Tensor | None = None
    # varlen only: sequence boundaries in the packed token axis, (batch + 1,) int32, and
    # where each packed token sits in a (batch, max_seqlen) grid of left-aligned sequences.
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    batch: int = 0
    grid_rows: torch.Tensor | None = None  # (tokens,) sequence of each packed token
    grid_cols: torch.Tensor | None = None  # (tokens,) its position within the sequence
    _scratch: torch.Tensor | None = None

    def grid_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A zero (batch, max_len, *like.shape[1:]) grid for scattering packed tokens.

        Without autograd one buffer serves every layer: each layer writes only the real slots,
        so the pad slots stay zero and the buffer needs clearing once per forward pass.
        """
        shape = (self.batch, self.max_seqlen, *like.shape[1:])
        if torch.is_grad_enabled():
            return like.new_zeros(shape)
        scratch = self._scratch
        if scratch is None or scratch.shape != shape or scratch.dtype != like.dtype or scratch.device != like.device:
            scratch = self._scratch = like.new_zeros(shape)
        return scratch


def additive_mask_from(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/0 (or bool) keep-mask of any shape -> additive mask: 0 where kept, dtype min where masked."""
    mask = mask.to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    additive_mask: torch.Tensor | None,
    dropout_p: float,
    head_mask: torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention; returns (context, weights).

    query (batch, heads, q_len, head_dim); key/value (batch, heads, k_len, head_dim);
    score_bias (batch, heads, q_len, k_len) is added before scaling (relative positions);
    head_mask broadcasts onto the weights after dropout, as in the reference.
    """
    scores = torch.matmul(query, key.transpose(-1, -2))  # (batch, heads, q_len, k_len)
    if score_bias is not None:
        scores = scores + score_bias
    scores = scores / math.sqrt(query.shape[-1])
    if additive_mask is not None:
        scores = scores + additive_mask
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    if head_mask is not None:
        weights = weights * head_mask
    context = torch.matmul(weights, value)  # (batch, heads, q_len, head_dim)
    return context, weights


def sdpa_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    additive_mask: torch.Tensor | None,
    dropout_p: float,
) -> torch.Tensor:
    """torch's fused attention on padded tensors (batch, heads, seq, head_dim)."""
    if additive_mask is not None and additive_mask.dtype != query.dtype:
        additive_mask = additive_mask.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask, dropout_p=dropout_p)


def varlen_attention(qkv: torch.Tensor, plan: AttentionPlan, dropout_p: float) -> torch.Tensor:
    """Attention over packed sequences: qkv (total_tokens, 3, heads, dim) -> (total_tokens, heads, dim).

    On CUDA with flash-attn installed (fp16/bf16) a varlen kernel runs on the packed tokens
    directly. Otherwise the tokens are scattered into a left-aligned (batch, max_len) grid for
    one batched SDPA call and gathered back: the Linears and MLP, which are nearly all the
    work, still run on real tokens only, while attention's share (about 4 * seq * hidden FLOPs
    per token against 24 * hidden^2 for the rest) stays small.
    """
    if flash_attn_varlen_func is not None and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
        cu = plan.cu_seqlens
        query, key, value = qkv.unbind(1)
        return flash_attn_varlen_func(query, key, value, cu, cu, plan.max_seqlen, plan.max_seqlen, dropout_p=dropout_p)
    assert plan.grid_rows is not None and plan.grid_cols is not None
    grid = plan.grid_buffer(qkv)  # (batch, max_len, 3, heads, dim), zeros at pad slots
    grid = grid.index_put((plan.grid_rows, plan.grid_cols), qkv) if torch.is_grad_enabled() else grid.index_put_(
        (plan.grid_rows, plan.grid_cols), qkv
    )
    query, key, value = grid.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (batch, heads, max_len, dim)
    context = sdpa_attention(query, key, value, plan.additive_mask, dropout_p)
    # gather the real tokens straight from the (batch, heads, max_len, dim) result
    return context[plan.grid_rows, :, plan.grid_cols]  # (tokens, heads, dim)
