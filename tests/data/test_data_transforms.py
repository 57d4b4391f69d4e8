"""normalize / random_crop / random_hflip against hand-computed values and per-sample loop oracles."""

from __future__ import annotations

import pytest
import torch

from hwquant.data import crop_at, hflip_where, normalize, random_crop, random_hflip, take_windows
from hwquant.errors import ConfigError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_normalize_hand_computed() -> None:
    x = torch.tensor([[[[0, 255]], [[51, 204]]]], dtype=torch.uint8)  # 1 x 2 x 1 x 2
    out = normalize(x, mean=(0.5, 0.25), std=(0.5, 0.2))
    # c0: (0/255 - 0.5)/0.5 = -1, (255/255 - 0.5)/0.5 = 1
    # c1: (51/255 - 0.25)/0.2 = (0.2 - 0.25)/0.2 = -0.25, (204/255 - 0.25)/0.2 = (0.8 - 0.25)/0.2 = 2.75
    expected = torch.tensor([[[[-1.0, 1.0]], [[-0.25, 2.75]]]])
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # Floating input is taken to be in [0, 1] already.
    torch.testing.assert_close(
        normalize(x.float() / 255, (0.5, 0.25), (0.5, 0.2)), expected, rtol=0, atol=1e-6
    )


def test_normalize_matches_formula_and_keeps_channels_last() -> None:
    x = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8, generator=gen(0))
    mean, std = (0.1, 0.5, 0.9), (0.3, 0.2, 0.1)
    ref = (x.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(normalize(x, mean, std).double(), ref, rtol=0, atol=2e-6)
    cl = normalize(x.contiguous(memory_format=torch.channels_last), mean, std)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, normalize(x, mean, std))


def test_normalize_rejects_bad_arguments() -> None:
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ConfigError, match="3 channels but 1 means"):
        normalize(x, (0.5,), (0.5,))
    with pytest.raises(ConfigError, match="std must be positive"):
        normalize(x, (0.5,) * 3, (0.5, 0.0, 0.5))
    with pytest.raises(ConfigError, match="N x C x H x W"):
        normalize(x[0], (0.5,) * 3, (0.5,) * 3)


def crop_oracle(x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    padded = torch.zeros(n, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    out = torch.empty_like(x)
    for i in range(n):
        t, l_ = int(top[i]), int(left[i])
        out[i] = padded[i, :, t : t + h, l_ : l_ + w]
    return out


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_random_crop_matches_loop_oracle(padding: int) -> None:
    x = torch.randint(1, 256, (64, 2, 5, 7), dtype=torch.uint8, generator=gen(1))
    out = random_crop(x, padding, gen(7))
    # random_crop draws top then left from the generator, each randint(0, 2p + 1, (N,)).
    g = gen(7)
    top = torch.randint(0, 2 * padding + 1, (64,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (64,), generator=g)
    assert torch.equal(out, crop_oracle(x, padding, top, left))
    # Independently of the draw order: every output is some shifted window of the zero-padded input,
    # and many different shifts occur.
    shifts = set()
    for i in range(64):
        matches = [
            (t, l_)
            for t in range(2 * padding + 1)
            for l_ in range(2 * padding + 1)
            if torch.equal(
                out[i], crop_oracle(x[i : i + 1], padding, torch.tensor([t]), torch.tensor([l_]))[0]
            )
        ]
        assert len(matches) == 1  # x has no zeros, so the window position is identifiable
        shifts.add(matches[0])
    assert len(shifts) >= min(10, (2 * padding + 1) ** 2 - 1)
    # Padding contributes zeros: a shifted sample has zeros on the exposed border.
    assert int((out == 0).sum()) > 0


def test_random_crop_deterministic_and_identity() -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen(2))
    assert torch.equal(random_crop(x, 4, gen(3)), random_crop(x, 4, gen(3)))
    assert not torch.equal(random_crop(x, 4, gen(3)), random_crop(x, 4, gen(4)))
    assert random_crop(x, 0, gen(3)) is x
    centre = torch.full((16,), 4)
    assert torch.equal(crop_at(x, 4, centre, centre), x)


def test_crop_works_on_float_and_channels_last() -> None:
    x = torch.rand(6, 3, 5, 5, generator=gen(5))
    top = torch.tensor([0, 1, 2, 3, 4, 2])
    left = torch.tensor([4, 3, 2, 1, 0, 2])
    assert torch.equal(crop_at(x, 2, top, left), crop_oracle(x, 2, top, left))
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(crop_at(xcl, 2, top, left), crop_oracle(x, 2, top, left))


def test_take_windows_rejects_out_of_range_offsets() -> None:
    x = torch.zeros(2, 1, 6, 6)
    with pytest.raises(ConfigError, match="out of range"):
        take_windows(x, torch.tensor([0, 3]), torch.tensor([0, 0]), 4, 4)
    with pytest.raises(ConfigError, match="larger than source"):
        take_windows(x, torch.tensor([0, 0]), torch.tensor([0, 0]), 7, 4)


def test_random_hflip_per_sample() -> None:
    n = 200
    x = torch.randint(0, 256, (n, 2, 3, 5), dtype=torch.uint8, generator=gen(6))
    out = random_hflip(x, gen(8))
    flipped = torch.tensor([torch.equal(out[i], x[i].flip(-1)) for i in range(n)])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(n)])
    assert bool((flipped ^ kept).all())  # each sample is exactly one of the two (x is not symmetric)
    assert 60 < int(flipped.sum()) < 140  # both outcomes occur, roughly half each
    expected_mask = torch.rand(n, generator=gen(8)) < 0.5
    assert torch.equal(flipped, expected_mask)
    assert torch.equal(random_hflip(x, gen(8), p=0.0), x)
    assert torch.equal(random_hflip(x, gen(8), p=1.0), x.flip(-1))


def test_hflip_where_oracle() -> None:
    x = torch.arange(3 * 1 * 2 * 3, dtype=torch.uint8).view(3, 1, 2, 3)
    out = hflip_where(x, torch.tensor([True, False, True]))
    assert out[0].tolist() == [[[2, 1, 0], [5, 4, 3]]]
    assert torch.equal(out[1], x[1])
    assert out[2].tolist() == [[[14, 13, 12], [17, 16, 15]]]
    with pytest.raises(ConfigError, match="mask shape"):
        hflip_where(x, torch.tensor([True]))
