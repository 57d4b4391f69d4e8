"""Multi-process data-parallel training with ``torch.distributed`` (``torchrun``; gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node=2 -m hwquant.cli train ...`` sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``;
:func:`init_from_env` joins the process group.  The backend follows the run's device, not the machine: nccl
when the run computes on CUDA (each rank on ``cuda:LOCAL_RANK``, see :func:`rank_device`), gloo otherwise
(a CPU run on a machine with GPUs included).  Each rank trains on a disjoint shard of every epoch's
permutation (see :class:`hwquant.data.BatchLoader`), gradients are averaged by
``DistributedDataParallel``, metrics are summed across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: torch.device | str) -> torch.device:
    """The device this process computes on: ``cuda:LOCAL_RANK`` for a CUDA run under torchrun (more than
    one process), else ``device`` itself."""
    device = torch.device(device)
    if device.type != "cuda" or _world_size() <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise ConfigError(f"LOCAL_RANK {local} has no CUDA device (this machine has {count}); "
                          "run at most one process per GPU")
    return torch.device("cuda", local)


def init_from_env(backend: str | None = None, device: torch.device | str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment, or return a single-process info.

    ``device`` is the run's device (default cpu): the backend is nccl for ``cuda`` (and this process's
    current CUDA device becomes :func:`rank_device`), gloo otherwise, unless ``backend`` names one.
    """
    if _world_size() <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda":
            torch.cuda.set_device(rank_device(dev))
        dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def current() -> DistInfo:
    """The process group this process is in (single-process if none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistInfo()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place (no-op when not distributed).

    nccl reduces CUDA tensors only: a CPU tensor goes through a copy on the current CUDA device.
    """
    if current().enabled:
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            buf = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
