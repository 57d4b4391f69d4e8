"""``hwquant train``: train a float model (built in or the user's), resumable, torchrun-aware."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import default_calibration, make_loaders, resolve_dataset, split_record
from ..errors import ConfigError
from ..models import list_models
from ..train import TrainConfig, save_checkpoint
from .common import (
    DATASETS,
    IMAGE_SIZE_HELP,
    MODEL_HELP,
    TrainingOptions,
    arc_config,
    check_choice,
    check_device,
    check_image_size,
    check_model,
    doc,
    fit_and_evaluate,
    save_config,
    say,
    seeded_model,
    start_training,
    use_channels_last,
    write_json,
)


@dataclass(frozen=True)
class TrainOptions(TrainingOptions):
    """``hwquant train``: train a float model and save ``model.pt``."""

    model: str = field(default="resnet20", metadata=doc(MODEL_HELP.format(names=", ".join(list_models()))))
    dataset: str = field(default="fashion_mnist", metadata=doc(
        "dataset (folder: --data-dir holds one subfolder of images per class)", DATASETS))
    data_dir: str | None = field(default=None, metadata=doc("dataset directory (default: the standard location)"))
    image_size: str | None = field(default=None, metadata=doc(IMAGE_SIZE_HELP))
    fallback: bool = field(default=True, metadata=doc("fall back to sklearn digits if Fashion-MNIST is missing"))
    width: float = field(default=1.0, metadata=doc("channel width multiplier"))
    epochs: int = field(default=4, metadata=doc("training epochs"))
    lr: float = field(default=0.1, metadata=doc("peak learning rate (cosine decay to 0)"))
    weight_decay: float = field(default=5e-4, metadata=doc("L2 weight decay (not on BN/bias)"))
    label_smoothing: float = field(default=0.0, metadata=doc("label smoothing"))
    calib_size: int | None = field(default=None, metadata=doc(
        "training images held out for calibration (none: 1000, or 200 for the small digits set; for folder at "
        "most a tenth of the training split)"))
    seed: int = field(default=0, metadata=doc("seed for init, data order and augmentation"))
    out: str = field(default="runs/train", metadata=doc("output directory"))

    def __post_init__(self) -> None:
        check_model(self.model)
        check_choice("dataset", self.dataset, DATASETS)
        check_device(self.device)
        check_image_size(self.image_size, self.dataset)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.calib_size is not None and self.calib_size < 0:
            raise ConfigError(f"calib_size must be >= 0, got {self.calib_size}")
        self.train_config()  # validates epochs, lr, ...
        arc_config(self)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                           warmup_epochs=self.warmup_epochs, label_smoothing=self.label_smoothing, seed=self.seed)


def run_train(cfg: TrainOptions) -> dict[str, Any]:
    """Train a float model; writes OUT/model.pt, OUT/last.pt, OUT/metrics.json, OUT/config.yaml."""
    device, dist_info, out = start_training(cfg)
    dataset, message = resolve_dataset(cfg.dataset, cfg.data_dir, fallback=cfg.fallback)
    if message:
        say(message)
    data_dir = cfg.data_dir if dataset == cfg.dataset else None
    calib_size, calib_fraction = default_calibration(dataset, cfg.calib_size)
    loaders = make_loaders(dataset, data_dir=data_dir, batch_size=cfg.batch_size, calib_size=calib_size,
                           seed=cfg.seed, augment=cfg.augment, fallback=False, rank=dist_info.rank,
                           world_size=dist_info.world_size, channels_last=cfg.channels_last,
                           image_size=cfg.image_size, max_calib_fraction=calib_fraction)
    info = loaders.info
    model = seeded_model(cfg.model, cfg.seed, in_channels=info.in_channels, num_classes=info.num_classes,
                         width=cfg.width, image_size=info.image_size)
    if use_channels_last(cfg.channels_last, model, loaders):
        model = model.to(memory_format=torch.channels_last)
    data_meta = split_record(info, data_dir, loaders.calib_size, cfg.seed)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(out, cfg)
    say(f"training {cfg.model} on {info.name} ({info.source}) for {cfg.epochs} epochs, "
         f"{len(loaders.train)} steps/epoch x {dist_info.world_size} process(es) on {device}")
    extra = {"model_args": model.hwquant_args, "data": data_meta}
    run = fit_and_evaluate(model, loaders, cfg, out, extra, device)
    history, seconds, final, arc_meta = run["history"], run["seconds"], run["final"], run["arc"]
    result = {"model": cfg.model, "dataset": info.name, "source": info.source, "test": final,
              "train_seconds": seconds, "world_size": dist_info.world_size, "history": history["epochs"],
              "arc": arc_meta, "device": str(device)}
    if dist_info.is_main:
        save_checkpoint(out / "model.pt", {"model": model.state_dict(), "model_args": model.hwquant_args,
                                           "data": data_meta, "metrics": final, "history": history})
        write_json(out / "metrics.json", result)
    say(f"test top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  -> {out / 'model.pt'}")
    return result
