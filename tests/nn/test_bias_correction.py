"""Empirical bias correction (hwquant.nn.correct_bias) against a hand computation."""

import copy

import pytest
import torch
from torch import nn

import hwquant as hq
from hwquant.errors import DataError
from hwquant.nn import correct_bias, fold_batchnorm, quant_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Net().eval()
    xs = [torch.randn(8, 1, 6, 6) + 0.5 for _ in range(2)]
    q, _ = hq.ptq(model, hq.MinMaxPTQConfig(w_bits=3, a_bits=3, per_channel=False), xs)
    return model, q, xs


def _out(m, name, xs):
    ys = []
    h = m.get_submodule(name).register_forward_hook(lambda mod, a, o: ys.append(o.detach()))
    with torch.no_grad():
        for x in xs:
            m(x)
    h.remove()
    return torch.cat(ys)


def test_correct_bias_matches_a_hand_computation_and_zeroes_the_mean_shift():
    model, q, xs = _setup()
    ref = fold_batchnorm(model).eval()
    # conv1, by hand: its inputs do not depend on any other bias, so one correction is the whole answer
    y_q, y_f = _out(q, "conv1", xs), _out(ref, "conv1", xs)
    # from the bias the datapath adds (rounded at the accumulator scale s_a * s_w)
    want = q.conv1.quantized_bias().detach() - (y_q - y_f).double().mean(dim=(0, 2, 3)).float()
    before = {n: (_out(q, n, xs) - _out(ref, n, xs)).mean(dim=[0] + list(range(2, y_q.dim() if n != "fc" else 2)))
              for n in ("conv1", "conv3", "fc")}
    info = correct_bias(q, ref, xs)
    torch.testing.assert_close(q.conv1.bias.detach(), want, rtol=0, atol=1e-6)
    assert set(info["corrected"]) == {"conv1", "conv3", "fc"} and info["skipped"] == ["conv2"]
    assert info["images"] == 16
    # after the sequential correction every corrected layer's mean output shift is ~0 on the calibration data
    # (up to the bias's own rounding at the accumulator scale), and it was not before
    for n in ("conv1", "conv3", "fc"):
        d = _out(q, n, xs) - _out(ref, n, xs)
        after = d.mean(dim=[0] + ([2, 3] if d.dim() == 4 else []))
        layer = q.get_submodule(n)
        tol = float(layer.bias_scale().max()) if layer.bias_scale() is not None else 1e-6
        assert float(after.abs().max()) <= tol / 2 + 1e-6, n
        assert float(before[n].abs().max()) > float(after.abs().max())


def test_bias_correction_in_the_ptq_configs_and_the_report():
    model, _, xs = _setup()
    q0, r0 = hq.ptq(model, hq.MinMaxPTQConfig(w_bits=3, a_bits=3, per_channel=False), xs)
    q1, r1 = hq.ptq(model, hq.MinMaxPTQConfig(w_bits=3, a_bits=3, per_channel=False, bias_correction=True), xs)
    assert r0["bias_correction"] is None and set(r1["bias_correction"]["corrected"]) == {"conv1", "conv3", "fc"}
    manual = copy.deepcopy(q0)
    correct_bias(manual, fold_batchnorm(model).eval(), xs)
    for (n, a), (_, b) in zip(quant_layers(q1), quant_layers(manual), strict=True):
        if a.bias is not None:
            torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=0, msg=n)
    g, rep = hq.ptq(model, hq.GGDPTQConfig(w_bits=4, a_bits=4, bft=False, bias_correction=True,
                                           max_samples=1000), xs)
    assert set(rep["bias_correction"]["corrected"]) == {"conv1", "conv3", "fc"}
    assert rep["config"]["bias_correction"] is True


def test_correct_bias_reads_a_one_shot_iterator_like_a_list():
    model, q, xs = _setup()
    ref = fold_batchnorm(model).eval()
    q2 = copy.deepcopy(q)
    a = correct_bias(q, ref, xs)
    b = correct_bias(q2, ref, (x for x in xs))
    assert a == b
    for (n, l1), (_, l2) in zip(quant_layers(q), quant_layers(q2), strict=True):
        if l1.bias is not None:
            assert torch.equal(l1.bias, l2.bias), n


def test_correct_bias_needs_data():
    model, q, _ = _setup()
    with pytest.raises(DataError, match="at least one calibration batch"):
        correct_bias(q, fold_batchnorm(model).eval(), [])


@pytest.mark.parametrize("config", [hq.MinMaxPTQConfig, hq.GGDPTQConfig])
def test_bias_correction_must_be_a_bool(config):
    from hwquant.errors import ConfigError

    with pytest.raises(ConfigError, match="bias_correction must be true or false, got 'yes'"):
        config(bias_correction="yes")
