"""A ReLU whose output has two readers, one of them an activation quantizer, in one pass each way.

In a residual network the block output ``r = relu(x)`` goes to the next block's first conv (through its input
quantizer) and to the shortcut add.  Unfused, a training step makes four passes over it: ReLU, the quantizer
(output and mask), the quantizer's backward, then autograd's sum of the two gradients and ReLU's backward.
:func:`relu_fake_quantize_pair` makes one pass forward (``r``, the quantized ``y`` and one mask state) and one
backward (both gradients, the sum and ReLU's rule): the C kernels ``hwq_relu_fq2`` / ``hwq_relu_fq2_bwd``, which
compute the same float32 operations as ``torch.relu``, the quantizer's kernel and autograd's sum, so the
values and gradients are bit for bit those of the unfused ops (tested on whole models; the library's
self-test checks the kernels against torch).  Per tensor, zero point 0, round to nearest, float32 on the CPU
with the kernel library loaded; elsewhere it returns ``None`` and the caller runs the unfused ops.
:class:`hwquant.nn.relu.SharedReLU` uses it.
"""

from __future__ import annotations

import torch

from . import native
from .fused import _in_mask_layout, _native_bwd, _use_native

__all__ = ["covers", "relu_fake_quantize_pair", "relu_pair_self_test"]


def _kernel_pair(lib, x: torch.Tensor, sf: float, qmin: int, qmax: int):
    r, y = torch.empty_like(x), torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8)
    lib.hwq_relu_fq2(x.data_ptr(), r.data_ptr(), y.data_ptr(), m.data_ptr(), x.numel(), 1.0 / sf, sf, float(qmin),
                     float(qmax), native.threads())
    return r, y, m


def _kernel_backward(lib, gr: torch.Tensor | None, gy: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor | None:
    """The gradient of ``x``: what autograd computes unfused from the other reader's gradient ``gr`` and the
    quantized copy's ``gy`` (either may be missing: then no sum, as autograd does)."""
    if gr is None and gy is None:
        return None
    if gr is None:  # only the quantizer's gradient: its straight-through mask (1 implies r > 0)
        return _native_bwd(lib, gy, m, True, None)[0]
    gr = _in_mask_layout(gr, m)
    if gy is None:  # only ReLU's rule (threshold_backward: NaN passes, as state 2 does)
        return torch.where(m != 0, gr, torch.zeros((), dtype=gr.dtype))
    gy = _in_mask_layout(gy, m)
    gx = torch.empty_like(gr)
    lib.hwq_relu_fq2_bwd(gr.data_ptr(), gy.data_ptr(), m.data_ptr(), gx.data_ptr(), m.numel(), native.threads())
    return gx


class _ReluQuantPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sf, qmin, qmax):  # noqa: D401
        r, y, m = _kernel_pair(native.STATE["lib"], x, sf, qmin, qmax)
        ctx.save_for_backward(m)
        ctx.set_materialize_grads(False)
        return r, y

    @staticmethod
    def backward(ctx, gr, gy):
        (m,) = ctx.saved_tensors
        return _kernel_backward(native.STATE["lib"], gr, gy, m), None, None, None


def covers(x: torch.Tensor) -> bool:
    """Whether :func:`relu_fake_quantize_pair` runs on ``x`` (float32, dense, on the CPU, the library loaded)."""
    return _use_native(x, None, "nearest")


def relu_fake_quantize_pair(x: torch.Tensor, s: float, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), fake_quantize(relu(x)))`` with step ``s`` (zero point 0) and the gradients of both, in one
    pass each way (see the module docstring).  Only where :func:`covers` says so."""
    return _ReluQuantPair.apply(x, float(s), qmin, qmax)


def relu_pair_self_test(lib) -> str | None:
    """The pair kernels against ``torch.relu``, the quantizer's torch ops and autograd's sum on awkward values
    (ties, clipping, NaN, -0.0); ``None`` if they agree bit for bit."""
    from .codes import codes_float

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(70_000, generator=g) * 4, torch.arange(-8, 40, dtype=torch.float32) * 0.125 + 0.0625,
                   torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e30, -1e-30])])
    s = torch.tensor(0.125)
    r_ref = torch.relu(x)
    y_ref, in_range = codes_float(r_ref, s, None, 0, 15, "nearest", None, want_mask=True)
    y_ref.mul_(s)
    r, y, m = _kernel_pair(lib, x, float(s), 0, 15)
    if not (torch.equal(torch.signbit(r), torch.signbit(r_ref)) and torch.equal(r.nan_to_num(7.5),
                                                                               r_ref.nan_to_num(7.5))
            and torch.equal(y.nan_to_num(7.5), y_ref.nan_to_num(7.5))):
        return "ReLU pair kernel: values differ from torch.relu and the quantizer's torch ops"
    gr, gy = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    want = torch.ops.aten.threshold_backward(gr + torch.where(in_range, gy, 0.0), r_ref, 0)
    gx = torch.empty_like(x)
    lib.hwq_relu_fq2_bwd(gr.data_ptr(), gy.data_ptr(), m.data_ptr(), gx.data_ptr(), x.numel(), native.threads())
    if not (torch.equal(gx, want) and torch.equal(torch.signbit(gx), torch.signbit(want))):
        return "ReLU pair kernel: gradients differ from autograd's (straight-through, sum, ReLU)"
    return None
