"""The CPU dropout mask: keep rate, scaling, gradient, seeding, and where it defers to F.dropout."""

from __future__ import annotations

import pytest
import torch

from megabert.fast_paths.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scaling(p):
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = dropout(x, p)
    kept = y != 0
    # the drop probability is p rounded to a multiple of 1/65536; 400k draws give +-0.0025 at 3 sigma
    expected_keep = 1 - round(p * 65536) / 65536
    assert abs(kept.float().mean().item() - expected_keep) < 0.0025
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))


def test_lanes_are_independent():
    """Neighbouring elements (lanes of one 64-bit word) are dropped independently."""
    torch.manual_seed(1)
    keep = keep_mask((400_000,), 0.5).view(-1, 4).float()
    both = (keep[:, 0] * keep[:, 1]).mean().item()
    assert abs(both - 0.25) < 0.005
    lane_rates = keep.mean(0)
    assert torch.all((lane_rates - 0.5).abs() < 0.005)


def test_gradient_goes_through_the_same_mask():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = dropout(x, 0.3)
    y.backward(torch.full_like(y, 2.0))
    expected = (y.detach() != 0).float() * 2.0 / 0.7
    torch.testing.assert_close(x.grad, expected)


def test_seed_repeats_the_mask_and_advances_the_generator():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a, b = dropout(x, 0.2), dropout(x, 0.2)
    torch.manual_seed(3)
    c = dropout(x, 0.2)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_identity_when_off_and_module_follows_train_eval():
    x = torch.randn(10, 10)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.5, training=False) is x
    module = Dropout(0.5)
    assert isinstance(module, torch.nn.Dropout)
    assert torch.equal(module.eval()(x), x)
    assert (module.train()(x) == 0).any()


def test_p_one_and_bfloat16():
    assert torch.count_nonzero(dropout(torch.ones(100), 1.0)) == 0  # F.dropout's behaviour
    x = torch.ones(1000, dtype=torch.bfloat16, requires_grad=True)
    y = dropout(x, 0.5)  # half precision: a bool mask, the scale applied as a Python float
    assert y.dtype == torch.bfloat16 and set(y.unique().tolist()) <= {0.0, 2.0}
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (y.detach() != 0).to(torch.bfloat16) * 2)
