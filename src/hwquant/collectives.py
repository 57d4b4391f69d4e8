"""In-place reductions over the ranks of a data-parallel run (a no-op in a single process).

The one place that talks to ``torch.distributed`` for reductions, below every layer that needs one (the
quantizers' batch peaks, the training loop's metrics); :mod:`hwquant.train.distributed` sets the process
group up.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": "SUM", "max": "MAX"}


def distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t <- op over the ranks of t`` in place (``op``: ``"sum"`` or ``"max"``); returns ``t``.  Every rank
    must call it at the same point.  nccl reduces CUDA tensors only: a CPU tensor goes through a copy on the
    current CUDA device."""
    if not distributed():
        return t
    rop = getattr(dist.ReduceOp, _OPS[op])
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=rop)
        t.copy_(buf.cpu())
    else:
        dist.all_reduce(t, op=rop)
    return t
