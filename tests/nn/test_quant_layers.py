"""Quantized layers, model swapping, calibration and BN folding, checked against torch ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwquant.errors import ConfigError, DataError
from hwquant.models import create_model
from hwquant.nn import (
    FakeQuantizer,
    LayerQuant,
    QuantConv2d,
    QuantLinear,
    QuantRecipe,
    calibrate,
    float_eval_layers,
    fold_batchnorm,
    quant_layers,
    quantize_model,
)
from hwquant.spec import QuantSpec


def _batches(n=4, shape=(8, 3, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.zeros(shape[0], dtype=torch.long)) for _ in range(n)]


def test_quant_conv_matches_torch_fake_quant_oracle():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    q = QuantConv2d.from_float(conv, QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=6, signed=None))
    x = torch.relu(torch.randn(2, 3, 8, 8))
    q.weight_quant.calibrate_from(q.weight.detach())
    q.input_quant.calibrate_from(x)
    y = q(x)
    # oracle: torch's own fake-quant ops with the same scales
    w_amax = conv.weight.detach().abs().amax(dim=(1, 2, 3))
    w_scale = w_amax / 7
    wq = torch.fake_quantize_per_channel_affine(conv.weight, w_scale, torch.zeros(4, dtype=torch.int32), 0, -8, 7)
    a_scale = float(x.max()) / 63  # unsigned after ReLU: 0..63
    xq = torch.fake_quantize_per_tensor_affine(x, a_scale, 0, 0, 63)
    b_scale = a_scale * w_scale
    bq = torch.round(conv.bias.detach() / b_scale) * b_scale
    ref = F.conv2d(xq, wq, bq, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert q.input_quant.signed is False
    codes = q.weight_quant.codes(q.weight)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_quant_linear_float_passthrough_until_calibrated():
    lin = nn.Linear(5, 3)
    q = QuantLinear.from_float(lin, QuantSpec(bits=4), QuantSpec(bits=4))
    x = torch.randn(2, 5)
    assert torch.equal(q(x), lin(x))


def test_recipe_overrides_first_last_and_skip():
    model = create_model("small_cnn", in_channels=3, num_classes=10)
    eight = LayerQuant(weight=QuantSpec(bits=8, granularity="channel"), act=QuantSpec(bits=8, signed=None))
    recipe = QuantRecipe(default=LayerQuant(weight=QuantSpec(bits=4), act=QuantSpec(bits=4, signed=None)),
                         overrides=(("<first>", eight), ("<last>", None)))
    q = quantize_model(model, recipe)
    layers = dict(quant_layers(q))
    assert layers["conv1"].weight_quant.spec.bits == 8
    assert layers["conv2"].weight_quant.spec.bits == 4
    assert "fc" not in layers and isinstance(q.fc, nn.Linear)
    # the float model is untouched
    assert not any(isinstance(m, QuantConv2d) for m in model.modules())


def test_calibrate_sets_minmax_scales_from_data():
    torch.manual_seed(1)
    model = create_model("small_cnn", in_channels=3, num_classes=10).eval()
    q = quantize_model(model, QuantRecipe())
    batches = _batches()
    calibrate(q, batches)
    # first layer input is signed (normalised images): scale = max|x| / 127 over all batches
    amax = max(float(b[0].abs().max()) for b in batches)
    assert q.conv1.input_quant.signed is True
    assert q.conv1.input_quant.scale.item() == pytest.approx(amax / 127, rel=1e-6)
    assert q.conv2.input_quant.signed is False  # after ReLU
    # quantized output is close to float at 8 bits
    x = batches[0][0]
    rel = (q(x) - model(x)).norm() / model(x).norm()
    assert rel < 0.05


@pytest.mark.parametrize("weights", ["quantized", "float"])
def test_calibrate_activation_steps_see_quantized_or_float_weights(weights):
    """The second conv's input step (min-max, unsigned 8-bit) is max(relu(conv1(x))) / 255, where conv1's
    weight is the float weight or its 2-bit fake-quantized copy computed here with torch ops."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 3, bias=False)).eval()
    recipe = QuantRecipe(default=LayerQuant(weight=QuantSpec(bits=2), act=QuantSpec(bits=8, signed=None)))
    q = quantize_model(model, recipe)
    batches = _batches(n=2, shape=(4, 3, 10, 10), seed=5)
    calibrate(q, batches, weights=weights)
    w = model[0].weight.detach()
    s = w.abs().max() / 1  # 2-bit signed: q_max = 1
    w_used = torch.clamp(torch.round(w / s), -2, 1) * s if weights == "quantized" else w
    peak = max(float(F.relu(F.conv2d(x, w_used)).max()) for x, _ in batches)
    assert q[2].input_quant.scale.item() == pytest.approx(peak / 255, rel=1e-6)
    assert all(qq.enabled for qq in (q[0].weight_quant, q[0].input_quant, q[2].weight_quant, q[2].input_quant))
    # the two readings differ on this model (the test would not notice a swapped flag otherwise)
    other = max(float(F.relu(F.conv2d(x, w if weights == "quantized" else torch.clamp(torch.round(w / s), -2, 1)
                                      * s)).max()) for x, _ in batches)
    assert abs(other - peak) > 1e-3 * peak
    with pytest.raises(ConfigError, match="calibration weights"):
        calibrate(q, batches, weights="int")


def test_calibrate_errors():
    model = create_model("small_cnn", in_channels=3, num_classes=10)
    q = quantize_model(model, QuantRecipe())
    with pytest.raises(DataError, match="empty"):
        calibrate(q, [])
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        calibrate(q, [bad])


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(2)
    model = create_model("resnet20", in_channels=1, num_classes=10, width=0.5)
    # give BN non-trivial statistics
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 1, 16, 16) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_quantizer_state_dict_roundtrip():
    fq = FakeQuantizer(QuantSpec(bits=5, granularity="channel"))
    w = torch.randn(6, 3)
    fq.calibrate_from(w)
    fresh = FakeQuantizer(QuantSpec(bits=5, granularity="channel"))
    fresh.load_state_dict(fq.state_dict())
    assert torch.equal(fresh(w), fq(w)) and fresh.enabled and fresh.signed is True


def test_spec_validation():
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ConfigError, match="bits"):
        QuantSpec(bits=17)
    with pytest.raises(ConfigError, match="granularity"):
        QuantSpec(granularity="row")
    with pytest.raises(ConfigError, match="observer"):
        FakeQuantizer(QuantSpec(observer="nope")).start_observing()


def test_pow2_spec_snaps_calibrated_and_tracked_steps():
    q = FakeQuantizer(QuantSpec(bits=4, signed=None, range_mode="ema", pow2=True))
    x = torch.rand(1000) * 3.1
    q.calibrate_from(x)
    s = float(q.scale)
    assert s == 2.0 ** round(torch.log2(torch.tensor(3.1 * float(x.max()) / 3.1 / 15)).item())
    q.train()
    for k in range(5):
        q(torch.rand(1000) * (1 + k))
        assert float(torch.log2(q.scale)).is_integer()
    w = FakeQuantizer(QuantSpec(bits=5, granularity="channel", range_mode="dynamic", pow2=True), axis=0)
    w.calibrate_from(torch.randn(6, 3, 3, 3))
    w(torch.randn(6, 3, 3, 3) * 3)
    assert torch.equal(w.scale, torch.exp2(torch.round(torch.log2(w.scale))))
    with pytest.raises(ConfigError, match="pow2"):
        QuantSpec(range_mode="learned", pow2=True)


def test_eval_computes_on_integer_codes_exactly():
    """Eval mode (no grad): y = fl32((conv(q_x, q_w) + B) * s_acc) with exact integer sums; training keeps
    the float path (op on dequantized values), which differs only by float32 rounding."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    q = QuantConv2d.from_float(conv, QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, signed=None))
    x = torch.relu(torch.randn(4, 3, 10, 10))
    q.weight_quant.calibrate_from(q.weight.detach())
    q.input_quant.calibrate_from(x)
    qx = q.input_quant.codes(x).double()
    qw = q.weight_quant.codes(q.weight).double()
    s_acc = (q.input_quant.scale * q.weight_quant.scale).double()  # float32 product, as the layer documents
    qb = torch.round(conv.bias.detach() * torch.reciprocal(s_acc.float())).double()
    ref = ((F.conv2d(qx, qw, qb, padding=1)) * s_acc.reshape(1, -1, 1, 1)).float()
    q.eval()
    with torch.no_grad():
        y_eval = q(x)
    assert torch.equal(y_eval, ref)
    y_float = q(x)  # grad enabled: the float (training) path
    torch.testing.assert_close(y_float, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cin", [48, 64])  # accumulator bound below 2^24 (float32 sums) and above it (float64)
def test_eval_rescale_equals_the_double_route_for_large_accumulators(cin):
    """The exact path's rescale: acc * s_acc in float32 (acc < 2^24) gives the bits of fl32(acc * s_acc) taken
    in double; checked on accumulators up to the float32 bound and past it, with unround per-channel steps."""
    torch.manual_seed(5)
    conv = nn.Conv2d(cin, 7, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.abs_()  # positive weights and inputs: sums near the bound
    q = QuantConv2d.from_float(conv, QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, signed=None))
    x = torch.rand(3, cin, 9, 9) * 3.7
    q.weight_quant.calibrate_from(q.weight.detach())
    q.input_quant.calibrate_from(x)
    qx = q.input_quant.codes(x).double()
    qw = q.weight_quant.codes(q.weight).double()
    s_acc = (q.input_quant.scale * q.weight_quant.scale).double()
    qb = torch.round(conv.bias.detach() * torch.reciprocal(s_acc.float())).double()
    acc = F.conv2d(qx, qw, qb, padding=1)
    ref = (acc * s_acc.reshape(1, -1, 1, 1)).float()
    q.eval()
    with torch.no_grad():
        y = q(x)
    assert torch.equal(y, ref)
    assert float(acc.abs().max()) > 2**21  # large sums, not a trivial case


def test_a_layer_without_integer_form_says_so_and_evaluates_in_float():
    """A float bias (bias_bits=None): no integer accumulator.  The layer says why (explicitly, not by catching
    an error), evaluates on the float path (the training path's value), is listed by float_eval_layers, and the
    integer export refuses it naming the layer."""
    from hwquant.export import integer_model

    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    x = torch.relu(torch.randn(2, 3, 8, 8))
    good = QuantConv2d.from_float(conv, QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, signed=None))
    bad = QuantConv2d.from_float(conv, QuantSpec(bits=8, granularity="channel"), QuantSpec(bits=8, signed=None),
                                 bias_bits=None)
    for q in (good, bad):
        q.weight_quant.calibrate_from(q.weight.detach())
        q.input_quant.calibrate_from(x)
    assert good.no_integer_form() is None
    assert "bias is not quantized" in bad.no_integer_form()
    bad.eval()
    with torch.no_grad():
        y_eval = bad(x)
    ref = F.conv2d(bad.quantized_input(x), bad.quantized_weight(), bad.bias, padding=1)
    assert torch.equal(y_eval, ref)
    model = nn.Sequential(good, nn.ReLU(), bad).eval()
    assert float_eval_layers(model) == {"2": bad.no_integer_form()}
    with pytest.raises(ConfigError, match=r"^2: the bias is not quantized"):
        integer_model(model, x[:1])


def test_exact_float_sums_turns_tf32_off_and_restores_it():
    """The exact-integer evaluation on CUDA must not run under TF32 (cuDNN's default allows it)."""
    import torch

    from hwquant.nn.layers import exact_float_sums

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        with exact_float_sums(True):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with exact_float_sums(False):  # CPU: nothing to change
            assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_per_channel_activation_quantizers_use_the_channel_axis_not_the_batch():
    """granularity="channel" on an activation spec gives one step per channel (axis 1), whatever the batch."""
    from hwquant.nn.swap import calibrate

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    q = QuantConv2d.from_float(conv, QuantSpec(bits=8, granularity="channel"),
                               QuantSpec(bits=8, signed=True, granularity="channel"))
    x = torch.randn(5, 3, 8, 8) * torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    calibrate(q, [x])
    s = q.input_quant.scale
    assert s.shape == (3,)
    torch.testing.assert_close(s, x.abs().amax(dim=(0, 2, 3)) / 127)  # min-max per input channel
    q(torch.randn(2, 3, 8, 8))  # another batch size runs


def test_input_gain_state_and_validation():
    """The gain is float32, saved in the extra state (a state without it, from before the gain, loads as 1),
    applied also when the quantizer is off, and must be finite and > 0."""
    from hwquant.nn import FakeQuantizer
    from hwquant.spec import QuantSpec

    q = FakeQuantizer(QuantSpec(bits=4, signed=True))
    assert q.set_input_gain(0.1) == float(torch.tensor(0.1, dtype=torch.float32)) == q.input_gain
    x = torch.randn(100)
    assert torch.equal(q(x), x * torch.tensor(0.1, dtype=torch.float32))  # off: only the gain
    state = q.state_dict()
    r = FakeQuantizer(QuantSpec(bits=4, signed=True))
    r.load_state_dict(state)
    assert r.input_gain == q.input_gain
    old = {k: ({kk: vv for kk, vv in v.items() if kk != "input_gain"} if k.endswith("_extra_state") else v)
           for k, v in state.items()}
    r.load_state_dict(old)
    assert r.input_gain == 1.0
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "2", 1e40):
        with pytest.raises(ValueError, match="input gain must be a finite number > 0"):
            q.set_input_gain(bad)


@pytest.mark.parametrize("wmax,xmax,k_in,passes", [(127, 255, 64, ["float32", "float32"]),
                                                   (2047, 255, 64, ["float32", "float32"]),
                                                   (32767, 32767, 64, ["float64"]), (3, 7, 4, ["float32"])])
def test_exact_integer_op_equals_float64_on_integers(wmax, xmax, k_in, passes):
    """Beyond float32's exact range the weight split (two float32 passes, or float64 where no split fits)
    gives the exact integer convolution: the oracle is the same convolution in float64 (exact below 2^53)
    on the same integers, with a worst-case row and input patch."""
    from hwquant.nn.layers import exact_integer_op

    g = torch.Generator().manual_seed(wmax)
    x = torch.randint(-xmax, xmax + 1, (2, k_in, 7, 7), generator=g).float()
    w = torch.randint(-wmax, wmax + 1, (5, k_in, 3, 3), generator=g).float()
    w[0] = wmax  # the worst row
    x[0, :, 2:5, 2:5] = xmax
    seen = []

    def conv(a, b):
        seen.append(str(a.dtype).removeprefix("torch."))
        return torch.nn.functional.conv2d(a, b, None, 1, 1)

    want = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
    got = exact_integer_op(conv, x, w, float(xmax))
    assert torch.equal(got.double(), want)
    assert seen == passes
