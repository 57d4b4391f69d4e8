"""End to end: a user's model file (tests/cli/user_net.py) on an image folder: train, ptq from the checkpoint,
ptq from --model/--weights, eval; and the mistakes a user makes -> exit 2, one line, no output directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hwquant.cli import main

REPO = Path(__file__).resolve().parents[2]
NET = "tests/cli/user_net.py:Net"  # relative to the repository root, as a user types it
QUIET = ["--no-progress", "--threads", "2"]


def _images(root: Path, per_class: int = 16, size: int = 12) -> Path:
    """Three classes of small RGB PNGs told apart by their dominant colour channel."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("blue", "green", "red")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            arr[..., 2 - c] += 150
            Image.fromarray(arr).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The data, and ``main`` run from the repository root (where the relative model path points)."""
    root = tmp_path_factory.mktemp("user")
    images = _images(root / "images")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        out = root / "train"
        assert main(["train", "--model", NET, "--dataset", "folder", "--data-dir", str(images), "--epochs", "1",
                     "--batch-size", "8", "--lr", "0.05", "--device", "auto", "--out", str(out), *QUIET]) == 0
        yield {"root": root, "images": images, "train": out}


def _number(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwquant"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and needle in err, err
    return err


def test_train_writes_a_checkpoint_that_names_the_file(run):
    out = run["train"]
    for name in ("model.pt", "last.pt", "metrics.json", "config.yaml"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "folder" and metrics["device"] == "cpu"
    assert _number(metrics["test"]["top1"]) and metrics["test"]["n"] == 9  # 3 of 16 per class held out
    ck = torch.load(out / "model.pt", weights_only=True)
    assert ck["model_args"] == {"name": f"{REPO / 'tests' / 'cli' / 'user_net.py'}:Net", "source": "user",
                                "in_channels": 3, "num_classes": 3}
    assert ck["data"]["data_dir"] == str(run["images"].resolve()) and ck["data"]["image_size"] == [12, 12]
    assert f"model: {NET}" in (out / "config.yaml").read_text()


def test_ptq_from_the_checkpoint_then_eval(run, tmp_path, capsys):
    metrics = json.loads((run["train"] / "metrics.json").read_text())
    out = tmp_path / "ptq"
    assert main(["ptq", "--checkpoint", str(run["train"] / "model.pt"), "--method", "minmax", "--w-bits", "8",
                 "--a-bits", "8", "--out", str(out), *QUIET]) == 0  # from another working directory
    res = json.loads((out / "ptq.json").read_text())
    assert _number(res["fp32"]["top1"]) and _number(res["quant"]["top1"]) and _number(res["report"]["sqnr_db"])
    assert res["fp32"] == metrics["test"]  # the same model on the same test split
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), *QUIET]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(res["quant"]["top1"])


def test_ptq_from_model_and_weights_then_eval(run, tmp_path, monkeypatch, capsys):
    metrics = json.loads((run["train"] / "metrics.json").read_text())
    weights = tmp_path / "state_dict.pt"
    torch.save(torch.load(run["train"] / "model.pt", weights_only=True)["model"], weights)
    monkeypatch.chdir(REPO)
    out = tmp_path / "ptq"
    assert main(["ptq", "--model", NET, "--weights", str(weights), "--dataset", "folder", "--data-dir",
                 str(run["images"]), "--method", "minmax", "--w-bits", "8", "--a-bits", "8", "--out", str(out),
                 *QUIET]) == 0
    assert capsys.readouterr().err == ""  # weights given: no warning
    res = json.loads((out / "ptq.json").read_text())
    assert res["fp32"] == metrics["test"]  # the same weights, the same fixed test split
    assert _number(res["quant"]["top1"])
    ck = torch.load(out / "model.pt", weights_only=True)
    assert ck["model_args"]["source"] == "user" and "ptq" in ck
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--checkpoint", str(out / "model.pt"), *QUIET]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["top1"] == pytest.approx(res["quant"]["top1"])


def test_ptq_of_an_untrained_model_warns_in_one_line(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "ptq"
    assert main(["ptq", "--model", NET, "--dataset", "folder", "--data-dir", str(run["images"]),
                 "--out", str(out), *QUIET]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwquant: warning: no --weights") and len(err.splitlines()) == 1
    assert _number(json.loads((out / "ptq.json").read_text())["quant"]["top1"])


DATA = ["--dataset", "folder", "--data-dir", "{images}", "--batch-size", "8"]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--model", "tests/cli/no_such_net.py:Net", *DATA], "model file not found"),
    (["train", "--model", "tests/cli/user_net.py:NoSuchNet", *DATA], "has no attribute 'NoSuchNet'"),
    (["train", "--model", "README.md:Net", *DATA], "is not a .py file"),
    (["train", "--model", "tests/cli/user_net.py:broken", *DATA], "raised ValueError: this factory always fails"),
    (["train", "--model", "tests/cli/user_net.py:not_a_model", *DATA], "returned int, not a torch.nn.Module"),
    (["train", "--model", NET, "--dataset", "folder", "--data-dir", "{root}/nowhere"],
     "image folder dataset not found"),
    (["train", "--model", NET, "--dataset", "folder", "--data-dir", "{root}/train"], "has no class subfolders"),
    (["ptq", "--model", NET, "--checkpoint", "{root}/train/model.pt", *DATA], "not both"),
    (["ptq", "--model", NET, "--weights", "{root}/nowhere.pt", *DATA], "weights file not found"),
    (["ptq", "--model", NET, "--weights", "{root}/train/model.pt", "--dataset", "digits"],
     "does not match the model: shape mismatch for 'features.0.weight': (8, 3, 3, 3) in the file, (8, 1, 3, 3)"),
    (["ptq", "--weights", "{root}/train/model.pt"], "weights only applies with model"),
    (["train", "--model", "tests/cli/user_net.py:make_net", "--dataset", "digits"],
     "model tests/cli/user_net.py:make_net does not accept the data's 1-channel 8x8 images: Given groups=1"),
    (["ptq", "--model", "tests/cli/user_net.py:ten_classes", *DATA],
     "returns 10 logits per image but the data has 3 classes"),
])
def test_user_mistakes_one_line_exit_2_nothing_written(run, argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    argv = [a.format(root=run["root"], images=run["images"]) for a in argv]
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), *QUIET]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_cuda_requested_without_cuda_is_one_line(run, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for cmd in (["train", "--dataset", "digits"], ["ptq", "--checkpoint", str(run["train"] / "model.pt")],
                ["eval", "--checkpoint", str(run["train"] / "model.pt")]):
        out = tmp_path / "out"
        assert main([*cmd, "--device", "cuda", "--out", str(out), *QUIET]) == 2
        _one_line_error(capsys, "CUDA is not available")
        assert not out.exists()


def test_a_checkpoint_whose_model_file_is_gone(run, tmp_path, capsys):
    ck = torch.load(run["train"] / "model.pt", weights_only=True)
    ck["model_args"]["name"] = f"{tmp_path / 'gone.py'}:Net"
    torch.save(ck, tmp_path / "model.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "model.pt"), *QUIET]) == 2
    _one_line_error(capsys, "cannot rebuild its model")


VIEW_NET = '''
import torch
from torch import nn


class Net(nn.Module):
    """x.view(x.size(0), -1) right after a conv: fails on a channels-last feature map."""

    def __init__(self, in_channels=3, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))
'''


def test_model_that_needs_contiguous_tensors_trains_and_quantizes(run, tmp_path, capsys):
    """channels-last is the default for speed; a model whose forward cannot take it runs without it."""
    net = tmp_path / "view_net.py"
    net.write_text(VIEW_NET)
    out = tmp_path / "train"
    assert main(["train", "--model", f"{net}:Net", "--dataset", "folder", "--data-dir", str(run["images"]),
                 "--epochs", "1", "--batch-size", "8", "--out", str(out), *QUIET]) == 0
    assert "does not run in channels-last memory format" in capsys.readouterr().out
    for method in ("minmax", "ggd"):
        assert main(["ptq", "--checkpoint", str(out / "model.pt"), "--method", method, "--no-bft",
                     "--out", str(tmp_path / f"ptq_{method}"), *QUIET]) == 0
    assert main(["qat", "--checkpoint", str(out / "model.pt"), "--method", "cqat", "--epochs", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "qat"), *QUIET]) == 0
