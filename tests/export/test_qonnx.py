"""QONNX export (``Quant`` nodes at 3/4/5/6/8 bits) checked against the integer model with qonnx's executor and
with the numpy fallback executor."""

import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")

from hwquant.errors import HwquantError  # noqa: E402
from hwquant.export import integer_model  # noqa: E402
from hwquant.export import qonnx as hq  # noqa: E402
from hwquant.export.qonnx import QONNX_DOMAIN, check_qonnx, run_numpy, to_qonnx  # noqa: E402
from hwquant.methods import CQATConfig, MinMaxPTQConfig, STEConfig, prepare_qat, ptq  # noqa: E402
from hwquant.models import create_model  # noqa: E402

needs_qonnx = pytest.mark.skipif(not hq.qonnx_available(), reason="qonnx is not installed")


def _batches(n=3, shape=(16, 1, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)) for _ in range(n)]


def _tiny(cfg):
    # one thread: the MSE calibration makes thousands of tiny torch calls, which slow down ~30x when a second
    # thread has to wait for a busy core (e.g. a benchmark running next to the tests); restored afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        m = create_model("resnet20", in_channels=1, num_classes=4, width=0.5).eval()
        if isinstance(cfg, MinMaxPTQConfig):
            qm, _ = ptq(m, cfg, _batches())
        else:
            qm = prepare_qat(m, cfg, _batches())
        return integer_model(qm.eval(), _batches(1)[0][0][:1])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pow2_cqat(tmp_path_factory):
    im = _tiny(CQATConfig(w_bits=5, a_bits=4, pow2=True))
    return im, to_qonnx(im, tmp_path_factory.mktemp("qonnx") / "cqat.onnx")


@pytest.fixture(scope="module")
def mixed_ste(tmp_path_factory):
    im = _tiny(STEConfig(w_bits=3, a_bits=6, pow2=True))
    return im, to_qonnx(im, tmp_path_factory.mktemp("qonnx") / "ste.onnx", codes_outputs=True)


def _check_batches():
    return _batches(2, shape=(8, 1, 12, 12), seed=5)


def _quants(path):
    """Quant nodes of the file: value name -> (bitwidth, signed, narrow, scale shape)."""
    m = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type != "Quant":
            continue
        assert n.domain == QONNX_DOMAIN and len(n.input) == 4
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        assert a["rounding_mode"] == b"ROUND"
        assert float(inits[n.input[2]]) == 0.0  # zero point
        out[n.output[0].removesuffix(":quant")] = (int(inits[n.input[3]]), a["signed"], a["narrow"],
                                                    inits[n.input[1]].shape)
    return out


def _assert_exact(r, executor):
    assert r["executor"] == executor and r["images"] == 16 and r["missing"] == []
    assert r["codes"] > 0 and r["codes_diff"] == 0 and r["max_code_lsb"] == 0, r["first_diff"]
    assert r["max_logit_lsb"] == 0.0 and r["prediction_agree"] == 100.0


# ------------------------------------------------------------------------------------------------- export
def test_pow2_cqat_graph_has_native_bit_widths(pow2_cqat):
    im, path = pow2_cqat
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    assert {o.domain: o.version for o in m.opset_import} == {"": hq.OPSET, QONNX_DOMAIN: 1}
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    q = _quants(path)
    requants = [op for op in im.ops if op.kind == "requant"]
    layers = [op for op in im.ops if op.kind in ("conv2d", "linear")]
    assert len(q) == 1 + len(requants) + len(layers)
    assert q[im.input_name][:3] == (8, 1, 0)  # input quantizer: 8-bit signed (first layer)
    assert q["fc.requant"][:3] == (8, 0, 0)  # last layer input: 8-bit unsigned
    assert q["conv1.weight"][:3] == (8, 1, 0) and q["fc.weight"][:3] == (8, 1, 0)
    inner = [op for op in layers if op.name not in ("conv1", "fc")]
    assert {q[f"{op.name}.weight"][0] for op in inner} == {5}
    assert {q[op.name][:3] for op in requants if op.name != "fc.requant"} == {(4, 0, 0)}
    # per-channel weight scales broadcast over the weight: [C, 1, 1, 1] (conv) and [C, 1] (linear)
    assert q["layer1.0.conv1.weight"][3] == (8, 1, 1, 1) and q["fc.weight"][3] == (4, 1)
    ops = {n.op_type for n in m.graph.node}
    assert ops == {"Quant", "Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Identity"}
    assert not list(path.parent.glob(".*.tmp"))


def test_mixed_w3a6_graph(mixed_ste):
    im, path = mixed_ste
    q = _quants(path)
    widths = {v[0] for v in q.values()}
    assert widths == {3, 6, 8}
    assert q["layer2.0.conv1.weight"][0] == 3 and q["layer2.0.conv1.requant"][0] == 6
    outs = [o.name for o in onnx.load(str(path)).graph.output]
    assert outs[0] == "logits" and set(outs[1:]) == {f"{k}:quant" for k in q}  # codes_outputs=True


def test_codes_outputs_hold_the_integer_codes(mixed_ste):
    im, path = mixed_ste
    x = _check_batches()[0][0]
    ctx = run_numpy(path, x.numpy())
    env = im.trace(im.quantize_input(x))
    s = float(im._by_name["layer1.0.conv1.requant"].params["out_scale"])
    codes = np.round(ctx["layer1.0.conv1.requant:quant"].astype(np.float64) / s)
    assert np.array_equal(codes, env["layer1.0.conv1.requant"].numpy())


# -------------------------------------------------------------------------------------------------- check
@needs_qonnx
def test_check_qonnx_pow2_cqat_exact_with_qonnx_executor(pow2_cqat):
    im, path = pow2_cqat
    r = check_qonnx(path, im, _check_batches(), executor="qonnx")
    _assert_exact(r, "qonnx")
    assert r["top1_qonnx"] == r["top1_integer"]


def test_check_qonnx_pow2_cqat_exact_with_numpy_fallback(pow2_cqat, monkeypatch):
    im, path = pow2_cqat
    monkeypatch.setattr(hq, "qonnx_available", lambda: False)  # as if qonnx were not installed
    _assert_exact(check_qonnx(path, im, _check_batches()), "numpy")
    with pytest.raises(HwquantError, match="needs the qonnx package"):
        check_qonnx(path, im, _check_batches(), executor="qonnx")


def test_window_cqat_two_quants_per_requant_exact(tmp_path):
    """CQAT ``step="window"`` (fixed point): each windowed requantization is an 8-bit Quant followed by a
    4-bit Quant at 2^shift times its scale; both executors agree with the integer model on every code."""
    im = _tiny(CQATConfig(w_bits=5, a_bits=4, pow2=True, step="window"))
    path = to_qonnx(im, tmp_path / "window.onnx")
    m = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    producer = {n.output[0]: n for n in m.graph.node}
    pairs = 0
    for op in im.ops:
        if "window_shift" not in op.params:
            continue
        outer = producer[f"{op.name}:quant"]
        inner = producer[outer.input[0]]
        assert inner.op_type == "Quant" and int(inits[inner.input[3]]) == 8 and int(inits[outer.input[3]]) == 4
        assert float(inits[outer.input[1]]) == float(inits[inner.input[1]]) * 2 ** op.params["window_shift"]
        pairs += 1
    assert pairs > 5
    _assert_exact(check_qonnx(path, im, _check_batches()), "qonnx" if hq.qonnx_available() else "numpy")
    _assert_exact(check_qonnx(path, im, _check_batches(), executor="numpy"), "numpy")


def test_check_qonnx_mixed_w3a6_exact(mixed_ste):
    im, path = mixed_ste
    r = check_qonnx(path, im, _check_batches())
    _assert_exact(r, "qonnx" if hq.qonnx_available() else "numpy")
    _assert_exact(check_qonnx(path, im, _check_batches(), executor="numpy"), "numpy")


def test_pools_and_grouped_conv_exact_with_both_executors(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(36, 3))
    qm = prepare_qat(model, STEConfig(w_bits=5, a_bits=3, pow2=True), _batches(2, shape=(8, 2, 12, 12))).eval()
    im = integer_model(qm, torch.zeros(1, 2, 12, 12))
    path = to_qonnx(im, tmp_path / "pools.onnx")
    assert {"MaxPool", "AveragePool"} <= {n.op_type for n in onnx.load(str(path)).graph.node}
    # first conv / last linear found from the graph of the plain Sequential: 8 bits (first_last_bits default)
    assert {v[0] for v in _quants(path).values()} == {3, 5, 8}
    batches = _batches(2, shape=(8, 2, 12, 12), seed=3)
    for ex in ("numpy", "qonnx") if hq.qonnx_available() else ("numpy",):
        _assert_exact(check_qonnx(path, im, batches, executor=ex), ex)


def test_float_scales_are_reported(tmp_path):
    """Float scales: QONNX divides where hwquant multiplies by fl32(1/s), and the float graph rounds its sums;
    the check reports (does not require zero) the codes that move.  Weights are exact for any scale."""
    im = _tiny(MinMaxPTQConfig(w_bits=8, a_bits=8))
    path = to_qonnx(im, tmp_path / "ptq.onnx")
    r = check_qonnx(path, im, _check_batches(), executor="numpy")
    assert r["missing"] == [] and r["codes"] > 0
    assert all(r["layers"][f"{op.name}.weight"]["codes_diff"] == 0 for op in im.ops if op.kind == "conv2d")
    assert r["max_code_lsb"] <= 3 and r["prediction_agree"] == 100.0  # measured: 731 codes, 3 LSB, 100%
    assert {"codes_diff", "max_logit_lsb", "max_logit_abs", "first_diff"} <= set(r)


# ------------------------------------------------------------------------------------ Quant semantics/errors
def test_numpy_quant_matches_qonnx_int_quant():
    quant = pytest.importorskip("qonnx.custom_op.general.quant")
    g = np.random.default_rng(0)
    x = np.concatenate([g.normal(0, 3, 4000), np.arange(-40, 40) + 0.5]).astype(np.float32)
    for scale in (np.float32(0.25), np.float32(0.0371), np.float32(1.0)):
        for bits, signed, narrow in [(3, 1, 0), (5, 1, 1), (4, 0, 0), (6, 0, 1), (8, 1, 0)]:
            ref = quant.quant(x, scale, np.float32(0), np.float32(bits), signed, narrow, "ROUND")
            ours = hq._quant(x, scale, np.float32(0), np.float32(bits), bool(signed), bool(narrow))
            assert np.array_equal(ours, ref.astype(np.float32))
            assert hq._int_range(bits, bool(signed), bool(narrow)) == (
                quant.min_int(signed, narrow, bits), quant.max_int(signed, narrow, bits))
    # round half to even at exact ties
    y = hq._quant(np.array([0.5, 1.5, 2.5, -0.5, -1.5], np.float32), np.float32(1), np.float32(0), 8, True, False)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_missing_onnx_is_a_one_line_error(pow2_cqat, monkeypatch, tmp_path):
    im, _ = pow2_cqat
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(HwquantError, match="needs the onnx package"):
        to_qonnx(im, tmp_path / "x.onnx")
    with pytest.raises(HwquantError, match="needs the onnx package"):
        check_qonnx(tmp_path / "x.onnx", im, [])
