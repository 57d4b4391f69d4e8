"""ARC: low-bit gradient training (Choi & Kim, ISCAS 2024; seed ``000``): round-toward-zero and z-score
clipping for the error and weight gradients of every convolution and linear layer.

``handle = prepare_arc(model, ARCConfig(bits=8))`` installs the quantizers (default: round to nearest, the
z-score clip *searched* per tensor and step, one error step per sample); train as usual; ``handle.remove()``
takes them out.  ``ARCConfig(rounding="zero")`` is the paper's round-toward-zero with the same clip and
steps; ``ARCConfig(rounding="zero", clip="zscore", k=3.0, error_scale="tensor")`` the paper's rule read
literally (one fixed ``k``, one step per tensor).  Exact semantics, per conv/linear layer ``l``
with output ``y_l = op(x_l, W_l) + b_l`` (first conv and last linear excluded when ``skip_first_last``):

1. **error gradient**: the gradient arriving at the layer's output, ``e_l = dL/dy_l``, is replaced by its
   quantized value ``Q(e_l) = codes * scale`` (one clip and step per sample with ``error_scale="sample"``,
   :func:`~hwquant.numerics.gradient.fake_quantize_gradient_rows`; one per tensor with ``"tensor"``,
   :func:`~hwquant.numerics.gradient.quantize_gradient`) *before* the layer's backward runs, so both
   ``dL/dx_l = op^T(Q(e_l), W_l)`` (the error sent to the previous layer) and ``dL/dW_l = op_W(x_l, Q(e_l))``
   are computed from the quantized error (the integer GEMMs of a low-bit training datapath); the bias
   gradient ``sum Q(e_l)`` is left as it comes out;
2. **weight gradient**: ``dL/dW_l`` is then quantized the same way, ``Q(dL/dW_l)``, which is what the optimizer
   sees (``weight_grad=True``).

``Q`` uses ``bits`` (symmetric narrow codes ``[-(2^(b-1)-1), 2^(b-1)-1]``), ``rounding`` (``nearest``
[default], ``zero`` [paper], ``stochastic``) and ``clip`` (``search`` [default]: the smallest of ``|mu| + k sigma``,
``k`` in 3..64, that saturates at most ``1e-3 / (2^b - 1)`` of the elements; ``zscore`` [paper, literal]:
``c = min(max|g|, |mu| + k sigma)``; ``max``; ``dsgc``); see :mod:`hwquant.numerics.gradient`.

Why these defaults (``benchmarks/results/arc.md``, ResNet-20 / Fashion-MNIST from scratch, G8): per tensor, RTZ
loses 8-12 pt whatever the clip (k = 3: 78.5 %, near max|g|: 80.0 %, FP32 90.1 %), because the error of a
well-classified sample is orders of magnitude below a misclassified one's and one per-tensor step truncates
it to zero, layer after layer; nearest rounding halves that threshold and SR keeps it in expectation.  One step
per sample (the batch row of the error tensor) removes the cause: RTZ + searched clip then trains to 89.8 %.
Round to nearest is the default because RTZ, even per sample, shrinks the gradients it keeps (truncation drops
every ``|g|`` below one step and half a step from the rest: the weight gradient's projection onto the float one
is 0.78 at the first block of a trained ResNet-20, 1.00 with nearest), and the bias costs accuracy as the
width falls: from scratch on one CPU, per sample, RTZ / nearest / FP32 = 90.03 / 90.36 / 90.22 % at G8 (two
seeds), 89.39 / 89.90 / 89.93 % at G6, 77.69 / 89.56 / 89.93 % at G4 (SR + max per tensor: 90.14, 89.76,
87.05 %).  Nearest is as deterministic as RTZ (no random numbers; round half to even, one adder before the
truncation in RTL, ``hwquant.export.rtl``).
In a datapath the per-sample step multiplies the input-gradient GEMM's output rows (outside its sum); the
weight-gradient GEMM sums over samples, so it accumulates per sample and scales each partial sum before
adding them (one multiply per sample and output element).  Stochastic rounding draws from one ``torch.Generator`` seeded
with ``seed``.  Forward weight/activation quantization composes: apply it to a fake-quantized model
(:func:`~hwquant.methods.prepare_qat`) for e.g. W8A8 + G8.  With ``record=True`` the handle keeps every clip
value (``handle.clips[layer] = [(step, kind, c, max|g|), ...]``) for the clip-over-training plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.graph import layer_positions
from ..numerics.gradient import (
    GRAD_CLIPS,
    GRAD_ROUNDINGS,
    fake_quantize_gradient,
    fake_quantize_gradient_rows,
    gradient_stats,
)

__all__ = ["ERROR_SCALES", "ARCConfig", "ARCHandle", "prepare_arc"]

ERROR_SCALES = ("tensor", "sample")


@dataclass(frozen=True)
class ARCConfig:
    """Gradient quantization for training (see the module docstring).

    Attributes:
        bits: gradient code width (2..16).
        rounding: ``nearest`` (default: half to even), ``zero`` (RTZ, the paper's) or ``stochastic``.
        clip: ``search`` (the z-score clip searched per tensor and step; default), ``zscore`` (one fixed ``k``:
            the paper's rule read literally), ``max`` or ``dsgc``.
        k: the z-score multiplier ``k`` in ``|mu| + k sigma`` (``zscore``).
        fraction: ``search``: the share of elements its clip may saturate (default ``1e-3 / (2^bits - 1)``).
        error_scale: ``tensor`` (one step per error tensor) or ``sample`` (one step per sample, i.e. per row
            of the batch axis, each with its own clip: the error of an easy sample is orders of magnitude below
            a hard one's, and one per-tensor step truncates it to zero).  Weight gradients are per tensor.
        skip_first_last: keep the first conv's and last linear's gradients in float.
        error_grad: quantize each layer's output gradient (the error).
        weight_grad: quantize each layer's weight gradient.
        seed: seed of the stochastic-rounding generator.
        record: keep every clip value in ``handle.clips``.
    """

    bits: int = 8
    rounding: str = "nearest"
    clip: str = "search"
    k: float = 3.0
    fraction: float | None = None
    error_scale: str = "sample"
    skip_first_last: bool = True
    error_grad: bool = True
    weight_grad: bool = True
    seed: int = 0
    record: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"gradient bits must be an integer in 2..16, got {self.bits!r}")
        if self.rounding not in GRAD_ROUNDINGS:
            raise ConfigError(f"gradient rounding must be one of {', '.join(GRAD_ROUNDINGS)}, got {self.rounding!r}")
        if self.clip not in GRAD_CLIPS:
            raise ConfigError(f"gradient clip must be one of {', '.join(GRAD_CLIPS)}, got {self.clip!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not self.k > 0:
            raise ConfigError(f"z-score k must be a positive number, got {self.k!r}")
        if self.fraction is not None and (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
                                          or not 0 <= self.fraction < 1):
            raise ConfigError(f"clip fraction must be a number in [0, 1), got {self.fraction!r}")
        if self.error_scale not in ERROR_SCALES:
            raise ConfigError(f"error_scale must be one of {', '.join(ERROR_SCALES)}, got {self.error_scale!r}")
        if self.error_scale == "sample" and self.clip == "dsgc":
            raise ConfigError("error_scale='sample' supports the zscore, search and max clips, not dsgc")
        if not (self.error_grad or self.weight_grad):
            raise ConfigError("ARC needs error_grad or weight_grad (or both)")


@dataclass
class ARCHandle:
    """What :func:`prepare_arc` installed: ``layers`` (names), ``clips`` (when recording), ``remove()``."""

    config: ARCConfig
    layers: list[str]
    clips: dict[str, list[tuple[int, str, float, float]]] = field(default_factory=dict)
    step: int = 0
    _handles: list[Any] = field(default_factory=list, repr=False)
    generator: torch.Generator | None = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _q(self, name: str, kind: str, g: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if kind == "error" and cfg.error_scale == "sample" and g.dim() >= 2:
            gh, cs = fake_quantize_gradient_rows(g, cfg.bits, cfg.rounding, cfg.clip, cfg.k, self.generator,
                                                 fraction=cfg.fraction)
            c = float(cs.max())  # recorded: the largest sample's clip
        else:
            gh, c = fake_quantize_gradient(g, cfg.bits, cfg.rounding, cfg.clip, cfg.k, self.generator,
                                           fraction=cfg.fraction)
        if cfg.record:
            mx = gradient_stats(g)[2]
            self.clips.setdefault(name, []).append((self.step, kind, float(c), float(mx)))
        return gh


def _targets(model: nn.Module, skip_first_last: bool) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if skip_first_last:
        pos = layer_positions(model)  # from the graph (the model's attributes override; module order if untraceable)
        skip = {*pos.first, *pos.last}
        layers = [(n, m) for n, m in layers if n not in skip]
    return layers


def prepare_arc(model: nn.Module, config: ARCConfig) -> ARCHandle:
    """Install ARC's gradient quantizers on ``model`` in place and return the handle (see the module
    docstring).  Raises :class:`~hwquant.errors.ConfigError` if the model has no layer to quantize."""
    if not isinstance(config, ARCConfig):
        raise ConfigError(f"prepare_arc needs an ARCConfig, got {type(config).__name__}")
    targets = _targets(model, config.skip_first_last)
    if not targets:
        raise ConfigError("the model has no conv/linear layer whose gradients ARC would quantize")
    gen = torch.Generator().manual_seed(config.seed) if config.rounding == "stochastic" else None
    handle = ARCHandle(config, [n for n, _ in targets], generator=gen)
    for name, m in targets:
        if config.error_grad:
            # a tensor hook on the layer's output (registered by a forward hook) sees dL/dy_l before the layer's
            # backward; unlike a full backward hook it also works when an in-place op (nn.ReLU(inplace=True))
            # modifies y_l afterwards: the hook belongs to y_l's version at registration, the layer's output
            def fwd(module, inputs, out, _name=name):
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(lambda g: handle._q(_name, "error", g))

            handle._handles.append(m.register_forward_hook(fwd))
        if config.weight_grad:
            handle._handles.append(m.weight.register_hook(lambda g, _name=name: handle._q(_name, "weight", g)))

    def count(module, args):
        if module.training and torch.is_grad_enabled():
            handle.step += 1

    handle._handles.append(model.register_forward_pre_hook(count))
    return handle
