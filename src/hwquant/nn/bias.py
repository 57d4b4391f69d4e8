"""Empirical bias correction of a quantized model (Nagel et al., "Data-free quantization through weight
equalization and bias correction", ICCV 2019, section 4.2, in its empirical form).

Quantizing a layer's weights and inputs changes the mean of its output: ``E[y_q] - E[y]`` per output
channel.  Where an input has point masses (the background value of an image, a constant feature map of a
channel after ReLU), the rounding of each atom against a coarse grid is the same on every image, so this
shift is systematic, and a network can be very sensitive to it: in ResNet-20 on Fashion-MNIST with 4-bit
activations, one channel's background atom 0.03 steps from a rounding threshold decides about 10 points of
top-1 (``benchmarks/results/ptq.md``).  The correction subtracts the mean shift from each layer's bias:

    b_l <- Q_b(b_l) - mean over calibration images and positions of (y_q,l - y_l)

with ``y_l`` the float model's output of layer ``l`` and ``y_q,l`` the quantized model's (its inputs from the
quantized, already corrected layers before it).  Layers are corrected one at a time in the order they run,
each with one pass of the quantized model over the calibration batches (the float means come from one pass
at the start), so a correction sees the effect of every earlier one.  ``Q_b(b)`` is the bias as the datapath
adds it (rounded to the accumulator's step): the mean shift left is then the new bias's own rounding, at most
half a step.  It changes only the biases, which the
integer datapath adds at accumulator precision anyway: nothing new in hardware.  Layers without a bias are
left as they are and listed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..device import model_device
from ..errors import DataError
from .swap import quant_layers


def _channel_sum(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per output channel (dim 1) sums over every other dimension, in float64, and the count per channel."""
    dims = [0] + list(range(2, y.dim()))
    return y.detach().double().sum(dim=dims), y.numel() // y.shape[1]


class _MeanHook:
    """Accumulates a module's per-channel output mean over every call."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        s, n = _channel_sum(out)
        self.total = s if self.total is None else self.total + s
        self.count += n

    def mean(self) -> torch.Tensor:
        return self.total / self.count


def _inputs(batches: Iterable, max_batches: int | None, device: torch.device) -> Iterator[torch.Tensor]:
    """The first ``max_batches`` inputs of ``batches`` (``x`` or ``(x, y)`` items), on ``device``."""
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield x.to(device)


def _means(model: nn.Module, names: list[str], xs: Iterable[torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Per-channel output means of the modules ``names`` of ``model`` over ``xs`` (one pass), and the
    number of images seen."""
    hooks = {n: _MeanHook() for n in names}
    handles = [model.get_submodule(n).register_forward_hook(h) for n, h in hooks.items()]
    images = 0
    try:
        for x in xs:
            model(x)
            images += int(x.shape[0])
    finally:
        for h in handles:
            h.remove()
    return {n: h.mean() for n, h in hooks.items() if h.count}, images


@torch.no_grad()
def correct_bias(
    qmodel: nn.Module,
    float_model: nn.Module,
    batches: Iterable,
    *,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """Correct the biases of ``qmodel``'s quantized layers **in place** (see the module docstring).

    ``float_model``: the float reference whose module names match ``qmodel``'s (the BN-folded model that
    ``qmodel`` was quantized from).  ``batches`` yields ``x`` or ``(x, y)``; at most ``max_batches`` are used,
    read once per corrected layer and once for the float means (a one-shot iterator is kept in memory).
    Returns ``{"corrected": {layer: max |shift|}, "skipped": [layers without a bias], "images": n}``.  Both
    models are switched to eval mode.
    """
    qmodel.eval()
    float_model.eval()
    if iter(batches) is batches:  # a one-shot iterator: keep its batches for the passes
        batches = list(_inputs(batches, max_batches, torch.device("cpu")))
    dev_q, dev_f = model_device(qmodel), model_device(float_model)
    layers = [(n, m) for n, m in quant_layers(qmodel)]
    with_bias = [n for n, m in layers if getattr(m, "bias", None) is not None]
    ref, images = _means(float_model, with_bias, _inputs(batches, max_batches, dev_f))
    if not images:
        raise DataError("bias correction needs at least one calibration batch; the loader yielded none")
    corrected: dict[str, float] = {}
    for name in with_bias:
        if name not in ref:  # not called on this data (an unused branch)
            continue
        got, _ = _means(qmodel, [name], _inputs(batches, max_batches, dev_q))
        if name not in got:
            continue
        layer = qmodel.get_submodule(name)
        shift = (got[name] - ref[name].to(got[name].device)).to(layer.bias.dtype).to(layer.bias.device)
        # from the bias the datapath adds (rounded to its step): the new bias's own rounding is the only residue
        effective = layer.quantized_bias() if hasattr(layer, "quantized_bias") else layer.bias
        layer.bias.copy_(effective.detach() - shift)
        corrected[name] = float(shift.abs().max())
    return {"corrected": corrected, "skipped": [n for n, m in layers if n not in with_bias], "images": images}
