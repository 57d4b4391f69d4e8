"""The integer reference model: a quantized network run on integer codes only.

:func:`integer_model` traces a fake-quantized model (``torch.fx``, quantized layers as leaves) and turns
it into an :class:`IntegerModel`: a flat list of integer operations with integer parameters only.  Every
tensor between operations is an ``int64`` tensor ``V`` whose real value is ``V * scale`` (``scale`` per
channel along dim 1, kept as metadata in float64; the hardware never multiplies by it).  The operations and
their integer parameters are listed in :mod:`hwquant.export.intops`; :mod:`hwquant.export.convert` walks the
traced graph and :mod:`hwquant.export.builder` emits the ops.

The input is quantized once, by the first layer's input quantizer (:meth:`IntegerModel.quantize_input`,
the host's job, with the quantizer's input gain ``g`` if it has one: ``rne(fl32(x * g) / s)``, see
:func:`~hwquant.nn.fold.fold_input_gain`); from there on everything is integer (a gain anywhere else is refused:
in the datapath it would be a multiplier).  The output is the last layer's accumulator;
:meth:`IntegerModel.dequantize` gives ``fl32(fl64(V) * fl64(scale))``, which equals the fake-quant model's
output bit for bit when the last layer's input codes agree (quantized layers evaluate on codes, see
:mod:`hwquant.nn.layers`).

Where the float model and the integer model can still differ: a requantization computes
``rne(fl32(y) * fl32(1/s))`` in float and ``rne(V * M >> n)`` in integers, so a value within about one
float32 ulp of a rounding tie can land on the neighbouring code; a residual ``add`` rounds in float32 and
not in integers.  :func:`compare` counts such codes layer by layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..device import model_device
from ..errors import ConfigError
from ..nn.quantizer import FakeQuantizer
from ..numerics.codes import qrange
from .convert import convert
from .intops import IntOp, div_rne, requant_params, rshift_rne
from .tally import Tally, labelled_batches

__all__ = ["IntegerModel", "IntOp", "compare", "div_rne", "integer_model", "requant_params", "rshift_rne"]


# ----------------------------------------------------------------------------------------------- the model
class IntegerModel(nn.Module):
    """A quantized network as a list of :class:`IntOp` on int64 tensors (see the module docstring).

    ``model(codes)`` runs from input codes to the output accumulator; :meth:`run` starts from a float
    input.  :meth:`trace` returns every intermediate value (for golden vectors).  ``.to(device)`` moves every
    op's tensors and ``state_dict`` holds them (the extra state); dtype conversions are refused.
    """

    def __init__(self, ops: list[IntOp], input_quant: FakeQuantizer, input_name: str, output_name: str,
                 input_shape: tuple[int, ...]):
        super().__init__()
        self.ops = ops
        self.input_quant = input_quant
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = tuple(input_shape)
        qmin, qmax = qrange(input_quant.spec.bits, bool(input_quant.signed), input_quant.spec.narrow)
        self.input_range = (qmin, qmax)
        self.input_scale = input_quant.scale.detach().double().reshape(())
        self._by_name = {op.name: op for op in ops}

    @property
    def input_gain(self) -> float:
        """The host's float32 factor on the float input before its quantization (1: none)."""
        return float(self.input_quant.input_gain)

    @property
    def output_scale(self) -> torch.Tensor:
        return self._by_name[self.output_name].scale

    # The ops' tensors live in their ``params`` dicts (an op list, not submodules), so the two nn.Module hooks
    # that visit buffers are implemented here: ``_apply`` (``.to(device)``, ``.cuda()``, ``.cpu()``) and the
    # extra state of ``state_dict`` / ``load_state_dict``.
    def _op_tensors(self):
        """``(holder, key, tensor)`` for every tensor the ops hold."""
        for op in self.ops:
            for k, v in op.params.items():
                if isinstance(v, torch.Tensor):
                    yield op.params, k, v
        yield self.__dict__, "input_scale", self.input_scale

    def _apply(self, fn, recurse: bool = True):
        """Moves every op tensor with the model; conversions that would change a dtype (``.half()``,
        ``.float()``: the integer codes and the float64 scales are exact by construction) are refused before
        anything changes."""
        probe = [torch.zeros((), dtype=d, device=self.input_scale.device) for d in (torch.int64, torch.float64)]
        if any(fn(t).dtype != t.dtype for t in probe):
            raise ConfigError("an integer model keeps its dtypes (int64 codes, float64 scales): only its device "
                              "can change")
        super()._apply(fn, recurse)
        for holder, k, v in list(self._op_tensors()):
            holder[k] = fn(v)
        for op in self.ops:
            if op.scale is not None:
                op.scale = fn(op.scale)
        return self

    def get_extra_state(self) -> dict[str, Any]:
        return {"ops": {op.name: {"kind": op.kind, "params": dict(op.params), "scale": op.scale,
                                  "bound": op.bound} for op in self.ops},
                "input_scale": self.input_scale}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        ops = state["ops"]
        mine = {op.name: op.kind for op in self.ops}
        if {n: o["kind"] for n, o in ops.items()} != mine:
            raise ConfigError("integer model state of another network: its ops differ from this model's")
        for op in self.ops:  # check everything before changing anything
            saved = ops[op.name]["params"]
            for k, v in op.params.items():
                w = saved.get(k)
                if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor) or (
                        isinstance(v, torch.Tensor) and (v.shape != w.shape or v.dtype != w.dtype)):
                    raise ConfigError(f"integer model state: {op.name}.{k} differs in kind, shape or dtype")
        for op in self.ops:
            saved = ops[op.name]
            op.params = {k: v.to(op.params[k].device) if isinstance(v, torch.Tensor) else v
                         for k, v in saved["params"].items()}
            op.scale = None if saved["scale"] is None else saved["scale"].to(self.input_scale.device)
            op.bound = saved["bound"]
        self.input_scale = state["input_scale"].to(self.input_scale.device)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Input codes (int64) with the first layer's input quantizer (its input gain included)."""
        if x.dim() != len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape[1:]:
            raise ConfigError(f"input shape {tuple(x.shape)} does not match the exported {self.input_shape}")
        if not torch.isfinite(x).all():
            raise ConfigError("input holds NaN or infinite values")
        return self.input_quant.codes(x.float()).to(torch.int64)

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.dtype.is_floating_point or codes.dim() != len(self.input_shape):
            raise ConfigError(f"input codes must be an integer tensor of rank {len(self.input_shape)}")
        lo, hi = self.input_range
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise ConfigError(f"input codes outside [{lo}, {hi}]")

    def trace(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every value, by name, for input ``codes``."""
        self.check_codes(codes)
        env = {self.input_name: codes.to(torch.int64)}
        for op in self.ops:
            env[op.name] = op.run(*(env[i] for i in op.inputs))
        return env

    @torch.no_grad()
    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """The output value for input ``codes``: :meth:`trace`'s, each value freed after its last use (an
        activation of ResNet-20 at batch 256 is 25 MB in int64; :meth:`trace` keeps all of them)."""
        self.check_codes(codes)
        last = {}
        for i, op in enumerate(self.ops):
            for name in op.inputs:
                last[name] = i
        env = {self.input_name: codes.to(torch.int64)}
        for i, op in enumerate(self.ops):
            env[op.name] = op.run(*(env[n] for n in op.inputs))
            for name in set(op.inputs):  # (an op may read one value twice, e.g. x + x)
                if last[name] == i and name != self.output_name:
                    del env[name]
        return env[self.output_name]

    def dequantize(self, v: torch.Tensor) -> torch.Tensor:
        """``fl32(fl64(V) * fl64(scale))`` (per channel along dim 1)."""
        s = self.output_scale
        s = s.reshape((1, -1) + (1,) * (v.dim() - 2)) if s.numel() > 1 else s.reshape(())
        return (v.double() * s).float()

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Float input -> dequantized float output (what the fake-quant model returns)."""
        return self.dequantize(self(self.quantize_input(x)))

    def layers(self) -> list[dict[str, Any]]:
        """Per conv/linear layer: name, accumulator bits (worst case), weight/input bits, MACs."""
        rows = []
        for op in self.ops:
            if op.kind in ("conv2d", "linear"):
                rows.append({"layer": op.name, "kind": op.kind, "acc_bits": op.bits, "acc_bound": op.bound,
                             "w_bits": op.params["w_bits"], "x_bits": op.params["x_bits"],
                             "macs": op.params["macs"]})
        return rows

    def summary(self) -> list[dict[str, Any]]:
        return [op.describe() for op in self.ops]


def integer_model(qmodel: nn.Module, example_input: torch.Tensor) -> IntegerModel:
    """Build the :class:`IntegerModel` of a fake-quantized model (BatchNorm folded, every conv/linear
    quantized with calibrated per-tensor input and per-tensor/per-channel weight quantizers).

    ``example_input``: one float batch of the model's input shape (used for shapes only).  The model is
    not modified (its train/eval mode is restored).

    Supported graph nodes: the quantized layers, :class:`~hwquant.nn.QuantAct` and
    :class:`~hwquant.nn.layers.QuantLUTAct`; ``ReLU`` / ``ReLU6`` / ``Hardtanh`` / ``clamp`` / ``clip``
    (modules, functions, methods, in place or not); residual ``add``; ``torch.cat``; max / average /
    adaptive-average(1) pooling and ``mean`` over the spatial dims (modules and functions); ``flatten`` /
    ``view`` / ``reshape`` to ``(N, -1)`` (``x.size(0)`` and ``x.shape[0]`` included); nearest upsampling by
    integer factors; ``Identity`` / ``Dropout``.  The float input may feed several layers when their input
    quantizers agree.

    Raises:
        ConfigError: an operation has no integer form here (an unfolded BatchNorm, a float conv, an
            asymmetric or stochastic quantizer, an unknown function); the message names the node and the op.
    """
    was_training = qmodel.training
    qmodel.eval()
    try:
        return IntegerModel(*convert(qmodel, example_input))
    finally:
        qmodel.train(was_training)


@torch.no_grad()
def compare(qmodel: nn.Module, imodel: IntegerModel, batches: Iterable, *, max_batches: int | None = None,
            progress: bool = False) -> dict[str, Any]:
    """Run the fake-quant model and the integer model on the same data and compare.

    Returns the output agreement (``max_abs_diff``, ``n_diff`` of output elements, ``top1`` of both and
    ``top1_agree`` on the labelled data) and, for every requantization, how many codes differ from the
    fake-quant model's codes at the same layer input (``codes_diff``) and the largest difference in LSB.
    """
    from tqdm.auto import tqdm

    was_training = qmodel.training  # compared in eval mode; the caller's mode is restored
    qmodel.eval()
    device = model_device(qmodel)
    layer_inputs: dict[str, torch.Tensor] = {}
    hooks = []
    req_for: dict[str, str] = {}
    for op in imodel.ops:
        if op.kind in ("conv2d", "linear"):
            req_for[op.inputs[0]] = op.name
    mods = dict(qmodel.named_modules())

    def hook(name):
        def f(mod, inp):
            iq = mod.input_quant
            x_hat = iq(inp[0])
            layer_inputs[name] = torch.round(x_hat / iq.scale.to(x_hat.dtype)).to(torch.int64).cpu()
        return f

    for op in imodel.ops:
        if op.kind in ("conv2d", "linear") and op.name in mods:
            hooks.append(mods[op.name].register_forward_pre_hook(hook(op.name)))
    tally = Tally()
    max_abs_diff, n_diff, n_out = 0.0, 0, 0
    try:
        it = tqdm(batches, desc="compare", leave=False, disable=not progress)
        for x, y in labelled_batches(it, max_batches):
            x = x.cpu()  # the integer model is the CPU reference; the fake-quant model runs where it lives
            y = None if y is None else y.cpu()
            layer_inputs.clear()
            fq = qmodel(x.to(device)).cpu()
            env = imodel.trace(imodel.quantize_input(x))
            out = imodel.dequantize(env[imodel.output_name])
            d = (out.double() - fq.double()).abs()
            max_abs_diff = max(max_abs_diff, float(d.max()))
            n_diff += int((d > 0).sum())
            n_out += d.numel()
            for vname, lname in req_for.items():
                if lname in layer_inputs:
                    tally.codes(lname, layer_inputs[lname], env[vname])
            tally.predictions(out, fq, y)
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_training)
    t = tally.totals()
    return {"images": tally.images, "max_abs_diff": max_abs_diff, "out_diff": n_diff, "out_elements": n_out,
            "top1_fake_quant": tally.top1("other"), "top1_integer": tally.top1("reference"),
            "prediction_agree": tally.prediction_agree,
            "codes": t["codes"], "codes_diff": t["codes_diff"], "max_code_lsb": t["max_code_lsb"],
            "layers": tally.layers}
