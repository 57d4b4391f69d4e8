"""The PTQ entry point: a config dataclass selects its handler from a registry (torchao style)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..device import model_device
from ..errors import ConfigError
from ..nn.swap import read_batches

PTQ_HANDLERS: dict[type, Callable[..., tuple[nn.Module, dict[str, Any]]]] = {}


def register_ptq(config_cls: type) -> Callable:
    """Decorator: ``@register_ptq(MyConfig)`` makes ``ptq(model, MyConfig(...), loader)`` call the handler."""

    def deco(fn: Callable) -> Callable:
        PTQ_HANDLERS[config_cls] = fn
        return fn

    return deco


def ptq(model: nn.Module, config: Any, calib_loader: Iterable, **kwargs) -> tuple[nn.Module, dict[str, Any]]:
    """Post-training quantization of ``model`` with the method selected by ``type(config)``.

    ``calib_loader`` is any iterable of tensors ``x`` or ``(x, y)`` pairs (a list, a generator, a
    ``DataLoader``); it is read once (at most ``config.calib_batches`` batches, kept in memory and moved to
    the model's device), so a one-shot generator serves every pass of the method.

    Returns ``(qmodel, report)``; the input model is not modified.  ``report`` is JSON-serialisable.
    """
    handler = PTQ_HANDLERS.get(type(config))
    if handler is None:
        names = ", ".join(sorted(c.__name__ for c in PTQ_HANDLERS))
        raise ConfigError(f"no PTQ method for {type(config).__name__}; known configs: {names}")
    calib = read_batches(calib_loader, max_batches=getattr(config, "calib_batches", None), device=model_device(model))
    return handler(model, config, calib, **kwargs)
