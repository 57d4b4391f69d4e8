"""Hardware cost model: bits stored, BOPs, cycles and energy of a bit-width-reconfigurable PE array.

Every figure is a count times a constant, so a hardware engineer can check any cell by hand.

**Per conv/linear layer and image** (shapes from one forward pass of an example input):

* ``macs`` = output elements x ``C_in / groups`` x ``k_h`` x ``k_w`` (linear: ``out x in``).
* operand widths ``b_w`` (weights) and ``b_a`` (the layer's input activations) from the layer's quantizers
  (:class:`~hwquant.nn.QuantConv2d` / ``QuantLinear``), 32 (float) where a tensor is not quantized; per-weight
  widths from a mixed-precision quantizer (``weight_widths()``, MPQ) or from the ``weight_bits`` argument.
* ``acc_bits`` = ``bitlen(K * max|q_a| * max|q_w|) + 1`` with ``K`` = MACs per output: the worst-case
  accumulator without the bias (float layers: 32).
* ``bops`` = ``macs * b_w * b_a`` (bit operations, the usual mixed-precision measure).
* weight storage = ``sum(b_w)`` over the weights + a precision index for mixed widths (see
  :func:`index_bits`) + ``bias_bits`` per bias + 32 bits per quantization scale; ``compression_ratio`` =
  32-bit model bits / stored bits.

**PE array** (:class:`PEArray`): ``rows x cols`` processing elements, output stationary (each PE keeps one
partial sum; a row shares an output channel's weights, a column shares an output pixel's activations), built
from ``brick_bits x brick_bits`` multipliers fused at run time (Bit Fusion, Sharma et al. ISCA 2018; the MPQ
accelerator's 2-4-bit PEs): a ``b_w x b_a`` MAC takes ``bricks = ceil(b_w / brick) * ceil(b_a / brick)`` bricks
and a PE has ``bricks_per_pe`` of them, so ``cycles = ceil(sum(bricks) / (rows * cols * bricks_per_pe))``.
Float layers run on the same array at one MAC per PE per cycle.

**Energy** (:class:`EnergyTable`, 45 nm figures of Horowitz, ISSCC 2014, as tabulated by Han et al. 2016):
integer multiply ``e_mul8 * B_w * B_a / 64`` (an array multiplier's cell count; ``B`` = widths padded to whole
bricks; 8x8 = 0.2 pJ, and 32x32 gives 3.2 pJ against the measured 3.1), integer add
``e_add32 * acc_bits / 32`` (ripple adder; 8 bits -> 0.025 pJ against 0.03), float32 MAC ``e_fmul32 + e_fadd32``.
Memory: SRAM ``e_sram32 / 32`` pJ per bit, DRAM ``e_dram32 / 32`` pJ per bit.

* SRAM bits = ``macs / cols * B_w + macs / rows * b_a`` (each weight read is broadcast along a row of ``cols``
  PEs, each activation down a column of ``rows`` PEs) + the outputs written once, at the width the next layer
  reads them (``b_a`` of the next conv/linear in execution order; 32 bits for the network output).
* DRAM bits = the layer's stored weight bits (read once) + activations: a layer's input and output stay in the
  on-chip buffer (``buffer_kib``) when both fit in it together (at ``b_a`` in, at the next layer's width
  out); otherwise the input is read from and the output written to DRAM.  The network input is always read
  from DRAM (at the first layer's ``b_a``) and the network output always written (32 bits).  Pooling, ReLU
  and residual adds are taken as fused into the producer's output stage (their extra operands are not counted).

The model ranks precisions and methods on one array; it is not a substitute for a synthesized design.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

FLOAT_BITS = 32


@dataclass(frozen=True)
class EnergyTable:
    """Energy per operation / access in pJ (45 nm, 0.9 V; Horowitz ISSCC 2014)."""

    e_mul8: float = 0.2  # 8-bit integer multiply
    e_add32: float = 0.1  # 32-bit integer add
    e_fmul32: float = 3.7  # float32 multiply
    e_fadd32: float = 0.9  # float32 add
    e_sram32: float = 5.0  # 32-bit read of an 8 KB SRAM
    e_dram32: float = 640.0  # 32-bit DRAM access

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{k} must be a finite number >= 0 (pJ), got {v!r}")

    def mul(self, bw: int, ba: int) -> float:
        return self.e_mul8 * bw * ba / 64.0

    def add(self, bits: int) -> float:
        return self.e_add32 * bits / 32.0


@dataclass(frozen=True)
class PEArray:
    """An output-stationary ``rows x cols`` array of fused ``brick_bits``-bit multipliers."""

    rows: int = 16
    cols: int = 16
    brick_bits: int = 2
    bricks_per_pe: int = 4  # a 4x4-bit MAC per PE per cycle (or four 2x2)
    clock_mhz: float = 500.0
    buffer_kib: float = 128.0  # on-chip activation buffer (global SRAM)
    energy: EnergyTable = field(default_factory=EnergyTable)

    def __post_init__(self) -> None:
        for k in ("rows", "cols", "brick_bits", "bricks_per_pe"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{k} must be an integer >= 1, got {v!r}")
        for k in ("clock_mhz", "buffer_kib"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{k} must be a finite number >= 0, got {v!r}")
        if self.clock_mhz == 0:
            raise ConfigError("clock_mhz must be > 0, got 0")

    def padded(self, bits: int) -> int:
        return -(-bits // self.brick_bits) * self.brick_bits

    def bricks(self, bw: int, ba: int) -> int:
        return -(-bw // self.brick_bits) * -(-ba // self.brick_bits)


def index_bits(widths: torch.Tensor) -> tuple[int, str]:
    """Bits to record which weights of a layer have which width: ``(bits, format)``.

    One width: 0 (``"uniform"``).  Otherwise the cheaper of a per-weight flag of ``ceil(log2(#widths))`` bits
    (``"flags"``) and a sparse list of the weights that are not at the most common width, each entry its
    position (``ceil(log2(n))`` bits) and, with more than two widths, which of the others it has
    (``ceil(log2(#widths - 1))`` bits) (``"index"``).

    >>> index_bits(torch.tensor([4, 4, 4, 4]))
    (0, 'uniform')
    >>> index_bits(torch.tensor([4] * 63 + [5]))  # one of 64 weights is wider: one 6-bit position
    (6, 'index')
    """
    w = widths.reshape(-1)
    vals, counts = torch.unique(w, return_counts=True)
    if vals.numel() <= 1:
        return 0, "uniform"
    n = w.numel()
    flags = n * math.ceil(math.log2(vals.numel()))
    entry = max(1, math.ceil(math.log2(n))) + math.ceil(math.log2(vals.numel() - 1))
    index = (n - int(counts.max())) * entry
    return (flags, "flags") if flags <= index else (index, "index")


def _quant_bits(q) -> int | None:
    if q is None or not getattr(q, "enabled", False):
        return None
    return int(q.spec.bits)


def _max_abs_code(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) if signed else 2**bits - 1


def layer_costs(model: nn.Module, example: torch.Tensor, pe: PEArray | None = None,
                weight_bits: dict[str, torch.Tensor | int] | None = None) -> list[dict[str, Any]]:
    """Per conv/linear layer, per image: the counts and energies of the module docstring.

    ``weight_bits`` maps a layer name to an ``int`` or a tensor of per-weight widths (shape of the weight) and
    overrides the layer's weight quantizer (mixed precision).  ``example`` is one input batch (``N, ...``).
    """
    pe = pe or PEArray()
    weight_bits = dict(weight_bits or {})
    if not isinstance(example, torch.Tensor) or example.dim() < 2 or example.shape[0] < 1:
        raise ValueError(f"example must be an input batch (N, ...), got {getattr(example, 'shape', example)!r}")
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    hooks = []
    mods = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = set(weight_bits) - set(mods)
    if unknown:
        raise ValueError(f"weight_bits names unknown layers: {', '.join(sorted(unknown))}")
    for name, m in mods.items():
        def hook(mod, inp, out, name=name):
            shapes.setdefault(name, (tuple(inp[0].shape), tuple(out.shape)))
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    n = example.shape[0]
    order = list(shapes)  # execution order
    in_bits = []
    for name in order:
        m = mods[name]
        wb = weight_bits.get(name, _quant_bits(getattr(m, "weight_quant", None)))
        ba = _quant_bits(getattr(m, "input_quant", None))
        in_bits.append(ba if ba is not None and wb is not None else FLOAT_BITS)
    rows = []
    e = pe.energy
    for i, name in enumerate(order):
        m = mods[name]
        in_shape, out_shape = shapes[name]
        w = m.weight
        k = w[0].numel()  # MACs per output = C_in/groups * kh * kw (linear: in_features)
        out_elems = math.prod(out_shape) // n
        in_elems = math.prod(in_shape) // n
        macs = out_elems * k
        uses = macs // w.numel()  # times each weight is used per image
        wq, aq = getattr(m, "weight_quant", None), getattr(m, "input_quant", None)
        ba = _quant_bits(aq)
        a_signed = bool(aq.signed) if ba is not None and aq.signed is not None else True
        wb = weight_bits.get(name, _quant_bits(wq))
        if name not in weight_bits and wb is not None and hasattr(wq, "weight_widths"):
            wb = wq.weight_widths()  # mixed precision (MPQ): per-weight widths from the quantizer
        if isinstance(wb, torch.Tensor):
            if wb.shape != w.shape:
                raise ValueError(f"weight_bits[{name!r}] has shape {tuple(wb.shape)}, the weight {tuple(w.shape)}")
            widths = wb.detach().to(torch.int64).reshape(-1)
        elif wb is None:
            widths = None
        else:
            widths = torch.full((w.numel(),), int(wb), dtype=torch.int64)
        if widths is not None and (int(widths.min()) < 1 or int(widths.max()) > 16):
            lo, hi = int(widths.min()), int(widths.max())
            raise ValueError(f"weight widths of {name!r} must be in 1..16, got {lo}..{hi}")
        integer = widths is not None and ba is not None
        if integer:
            vals, counts = torch.unique(widths, return_counts=True)
            hist = {int(v): int(c) for v, c in zip(vals, counts, strict=True)}
            bw_max = max(hist)
            acc_bits = (k * _max_abs_code(ba, a_signed) * _max_abs_code(bw_max, True)).bit_length() + 1
            bricks = uses * sum(c * pe.bricks(b, ba) for b, c in hist.items())
            mul_pj = uses * sum(c * e.mul(pe.padded(b), pe.padded(ba)) for b, c in hist.items())
            compute_pj = mul_pj + macs * e.add(acc_bits)
            cycles = math.ceil(bricks / (pe.rows * pe.cols * pe.bricks_per_pe))
            w_bits_sum = int(widths.sum())
            idx_bits, idx_fmt = index_bits(widths)
            bw_mean = w_bits_sum / w.numel()
            bw_padded_mean = sum(c * pe.padded(b) for b, c in hist.items()) / w.numel()
            bops = uses * sum(c * b for b, c in hist.items()) * ba
            n_scales = int(wq.scale.numel()) if wq is not None and wq.scale is not None else 1
            scale_bits = FLOAT_BITS * (n_scales + 1)  # weight scales + the input scale
            bias_w = m.bias_code_bits() if hasattr(m, "bias_code_bits") else None
            bias_bits = m.bias.numel() * int(bias_w or FLOAT_BITS) if m.bias is not None else 0
            a_bits = ba
        else:
            bw_mean = bw_padded_mean = float(FLOAT_BITS)
            a_bits = FLOAT_BITS
            acc_bits = FLOAT_BITS
            bops = macs * FLOAT_BITS * FLOAT_BITS
            compute_pj = macs * (e.e_fmul32 + e.e_fadd32)
            cycles = math.ceil(macs / (pe.rows * pe.cols))
            w_bits_sum = w.numel() * FLOAT_BITS
            idx_bits, idx_fmt = 0, "uniform"
            scale_bits = 0
            bias_bits = m.bias.numel() * FLOAT_BITS if m.bias is not None else 0
            hist = {FLOAT_BITS: w.numel()}
        stored = w_bits_sum + idx_bits + bias_bits + scale_bits
        float_bits = FLOAT_BITS * (w.numel() + (m.bias.numel() if m.bias is not None else 0))
        out_bits = in_bits[i + 1] if i + 1 < len(order) else FLOAT_BITS
        sram_bits = macs / pe.cols * bw_padded_mean + macs / pe.rows * a_bits + out_elems * out_bits
        last = i == len(order) - 1
        act_in, act_out = in_elems * a_bits, out_elems * (FLOAT_BITS if last else out_bits)
        spill = act_in + act_out > pe.buffer_kib * 8192
        act_dram = (act_in if spill or i == 0 else 0) + (act_out if spill or last else 0)
        dram_bits = stored + act_dram
        rows.append({
            "layer": name, "kind": "linear" if isinstance(m, nn.Linear) else "conv2d",
            "weights": w.numel(), "params": w.numel() + (m.bias.numel() if m.bias is not None else 0),
            "macs": macs, "w_bits": bw_mean, "w_hist": hist, "a_bits": a_bits, "acc_bits": acc_bits,
            "bops": bops, "cycles": cycles, "stored_bits": stored, "float_bits": float_bits,
            "index_bits": idx_bits, "index_format": idx_fmt, "act_spill": spill,
            "sram_bits": sram_bits, "dram_bits": dram_bits,
            "e_compute_pj": compute_pj, "e_sram_pj": sram_bits * e.e_sram32 / 32.0,
            "e_dram_pj": dram_bits * e.e_dram32 / 32.0,
        })
        r = rows[-1]
        r["e_total_pj"] = r["e_compute_pj"] + r["e_sram_pj"] + r["e_dram_pj"]
    return rows


def cost_report(model: nn.Module, example: torch.Tensor, pe: PEArray | None = None,
                weight_bits: dict[str, torch.Tensor | int] | None = None) -> dict[str, Any]:
    """:func:`layer_costs` plus totals: ``{"layers", "total", "pe"}`` (all per image)."""
    pe = pe or PEArray()
    layers = layer_costs(model, example, pe, weight_bits)
    keys = ("weights", "params", "macs", "bops", "cycles", "stored_bits", "float_bits", "index_bits", "sram_bits",
            "dram_bits", "e_compute_pj", "e_sram_pj", "e_dram_pj", "e_total_pj")
    total: dict[str, Any] = {k: sum(r[k] for r in layers) for k in keys}
    total["compression_ratio"] = total["float_bits"] / total["stored_bits"]
    total["latency_us"] = total["cycles"] / pe.clock_mhz
    total["energy_uj"] = total["e_total_pj"] * 1e-6
    total["w_bits_mean"] = sum(r["w_bits"] * r["weights"] for r in layers) / max(1, total["weights"])
    return {"layers": layers, "total": total, "pe": asdict(pe)}
