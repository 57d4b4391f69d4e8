"""What users pass: one-shot generators and bare tensors as calibration data, in-place activations under every
method (PTQ, QAT training, ARC gradient quantization)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hwquant as hq
from hwquant.methods import ARCConfig, CQATConfig, GGDPTQConfig, MinMaxPTQConfig, prepare_arc, prepare_qat
from hwquant.numerics.gradient import fake_quantize_gradient


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 1), nn.Hardswish(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()


def _tensors(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 1, 10, 10, generator=g) for _ in range(n)]


@pytest.mark.parametrize("config", [MinMaxPTQConfig(w_bits=8, a_bits=8), GGDPTQConfig(w_bits=8, a_bits=8)])
def test_one_shot_generator_of_bare_tensors(config):
    """A generator can be read only once: PTQ must calibrate and score on the same, single read."""
    m = _net()
    xs = _tensors()
    q_gen, rep_gen = hq.ptq(m, config, (x for x in xs))
    q_list, rep_list = hq.ptq(m, config, xs)
    assert math.isfinite(rep_gen["sqnr_db"]) and rep_gen["sqnr_db"] == rep_list["sqnr_db"] > 15
    x = _tensors(1, seed=5)[0]
    assert torch.equal(q_gen(x), q_list(x))
    if isinstance(config, GGDPTQConfig):
        assert rep_gen["calib_labels"] == "float model"  # no labels: scored against the float predictions


def test_labelled_and_bare_batches_calibrate_alike():
    m = _net()
    xs = _tensors()
    q_bare, _ = hq.ptq(m, MinMaxPTQConfig(w_bits=4, a_bits=4), xs)
    q_pairs, _ = hq.ptq(m, MinMaxPTQConfig(w_bits=4, a_bits=4), [(x, torch.zeros(16, dtype=torch.long)) for x in xs])
    x = _tensors(1, seed=6)[0]
    assert torch.equal(q_bare(x), q_pairs(x))


def test_bad_calibration_batch_is_one_line():
    with pytest.raises(hq.errors.DataError, match=r"^calibration batch 0 must be a tensor or an \(x, y\) pair"):
        hq.ptq(_net(), MinMaxPTQConfig(), ["not a tensor"])
    with pytest.raises(hq.errors.DataError, match="calibration loader is empty"):
        hq.ptq(_net(), MinMaxPTQConfig(), iter([]))


def test_qat_trains_with_inplace_activations():
    qm = prepare_qat(_net(), CQATConfig(w_bits=5, a_bits=4), _tensors()).train()
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(0))
    for x in _tensors(3, seed=1):
        loss = nn.functional.cross_entropy(qm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    grads = [p.grad for p in qm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_arc_error_gradient_with_inplace_relu():
    """The error gradient of a conv followed by an in-place ReLU is quantized at the conv's output: the weight
    gradient equals the one computed from the quantized error by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3), nn.ReLU(inplace=True))
    x = torch.randn(2, 1, 7, 7, generator=torch.Generator().manual_seed(1))
    w_out = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(2))
    handle = prepare_arc(net, ARCConfig(bits=4, rounding="zero", clip="zscore", error_scale="tensor",
                                        skip_first_last=False, weight_grad=False))
    (net(x) * w_out).sum().backward()
    handle.remove()
    with torch.no_grad():
        h = torch.relu(net[0](x))
        z2 = net[2](h)
    e2 = fake_quantize_gradient((w_out * (z2 > 0)).contiguous(), 4, "zero", "zscore", 3.0)[0]
    ref = torch.nn.grad.conv2d_weight(h, net[2].weight.shape, e2)
    assert torch.allclose(net[2].weight.grad, ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(net[2].weight.grad, torch.nn.grad.conv2d_weight(h, net[2].weight.shape,
                                                                                w_out * (z2 > 0)))


def test_ggd_names_a_depthwise_layer_whose_channels_a_per_layer_fl_zeroes():
    """BN folding can leave depthwise channels 1000x apart (MobileNetV2); one FL per layer then zeroes the small
    ones.  The report says so and names the layer; per-channel FLs keep every channel."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        m[2].weight[0].mul_(1000.0)  # one channel 1000x the others
    _, rep = hq.ptq(m, GGDPTQConfig(w_bits=8, a_bits=8, bft=False), _tensors())
    row = next(r for r in rep["layers"] if r["layer"] == "2")
    assert row["w_zero_channels"] == 3 and row["channels"] == 4
    assert len(rep["warnings"]) == 1 and rep["warnings"][0].startswith("2: 3 of 4 output channels quantize to all-zero")
    _, rep_pc = hq.ptq(m, GGDPTQConfig(w_bits=8, a_bits=8, bft=False, per_channel=True), _tensors())
    assert rep_pc["warnings"] == [] and all(r["w_zero_channels"] == 0 for r in rep_pc["layers"])
