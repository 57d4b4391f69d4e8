"""``hwquant eval``: top-1 / top-5 of a float or quantized checkpoint on its test split."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..device import DEVICES, resolve_device
from ..train import evaluate
from .common import (
    DEVICE_HELP,
    check_device,
    check_output_dir,
    checkpoint_loaders,
    doc,
    load_model,
    save_config,
    set_threads,
    write_json,
)


@dataclass(frozen=True)
class EvalOptions:
    """``hwquant eval``: top-1/top-5 of a float or quantized checkpoint on the test set."""

    checkpoint: str = field(default="runs/train/model.pt", metadata=doc("checkpoint (float or quantized)"))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory (default: as in the checkpoint)"))
    batch_size: int = field(default=512, metadata=doc("evaluation batch size"))
    device: str = field(default="auto", metadata=doc(DEVICE_HELP, DEVICES))
    threads: int | None = field(default=None, metadata=doc("torch CPU threads"))
    out: str | None = field(default=None, metadata=doc("write eval.json here (default: print only)"))
    progress: bool = field(default=True, metadata=doc("show progress bars"))

    def __post_init__(self) -> None:
        check_device(self.device)


def run_eval(cfg: EvalOptions) -> dict[str, Any]:
    """Evaluate a float or quantized checkpoint on its dataset's test split."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if cfg.out:
        check_output_dir(cfg.out)
    model, ck = load_model(cfg.checkpoint)
    loaders = checkpoint_loaders(ck, cfg.data_dir, cfg.batch_size)
    res = evaluate(model, loaders.test, progress=cfg.progress, device=device)
    res = {"checkpoint": str(cfg.checkpoint), "dataset": ck["data"]["dataset"], **res}
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", res)
        save_config(out, cfg)
    print(json.dumps(res))
    return res
