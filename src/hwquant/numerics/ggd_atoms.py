"""Point masses next to a GGD: detect them, and the step that minimises the mixture's expected error.

Real activations are not always a density plus the zero of ReLU.  Normalised images put every background pixel on
one value (Fashion-MNIST: 50.6 % of the first layer's input at -0.810), ReLU6 piles its saturated inputs on 6, and
padding or clamps add more.  A GGD fitted through such a spike describes neither the spike nor the rest, and a
step chosen for the density alone can leave the spike far from any code.

**Model.**  Values ``v`` are a mixture of the zero mass ``p_0``, atoms ``a_i`` with masses ``p_i`` and a GGD
density (fitted to the values that are neither zero nor an atom) carrying the rest ``w = 1 - p_0 - sum p_i``.

**Objective.**  The expected squared error of the spec's uniform quantizer ``q`` with step ``s``::

    E(s) = w * MSE_GGD(s) + sum_i p_i * (a_i - q_s(a_i))^2          (zeros quantize to 0 exactly)

``MSE_GGD`` is :func:`~hwquant.numerics.ggd.expected_mse` of the continuous part (closed form); the atom terms
are exact.  ``E`` is smooth in ``s`` except where an atom crosses a rounding threshold, and each atom term is
zero at ``s = |a_i| / k`` (the atom exactly on code ``k``), so the minimiser is found over a candidate set:
a log-spaced grid over ``[s_0 / 16, 8 s_0]`` around the continuous part's own optimum ``s_0``, every
``|a_i| / k`` in that range, and the min-max step, then a bounded Brent refinement between the best candidate's
neighbours (kept only if it is lower).  With ``power_of_two`` the candidates are every power of two in that range
and the best by ``E`` is returned (no refinement).

**Detection** (:func:`find_atoms`): a value is an atom when at least ``min_share`` of the (sampled) values equal
it exactly; zero is excluded (it is the GGD's own ``zero_mass``).  Exact repeats are what normalised integer
images, saturating activations and constant padding produce; a spike that is only *near* one value is left to
the density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ConfigError
from .ggd import GGD, code_range, expected_mse, ggd_optimal_step, lazy_scipy

__all__ = ["Atom", "find_atoms", "mixture_mse", "mixture_optimal_step"]

#: Default share of the values one value must hold to count as an atom.
DEFAULT_ATOM_SHARE = 0.01


@dataclass(frozen=True)
class Atom:
    """A point mass: ``mass`` of the values equal ``value`` exactly."""

    value: float
    mass: float


def find_atoms(values: torch.Tensor, min_share: float = DEFAULT_ATOM_SHARE, max_atoms: int = 8) -> list[Atom]:
    """Non-zero values holding at least ``min_share`` of ``values`` (and at least two of them) each, largest
    mass first (at most ``max_atoms``).  ``mass`` is the share of all of ``values`` (zeros included)."""
    if not (isinstance(min_share, (int, float)) and not isinstance(min_share, bool) and 0 < min_share <= 1):
        raise ConfigError(f"atom share must be a number in (0, 1], got {min_share!r}")
    x = values.detach().reshape(-1)
    n = x.numel()
    if n == 0:
        return []
    vals, counts = torch.unique(x[x != 0], return_counts=True)
    if vals.numel() == 0:
        return []
    keep = counts >= max(2, math.ceil(min_share * n))  # a point mass repeats
    vals, counts = vals[keep], counts[keep]
    order = torch.argsort(counts, descending=True, stable=True)[:max_atoms]
    return [Atom(float(vals[i]), float(counts[i]) / n) for i in order.tolist()]


def _quantize(a: np.ndarray, step: float, qmin: int, qmax: int) -> np.ndarray:
    return step * np.clip(np.rint(a / step), qmin, qmax)  # rint: half to even, as torch.round


def mixture_mse(
    ggd: GGD | None, atoms: list[Atom], step: float, bits: int, signed: bool, *, narrow: bool = False
) -> float:
    """``E(s)`` of the module docstring: ``ggd`` is the continuous part (its ``zero_mass`` is ``p_0``; ``None``
    when the values are zeros and atoms only), ``atoms`` the point masses."""
    if not (math.isfinite(step) and step > 0):
        raise ConfigError(f"step must be a finite number > 0, got {step!r}")
    qmin, qmax = code_range(2**bits, signed, narrow)
    p0 = ggd.zero_mass if ggd is not None else 0.0
    w = max(0.0, 1.0 - p0 - sum(a.mass for a in atoms))
    err = 0.0
    if ggd is not None and w > 0:
        err += w * expected_mse(replace(ggd, zero_mass=0.0), step, 2**bits, signed, narrow=narrow)
    if atoms:
        a = np.array([t.value for t in atoms], dtype=np.float64)
        p = np.array([t.mass for t in atoms], dtype=np.float64)
        err += float(np.sum(p * (a - _quantize(a, step, qmin, qmax)) ** 2))
    return err


def mixture_optimal_step(
    ggd: GGD | None,
    atoms: list[Atom],
    bits: int,
    signed: bool,
    *,
    peak: float,
    power_of_two: bool = False,
    narrow: bool = False,
) -> float:
    """The step minimising :func:`mixture_mse` (see the module docstring); ``peak`` is the largest observed
    magnitude (it sets the min-max candidate and, without a continuous part, the search range)."""
    qmin, qmax = code_range(2**bits, signed, narrow)
    top = max(qmax, -qmin)
    if not (math.isfinite(peak) and peak > 0):
        raise ConfigError(f"peak must be a finite number > 0, got {peak!r}")
    s_mm = peak / top
    s0 = ggd_optimal_step(replace(ggd, zero_mass=0.0), bits, signed, narrow=narrow) if ggd is not None else s_mm
    lo, hi = min(s0, s_mm) / 16.0, max(s0, s_mm) * 8.0

    def f(s: float) -> float:
        return mixture_mse(ggd, atoms, s, bits, signed, narrow=narrow)

    if power_of_two:
        cands = [2.0**k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1)]
        errs = [f(s) for s in cands]
        return cands[int(np.argmin(errs))]  # ties: the smaller step
    cands = set(np.exp(np.linspace(math.log(lo), math.log(hi), 241)).tolist()) | {s0, s_mm}
    for t in atoms:
        m = abs(t.value)
        kmax = qmax if t.value > 0 else -qmin
        cands |= {m / k for k in range(1, kmax + 1) if lo <= m / k <= hi}
    grid = np.array(sorted(cands))
    vals = np.array([f(s) for s in grid])
    i = int(np.argmin(vals))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best, best_e = float(grid[i]), float(vals[i])
    if b > a:
        res = lazy_scipy("optimize").minimize_scalar(lambda t: f(math.exp(t)), bounds=(math.log(a), math.log(b)),
                                                 method="bounded", options={"xatol": 1e-7})
        if float(res.fun) < best_e:
            best = math.exp(float(res.x))
    return best
