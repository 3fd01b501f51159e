"""Megatron's fused query/key/value projection, split into separate Q, K, V and fused back.

Megatron stores the three attention projections as one ``query_key_value`` (legacy) or
``linear_qkv`` (Megatron Core) Linear with ``3 * heads * head_dim`` output rows per
tensor-parallel rank. How those rows are ordered depends on the checkpoint's
``checkpoint_version``:

==========================  ==========================  ==========================================
checkpoint_version          rows, outermost first       meaning
==========================  ==========================  ==========================================
absent (0)                  ``[3, heads, head_dim]``    all Q rows, then all K rows, then all V
1.0                         ``[heads, head_dim, 3]``    Q, K, V interleaved row by row
2.0, 3.0, Megatron Core     ``[heads, 3, head_dim]``    per head: its Q rows, its K rows, its V rows
==========================  ==========================  ==========================================

``heads`` is the number of heads *on that rank* (``num_attention_heads / tensor_parallel``).
The Hugging Face layout keeps Q, K and V apart, each with rows ``[heads, head_dim]``. Every
function here works on one rank's tensor: a weight ``[rows, hidden]`` or a bias ``[rows]``.
"""

from __future__ import annotations

import torch

from megabert.errors import UserError

__all__ = ["KNOWN_VERSIONS", "check_version", "fuse_qkv", "split_qkv"]

# Megatron-LM wrote these checkpoint versions; the QKV layout changed at 1.0 and 2.0.
KNOWN_VERSIONS = (0.0, 1.0, 2.0, 3.0)


def check_version(version: object, where: str = "checkpoint") -> float:
    """``version`` as a float, or a UserError naming it if it is not a version Megatron-LM wrote."""
    if isinstance(version, bool) or not isinstance(version, (int, float)) or float(version) not in KNOWN_VERSIONS:
        known = ", ".join(f"{v:g}" for v in KNOWN_VERSIONS)
        raise UserError(f"{where}: unknown checkpoint_version {version!r} (known: {known})")
    return float(version)


def _rows_per_head(fused: torch.Tensor, num_heads: int) -> int:
    rows = fused.shape[0]
    if num_heads <= 0 or rows % (3 * num_heads) != 0:
        raise UserError(
            f"fused QKV tensor has {rows} rows, which is not 3 x {num_heads} heads x head_dim"
        )
    return rows // (3 * num_heads)


def split_qkv(fused: torch.Tensor, num_heads: int, version: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's fused QKV -> (query, key, value), each with rows ``[num_heads, head_dim]``.

    ``fused``: ``[3 * num_heads * head_dim, *rest]`` in the row layout of ``version`` (see
    the module docstring); ``num_heads``: heads on this rank. The results are new contiguous
    tensors of shape ``[num_heads * head_dim, *rest]``.
    """
    version = check_version(version)
    head_dim = _rows_per_head(fused, num_heads)
    rest = tuple(fused.shape[1:])
    if version == 0.0:
        grid = fused.reshape(3, num_heads, head_dim, *rest)  # [3, heads, head_dim, *rest]
        parts = [grid[i] for i in range(3)]
    elif version == 1.0:
        grid = fused.reshape(num_heads, head_dim, 3, *rest)  # [heads, head_dim, 3, *rest]
        parts = [grid[:, :, i] for i in range(3)]
    else:
        grid = fused.reshape(num_heads, 3, head_dim, *rest)  # [heads, 3, head_dim, *rest]
        parts = [grid[:, i] for i in range(3)]
    # [heads, head_dim, *rest] -> [heads * head_dim, *rest]; clone so no two outputs share memory.
    q, k, v = (part.reshape(num_heads * head_dim, *rest).clone() for part in parts)
    return q, k, v


def fuse_qkv(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int, version: float
) -> torch.Tensor:
    """Inverse of :func:`split_qkv`: three ``[num_heads * head_dim, *rest]`` -> one fused tensor.

    The result has ``3 * num_heads * head_dim`` rows in ``version``'s layout.
    """
    version = check_version(version)
    if not query.shape == key.shape == value.shape:
        raise UserError(
            f"query, key and value must have one shape, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    rows = query.shape[0]
    if rows % num_heads != 0:
        raise UserError(f"query has {rows} rows, which is not a multiple of {num_heads} heads")
    head_dim = rows // num_heads
    rest = tuple(query.shape[1:])
    # each: [heads, head_dim, *rest]
    q, k, v = (t.reshape(num_heads, head_dim, *rest) for t in (query, key, value))
    if version == 0.0:
        fused = torch.stack([q, k, v], dim=0)  # [3, heads, head_dim, *rest]
    elif version == 1.0:
        fused = torch.stack([q, k, v], dim=2)  # [heads, head_dim, 3, *rest]
    else:
        fused = torch.stack([q, k, v], dim=1)  # [heads, 3, head_dim, *rest]
    return fused.reshape(3 * rows, *rest).contiguous()
