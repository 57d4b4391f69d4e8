"""Datasets, transforms and whole-batch loaders for hwquant.

Datasets live in memory as uint8 image tensors (``N x C x H x W``) and int64 labels
(:class:`TensorData`).  :func:`make_loaders` is the usual entry point::

    loaders = make_loaders("fashion_mnist", batch_size=128, calib_size=1000, seed=0)
    if loaders.message:           # Fashion-MNIST missing -> scikit-learn digits
        print(loaders.message)
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        for x, y in loaders.train:  # x: float32 B x C x H x W normalized, y: int64 B
            ...

Readers: :func:`read_idx_images`, :func:`read_idx_labels`, :func:`read_fashion_mnist`, :func:`read_cifar`,
:func:`read_digits`, :func:`make_synthetic`, :func:`read_image_folder` (a user's image folder, one subfolder
per class: ``make_loaders("folder", data_dir=DIR)``).  Downloads (network, never called implicitly):
:func:`download_fashion_mnist`, :func:`download_cifar`.
"""

from hwquant.data.cifar import DEFAULT_DATA_ROOT, download_cifar, find_cifar_dir, read_cifar
from hwquant.data.core import AugmentSpec, DatasetInfo, TensorData, channel_stats, check_labels, derive_seed
from hwquant.data.digits import read_digits
from hwquant.data.folder import IMAGE_SUFFIXES, FolderLayout, find_image_folder, parse_image_size, read_image_folder
from hwquant.data.idx import (
    DEFAULT_FASHION_MNIST_DIR,
    download_fashion_mnist,
    find_fashion_mnist_dir,
    read_fashion_mnist,
    read_idx_images,
    read_idx_labels,
)
from hwquant.data.loader import BatchLoader
from hwquant.data.registry import (
    DATASET_NAMES,
    DEFAULT_AUGMENT,
    Loaders,
    canonical_name,
    default_augment,
    default_calibration,
    load_dataset,
    make_loaders,
    resolve_dataset,
    split_calibration,
    split_record,
)
from hwquant.data.synthetic import SyntheticConfig, make_synthetic
from hwquant.data.transforms import crop_at, hflip_where, normalize, random_crop, random_hflip, take_windows

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_AUGMENT",
    "DEFAULT_DATA_ROOT",
    "DEFAULT_FASHION_MNIST_DIR",
    "IMAGE_SUFFIXES",
    "AugmentSpec",
    "BatchLoader",
    "DatasetInfo",
    "FolderLayout",
    "Loaders",
    "SyntheticConfig",
    "TensorData",
    "canonical_name",
    "channel_stats",
    "check_labels",
    "crop_at",
    "default_augment",
    "default_calibration",
    "derive_seed",
    "download_cifar",
    "download_fashion_mnist",
    "find_cifar_dir",
    "find_fashion_mnist_dir",
    "find_image_folder",
    "hflip_where",
    "load_dataset",
    "make_loaders",
    "make_synthetic",
    "normalize",
    "parse_image_size",
    "random_crop",
    "random_hflip",
    "read_cifar",
    "read_digits",
    "read_fashion_mnist",
    "read_image_folder",
    "read_idx_images",
    "read_idx_labels",
    "resolve_dataset",
    "split_calibration",
    "split_record",
    "take_windows",
]
