"""GGD fit cost and quality: :func:`hwquant.numerics.ggd_fit` against ``scipy.stats.gengamma.fit``, one run.

For each shape, ``n`` magnitudes (1M; 100k in quick mode) are drawn from ``scipy.stats.gengamma(a, c, scale)``
with a fixed seed.  Contenders:

* ``hwquant mle``: ``ggd_fit(x)`` (exact MLE on its default 100k subsample);
* ``hwquant mle (all)``: ``ggd_fit(x, max_samples=None)`` (MLE on every sample);
* ``hwquant moments``: ``ggd_fit(x, method="moments")``;
* ``scipy 100k``: ``gengamma.fit(x[:100k], floc=0)`` (the oracle the tests use).

Reported: median seconds (3 repeats; scipy once, it is slow), ``x scipy`` (time ratio in the same run),
the mean log-likelihood on **all** ``n`` samples minus that of the scipy fit (>= 0 means at least as good),
and the fitted ``alpha, beta`` against the true ones.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from hwquant.numerics.ggd import GGD, ggd_fit

from .common import markdown_table, write_results

NAME = "ggd_fit"
SHAPES = {  # name: scipy (a, c, scale)
    "a=1 c=2 (half-gauss)": (0.5, 2.0, 1.0),
    "a=1 c=1 (exponential)": (1.0, 1.0, 1.0),
    "a=2 c=0.7 (heavy)": (2.0, 0.7, 0.5),
    "a=0.8 c=1.5": (0.8, 1.5, 2.0),
}


def _time(fn, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main(quick: bool = False, out_dir: str | os.PathLike | Path | None = None) -> dict[str, Any]:
    from scipy import stats

    n = 100_000 if quick else 1_000_000
    rows = []
    for name, (a, c, scale) in SHAPES.items():
        x = stats.gengamma(a, c, scale=scale).rvs(size=n, random_state=np.random.default_rng(0))
        t_sp, fit = _time(lambda x=x: stats.gengamma.fit(x[:100_000], floc=0), 1)
        ref = GGD(alpha=fit[1], beta=fit[0] * fit[1] - 1, lam=fit[3] ** -fit[1], signed=False)
        ll_ref = ref.log_likelihood(x)
        for label, kw in (("hwquant mle", {}), ("hwquant mle (all)", {"max_samples": None}),
                          ("hwquant moments", {"method": "moments"})):
            t, g = _time(lambda kw=kw, x=x: ggd_fit(x, signed=False, **kw), 3)
            rows.append({"shape": name, "n": n, "fit": label, "seconds": t, "x_scipy": t / t_sp,
                         "dll": g.log_likelihood(x) - ll_ref, "alpha": g.alpha, "beta": g.beta,
                         "true_alpha": c, "true_beta": a * c - 1})
        rows.append({"shape": name, "n": n, "fit": "scipy 100k", "seconds": t_sp, "x_scipy": 1.0, "dll": 0.0,
                     "alpha": ref.alpha, "beta": ref.beta, "true_alpha": c, "true_beta": a * c - 1})
    md = "\n".join([
        f"GGD fit of {n:,} magnitudes per shape; `dll`: mean log-likelihood on all samples minus scipy's fit "
        "(`gengamma.fit(x[:100k], floc=0)`).", "",
        markdown_table(rows, [("shape", "shape"), ("fit", "fit"), ("seconds", "s"), ("x_scipy", "x scipy"),
                              ("dll", "dll"), ("alpha", "alpha"), ("true_alpha", "true alpha"), ("beta", "beta"),
                              ("true_beta", "true beta")]),
        "",
    ])
    results = {"n": n, "rows": rows}
    json_path, md_path = write_results(NAME, results, md, out_dir=out_dir)
    return {"results": results, "table": md, "json": str(json_path), "md": str(md_path)}
