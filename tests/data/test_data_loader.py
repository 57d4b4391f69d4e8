"""BatchLoader: partition, determinism, epochs, sharding, augmentation alignment; make_loaders splits."""

from __future__ import annotations

import math

import pytest
import torch

from hwquant.data import (
    AugmentSpec,
    BatchLoader,
    SyntheticConfig,
    TensorData,
    load_dataset,
    make_loaders,
    split_calibration,
)
from hwquant.errors import ConfigError

MEAN, STD = (0.5, 0.25), (0.5, 0.125)


def id_data(n: int, h: int = 4, w: int = 6) -> TensorData:
    """Images whose pixels are all nonzero and distinct per sample; label = sample id."""
    g = torch.Generator().manual_seed(n)
    images = torch.randint(1, 256, (n, 2, h, w), dtype=torch.uint8, generator=g)
    return TensorData(images, torch.arange(n, dtype=torch.int64))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, -1, 1, 1)
    std = torch.tensor(STD).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def collect(loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys), [len(y) for y in ys]


def test_epoch_partitions_the_data() -> None:
    data = id_data(103)
    loader = BatchLoader(data, 10, mean=MEAN, std=STD, shuffle=True, seed=3)
    x, y, sizes = collect(loader)
    assert len(loader) == 11 and sizes == [10] * 10 + [3]
    assert torch.equal(y.sort().values, torch.arange(103))  # every sample exactly once
    assert not torch.equal(y, torch.arange(103))  # shuffled
    assert torch.equal(denormalize(x), data.images[y])  # images stay with their labels
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, loader.epoch_indices())


def test_drop_last_and_no_shuffle() -> None:
    data = id_data(103)
    dropped = BatchLoader(data, 10, mean=MEAN, std=STD, shuffle=True, drop_last=True)
    _, y, sizes = collect(dropped)
    assert len(dropped) == 10 and sizes == [10] * 10 and len(set(y.tolist())) == 100
    ordered = BatchLoader(data, 25, mean=MEAN, std=STD)
    x, y, sizes = collect(ordered)
    assert sizes == [25, 25, 25, 25, 3] and torch.equal(y, torch.arange(103))
    torch.testing.assert_close(x[:, 0], (data.images[:, 0].float() / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)


def test_max_batches_is_the_first_batches_of_the_same_epoch() -> None:
    data = id_data(103)
    full = BatchLoader(data, 10, mean=MEAN, std=STD, shuffle=True, seed=3)
    short = BatchLoader(data, 10, mean=MEAN, std=STD, shuffle=True, seed=3, max_batches=4)
    for epoch in (0, 1):
        full.set_epoch(epoch)
        short.set_epoch(epoch)
        a, b = list(full), list(short)
        assert len(short) == 4 and len(b) == 4 and len(a) == 11
        assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a[:4], b, strict=True))
    assert len(BatchLoader(data, 10, mean=MEAN, std=STD, max_batches=50)) == 11
    with pytest.raises(ConfigError, match="max_batches"):
        BatchLoader(data, 10, mean=MEAN, std=STD, max_batches=0)


def test_same_seed_same_batches_bit_for_bit() -> None:
    data = id_data(64)
    aug = AugmentSpec(padding=2, hflip=True)

    def make(seed: int) -> BatchLoader:
        return BatchLoader(data, 16, mean=MEAN, std=STD, shuffle=True, seed=seed, augment=aug)

    a, b, c = make(1), make(1), make(2)
    for loader in (a, b, c):
        loader.set_epoch(4)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(collect(a)[1], collect(c)[1])


def test_epochs_differ_and_resume_reproduces() -> None:
    data = id_data(80)
    aug = AugmentSpec(padding=1, hflip=True)
    loader = BatchLoader(data, 32, mean=MEAN, std=STD, shuffle=True, seed=0, augment=aug)
    epochs = []
    for e in range(3):
        loader.set_epoch(e)
        epochs.append(collect(loader))
    assert not torch.equal(epochs[0][1], epochs[1][1]) and not torch.equal(epochs[1][1], epochs[2][1])
    # Iterating again without set_epoch repeats the current epoch.
    x_again, y_again, _ = collect(loader)
    assert torch.equal(x_again, epochs[2][0]) and torch.equal(y_again, epochs[2][1])
    # A fresh loader (as after loading a checkpoint) set to epoch 1 reproduces epoch 1 exactly.
    resumed = BatchLoader(data, 32, mean=MEAN, std=STD, shuffle=True, seed=0, augment=aug)
    resumed.set_epoch(1)
    x1, y1, _ = collect(resumed)
    assert torch.equal(x1, epochs[1][0]) and torch.equal(y1, epochs[1][1])


def test_augmented_batches_are_shifted_flipped_windows() -> None:
    data = id_data(40, h=5, w=5)
    p = 2
    loader = BatchLoader(
        data, 16, mean=MEAN, std=STD, shuffle=True, seed=9, augment=AugmentSpec(padding=p, hflip=True)
    )
    x, y, _ = collect(loader)
    out = denormalize(x)
    padded = torch.nn.functional.pad(data.images, (p, p, p, p))
    flips, shifts = 0, set()
    for i in range(len(y)):
        src = padded[int(y[i])]
        found = [
            (t, l_, f)
            for t in range(2 * p + 1)
            for l_ in range(2 * p + 1)
            for f in (False, True)
            if torch.equal(
                out[i], (src[:, t : t + 5, l_ : l_ + 5].flip(-1) if f else src[:, t : t + 5, l_ : l_ + 5])
            )
        ]
        assert len(found) == 1
        flips += found[0][2]
        shifts.add(found[0][:2])
    assert 5 < flips < 35 and len(shifts) > 8


def test_augmentation_independent_of_batch_size() -> None:
    data = id_data(50)
    aug = AugmentSpec(padding=2, hflip=True)
    a = collect(BatchLoader(data, 7, mean=MEAN, std=STD, shuffle=True, seed=5, augment=aug))
    b = collect(BatchLoader(data, 50, mean=MEAN, std=STD, shuffle=True, seed=5, augment=aug))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(("n", "world"), [(99, 3), (103, 3), (64, 4), (10, 1)])
def test_rank_shards(n: int, world: int) -> None:
    data = id_data(n)
    aug = AugmentSpec(padding=1, hflip=True)
    shards = []
    for rank in range(world):
        loader = BatchLoader(
            data, 8, mean=MEAN, std=STD, shuffle=True, seed=2, augment=aug, rank=rank, world_size=world
        )
        loader.set_epoch(3)
        assert len(loader) == math.ceil((n // world) / 8)
        shards.append(collect(loader))
    ids = [s[1] for s in shards]
    assert all(len(i) == n // world for i in ids)  # equal sizes -> equal batch counts on every rank
    union = torch.cat(ids)
    assert len(set(union.tolist())) == len(union) == (n // world) * world  # disjoint
    single = BatchLoader(data, 8, mean=MEAN, std=STD, shuffle=True, seed=2, augment=aug)
    single.set_epoch(3)
    x_all, y_all, _ = collect(single)
    # All ranks use the same permutation: interleaving the shards gives the single-process order, and the
    # augmentation of a position does not depend on the world size.
    interleaved_y = torch.stack([i for i in ids], 1).reshape(-1)
    interleaved_x = torch.stack([s[0] for s in shards], 1).reshape(-1, *x_all.shape[1:])
    used = (n // world) * world
    assert torch.equal(interleaved_y, y_all[:used]) and torch.equal(interleaved_x, x_all[:used])
    if n % world == 0:
        assert torch.equal(union.sort().values, torch.arange(n))  # cover the set


def test_channels_last() -> None:
    data = id_data(20)
    plain = collect(BatchLoader(data, 8, mean=MEAN, std=STD))
    loader = BatchLoader(data, 8, mean=MEAN, std=STD, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert torch.equal(collect(loader)[0], plain[0])


def test_loader_argument_errors() -> None:
    data = id_data(10)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        BatchLoader(data, 0, mean=MEAN, std=STD)
    with pytest.raises(ConfigError, match=r"rank must lie in \[0, 2\)"):
        BatchLoader(data, 4, mean=MEAN, std=STD, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="2 channel"):
        BatchLoader(data, 4, mean=(0.5,), std=(0.5,))
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        BatchLoader(data, 4, mean=MEAN, std=STD, seed=-1)
    with pytest.raises(ConfigError, match="padding must be >= 0"):
        AugmentSpec(padding=-1)


def test_split_calibration() -> None:
    calib, train = split_calibration(100, 30, seed=4)
    assert len(calib) == 30 and len(train) == 70
    assert torch.equal(torch.cat([calib, train]).sort().values, torch.arange(100))
    again, _ = split_calibration(100, 30, seed=4)
    assert torch.equal(calib, again) and torch.equal(calib, calib.sort().values)
    other, _ = split_calibration(100, 30, seed=5)
    assert not torch.equal(calib, other)
    smaller, _ = split_calibration(100, 10, seed=4)
    assert set(smaller.tolist()) <= set(calib.tolist())


SYN = SyntheticConfig(n_train=600, n_test=200, num_classes=5, channels=3, image_size=(8, 8))


def test_make_loaders_calibration_split() -> None:
    kwargs = dict(batch_size=32, eval_batch_size=64, calib_size=100, seed=1, synthetic=SYN)
    a = make_loaders("synthetic", **kwargs)
    b = make_loaders("synthetic", **kwargs)
    calib_idx, train_idx = split_calibration(600, 100, seed=1)
    full, _, info = load_dataset("synthetic", seed=1, synthetic=SYN)
    assert a.info == info and a.message is None
    assert torch.equal(a.calib.data.images, full.images[calib_idx])
    assert torch.equal(a.train.data.images, full.images[train_idx])
    assert len(a.calib.data) == 100 and len(a.train.data) == 500 and len(a.train) == 500 // 32
    # The calibration loader is in order and never augmented: identical batches across calls.
    xa, ya, sizes = collect(a.calib)
    xb, yb, _ = collect(b.calib)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and sizes == [64, 36]
    assert torch.equal(ya, full.labels[calib_idx])
    assert a.calib.augment is None and not a.calib.shuffle and not a.test.shuffle
    # Test loader covers the test split in order.
    assert torch.equal(collect(a.test)[1], load_dataset("synthetic", seed=1, synthetic=SYN)[1].labels)
    assert make_loaders("synthetic", **{**kwargs, "calib_size": 0}).calib is None


def test_make_loaders_sharded_and_channels_last() -> None:
    loaders = [
        make_loaders(
            "synthetic",
            batch_size=50,
            calib_size=100,
            rank=r,
            world_size=2,
            channels_last=True,
            synthetic=SYN,
        )
        for r in range(2)
    ]
    assert len(loaders[0].train) == len(loaders[1].train) == 250 // 50
    y0, y1 = collect(loaders[0].train)[1], collect(loaders[1].train)[1]
    assert len(y0) == len(y1) == 250
    x, _ = next(iter(loaders[0].test))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert len(loaders[0].test) == len(loaders[1].test) == math.ceil(200 / 512)  # eval is not sharded


def test_make_loaders_argument_errors() -> None:
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        make_loaders("synthetic", batch_size=0, synthetic=SYN)
    with pytest.raises(ConfigError, match="calib_size 600 is too large for synthetic"):
        make_loaders("synthetic", calib_size=600, synthetic=SYN)
    with pytest.raises(ConfigError, match="calib_size must be >= 0"):
        make_loaders("synthetic", calib_size=-1, synthetic=SYN)
    with pytest.raises(ConfigError, match="no training batch"):
        make_loaders("synthetic", calib_size=500, batch_size=128, synthetic=SYN)
    with pytest.raises(ConfigError, match="rank"):
        make_loaders("synthetic", rank=1, world_size=1, synthetic=SYN)


def test_epoch_follows_documented_recipe() -> None:
    """Epoch e = permutation from derive_seed(seed, e, 0), augmentation draw k for position k."""
    from hwquant.data import crop_at, derive_seed, hflip_where, normalize

    data = id_data(30)
    aug = AugmentSpec(padding=2, hflip=True)
    loader = BatchLoader(data, 8, mean=MEAN, std=STD, shuffle=True, seed=7, augment=aug)
    loader.set_epoch(2)
    x, y, _ = collect(loader)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(derive_seed(7, 2, 0)))
    g = torch.Generator().manual_seed(derive_seed(7, 2, 1))
    offsets = torch.randint(0, 5, (2, 30), generator=g)
    flips = torch.rand(30, generator=g) < 0.5
    expected = hflip_where(crop_at(data.images[perm], 2, offsets[0], offsets[1]), flips)
    assert torch.equal(y, perm) and torch.equal(x, normalize(expected, MEAN, STD))
