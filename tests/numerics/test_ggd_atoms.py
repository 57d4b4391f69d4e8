"""Point masses next to a GGD (issue 16, item 1): detection, the mixture objective against Monte Carlo and a
hand case, and the optimal step against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hwquant.errors import ConfigError
from hwquant.numerics import GGD
from hwquant.numerics.ggd_atoms import Atom, find_atoms, mixture_mse, mixture_optimal_step
from hwquant.numerics.uniform import fake_quantize
from hwquant.observers import make_observer
from hwquant.spec import QuantSpec

G = GGD(alpha=1.5, beta=0.5, lam=2.0, zero_mass=0.3, signed=True)


def _mixture_samples(n: int, atom: float, p_atom: float, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    v = G.sample(n, seed=rng)
    v = np.where(rng.random(n) < p_atom, atom, v)  # the atom replaces p_atom of the values (zeros included)
    return torch.tensor(v, dtype=torch.float32)


def test_find_atoms_by_hand():
    x = torch.tensor([0.0, 0.0, 1.5, 1.5, 1.5, -2.0, -2.0, 0.3, 0.7, 0.9])
    assert find_atoms(x, min_share=0.2) == [Atom(1.5, 0.3), Atom(-2.0, 0.2)]
    assert find_atoms(x, min_share=0.25) == [Atom(1.5, 0.3)]  # zero (20 %) is never an atom: it is zero_mass
    assert find_atoms(torch.linspace(0.1, 1, 1000)) == []
    with pytest.raises(ConfigError, match="atom share"):
        find_atoms(x, min_share=0)


def test_mixture_mse_by_hand_without_density():
    # 4-bit unsigned, step 0.25: 1.0 -> code 4 exactly; 0.9 -> 3.6 -> 4 -> 1.0 (error 0.1); 9 -> clipped at 15 * 0.25
    atoms = [Atom(1.0, 0.5), Atom(0.9, 0.25), Atom(9.0, 0.25)]
    want = 0.5 * 0.0 + 0.25 * 0.1**2 + 0.25 * (9.0 - 3.75) ** 2
    assert mixture_mse(None, atoms, 0.25, 4, signed=False) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("bits,atom", [(4, -0.81), (4, 0.93), (6, -0.81)])
def test_mixture_mse_equals_monte_carlo(bits, atom):
    """The closed form against the quantizer applied to 2e6 samples of the same mixture (torch's own ops)."""
    p = 0.35
    x = _mixture_samples(2_000_000, atom, p)
    g = GGD(G.alpha, G.beta, G.lam, zero_mass=G.zero_mass * (1 - p), signed=True)
    for step in (0.11, 0.2, 0.27):
        mc = float((fake_quantize(x, step, bits, True).double() - x.double()).pow(2).mean())
        assert mixture_mse(g, [Atom(atom, p)], step, bits, True) == pytest.approx(mc, rel=0.02)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("atom,p", [(-0.81, 0.5), (0.6, 0.1), (2.9, 0.05)])
def test_optimal_step_is_the_brute_force_minimiser(bits, atom, p):
    g = GGD(G.alpha, G.beta, G.lam, zero_mass=G.zero_mass * (1 - p), signed=True)
    atoms = [Atom(atom, p)]
    s = mixture_optimal_step(g, atoms, bits, True, peak=4.0)
    grid = np.exp(np.linspace(math.log(s / 4), math.log(s * 4), 20001))
    brute = min(mixture_mse(g, atoms, t, bits, True) for t in grid)
    assert mixture_mse(g, atoms, s, bits, True) <= brute * (1 + 1e-6)
    s2 = mixture_optimal_step(g, atoms, bits, True, peak=4.0, power_of_two=True)
    pow2 = [2.0**k for k in range(-14, 4)]
    errs = [mixture_mse(g, atoms, t, bits, True) for t in pow2]
    assert s2 == pow2[int(np.argmin(errs))]


def test_observer_recovers_the_atom_and_the_step():
    """A GGD with an atom at -0.81 carrying 40 %: the observer finds the atom (value exactly, mass within sampling
    error), and its 4-bit step has the empirical MSE of the best step on a fine grid (within 1 %), where the same
    observer without atoms is worse."""
    x = _mixture_samples(400_000, -0.81, 0.4, seed=1)
    errs = {}
    for atoms in (True, False):
        spec = QuantSpec(bits=4, signed=True, observer="ggd", observer_args={"atoms": atoms})
        obs = make_observer(spec)
        obs.update(x)
        step = float(obs.compute().scale)
        errs[atoms] = float((fake_quantize(x, step, 4, True).double() - x.double()).pow(2).mean())
        if atoms:
            (value, mass), = obs.summary()["atoms"]
            assert value == pytest.approx(-0.81, abs=1e-7) and mass == pytest.approx(0.4, abs=0.01)
    grid = np.exp(np.linspace(math.log(0.05), math.log(1.0), 2000))
    best = min(float((fake_quantize(x, float(t), 4, True).double() - x.double()).pow(2).mean()) for t in grid)
    assert errs[True] <= best * 1.01
    assert errs[False] > best * 1.05  # the density alone misses the spike
