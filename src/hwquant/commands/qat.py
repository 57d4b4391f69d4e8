"""``hwquant qat``: quantization-aware fine-tuning of a float checkpoint (CQAT, STE, PACT, LSQ, MPQ, or the
FP32 control), resumable, torchrun-aware."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data import make_loaders
from ..device import on_device
from ..errors import CheckpointError, ConfigError
from ..methods import QAT_CONFIGS, CQATConfig, MPQConfig, mpq_summary, prepare_qat, qat_summary, schedule_mpq
from ..nn import float_eval_layers, fold_batchnorm
from ..train import TrainConfig, evaluate, save_checkpoint
from .common import (
    TrainingOptions,
    arc_config,
    check_choice,
    check_device,
    doc,
    fit_and_evaluate,
    float_eval,
    float_eval_warnings,
    load_model,
    save_config,
    say,
    start_training,
    use_channels_last,
    write_json,
)

QAT_METHODS = ("cqat", "ste", "pact", "lsq", "mpq", "fp32")


@dataclass(frozen=True)
class QATOptions(TrainingOptions):
    """``hwquant qat``: quantization-aware fine-tuning of a trained float checkpoint (CQAT or a baseline)."""

    checkpoint: str = field(default="runs/train/model.pt", metadata=doc("float checkpoint from hwquant train"))
    method: str = field(default="cqat", metadata=doc(
        "cqat (clipped 8-bit step), ste (min-max), pact (learned clip), lsq (learned step), mpq (mixed precision: "
        "an extra weight bit for flipping weights), or fp32 (the BN-folded float model fine-tuned with the same "
        "schedule: the control)", QAT_METHODS))
    w_bits: int = field(default=5, metadata=doc("stored weight bits (2..16)"))
    a_bits: int = field(default=4, metadata=doc("stored activation bits (2..16)"))
    steps_per_epoch: int | None = field(default=None, metadata=doc(
        "train on only the first N batches of each epoch's shuffled order (none: the whole epoch); a short "
        "fine-tune, the schedule follows"))
    base_bits: int = field(default=8, metadata=doc("cqat: bits the step is sized for"))
    step: str = field(default="mse", metadata=doc(
        "cqat: step calibration, mse (for the clipped codes), max (literal peak / (2^base_bits - 1)) or window "
        "(the low-bit code is the 8-bit min-max code shifted right by a per-layer shift)", ("mse", "max", "window")))
    act_range: str = field(default="ema", metadata=doc("cqat: activation step follows an EMA of the peak, or "
                                                       "stays static", ("ema", "static")))
    mpq_flag_at: float = field(default=0.5, metadata=doc("mpq: fraction of training at which extra bits are given"))
    mpq_window: float = field(default=0.25, metadata=doc("mpq: fraction of training before that, counting flips"))
    mpq_min_flips: int = field(default=2, metadata=doc("mpq: flips a weight needs for the extra bit"))
    mpq_max_extra: float = field(default=0.1, metadata=doc("mpq: at most this fraction of a layer's weights get it "
                                                          "(0: uniform w_bits)"))
    mpq_eps: float = field(default=0.1, metadata=doc("mpq: 'near a rounding threshold' distance, in steps"))
    mpq_gamma: float = field(default=0.1, metadata=doc("mpq: learning-rate factor near a threshold (1: off)"))
    mpq_choose: str = field(default="flips", metadata=doc(
        "mpq: weights given the extra bit: the most flipping (the method) or as many at random (ablation; --seed)",
        ("flips", "random")))
    mpq_lr_scope: str = field(default="flipping", metadata=doc(
        "mpq: near-threshold weights the lr factor applies to: those that flipped in the counting window, all "
        "(the literal rule) or all once the extra bits are assigned", ("flipping", "all", "after_flag")))
    first_last_bits: int | None = field(default=8, metadata=doc("bits of the first conv and last FC (none: same)"))
    per_channel: bool = field(default=True, metadata=doc("per-output-channel weight steps"))
    pow2: bool = field(default=False, metadata=doc(
        "power-of-two steps (fixed point: requantization is a shift and the integer model is bit-exact; "
        "cqat/ste only)"))
    pow2_step: str = field(default="round", metadata=doc(
        "cqat --pow2: the MSE step rounded to a power of two, or the MSE-best power of two", ("round", "search")))
    epochs: int = field(default=2, metadata=doc("fine-tuning epochs"))
    lr: float = field(default=0.005, metadata=doc("peak learning rate (cosine decay to 0)"))
    weight_decay: float = field(default=5e-4, metadata=doc("L2 weight decay (not on biases / steps)"))
    grad_clip: float | None = field(default=2.0, metadata=doc(
        "clip the global gradient norm (the BN-folded network has no normalisation; none: off)"))
    calib_batches: int | None = field(default=8, metadata=doc("calibration batches to initialise the steps"))
    seed: int = field(default=0, metadata=doc("seed for data order and augmentation"))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory (default: as in the checkpoint)"))
    out: str = field(default="runs/qat", metadata=doc("output directory"))

    def __post_init__(self) -> None:
        check_choice("method", self.method, QAT_METHODS)
        check_device(self.device)
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
                             choose=self.mpq_choose, seed=self.seed, lr_scope=self.mpq_lr_scope)
        return QAT_CONFIGS[self.method](**common)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                           warmup_epochs=self.warmup_epochs, grad_clip=self.grad_clip, seed=self.seed)


def run_qat(cfg: QATOptions) -> dict[str, Any]:
    """QAT fine-tune of a float checkpoint; writes OUT/model.pt, OUT/last.pt, OUT/qat.json, OUT/config.yaml.

    Reports the test accuracy of the float model, of the quantized model right after initialisation (the PTQ
    starting point) and after fine-tuning, and the loss curve.
    """
    device, dist_info, out = start_training(cfg)
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
    channels_last = use_channels_last(cfg.channels_last, model, loaders)
    fp32 = float_eval(model, ck, loaders, cfg.data_dir, progress=cfg.progress, device=device)
    qcfg = cfg.method_config()
    # the fp32 control trains the same BN-folded network the QAT methods train
    qmodel = fold_batchnorm(model) if qcfg is None else prepare_qat(model, qcfg, on_device(loaders.calib, device))
    if channels_last:
        qmodel = qmodel.to(memory_format=torch.channels_last)
    start = evaluate(qmodel, loaders.test, progress=cfg.progress, desc="eval start", device=device)
    meta = {"method": cfg.method, "config": asdict(qcfg) if qcfg is not None else {}}
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(out, cfg)
    # what is trained: the method and its widths; the fp32 control keeps float weights and activations (and says
    # when its gradients are quantized)
    what = f"{cfg.method} W{cfg.w_bits}A{cfg.a_bits}" if qcfg is not None else "fp32 (BN-folded)"
    what += f", G{cfg.grad_bits} gradients" if cfg.grad_bits is not None else ""
    say(f"{what}: fp32 {fp32['top1']:.2f}%, before fine-tuning "
         f"{start['top1']:.2f}%; fine-tuning {cfg.epochs} epochs at lr {cfg.lr:g}")
    if isinstance(qcfg, MPQConfig):
        total = len(loaders.train) * cfg.epochs
        first, flag = schedule_mpq(qmodel, total, qcfg)
        say(f"mpq: flips counted from step {first}, extra bits assigned at step {flag} of {total}")
    extra = {"model_args": ck["model_args"], "data": d, "qat": meta}
    run = fit_and_evaluate(qmodel, loaders, cfg, out, extra, device)
    history, seconds, final, arc_meta = run["history"], run["seconds"], run["final"], run["arc"]
    result = {"method": cfg.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits, "config": meta["config"],
              "fp32": fp32, "start": start, "final": final, "train_seconds": seconds, "history": history["epochs"],
              "step_loss": history["step_loss"], "layers": qat_summary(qmodel) if qcfg is not None else [],
              "arc": arc_meta, "mpq": mpq_summary(qmodel) if isinstance(qcfg, MPQConfig) else None,
              "float_eval_layers": float_eval_layers(qmodel) if qcfg is not None else {}}
    if dist_info.is_main:
        save_checkpoint(out / "model.pt", {"model": qmodel.state_dict(), "model_args": ck["model_args"],
                                           "data": d, "qat": meta, "metrics": final, "history": history})
        write_json(out / "qat.json", result)
    say(f"{what}: top-1 {final['top1']:.2f}% (fp32 {fp32['top1']:.2f}%, "
         f"start {start['top1']:.2f}%) -> {out / 'model.pt'}")
    for w in float_eval_warnings(result["float_eval_layers"]):
        say(f"warning: {w}")
    return result
