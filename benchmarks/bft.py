"""Cost of GGD PTQ's backward-forward tuning (BFT), with and without the prefix cache, one run.

BFT scores every candidate FL (two per operand, per layer, per pass) with a forward pass over the scored
calibration images (and the held-out ones for a candidate that improves): it is most of GGD PTQ's time.
:class:`hwquant.methods.ggd_ptq.PrefixCache` replays the quantized layers that run before the tuned one.  For each
setting, the same calibrated model (GGD W8A8, and W4A4 with first/last 8-bit; the demo's 128 scored and 256
held-out images) is tuned with the cache and without it, alternately (``rounds`` each); reported: median
seconds, ``x no cache`` (the median per-round ratio), the forward passes, the share of layer calls replayed,
and whether both gave the same changes and scores (they must: it is checked and the benchmark fails otherwise).

Full mode: the demo's ResNet-20 / Fashion-MNIST checkpoint; quick mode: the small CNN on digits.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .common import float_checkpoint, markdown_table, write_results

NAME = "bft"
SETTINGS = {"W8A8": {"w_bits": 8, "a_bits": 8}, "W4A4, first/last 8-bit": {"w_bits": 4, "a_bits": 4,
                                                                           "first_last_bits": 8}}
SCORED, HELD_OUT = 128, 256  # the demo's


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.methods import GGDPTQConfig, ptq
    from hwquant.methods.bft import CalibScorer, backward_forward_tuning
    from hwquant.nn import fold_batchnorm
    from hwquant.pipelines import checkpoint_loaders, load_model

    model, ck = load_model(float_checkpoint(quick, "bench_bft_digits"))
    loaders = checkpoint_loaders(ck, None, 256)
    ref = fold_batchnorm(model).eval()
    rounds = 1 if quick else 3
    rows = []
    for label, bits in SETTINGS.items():
        calibrated, _ = ptq(model, GGDPTQConfig(bft=False, **bits), loaders.calib)
        scorer = CalibScorer(ref, loaders.calib, SCORED, criterion="kl")
        holdout = CalibScorer(ref, loaders.calib, HELD_OUT, criterion="kl", skip=SCORED)
        times: dict[bool, list[float]] = {True: [], False: []}
        out: dict[bool, dict[str, Any]] = {}
        for _ in range(rounds):
            for cached in (True, False):
                qm = copy.deepcopy(calibrated)
                t0 = time.perf_counter()
                out[cached] = backward_forward_tuning(qm, scorer, holdout=holdout, prefix_cache=cached)
                times[cached].append(time.perf_counter() - t0)
        same = ({k: v for k, v in out[True].items() if k != "prefix_cache"}
                == {k: v for k, v in out[False].items() if k != "prefix_cache"})
        if not same:
            raise AssertionError(f"{label}: BFT with the prefix cache changed the result")
        pc = out[True]["prefix_cache"]
        for cached in (True, False):
            rows.append({"setting": label, "bft": "prefix cache" if cached else "no cache",
                         "seconds": statistics.median(times[cached]),
                         "x_no_cache": statistics.median(a / b for a, b in zip(times[cached], times[False],
                                                                                strict=True)),
                         "evaluations": out[cached]["evaluations"], "changes": len(out[cached]["changes"]),
                         "replayed_pct": 100.0 * pc["replayed"] / max(1, pc["replayed"] + pc["computed"])
                         if cached else 0.0, "same_result": same})
    md = "\n".join([
        f"BFT of GGD PTQ ({'small CNN on digits' if quick else 'ResNet-20 on Fashion-MNIST, the demo checkpoint'}), "
        f"{SCORED} scored + {HELD_OUT} held-out calibration images, KL criterion; {rounds} alternating round(s), "
        "medians; `x no cache`: median per-round ratio; evaluations: passes over the scored or held-out images; "
        "`replayed %`: layer calls answered from the cache.", "",
        markdown_table(rows, [("setting", "setting"), ("bft", "BFT"), ("seconds", "s"), ("x_no_cache", "x no cache"),
                              ("evaluations", "evaluations"), ("replayed_pct", "replayed %"),
                              ("changes", "FL changes kept"), ("same_result", "same result")]),
        "",
    ])
    results = {"rounds": rounds, "scored": SCORED, "held_out": HELD_OUT, "rows": rows}
    json_path, md_path = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(json_path), "md": str(md_path)}
