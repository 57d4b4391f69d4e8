"""``hq.save`` / ``hq.load``: the checkpoint every command writes, rebuilt from the library for bundled and
user networks, float and quantized (PTQ, QAT, MPQ, bit windows), with one-line errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hwquant as hq
from hwquant.errors import CheckpointError, ConfigError


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


class Mine(nn.Module):
    """A network the library did not build: no ``hwquant_args``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU6()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.pool(self.dw(self.act(self.bn(self.conv(x))))).flatten(1))


def _make(name):
    from hwquant.models import create_model

    torch.manual_seed(0)
    return create_model("small_cnn", in_channels=1, num_classes=4) if name == "bundled" else Mine().eval()


CONFIGS = {
    "float": lambda m: (m.eval(), None),
    "minmax w8a8": lambda m: (hq.ptq(m, hq.MinMaxPTQConfig(w_bits=8, a_bits=8), _batches())[0], hq.MinMaxPTQConfig(
        w_bits=8, a_bits=8)),
    "ggd w4a4": lambda m: (hq.ptq(m, hq.GGDPTQConfig(w_bits=4, a_bits=4, bft=False), _batches())[0],
                           hq.GGDPTQConfig(w_bits=4, a_bits=4, bft=False)),
    "cqat window": lambda m: (hq.prepare_qat(m, hq.CQATConfig(w_bits=5, a_bits=4, step="window"), _batches()),
                              hq.CQATConfig(w_bits=5, a_bits=4, step="window")),
    "lsq": lambda m: (hq.prepare_qat(m, hq.LSQConfig(w_bits=4, a_bits=4), _batches()),
                      hq.LSQConfig(w_bits=4, a_bits=4)),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("net", ["bundled", "user"])
def test_save_load_round_trip_gives_the_same_outputs(tmp_path, net, cfg):
    qm, config = CONFIGS[cfg](_make(net))
    qm.eval()
    x = _batches(1, seed=5)[0][0]
    with torch.no_grad():
        want = qm(x)
    path = hq.save(qm, tmp_path / "m.pt", config, metrics={"top1": 1.0})
    loaded = hq.load(path) if net == "bundled" else hq.load(path, model=Mine())
    assert type(loaded) is type(qm) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    sd_a, sd_b = qm.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a
                                             if isinstance(sd_a[k], torch.Tensor))


def test_a_command_can_read_what_save_wrote(tmp_path):
    """The file is the commands' own format: pipelines.load_model reads it and sees the method."""
    from hwquant.pipelines import load_model

    cfg = hq.CQATConfig(w_bits=5, a_bits=4, step="window", pow2=True)
    qm = hq.prepare_qat(_make("bundled"), cfg, _batches()).eval()
    model, ck = load_model(hq.save(qm, tmp_path / "q.pt", cfg))
    assert ck["qat"]["method"] == "cqat" and ck["qat"]["config"]["step"] == "window"
    shifts = [int(m.window_shift) for m in model.modules() if getattr(m, "windowed", False)]
    assert shifts and shifts == [int(m.window_shift) for m in qm.modules() if getattr(m, "windowed", False)]


def test_user_network_without_skeleton_is_a_one_line_error(tmp_path):
    qm, cfg = CONFIGS["minmax w8a8"](_make("user"))
    path = hq.save(qm, tmp_path / "u.pt", cfg)
    with pytest.raises(CheckpointError, match=r"pass the float network, hq.load\(path, model=MyNet\(\)\)"):
        hq.load(path)
    with pytest.raises(CheckpointError, match="does not match its model description"):
        hq.load(path, model=_make("bundled"))  # another architecture


def test_save_rejects_what_it_cannot_rebuild(tmp_path):
    with pytest.raises(ConfigError, match="not a PTQ or QAT config"):
        hq.save(_make("bundled"), tmp_path / "x.pt", {"bits": 4})
    with pytest.raises(ConfigError, match="expects an nn.Module"):
        hq.save({"w": torch.zeros(1)}, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
