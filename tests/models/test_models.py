"""Tests of the model registry and the model definitions in :mod:`hwquant.models`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx
from torch import nn

from hwquant.errors import ConfigError
from hwquant.models import (
    BasicBlock,
    create_model,
    create_model_from_args,
    is_model,
    list_models,
    register_model,
    resnet20,
)
from hwquant.nn import layer_positions

ALL_MODELS = ["mobilenet_v2", "resnet18", "resnet20", "small_cnn", "vgg9"]
#: Models that accept any input size; vgg9 needs ``image_size``.
GAP_MODELS = ["mobilenet_v2", "resnet18", "resnet20", "small_cnn"]
#: Cheap settings for tests that do not care about size (resnet18 and vgg9 are slow at width 1).
CHEAP_WIDTH = {"mobilenet_v2": 0.25, "resnet18": 0.125, "resnet20": 1.0, "small_cnn": 1.0, "vgg9": 0.125}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- hand-computed parameter counts


def conv(k: int, cin: int, cout: int) -> int:
    """Weights of a k×k conv without bias."""
    return k * k * cin * cout


def bn(c: int) -> int:
    """Affine parameters of a batch norm."""
    return 2 * c


def fc(cin: int, cout: int) -> int:
    """Weights and bias of a linear layer."""
    return cin * cout + cout


def cifar_resnet_count(
    cin: int, classes: int, stages: list[int], blocks: list[int], strides: list[int]
) -> int:
    """Parameters of a CIFAR ResNet with option-B (1×1 conv + BN) projection shortcuts."""
    total = conv(3, cin, stages[0]) + bn(stages[0])
    c = stages[0]
    for cout, nb, s in zip(stages, blocks, strides, strict=True):
        for j in range(nb):
            stride = s if j == 0 else 1
            total += conv(3, c, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if stride != 1 or c != cout:
                total += conv(1, c, cout) + bn(cout)
            c = cout
    return total + fc(c, classes)


def vgg9_count(cin: int, classes: int, spatial: int, w: float = 1.0) -> int:
    chans = [round(c * w) for c in (128, 128, 256, 256, 512, 512)]
    hidden = round(1024 * w)
    total, c = 0, cin
    for cout in chans:
        total += conv(3, c, cout) + bn(cout)
        c = cout
    return total + fc(c * spatial, hidden) + fc(hidden, hidden) + fc(hidden, classes)


def test_resnet20_param_count() -> None:
    expected = cifar_resnet_count(3, 10, [16, 32, 64], [3, 3, 3], [1, 2, 2])
    # Option-A ResNet-20 has 269,722 parameters; option B adds 1×1 projections 16->32 and 32->64 with BN.
    assert expected == 269_722 + (512 + 64) + (2048 + 128) == 272_474
    assert n_params(create_model("resnet20", in_channels=3, num_classes=10)) == expected
    assert round(expected / 1e6, 2) == 0.27


def test_resnet18_param_count() -> None:
    expected_100 = cifar_resnet_count(3, 100, [64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2])
    assert expected_100 == 11_220_132  # 11.22M for CIFAR-100
    assert n_params(create_model("resnet18", in_channels=3, num_classes=100)) == expected_100
    expected_10 = cifar_resnet_count(3, 10, [64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2])
    assert expected_10 == 11_173_962  # 11.17M for CIFAR-10
    assert n_params(create_model("resnet18", in_channels=3, num_classes=10)) == expected_10


def test_vgg9_param_count() -> None:
    assert n_params(create_model("vgg9", in_channels=3, num_classes=10)) == vgg9_count(3, 10, 4 * 4)
    assert n_params(create_model("vgg9", in_channels=3, num_classes=100)) == vgg9_count(3, 100, 4 * 4)
    m = create_model("vgg9", in_channels=1, num_classes=10, image_size=(28, 28), width=0.25)
    assert n_params(m) == vgg9_count(1, 10, 3 * 3, w=0.25)
    m = create_model("vgg9", in_channels=1, num_classes=10, image_size=(8, 8), width=0.25)
    assert n_params(m) == vgg9_count(1, 10, 1, w=0.25)


def test_small_cnn_param_count() -> None:
    expected = conv(3, 1, 16) + bn(16) + conv(3, 16, 32) + bn(32) + fc(32, 10)
    assert n_params(create_model("small_cnn", in_channels=1, num_classes=10)) == expected


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_fashion_mnist(name: str) -> None:
    kw = {"image_size": (28, 28)} if name == "vgg9" else {}
    model = create_model(name, in_channels=1, num_classes=10, width=CHEAP_WIDTH[name], **kw).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_cifar100(name: str) -> None:
    model = create_model(name, in_channels=3, num_classes=100).eval()  # full width; batch 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "vgg9"])
def test_output_shape_digits(name: str) -> None:
    kw = {"image_size": (8, 8)} if name == "vgg9" else {}
    model = create_model(name, in_channels=1, num_classes=10, width=CHEAP_WIDTH[name], **kw).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_vgg9_flatten_size() -> None:
    for size, spatial in [((28, 28), 9), ((32, 32), 16), ((8, 8), 1), ((33, 17), 4 * 2), (40, 25)]:
        m = create_model("vgg9", in_channels=1, width=0.125, image_size=size)
        assert m.fc1.in_features == 64 * spatial, size


def test_vgg9_non_square_and_dropout() -> None:
    m = create_model("vgg9", in_channels=3, width=0.125, image_size=(16, 24), dropout=0.5).eval()
    assert isinstance(m.drop_fc1, nn.Dropout) and m.drop_fc1.p == 0.5
    with torch.no_grad():
        assert m(torch.randn(2, 3, 16, 24)).shape == (2, 10)
    assert not any(isinstance(x, nn.Dropout) for x in create_model("vgg9", width=0.125).modules())
    assert not any(isinstance(x, nn.BatchNorm1d) for x in m.modules())


# ---------------------------------------------------------------- width


def test_width_scales_channels() -> None:
    half = create_model("resnet20", width=0.5)
    assert half.conv1.out_channels == 8
    assert [half.layer1[0].conv1.out_channels, half.layer2[0].conv1.out_channels] == [8, 16]
    assert half.layer3[2].conv2.out_channels == 32 and half.fc.in_features == 32
    double = create_model("resnet18", width=2.0)
    assert double.layer4[1].conv2.out_channels == 1024
    tiny = create_model("small_cnn", width=0.01)  # rounds up to at least one channel
    assert tiny.conv1.out_channels == 1 and tiny.conv2.out_channels == 1
    v = create_model("vgg9", width=0.25)
    assert [getattr(v, f"conv{i}").out_channels for i in range(1, 7)] == [32, 32, 64, 64, 128, 128]
    assert v.fc1.out_features == 256 and v.fc2.out_features == 256
    assert n_params(create_model("resnet20", width=0.5)) < n_params(create_model("resnet20"))


# ---------------------------------------------------------------- registry and errors


def test_list_models() -> None:
    assert list_models() == sorted(ALL_MODELS)
    assert is_model("resnet20") and not is_model("resnet50")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnet50")
    msg = str(info.value)
    assert "resnet50" in msg and all(n in msg for n in ALL_MODELS) and "\n" not in msg


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"width": 0}, "width"),
        ({"width": -1.0}, "width"),
        ({"width": float("nan")}, "width"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"depth": 3}, "depth"),
    ],
)
def test_bad_arguments(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        create_model("small_cnn", **kw)


@pytest.mark.parametrize(
    "kw", [{"image_size": (7, 32)}, {"image_size": (32,)}, {"image_size": "32"}, {"dropout": 1.0}]
)
def test_vgg9_bad_options(kw: dict) -> None:
    with pytest.raises(ConfigError):
        create_model("vgg9", **kw)


def test_config_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        create_model("small_cnn", width=0)


def test_register_duplicate_name_rejected() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_model(lambda in_channels, num_classes, width: nn.Identity(), name="resnet20")


def test_factory_called_directly_sets_args() -> None:
    m = resnet20(in_channels=1, num_classes=5)
    assert m.hwquant_args == {"name": "resnet20", "in_channels": 1, "num_classes": 5, "width": 1.0}


# ---------------------------------------------------------------- rebuild, determinism, gradients


@pytest.mark.parametrize("name", ALL_MODELS)
def test_create_model_from_args_rebuilds(name: str) -> None:
    kw = {"image_size": (28, 28)} if name == "vgg9" else {}
    model = create_model(name, in_channels=1, num_classes=7, width=CHEAP_WIDTH[name], **kw)
    assert model.hwquant_args["name"] == name
    rebuilt = create_model_from_args(model.hwquant_args)
    assert rebuilt.hwquant_args == model.hwquant_args
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)  # strict load works


def test_args_survive_json_round_trip() -> None:
    model = create_model("vgg9", in_channels=1, width=0.125, image_size=(28, 28), dropout=0.1)
    args = json.loads(json.dumps(model.hwquant_args))  # the tuple becomes a list
    rebuilt = create_model_from_args(args)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.image_size == (28, 28) and rebuilt.dropout == 0.1


def test_create_model_from_args_errors() -> None:
    with pytest.raises(ConfigError, match="name"):
        create_model_from_args({"in_channels": 3})
    with pytest.raises(ConfigError):
        create_model_from_args(["resnet20"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_same_seed_same_weights(name: str) -> None:
    torch.manual_seed(123)
    a = create_model(name, width=CHEAP_WIDTH[name]).state_dict()
    torch.manual_seed(123)
    b = create_model(name, width=CHEAP_WIDTH[name]).state_dict()
    torch.manual_seed(124)
    c = create_model(name, width=CHEAP_WIDTH[name]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = f"{create_model(name, width=CHEAP_WIDTH[name]).first_layer_name}.weight"
    assert not torch.equal(a[key], c[key])


def test_weight_init() -> None:
    torch.manual_seed(0)
    m = create_model("resnet20")
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
        if isinstance(mod, nn.Conv2d):
            assert mod.bias is None
    w = create_model("resnet18").layer4[0].conv2.weight  # fan_out = 9 * 512: std = sqrt(2 / 4608)
    assert abs(w.std().item() - (2 / 4608) ** 0.5) < 1e-3
    assert m.fc.weight.std().item() < 0.02 and torch.all(m.fc.bias == 0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_gives_all_gradients(name: str) -> None:
    kw = {"image_size": (16, 16)} if name == "vgg9" else {}
    model = create_model(name, in_channels=3, num_classes=10, width=CHEAP_WIDTH[name], **kw).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------- structure the quantizers rely on


@pytest.mark.parametrize("name", ALL_MODELS)
def test_fx_trace_conv_bn_pairs(name: str) -> None:
    model = create_model(name, width=CHEAP_WIDTH[name]).eval()
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 0
    for node in convs:
        users = list(node.users)
        assert len(users) == 1, node.target
        user = users[0]
        assert user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d), node.target
        assert modules[node.target].bias is None
    # ReLUs are modules, never functions
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            assert "relu" not in str(node.target), node
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_relus_distinct_modules(name: str) -> None:
    model = create_model(name, width=CHEAP_WIDTH[name])
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, (nn.ReLU, nn.ReLU6))]
    assert len(relus) == len({id(m) for m in relus}) > 0
    assert not any(m.inplace for m in relus)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    for b in blocks:
        assert isinstance(b.relu1, nn.ReLU) and isinstance(b.relu2, nn.ReLU) and b.relu1 is not b.relu2
        assert isinstance(b.shortcut, (nn.Sequential, nn.Identity))
        for attr in ("conv1", "bn1", "conv2", "bn2"):
            assert hasattr(b, attr)
    if name.startswith("resnet"):
        assert len(blocks) == {"resnet20": 9, "resnet18": 8}[name]
        assert isinstance(model.relu, nn.ReLU)


def test_resnet_shortcuts() -> None:
    m = create_model("resnet20")
    assert isinstance(m.layer1[0].shortcut, nn.Identity)
    sc = m.layer2[0].shortcut
    assert (
        isinstance(sc, nn.Sequential) and isinstance(sc[0], nn.Conv2d) and isinstance(sc[1], nn.BatchNorm2d)
    )
    assert sc[0].kernel_size == (1, 1) and sc[0].stride == (2, 2) and sc[0].bias is None
    assert isinstance(m.layer2[1].shortcut, nn.Identity)


def test_residual_add_feeds_relu2() -> None:
    gm = torch.fx.symbolic_trace(create_model("resnet20"))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 9
    for node in adds:
        (user,) = node.users
        assert user.op == "call_module" and user.target.endswith("relu2")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_first_and_last_layer_names(name: str) -> None:
    model = create_model(name, width=CHEAP_WIDTH[name])
    modules = dict(model.named_modules())
    first = "features.0" if name == "mobilenet_v2" else "conv1"
    assert model.first_layer_name == first and isinstance(modules[model.first_layer_name], nn.Conv2d)
    assert model.last_layer_name == "fc" and isinstance(modules[model.last_layer_name], nn.Linear)
    assert modules["fc"].out_features == 10
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs[0] == model.first_layer_name and convs[-1] == model.last_layer_name
    # the attributes agree with the positions found from the traced graph
    pos = layer_positions(model, use_attributes=False)
    assert pos.source == "graph" and pos.first == (first,) and pos.last == ("fc",)
    if name != "vgg9":
        assert isinstance(modules["pool"], nn.AdaptiveAvgPool2d)
