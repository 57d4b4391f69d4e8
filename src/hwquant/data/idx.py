"""IDX files (MNIST / Fashion-MNIST) and the Fashion-MNIST directory reader.

IDX layout (all integers big-endian): a 4-byte magic ``0x00 0x00 <type> <ndim>`` with type ``0x08``
(unsigned byte), then ``ndim`` uint32 dimension sizes, then ``prod(dims)`` bytes of data.  Images use
magic ``0x00000803`` (``N, H, W``), labels ``0x00000801`` (``N``).  Files may be gzip-compressed; that
is detected from the first two bytes (``1f 8b``), not from the file name.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from hwquant.data._download import download_file
from hwquant.data.core import check_labels
from hwquant.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_URL",
    "download_fashion_mnist",
    "find_fashion_mnist_dir",
    "read_fashion_mnist",
    "read_idx_images",
    "read_idx_labels",
]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
GZIP_MAGIC = b"\x1f\x8b"

#: Where the Debian package ``dataset-fashion-mnist`` installs the four ``.gz`` files.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Official download location (Zalando Research).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: File stems per split: ``(images, labels)``; each may carry a ``.gz`` suffix.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: MD5 of the official ``.gz`` files (the Debian package recompresses them, so its files differ).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = 10


def _read_maybe_gzip(path: Path) -> bytes:
    """Whole file contents, gunzipped when the file starts with the gzip magic ``1f 8b``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def _parse_idx(path: Path, expected_magic: int, expected_ndim: int) -> tuple[tuple[int, ...], np.ndarray]:
    data = _read_maybe_gzip(path)
    header = 4 + 4 * expected_ndim
    if len(data) < 4:
        raise DataError(f"{path}: too short for an IDX file ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise DataError(
            f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if expected_ndim == 3 else 'labels'})"
        )
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{expected_ndim}I", data[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(data) != header + count:
        what = "truncated" if len(data) < header + count else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: dims {'x'.join(map(str, dims))} need {header + count} bytes, "
            f"file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)
    return dims, array


def read_idx_images(path: str | Path) -> torch.Tensor:
    """Read an IDX image file (magic ``0x00000803``, optionally gzipped).

    Returns:
        ``torch.uint8`` tensor ``N x 1 x H x W``.

    Raises:
        DataError: missing file, bad magic, corrupt gzip, or a byte length other than
            ``16 + N*H*W``.
    """
    path = Path(path)
    dims, array = _parse_idx(path, IDX_IMAGES_MAGIC, 3)
    if dims[1] == 0 or dims[2] == 0:
        raise DataError(f"{path}: image size {dims[1]}x{dims[2]} is empty")
    return torch.from_numpy(array.copy()).unsqueeze(1)


def read_idx_labels(path: str | Path) -> torch.Tensor:
    """Read an IDX label file (magic ``0x00000801``, optionally gzipped).

    Returns:
        ``torch.int64`` tensor of length ``N``.

    Raises:
        DataError: missing file, bad magic, corrupt gzip, or a byte length other than ``8 + N``.
    """
    _, array = _parse_idx(Path(path), IDX_LABELS_MAGIC, 1)
    return torch.from_numpy(array.astype(np.int64))


def _find_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _fashion_candidates(root: Path) -> list[Path]:
    return [root, root / "fashion-mnist", root / "fashion_mnist", root / "FashionMNIST" / "raw"]


def find_fashion_mnist_dir(data_dir: str | Path | None = None) -> Path:
    """Locate the directory holding the four Fashion-MNIST IDX files.

    Looks in ``data_dir`` (default :data:`DEFAULT_FASHION_MNIST_DIR`) and in its subdirectories
    ``fashion-mnist/``, ``fashion_mnist/`` and ``FashionMNIST/raw/``.  Each file may be raw or ``.gz``.

    Raises:
        DataError: naming ``data_dir`` and the missing files.
    """
    root = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise DataError(f"Fashion-MNIST directory {root} {problem}")
    stems = [stem for pair in FASHION_MNIST_FILES.values() for stem in pair]
    for candidate in _fashion_candidates(root):
        if candidate.is_dir() and all(_find_file(candidate, stem) for stem in stems):
            return candidate
    missing = [f"{stem}[.gz]" for stem in stems if _find_file(root, stem) is None]
    raise DataError(f"Fashion-MNIST not found under {root}: missing {', '.join(missing)}")


def read_fashion_mnist(
    data_dir: str | Path | None = None, split: Literal["train", "test"] = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of Fashion-MNIST from a directory of IDX files.

    Args:
        data_dir: directory (or a parent, see :func:`find_fashion_mnist_dir`); default
            :data:`DEFAULT_FASHION_MNIST_DIR`.
        split: ``'train'`` (60000 samples) or ``'test'`` (10000 samples, the ``t10k`` files).

    Returns:
        ``(images, labels)``: ``uint8`` ``N x 1 x 28 x 28`` and ``int64`` ``N`` with labels in ``0..9``.
    """
    if split not in FASHION_MNIST_FILES:
        raise ConfigError(f"unknown split {split!r}; valid: train, test")
    directory = find_fashion_mnist_dir(data_dir)
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    image_path = _find_file(directory, image_stem)
    label_path = _find_file(directory, label_stem)
    assert image_path is not None and label_path is not None  # guaranteed by find_fashion_mnist_dir
    images = read_idx_images(image_path)
    labels = read_idx_labels(label_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} labels"
        )
    check_labels(labels, FASHION_MNIST_CLASSES, str(label_path))
    return images, labels


def download_fashion_mnist(
    dest: str | Path, *, base_url: str = FASHION_MNIST_URL, verify: bool = True, timeout: float = 60.0
) -> Path:
    """Download the four Fashion-MNIST ``.gz`` files into ``dest`` (needs network; never called implicitly).

    Each file is written atomically (temporary file + :func:`os.replace`) and, with ``verify``, checked
    against :data:`FASHION_MNIST_MD5`.  Files already present are kept.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`, ready for ``read_fashion_mnist(dest)``.
    """
    dest = Path(dest)
    base = base_url if base_url.endswith("/") else base_url + "/"
    for name, md5 in FASHION_MNIST_MD5.items():
        download_file(base + name, dest / name, md5 if verify else None, timeout=timeout)
    return dest
