"""Dataset names, loading, the Fashion-MNIST -> digits fallback, and train/calib/test loaders.

``folder`` is a user's image-folder dataset (one subfolder per class, see :mod:`hwquant.data.folder`).

Normalization constants (:attr:`DatasetInfo.mean` / ``std``) are computed exactly from the *whole*
training split (before the calibration hold-out) at load time, see
:func:`hwquant.data.core.channel_stats`; this takes well under a second even for CIFAR.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hwquant.data import idx as _idx
from hwquant.data.cifar import CIFAR_LAYOUT, find_cifar_dir, read_cifar
from hwquant.data.core import AugmentSpec, DatasetInfo, TensorData, channel_stats, check_labels, derive_seed
from hwquant.data.digits import read_digits
from hwquant.data.folder import find_image_folder, parse_image_size, read_image_folder
from hwquant.data.idx import find_fashion_mnist_dir, read_fashion_mnist
from hwquant.data.loader import BatchLoader
from hwquant.data.synthetic import SyntheticConfig, make_synthetic
from hwquant.errors import ConfigError, DataError

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_AUGMENT",
    "Loaders",
    "canonical_name",
    "default_augment",
    "default_calibration",
    "load_dataset",
    "make_loaders",
    "resolve_dataset",
    "split_calibration",
    "split_record",
]

#: Valid dataset names, in the order shown in error messages.
DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "digits", "synthetic", "folder")

#: Default training augmentation per dataset (digits are not mirror-symmetric, so no flip).
DEFAULT_AUGMENT: dict[str, AugmentSpec] = {
    "fashion_mnist": AugmentSpec(padding=2, hflip=True),
    "cifar10": AugmentSpec(padding=4, hflip=True),
    "cifar100": AugmentSpec(padding=4, hflip=True),
    "digits": AugmentSpec(padding=1, hflip=False),
    "synthetic": AugmentSpec(),
    # folder: see default_augment (the padding scales with the image size; no flip, which would be wrong
    # for text, digits and other mirror-asymmetric images)
}

#: Held-out calibration images when none are asked for (the small digits set keeps fewer) ...
DEFAULT_CALIB: dict[str, int] = {"digits": 200}
DEFAULT_CALIB_SIZE = 1000
#: ... and at most this fraction of the training split (a folder's size is unknown until it is read).
DEFAULT_CALIB_FRACTION: dict[str, float] = {"folder": 0.1}
_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "digits": 10}
_CALIB_STREAM = 0xCA11B


def canonical_name(name: str) -> str:
    """Lower-case ``name`` with ``-`` as ``_`` (``'Fashion-MNIST'`` -> ``'fashion_mnist'``) and check it.

    Raises:
        ConfigError: unknown name, listing the valid ones.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")
    return key


def default_augment(name: str, image_size: tuple[int, int] | None = None) -> AugmentSpec:
    """The default training augmentation of dataset ``name`` (see :data:`DEFAULT_AUGMENT`).

    ``folder``: pad ``max(1, min(H, W) // 8)`` pixels + random crop (4 at 32 x 32), no flip; ``image_size``
    ``(H, W)`` defaults to 32 x 32.
    """
    key = canonical_name(name)
    if key == "folder":
        h, w = image_size if image_size is not None else (32, 32)
        return AugmentSpec(padding=max(1, min(h, w) // 8), hflip=False)
    return DEFAULT_AUGMENT[key]


def resolve_dataset(
    name: str, data_dir: str | Path | None = None, fallback: bool = True
) -> tuple[str, str | None]:
    """Decide which dataset will actually be used.

    For ``fashion_mnist`` whose files are missing from the default location: with ``fallback`` return
    ``('digits', message)``, else raise.  An explicit ``data_dir`` never falls back: a directory the user
    named that does not hold the files is an error.  Only *missing* files trigger the fallback; corrupt
    files raise later in :func:`load_dataset`.  CIFAR and ``folder`` have no fallback: a missing or invalid
    directory raises :class:`DataError` here already (for ``folder``: no class subfolders, a class without
    images, ...; the images are decoded later, by :func:`load_dataset`).  ``digits`` and ``synthetic`` need no files.

    Returns:
        ``(name_used, message)``: the canonical name to load and a one-line explanation of the
        fallback, or ``None`` if there was none.

    Raises:
        ConfigError: unknown name.
        DataError: files missing (naming the path) and no fallback.
    """
    key = canonical_name(name)
    if key == "fashion_mnist":
        try:
            find_fashion_mnist_dir(data_dir)
        except DataError:
            if not fallback or data_dir is not None:
                raise
            return "digits", (f"Fashion-MNIST not found under {_idx.DEFAULT_FASHION_MNIST_DIR}; falling back to "
                              "scikit-learn digits")
    elif key in CIFAR_LAYOUT:
        find_cifar_dir(key, data_dir)  # type: ignore[arg-type]
    elif key == "folder":
        find_image_folder(data_dir)
    return key, None


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    synthetic: SyntheticConfig | None = None,
    image_size: tuple[int, int] | str | int | None = None,
) -> tuple[TensorData, TensorData, DatasetInfo]:
    """Load the train and test splits of a dataset into memory.

    Args:
        name: one of :data:`DATASET_NAMES` (case-insensitive, ``-`` or ``_``).
        data_dir: ``fashion_mnist``: directory of the IDX files (default
            ``/usr/share/datasets/fashion-mnist``); ``cifar10``/``cifar100``: the extracted directory or
            its parent (default ``./data``); ``folder``: the image folder (required); ignored for ``digits``
            and ``synthetic``.
        seed: seed of the ``synthetic`` data (ignored by the file-based datasets and ``digits``, whose
            test split is fixed; the ``folder`` split has its own fixed seed).
        synthetic: shape/difficulty of the ``synthetic`` set (default :class:`SyntheticConfig()`).
        image_size: ``folder`` only: resize every image to this ``(H, W)`` (or ``N`` / ``"HxW"``); default
            the most common size among the images.

    Returns:
        ``(train, test, info)``.  No fallback happens here; see :func:`resolve_dataset`.

    Raises:
        ConfigError: unknown name.
        DataError: missing or malformed files, labels outside ``[0, num_classes)``, or train/test images
            of different shapes.
    """
    key = canonical_name(name)
    size = parse_image_size(image_size)
    if size is not None and key != "folder":
        raise ConfigError(f"image_size applies to the folder dataset only, not {key}")
    if key == "fashion_mnist":
        directory = find_fashion_mnist_dir(data_dir)
        train = read_fashion_mnist(directory, "train")
        test = read_fashion_mnist(directory, "test")
        source = str(directory)
        num_classes = _NUM_CLASSES[key]
    elif key in CIFAR_LAYOUT:
        directory = find_cifar_dir(key, data_dir)  # type: ignore[arg-type]
        train = read_cifar(key, directory, "train")  # type: ignore[arg-type]
        test = read_cifar(key, directory, "test")  # type: ignore[arg-type]
        source = str(directory)
        num_classes = _NUM_CLASSES[key]
    elif key == "folder":
        layout = find_image_folder(data_dir)
        train, test, size = read_image_folder(layout, size)
        source = str(layout.root)
        num_classes = len(layout.classes)
    elif key == "digits":
        train = read_digits("train")
        test = read_digits("test")
        source = "sklearn load_digits"
        num_classes = _NUM_CLASSES[key]
    else:
        cfg = synthetic if synthetic is not None else SyntheticConfig()
        train = make_synthetic(cfg, seed=seed, split="train")
        test = make_synthetic(cfg, seed=seed, split="test")
        source = f"synthetic({cfg}, seed={seed})"
        num_classes = cfg.num_classes
    train_data = TensorData(*train)
    test_data = TensorData(*test)
    if len(train_data) == 0 or len(test_data) == 0:
        raise DataError(f"{source}: empty split ({len(train_data)} train, {len(test_data)} test samples)")
    if train_data.image_shape != test_data.image_shape:
        raise DataError(
            f"{source}: train images are {train_data.image_shape} but test images are {test_data.image_shape}"
        )
    check_labels(train_data.labels, num_classes, f"{source} (train)")
    check_labels(test_data.labels, num_classes, f"{source} (test)")
    mean, std = channel_stats(train_data.images)
    c, h, w = train_data.image_shape
    info = DatasetInfo(
        name=key,
        in_channels=c,
        num_classes=num_classes,
        image_size=(h, w),
        mean=mean,
        std=std,
        source=source,
        augment=default_augment(key, (h, w)).describe(),
    )
    return train_data, test_data, info


def split_calibration(n: int, calib_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold ``calib_size`` of ``n`` training indices out for calibration.

    ``perm = randperm(n)`` from a generator seeded by ``derive_seed(seed, 0xCA11B)``; the calibration
    indices are ``sorted(perm[:calib_size])`` and the training indices ``sorted(perm[calib_size:])``.  The
    sets are disjoint, cover ``0..n-1``, depend only on ``(n, seed)`` for the order, and a smaller
    ``calib_size`` gives a subset of a larger one's calibration set.
    """
    if not 0 <= calib_size <= n:
        raise ConfigError(f"calib_size must lie in [0, {n}], got {calib_size}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    g = torch.Generator().manual_seed(derive_seed(seed, _CALIB_STREAM))
    perm = torch.randperm(n, generator=g)
    return perm[:calib_size].sort().values, perm[calib_size:].sort().values


@dataclass(frozen=True, eq=False)
class Loaders:
    """The loaders of one run.

    Attributes:
        train: shuffled, augmented (if requested), sharded by rank; call ``train.set_epoch(e)``.
        calib: the held-out calibration samples, in index order, never augmented, full on every rank;
            ``None`` when ``calib_size == 0``.
        test: the test split, in order, never augmented, full on every rank.
        info: metadata of the dataset actually loaded (``info.name`` is ``'digits'`` after a fallback).
        message: the fallback message of :func:`resolve_dataset`, or ``None``.
    """

    train: BatchLoader
    calib: BatchLoader | None
    test: BatchLoader
    info: DatasetInfo
    message: str | None
    calib_size: int = 0  #: calibration samples actually held out (see ``max_calib_fraction``)


def make_loaders(
    name: str,
    *,
    data_dir: str | Path | None = None,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    calib_size: int = 1000,
    seed: int = 0,
    augment: bool = True,
    fallback: bool = True,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    drop_last: bool = True,
    synthetic: SyntheticConfig | None = None,
    image_size: tuple[int, int] | str | int | None = None,
    max_calib_fraction: float | None = None,
) -> Loaders:
    """Load a dataset and build its train / calibration / test loaders.

    The calibration split is ``calib_size`` training samples held out by :func:`split_calibration` with
    ``seed``; training uses the remaining ``len(train) - calib_size``.  The train loader shuffles with
    ``seed`` and applies :func:`default_augment` when ``augment``; it drops the last incomplete batch when
    ``drop_last`` (default, avoids a tiny last batch upsetting BatchNorm).  Only the train loader is sharded
    by ``rank`` / ``world_size``; calibration and test loaders are complete on every rank.  All loaders
    normalize with ``info.mean`` / ``info.std``.  ``image_size`` is passed to :func:`load_dataset` (``folder``
    only).  With ``max_calib_fraction``, at most ``max(1, floor(fraction * N))`` samples are held out (for a
    small dataset whose size is not known in advance); ``Loaders.calib_size`` says how many were.

    Raises:
        ConfigError: bad arguments (``batch_size < 1``, ``calib_size`` negative or leaving fewer training
            samples than one batch per rank, ...).
        DataError: see :func:`load_dataset` / :func:`resolve_dataset`.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(eval_batch_size) < 1:
        raise ConfigError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
    if int(calib_size) < 0:
        raise ConfigError(f"calib_size must be >= 0, got {calib_size}")
    if int(seed) < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise ConfigError(
            f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
        )
    used, message = resolve_dataset(name, data_dir, fallback)
    fell_back = used != canonical_name(name)
    train_full, test, info = load_dataset(
        used, None if fell_back else data_dir, seed=seed, synthetic=synthetic, image_size=image_size
    )
    n = len(train_full)
    if max_calib_fraction is not None:
        if not 0.0 < max_calib_fraction < 1.0:
            raise ConfigError(f"max_calib_fraction must be in (0, 1), got {max_calib_fraction}")
        calib_size = min(int(calib_size), max(1, int(max_calib_fraction * n)))
    if calib_size >= n:
        raise ConfigError(
            f"calib_size {calib_size} is too large for {info.name}: its training split has only {n} samples"
        )
    calib_idx, train_idx = split_calibration(n, int(calib_size), int(seed))
    train_data = train_full.subset(train_idx)
    stats = {"mean": info.mean, "std": info.std}
    train = BatchLoader(
        train_data,
        batch_size,
        shuffle=True,
        seed=seed,
        augment=default_augment(info.name, info.image_size) if augment else None,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
        **stats,
    )
    if len(train) == 0:
        raise ConfigError(
            f"no training batch: {len(train_data)} training samples ({n} minus calib_size {calib_size}) "
            f"over world_size {world_size} give {train.num_samples} per rank, "
            f"fewer than batch_size {batch_size}"
        )
    calib = (
        BatchLoader(train_full.subset(calib_idx), eval_batch_size, channels_last=channels_last, **stats)
        if calib_size > 0
        else None
    )
    test_loader = BatchLoader(test, eval_batch_size, channels_last=channels_last, **stats)
    return Loaders(train=train, calib=calib, test=test_loader, info=info, message=message,
                   calib_size=int(calib_size))


def default_calibration(name: str, calib_size: int | None) -> tuple[int, float | None]:
    """``(calib_size, max_calib_fraction)`` for :func:`make_loaders`: the given size, or the dataset's default
    (:data:`DEFAULT_CALIB`, else :data:`DEFAULT_CALIB_SIZE`, capped at :data:`DEFAULT_CALIB_FRACTION`)."""
    if calib_size is not None:
        return calib_size, None
    key = canonical_name(name)
    return DEFAULT_CALIB.get(key, DEFAULT_CALIB_SIZE), DEFAULT_CALIB_FRACTION.get(key)


def split_record(info: DatasetInfo, data_dir: str | None, calib_size: int, seed: int) -> dict:
    """The ``data`` entry of a checkpoint: what rebuilds the same train / calibration / test splits later
    (``make_loaders(d["dataset"], data_dir=d["data_dir"], calib_size=d["calib_size"], seed=d["seed"],
    image_size=d.get("image_size"))``).  A folder dataset records its resolved directory and image size (the
    images are resized when read, so another size would give other inputs)."""
    meta = {"dataset": info.name, "data_dir": data_dir, "calib_size": calib_size, "seed": seed,
            "source": info.source}
    if info.name == "folder":
        meta.update(data_dir=info.source, image_size=list(info.image_size))
    return meta
