"""Save a float or quantized model and rebuild it later: ``hq.save`` / ``hq.load``.

The file is the same checkpoint the commands write (``model.pt`` of ``hwquant train / ptq / qat``; see
:mod:`hwquant.train.checkpoint`): the state dict plus what rebuilds the module structure it belongs to:

* ``model_args``: how to build the float network (``model.hwquant_args`` of a bundled model or a model loaded
  from a user's ``.py`` file, see :mod:`hwquant.models`); a network the library did not build has none, and
  :func:`load` then takes the float network from the caller (``model=``);
* ``ptq`` / ``qat``: the quantization method and its config (``{"method": name, "config": {...}}``), from
  which the quantized structure (folded BatchNorm, fake quantizers, MPQ's extra state, bit windows...) is
  rebuilt before the state dict is loaded into it.

Loading uses ``torch.load(weights_only=True)``; a checkpoint whose ``model_args`` name a user's ``.py`` file
imports (runs) that file again, so load those only from sources you trust, as you would run their code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError, ConfigError
from .methods import QAT_CONFIGS, GGDPTQConfig, ObserverPTQConfig, build_qat_model
from .models import create_model_from_args
from .nn import fold_batchnorm, quantize_model
from .train.checkpoint import load_checkpoint, nonfinite_tensor, save_checkpoint, state_dict_mismatch

__all__ = ["load", "method_meta", "rebuild", "save"]


def method_meta(config: Any) -> dict[str, Any]:
    """``{"ptq": {...}}`` / ``{"qat": {...}}`` for a method config (``{}`` for ``None``: a float model)."""
    if config is None:
        return {}
    if isinstance(config, GGDPTQConfig):
        return {"ptq": {"method": "ggd", "config": asdict(config)}}
    if isinstance(config, ObserverPTQConfig):
        return {"ptq": {"method": config.observer, "config": asdict(config)}}
    for name, cls in QAT_CONFIGS.items():
        if type(config) is cls:
            return {"qat": {"method": name, "config": asdict(config)}}
    kind = type(config).__name__ if is_dataclass(config) else repr(config)
    raise ConfigError(f"cannot save a model quantized with {kind}: not a PTQ or QAT config of hwquant")


def save(model: nn.Module, path: str | os.PathLike, config: Any = None, *, model_args: dict | None = None,
         **extra: Any) -> Path:
    """Write ``model`` to ``path`` (atomically) so that :func:`load` rebuilds it.

    Args:
        model: the float model, or what :func:`hwquant.ptq` / :func:`hwquant.prepare_qat` returned.
        config: the PTQ / QAT config that quantized it (``None`` for a float model).
        model_args: how to rebuild the float network (default ``model.hwquant_args``; a network the library
            did not build has none, and is then given to :func:`load` as ``model=``).
        extra: more entries for the checkpoint (e.g. ``metrics``), JSON-like values and tensors.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"save expects an nn.Module, got {type(model).__name__}")
    payload: dict[str, Any] = {"model": model.state_dict(), **method_meta(config), **extra}
    args = model_args if model_args is not None else getattr(model, "hwquant_args", None)
    if args is not None:
        payload["model_args"] = args
    return save_checkpoint(path, payload)


def rebuild_quantized(model: nn.Module, ptq_meta: dict[str, Any]) -> nn.Module:
    """The quantized module structure a PTQ checkpoint's state dict belongs to (parameters not loaded)."""
    if ptq_meta["method"] == "ggd":
        from .methods.ggd_ptq import set_own_bias

        gcfg = GGDPTQConfig(**ptq_meta["config"])
        qmodel = quantize_model(fold_batchnorm(model), gcfg.recipe())
        if gcfg.bias == "own":
            set_own_bias(qmodel, gcfg.bias_bits, gcfg.fl_radius, placeholder=True)
        return qmodel
    ocfg = ObserverPTQConfig(**ptq_meta["config"])
    return quantize_model(fold_batchnorm(model) if ocfg.fold_bn else model, ocfg.recipe())


def rebuild(ck: dict[str, Any], path: str | os.PathLike = "checkpoint", model: nn.Module | None = None) -> nn.Module:
    """The model of a loaded checkpoint ``ck``, weights loaded, in eval mode on the CPU.

    ``model``: the float network to rebuild on (required when the checkpoint has no ``model_args``; it is
    consumed: quantization folds and swaps its layers).  Every problem is a one-line
    :class:`~hwquant.errors.CheckpointError` naming ``path``.
    """
    if "model" not in ck:
        raise CheckpointError(f"{path} has no model (is it a training 'last.pt'? use model.pt)")
    if model is None and "model_args" not in ck:
        raise CheckpointError(f"{path} does not say how to build its network (saved without model_args): "
                              "pass the float network, hq.load(path, model=MyNet())")
    if model is None and isinstance(ck["model_args"], dict) and ck["model_args"].get("source") == "user":
        try:
            model = create_model_from_args(ck["model_args"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: cannot rebuild its model {ck['model_args'].get('name')!r}: {e}") from None
    try:
        if model is None:
            model = create_model_from_args(ck["model_args"])
        if "ptq" in ck:
            model = rebuild_quantized(model, ck["ptq"])
        elif "qat" in ck:
            if ck["qat"]["method"] == "fp32":
                model = fold_batchnorm(model)
            else:
                model = build_qat_model(model, QAT_CONFIGS[ck["qat"]["method"]](**ck["qat"]["config"]))
        problem = state_dict_mismatch(model, ck["model"])
        if problem:
            raise CheckpointError(f"{path} does not match its model description: {problem}")
        bad = nonfinite_tensor(ck["model"])
        if bad:
            raise CheckpointError(f"{path}: {bad} holds NaN or infinite values (a diverged training?)")
        model.load_state_dict(ck["model"])
    except (RuntimeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} does not match its model description: {str(e).splitlines()[0]}") from None
    model.eval()
    return model


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model :func:`save` (or a command: ``model.pt``) wrote to ``path``; eval mode, on the CPU.

    ``model``: the float network, for a checkpoint saved without ``model_args`` (a network the library did not
    build); it is consumed.
    """
    return rebuild(load_checkpoint(path), path, model)
