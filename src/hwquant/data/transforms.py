"""Batch transforms: pure tensor ops, vectorised over the batch, randomness from an explicit generator.

All functions take ``N x C x H x W`` batches.  The geometric ones (:func:`random_crop`,
:func:`random_hflip`) work on any dtype and are meant to run on uint8 images before :func:`normalize`,
so zero padding means black pixels.  Each random transform is split into a draw (from a
:class:`torch.Generator`) and a deterministic application (:func:`crop_at`, :func:`hflip_where`), which
lets :class:`~hwquant.data.loader.BatchLoader` draw a whole epoch's augmentation at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hwquant.data.core import as_float_tuple
from hwquant.errors import ConfigError

__all__ = ["crop_at", "hflip_where", "normalize", "random_crop", "random_hflip", "take_windows"]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel normalization to float32.

    ``out[n, c] = (x[n, c] / 255 - mean[c]) / std[c]`` for uint8 input; floating input is taken to be in
    ``[0, 1]`` already (``out = (x - mean) / std``).  Computed as ``x * a_c - b_c`` with
    ``a_c = 1 / (255 std_c)`` and ``b_c = mean_c / std_c`` (float32), which keeps the memory format of ``x``
    (e.g. channels_last).

    Args:
        x: ``N x C x H x W`` uint8 or floating tensor.
        mean, std: ``C`` values each, in ``[0, 1]`` units; ``std`` must be positive.

    Returns:
        float32 tensor of the same shape.
    """
    if x.dim() != 4:
        raise ConfigError(f"normalize expects an N x C x H x W batch, got shape {tuple(x.shape)}")
    m = as_float_tuple(mean, "mean")
    s = as_float_tuple(std, "std")
    channels = x.shape[1]
    if len(m) != channels or len(s) != channels:
        raise ConfigError(f"normalize: {channels} channels but {len(m)} means and {len(s)} stds")
    if any(not v > 0.0 for v in s):
        raise ConfigError(f"normalize: std must be positive, got {s}")
    if x.dtype == torch.uint8:
        scale = 1.0 / 255.0
    elif x.is_floating_point():
        scale = 1.0
    else:
        raise ConfigError(f"normalize expects uint8 or floating input, got {x.dtype}")
    a = torch.tensor([scale / v for v in s], dtype=torch.float32).view(1, channels, 1, 1)
    b = torch.tensor([mv / sv for mv, sv in zip(m, s, strict=True)], dtype=torch.float32)
    b = b.view(1, channels, 1, 1)
    out = x.to(torch.float32, copy=True)
    return out.mul_(a).sub_(b)


def take_windows(
    source: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Cut a ``height x width`` window per sample at per-sample offsets.

    ``out[n] = source[n, :, top[n] : top[n] + height, left[n] : left[n] + width]``.

    Vectorised as one :func:`torch.gather` over the flattened spatial axis.

    Args:
        source: ``N x C x Hs x Ws`` tensor (any dtype).
        top, left: int64 vectors of length ``N`` with ``0 <= top <= Hs - height`` and
            ``0 <= left <= Ws - width``.
    """
    n, c, hs, ws = source.shape
    if height > hs or width > ws:
        raise ConfigError(f"window {height}x{width} larger than source {hs}x{ws}")
    top = top.to(torch.int64)
    left = left.to(torch.int64)
    if top.shape != (n,) or left.shape != (n,):
        raise ConfigError(f"take_windows: need {n} offsets, got {tuple(top.shape)} and {tuple(left.shape)}")
    if n and (
        int(top.min()) < 0
        or int(top.max()) > hs - height
        or int(left.min()) < 0
        or int(left.max()) > ws - width
    ):
        raise ConfigError("take_windows: offsets out of range")
    rows = torch.arange(height, dtype=torch.int64).view(height, 1) * ws
    cols = torch.arange(width, dtype=torch.int64).view(1, width)
    offsets = (rows + cols).view(1, height * width)  # position of window pixel (i, j) relative to its corner
    index = (top * ws + left).view(n, 1) + offsets  # N x (height*width)
    flat = source.reshape(n, c, hs * ws)
    out = torch.gather(flat, 2, index.view(n, 1, height * width).expand(n, c, height * width))
    return out.view(n, c, height, width)


def crop_at(x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` on each side, then crop back to ``H x W`` at per-sample offsets.

    With ``P`` the padded batch (``P[n, c, i + padding, j + padding] = x[n, c, i, j]``, zeros elsewhere),
    ``out[n, c, i, j] = P[n, c, top[n] + i, left[n] + j]`` for offsets in ``0..2*padding``;
    ``top = left = padding`` is the identity.
    """
    if padding < 0:
        raise ConfigError(f"padding must be >= 0, got {padding}")
    _, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    return take_windows(padded, top, left, h, w)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random-crop augmentation: zero-pad by ``padding`` then crop a random ``H x W`` window per sample.

    Draws ``top = randint(0, 2*padding + 1, (N,))`` then ``left`` likewise from ``generator`` and applies
    :func:`crop_at`.  ``padding = 0`` returns ``x`` unchanged (and draws nothing).
    """
    if padding < 0:
        raise ConfigError(f"padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    n = x.shape[0]
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return crop_at(x, padding, top, left)


def hflip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror the samples where ``mask`` (bool vector of length ``N``) is true along the width axis."""
    if mask.shape != (x.shape[0],):
        raise ConfigError(
            f"hflip_where: mask shape {tuple(mask.shape)} does not match batch size {x.shape[0]}"
        )
    if not bool(mask.any()):
        return x
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each sample horizontally with probability ``p``: ``mask = rand(N, generator) < p``."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"flip probability must lie in [0, 1], got {p}")
    mask = torch.rand(x.shape[0], generator=generator) < p
    return hflip_where(x, mask)
