"""ARC training hooks: a two-layer case worked by hand, a one-layer net against quantize_gradient, recording,
removal, composition with forward quantization, config errors."""

import pytest
import torch
from torch import nn

from hwquant.errors import ConfigError
from hwquant.methods import ARCConfig, STEConfig, prepare_arc, prepare_qat
from hwquant.numerics.gradient import dequantize_gradient, fake_quantize_gradient, quantize_gradient


def _two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def test_two_layer_case_by_hand():
    net = _two_layer()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    w_out = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    cfg = ARCConfig(bits=4, rounding="zero", clip="zscore", k=2.0, skip_first_last=False, error_scale="tensor")
    handle = prepare_arc(net, cfg)
    (net(x) * w_out).sum().backward()
    handle.remove()

    def Q(g):
        return fake_quantize_gradient(g.contiguous(), 4, "zero", "zscore", 2.0)[0]

    l1, l2 = net[0], net[2]
    with torch.no_grad():
        z1 = x @ l1.weight.T + l1.bias
        h = torch.relu(z1)
        e2 = Q(w_out)  # dL/dy2 = w_out, quantized before layer 2's backward
        dw2 = Q(e2.T @ h)
        db2 = e2.sum(0)
        e1 = Q((e2 @ l2.weight) * (z1 > 0))  # error through ReLU, quantized at layer 1's output
        dw1 = Q(e1.T @ x)
        db1 = e1.sum(0)
    for got, ref in ((l2.weight.grad, dw2), (l2.bias.grad, db2), (l1.weight.grad, dw1), (l1.bias.grad, db1)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    # quantized: every weight gradient is a multiple of its own step, at most 2*7+1 distinct values
    assert len(torch.unique(l1.weight.grad)) <= 15


def test_one_layer_weight_gradient_is_quantize_gradient_of_float_gradient():
    torch.manual_seed(3)
    lin = nn.Linear(16, 8)
    x = torch.randn(32, 16)
    lin(x).pow(2).sum().backward()
    g_float = lin.weight.grad.clone()
    lin.weight.grad = None
    h = prepare_arc(lin, ARCConfig(bits=8, skip_first_last=False, error_grad=False))
    lin(x).pow(2).sum().backward()
    codes, s = quantize_gradient(g_float, rounding="nearest", clip="search")  # the default rule, per tensor
    assert torch.equal(lin.weight.grad, dequantize_gradient(codes, s))
    h.remove()
    lin.weight.grad = None
    lin(x).pow(2).sum().backward()
    assert torch.equal(lin.weight.grad, g_float)  # removed: float again


def test_conv_net_records_clips_skips_first_last_and_composes_with_qat():
    torch.manual_seed(4)
    from hwquant.models import create_model

    model = create_model("small_cnn", in_channels=1, num_classes=4, width=0.5)
    x = torch.randn(8, 1, 12, 12)
    y = torch.randint(0, 4, (8,))
    qm = prepare_qat(model, STEConfig(w_bits=8, a_bits=8), [x])
    qm.train()
    h = prepare_arc(qm, ARCConfig(record=True))
    assert h.layers == ["conv2"]  # conv1 and fc stay float
    for _ in range(2):
        qm.zero_grad()
        nn.functional.cross_entropy(qm(x), y).backward()
    assert h.step == 2
    kinds = [(s, k) for s, k, _, _ in h.clips["conv2"]]
    assert kinds == [(1, "error"), (1, "weight"), (2, "error"), (2, "weight")]
    assert all(0 < c <= mx for _, _, c, mx in h.clips["conv2"])
    w = qm.conv2.weight.grad
    assert len(torch.unique(w)) <= 255


def test_stochastic_is_seeded():
    grads = []
    for _ in range(2):
        net = _two_layer()
        x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
        prepare_arc(net, ARCConfig(rounding="stochastic", seed=5, skip_first_last=False))
        net(x).sum().backward()
        grads.append(net[0].weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("kw,needle", [
    ({"bits": 1}, "bits"), ({"rounding": "up"}, "rounding"), ({"clip": "p99"}, "clip"), ({"k": 0}, "k"),
    ({"error_grad": False, "weight_grad": False}, "needs"),
])
def test_config_errors(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        ARCConfig(**kw)


def test_no_layer_to_quantize():
    with pytest.raises(ConfigError, match="no conv/linear"):
        prepare_arc(nn.Sequential(nn.Linear(2, 2)), ARCConfig())


def test_error_scale_sample_two_layer_case_by_hand():
    """error_scale="sample": each sample's error row gets its own clip and step (the per-tensor quantizer on
    that row alone); the weight gradient is quantized per tensor as before."""
    net = _two_layer()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    w_out = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    w_out[:3] *= 1e-3  # three easy samples
    cfg = ARCConfig(bits=4, rounding="zero", clip="zscore", k=2.0, skip_first_last=False, error_scale="sample")
    handle = prepare_arc(net, cfg)
    (net(x) * w_out).sum().backward()
    handle.remove()

    def Q(g):
        return fake_quantize_gradient(g.contiguous(), 4, "zero", "zscore", 2.0)[0]

    def Qrows(e):
        return torch.stack([Q(row) for row in e])

    l1, l2 = net[0], net[2]
    with torch.no_grad():
        z1 = x @ l1.weight.T + l1.bias
        h = torch.relu(z1)
        e2 = Qrows(w_out)
        dw2 = Q(e2.T @ h)
        e1 = Qrows((e2 @ l2.weight) * (z1 > 0))
        dw1 = Q(e1.T @ x)
    for got, ref in ((l2.weight.grad, dw2), (l2.bias.grad, e2.sum(0)), (l1.weight.grad, dw1),
                     (l1.bias.grad, e1.sum(0))):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-12)
    assert (e2[:3] != 0).any()  # the easy samples' errors survive (one per-tensor step would zero them)
    assert not (Q(w_out)[:3] != 0).any()
    with pytest.raises(ConfigError, match="error_scale"):
        ARCConfig(error_scale="channel")
    with pytest.raises(ConfigError, match="not dsgc"):
        ARCConfig(clip="dsgc", error_scale="sample")


def test_default_rule_is_the_searched_clip_with_one_error_step_per_sample():
    """ARCConfig()'s headline rule: round to nearest, searched z-score clip, per-sample error steps.  The layer's
    error is each sample's row quantized alone with the search clip and nearest rounding (fails if the default
    falls back to one per-tensor step or to the fixed k = 3 clip: the easy samples would then lose their error;
    or to round toward zero, whose weight gradient differs)."""
    from hwquant.numerics.gradient import fake_quantize_gradient_rows

    net = _two_layer()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    w_out = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    w_out[:3] *= 1e-3
    cfg = ARCConfig(bits=4, skip_first_last=False)
    assert (cfg.rounding, cfg.clip, cfg.error_scale) == ("nearest", "search", "sample")
    handle = prepare_arc(net, cfg)
    (net(x) * w_out).sum().backward()
    handle.remove()
    h = torch.relu(x @ net[0].weight.T + net[0].bias).detach()

    def expected(rounding):
        e2 = fake_quantize_gradient_rows(w_out, 4, rounding, "search")[0]
        return e2, fake_quantize_gradient((e2.T @ h).contiguous(), 4, rounding, "search")[0]

    e2, dw2 = expected("nearest")
    torch.testing.assert_close(net[2].weight.grad, dw2, rtol=1e-6, atol=1e-12)
    assert not torch.allclose(net[2].weight.grad, expected("zero")[1])  # not the paper's RTZ
    assert (e2[:3] != 0).all(dim=1).any()
    literal = fake_quantize_gradient(w_out.contiguous(), 4, "zero", "zscore", 3.0)[0]
    assert not (literal[:3] != 0).any()  # what one per-tensor step does to the easy samples
