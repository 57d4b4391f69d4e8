"""A tiny benchmark harness: timing, machine description, atomic result files.

The benchmarks run on small, shared, noisy CPU machines, so absolute times drift by tens of percent from
one minute to the next.  Everything here is built to report **ratios measured within one run**:

* :func:`time_interleaved` times several functions in rounds (``A, B, C, A, B, C, ...``, rotating the
  starting function each round), so a slow spell of the machine hits every contender alike;
* :func:`paired_ratio` takes the median of the per-round ratios ``a_i / b_i``, which cancels noise that
  is shared by the two timings of one round;
* every statistic is a median over repeats (``min`` is kept as well: it is the least-disturbed run).

Results go to ``benchmarks/results/<name>.json`` and ``.md`` (or the directory named by the environment
variable ``HWQUANT_BENCH_RESULTS``, or an explicit ``results_dir`` argument), written atomically.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hwquant.report import markdown_table

__all__ = [
    "DEMO_CHECKPOINT",
    "RESULTS_ENV",
    "float_checkpoint",
    "loadavg",
    "machine_info",
    "machine_line",
    "markdown_table",
    "paired_ratio",
    "results_dir",
    "time_fn",
    "time_interleaved",
    "write_results",
]

RESULTS_ENV = "HWQUANT_BENCH_RESULTS"
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------------------------- timing
def _loops_for(fn: Callable[[], Any], min_time: float) -> int:
    """How many back-to-back calls of ``fn`` make one timed run last at least ``min_time`` seconds."""
    if min_time <= 0:
        return 1
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, math.ceil(min_time / max(dt, 1e-9)))


def _stats(runs: list[float], loops: int) -> dict[str, Any]:
    return {"median_s": statistics.median(runs), "min_s": min(runs), "runs": runs, "loops": loops}


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_time: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Time every function in ``fns`` ``repeats`` times, interleaved round by round.

    Each round calls every function once (``loops`` times back to back when ``min_time`` asks for runs of
    at least that many seconds), starting from a different function each round so no contender always
    follows the same one.  ``warmup`` untimed rounds come first.  Returns, per name, ``median_s`` and
    ``min_s`` (seconds per call), ``runs`` (seconds per call of each round, in round order, so two names'
    runs can be paired) and ``loops``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    loops = {name: _loops_for(fns[name], min_time) for name in names}
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = fns[name], loops[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs[name].append((time.perf_counter() - t0) / n)
    return {name: _stats(runs[name], loops[name]) for name in names}


def time_fn(
    fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 2, min_time: float = 0.0
) -> dict[str, Any]:
    """Time one function: ``{"median_s", "min_s", "runs", "loops"}`` (seconds per call).

    ``warmup`` untimed calls, then ``repeats`` timed runs; with ``min_time > 0`` each run loops the call
    until it lasts about ``min_time`` seconds (for calls too short for the timer) and reports per call.
    """
    return time_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, min_time=min_time)["fn"]


def paired_ratio(a: dict[str, Any] | list[float], b: dict[str, Any] | list[float]) -> float:
    """Median over rounds of ``a_i / b_i`` for two interleaved timings (stats dicts or run lists)."""
    ra = a["runs"] if isinstance(a, dict) else a
    rb = b["runs"] if isinstance(b, dict) else b
    if len(ra) != len(rb) or not ra:
        raise ValueError("paired_ratio needs two non-empty run lists of equal length")
    return statistics.median(x / y for x, y in zip(ra, rb, strict=True))


# ---------------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages (``None`` where unsupported): a hint that other work was running."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info() -> dict[str, Any]:
    """Where and when the numbers were taken (no hostname): CPU, core counts, torch, Python, load, CUDA."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    load = loadavg()
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_1_5_15": load,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One human-readable line describing :func:`machine_info`."""
    gpu = f"CUDA: {info['cuda_device']}" if info.get("cuda_available") else "CUDA: no"
    load = info.get("loadavg_1_5_15")
    load_s = f", load avg {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}" if load else ""
    return (
        f"{info['processor']}, {info['cpu_count']} logical CPUs, torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}, {info['platform']}, {gpu}"
        f"{load_s}; {info['utc']}"
    )


# ---------------------------------------------------------------------------------------- settings
class SettingError(ValueError):
    """A benchmark setting from the environment that does not parse; ``python -m benchmarks.run`` prints it
    on one line and exits with status 2 before any benchmark starts."""


def env_ints(name: str, default: str, *, minimum: int = 0) -> tuple[int, ...]:
    """``$name`` as comma-separated integers (each ``>= minimum``), else ``default``."""
    raw = os.environ.get(name, default)
    try:
        vals = tuple(int(v) for v in raw.split(","))
    except ValueError:
        raise SettingError(f"{name} must be comma-separated integers, got {raw!r}") from None
    if not vals or min(vals) < minimum:
        raise SettingError(f"{name} values must be >= {minimum}, got {raw!r}")
    return vals


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    """``$name`` as one integer ``>= minimum``, else ``default``."""
    vals = env_ints(name, str(default), minimum=minimum)
    if len(vals) != 1:
        raise SettingError(f"{name} must be one integer, got {os.environ.get(name)!r}")
    return vals[0]


# ---------------------------------------------------------------------------------------- results
def results_dir(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit``, else ``$HWQUANT_BENCH_RESULTS``, else ``benchmarks/results``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else DEFAULT_RESULTS_DIR


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_results(
    name: str,
    results: dict[str, Any],
    table_md: str,
    *,
    out_dir: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Write ``<dir>/<name>.json`` and ``<dir>/<name>.md`` atomically; returns their paths.

    The JSON is ``{"benchmark": name, "machine": machine_info(), "results": results}``; the Markdown is a
    heading, the machine line and ``table_md``.  ``<dir>`` is :func:`results_dir` of ``out_dir``.
    """
    out = results_dir(out_dir)
    info = machine_info()
    payload = {"benchmark": name, "machine": info, "results": results}
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    _atomic_write_text(json_path, json.dumps(payload, indent=2, default=_json_default) + "\n")
    md = f"# Benchmark: {name}\n\nMachine: {machine_line(info)}\n\n{table_md.rstrip()}\n"
    _atomic_write_text(md_path, md)
    return json_path, md_path


DEMO_CHECKPOINT = Path("runs/cache/resnet20-fashion_mnist-e4-b128-lr0.1-s0/model.pt")


def float_checkpoint(quick: bool, tag: str) -> Path:
    """The float model the accuracy benchmarks start from, trained if missing.

    Full mode: the demo's cached ResNet-20 / Fashion-MNIST checkpoint (4 epochs, seed 0; ``make demo`` writes
    it).  Quick mode: a small CNN on scikit-learn digits under ``$HWQUANT_BENCH_RUNS`` (default ``runs``)
    ``/<tag>``.
    """
    from hwquant.pipelines import TrainOptions, resumable, run_train

    if quick:
        out = Path(os.environ.get("HWQUANT_BENCH_RUNS", "runs")) / tag
        if not (out / "model.pt").exists():
            run_train(TrainOptions(model="small_cnn", dataset="digits", epochs=12, batch_size=64, lr=0.1,
                                   out=str(out), progress=False, channels_last=False))
        return out / "model.pt"
    if not DEMO_CHECKPOINT.exists():
        run_train(TrainOptions(model="resnet20", dataset="fashion_mnist", epochs=4, out=str(DEMO_CHECKPOINT.parent),
                               resume=resumable(DEMO_CHECKPOINT.parent), progress=False))
    return DEMO_CHECKPOINT

