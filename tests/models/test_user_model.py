"""A user's model from a file or module: building, rebuilding from its args, weights, and every mistake."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from hwquant.errors import ConfigError
from hwquant.models import create_model_from_args
from hwquant.models.registry import build_model, model_options
from hwquant.models.user import is_user_spec, load_user_model, load_weights, parse_user_spec

FIXTURE = Path(__file__).resolve().parents[1] / "cli" / "user_net.py"

MODELS = '''
from torch import nn


class Tiny(nn.Module):
    def __init__(self, in_channels, num_classes, image_size=None):
        super().__init__()
        self.image_size = image_size
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def factory(**kwargs):
    return Tiny(kwargs["in_channels"], kwargs["num_classes"])


def no_args():
    return Tiny(3, 5)


def wide(in_channels, num_classes, width=1.0):
    return nn.Linear(in_channels, max(1, round(num_classes * width)))


CONSTANT = 3
'''


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    os.chmod(directory, 0o755)
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def models_file(tmp_path):
    return _write(tmp_path / "src", "my_models.py", MODELS)


def test_spec_syntax(tmp_path):
    assert is_user_spec("a.py:Net") and is_user_spec("pkg.mod:f") and not is_user_spec("resnet20")
    assert parse_user_spec("nets/a.py:Net", base_dir=tmp_path) == ("file", str(tmp_path / "nets" / "a.py"), "Net")
    assert parse_user_spec("pkg.mod:make") == ("module", "pkg.mod", "make")
    for bad, needle in (("a.py:", "must be"), (":Net", "must be"), ("a.py:1x", "not a Python name"),
                        ("pkg..mod:f", "neither a .py file nor a dotted module name")):
        with pytest.raises(ConfigError, match=needle):
            parse_user_spec(bad)


def test_class_gets_the_arguments_it_names_and_is_rebuilt_from_its_args(models_file, monkeypatch):
    monkeypatch.chdir(models_file.parent.parent)
    torch.manual_seed(0)
    m = load_user_model("src/my_models.py:Tiny", in_channels=2, num_classes=7, image_size=(9, 8))
    assert m.hwquant_args == {"name": f"{models_file}:Tiny", "source": "user", "in_channels": 2, "num_classes": 7,
                              "image_size": [9, 8]}  # the path is stored absolute
    assert m(torch.zeros(1, 2, 9, 8)).shape == (1, 7) and m.image_size == [9, 8]
    monkeypatch.chdir("/")  # a checkpoint is read from anywhere
    again = create_model_from_args(m.hwquant_args)
    assert type(again).__name__ == "Tiny"
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert again.hwquant_args == m.hwquant_args


def test_factories_with_kwargs_none_or_width(models_file):
    spec = f"{models_file}:factory"
    assert load_user_model(spec, in_channels=1, num_classes=3, image_size=(4, 4)).hwquant_args == {
        "name": spec, "source": "user", "in_channels": 1, "num_classes": 3}  # **kwargs: not image_size
    m = load_user_model(f"{models_file}:no_args", in_channels=1, num_classes=3)
    assert m.fc.out_features == 5 and m.hwquant_args["num_classes"] == 3  # recorded, not passed
    assert load_user_model(f"{models_file}:wide", in_channels=4, num_classes=10, width=0.5).out_features == 5
    with pytest.raises(ConfigError, match="takes no 'width' argument"):
        load_user_model(f"{models_file}:Tiny", in_channels=1, num_classes=3, width=2.0)
    assert create_model_from_args(
        load_user_model(f"{models_file}:wide", in_channels=4, num_classes=10, width=0.5).hwquant_args
    ).out_features == 5


def test_importable_module_form(tmp_path, monkeypatch):
    _write(tmp_path / "userpkg", "__init__.py", "")
    _write(tmp_path / "userpkg", "nets.py", MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "userpkg", raising=False)
    m = build_model("userpkg.nets:Tiny", in_channels=3, num_classes=4)
    assert m.hwquant_args["name"] == "userpkg.nets:Tiny"
    assert type(create_model_from_args(m.hwquant_args)).__name__ == "Tiny"
    with pytest.raises(ConfigError, match="no module named 'userpkg.other'"):
        build_model("userpkg.other:Tiny", in_channels=3, num_classes=4)
    with pytest.raises(ConfigError, match="cannot import module 'nopkg_xyz.nets'"):
        build_model("nopkg_xyz.nets:Tiny", in_channels=3, num_classes=4)


def test_the_fixture_of_the_cli_test_is_a_plain_cnn():
    m = build_model(f"{FIXTURE}:Net", in_channels=1, num_classes=3)
    assert m(torch.zeros(2, 1, 12, 12)).shape == (2, 3)
    assert any(isinstance(x, nn.Conv2d) and x.groups == x.in_channels > 1 for x in m.modules())  # depthwise
    assert any(isinstance(x, nn.ReLU6) for x in m.modules())


def test_build_model_passes_image_size_only_where_named():
    assert "image_size" in model_options("vgg9") and "image_size" not in model_options("resnet20")
    v = build_model("vgg9", in_channels=1, num_classes=10, width=0.25, image_size=(8, 8))
    assert v.hwquant_args["image_size"] == [8, 8]
    r = build_model("resnet20", in_channels=1, num_classes=10, width=0.25, image_size=(8, 8))
    assert "image_size" not in r.hwquant_args
    with pytest.raises(ConfigError, match="unknown model"):
        model_options("resnet99")


@pytest.mark.parametrize("spec,text,needle", [
    ("missing.py:Net", None, "model file not found"),
    ("my_models.txt:Net", "x = 1", "is not a .py file"),
    ("my_models.py:Nope", MODELS, r"has no attribute 'Nope' \(it defines nn.Module classes: Tiny\)"),
    ("my_models.py:CONSTANT", MODELS, r"my_models.py:CONSTANT is not callable \(int\)"),
    ("my_models.py:Tiny", "def f(:\n", "importing .* failed \\(line 1\\): SyntaxError"),
    ("my_models.py:Tiny", "import no_such_module_xyz\n", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("my_models.py:Tiny", "raise RuntimeError('boom\\nsecond line')\n", "RuntimeError: boom$"),
    ("my_models.py:f", "def f(in_channels, num_classes):\n    raise ValueError('no')\n",
     r"my_models.py:f\(in_channels=1, num_classes=2\) raised ValueError: no"),
    ("my_models.py:f", "def f():\n    return 'model'\n", r"returned str, not a torch.nn.Module"),
])
def test_mistakes_are_one_line_config_errors(tmp_path, spec, text, needle):
    if text is not None:
        _write(tmp_path, spec.split(":")[0], text)
    with pytest.raises(ConfigError, match=needle) as e:
        load_user_model(str(tmp_path / spec), in_channels=1, num_classes=2)
    assert len(str(e.value).splitlines()) == 1


def test_a_directory_is_not_a_model_file(tmp_path):
    (tmp_path / "d.py").mkdir()
    with pytest.raises(ConfigError, match="is not a file"):
        load_user_model(f"{tmp_path / 'd.py'}:Net", in_channels=1, num_classes=2)


def test_code_another_user_can_write_is_refused(models_file):
    spec = f"{models_file}:Tiny"
    os.chmod(models_file, 0o666)
    with pytest.raises(ConfigError, match="refusing to load .* world-writable"):
        load_user_model(spec, in_channels=1, num_classes=2)
    os.chmod(models_file, 0o644)
    os.chmod(models_file.parent, 0o777)
    with pytest.raises(ConfigError, match="its directory .* is world-writable without the sticky bit"):
        load_user_model(spec, in_channels=1, num_classes=2)
    os.chmod(models_file.parent, 0o777 | stat.S_ISVTX)  # like /tmp: others cannot replace our file
    assert load_user_model(spec, in_channels=1, num_classes=2) is not None
    os.chmod(models_file.parent, 0o755)
    link_dir = models_file.parent.parent / "shared"
    link_dir.mkdir(mode=0o777)
    os.chmod(link_dir, 0o777)
    (link_dir / "link.py").symlink_to(models_file)
    with pytest.raises(ConfigError, match="world-writable without the sticky bit"):
        load_user_model(f"{link_dir / 'link.py'}:Tiny", in_channels=1, num_classes=2)


def test_load_weights_exact_and_every_mismatch_named(models_file, tmp_path):
    spec = f"{models_file}:Tiny"
    torch.manual_seed(1)
    src = load_user_model(spec, in_channels=1, num_classes=3)
    sd = src.state_dict()
    path = tmp_path / "w.pt"

    def loaded(obj):
        torch.save(obj, path)
        return load_weights(load_user_model(spec, in_channels=1, num_classes=3), path)

    for obj in (sd, {"state_dict": sd, "epoch": 3}, {"model": sd}, {f"module.{k}": v for k, v in sd.items()}):
        m = loaded(obj)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())

    def error(obj) -> str:
        with pytest.raises(ConfigError) as e:
            loaded(obj)
        assert len(str(e.value).splitlines()) == 1
        return str(e.value)

    assert "missing key 'fc.bias'" in error({k: v for k, v in sd.items() if k != "fc.bias"})
    assert "unexpected key 'extra'" in error({**sd, "extra": torch.zeros(1)})
    msg = error({**sd, "fc.weight": torch.zeros(5, 4)})
    assert "shape mismatch for 'fc.weight': (5, 4) in the file, (3, 4) in the model" in msg
    assert "missing key 'fc.weight' (2 problems: 2 missing, 0 unexpected, 0 shape mismatches)" in error(
        {k: v for k, v in sd.items() if not k.startswith("fc.")})
    assert "does not hold a state dict" in error({"weights": [1, 2]})
    assert "pickled Python objects" in error(src)  # a whole saved model is not loaded
    assert "pickled Python objects" in error(nn.Sequential(nn.Linear(2, 2)))
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot read weights"):
        load_weights(src, path)
    with pytest.raises(ConfigError, match="weights file not found"):
        load_weights(src, tmp_path / "nope.pt")
