"""Devices: resolve_device, to_device, DeviceLoader, fit/evaluate on any iterable, the distributed backend.

The machine that runs the suite has no GPU: CUDA is faked by monkeypatching ``torch.cuda`` where a test needs
its presence, and batch moves are checked on the ``meta`` device (which has no data, only placement).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hwquant.train.distributed as hdist
import hwquant.train.loop as loop
from hwquant.errors import ConfigError, DataError
from hwquant.train import (
    DeviceLoader,
    TrainConfig,
    evaluate,
    fit,
    init_from_env,
    model_device,
    rank_device,
    resolve_device,
    save_checkpoint,
    to_device,
)
from hwquant.train.checkpoint import _cpu

META = torch.device("meta")


@pytest.fixture
def tf32_restored():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def fake_cuda(monkeypatch, tf32_restored):
    """``torch.cuda`` that says two devices exist (nothing is ever allocated on them in these tests)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_resolve_device_cpu_auto_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    for name in ("cuda", "cuda:0", "CUDA"):
        with pytest.raises(ConfigError, match="CUDA is not available") as e:
            resolve_device(name)
        assert len(str(e.value).splitlines()) == 1
    for name in ("gpu", "tpu:0", "meta"):
        with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
            resolve_device(name)


def test_resolve_device_cuda_turns_tf32_off(fake_cuda):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    assert resolve_device("auto") == torch.device("cuda")
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_to_device_moves_every_tensor_and_keeps_the_rest():
    Pair = collections.namedtuple("Pair", "x y")
    x = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    y = torch.arange(2)
    assert to_device(x, META).device == META
    assert to_device(x, META).is_contiguous(memory_format=torch.channels_last)  # memory format kept
    tup = to_device((x, y), META)
    assert isinstance(tup, tuple) and all(t.device == META for t in tup)
    lst = to_device([x, [y, "label"], 3], META)
    assert isinstance(lst, list) and lst[0].device == META and lst[1][0].device == META
    assert lst[1][1] == "label" and lst[2] == 3
    nt = to_device(Pair(x, y), META)
    assert isinstance(nt, Pair) and nt.x.device == META and nt.y.device == META
    d = to_device({"image": x, "id": "a"}, META)
    assert d["image"].device == META and d["id"] == "a"
    assert to_device(x, "cpu") is x  # already there: no copy


def test_device_loader_moves_batches_and_forwards_len_and_set_epoch():
    class Loader:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

        def __len__(self):
            return 2

        def __iter__(self):
            return iter([(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))] * 2)

    inner = Loader()
    loader = DeviceLoader(inner, META)
    assert len(loader) == 2
    loader.set_epoch(3)
    assert inner.epochs == [3]
    assert all(x.device == META and y.device == META for x, y in loader)
    with pytest.raises(TypeError):
        len(DeviceLoader(iter([]), "cpu"))


class Recorder(nn.Module):
    """A linear classifier on flattened input that records the device and dtype of every batch it sees."""

    def __init__(self, features=4, classes=3):
        super().__init__()
        self.fc = nn.Linear(features, classes)
        self.seen: list[tuple[torch.device, torch.device]] = []

    def forward(self, x):
        self.seen.append((x.device, self.fc.weight.device))
        return self.fc(x.flatten(1))


def _data(n=24, batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).to(torch.int32) + (x[:, 1] > 0).to(torch.int32)  # int32 labels, as a user's data may be
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_fit_and_evaluate_take_a_device_and_move_batches(monkeypatch):
    moved_to = []
    real = loop.to_device

    def spy(batch, device):
        moved_to.append(torch.device(device))
        return real(batch, device)

    monkeypatch.setattr(loop, "to_device", spy)
    model = Recorder()
    fit(model, _data(), TrainConfig(epochs=1, lr=0.1), progress=False, device="cpu")
    assert moved_to and set(moved_to) == {torch.device("cpu")}
    assert model.seen and all(x == w == torch.device("cpu") for x, w in model.seen)
    moved_to.clear()
    res = evaluate(model, _data(), device="auto" if not torch.cuda.is_available() else "cpu")
    assert res["n"] == 24 and set(moved_to) == {torch.device("cpu")}
    assert model_device(model) == torch.device("cpu")
    with pytest.raises(ConfigError, match="device must be one of"):
        evaluate(model, _data(), device="gpu")


def test_evaluate_without_device_follows_the_model(monkeypatch):
    moved_to = []
    real = loop.to_device
    monkeypatch.setattr(loop, "to_device", lambda b, d: moved_to.append(torch.device(d)) or real(b, d))
    evaluate(Recorder(), _data())
    assert set(moved_to) == {torch.device("cpu")}
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU


def test_fit_accepts_a_dataloader_and_an_iterable_without_len():
    from torch.utils.data import DataLoader, TensorDataset

    batches = _data()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    cfg = TrainConfig(epochs=2, lr=0.1, warmup_epochs=0.5)

    torch.manual_seed(0)
    a = Recorder()
    fit(a, DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False), cfg, progress=False)

    class NoLen:  # re-iterable, no len(), no set_epoch
        def __iter__(self):
            return iter(batches)

    torch.manual_seed(0)
    b = Recorder()
    hist = fit(b, NoLen(), cfg, progress=False, eval_loader=NoLen())
    # the steps were counted: the same schedule, the same weights as with len()
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert hist["epochs"][-1]["lr_end"] == pytest.approx(0.0, abs=1e-12)
    assert hist["epochs"][-1]["test_top1"] >= 0.0
    assert len(b.seen) == 2 * 4 + 2 * 4  # the count pass loads data only: 2 epochs x (4 steps + 4 eval batches)
    with pytest.raises(ConfigError, match="one-shot iterator"):
        fit(Recorder(), iter(batches), cfg, progress=False)
    with pytest.raises(DataError, match="empty"):
        fit(Recorder(), [], cfg, progress=False)
    with pytest.raises(DataError, match=r"\(x, y\) pair"):
        fit(Recorder(), [torch.zeros(2, 4)], cfg, progress=False)
    # evaluate takes a one-shot generator
    assert evaluate(b, (bt for bt in batches))["n"] == 24


def test_fit_calls_the_samplers_set_epoch():
    class Sampler:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

    class Loader:
        sampler = Sampler()

        def __len__(self):
            return 4

        def __iter__(self):
            return iter(_data())

    loader = Loader()
    fit(Recorder(), loader, TrainConfig(epochs=3, lr=0.1), progress=False)
    assert loader.sampler.epochs == [0, 1, 2]


def test_checkpoint_payload_on_cpu_is_saved_as_is(tmp_path):
    sd = nn.BatchNorm2d(2).state_dict()
    payload = {"model": sd, "rows": [1, (2, torch.ones(1))]}
    assert _cpu(payload) is payload  # nothing to move: no copy
    meta_sd = nn.Linear(2, 2, device="meta").state_dict()
    with pytest.raises(NotImplementedError):  # a non-CPU tensor is copied to the CPU (meta has no data to copy)
        _cpu({"model": meta_sd})
    save_checkpoint(tmp_path / "c.pt", payload)
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert hasattr(back["model"], "_metadata")


@pytest.fixture
def fake_torchrun(monkeypatch):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", torch.device(d)))
    return calls


def test_distributed_backend_follows_the_device(fake_torchrun, fake_cuda):
    info = init_from_env(device=torch.device("cpu"))  # a CPU run on a machine with GPUs: gloo
    assert (info.rank, info.world_size) == (1, 2)
    assert fake_torchrun == {"backend": "gloo"}
    assert rank_device("cpu") == torch.device("cpu")


def test_distributed_cuda_run_uses_nccl_and_local_rank(fake_torchrun, fake_cuda, monkeypatch):
    init_from_env(device="cuda")
    assert fake_torchrun == {"backend": "nccl", "set_device": torch.device("cuda", 1)}
    assert rank_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 has no CUDA device"):
        rank_device("cuda")


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: pytest.fail("joined a process group"))
    assert init_from_env(device="cuda").world_size == 1  # no CUDA needed to say so
    assert rank_device("cuda") == torch.device("cuda")
    assert hdist.current().world_size == 1
