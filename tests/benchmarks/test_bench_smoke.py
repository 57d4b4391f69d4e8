"""Smoke test of the benchmark harness (``benchmarks/``): quick mode, temporary results directory.

Checks structure only (machine block, expected sizes and rows, positive times, finite ratios); no speed
thresholds, since the test machines are small and shared.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level package next to `src/`, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import common, quantizer, train_step  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402

MACHINE_KEYS = {
    "platform",
    "processor",
    "cpu_count",
    "torch",
    "torch_threads",
    "python",
    "utc",
    "cuda_available",
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Both benchmarks in quick mode, results written to a temporary dir named by the env variable."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(common.RESULTS_ENV, str(out))
        ret = bench_run.run(["quantizer", "train_step"], quick=True, verbose=False)
    assert set(ret) == {"quantizer", "train_step"}
    return out, ret


def _load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["benchmark"] == name
    assert MACHINE_KEYS <= set(data["machine"])
    assert data["machine"]["cpu_count"] >= 1
    md = (out / f"{name}.md").read_text()
    assert md.startswith(f"# Benchmark: {name}") and "Machine: " in md and "|---|" in md
    return data


def _positive(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_quantizer_quick(quick_results):
    out, ret = quick_results
    assert ret["quantizer"]["json"] == str(out / "quantizer.json")
    res = _load(out, "quantizer")["results"]
    assert res["config"]["quick"] is True
    assert res["config"]["sizes"] == ["1M", "4M"]
    assert all(res["nearest_matches_torch"].values())
    ops = {"copy", "clone", "torch", "hwquant quantize (int8 codes)"}
    ops |= {f"hwquant {m}" for m in quantizer.MODES}
    rows = res["throughput"]
    assert {(r["size"], r["op"]) for r in rows} == {(s, op) for s in ("1M", "4M") for op in ops}
    for r in rows:
        for key in ("median_ms", "min_ms", "gbps", "x_copy", "x_torch"):
            assert _positive(r[key]), (r["op"], key, r[key])
        assert r["min_ms"] <= r["median_ms"]
    fb = res["forward_backward"]
    assert {r["op"] for r in fb} == {"torch fwd+bwd", "hwquant nearest fwd+bwd"}
    assert all(r["size"] == "4M" and _positive(r["median_ms"]) and _positive(r["x_torch"]) for r in fb)


def test_train_step_quick(quick_results):
    out, _ = quick_results
    res = _load(out, "train_step")["results"]
    assert res["config"]["input"] == [32, 1, 28, 28]
    rows = {r["model"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "hwquant w8a8", "hwquant w4a4"}
    for r in rows.values():
        assert _positive(r["median_ms"]) and _positive(r["x_fp32"]) and _positive(r["images_per_s"])
        assert r["steps"] == res["config"]["timed_rounds"]
    assert rows["fp32"]["enabled_quantizers"] == 0
    assert rows["hwquant w8a8"]["enabled_quantizers"] > 0  # calibrated, so fake quantization is on


def test_time_fn_and_paired_ratio():
    st = common.time_fn(lambda: sum(range(100)), repeats=3, warmup=1, min_time=0.001)
    assert len(st["runs"]) == 3 and st["loops"] >= 1 and 0 < st["min_s"] <= st["median_s"]
    assert common.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        common.paired_ratio([1.0], [1.0, 2.0])


def test_write_results_explicit_dir_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path / "from_env"))
    j, m = common.write_results("demo", {"x": 1.5}, "| a |\n|---|\n| 1 |", out_dir=tmp_path / "explicit")
    assert j == tmp_path / "explicit" / "demo.json" and m.exists()
    assert json.loads(j.read_text())["results"] == {"x": 1.5}
    assert sorted(p.name for p in j.parent.iterdir()) == ["demo.json", "demo.md"]  # no temp files left
    assert not (tmp_path / "from_env").exists()


def test_run_cli_rejects_unknown_name(capsys):
    with pytest.raises(SystemExit):
        bench_run.main(["no_such_benchmark"])
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.mark.parametrize("name,value,msg", [
    ("HWQUANT_ARC_EPOCHS", "two", "HWQUANT_ARC_EPOCHS must be comma-separated integers, got 'two'"),
    ("HWQUANT_ARC_FT_EPOCHS", "0", "HWQUANT_ARC_FT_EPOCHS values must be >= 1, got '0'"),
    ("HWQUANT_QAT_EPOCHS", "1,2", "HWQUANT_QAT_EPOCHS must be one integer, got '1,2'"),
])
def test_run_cli_rejects_bad_setting_before_any_work(name, value, msg, tmp_path, monkeypatch, capsys):
    """A setting that does not parse: one line, status 2, nothing written (checked before the first benchmark)."""
    monkeypatch.setenv(name, value)
    bench = "qat" if "QAT" in name else "arc"
    assert bench_run.main(["quantizer", bench, "--results-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"
    assert list(tmp_path.iterdir()) == []


def test_env_ints_parses_seed_lists(monkeypatch):
    monkeypatch.setenv("HWQUANT_X", "0,1, 2")
    assert common.env_ints("HWQUANT_X", "0") == (0, 1, 2)
    monkeypatch.delenv("HWQUANT_X")
    assert common.env_ints("HWQUANT_X", "3,4") == (3, 4)
    monkeypatch.setenv("HWQUANT_X", "-1")
    with pytest.raises(common.SettingError, match="HWQUANT_X values must be >= 0"):
        common.env_ints("HWQUANT_X", "0")


def test_registry_modules_have_main():
    for name in bench_run.REGISTRY:
        assert callable(bench_run.get_benchmark(name).main)
    assert train_step.NAME == "train_step" and quantizer.NAME == "quantizer"


def test_qat_and_ggd_fit_quick(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    monkeypatch.setenv("HWQUANT_BENCH_RUNS", str(tmp_path / "runs"))
    bench_run.run(["qat", "ggd_fit"], quick=True, verbose=False)
    qat = _load(tmp_path, "qat")["results"]
    speed = {r["model"]: r for r in qat["speed"]["rows"]}
    assert {"fp32", "hwquant cqat w5a4", "naive ste", "torch fake_quantize"} <= set(speed)
    assert all(_positive(r["median_ms"]) and _positive(r["x_fp32"]) for r in speed.values())
    fixed = qat["speed"]["fixed"]
    assert fixed["batch"] == 2 and _positive(fixed["fp32_ms"]) and _positive(fixed["cqat_ms"])
    assert fixed["extra_ms"] == pytest.approx(fixed["cqat_ms"] - fixed["fp32_ms"])
    assert "Per-call cost: at batch 2" in (tmp_path / "qat.md").read_text()
    rows = qat["accuracy"]["rows"]
    assert [r["run"] for r in rows] == ["fp32 control", "cqat w5a4 (step=window, fixed point)"]
    assert rows[0]["drop_vs_control"] == 0.0 and rows[1]["top1"] > 50.0  # digits: chance is 10%
    assert (tmp_path / "qat_loss.png").stat().st_size > 1000
    fit = _load(tmp_path, "ggd_fit")["results"]
    for r in fit["rows"]:
        if r["fit"] == "hwquant mle (all)":
            assert r["dll"] > -1e-3, r  # the exact MLE on all samples is at least as likely as scipy's fit
            assert abs(r["alpha"] - r["true_alpha"]) < 0.1 * r["true_alpha"], r


def test_arc_plan_covers_the_issue_protocol():
    """Both protocols; FP32 and every variant at 8, 6 and 4 bits; two seeds for FP32, SR and the default at 8."""
    from benchmarks import arc

    plan = arc.plan()
    assert len(plan) == len(set(plan)) and len({arc._slug(*p) for p in plan}) == len(plan)
    for proto in ("scratch", "finetune"):
        assert {(v, b) for p, v, b, _ in plan if p == proto} == {("fp32", 32)} | {
            (v, b) for v in arc.VARIANTS for b in (8, 6, 4)}
        for v in ("fp32", "SR+max", "RTZ per sample", "nearest per sample"):
            b = 32 if v == "fp32" else 8
            assert sorted(s for p, vv, bb, s in plan if (p, vv, bb) == (proto, v, b)) == [0, 1]
    # the old default's runs keep their directories under the new name; the default is ARCConfig()'s
    assert arc._slug("scratch", "RTZ per sample", 8, 1) == "scratch_rtz_default_g8_s1"
    assert arc.VARIANTS["nearest per sample"] == {} and arc._default_rule()["rounding"] == "nearest"
    # the fine-tune runs start from the seed-0 scratch FP32 run, which comes first
    assert plan[0] == ("scratch", "fp32", 32, 0)
    acc = {"rows": [{"protocol": "scratch", "run": "fp32", "bits": 32, "top1": 90.0},
                    {"protocol": "scratch", "run": "fp32", "bits": 32, "top1": 91.0},
                    {"protocol": "scratch", "run": "SR+max", "bits": 8, "top1": 89.5}]}
    arc._summarise(acc)
    sr = next(r for r in acc["summary"] if r["run"] == "SR+max")
    fp = next(r for r in acc["summary"] if r["run"] == "fp32")
    assert fp["top1_mean"] == 90.5 and fp["spread"] == 1.0 and fp["seeds"] == 2
    assert sr["drop_vs_fp32"] == 1.0


def test_arc_partial_runs_select_and_keep_rows():
    """``HWQUANT_ARC_ONLY=scratch:6`` runs the 6-bit scratch rows and the seed-0 FP32 reference; the earlier
    file's other rows are kept only while that reference reproduces."""
    from benchmarks import arc

    picked = [p for p in arc.plan() if arc._selected("scratch:6", *p)]
    assert ("scratch", "fp32", 32, 0) in picked and ("scratch", "fp32", 32, 1) not in picked
    assert {b for p, v, b, s in picked if v != "fp32"} == {6} and {p for p, *_ in picked} == {"scratch"}
    assert ("scratch", "fp32", 32, 1) in [p for p in arc.plan() if arc._selected("scratch:8", *p)]
    assert all(arc._selected(None, *p) for p in arc.plan())
    # a variant prefix after the bits; runs follow the order of the entries, the FP32 reference first
    only = "scratch:6:RTZ per,scratch:6:SR"
    picked = sorted((arc._priority(only, *p), i, p) for i, p in enumerate(arc.plan()) if arc._selected(only, *p))
    assert [p for *_, p in picked] == [("scratch", "fp32", 32, 0), ("scratch", "RTZ per sample", 6, 0),
                                       ("scratch", "SR+max", 6, 0)]

    def row(proto, run, bits, seed, top1, cpu="A"):
        return {"protocol": proto, "run": run, "bits": bits, "seed": seed, "top1": top1, "cpu": cpu}

    earlier = [row("scratch", "fp32", 32, 0, 90.0), row("scratch", "SR+max", 8, 0, 89.0),
               row("finetune", "fp32", 32, 0, 91.0), row("finetune", "SR+max", 8, 0, 90.5)]
    same = [row("scratch", "fp32", 32, 0, 90.0), row("scratch", "SR+max", 6, 0, 88.0)]
    assert arc._kept_rows(earlier, same) == earlier[1:]  # the rerun FP32 replaces its earlier row
    other = [row("scratch", "fp32", 32, 0, 90.3)]
    assert arc._kept_rows(earlier, other) == earlier[2:]  # scratch changed: only the fine-tune rows stay
    # another CPU: every earlier row stays, and each drop is taken against its own CPU's FP32 run
    moved = [row("scratch", "fp32", 32, 0, 90.3, cpu="B"), row("scratch", "SR+max", 6, 0, 88.0, cpu="B")]
    assert arc._kept_rows(earlier, moved) == earlier
    acc = {"rows": moved + earlier}
    arc._summarise(acc)
    drops = {(r["protocol"], r["run"], r["bits"], r["cpu"]): r["drop_vs_fp32"] for r in acc["summary"]}
    assert drops[("scratch", "SR+max", 6, "B")] == pytest.approx(2.3)
    assert drops[("scratch", "SR+max", 8, "A")] == pytest.approx(1.0)
    assert drops[("finetune", "SR+max", 8, "A")] == pytest.approx(0.5)


def _mpq_row(key, top1, kib, seed=0, model="m"):
    return {"model": model, "key": key, "run": key, "seed": seed, "top1": top1, "start_top1": 50.0,
            "extra_pct": 0.0, "stored_kib": kib, "energy_uj": kib / 10}


def test_mpq_plan_and_bar_by_hand():
    from benchmarks import mpq
    from hwquant.methods import MPQConfig
    from hwquant.pipelines import QATOptions

    keys = {(m, k, s) for m, k, _, _, s in mpq.plan(False)}
    for m in ("resnet20", "vgg9"):
        assert {k for mm, k, s in keys if mm == m and s == 0} == {
            "w4", "w3", "w2", "mpq2", "mpq3", "mpq2_random", "mpq2_nolr", "w2_lr", "mpq2_lr_all", "mpq3_lr_all",
            "w2_lr_all", "mpq2_lr_after", "mpq2_eps02", "w2_hi", "mpq2_hi"}
        assert {k for mm, k, s in keys if mm == m and s == 1} == {"w4", "mpq2", "mpq3", "mpq2_lr_all", "mpq3_lr_all"}
    # the MPQ rows run the default learning-rate rule (only the weights that flipped); the literal rows all
    opts = {k: o for k, _, o, _ in mpq.RUNS}
    assert MPQConfig().lr_scope == "flipping" and "mpq_lr_scope" not in opts["mpq2"] | opts["mpq3"]
    assert QATOptions().mpq_lr_scope == "flipping"
    assert {k for k, o in opts.items() if o.get("mpq_lr_scope") == "all"} == {
        "mpq2_lr_all", "mpq3_lr_all", "w2_lr_all", "mpq2_eps02"}
    # W4A4 (two seeds: mean 91.0), W3A4 and W2A4; MPQ W2(+1) is 1.40x smaller than W4A4, 0.1 pt below it and
    # nearest in size to W2A4 (30 KiB), 0.8 pt above it: met.  MPQ W3(+1): 1.33x, so not met.
    rows = [_mpq_row("w4", 91.2, 42.0), _mpq_row("w4", 90.8, 42.0, seed=1), _mpq_row("w3", 90.5, 33.0),
            _mpq_row("w2", 90.1, 28.0), _mpq_row("mpq2", 90.9, 30.0), _mpq_row("mpq3", 91.0, 31.5)]
    agg, bars = mpq.summarize(rows)
    w4 = next(a for a in agg if a["key"] == "w4")
    assert w4["seeds"] == 2 and w4["top1"] == pytest.approx(91.0) and w4["spread"] == pytest.approx(0.4)
    b = {r["run"]: r for r in bars}
    assert b["mpq2"]["compression_vs_w4a4"] == pytest.approx(1.4)
    assert b["mpq2"]["drop_vs_w4a4"] == pytest.approx(0.1)
    assert b["mpq2"]["nearest_uniform"] == "w2" and b["mpq2"]["gain"] == pytest.approx(0.8)
    assert b["mpq2"]["met"] is True
    assert b["mpq3"]["compression_vs_w4a4"] == pytest.approx(42 / 31.5) and b["mpq3"]["met"] is False
    # 0.3 pt over the nearest uniform model is required: the same MPQ row 0.2 pt above W2A4 fails
    _, bars = mpq.summarize([r if r["key"] != "w2" else _mpq_row("w2", 90.7, 28.0) for r in rows])
    assert next(r for r in bars if r["run"] == "mpq2")["met"] is False


def test_pow2_step_quick_has_both_settings_and_seeds(tmp_path, monkeypatch):
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    monkeypatch.setenv("HWQUANT_BENCH_RUNS", str(tmp_path / "runs"))
    bench_run.run(["pow2_step"], quick=True, verbose=False)
    res = _load(tmp_path, "pow2_step")["results"]
    assert {(r["pow2_step"], r["seed"]) for r in res["rows"]} == {(s, k) for s in ("round", "search") for k in (0, 1)}
    assert all(10.0 < r["top1"] <= 100.0 and 0.0 <= r["start_top1"] <= 100.0 for r in res["rows"])
    md = (tmp_path / "pow2_step.md").read_text()
    assert "mean +- half spread" in md and "| search | 2 |" in md


def test_qat_partial_runs_select_and_keep_rows():
    """``HWQUANT_QAT_ONLY`` runs the FP32 control and the named runs; earlier rows of another CPU stay with their
    own control, rows of this CPU only while the control and the checkpoint reproduce."""
    from benchmarks import qat

    names = [n for n, _ in qat.RUNS]
    picked = [n for n in names if qat._selected("cqat w4a4,lsq", n)]
    assert picked == ["fp32 control", "cqat w4a4 (step=window, fixed point)", "cqat w4a4 (step=mse)", "lsq w5a4",
                      "lsq w4a4"]

    def row(run, top1, cpu="A", ck=91.0):
        return {"run": run, "top1": top1, "cpu": cpu, "checkpoint_top1": ck}

    earlier = [row("fp32 control", 92.0), row("ste w5a4", 91.0), row("fp32 control", 93.0, "B"),
               row("ste w5a4", 92.5, "B")]
    same = [row("fp32 control", 92.0), row("lsq w5a4", 91.5)]
    assert qat._kept(earlier, same, "A") == earlier[1:]
    moved = [row("fp32 control", 92.1), row("lsq w5a4", 91.5)]  # this CPU's control changed
    assert qat._kept(earlier, moved, "A") == earlier[2:]
    out = qat._finish(same + qat._kept(earlier, same, "A"), "ck", 2, type("C", (), {"grad_clip": 2.0}), {},
                      {n: i for i, n in enumerate(names)})
    drops = {(r["run"], r["cpu"]): r["drop_vs_control"] for r in out["rows"]}
    assert drops[("ste w5a4", "A")] == pytest.approx(1.0) and drops[("ste w5a4", "B")] == pytest.approx(0.5)
    assert [r["cpu"] for r in out["rows"]][:3] == ["A", "A", "A"]  # this CPU's rows first
    # the loss curves of kept rows come along from the earlier file, only when it was made on this CPU
    old = {"cpu": "A", "curves": {"ste w5a4": [[10, 0.3]], "fp32 control": [[10, 9.9]]}}
    now = {"fp32 control": [[10, 0.2]], "lsq w5a4": [[10, 0.25]]}
    kept = qat._kept(earlier, same, "A")
    assert qat._with_kept(now, old, "A", kept) == {**now, "ste w5a4": [[10, 0.3]]}  # this run's control wins
    assert qat._with_kept(now, {**old, "cpu": "B"}, "A", kept) == now


def test_bft_quick(tmp_path, monkeypatch):
    """The BFT cost benchmark: both variants per setting, the same result, the cache replaying layer calls."""
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    monkeypatch.setenv("HWQUANT_BENCH_RUNS", str(tmp_path / "runs"))
    bench_run.run(["bft"], quick=True, verbose=False)
    rows = _load(tmp_path, "bft")["results"]["rows"]
    assert [(r["setting"], r["bft"]) for r in rows] == [
        (s, b) for s in ("W8A8", "W4A4, first/last 8-bit") for b in ("prefix cache", "no cache")]
    assert all(r["same_result"] and _positive(r["seconds"]) for r in rows)
    assert all(r["replayed_pct"] > 0 for r in rows if r["bft"] == "prefix cache")


def test_arc_clip_plot_needs_all_three_rules(tmp_path):
    """The clip-over-training plot is drawn from the default, k = 3 and DSGC runs together; with only some of
    their logs (a partial run) nothing is drawn, so an earlier complete plot is not replaced by a partial one."""
    import json

    from benchmarks import arc

    runs, out = tmp_path / "runs", tmp_path / "results"
    log = {"layer1.0.conv1": {"error": [[1, 0.5, 1.0], [2, 0.25, 1.0]]}}
    names = ["nearest per sample", "RTZ+zscore k=3 (literal)", "RTZ+DSGC"]
    for i, name in enumerate(names):
        d = runs / arc._slug("scratch", name, 8, 0)
        d.mkdir(parents=True)
        (d / "arc_clips.json").write_text(json.dumps(log))
        drawn = arc._clip_plot(runs, out)
        assert (drawn is None) == (i < len(names) - 1)
    assert (out / "arc_clip.png").stat().st_size > 1000


def test_arc_accuracy_only_run_keeps_the_latency_tables(tmp_path, monkeypatch):
    """``HWQUANT_ARC_LATENCY=0``: the earlier file's latency tables are kept, dated, not re-measured."""
    import json

    from benchmarks import arc

    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    monkeypatch.setenv("HWQUANT_BENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("HWQUANT_ARC_LATENCY", "0")
    monkeypatch.setenv("HWQUANT_ARC_ACCURACY", "0")
    q = [{"elements": 1, "contender": "c", "median_ms": 1.0, "x_copy": 1.4, "x_hwquant_sr": 0.2, "x_eager_sr": 0.1}]
    ts = {"batch": 128, "rows": [{"model": "fp32", "median_ms": 10.0, "x_fp32": 1.0}]}
    fid = {"rows": [{"run": "SR+max", "cos": 1.0}], "measured": "then"}
    (tmp_path / "arc.json").write_text(json.dumps({"machine": {"utc": "2026-01-01T00:00:00"}, "results": {
        "quantizer": q, "train_step": ts, "fidelity": fid}}))

    def boom(*a):
        raise AssertionError("latency re-measured")

    monkeypatch.setattr(arc, "quantizer", boom)
    monkeypatch.setattr(arc, "train_step", boom)
    out = arc.main(out_dir=tmp_path)
    assert out["results"]["quantizer"] == q and out["results"]["train_step"] == ts
    assert out["results"]["latency_measured"] == "2026-01-01T00:00:00"
    assert "Measured 2026-01-01T00:00:00 (not rerun" in out["table"]


def test_ptq_quick_has_the_bias_corrected_columns_and_keeps_rows(tmp_path, monkeypatch):
    from benchmarks import ptq as bench_ptq

    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path))
    monkeypatch.setenv("HWQUANT_BENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench_ptq, "synthetic", lambda quick: [])  # (the observers' own tests cover it)
    res = bench_ptq.main(quick=True)["results"]
    (row,) = res["model"]
    for m in bench_ptq.METHODS:
        assert 0.0 <= row[m] <= 100.0, m
    assert row["ggd+bft - best other"] == row["ggd+bft"] - max(row[m] for m in bench_ptq.BASELINES)
    assert "mse+bc" in (tmp_path / "ptq.md").read_text()
    # a subset run that does not select the quick row keeps it as it was (nothing rerun)
    monkeypatch.setenv("HWQUANT_PTQ_ONLY", "W8A8")
    again = bench_ptq.main(quick=True)["results"]
    assert again["model"] == [row]
    # a rerun of one column: only that method runs, the other columns keep the earlier figures
    ran, config = [], bench_ptq._config
    monkeypatch.setattr(bench_ptq, "_config", lambda m, *a: ran.append(m) or config(m, *a))
    monkeypatch.setenv("HWQUANT_PTQ_ONLY", "W4A4")
    monkeypatch.setenv("HWQUANT_PTQ_METHODS", "ggd+bc")
    (col,) = bench_ptq.main(quick=True)["results"]["model"]
    assert ran == ["ggd+bc", "ggd"]  # (the +bc config is built from the plain one)
    assert col == row  # (bias correction is deterministic: the same figure)
    monkeypatch.setenv("HWQUANT_PTQ_METHODS", "ggd+typo")
    with pytest.raises(ValueError, match="ggd\\+typo"):
        bench_ptq.main(quick=True)
