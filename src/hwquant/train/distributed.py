"""Multi-process data-parallel training with ``torch.distributed`` (``torchrun``; gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node=2 -m hwquant.cli train ...`` sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``;
:func:`init_from_env` joins the process group.  Each rank trains on a disjoint shard of every epoch's
permutation (see :class:`hwquant.data.BatchLoader`), gradients are averaged by
``DistributedDataParallel``, metrics are summed across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment, or return a single-process info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())


def current() -> DistInfo:
    """The process group this process is in (single-process if none)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size())
    return DistInfo()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (no-op when not distributed)."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
