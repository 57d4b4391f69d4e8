"""CIFAR-10 / CIFAR-100 "python version" readers and downloader.

Layout (as extracted from the official archives):

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (train, 10000 each) and ``test_batch``;
  each a pickled dict with ``b"data"`` (``N x 3072`` uint8) and ``b"labels"`` (list of ``N`` ints).
* ``cifar-100-python/``: ``train`` (50000) and ``test`` (10000); dict keys ``b"data"`` and
  ``b"fine_labels"`` (the 100-class labels).

A row of ``data`` is the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image in row-major
order, so ``data.reshape(N, 3, 32, 32)`` is the ``N x C x H x W`` tensor.

The batches are pickles, which can run arbitrary code when loaded; they are read with
``pickle.Unpickler(f, encoding="bytes")`` restricted to the few numpy globals a CIFAR batch needs, so a
tampered file raises :class:`~hwquant.errors.DataError` instead of executing anything.
"""

from __future__ import annotations

import contextlib
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from hwquant.data._download import download_file
from hwquant.data.core import check_labels
from hwquant.errors import ConfigError, DataError

__all__ = [
    "CIFAR_LAYOUT",
    "DEFAULT_DATA_ROOT",
    "download_cifar",
    "find_cifar_dir",
    "read_cifar",
]

#: Default parent directory of ``cifar-10-batches-py/`` / ``cifar-100-python/`` (relative to the cwd).
DEFAULT_DATA_ROOT = Path("data")


class _Layout:
    def __init__(
        self,
        title: str,
        subdir: str,
        train: tuple[str, ...],
        test: tuple[str, ...],
        label_key: bytes,
        num_classes: int,
        url: str,
        md5: str,
    ) -> None:
        self.title = title
        self.subdir = subdir
        self.files = {"train": train, "test": test}
        self.label_key = label_key
        self.num_classes = num_classes
        self.url = url
        self.md5 = md5

    @property
    def all_files(self) -> tuple[str, ...]:
        return self.files["train"] + self.files["test"]


CIFAR_LAYOUT: dict[str, _Layout] = {
    "cifar10": _Layout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": _Layout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}

# Globals a CIFAR batch pickle may reference: numpy array reconstruction under numpy 1.x and 2.x names,
# and _codecs.encode, which protocol-2 pickles written by Python 3 use for bytes.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _layout(name: str) -> _Layout:
    if name not in CIFAR_LAYOUT:
        raise ConfigError(f"unknown CIFAR dataset {name!r}; valid: {', '.join(CIFAR_LAYOUT)}")
    return CIFAR_LAYOUT[name]


def find_cifar_dir(name: Literal["cifar10", "cifar100"], data_dir: str | Path | None = None) -> Path:
    """Locate the extracted CIFAR directory.

    ``data_dir`` may be the batches directory itself (``.../cifar-10-batches-py``) or its parent;
    default :data:`DEFAULT_DATA_ROOT` (``./data``).

    Raises:
        DataError: naming the directory searched and the missing files.
    """
    layout = _layout(name)
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_ROOT
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise DataError(
            f"{layout.title} directory {root} {problem} "
            f"(get it with hwquant.data.download_cifar({name!r}, dest))"
        )
    for candidate in (root, root / layout.subdir):
        if all((candidate / f).is_file() for f in layout.all_files):
            return candidate
    where = root / layout.subdir if (root / layout.subdir).is_dir() else root
    missing = [f for f in layout.all_files if not (where / f).is_file()]
    raise DataError(
        f"{layout.title} not found under {root}: missing {', '.join(missing)} in {where} "
        f"(get it with hwquant.data.download_cifar({name!r}, dest))"
    )


def _load_batch(path: Path, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = _RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:  # any unpickling failure means a corrupt or foreign file
        raise DataError(f"{path}: not a valid CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    for key in (b"data", label_key):
        if key not in batch:
            raise DataError(f"{path}: missing key {key!r}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: b'data' must be a uint8 N x 3072 array, got {dtype} with shape {shape}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {label_key!r} has shape {labels.shape}")
    check_labels(torch.from_numpy(labels), num_classes, str(path))
    return data, labels


def read_cifar(
    name: Literal["cifar10", "cifar100"],
    data_dir: str | Path | None = None,
    split: Literal["train", "test"] = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of CIFAR-10 or CIFAR-100 (python pickle version).

    Args:
        name: ``'cifar10'`` or ``'cifar100'`` (fine labels).
        data_dir: the extracted directory or its parent; see :func:`find_cifar_dir`.
        split: ``'train'`` (50000 samples) or ``'test'`` (10000).

    Returns:
        ``(images, labels)``: ``uint8`` ``N x 3 x 32 x 32`` and ``int64`` ``N``.
    """
    layout = _layout(name)
    if split not in layout.files:
        raise ConfigError(f"unknown split {split!r}; valid: train, test")
    directory = find_cifar_dir(name, data_dir)
    datas, labels = [], []
    for file_name in layout.files[split]:
        d, lab = _load_batch(directory / file_name, layout.label_key, layout.num_classes)
        datas.append(d)
        labels.append(lab)
    data = np.concatenate(datas) if len(datas) > 1 else datas[0]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(np.concatenate(labels))


def _safe_extract(archive: Path, target: Path) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
            return
        for member in tar.getmembers():  # pragma: no cover - Python without extraction filters
            member_path = Path(member.name)
            unsafe = member_path.is_absolute() or ".." in member_path.parts
            if unsafe or not (member.isfile() or member.isdir()):
                raise DataError(f"{archive}: refusing to extract unsafe member {member.name!r}")
        tar.extractall(target)


def download_cifar(
    name: Literal["cifar10", "cifar100"],
    dest: str | Path,
    *,
    url: str | None = None,
    verify: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download and extract CIFAR-10/100 into ``dest`` (needs network; never called implicitly).

    The archive is downloaded atomically to ``dest/<archive name>`` (kept for later re-extraction) and
    checked against the official MD5 when ``verify``; it is extracted into a temporary directory inside
    ``dest`` whose ``cifar-*`` folder is then renamed into place, so ``dest/<folder>`` is either absent or
    complete.  Nothing is done if the extracted folder is already complete; an incomplete one raises
    :class:`~hwquant.errors.DataError` (it is never deleted).

    Returns:
        The extracted directory, e.g. ``dest/cifar-10-batches-py``.
    """
    layout = _layout(name)
    dest = Path(dest)
    final = dest / layout.subdir
    if all((final / f).is_file() for f in layout.all_files):
        return final
    if final.exists():
        raise DataError(f"{final} exists but is incomplete; remove it and download again")
    source = url if url is not None else layout.url
    archive = download_file(
        source, dest / source.rsplit("/", 1)[-1], layout.md5 if verify else None, timeout=timeout
    )
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{layout.subdir}."))
    try:
        try:
            _safe_extract(archive, tmp)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{archive}: cannot extract ({exc})") from exc
        extracted = tmp / layout.subdir
        if not all((extracted / f).is_file() for f in layout.all_files):
            wanted = ", ".join(layout.all_files)
            raise DataError(f"{archive}: does not contain {layout.subdir}/ with {wanted}")
        extracted.replace(final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return final
