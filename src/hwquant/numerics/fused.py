"""Fused fake quantization: one pass writes the output and the straight-through mask, one pass the gradient.

The per-tensor (and outer-axis per-channel), round-to-nearest, float32 CPU case - every activation and weight
quantizer of a QAT model - runs the C kernels of ``csrc/hwq_kernels.c`` (built, cached and loaded by
:mod:`hwquant.numerics.native`): one pass writes the output and a one-byte mask state, and the backward is one
pass over the gradient and the mask.  They compute the same float32 operations as the torch code of
:func:`hwquant.numerics.codes.codes_float` (``x * r``, round half to even, clamp, ``* s``), and a self-test
against that torch path runs before they are used; when no compiler is found, the build or the self-test
fails, or ``HWQUANT_NATIVE=0`` is set, everything runs on the torch path (:func:`native_status`).  Other
roundings or dtypes, per-channel scales along an inner axis and accelerators use the torch path.

Under ``torch.compile`` / ``torch.export`` the same computation is the registered operators
``hwquant::fake_quant``, ``hwquant::fake_quant_per_channel`` and their backwards (a fake implementation gives
the graph their shapes; no graph break); eager code calls the kernels through :class:`FakeQuantSTE` directly,
which costs less per call than the operator dispatch.  The public entry point is :func:`fake_quantize_trusted`
(re-exported by :mod:`hwquant.numerics.uniform`).
"""

from __future__ import annotations

import torch

from . import native
from .codes import codes_float

__all__ = ["FakeQuantSTE", "fake_quantize_trusted", "native_kernels", "native_status"]


# ----------------------------------------------------------------------------------------- native kernels
def _native_self_test(lib) -> str | None:
    """Compare the kernel with the torch path on awkward values (ties, clipping, NaN, inf); ``None`` if equal."""
    g = torch.Generator().manual_seed(0)
    ties = torch.arange(-40, 40, dtype=torch.float32) + 0.5
    x = torch.cat([torch.randn(70_000, generator=g) * 20, ties, torch.tensor([float("nan"), float("inf"),
                   -float("inf"), -0.0, 0.0, 1e30, -1e30])])
    for s, z, lo, hi in ((1.0, 0, -8, 7), (0.37, 0, 0, 15), (0.05, 3, 0, 255), (2.0**-5, 0, -16, 15)):
        st = torch.tensor(s, dtype=torch.float32)
        zt = None if z == 0 else torch.tensor(float(z))
        ref, ref_mask = codes_float(x, st, zt, lo, hi, "nearest", None, want_mask=True)
        if zt is not None:
            ref.sub_(zt)
        ref.mul_(st)
        y = torch.empty_like(x)
        m = torch.empty(x.shape, dtype=torch.uint8)
        lib.hwq_fq(x.data_ptr(), y.data_ptr(), m.data_ptr(), x.numel(), 1.0 / float(st), float(st), float(z),
                   int(z != 0), float(lo), float(hi), max(1, torch.get_num_threads()))
        same = torch.equal(torch.nan_to_num(y, nan=7.5), torch.nan_to_num(ref, nan=7.5))
        if not same or not torch.equal(m == 1, ref_mask):
            return f"kernel differs from the torch path (scale {s}, zero point {z}, codes {lo}..{hi})"
        if z == 0:  # ReLU then quantization in one pass: torch.relu, the codes, and ReLU's gradient rule
            xr = torch.relu(x)
            ref, ref_mask = codes_float(xr, st, None, lo, hi, "nearest", None, want_mask=True)
            ref.mul_(st)
            ref_mask &= xr > 0
            y, m = _native_fq(x, float(st), 0.0, lo, hi, True, relu=True, lib=lib)
            if not torch.equal(torch.nan_to_num(y, nan=7.5), torch.nan_to_num(ref, nan=7.5)) or \
                    not torch.equal(torch.signbit(y), torch.signbit(ref)) or not torch.equal(m == 1, ref_mask):
                return f"ReLU kernel differs from torch.relu and the torch path (scale {s}, codes {lo}..{hi})"
    w = torch.randn(16, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    sc = torch.rand(16, generator=g) * 0.2 + 1e-3
    ref, ref_mask = codes_float(w, sc.view(-1, 1, 1, 1), None, -16, 15, "nearest", None, want_mask=True)
    ref.mul_(sc.view(-1, 1, 1, 1))
    y, m = _native_fq_pc(w, sc, -16, 15, True, lib)
    if not torch.equal(y, ref) or not torch.equal(m == 1, ref_mask):
        return "per-channel kernel differs from the torch path"
    from .fused_relu import relu_pair_self_test  # (these modules import this one)
    from .fused_weight import weight_self_test
    from .intkernels import int_self_test

    return weight_self_test(lib) or relu_pair_self_test(lib) or int_self_test(lib)


def native_kernels():
    """The loaded kernel library, self-tested against this module's torch path, or ``None`` (then the torch
    path runs; see :func:`hwquant.numerics.native.library`)."""
    return native.library(_native_self_test)


def native_status() -> dict:
    """``{"available", "path", "reason"}`` of the fused C kernel (builds it on first call)."""
    lib = native_kernels()
    return {"available": lib is not None, "path": native.STATE["path"], "reason": native.STATE["reason"]}


def _outer_blocks(x: torch.Tensor, axis: int) -> bool:
    """Is ``axis`` the outermost memory dimension, so each channel is one contiguous block?"""
    return axis % x.dim() == 0 and x.shape[0] > 0 and x.stride(0) * x.shape[0] == x.numel()


def _use_native(x: torch.Tensor, axis, rounding: str) -> bool:
    return (
        (axis is None or _outer_blocks(x, axis))
        and rounding == "nearest"
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.numel() > 0
        and native.dense(x)
        and not native.compiling()
        and native_kernels() is not None
    )


def _grad_like(grad: torch.Tensor, m: torch.Tensor) -> bool:
    """Can the kernel read ``grad`` element for element alongside the mask ``m``?"""
    return grad.dtype == torch.float32 and grad.device.type == "cpu" and grad.stride() == m.stride()


def _in_mask_layout(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``g`` as float32 in the mask ``m``'s memory layout (the kernels walk both element for element)."""
    return g if _grad_like(g, m) else g.to(torch.float32).contiguous(memory_format=_format_of(m))


def _native_fq_pc(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int, want_mask: bool, lib=None):
    """Per-channel kernel forward (axis 0 outermost in memory, zero point 0): ``(y, mask state or None)``."""
    lib = lib or native.STATE["lib"]
    s = s.reshape(-1).to(torch.float32).contiguous()
    r = torch.reciprocal(s)
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    lib.hwq_fq_pc(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(), x.shape[0], x.numel() // x.shape[0],
                  r.data_ptr(), s.data_ptr(), float(qmin), float(qmax), native.threads())
    return y, m


def _native_fq(x: torch.Tensor, sf: float, zf: float, qmin: int, qmax: int, want_mask: bool, relu: bool = False,
               lib=None):
    """Kernel forward: ``(y, mask state or None)``; ``sf`` / ``zf`` are the float32 scale and zero point.
    ``relu``: quantize ``relu(x)`` (zero point 0), the mask state also holding ReLU's gradient rule."""
    lib = lib or native.STATE["lib"]
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    if relu:
        lib.hwq_fq_relu(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(), x.numel(), 1.0 / sf, sf,
                        float(qmin), float(qmax), native.threads())
        return y, m
    lib.hwq_fq(x.data_ptr(), y.data_ptr(), 0 if m is None else m.data_ptr(), x.numel(), 1.0 / sf, sf,
               zf, int(zf != 0.0), float(qmin), float(qmax), native.threads())
    return y, m


def _native_bwd(lib, grad: torch.Tensor, m: torch.Tensor, want_x: bool, scale: tuple | None, x=None):
    """The kernel backward: ``(grad_x or None, grad_s or None)``.  ``grad_x`` is ``grad`` where the mask state
    ``m`` is 1 (in ``m``'s layout); with ``scale = (r, zf, qmin, qmax, lsq)`` also the summed scale gradient
    (LSQ's, or PACT's clip part) from the saved input ``x``."""
    grad = _in_mask_layout(grad, m)
    grad_x = torch.empty_like(grad) if want_x else None
    if scale is not None:
        r, zf, lo, hi, lsq = scale
        acc = lib.hwq_scale_bwd(grad.data_ptr(), x.data_ptr(), m.data_ptr(), 0 if grad_x is None else grad_x.data_ptr(),
                                m.numel(), r, zf, lo, hi, int(lsq), native.threads())
        return grad_x, torch.tensor(acc, dtype=torch.float32)
    if want_x:
        lib.hwq_mask_bwd(grad.data_ptr(), m.data_ptr(), grad_x.data_ptr(), m.numel(), native.threads())
    return grad_x, None


# ---------------------------------------------------------------------------- torch.library operators
# The fused fake quantization as PyTorch operators, so that ``torch.compile`` / ``torch.export`` see one opaque
# node with a shape function (the fake implementation) instead of a ctypes call they cannot trace.  Each runs
# the C kernel when it is available and the torch path otherwise, with the same results (tested); eager code
# calls the kernels through :class:`FakeQuantSTE` directly, which costs less per call than the operator
# dispatch.  Masks are ``uint8`` (1: the code is in range), the kernel's mask state.
@torch.library.custom_op("hwquant::fake_quant", mutates_args=())
def _fq_op(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, qmin: int, qmax: int,
           lsq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fake quantization, round half to even: ``(y, mask)``.  ``lsq`` only shapes the backward."""
    if native_kernels() is not None and native.dense(x):
        return _native_fq(x, float(s), 0.0 if z is None else float(z), qmin, qmax, want_mask=True)
    t, mask = codes_float(x, s, z, qmin, qmax, "nearest", None, want_mask=True)
    if z is not None:
        t.sub_(z)
    return t.mul_(s), mask.view(torch.uint8)


@_fq_op.register_fake
def _(x, s, z, qmin, qmax, lsq):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op("hwquant::fake_quant_per_channel", mutates_args=())
def _fq_pc_op(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel fake quantization along axis 0 (outermost in memory), zero point 0: ``(y, mask)``."""
    if native_kernels() is not None and native.dense(x):
        return _native_fq_pc(x, s, qmin, qmax, want_mask=True)
    sv = s.reshape([-1] + [1] * (x.dim() - 1))
    t, mask = codes_float(x, sv, None, qmin, qmax, "nearest", None, want_mask=True)
    return t.mul_(sv), mask.view(torch.uint8)


@_fq_pc_op.register_fake
def _(x, s, qmin, qmax):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.uint8)


@torch.library.custom_op("hwquant::fake_quant_backward", mutates_args=())
def _fq_bwd_op(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The straight-through gradient: ``grad`` where the code is in range, 0 elsewhere (``mask``'s layout)."""
    lib = native_kernels()
    if lib is not None and mask.device.type == "cpu" and native.dense(mask):
        return _native_bwd(lib, grad, mask, True, None)[0]
    out = torch.empty_like(mask, dtype=torch.float32)
    return torch.mul(grad, mask, out=out)


@_fq_bwd_op.register_fake
def _(grad, mask):
    return torch.empty_like(mask, dtype=torch.float32)


@torch.library.custom_op("hwquant::fake_quant_scale_backward", mutates_args=())
def _fq_scale_bwd_op(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, s: torch.Tensor,
                     z: torch.Tensor | None, qmin: int, qmax: int, lsq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_s)`` of per-tensor fake quantization with a learned scale: the STE gradient and the LSQ
    gradient of ``s`` (``lsq=False``: its clip part only, PACT's)."""
    lib = native_kernels()
    if lib is not None and native.dense(mask):
        zf = 0.0 if z is None else float(z)
        grad_x, grad_s = _native_bwd(lib, grad, mask, True, (1.0 / float(s), zf, float(qmin), float(qmax), lsq), x)
        return grad_x, grad_s.reshape(s.shape)
    t, m = codes_float(x, s, z, qmin, qmax, "nearest", None, want_mask=True)
    if z is not None:
        t.sub_(z)
    g_s = t - x * torch.reciprocal(s) if lsq else torch.zeros((), dtype=t.dtype)
    g_s = torch.where(m, g_s, t)
    grad_x = torch.empty_like(mask, dtype=torch.float32)
    torch.mul(grad, m, out=grad_x)
    return grad_x, (grad * g_s).sum().reshape(s.shape).to(torch.float32)


@_fq_scale_bwd_op.register_fake
def _(grad, x, mask, s, z, qmin, qmax, lsq):
    return torch.empty_like(mask, dtype=torch.float32), torch.empty_like(s, dtype=torch.float32)


def _fq_setup(ctx, inputs, output) -> None:
    x, s, z, qmin, qmax, lsq = inputs
    ctx.consts = (qmin, qmax, lsq)
    ctx.save_for_backward(output[1], x if ctx.needs_input_grad[1] else None, s, z)


def _fq_backward(ctx, grad, _grad_mask):
    mask, x, s, z = ctx.saved_tensors
    qmin, qmax, lsq = ctx.consts
    if ctx.needs_input_grad[1]:
        gx, gs = torch.ops.hwquant.fake_quant_scale_backward(grad, x, mask, s, z, qmin, qmax, lsq)
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None, None
    gx = torch.ops.hwquant.fake_quant_backward(grad, mask) if ctx.needs_input_grad[0] else None
    return gx, None, None, None, None, None


def _fq_pc_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])


def _fq_pc_backward(ctx, grad, _grad_mask):
    (mask,) = ctx.saved_tensors
    gx = torch.ops.hwquant.fake_quant_backward(grad, mask) if ctx.needs_input_grad[0] else None
    return gx, None, None, None


_fq_op.register_autograd(_fq_backward, setup_context=_fq_setup)
_fq_pc_op.register_autograd(_fq_pc_backward, setup_context=_fq_pc_setup)


def _op_covers(x: torch.Tensor, axis, rounding: str, z, scale_grad: bool) -> bool:
    """The cases the operators cover, from static properties only (so ``torch.compile`` traces one path):
    round to nearest, float32 on the CPU, a dense layout, per tensor, or per channel along the outermost
    memory axis with zero point 0 and no scale gradient."""
    if not (rounding == "nearest" and x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0
            and native.dense(x)):
        return False
    return axis is None or (_outer_blocks(x, axis) and z is None and not scale_grad)


class FakeQuantSTE(torch.autograd.Function):
    """Fused fake quantization: one pass computes the output and the STE mask; backward reuses the mask.

    Two implementations with identical results: the C kernel (mask state ``uint8``: 1 = in range) and torch
    ops (``bool`` mask).  With a scale that requires grad its gradient is computed as well: the LSQ gradient
    (``lsq=True``) or its clip-only part (``lsq=False``: PACT, zero inside the code range).
    """

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, rounding, generator, axis, lsq=True, relu=False):  # noqa: D401
        scale_grad = ctx.needs_input_grad[1]
        ctx.lsq = lsq
        ctx.axis = axis
        ctx.scale_shape = s.shape
        # per-channel kernel: zero point 0 and no scale gradient (LSQ per channel runs on torch ops)
        ctx.native = _use_native(x, axis, rounding) and (axis is None or (z is None and not scale_grad))
        if ctx.native and axis is not None:
            y, m = _native_fq_pc(x, s, qmin, qmax, want_mask=True)
            ctx.save_for_backward(m, None)
            return y
        if ctx.native:
            sf = float(s)
            zf = 0.0 if z is None else float(z)
            y, m = _native_fq(x, sf, zf, qmin, qmax, want_mask=True, relu=relu)
            ctx.consts = (1.0 / sf, zf, float(qmin), float(qmax))
            ctx.save_for_backward(m, x if scale_grad else None)
            return y
        t, mask = codes_float(x, s, z, qmin, qmax, rounding, generator, want_mask=True)
        if z is not None:
            t.sub_(z)
        if scale_grad:
            # LSQ gradient: (q - z) - x*r inside the range, the clipped code outside (PACT: 0 inside).
            g_s = t - x * torch.reciprocal(s) if lsq else torch.zeros((), dtype=t.dtype)
            g_s = torch.where(mask, g_s, t)
            ctx.save_for_backward(mask, g_s)
        else:
            ctx.save_for_backward(mask)
        return t.mul_(s)

    @staticmethod
    def backward(ctx, grad):
        if ctx.native:
            return FakeQuantSTE._native_backward(ctx, grad)
        saved = ctx.saved_tensors
        mask = saved[0]
        grad_x = grad * mask if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            prod = grad * saved[1]
            if ctx.axis is None:
                grad_s = prod.sum().reshape(ctx.scale_shape)
            else:
                dims = [d for d in range(grad.dim()) if d != ctx.axis % grad.dim()]
                grad_s = prod.sum(dim=dims, keepdim=True).reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None, None, None, None, None, None

    @staticmethod
    def _native_backward(ctx, grad):
        m, x = ctx.saved_tensors
        scale = (*ctx.consts, ctx.lsq) if ctx.needs_input_grad[1] else None
        grad_x, grad_s = _native_bwd(native.STATE["lib"], grad, m, ctx.needs_input_grad[0], scale, x)
        if grad_s is not None:
            grad_s = grad_s.reshape(ctx.scale_shape)
        return grad_x, grad_s, None, None, None, None, None, None, None, None


def _format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def fake_quantize_trusted(
    x: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    qmin: int,
    qmax: int,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
    axis: int | None = None,
    lsq: bool = True,
    relu: bool = False,
) -> torch.Tensor:
    """:func:`fake_quantize` without argument checks, for callers that hold validated parameters.

    ``s`` (and ``z``, or ``None`` for a zero point of 0) must already be float tensors of ``x``'s dtype shaped
    to broadcast along ``axis`` (0-d per tensor), with ``s > 0`` finite and ``z`` integer-valued in range.
    ``lsq=False`` gives a scale that requires grad only the clip part of the LSQ gradient (PACT's).

    ``relu=True`` quantizes ``torch.relu(x)``, with ReLU's gradient: where the kernel runs (per tensor, zero
    point 0, no scale gradient) in the same pass, bit for bit what ``torch.relu`` followed by this function
    computes forward and backward (the self-test checks it); elsewhere ``torch.relu`` runs first.
    """
    if relu and not (axis is None and z is None and not s.requires_grad and _use_native(x, None, rounding)):
        x, relu = torch.relu(x), False
    if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
        # No gradient wanted: skip the STE mask (most of the forward cost for cache-resident tensors).
        if _use_native(x, axis, rounding):
            if axis is None:
                return _native_fq(x, float(s), 0.0 if z is None else float(z), qmin, qmax, want_mask=False,
                                  relu=relu)[0]
            if z is None:
                return _native_fq_pc(x, s, qmin, qmax, want_mask=False)[0]
        t, _ = codes_float(x, s, z, qmin, qmax, rounding, generator, want_mask=False)
        if z is not None:
            t.sub_(z)
        return t.mul_(s)
    if native.compiling() and _op_covers(x, axis, rounding, z, s.requires_grad):
        # traced by torch.compile / torch.export: the registered operators (one node each, no graph break)
        if axis is None:
            return torch.ops.hwquant.fake_quant(x, s, z, qmin, qmax, lsq)[0]
        return torch.ops.hwquant.fake_quant_per_channel(x, s, qmin, qmax)[0]
    return FakeQuantSTE.apply(x, s, z, qmin, qmax, rounding, generator, axis, lsq, relu)
