"""Where a run computes: ``resolve_device`` turns ``auto`` / ``cpu`` / ``cuda`` into a ``torch.device``,
``to_device`` moves a batch there, ``DeviceLoader`` moves every batch of a loader there.

``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.  Asking for ``cuda`` on a machine
without CUDA is a one-line :class:`~hwquant.errors.ConfigError`.  Data stays on the CPU until a batch is
needed; a pinned batch is copied with ``non_blocking=True`` (the copy overlaps the previous step's compute).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["DEVICES", "DeviceLoader", "model_device", "on_device", "resolve_device", "supports_channels_last",
           "to_device"]

#: The device names the command line accepts.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or ``None``) -> ``cuda`` if available else ``cpu``; ``cpu``; ``cuda`` or ``cuda:N``.

    On CUDA this also turns TF32 off for matmuls and cuDNN convolutions (process-wide).

    Raises:
        ConfigError: an unknown name, or CUDA requested but not available (or ``cuda:N`` beyond the
            devices present).
    """
    if isinstance(name, torch.device):
        dev = name
    else:
        text = "auto" if name is None else str(name).strip().lower()
        if text == "auto":
            text = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} requested but CUDA is not available "
                          "(torch.cuda.is_available() is False); use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {str(dev)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    # The exact-integer eval path of the quantized layers computes integer accumulators as float32 sums of
    # integer products and relies on every such sum below 2^24 being exact.  TF32 rounds the matmul/conv
    # inputs to a 10-bit mantissa, which would break that (and differ from the CPU results), so it stays off.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return dev


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device``: a tensor, or a tuple / list / dict of them (nested).

    Pinned CPU tensors are copied with ``non_blocking=True``; the memory format (e.g. channels_last) is kept.
    Anything else is returned unchanged.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.device.type == "cpu" and batch.is_pinned())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(b, device) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); ``cpu`` for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class DeviceLoader:
    """Wraps an iterable of batches so that each batch comes out on ``device`` (see :func:`to_device`).

    ``len()``, ``set_epoch`` and every other attribute are the wrapped loader's.
    """

    def __init__(self, loader: Iterable, device: torch.device | str) -> None:
        self.loader = loader
        self.device = torch.device(device)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield to_device(batch, self.device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # TypeError if the loader has no len()

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def on_device(loader: Iterable | None, device: torch.device | str) -> DeviceLoader | None:
    """``DeviceLoader(loader, device)``, or ``None`` for ``None``."""
    return None if loader is None else DeviceLoader(loader, device)


def supports_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` runs on a channels-last copy of itself and of (two images of) the 4-D batch ``x``.

    Channels-last is faster for CPU convolutions, but a forward that calls ``x.view(...)`` on a channels-last
    feature map raises; such a model keeps the default memory format.  The model is not modified.
    """
    import copy

    if x.dim() != 4:
        return False
    probe = copy.deepcopy(model).to(memory_format=torch.channels_last).eval()
    try:
        with torch.no_grad():
            probe(x[:2].to(model_device(model)).contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        return False
    return True
