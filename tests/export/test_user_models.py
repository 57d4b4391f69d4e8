"""Networks written the way users write them (tests/export/user_models.py, not the bundled models) through
PTQ, QAT preparation, integer export, ONNX (onnxruntime, default options) and QONNX.

Oracles: the fake-quant model's logits (integer model = fake quant bit for bit with power-of-two steps), the
integer model (onnxruntime and the QONNX executors agree with it code for code), and cases worked by hand
(ReLU6 as a clamp of the requantized codes, a LUT entry of hardswish, nearest upsampling by repetition).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from user_models import USER_MODELS, MobileBlockNet, Stack, TwoBranch

import hwquant as hq
from hwquant.errors import ConfigError
from hwquant.export import compare, integer_model
from hwquant.methods import CQATConfig, GGDPTQConfig, MinMaxPTQConfig, STEConfig, prepare_qat
from hwquant.nn import QuantLUTAct, fold_batchnorm, layer_positions, quant_layers

SHAPE = (1, 12, 12)


def _data(n: int = 64, seed: int = 0, labels: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *SHAPE, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + 16], y[i:i + 16]) if labels else x[i:i + 16] for i in range(0, n, 16)]


def _model(name: str) -> nn.Module:
    torch.manual_seed(1)
    m = USER_MODELS[name]()
    m.train()
    with torch.no_grad():  # BN running statistics that are not the identity
        for x, _ in _data(seed=9):
            m(x)
    return m.eval()


def _weight_bits(qm: nn.Module) -> dict[str, int]:
    return {n: layer.weight_quant.spec.bits for n, layer in quant_layers(qm)}


# ------------------------------------------------------------------------------------ first / last by graph
def test_first_last_found_from_the_graph():
    assert layer_positions(_model("stack")).first == ("features.0",)
    assert layer_positions(_model("stack")).last == ("classifier",)
    pos = layer_positions(_model("two_branch"))
    assert set(pos.first) == {"a", "b"} and pos.last == ("out",) and pos.source == "graph"
    assert layer_positions(fold_batchnorm(_model("mobile"))).first == ("stem",)


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_first_last_bits_apply_to_user_models(name):
    m = _model(name)
    qm, _ = hq.ptq(m, MinMaxPTQConfig(w_bits=4, a_bits=4, first_last_bits=8), _data())
    bits = _weight_bits(qm)
    pos = layer_positions(m)
    assert all(bits[n] == 8 for n in (*pos.first, *pos.last)), bits
    assert all(b == 4 for n, b in bits.items() if n not in (*pos.first, *pos.last)), bits
    # explicit names override the graph
    m.first_layer_name, m.last_layer_name = list(bits)[1], list(bits)[-2]
    bits2 = _weight_bits(hq.ptq(m, MinMaxPTQConfig(w_bits=4, a_bits=4, first_last_bits=8), _data())[0])
    assert bits2[list(bits)[1]] == 8 and bits2[list(bits)[0]] == 4


# ----------------------------------------------------------------------------- integer == fake quant (pow2)
def _configs():
    return {
        "ggd_w8a8": lambda m, d: hq.ptq(m, GGDPTQConfig(w_bits=8, a_bits=8, bft=False), d)[0],
        "ggd_w4a4_fl8": lambda m, d: hq.ptq(m, GGDPTQConfig(w_bits=4, a_bits=4, first_last_bits=8, bft=False), d)[0],
        "ste_w8a8": lambda m, d: prepare_qat(m, STEConfig(w_bits=8, a_bits=8, pow2=True), d).eval(),
        "ste_w4a4_fl8": lambda m, d: prepare_qat(m, STEConfig(w_bits=4, a_bits=4, pow2=True), d).eval(),
        # bit windows of an 8-bit quantizer on ReLU6 clamps, depthwise, concatenation and shared inputs
        "cqat_window_w5a4": lambda m, d: prepare_qat(m, CQATConfig(w_bits=5, a_bits=4, pow2=True, step="window"),
                                                     d).eval(),
    }


@pytest.mark.parametrize("cfg", list(_configs()))
@pytest.mark.parametrize("name", list(USER_MODELS))
def test_integer_logits_equal_fake_quant(name, cfg):
    qm = _configs()[cfg](_model(name), _data())
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    r = compare(qm, im, _data(seed=4))
    assert r["images"] == 64
    assert r["max_abs_diff"] == 0.0 and r["codes_diff"] == 0, r
    if cfg.endswith("fl8"):
        assert {b for b in _weight_bits(qm).values()} == {4, 8}


def test_bft_keeps_one_input_quantizer_for_a_shared_input():
    qm, _ = hq.ptq(_model("two_branch"), GGDPTQConfig(w_bits=8, a_bits=8, bft=True), _data())
    assert qm.a.input_quant is qm.b.input_quant  # both read the image: one quantizer, tuned once
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    assert compare(qm, im, _data(seed=4))["max_abs_diff"] == 0.0


def test_cqat_w5a4_user_model_exports_exact():
    qm = prepare_qat(_model("mobile"), CQATConfig(w_bits=5, a_bits=4, pow2=True), _data()).eval()
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    assert compare(qm, im, _data(seed=4))["max_abs_diff"] == 0.0


def test_float_scales_within_a_code():
    """Min-max PTQ (arbitrary real steps): integer requantization agrees but for codes at float ties."""
    for name in USER_MODELS:
        qm, _ = hq.ptq(_model(name), MinMaxPTQConfig(w_bits=8, a_bits=8), _data())
        r = compare(qm, integer_model(qm, torch.zeros(1, *SHAPE)), _data(seed=4))
        assert r["codes_diff"] <= 1e-3 * r["codes"] and r["max_code_lsb"] <= 1 and r["prediction_agree"] >= 98


# ------------------------------------------------------------------------------------- cases worked by hand
def test_relu6_is_a_clamp_of_the_requantized_codes():
    qm = prepare_qat(_model("stack"), STEConfig(w_bits=8, a_bits=8, pow2=True), _data()).eval()
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    # features.4 -> BN -> ReLU6 -> AvgPool -> view -> classifier: the clip meets the sum pool, so it is
    # applied to the accumulator with the bounds [0, 6 / s_acc]
    (cl,) = [op for op in im.ops if op.kind == "clamp"]
    s = cl.scale.double().reshape(-1)
    assert torch.equal(cl.params["lo"], torch.zeros_like(cl.params["lo"]))
    assert torch.equal(cl.params["hi"].expand(s.numel()), torch.floor(6.0 / s).to(torch.int64))
    # and the float model's relu6 output, quantized by the classifier's input quantizer, equals the codes
    x = _data(seed=2)[0][0]
    env = im.trace(im.quantize_input(x))
    req = next(op for op in im.ops if op.kind == "requant" and op.name.startswith("classifier"))
    feats = qm.features(x)
    codes = qm.classifier.input_quant.codes(feats.reshape(feats.shape[0], -1))
    assert torch.equal(env[req.name], codes.to(torch.int64))


def test_relu6_before_a_conv_is_the_requant_saturation():
    qm = prepare_qat(_model("mobile"), STEConfig(w_bits=8, a_bits=8, pow2=True), _data()).eval()
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    req = next(op for op in im.ops if op.name == "block.dw.0.requant")  # after expand -> ReLU6
    iq = qm.block.dw[0].input_quant
    assert int(req.params["clip_hi"]) == int(iq.codes(torch.tensor([6.0]))) == min(255, round(6.0 / float(iq.scale)))
    assert int(req.params["clip_lo"]) == 0


def test_hardswish_table_by_hand():
    qm = prepare_qat(_model("mobile"), STEConfig(w_bits=8, a_bits=8, pow2=True), _data()).eval()
    act = qm.act
    assert isinstance(act, QuantLUTAct)
    table, qmin = act.table()
    oq = act.output_quant
    s_in, s_out = float(act.input_quant.scale), float(oq.scale)
    lo, hi = (-128, 127) if oq.signed else (0, 255)
    checked = 0
    for i, code in enumerate(table.tolist()):
        x = (qmin + i) * s_in
        y = x * min(max(x + 3.0, 0.0), 6.0) / 6.0 / s_out  # hardswish in float64, in output steps
        if abs(y - math.floor(y) - 0.5) < 1e-4:
            continue  # a tie: float32 and float64 may round it apart
        assert code == min(max(round(y), lo), hi), (qmin + i, y, code)
        checked += 1
    assert checked > 240


def test_upsample_and_concat_in_the_integer_model():
    qm = prepare_qat(_model("two_branch"), STEConfig(w_bits=8, a_bits=8, pow2=True), _data()).eval()
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    kinds = [op.kind for op in im.ops]
    assert "concat" in kinds and "upsample" in kinds and "lut" in kinds
    x = _data(seed=2)[0][0]
    env = im.trace(im.quantize_input(x))
    up = next(op for op in im.ops if op.kind == "upsample")
    src = env[up.inputs[0]]
    assert torch.equal(env[up.name], src.repeat_interleave(2, 2).repeat_interleave(2, 3))
    cat = next(op for op in im.ops if op.kind == "concat")
    assert env[cat.name].shape[1] == 10 and cat.scale.numel() == 10  # each branch keeps its channels' scales


@pytest.mark.parametrize("name", list(USER_MODELS))
def test_golden_vectors_replay_from_files(name, tmp_path):
    from hwquant.export.golden import load_manifest, verify, write_golden

    qm = prepare_qat(_model(name), STEConfig(w_bits=4, a_bits=4, pow2=True), _data()).eval()
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    write_golden(im, _data(4, seed=7)[0][0], tmp_path / "g")
    kinds = {op["kind"] for op in load_manifest(tmp_path / "g")["ops"]}
    assert {"stack": {"clamp", "maxpool"}, "mobile": {"lut", "clamp", "add"},
            "two_branch": {"concat", "upsample", "lut"}}[name] <= kinds
    r = verify(tmp_path / "g")  # numpy int64 from the files alone, layer by layer and end to end
    assert r["ok"] and r["ops"] == len(im.ops), r
    # a corrupted lookup table is caught
    if "lut" in kinds:
        table = next(tmp_path.glob("g/*.table.hex"))
        lines = table.read_text().splitlines()
        lines[len(lines) // 2] = "0" * len(lines[0]) if lines[len(lines) // 2].strip("0") else "1".zfill(len(lines[0]))
        table.write_text("\n".join(lines) + "\n")
        assert not verify(tmp_path / "g")["ok"]


# --------------------------------------------------------------------------------------------- errors
class _Mul(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.sigmoid(y)  # SiLU written by hand: no integer form here
        return self.fc(y.mean((2, 3)))


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow
            y = F.relu(y)
        return self.fc(y.mean((2, 3)))


def test_unsupported_function_names_node_and_op():
    qm = prepare_qat(_Mul().eval(), STEConfig(w_bits=8, a_bits=8, pow2=True), _data())
    with pytest.raises(ConfigError, match=r"^sigmoid: function 'sigmoid' has no integer form here$"):
        integer_model(qm, torch.zeros(1, *SHAPE))


def test_untraceable_model_one_clear_error_and_unfolded_ptq_still_works():
    m = _Untraceable().eval()
    with pytest.raises(ConfigError, match=r"torch\.fx cannot trace _Untraceable after node 'gt': symbolically") as e:
        hq.ptq(m, MinMaxPTQConfig(w_bits=8, a_bits=8), _data())
    assert "\n" not in str(e.value)
    qm, report = hq.ptq(m, MinMaxPTQConfig(w_bits=8, a_bits=8, fold_bn=False, first_last_bits=8), _data())
    assert report["sqnr_db"] > 20 and set(_weight_bits(qm)) == {"conv", "fc"}
    assert layer_positions(m).source == "module order"


def test_bn_without_running_stats_is_named():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                      nn.Linear(400, 2))
    with pytest.raises(ConfigError, match=r"^1: BatchNorm2d without running statistics"):
        fold_batchnorm(m)


def test_bn_without_affine_folds_exactly():
    m = _model("mobile")
    x = _data(seed=3)[0][0]
    assert torch.allclose(fold_batchnorm(m)(x), m(x), atol=1e-5, rtol=1e-5)


def test_input_quantizers_must_agree():
    m = TwoBranch().eval()
    qm = prepare_qat(m, STEConfig(w_bits=8, a_bits=8, pow2=True), _data())
    qm.b.input_quant = type(qm.a.input_quant)(qm.a.input_quant.spec)  # untie and give it another scale
    qm.b.input_quant.calibrate_from(torch.randn(100) * 7)
    with pytest.raises(ConfigError, match="both read the model input but quantize it differently"):
        integer_model(qm.eval(), torch.zeros(1, *SHAPE))


# ---------------------------------------------------------------------------------------- ONNX / QONNX
# only these tests need onnx/onnxruntime (a module-level importorskip would hide the ones above)
needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
                                reason="onnx / onnxruntime not installed")


@needs_onnx
@pytest.mark.parametrize("bits", [(8, 8, None), (4, 4, 8)])
@pytest.mark.parametrize("name", list(USER_MODELS))
def test_onnxruntime_default_options_equal_integer_model(name, bits, tmp_path):
    import onnxruntime as ort

    from hwquant.export.onnx import check_onnx, to_onnx
    from hwquant.export.qonnx import check_qonnx, to_qonnx

    wb, ab, fl = bits
    qm = prepare_qat(_model(name), STEConfig(w_bits=wb, a_bits=ab, first_last_bits=fl, pow2=True), _data()).eval()
    im = integer_model(qm, torch.zeros(1, *SHAPE))
    path = to_onnx(im, tmp_path / "m.onnx", codes_outputs=True)
    res = check_onnx(path, im, _data(seed=5))
    assert res["optimize"] == "all"
    assert res["codes"] > 0 and res["codes_diff"] == 0 and res["max_logit_lsb"] == 0.0, res
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # default SessionOptions
    x = _data(seed=6)[0][0]
    logits = sess.run(["logits"], {"input": x.numpy()})[0]
    want = im.run(x)
    assert np.array_equal(logits, want.numpy())
    assert torch.equal(qm(x), want)  # ... and the fake-quant model
    qpath = to_qonnx(im, tmp_path / "m.qonnx.onnx")
    r = check_qonnx(qpath, im, _data(16, seed=5), executor="numpy")
    assert r["codes_diff"] == 0 and r["max_logit_lsb"] == 0.0


@needs_onnx
def test_user_models_module_is_not_the_bundled_models():
    assert all(not hasattr(c, "hwquant_args") for c in (Stack, MobileBlockNet, TwoBranch))
