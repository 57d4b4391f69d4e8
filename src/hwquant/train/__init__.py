"""Training loop, checkpoints, and torch.distributed helpers."""

from .checkpoint import atomic_write, atomic_write_text, load_checkpoint, save_checkpoint
from .distributed import DistInfo, init_from_env
from .loop import TrainConfig, evaluate, fit, make_optimizer, make_scheduler

__all__ = [
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
    "save_checkpoint",
]
