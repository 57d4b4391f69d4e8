"""Golden vectors (numpy replay from the files alone) and ONNX QDQ export (onnxruntime), against the integer
model; malformed manifests and files give clear errors."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from hwquant.errors import HwquantError
from hwquant.export import integer_model
from hwquant.export.golden import GoldenError, read_hex, replay, verify, write_golden, write_hex
from hwquant.methods import CQATConfig, MinMaxPTQConfig, STEConfig, prepare_qat, ptq
from hwquant.models import create_model


def _batches(n=3, shape=(16, 1, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, 4, (shape[0],), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def pow2_resnet():
    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1, num_classes=4, width=0.5).eval()
    qm = prepare_qat(m, CQATConfig(w_bits=5, a_bits=4, pow2=True), _batches()).eval()
    return qm, integer_model(qm, _batches(1)[0][0][:1])


# -------------------------------------------------------------------------------------------------- golden
def test_hex_round_trip_twos_complement(tmp_path):
    v = np.array([-128, -1, 0, 1, 127, -77], dtype=np.int64)
    write_hex(tmp_path / "a.hex", v, 8)
    assert (tmp_path / "a.hex").read_text().split() == ["80", "ff", "00", "01", "7f", "b3"]
    assert np.array_equal(read_hex(tmp_path / "a.hex", 8, 6), v)
    with pytest.raises(GoldenError, match="do not fit"):
        write_hex(tmp_path / "b.hex", np.array([128]), 8)


def test_golden_replay_equals_integer_model(pow2_resnet, tmp_path):
    qm, im = pow2_resnet
    x = _batches(1, seed=3)[0][0][:2]
    manifest = write_golden(im, x, tmp_path / "g")
    m = json.loads(manifest.read_text())
    assert m["format"] == "hwquant-golden-1" and len(m["ops"]) == len(im.ops)
    conv = next(op for op in m["ops"] if op["kind"] == "conv2d")
    assert {"weight", "bias", "stride", "padding", "scale"} <= set(conv)
    req = next(op for op in m["ops"] if op["kind"] == "requant")
    assert {"multiplier", "shift", "qmin", "qmax", "divisor"} <= set(req)
    res = verify(tmp_path / "g")
    assert res["ok"] and res["mismatches"] == [] and res["values"] > 0
    env = replay(tmp_path / "g")
    ref = im(im.quantize_input(x))
    assert np.array_equal(env[im.output_name], ref.numpy())
    # the integer model's dequantized output is the fake-quant model's output
    with torch.no_grad():
        assert torch.equal(im.dequantize(torch.from_numpy(env[im.output_name])), qm(x))


def test_golden_detects_a_flipped_value(pow2_resnet, tmp_path):
    _, im = pow2_resnet
    write_golden(im, _batches(1)[0][0][:1], tmp_path / "g")
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    conv = next(op for op in m["ops"] if op["kind"] == "conv2d" and op["name"] != "conv1")
    f = tmp_path / "g" / conv["weight"]["file"]
    words = f.read_text().split()
    words[3] = "0" * (len(words[3]) - 1) + ("1" if words[3][-1] != "1" else "2")
    f.write_text("\n".join(words) + "\n")
    res = verify(tmp_path / "g")
    assert not res["ok"] and conv["name"] in res["mismatches"]


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m.pop("ops"), "lacks 'ops'"),
    (lambda m: m.update(format="other"), "format must be"),
    (lambda m: m["ops"][0].update(kind="softmax"), "is not one of"),
    (lambda m: m["ops"][1].update(inputs=["nowhere"]), "which no earlier op produces"),
    (lambda m: m["ops"][0]["output"].update(shape=[1, 2]), "the manifest says"),
    (lambda m: m["ops"][0]["output"].update(file="../x.hex"), "plain file name"),
    (lambda m: m["input"].update(bits=99), "bits must be in 2..64"),
])
def test_malformed_manifest_clear_error(pow2_resnet, tmp_path, edit, needle):
    _, im = pow2_resnet
    write_golden(im, _batches(1)[0][0][:1], tmp_path / "g")
    path = tmp_path / "g" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(GoldenError, match=needle):
        verify(tmp_path / "g")


def test_golden_missing_and_not_json(tmp_path):
    with pytest.raises(GoldenError, match="no manifest.json"):
        verify(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(GoldenError, match="not valid JSON"):
        verify(tmp_path)


def test_golden_write_is_atomic(pow2_resnet, tmp_path, monkeypatch):
    _, im = pow2_resnet
    write_golden(im, _batches(1)[0][0][:1], tmp_path / "g")
    before = sorted(p.name for p in (tmp_path / "g").iterdir())
    import hwquant.export.golden as golden

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(golden, "write_hex", boom)
    with pytest.raises(RuntimeError):
        write_golden(im, _batches(1)[0][0][:1], tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["g"]


# ---------------------------------------------------------------------------------------------------- ONNX
# only these tests need onnx/onnxruntime (a module-level importorskip would hide the ones above)
needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
                                reason="onnx / onnxruntime not installed")


@needs_onnx
def test_onnx_int4_graph_runs_bit_exact_in_onnxruntime_with_default_options(pow2_resnet, tmp_path):
    import onnx
    import onnxruntime as ort

    from hwquant.export.onnx import check_onnx, to_onnx

    _, im = pow2_resnet
    path = to_onnx(im, tmp_path / "m.onnx", codes_outputs=True)
    model = onnx.load(str(path))
    types = {i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.UINT4 not in types  # 4-bit activation codes ride in uint8 (+ Clip) by default
    assert onnx.TensorProto.INT8 in types  # 5-bit weights ride in int8 (first/last layers 8-bit)
    res = check_onnx(path, im, _batches(2, seed=5))  # "auto": onnxruntime's default, every optimization
    assert res["codes"] > 0 and res["codes_diff"] == 0 and res["max_logit_lsb"] == 0.0
    assert res["optimize"] == "all" and res["agree"] == 100.0
    # a plain onnxruntime session with default SessionOptions loads and runs the file

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _batches(1, seed=5)[0][0]
    logits = sess.run(["logits"], {"input": x.numpy()})[0]
    v = im(im.quantize_input(x)).double() * im.output_scale.double().reshape(1, -1)
    assert np.array_equal(logits, v.float().numpy())


@needs_onnx
def test_onnx_window_requant_is_two_stage_and_bit_exact_in_onnxruntime(tmp_path):
    """CQAT ``step="window"`` (fixed point): each windowed requantization is an 8-bit QuantizeLinear and a
    shifter QuantizeLinear at scale 2^shift; onnxruntime with its default options agrees on every code."""
    import onnx

    from hwquant.export.onnx import check_onnx, to_onnx

    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1, num_classes=4, width=0.5).eval()
    qm = prepare_qat(m, CQATConfig(w_bits=5, a_bits=4, pow2=True, step="window"), _batches()).eval()
    im = integer_model(qm, _batches(1)[0][0][:1])
    shifts = [op.params["window_shift"] for op in im.ops if "window_shift" in op.params]
    assert shifts
    path = to_onnx(im, tmp_path / "w.onnx", codes_outputs=True)
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    window_scales = sorted(float(inits[n.input[1]]) for n in graph.node
                           if n.op_type == "QuantizeLinear" and ".window" in n.input[1])
    assert window_scales == sorted(2.0 ** s for s in shifts)
    res = check_onnx(path, im, _batches(2, seed=5))
    assert res["codes"] > 0 and res["codes_diff"] == 0 and res["max_logit_lsb"] == 0.0
    assert res["optimize"] == "all"


@needs_onnx
def test_onnx_int4_activations_option(pow2_resnet, tmp_path):
    import onnx

    from hwquant.export.onnx import check_onnx, to_onnx

    _, im = pow2_resnet
    path = to_onnx(im, tmp_path / "m4.onnx", codes_outputs=True, int4_activations=True)
    types = {i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert onnx.TensorProto.UINT4 in types  # 4-bit activation codes at opset 21
    res = check_onnx(path, im, _batches(2, seed=5))
    assert res["codes_diff"] == 0 and res["max_logit_lsb"] == 0.0 and res["optimize"] == "basic"


@needs_onnx
def test_onnx_int8_fuses_to_qlinearconv_within_one_lsb(tmp_path):
    from hwquant.export.onnx import check_onnx, fused_ops, to_onnx

    torch.manual_seed(1)
    m = create_model("resnet20", in_channels=1, num_classes=4, width=0.5).eval()
    qm = prepare_qat(m, STEConfig(w_bits=8, a_bits=8, first_last_bits=None, pow2=True), _batches()).eval()
    im = integer_model(qm, _batches(1)[0][0][:1])
    path = to_onnx(im, tmp_path / "m.onnx", codes_outputs=True)
    ops = fused_ops(path)
    assert ops.get("QLinearConv", 0) >= 1, ops
    res = check_onnx(path, im, _batches(2, seed=6))
    assert res["optimize"] == "all" and res["max_code_lsb"] <= 1


@needs_onnx
def test_onnx_float_scales_codes_within_a_few_lsb(tmp_path):
    from hwquant.export.onnx import check_onnx, to_onnx

    torch.manual_seed(2)
    m = create_model("small_cnn", in_channels=1, num_classes=4, width=0.5).eval()
    qm, _ = ptq(m, MinMaxPTQConfig(w_bits=8, a_bits=8), _batches())
    im = integer_model(qm.eval(), _batches(1)[0][0][:1])
    path = to_onnx(im, tmp_path / "m.onnx", codes_outputs=True)
    res = check_onnx(path, im, _batches(2, seed=6))
    # the contract: codes move only at float ties, by 1 LSB (measured: 0 of 41984 codes, 100 % agreement)
    assert res["codes_diff"] <= 1e-3 * res["codes"] and res["max_code_lsb"] <= 1 and res["agree"] == 100.0


@needs_onnx
def test_onnx_bias_beyond_int32_is_an_error_naming_the_layer(pow2_resnet, tmp_path):
    import copy

    from hwquant.export.onnx import to_onnx

    imodel = copy.deepcopy(pow2_resnet[1])
    op = next(o for o in imodel.ops if o.kind == "conv2d" and o.params.get("bias") is not None)
    op.params["bias"] = op.params["bias"].clone()
    op.params["bias"][0] = 2**33
    with pytest.raises(HwquantError, match=f"{op.name}: the bias needs 35-bit codes"):
        to_onnx(imodel, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@needs_onnx
def test_onnx_opset_too_low(pow2_resnet, tmp_path):
    from hwquant.export.onnx import to_onnx

    with pytest.raises(HwquantError, match="opset"):
        to_onnx(pow2_resnet[1], tmp_path / "m.onnx", opset=11)
    assert not (tmp_path / "m.onnx").exists()
