"""Cross-entropy of a vocabulary projection, computed in row chunks without a (tokens, vocab) tensor.

The MLM loss is ``cross_entropy(hidden @ W^T + b, targets)`` over ~15% of the tokens with a
30k-row ``W``. Done the usual way, autograd keeps the fp32 logits, their log-softmax, and in
backward a zero-filled gradient of the same size, each ``tokens x vocab`` (150 MB for a batch
of 64 x 128), and runs three passes over them. Here the rows go through in chunks: for each
chunk the logits are computed, and while they are still in cache, the log-sum-exp, the loss,
the argmax (accuracy) and ``softmax - onehot`` (the gradient of the logits); that gradient is
then multiplied into the gradients of the hidden states, ``W`` and ``b`` right away. The
forward pass therefore does the backward's matrix products too, and :meth:`backward` only
scales the stored gradients by the incoming one. The result equals the unfused loss and
gradients up to float rounding.

Matrix products run in the autocast dtype when autocast is on (as ``F.linear`` would; in fp32
on a CPU whose half-precision GEMMs are slower), the softmax in fp32 (or fp64 for fp64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megabert.fast_paths import upcast_is_faster

# Elements per chunk of logits: 4M fp32 = 16 MB (137 rows of a 30k vocabulary), small enough
# for glibc's allocator to hand back the same memory chunk after chunk (it maps blocks over
# 32 MB fresh from the kernel every time, paying a page fault per 4 KB) and large enough for
# fast GEMMs.
CHUNK_ELEMENTS = 1 << 22


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk for a ``vocab``-wide projection (at least 32)."""
    return max(32, CHUNK_ELEMENTS // max(vocab, 1))


class SharedWeightGradient:
    """One dense gradient for a weight used twice: as the decoder of :func:`linear_cross_entropy`
    and as the table of :func:`embedding_lookup` (MLM heads tie the two).

    Autograd would give the weight two vocabulary x hidden gradients -- the decoder's, and the
    lookup's, a zero-filled table with a few rows set -- and add them into a third. With a
    shared gradient the loss leaves its decoder gradient here (its backward runs first: the
    lookup's output feeds the hidden states the loss reads), and the lookup's backward adds
    its rows into that same tensor and hands it to autograd as the weight's only gradient.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None


class _EmbeddingLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None,  # type: ignore[override]
                shared: SharedWeightGradient) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.shared, ctx.weight_shape = padding_idx, shared, (weight.shape, weight.dtype)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        total, ctx.shared.pending = ctx.shared.pending, None
        shape, dtype = ctx.weight_shape
        if total is None:  # the loss had no vocabulary gradient to leave (nothing was predicted)
            total = torch.zeros(shape, dtype=dtype, device=grad.device)
        rows = grad.reshape(-1, shape[1]).to(total.dtype)  # (tokens, H)
        flat_ids = ids.reshape(-1)
        if ctx.padding_idx is not None:  # as nn.Embedding: the padding row gets no gradient
            rows = rows.masked_fill((flat_ids == ctx.padding_idx)[:, None], 0.0)
        return None, total.index_add_(0, flat_ids, rows), None, None


def embedding_lookup(
    ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, shared: SharedWeightGradient
) -> torch.Tensor:
    """``F.embedding(ids, weight, padding_idx)`` whose weight gradient joins ``shared`` (see there)."""
    return _EmbeddingLookup.apply(ids, weight, padding_idx, shared)


@dataclass
class LinearCrossEntropy:
    """Mean cross-entropy over the rows, and how many rows the argmax predicts correctly."""

    loss: torch.Tensor  # () fp32, differentiable w.r.t. hidden, weight and bias
    correct: torch.Tensor  # () int64


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        # On a CPU whose half-precision GEMMs are slower than fp32 ones, the products stay fp32
        # (as megabert.fast_paths.half_matmul does for the layers' products under autocast).
        return torch.float32 if device == "cpu" and upcast_is_faster(dtype) else dtype
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
        chunk_rows: int,
        shared: SharedWeightGradient | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        device = hidden.device
        h = hidden.to(compute_dtype)  # (rows, H)
        w = weight.to(compute_dtype)  # (V, H)
        b = bias.to(compute_dtype) if bias is not None else None
        wide = torch.promote_types(compute_dtype, torch.float32)  # softmax and accumulation: fp32 at least
        loss_sum = torch.zeros((), dtype=wide, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        grad_hidden = grad_weight = grad_bias = None
        if need_grad:
            grad_hidden = torch.empty_like(h)  # (rows, H)
            grad_weight = torch.empty(w.shape, dtype=wide, device=device)  # (V, H), written by the first chunk
            grad_bias = torch.zeros(w.shape[0], dtype=wide, device=device) if b is not None else None
        buffer = torch.empty(min(chunk_rows, rows), w.shape[0], dtype=compute_dtype, device=device)
        with torch.autocast(device_type=device.type, enabled=False):  # dtypes are explicit here
            for start in range(0, rows, chunk_rows):
                end = min(start + chunk_rows, rows)
                h_chunk = h[start:end]  # (c, H)
                target = targets[start:end]  # (c,)
                logits = buffer[: end - start]  # (c, V), every step below in place: no new (c, V) tensor
                torch.addmm(b, h_chunk, w.t(), out=logits) if b is not None else torch.mm(h_chunk, w.t(), out=logits)
                logits = logits.to(wide)
                picked = logits.gather(1, target[:, None]).squeeze(1)  # (c,)
                top, predicted = logits.max(dim=1)  # (c,) each
                correct += (predicted == target).sum()
                exp = logits.sub_(top[:, None]).exp_()  # exp(logits - max)
                total = exp.sum(dim=1)  # (c,)
                loss_sum += (top + total.log() - picked).sum()  # log-sum-exp minus the target's logit
                if not need_grad:
                    continue
                # d(mean loss)/d(logits) = (softmax - onehot) / rows
                probs = exp.mul_((1.0 / (total * rows))[:, None])
                probs[torch.arange(end - start, device=device), target] -= 1.0 / rows
                if grad_bias is not None:
                    grad_bias += probs.sum(0)
                probs = probs.to(compute_dtype)
                torch.mm(probs, w, out=grad_hidden[start:end])
                if start == 0:  # the first chunk writes the weight gradient, later ones add to it
                    torch.mm(probs.t(), h_chunk, out=grad_weight) if compute_dtype == wide else \
                        grad_weight.copy_(probs.t() @ h_chunk)
                elif compute_dtype == wide:
                    grad_weight.addmm_(probs.t(), h_chunk)
                else:
                    grad_weight += probs.t() @ h_chunk
        # The gradients are kept as attributes, not saved tensors, so that backward can let go of
        # them: autograd may then add the tied word-embedding gradient into the returned weight
        # gradient in place instead of allocating another vocabulary-sized tensor.
        ctx.grads = (grad_hidden, grad_weight, grad_bias) if need_grad else None
        ctx.shared = shared
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct)
        return loss_sum / rows, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice through the same loss (retain_graph is not supported)")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
        # A loss backpropagated as it is (gradient 1, on the CPU where reading it costs no device
        # sync) takes the stored gradients as they are; otherwise they are scaled in place.
        unit = grad_loss.device.type == "cpu" and float(grad_loss) == 1.0

        def scaled(grad: torch.Tensor | None, dtype: torch.dtype | None, needed: bool) -> torch.Tensor | None:
            if grad is None or not needed:
                return None
            return (grad if unit else grad.mul_(grad_loss)).to(dtype)

        weight_grad = scaled(grad_weight, weight_dtype, ctx.needs_input_grad[1])
        if ctx.shared is not None and weight_grad is not None:
            ctx.shared.pending, weight_grad = weight_grad, None  # the embedding lookup hands it on
        return (
            scaled(grad_hidden, hidden_dtype, ctx.needs_input_grad[0]),
            weight_grad,
            scaled(grad_bias, bias_dtype, ctx.needs_input_grad[2]),
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    shared: SharedWeightGradient | None = None,
) -> LinearCrossEntropy:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` and the argmax hit count, chunked.

    hidden (rows, H), weight (V, H), bias (V,) or None, targets (rows,) in [0, V) (no ignored
    rows: select the predicted positions first). ``rows`` must be > 0. ``chunk_rows``
    defaults to :func:`default_chunk_rows`. With ``shared``, the weight's gradient goes to the
    :func:`embedding_lookup` that shares it (its output must feed ``hidden``).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (rows, H) and targets (rows,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    if hidden.shape[0] == 0:
        raise ValueError("linear_cross_entropy needs at least one row")
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    loss, correct = _ChunkedLinearCrossEntropy.apply(
        hidden, weight, bias, targets, _compute_dtype(hidden), chunk_rows, shared
    )
    return LinearCrossEntropy(loss=loss, correct=correct)
