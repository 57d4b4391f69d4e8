"""Data-parallel training: ``torchrun`` with 2 processes against 1 process of the same global batch.

``hwquant train`` on ResNet-20 / Fashion-MNIST for one epoch (seed 0), once in one process with batch 128
(``--threads 2``) and once as ``torchrun --nproc_per_node=2`` with batch 64 per process
(``OMP_NUM_THREADS=1``, gloo): the same global batch, so the same weights up to float summation order (see
:mod:`hwquant.train.distributed`).  Reported: training throughput (images/s, from each run's ``train_seconds``)
and its ratio, the test top-1 of both, and their weight distance, next to a control: the single-process run
with one thread, whose distance from the reference is what float summation order alone does to an epoch.
On a 2-core machine the two processes share the cores the one process had, so the ratio measures the cost of the
all-reduces and of the smaller per-process batches, not a speed-up.  Quick mode: the small CNN on digits, 4 epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import markdown_table, write_results

NAME = "distributed"


def _run(args: list[str], nproc: int, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    pre = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    r = subprocess.run([*pre, "-m", "hwquant.cli", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} with {nproc} process(es) failed: {r.stderr[-2000:]}")


def _distance(ref: dict, other: dict) -> dict[str, Any]:
    """Largest absolute difference (and where) and relative L2 distance over the trained parameters."""
    import torch

    keys = [k for k, v in ref.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not k.endswith(("running_mean", "running_var"))]
    worst, where, num, den = 0.0, "-", 0.0, 0.0
    for k in keys:
        d = (ref[k].double() - other[k].double())
        m = float(d.abs().max()) if d.numel() else 0.0
        if m > worst:
            worst, where = m, k
        num += float(d.pow(2).sum())
        den += float(ref[k].double().pow(2).sum())
    return {"max |dw|": worst, "worst tensor": where, "rel. L2 of weights": (num / den) ** 0.5 if den else 0.0}


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from hwquant.train import load_checkpoint

    if quick:
        common = ["--model", "small_cnn", "--dataset", "digits", "--epochs", "4", "--lr", "0.1"]
        batch = 64
    else:
        common = ["--model", "resnet20", "--dataset", "fashion_mnist", "--epochs", "1"]
        batch = 128
    common += ["--seed", "0", "--no-progress", "--no-channels-last"]
    rows = []
    cores = 2 if (os.cpu_count() or 1) >= 2 else 1
    # 1 process with every core (the reference), 2 processes, and the control: 1 process with one thread less,
    # the same arithmetic in another float summation order (so its distance from the reference is what float
    # rounding alone does to an epoch of SGD, against which the 2-process distance is judged)
    plan = [(1, cores), (2, max(cores // 2, 1))] + ([(1, 1)] if cores > 1 else [])
    with tempfile.TemporaryDirectory(prefix="hwquant-ddp-") as d:
        for nproc, threads in plan:
            out = Path(d) / f"p{nproc}t{threads}"
            extra = ["--threads", str(threads)] if nproc == 1 else []
            _run(["train", *common, *extra, "--batch-size", str(batch // nproc), "--out", str(out)], nproc, threads)
            m = json.loads((out / "metrics.json").read_text())
            epochs = len(m["history"])
            rows.append({"processes": nproc, "batch per process": batch // nproc, "global batch": batch,
                         "threads per process": threads, "train s": m["train_seconds"], "epochs": epochs,
                         "test top-1": m["test"]["top1"], "_model": load_checkpoint(out / "model.pt")["model"]})
    ref = rows[0]["_model"]
    for r in rows:
        r.update(_distance(ref, r.pop("_model")))
        r["x 1 process time"] = r["train s"] / rows[0]["train s"]
    diff = rows[1]["max |dw|"]
    results = {"rows": rows, "max_weight_diff": diff, "args": common}
    md = (markdown_table(rows, [(k, k) for k in ("processes", "batch per process", "global batch",
                                                  "threads per process", "epochs", "train s", "x 1 process time",
                                                  "test top-1", "max |dw|", "worst tensor", "rel. L2 of weights")])
          + "\n\nDistances are to the first row (1 process, every core) over the trained parameters (BatchNorm "
            "running statistics excluded): `max |dw|` the largest absolute difference and the tensor it is in, "
            "`rel. L2` = ||w - w_ref|| / ||w_ref|| over all parameters. The last row is the same single-process "
            "run with one thread: only the float summation order differs.\n")
    jp, mp = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(jp), "md": str(mp)}
