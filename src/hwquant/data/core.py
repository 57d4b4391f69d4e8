"""In-memory dataset containers, dataset metadata and input validation.

Every dataset in :mod:`hwquant.data` is small enough to live in memory as two tensors:

* ``images``: ``torch.uint8``, shape ``N x C x H x W``, values ``0..255``;
* ``labels``: ``torch.int64``, shape ``N``, values ``0..num_classes-1``.

Keeping images as uint8 makes them 4x smaller than float32 and finite by construction; conversion to
normalized float32 happens per batch in :class:`hwquant.data.loader.BatchLoader`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hwquant.errors import ConfigError, DataError

__all__ = [
    "AugmentSpec",
    "DatasetInfo",
    "TensorData",
    "as_float_tuple",
    "channel_stats",
    "check_labels",
    "derive_seed",
]


@dataclass(frozen=True, eq=False)
class TensorData:
    """A labelled image set held in memory.

    Attributes:
        images: ``torch.uint8`` tensor of shape ``N x C x H x W``.
        labels: ``torch.int64`` tensor of shape ``N``.

    The constructor checks dtypes, ranks and that both tensors have the same ``N``, and raises
    :class:`~hwquant.errors.DataError` otherwise.  Use :meth:`from_arrays` to build one from numpy
    arrays or float images in ``[0, 1]``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise DataError("TensorData needs torch tensors; use TensorData.from_arrays for numpy arrays")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"TensorData images must be a uint8 N x C x H x W tensor, got {self.images.dtype} "
                f"of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(
                f"TensorData labels must be an int64 vector, got {self.labels.dtype} "
                f"of shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DataError(f"TensorData has {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return int(c), int(h), int(w)

    def subset(self, indices: torch.Tensor) -> TensorData:
        """Return the samples at ``indices`` (an int64 vector) as a new :class:`TensorData` (a copy)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return TensorData(self.images.index_select(0, indices), self.labels.index_select(0, indices))

    @classmethod
    def from_arrays(cls, images: Any, labels: Any) -> TensorData:
        """Build a :class:`TensorData` from numpy arrays or tensors, validating them.

        Args:
            images: ``N x C x H x W`` or ``N x H x W`` (one channel is added) array.  Either an integer
                array with values in ``0..255`` (kept as is), or a floating array with values in
                ``[0, 1]``, converted by ``uint8(round(255 * x))``.
            labels: length-``N`` vector of non-negative integers (integral floats are accepted).

        Raises:
            DataError: wrong rank, mismatched lengths, NaN/inf values, values out of range, or
                non-integral labels.
        """
        img = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        img = img.detach().cpu()
        lab = lab.detach().cpu()
        if img.dim() == 3:
            img = img.unsqueeze(1)
        if img.dim() != 4:
            raise DataError(f"images must be N x C x H x W or N x H x W, got shape {tuple(img.shape)}")
        if img.dtype == torch.bool or img.is_complex():
            raise DataError(f"images must be uint8/integer in 0..255 or float in [0, 1], got {img.dtype}")
        if img.is_floating_point():
            finite = torch.isfinite(img)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise DataError(f"images contain {bad} NaN or inf value(s)")
            if img.numel() and (float(img.min()) < 0.0 or float(img.max()) > 1.0):
                raise DataError(
                    f"float images must lie in [0, 1], got range [{float(img.min()):g}, {float(img.max()):g}]"
                )
            img = (img.to(torch.float32) * 255.0).round_().to(torch.uint8)
        elif img.dtype != torch.uint8:
            if img.numel() and (int(img.min()) < 0 or int(img.max()) > 255):
                raise DataError(
                    f"integer images must lie in 0..255, got range [{int(img.min())}, {int(img.max())}]"
                )
            img = img.to(torch.uint8)
        if lab.dim() != 1:
            raise DataError(f"labels must be a vector, got shape {tuple(lab.shape)}")
        if lab.dtype == torch.bool or lab.is_complex():
            raise DataError(f"labels must be integers, got {lab.dtype}")
        if lab.is_floating_point():
            if not bool(torch.isfinite(lab).all()):
                raise DataError("labels contain NaN or inf")
            if not bool((lab == lab.round()).all()):
                raise DataError("labels must be integers, got non-integral float values")
        lab = lab.to(torch.int64)
        if lab.numel() and int(lab.min()) < 0:
            raise DataError(f"labels must be non-negative, got minimum {int(lab.min())}")
        if img.shape[0] != lab.shape[0]:
            raise DataError(f"got {img.shape[0]} images but {lab.shape[0]} labels")
        return cls(img.contiguous(), lab.contiguous())


@dataclass(frozen=True)
class AugmentSpec:
    """Parameters of the training augmentation (applied in uint8 space, before normalization).

    Attributes:
        padding: zero-pad each side by this many pixels, then crop a random ``H x W`` window
            (``0`` disables the crop).
        hflip: flip each sample horizontally with probability ``hflip_p``.
        hflip_p: flip probability.
    """

    padding: int = 0
    hflip: bool = False
    hflip_p: float = 0.5

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ConfigError(f"augment padding must be >= 0, got {self.padding}")
        if not 0.0 <= self.hflip_p <= 1.0:
            raise ConfigError(f"augment hflip_p must lie in [0, 1], got {self.hflip_p}")

    @property
    def enabled(self) -> bool:
        """Whether this spec changes anything."""
        return self.padding > 0 or (self.hflip and self.hflip_p > 0.0)

    def describe(self) -> str:
        """Human-readable summary, e.g. ``'pad 4 + random crop + horizontal flip (p=0.5)'`` or ``'none'``."""
        parts = []
        if self.padding > 0:
            parts.append(f"pad {self.padding} + random crop")
        if self.hflip and self.hflip_p > 0.0:
            parts.append(f"horizontal flip (p={self.hflip_p:g})")
        return " + ".join(parts) if parts else "none"


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a dataset.

    Attributes:
        name: canonical dataset name (``'fashion_mnist'``, ``'cifar10'``, ``'cifar100'``, ``'digits'``,
            ``'synthetic'``).
        in_channels: ``C``.
        num_classes: number of classes; labels lie in ``[0, num_classes)``.
        image_size: ``(H, W)``.
        mean: per-channel mean of the training images in ``[0, 1]`` units.
        std: per-channel (population) standard deviation in ``[0, 1]`` units.
        source: where the data came from (a directory, ``'sklearn load_digits'``, ...).
        augment: description of the default training augmentation.
    """

    name: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    augment: str


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and population std of uint8 images, in ``[0, 1]`` units.

    Uses a 256-bin histogram per channel, so the cost is one pass over the data with no float copy:
    with ``h_c[v]`` the count of value ``v`` in channel ``c`` and ``n_c = sum_v h_c[v]``,
    ``mean_c = sum_v v h_c[v] / (255 n_c)`` and ``std_c = sqrt(sum_v v^2 h_c[v] / (255^2 n_c) - mean_c^2)``.
    A channel with zero variance gets ``std = 1`` so that normalization never divides by zero.

    Args:
        images: ``uint8`` tensor ``N x C x H x W`` with ``N >= 1``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(
            f"channel_stats needs uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise DataError("channel_stats needs at least one image")
    values = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        n = hist.sum()
        mean = float((hist * values).sum() / n)
        var = max(float((hist * values**2).sum() / n) - mean * mean, 0.0)
        std = float(np.sqrt(var))
        means.append(mean)
        stds.append(std if std > 0.0 else 1.0)
    return tuple(means), tuple(stds)


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Raise :class:`DataError` naming ``where`` unless every label lies in ``[0, num_classes)``."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: label {bad} out of range [0, {num_classes})")


def derive_seed(*keys: int) -> int:
    """Mix non-negative integers into one 63-bit seed for ``torch.Generator.manual_seed``.

    Uses :class:`numpy.random.SeedSequence`, so ``derive_seed(s, e, 0)`` and ``derive_seed(s, e, 1)``
    give independent streams and nearby seeds give unrelated streams.
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def as_float_tuple(values: Sequence[float], what: str) -> tuple[float, ...]:
    """Convert a per-channel sequence to a tuple of floats (helper for validation messages)."""
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be a sequence of numbers, got {values!r}") from exc
