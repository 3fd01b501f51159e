"""Attention backends: eager (weights, head_mask, relative positions), SDPA, and unpadded (varlen).

All three compute softmax(q k^T / sqrt(d) + mask) v. The mask is the reference's additive
mask: 0 where a key may be attended to, the dtype's most negative value where not, so a row
whose keys are all masked gets uniform weights (finite, as in `transformers`) instead of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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
    mode "varlen": tokens are packed (total_tokens, hidden), sequences sorted longest first;
    attention runs on each run of equal-length sequences without any padding.
    """

    mode: str
    # (batch, 1, query_len, key_len) additive mask, or None when nothing is masked.
    additive_mask: torch.Tensor | None = None
    # varlen only. token_index: (total_tokens,) where each packed token sits in the flattened
    # (batch * seq) input. runs: (first packed token, sequences, length) for each run of
    # equal-length sequences, in packed order. cu_seqlens: (batch + 1,) int32 sequence
    # boundaries in packed order (for flash-attn).
    token_index: torch.Tensor | None = None
    runs: tuple[tuple[int, int, int], ...] = ()
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def varlen_plan(attention_mask: torch.Tensor, lengths: torch.Tensor) -> AttentionPlan:
    """The plan for packed tokens of a (batch, seq) keep-mask whose rows hold ``lengths`` (all > 0) real tokens.

    Sequences are packed longest first, so sequences of the same length lie side by side and
    each such run is a (sequences, length) block of the packed tokens. A row's real tokens need
    not be contiguous (left padding, holes): they are packed in order and attend to each other.
    """
    batch, seq_len = attention_mask.shape
    order = torch.argsort(lengths, descending=True, stable=True)  # (batch,)
    sorted_lengths = lengths[order]
    # real tokens of the rows in `order`, as flat indices of the original (batch * seq) grid
    flat = attention_mask[order].reshape(-1).nonzero().squeeze(1)  # (total_tokens,) in the sorted grid
    token_index = order[flat // seq_len] * seq_len + flat % seq_len
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(sorted_lengths, 0)
    runs: list[tuple[int, int, int]] = []
    start = 0
    for length in sorted_lengths.tolist():
        if runs and runs[-1][2] == length:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, length)
        else:
            runs.append((start, 1, length))
        start += length
    return AttentionPlan(
        "varlen", token_index=token_index, runs=tuple(runs), cu_seqlens=cu, max_seqlen=int(sorted_lengths[0])
    )


def additive_mask_from(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1/0 (or bool) keep-mask of any shape -> additive mask: 0 where kept, dtype min where masked."""
    mask = mask.to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def eager_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    additive_mask: torch.Tensor | None,
    dropout: Callable[[torch.Tensor], torch.Tensor],
    head_mask: torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention; returns (context, weights).

    ``dropout`` is applied to the weights (the block's attention-dropout module: an identity
    in eval mode).

    query (batch, heads, q_len, head_dim); key/value (batch, heads, k_len, head_dim);
    score_bias (batch, heads, q_len, k_len) is added before scaling (relative positions);
    head_mask broadcasts onto the weights after dropout, as in the reference.
    """
    scale = 1.0 / math.sqrt(query.shape[-1])
    if score_bias is None:
        # scaling the queries (head_dim wide) is cheaper than scaling the scores (k_len wide)
        scores = torch.matmul(query * scale, key.transpose(-1, -2))  # (batch, heads, q_len, k_len)
    else:
        scores = (torch.matmul(query, key.transpose(-1, -2)) + score_bias) * scale
    if additive_mask is not None:
        scores = scores + additive_mask
    weights = torch.softmax(scores, dim=-1)
    weights = dropout(weights)
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
    """Fused attention on (batch, heads, seq, head_dim) tensors: torch's SDPA."""
    if additive_mask is not None and additive_mask.dtype != query.dtype:
        additive_mask = additive_mask.to(query.dtype)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask, dropout_p=dropout_p)


SdpaFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


def varlen_attention(
    qkv: torch.Tensor, plan: AttentionPlan, dropout_p: float, sdpa: SdpaFn = sdpa_attention
) -> torch.Tensor:
    """Attention over packed sequences: qkv (total_tokens, 3, heads, dim) -> (total_tokens, heads, dim).

    ``sdpa`` computes each run's attention (the block's own, so that its dropout is used).

    On CUDA with flash-attn installed (fp16/bf16) a varlen kernel runs on the packed tokens
    directly. Otherwise each run of equal-length sequences is a (sequences, length) block of
    the packed tokens, viewed as (sequences, heads, length, dim) for one unmasked SDPA call:
    no pad token is scattered, masked or computed.
    """
    if flash_attn_varlen_func is not None and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
        cu = plan.cu_seqlens
        query, key, value = qkv.unbind(1)
        return flash_attn_varlen_func(query, key, value, cu, cu, plan.max_seqlen, plan.max_seqlen, dropout_p=dropout_p)
    tokens, _, heads, dim = qkv.shape
    if torch.is_grad_enabled() and qkv.requires_grad:
        # split (one concatenation in backward) and cat, rather than slicing per run: the
        # backward of each slice would be a zero-filled gradient of the whole qkv.
        blocks = qkv.split([count * length for _, count, length in plan.runs])
        pieces = [
            _run_attention(block, count, length, dropout_p, sdpa).reshape(count * length, heads, dim)
            for block, (_, count, length) in zip(blocks, plan.runs)
        ]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if len(plan.runs) == 1:
        _, count, length = plan.runs[0]
        return _run_attention(qkv, count, length, dropout_p, sdpa).reshape(tokens, heads, dim)
    out = qkv.new_empty(tokens, heads, dim)  # each run's context is copied straight into place
    for start, count, length in plan.runs:
        end = start + count * length
        out[start:end].view(count, length, heads, dim).copy_(_run_attention(qkv[start:end], count, length, dropout_p, sdpa))
    return out


def _run_attention(block: torch.Tensor, count: int, length: int, dropout_p: float, sdpa: SdpaFn) -> torch.Tensor:
    """(count * length, 3, heads, dim) packed tokens of equal-length sequences -> context (count, length, heads, dim)."""
    qkv = block.view(count, length, *block.shape[1:])
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (count, heads, length, dim)
    return sdpa(query, key, value, None, dropout_p).transpose(1, 2)
