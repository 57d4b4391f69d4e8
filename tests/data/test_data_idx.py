"""IDX readers, the Fashion-MNIST directory reader and its (file://) download."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hwquant.data import (
    DEFAULT_FASHION_MNIST_DIR,
    download_fashion_mnist,
    find_fashion_mnist_dir,
    load_dataset,
    read_fashion_mnist,
    read_idx_images,
    read_idx_labels,
)
from hwquant.errors import DataError


def idx_images_bytes(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + images.astype(np.uint8).tobytes()


def idx_labels_bytes(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x00000801, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_fashion_dir(root: Path, n_train: int = 12, n_test: int = 5, h: int = 4, w: int = 6) -> dict:
    """Write a tiny Fashion-MNIST directory (train files gzipped, test files raw)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, h, w), dtype=np.uint8), np.arange(n_train) % 10),
        "test": (rng.integers(0, 256, (n_test, h, w), dtype=np.uint8), (np.arange(n_test) * 3) % 10),
    }
    write(root / "train-images-idx3-ubyte.gz", idx_images_bytes(arrays["train"][0]), gz=True)
    write(root / "train-labels-idx1-ubyte.gz", idx_labels_bytes(arrays["train"][1]), gz=True)
    write(root / "t10k-images-idx3-ubyte", idx_images_bytes(arrays["test"][0]), gz=False)
    write(root / "t10k-labels-idx1-ubyte", idx_labels_bytes(arrays["test"][1]), gz=False)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 7).astype(np.uint8)
    suffix = ".gz" if gz else ""
    got_images = read_idx_images(write(tmp_path / f"img{suffix}", idx_images_bytes(images), gz))
    got_labels = read_idx_labels(write(tmp_path / f"lab{suffix}", idx_labels_bytes(labels), gz))
    assert got_images.dtype == torch.uint8 and got_images.shape == (7, 1, 5, 3)
    assert got_labels.dtype == torch.int64 and got_labels.shape == (7,)
    np.testing.assert_array_equal(got_images[:, 0].numpy(), images)
    np.testing.assert_array_equal(got_labels.numpy(), labels.astype(np.int64))


def test_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    gz_without_suffix = write(tmp_path / "images-plain-name", idx_images_bytes(images), gz=True)
    raw_with_gz_suffix = write(tmp_path / "images.gz", idx_images_bytes(images), gz=False)
    np.testing.assert_array_equal(read_idx_images(gz_without_suffix)[:, 0].numpy(), images)
    np.testing.assert_array_equal(read_idx_images(raw_with_gz_suffix)[:, 0].numpy(), images)


def test_bad_magic(tmp_path: Path) -> None:
    labels = write(tmp_path / "labels", idx_labels_bytes(np.zeros(3, np.uint8)), gz=False)
    with pytest.raises(DataError, match=r"bad IDX magic 0x00000801, expected 0x00000803"):
        read_idx_images(labels)
    images = write(tmp_path / "images", idx_images_bytes(np.zeros((1, 2, 2), np.uint8)), gz=True)
    with pytest.raises(DataError, match="magic"):
        read_idx_labels(images)
    junk = write(tmp_path / "junk", b"\x12\x34\x56\x78" + bytes(20), gz=False)
    with pytest.raises(DataError, match=str(junk)):
        read_idx_images(junk)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_and_trailing(tmp_path: Path, gz: bool) -> None:
    payload = idx_images_bytes(np.ones((3, 4, 4), np.uint8))
    short = write(tmp_path / "short", payload[:-1], gz)
    with pytest.raises(DataError, match=r"truncated.*need 64 bytes, file has 63"):
        read_idx_images(short)
    long = write(tmp_path / "long", payload + b"\x00", gz)
    with pytest.raises(DataError, match="trailing bytes"):
        read_idx_images(long)
    header_only = write(tmp_path / "header", payload[:9], gz)
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx_images(header_only)
    tiny = write(tmp_path / "tiny", b"\x00\x00", gz)
    with pytest.raises(DataError, match="too short"):
        read_idx_labels(tiny)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    packed = gzip.compress(idx_images_bytes(rng.integers(0, 256, (50, 8, 8), dtype=np.uint8)))
    path = tmp_path / "cut.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"cut\.gz: corrupt or truncated gzip"):
        read_idx_images(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(DataError, match=f"{missing}: file not found"):
        read_idx_images(missing)


def test_fashion_dir_reader(tmp_path: Path) -> None:
    arrays = make_fashion_dir(tmp_path / "fm")
    for split in ("train", "test"):
        images, labels = read_fashion_mnist(tmp_path / "fm", split)
        np.testing.assert_array_equal(images[:, 0].numpy(), arrays[split][0])
        np.testing.assert_array_equal(labels.numpy(), arrays[split][1])
    # A parent directory holding fashion-mnist/ is accepted too.
    (tmp_path / "parent").mkdir()
    make_fashion_dir(tmp_path / "parent" / "fashion-mnist")
    assert find_fashion_mnist_dir(tmp_path / "parent") == tmp_path / "parent" / "fashion-mnist"


def test_fashion_load_dataset_info(tmp_path: Path) -> None:
    arrays = make_fashion_dir(tmp_path)
    train, test, info = load_dataset("Fashion-MNIST", tmp_path)
    assert (len(train), len(test)) == (12, 5)
    assert info.name == "fashion_mnist" and info.in_channels == 1 and info.num_classes == 10
    assert info.image_size == (4, 6)
    assert info.source == str(tmp_path)
    pixels = arrays["train"][0].astype(np.float64) / 255.0
    assert info.mean[0] == pytest.approx(pixels.mean(), abs=1e-12)
    assert info.std[0] == pytest.approx(pixels.std(), abs=1e-12)
    assert info.augment == "pad 2 + random crop + horizontal flip (p=0.5)"


def test_fashion_missing_dir_and_files(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match=f"Fashion-MNIST directory {missing} does not exist"):
        read_fashion_mnist(missing)
    make_fashion_dir(tmp_path / "partial")
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]") as info:
        load_dataset("fashion_mnist", tmp_path / "partial")
    assert str(tmp_path / "partial") in str(info.value)
    assert "train-images" not in str(info.value)


def test_fashion_bad_labels_and_counts(tmp_path: Path) -> None:
    make_fashion_dir(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_labels_bytes(np.array([0, 1, 10, 2, 3])), gz=False)
    with pytest.raises(DataError, match=r"label 10 out of range \[0, 10\)"):
        read_fashion_mnist(tmp_path, "test")
    write(tmp_path / "t10k-labels-idx1-ubyte", idx_labels_bytes(np.array([0, 1, 2])), gz=False)
    with pytest.raises(DataError, match="has 5 images but .* has 3 labels"):
        read_fashion_mnist(tmp_path, "test")


def test_download_fashion_mnist_from_file_url(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    make_fashion_dir(mirror)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # the mirror must hold .gz files
        raw = mirror / stem
        (mirror / f"{stem}.gz").write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    dest = download_fashion_mnist(tmp_path / "dest", base_url=mirror.as_uri(), verify=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in mirror.iterdir())
    for p in mirror.iterdir():
        assert (dest / p.name).read_bytes() == p.read_bytes()
    images, _ = read_fashion_mnist(dest, "train")
    assert images.shape == (12, 1, 4, 6)
    # With verification on, the fake files fail the official MD5 and nothing is left behind.
    with pytest.raises(DataError, match="MD5"):
        download_fashion_mnist(tmp_path / "checked", base_url=mirror.as_uri())
    assert list((tmp_path / "checked").iterdir()) == []


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist() -> None:
    train, test, info = load_dataset("fashion_mnist")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert info.image_size == (28, 28) and info.num_classes == 10 and info.in_channels == 1
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert info.mean[0] == pytest.approx(0.2860, abs=5e-4) and info.std[0] == pytest.approx(0.3530, abs=5e-4)
