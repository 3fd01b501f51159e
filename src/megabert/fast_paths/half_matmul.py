"""bf16/fp16 matrix products on CPUs whose half-precision kernels are slower than their fp32 ones.

A bf16 model on the CPU halves the memory of an fp32 one, but whether its matrix products
are faster depends on the chip: with AMX (Sapphire Rapids and later, when the hypervisor
exposes it) or on AMD Zen 4, bf16 GEMMs run about twice as fast as fp32; with AVX512-BF16
alone (Cooper Lake, or Sapphire Rapids in a VM that hides AMX) they run at about half the
fp32 speed, and without AVX512-BF16 far slower. So :func:`linear` measures, once per process
and dtype, a bf16 (fp16) GEMM against an fp32 one of a transformer layer's shape; where fp32
wins by more than :data:`MARGIN`, large products run in fp32 on upcast copies of the
operands, block by block (at most 16 MB of weight and 8 MB each of input and product in fp32
at a time, so the peak memory stays near that of the half-precision model), and the results
are cast back. Weights, activations and outputs keep the model's dtype; the products are more
exact, not less.

Small products (fewer than :data:`MIN_ROWS` rows) keep the half-precision kernel: there the
upcast of the weight would cost more than the faster GEMM saves. Under half-precision autocast
with fp32 weights (``--bf16`` training), large products take the same decision: the input is
rounded to bf16 and saved as autocast would, the output is bf16, and the products of forward
and backward run in fp32 against the fp32 weight. Products that autograd records on a
half-precision model, under torch.compile or ONNX export, and tensor-parallel shards, are left
alone.

The policy: ``native`` always uses the half-precision kernels, ``fp32`` always upcasts (above
MIN_ROWS), ``auto`` (default) measures. It comes from :class:`~megabert.fast_paths.CpuFastPaths`
(``config.cpu_fast_paths``); under ``auto`` the environment variable
``MEGABERT_CPU_HALF_MATMUL`` (same three values) decides for the whole process.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

POLICY_ENV = "MEGABERT_CPU_HALF_MATMUL"
POLICIES = ("auto", "native", "fp32")
MIN_ROWS = 256  # below this the weight's upcast costs more than the faster fp32 GEMM saves
MARGIN = 1.25  # fp32 must be this much faster before products are upcast
# fp32 elements upcast at a time: a block of the weight (16 MB: a whole 4096 x 1024 weight, so
# that it is upcast once per call), and a block of rows of the input and of the product (8 MB each)
WEIGHT_BLOCK = 1 << 22
ROW_BLOCK = 1 << 21
_HALF = (torch.bfloat16, torch.float16)
_decisions: dict[torch.dtype, bool] = {}


def _policy(declared: str | None = None) -> str:
    """The policy in force: a declared ``native``/``fp32`` wins; under ``auto`` the environment's."""
    if declared not in (None, "auto"):
        return declared
    value = os.environ.get(POLICY_ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ValueError(f"{POLICY_ENV}={value!r}: choose one of {', '.join(POLICIES)}")
    return value


def _seconds_per_product(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    a @ b  # warm-up (kernel selection, weight packing)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def upcast_is_faster(dtype: torch.dtype, policy: str | None = None) -> bool:
    """Whether ``dtype`` products should run in fp32 here: by ``policy``, or measured once and cached (``auto``)."""
    if dtype not in _HALF:
        return False
    policy = _policy(policy)
    if policy != "auto":
        return policy == "fp32"
    if dtype not in _decisions:
        # Autocast off: under it the "fp32" product would run in the autocast dtype too.
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            a = torch.randn(512, 1024)
            b = torch.randn(1024, 1024)
            fp32 = _seconds_per_product(a, b)
            half = _seconds_per_product(a.to(dtype), b.to(dtype))
        _decisions[dtype] = half > MARGIN * fp32
    return _decisions[dtype]


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, policy: str | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, in fp32 for large half-precision CPU products where that is faster."""
    if _large_plain_cpu_product(x, weight):
        if torch.is_autocast_enabled("cpu"):
            # autocast with fp32 master weights (training): its roundings, fp32 products
            dtype = torch.get_autocast_dtype("cpu")
            if (
                dtype in _HALF
                and x.dtype in (torch.float32, dtype)
                and _all_dtype(torch.float32, weight, bias)
                and upcast_is_faster(dtype, policy)
            ):
                return _AutocastLinearInFp32.apply(x, weight, bias, dtype)
        elif (
            x.dtype in _HALF
            and _all_dtype(x.dtype, weight, bias)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and upcast_is_faster(x.dtype, policy)
        ):  # a half-precision model, product not recorded by autograd (inference)
            return _upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _large_plain_cpu_product(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A CPU product of at least MIN_ROWS rows, outside tracing/export, on a whole (not DTensor) weight."""
    return (  # tracing checks first: a size comparison would otherwise become a guard of the graph
        x.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
        and not hasattr(weight, "placements")  # DTensor shard
        and x.numel() >= MIN_ROWS * x.shape[-1]
    )


def _all_dtype(dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return weight.dtype == dtype and (bias is None or bias.dtype == dtype)


class _AutocastLinearInFp32(torch.autograd.Function):
    """What autocast's linear gives -- input rounded to the half dtype and kept so for backward,
    a half-precision output -- with the products of forward and backward in fp32 against the
    fp32 master weight. Used where half-precision GEMMs are slower than fp32 ones; the
    results are more exact than autocast's, and the saved activation is as small.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                dtype: torch.dtype) -> torch.Tensor:
        x_half = x.to(dtype)  # (..., k): what autocast would multiply and save
        ctx.save_for_backward(x_half, weight)
        ctx.has_bias, ctx.x_dtype = bias is not None, x.dtype
        with torch.autocast("cpu", enabled=False):
            return F.linear(x_half.float(), weight, bias).to(dtype)  # (..., n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x_half, weight = ctx.saved_tensors
        k, n = weight.shape[1], weight.shape[0]
        with torch.autocast("cpu", enabled=False):
            g = grad.reshape(-1, n).float()  # (rows, n)
            grad_x = (g @ weight).to(ctx.x_dtype).view(*grad.shape[:-1], k) if ctx.needs_input_grad[0] else None
            grad_w = g.t() @ x_half.reshape(-1, k).float() if ctx.needs_input_grad[1] else None  # (n, k) fp32
            grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in fp32, block by block, written into a half-precision output.

    The fp32 copies live one block at a time -- WEIGHT_BLOCK elements of the weight (a block of
    output features), ROW_BLOCK of the input and of the product (a block of rows) -- so the
    extra memory stays under ~32 MB whatever the batch.
    """
    k, n = x.shape[-1], weight.shape[0]
    flat = x.reshape(-1, k)  # (rows, k)
    rows = flat.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)  # (rows, n)
    col_step = max(1, min(n, WEIGHT_BLOCK // k))  # output features per weight block
    row_step = max(1, min(ROW_BLOCK // col_step, ROW_BLOCK // k))  # rows per input/product block
    product = torch.empty(min(rows, row_step) * col_step, dtype=torch.float32, device=x.device)
    for c0 in range(0, n, col_step):
        c1 = min(c0 + col_step, n)
        w = weight[c0:c1].float()  # (cb, k)
        b = bias[c0:c1].float() if bias is not None else None
        for r0 in range(0, rows, row_step):
            r1 = min(r0 + row_step, rows)
            block = product[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
            if b is not None:
                torch.addmm(b, flat[r0:r1].float(), w.t(), out=block)
            else:
                torch.mm(flat[r0:r1].float(), w.t(), out=block)
            out[r0:r1, c0:c1].copy_(block)
    return out.view(*x.shape[:-1], n)


class CpuLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose products go through :func:`linear` (same parameters, same state dict).

    :func:`~megabert.fast_paths.apply_cpu_fast_paths` turns a model's ``nn.Linear`` modules into
    this class in place; ``half_matmul`` is the policy it was given.
    """

    half_matmul: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.half_matmul)
