"""MPQ: retraining-based mixed precision from weight flips (Kim et al., TNNLS 2021; seed ``003``).

Retrain a ``w_bits`` / ``a_bits`` network (QAT, straight-through estimator); in the middle of retraining give
one extra bit, i.e. an extra quantization level between two neighbouring ones, to the weights that keep
switching between two levels; and lower the learning rate of weights that sit near a rounding threshold.
Exact semantics, per low-bit conv/linear layer (the first conv and last FC stay at ``first_last_bits``):

* **grid**: the weight step ``s`` is calibrated per output channel on the float weights (MSE for the
  ``w_bits`` codes) and stays fixed, so a code change is a real level change.  A weight is *coarse*
  (``q = clamp(round(W / s), q_min, q_max)``, ``w_bits`` codes) or *extra* (``q' = clamp(round(2W / s),
  2 q_min, 2 q_max)`` at step ``s / 2``: one more bit, the same range).  Both are codes of one
  ``(w_bits + 1)``-bit grid of step ``s / 2`` (coarse weights have even codes there), which is what the
  quantizer stores as its ``scale`` and what the integer model and the accelerator run.
* **flips** (oscillations): from step ``(flag_at - window) * T`` to ``flag_at * T`` (``T`` optimizer steps),
  once per optimizer step the coarse code of each weight is compared with its previous one; a change whose
  direction is opposite to the weight's previous change (``A -> B -> A``) is a flip.  "Once per optimizer
  step": the weight is a parameter that the optimizer updates in place, so its version counter tells a new
  step from another forward of the same step (gradient accumulation, a second loss) - a forward on unchanged
  weights is not a step and is not counted.  ``flips / counted steps`` is the oscillation frequency
  (:func:`mpq_summary`).  From Nagel et al., ICML 2022 ("Overcoming oscillations in quantization-aware
  training"), we take the definition of an oscillation (an integer-level change whose direction reverses
  the previous change, tracked per weight after every optimizer step) and its use as a frequency; where they
  keep an exponential moving average of it over all of training (momentum ``m``, ``f <- m o + (1 - m) f``) and
  *freeze* the weights whose frequency passes a threshold, MPQ counts over one fixed window before the flag
  step (a uniform average over the window, so the count is the frequency up to the window length) and gives
  those weights an *extra level* instead.
* **extra bit**: at step ``flag_at * T`` the weights with at least ``min_flips`` flips become extra, at most
  the ``max_extra`` fraction of each layer's weights (the most flipping first; ties by index).  The choice is
  final (it is a buffer of the quantizer, saved with the model).  ``choose="random"`` (an ablation) gives the
  extra bit to as many weights of each layer as the flip rule chose, drawn at random (seeded).
* **lower learning rate near a threshold**: the loss gradient of a weight within ``eps`` steps of a rounding
  threshold of its grid (``|W / s_g - floor(W / s_g) - 1/2| < eps``, ``s_g`` = ``s`` or ``s / 2``) is
  multiplied by ``gamma`` (weight decay, added by the optimizer, is not).  Which near weights: ``lr_scope``.
  The abstract says only "a lower learning rate near the quantization threshold" to "mitigate the gradient
  noise"; read literally (``"all"``: every weight near a threshold, all along) the rule slows about a third of
  the low-bit weights at every step (weights gather near thresholds in QAT) and costs 2.8 pt at a 2-bit base
  on ResNet-20 / Fashion-MNIST (issue 15, ``benchmarks/results/mpq.md``); slowing them only after the flag or
  in a 5x narrower band still costs 0.6-0.7 pt.  The default, ``"flipping"``, slows only the weights that
  have flipped in the counting window (``flips > 0``), i.e. the oscillation the rule is there to damp (their
  flips per step fall 2.5x), and costs nothing measurable there.

Measured for the diagnosis (buffers, reported by :func:`mpq_summary`): the flips per weight, the counted
steps, and the share of weights the learning-rate rule slowed, summed over the steps.

``max_extra=0, gamma=1`` is plain uniform QAT on the same fixed grid (the baseline of the same run).  The bits
stored count the index of the extra weights honestly (:func:`hwquant.hw.index_bits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.quantizer import FakeQuantizer, GradScale
from ..nn.swap import quant_layers
from ..numerics.codes import qrange, shape_param
from ..numerics.fused import fake_quantize_trusted
from ..spec import QuantParams, QuantSpec
from .qat import QATConfigBase, register_qat

MPQ_CHOICES = ("flips", "random")
LR_SCOPES = ("all", "after_flag", "flipping")

__all__ = ["LR_SCOPES", "MPQ_CHOICES", "MPQConfig", "MixedWeightQuantizer", "mpq_summary", "schedule_mpq"]


def _code_dtype(bits: int) -> torch.dtype:
    """The narrowest signed integer type that holds ``bits``-bit codes (int8 wraps from 9 bits on)."""
    return torch.int8 if bits <= 8 else torch.int16


class MixedWeightQuantizer(FakeQuantizer):
    """Weight quantizer with a per-weight extra bit and flip tracking (see the module docstring).

    Buffers (saved in ``state_dict``): ``scale`` (the fine step ``s / 2``, per channel), ``extra`` (bool, the
    weights with the extra bit), ``flips`` (int32 counts), ``prev_codes`` / ``last_dir`` (int8), ``step``,
    ``count_from``, ``flag_step`` (int64; ``flag_step = -1``: not scheduled, no tracking).
    """

    def __init__(self, spec: QuantSpec, axis: int | None = None, generator=None, *, min_flips: int = 2,
                 max_extra: float = 0.1, eps: float = 0.1, gamma: float = 0.1, choose: str = "flips",
                 seed: int = 0, lr_scope: str = "flipping"):
        super().__init__(spec, axis=axis, generator=generator)
        self.min_flips, self.max_extra, self.eps, self.gamma = min_flips, max_extra, eps, gamma
        self.lr_scope = lr_scope
        self.choose, self.seed = choose, seed
        self._seen: tuple | None = None  # (weight, version) of the last tracked step
        self.register_buffer("extra", torch.empty(0, dtype=torch.bool))
        self.register_buffer("flips", torch.empty(0, dtype=torch.int32))
        self.register_buffer("prev_codes", torch.empty(0, dtype=torch.int8))
        self.register_buffer("last_dir", torch.empty(0, dtype=torch.int8))
        for name in ("step", "count_from", "flag_step", "counted_steps"):
            self.register_buffer(name, torch.tensor(-1 if name == "flag_step" else 0, dtype=torch.int64))
        # sum over training steps of the share of weights whose gradient the learning-rate rule scaled
        self.register_buffer("slowed_share_sum", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("slowed_steps", torch.tensor(0, dtype=torch.int64))

    # ------------------------------------------------------------------ state
    def set_params(self, params: QuantParams, peak=None) -> None:
        super().set_params(params, peak)
        self.scale = self.scale / 2  # the fine grid; coarse weights use 2 * scale

    def params(self) -> QuantParams:
        p = super().params()
        return QuantParams(p.scale, p.zero_point, self.code_bits, p.signed, p.axis, p.narrow)

    @property
    def code_bits(self) -> int:
        """Width of the stored codes on the fine grid: ``w_bits + 1``."""
        return self.spec.bits + 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("extra", "flips", "prev_codes", "last_dir"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _ensure(self, w: torch.Tensor) -> None:
        if self.extra.shape != w.shape:
            self.extra = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
            self.flips = torch.zeros(w.shape, dtype=torch.int32, device=w.device)
            self.prev_codes = torch.zeros(w.shape, dtype=_code_dtype(self.spec.bits), device=w.device)
            self.last_dir = torch.zeros(w.shape, dtype=torch.int8, device=w.device)

    def weight_widths(self) -> torch.Tensor:
        """Per-weight widths: ``w_bits``, ``w_bits + 1`` for the extra weights."""
        return self.spec.bits + self.extra.to(torch.int64)

    # --------------------------------------------------------------- tracking
    def _coarse_codes(self, w: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.spec.bits, True, self.spec.narrow)
        s = shape_param(2 * self.scale.to(w.dtype), w, self.axis)
        return torch.round(w.detach() / s).clamp_(qmin, qmax).to(_code_dtype(self.spec.bits))

    def _new_step(self, w: torch.Tensor) -> bool:
        """Whether this forward belongs to a new optimizer step: for a parameter, its version counter moved
        since the last tracked forward (the optimizer updates it in place); any other tensor (a computed
        weight) counts every forward."""
        if not isinstance(w, nn.Parameter):
            return True
        seen = (w, w._version)
        if self._seen is not None and self._seen[0] is w and self._seen[1] == w._version:
            return False
        self._seen = seen
        return True

    @torch.no_grad()
    def _track(self, w: torch.Tensor) -> None:
        if int(self.flag_step) < 0:  # training without a schedule would silently be uniform QAT
            raise ConfigError("MPQ needs its schedule before training: call hq.schedule_mpq(qmodel, total_steps, "
                              "config) (hwquant qat does)")
        if int(self.step) >= int(self.flag_step):
            return  # the extra bits are assigned already
        self.step += 1
        step = int(self.step)
        q = self._coarse_codes(w)
        if step > int(self.count_from) + 1:
            d = torch.sign(q.to(torch.int32) - self.prev_codes.to(torch.int32)).to(torch.int8)
            self.flips += ((d != 0) & (d == -self.last_dir)).to(torch.int32)
            self.last_dir = torch.where(d != 0, d, self.last_dir)
            self.counted_steps += 1
        if step > int(self.count_from):
            self.prev_codes = q
        if step == int(self.flag_step):
            self._flag()

    def _flag(self) -> None:
        n = self.flips.numel()
        budget = int(math.floor(self.max_extra * n))
        cand = self.flips.reshape(-1) >= max(1, self.min_flips)
        extra = torch.zeros(n, dtype=torch.bool, device=self.flips.device)
        if budget > 0 and bool(cand.any()):
            score = torch.where(cand, self.flips.reshape(-1), torch.full_like(self.flips.reshape(-1), -1))
            order = torch.sort(score, descending=True, stable=True).indices[:budget]
            extra[order] = cand[order]
        if self.choose == "random":  # the ablation: as many weights, drawn at random
            count = int(extra.sum())
            gen = torch.Generator().manual_seed(self.seed)
            extra = torch.zeros_like(extra)
            extra[torch.randperm(n, generator=gen)[:count].to(extra.device)] = True
        self.extra = extra.reshape(self.flips.shape)

    # ---------------------------------------------------------------- forward
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observer.update(w)
        if not (self.enabled and self.calibrated):
            return w
        self._ensure(w)
        step = self.training and torch.is_grad_enabled() and self._new_step(w)
        if step:
            self._track(w)
        qmin, qmax = qrange(self.spec.bits, True, self.spec.narrow)
        sf = shape_param(self.scale.to(w.dtype), w, self.axis)
        r = self.spec.rounding
        out = fake_quantize_trusted(w, 2 * sf, None, qmin, qmax, r, self.generator, self.axis)
        if bool(self.extra.any()):
            fine = fake_quantize_trusted(w, sf, None, 2 * qmin, 2 * qmax, r, self.generator, self.axis)
            out = torch.where(self.extra, fine, out)
        if self.training and torch.is_grad_enabled() and self.gamma != 1.0 and self.eps > 0:
            with torch.no_grad():
                v = w / torch.where(self.extra, sf, 2 * sf)
                near = (v - torch.floor(v) - 0.5).abs() < self.eps
                if self.lr_scope == "after_flag" and int(self.step) < int(self.flag_step):
                    near = torch.zeros_like(near)
                elif self.lr_scope == "flipping":
                    near = near & (self.flips > 0)
                if step:
                    self.slowed_share_sum += near.float().mean().double()
                    self.slowed_steps += 1
                factor = torch.where(near, torch.tensor(self.gamma, dtype=w.dtype), torch.tensor(1.0, dtype=w.dtype))
            out = GradScale.apply(out, factor)
        return out

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codes on the fine grid (``w_bits + 1`` bits; coarse weights even)."""
        with torch.no_grad():
            was = self.training
            self.train(False)
            try:
                y = self.forward(x)
            finally:
                self.train(was)
        return torch.round(y / shape_param(self.scale.to(y.dtype), y, self.axis)).to(_code_dtype(self.code_bits))

    def extra_repr(self) -> str:
        n = self.extra.numel()
        frac = f", extra {int(self.extra.sum())}/{n}" if n else ""
        return super().extra_repr() + f", mixed (+1 bit){frac}"


@register_qat("mpq")
@dataclass(frozen=True)
class MPQConfig(QATConfigBase):
    """MPQ retraining (see the module docstring).

    Attributes:
        w_bits: base weight bits of the low-bit layers (an extra weight has ``w_bits + 1``).
        a_bits: activation bits.
        flag_at: fraction of retraining at which the extra bits are assigned, in ``(0, 1)``.
        window: fraction of retraining before ``flag_at`` over which flips are counted, in ``(0, flag_at]``.
        min_flips: flips needed for the extra bit (``>= 1``).
        choose: ``"flips"`` (the method) or ``"random"`` (ablation: the same number of weights per layer, at
            random, drawn with ``seed`` and the layer's index).
        max_extra: at most this fraction of a layer's weights get the extra bit, in ``[0, 1]``.
        eps: distance to a rounding threshold, in steps, that counts as near, in ``[0, 0.5]``.
        gamma: learning-rate factor near a threshold, in ``(0, 1]``.
        lr_scope: which near-threshold weights the factor applies to: ``"all"`` (the abstract read literally),
            ``"after_flag"`` (only once the extra bits are assigned) or ``"flipping"`` (only weights that have
            flipped in the counting window: the oscillation the rule is meant to damp).
    """

    w_bits: int = 3
    a_bits: int = 4
    flag_at: float = 0.5
    window: float = 0.25
    min_flips: int = 2
    max_extra: float = 0.1
    eps: float = 0.1
    gamma: float = 0.1
    choose: str = "flips"
    seed: int = 0
    lr_scope: str = "flipping"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lr_scope not in LR_SCOPES:
            raise ConfigError(f"lr_scope must be one of {', '.join(LR_SCOPES)}, got {self.lr_scope!r}")
        if self.choose not in MPQ_CHOICES:
            raise ConfigError(f"choose must be one of {', '.join(MPQ_CHOICES)}, got {self.choose!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not 0 < self.flag_at < 1:
            raise ConfigError(f"flag_at must be in (0, 1), got {self.flag_at!r}")
        if not 0 < self.window <= self.flag_at:
            raise ConfigError(f"window must be in (0, flag_at = {self.flag_at}], got {self.window!r}")
        if isinstance(self.min_flips, bool) or not isinstance(self.min_flips, int) or self.min_flips < 1:
            raise ConfigError(f"min_flips must be an integer >= 1, got {self.min_flips!r}")
        if not 0 <= self.max_extra <= 1:
            raise ConfigError(f"max_extra must be in [0, 1], got {self.max_extra!r}")
        if not 0 <= self.eps <= 0.5:
            raise ConfigError(f"eps must be in [0, 0.5], got {self.eps!r}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.w_bits + 1 > 16:
            raise ConfigError(f"w_bits must be <= 15 (the extra bit makes w_bits + 1), got {self.w_bits}")

    def _specs(self, wb: int, ab: int) -> tuple[QuantSpec, QuantSpec]:
        w = QuantSpec(bits=wb, signed=True, granularity=self._gran(), observer="mse", range_mode="static")
        _, a = self._minmax_specs(wb, ab)
        return w, a

    def finish(self, qmodel: nn.Module) -> nn.Module:
        """Swap the low-bit layers' weight quantizers for :class:`MixedWeightQuantizer` (same spec)."""
        low = self._specs(self.w_bits, self.a_bits)[0]
        if self.pow2:
            low = low.with_(pow2=True)
        for i, (_, layer) in enumerate(quant_layers(qmodel)):
            wq = layer.weight_quant
            if wq is not None and wq.spec == low:
                layer.weight_quant = MixedWeightQuantizer(low, axis=wq.axis, generator=wq.generator,
                                                          min_flips=self.min_flips, max_extra=self.max_extra,
                                                          eps=self.eps, gamma=self.gamma, choose=self.choose,
                                                          seed=self.seed * 1000 + i, lr_scope=self.lr_scope)
        return qmodel




def schedule_mpq(qmodel: nn.Module, total_steps: int, config: MPQConfig) -> tuple[int, int]:
    """Set the flip window and the flag step of every :class:`MixedWeightQuantizer` for ``total_steps``
    training steps; returns ``(first counted step, flag step)``.  Call before training (a resumed model's
    state dict then restores the counters)."""
    if total_steps < 2:
        raise ConfigError(f"MPQ needs at least 2 training steps, got {total_steps}")
    flag = max(1, round(config.flag_at * total_steps))
    start = max(0, round((config.flag_at - config.window) * total_steps))
    for m in qmodel.modules():
        if isinstance(m, MixedWeightQuantizer):
            m.flag_step.fill_(flag)
            m.count_from.fill_(start)
    return start, flag


FLIP_HIST_BINS = 11  # flips 0..9 and ">= 10"


def mpq_summary(qmodel: nn.Module) -> list[dict]:
    """Per mixed layer: weights, extra weights, flips counted (total, weights that flipped, a histogram of the
    per-weight counts: ``flip_hist[j]`` weights with ``j`` flips, the last bin ``>= 10``), the steps counted and
    the mean oscillation frequency of the flipping weights (flips per counted step), the mean share of weights
    the learning-rate rule slowed per step, the extra weights' mean flips, and the mean weight bits."""
    rows = []
    for name, layer in quant_layers(qmodel):
        wq = layer.weight_quant
        if isinstance(wq, MixedWeightQuantizer) and wq.extra.numel():
            n = wq.extra.numel()
            e = int(wq.extra.sum())
            f = wq.flips.reshape(-1).long()
            steps = int(wq.counted_steps)
            flipping = f > 0
            rows.append({
                "layer": name, "weights": n, "extra": e, "extra_fraction": e / n,
                "flips": int(f.sum()), "flipping_weights": int(flipping.sum()),
                "flip_hist": torch.bincount(f.clamp(max=FLIP_HIST_BINS - 1), minlength=FLIP_HIST_BINS).tolist(),
                "counted_steps": steps,
                "flip_frequency_mean": float(f[flipping].float().mean()) / steps if steps and flipping.any() else 0.0,
                "extra_flips_mean": float(f[wq.extra.reshape(-1)].float().mean()) if e else 0.0,
                "slowed_share_mean": (float(wq.slowed_share_sum) / int(wq.slowed_steps)
                                      if int(wq.slowed_steps) else 0.0),
                "w_bits_mean": wq.spec.bits + e / n})
    return rows
