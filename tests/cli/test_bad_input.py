"""Bad input through the CLI: one line naming the problem, exit 2, no traceback, earlier outputs intact,
nothing written - checked before the work starts (issue 18's corpus; more cases live next to each command's
tests in test_cli.py)."""

import os

import pytest
import torch

from hwquant.cli import main
from hwquant.train.checkpoint import save_checkpoint

SMALL = ["--model", "small_cnn", "--dataset", "digits", "--batch-size", "64", "--calib-size", "200",
         "--threads", "2", "--no-progress", "--no-channels-last"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    return out


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwquant"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    return err


def _commands(trained):
    ck = str(trained / "model.pt")
    return {
        "train": ["train", *SMALL, "--epochs", "1"],
        "ptq": ["ptq", "--checkpoint", ck, "--no-progress"],
        "qat": ["qat", "--checkpoint", ck, "--epochs", "1", "--no-progress"],
        "eval": ["eval", "--checkpoint", ck, "--no-progress"],
        "cost": ["cost", "--checkpoint", ck],
        "export": ["export", "--checkpoint", ck, "--format", "rtl"],
    }


@pytest.mark.parametrize("command", ["train", "ptq", "qat", "eval", "cost", "export"])
def test_out_is_a_file(trained, tmp_path, capsys, command):
    target = tmp_path / "results.txt"
    target.write_text("earlier results\n")
    assert main([*_commands(trained)[command], "--out", str(target)]) == 2
    _one_line_error(capsys, f"--out {target} is a file, not a directory")
    assert target.read_text() == "earlier results\n"  # untouched


@pytest.mark.parametrize("command", ["train", "ptq", "qat", "export"])
def test_out_under_a_file(trained, tmp_path, capsys, command):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker / "sub" / "run"
    assert main([*_commands(trained)[command], "--out", str(out)]) == 2
    _one_line_error(capsys, f"{blocker} is a file, so the directory cannot be created")
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_not_writable(trained, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main([*_commands(trained)["ptq"], "--out", str(ro / "run")]) == 2
        _one_line_error(capsys, "is not writable")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("command", ["train", "qat"])
def test_resume_without_last_checkpoint(trained, tmp_path, capsys, command):
    out = tmp_path / "fresh"
    assert main([*_commands(trained)[command], "--out", str(out), "--resume"]) == 2
    _one_line_error(capsys, f"--resume: {out / 'last.pt'} not found")
    assert not out.exists()


def test_explicit_data_dir_without_the_files_is_an_error(tmp_path, capsys):
    empty = tmp_path / "fm"
    empty.mkdir()
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion_mnist", "--data-dir", str(empty), "--epochs", "1",
                 "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, f"Fashion-MNIST not found under {empty}")
    assert not out.exists()  # no silent training on digits


def test_checkpoint_of_another_architecture_names_the_mismatch(trained, tmp_path, capsys):
    ck = torch.load(trained / "model.pt", weights_only=True)
    ck.pop("format")
    ck["model_args"] = {**ck["model_args"], "in_channels": 3}  # the description no longer fits the weights
    bad = tmp_path / "other.pt"
    save_checkpoint(bad, ck)
    out = tmp_path / "run"
    for argv in (["eval", "--checkpoint", str(bad)], ["ptq", "--checkpoint", str(bad), "--out", str(out)]):
        assert main([*argv, "--no-progress"]) == 2
        err = _one_line_error(capsys, "does not match its model description: shape mismatch for")
        assert "in the file" in err and "in the model" in err
    assert not out.exists()


def test_ptq_of_a_qat_checkpoint_is_refused(trained, tmp_path, capsys):
    qat = tmp_path / "qat"
    assert main(["qat", "--checkpoint", str(trained / "model.pt"), "--epochs", "1", "--out", str(qat),
                 "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "ptq"
    assert main(["ptq", "--checkpoint", str(qat / "model.pt"), "--out", str(out), "--no-progress"]) == 2
    _one_line_error(capsys, "is already quantized; give the float checkpoint")
    assert not out.exists()


@pytest.mark.parametrize("argv,needle", [
    (["ptq", "--w-bits", "abc"], "invalid int value: 'abc'"),
    (["train", "--lr", "-1"], "lr"),
    (["train", "--batch-size", "0"], "batch_size"),
    (["train", "--epochs", "1.5"], "invalid int value"),
    (["qat", "--method", "nope"], "invalid choice"),
    (["export", "--format", "verilog2"], "invalid choice"),
    (["train", "--grad-bits", "1"], "gradient bits must be an integer in 2..16"),
    (["train", "--grad-bits", "8", "--grad-clip-fraction", "1.5"], "clip fraction must be a number in [0, 1)"),
    (["train", "--grad-error-scale", "channel"], "invalid choice"),
    (["qat", "--pow2-step", "ceil"], "invalid choice"),
    (["train", "--device", "tpu"], "invalid choice"),
])
def test_bad_flags_one_line_exit_2(argv, needle, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize("text,needle", [
    ("epochs: many\n", "epochs"),
    ("- a\n- b\n", "mapping"),
    ("epochs: [1\n", "YAML"),
    ("lr: .nan\n", "lr"),
])
def test_bad_yaml_one_line_exit_2(text, needle, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_truncated_checkpoint(trained, tmp_path, capsys):
    data = (trained / "model.pt").read_bytes()
    bad = tmp_path / "half.pt"
    bad.write_bytes(data[: len(data) // 2])
    assert main(["eval", "--checkpoint", str(bad), "--no-progress"]) == 2
    _one_line_error(capsys, f"cannot read checkpoint {bad}")


def test_checkpoint_with_nan_weights_is_refused(trained, tmp_path, capsys):
    ck = torch.load(trained / "model.pt", weights_only=True)
    ck.pop("format")
    name = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.dim() > 1)
    ck["model"][name] = ck["model"][name].clone()
    ck["model"][name].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pt"
    save_checkpoint(bad, ck)
    out = tmp_path / "run"
    for argv in (["eval", "--checkpoint", str(bad)], ["ptq", "--checkpoint", str(bad), "--out", str(out)]):
        assert main([*argv, "--no-progress"]) == 2
        _one_line_error(capsys, f"{name} holds NaN or infinite values")
    assert not out.exists()


def test_ctrl_c_during_a_checkpoint_write_keeps_the_earlier_checkpoints(trained, tmp_path, capsys, monkeypatch):
    """Interrupted half-way through writing ``last.pt`` of a run over an earlier one: exit 130, one line, the
    earlier checkpoints byte for byte, no temporary file left."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.pt")}
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # half the bytes are on disk when the signal arrives
            fh.truncate(max(1, fh.seek(0, 2) // 2))
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "hwquant: interrupted" and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.glob("*.pt")} == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
