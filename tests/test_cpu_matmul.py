"""Half-precision CPU products in fp32 where that is faster: the policy switch and its results."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megabert.fast_paths import half_matmul as cpu_matmul
from megabert.fast_paths.half_matmul import MIN_ROWS, CpuLinear, linear


def _operands(rows: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g).bfloat16()
    w = torch.randn(48, 64, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    return x, w, b


def test_fp32_policy_upcasts_large_products(monkeypatch):
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fp32")
    x, w, b = _operands(MIN_ROWS)
    out = linear(x, w, b)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), w.float(), b.float()).bfloat16()
    assert torch.equal(out, expected)
    small, _, _ = _operands(MIN_ROWS - 1)
    assert torch.equal(linear(small, w, b), F.linear(small, w, b))  # too small: native kernel


def test_blocks_cover_every_row_and_feature(monkeypatch):
    """With blocks smaller than the product, each block is computed once, in place, and nothing is left over."""
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fp32")
    monkeypatch.setattr(cpu_matmul, "WEIGHT_BLOCK", 64 * 20)  # 20 of the 48 features per block
    monkeypatch.setattr(cpu_matmul, "ROW_BLOCK", 64 * 30)  # 30 of the 300 rows per block
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 100, 64, generator=g).bfloat16()  # 300 rows, leading dims kept
    w = torch.randn(48, 64, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    out = linear(x, w, b)
    assert out.shape == (3, 100, 48)
    assert torch.equal(out, F.linear(x.float(), w.float(), b.float()).bfloat16())
    assert torch.equal(linear(x, w), F.linear(x.float(), w.float()).bfloat16())


def test_recorded_products_keep_the_half_kernel(monkeypatch):
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fp32")
    x, w, b = _operands(MIN_ROWS)
    x.requires_grad_()
    out = linear(x, w, b)
    assert torch.equal(out, F.linear(x, w, b)) and out.requires_grad


def test_native_policy_and_fp32_inputs_are_untouched(monkeypatch):
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "native")
    x, w, b = _operands(MIN_ROWS * 2)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fp32")
    xf, wf, bf = x.float(), w.float(), b.float()
    assert torch.equal(linear(xf, wf, bf), F.linear(xf, wf, bf))


def test_autocast_keeps_its_own_dtype(monkeypatch):
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fp32")
    x, w, b = _operands(MIN_ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))


def test_bad_policy_is_named(monkeypatch):
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fast")
    x, w, b = _operands(MIN_ROWS)
    with pytest.raises(ValueError, match="MEGABERT_CPU_HALF_MATMUL='fast': choose one of auto, native, fp32"):
        linear(x, w, b)


def test_auto_policy_measures_once(monkeypatch):
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "auto")
    monkeypatch.setattr(cpu_matmul, "_decisions", {})
    first = cpu_matmul.upcast_is_faster(torch.bfloat16)
    assert cpu_matmul._decisions == {torch.bfloat16: first}
    assert cpu_matmul.upcast_is_faster(torch.float32) is False


def test_cpu_linear_runs_its_hooks(monkeypatch):
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fp32")
    x, w, b = _operands(MIN_ROWS)
    module = torch.nn.Linear(64, 48).bfloat16()
    module.__class__ = CpuLinear  # what apply_cpu_fast_paths does
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    with torch.no_grad():  # the inference path the policy serves (with grad, autograd's own product runs)
        assert torch.equal(module(x), linear(x, w, b))
    module.register_forward_hook(lambda m, args, out: out * 0)
    assert torch.count_nonzero(module(x)) == 0  # called as a module: the hook ran


def _fp32_layer(rows: int):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    b = torch.randn(48, generator=g, requires_grad=True)
    grad = torch.randn(rows, 48, generator=g).bfloat16()
    return x, w, b, grad


def test_autocast_with_fp32_weights_multiplies_in_fp32(monkeypatch):
    """--bf16 training on a CPU with slow bf16 GEMMs: autocast's roundings, fp32 products, fp32 master gradients."""
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "fp32")
    x, w, b, grad = _fp32_layer(MIN_ROWS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w, b)
    assert out.dtype == torch.bfloat16  # what autocast's linear returns
    x_half = x.detach().bfloat16().float()  # the input as autocast rounds it
    assert torch.equal(out, F.linear(x_half, w.detach(), b.detach()).bfloat16())
    out.backward(grad)
    g = grad.float()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, g @ w.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, g.t() @ x_half, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, g.sum(0), rtol=1e-6, atol=1e-6)


def test_autocast_native_policy_and_small_products_keep_autocast(monkeypatch):
    for policy, rows in (("native", MIN_ROWS), ("fp32", MIN_ROWS - 1)):
        monkeypatch.setenv(cpu_matmul.POLICY_ENV, policy)
        x, w, b, _ = _fp32_layer(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(x, w, b)
            expected = F.linear(x, w, b)
        assert torch.equal(out, expected) and type(out.grad_fn) is type(expected.grad_fn)


def test_auto_policy_measures_fp32_even_under_autocast(monkeypatch):
    """The probe must time a real fp32 product: under autocast ``a @ b`` would run in bf16."""
    monkeypatch.setenv(cpu_matmul.POLICY_ENV, "auto")
    monkeypatch.setattr(cpu_matmul, "_decisions", {})
    timed = []
    monkeypatch.setattr(cpu_matmul, "_seconds_per_product", lambda a, b: timed.append((a @ b).dtype) or 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_matmul.upcast_is_faster(torch.bfloat16)
    assert timed == [torch.float32, torch.bfloat16]
