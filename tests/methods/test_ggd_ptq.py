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


def test_bft_never_lowers_calibration_score(ggd_result):
    _, report = ggd_result
    before, after = report["bft"]["before"], report["bft"]["after"]
    assert (after["top1"], after["top5"], after["sqnr_db"]) >= (before["top1"], before["top5"], before["sqnr_db"])
    for ch in report["bft"]["changes"]:
        assert ch["delta_fl"] in (-1, 1)
    assert report["calib_after_bft"]["top1"] >= report["calib_before_bft"]["top1"]


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
    with pytest.raises(DataError, match="empty"):
        ptq(model, GGDPTQConfig(), [])
    x, y = next(iter(loaders.calib))
    x = x.clone()
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(DataError, match="non-finite"):
        ptq(model, GGDPTQConfig(bft=False), [(x, y)])
    with pytest.raises(ConfigError, match="observer"):
        ObserverPTQConfig(observer="magic")
