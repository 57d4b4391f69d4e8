"""CIFAR-10/100 pickle readers, validation, and the (file://) downloader."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hwquant.data import download_cifar, find_cifar_dir, load_dataset, read_cifar, resolve_dataset
from hwquant.errors import DataError

BATCHES10 = [f"data_batch_{i}" for i in range(1, 6)]


def dump(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar10(root: Path, per_batch: int = 3, n_test: int = 4, protocol: int = 2) -> dict:
    """Write cifar-10-batches-py/ under ``root``; returns the concatenated arrays per split."""
    rng = np.random.default_rng(10)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out: dict = {"train": ([], []), "test": ([], [])}
    for name in [*BATCHES10, "test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        dump(d / name, {b"batch_label": b"x", b"data": data, b"labels": labels}, protocol)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(data)
        out[split][1].append(labels)
    return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in out.items()}


def make_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> dict:
    rng = np.random.default_rng(100)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = np.array([99, 0, 57, 3, 42, 7][:n])
        coarse = fine // 5
        dump(d / split, {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()})
        out[split] = (data, fine)
    return out


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_dir_and_parent(tmp_path: Path, protocol: int) -> None:
    expected = make_cifar10(tmp_path, protocol=protocol)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        for split, n in (("train", 15), ("test", 4)):
            images, labels = read_cifar("cifar10", where, split)
            assert images.dtype == torch.uint8 and images.shape == (n, 3, 32, 32)
            assert labels.dtype == torch.int64
            data, lab = expected[split]
            np.testing.assert_array_equal(labels.numpy(), lab)
            np.testing.assert_array_equal(images.reshape(n, -1).numpy(), data)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32.
    images, _ = read_cifar("cifar10", tmp_path, "train")
    data = expected["train"][0]
    assert int(images[4, 1, 2, 5]) == int(data[4, 1024 + 2 * 32 + 5])
    assert int(images[0, 2, 31, 0]) == int(data[0, 2048 + 31 * 32])


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    expected = make_cifar100(tmp_path)
    train, test, info = load_dataset("cifar100", tmp_path)
    assert (len(train), len(test)) == (6, 3)
    np.testing.assert_array_equal(train.labels.numpy(), expected["train"][1])
    np.testing.assert_array_equal(test.images.reshape(3, -1).numpy(), expected["test"][0])
    assert info.num_classes == 100 and info.in_channels == 3 and info.image_size == (32, 32)
    assert info.source == str(tmp_path / "cifar-100-python")
    pixels = expected["train"][0].reshape(6, 3, 1024).astype(np.float64) / 255.0
    np.testing.assert_allclose(info.mean, pixels.mean(axis=(0, 2)), atol=1e-12)
    np.testing.assert_allclose(info.std, pixels.std(axis=(0, 2)), atol=1e-12)
    assert info.augment == "pad 4 + random crop + horizontal flip (p=0.5)"


def test_cifar_missing_dir_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"CIFAR-10 directory {missing} does not exist"):
        load_dataset("cifar10", missing)
    with pytest.raises(DataError, match=str(missing)):
        resolve_dataset("cifar10", missing)  # no fallback for CIFAR
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing data_batch_3 in .*cifar-10-batches-py"):
        find_cifar_dir("cifar10", tmp_path)
    with pytest.raises(DataError, match="CIFAR-100 not found"):
        read_cifar("cifar100", tmp_path)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"label 10 out of range \[0, 10\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}, "label -1 out of range"),
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "must be a uint8 N x 3072 array"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "must be a uint8 N x 3072 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but b'labels' has shape"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "missing key b'labels'"),
        ([1, 2, 3], "expected a pickled dict"),
    ],
)
def test_cifar_bad_batches(tmp_path: Path, batch: object, message: str) -> None:
    make_cifar10(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "test_batch"
    dump(target, batch)
    with pytest.raises(DataError, match=message) as info:
        read_cifar("cifar10", tmp_path, "test")
    assert str(target) in str(info.value)


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    target = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    target.write_bytes(target.read_bytes()[:500])
    with pytest.raises(DataError, match=r"data_batch_2: not a valid CIFAR pickle"):
        read_cifar("cifar10", tmp_path, "train")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _Payload(marker), b"labels": []})
    with pytest.raises(DataError, match="refusing to load global"):
        read_cifar("cifar10", tmp_path, "test")
    assert not marker.exists()


def _tarball(src_root: Path, folder: str, archive: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src_root / folder, arcname=folder)
    archive.write_bytes(buf.getvalue())


def test_download_cifar_from_file_url(tmp_path: Path) -> None:
    expected = make_cifar10(tmp_path / "src")
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    _tarball(tmp_path / "src", "cifar-10-batches-py", archive)
    final = download_cifar("cifar10", tmp_path / "dest", url=archive.as_uri(), verify=False)
    assert final == tmp_path / "dest" / "cifar-10-batches-py"
    images, labels = read_cifar("cifar10", tmp_path / "dest", "train")
    np.testing.assert_array_equal(images.reshape(15, -1).numpy(), expected["train"][0])
    np.testing.assert_array_equal(labels.numpy(), expected["train"][1])
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["cifar-10-batches-py", archive.name]
    # Verification rejects a fake archive and leaves nothing behind.
    with pytest.raises(DataError, match="MD5"):
        download_cifar("cifar10", tmp_path / "checked", url=archive.as_uri())
    assert list((tmp_path / "checked").iterdir()) == []
    # An archive without the expected folder is refused and no partial folder appears.
    bad = tmp_path / "mirror" / "cifar-100-python.tar.gz"
    _tarball(tmp_path / "src", "cifar-10-batches-py", bad)
    with pytest.raises(DataError, match="does not contain cifar-100-python/"):
        download_cifar("cifar100", tmp_path / "dest100", url=bad.as_uri(), verify=False)
    assert [p.name for p in (tmp_path / "dest100").iterdir()] == [bad.name]
