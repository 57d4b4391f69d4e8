"""GGD PTQ: fixed-point weights, GGD activation steps, accumulator biases, BFT."""

import math

import pytest
import torch

from hwquant.errors import ConfigError, DataError
from hwquant.methods import GGDPTQConfig, ObserverPTQConfig, ptq
from hwquant.nn import fold_batchnorm, quant_layers
from hwquant.numerics.fixed_point import best_fraction_length
from hwquant.train import evaluate


def _log2_int(t: torch.Tensor) -> bool:
    lg = torch.log2(t)
    return bool(torch.all(lg == torch.round(lg)))


@pytest.fixture(scope="module")
def ggd_result(digits_small_cnn):
    model, loaders = digits_small_cnn
    return ptq(model, GGDPTQConfig(w_bits=4, a_bits=4, bft=True), loaders.calib)


def test_weights_fixed_point_with_error_minimising_fl(digits_small_cnn, ggd_result):
    model, _ = digits_small_cnn
    qmodel, report = ggd_result
    folded = dict(fold_batchnorm(model).named_modules())
    tuned = {(c["layer"], c["operand"]) for c in report["bft"]["changes"]}
    for name, layer in quant_layers(qmodel):
        s = layer.weight_quant.scale
        assert _log2_int(s)
        w = folded[name].weight.detach()
        if name in report["image_gain"]:  # the image layer holds W / g (its input is scaled by g)
            w = (w.double() / report["image_gain"][name]).float()
            assert torch.equal(layer.weight.detach(), w)
        if (name, "weight") not in tuned:  # BFT may move an FL by one step
            fl = best_fraction_length(w, 4, signed=True)
            assert float(s) == 2.0**-fl, name


def test_activation_steps_power_of_two_and_unsigned_after_relu(ggd_result):
    qmodel, report = ggd_result
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows["conv1"]["a_signed"] is True  # normalised input image
    assert rows["conv2"]["a_signed"] is False  # after ReLU
    for name, layer in quant_layers(qmodel):
        assert _log2_int(layer.input_quant.scale)
        assert rows[name]["ggd_alpha"] > 0 and rows[name]["ggd_lam"] > 0
    assert 0 < rows["conv2"]["ggd_zero_mass"] < 1  # ReLU zeros are a point mass


def test_bias_at_accumulator_scale(ggd_result):
    qmodel, _ = ggd_result
    for _, layer in quant_layers(qmodel):
        if layer.bias is None:
            continue
        s = layer.input_quant.scale * layer.weight_quant.scale
        qb = layer.quantized_bias().detach()
        codes = qb / s
        assert torch.equal(codes, torch.round(codes))


def test_bft_never_lowers_its_calibration_score(ggd_result):
    _, report = ggd_result
    b = report["bft"]
    assert b["criterion"] == "kl"  # the default: smooth, not the paper's top-1
    before, after = b["before"], b["after"]
    assert (-after["kl"], after["sqnr_db"]) >= (-before["kl"], before["sqnr_db"])
    for ch in b["changes"]:
        assert ch["delta_fl"] in (-1, 1)
    if b["holdout_images"]:  # a kept change never worsened the held-out images
        assert b["holdout_after"]["kl"] <= b["holdout_before"]["kl"]


def test_bft_top1_criterion_keeps_the_papers_ordering(digits_small_cnn):
    model, loaders = digits_small_cnn
    _, report = ptq(model, GGDPTQConfig(w_bits=4, a_bits=4, bft_criterion="top1", bft_holdout=0), loaders.calib)
    before, after = report["bft"]["before"], report["bft"]["after"]
    assert (after["top1"], after["top5"], after["sqnr_db"]) >= (before["top1"], before["top5"], before["sqnr_db"])
    assert report["bft"]["holdout_images"] == 0 and report["bft"]["rejected_by_holdout"] == 0


def test_kl_divergence_by_hand_and_scipy():
    from scipy.stats import entropy

    from hwquant.methods.bft import kl_divergence

    ref = torch.tensor([[0.0, math.log(3.0)], [1.0, -2.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    kl = kl_divergence(ref, q)
    # row 0 by hand: p = (1/4, 3/4), q = (1/2, 1/2): 1/4 ln(1/2) + 3/4 ln(3/2)
    assert float(kl[0]) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
    for i in range(2):
        assert float(kl[i]) == pytest.approx(entropy(torch.softmax(ref[i].double(), 0).numpy(),
                                                     torch.softmax(q[i].double(), 0).numpy()), rel=1e-10)
    assert float(kl_divergence(ref, ref).abs().max()) < 1e-15


class _FixedHoldout:
    """A held-out scorer whose every evaluation after the first is ``step`` better (or worse) in KL."""

    criterion = "kl"
    images = 10

    def __init__(self, step):
        self.step, self.k, self.evaluations = step, 0.0, 0

    def metrics(self, model):
        self.evaluations += 1
        m = {"top1": 50.0, "top5": 90.0, "sqnr_db": 10.0, "kl": 1.0 - self.k}
        self.k += self.step
        return m

    def key(self, m):
        return (-m["kl"], m["sqnr_db"])


@pytest.mark.parametrize("step", [0.01, -0.01])
def test_bft_holdout_rejects_what_only_the_scored_images_like(digits_small_cnn, step):
    """Every candidate that improves the scored images is checked on the hold-out: a hold-out that always gets
    worse rejects them all (no change kept, scored images untouched); one that always gets better rejects
    none (the changes BFT makes without a hold-out)."""
    from hwquant.methods.bft import CalibScorer, backward_forward_tuning

    model, loaders = digits_small_cnn
    # without the image gain BFT finds changes here (with it, none on these images)
    cfg = GGDPTQConfig(w_bits=4, a_bits=4, bft=False, image_gain=False)
    plain, _ = ptq(model, cfg, loaders.calib)
    scorer = CalibScorer(fold_batchnorm(model).eval(), loaders.calib, 256, criterion="kl")
    free = backward_forward_tuning(plain, scorer)
    plain2, _ = ptq(model, cfg, loaders.calib)
    held = backward_forward_tuning(plain2, CalibScorer(fold_batchnorm(model).eval(), loaders.calib, 256,
                                                       criterion="kl"), holdout=_FixedHoldout(step))
    assert free["changes"], "the scored images must prefer some change for this test to mean anything"
    if step < 0:
        assert held["changes"] == [] and held["rejected_by_holdout"] > 0
        assert held["after"] == held["before"]
    else:
        assert held["rejected_by_holdout"] == 0
        assert [(c["layer"], c["operand"], c["delta_fl"]) for c in held["changes"]] == \
            [(c["layer"], c["operand"], c["delta_fl"]) for c in free["changes"]]


def test_calib_scorer_skips_to_the_held_out_images(digits_small_cnn):
    from hwquant.methods.bft import CalibScorer

    model, loaders = digits_small_cnn
    all_x = torch.cat([b[0] for b in loaders.calib])
    s = CalibScorer(model.eval(), loaders.calib, 50, channels_last=False, skip=70)
    assert s.images == 50
    assert torch.equal(torch.cat([b[0] for b in s.batches]), all_x[70:120])
    empty = CalibScorer(model.eval(), loaders.calib, 50, channels_last=False, skip=len(all_x))
    assert empty.images == 0


def test_ggd_ptq_close_to_float_at_8_bits(digits_small_cnn):
    model, loaders = digits_small_cnn
    qmodel, report = ptq(model, GGDPTQConfig(w_bits=8, a_bits=8, bft=False), loaders.calib)
    f = evaluate(model, loaders.test)["top1"]
    q = evaluate(qmodel, loaders.test)["top1"]
    assert abs(f - q) <= 1.5
    assert report["sqnr_db"] > 25


def test_own_bias_mode_caps_at_accumulator(digits_small_cnn):
    model, loaders = digits_small_cnn
    qmodel, _ = ptq(model, GGDPTQConfig(w_bits=8, a_bits=8, bias="own", bias_bits=8, bft=False), loaders.calib)
    for _, layer in quant_layers(qmodel):
        if layer.bias is None:
            continue
        acc = layer.input_quant.scale * layer.weight_quant.scale
        s = layer.bias_scale()
        assert torch.all(s >= acc) and _log2_int(s)
        codes = layer.quantized_bias().detach() / s
        assert codes.abs().max() <= 128 and torch.equal(codes, torch.round(codes))


def test_bad_configs_and_inputs(digits_small_cnn):
    model, loaders = digits_small_cnn
    with pytest.raises(ConfigError, match="w_bits"):
        GGDPTQConfig(w_bits=1)
    with pytest.raises(ConfigError, match="bias"):
        GGDPTQConfig(bias="float")
    with pytest.raises(ConfigError, match="bft_criterion"):
        GGDPTQConfig(bft_criterion="top5")
    with pytest.raises(ConfigError, match="bft_holdout"):
        GGDPTQConfig(bft_holdout=-1)
    with pytest.raises(DataError, match="empty"):
        ptq(model, GGDPTQConfig(), [])
    x, y = next(iter(loaders.calib))
    x = x.clone()
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(DataError, match="non-finite"):
        ptq(model, GGDPTQConfig(bft=False), [(x, y)])
    with pytest.raises(ConfigError, match="observer"):
        ObserverPTQConfig(observer="magic")


class _InPlace(torch.nn.Module):
    """Modifies conv outputs in place with non-idempotent ops (a replayed output must be a copy)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.c2 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        a = self.c1(x)
        a.mul_(1.5).add_(0.25)
        a = torch.relu(a)
        b = self.c2(a)
        b += a
        return self.fc(b.mean((2, 3)))


@pytest.mark.parametrize("name", ["digits", "mobile", "two_branch", "inplace"])
def test_bft_prefix_cache_changes_nothing_but_the_work(digits_small_cnn, name):
    """BFT replaying the layers before the tuned one gives the same changes and scores as recomputing them,
    on nets with a residual add, in-place ReLU / ReLU6 and in-place arithmetic on conv outputs (a replayed
    tensor that is not a copy would show here) and a shared input quantizer; and it does replay."""
    from hwquant.methods.bft import CalibScorer, backward_forward_tuning

    if name == "digits":
        model, loaders = digits_small_cnn
        calib = loaders.calib
    elif name == "inplace":
        torch.manual_seed(1)
        model = _InPlace().eval()
    else:  # the user networks of the export tests, on random 12x12 images
        import importlib.util
        from pathlib import Path

        path = Path(__file__).parents[1] / "export" / "user_models.py"
        spec = importlib.util.spec_from_file_location("user_models", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        torch.manual_seed(1)
        model = mod.USER_MODELS[name]().eval()
    if name != "digits":
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(128, 1, 12, 12, generator=g), torch.randint(0, 4, (128,), generator=g)
        calib = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    runs = {}
    for cached in (True, False):
        qm, _ = ptq(model, GGDPTQConfig(w_bits=4, a_bits=4, bft=False), calib)
        ref = fold_batchnorm(model).eval()
        scorer = CalibScorer(ref, calib, 64, criterion="kl")
        holdout = CalibScorer(ref, calib, 64, criterion="kl", skip=64)
        runs[cached] = backward_forward_tuning(qm, scorer, holdout=holdout, prefix_cache=cached)
    a, b = runs[True], runs[False]
    assert {k: v for k, v in a.items() if k != "prefix_cache"} == {k: v for k, v in b.items() if k != "prefix_cache"}
    assert a["prefix_cache"]["enabled"] and a["prefix_cache"]["replayed"] > 0
    assert b["prefix_cache"]["replayed"] == 0


# ----------------------------------------------------------------------------- the image layer's input gain
def _conv_with_input_step(step, shared=False):
    from hwquant.nn import QuantConv2d
    from hwquant.spec import QuantParams, QuantSpec

    torch.manual_seed(0)
    wspec = QuantSpec(bits=8, signed=True, observer="fixedpoint")
    convs = [QuantConv2d(1, 4, 3, padding=1, weight_spec=wspec, act_spec=QuantSpec(bits=4, signed=True))
             for _ in range(2 if shared else 1)]
    for c in convs:
        c.input_quant = convs[0].input_quant
        c.weight_quant.calibrate_from(c.weight.detach())
    convs[0].input_quant.set_params(QuantParams(torch.tensor(step), torch.tensor(0, dtype=torch.int32), 4, True))
    return convs


def test_fold_input_gain_by_hand():
    """s = 0.2693 becomes p = 0.25 with g = fl32(0.25 / 0.2693); weights W / g; the codes are rne(fl32(g x) / p),
    those of rne(x / s) but where g's rounding moves a tie; the float function is unchanged."""
    from hwquant.nn import fold_input_gain

    (conv,) = _conv_with_input_step(0.2693)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    x = torch.randn(8, 1, 10, 10)
    x[:, :, :5] = -0.81  # a background atom
    g = fold_input_gain({"conv1": conv})
    g32 = float(torch.tensor(0.25 / 0.2693, dtype=torch.float32))
    assert g == g32 == conv.input_quant.input_gain and float(conv.input_quant.scale) == 0.25
    assert torch.equal(conv.weight.detach(), (w0.double() / g32).float())
    codes = conv.input_quant.codes(x)
    assert torch.equal(codes.long(), torch.round(x * torch.tensor(g32) / 0.25).clamp(-8, 7).long())
    assert (codes.long() == torch.round(x / 0.2693).clamp(-8, 7).long()).float().mean() > 0.999
    # the atom -0.81 is -3 codes either way, but it stands for -3 * 0.2693 = -0.808 here (in x's units), where a
    # plain step of 0.25 would make it -0.75
    with torch.no_grad():
        assert float(conv.input_quant(x)[0, 0, 0, 0]) / g == pytest.approx(-3 * 0.2693, rel=1e-6)
    with torch.no_grad():  # quantizers off: conv(g x, W / g) = conv(x, W)
        conv.input_quant.enabled = conv.weight_quant.enabled = False
        torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, w0, b0, padding=1), rtol=1e-5, atol=1e-5)
    # a power-of-two step is left alone; a second fold is refused
    (p2,) = _conv_with_input_step(0.25)
    assert fold_input_gain({"c": p2}) == 1.0 and p2.input_quant.input_gain == 1.0
    conv.input_quant.enabled = True
    with pytest.raises(ConfigError, match="^conv1: its input quantizer already has an input gain"):
        fold_input_gain({"conv1": conv})


def test_fold_input_gain_shared_quantizer_folds_once():
    from hwquant.nn import fold_input_gain

    a, b = _conv_with_input_step(0.3, shared=True)
    wa, wb = a.weight.detach().clone(), b.weight.detach().clone()
    g = fold_input_gain({"a": a, "b": b})
    assert a.input_quant is b.input_quant and a.input_quant.input_gain == g and float(a.input_quant.scale) == 0.25
    assert torch.equal(a.weight.detach(), (wa.double() / g).float())
    assert torch.equal(b.weight.detach(), (wb.double() / g).float())
    (c,) = _conv_with_input_step(0.3)
    with pytest.raises(ConfigError, match="^c: does not share a's input quantizer"):
        fold_input_gain({"a": _conv_with_input_step(0.3)[0], "c": c})


def test_ggd_image_layer_keeps_the_free_step_as_gain_times_power_of_two(digits_small_cnn):
    """The headline setting: with power-of-two steps the image layer's effective step (p / g) is the exact GGD
    step of the free-step run, not a power of two; ``image_gain=False`` (the baseline) rounds it."""
    model, loaders = digits_small_cnn
    cfg = dict(w_bits=8, a_bits=4, bft=False)
    gained, report = ptq(model, GGDPTQConfig(**cfg), loaders.calib)
    free, _ = ptq(model, GGDPTQConfig(**cfg, power_of_two=False), loaders.calib)
    plain, _ = ptq(model, GGDPTQConfig(**cfg, image_gain=False), loaders.calib)
    iq = gained.conv1.input_quant
    s_free = float(free.conv1.input_quant.scale)
    assert not _log2_int(torch.tensor(s_free)) and _log2_int(iq.scale)
    assert float(iq.scale) / iq.input_gain == pytest.approx(s_free, rel=1e-6)
    assert report["image_gain"] == {"conv1": iq.input_gain}
    assert plain.conv1.input_quant.input_gain == 1.0 and _log2_int(plain.conv1.input_quant.scale)
    assert float(plain.conv1.input_quant.scale) != pytest.approx(s_free, rel=1e-3)
    for name, layer in quant_layers(gained):  # every other step stays a plain power of two
        assert _log2_int(layer.input_quant.scale) and (name == "conv1" or layer.input_quant.input_gain == 1.0)
