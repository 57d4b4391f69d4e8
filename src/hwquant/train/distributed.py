"""Multi-process data-parallel training with ``torch.distributed`` (``torchrun``; gloo on CPU, nccl on GPU).

``torchrun --nproc_per_node=2 -m hwquant.cli train ...`` sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``;
:func:`init_from_env` joins the process group.  The backend follows the run's device, not the machine: nccl
when the run computes on CUDA (each rank on ``cuda:LOCAL_RANK``, see :func:`rank_device`), gloo otherwise
(a CPU run on a machine with GPUs included).  Each rank trains on a disjoint shard of every epoch's
permutation (see :class:`hwquant.data.BatchLoader`), gradients are averaged by
``DistributedDataParallel``, metrics are summed across ranks, and only rank 0 writes files.

With ``W`` processes of batch ``B`` the run is the single-process run of batch ``W B``: the shards of one
step are exactly the positions of that step's global batch, BatchNorm normalises with the statistics of the
global batch (:func:`sync_batchnorm`: a differentiable all-reduce of the per-channel sums, on CPU / gloo too,
where ``torch.nn.SyncBatchNorm`` does not run), and activation quantizers that follow the batch peak take the
maximum over ranks (in :class:`hwquant.nn.FakeQuantizer`).  Calibration reads the whole calibration split on
every rank, so quantizers start identical; MPQ's flip counters follow the weights, which DDP keeps identical.
``tests/train/test_distributed.py`` checks 2 processes against 1 (final weights within 1e-5).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..collectives import all_reduce_
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
    """Sum ``t`` over ranks, in place (no-op when not distributed; :func:`hwquant.collectives.all_reduce_`)."""
    return all_reduce_(t, "sum")


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode BatchNorm of ``x`` with the mean and (biased) variance of the batch over all ranks; the
    running statistics are updated as ``nn.BatchNorm`` does (unbiased variance, ``momentum`` or the
    cumulative average).  Two differentiable all-reduces (sum, then the sum of squared deviations)."""
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    n_local = x.numel() // c
    s = all_reduce(torch.cat([x.sum(dims), x.new_tensor([float(n_local)])]))
    n = s[c]
    mean = s[:c] / n
    shape = [1, c] + [1] * (x.dim() - 2)
    centred = x - mean.reshape(shape)
    var = all_reduce(centred.pow(2).sum(dims)) / n
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
    y = centred * torch.rsqrt(var + bn.eps).reshape(shape)
    if bn.affine:
        y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return y


class _GlobalBatchNormMixin:
    """``forward`` of a BatchNorm whose training statistics are those of the global batch (all ranks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if current().enabled and (self.training or self.running_mean is None):  # nn.BatchNorm's batch-stats case
            return _global_batch_norm(self, x)
        return super().forward(x)


_GLOBAL_BN: dict[type, type] = {}


def sync_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm of ``model`` normalise with the global batch's statistics when distributed (in
    place: the modules keep their parameters, buffers and state-dict keys, and behave as before in a
    single process or in eval mode).  Returns the number of layers changed."""
    n = 0
    for m in model.modules():
        cls = type(m)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (_GlobalBatchNormMixin,
                                                                                   nn.SyncBatchNorm)):
            if cls not in _GLOBAL_BN:
                _GLOBAL_BN[cls] = type(f"Global{cls.__name__}", (_GlobalBatchNormMixin, cls), {})
            m.__class__ = _GLOBAL_BN[cls]
            n += 1
    return n
