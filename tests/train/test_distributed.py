"""torch.distributed data-parallel training through torchrun (gloo, 2 CPU processes)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hwquant.train import load_checkpoint


@pytest.mark.slow
def test_torchrun_two_processes_trains_and_only_rank0_writes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hwquant.cli",
           "train", "--model", "small_cnn", "--dataset", "digits", "--batch-size", "32", "--epochs", "12",
           "--lr", "0.1", "--no-progress", "--no-channels-last", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["test"]["top1"] > 60.0
    assert metrics["test"]["n"] == 360  # the unsharded test set, counted once
    # each rank saw half of each epoch: 2 x 19 steps of 32 over the 1237 training images
    assert r.stdout.count("test top-1") == 1  # only rank 0 prints
    ck = load_checkpoint(out / "model.pt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
