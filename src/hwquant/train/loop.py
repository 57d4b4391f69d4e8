"""Training and evaluation: SGD + momentum, cosine schedule with warmup, top-1/top-5, resumable.

``fit`` writes ``last.pt`` (model, optimizer, scheduler, history, epoch) atomically after every epoch;
``fit(..., resume=True)`` continues from it.  Epoch ``e``'s batches and augmentation are a function of
``(seed, e)`` (the loader's ``set_epoch``), so an interrupted and resumed run sees the same data as an
uninterrupted one.

Both take any iterable of ``(x, y)`` batches (an hwquant ``BatchLoader``, a ``torch.utils.data.DataLoader``,
a list) and a ``device``: the model and every batch are moved there (see :mod:`hwquant.device`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..device import model_device, resolve_device, to_device
from ..errors import CheckpointError, ConfigError, DataError
from .checkpoint import load_checkpoint, save_checkpoint, state_dict_mismatch
from .distributed import all_reduce_sum, current, sync_batchnorm


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule.

    ``lr`` follows a linear warmup over ``warmup_epochs`` then a cosine decay to 0 at the end of
    ``epochs``, updated every step.  SGD with (Nesterov) momentum and decoupled-from-nothing L2
    ``weight_decay`` (applied to every parameter but BN/bias when ``no_decay_bn_bias``).  ``grad_clip``
    rescales the gradients to at most that global L2 norm before every step (``None``: off).
    """

    epochs: int = 4
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    no_decay_bn_bias: bool = True
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 100):
            raise ConfigError(f"lr must be in (0, 100), got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs), got {self.warmup_epochs!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.grad_clip is not None and not (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be a positive number or null, got {self.grad_clip!r}")


def _batch_xy(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a batch, on ``device``; integer labels as int64 (what cross-entropy takes)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise DataError(f"each batch must be an (x, y) pair, got {type(batch).__name__}")
    x, y = to_device(batch[0], device), to_device(batch[1], device)
    if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dtype != torch.int64:
        y = y.long()
    return x, y


def _run_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Move ``model`` to ``device`` (``None``: leave it where it is) and return the device batches go to."""
    if device is None:
        return model_device(model)
    dev = resolve_device(device)
    model.to(dev)
    return dev


def _set_epoch(loader, epoch: int) -> None:
    """``loader.set_epoch(epoch)``, or its sampler's (a DataLoader with a DistributedSampler); else nothing."""
    fn = getattr(loader, "set_epoch", None) or getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(fn):
        fn(epoch)


def _steps_per_epoch(loader, epoch: int) -> int:
    """Batches per epoch: ``len(loader)`` when it has one, else counted in one pass over ``loader`` (data
    loading only, no training: the cosine schedule needs the total number of steps before the first step)."""
    if isinstance(loader, Iterator):
        raise ConfigError(f"the training loader is a one-shot iterator ({type(loader).__name__}); fit loops over it "
                          "once per epoch: give a list, a DataLoader or another re-iterable")
    try:
        return len(loader)
    except TypeError:
        _set_epoch(loader, epoch)
        return sum(1 for _ in loader)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, progress: bool = False, desc: str = "eval",
             device: str | torch.device | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over ``loader`` (any iterable of ``(x, y)``).

    ``device`` (``auto``, ``cpu``, ``cuda``, a ``torch.device``): move the model there first; ``None``
    (default) leaves the model where it is.  Every batch is moved to the model's device.  If the loader is a
    per-rank shard (``loader.world_size > 1``) the counts are summed across ranks.
    """
    dev = _run_device(model, device)
    was_training = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss_sum, n
    it = tqdm(loader, desc=desc, leave=False, disable=not progress)
    for batch in it:
        x, y = _batch_xy(batch, dev)
        logits = model(x)
        if not torch.isfinite(logits).all():
            raise DataError("non-finite logits during evaluation (NaN in the data or a diverged model)")
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == y[:, None]
        stats[0] += hit[:, 0].sum().item()
        stats[1] += hit.any(dim=1).sum().item()
        stats[2] += F.cross_entropy(logits, y, reduction="sum").item()
        stats[3] += y.numel()
    if getattr(loader, "world_size", 1) > 1:
        all_reduce_sum(stats)
    model.train(was_training)
    n = max(stats[3].item(), 1.0)
    return {"top1": 100.0 * stats[0].item() / n, "top5": 100.0 * stats[1].item() / n,
            "loss": stats[2].item() / n, "n": int(stats[3].item())}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if cfg.no_decay_bn_bias and p.dim() <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def fit(
    model: nn.Module,
    train_loader,
    cfg: TrainConfig,
    *,
    eval_loader: Iterable | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    extra_state: dict[str, Any] | None = None,
    step_hook: Callable[[nn.Module, int], None] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``cfg.epochs`` epochs and return the history.

    Args:
        train_loader: a re-iterable of ``(x, y)`` batches (an hwquant ``BatchLoader``, a torch ``DataLoader``, a
            list; not a one-shot iterator).  ``set_epoch(e)`` (on the loader or its ``sampler``) is called
            before each epoch when it exists.  Without ``len()``, the batches of one epoch are counted in a
            first pass over the loader (data loading only), since the learning-rate schedule needs the total
            number of steps up front.
        eval_loader: evaluated after each epoch (top-1/top-5) if given.
        out_dir: where ``last.pt`` is written after each epoch (rank 0 only).
        resume: continue from ``out_dir/last.pt`` if it exists.
        extra_state: stored in the checkpoint (e.g. model constructor args, dataset info).
        step_hook: called as ``step_hook(model, global_step)`` after every optimiser step.
        device: ``auto``, ``cpu``, ``cuda`` or a ``torch.device``: the model is moved there before the
            optimiser is built, and every batch is moved there; ``None`` (default) leaves the model where it is.
            Checkpoints are written from CPU copies.

    Returns:
        ``{"epochs": [per-epoch records], "step_loss": [...]}`` and, with ``eval_loader``, ``"final_eval"``: the
        :func:`evaluate` result of the trained model (the last epoch's evaluation).
    """
    # seeded from cfg.seed inside, and the caller's global RNG state restored afterwards (a library call
    # must not reseed or advance the user's random streams)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed)
        return _fit(model, train_loader, cfg, eval_loader=eval_loader, out_dir=out_dir, resume=resume,
                    progress=progress, extra_state=extra_state, step_hook=step_hook, device=device)


def _fit(model, train_loader, cfg, *, eval_loader, out_dir, resume, progress, extra_state, step_hook, device):
    dist_info = current()
    dev = _run_device(model, device)
    steps_per_epoch = _steps_per_epoch(train_loader, 0)
    if steps_per_epoch == 0:
        raise DataError("training loader is empty (dataset smaller than one batch?)")
    train_model = model
    if dist_info.enabled:
        sync_batchnorm(model)  # the global batch's statistics: W processes of batch B train as 1 of batch W B
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    history: dict[str, Any] = {"epochs": [], "step_loss": []}
    start_epoch = 0
    ckpt_path = Path(out_dir) / "last.pt" if out_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path)
        problem = state_dict_mismatch(model, ck.get("model", {}))
        if problem:
            raise CheckpointError(f"{ckpt_path} does not match this model: {problem}")
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
        except (RuntimeError, KeyError, ValueError) as e:
            msg = str(e).splitlines()[0]
            raise CheckpointError(f"{ckpt_path} does not match this model/optimizer: {msg}") from None
        if ck.get("train_config", {}).get("epochs") != cfg.epochs:
            raise CheckpointError(
                f"{ckpt_path} was written for epochs={ck.get('train_config', {}).get('epochs')}, "
                f"not {cfg.epochs}; use the same schedule or a new output directory"
            )
        history = ck["history"]
        start_epoch = int(ck["epoch"]) + 1
        torch.set_rng_state(ck["rng_state"])
        if dev.type == "cuda" and "cuda_rng_state" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng_state"], dev)
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_model.train()
        _set_epoch(train_loader, epoch)
        loss_sum = torch.zeros(3, dtype=torch.float64)  # loss*n, correct, n
        window: list[float] = []
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (progress and dist_info.is_main))
        for batch in bar:
            x, y = _batch_xy(batch, dev)
            logits = train_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise DataError(f"loss became {loss.item()} at epoch {epoch + 1} (NaN in the data or lr too high)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            global_step += 1
            if step_hook is not None:
                step_hook(model, global_step)
            with torch.no_grad():
                n = y.numel()
                loss_sum[0] += loss.item() * n
                loss_sum[1] += (logits.argmax(1) == y).sum().item()
                loss_sum[2] += n
            window.append(loss.item())
            if len(window) == 10:
                history["step_loss"].append([global_step, sum(window) / len(window)])
                window.clear()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
        all_reduce_sum(loss_sum)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum[0].item() / loss_sum[2].item(),
            "train_top1": 100.0 * loss_sum[1].item() / loss_sum[2].item(),
            "lr_end": sched.get_last_lr()[0],
            "seconds": time.perf_counter() - t0,
        }
        if eval_loader is not None:
            ev = evaluate(model, eval_loader)
            record.update({"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]})
            if epoch + 1 == cfg.epochs:
                history["final_eval"] = ev  # the trained model's evaluation: callers need not repeat it
        history["epochs"].append(record)
        if progress and dist_info.is_main:
            msg = f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} train {record['train_top1']:.2f}%"
            if "test_top1" in record:
                msg += f" test {record['test_top1']:.2f}%"
            tqdm.write(msg + f" ({record['seconds']:.0f}s)")
        if ckpt_path is not None and dist_info.is_main:
            cuda_rng = {"cuda_rng_state": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {}
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch, "history": history, "train_config": asdict(cfg),
                "rng_state": torch.get_rng_state(), **cuda_rng, **(extra_state or {}),
            })
    return history
