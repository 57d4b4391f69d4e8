"""ReLUs absorbed by the input quantizers that read them (``hwquant.nn.absorb_relus``): which ReLUs qualify, the
one-pass kernel against ``torch.relu`` then the quantizer (torch ops), and whole models that train bit for bit
like the same model without absorption, on the kernel and on the torch path."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwquant as hq
from hwquant.models import create_model
from hwquant.nn import AbsorbedReLU, SharedReLU, absorb_relus, fold_batchnorm
from hwquant.numerics import fused, fused_relu, native

FakeQuantizerType = hq.nn.FakeQuantizer
AWKWARD = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), -float("inf"), -3.0, 1e-30, -1e-30, 1e30])


def _awkward(n: int = 40_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ties = (torch.arange(-20, 40, dtype=torch.float32) + 0.5) * 0.25  # exact ties of round(x / 0.25)
    return torch.cat([torch.randn(n, generator=g) * 3, ties, AWKWARD])


class _Calls:
    """A view of the kernel library that records which kernels ran."""

    def __init__(self, lib):
        self.lib, self.names = lib, []

    def __getattr__(self, name):
        self.names.append(name)
        return getattr(self.lib, name)


class _Replacing:
    """The kernel library with one kernel replaced by ``fn`` (a wrong kernel the self-test must refuse)."""

    def __init__(self, lib, name, fn):
        self.lib, self.name, self.fn = lib, name, fn

    def __getattr__(self, name):
        return self.fn if name == self.name else getattr(self.lib, name)


@pytest.mark.parametrize("lo,hi", [(0, 15), (-8, 7)])
def test_relu_kernel_equals_torch_relu_then_quantization(monkeypatch, lo, hi):
    """Forward and backward of the one-pass ReLU + quantization against the oracle written with torch ops:
    ``torch.relu``, round half to even of ``x * fl32(1 / s)``, clamp, ``* s``; gradient through ReLU's rule and
    the straight-through mask.  Bit for bit, -0.0 and NaN included, and the ReLU kernel really ran."""
    lib = fused.native_kernels()
    if lib is None:
        pytest.skip("no native kernel library on this machine (the torch path is tested below)")
    spy = _Calls(lib)
    monkeypatch.setitem(native.STATE, "lib", spy)
    s = torch.tensor(0.25)
    x1 = _awkward().requires_grad_()
    y = fused.fake_quantize_trusted(x1, s, None, lo, hi, relu=True)
    assert "hwq_fq_relu" in spy.names
    x2 = x1.detach().clone().requires_grad_()
    xr = torch.relu(x2)
    code = torch.round(xr * torch.reciprocal(s))
    ref = xr + (code.clamp(lo, hi) * s - xr).detach()  # straight-through value of the oracle
    ref_val = code.clamp(lo, hi) * s
    assert torch.equal(torch.nan_to_num(y.detach(), nan=9.0), torch.nan_to_num(ref_val, nan=9.0))
    assert torch.equal(torch.signbit(y.detach()), torch.signbit(ref_val))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    in_range = ((code >= lo) & (code <= hi)).float()
    (ref * in_range.detach() + (ref * (1 - in_range)).detach()).backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert (x1.grad[:-len(AWKWARD)] != 0).any() and (x1.grad[:-len(AWKWARD)] == 0).any()


def test_relu_path_is_the_same_on_the_torch_path_and_without_gradients(monkeypatch):
    """Where no kernel runs (the torch path, a per-channel step, a zero point) ``relu=True`` is ``torch.relu``
    first; with and without autograd, the values are those of the kernel."""
    s = torch.tensor(0.25)
    x = _awkward(seed=2)
    want = fused.fake_quantize_trusted(torch.relu(x), s, None, 0, 15)
    got_nograd = fused.fake_quantize_trusted(x, s, None, 0, 15, relu=True)
    monkeypatch.setitem(native.STATE, "state", "failed")  # the torch path
    got_torch = fused.fake_quantize_trusted(x.clone().requires_grad_(), s, None, 0, 15, relu=True).detach()
    for got in (got_nograd, got_torch):
        assert torch.equal(torch.nan_to_num(got, nan=9.0), torch.nan_to_num(want, nan=9.0))
        assert torch.equal(torch.signbit(got), torch.signbit(want))


def test_self_test_refuses_a_relu_kernel_without_relus_gradient_rule():
    lib = fused.native_kernels()
    if lib is None:
        pytest.skip("no native kernel library on this machine")

    def no_relu_mask(xp, yp, mp, n, r, s, lo, hi, nt):
        """Quantizes relu(x) right but marks x <= 0 as in range (the quantizer's mask without ReLU's rule)."""
        xr = torch.frombuffer((ctypes.c_float * n).from_address(xp), dtype=torch.float32).clone()
        torch.relu_(xr)
        lib.hwq_fq(xr.data_ptr(), yp, mp, n, r, s, 0.0, 0, lo, hi, nt)

    assert fused._native_self_test(lib) is None
    assert "ReLU kernel" in fused._native_self_test(_Replacing(lib, "hwq_fq_relu", no_relu_mask))


class _UserNet(nn.Module):
    """Every case of the rules: ``r_two`` feeds two quantized convs (absorbed), ``r_add`` a quantized conv and
    a residual add (shared),
    ``r_shared`` is one module called where it qualifies and where it feeds a concatenation, ``r_inplace`` is in
    place and its input is read by nothing else (absorbed), ``r_read``'s input is also read by an add,
    ``F.relu`` is functional, ``ReLU6`` another activation."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.r_two = nn.ReLU()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.r_add = nn.ReLU()
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.r_shared = nn.ReLU()
        self.d = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.r_inplace = nn.ReLU(inplace=True)
        self.e = nn.Conv2d(16, 8, 1)
        self.r_read = nn.ReLU()
        self.f = nn.Conv2d(8, 8, 1)
        self.six = nn.ReLU6()
        self.g = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        t = self.r_two(self.stem(x))
        u = self.r_add(self.a(t) + self.b(t))
        v = self.c(u) + u
        w = self.d(self.r_shared(v))  # qualifies here ...
        k = self.r_shared(w + w)  # ... but not here (it feeds the concatenation)
        w = self.e(self.r_inplace(torch.cat([w, k], 1)))
        z = self.f(self.r_read(w)) + w  # w is also read by the add
        z = self.g(self.six(F.relu(z)))
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


def _data(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(model: nn.Module, x, y, steps: int = 3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outs, grads = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return outs, grads


def _same_training(a: nn.Module, b: nn.Module, x, y) -> None:
    oa, ga = _train(a, x, y)
    ob, gb = _train(b, x, y)
    for u, v in zip(oa, ob, strict=True):
        assert torch.equal(u, v)
    for u, v in zip(ga, gb, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(u, v, strict=True))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))


def test_which_relus_are_absorbed_in_a_user_network():
    x, _ = _data()
    q = hq.prepare_qat(_UserNet(), hq.CQATConfig(), [x])
    absorbed = {n for n, m in q.named_modules() if isinstance(m, AbsorbedReLU)}
    assert absorbed == {"r_two", "r_inplace"}
    assert {n for n, m in q.named_modules() if isinstance(m, SharedReLU)} == {"r_add"} and q.r_add.layers == [q.c]
    assert not q.c.input_quant.relu_input
    assert {n for n, m in q.named_modules() if getattr(m, "relu_input", False)} == {
        "a.input_quant", "b.input_quant", "e.input_quant"}
    assert q.r_inplace.inplace and not q.r_two.inplace
    assert absorb_relus(q) == []  # nothing left to absorb


@pytest.mark.parametrize("torch_path", [False, True])
def test_absorbed_user_network_trains_bit_for_bit_like_the_plain_one(monkeypatch, torch_path):
    """Three SGD steps of the same QAT model with and without absorption: the same outputs, gradients and final
    state, bit for bit, on the kernel and on the torch path; in evaluation and through the integer model too."""
    if torch_path:
        monkeypatch.setitem(native.STATE, "state", "failed")
    x, y = _data()
    torch.manual_seed(0)
    net = _UserNet()
    a = hq.prepare_qat(net, hq.CQATConfig(), [x]).train()
    b = hq.prepare_qat(net, hq.CQATConfig(absorb_relu=False), [x]).train()
    assert any(isinstance(m, AbsorbedReLU) for m in a.modules())
    assert not any(isinstance(m, AbsorbedReLU) for m in b.modules())
    _same_training(a, b, x, y)
    a.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    ia, ib = hq.export.integer_model(a, x), hq.export.integer_model(b, x)
    assert torch.equal(ia(ia.quantize_input(x)), ib(ib.quantize_input(x)))


def test_resnet20_absorbs_the_relus_that_only_feed_convs_and_trains_the_same():
    """The bundled ResNet-20: the nine ReLUs inside the blocks and the two block outputs that feed a downsampling
    block's conv and 1x1 shortcut are absorbed; the stem's and the block outputs that feed the next conv and the
    identity shortcut are shared; the last block's (it feeds the pool) stays a ReLU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), generator=g)
    torch.manual_seed(0)
    net = fold_batchnorm(create_model("resnet20", in_channels=1, num_classes=10))
    a = hq.prepare_qat(net, hq.CQATConfig(), [x]).train()
    b = hq.prepare_qat(net, hq.CQATConfig(absorb_relu=False), [x]).train()
    names = sorted(n for n, m in a.named_modules() if isinstance(m, AbsorbedReLU))
    assert names == sorted([f"layer{i}.{j}.relu1" for i in (1, 2, 3) for j in (0, 1, 2)]
                           + ["layer1.2.relu2", "layer2.2.relu2"])
    shared = sorted(n for n, m in a.named_modules() if isinstance(m, SharedReLU))  # next conv + the shortcut add
    assert shared == sorted(["relu"] + [f"layer{i}.{j}.relu2" for i in (1, 2, 3) for j in (0, 1)])
    _same_training(a, b, x, y)


def test_an_absorbed_relu_skips_its_pass_only_while_its_layers_apply_it():
    """In training the absorbed ReLU hands its input on (the pass it saves); in evaluation, or once a layer it
    feeds no longer quantizes its input with a ReLU quantizer, it is a ReLU again."""
    x, y = _data()
    q = hq.prepare_qat(_UserNet(), hq.CQATConfig(), [x]).train()
    t = torch.randn(2, 8, 4, 4)
    assert q.r_two(t) is t
    q.eval()
    assert torch.equal(q.r_two(t), torch.relu(t))
    q.train()
    tg = t.clone().requires_grad_()
    r = q.r_add(tg)  # shared: relu(t) for the add, and c's quantized input waiting for c's quantizer
    assert torch.equal(r, torch.relu(t)) and q.c.input_quant(r) is not r
    hq.nn.set_quant_enabled(q, False)  # quantizers off: the ReLU is a ReLU again, and runs once
    assert not q.r_two.absorbed() and torch.equal(q.r_two(t), torch.relu(t))
    assert q.a.input_quant(t) is t
    r = q.r_add(tg)
    assert torch.equal(r, torch.relu(t)) and q.c.input_quant(r) is r  # nothing waiting: the quantizer is off
    hq.nn.set_quant_enabled(q, True)
    assert q.r_two(t) is t
    plain = copy.deepcopy(q)
    for m in (q, plain):
        m.a.input_quant = None  # a change made after absorption
    for m in plain.modules():
        if isinstance(m, FakeQuantizerType):
            m.relu_input = False
    plain.r_two = nn.ReLU()
    plain.r_inplace = nn.ReLU(inplace=True)
    assert torch.equal(q.r_two(t), torch.relu(t))
    _same_training(q, plain, x, y)


def test_quantizer_applies_relu_only_while_it_quantizes():
    """``relu_input`` holds while the quantizer quantizes (the values of ``q(relu(x))``, the EMA of
    ``relu(x)``'s peak); off or observing it passes its input on, which its ReLU module then rectified."""
    spec = hq.QuantSpec(bits=4, signed=None, range_mode="ema")
    q = hq.nn.FakeQuantizer(spec, axis=1)
    q.relu_input = True
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    assert not q.applies_relu and q(x) is x  # not calibrated: off
    q.calibrate_from(torch.relu(x))
    assert q.applies_relu and q.signed is False
    ref = hq.nn.FakeQuantizer(spec, axis=1)
    ref.calibrate_from(torch.relu(x))
    assert torch.equal(q.codes(x), ref.codes(torch.relu(x)))
    q.train()
    ref.train()
    for shift in (0.0, -10.0):  # the second batch is all negative: the peak of relu(x) is 0
        assert torch.equal(q(x + shift), ref(torch.relu(x + shift)))
        assert torch.equal(q.running_max, ref.running_max) and torch.equal(q.scale, ref.scale)
    q.enabled = False
    assert not q.applies_relu and q(x) is x


def test_relu_feeding_a_layer_called_twice_is_not_absorbed():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            t = self.stem(x)
            return self.conv(self.relu(t)) + self.conv(t)  # the second call reads a signed input

    x, _ = _data()
    q = hq.prepare_qat(Twice(), hq.CQATConfig(), [x])
    assert type(q.relu) is nn.ReLU and not q.conv.input_quant.relu_input


def test_untraceable_model_absorbs_nothing():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                x = -x
            return self.conv2(self.relu(self.conv(x)))

    x, _ = _data()
    q = hq.prepare_qat(Branchy(), hq.CQATConfig(fold_bn=False), [x])
    assert type(q.relu) is nn.ReLU and absorb_relus(q) == []


class _SteOracle(torch.autograd.Function):
    """Quantization written with torch ops: round half to even of ``x * fl32(1 / s)``, clamp, ``* s``; the
    straight-through gradient where the code is in range."""

    @staticmethod
    def forward(ctx, x, s, lo, hi):
        code = torch.round(x * torch.reciprocal(s))
        ctx.save_for_backward((code >= lo) & (code <= hi))
        return code.clamp(lo, hi) * s

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None


@pytest.mark.parametrize("readers", ["both", "quantized only", "other only"])
def test_relu_pair_equals_torch_relu_quantizer_and_autograds_sum(readers):
    """The pair kernel forward and backward against the unfused torch ops (``torch.relu``, the quantizer on
    torch ops, autograd's sum of the two readers' gradients), bit for bit, awkward values included, also when
    one reader sends no gradient."""
    if fused.native_kernels() is None:
        pytest.skip("no native kernel library on this machine")
    s = torch.tensor(0.25)
    x = _awkward(seed=3)
    g = torch.Generator().manual_seed(4)
    gr, gy = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    x1 = x.clone().requires_grad_()
    r1, y1 = fused_relu.relu_fake_quantize_pair(x1, 0.25, 0, 15)
    x2 = x.clone().requires_grad_()
    r2 = torch.relu(x2)
    y2 = _SteOracle.apply(r2, s, 0, 15)
    for r, y in ((r1, y1), (r2, y2)):
        outs = {"both": [(r, gr), (y, gy)], "quantized only": [(y, gy)], "other only": [(r, gr)]}[readers]
        torch.autograd.backward([o for o, _ in outs], [gg for _, gg in outs])
    for a, b in ((r1, r2), (y1, y2), (x1.grad, x2.grad)):
        a, b = a.detach(), b.detach()
        assert torch.equal(a.nan_to_num(9.0), b.nan_to_num(9.0)) and torch.equal(a.signbit(), b.signbit())


def test_pair_self_test_refuses_a_kernel_that_drops_the_nan_rule():
    lib = fused.native_kernels()
    if lib is None:
        pytest.skip("no native kernel library on this machine")

    def nan_blocked(xp, rp, yp, mp, n, rr, s, lo, hi, nt):
        """Blocks the gradient at NaN (torch's ReLU lets it through)."""
        lib.hwq_relu_fq2(xp, rp, yp, mp, n, rr, s, lo, hi, nt)
        r = torch.frombuffer((ctypes.c_float * n).from_address(rp), dtype=torch.float32)
        m = torch.frombuffer((ctypes.c_uint8 * n).from_address(mp), dtype=torch.uint8)
        m[r.isnan()] = 0

    assert fused_relu.relu_pair_self_test(lib) is None
    assert "gradients differ" in fused_relu.relu_pair_self_test(_Replacing(lib, "hwq_relu_fq2", nan_blocked))


def test_absorb_relu_flag_is_validated():
    with pytest.raises(hq.errors.ConfigError, match="absorb_relu must be true or false"):
        hq.CQATConfig(absorb_relu="yes")
    assert hq.CQATConfig().absorb_relu is True and hq.MPQConfig().absorb_relu is True


def test_relu_with_an_in_place_reader_is_not_shared():
    """A ReLU whose other reader writes into its output (``r.add_``, an in-place ReLU module) keeps its own
    pass: a quantized copy made beside ``relu(x)`` would be stale.  (Such a graph cannot train - ReLU's backward
    needs its output - but it can run without gradients.)"""

    class InPlaceReader(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.relu_b = nn.ReLU()
            self.again = nn.ReLU(inplace=True)
            self.conv = nn.Conv2d(4, 4, 1)
            self.conv_b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            t = self.stem(x)
            r = self.relu(t)
            r.add_(1.0)  # fx: a reader of r besides the conv; eager: the conv reads the changed r
            s = self.relu_b(t * 2)
            return self.conv(r) + self.conv_b(s) + self.again(s)

    x, _ = _data()
    q = hq.prepare_qat(InPlaceReader(), hq.CQATConfig(fold_bn=False), [x])
    assert type(q.relu) is nn.ReLU and type(q.relu_b) is nn.ReLU


def test_one_call_paths_never_bypass_a_subclass_forward():
    """A quantizer subclass with its own forward (MPQ's weight quantizer) is called as such: the one-call weight +
    bias path and the ReLU pair decline it."""

    class Halving(hq.nn.FakeQuantizer):
        def forward(self, x):
            return super().forward(x) * 0.5

    spec = hq.QuantSpec(bits=5, signed=True, granularity="channel", range_mode="dynamic")
    q = Halving(spec, axis=0)
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(6))
    q.calibrate_from(w)
    assert q.forward_with_bias(w, torch.zeros(4), torch.tensor(0.1), -2**31, 2**31 - 1) is None
    a = Halving(hq.QuantSpec(bits=4, signed=False), axis=1)
    a.calibrate_from(torch.rand(2, 3, 4, 4))
    assert a.relu_pair(torch.randn(2, 3, 4, 4, requires_grad=True)) is None
