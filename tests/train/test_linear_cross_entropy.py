"""The chunked vocabulary cross-entropy equals F.cross_entropy(F.linear(...)): loss, hits and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megabert.modeling.linear_cross_entropy import linear_cross_entropy


def _inputs(rows=300, hidden=24, vocab=97, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.3).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, vocab, (rows,), generator=g)
    return h, w, b, t


@pytest.mark.parametrize("chunk_rows", [1, 64, 300, 1000])
def test_loss_hits_and_gradients_equal_the_unfused_ones(chunk_rows):
    h, w, b, t = _inputs()
    logits = F.linear(h, w, b)
    expected = F.cross_entropy(logits, t)
    (expected * 3.0).backward()  # an upstream gradient other than 1
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    out = linear_cross_entropy(h, w, b, t, chunk_rows=chunk_rows)
    (out.loss * 3.0).backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    assert int(out.correct) == int((logits.argmax(1) == t).sum())
    for got, want in zip((h.grad, w.grad, b.grad), grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_without_bias_and_without_gradients():
    h, w, _, t = _inputs(rows=50)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, None, t, chunk_rows=16)
        expected = F.cross_entropy(h @ w.t(), t)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    assert not out.loss.requires_grad


def test_frozen_weight_gets_no_gradient():
    h, w, b, t = _inputs(rows=40)
    w.requires_grad_(False)
    linear_cross_entropy(h, w, b, t).loss.backward()
    assert w.grad is None and h.grad is not None and b.grad is not None


def test_bf16_autocast_stays_close_to_fp32():
    h, w, b, t = _inputs(rows=200, hidden=64, vocab=500, dtype=torch.float32)
    expected = F.cross_entropy(F.linear(h, w, b), t)
    expected.backward()
    want = h.grad.clone()
    h.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, b, t)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(out.loss, expected, rtol=2e-2, atol=0)
    assert (h.grad - want).abs().max() < 0.05 * want.abs().max()


def test_bad_shapes_are_named():
    h, w, b, t = _inputs(rows=10)
    with pytest.raises(ValueError, match=r"hidden must be \(rows, H\) and targets \(rows,\), got \(10, 24\) and \(9,\)"):
        linear_cross_entropy(h, w, b, t[:9])
    with pytest.raises(ValueError, match="at least one row"):
        linear_cross_entropy(h[:0], w, b, t[:0])


@pytest.mark.parametrize("with_loss", [True, False])
def test_tied_lookup_and_decoder_share_one_gradient(with_loss):
    """Lookup + loss through one SharedWeightGradient == autograd's sum of the two; padding row excluded."""
    from megabert.modeling.linear_cross_entropy import SharedWeightGradient, embedding_lookup

    g = torch.Generator().manual_seed(4)
    weight = (torch.randn(50, 8, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    ids = torch.randint(0, 50, (3, 7), generator=g)
    ids[0, :2] = 0  # padding id 0
    targets = torch.randint(0, 50, (5,), generator=g)

    def run(shared):
        weight.grad = None
        if shared is None:
            embeds = F.embedding(ids, weight, padding_idx=0)
        else:
            embeds = embedding_lookup(ids, weight, 0, shared)
        hidden = torch.tanh(embeds.reshape(-1, 8)[:5] * 2)  # (5, 8): depends on the lookup
        extra = (embeds ** 2).sum() * 0.1
        if with_loss:
            out = (linear_cross_entropy(hidden, weight, None, targets, shared=shared).loss * 2 if shared is not None
                   else F.cross_entropy(hidden @ weight.t(), targets) * 2)
        else:
            out = hidden.sum()
        (out + extra).backward()
        return weight.grad.clone()

    expected = run(None)
    shared = SharedWeightGradient()
    torch.testing.assert_close(run(shared), expected, rtol=1e-10, atol=1e-12)
    assert shared.pending is None  # handed on, nothing left behind
