"""A QAT weight quantizer's forward, and the bias of its layer, in one kernel call.

A QAT weight quantizer (``range_mode="dynamic"``, signed, per output channel) computes every step
``s = max(fl32(fl32(ratio * max|W|) / q), tiny)`` per channel, then quantizes ``W`` with it; the layer then
quantizes its bias at the accumulator step ``s_b = fl32(s_a * s)``.  Unfused that is a dozen small torch ops
and two autograd nodes per layer, a per-call cost paid every step whatever the batch.
:func:`fake_quantize_dynamic` does all of it in one call of the C kernel ``hwq_fq_pc_dyn``, with the
straight-through gradients: the same float32 operations, in the same order, as the torch path (``amin`` /
``amax``, ``mul``, ``div_``, ``clamp_min_``, :func:`~hwquant.numerics.fused.fake_quantize_trusted`), bit for bit
its steps, outputs and gradients (:func:`weight_self_test` checks it before the library is used).  Where the
kernel does not cover the input it returns ``None`` and the caller runs the torch path.
"""

from __future__ import annotations

import torch

from . import native
from .codes import codes_float
from .fused import _native_bwd, _use_native

__all__ = ["fake_quantize_dynamic", "weight_self_test"]

_TINY = torch.finfo(torch.float32).tiny


def _kernel(x: torch.Tensor, ratio: torch.Tensor, scale: torch.Tensor, q: float, qmin: int, qmax: int,
            want_mask: bool, bias: tuple | None = None, lib=None):
    """``(y, mask, yb, mask_b)`` (masks ``None`` without ``want_mask``; ``yb``, ``mask_b`` ``None`` without a
    bias); ``scale`` is written in place.  ``bias = (b, s_a, bqmin, bqmax)``."""
    lib = lib or native.STATE["lib"]
    y = torch.empty_like(x)
    m = torch.empty_like(x, dtype=torch.uint8) if want_mask else None
    b, sa, blo, bhi = bias if bias is not None else (None, 0.0, 0, 0)
    yb = torch.empty_like(b) if b is not None else None
    mb = torch.empty_like(b, dtype=torch.uint8) if b is not None and want_mask else None

    def ptr(t):
        return 0 if t is None else t.data_ptr()

    lib.hwq_fq_pc_dyn(x.data_ptr(), y.data_ptr(), ptr(m), x.shape[0], x.numel() // x.shape[0], ratio.data_ptr(), q,
                      _TINY, scale.data_ptr(), float(qmin), float(qmax), ptr(b), ptr(yb), ptr(mb), float(sa),
                      float(blo), float(bhi), native.threads())
    return y, m, yb, mb


class _DynamicPerChannel(torch.autograd.Function):
    """:func:`fake_quantize_dynamic` with its straight-through gradients (the steps are computed from detached
    values, so they have none)."""

    @staticmethod
    def forward(ctx, x, b, ratio, scale, q, qmin, qmax, sa, bqmin, bqmax):  # noqa: D401
        bias = None if b is None else (b, sa, bqmin, bqmax)
        y, m, yb, mb = _kernel(x, ratio, scale, q, qmin, qmax, True, bias)
        ctx.save_for_backward(m, mb)
        ctx.set_materialize_grads(False)
        return y, yb

    @staticmethod
    def backward(ctx, gy, gyb):
        m, mb = ctx.saved_tensors
        lib = native.STATE["lib"]
        gx = _native_bwd(lib, gy, m, True, None)[0] if gy is not None and ctx.needs_input_grad[0] else None
        gb = _native_bwd(lib, gyb, mb, True, None)[0] if gyb is not None and ctx.needs_input_grad[1] else None
        return gx, gb, None, None, None, None, None, None, None, None


def fake_quantize_dynamic(x: torch.Tensor, ratio: torch.Tensor, scale: torch.Tensor, q: float, qmin: int,
                          qmax: int, bias: tuple | None = None):
    """A dynamic signed per-channel quantizer's forward (a QAT weight) in one kernel call, or ``None`` where the
    kernel does not cover ``x`` (the caller's torch path runs instead).

    Per channel along axis 0 (outermost in memory): ``scale <- max(fl32(fl32(ratio * max|x|) / q), tiny)`` in
    place, then round half to even of ``x * fl32(1 / scale)``, clamped to ``qmin..qmax``, times ``scale``, with
    the straight-through gradient.  ``ratio``, ``scale``: float32, one per channel.  Returns the quantized ``x``;
    with ``bias = (b, s_a, bqmin, bqmax)`` (``b`` float32, one per channel) the pair ``(x_hat, b_hat)``, where
    ``b_hat`` is ``b`` quantized at ``fl32(s_a * scale)`` to ``bqmin..bqmax`` with its straight-through gradient.
    """
    c = x.shape[0] if x.dim() else 0
    if not (_use_native(x, 0, "nearest") and ratio.dtype == scale.dtype == torch.float32 and ratio.numel() == c
            and scale.numel() == c and ratio.is_contiguous() and scale.is_contiguous() and ratio.device == x.device
            and scale.device == x.device and not scale.requires_grad):
        return None
    b = None
    if bias is not None:
        b = bias[0]
        if not (b.dtype == torch.float32 and b.dim() == 1 and b.numel() == c and b.is_contiguous()
                and b.device == x.device):
            return None
    sa, bqmin, bqmax = (float(bias[1]), bias[2], bias[3]) if bias is not None else (0.0, 0, 0)
    if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
        y, yb = _DynamicPerChannel.apply(x, b, ratio, scale, float(q), qmin, qmax, sa, bqmin, bqmax)
    else:
        y, _, yb, _ = _kernel(x, ratio, scale, float(q), qmin, qmax, False, bias and (b, sa, bqmin, bqmax))
    return y if bias is None else (y, yb)


def weight_self_test(lib) -> str | None:
    """The one-call kernel against the torch ops it replaces (dead and clamped channels, clipping, the bias at
    32 bits); ``None`` if they agree bit for bit."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    w[3] = 0.0  # a dead channel: the smallest normal step
    w[5, 0, 0, 0] = 1e-42  # a channel whose step is clamped up to it
    w[5, 1:] = 0.0
    ratio = torch.rand(16, generator=g) + 0.5
    b = torch.randn(16, generator=g) * 3
    b[1] = 1e12  # clipped at 32 bits
    sa = torch.tensor(0.0371)
    ref_s = torch.maximum(w.amin(dim=(1, 2, 3)).neg_(), w.amax(dim=(1, 2, 3))).mul_(ratio).div_(15.0)
    ref_s.clamp_min_(_TINY)
    ref, ref_mask = codes_float(w, ref_s.view(-1, 1, 1, 1), None, -16, 15, "nearest", None, want_mask=True)
    ref.mul_(ref_s.view(-1, 1, 1, 1))
    sb = sa * ref_s
    ref_b, ref_bmask = codes_float(b, sb, None, -2**31, 2**31 - 1, "nearest", None, want_mask=True)
    ref_b.mul_(sb)
    scale = torch.empty(16)
    y, m, yb, mb = _kernel(w, ratio, scale, 15.0, -16, 15, True, (b, float(sa), -2**31, 2**31 - 1), lib)
    if not (torch.equal(scale, ref_s) and torch.equal(y, ref) and torch.equal(m == 1, ref_mask)):
        return "dynamic per-channel kernel differs from the torch path"
    if not (torch.equal(yb, ref_b) and torch.equal(mb == 1, ref_bmask)):
        return "dynamic per-channel kernel: the bias differs from the torch path"
    return None
