"""``hwquant ptq``: post-training quantization of a trained checkpoint, or of a user's model and weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from ..data import default_calibration, make_loaders, resolve_dataset, split_record
from ..device import DEVICES, on_device, resolve_device
from ..errors import CheckpointError, ConfigError
from ..methods import GGDPTQConfig, ObserverPTQConfig, ptq
from ..models.user import load_weights
from ..nn import float_eval_layers
from ..train import evaluate, save_checkpoint
from .common import (
    DATASETS,
    DEVICE_HELP,
    IMAGE_SIZE_HELP,
    check_choice,
    check_device,
    check_image_size,
    check_model,
    check_output_dir,
    checkpoint_loaders,
    doc,
    float_eval,
    float_eval_warnings,
    load_model,
    save_config,
    seeded_model,
    set_threads,
    warn,
    write_json,
)

PTQ_METHODS = ("minmax", "percentile", "mse", "kl", "aciq", "ggd")


@dataclass(frozen=True)
class PTQOptions:
    """``hwquant ptq``: post-training quantization of a trained checkpoint, or of a model given as --model (a
    registered name or your own path/to/file.py:ClassName) with --weights (a state dict), --dataset and
    --data-dir."""

    checkpoint: str | None = field(default=None, metadata=doc(
        "float checkpoint from hwquant train (none: runs/train/model.pt, unless --model is given)"))
    model: str | None = field(default=None, metadata=doc(
        "quantize this model instead of a checkpoint: a registered name or path/to/file.py:ClassName, "
        "path/to/file.py:factory, package.module:factory (needs --dataset; weights from --weights)"))
    weights: str | None = field(default=None, metadata=doc(
        "--model: its trained weights, a state dict saved by torch.save(model.state_dict(), PATH) "
        "(none: the untrained model, with a warning)"))
    dataset: str | None = field(default=None, metadata=doc(
        "--model: the dataset to calibrate and evaluate on (a checkpoint records its own)", DATASETS))
    image_size: str | None = field(default=None, metadata=doc("--model: " + IMAGE_SIZE_HELP))
    calib_size: int | None = field(default=None, metadata=doc(
        "--model: training images to calibrate on (none: as hwquant train holds out: 1000, 200 for digits, "
        "for folder at most a tenth of the training split)"))
    seed: int | None = field(default=None, metadata=doc(
        "--model: seed of the calibration split and of an untrained model's weights (none: 0)"))
    method: str = field(default="minmax", metadata=doc(
        "PTQ method: an activation observer (minmax, percentile, mse, kl, aciq) or the full GGD PTQ (ggd)",
        PTQ_METHODS))
    w_bits: int = field(default=8, metadata=doc("weight bits (2..16)"))
    a_bits: int = field(default=8, metadata=doc("activation bits (2..16)"))
    per_channel: bool | None = field(default=None, metadata=doc(
        "per-output-channel weight scales (none: yes for observer methods, no for ggd's per-layer FL)"))
    bft: bool = field(default=True, metadata=doc("ggd: backward-forward tuning of the fractional lengths"))
    bft_samples: int | None = field(default=512, metadata=doc("ggd: calibration images scoring BFT (none: all)"))
    bft_criterion: str = field(default="kl", metadata=doc(
        "ggd: BFT score: KL divergence from the float model's softmax, logit SQNR, or the paper's top-1",
        ("kl", "logit_sqnr", "top1")))
    bft_holdout: int = field(default=256, metadata=doc(
        "ggd: further calibration images a BFT change must not worsen (0: no check)"))
    power_of_two: bool = field(default=True, metadata=doc("ggd: power-of-two activation steps (fixed point)"))
    image_gain: bool = field(default=True, metadata=doc(
        "ggd: with power-of-two steps, the image layer keeps its exact GGD step as a power of two times an input "
        "gain the host applies to the image (false: rounded like the others)"))
    bias: str = field(default="accumulator", metadata=doc("ggd: bias at the accumulator scale or its own FL",
                                                         ("accumulator", "own")))
    percentile: float = field(default=99.99, metadata=doc("percentile method: clip percentile"))
    aciq_dist: str = field(default="laplace", metadata=doc("aciq method: fitted prior", ("laplace", "gauss")))
    first_last_bits: int | None = field(default=None, metadata=doc("bits of the first and last layer (none: same)"))
    rounding: str = field(default="nearest", metadata=doc("rounding mode"))
    calib_batches: int | None = field(default=None, metadata=doc("max calibration batches (none: all)"))
    bias_correction: bool = field(default=False, metadata=doc(
        "after calibration, subtract each layer's mean output shift (quantized vs float, on the calibration "
        "images) from its bias"))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory (default: as in the checkpoint)"))
    batch_size: int = field(default=256, metadata=doc("calibration / evaluation batch size"))
    device: str = field(default="auto", metadata=doc(DEVICE_HELP, DEVICES))
    threads: int | None = field(default=None, metadata=doc("torch CPU threads"))
    out: str = field(default="runs/ptq", metadata=doc("output directory"))
    progress: bool = field(default=True, metadata=doc("show progress bars"))

    def __post_init__(self) -> None:
        check_choice("method", self.method, PTQ_METHODS)
        check_device(self.device)
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
            check_model(self.model)
            if self.dataset is None:
                raise ConfigError("model needs dataset (and data_dir for the folder dataset)")
            check_choice("dataset", self.dataset, DATASETS)
            check_image_size(self.image_size, self.dataset)
            if self.calib_size is not None and self.calib_size < 1:
                raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}")
            if self.seed is not None and self.seed < 0:
                raise ConfigError(f"seed must be >= 0, got {self.seed}")
        self.method_config()

    def method_config(self) -> ObserverPTQConfig | GGDPTQConfig:
        if self.method == "ggd":
            return GGDPTQConfig(w_bits=self.w_bits, a_bits=self.a_bits, per_channel=bool(self.per_channel),
                                power_of_two=self.power_of_two, image_gain=self.image_gain, bias=self.bias,
                                first_last_bits=self.first_last_bits,
                                bft=self.bft, bft_samples=self.bft_samples, bft_criterion=self.bft_criterion,
                                bft_holdout=self.bft_holdout, calib_batches=self.calib_batches,
                                bias_correction=self.bias_correction)
        args: dict[str, Any] = {}
        if self.method == "percentile":
            args = {"percentile": self.percentile}
        elif self.method == "aciq":
            args = {"dist": self.aciq_dist}
        per_channel = True if self.per_channel is None else self.per_channel
        return ObserverPTQConfig(observer=self.method, observer_args=args, w_bits=self.w_bits, a_bits=self.a_bits,
                                 per_channel=per_channel, first_last_bits=self.first_last_bits,
                                 rounding=self.rounding, calib_batches=self.calib_batches,
                                 bias_correction=self.bias_correction)


def quantize_checkpoint(model: nn.Module, ck: dict[str, Any], cfg: PTQOptions, loaders) -> tuple[nn.Module, dict]:
    qmodel, report = ptq(model, cfg.method_config(), loaders.calib, progress=cfg.progress)
    return qmodel, report


def _model_for_ptq(cfg: PTQOptions):
    """``(model, ck, loaders)`` of ``ptq --model``: the model built from its name or file, its ``--weights``, and a
    checkpoint-like dict (``model_args``, ``data``) whose data split eval/export rebuild later."""
    dataset, _ = resolve_dataset(cfg.dataset, cfg.data_dir, fallback=False)
    seed = 0 if cfg.seed is None else cfg.seed
    calib_size, calib_fraction = default_calibration(dataset, cfg.calib_size)
    loaders = make_loaders(dataset, data_dir=cfg.data_dir, batch_size=cfg.batch_size, eval_batch_size=cfg.batch_size,
                           calib_size=calib_size, seed=seed, augment=False, fallback=False, drop_last=False,
                           image_size=cfg.image_size, max_calib_fraction=calib_fraction)
    info = loaders.info
    model = seeded_model(cfg.model, seed, in_channels=info.in_channels, num_classes=info.num_classes,
                         image_size=info.image_size)
    if cfg.weights is not None:
        load_weights(model, cfg.weights)
    else:
        warn(f"no --weights given: quantizing {cfg.model} with its untrained (random) weights")
    model.eval()
    ck = {"model_args": model.hwquant_args, "data": split_record(info, cfg.data_dir, loaders.calib_size, seed)}
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
    fp32_eval = float_eval(model, ck, loaders, cfg.data_dir, progress=cfg.progress, device=device)
    qmodel, report = quantize_checkpoint(model, ck, cfg, replace(loaders, calib=on_device(loaders.calib, device)))
    q_eval = evaluate(qmodel, loaders.test, progress=cfg.progress, desc="eval quant", device=device)
    out.mkdir(parents=True, exist_ok=True)
    result = {"method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "source": str(source),
              "weights": cfg.weights, "device": str(device), "fp32": fp32_eval, "quant": q_eval, "report": report,
              "float_eval_layers": float_eval_layers(qmodel)}
    save_checkpoint(out / "model.pt", {"model": qmodel.state_dict(), "model_args": ck["model_args"],
                                       "data": ck["data"], "ptq": {"method": cfg.method,
                                                                   "config": asdict(cfg.method_config())},
                                       "metrics": q_eval})
    write_json(out / "ptq.json", result)
    save_config(out, cfg)
    extra = ""
    if report.get("bft"):
        b = report["bft"]
        extra = (f", BFT ({b['criterion']}) calib top-1 {b['before']['top1']:.2f}% -> {b['after']['top1']:.2f}%, "
                 f"KL {b['before']['kl']:.4f} -> {b['after']['kl']:.4f}")
        if b["holdout_images"]:
            extra += f" ({b['rejected_by_holdout']} candidates rejected by {b['holdout_images']} held-out images)"
    print(f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}: top-1 {q_eval['top1']:.2f}% (fp32 {fp32_eval['top1']:.2f}%), "
          f"logit SQNR {report['sqnr_db']:.1f} dB{extra} -> {out / 'model.pt'}")
    gains = {n: g for n, g in (report.get("image_gain") or {}).items() if g != 1.0}
    if gains:
        print("input gain (the host multiplies the normalised image by it before quantizing; equivalently divide "
              "the normalisation's std by it): " + ", ".join(f"{n} {g:.9g}" for n, g in gains.items()))
    bc = report.get("bias_correction")
    if bc:
        worst = max(bc["corrected"].items(), key=lambda kv: kv[1], default=("-", 0.0))
        print(f"bias correction: {len(bc['corrected'])} layers on {bc['images']} calibration images, largest shift "
              f"{worst[1]:.4g} ({worst[0]})" + (f"; no bias, left as is: {', '.join(bc['skipped'])}"
                                               if bc["skipped"] else ""))
    for w in report.get("warnings", []) + float_eval_warnings(result["float_eval_layers"]):
        print(f"warning: {w}")
    return result
