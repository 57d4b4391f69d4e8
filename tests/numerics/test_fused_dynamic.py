"""A QAT weight quantizer's forward in one kernel call (``fake_quantize_dynamic``: the per-channel step from the
weights' peak and the quantization) against the torch ops it replaces, bit for bit; the self-test refuses a
kernel that computes the step another way; a QAT model takes the one-call path and trains the same without it."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
import torch.nn.functional as F

import hwquant as hq
from hwquant.models import create_model
from hwquant.nn import fold_batchnorm, quantizer
from hwquant.numerics import fused, fused_weight

TINY = torch.finfo(torch.float32).tiny


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 5, 3, 3, generator=g) * torch.logspace(-3, 1, 12).view(-1, 1, 1, 1)
    w[2] = 0.0  # a dead channel: the smallest normal step
    w[4] = 0.0
    w[4, 0, 1, 1] = -1e-41  # a step clamped up to it
    w[6, 1] = torch.tensor([0.25, -0.25, 0.75]).view(3, 1)  # ties at a step of 0.5 (ratio 0.5, peak q)
    w[6, 0, 0, 0] = -15.0
    return w


def _oracle(w: torch.Tensor, ratio: torch.Tensor, q: float, lo: int, hi: int):
    """The torch ops: ``max|w|`` per channel, ``ratio * peak / q`` (float32), clamped to the smallest normal,
    round half to even of ``w * fl32(1 / s)``, clamp, ``* s``; the straight-through mask."""
    s = torch.maximum(w.amin(dim=(1, 2, 3)).neg(), w.amax(dim=(1, 2, 3))) * ratio / q
    s = s.clamp_min(TINY).view(-1, 1, 1, 1)
    code = torch.round(w * torch.reciprocal(s))
    return s.view(-1), code.clamp(lo, hi) * s, (code >= lo) & (code <= hi)


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_call_weight_quantizer_equals_the_torch_ops(channels_last):
    if fused.native_kernels() is None:
        pytest.skip("no native kernel library on this machine (the torch path runs instead)")
    w = _weights()
    ratio = torch.rand(12, generator=torch.Generator().manual_seed(1)) + 0.5
    ratio[6] = 0.5  # step 15 * 0.5 / 15: -15 clips at -16
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    s_ref, y_ref, mask = _oracle(w, ratio, 15.0, -16, 15)
    wg = w.clone().requires_grad_()
    scale = torch.empty(12)
    y = fused_weight.fake_quantize_dynamic(wg, ratio, scale, 15, -16, 15)
    assert y is not None and torch.equal(scale, s_ref) and torch.equal(y, y_ref)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(2))
    y.backward(g)
    assert torch.equal(wg.grad, g * mask)
    assert mask[6].sum() < mask[6].numel()  # the hand case clips: the mask is not all ones
    scale2 = torch.empty(12)
    with torch.no_grad():
        assert torch.equal(fused_weight.fake_quantize_dynamic(w, ratio, scale2, 15, -16, 15), y_ref)
    assert torch.equal(scale2, s_ref)


def test_one_call_declines_what_it_does_not_cover():
    w = _weights()
    ratio, scale = torch.ones(12), torch.empty(12)
    assert fused_weight.fake_quantize_dynamic(w.double(), ratio, scale, 15, -16, 15) is None
    assert fused_weight.fake_quantize_dynamic(w, torch.ones(11), scale, 15, -16, 15) is None
    assert fused_weight.fake_quantize_dynamic(w.transpose(0, 1), torch.ones(5), torch.empty(5), 15, -16, 15) is None


def test_self_test_refuses_a_step_computed_with_a_reciprocal():
    """``ratio * p * fl32(1 / q)`` is not ``ratio * p / q`` in float32 for every value: a kernel that computes
    the step that way is caught before it is used."""
    lib = fused.native_kernels()
    if lib is None:
        pytest.skip("no native kernel library on this machine")

    class Reciprocal:
        def __getattr__(self, name):
            if name != "hwq_fq_pc_dyn":
                return getattr(lib, name)

            def wrong(xp, yp, mp, c, inner, rp, q, tiny, sp, lo, hi, *bias_and_nt):
                lib.hwq_fq_pc_dyn(xp, yp, mp, c, inner, rp, 1.0, tiny, sp, lo, hi, *bias_and_nt)  # steps ratio * p
                s = torch.frombuffer((ctypes.c_float * c).from_address(sp), dtype=torch.float32)
                s.mul_(torch.reciprocal(torch.tensor(q, dtype=torch.float32)))
            return wrong

    assert fused._native_self_test(lib) is None
    assert "dynamic per-channel" in fused._native_self_test(Reciprocal())
    assert "dynamic per-channel" in fused_weight.weight_self_test(Reciprocal())


def test_qat_weights_take_the_one_call_path_and_train_as_on_the_torch_path(monkeypatch):
    """ResNet-20 under CQAT: every weight quantizer's forward is one call, and three SGD steps give the same
    outputs, gradients and state, bit for bit, as with the torch ops of the same quantizers."""
    if fused.native_kernels() is None:
        pytest.skip("no native kernel library on this machine")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(0)
    a = hq.prepare_qat(fold_batchnorm(create_model("resnet20", in_channels=1, num_classes=10)), hq.CQATConfig(),
                       [x]).train().to(memory_format=torch.channels_last)
    b = copy.deepcopy(a)
    real = quantizer.fake_quantize_dynamic
    ran = []

    def run(model, one_call):
        monkeypatch.setattr(quantizer, "fake_quantize_dynamic", (lambda *args, **kw: ran.append(kw) or real(
            *args, **kw)) if one_call else (lambda *args, **kw: None))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        outs = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            out = model(x)
            F.cross_entropy(out, y).backward()
            outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
            opt.step()
        return outs

    oa, ob = run(a, True), run(b, False)
    layers = list(hq.nn.quant_layers(a))
    assert len(ran) == 3 * len(layers)  # one call a layer: the weight, with its bias where it has one
    assert sum(kw.get("bias") is not None for kw in ran) == 3 * sum(m.bias is not None for _, m in layers) > 0
    for (ua, ga), (ub, gb) in zip(oa, ob, strict=True):
        assert torch.equal(ua, ub) and all(torch.equal(p, q) for p, q in zip(ga, gb, strict=True))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def test_one_call_quantizes_the_bias_at_the_accumulator_step():
    """With the bias: ``b`` quantized at ``fl32(s_a * s_w)`` to 32-bit codes (three clipped), against torch ops,
    with the straight-through gradient; the weight part is unchanged."""
    if fused.native_kernels() is None:
        pytest.skip("no native kernel library on this machine")
    w = _weights()
    ratio = torch.rand(12, generator=torch.Generator().manual_seed(1)) + 0.5
    b = torch.randn(12, generator=torch.Generator().manual_seed(3))
    b[7] = 3e12  # beyond 2^31 steps: clipped
    s_a = torch.tensor(0.0625)
    s_ref, y_ref, _ = _oracle(w, ratio, 15.0, -16, 15)
    sb = s_a * s_ref
    code = torch.round(b * torch.reciprocal(sb))
    b_ref = code.clamp(-2**31, 2**31 - 1) * sb
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    scale = torch.empty(12)
    y, yb = fused_weight.fake_quantize_dynamic(wg, ratio, scale, 15, -16, 15, bias=(bg, s_a, -2**31, 2**31 - 1))
    assert torch.equal(scale, s_ref) and torch.equal(y, y_ref) and torch.equal(yb, b_ref)
    gb = torch.randn(12, generator=torch.Generator().manual_seed(4))
    yb.backward(gb)
    inside = (code >= -2**31) & (code <= 2**31 - 1)
    # clipped: channel 7, and the dead channels 2 and 4, whose step s_a * tiny leaves every nonzero bias far out
    assert not inside[[2, 4, 7]].any() and inside.sum() == 9 and torch.equal(bg.grad, gb * inside)
