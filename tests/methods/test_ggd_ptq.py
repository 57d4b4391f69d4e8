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
        if (name, "weight") not in tuned:  # BFT may move an FL by one step
            fl = best_fraction_length(folded[name].weight.detach(), 4, signed=True)
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

    from hwquant.methods.ggd_ptq import kl_divergence

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
    from hwquant.methods.ggd_ptq import CalibScorer, backward_forward_tuning

    model, loaders = digits_small_cnn
    plain, _ = ptq(model, GGDPTQConfig(w_bits=4, a_bits=4, bft=False), loaders.calib)
    scorer = CalibScorer(fold_batchnorm(model).eval(), loaders.calib, 256, criterion="kl")
    free = backward_forward_tuning(plain, scorer)
    plain2, _ = ptq(model, GGDPTQConfig(w_bits=4, a_bits=4, bft=False), loaders.calib)
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
    from hwquant.methods.ggd_ptq import CalibScorer

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
    from hwquant.methods.ggd_ptq import CalibScorer, backward_forward_tuning

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
