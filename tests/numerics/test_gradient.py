"""Gradient quantization (ARC): codes against torch-op oracles, the z-score clip by hand, SR unbiasedness,
DSGC's search, error handling."""

import math

import pytest
import torch

from hwquant.errors import ConfigError, DataError
from hwquant.numerics.gradient import (
    _multiplier,
    dequantize_gradient,
    fake_quantize_gradient,
    gradient_clip,
    gradient_stats,
    quantize_gradient,
)


def _g(n=100_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 1e-3
    x[:20] *= 40  # outliers
    return x


@pytest.mark.parametrize("bits", [4, 8, 12])
def test_rtz_is_torch_trunc_and_codes_in_range(bits):
    g = _g()
    q = 2 ** (bits - 1) - 1
    for clip in ("zscore", "max", "dsgc"):
        codes, s = quantize_gradient(g, bits=bits, rounding="zero", clip=clip)
        c = gradient_clip(g, bits, clip, 3.0, "zero")
        r = torch.tensor(_multiplier(c, q), dtype=torch.float32)
        ref = torch.clamp(torch.trunc(g * r), -q, q)  # the oracle: torch ops
        assert torch.equal(codes.to(torch.float32), ref), clip
        assert codes.dtype == (torch.int8 if bits <= 8 else torch.int16)
        assert int(codes.abs().max()) <= q
        assert float(s) == pytest.approx(c / q, rel=1e-6)
        # truncation never rounds away from zero
        assert ((codes.float() * s).abs() <= g.abs() + 1e-12).all()


def test_nearest_matches_torch_round_and_layouts_agree():
    g = _g(4 * 8 * 16 * 16).reshape(4, 8, 16, 16)
    gl = g.contiguous(memory_format=torch.channels_last)
    codes, s = quantize_gradient(g, rounding="nearest", clip="max")
    codes_l, s_l = quantize_gradient(gl, rounding="nearest", clip="max")
    r = torch.tensor(_multiplier(float(g.abs().max()), 127), dtype=torch.float32)
    assert torch.equal(codes.float(), torch.clamp(torch.round(g * r), -127, 127))
    assert torch.equal(codes_l, codes) and float(s_l) == float(s)
    assert codes_l.is_contiguous(memory_format=torch.channels_last)
    # float64 goes through the torch path: same codes
    codes64, _ = quantize_gradient(g.double(), rounding="nearest", clip="max")
    assert torch.equal(codes64, codes)


def test_zscore_clip_by_hand():
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    # mean 22, E[g^2] = 2006, population variance 1522
    assert gradient_stats(g)[:2] == pytest.approx((22.0, math.sqrt(1522.0)))
    assert gradient_clip(g, clip="zscore", k=1.0) == pytest.approx(22.0 + math.sqrt(1522.0))
    assert gradient_clip(g, clip="zscore", k=3.0) == 100.0  # |mu| + 3 sigma > max|g|: no clip
    codes, s = quantize_gradient(g, bits=8, clip="zscore", k=1.0)
    assert codes.tolist()[-1] == 127 and float(s) == pytest.approx((22.0 + math.sqrt(1522.0)) / 127, rel=1e-6)
    # the clip value itself reaches the top code even with truncation
    codes, _ = quantize_gradient(torch.tensor([0.5, -0.26, 0.1, 1.0]), bits=4, clip="max")
    assert codes.tolist() == [3, -1, 0, 7]


def test_stochastic_rounding_is_unbiased_and_seeded():
    s_target = 0.01
    vals = torch.tensor([0.3, -0.7, 2.25, -3.9]) * s_target
    g = vals.repeat(50_000)
    g = torch.cat([g, torch.tensor([127 * s_target])])  # fixes max|g| so the step is s_target
    gen = torch.Generator().manual_seed(0)
    codes, s = quantize_gradient(g, rounding="stochastic", clip="max", generator=gen)
    assert float(s) == pytest.approx(s_target, rel=1e-6)
    means = codes[:-1].float().reshape(-1, 4).mean(dim=0)
    torch.testing.assert_close(means, torch.tensor([0.3, -0.7, 2.25, -3.9]), atol=0.01, rtol=0)
    again, _ = quantize_gradient(g, rounding="stochastic", clip="max", generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, again)
    other, _ = quantize_gradient(g, rounding="stochastic", clip="max", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(codes, other)
    # every code is one of the two neighbours
    lo = torch.floor(g[:-1] / s)
    assert ((codes[:-1].float() == lo) | (codes[:-1].float() == lo + 1)).all()


def test_dsgc_picks_the_best_cosine_on_its_grid():
    g = _g(50_000, seed=3)
    c = gradient_clip(g, bits=4, clip="dsgc", rounding="zero")
    mx = float(g.abs().max())
    assert c < mx  # heavy outliers: the error-based clip cuts them

    def cos(cv):
        q = 7
        s = float(torch.tensor(cv / q, dtype=torch.float32))
        r = torch.tensor(_multiplier(cv, q), dtype=torch.float32)
        gh = torch.clamp(torch.trunc(g * r), -q, q) * s
        return float(torch.nn.functional.cosine_similarity(g.double(), gh.double(), dim=0))

    best = cos(c)
    for j in range(40):
        assert best >= cos(mx * 2.0 ** (-j / 4)) - 1e-9


def test_fake_quantize_gradient_and_dequantize():
    g = _g()
    gh, c = fake_quantize_gradient(g)
    codes, s = quantize_gradient(g)
    assert torch.equal(gh, dequantize_gradient(codes, s)) and c == pytest.approx(float(s) * 127, rel=1e-6)
    out = torch.empty(g.shape, dtype=torch.int8)
    codes2, _ = quantize_gradient(g, out=out)
    assert codes2.data_ptr() == out.data_ptr() and torch.equal(codes2, codes)


def test_bad_input():
    with pytest.raises(DataError, match="NaN"):
        quantize_gradient(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="bits"):
        quantize_gradient(torch.ones(3), bits=1)
    with pytest.raises(ConfigError, match="rounding"):
        quantize_gradient(torch.ones(3), rounding="up")
    with pytest.raises(ConfigError, match="clip"):
        quantize_gradient(torch.ones(3), clip="median")
    with pytest.raises(ConfigError, match="out must be"):
        quantize_gradient(torch.ones(3), out=torch.empty(3, dtype=torch.int16))
    codes, s = quantize_gradient(torch.zeros(10))
    assert codes.abs().sum() == 0 and float(s) > 0


@pytest.mark.parametrize("layout", ["flat", "channels_last", "float64"])
def test_one_pass_statistics_equal_torch(layout):
    """mean, std, max and the log-bin histogram of gradient_hist equal torch's own ops (native and torch path)."""
    from hwquant.numerics.gradient import gradient_hist

    g = _g(4 * 8 * 40 * 40).reshape(4, 8, 40, 40)
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    if layout == "float64":
        g = g.double()
    mean, std, mx, hist = gradient_hist(g)
    d = g.double()
    assert mean == pytest.approx(float(d.mean()), rel=1e-9, abs=1e-15)
    assert std == pytest.approx(float(d.std(correction=0)), rel=1e-9)
    assert mx == float(g.abs().max())
    # oracle: frexp gives |g| = m * 2^e, m in [0.5, 1): bin = 4 * (e + 126) + floor((2m - 1) * 4) for normals
    m, e = torch.frexp(g.abs().float().reshape(-1))
    bins = 4 * (e.long() + 126) + torch.floor((2 * m.double() - 1) * 4).long()
    assert torch.equal(hist, torch.bincount(bins, minlength=1024))
    assert int(hist.sum()) == g.numel()


@pytest.mark.parametrize("need", [1, 7, 66, 1000])
def test_histogram_tail_is_exact_where_the_search_looks(need):
    """gradient_hist(g, need): exact counts from a floor F up (at least ``need`` elements there, F at most the
    bin of the need-th largest |g|), 0 below; every "fewer than need at or above bin b" answer of the full
    histogram is unchanged, so the search picks the same clip.  The oracle is torch's bincount."""
    from hwquant.numerics import gradient as G

    gen = torch.Generator().manual_seed(need)
    g = torch.randn(300_000, generator=gen) * 1e-3  # several threads' blocks, so the per-thread floors merge
    g[torch.randperm(g.numel(), generator=gen)[:500]] *= torch.logspace(0, 2, 500)  # a tail of outliers
    full = torch.bincount(G._hist_bins(g.abs()).long(), minlength=1024)
    *stats, tail = G.gradient_hist(g, need)
    assert stats == list(G.gradient_hist(g)[:3])
    nz = torch.nonzero(tail)
    f = int(nz.min())
    assert torch.equal(tail[f:], full[f:]) and int(tail[:f].sum()) == 0
    assert int(tail.sum()) >= need
    kth = int(G._hist_bins(g.abs().reshape(-1).topk(need).values[-1:]))  # the need-th largest element's bin
    assert f <= kth
    above = lambda h: torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])  # noqa: E731
    assert torch.equal(above(tail) <= need - 1, above(full) <= need - 1)
    p = (need - 1 + 0.5) / g.numel()  # floor(p * n) = need - 1
    assert G._tail_need(g.numel(), 8, p) == need
    c, k = G.search_clip(*stats, tail, 8, p, n=g.numel())
    assert (c, k) == G.search_clip(*stats, full, 8, p, n=g.numel())
    # the one-tensor rule (Python floats) is the rows rule (tensor ops) on one row
    rows = G._search_rows(*(torch.tensor([v], dtype=torch.float64) for v in stats), full[None], p, g.numel())
    assert (c, k) == (float(rows[0][0]), float(rows[1][0]))


def test_search_clip_picks_the_documented_candidate_by_hand():
    """1000 values: 990 at +-1 (sigma ~ 1), 10 outliers at 20; the clipped share allowed decides k."""
    from hwquant.numerics.gradient import gradient_hist, search_clip

    g = torch.cat([torch.ones(495), -torch.ones(495), torch.full((10,), 20.0)])
    mean, std, mx, hist = gradient_hist(g)
    assert mean == pytest.approx(0.2) and std == pytest.approx(math.sqrt(4.99 - 0.04))  # E[g^2] = 0.99 + 4
    # p = 1%: the 10 outliers (1.0 %) may saturate: k = 3 gives c = 0.2 + 3 * 2.225 = 6.87 < 20, 10 above -> ok
    c, k = search_clip(mean, std, mx, hist, 8, fraction=0.01, n=1000)
    assert k == 3.0 and c == pytest.approx(0.2 + 3 * std)
    # p = 0.5 %: no candidate below max|g| = 20 clips fewer than the 10 outliers (k = 8: c = 18.0) -> max
    c, k = search_clip(mean, std, mx, hist, 8, fraction=0.005, n=1000)
    assert k == math.inf and c == 20.0
    # the default p at 8 bits is 1e-3 / 255: the same
    assert gradient_clip(g, 8, "search") == 20.0
    assert gradient_clip(g, 8, "search", fraction=0.01) == pytest.approx(0.2 + 3 * std)
    # the histogram by hand: 1.0 and 20.0 are in the bins of their float32 bits >> 21
    h = torch.zeros(1024, dtype=torch.int64)
    h[int(torch.tensor([1.0]).view(torch.int32) >> 21)] = 990
    h[int(torch.tensor([20.0]).view(torch.int32) >> 21)] = 10
    assert torch.equal(h, hist)


@pytest.mark.parametrize("clip", ["zscore", "max", "search"])
@pytest.mark.parametrize("rounding", ["zero", "nearest"])
def test_per_sample_rows_equal_each_row_quantized_alone(clip, rounding):
    """Per-sample scaling = the per-tensor quantizer applied to every row on its own (the oracle)."""
    from hwquant.numerics.gradient import fake_quantize_gradient_rows

    g = torch.randn(6, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    g[:3] *= 1e-3  # easy samples: errors 1000x smaller
    g[4, 0, 0, 0] = 40.0  # an outlier in one sample only
    gh, c = fake_quantize_gradient_rows(g, 8, rounding, clip)
    for i in range(6):
        row = g[i].contiguous()
        assert float(c[i]) == pytest.approx(gradient_clip(row, 8, clip, 3.0, rounding), rel=1e-12)
        ref, _ = fake_quantize_gradient(row, 8, rounding, clip, clip_value=float(c[i]))
        assert torch.equal(gh[i], ref), i
    if rounding == "zero":  # the easy samples keep their gradient (per tensor, truncation zeroes them)
        per_tensor, _ = fake_quantize_gradient(g, 8, "zero", clip)
        assert (gh[:3] != 0).float().mean() > 0.9
        assert (per_tensor[:3] != 0).float().mean() < 0.05


@pytest.mark.parametrize("clip", ["max", "search", "zscore"])
def test_per_sample_native_kernel_equals_torch_path(clip, monkeypatch):
    """The row kernels (statistics + histogram per sample, quantize per sample) against the torch ops, for a
    channels-last error gradient; the native path must actually run."""
    from hwquant.numerics import gradient as G
    from hwquant.numerics.uniform import native_status

    if not native_status()["available"]:
        pytest.skip("no C compiler")
    g = torch.randn(32, 8, 9, 9, generator=torch.Generator().manual_seed(3))
    g[:12] *= 1e-3
    g = g.contiguous(memory_format=torch.channels_last)
    calls = []
    real = G.native_kernels
    monkeypatch.setattr(G, "native_kernels", lambda: calls.append(1) or real())
    y, c = G.fake_quantize_gradient_rows(g, 8, "zero", clip)
    assert calls  # the kernels ran
    monkeypatch.setattr(G, "native_kernels", lambda: None)
    y_t, c_t = G.fake_quantize_gradient_rows(g, 8, "zero", clip)
    torch.testing.assert_close(c, c_t, rtol=1e-12, atol=0)
    assert torch.equal(y, y_t) and y.is_contiguous(memory_format=torch.channels_last)


def test_search_with_fewer_than_one_over_p_elements_is_max(monkeypatch):
    """p * n < 1: the search's answer is max|g| (shown by the full rule), and no histogram is computed."""
    from hwquant.numerics import gradient as G

    g = torch.randn(8, 2000, generator=torch.Generator().manual_seed(4))
    g[:, 0] = 9.0  # a clear outlier per row: k = 3..6 would clip it if allowed
    mean, std, mx, hist = G.gradient_hist(g[0].contiguous())
    assert G.search_clip(mean, std, mx, hist, 8, n=2000)[0] == mx == 9.0  # the full rule: max
    assert G.gradient_clip(g[0].contiguous(), 8, "search", fraction=0.01) < 9.0  # p * n = 20: a real search
    monkeypatch.setattr(G, "gradient_hist", lambda *a: pytest.fail("histogram computed"))
    assert G.gradient_clip(g[0].contiguous(), 8, "search") == 9.0
    assert torch.equal(G.row_clips(g, 8, "search"), G.row_clips(g, 8, "max"))


@pytest.mark.parametrize("bits", [4, 8, 12])
@pytest.mark.parametrize("native", [True, False])
def test_per_sample_codes_equal_each_row_quantized_alone(bits, native, monkeypatch):
    """quantize_gradient_rows: the codes (int8, int16 above 8 bits) and step of every row equal
    quantize_gradient's on that row alone (the oracle), on the fused kernel and the torch path, also into a
    reused buffer; the float output is codes * step."""
    from hwquant.numerics import gradient as G
    from hwquant.numerics.uniform import native_status

    if native and not native_status()["available"]:
        pytest.skip("no C compiler")
    if not native:
        monkeypatch.setattr(G, "native_kernels", lambda: None)
    g = torch.randn(16, 4, 7, 7, generator=torch.Generator().manual_seed(5))
    g[:6] *= 1e-4
    g = g.contiguous(memory_format=torch.channels_last)
    codes, s = G.quantize_gradient_rows(g, bits, "zero", "max")
    assert codes.dtype == (torch.int8 if bits <= 8 else torch.int16) and s.shape == (16,)
    assert codes.is_contiguous(memory_format=torch.channels_last)
    for i in range(16):
        ref, sr = quantize_gradient(g[i].contiguous(), bits, "zero", "max")
        assert torch.equal(codes[i], ref) and float(s[i]) == float(sr), i
    assert int(codes[:6].abs().max()) == 2 ** (bits - 1) - 1  # the easy samples use the whole code range
    buf = torch.empty_like(codes)
    again, _ = G.quantize_gradient_rows(g, bits, "zero", "max", out=buf)
    assert again.data_ptr() == buf.data_ptr() and torch.equal(buf, codes)
    y, _ = G.fake_quantize_gradient_rows(g, bits, "zero", "max")
    assert torch.equal(y, codes.float() * s.view(-1, 1, 1, 1))
    with pytest.raises(ConfigError, match="out must be"):
        G.quantize_gradient_rows(g, bits, out=torch.empty(3, dtype=codes.dtype))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_stochastic_rounding_is_the_same_bits_on_the_kernel_and_the_torch_path(layout, monkeypatch):
    """Same generator state, same codes: the torch path draws the kernel's counter-based uniforms (element i of
    g's memory gets u_i), so whether a C compiler exists does not change a stochastic-rounding result."""
    from hwquant.numerics import gradient as G
    from hwquant.numerics.uniform import native_status

    if not native_status()["available"]:
        pytest.skip("no C compiler")
    g = torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(9)) * 1e-3
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    runs = {}
    for path in ("kernel", "torch"):
        if path == "torch":
            monkeypatch.setattr(G, "native_kernels", lambda: None)
        runs[path] = G.quantize_gradient(g, 6, "stochastic", "max", generator=torch.Generator().manual_seed(4))
    (ck, sk), (ct, st) = runs["kernel"], runs["torch"]
    assert torch.equal(ck, ct) and float(sk) == float(st)
    assert ck.stride() == g.stride()
    # the uniforms by hand for two elements: splitmix64 of the seed the generator gives, at memory positions 0, 7
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(4)))
    mask = (1 << 64) - 1

    def u01(i):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return ((z ^ (z >> 31)) >> 40) * 2.0**-24

    u = G.counter_uniforms(seed, 8)
    assert [float(u[i]) for i in (0, 7)] == [u01(0), u01(7)]


def test_statistics_do_not_depend_on_the_thread_count():
    """The kernel sums fixed blocks and adds the block sums in order: the same bits with 1, 2 or 3 threads."""
    from hwquant.numerics import gradient as G
    from hwquant.numerics.uniform import native_status

    if not native_status()["available"]:
        pytest.skip("no C compiler")
    g = torch.randn(1_000_003, generator=torch.Generator().manual_seed(2)) * 3 + 0.1
    before = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got.append((G.gradient_stats(g), G.gradient_hist(g, 50)[:3]))
    finally:
        torch.set_num_threads(before)
    assert got[0] == got[1] == got[2]


@pytest.mark.parametrize("rounding", ["zero", "nearest"])
@pytest.mark.parametrize("bits", [3, 8])
def test_dsgc_cosines_equal_the_code_matrix(rounding, bits):
    """DSGC's sorted-threshold cosines equal cos(g, codes) computed from the codes themselves, also with
    elements placed exactly on code boundaries (k / r and half-way points)."""
    from hwquant.numerics.gradient import _codes_torch, _dsgc_cosines, _multipliers

    q = 2 ** (bits - 1) - 1
    g = _g(20_000, seed=bits)
    mx = float(g.abs().max())
    c = torch.tensor([mx * 2.0 ** (-j / 4) for j in range(40)], dtype=torch.float64)
    r = _multipliers(c, q)
    edges = torch.cat([(torch.arange(0, q + 1, 0.5) / r[j]).float() for j in (0, 7, 20)])
    g = torch.cat([g, edges, -edges, torch.nextafter(edges, torch.zeros(()))])
    codes = _codes_torch(g.unsqueeze(0), r.unsqueeze(1), q, rounding, None).double()
    want = (codes @ g.double()) / (g.double().norm() * codes.norm(dim=1))
    got = _dsgc_cosines(g, r, q, rounding)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
