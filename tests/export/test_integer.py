"""The integer reference model: integer helpers against exact arithmetic, bit-exactness against the
fake-quant model (power-of-two scales), per-layer exactness for float scales, accumulator bounds, errors."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwquant.errors import ConfigError
from hwquant.export import compare, integer_model, requant_params, rshift_rne
from hwquant.export.integer import IntOp, div_rne
from hwquant.methods import CQATConfig, GGDPTQConfig, MinMaxPTQConfig, STEConfig, prepare_qat, ptq
from hwquant.models import create_model
from hwquant.nn import LayerQuant, QuantRecipe, fold_batchnorm, quant_layers, quantize_model
from hwquant.spec import QuantSpec


def _batches(n=3, shape=(16, 1, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)) for _ in range(n)]


def _net(name="resnet20", seed=0):
    torch.manual_seed(seed)
    m = create_model(name, in_channels=1, num_classes=4, width=0.5)
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding changes the weights
        for x, _ in _batches(4, seed=seed + 1):
            m(x)
    return m.eval()


# ------------------------------------------------------------------------------------------- integer helpers
def test_rshift_rne_matches_float_round_half_even():
    g = torch.Generator().manual_seed(0)
    p = torch.randint(-(2**40), 2**40, (20000,), generator=g)
    n = torch.randint(0, 24, (20000,), generator=g)
    ref = torch.round(p.double() / torch.pow(2.0, n.double()))  # exact: |p| < 2^53, power-of-two divisor
    assert torch.equal(rshift_rne(p, n), ref.to(torch.int64))
    # hand cases: ties go to even, for both signs
    p = torch.tensor([5, 7, -5, -3, 6, -6, 3, 1, -7, 10, -10, 2**61 + 2**20, -(2**61) - 3 * 2**19])
    n = torch.tensor([1, 1, 1, 1, 2, 2, 0, 1, 0, 2, 2, 21, 20])
    assert rshift_rne(p, n).tolist() == [2, 4, -2, -2, 2, -2, 3, 0, -7, 2, -2, 2**40 + 0, -(2**41) - 2]


def test_requant_float64_shortcut_equals_integer_shift():
    """The requant op's float64 evaluation (|V * M| < 2^53) gives the integer shift's codes exactly."""
    from hwquant.export.integer import IntOp

    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        m = torch.randint(1, 2**20, (8,), generator=g)
        n = torch.randint(0, 30, (8,), generator=g)
        v = torch.randint(-(2**32), 2**32, (64, 8, 3, 3), generator=g)
        base = {"multiplier": m, "shift": n, "divisor": 1, "qmin": -(2**40), "qmax": 2**40}
        slow = IntOp("requant", "a", ("x",), dict(base)).run(v)
        fast = IntOp("requant", "a", ("x",), {**base, "float64_exact": True,
                                              "factor_f64": torch.ldexp(m.double(), -n)}).run(v)
        assert torch.equal(slow, fast)
    # exact ties: V = (2j + 1) 2^(n-1) with M = 1 rounds to the even neighbour both ways
    n = torch.arange(1, 9)
    v = (2 * torch.arange(-50, 50).reshape(-1, 1) + 1) * torch.bitwise_left_shift(torch.ones_like(n), n - 1)
    base = {"multiplier": torch.ones_like(n), "shift": n, "divisor": 1, "qmin": -(2**20), "qmax": 2**20}
    fast = IntOp("requant", "a", ("x",), {**base, "float64_exact": True,
                                          "factor_f64": torch.ldexp(torch.ones(8, dtype=torch.float64), -n)}).run(v)
    assert torch.equal(fast, IntOp("requant", "a", ("x",), base).run(v))
    assert bool((fast % 2 == 0).all())


def test_div_rne_matches_fractions():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-(10**9), 10**9, (3000,), generator=g)
    b = torch.randint(1, 500, (3000,), generator=g)
    a[:50] = b[:50] * 7 + b[:50] // 2 * (b[:50] % 2 == 0)  # exact ties for even b
    got = div_rne(a, b).tolist()
    ref = [round(Fraction(int(x), int(y))) for x, y in zip(a, b, strict=True)]  # Python rounds half to even
    assert got == ref


def test_requant_params_precision_and_shifts():
    g = torch.Generator().manual_seed(2)
    r = torch.exp(torch.randn(500, generator=g, dtype=torch.float64) * 6)
    for bits in (12, 20, 31):
        m, n = requant_params(r, bits)
        approx = m.double() / torch.pow(2.0, n.double())
        small = r < 2**bits  # beyond that M takes the whole value and n = 0
        assert (n >= 0).all() and (m[small] <= 2**bits).all()
        assert ((approx - r).abs() / r)[small].max() <= 2.0 ** -(bits - 1)
    m, n = requant_params(torch.tensor([0.25, 2.0**-20, 8.0], dtype=torch.float64))
    assert m.tolist() == [1, 1, 8] and n.tolist() == [2, 20, 0]
    with pytest.raises(ConfigError):
        requant_params(torch.tensor([0.0], dtype=torch.float64))


# -------------------------------------------------------------------------------- bit-exact (power of two)
@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
@pytest.mark.parametrize("cfg", [CQATConfig(w_bits=5, a_bits=4, pow2=True), STEConfig(w_bits=4, a_bits=4, pow2=True),
                                 STEConfig(w_bits=8, a_bits=8, first_last_bits=None, pow2=True),
                                 CQATConfig(w_bits=5, a_bits=4, pow2=True, step="window")],
                         ids=["cqat-w5a4", "ste-w4a4", "ste-w8a8", "cqat-window-w5a4"])
def test_integer_model_is_bit_exact_with_pow2_fake_quant(name, cfg):
    qm = prepare_qat(_net(name), cfg, _batches()).eval()
    test = _batches(3, seed=7)
    im = integer_model(qm, test[0][0][:1])
    for x, _ in test:
        with torch.no_grad():
            fq = qm(x)
        assert torch.equal(im.run(x), fq)
    res = compare(qm, im, test)
    assert res["codes_diff"] == 0 and res["out_diff"] == 0 and res["max_abs_diff"] == 0.0
    assert res["codes"] > 0 and res["prediction_agree"] == 100.0
    # every requantization of a power-of-two model is a pure shift (multiplier 1), except after the pool
    for op in im.ops:
        if op.kind == "requant" and op.params["divisor"] == 1:
            assert (op.params["multiplier"] == 1).all(), op.name


def test_ggd_ptq_fixed_point_model_is_bit_exact():
    model = fold_batchnorm(_net("resnet20"))
    qm, _ = ptq(model, GGDPTQConfig(w_bits=8, a_bits=8, bft=False), _batches())
    test = _batches(2, seed=9)
    im = integer_model(qm.eval(), test[0][0][:1])
    res = compare(qm, im, test)
    assert res["codes_diff"] == 0 and res["out_diff"] == 0


# ------------------------------------------------------------------------- float scales: exact per layer
def test_float_scales_every_layer_accumulator_exact_given_the_same_codes():
    """With arbitrary float scales the only differences are requantization ties: fed the fake-quant
    model's own layer-input codes, every integer conv/linear reproduces that layer's output bit for bit."""
    qm, _ = ptq(_net("resnet20"), MinMaxPTQConfig(w_bits=8, a_bits=8), _batches())
    qm.eval()
    x = _batches(1, seed=5)[0][0]
    im = integer_model(qm, x[:1])
    mods = dict(qm.named_modules())
    seen = {}

    def hook(name):
        def f(mod, inp, out):
            x_hat = mod.input_quant(inp[0])
            seen[name] = (torch.round(x_hat / mod.input_quant.scale).to(torch.int64), out)
        return f

    hooks = [mods[op.name].register_forward_hook(hook(op.name)) for op in im.ops if op.kind in ("conv2d", "linear")]
    with torch.no_grad():
        qm(x)
    for h in hooks:
        h.remove()
    checked = 0
    for op in im.ops:
        if op.kind not in ("conv2d", "linear"):
            continue
        codes, out = seen[op.name]
        acc = op.run(codes)
        s = op.scale.reshape((1, -1) + (1,) * (acc.dim() - 2))
        assert torch.equal((acc.double() * s).float(), out), op.name
        checked += 1
    assert checked == len(list(quant_layers(qm)))
    res = compare(qm, im, [(x, torch.zeros(x.shape[0], dtype=torch.long))])
    assert res["prediction_agree"] >= 90.0
    rows = list(res["layers"].values())
    assert rows[0]["codes_diff"] == 0  # the input codes: the same quantizer
    assert rows[1]["codes_diff"] <= 1e-3 * rows[1]["codes"] and rows[1]["max_lsb"] <= 1  # only rounding ties


def test_conv_op_matches_torch_conv_on_codes_and_bound_by_hand():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 2))
    spec_w = QuantSpec(bits=6, granularity="channel")
    spec_a = QuantSpec(bits=7, signed=None)
    qm = quantize_model(model, QuantRecipe(default=LayerQuant(weight=spec_w, act=QuantSpec(bits=7)),
                                           overrides=(("4", LayerQuant(weight=spec_w, act=spec_a)),)))
    from hwquant.nn import calibrate

    calibrate(qm, _batches(2, shape=(4, 2, 9, 9)))
    x = _batches(1, shape=(4, 2, 9, 9), seed=4)[0][0]
    im = integer_model(qm.eval(), x[:1])
    conv = qm[0]
    qx = conv.input_quant.codes(x).to(torch.int64)
    qw = conv.weight_quant.codes(conv.weight).to(torch.int64)
    env = im.trace(im.quantize_input(x))
    conv_op = next(op for op in im.ops if op.kind == "conv2d")
    qb = conv.bias_codes(conv.accumulator_scale()).to(torch.int64)
    ref = F.conv2d(qx.double(), qw.double(), qb.double(), stride=2, padding=1).to(torch.int64)
    assert torch.equal(env[conv_op.name], ref)
    # worst case: sum |w| * max|x code| (signed 7-bit input: 64) + |b|, per output channel
    bound = (qw.abs().sum(dim=(1, 2, 3)) * 64 + qb.abs()).max()
    layer = im.layers()[0]
    assert layer["acc_bound"] == float(bound) and layer["acc_bits"] == int(bound).bit_length() + 1
    assert layer["macs"] == 3 * 5 * 5 * 2 * 9


# -------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    net = _net("small_cnn")
    qm = quantize_model(net, QuantRecipe())  # BN not folded
    from hwquant.nn import calibrate

    calibrate(qm, _batches(1))
    with pytest.raises(ConfigError, match="BatchNorm must be folded"):
        integer_model(qm, _batches(1)[0][0][:1])
    float_first = QuantRecipe(overrides=(("<first>", None),))
    qm = quantize_model(fold_batchnorm(net), float_first)
    calibrate(qm, _batches(1))
    with pytest.raises(ConfigError, match="not quantized"):
        integer_model(qm, _batches(1)[0][0][:1])
    qm = prepare_qat(net, STEConfig(pow2=True), _batches(1)).eval()
    im = integer_model(qm, _batches(1)[0][0][:1])
    with pytest.raises(ConfigError, match="shape"):
        im.quantize_input(torch.zeros(2, 3, 12, 12))
    with pytest.raises(ConfigError, match="NaN"):
        im.quantize_input(torch.full((1, 1, 12, 12), float("nan")))
    with pytest.raises(ConfigError, match="outside"):
        im(torch.full((1, 1, 12, 12), 1000, dtype=torch.int64))
    with pytest.raises(ConfigError, match="pow2 steps are not supported"):
        from hwquant.methods import LSQConfig

        LSQConfig(pow2=True)


def test_integer_model_moves_with_to_and_round_trips_its_state_dict(tmp_path):
    """The ops' tensors follow .to(device) (here the meta device, which any machine has) and live in
    state_dict: another network's integer model of the same structure loads them and then computes exactly
    what the first one does; a dtype conversion is refused before anything changes."""
    cfg = STEConfig(w_bits=4, a_bits=4, first_last_bits=8, pow2=True)
    x = _batches(1, seed=7)[0][0]
    a = integer_model(prepare_qat(_net("small_cnn", seed=0), cfg, _batches()).eval(), x[:1])
    b = integer_model(prepare_qat(_net("small_cnn", seed=3), cfg, _batches(seed=4)).eval(), x[:1])
    want = a.run(x)
    assert not torch.equal(b.run(x), want)
    torch.save(a.state_dict(), tmp_path / "int.pt")
    b.load_state_dict(torch.load(tmp_path / "int.pt", weights_only=True))
    assert torch.equal(b.run(x), want)
    with pytest.raises(ConfigError, match="keeps its dtypes"):
        a.half()
    assert torch.equal(a.run(x), want)  # unchanged by the refused conversion
    a.to("meta")
    tensors = [v for op in a.ops for v in op.params.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.is_meta for t in tensors) and a.input_scale.is_meta
    assert all(op.scale is None or op.scale.is_meta for op in a.ops)
    other = integer_model(prepare_qat(_net("resnet20"), cfg, _batches()).eval(), x[:1])
    with pytest.raises(ConfigError, match="another network"):
        other.load_state_dict(b.state_dict())


def test_window_requant_is_the_8_bit_requant_then_the_shifter():
    """CQAT ``step="window"`` with float steps: every requantization of a windowed quantizer carries the
    8-bit range and the shift, and its codes are ``sat(rshift_rne(sat_8(requant_d8(V)), s))`` of the same
    accumulator (computed here with the op's own 8-bit multiplier, then shifted)."""
    qm = prepare_qat(_net("resnet20"), CQATConfig(w_bits=5, a_bits=4, step="window"), _batches()).eval()
    x = _batches(1, seed=3)[0][0]
    im = integer_model(qm, x[:1])
    vals = im.trace(im.quantize_input(x))
    windowed = [op for op in im.ops if op.kind == "requant" and "window_shift" in op.params]
    assert len(windowed) > 5
    shifts = set()
    for op in windowed:
        p = op.params
        assert (p["base_qmin"], p["base_qmax"]) == (0, 255) and (p["qmin"], p["qmax"]) == (0, 15)
        assert p["out_scale"] == pytest.approx(p["base_scale"] * 2 ** p["window_shift"], rel=1e-6)
        shifts.add(p["window_shift"])
        eight = dict(p)
        for k in ("window_shift", "clip_lo", "clip_hi"):
            eight.pop(k, None)
        eight["qmin"], eight["qmax"] = 0, 255
        (src,) = op.inputs
        c8 = IntOp("requant", op.name, op.inputs, eight).run(vals[src])
        want = rshift_rne(c8, p["window_shift"]).clamp(0, 15)
        assert torch.equal(vals[op.name], want), op.name
    assert shifts <= {0, 1, 2, 3, 4}
    res = compare(qm, im, _batches(2, seed=4))
    # float steps: requantization ties cascade through this untrained net as with the one-stage step (measured:
    # window 1379, step="mse" 1432 of 475648 codes); the power-of-two window is exact (test above)
    assert res["codes"] > 0 and res["codes_diff"] <= 5e-3 * res["codes"]


def test_integer_model_and_compare_leave_the_callers_mode():
    qm = prepare_qat(_net("small_cnn"), STEConfig(w_bits=4, a_bits=4, pow2=True), _batches())
    qm.train()
    im = integer_model(qm, _batches(1)[0][0][:1])
    assert qm.training
    compare(qm, im, _batches(1, seed=2))
    assert qm.training and all(m.training for m in qm.modules())
