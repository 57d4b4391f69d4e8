"""Trainer: learns, checkpoints atomically, resumes bit-exactly, loads with weights_only."""

import argparse

import pytest
import torch

from hwquant.data import make_loaders
from hwquant.errors import CheckpointError, ConfigError
from hwquant.models import create_model
from hwquant.train import TrainConfig, evaluate, fit, load_checkpoint, save_checkpoint


def _setup(seed=0):
    loaders = make_loaders("digits", batch_size=64, calib_size=100, seed=seed, augment=True)
    torch.manual_seed(seed)
    model = create_model("small_cnn", in_channels=1, num_classes=10)
    return model, loaders


def test_fit_learns_and_evaluate_matches_hand_count():
    model, loaders = _setup()
    hist = fit(model, loaders.train, TrainConfig(epochs=12, lr=0.1), eval_loader=loaders.test, progress=False)
    assert hist["epochs"][-1]["test_top1"] > 60.0
    assert hist["epochs"][-1]["train_loss"] < hist["epochs"][0]["train_loss"]
    # evaluate's top-1/top-5 against a hand count
    res = evaluate(model, loaders.test)
    correct1 = correct5 = n = 0
    model.eval()
    with torch.no_grad():
        for x, y in loaders.test:
            logits = model(x)
            correct1 += int((logits.argmax(1) == y).sum())
            top5 = logits.argsort(1, descending=True)[:, :5]
            correct5 += int((top5 == y[:, None]).any(1).sum())
            n += len(y)
    assert res["top1"] == pytest.approx(100 * correct1 / n)
    assert res["top5"] == pytest.approx(100 * correct5 / n)
    assert res["n"] == n


def test_resume_is_bit_exact(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, seed=3)
    model_a, loaders = _setup(3)
    fit(model_a, loaders.train, cfg, progress=False)

    class Stop(Exception):
        pass

    steps_per_epoch = len(loaders.train)

    def crash(model, step):
        if step == steps_per_epoch + 2:  # mid-way through epoch 2
            raise Stop

    model_b, loaders_b = _setup(3)
    with pytest.raises(Stop):
        fit(model_b, loaders_b.train, cfg, out_dir=tmp_path, progress=False, step_hook=crash)
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["epoch"] == 0
    model_c, loaders_c = _setup(99)  # different init: everything must come from the checkpoint
    loaders_c = make_loaders("digits", batch_size=64, calib_size=100, seed=3, augment=True)
    fit(model_c, loaders_c.train, cfg, out_dir=tmp_path, resume=True, progress=False)
    for (k, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        assert torch.equal(a, c), k


def test_resume_with_other_schedule_is_refused(tmp_path):
    model, loaders = _setup()
    fit(model, loaders.train, TrainConfig(epochs=1, lr=0.05), out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="epochs"):
        fit(model, loaders.train, TrainConfig(epochs=2, lr=0.05), out_dir=tmp_path, resume=True, progress=False)


def test_checkpoint_atomic_and_weights_only(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint(p, {"w": torch.arange(3)})
    assert torch.equal(load_checkpoint(p)["w"], torch.arange(3))
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]

    # an arbitrary pickled object is refused by weights_only=True
    torch.save({"format": "hwquant-checkpoint-v1", "obj": argparse.Namespace(a=1)}, p)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(p)
    # a failed write leaves nothing behind
    with pytest.raises(Exception, match="pickle"):
        save_checkpoint(tmp_path / "d.pt", {"bad": lambda: 0})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["c.pt"]


def test_train_config_validation():
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)


def test_fit_leaves_the_callers_rng_alone_and_is_seeded_by_its_config():
    """fit seeds its own stream from cfg.seed; the caller's global RNG state is the same before and after."""
    runs = []
    for caller_seed in (1, 2):
        model, loaders = _setup()
        torch.manual_seed(caller_seed)
        before = torch.random.get_rng_state()
        net = torch.nn.Sequential(model, torch.nn.Dropout(0.3))  # a random op inside training
        fit(net, loaders.train, TrainConfig(epochs=1, lr=0.05, seed=5), progress=False)
        assert torch.equal(torch.random.get_rng_state(), before)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):  # the caller's state does not change what fit computes
        assert torch.equal(a, b)
