"""digits, synthetic, from_arrays validation, dataset names and the Fashion-MNIST fallback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from hwquant.data import (
    DATASET_NAMES,
    DatasetInfo,
    SyntheticConfig,
    TensorData,
    canonical_name,
    channel_stats,
    load_dataset,
    make_loaders,
    make_synthetic,
    read_digits,
    resolve_dataset,
)
from hwquant.errors import ConfigError, DataError


def test_digits_split_and_scaling() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    train_x, train_y = read_digits("train")
    test_x, test_y = read_digits("test")
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    scaled = np.floor(ref.images * 255 / 16 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(train_x[:, 0].numpy(), scaled[:1437])
    np.testing.assert_array_equal(test_x[:, 0].numpy(), scaled[1437:])
    np.testing.assert_array_equal(test_y.numpy(), ref.target[1437:])
    assert int(train_x.max()) == 255 and int(train_x.min()) == 0
    assert set(torch.unique(train_x).tolist()) <= {int(np.floor(v * 255 / 16 + 0.5)) for v in range(17)}
    assert torch.bincount(test_y, minlength=10).min() >= 30  # every class in the test split
    train_x[0, 0, 0, 0] = 7  # fresh tensors: mutating one does not leak into the next call
    assert int(read_digits("train")[0][0, 0, 0, 0]) == int(scaled[0, 0, 0])


def test_digits_dataset_info() -> None:
    train, test, info = load_dataset("digits", seed=123)
    assert info == DatasetInfo(
        name="digits",
        in_channels=1,
        num_classes=10,
        image_size=(8, 8),
        mean=info.mean,
        std=info.std,
        source="sklearn load_digits",
        augment="pad 1 + random crop",
    )
    pixels = train.images.double() / 255
    assert info.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-12)
    assert info.std[0] == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"  # type: ignore[misc]


def test_digits_loader_shapes_and_range() -> None:
    loaders = make_loaders("digits", batch_size=64, eval_batch_size=100, calib_size=200, augment=False)
    info = loaders.info
    assert loaders.message is None
    assert len(loaders.train) == (1437 - 200) // 64 and len(loaders.test) == 4 and len(loaders.calib) == 2
    x, y = next(iter(loaders.test))
    assert x.dtype == torch.float32 and x.shape == (100, 1, 8, 8)
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 9
    lo = (0.0 - info.mean[0]) / info.std[0]
    hi = (1.0 - info.mean[0]) / info.std[0]
    assert float(x.min()) == pytest.approx(lo, abs=1e-5) and float(x.max()) == pytest.approx(hi, abs=1e-5)
    xs = torch.cat([b for b, _ in loaders.test])
    assert xs.shape == (360, 1, 8, 8)
    torch.testing.assert_close(xs.mean(), torch.tensor(0.0), atol=0.15, rtol=0)


def test_synthetic_determinism() -> None:
    cfg = SyntheticConfig(n_train=300, n_test=100, num_classes=4, channels=2, image_size=(10, 12))
    a_x, a_y = make_synthetic(cfg, seed=5)
    b_x, b_y = make_synthetic(cfg, seed=5)
    c_x, c_y = make_synthetic(cfg, seed=6)
    t_x, _ = make_synthetic(cfg, seed=5, split="test")
    assert a_x.dtype == torch.uint8 and a_x.shape == (300, 2, 10, 12) and t_x.shape == (100, 2, 10, 12)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert (a_x != c_x).float().mean() > 0.5 and not torch.equal(a_y, c_y)
    assert not torch.equal(a_x[:100], t_x)
    assert torch.bincount(a_y).tolist() == [75] * 4
    train, test, info = load_dataset("synthetic", seed=5, synthetic=cfg)
    assert torch.equal(train.images, a_x) and torch.equal(test.images, t_x)
    assert info.num_classes == 4 and info.in_channels == 2 and info.image_size == (10, 12)
    assert info.augment == "none" and "seed=5" in info.source


def test_synthetic_is_learnable() -> None:
    """A nearest-class-mean classifier is far above chance (10%) on the default synthetic set."""
    train, test, _ = load_dataset("synthetic", seed=0)
    xtr = train.images.float().flatten(1)
    xte = test.images.float().flatten(1)
    means = torch.stack([xtr[train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(xte, means).argmin(1)
    accuracy = float((pred == test.labels).float().mean())
    assert 0.4 < accuracy < 0.999


def test_synthetic_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        SyntheticConfig(num_classes=1)
    with pytest.raises(ConfigError, match="noise must be >= 0"):
        SyntheticConfig(noise=float("nan"))


def test_from_arrays_converts_and_validates() -> None:
    k = np.arange(24, dtype=np.float64).reshape(2, 3, 4) * 10
    data = TensorData.from_arrays(k / 255.0, np.array([1.0, 0.0]))
    assert data.images.dtype == torch.uint8 and data.images.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(data.images[:, 0].numpy(), k.astype(np.uint8))
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [1, 0] and len(data) == 2
    u8 = TensorData.from_arrays(np.full((3, 2, 2, 2), 200, np.uint8), [0, 1, 2])
    assert int(u8.images.sum()) == 200 * 24
    bad_nan = np.zeros((2, 1, 2, 2), np.float32)
    bad_nan[1, 0, 1, 1] = np.nan
    with pytest.raises(DataError, match="1 NaN or inf"):
        TensorData.from_arrays(bad_nan, [0, 1])
    with pytest.raises(DataError, match="NaN or inf"):
        TensorData.from_arrays(np.full((2, 1, 2, 2), np.inf), [0, 1])
    with pytest.raises(DataError, match=r"N x C x H x W or N x H x W, got shape \(2, 4\)"):
        TensorData.from_arrays(np.zeros((2, 4)), [0, 1])
    with pytest.raises(DataError, match=r"must lie in \[0, 1\]"):
        TensorData.from_arrays(np.full((2, 1, 2, 2), 1.5), [0, 1])
    with pytest.raises(DataError, match="0..255"):
        TensorData.from_arrays(np.full((2, 1, 2, 2), 256, np.int64), [0, 1])
    with pytest.raises(DataError, match="2 images but 3 labels"):
        TensorData.from_arrays(np.zeros((2, 1, 2, 2)), [0, 1, 2])
    with pytest.raises(DataError, match="non-negative"):
        TensorData.from_arrays(np.zeros((2, 1, 2, 2)), [0, -1])
    with pytest.raises(DataError, match="non-integral"):
        TensorData.from_arrays(np.zeros((2, 1, 2, 2)), [0.5, 1.0])
    with pytest.raises(DataError, match="labels contain NaN"):
        TensorData.from_arrays(np.zeros((2, 1, 2, 2)), [np.nan, 1.0])
    with pytest.raises(DataError, match="uint8 N x C x H x W"):
        TensorData(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="int64 vector"):
        TensorData(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))


def test_channel_stats_exact() -> None:
    x = torch.randint(0, 256, (50, 3, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    mean, std = channel_stats(x)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(mean, ref.mean(1).numpy(), atol=1e-12)
    np.testing.assert_allclose(std, ref.std(1, unbiased=False).numpy(), atol=1e-12)
    assert channel_stats(torch.full((2, 1, 2, 2), 9, dtype=torch.uint8))[1] == (1.0,)  # constant -> std 1


def test_names() -> None:
    assert canonical_name("Fashion-MNIST") == "fashion_mnist" and canonical_name("CIFAR10") == "cifar10"
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'; valid: " + ", ".join(DATASET_NAMES)):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="unknown dataset"):
        make_loaders("imagenet")


def test_fallback_to_digits(tmp_path: Path, monkeypatch) -> None:
    """Only the default location falls back; a directory the user names must hold the files."""
    import hwquant.data.idx as idx

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(idx, "DEFAULT_FASHION_MNIST_DIR", empty)
    used, message = resolve_dataset("fashion_mnist")
    assert used == "digits"
    assert message == f"Fashion-MNIST not found under {empty}; falling back to scikit-learn digits"
    for explicit in (empty, tmp_path / "no-such-dir"):
        with pytest.raises(DataError, match=str(explicit)):
            resolve_dataset("fashion_mnist", explicit)  # fallback=True, but the directory was named
    with pytest.raises(DataError, match=str(empty)):
        resolve_dataset("fashion_mnist", fallback=False)
    with pytest.raises(DataError, match=str(empty)):
        load_dataset("fashion_mnist", empty)  # load_dataset itself never falls back
    loaders = make_loaders("fashion_mnist", calib_size=100, batch_size=32)
    assert loaders.message == message and loaders.info.name == "digits"
    assert loaders.info.image_size == (8, 8) and len(loaders.train.data) == 1437 - 100
    assert resolve_dataset("digits", empty) == ("digits", None)
    assert resolve_dataset("synthetic") == ("synthetic", None)
