"""An input gain folded into the image layer (GGD PTQ's power-of-two image step): the integer model, the ONNX
QDQ graph in onnxruntime, the QONNX graph and the golden vectors all quantize the image as the fake-quant model
does, bit for bit; a gain inside the datapath is refused."""

import importlib.util
import json

import pytest
import torch

from hwquant.errors import ConfigError
from hwquant.export import integer_model
from hwquant.export.golden import verify, write_golden
from hwquant.methods import GGDPTQConfig, ptq
from hwquant.models import create_model

needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
                                reason="onnx / onnxruntime not installed")


def _images(n=3, batch=16, seed=0):
    """Normalised-image-like batches: half the pixels on a background value (an atom), the rest spread."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 1, 12, 12, generator=g).abs() * 1.3 - 0.2
        background = torch.rand(batch, 1, 12, 12, generator=g) < 0.5
        out.append((torch.where(background, torch.tensor(-0.81), x), torch.randint(0, 4, (batch,), generator=g)))
    return out


@pytest.fixture(scope="module")
def gained():
    torch.manual_seed(0)
    m = create_model("resnet20", in_channels=1, num_classes=4, width=0.5).eval()
    qm, report = ptq(m, GGDPTQConfig(w_bits=4, a_bits=4, bft=False), _images())
    qm = qm.eval()
    return qm, report, integer_model(qm, _images(1)[0][0][:1])


def test_the_image_layer_has_a_gain_and_power_of_two_steps_only(gained):
    qm, report, im = gained
    assert report["image_gain"] == {"conv1": im.input_gain} and im.input_gain != 1.0
    s = float(im.input_scale)
    assert s == 2.0 ** round(torch.log2(torch.tensor(s)).item())
    # every requantization of the datapath is a pure shift (multiplier 1): the gain stays on the host
    for op in im.ops:
        if op.kind == "requant":
            assert torch.all(op.params["multiplier"] == 1), op.name


def test_integer_model_equals_the_fake_quant_model(gained):
    qm, _, im = gained
    x = _images(1, seed=7)[0][0]
    codes = im.quantize_input(x)
    # the host's codes, by hand: rne(fl32(x * g) / p)
    g = torch.tensor(im.input_gain, dtype=torch.float32)
    lo, hi = im.input_range
    assert torch.equal(codes, torch.round((x * g) / float(im.input_scale)).clamp(lo, hi).to(torch.int64))
    with torch.no_grad():
        assert torch.equal(im.dequantize(im(codes)), qm(x))


@needs_onnx
def test_onnx_and_qonnx_apply_the_gain_bit_exactly(gained, tmp_path):
    import onnx

    from hwquant.export.onnx import check_onnx, to_onnx
    from hwquant.export.qonnx import check_qonnx, to_qonnx

    _, _, im = gained
    path = to_onnx(im, tmp_path / "g.onnx", codes_outputs=True)
    assert onnx.load(str(path)).graph.node[0].op_type == "Mul"
    res = check_onnx(path, im, _images(2, seed=5))
    assert res["codes"] > 0 and res["codes_diff"] == 0 and res["max_logit_lsb"] == 0.0
    qpath = to_qonnx(im, tmp_path / "g.qonnx.onnx")
    r = check_qonnx(qpath, im, _images(2, seed=5), executor="numpy")
    assert r["codes"] > 0 and r["codes_diff"] == 0 and r["max_logit_lsb"] == 0.0


def test_golden_manifest_records_the_gain(gained, tmp_path):
    _, _, im = gained
    manifest = write_golden(im, _images(1, seed=3)[0][0][:2], tmp_path / "g")
    assert json.loads(manifest.read_text())["input"]["gain"] == im.input_gain
    assert verify(tmp_path / "g")["ok"]


def test_a_gain_inside_the_datapath_is_refused(gained):
    import copy

    qm = copy.deepcopy(gained[0])
    qm.layer1[0].conv1.input_quant.set_input_gain(0.75)
    with pytest.raises(ConfigError, match=r"^layer1\.0\.conv1: its input quantizer has an input gain"):
        integer_model(qm, _images(1)[0][0][:1])


def test_the_gain_survives_save_and_load(gained, tmp_path):
    import hwquant as hq

    qm, _, im = gained
    hq.save(qm, tmp_path / "q.pt", GGDPTQConfig(w_bits=4, a_bits=4, bft=False),
            model_args={"name": "resnet20", "in_channels": 1, "num_classes": 4, "width": 0.5})
    back = hq.load(tmp_path / "q.pt")
    assert back.conv1.input_quant.input_gain == im.input_gain
    x = _images(1, seed=9)[0][0]
    with torch.no_grad():
        assert torch.equal(back.eval()(x), qm(x))
