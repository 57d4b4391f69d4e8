"""End-to-end CLI runs on small data, and every kind of bad input -> one line, exit 2, nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hwquant.cli import main

SMALL = ["--model", "small_cnn", "--dataset", "digits", "--batch-size", "64", "--calib-size", "200",
         "--threads", "2", "--no-progress", "--no-channels-last"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(["train", *SMALL, "--epochs", "12", "--lr", "0.1", "--out", str(out)]) == 0
    return out


def _killed_in_epoch_2(real_fit):
    """``fit`` that stops like a kill right after epoch 1's checkpoint (the pipeline's step hook still runs)."""
    def fit(model, loader, cfg, step_hook=None, **kw):
        def hook(m, step):
            if step_hook is not None:
                step_hook(m, step)
            if step == len(loader) + 1:
                raise KeyboardInterrupt
        return real_fit(model, loader, cfg, step_hook=hook, **kw)
    return fit


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwquant"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert needle in err, err
    return err


def test_train_writes_checkpoint_metrics_and_config(trained):
    for name in ("model.pt", "last.pt", "metrics.json", "config.yaml"):
        assert (trained / name).is_file()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["dataset"] == "digits"
    assert metrics["test"]["top1"] > 60.0  # chance is 10%
    assert not list(trained.glob("*.tmp")) and not list(trained.glob(".*.tmp"))
    cfg = (trained / "config.yaml").read_text()
    assert "model: small_cnn" in cfg and "epochs: 12" in cfg


def test_ptq_then_eval_agree(trained, tmp_path, capsys):
    out = tmp_path / "ptq"
    assert main(["ptq", "--checkpoint", str(trained / "model.pt"), "--w-bits", "8", "--a-bits", "8",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "ptq.json").read_text())
    assert abs(res["quant"]["top1"] - res["fp32"]["top1"]) < 3.0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(res["quant"]["top1"])


def test_yaml_config_and_flag_override(trained, tmp_path):
    cfg = tmp_path / "ptq.yaml"
    cfg.write_text(
        f"checkpoint: {trained / 'model.pt'}\nw_bits: 4\na_bits: 8\nout: {tmp_path / 'a'}\nprogress: false\n"
    )
    assert main(["ptq", "--config", str(cfg), "--w-bits", "6"]) == 0
    res = json.loads((tmp_path / "a" / "ptq.json").read_text())
    assert res["w_bits"] == 6 and res["a_bits"] == 8
    assert "w_bits: 6" in (tmp_path / "a" / "config.yaml").read_text()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--model", "resnet99", "--epochs", "1"], "model must be one of"),
        (["train", "--dataset", "fashion_mnist", "--data-dir", "/nonexistent/fm", "--no-fallback"], "/nonexistent/fm"),
        (["train", "--dataset", "fashion_mnist", "--data-dir", "/nonexistent/fm"], "/nonexistent/fm"),
        (["train", "--dataset", "mnist"], "invalid choice"),
        (["train", "--epochs", "0"], "epochs"),
        (["ptq", "--w-bits", "17"], "w_bits must be an integer in 2..16"),
        (["ptq", "--a-bits", "1"], "a_bits must be an integer in 2..16"),
        (["ptq", "--checkpoint", "/nonexistent/model.pt"], "checkpoint not found"),
        (["train", "--config", "/nonexistent.yaml"], "config file not found"),
    ],
)
def test_bad_input_one_line_exit_2(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    code = main([*argv, "--out", str(out)] if argv[0] != "eval" else argv)
    assert code == 2
    _one_line_error(capsys, needle)
    assert not out.exists() or not any(out.iterdir())


def test_yaml_typo_suggests_field(tmp_path, capsys):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("epcohs: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    _one_line_error(capsys, "did you mean 'epochs'")
    cfg.write_text("epochs: [3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    _one_line_error(capsys, "not valid YAML")


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"this is not a zip file")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    _one_line_error(capsys, "cannot read checkpoint")
    torch.save({"hello": 1}, bad)
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    _one_line_error(capsys, "not an hwquant checkpoint")


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hwquant.cli", "ptq", "--w-bits", "40"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "w_bits" in r.stderr
    r = subprocess.run([sys.executable, "-m", "hwquant.cli", "train", "--epochs", "abc"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "hwquant.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("demo", "train", "ptq", "qat", "eval"):
        assert cmd in r.stdout
    assert Path(__file__).resolve().parents[2].joinpath("configs", "demo.yaml").is_file()


@pytest.mark.parametrize("method", ["percentile", "mse", "kl", "aciq", "ggd"])
def test_ptq_methods_from_cli_and_reload(trained, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["ptq", "--checkpoint", str(trained / "model.pt"), "--method", method, "--w-bits", "8",
                 "--a-bits", "8", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "ptq.json").read_text())
    assert res["method"] == method
    assert res["quant"]["top1"] > 50.0
    if method == "ggd":
        assert res["report"]["bft"]["after"]["kl"] <= res["report"]["bft"]["before"]["kl"]
        assert all(r["w_fl"] is not None for r in res["report"]["layers"])
    # the quantized checkpoint rebuilds and reproduces the same accuracy
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(res["quant"]["top1"])


def test_ptq_ggd_own_bias_reloads(trained, tmp_path, capsys):
    """GGD with its own bias FL after bias correction: the corrected biases are saved and reload."""
    out = tmp_path / "own"
    assert main(["ptq", "--checkpoint", str(trained / "model.pt"), "--method", "ggd", "--bias", "own", "--no-bft",
                 "--bias-correction", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "ptq.json").read_text())
    assert res["report"]["bias_correction"]["corrected"]
    assert "bias correction:" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(res["quant"]["top1"])


def test_ptq_bad_method_and_bias(capsys):
    assert main(["ptq", "--method", "magic"]) == 2
    _one_line_error(capsys, "invalid choice")
    assert main(["ptq", "--method", "ggd", "--bias", "float"]) == 2
    _one_line_error(capsys, "invalid choice")


@pytest.mark.parametrize("method", ["cqat", "fp32"])
def test_qat_from_cli_and_reload(trained, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(["qat", "--checkpoint", str(trained / "model.pt"), "--method", method, "--epochs", "1",
                 "--batch-size", "64", "--out", str(out), "--no-progress", "--no-channels-last"]) == 0
    res = json.loads((out / "qat.json").read_text())
    assert res["method"] == method and res["final"]["top1"] > 50.0
    assert res["step_loss"] and res["history"][0]["epoch"] == 1
    if method == "cqat":
        assert res["config"]["w_bits"] == 5 and res["layers"][1]["a_bits"] == 4
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(res["final"]["top1"])


@pytest.mark.parametrize("argv,needle", [
    (["qat", "--method", "dorefa"], "invalid choice"),
    (["qat", "--w-bits", "20"], "w_bits must be an integer in 2..16"),
    (["qat", "--base-bits", "4"], "base_bits must be >= w_bits"),
    (["qat", "--epochs", "0"], "epochs"),
    (["qat", "--checkpoint", "/nonexistent/model.pt"], "checkpoint not found"),
    (["qat", "--grad-clip", "0"], "grad_clip must be a positive number"),
    (["qat", "--step", "median"], "invalid choice"),
    (["qat", "--method", "mpq", "--mpq-gamma", "0"], "gamma must be in (0, 1]"),
    (["qat", "--method", "mpq", "--mpq-window", "0.9"], "window must be in"),
    (["ptq", "--method", "ggd", "--bft-samples", "0"], "bft_samples must be a positive integer"),
    (["ptq", "--method", "ggd", "--bft-criterion", "top5"], "invalid choice"),
    (["ptq", "--method", "ggd", "--bft-holdout", "-1"], "bft_holdout must be an integer >= 0"),
    (["demo", "--check-images", "0"], "check_images must be >= 1"),
    (["demo", "--report-images", "0"], "report_images must be >= 1"),
    (["demo", "--bft-samples", "0"], "bft_samples must be >= 1"),
])
def test_qat_bad_input(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_qat_refuses_a_quantized_checkpoint(trained, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["ptq", "--checkpoint", str(trained / "model.pt"), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["qat", "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "q")]) == 2
    _one_line_error(capsys, "already quantized")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_resolves(path):
    from hwquant import config as cfgmod
    from hwquant.commands.demo import DemoOptions
    from hwquant.commands.ptq import PTQOptions
    from hwquant.commands.qat import QATOptions
    from hwquant.commands.train import TrainOptions

    cls = {"train": TrainOptions, "ptq": PTQOptions, "qat": QATOptions,
           "demo": DemoOptions}[path.stem.split("_")[0]]
    cfg = cfgmod.resolve(cls, cfgmod.load_yaml(path), {}, source=str(path))
    assert isinstance(cfg, cls)


def test_qat_resume_continues_from_last_checkpoint(trained, tmp_path, monkeypatch):
    import hwquant.commands.common as pl  # the module whose fit the command calls

    def run(out, *extra):
        return main(["qat", "--checkpoint", str(trained / "model.pt"), "--method", "lsq", "--batch-size", "64",
                     "--epochs", "2", "--out", str(out), "--no-progress", "--no-channels-last", *extra])

    assert run(tmp_path / "full") == 0
    full = json.loads((tmp_path / "full" / "qat.json").read_text())
    real_fit = pl.fit
    monkeypatch.setattr(pl, "fit", _killed_in_epoch_2(real_fit))
    assert run(tmp_path / "cut") == 130
    assert (tmp_path / "cut" / "last.pt").exists() and not (tmp_path / "cut" / "model.pt").exists()
    monkeypatch.setattr(pl, "fit", real_fit)
    assert run(tmp_path / "cut", "--resume") == 0
    resumed = json.loads((tmp_path / "cut" / "qat.json").read_text())
    assert [e["epoch"] for e in resumed["history"]] == [1, 2]
    assert resumed["final"] == full["final"]  # same data order, RNG, EMA and step state: the same model


def test_export_int_golden_onnx_from_cli(trained, tmp_path, capsys):
    ptq_out = tmp_path / "ggd"
    assert main(["ptq", "--checkpoint", str(trained / "model.pt"), "--method", "ggd", "--no-bft",
                 "--out", str(ptq_out), "--no-progress"]) == 0
    out = tmp_path / "export"
    base = ["export", "--checkpoint", str(ptq_out / "model.pt"), "--out", str(out), "--no-progress"]
    assert main([*base, "--format", "int"]) == 0
    res = json.loads((out / "export-int.json").read_text())
    cmp = res["compare"]
    assert cmp["images"] > 0 and cmp["codes_diff"] == 0 and cmp["out_diff"] == 0  # fixed point: bit-exact
    assert cmp["top1_integer"] == cmp["top1_fake_quant"]
    assert (out / "integer_model.pt").is_file() and res["acc_bits_max"] <= 32
    ck = torch.load(out / "integer_model.pt", weights_only=True)
    assert ck["format"] == "hwquant-integer-1" and ck["params"]["conv1"]["weight"].dtype == torch.int64
    assert main([*base, "--format", "golden", "--golden-images", "2"]) == 0
    res = json.loads((out / "export-golden.json").read_text())
    assert res["golden"]["ok"] and (out / "golden" / "manifest.json").is_file()
    pytest.importorskip("onnxruntime")
    assert main([*base, "--format", "onnx", "--images", "100"]) == 0
    res = json.loads((out / "export-onnx.json").read_text())
    assert res["onnx"]["images"] == 100 and res["onnx"]["codes_diff"] == 0
    assert (out / "model.onnx").is_file()


def test_export_rtl_from_cli(tmp_path):
    pytest.importorskip("amaranth")
    out = tmp_path / "rtl"
    assert main(["export", "--format", "rtl", "--rtl-in-width", "10", "--rtl-frac-bits", "3", "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads((out / "export-rtl.json").read_text())
    assert [u["mode"] for u in res["units"]] == ["nearest", "zero", "stochastic"]
    assert all(u["sim_ok"] and u["vectors"] == 1024 for u in res["units"])
    assert "module round_zero_i10_f3_o8" in (out / "rtl" / "round_zero_i10_f3_o8.v").read_text()


@pytest.mark.parametrize("argv,needle", [
    (["export", "--format", "verilog"], "invalid choice"),
    (["export", "--format", "rtl", "--rtl-modes", "nearest,up"], "rtl_modes entry must be one of"),
    (["export", "--format", "rtl", "--rtl-frac-bits", "40"], "frac_bits"),
    (["export", "--checkpoint", "/nonexistent/model.pt"], "checkpoint not found"),
    (["export", "--images", "0"], "images must be >= 1"),
    (["export", "--opset", "9"], "opset must be in 13..23"),
])
def test_export_bad_input(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_export_refuses_a_float_checkpoint(trained, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(trained / "model.pt"), "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "not a quantized checkpoint")


def test_train_with_arc_gradients_from_cli(tmp_path):
    out = tmp_path / "arc"
    assert main(["train", *SMALL, "--epochs", "2", "--grad-bits", "8", "--grad-rounding", "zero",
                 "--grad-quant-clip", "zscore", "--out", str(out)]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["arc"]["bits"] == 8 and res["arc"]["rounding"] == "zero" and res["test"]["top1"] > 10.0
    clips = json.loads((out / "arc_clips.json").read_text())
    rows = clips["conv2"]["error"]
    assert len(rows) == len(clips["conv2"]["weight"]) > 0 and all(0 < c <= mx for _, c, mx in rows)


@pytest.mark.parametrize("argv,needle", [
    (["train", "--grad-bits", "1"], "gradient bits must be an integer in 2..16"),
    (["train", "--grad-rounding", "up"], "invalid choice"),
    (["train", "--grad-k", "0"], "z-score k must be a positive number"),
    (["qat", "--grad-bits", "40"], "gradient bits"),
])
def test_arc_bad_input(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_train_with_weight_gradients_only(tmp_path):
    out = tmp_path / "arcw"
    assert main(["train", *SMALL, "--epochs", "1", "--grad-bits", "8", "--no-grad-error", "--out", str(out)]) == 0
    res = json.loads((out / "metrics.json").read_text())
    assert res["arc"]["error_grad"] is False and res["arc"]["weight_grad"] is True
    clips = json.loads((out / "arc_clips.json").read_text())
    assert set(clips["conv2"]) == {"weight"}


def test_cost_float_and_quantized_from_cli(trained, tmp_path, capsys):
    ptq_out = tmp_path / "w4"
    assert main(["ptq", "--checkpoint", str(trained / "model.pt"), "--method", "minmax", "--w-bits", "4",
                 "--a-bits", "4", "--out", str(ptq_out), "--no-progress"]) == 0
    out = tmp_path / "cost"
    assert main(["cost", "--checkpoint", str(ptq_out / "model.pt"), "--out", str(out)]) == 0
    rep = json.loads((out / "cost.json").read_text())
    assert "compression" in capsys.readouterr().out and (out / "cost.md").is_file()
    fp = rep["fp32_total"]
    t = rep["total"]
    assert t["macs"] == fp["macs"] > 0 and t["stored_bits"] < fp["stored_bits"]
    assert t["x_fp32_energy"] == pytest.approx(t["e_total_pj"] / fp["e_total_pj"]) and t["x_fp32_energy"] < 0.5
    assert main(["cost", "--checkpoint", str(trained / "model.pt")]) == 0
    assert "compression 1.00x" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["cost", "--checkpoint", "/nonexistent/model.pt"], "checkpoint not found"),
    (["cost", "--pe-rows", "0"], "pe_rows must be >= 1"),
    (["cost", "--buffer-kib", "-1"], "buffer_kib must be >= 0"),
    (["train", "--no-grad-error", "--no-grad-weight"], "ARC needs error_grad or weight_grad"),
])
def test_cost_bad_input(argv, needle, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_mpq_from_cli_reload_and_cost(trained, tmp_path, capsys):
    out = tmp_path / "mpq"
    assert main(["qat", "--checkpoint", str(trained / "model.pt"), "--method", "mpq", "--w-bits", "3", "--a-bits",
                 "4", "--epochs", "2", "--mpq-min-flips", "1", "--mpq-max-extra", "0.2", "--batch-size", "64",
                 "--out", str(out), "--no-progress", "--no-channels-last"]) == 0
    res = json.loads((out / "qat.json").read_text())
    assert res["method"] == "mpq" and res["config"]["w_bits"] == 3 and res["final"]["top1"] > 30.0
    rows = res["mpq"]
    assert rows and all(0 <= r["extra_fraction"] <= 0.2 and r["w_bits_mean"] == 3 + r["extra_fraction"]
                        for r in rows)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(res["final"]["top1"])  # the extra-bit masks come back
    assert main(["cost", "--checkpoint", str(out / "model.pt"), "--out", str(tmp_path / "c")]) == 0
    cost = json.loads((tmp_path / "c" / "cost.json").read_text())
    mixed = {r["layer"]: r for r in cost["layers"]}
    for r in rows:
        assert mixed[r["layer"]]["w_bits"] == pytest.approx(r["w_bits_mean"])


def test_demo_quick_tells_the_story_and_exports_bit_exactly(tmp_path):
    """``hwquant demo --quick``: every row (FP32, min-max and GGD PTQ at W8A8 and W4A4, CQAT W5A4 and its
    ARC G8 and their control) with its cost, the best fixed-point 4-bit model exported bit-exactly, the report
    written."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {r["row"].split(",")[0].split(" (")[0]: r for r in res["rows"]}
    assert list(rows) == ["FP32", "min-max PTQ W8A8", "GGD PTQ + BFT W8A8", "min-max PTQ W4A4",
                          "GGD PTQ + BFT W4A4", "CQAT W5A4",
                          "FP32 control: BN-folded float model fine-tuned 5 steps",
                          "ARC G8: BN-folded float model fine-tuned 5 steps with 8-bit gradients"]
    for r in res["rows"]:  # each row's figure is the one its own run directory recorded
        d = Path(r["dir"])
        if (d / "ptq.json").exists():
            assert r["top1"] == json.loads((d / "ptq.json").read_text())["quant"]["top1"]
        elif (d / "qat.json").exists():
            assert r["top1"] == json.loads((d / "qat.json").read_text())["final"]["top1"]
    fp, w8, w4 = rows["FP32"], rows["min-max PTQ W8A8"], rows["min-max PTQ W4A4"]
    assert fp["compression"] == pytest.approx(1.0) and 3.0 < w8["compression"] < 4.0 < w4["compression"]
    assert fp["energy_uj"] > w8["energy_uj"] > w4["energy_uj"] > 0
    e = res["export"]
    assert e["row"] in (rows["GGD PTQ + BFT W4A4"]["row"], rows["CQAT W5A4"]["row"])
    assert e["images"] == 360 and e["codes"] > 0
    assert e["codes_diff"] == 0 and e["onnx_codes_diff"] == 0 and e["golden_ok"] and e["bit_exact"]
    assert e["top1_integer"] == e["top1_fake_quant"] == e["top1_onnx"]
    assert e["onnx_optimize"] == "all"  # onnxruntime's default session options
    report = (out / "report.md").read_text()
    assert "energy uJ/image" in report and "0 of" in report and (out / "accuracy.png").is_file()
    assert Path(res["report_html"]).is_file() and res["most_sensitive_layer"]
    for sub in ("qat_cqat_w5a4", "qat_fp32", "qat_arc_g8"):  # --qat-steps: 5 optimizer steps, not a digits epoch
        last = torch.load(out / sub / "last.pt", weights_only=True)
        assert last["scheduler"]["last_epoch"] == 5, sub
    arc, control = (json.loads((out / s / "qat.json").read_text()) for s in ("qat_arc_g8", "qat_fp32"))
    assert arc["arc"]["bits"] == 8 and control["arc"] is None  # ARC's row trained with 8-bit gradients, its control not
    arc_row = rows["ARC G8: BN-folded float model fine-tuned 5 steps with 8-bit gradients"]
    assert arc_row["stored_kib"] == rows["FP32 control: BN-folded float model fine-tuned 5 steps"]["stored_kib"]


def test_demo_without_onnxruntime_fails_before_training(tmp_path, capsys, monkeypatch):
    """The demo's export step needs onnx + onnxruntime: a plain install is told so at once (exit 2), not after
    the FP32 training (as a fresh `make demo` was, when the main install left the onnx extra out)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "needs onnxruntime: pip install 'hwquant[onnx]'" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "c").exists()


def test_make_demo_installs_the_onnx_extra():
    make = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    stamp = make[make.index("$(STAMP): pyproject.toml"):].splitlines()[1]
    assert "-e '.[onnx]'" in stamp, stamp


def test_demo_rejects_bad_options_before_work(tmp_path, capsys):
    assert main(["demo", "--quick", "--qat-epochs", "-1", "--out", str(tmp_path / "d")]) == 2
    assert "qat_epochs must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["demo", "--bits", "8,4", "--out", str(tmp_path / "d")]) == 2


def test_arc_resume_is_exact_for_stochastic_rounding_and_the_clip_record(tmp_path, monkeypatch):
    import hwquant.commands.common as pl  # the module whose fit the command calls

    def run(out, *extra):
        return main(["train", *SMALL, "--epochs", "2", "--grad-bits", "6", "--grad-rounding", "stochastic",
                     "--grad-quant-clip", "max", "--out", str(out), *extra])

    assert run(tmp_path / "full") == 0
    real_fit = pl.fit
    monkeypatch.setattr(pl, "fit", _killed_in_epoch_2(real_fit))
    assert run(tmp_path / "cut") == 130
    monkeypatch.setattr(pl, "fit", real_fit)
    assert run(tmp_path / "cut", "--resume") == 0
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the SR generator state came back with the checkpoint
    full = json.loads((tmp_path / "full" / "arc_clips.json").read_text())
    cut = json.loads((tmp_path / "cut" / "arc_clips.json").read_text())
    steps = [r[0] for r in cut["conv2"]["error"]]
    assert cut == full and steps == list(range(1, len(steps) + 1))  # one record per step, numbered on resume
    assert run(tmp_path / "cut", "--resume") == 0  # a finished run, resumed: the record stays
    assert json.loads((tmp_path / "cut" / "arc_clips.json").read_text()) == full


def test_each_command_lives_in_its_module_and_pipelines_reexports_it():
    """One module per command under hwquant.commands; the CLI resolves there; hwquant.pipelines is the same objects."""
    import importlib

    from hwquant import cli, pipelines

    for name, (opts, runner) in cli.COMMANDS.items():
        mod = importlib.import_module(f"hwquant.commands.{name}")
        assert cli.resolve(opts) is getattr(mod, opts.split(":")[1])
        assert cli.resolve(runner).__module__ == mod.__name__
        if name != "demo":
            assert getattr(pipelines, runner.split(":")[1]) is cli.resolve(runner)
    assert set(pipelines.__all__) <= set(dir(pipelines))


def test_train_and_ptq_of_a_model_leave_the_global_rng_alone(tmp_path):
    """The commands seed the model's initial weights themselves and restore the caller's RNG state; the same seed
    gives the same weights whatever state the caller left."""
    from hwquant.commands.train import TrainOptions, run_train

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    opts = dict(model="small_cnn", dataset="digits", batch_size=64, calib_size=200, epochs=1, progress=False,
                channels_last=False)
    run_train(TrainOptions(**opts, out=str(tmp_path / "a")))
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)  # another caller state: the same model
    run_train(TrainOptions(**opts, out=str(tmp_path / "b")))
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
