"""Whole-batch loader over an in-memory :class:`~hwquant.data.core.TensorData`.

Batches are built by tensor indexing (no per-sample Python code, no worker processes).  Everything
random in an epoch is drawn up front from two generators seeded by ``(seed, epoch)``:

* the permutation: ``perm = randperm(N)`` from ``derive_seed(seed, epoch, 0)`` (identity if not
  shuffling), identical on every rank;
* the augmentation, one draw per *position* of the epoch order: crop offsets ``top, left`` in
  ``0..2*padding`` and flip flags, from ``derive_seed(seed, epoch, 1)``.

Rank ``r`` of ``world_size`` ``W`` takes positions ``r, r + W, r + 2W, ...`` below ``W * floor(N / W)``,
so shards are disjoint, equally long, and together cover all but the last ``N mod W`` positions of the
permutation (a different few samples every epoch).  Position ``k`` gets augmentation draw ``k`` whatever
the batch size or world size, so epoch ``e`` is a deterministic function of ``(seed, e)``: resuming a run
at epoch ``e`` after ``set_epoch(e)`` reproduces the batches bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from hwquant.data.core import AugmentSpec, TensorData, as_float_tuple, derive_seed
from hwquant.data.transforms import crop_at, hflip_where, normalize
from hwquant.errors import ConfigError

__all__ = ["BatchLoader"]

_PERM_STREAM, _AUG_STREAM = 0, 1


class BatchLoader:
    """Iterable over ``(x, y)`` batches of a :class:`TensorData`.

    Each batch: ``x`` float32 ``B x C x H x W`` equal to ``normalize(augment(images[idx]), mean, std)``
    (channels_last memory format if requested), ``y`` int64 ``B`` = ``labels[idx]``.

    Args:
        data: the samples.
        batch_size: samples per batch (``>= 1``); the last batch may be smaller unless ``drop_last``.
        shuffle: visit samples in a fresh random order each epoch (else in index order).
        seed: non-negative base seed of the permutation and augmentation.
        augment: augmentation applied in uint8 space before normalization, or ``None``.
        mean, std: per-channel normalization constants in ``[0, 1]`` units.
        drop_last: drop this rank's last incomplete batch.
        rank, world_size: this process's shard of each epoch (see the module docstring).
        channels_last: return ``x`` in ``torch.channels_last`` memory format.
        max_batches: yield only the first ``max_batches`` batches of each epoch's order (``None``: all); a
            shorter epoch for a short fine-tune (``hwquant qat --steps-per-epoch``).

    Call :meth:`set_epoch` before iterating each epoch (as with ``DistributedSampler``); without it
    every iteration repeats epoch 0's order and augmentation.
    """

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        seed: int = 0,
        augment: AugmentSpec | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        max_batches: int | None = None,
    ) -> None:
        if not isinstance(data, TensorData):
            raise ConfigError(f"BatchLoader needs a TensorData, got {type(data).__name__}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if int(seed) < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        if int(world_size) < 1:
            raise ConfigError(f"world_size must be >= 1, got {world_size}")
        if max_batches is not None and (isinstance(max_batches, bool) or int(max_batches) < 1):
            raise ConfigError(f"max_batches must be >= 1 or None, got {max_batches}")
        if not 0 <= int(rank) < int(world_size):
            raise ConfigError(f"rank must lie in [0, {world_size}), got {rank}")
        self.mean = as_float_tuple(mean, "mean")
        self.std = as_float_tuple(std, "std")
        channels = data.image_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(
                f"data has {channels} channel(s) but mean/std have {len(self.mean)}/{len(self.std)} values"
            )
        if any(not s > 0.0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = augment if augment is not None and augment.enabled else None
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.channels_last = bool(channels_last)
        self.max_batches = None if max_batches is None else int(max_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        if int(epoch) < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch, before ``drop_last``: ``floor(N / world_size)``."""
        return len(self.data) // self.world_size

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        n = self.num_samples // self.batch_size if self.drop_last else math.ceil(self.num_samples / self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """Sample indices this rank visits in ``epoch`` (default: the current one), in order."""
        perm = self._permutation(self.epoch if epoch is None else int(epoch))
        return perm.index_select(0, self._positions())

    def _permutation(self, epoch: int) -> torch.Tensor:
        n = len(self.data)
        if not self.shuffle:
            return torch.arange(n, dtype=torch.int64)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _PERM_STREAM))
        return torch.randperm(n, generator=g)

    def _positions(self) -> torch.Tensor:
        used = self.num_samples * self.world_size
        return torch.arange(self.rank, used, self.world_size, dtype=torch.int64)

    def _augment_draws(self, epoch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-position crop offsets (``2 x N``: top, left) and flip flags (``N``) for the whole epoch."""
        spec = self.augment
        if spec is None:
            return None, None
        n = len(self.data)
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, _AUG_STREAM))
        offsets = torch.randint(0, 2 * spec.padding + 1, (2, n), generator=g) if spec.padding > 0 else None
        flips = torch.rand(n, generator=g) < spec.hflip_p if spec.hflip and spec.hflip_p > 0.0 else None
        return offsets, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        perm = self._permutation(epoch)
        positions = self._positions()
        offsets, flips = self._augment_draws(epoch)
        images, labels = self.data.images, self.data.labels
        for b in range(len(self)):
            pos = positions[b * self.batch_size : (b + 1) * self.batch_size]
            idx = perm.index_select(0, pos)
            x = images.index_select(0, idx)
            if offsets is not None:
                assert self.augment is not None
                x = crop_at(x, self.augment.padding, offsets[0, pos], offsets[1, pos])
            if flips is not None:
                x = hflip_where(x, flips[pos])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield normalize(x, self.mean, self.std), labels.index_select(0, idx)

    def __repr__(self) -> str:
        aug = self.augment.describe() if self.augment is not None else "none"
        return (
            f"BatchLoader(n={len(self.data)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, augment={aug!r}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch})"
        )
