"""The native CPU kernels: where their C source lives, how it is compiled, cached and loaded.

The source is ``csrc/hwq_kernels.c`` in this package.  It is compiled at first use with the system C compiler
(``$CC``, else ``cc`` / ``gcc``; ``-O3 -march=native -fopenmp``, retried without ``-march=native``) into a
shared library keyed by a hash of the source, the compiler, the CPU's flags and the compiler flags, and loaded
with :mod:`ctypes`.  The library is native code that every hwquant process runs, so it is cached and loaded
only from a directory no other local user can write: ``$HWQUANT_CACHE_DIR``, else ``~/.cache/hwquant`` (or
``$XDG_CACHE_HOME/hwquant``), else ``<tmp>/hwquant-<uid>``, each created with mode 0700 and used only when it
belongs to this user and no one else may write it (no symlink); a cached ``.so`` is trusted under the same
test.  When none qualifies the library is built in a fresh private temporary directory and not cached.

:func:`library` builds, loads and self-tests it once per process (the self-test compares the kernel with the
torch path, the oracle, on awkward values); every caller falls back to the torch path when it returns
``None`` (no compiler, a build or self-test failure, or ``HWQUANT_NATIVE=0``), with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from importlib import resources

import torch

__all__ = ["STATE", "build", "cache_dir", "compiling", "dense", "library", "private", "source", "threads"]

_LOCK = threading.Lock()
#: ``lib`` (the loaded :class:`ctypes.CDLL`), ``state`` (``unloaded`` / ``ok`` / ``failed``), ``reason`` of a
#: failure, ``path`` of the shared library.
STATE: dict = {"lib": None, "state": "unloaded", "reason": "", "path": None}


def source() -> str:
    """The C source of the kernels (``csrc/hwq_kernels.c``, package data)."""
    return resources.files(__package__).joinpath("csrc", "hwq_kernels.c").read_text(encoding="utf-8")


def private(path: str) -> bool:
    """``path`` exists, is no symlink, belongs to this user and no one else may write it (POSIX).

    The kernel library is native code that every hwquant process loads: it is cached and loaded only from
    places no other local user can write (a shared ``/tmp/hwquant-<uid>`` that someone else created, or a
    world-writable cache directory, could hold a planted ``.so``)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not hasattr(os, "getuid"):  # Windows: no POSIX ownership to check; the user's own profile directory
        return True
    return (not stat.S_ISLNK(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def cache_dir() -> str | None:
    """A private directory to cache the compiled kernels in (see :func:`private`), or ``None`` when neither
    ``$HWQUANT_CACHE_DIR`` / ``~/.cache/hwquant`` nor ``<tmp>/hwquant-<uid>`` is private: then the library is
    built in a fresh private temporary directory and not cached."""
    explicit = os.environ.get("HWQUANT_CACHE_DIR")
    base = explicit or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hwquant")
    fallback = os.path.join(tempfile.gettempdir(), f"hwquant-{os.getuid() if hasattr(os, 'getuid') else 0}")
    for d in (base, fallback):
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if private(d) and os.access(d, os.W_OK):
            return d
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def build() -> str:
    """Compile the kernels (once per source, compiler and CPU) and return the path of the shared library."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set CC or install gcc)")
    code = source()
    flag_sets = [["-O3", "-march=native"], ["-O3"]]
    common = ["-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c99"]
    key = hashlib.sha256("\0".join([code, cc, _cpu_flags(), platform.machine(), repr(flag_sets),
                                    repr(common)]).encode()).hexdigest()[:16]
    d = cache_dir() or tempfile.mkdtemp(prefix="hwquant-build-")  # mkdtemp: private (0700), fresh
    so = os.path.join(d, f"hwquant_fq_{key}.so")
    if os.path.exists(so) and private(so):
        return so
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        src = os.path.join(tmp, "fq.c")
        with open(src, "w", encoding="utf-8") as f:
            f.write(code)
        err = ""
        for flags in flag_sets:
            out = os.path.join(tmp, "fq.so")
            proc = subprocess.run([cc, *flags, *common, src, "-o", out, "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode == 0:
                os.chmod(out, 0o755)  # whatever the umask: only we may write it, so the cache is trusted later
                os.replace(out, so)  # atomic: concurrent builders write the same bytes
                return so
            err = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            err = err[0]
        raise RuntimeError(f"C compiler failed: {err}")


def _load():
    path = build()
    lib = ctypes.CDLL(path)
    P, I64, F, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_double
    lib.hwq_fq.argtypes = [P, P, P, I64, F, F, F, I, F, F, I]
    lib.hwq_fq.restype = None
    lib.hwq_fq_relu.argtypes = [P, P, P, I64, F, F, F, F, I]
    lib.hwq_fq_relu.restype = None
    lib.hwq_relu_fq2.argtypes = [P, P, P, P, I64, F, F, F, F, I]
    lib.hwq_relu_fq2.restype = None
    lib.hwq_relu_fq2_bwd.argtypes = [P, P, P, P, I64, I]
    lib.hwq_relu_fq2_bwd.restype = None
    lib.hwq_fq_pc.argtypes = [P, P, P, I64, I64, P, P, F, F, I]
    lib.hwq_fq_pc.restype = None
    lib.hwq_fq_pc_dyn.argtypes = [P, P, P, I64, I64, P, F, F, P, F, F, P, P, P, F, F, F, I]
    lib.hwq_fq_pc_dyn.restype = None
    lib.hwq_mask_bwd.argtypes = [P, P, P, I64, I]
    lib.hwq_mask_bwd.restype = None
    lib.hwq_scale_bwd.argtypes = [P, P, P, P, I64, F, F, F, F, I, I]
    lib.hwq_scale_bwd.restype = D
    lib.hwq_stats.argtypes = [P, I64, P, I]
    lib.hwq_stats.restype = None
    lib.hwq_stats_hist.argtypes = [P, I64, P, P, I64, I]
    lib.hwq_stats_hist.restype = None
    lib.hwq_row_stats.argtypes = [P, I64, I64, P, P, I64, I]
    lib.hwq_row_stats.restype = None
    lib.hwq_gq_rows.argtypes = [P, P, I64, I64, P, P, F, I, I, I]
    lib.hwq_gq_rows.restype = None
    lib.hwq_gq.argtypes = [P, P, I64, F, F, F, I, I, ctypes.c_uint64, I]
    lib.hwq_gq.restype = None
    lib.hwq_requant.argtypes = [P, P, I64, I64, I64, P, P, I64, I64, I]
    lib.hwq_requant.restype = None
    lib.hwq_add2.argtypes = [P, P, P, I64, I64, I64, P, P, I]
    lib.hwq_add2.restype = None
    return lib, path


def library(self_test: Callable[[ctypes.CDLL], str | None] | None = None):
    """The loaded kernel library, or ``None`` (disabled by ``HWQUANT_NATIVE=0``, no compiler, a build failure,
    or ``self_test(lib)`` returning what differs from the torch path).  Built and tested once per process."""
    st = STATE["state"]
    if st == "ok":
        return STATE["lib"]
    if st == "failed":
        return None
    with _LOCK:
        if STATE["state"] == "unloaded":
            if os.environ.get("HWQUANT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                STATE.update(state="failed", reason="disabled by HWQUANT_NATIVE")
            else:
                try:
                    lib, path = _load()
                    bad = self_test(lib) if self_test is not None else None
                    if bad:
                        raise RuntimeError(bad)
                    STATE.update(lib=lib, state="ok", path=path, reason="")
                except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                    STATE.update(state="failed", reason=f"{type(e).__name__}: {e}")
                    warnings.warn(f"hwquant: fused fake-quant kernel unavailable, using torch ops ({e})",
                                  RuntimeWarning, stacklevel=4)
    return STATE["lib"]


def dense(x: torch.Tensor) -> bool:
    """Whether the kernels can walk ``x`` as one dense block (contiguous, or channels-last 4-d / 5-d)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def compiling() -> bool:
    """Whether ``torch.compile`` / ``torch.export`` is tracing: ctypes calls are opaque to it, so traced code
    reaches the kernels through the registered ``hwquant::`` operators (see :mod:`hwquant.numerics.fused`)."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def threads() -> int:
    """The OpenMP threads a kernel call uses: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())
