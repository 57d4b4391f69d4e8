"""What every export check counts: codes that differ between two executors of one network, layer by layer, and
how often their predictions agree.  One routine for :func:`~hwquant.export.compare` (fake quant vs integer
model), :func:`~hwquant.export.onnx.check_onnx` (onnxruntime vs integer model) and
:func:`~hwquant.export.qonnx.check_qonnx` (a QONNX executor vs integer model)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["Tally", "labelled_batches"]


def labelled_batches(batches: Iterable, max_batches: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``(x, y)`` per batch of ``x`` or ``(x, y, ...)`` (``y = None`` for bare tensors), at most ``max_batches``."""
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            return
        if isinstance(batch, (tuple, list)):
            yield batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            yield batch, None


def _int64(a) -> np.ndarray:
    return a.detach().cpu().numpy().astype(np.int64) if isinstance(a, torch.Tensor) else np.asarray(a, np.int64)


class Tally:
    """Counts accumulated over batches: per named value the codes compared, those that differ and the largest
    difference in LSB (:meth:`codes`); top-1 of the reference and the other executor and their agreement
    (:meth:`predictions`)."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, int]] = {}
        self.images = 0  # labelled images
        self.compared = 0  # predictions compared
        self.agree = 0
        self.correct = {"reference": 0, "other": 0}

    def codes(self, name: str, got, want) -> None:
        d = np.abs(_int64(got) - _int64(want))
        row = self.layers.setdefault(name, {"codes": 0, "codes_diff": 0, "max_lsb": 0})
        row["codes"] += int(d.size)
        row["codes_diff"] += int((d > 0).sum())
        row["max_lsb"] = max(row["max_lsb"], int(d.max()) if d.size else 0)

    def predictions(self, reference: torch.Tensor, other: torch.Tensor, y: torch.Tensor | None) -> None:
        pr, po = reference.argmax(1), other.argmax(1)
        self.agree += int((pr == po).sum())
        self.compared += pr.numel()
        if y is not None:
            self.correct["reference"] += int((pr == y).sum())
            self.correct["other"] += int((po == y).sum())
            self.images += y.numel()

    def top1(self, which: str) -> float:
        return 100.0 * self.correct[which] / max(self.images, 1)

    @property
    def prediction_agree(self) -> float:
        return 100.0 * self.agree / max(self.compared, 1)

    def totals(self) -> dict[str, Any]:
        """``codes``, ``codes_diff``, ``max_code_lsb`` over every value, and ``first_diff``: the first value (in
        the order first seen) with a differing code, or ``None``."""
        rows = self.layers.values()
        return {"codes": sum(r["codes"] for r in rows), "codes_diff": sum(r["codes_diff"] for r in rows),
                "max_code_lsb": max((r["max_lsb"] for r in rows), default=0),
                "first_diff": next((n for n, r in self.layers.items() if r["codes_diff"]), None)}
