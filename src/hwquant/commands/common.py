"""Shared by the commands: option help and checks, output directories, checkpoints and their data splits,
messages, and the ARC gradient-quantization options that ``train`` and ``qat`` share."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import config as cfgmod
from ..data import DATASET_NAMES, make_loaders, parse_image_size
from ..device import DEVICES, resolve_device, supports_channels_last
from ..errors import ConfigError
from ..fileio import atomic_write_text
from ..methods import ARCConfig, prepare_arc
from ..models import list_models
from ..models.registry import build_model
from ..models.user import check_user_spec, is_user_spec
from ..numerics.gradient import GRAD_CLIPS
from ..saved import rebuild
from ..train import evaluate, fit, load_checkpoint
from ..train.distributed import current, init_from_env, rank_device

DATASETS = DATASET_NAMES


DEVICE_HELP = "device: auto (cuda if available, else cpu), cpu or cuda"


MODEL_HELP = ("model: a registered name ({names}) or a user's model, path/to/file.py:ClassName, "
              "path/to/file.py:factory or package.module:factory (called with in_channels, num_classes and "
              "image_size where it names them)")


IMAGE_SIZE_HELP = ("folder dataset: resize every image to N x N or HxW pixels (none: the most common size "
                   "among the images)")


def doc(text: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"help": text}
    if choices:
        meta["choices"] = choices
    return meta


def check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def check_model(name: str) -> None:
    """A registered model name, or the syntax of a user's ``file.py:Name`` / ``module:Name`` (loaded later)."""
    if is_user_spec(name):
        check_user_spec(name)
    elif name not in list_models():
        raise ConfigError(f"model must be one of {', '.join(list_models())} or path/to/file.py:Name or "
                          f"package.module:Name, got {name!r}")


def check_device(name: str) -> None:
    check_choice("device", name, DEVICES)


def check_image_size(image_size: str | None, dataset: str | None) -> None:
    if image_size is not None:
        parse_image_size(image_size)
        if dataset != "folder":
            raise ConfigError(f"image_size applies to the folder dataset only, not {dataset}")


def use_channels_last(wanted: bool, model: nn.Module, loaders) -> bool:
    """Channels-last when asked for and the model's forward allows it (``x.view`` on a channels-last feature
    map raises); otherwise every loader goes back to the default memory format, with a notice."""
    if not wanted:
        return False
    x = next(iter(loaders.test))[0]
    if supports_channels_last(model, x):
        return True
    say(f"note: {type(model).__name__} does not run in channels-last memory format (e.g. x.view after a conv); "
         "using the default format")
    for loader in (loaders.train, loaders.calib, loaders.test):
        if loader is not None:
            loader.channels_last = False
    return False


def seeded_model(name: str, seed: int, **kwargs) -> nn.Module:
    """``build_model(name, **kwargs)`` with its initial weights drawn after ``torch.manual_seed(seed)``, the
    caller's global RNG state restored afterwards (a library call does not reseed the user's random streams)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(name, **kwargs)


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` for a command's ``--threads`` (``None``: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class GradQuantOptions:
    """The ARC gradient-quantization options shared by ``hwquant train`` and ``hwquant qat``."""

    grad_bits: int | None = field(default=None, metadata=doc(
        "ARC: quantize every conv/linear error and weight gradient to this many bits (none: float gradients)"))
    grad_rounding: str = field(default="nearest", metadata=doc(
        "ARC: gradient rounding (nearest: half to even, the default; zero: round toward zero, the paper's)",
        ("nearest", "zero", "stochastic")))
    grad_quant_clip: str = field(default="search", metadata=doc(
        "ARC: gradient clip policy (search: the z-score clip searched per tensor and step; zscore: one fixed k, "
        "the paper read literally)", GRAD_CLIPS))
    grad_k: float = field(default=3.0, metadata=doc("ARC: z-score clip c = min(max|g|, |mu| + k sigma)"))
    grad_clip_fraction: float | None = field(default=None, metadata=doc(
        "ARC search clip: share of elements it may saturate (default 1e-3 / (2^bits - 1))"))
    grad_error_scale: str = field(default="sample", metadata=doc(
        "ARC: one error-gradient step per tensor or per sample", ("tensor", "sample")))
    grad_skip_first_last: bool = field(default=True, metadata=doc("ARC: first conv / last FC gradients stay float"))
    grad_error: bool = field(default=True, metadata=doc(
        "ARC: quantize each layer's error gradient (before its backward: the input and weight gradients use it)"))
    grad_weight: bool = field(default=True, metadata=doc("ARC: quantize each layer's weight gradient"))



@dataclass(frozen=True)
class TrainingOptions(GradQuantOptions):
    """What ``hwquant train`` and ``hwquant qat`` share besides ARC: the optimizer's batch, momentum and warmup,
    augmentation, and where and how the run executes."""

    batch_size: int = field(default=128, metadata=doc("training batch size (per process)"))
    momentum: float = field(default=0.9, metadata=doc("SGD momentum (Nesterov)"))
    warmup_epochs: float = field(default=0.0, metadata=doc("linear warmup epochs"))
    augment: bool = field(default=True, metadata=doc("train-time augmentation (crop, flip)"))
    channels_last: bool = field(default=True, metadata=doc("channels-last memory format (faster on CPU)"))
    device: str = field(default="auto", metadata=doc(DEVICE_HELP, DEVICES))
    threads: int | None = field(default=None, metadata=doc("torch CPU threads"))
    resume: bool = field(default=False, metadata=doc("resume from OUT/last.pt"))
    progress: bool = field(default=True, metadata=doc("show progress bars"))

def arc_config(opts) -> ARCConfig | None:
    """The ARC gradient-quantization config of train/qat options (``None`` when ``grad_bits`` is unset)."""
    cfg = ARCConfig(bits=8 if opts.grad_bits is None else opts.grad_bits, rounding=opts.grad_rounding,
                    clip=opts.grad_quant_clip, k=opts.grad_k, fraction=opts.grad_clip_fraction,
                    error_scale=opts.grad_error_scale,
                    skip_first_last=opts.grad_skip_first_last,
                    error_grad=opts.grad_error, weight_grad=opts.grad_weight,
                    seed=opts.seed)  # validates every grad_* field, also when ARC is off
    return None if opts.grad_bits is None else cfg


def install_arc(model: nn.Module, opts, out: Path, extra_state: dict[str, Any]):
    """ARC's hooks on ``model`` (``None`` when ``grad_bits`` is unset) and the fit step hook that keeps the
    ARC state (clip record, step, stochastic-rounding generator) in ``extra_state`` for every checkpoint; on
    ``--resume`` that state comes back from ``OUT/last.pt``, so a resumed run records and rounds as an
    uninterrupted one."""
    acfg = arc_config(opts)
    if acfg is None:
        return None, None, None
    from dataclasses import replace

    acfg = replace(acfg, record=True)  # the clip values go to OUT/arc_clips.json
    handle = prepare_arc(model, acfg)
    what = " and ".join(w for w, on in (("error", acfg.error_grad), ("weight", acfg.weight_grad)) if on)
    say(f"ARC: {acfg.bits}-bit {what} gradients ({acfg.rounding}, {acfg.clip} clip"
         f"{f', k = {acfg.k:g}' if acfg.clip == 'zscore' else ''}"
         f"{', error steps per sample' if acfg.error_scale == 'sample' else ''}) in {len(handle.layers)} layers")
    last = out / "last.pt"
    if opts.resume and last.exists():
        saved = load_checkpoint(last).get("arc") or {}
        handle.clips = {k: [tuple(r) for r in v] for k, v in saved.get("clips", {}).items()}
        handle.step = int(saved.get("step", 0))
        if handle.generator is not None and "rng" in saved:
            handle.generator.set_state(saved["rng"])

    def keep_state(_model, _step) -> None:
        state = {"clips": handle.clips, "step": handle.step}
        if handle.generator is not None:
            state["rng"] = handle.generator.get_state()
        extra_state["arc"] = state

    return handle, asdict(acfg), keep_state


def fit_and_evaluate(model: nn.Module, loaders, cfg, out: Path, extra: dict[str, Any], device) -> dict[str, Any]:
    """The training part of ``train`` / ``qat``: ARC's hooks when ``cfg.grad_bits`` is set, :func:`fit` (with
    checkpoints in ``out`` and ``--resume``), then the hooks removed, the clip record written and the model
    evaluated on the test split.  Returns ``{"history", "seconds", "final", "arc"}``."""
    handle, arc_meta, arc_hook = install_arc(model, cfg, out, extra)
    t0 = time.perf_counter()
    history = fit(model, loaders.train, cfg.train_config(), eval_loader=loaders.test, out_dir=out, resume=cfg.resume,
                  progress=cfg.progress, extra_state=extra, step_hook=arc_hook, device=device)
    seconds = time.perf_counter() - t0
    if handle is not None:
        handle.remove()
        if current().is_main:
            save_arc_clips(out, handle)
    final = history.get("final_eval") or evaluate(model, loaders.test, device=device)
    return {"history": history, "seconds": seconds, "final": final, "arc": arc_meta}


def save_arc_clips(out: Path, handle) -> None:
    """Per layer, the clip value and max|g| of every quantized gradient: ``{layer: {kind: [[step, c, max]]}}``.
    Nothing is written when nothing was recorded and a record exists (a finished run, resumed)."""
    if not handle.clips and (out / "arc_clips.json").exists():
        return
    clips: dict[str, dict[str, list]] = {}
    for layer, rows in handle.clips.items():
        for step, kind, c, mx in rows:
            clips.setdefault(layer, {}).setdefault(kind, []).append([step, c, mx])
    write_json(out / "arc_clips.json", clips)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def save_config(out: Path, cfg: Any) -> None:
    atomic_write_text(out / "config.yaml", cfgmod.dump_yaml(cfg))


def say(msg: str) -> None:
    if current().is_main:
        print(msg, flush=True)


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a float or quantized model from a checkpoint written by train/ptq/qat (or :func:`hwquant.save`);
    returns (model, ckpt).  The model is on the CPU; see :func:`hwquant.saved.rebuild`."""
    ck = load_checkpoint(path)
    return rebuild(ck, path), ck


def checkpoint_loaders(ck: dict[str, Any], data_dir: str | None, batch_size: int):
    """The calibration and test loaders of a checkpoint's data split (its train loader is not for training)."""
    d = ck["data"]
    return make_loaders(d["dataset"], data_dir=data_dir or d.get("data_dir"), batch_size=batch_size,
                        eval_batch_size=batch_size, calib_size=d["calib_size"], seed=d["seed"],
                        augment=False, fallback=False, drop_last=False, image_size=d.get("image_size"))


def float_eval(model: nn.Module, ck: dict[str, Any], loaders, data_dir: str | None, *, progress: bool,
                device) -> dict[str, float]:
    """The float model's test accuracy: the checkpoint's own record (``metrics``, written by ``train`` after
    its last evaluation) when this is the test split it was measured on (the checkpoint's data, not another
    ``--data-dir``, the same number of images, one process), else evaluated now."""
    m = ck.get("metrics")
    test = loaders.test
    if (data_dir is None and isinstance(m, dict) and {"top1", "top5", "loss", "n"} <= set(m)
            and getattr(test, "world_size", 1) == 1 and m["n"] == len(getattr(test, "data", ()))):
        return {k: m[k] for k in ("top1", "top5", "loss", "n")}
    return evaluate(model, test, progress=progress, desc="eval fp32", device=device)


def float_eval_warnings(layers: dict[str, str]) -> list[str]:
    """One line per layer that evaluated in float (no integer accumulator), naming it and why."""
    return [f"{name} evaluates in float, not on integers: {why}" for name, why in layers.items()]


def warn(msg: str) -> None:
    print(f"hwquant: warning: {msg}", file=sys.stderr, flush=True)


def resumable(out: str | Path) -> bool:
    """Whether ``out`` holds a ``last.pt`` to resume from (for callers that resume when they can)."""
    return (Path(out) / "last.pt").is_file()


def check_output_dir(out: str | Path, what: str = "--out") -> Path:
    """``out`` as a Path, checked before any work: it must be (or be creatable as) a writable directory.

    Raises :class:`~hwquant.errors.ConfigError` naming the problem: a file where the directory should be, a
    file among its parents, or no write permission; nothing is created here.
    """
    import os

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{what} {path}: {probe} is a file, so the directory cannot be created")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {probe} is not writable")
    return path


def check_resume(cfg, out: Path) -> None:
    if cfg.resume and not resumable(out):
        raise ConfigError(f"--resume: {out / 'last.pt'} not found (nothing to resume; drop --resume to start afresh)")


def start_training(cfg: TrainingOptions):
    """The start of a training command (``train``, ``qat``): threads, device, the ``torch.distributed`` process
    group when launched by torchrun (each rank on its own device), the output directory checked and
    ``--resume`` validated.  Returns ``(device, dist_info, out)``."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist_info = init_from_env(device=device)
    device = rank_device(device)
    out = check_output_dir(cfg.out)
    check_resume(cfg, out)
    return device, dist_info, out


def limited(loader, images: int | None):
    """Batches of ``loader`` holding at most ``images`` images in all."""
    seen = 0
    for batch in loader:
        if images is not None and seen >= images:
            return
        x, y = batch[0], batch[1]
        if images is not None and seen + x.shape[0] > images:
            x, y = x[: images - seen], y[: images - seen]
        seen += x.shape[0]
        yield x, y
