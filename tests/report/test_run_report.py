"""hwquant report: the page and its numbers for a real run, and a diagnosis that names a fragile layer."""

import base64
import html
import json
import os
import re

import pytest
import torch
from torch import nn

from hwquant.cli import main
from hwquant.nn import LayerQuant, QuantRecipe, calibrate, quantize_model
from hwquant.report.run_report import layer_sensitivity
from hwquant.spec import QuantSpec

SMALL = ["--model", "small_cnn", "--dataset", "digits", "--batch-size", "64", "--calib-size", "200",
         "--threads", "2", "--no-progress", "--no-channels-last"]


def _fragile_net():
    """Three convs and a linear; conv "2" holds one weight 200x the others on an input channel that is always
    0 (a dead ReLU), so it changes no output, yet with one 8-bit step per tensor every other weight of the layer
    rounds to 0 even at 8 bits: the layer a report must name."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        m[0].weight[0].zero_()
        m[0].bias[0] = -1.0  # channel 0 of conv "0" is dead after the ReLU
        m[2].weight[0, 0, 1, 1] = 200 * float(m[2].weight.abs().max())
    w = QuantSpec(bits=8, signed=True, granularity="tensor")
    a = QuantSpec(bits=8, signed=None)
    q = quantize_model(m, QuantRecipe(default=LayerQuant(weight=w, act=a)))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    calibrate(q, [x])
    return q.eval(), x


def test_sensitivity_names_the_fragile_layer():
    q, x = _fragile_net()
    sens = layer_sensitivity(q, [(x, None)])
    assert [r["layer"] for r in sens][0] == "2"
    # the QAT ordering (which layer, left float, recovers most) names it too
    assert layer_sensitivity(q, [(x, None)], order="all_but")[0]["layer"] == "2"
    assert [r["only_sqnr_db"] for r in sens] == sorted(r["only_sqnr_db"] for r in sens)
    by = {r["layer"]: r for r in sens}
    # quantizing all but the fragile layer keeps far more than quantizing all but any other layer
    assert by["2"]["all_but_sqnr_db"] > max(r["all_but_sqnr_db"] for n, r in by.items() if n != "2") + 6
    # the oracle: only layer "2" quantized, by hand (its weight fake-quantized with torch ops)
    with torch.no_grad():
        for name in ("0", "2", "4", "7"):
            for sub in (q.get_submodule(name).weight_quant, q.get_submodule(name).input_quant):
                sub.enabled = False
        ref = q[7](torch.flatten(torch.relu(q[4](torch.relu(q[2](torch.relu(q[0](x)))))), 1))  # all float
        s, sa = float(q[2].weight_quant.scale), float(q[2].input_quant.scale)
        w2 = torch.clamp(torch.round(q[2].weight / s), -128, 127) * s
        x2 = torch.clamp(torch.round(torch.relu(q[0](x)) / sa), 0, 255) * sa
        b2 = torch.round(q[2].bias / (s * sa)) * (s * sa)  # the bias in accumulator units (32-bit codes)
        h = torch.relu(nn.functional.conv2d(x2, w2, b2, padding=1))
        one = q[7](torch.flatten(torch.relu(q[4](h)), 1))
    for name in ("0", "2", "4", "7"):
        for sub in (q.get_submodule(name).weight_quant, q.get_submodule(name).input_quant):
            sub.enabled = True
    want = 10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - one.double()).pow(2).sum())
    assert by["2"]["only_sqnr_db"] == pytest.approx(float(want), abs=1e-3)


@pytest.fixture(scope="module")
def ptq_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    assert main(["train", *SMALL, "--epochs", "4", "--lr", "0.1", "--out", str(root / "train")]) == 0
    assert main(["ptq", "--checkpoint", str(root / "train" / "model.pt"), "--w-bits", "4", "--a-bits", "4",
                 "--out", str(root / "ptq"), "--no-progress"]) == 0
    return root / "ptq"


def test_report_of_a_ptq_run(ptq_run, capsys):
    assert main(["report", str(ptq_run), "--images", "128"]) == 0
    assert "most sensitive layer" in capsys.readouterr().out
    out = ptq_run / "report"
    rep = json.loads((out / "report.json").read_text())  # strict JSON (no Infinity)
    ptq = json.loads((ptq_run / "ptq.json").read_text())
    assert rep["kind"] == "ptq" and rep["images"] == 128
    assert rep["accuracy"][1]["top1"] == ptq["quant"]["top1"] and rep["accuracy"][0]["top1"] == ptq["fp32"]["top1"]
    assert rep["accuracy"][1]["compression"] > 4  # W4 codes against float32
    names = [r["layer"] for r in rep["layers"]]
    assert sorted(r["layer"] for r in rep["sensitivity"]) == sorted(names) and len(names) >= 3
    assert all(r["weight_sqnr_db"] > 0 for r in rep["layers"])
    assert [r["layer"] for r in rep["integer"]["layers"]] == names
    page = (out / "report.html").read_text()
    assert page.count("<table>") >= 4
    imgs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(imgs) >= 3 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    md = (out / "report.md").read_text()
    for png in re.findall(r"\]\((report_\w+\.png)\)", md):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_report_bad_input(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no model.pt" in err[0]
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--images", "0"]) == 2
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_report_page_in_a_real_browser(ptq_run, tmp_path):
    """Debian's chromium, headless: every embedded image decodes and the tables are on the page.  A copy of
    the page gets a script that records what the browser loaded; --dump-dom prints it."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("HWQUANT_REQUIRE_BROWSER") == "1":  # .ci/run installs it: there it must run
            pytest.fail("chromium not found (apt-get install chromium)")
        pytest.skip("chromium not installed")
    out = tmp_path / "report"
    assert main(["report", str(ptq_run), "--images", "64", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    probe = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.setAttribute('data-check',JSON.stringify({images:im.length,"
             "loaded:im.filter(i=>i.complete&&i.naturalWidth>0).length,"
             "tables:document.querySelectorAll('table').length}))});</script></body>")
    check = tmp_path / "check.html"
    check.write_text(page.replace("</body>", probe))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", check.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-check="([^"]*)"', dom)
    assert found, dom[-500:]
    got = json.loads(html.unescape(found.group(1)))
    assert got["images"] >= 3 and got["loaded"] == got["images"] and got["tables"] >= 4, got
