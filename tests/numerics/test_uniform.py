"""Uniform quantizer checked against torch's fake-quantize ops and hand-worked cases."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hwquant.errors import ConfigError
from hwquant.numerics import dequantize, fake_quantize, qrange, quantize, round_tensor


def test_qrange_hand_cases():
    assert qrange(8) == (-128, 127)
    assert qrange(8, narrow=True) == (-127, 127)
    assert qrange(4, signed=False) == (0, 15)
    assert qrange(5) == (-16, 15)
    assert qrange(16, signed=False) == (0, 65535)


@pytest.mark.parametrize("scale", [0.037, 0.1, 0.0123, 0.3, 2.0**-5])
@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False), (6, True)])
def test_fake_quant_equals_torch_per_tensor(scale, bits, signed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1_000_000, generator=g) * 10
    qmin, qmax = qrange(bits, signed)
    zp = 0 if signed else 3
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
    out = fake_quantize(x, scale, bits, signed, zero_point=zp)
    assert torch.equal(out, ref)


def test_fake_quant_equals_torch_per_channel():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 8, 3, 3, generator=g) * 3
    scale = torch.rand(16, generator=g) * 0.1 + 0.001
    zp = torch.zeros(16, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -16, 15)
    out = fake_quantize(w, scale, 5, True, axis=0)
    assert torch.equal(out, ref)
    # axis 1
    scale1 = torch.rand(8, generator=g) * 0.1 + 0.001
    ref1 = torch.fake_quantize_per_channel_affine(w, scale1, torch.zeros(8, dtype=torch.int32), 1, -128, 127)
    assert torch.equal(fake_quantize(w, scale1, 8, True, axis=1), ref1)


def test_ste_gradient_equals_torch():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10_000, generator=g) * 4).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    up = torch.randn(10_000, generator=g)
    fake_quantize(x, 0.05, 6, True).backward(up)
    torch.fake_quantize_per_tensor_affine(x2, 0.05, 0, -32, 31).backward(up)
    assert torch.equal(x.grad, x2.grad)
    assert (x.grad == 0).any() and (x.grad != 0).any()


def test_ste_hand_case():
    # scale 1, 3-bit signed: codes -4..3. x=3.6 rounds to 4 -> clipped -> zero gradient.
    x = torch.tensor([-5.0, -4.4, -0.5, 1.2, 3.4, 3.6], requires_grad=True)
    y = fake_quantize(x, 1.0, 3, True)
    assert y.tolist() == [-4.0, -4.0, -0.0, 1.0, 3.0, 3.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_scale_gradient_hand_case():
    # x / s = [0.4, 1.6, 10] with s = 0.5, 3-bit unsigned (0..7):
    # inside: round(v) - v = [-0.4, 0.4]; clipped high: q_max = 7.
    x = torch.tensor([0.2, 0.8, 5.0])
    s = torch.tensor(0.5, requires_grad=True)
    fake_quantize(x, s, 3, False).sum().backward()
    assert s.grad.item() == pytest.approx(-0.4 + 0.4 + 7.0, abs=1e-6)


def test_lsq_scale_gradient_matches_autograd_of_explicit_formula():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 10, generator=g)
    s = (torch.rand(4, generator=g) * 0.2 + 0.05).requires_grad_()
    fake_quantize(w, s, 4, True, axis=0).pow(2).sum().backward()
    s2 = s.detach().clone().requires_grad_()
    v = w / s2[:, None]
    q = torch.clamp(v + (torch.round(v) - v).detach(), -8, 7)  # LSQ reference formulation
    (q * s2[:, None]).pow(2).sum().backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-5, atol=1e-5)


def test_quantize_dequantize_roundtrip_and_dtypes():
    x = torch.tensor([-1.0, -0.26, 0.25, 0.3, 9.0])
    q = quantize(x, 0.5, 4)
    assert q.dtype == torch.int8 and q.tolist() == [-2, -1, 0, 1, 7]
    assert quantize(x.abs(), 0.5, 8, signed=False).dtype == torch.uint8
    assert quantize(x, 0.5, 12).dtype == torch.int16
    assert torch.equal(dequantize(q, 0.5), fake_quantize(x, 0.5, 4))


def test_rounding_modes_hand_cases():
    x = torch.tensor([-2.5, -1.5, -0.7, 0.5, 1.5, 2.7])
    assert round_tensor(x, "nearest").tolist() == [-2.0, -2.0, -1.0, 0.0, 2.0, 3.0]
    assert round_tensor(x, "zero").tolist() == [-2.0, -1.0, -0.0, 0.0, 1.0, 2.0]
    assert round_tensor(x, "floor").tolist() == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0]
    # codes through quantize: toward zero keeps |q| <= |x/s|
    q = quantize(torch.tensor([-0.99, 0.99, -3.7, 3.7]), 1.0, 4, rounding="zero")
    assert q.tolist() == [0, 0, -3, 3]
    q = quantize(torch.tensor([-0.01, 0.99, -3.7, 3.7]), 1.0, 4, rounding="floor")
    assert q.tolist() == [-1, 0, -4, 3]


def test_stochastic_rounding_seeded_and_unbiased():
    x = torch.full((200_000,), 0.3)
    a = round_tensor(x, "stochastic", torch.Generator().manual_seed(5))
    b = round_tensor(x, "stochastic", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    # E[round(0.3)] = 0.3; std of the mean = sqrt(0.21 / n) ~ 0.001
    assert abs(a.mean().item() - 0.3) < 0.005
    # unbiased through the quantizer for negative values too
    y = torch.full((200_000,), -1.37)
    q = quantize(y, 0.5, 6, rounding="stochastic", generator=torch.Generator().manual_seed(6))
    assert set(q.unique().tolist()) == {-3, -2}
    assert abs(q.float().mean().item() * 0.5 + 1.37) < 0.005


@settings(max_examples=60, deadline=None)
@given(
    vals=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64),
    bits=st.integers(2, 16),
    signed=st.booleans(),
    rounding=st.sampled_from(["nearest", "zero", "floor", "stochastic"]),
    scale=st.floats(0.0009765625, 8.0, width=32),
)
def test_codes_always_in_range_and_fake_quant_consistent(vals, bits, signed, rounding, scale):
    x = torch.tensor(vals, dtype=torch.float32)
    qmin, qmax = qrange(bits, signed)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    q = quantize(x, scale, bits, signed, rounding, generator=g1)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    fq = fake_quantize(x, scale, bits, signed, rounding, generator=g2)
    assert torch.equal(fq, q.float() * torch.tensor(scale, dtype=torch.float32))


def test_bad_arguments_raise_config_error():
    x = torch.randn(4)
    with pytest.raises(ConfigError, match="bits"):
        quantize(x, 0.1, 40)
    with pytest.raises(ConfigError, match="rounding"):
        quantize(x, 0.1, 8, rounding="up")
    with pytest.raises(ConfigError, match="scale"):
        quantize(x, 0.0, 8)
    with pytest.raises(ConfigError, match="per-channel"):
        quantize(torch.randn(3, 4), torch.ones(4), 8, axis=0)


def test_native_kernels_are_cached_and_loaded_only_from_private_places(tmp_path, monkeypatch):
    """Never load native code another user could have written: a world-writable cache directory is not used,
    and a cached library that others may write is rebuilt instead of loaded."""
    import os

    from hwquant.numerics import native, uniform

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("HWQUANT_CACHE_DIR", str(shared))
    assert native.cache_dir() != str(shared)
    mine = tmp_path / "mine"
    monkeypatch.setenv("HWQUANT_CACHE_DIR", str(mine))
    assert native.cache_dir() == str(mine) and (os.stat(mine).st_mode & 0o777) == 0o700
    if not uniform.native_status()["available"]:
        pytest.skip("no C compiler: nothing is built or loaded")
    so = native.build()
    assert os.path.dirname(so) == str(mine)
    good = open(so, "rb").read()
    with open(so, "wb") as f:
        f.write(b"planted")
    os.chmod(so, 0o666)  # writable by anyone: must not be trusted
    assert native.build() == so
    assert open(so, "rb").read() == good  # rebuilt, not loaded as found
    os.chmod(so, 0o644)
    with open(so, "wb") as f:  # our own private file is trusted (the cache works)
        f.write(b"ours")
    assert native.build() == so and open(so, "rb").read() == b"ours"


def test_native_source_is_package_data_and_keys_the_cache(tmp_path, monkeypatch):
    """The kernels' C source ships as a file of the package (not a Python string), and the cached library's name
    is keyed by it: an edited source cannot load a library built from the old one."""
    from importlib import resources

    from hwquant.numerics import native, uniform

    path = resources.files("hwquant.numerics").joinpath("csrc", "hwq_kernels.c")
    text = path.read_text(encoding="utf-8")
    assert native.source() == text and "void hwq_fq(" in text and "hwq_gq_rows" in text
    assert "hwq_fq(" not in Path(native.__file__).read_text()  # no C in the Python module
    monkeypatch.setenv("HWQUANT_CACHE_DIR", str(tmp_path))
    if not uniform.native_status()["available"]:
        pytest.skip("no C compiler: nothing is built")
    so = native.build()
    monkeypatch.setattr(native, "source", lambda: text + "\n/* edited */\n")
    assert native.build() != so  # another source, another library


def test_native_kernels_share_torchs_openmp_runtime():
    """The kernel library links ``libgomp.so.1``; loaded after torch (hwquant imports torch first), the loader
    resolves it to the runtime torch already loaded, so one OpenMP thread pool serves both (Linux)."""
    from hwquant.numerics import uniform

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this platform")
    if not uniform.native_status()["available"]:
        pytest.skip("no C compiler: nothing is loaded")
    # (other packages may map their own renamed copy, e.g. scikit-learn's libgomp-<hash>.so; not ours)
    loaded = {line.split()[-1] for line in maps.read_text().splitlines() if line.endswith("/libgomp.so.1")}
    assert len(loaded) == 1, f"libgomp.so.1 loaded from: {sorted(loaded)}"
