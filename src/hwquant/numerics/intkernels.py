"""Native kernels of the integer reference model (:mod:`hwquant.export.intops`): requantization and the
integer add, each one pass over int64 tensors instead of the six to eight torch ops of their oracle.

``requant``: ``clamp(rshift_rne(v * m, n), lo, hi)`` with one multiplier ``m`` and shift ``n`` per channel along
dim 1 (or one); ``add``: ``a * k_a + b * k_b`` with integer factors per channel.  Both are exact integer
arithmetic (the caller guarantees the products stay below 2^62), so the kernel and the torch path give the
same integers on any thread count; :func:`int_self_test` compares them on ties, zero shifts, saturation and
both memory layouts before the library is used (part of :func:`hwquant.numerics.fused.native_kernels`'s
self-test).  Where a kernel does not apply (no library, a tensor that is not a dense int64 CPU tensor, a
trace) the wrappers return ``None`` and the caller runs the torch path.
"""

from __future__ import annotations

import torch

from . import native
from .window import rshift_rne

__all__ = ["add_native", "int_self_test", "requant_native"]


def _layout(v: torch.Tensor, per_channel: bool) -> tuple[int, int, int] | None:
    """``(outer, C, inner)`` for walking ``v`` as one dense block with the channel along dim 1, or ``None``."""
    if not per_channel:
        return (1, 1, v.numel()) if native.dense(v) else None  # elementwise: any dense layout
    if v.dim() < 2:
        return None
    c = v.shape[1]
    if v.is_contiguous():
        return v.shape[0], c, v.numel() // max(1, v.shape[0] * c)
    if v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last):
        return v.numel() // max(1, c), c, 1
    return None


def requant_native(v: torch.Tensor, m: torch.Tensor, n: torch.Tensor, lo: int, hi: int) -> torch.Tensor | None:
    """``clamp(rshift_rne(v * m, n), lo, hi)`` in one pass of the native kernel (``m``, ``n``: one int64 per
    channel along dim 1, or one), or ``None`` where it does not apply (no kernel library, not a dense int64
    CPU tensor, tracing): then the caller runs the torch path.  The caller guarantees ``|v * m| < 2^62``;
    the kernel's self-test compares it with :func:`rshift_rne` (:func:`int_self_test`)."""
    if v.dtype != torch.int64 or v.device.type != "cpu" or native.compiling() or v.numel() == 0:
        return None
    layout = _layout(v, m.numel() > 1)
    if layout is None:
        return None
    lib = _library()
    return None if lib is None else _run_requant(lib, v, m, n, lo, hi, layout)


def add_native(a: torch.Tensor, b: torch.Tensor, ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor | None:
    """``a * ka + b * kb`` in one pass of the native kernel (``ka``, ``kb``: one int64 per channel along dim 1,
    or one; ``a`` and ``b`` of one shape and memory layout), or ``None`` where it does not apply."""
    if (a.dtype != torch.int64 or b.dtype != torch.int64 or a.device.type != "cpu" or b.device.type != "cpu"
            or a.shape != b.shape or a.stride() != b.stride() or native.compiling() or a.numel() == 0):
        return None
    c = max(ka.numel(), kb.numel())
    layout = _layout(a, c > 1)
    if layout is None or (c > 1 and layout[1] != c):
        return None
    lib = _library()
    return None if lib is None else _run_add(lib, a, b, ka, kb, layout)


def _library():
    from .fused import native_kernels  # the one self-tested library (fused imports this module)

    return native_kernels()


def _vector(k: torch.Tensor, c: int) -> torch.Tensor:
    k = k.to(torch.int64).reshape(-1)
    return (k.expand(c) if k.numel() != c else k).contiguous()


def _run_add(lib, a, b, ka, kb, layout) -> torch.Tensor:
    outer, c, inner = layout
    ka, kb = _vector(ka, c), _vector(kb, c)
    out = torch.empty_like(a)
    lib.hwq_add2(a.data_ptr(), b.data_ptr(), out.data_ptr(), outer, c, inner, ka.data_ptr(), kb.data_ptr(),
                 native.threads())
    return out


def _run_requant(lib, v, m, n, lo, hi, layout) -> torch.Tensor:
    outer, c, inner = layout
    m, n = _vector(m, c), _vector(n, c)
    q = torch.empty_like(v)
    lib.hwq_requant(v.data_ptr(), q.data_ptr(), outer, c, inner, m.data_ptr(), n.data_ptr(), int(lo), int(hi),
                    native.threads())
    return q


def int_self_test(lib) -> str | None:
    """Compare the native requantization and add with the torch path on awkward values (ties of every sign,
    ``n = 0``, wide shifts, saturation, negative factors, per channel in both layouts); ``None`` if equal."""
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([0, 1, 2, 7, 20, 33], dtype=torch.int64)
    m = torch.tensor([1, 3, 5, 127, 1_048_577, 2**31 - 1], dtype=torch.int64)
    # values whose products sit exactly on ties (odd multiples of 2^(n-1)) and around them, and random ones
    v = torch.randint(-2**28, 2**28, (4, 6, 5, 7), generator=g, dtype=torch.int64)
    v[0, :, 0, :3] = torch.tensor([-3, -1, 1])
    for layout_v in (v, v.contiguous(memory_format=torch.channels_last)):
        ref = rshift_rne(layout_v * m.view(1, -1, 1, 1), n.view(1, -1, 1, 1)).clamp_(-2**40, 2**40)
        got = _run_requant(lib, layout_v, m, n, -2**40, 2**40, _layout(layout_v, True))
        if not torch.equal(got, ref):
            return "requant kernel differs from the torch path (per channel)"
    flat = torch.cat([torch.arange(-64, 65, dtype=torch.int64), v.reshape(-1)])
    for mm, nn_ in ((3, 2), (1, 0), (2**31 - 1, 40)):
        ref = rshift_rne(flat * mm, nn_).clamp_(-128, 127)
        got = _run_requant(lib, flat, torch.tensor([mm]), torch.tensor([nn_]), -128, 127, (1, 1, flat.numel()))
        if not torch.equal(got, ref):
            return f"requant kernel differs from the torch path (multiplier {mm}, shift {nn_})"
    ka, kb = torch.tensor([1, -3, 65536, 7, 1, 2**20], dtype=torch.int64), torch.tensor([5], dtype=torch.int64)
    for x in (v, v.contiguous(memory_format=torch.channels_last)):
        y = x.flip(0).contiguous(memory_format=torch.channels_last if x is not v else torch.contiguous_format)
        ref = x * ka.view(1, -1, 1, 1) + y * kb
        if not torch.equal(_run_add(lib, x, y, ka, kb, _layout(x, True)), ref):
            return "add kernel differs from the torch path"
    return None
