"""Training loop, checkpoints, devices, and torch.distributed helpers."""

from ..device import DEVICES, DeviceLoader, model_device, on_device, resolve_device, to_device
from ..fileio import atomic_write, atomic_write_text
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, init_from_env, rank_device
from .loop import TrainConfig, evaluate, fit, make_optimizer, make_scheduler

__all__ = [
    "DEVICES",
    "DeviceLoader",
    "DistInfo",
    "TrainConfig",
    "atomic_write",
    "atomic_write_text",
    "evaluate",
    "fit",
    "init_from_env",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "model_device",
    "on_device",
    "rank_device",
    "resolve_device",
    "save_checkpoint",
    "to_device",
]
