import math

import torch

from hwquant.numerics import mse, sqnr_db


def test_sqnr_hand_case():
    x = torch.tensor([3.0, 4.0])          # signal energy 25
    x_hat = torch.tensor([3.0, 3.5])      # noise energy 0.25
    assert sqnr_db(x, x_hat) == 20.0
    assert mse(x, x_hat) == 0.125
    assert sqnr_db(x, x) == math.inf


def test_sqnr_of_uniform_quantizer_matches_6db_rule():
    # Uniform signal in [-1, 1), b-bit quantizer with step 2/2^b: SQNR ~ 6.02 b dB.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1_000_000, generator=g, dtype=torch.float64) * 2 - 1
    b = 8
    step = 2.0 / 2**b
    x_hat = (torch.floor(x / step) + 0.5) * step
    assert abs(sqnr_db(x, x_hat) - 6.0206 * b) < 0.05
