"""scikit-learn's bundled 8x8 handwritten digits (no download needed).

``sklearn.datasets.load_digits`` gives 1797 images of ``8 x 8`` pixels with integer values ``0..16``.
They are scaled to uint8 by ``v -> floor(v * 255 / 16 + 0.5)`` (so 0 -> 0, 16 -> 255) and split without
shuffling, like ``train_test_split(test_size=0.2, shuffle=False)``: the first 1437 samples are the
training set and the last 360 the test set.  The split is fixed (independent of any seed), and each
class has 33-37 test samples.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch

from hwquant.errors import ConfigError

__all__ = ["DIGITS_NUM_TEST", "read_digits"]

#: Size of the test split: ``ceil(0.2 * 1797)``.
DIGITS_NUM_TEST = 360


@functools.lru_cache(maxsize=1)
def _digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.floor(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0) + 0.5).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def read_digits(split: Literal["train", "test"] = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Read one split of the scikit-learn digits.

    Returns:
        ``(images, labels)``: ``uint8`` ``N x 1 x 8 x 8`` (``N = 1437`` train, ``360`` test) and ``int64``
        labels in ``0..9``.  Fresh tensors on every call.
    """
    images, labels = _digits_uint8()
    n_train = images.shape[0] - DIGITS_NUM_TEST
    if split == "train":
        sl = slice(0, n_train)
    elif split == "test":
        sl = slice(n_train, None)
    else:
        raise ConfigError(f"unknown split {split!r}; valid: train, test")
    return torch.from_numpy(images[sl].copy()).unsqueeze(1), torch.from_numpy(labels[sl].copy())
