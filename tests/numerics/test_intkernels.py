"""The integer model's native kernels (requant, add) against exact rational arithmetic and torch ops; the
self-test that guards them fails on a wrong kernel."""

from __future__ import annotations

import ctypes
from fractions import Fraction

import pytest
import torch

from hwquant.numerics.fused import native_kernels
from hwquant.numerics.intkernels import add_native, int_self_test, requant_native


def test_native_requant_equals_exact_rational_rounding():
    """The integer model's one-pass requantization kernel against exact rational arithmetic (Fraction, round half
    to even), per tensor and per channel in both memory layouts, ties included; and it really ran natively."""
    if native_kernels() is None:
        pytest.skip("no native kernel library on this machine (the torch path is the oracle elsewhere)")
    g = torch.Generator().manual_seed(3)
    v = torch.randint(-5000, 5000, (2, 3, 4, 5), generator=g, dtype=torch.int64)
    v[0, :, 0, :4] = torch.tensor([-6, -2, 2, 6])  # ties for n = 2, m = 1 (and m = 3: -18/4 ...)
    m = torch.tensor([1, 3, 12345], dtype=torch.int64)
    n = torch.tensor([2, 2, 17], dtype=torch.int64)
    for x in (v, v.contiguous(memory_format=torch.channels_last)):
        got = requant_native(x, m, n, -100, 100)
        assert got is not None
        want = [max(-100, min(100, round(Fraction(a * int(m[i // 20 % 3]), 2 ** int(n[i // 20 % 3])))))
                for i, a in enumerate(v.reshape(-1).tolist())]  # channel of flat index i: (i // (4 * 5)) % 3
        assert got.contiguous().reshape(-1).tolist() == want  # Python's round() is half to even
    one = requant_native(v, torch.tensor([5]), torch.tensor([3]), -8, 7)
    assert one.reshape(-1).tolist() == [max(-8, min(7, round(Fraction(a * 5, 8)))) for a in v.reshape(-1).tolist()]
    assert requant_native(v.float(), m, n, -100, 100) is None  # not int64: the caller's torch path


def test_requant_self_test_catches_a_wrong_kernel():
    class Truncating:  # rounds toward -inf instead of half to even
        @staticmethod
        def hwq_requant(vp, qp, outer, c, inner, mp, np_, lo, hi, nt):
            count = outer * c * inner
            v = torch.frombuffer((ctypes.c_int64 * count).from_address(vp), dtype=torch.int64)
            q = torch.frombuffer((ctypes.c_int64 * count).from_address(qp), dtype=torch.int64)
            mm = torch.frombuffer((ctypes.c_int64 * c).from_address(mp), dtype=torch.int64)
            nn_ = torch.frombuffer((ctypes.c_int64 * c).from_address(np_), dtype=torch.int64)
            ch = (torch.arange(count) // inner) % c
            q.copy_(torch.bitwise_right_shift(v * mm[ch], nn_[ch]).clamp(lo, hi))

    assert int_self_test(Truncating()) is not None


def test_native_add_equals_torch_ops_and_declines_mixed_layouts():
    if native_kernels() is None:
        pytest.skip("no native kernel library on this machine")
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-2**30, 2**30, (3, 4, 5, 6), generator=g, dtype=torch.int64)
    b = torch.randint(-2**30, 2**30, (3, 4, 5, 6), generator=g, dtype=torch.int64)
    ka, kb = torch.tensor([1, -2, 3, 2**16], dtype=torch.int64), torch.tensor([7], dtype=torch.int64)
    want = a * ka.view(1, -1, 1, 1) + b * 7
    assert torch.equal(add_native(a, b, ka, kb), want)
    cl = torch.channels_last
    assert torch.equal(add_native(a.contiguous(memory_format=cl), b.contiguous(memory_format=cl), ka, kb), want)
    assert add_native(a.contiguous(memory_format=cl), b, ka, kb) is None  # layouts differ: the torch path
    assert add_native(a[:, :3], b[:, :3], ka, kb) is None  # not dense
