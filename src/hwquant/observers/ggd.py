"""GGD observer: fit a generalized gamma distribution to the values and use its MSE-optimal uniform step.

This is the activation rule of GGD PTQ (Kim et al.; see :mod:`hwquant.numerics.ggd`): at :meth:`compute`,
per row (tensor or channel),

1. ``zero_mass`` = exact fraction of zeros over everything seen (running count); the distribution is two-sided
   when any observed value was negative;
2. :func:`~hwquant.numerics.ggd_fit` on the non-zero values of the reservoir sample (itself subsampled to
   ``max_samples`` for the fit);
3. ``step = ggd_optimal_step(ggd, bits, signed)``: the step minimising the expected MSE of the spec's quantizer
   (``2^bits`` codes, signed / unsigned, ``narrow``) under the fit;
4. ``cap_at_peak`` (default on, rows without atoms): ``step = min(step, peak / q_max)``, the min-max step.
   For a density a larger step cannot lower the error on anything observed (nothing saturates there; a point
   mass is different: a wider step can put it on a code, so rows with atoms are not capped); it only happens
   when the fitted tail extends beyond the data, e.g. a weight channel with few values;
   a fit that does not describe the data at all (its step saturates more than half of the reservoir sample,
   e.g. values bunched away from zero such as a hardsigmoid's output, where a density anchored at zero
   degenerates to a vanishing step) gives way to the min-max step, and ``summary()["fallback"]`` counts such
   rows;
5. ``power_of_two=True``: the better of ``2^floor(log2 step)`` and ``2^ceil(log2 step)`` by the MSE on the
   reservoir sample (:func:`~hwquant.numerics.ggd.power_of_two_step`).

**Atoms** (``atoms=True``, default): non-zero values that hold at least ``atom_share`` (1 %) of the reservoir
sample each (a normalised image's background, ReLU6's 6) are point masses, not part of the density: the GGD is
fitted to the remaining non-zero values, and the step of 3. (and the power of two of 5.) minimises the mixture's
expected error ``w * MSE_GGD(s) + sum_i p_i (a_i - q_s(a_i))^2`` instead
(:func:`~hwquant.numerics.ggd_atoms.mixture_optimal_step`; the objective is documented in
:mod:`hwquant.numerics.ggd_atoms`).  Rows without atoms take the steps above unchanged.

Symmetric specs get ``scale = step`` directly (zero point 0).  Affine specs get the range ``[-c, c]`` / ``[0, c]``
with ``c = step * q_max`` intersected with the observed range (see :meth:`params_from_clip`).  Degenerate
rows (all zero, or a single repeated magnitude: nothing to fit) fall back to the min-max step
``peak / q_max`` (1 for an all-zero row) and record ``None`` as their fit.

The fits are exposed as ``observer.ggd`` (a :class:`~hwquant.numerics.GGD` per tensor, or a list per channel)
and the steps as ``observer.step`` for reports.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..errors import ConfigError, DataError
from ..numerics.codes import qrange
from ..numerics.ggd import FIT_METHODS, GGD, ggd_fit, ggd_optimal_step, power_of_two_step
from ..numerics.ggd_atoms import DEFAULT_ATOM_SHARE, Atom, find_atoms, mixture_mse, mixture_optimal_step
from ..spec import QuantParams, QuantSpec
from .base import register_observer
from .sampling import DEFAULT_RESERVOIR, SamplingObserver, check_int_arg, reject_unknown


@register_observer("ggd")
class GGDObserver(SamplingObserver):
    """Scale = the GGD-optimal step of a generalized gamma fit (see the module docstring).

    Arguments: ``power_of_two`` (False), ``cap_at_peak`` (True), ``max_samples`` (100000, fit subsample),
    ``method`` (``"mle"`` or ``"moments"``), ``atoms`` (True), ``atom_share`` (0.01), ``reservoir_size``,
    ``seed`` (reservoir and fit subsample).
    """

    def __init__(
        self,
        spec: QuantSpec,
        axis: int | None = None,
        *,
        power_of_two: bool = False,
        cap_at_peak: bool = True,
        max_samples: int = 100_000,
        method: str = "mle",
        atoms: bool = True,
        atom_share: float = DEFAULT_ATOM_SHARE,
        reservoir_size: int = DEFAULT_RESERVOIR,
        seed: int = 0,
        **unknown,
    ) -> None:
        reject_unknown("ggd", unknown)
        if not isinstance(power_of_two, bool):
            raise ConfigError(f"observer argument power_of_two must be true or false, got {power_of_two!r}")
        if method not in FIT_METHODS:
            raise ConfigError(f"observer argument method must be one of {', '.join(FIT_METHODS)}, got {method!r}")
        if not isinstance(cap_at_peak, bool):
            raise ConfigError(f"observer argument cap_at_peak must be true or false, got {cap_at_peak!r}")
        if not isinstance(atoms, bool):
            raise ConfigError(f"observer argument atoms must be true or false, got {atoms!r}")
        if isinstance(atom_share, bool) or not isinstance(atom_share, (int, float)) or not 0 < atom_share <= 1:
            raise ConfigError(f"observer argument atom_share must be a number in (0, 1], got {atom_share!r}")
        self.atoms = atoms
        self.atom_share = float(atom_share)
        self.power_of_two = power_of_two
        self.cap_at_peak = cap_at_peak
        self.max_samples = check_int_arg("max_samples", max_samples, 2)
        self.method = method
        self.fit_seed = seed
        super().__init__(spec, axis, reservoir_size=reservoir_size, seed=seed)
        self.ggd: GGD | list[GGD | None] | None = None
        self.step: torch.Tensor | None = None
        self.atom_list: list[list[Atom]] = []
        self.fallback = 0

    def reset(self) -> None:
        super().reset()
        self.ggd = None
        self.step = None
        self.atom_list = []
        self.fallback = 0

    def summary(self) -> dict:
        """Base summary (fitted ``alpha, beta, lam, zero_mass`` for per-tensor fits) plus the step."""
        out = super().summary()
        if self.fallback:
            out["fallback"] = self.fallback
        if self.step is not None and self.step.numel() == 1:
            out["step"] = float(self.step)
        if len(self.atom_list) == 1 and self.atom_list[0]:
            out["atoms"] = [[a.value, a.mass] for a in self.atom_list[0]]
        return out

    def fit_row(self, row: torch.Tensor, r: int, signed: bool) -> tuple[GGD | None, float]:
        """Fit and optimal step for row ``r`` with reservoir values ``row`` ``[m]``."""
        spec = self.spec
        peak = float(self.peak(signed)[r])
        two_sided = bool(self.min_seen.reshape(-1)[r].item() < 0)
        qmax = qrange(spec.bits, signed, spec.narrow)[1]
        atoms = find_atoms(row, self.atom_share) if self.atoms else []
        self.atom_list.append(atoms)
        rest = row != 0
        if atoms:
            rest &= ~torch.isin(row, torch.tensor([a.value for a in atoms], dtype=row.dtype))
        try:
            g = ggd_fit(row[rest], signed=two_sided, max_samples=self.max_samples, seed=self.fit_seed,
                        method=self.method)
            g = replace(g, zero_mass=float(self.zeros[r]) / self.total)
        except DataError:  # all zeros or one repeated magnitude: nothing to fit
            if not (atoms and peak > 0 and not bool(rest.any())):
                return None, (peak / qmax if peak > 0 else 1.0)
            g = None  # zeros and atoms only: the step for the atoms
        if atoms:
            step = mixture_optimal_step(g, atoms, spec.bits, signed, peak=peak, narrow=spec.narrow)
        else:
            step = ggd_optimal_step(g, spec.bits, signed, narrow=spec.narrow)
        if self.cap_at_peak and peak > 0 and not atoms:  # with atoms a wider step can put them on codes
            step = min(step, peak / qmax)
        if peak > 0 and not float((row.abs() > step * qmax).float().mean()) <= 0.5:
            self.fallback += 1
            step = peak / qmax
        if self.power_of_two and atoms:
            e = math.floor(math.log2(step))
            cands = [step] if 2.0**e == step else [2.0**e, 2.0 ** (e + 1)]
            errs = [mixture_mse(g, atoms, c, spec.bits, signed, narrow=spec.narrow) for c in cands]
            step = cands[errs.index(min(errs))]  # ties: the smaller step
        elif self.power_of_two:
            step = power_of_two_step(step, spec.bits, signed, calib=row, narrow=spec.narrow)
        return g, step

    def _compute(self) -> QuantParams:
        self.fallback = 0
        self.atom_list = []
        signed = self.resolved_signed()
        samples = self.samples()
        fits, steps = [], []
        for r in range(samples.shape[0]):
            g, s = self.fit_row(samples[r], r, signed)
            fits.append(g)
            steps.append(s)
        self.ggd = fits[0] if self.axis is None else fits
        step = torch.tensor(steps, dtype=torch.float32)
        self.step = self._shape(step)
        self.clip = step * qrange(self.spec.bits, signed, self.spec.narrow)[1]
        if not self.spec.symmetric:
            return self.params_from_clip(self.clip, signed)
        return QuantParams(
            scale=self._shape(step),
            zero_point=torch.zeros_like(self._shape(step), dtype=torch.int32),
            bits=self.spec.bits,
            signed=signed,
            axis=self.axis,
            narrow=self.spec.narrow,
        )

