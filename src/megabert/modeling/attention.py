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
    # varlen only: sequence boundaries in the packed token axis, (batch + 1,) int32.
    cu_seqlens: torch.Tensor | None = None
    seqlens: list[int] | None = None
    max_seqlen: int = 0


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


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: AttentionPlan,
    dropout_p: float,
) -> torch.Tensor:
    """Attention over packed sequences, never touching padding.

    query/key/value (total_tokens, heads, head_dim) with sequences laid end to end as
    ``plan.cu_seqlens`` says; returns (total_tokens, heads, head_dim).
    """
    if (
        flash_attn_varlen_func is not None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
    ):
        cu = plan.cu_seqlens
        return flash_attn_varlen_func(
            query, key, value, cu, cu, plan.max_seqlen, plan.max_seqlen, dropout_p=dropout_p
        )
    assert plan.seqlens is not None
    outputs = []
    for q, k, v in zip(
        query.split(plan.seqlens), key.split(plan.seqlens), value.split(plan.seqlens)
    ):
        # (len, heads, dim) -> (1, heads, len, dim): one sequence, no mask needed
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            dropout_p=dropout_p,
        )
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0)
