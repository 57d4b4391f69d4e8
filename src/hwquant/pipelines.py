"""The commands behind the CLI, as library functions: train, PTQ, QAT, eval, export, cost, report (the demo,
which composes them, is :mod:`hwquant.commands.demo`).

Each takes a validated config dataclass, writes its outputs atomically under ``cfg.out`` (with the
resolved ``config.yaml`` beside them), and returns a JSON-serialisable result dict.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config as cfgmod
from .data import make_loaders, parse_image_size, resolve_dataset
from .device import DEVICES, on_device, resolve_device, supports_channels_last
from .errors import CheckpointError, ConfigError
from .methods import (
    QAT_CONFIGS,
    ARCConfig,
    CQATConfig,
    GGDPTQConfig,
    MPQConfig,
    ObserverPTQConfig,
    mpq_summary,
    prepare_arc,
    prepare_qat,
    ptq,
    qat_summary,
    schedule_mpq,
)
from .models import create_model_from_args, list_models
from .models.registry import build_model
from .models.user import check_user_spec, is_user_spec, load_weights
from .nn import float_eval_layers, fold_batchnorm
from .numerics.gradient import GRAD_CLIPS
from .saved import rebuild
from .train import TrainConfig, atomic_write_text, evaluate, fit, load_checkpoint, save_checkpoint
from .train.distributed import current, init_from_env, rank_device

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "digits", "synthetic", "folder")
PTQ_METHODS = ("minmax", "percentile", "mse", "kl", "aciq", "ggd")
QAT_METHODS = ("cqat", "ste", "pact", "lsq", "mpq", "fp32")
EXPORT_FORMATS = ("int", "golden", "onnx", "qonnx", "rtl")
QONNX_CHECK_IMAGES = 64  # qonnx's executor runs node by node: check a few images unless --images says more
DEFAULT_CALIB = {"digits": 200}  # held-out calibration images when calib_size is not given
DEFAULT_CALIB_FRACTION = {"folder": 0.1}  # ... and at most this fraction of the training split (size unknown)
DEVICE_HELP = "device: auto (cuda if available, else cpu), cpu or cuda"
MODEL_HELP = ("model: a registered name ({names}) or a user's model, path/to/file.py:ClassName, "
              "path/to/file.py:factory or package.module:factory (called with in_channels, num_classes and "
              "image_size where it names them)")
IMAGE_SIZE_HELP = ("folder dataset: resize every image to N x N or HxW pixels (none: the most common size "
                   "among the images)")


def _h(text: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"help": text}
    if choices:
        meta["choices"] = choices
    return meta


def _check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _check_model(name: str) -> None:
    """A registered model name, or the syntax of a user's ``file.py:Name`` / ``module:Name`` (loaded later)."""
    if is_user_spec(name):
        check_user_spec(name)
    elif name not in list_models():
        raise ConfigError(f"model must be one of {', '.join(list_models())} or path/to/file.py:Name or "
                          f"package.module:Name, got {name!r}")


def _check_device(name: str) -> None:
    _check_choice("device", name, DEVICES)


def _check_image_size(image_size: str | None, dataset: str | None) -> None:
    if image_size is not None:
        parse_image_size(image_size)
        if dataset != "folder":
            raise ConfigError(f"image_size applies to the folder dataset only, not {dataset}")


def _use_channels_last(wanted: bool, model: nn.Module, loaders) -> bool:
    """Channels-last when asked for and the model's forward allows it (``x.view`` on a channels-last feature
    map raises); otherwise every loader goes back to the default memory format, with a notice."""
    if not wanted:
        return False
    x = next(iter(loaders.test))[0]
    if supports_channels_last(model, x):
        return True
    _say(f"note: {type(model).__name__} does not run in channels-last memory format (e.g. x.view after a conv); "
         "using the default format")
    for loader in (loaders.train, loaders.calib, loaders.test):
        if loader is not None:
            loader.channels_last = False
    return False


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` for a command's ``--threads`` (``None``: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class GradQuantOptions:
    """The ARC gradient-quantization options shared by ``hwquant train`` and ``hwquant qat``."""

    grad_bits: int | None = field(default=None, metadata=_h(
        "ARC: quantize every conv/linear error and weight gradient to this many bits (none: float gradients)"))
    grad_rounding: str = field(default="zero", metadata=_h("ARC: gradient rounding", ("zero", "nearest", "stochastic")))
    grad_quant_clip: str = field(default="search", metadata=_h(
        "ARC: gradient clip policy (search: the z-score clip searched per tensor and step; zscore: one fixed k, "
        "the paper read literally)", GRAD_CLIPS))
    grad_k: float = field(default=3.0, metadata=_h("ARC: z-score clip c = min(max|g|, |mu| + k sigma)"))
    grad_clip_fraction: float | None = field(default=None, metadata=_h(
        "ARC search clip: share of elements it may saturate (default 1e-3 / (2^bits - 1))"))
    grad_error_scale: str = field(default="sample", metadata=_h(
        "ARC: one error-gradient step per tensor or per sample", ("tensor", "sample")))
    grad_skip_first_last: bool = field(default=True, metadata=_h("ARC: first conv / last FC gradients stay float"))
    grad_error: bool = field(default=True, metadata=_h(
        "ARC: quantize each layer's error gradient (before its backward: the input and weight gradients use it)"))
    grad_weight: bool = field(default=True, metadata=_h("ARC: quantize each layer's weight gradient"))


@dataclass(frozen=True)
class TrainOptions(GradQuantOptions):
    """``hwquant train``: train a float model and save ``model.pt``."""

    model: str = field(default="resnet20", metadata=_h(MODEL_HELP.format(names=", ".join(list_models()))))
    dataset: str = field(default="fashion_mnist", metadata=_h(
        "dataset (folder: --data-dir holds one subfolder of images per class)", DATASETS))
    data_dir: str | None = field(default=None, metadata=_h("dataset directory (default: the standard location)"))
    image_size: str | None = field(default=None, metadata=_h(IMAGE_SIZE_HELP))
    fallback: bool = field(default=True, metadata=_h("fall back to sklearn digits if Fashion-MNIST is missing"))
    width: float = field(default=1.0, metadata=_h("channel width multiplier"))
    epochs: int = field(default=4, metadata=_h("training epochs"))
    batch_size: int = field(default=128, metadata=_h("training batch size (per process)"))
    lr: float = field(default=0.1, metadata=_h("peak learning rate (cosine decay to 0)"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum (Nesterov)"))
    weight_decay: float = field(default=5e-4, metadata=_h("L2 weight decay (not on BN/bias)"))
    warmup_epochs: float = field(default=0.0, metadata=_h("linear warmup epochs"))
    label_smoothing: float = field(default=0.0, metadata=_h("label smoothing"))
    augment: bool = field(default=True, metadata=_h("train-time augmentation (crop, flip)"))
    calib_size: int | None = field(default=None, metadata=_h(
        "training images held out for calibration (none: 1000, or 200 for the small digits set; for folder at "
        "most a tenth of the training split)"))
    seed: int = field(default=0, metadata=_h("seed for init, data order and augmentation"))
    channels_last: bool = field(default=True, metadata=_h("channels-last memory format (faster on CPU)"))
    device: str = field(default="auto", metadata=_h(DEVICE_HELP, DEVICES))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads"))
    out: str = field(default="runs/train", metadata=_h("output directory"))
    resume: bool = field(default=False, metadata=_h("resume from OUT/last.pt"))
    progress: bool = field(default=True, metadata=_h("show progress bars"))

    def __post_init__(self) -> None:
        _check_model(self.model)
        _check_choice("dataset", self.dataset, DATASETS)
        _check_device(self.device)
        _check_image_size(self.image_size, self.dataset)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calib_size is not None and self.calib_size < 0:
            raise ConfigError(f"calib_size must be >= 0, got {self.calib_size}")
        self.train_config()  # validates epochs, lr, ...
        arc_config(self)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                           warmup_epochs=self.warmup_epochs, label_smoothing=self.label_smoothing, seed=self.seed)


@dataclass(frozen=True)
class PTQOptions:
    """``hwquant ptq``: post-training quantization of a trained checkpoint, or of a model given as --model (a
    registered name or your own path/to/file.py:ClassName) with --weights (a state dict), --dataset and
    --data-dir."""

    checkpoint: str | None = field(default=None, metadata=_h(
        "float checkpoint from hwquant train (none: runs/train/model.pt, unless --model is given)"))
    model: str | None = field(default=None, metadata=_h(
        "quantize this model instead of a checkpoint: a registered name or path/to/file.py:ClassName, "
        "path/to/file.py:factory, package.module:factory (needs --dataset; weights from --weights)"))
    weights: str | None = field(default=None, metadata=_h(
        "--model: its trained weights, a state dict saved by torch.save(model.state_dict(), PATH) "
        "(none: the untrained model, with a warning)"))
    dataset: str | None = field(default=None, metadata=_h(
        "--model: the dataset to calibrate and evaluate on (a checkpoint records its own)", DATASETS))
    image_size: str | None = field(default=None, metadata=_h("--model: " + IMAGE_SIZE_HELP))
    calib_size: int | None = field(default=None, metadata=_h(
        "--model: training images to calibrate on (none: as hwquant train holds out: 1000, 200 for digits, "
        "for folder at most a tenth of the training split)"))
    seed: int | None = field(default=None, metadata=_h(
        "--model: seed of the calibration split and of an untrained model's weights (none: 0)"))
    method: str = field(default="minmax", metadata=_h(
        "PTQ method: an activation observer (minmax, percentile, mse, kl, aciq) or the full GGD PTQ (ggd)",
        PTQ_METHODS))
    w_bits: int = field(default=8, metadata=_h("weight bits (2..16)"))
    a_bits: int = field(default=8, metadata=_h("activation bits (2..16)"))
    per_channel: bool | None = field(default=None, metadata=_h(
        "per-output-channel weight scales (none: yes for observer methods, no for ggd's per-layer FL)"))
    bft: bool = field(default=True, metadata=_h("ggd: backward-forward tuning of the fractional lengths"))
    bft_samples: int | None = field(default=512, metadata=_h("ggd: calibration images scoring BFT (none: all)"))
    bft_criterion: str = field(default="kl", metadata=_h(
        "ggd: BFT score: KL divergence from the float model's softmax, logit SQNR, or the paper's top-1",
        ("kl", "logit_sqnr", "top1")))
    bft_holdout: int = field(default=256, metadata=_h(
        "ggd: further calibration images a BFT change must not worsen (0: no check)"))
    power_of_two: bool = field(default=True, metadata=_h("ggd: power-of-two activation steps (fixed point)"))
    bias: str = field(default="accumulator", metadata=_h("ggd: bias at the accumulator scale or its own FL",
                                                         ("accumulator", "own")))
    percentile: float = field(default=99.99, metadata=_h("percentile method: clip percentile"))
    aciq_dist: str = field(default="laplace", metadata=_h("aciq method: fitted prior", ("laplace", "gauss")))
    first_last_bits: int | None = field(default=None, metadata=_h("bits of the first and last layer (none: same)"))
    rounding: str = field(default="nearest", metadata=_h("rounding mode"))
    calib_batches: int | None = field(default=None, metadata=_h("max calibration batches (none: all)"))
    data_dir: str | None = field(default=None, metadata=_h("dataset directory (default: as in the checkpoint)"))
    batch_size: int = field(default=256, metadata=_h("calibration / evaluation batch size"))
    device: str = field(default="auto", metadata=_h(DEVICE_HELP, DEVICES))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads"))
    out: str = field(default="runs/ptq", metadata=_h("output directory"))
    progress: bool = field(default=True, metadata=_h("show progress bars"))

    def __post_init__(self) -> None:
        _check_choice("method", self.method, PTQ_METHODS)
        _check_device(self.device)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.model is None:
            only_model = [n for n in ("weights", "dataset", "image_size", "calib_size", "seed")
                          if getattr(self, n) is not None]
            if only_model:
                raise ConfigError(f"{only_model[0]} only applies with model (a checkpoint records its model and data)")
            if self.checkpoint is None:
                object.__setattr__(self, "checkpoint", "runs/train/model.pt")
        else:
            if self.checkpoint is not None:
                raise ConfigError("give either checkpoint (an hwquant checkpoint) or model (with weights), not both")
            _check_model(self.model)
            if self.dataset is None:
                raise ConfigError("model needs dataset (and data_dir for the folder dataset)")
            _check_choice("dataset", self.dataset, DATASETS)
            _check_image_size(self.image_size, self.dataset)
            if self.calib_size is not None and self.calib_size < 1:
                raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}")
            if self.seed is not None and self.seed < 0:
                raise ConfigError(f"seed must be >= 0, got {self.seed}")
        self.method_config()

    def method_config(self) -> ObserverPTQConfig | GGDPTQConfig:
        if self.method == "ggd":
            return GGDPTQConfig(w_bits=self.w_bits, a_bits=self.a_bits, per_channel=bool(self.per_channel),
                                power_of_two=self.power_of_two, bias=self.bias, first_last_bits=self.first_last_bits,
                                bft=self.bft, bft_samples=self.bft_samples, bft_criterion=self.bft_criterion,
                                bft_holdout=self.bft_holdout, calib_batches=self.calib_batches)
        args: dict[str, Any] = {}
        if self.method == "percentile":
            args = {"percentile": self.percentile}
        elif self.method == "aciq":
            args = {"dist": self.aciq_dist}
        per_channel = True if self.per_channel is None else self.per_channel
        return ObserverPTQConfig(observer=self.method, observer_args=args, w_bits=self.w_bits, a_bits=self.a_bits,
                                 per_channel=per_channel, first_last_bits=self.first_last_bits,
                                 rounding=self.rounding, calib_batches=self.calib_batches)


@dataclass(frozen=True)
class QATOptions(GradQuantOptions):
    """``hwquant qat``: quantization-aware fine-tuning of a trained float checkpoint (CQAT or a baseline)."""

    checkpoint: str = field(default="runs/train/model.pt", metadata=_h("float checkpoint from hwquant train"))
    method: str = field(default="cqat", metadata=_h(
        "cqat (clipped 8-bit step), ste (min-max), pact (learned clip), lsq (learned step), mpq (mixed precision: "
        "an extra weight bit for flipping weights), or fp32 (the BN-folded float model fine-tuned with the same "
        "schedule: the control)", QAT_METHODS))
    w_bits: int = field(default=5, metadata=_h("stored weight bits (2..16)"))
    a_bits: int = field(default=4, metadata=_h("stored activation bits (2..16)"))
    steps_per_epoch: int | None = field(default=None, metadata=_h(
        "train on only the first N batches of each epoch's shuffled order (none: the whole epoch); a short "
        "fine-tune, the schedule follows"))
    base_bits: int = field(default=8, metadata=_h("cqat: bits the step is sized for"))
    step: str = field(default="mse", metadata=_h(
        "cqat: step calibration, mse (for the clipped codes), max (literal peak / (2^base_bits - 1)) or window "
        "(the low-bit code is the 8-bit min-max code shifted right by a per-layer shift)", ("mse", "max", "window")))
    act_range: str = field(default="ema", metadata=_h("cqat: activation step follows an EMA of the peak, or "
                                                       "stays static", ("ema", "static")))
    mpq_flag_at: float = field(default=0.5, metadata=_h("mpq: fraction of training at which extra bits are given"))
    mpq_window: float = field(default=0.25, metadata=_h("mpq: fraction of training before that, counting flips"))
    mpq_min_flips: int = field(default=2, metadata=_h("mpq: flips a weight needs for the extra bit"))
    mpq_max_extra: float = field(default=0.1, metadata=_h("mpq: at most this fraction of a layer's weights get it "
                                                          "(0: uniform w_bits)"))
    mpq_eps: float = field(default=0.1, metadata=_h("mpq: 'near a rounding threshold' distance, in steps"))
    mpq_gamma: float = field(default=0.1, metadata=_h("mpq: learning-rate factor near a threshold (1: off)"))
    mpq_choose: str = field(default="flips", metadata=_h(
        "mpq: weights given the extra bit: the most flipping (the method) or as many at random (ablation; --seed)",
        ("flips", "random")))
    first_last_bits: int | None = field(default=8, metadata=_h("bits of the first conv and last FC (none: same)"))
    per_channel: bool = field(default=True, metadata=_h("per-output-channel weight steps"))
    pow2: bool = field(default=False, metadata=_h(
        "power-of-two steps (fixed point: requantization is a shift and the integer model is bit-exact; "
        "cqat/ste only)"))
    pow2_step: str = field(default="round", metadata=_h(
        "cqat --pow2: the MSE step rounded to a power of two, or the MSE-best power of two", ("round", "search")))
    epochs: int = field(default=2, metadata=_h("fine-tuning epochs"))
    batch_size: int = field(default=128, metadata=_h("training batch size (per process)"))
    lr: float = field(default=0.005, metadata=_h("peak learning rate (cosine decay to 0)"))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum (Nesterov)"))
    weight_decay: float = field(default=5e-4, metadata=_h("L2 weight decay (not on biases / steps)"))
    grad_clip: float | None = field(default=2.0, metadata=_h(
        "clip the global gradient norm (the BN-folded network has no normalisation; none: off)"))
    warmup_epochs: float = field(default=0.0, metadata=_h("linear warmup epochs"))
    augment: bool = field(default=True, metadata=_h("train-time augmentation (crop, flip)"))
    calib_batches: int | None = field(default=8, metadata=_h("calibration batches to initialise the steps"))
    seed: int = field(default=0, metadata=_h("seed for data order and augmentation"))
    channels_last: bool = field(default=True, metadata=_h("channels-last memory format (faster on CPU)"))
    data_dir: str | None = field(default=None, metadata=_h("dataset directory (default: as in the checkpoint)"))
    device: str = field(default="auto", metadata=_h(DEVICE_HELP, DEVICES))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads"))
    out: str = field(default="runs/qat", metadata=_h("output directory"))
    resume: bool = field(default=False, metadata=_h("resume from OUT/last.pt"))
    progress: bool = field(default=True, metadata=_h("show progress bars"))

    def __post_init__(self) -> None:
        _check_choice("method", self.method, QAT_METHODS)
        _check_device(self.device)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1 or none, got {self.steps_per_epoch}")
        self.method_config()
        self.train_config()
        arc_config(self)

    def method_config(self):
        """The QAT config dataclass (``None`` for the fp32 control)."""
        if self.method == "fp32":
            return None
        common = {"w_bits": self.w_bits, "a_bits": self.a_bits, "first_last_bits": self.first_last_bits,
                  "per_channel": self.per_channel, "calib_batches": self.calib_batches, "pow2": self.pow2}
        if self.method == "cqat":
            return CQATConfig(**common, base_bits=self.base_bits, step=self.step, act_range=self.act_range,
                              pow2_step=self.pow2_step)
        if self.method == "mpq":
            return MPQConfig(**common, flag_at=self.mpq_flag_at, window=self.mpq_window, min_flips=self.mpq_min_flips,
                             max_extra=self.mpq_max_extra, eps=self.mpq_eps, gamma=self.mpq_gamma,
                             choose=self.mpq_choose, seed=self.seed)
        return QAT_CONFIGS[self.method](**common)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                           warmup_epochs=self.warmup_epochs, grad_clip=self.grad_clip, seed=self.seed)


@dataclass(frozen=True)
class EvalOptions:
    """``hwquant eval``: top-1/top-5 of a float or quantized checkpoint on the test set."""

    checkpoint: str = field(default="runs/train/model.pt", metadata=_h("checkpoint (float or quantized)"))
    data_dir: str | None = field(default=None, metadata=_h("dataset directory (default: as in the checkpoint)"))
    batch_size: int = field(default=512, metadata=_h("evaluation batch size"))
    device: str = field(default="auto", metadata=_h(DEVICE_HELP, DEVICES))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads"))
    out: str | None = field(default=None, metadata=_h("write eval.json here (default: print only)"))
    progress: bool = field(default=True, metadata=_h("show progress bars"))

    def __post_init__(self) -> None:
        _check_device(self.device)


@dataclass(frozen=True)
class CostOptions:
    """``hwquant cost``: bits stored, compression ratio, BOPs, cycles and energy of a float or quantized
    checkpoint on a bit-width-reconfigurable PE array (45 nm energy table), next to the same network in FP32."""

    checkpoint: str = field(default="runs/ptq/model.pt", metadata=_h("checkpoint (float or quantized)"))
    out: str | None = field(default=None, metadata=_h("write cost.json and cost.md here (default: print only)"))
    pe_rows: int = field(default=16, metadata=_h("PE array rows (output channels in parallel)"))
    pe_cols: int = field(default=16, metadata=_h("PE array columns (output pixels in parallel)"))
    brick_bits: int = field(default=2, metadata=_h("width of the fused multiplier bricks"))
    bricks_per_pe: int = field(default=4, metadata=_h("bricks per PE (4: one 4x4-bit MAC per cycle)"))
    clock_mhz: float = field(default=500.0, metadata=_h("clock for the latency figure"))
    buffer_kib: float = field(default=128.0, metadata=_h(
        "on-chip activation buffer: a layer whose input + output do not fit goes through DRAM"))
    data_dir: str | None = field(default=None, metadata=_h("dataset directory (for the input shape)"))
    device: str = field(default="auto", metadata=_h(
        DEVICE_HELP + "; checked, but the cost model counts on the CPU whatever it says", DEVICES))

    def __post_init__(self) -> None:
        _check_device(self.device)
        for name in ("pe_rows", "pe_cols", "brick_bits", "bricks_per_pe"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.clock_mhz > 0:
            raise ConfigError(f"clock_mhz must be > 0, got {self.clock_mhz}")
        if not self.buffer_kib >= 0:
            raise ConfigError(f"buffer_kib must be >= 0, got {self.buffer_kib}")

    def pe(self):
        from .hw import PEArray

        return PEArray(rows=self.pe_rows, cols=self.pe_cols, brick_bits=self.brick_bits,
                       bricks_per_pe=self.bricks_per_pe, clock_mhz=self.clock_mhz, buffer_kib=self.buffer_kib)


@dataclass(frozen=True)
class ReportOptions:
    """``hwquant report RUN_DIR``: one HTML page (self-contained) and Markdown for a train / ptq / qat run: accuracy
    and cost, per-layer SQNR and sensitivity (one layer quantized at a time, and all but one), activation
    histograms with the quantizer's clip, bits per layer, QAT loss, MPQ flips, ARC clips, accumulator widths."""

    run_dir: str = field(default="runs/ptq", metadata=_h("run directory (holding model.pt)"))
    out: str | None = field(default=None, metadata=_h("output directory (default: RUN_DIR/report)"))
    images: int = field(default=256, metadata=_h("held-out calibration images for the per-layer measurements"))
    batch_size: int = field(default=128, metadata=_h("batch size"))
    data_dir: str | None = field(default=None, metadata=_h("dataset directory (default: as in the checkpoint)"))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads"))

    def __post_init__(self) -> None:
        if self.images < 1:
            raise ConfigError(f"images must be >= 1, got {self.images}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ExportOptions:
    """``hwquant export``: integer model, golden vectors, ONNX or RTL rounding units of a quantized checkpoint."""

    checkpoint: str = field(default="runs/ptq/model.pt", metadata=_h(
        "quantized checkpoint from hwquant ptq/qat (not needed for --format rtl)"))
    format: str = field(default="int", metadata=_h(
        "int: integer model + bit-exactness check against the fake-quant model; golden: $readmemh vectors + "
        "manifest, replayed with numpy; onnx: QDQ graph checked in onnxruntime; qonnx: Quant nodes at any width, "
        "checked with the qonnx executor (64 images unless --images); rtl: Amaranth rounding units",
        EXPORT_FORMATS))
    out: str = field(default="runs/export", metadata=_h("output directory"))
    images: int | None = field(default=None, metadata=_h("test images for the checks (none: the whole test set)"))
    golden_images: int = field(default=1, metadata=_h("golden: images in the vectors"))
    opset: int = field(default=21, metadata=_h("onnx: opset (21 allows INT4/UINT4 codes)"))
    rtl_in_width: int = field(default=16, metadata=_h("rtl: signed input width"))
    rtl_frac_bits: int = field(default=8, metadata=_h("rtl: input fraction bits"))
    rtl_out_width: int = field(default=8, metadata=_h("rtl: signed output code width"))
    rtl_modes: str = field(default="nearest,zero,stochastic", metadata=_h("rtl: comma-separated rounding modes"))
    synth: bool = field(default=False, metadata=_h("rtl: synthesize with yosys and report cell counts"))
    batch_size: int = field(default=256, metadata=_h("batch size of the checks"))
    data_dir: str | None = field(default=None, metadata=_h("dataset directory (default: as in the checkpoint)"))
    device: str = field(default="auto", metadata=_h(
        DEVICE_HELP + "; checked, but the integer model (int64 arithmetic) and its checks run on the CPU whatever "
        "it says", DEVICES))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads"))
    progress: bool = field(default=True, metadata=_h("show progress bars"))

    def __post_init__(self) -> None:
        _check_choice("format", self.format, EXPORT_FORMATS)
        _check_device(self.device)
        if self.images is not None and self.images < 1:
            raise ConfigError(f"images must be >= 1 or null, got {self.images}")
        if self.golden_images < 1:
            raise ConfigError(f"golden_images must be >= 1, got {self.golden_images}")
        if not 13 <= self.opset <= 23:
            raise ConfigError(f"opset must be in 13..23, got {self.opset}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self.rtl_params()

    def rtl_params(self) -> list:
        from .export.rtl import MODES, RoundingUnitParams

        modes = [m.strip() for m in str(self.rtl_modes).split(",") if m.strip()]
        if not modes:
            raise ConfigError("rtl_modes must list at least one mode")
        for m in modes:
            _check_choice("rtl_modes entry", m, MODES)
        return [RoundingUnitParams(self.rtl_in_width, self.rtl_frac_bits, self.rtl_out_width, m) for m in modes]


# --------------------------------------------------------------------------- helpers
def arc_config(opts) -> ARCConfig | None:
    """The ARC gradient-quantization config of train/qat options (``None`` when ``grad_bits`` is unset)."""
    cfg = ARCConfig(bits=8 if opts.grad_bits is None else opts.grad_bits, rounding=opts.grad_rounding,
                    clip=opts.grad_quant_clip, k=opts.grad_k, fraction=opts.grad_clip_fraction,
                    error_scale=opts.grad_error_scale,
                    skip_first_last=opts.grad_skip_first_last,
                    error_grad=opts.grad_error, weight_grad=opts.grad_weight,
                    seed=opts.seed)  # validates every grad_* field, also when ARC is off
    return None if opts.grad_bits is None else cfg


def _install_arc(model: nn.Module, opts, out: Path, extra_state: dict[str, Any]):
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
    _say(f"ARC: {acfg.bits}-bit {what} gradients ({acfg.rounding}, {acfg.clip} clip"
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


def _save_arc_clips(out: Path, handle) -> None:
    """Per layer, the clip value and max|g| of every quantized gradient: ``{layer: {kind: [[step, c, max]]}}``.
    Nothing is written when nothing was recorded and a record exists (a finished run, resumed)."""
    if not handle.clips and (out / "arc_clips.json").exists():
        return
    clips: dict[str, dict[str, list]] = {}
    for layer, rows in handle.clips.items():
        for step, kind, c, mx in rows:
            clips.setdefault(layer, {}).setdefault(kind, []).append([step, c, mx])
    _write_json(out / "arc_clips.json", clips)



def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def _save_config(out: Path, cfg: Any) -> None:
    atomic_write_text(out / "config.yaml", cfgmod.dump_yaml(cfg))


def _say(msg: str) -> None:
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


def _float_eval(model: nn.Module, ck: dict[str, Any], loaders, data_dir: str | None, *, progress: bool,
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


def _warn(msg: str) -> None:
    print(f"hwquant: warning: {msg}", file=sys.stderr, flush=True)


def _data_meta(info, data_dir: str | None, calib_size: int, seed: int) -> dict[str, Any]:
    """The ``data`` entry of a checkpoint: what rebuilds the same splits (folder: absolute path, image size)."""
    meta = {"dataset": info.name, "data_dir": data_dir, "calib_size": calib_size, "seed": seed,
            "source": info.source}
    if info.name == "folder":
        meta.update(data_dir=info.source, image_size=list(info.image_size))
    return meta


def _calib_default(dataset: str, calib_size: int | None) -> tuple[int, float | None]:
    """``(calib_size, max_calib_fraction)`` for make_loaders: the given size, or the dataset's default."""
    if calib_size is not None:
        return calib_size, None
    return DEFAULT_CALIB.get(dataset, 1000), DEFAULT_CALIB_FRACTION.get(dataset)


# --------------------------------------------------------------------------- commands
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


def _check_resume(cfg, out: Path) -> None:
    if cfg.resume and not resumable(out):
        raise ConfigError(f"--resume: {out / 'last.pt'} not found (nothing to resume; drop --resume to start afresh)")


def run_train(cfg: TrainOptions) -> dict[str, Any]:
    """Train a float model; writes OUT/model.pt, OUT/last.pt, OUT/metrics.json, OUT/config.yaml."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist_info = init_from_env(device=device)
    device = rank_device(device)
    out = check_output_dir(cfg.out)
    _check_resume(cfg, out)
    dataset, message = resolve_dataset(cfg.dataset, cfg.data_dir, fallback=cfg.fallback)
    if message:
        _say(message)
    data_dir = cfg.data_dir if dataset == cfg.dataset else None
    calib_size, calib_fraction = _calib_default(dataset, cfg.calib_size)
    loaders = make_loaders(dataset, data_dir=data_dir, batch_size=cfg.batch_size, calib_size=calib_size,
                           seed=cfg.seed, augment=cfg.augment, fallback=False, rank=dist_info.rank,
                           world_size=dist_info.world_size, channels_last=cfg.channels_last,
                           image_size=cfg.image_size, max_calib_fraction=calib_fraction)
    info = loaders.info
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, in_channels=info.in_channels, num_classes=info.num_classes, width=cfg.width,
                        image_size=info.image_size)
    if _use_channels_last(cfg.channels_last, model, loaders):
        model = model.to(memory_format=torch.channels_last)
    data_meta = _data_meta(info, data_dir, loaders.calib_size, cfg.seed)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _save_config(out, cfg)
    _say(f"training {cfg.model} on {info.name} ({info.source}) for {cfg.epochs} epochs, "
         f"{len(loaders.train)} steps/epoch x {dist_info.world_size} process(es) on {device}")
    extra = {"model_args": model.hwquant_args, "data": data_meta}
    handle, arc_meta, arc_hook = _install_arc(model, cfg, out, extra)
    t0 = time.perf_counter()
    history = fit(model, loaders.train, cfg.train_config(), eval_loader=loaders.test, out_dir=out, resume=cfg.resume,
                  progress=cfg.progress, extra_state=extra, step_hook=arc_hook, device=device)
    seconds = time.perf_counter() - t0
    if handle is not None:
        handle.remove()
        if dist_info.is_main:
            _save_arc_clips(out, handle)
    final = history.get("final_eval") or evaluate(model, loaders.test, device=device)
    result = {"model": cfg.model, "dataset": info.name, "source": info.source, "test": final,
              "train_seconds": seconds, "world_size": dist_info.world_size, "history": history["epochs"],
              "arc": arc_meta, "device": str(device)}
    if dist_info.is_main:
        save_checkpoint(out / "model.pt", {"model": model.state_dict(), "model_args": model.hwquant_args,
                                           "data": data_meta, "metrics": final, "history": history})
        _write_json(out / "metrics.json", result)
    _say(f"test top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  -> {out / 'model.pt'}")
    return result


def quantize_checkpoint(model: nn.Module, ck: dict[str, Any], cfg: PTQOptions, loaders) -> tuple[nn.Module, dict]:
    qmodel, report = ptq(model, cfg.method_config(), loaders.calib, progress=cfg.progress)
    return qmodel, report


def _model_for_ptq(cfg: PTQOptions):
    """``(model, ck, loaders)`` of ``ptq --model``: the model built from its name or file, its ``--weights``, and a
    checkpoint-like dict (``model_args``, ``data``) whose data split eval/export rebuild later."""
    dataset, _ = resolve_dataset(cfg.dataset, cfg.data_dir, fallback=False)
    seed = 0 if cfg.seed is None else cfg.seed
    calib_size, calib_fraction = _calib_default(dataset, cfg.calib_size)
    loaders = make_loaders(dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.batch_size,
                           calib_size=calib_size, seed=seed, augment=False, fallback=False, drop_last=False,
                           image_size=cfg.image_size, max_calib_fraction=calib_fraction)
    info = loaders.info
    torch.manual_seed(seed)
    model = build_model(cfg.model, in_channels=info.in_channels, num_classes=info.num_classes,
                        image_size=info.image_size)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    else:
        _warn(f"no --weights given: quantizing {cfg.model} with its untrained (random) weights")
    model.eval()
    ck = {"model_args": model.hwquant_args, "data": _data_meta(info, cfg.data_dir, loaders.calib_size, seed)}
    return model, ck, loaders


def run_ptq(cfg: PTQOptions) -> dict[str, Any]:
    """PTQ a float checkpoint (or ``--model`` with ``--weights``); writes OUT/model.pt (quantized), OUT/ptq.json,
    OUT/config.yaml."""
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = check_output_dir(cfg.out)
    if cfg.model is not None:
        model, ck, loaders = _model_for_ptq(cfg)
        source = cfg.model
    else:
        model, ck = load_model(cfg.checkpoint)
        if "ptq" in ck or "qat" in ck:
            raise CheckpointError(f"{cfg.checkpoint} is already quantized; give the float checkpoint")
        loaders = checkpoint_loaders(ck, cfg.data_dir, cfg.batch_size)
        source = cfg.checkpoint
    if loaders.calib is None or len(loaders.calib) == 0:
        raise ConfigError("the checkpoint's data split has no calibration images (trained with calib_size=0)")
    model.to(device)
    float_eval = _float_eval(model, ck, loaders, cfg.data_dir, progress=cfg.progress, device=device)
    qmodel, report = quantize_checkpoint(model, ck, cfg, replace(loaders, calib=on_device(loaders.calib, device)))
    q_eval = evaluate(qmodel, loaders.test, progress=cfg.progress, desc="eval quant", device=device)
    out.mkdir(parents=True, exist_ok=True)
    result = {"method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "source": str(source),
              "weights": cfg.weights, "device": str(device), "fp32": float_eval, "quant": q_eval, "report": report,
              "float_eval_layers": float_eval_layers(qmodel)}
    save_checkpoint(out / "model.pt", {"model": qmodel.state_dict(), "model_args": ck["model_args"],
                                       "data": ck["data"], "ptq": {"method": cfg.method,
                                                                   "config": asdict(cfg.method_config())},
                                       "metrics": q_eval})
    _write_json(out / "ptq.json", result)
    _save_config(out, cfg)
    extra = ""
    if report.get("bft"):
        b = report["bft"]
        extra = (f", BFT ({b['criterion']}) calib top-1 {b['before']['top1']:.2f}% -> {b['after']['top1']:.2f}%, "
                 f"KL {b['before']['kl']:.4f} -> {b['after']['kl']:.4f}")
        if b["holdout_images"]:
            extra += f" ({b['rejected_by_holdout']} candidates rejected by {b['holdout_images']} held-out images)"
    print(f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}: top-1 {q_eval['top1']:.2f}% (fp32 {float_eval['top1']:.2f}%), "
          f"logit SQNR {report['sqnr_db']:.1f} dB{extra} -> {out / 'model.pt'}")
    for w in report.get("warnings", []) + _float_eval_warnings(result["float_eval_layers"]):
        print(f"warning: {w}")
    return result


def _float_eval_warnings(layers: dict[str, str]) -> list[str]:
    """One line per layer that evaluated in float (no integer accumulator), naming it and why."""
    return [f"{name} evaluates in float, not on integers: {why}" for name, why in layers.items()]


def run_qat(cfg: QATOptions) -> dict[str, Any]:
    """QAT fine-tune of a float checkpoint; writes OUT/model.pt, OUT/last.pt, OUT/qat.json, OUT/config.yaml.

    Reports the test accuracy of the float model, of the quantized model right after initialisation (the PTQ
    starting point) and after fine-tuning, and the loss curve.
    """
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dist_info = init_from_env(device=device)
    device = rank_device(device)
    out = check_output_dir(cfg.out)
    _check_resume(cfg, out)
    model, ck = load_model(cfg.checkpoint)
    if "ptq" in ck or "qat" in ck:
        raise CheckpointError(f"{cfg.checkpoint} is already quantized; give the float checkpoint")
    d = ck["data"]
    loaders = make_loaders(d["dataset"], data_dir=cfg.data_dir or d.get("data_dir"), batch_size=cfg.batch_size,
                           calib_size=d["calib_size"], seed=cfg.seed, augment=cfg.augment, fallback=False,
                           rank=dist_info.rank, world_size=dist_info.world_size, channels_last=cfg.channels_last,
                           image_size=d.get("image_size"))
    if loaders.calib is None or len(loaders.calib) == 0:
        raise ConfigError("the checkpoint's data split has no calibration images (trained with calib_size=0)")
    loaders.train.max_batches = cfg.steps_per_epoch
    model.to(device)
    channels_last = _use_channels_last(cfg.channels_last, model, loaders)
    fp32 = _float_eval(model, ck, loaders, cfg.data_dir, progress=cfg.progress, device=device)
    qcfg = cfg.method_config()
    # the fp32 control trains the same BN-folded network the QAT methods train
    qmodel = fold_batchnorm(model) if qcfg is None else prepare_qat(model, qcfg, on_device(loaders.calib, device))
    if channels_last:
        qmodel = qmodel.to(memory_format=torch.channels_last)
    start = evaluate(qmodel, loaders.test, progress=cfg.progress, desc="eval start", device=device)
    meta = {"method": cfg.method, "config": asdict(qcfg) if qcfg is not None else {}}
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _save_config(out, cfg)
    _say(f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}: fp32 {fp32['top1']:.2f}%, before fine-tuning "
         f"{start['top1']:.2f}%; fine-tuning {cfg.epochs} epochs at lr {cfg.lr:g}")
    if isinstance(qcfg, MPQConfig):
        total = len(loaders.train) * cfg.epochs
        first, flag = schedule_mpq(qmodel, total, qcfg)
        _say(f"mpq: flips counted from step {first}, extra bits assigned at step {flag} of {total}")
    extra = {"model_args": ck["model_args"], "data": d, "qat": meta}
    handle, arc_meta, arc_hook = _install_arc(qmodel, cfg, out, extra)
    t0 = time.perf_counter()
    history = fit(qmodel, loaders.train, cfg.train_config(), eval_loader=loaders.test, out_dir=out,
                  resume=cfg.resume, progress=cfg.progress, extra_state=extra, step_hook=arc_hook, device=device)
    seconds = time.perf_counter() - t0
    if handle is not None:
        handle.remove()
        if dist_info.is_main:
            _save_arc_clips(out, handle)
    final = history.get("final_eval") or evaluate(qmodel, loaders.test, device=device)
    result = {"method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "config": meta["config"],
              "fp32": fp32, "start": start, "final": final, "train_seconds": seconds, "history": history["epochs"],
              "step_loss": history["step_loss"], "layers": qat_summary(qmodel) if qcfg is not None else [],
              "arc": arc_meta, "mpq": mpq_summary(qmodel) if isinstance(qcfg, MPQConfig) else None,
              "float_eval_layers": float_eval_layers(qmodel) if qcfg is not None else {}}
    if dist_info.is_main:
        save_checkpoint(out / "model.pt", {"model": qmodel.state_dict(), "model_args": ck["model_args"],
                                           "data": d, "qat": meta, "metrics": final, "history": history})
        _write_json(out / "qat.json", result)
    _say(f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}: top-1 {final['top1']:.2f}% (fp32 {fp32['top1']:.2f}%, "
         f"start {start['top1']:.2f}%) -> {out / 'model.pt'}")
    for w in _float_eval_warnings(result["float_eval_layers"]):
        _say(f"warning: {w}")
    return result


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
        _write_json(out / "eval.json", res)
        _save_config(out, cfg)
    print(json.dumps(res))
    return res


def run_cost(cfg: CostOptions) -> dict[str, Any]:
    """Hardware cost of a checkpoint and of the same network in FP32 (per image); OUT/cost.{json,md}."""
    from .hw import cost_report
    from .report.markdown import markdown_table

    resolve_device(cfg.device)  # checked only: the cost model counts on the CPU
    if cfg.out:
        check_output_dir(cfg.out)
    model, ck = load_model(cfg.checkpoint)
    example = next(iter(checkpoint_loaders(ck, cfg.data_dir, 1).test))[0][:1]
    pe = cfg.pe()
    rep = cost_report(model, example, pe)
    fp32 = cost_report(create_model_from_args(ck["model_args"]).eval(), example, pe)["total"]
    t = rep["total"]
    t["x_fp32_energy"] = t["e_total_pj"] / fp32["e_total_pj"]
    rep.update(checkpoint=str(cfg.checkpoint), fp32_total=fp32)
    cols = [("layer", "layer"), ("macs", "MACs"), ("w_bits", "W bits"), ("a_bits", "A bits"),
            ("acc_bits", "acc bits"), ("stored_bits", "stored bits"), ("cycles", "cycles"),
            ("e_compute_pj", "compute pJ"), ("e_sram_pj", "SRAM pJ"), ("e_dram_pj", "DRAM pJ")]
    summary = (f"{cfg.checkpoint}: {t['macs'] / 1e6:.2f} M MACs/image, {t['stored_bits'] / 8192:.1f} KiB stored "
               f"(compression {t['compression_ratio']:.2f}x vs FP32), {t['cycles']} cycles "
               f"({t['latency_us']:.1f} us at {pe.clock_mhz:g} MHz), "
               f"{t['energy_uj']:.2f} uJ/image ({t['x_fp32_energy']:.3f}x FP32: compute "
               f"{t['e_compute_pj'] / 1e6:.2f}, SRAM {t['e_sram_pj'] / 1e6:.2f}, DRAM {t['e_dram_pj'] / 1e6:.2f} uJ)")
    md = f"# Hardware cost\n\n{summary}\n\n{markdown_table(rep['layers'], cols, digits=1)}\n"
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "cost.json", rep)
        atomic_write_text(out / "cost.md", md)
        _save_config(out, cfg)
    print(summary)
    return rep


def run_report(cfg: ReportOptions) -> dict[str, Any]:
    """Build and write the report of a run directory (see :mod:`hwquant.report.run_report`)."""
    from .report.run_report import build_report, write_report

    set_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else Path(cfg.run_dir) / "report"
    check_output_dir(out)
    report, plots = build_report(cfg.run_dir, images=cfg.images, batch_size=cfg.batch_size, data_dir=cfg.data_dir)
    paths = write_report(report, plots, out)
    sens = report["sensitivity"]
    worst = f"; most sensitive layer {sens[0]['layer']}" if sens else ""
    print(f"report of {cfg.run_dir}{worst} -> {paths['html']}")
    return {"report": report, "paths": {k: str(v) for k, v in paths.items()}}


def _limited(loader, images: int | None):
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


def run_export(cfg: ExportOptions) -> dict[str, Any]:
    """Export a quantized checkpoint (or RTL rounding units) and check the export; writes OUT/export.json."""
    set_threads(cfg.threads)
    resolve_device(cfg.device)  # checked only: the integer model runs on the CPU
    out = check_output_dir(cfg.out)
    if cfg.format == "rtl":
        result = _export_rtl(cfg, out)
    else:
        result = _export_model(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / f"export-{cfg.format}.json", result)
    _save_config(out, cfg)
    return result


def _export_model(cfg: ExportOptions, out: Path) -> dict[str, Any]:
    from .export import compare, integer_model

    model, ck = load_model(cfg.checkpoint)
    if "ptq" not in ck and not ("qat" in ck and ck["qat"]["method"] != "fp32"):
        raise CheckpointError(f"{cfg.checkpoint} is not a quantized checkpoint (run hwquant ptq or qat first)")
    loaders = checkpoint_loaders(ck, cfg.data_dir, cfg.batch_size)
    example = next(iter(loaders.test))[0][:1]
    imodel = integer_model(model, example)
    layers = imodel.layers()
    result: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "format": cfg.format,
                              "acc_bits_max": max(r["acc_bits"] for r in layers), "layers": layers}
    out.mkdir(parents=True, exist_ok=True)
    if cfg.format == "int":
        t0 = time.perf_counter()
        cmp = compare(model, imodel, _limited(loaders.test, cfg.images), progress=cfg.progress)
        result["compare"] = cmp
        result["seconds"] = time.perf_counter() - t0
        params = {op.name: {k: v for k, v in op.params.items() if isinstance(v, torch.Tensor)} for op in imodel.ops}
        save_checkpoint(out / "integer_model.pt", {"format": "hwquant-integer-1", "ops": imodel.summary(),
                                                   "params": params, "input_scale": float(imodel.input_scale),
                                                   "output_scale": imodel.output_scale})
        _write_json(out / "integer_model.json", {"ops": imodel.summary(), "layers": layers})
        print(f"integer model: {len(imodel.ops)} ops, accumulators up to {result['acc_bits_max']} bits "
              f"-> {out / 'integer_model.pt'}")
        print(f"vs fake-quant on {cmp['images']} images: {cmp['codes_diff']} of {cmp['codes']} layer-input codes "
              f"differ (max {cmp['max_code_lsb']} LSB), {cmp['out_diff']} of {cmp['out_elements']} outputs differ "
              f"(max |diff| {cmp['max_abs_diff']:.3g}); top-1 fake-quant {cmp['top1_fake_quant']:.2f}% / integer "
              f"{cmp['top1_integer']:.2f}%")
    elif cfg.format == "golden":
        from .export.golden import verify, write_golden

        xs = next(iter(_limited(loaders.test, cfg.golden_images)))[0]
        manifest = write_golden(imodel, xs, out / "golden")
        check = verify(out / "golden")
        result["golden"] = {"manifest": str(manifest), **check}
        print(f"golden vectors: {check['ops']} ops, {check['values']} values, {xs.shape[0]} image(s) -> {manifest}; "
              f"numpy replay {'matches every file' if check['ok'] else 'MISMATCHES ' + ', '.join(check['mismatches'])}")
    elif cfg.format == "qonnx":
        from .export.qonnx import check_qonnx, to_qonnx

        path = to_qonnx(imodel, out / "model.qonnx.onnx")
        n = cfg.images or QONNX_CHECK_IMAGES
        check = check_qonnx(path, imodel, _limited(loaders.test, n))
        result["qonnx"] = {"path": str(path), **check}
        print(f"QONNX -> {path}; {check['executor']} executor on {n} images: {check['codes_diff']} of "
              f"{check['codes']} codes differ from the integer model (max {check['max_code_lsb']} LSB)")
    else:
        import tempfile

        from .export.onnx import check_onnx, fused_ops, to_onnx

        path = to_onnx(imodel, out / "model.onnx", opset=cfg.opset)
        with tempfile.TemporaryDirectory() as d:
            probe = to_onnx(imodel, Path(d) / "probe.onnx", opset=cfg.opset, codes_outputs=True)
            check = check_onnx(probe, imodel, _limited(loaders.test, cfg.images))
        check["runtime_ops"] = fused_ops(path)
        result["onnx"] = {"path": str(path), **check}
        print(f"ONNX opset {cfg.opset} -> {path}; onnxruntime ({check['optimize']} optimizations) on "
              f"{check['images']} images: {check['codes_diff']} of {check['codes']} codes differ from the integer "
              f"model (max {check['max_code_lsb']} LSB); top-1 onnx {check['top1_onnx']:.2f}% / integer "
              f"{check['top1_integer']:.2f}%")
    return result


def _export_rtl(cfg: ExportOptions, out: Path) -> dict[str, Any]:
    import numpy as np

    from .export import rtl

    rows = []
    (out / "rtl").mkdir(parents=True, exist_ok=True)
    for p in cfg.rtl_params():
        unit = rtl.rounding_unit(p)
        vpath = out / "rtl" / f"{p.name()}.v"
        atomic_write_text(vpath, rtl.verilog(unit))
        x = rtl.check_vectors(p)
        sim = rtl.simulate(p, x)
        ref = rtl.reference_codes(p, x)
        row = {"unit": p.name(), "mode": p.mode, "verilog": str(vpath), "vectors": int(len(x)),
               "sim_ok": bool(np.array_equal(sim, ref))}
        if cfg.synth:
            row["synth"] = rtl.synthesize(rtl.rounding_unit(p))
        rows.append(row)
        cells = f", {row['synth']['cells']} cells" if cfg.synth and "cells" in row.get("synth", {}) else ""
        print(f"{p.name()}: simulation {'matches' if row['sim_ok'] else 'DIFFERS FROM'} hwquant.numerics.quantize "
              f"on {row['vectors']} inputs{cells} -> {vpath}")
    return {"format": "rtl", "units": rows}
