"""Backward-forward tuning (BFT) of fractional lengths, and the calibration scorer it maximises.

GGD PTQ's step 5 (:mod:`hwquant.methods.ggd_ptq`, where the criterion and the hold-out are described):
:func:`backward_forward_tuning` sweeps the quantized layers last to first, then first to last, tries ``FL - 1``
and ``FL + 1`` for each weight and input quantizer (a step times 2 or 1/2, so power-of-two steps stay powers of
two; a folded input gain is untouched) and keeps a change only if the :class:`CalibScorer`'s key improves and,
with a hold-out scorer, does not get worse on the held-out images.  :class:`PrefixCache` replays the outputs
of the layers that run before the tuned one (the same results, fewer forward passes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..nn.swap import quant_layers

__all__ = ["BFT_CRITERIA", "CalibScorer", "PrefixCache", "backward_forward_tuning", "kl_divergence"]

BFT_CRITERIA = ("kl", "logit_sqnr", "top1")


class CalibScorer:
    """Scores a quantized model on fixed calibration images.

    The images ``skip .. skip + max_samples`` of ``batches`` (``max_samples=None``: all after ``skip``) and the
    float model's logits on them are kept, so each candidate costs one forward pass.  :meth:`metrics` gives
    top-1 / top-5 (%), the logit SQNR (dB) and the mean KL divergence of the quantized model's softmax from the
    float model's (nats per image); calling the scorer gives the key BFT maximises for ``criterion``
    (``"kl"``: ``(-KL, SQNR)``, ``"logit_sqnr"``: ``(SQNR,)``, ``"top1"``: ``(top-1, top-5, SQNR)``).  Batches
    without labels (bare tensors) are scored against the float model's own predictions
    (``self.labels == "float model"``).  With ``channels_last`` 4-D inputs are kept channels-last (faster CPU
    convolutions; the results do not depend on the memory format).
    """

    def __init__(self, float_model: nn.Module, batches: Iterable, max_samples: int | None = None,
                 channels_last: bool = True, *, criterion: str = "top1", skip: int = 0):
        if criterion not in BFT_CRITERIA:
            raise ConfigError(f"criterion must be one of {', '.join(BFT_CRITERIA)}, got {criterion!r}")
        self.criterion = criterion
        self.batch_hook = None  # called with (id(self), batch index) before each batch (BFT's prefix cache)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ref: list[torch.Tensor] = []
        self.labels = "data"
        float_model.eval()
        kept = seen = 0
        with torch.no_grad():
            for batch in batches:
                if max_samples is not None and kept >= max_samples:
                    break
                x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) \
                    else (batch, None)
                lo = min(max(skip - seen, 0), x.shape[0])  # images of this batch before the wanted range
                seen += x.shape[0]
                x = x[lo:]
                y = None if y is None else y[lo:]
                if max_samples is not None:
                    x = x[: max_samples - kept]
                    y = None if y is None else y[: max_samples - kept]
                if x.shape[0] == 0:
                    continue
                if x.dim() == 4 and channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                kept += x.shape[0]
                ref = float_model(x)
                if y is None:
                    y = ref.argmax(1)
                    self.labels = "float model"
                self.batches.append((x, y))
                self.ref.append(ref.double())
        self.images = kept
        if not self.batches and skip == 0:
            raise DataError("calibration loader is empty")
        self.evaluations = 0

    @torch.no_grad()
    def metrics(self, model: nn.Module) -> dict[str, float]:
        """``{"top1", "top5", "sqnr_db", "kl"}`` of ``model`` on the kept images."""
        model.eval()
        c1 = c5 = n = 0
        sig = noise = kl = 0.0
        for i, ((x, y), ref) in enumerate(zip(self.batches, self.ref, strict=True)):
            if self.batch_hook is not None:
                self.batch_hook((id(self), i))
            logits = model(x)
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == y[:, None]
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(1).sum())
            n += y.numel()
            d = logits.double()
            sig += float(ref.pow(2).sum())
            noise += float((ref - d).pow(2).sum())
            kl += float(kl_divergence(ref, d).sum())
        self.evaluations += 1
        sq = math.inf if noise == 0 else 10 * math.log10(sig / noise)
        n = max(n, 1)
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "sqnr_db": sq, "kl": kl / n}

    def key(self, m: dict[str, float]) -> tuple[float, ...]:
        """What BFT maximises, from :meth:`metrics` (see the class docstring)."""
        if self.criterion == "kl":
            return (-m["kl"], m["sqnr_db"])
        if self.criterion == "logit_sqnr":
            return (m["sqnr_db"],)
        return (m["top1"], m["top5"], m["sqnr_db"])

    def __call__(self, model: nn.Module) -> tuple[float, ...]:
        return self.key(self.metrics(model))


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row, ``KL(softmax(ref) || softmax(logits))`` in nats (float64)."""
    p_log = torch.log_softmax(ref_logits.double(), dim=1)
    q_log = torch.log_softmax(logits.double(), dim=1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=1)


class PrefixCache:
    """Replays, while BFT tunes a quantizer, the outputs of the quantized layers that run before it is used.

    In eval mode on a fixed batch, a layer call that comes before the first call of every layer using the tuned
    quantizer (an input quantizer can be shared by the layers that read one value) cannot depend on it: it
    returns the same bits in every candidate as in the configuration BFT last kept.  So each quantized layer's
    ``forward`` is wrapped: calls at a position (in the batch's call sequence) before that limit return a copy
    of the kept output instead of recomputing it (a copy: the caller may modify it in place), later calls
    compute and their outputs are recorded; :meth:`accept` makes the record of a kept candidate the cache,
    :meth:`begin` drops a rejected one's.  Results are identical to running without it (tested); the saving is
    the layers before the tuned one (about half of every candidate's forward).  Disabled (everything computed)
    when a batch's call sequence changes between runs (data-dependent control flow) or the cache would exceed
    half of ``budget_bytes``.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]], budget_bytes: int = 2 << 30, enabled: bool = True):
        self.layers = layers if enabled else []
        self.budget = budget_bytes
        self.enabled = enabled
        self.seq: dict[tuple, list[str]] = {}  # batch key -> layer names in call order
        self.cache: dict[tuple, torch.Tensor] = {}  # (batch key, position) -> kept output
        self.pending: dict[tuple, torch.Tensor] = {}
        self.tuning: set[str] | None = None
        self.batch: tuple | None = None
        self.pos = 0
        self.recording = False
        self.replayed = self.computed = 0

    def __enter__(self) -> PrefixCache:
        for name, m in self.layers:
            m.forward = self._wrap(name, m.forward)  # an instance attribute: nn.Module.__call__ (and hooks) as usual
        return self

    def __exit__(self, *exc) -> None:
        for _, m in self.layers:
            if "forward" in m.__dict__:
                del m.forward
        self.cache.clear()
        self.pending.clear()

    def start_batch(self, key: tuple) -> None:
        self.batch, self.pos = key, 0
        self.recording = key not in self.seq  # the first run of a batch records its call sequence
        self.seq.setdefault(key, [])

    def begin(self, names: set[str] | None) -> None:
        """A new candidate that changes the layers ``names`` (every layer using the tuned quantizer; ``None``:
        replay nothing); drops the last candidate's record."""
        self.tuning = names
        self.pending.clear()

    def accept(self) -> None:
        """The configuration just scored is kept: its record becomes the cache."""
        if not self.enabled:
            return
        self.cache.update(self.pending)
        self.pending.clear()
        if sum(t.numel() * t.element_size() for t in self.cache.values()) > self.budget // 2:
            self._disable()

    def _disable(self) -> None:
        self.enabled = False
        self.cache.clear()
        self.pending.clear()

    def _limit(self, seq: list[str]) -> int:
        """The position of the first call of a changed layer (0: none is called, nothing is replayed)."""
        if not self.tuning:
            return 0
        return next((i for i, n in enumerate(seq) if n in self.tuning), 0)

    def _wrap(self, name: str, forward):
        def call(*args, **kwargs):
            if not self.enabled or self.batch is None:
                return forward(*args, **kwargs)
            pos = self.pos
            self.pos += 1
            seq = self.seq[self.batch]
            if self.recording:
                seq.append(name)
            elif pos >= len(seq) or seq[pos] != name:
                self._disable()  # the sequence changed: nothing is replayed from here on
                return forward(*args, **kwargs)
            key = (self.batch, pos)
            if pos < self._limit(seq) and key in self.cache:
                self.replayed += 1
                return self.cache[key].clone()
            out = forward(*args, **kwargs)
            self.computed += 1
            if isinstance(out, torch.Tensor):
                self.pending[key] = out.detach().clone()
            return out

        return call


def backward_forward_tuning(
    qmodel: nn.Module, scorer: CalibScorer, *, passes: tuple[str, ...] = ("backward", "forward"), progress=False,
    holdout: CalibScorer | None = None, prefix_cache: bool = True,
) -> dict[str, Any]:
    """Greedy per-layer FL tuning (see the module docstring); returns the metrics before and after (on the
    scoring images and the held-out ones), the changes kept and the candidates the hold-out rejected.
    ``prefix_cache``: replay the layers that run before the tuned one (:class:`PrefixCache`; same results)."""
    layers = list(quant_layers(qmodel))
    use_holdout = holdout is not None and holdout.images > 0
    scorers = (scorer, holdout) if use_holdout else (scorer,)
    with PrefixCache(layers, enabled=prefix_cache) as cache:
        for sc in scorers:
            sc.batch_hook = cache.start_batch
        try:
            out = _bft(qmodel, layers, scorer, holdout if use_holdout else None, passes, progress, cache)
        finally:
            for sc in scorers:
                sc.batch_hook = None
    out["prefix_cache"] = {"replayed": cache.replayed, "computed": cache.computed, "enabled": cache.enabled}
    return out


def _bft(qmodel, layers, scorer, holdout, passes, progress, cache) -> dict[str, Any]:
    use_holdout = holdout is not None
    evals0 = scorer.evaluations + (holdout.evaluations if use_holdout else 0)  # scorers can be reused
    cache.begin(None)
    best_m = scorer.metrics(qmodel)
    best = scorer.key(best_m)
    start_m = best_m
    hold_m = holdout.metrics(qmodel) if use_holdout else None
    hold_start = hold_m
    cache.accept()
    changes: list[dict[str, Any]] = []
    rejected = 0
    total = sum(2 * len(layers) for _ in passes)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="BFT", leave=False)
    for direction in passes:
        order = layers[::-1] if direction == "backward" else layers
        for name, layer in order:
            for kind, q in (("weight", layer.weight_quant), ("act", layer.input_quant)):
                if bar is not None:
                    bar.update(1)
                if q is None or not q.calibrated:
                    continue
                base = q.scale.clone()
                choice = None
                users = {n for n, lay in layers if q is lay.weight_quant or q is lay.input_quant}
                for delta in (-1, 1):  # FL + delta  <=>  scale * 2^-delta
                    q.scale = base * (2.0 ** -delta)
                    cache.begin(users)
                    m = scorer.metrics(qmodel)
                    if scorer.key(m) > best:
                        if use_holdout:
                            h = holdout.metrics(qmodel)
                            if holdout.key(h) < holdout.key(hold_m):  # better on the scored images only
                                rejected += 1
                                continue
                            hold_m = h
                        best, best_m, choice = scorer.key(m), m, delta
                        cache.accept()
                q.scale = base * (2.0 ** -choice) if choice is not None else base
                if choice is not None:
                    changes.append({"pass": direction, "layer": name, "operand": kind, "delta_fl": choice,
                                    **best_m})
    if bar is not None:
        bar.close()
    return {"criterion": scorer.criterion, "before": start_m, "after": best_m,
            "holdout_images": holdout.images if use_holdout else 0, "holdout_before": hold_start,
            "holdout_after": hold_m, "rejected_by_holdout": rejected, "changes": changes,
            "evaluations": scorer.evaluations + (holdout.evaluations if use_holdout else 0) - evals0}
