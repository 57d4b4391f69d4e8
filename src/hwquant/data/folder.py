"""An image-folder dataset: one subfolder per class, images read with Pillow.

Layout (``DIR`` is ``--data-dir``)::

    DIR/cat/001.png  DIR/cat/002.jpg  DIR/dog/...            one split: divided into train and test here
    DIR/train/cat/...  DIR/test/cat/...  (or DIR/val/...)      two splits, as given

* **Classes**: the subfolders of ``DIR`` (or ``DIR/train``), sorted by name; class ``i`` is the ``i``-th name.
  Hidden entries (``.name``) and plain files beside the class folders are ignored.  Test class folders must
  be training class names (a class may lack test images).
* **Images**: every file under a class folder (subfolders included) whose suffix is one of
  :data:`IMAGE_SUFFIXES` (any case); other files are ignored.  A class folder without images, or a file
  that Pillow cannot decode, is a :class:`~hwquant.errors.DataError` naming it.
* **Channels**: 1 (Pillow mode ``L``) if every image is grayscale (modes ``1``, ``L``, ``LA``, ``I``,
  ``I;16``..., or a palette of grays), else 3 (``RGB``; alpha is dropped).  16-bit images are scaled to
  8 bits (``v / 257``, rounded).
* **Size**: every image is resized (bilinear) to one ``H x W``: ``image_size`` if given, else the most common
  size among all the images (ties: the larger, then the taller).
* **Split** (one-split layout): per class, ``round(test_fraction * n)`` images (at least 1 when the class
  has 2 or more) go to the test split, drawn from the class's sorted file list by a permutation with a
  fixed seed, so the split depends only on the file names, never on a run's ``--seed`` (a QAT run with
  another seed cannot train on test images).

Everything is decoded into memory as uint8, like the other datasets: meant for sets that fit in RAM.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hwquant.data.core import derive_seed
from hwquant.errors import ConfigError, DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "TEST_FRACTION",
    "FolderLayout",
    "find_image_folder",
    "parse_image_size",
    "read_image_folder",
]

#: File suffixes read as images (compared in lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

#: Fraction of each class's images held out for the test split when ``DIR`` has no train/test subfolders.
TEST_FRACTION = 0.2

_SPLIT_STREAM = 0xF01DE5
_GRAY_MODES = {"1", "L", "LA", "F"}


@dataclass(frozen=True)
class FolderLayout:
    """The files of an image-folder dataset (found by :func:`find_image_folder`, nothing decoded yet).

    Attributes:
        root: the dataset directory (absolute).
        classes: class names, sorted; label ``i`` is ``classes[i]``.
        train: ``(path, label)`` of every training image, in class then path order.
        test: ``(path, label)`` of every test image.
        split: ``'folders'`` (``train/`` and ``test/`` or ``val/`` given) or ``'seeded'`` (divided here).
    """

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    test: tuple[tuple[Path, int], ...]
    split: str


def parse_image_size(value: str | int | tuple[int, int] | list[int] | None) -> tuple[int, int] | None:
    """``None``; ``32`` or ``"32"`` -> ``(32, 32)``; ``"28x32"``, ``"28,32"``, ``(28, 32)`` -> ``(28, 32)`` (H, W).

    Raises:
        ConfigError: anything else, or a side below 1.
    """
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        parts = list(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    else:
        text = str(value).strip().lower().replace("x", ",")
        parts = [p.strip() for p in text.split(",")]
    try:
        sides = [int(p) for p in parts]
    except (TypeError, ValueError):
        raise ConfigError(f"image_size must be N, HxW or H,W (pixels), got {value!r}") from None
    if len(sides) == 1:
        sides = sides * 2
    if len(sides) != 2 or min(sides) < 1:
        raise ConfigError(f"image_size must be N, HxW or H,W with positive sides, got {value!r}")
    return sides[0], sides[1]


def _visible_dirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(Path(dirpath) / name)
    return found


def _class_files(split_dir: Path, what: str) -> dict[str, list[Path]]:
    class_dirs = _visible_dirs(split_dir)
    if not class_dirs:
        raise DataError(f"{what} {split_dir} has no class subfolders (expected {split_dir}/<class>/<image files>)")
    files = {}
    for d in class_dirs:
        images = _images_under(d)
        if not images:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files[d.name] = images
    return files


def _seeded_split(files: list[Path], test_fraction: float) -> tuple[list[Path], list[Path]]:
    n = len(files)
    k = int(round(test_fraction * n))
    if n >= 2:
        k = min(max(k, 1), n - 1)
    else:
        k = 0
    g = torch.Generator().manual_seed(derive_seed(_SPLIT_STREAM, n))
    perm = torch.randperm(n, generator=g).tolist()
    test = sorted(perm[:k])
    test_set = set(test)
    return [files[i] for i in range(n) if i not in test_set], [files[i] for i in test]


def find_image_folder(data_dir: str | Path | None, test_fraction: float = TEST_FRACTION) -> FolderLayout:
    """Find the classes and image files of an image-folder dataset (see the module docstring).

    Raises:
        ConfigError: ``data_dir`` not given.
        DataError: ``data_dir`` missing or not a directory, no class subfolders, a class folder without
            images, a ``train/`` folder without ``test/`` or ``val/``, test classes unknown to training, or a
            split left empty.
    """
    if data_dir is None:
        raise ConfigError("dataset 'folder' needs data_dir: a directory with one subfolder of images per class")
    root = Path(data_dir).expanduser().resolve()
    if not root.exists():
        raise DataError(f"image folder dataset not found: {root}")
    if not root.is_dir():
        raise DataError(f"image folder dataset {root} is not a directory")
    try:
        names = {p.name for p in _visible_dirs(root)}
        if "train" in names:
            test_name = "test" if "test" in names else "val" if "val" in names else None
            if test_name is None:
                raise DataError(f"{root} has a train/ folder but no test/ or val/ folder beside it")
            train_files = _class_files(root / "train", "training folder")
            test_files = _class_files(root / test_name, "test folder")
            unknown = sorted(set(test_files) - set(train_files))
            if unknown:
                raise DataError(f"{root / test_name} has class folder {unknown[0]!r} that {root / 'train'} lacks")
            split = "folders"
        else:
            per_class = _class_files(root, "image folder dataset")
            train_files, test_files = {}, {}
            for name, files in per_class.items():
                train_files[name], test_files[name] = _seeded_split(files, test_fraction)
            split = "seeded"
    except OSError as e:
        raise DataError(f"cannot read image folder dataset {root}: {e.strerror or e}") from None
    classes = tuple(sorted(train_files))
    label = {c: i for i, c in enumerate(classes)}
    train = tuple((p, label[c]) for c in classes for p in train_files[c])
    test = tuple((p, label[c]) for c in sorted(test_files) for p in test_files[c])
    if not test:
        raise DataError(f"{root}: too few images for a test split (give every class 2 or more images, "
                        "or train/ and test/ folders)")
    return FolderLayout(root=root, classes=classes, train=train, test=test, split=split)


def _decode(path: Path) -> np.ndarray:
    """The image at ``path`` as uint8: ``H x W`` if grayscale (see the module docstring), else ``H x W x 3``."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode.startswith("I;16") or mode == "I":  # 16-bit data: scale to 8 bits
                return np.clip(np.rint(np.asarray(img, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
            if mode in _GRAY_MODES:
                return np.asarray(img.convert("L"), dtype=np.uint8)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # Pillow raises many types for a truncated or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read image {path}: {first[:200]}") from None
    if mode in ("P", "PA") and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])  # a palette of grays
    return rgb


def _resized(arr: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """``C x H x W``: ``arr`` with ``channels`` channels (gray repeated for RGB), resized (bilinear) to ``size``."""
    from PIL import Image

    if channels == 3 and arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    h, w = size
    if arr.shape[:2] != (h, w):
        arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image_folder(
    layout: FolderLayout, image_size: tuple[int, int] | None = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
    """Decode every image of ``layout`` (each file once).

    Returns:
        ``((train_images, train_labels), (test_images, test_labels), (H, W))``: uint8 ``N x C x H x W`` and
        int64 labels; ``C`` is 1 if every image is grayscale, else 3.

    Raises:
        DataError: an image Pillow cannot decode (naming the file).
    """
    entries = list(layout.train) + list(layout.test)
    decoded = [_decode(p) for p, _ in entries]
    channels = 1 if all(a.ndim == 2 for a in decoded) else 3
    if image_size is None:
        sizes = Counter(a.shape[:2] for a in decoded)  # (H, W)
        image_size = min(sizes, key=lambda hw: (-sizes[hw], -hw[0] * hw[1], -hw[0], -hw[1]))
    x = torch.from_numpy(np.stack([_resized(a, channels, image_size) for a in decoded]))
    y = torch.tensor([label for _, label in entries], dtype=torch.int64)
    n = len(layout.train)
    return (x[:n], y[:n]), (x[n:], y[n:]), (int(image_size[0]), int(image_size[1]))
