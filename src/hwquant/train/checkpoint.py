"""Checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors and primitives (no pickled classes), so ``torch.load(...,
weights_only=True)`` can read it safely.  Tensors are saved from the CPU (a model trained on CUDA gives the
same file as one trained on the CPU), so any machine can load them.  It is written to a temporary file in the
target directory and ``os.replace``-d into place, so a crash never leaves a half-written checkpoint under the
real name.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..fileio import atomic_write

FORMAT = "hwquant-checkpoint-v1"


def _cpu(obj: Any) -> Any:
    """``obj`` with every tensor (in nested dicts, lists, tuples) on the CPU; ``obj`` itself if all already were.

    Dicts are shallow-copied, so a state dict keeps its ``_metadata``.
    """
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        items = {k: _cpu(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        new = copy.copy(obj)
        new.update(items)
        return new
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        items = [_cpu(v) for v in obj]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return type(obj)(items)
    return obj


def state_dict_mismatch(model: torch.nn.Module, sd: dict[str, Any]) -> str | None:
    """One line naming why ``sd`` does not fit ``model`` (the first missing key, unexpected key or shape
    mismatch, and how many problems there are in all), or ``None`` when every key and shape matches."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # an empty tensor in the model takes the file's shape on load (quantizer buffers sized at calibration)
    shapes = [k for k in own if k in sd and hasattr(sd[k], "shape") and hasattr(own[k], "shape")
              and own[k].numel() > 0 and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = len(missing) + len(unexpected) + len(shapes)
    if not problems:
        return None
    if shapes:  # the most telling: another width or input channel count
        k = shapes[0]
        first = f"shape mismatch for {k!r}: {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model"
    elif missing:
        first = f"missing key {missing[0]!r}"
    else:
        first = f"unexpected key {unexpected[0]!r}"
    more = (f" ({problems} problems: {len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} shape mismatches)") if problems > 1 else ""
    return first + more


def nonfinite_tensor(sd: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor of ``sd`` holding NaN or infinity, or ``None``."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Save ``payload`` (tensors, dicts, lists, numbers, strings) atomically with a format tag.

    Tensors on another device (CUDA) are saved from a CPU copy.
    """
    data = _cpu({"format": FORMAT, **payload})
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`~hwquant.errors.CheckpointError` with a one-line message if the file is missing,
    unreadable, or not an hwquant checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hwquant checkpoint (missing format tag {FORMAT!r})")
    return data
