"""Hardware cost model: a conv + linear case worked by hand, MACs against torch's FLOP counter, mixed
per-weight widths, the float baseline, and bad input."""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hwquant.errors import ConfigError
from hwquant.hw import EnergyTable, PEArray, cost_report, index_bits, layer_costs
from hwquant.methods import STEConfig, prepare_qat
from hwquant.models import create_model


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))


def _batches(shape=(8, 2, 5, 5), n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _quantized(model, bits=4, batches=None):
    cfg = STEConfig(w_bits=bits, a_bits=bits, first_last_bits=None, fold_bn=False)
    return prepare_qat(model, cfg, batches or _batches()).eval()


def test_hand_worked_conv_and_linear():
    qm = _quantized(_tiny())
    rows = layer_costs(qm, torch.zeros(1, 2, 5, 5))
    conv, lin = rows
    # conv: 4 x 5 x 5 outputs, K = 2 * 3 * 3 = 18 -> 1800 MACs; 72 weights, each used 25 times
    assert conv["macs"] == 1800 and conv["weights"] == 72 and conv["params"] == 76
    # signed 4-bit input (raw data) and weights: |q| <= 8; 18 * 8 * 8 = 1152 -> 11 bits + sign
    assert conv["a_bits"] == 4 and conv["w_bits"] == 4 and conv["acc_bits"] == 12
    assert conv["bops"] == 1800 * 16
    # 2-bit bricks: a 4x4 MAC = 4 bricks; 256 PEs x 4 bricks per cycle -> ceil(7200 / 1024) = 8
    assert conv["cycles"] == 8
    # multiply 0.2 * 4 * 4 / 64 = 0.05 pJ, add 0.1 * 12 / 32 = 0.0375 pJ, per MAC
    assert conv["e_compute_pj"] == pytest.approx(1800 * (0.05 + 0.0375))
    # stored: 72 x 4 weight bits + 4 x 32 bias + 32 x (4 per-channel weight scales + 1 input scale)
    assert conv["stored_bits"] == 288 + 128 + 160 and conv["float_bits"] == 76 * 32
    # SRAM: 1800/16 weight reads x 4 bits + 1800/16 activation reads x 4 bits + 100 outputs at the linear's 4 bits
    assert conv["sram_bits"] == pytest.approx(112.5 * 4 + 112.5 * 4 + 100 * 4)
    # DRAM: stored weights + the network input read once (50 values x 4 bits)
    assert conv["dram_bits"] == 576 + 50 * 4
    assert conv["e_sram_pj"] == pytest.approx(conv["sram_bits"] * 5 / 32)
    assert conv["e_dram_pj"] == pytest.approx(conv["dram_bits"] * 20)
    # linear: 300 MACs; ReLU output is unsigned 4-bit: |q_a| <= 15; 100 * 15 * 8 = 12000 -> 14 bits + sign
    assert lin["macs"] == 300 and lin["acc_bits"] == 15
    # DRAM: weights + 3 logits at 32 bits (its input stays in the 128 KiB buffer)
    assert lin["dram_bits"] == lin["stored_bits"] + 96 and not lin["act_spill"]
    # a 10-byte buffer: every layer's input and output go through DRAM
    conv_s, lin_s = layer_costs(qm, torch.zeros(1, 2, 5, 5), PEArray(buffer_kib=10 / 1024))
    assert conv_s["dram_bits"] == 576 + 50 * 4 + 100 * 4 and conv_s["act_spill"]
    assert lin_s["dram_bits"] == lin["stored_bits"] + 100 * 4 + 96
    rep = cost_report(qm, torch.zeros(1, 2, 5, 5))
    t = rep["total"]
    assert t["macs"] == 2100 and t["compression_ratio"] == pytest.approx(t["float_bits"] / t["stored_bits"])
    assert t["e_total_pj"] == pytest.approx(sum(r["e_compute_pj"] + r["e_sram_pj"] + r["e_dram_pj"] for r in rows))
    assert t["latency_us"] == pytest.approx(t["cycles"] / 500.0)


def test_batch_is_divided_out():
    qm = _quantized(_tiny())
    one = layer_costs(qm, torch.zeros(1, 2, 5, 5))
    four = layer_costs(qm, torch.zeros(4, 2, 5, 5))
    assert [r["macs"] for r in one] == [r["macs"] for r in four]
    assert [r["e_total_pj"] for r in one] == pytest.approx([r["e_total_pj"] for r in four])


def test_macs_match_torch_flop_counter_on_resnet20():
    m = create_model("resnet20", in_channels=1, num_classes=10).eval()
    x = torch.zeros(1, 1, 28, 28)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    conv_lin = sum(v for k, v in fc.get_flop_counts()["Global"].items()
                   if "convolution" in str(k) or "addmm" in str(k) or "mm" == str(k).split(".")[-1])
    rows = layer_costs(m, x)
    assert 2 * sum(r["macs"] for r in rows) == conv_lin
    # a float model: fp32 MACs, 32-bit everything, compression ratio 1
    assert all(r["w_bits"] == 32 and r["a_bits"] == 32 for r in rows)
    e = EnergyTable()
    assert rows[3]["e_compute_pj"] == pytest.approx(rows[3]["macs"] * (e.e_fmul32 + e.e_fadd32))
    assert cost_report(m, x)["total"]["compression_ratio"] == pytest.approx(1.0)


def test_lower_precision_costs_less():
    m = create_model("resnet20", in_channels=1, num_classes=10, width=0.5)
    b = _batches((8, 1, 28, 28))
    x = torch.zeros(1, 1, 28, 28)
    fp = cost_report(m.eval(), x)["total"]
    q8 = cost_report(_quantized(m, 8, b), x)["total"]
    q4 = cost_report(_quantized(m, 4, b), x)["total"]
    assert fp["e_total_pj"] > q8["e_total_pj"] > q4["e_total_pj"]
    assert fp["cycles"] < q8["cycles"]  # 8x8 needs 16 bricks: 4 cycles per MAC on a 4-brick PE
    assert q8["cycles"] > 3.5 * q4["cycles"]  # 16 vs 4 bricks per MAC (ceil per layer)
    assert 3.0 < q8["compression_ratio"] < 4.0 < 6.0 < q4["compression_ratio"] < 8.0


def test_mixed_per_weight_widths():
    qm = _quantized(_tiny())
    w = qm[0].weight
    widths = torch.full(w.shape, 4, dtype=torch.int64)
    widths.view(-1)[:6] = 5  # six of 72 weights get an extra bit
    base = layer_costs(qm, torch.zeros(1, 2, 5, 5))[0]
    mixed = layer_costs(qm, torch.zeros(1, 2, 5, 5), weight_bits={"0": widths})[0]
    assert mixed["w_hist"] == {4: 66, 5: 6} and mixed["w_bits"] == pytest.approx((66 * 4 + 6 * 5) / 72)
    # index: 6 positions x ceil(log2 72) = 7 bits = 42 < 72 one-bit flags
    assert (mixed["index_bits"], mixed["index_format"]) == (42, "index")
    assert mixed["stored_bits"] == base["stored_bits"] + 6 + 42
    # a 5x4 MAC takes ceil(5/2) * 2 = 6 bricks; 25 uses per weight
    assert mixed["cycles"] == math.ceil(25 * (66 * 4 + 6 * 6) / 1024)
    assert mixed["e_compute_pj"] == pytest.approx(25 * (66 * 0.05 + 6 * 0.2 * 6 * 4 / 64) + 1800 * 0.1 * 13 / 32)
    # 3-bit weights on 2-bit bricks are padded to 4: same cycles, fewer stored bits
    three = layer_costs(qm, torch.zeros(1, 2, 5, 5), weight_bits={"0": 3})[0]
    assert three["cycles"] == base["cycles"] and three["stored_bits"] == base["stored_bits"] - 72


def test_index_bits_formats():
    assert index_bits(torch.tensor([3, 3])) == (0, "uniform")
    # two of four weights off the common width: 2 x (2-bit position + 1 bit: which of the other two) < 4 x 2 flags
    assert index_bits(torch.tensor([2, 3, 4, 2])) == (6, "index")
    assert index_bits(torch.tensor([2, 3, 4, 4, 2, 3])) == (12, "flags")  # 6 x 2 < 4 x (3 + 1)
    assert index_bits(torch.tensor([4] * 1023 + [5])) == (10, "index")


def test_bad_input():
    qm = _quantized(_tiny())
    x = torch.zeros(1, 2, 5, 5)
    with pytest.raises(ValueError, match="unknown layers: nope"):
        layer_costs(qm, x, weight_bits={"nope": 4})
    with pytest.raises(ValueError, match="shape"):
        layer_costs(qm, x, weight_bits={"0": torch.full((3,), 4)})
    with pytest.raises(ValueError, match="1..16"):
        layer_costs(qm, x, weight_bits={"0": 0})
    with pytest.raises(ValueError, match="input batch"):
        layer_costs(qm, torch.zeros(5))
    with pytest.raises(ConfigError, match="rows"):
        PEArray(rows=0)
    with pytest.raises(ConfigError, match="e_dram32"):
        EnergyTable(e_dram32=float("nan"))
