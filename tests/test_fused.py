"""Fused inference kernels and the first-layer conv tiles.

- conv2d_forward(..., relu=True) / ConvForward(..., relu=True) and
  linear_forward(..., relu=True) / LinearForward(..., relu=True) are bit for bit the
  unfused kernel followed by relu_forward (v <= 0 gives +0, NaN passes), in float32
  and float64, with 1, 2 and 3 threads, on every path the kernels take (column and
  channel vectors, forced; scalar; own GEMM, dot products, BLAS, row chunks).
- The column path's register-epilogue tiles (first layers: C = 1 or 3, 3x3 and 5x5)
  agree with a NumPy twin and are bitwise identical for any thread count.
- conv2d_forward(..., pool=True) (conv + bias [+ ReLU] + 2x2 max-pool, inference)
  gives bit for bit the values of the conv followed by max_pool2d_relu_forward
  (relu=True) or max_pool2d_forward (relu=False), on every path (column tiles pooling
  in registers, channel vectors pooling each image's vectors, chunks through a
  scratch buffer), odd sizes, NaNs, 1/2/3 threads, both dtypes, every ISA build.
- fma_peak_gflops (the benchmarks' ceiling) runs on every build.
No timed assertions.
"""
import importlib

import numpy as np
import pytest

from cdl._kernels import conv as kconv
from cdl._kernels import dense as kdense
from cdl._kernels import elementwise as kelem
from cdl._kernels import pool as kpool
from cdl._kernels._runtime import cpu_supports

THREADS = (1, 2, 3)
ISAS = ["baseline", "avx2", "avx512"]


def _bits(a):
    """Bit patterns, so that NaN == NaN and -0 != +0."""
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint64)


def _relu_ref(y, nt=1):
    out = np.empty_like(y)
    kelem.relu_forward(y.reshape(-1), out.reshape(-1), nt)
    return out


def _module(kind, isa):
    if isa not in cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    try:
        return importlib.import_module(f"cdl._kernels._{kind}_{isa}")
    except ImportError:
        pytest.skip(f"cdl._kernels._{kind}_{isa} not built")


# ------------------------------------------------------------------------------ conv
# (x shape, w shape, stride, padding): first layers (column tiles with constant 3x3 /
# 5x5 taps), other kernel sizes (run-time taps), part-width columns (ow < 16), tiles
# that skip padding rows (the tile-then-store path), channel-vector shapes (K >= 12,
# ragged columns; strides), a single output channel (the row-reuse tile).
CONV_CASES = [
    ((3, 3, 32, 32), (32, 3, 3, 3), 1, 1),
    ((2, 1, 28, 28), (6, 1, 5, 5), 1, 2),
    ((2, 3, 17, 23), (11, 3, 5, 5), 1, 2),
    ((2, 1, 19, 37), (5, 1, 3, 3), 1, (1, 0)),
    ((2, 3, 9, 33), (7, 3, 3, 3), (2, 1), 1),
    ((1, 2, 12, 40), (9, 2, 4, 2), 1, (1, 0)),
    ((2, 3, 6, 7), (8, 3, 3, 3), 1, 1),
    ((1, 2, 9, 20), (4, 2, 7, 7), 1, 3),
    ((2, 6, 14, 14), (16, 6, 5, 5), 1, 0),
    ((2, 5, 9, 13), (17, 5, 3, 3), 1, 1),
    ((2, 3, 11, 10), (33, 3, 3, 2), (2, 3), (0, 2)),
    ((2, 4, 10, 10), (1, 4, 5, 5), 1, 2),
    ((1, 3, 10, 10), (1, 3, 3, 3), 1, 1),
    ((2, 16, 8, 16), (24, 16, 3, 3), 1, 1),
    ((1, 16, 32, 32), (16, 16, 3, 3), 1, 1),     # batch 1: rows split over items
    ((2, 16, 16, 16), (32, 16, 1, 1), 2, 0),     # 1x1 shortcut (GEMM path)
    ((1, 8, 9, 7), (5, 8, 1, 1), 1, 0),
]


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _windows(xp, i, j, oh, ow, s):
    return xp[:, :, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1]]


def ref_conv2d(x, w, b, s, p):
    """NumPy twin in float64: one einsum per kernel offset over a padded copy."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    kh, kw = w.shape[2:]
    oh = (x.shape[2] + 2 * p[0] - kh) // s[0] + 1
    ow = (x.shape[3] + 2 * p[1] - kw) // s[1] + 1
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    y = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,kc->nkhw", _windows(xp, i, j, oh, ow, s), w[:, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def ref_conv2d_input_grad(g, x_shape, w, s, p):
    g, w = g.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x_shape
    kh, kw = w.shape[2:]
    oh, ow = g.shape[2:]
    dxp = np.zeros((n, c, h + 2 * p[0], wd + 2 * p[1]))
    for i in range(kh):
        for j in range(kw):
            _windows(dxp, i, j, oh, ow, s)[...] += np.einsum("nkhw,kc->nchw", g, w[:, :, i, j])
    return dxp[:, :, p[0]:p[0] + h, p[1]:p[1] + wd]


def _conv_case(xs, ws, dtype, seed, with_nan=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    if with_nan:
        x.reshape(-1)[x.size // 3] = np.nan
    return x, w, b


def _out_shape(xs, ws, s, p):
    return (xs[0], ws[0], (xs[2] + 2 * p[0] - ws[2]) // s[0] + 1,
            (xs[3] + 2 * p[1] - ws[3]) // s[1] + 1)


def _conv(mod, x, w, b, s, p, nt, relu=None):
    y = np.full(_out_shape(x.shape, w.shape, s, p), np.nan, x.dtype)
    if relu is None:
        mod.conv2d_forward(x, w, b, y, s[0], s[1], p[0], p[1], nt)
    else:
        mod.conv2d_forward(x, w, b, y, s[0], s[1], p[0], p[1], nt, relu=relu)
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-p{c[3]}")
def test_conv_relu_fused_equals_unfused(case, dtype):
    xs, ws, s, p = case
    s, p = _pair(s), _pair(p)
    for with_nan in (False, True):
        x, w, b = _conv_case(xs, ws, dtype, 3, with_nan)
        for bias in (b, None):
            plain = _conv(kconv, x, w, bias, s, p, 2)
            assert _bits(_conv(kconv, x, w, bias, s, p, 2, relu=False)).tobytes() == \
                _bits(plain).tobytes()
            want = _relu_ref(plain)
            for nt in THREADS:
                got = _conv(kconv, x, w, bias, s, p, nt, relu=True)
                assert _bits(got).tobytes() == _bits(want).tobytes(), f"{nt} threads"
            if not with_nan:
                ref = np.maximum(ref_conv2d(x, w, bias, s, p), 0)
                tol = 1e-4 if dtype == np.float32 else 1e-10
                np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("path", [1, 2])
def test_conv_relu_fused_on_forced_float32_paths(path):
    old = kconv.set_float32_path(path)
    try:
        for xs, ws, s, p in CONV_CASES:
            s, p = _pair(s), _pair(p)
            if path == 1 and s[1] != 1:
                continue            # column vectors take horizontal stride 1 only
            x, w, b = _conv_case(xs, ws, np.float32, 4)
            want = _relu_ref(_conv(kconv, x, w, b, s, p, 2))
            for nt in THREADS:
                got = _conv(kconv, x, w, b, s, p, nt, relu=True)
                assert _bits(got).tobytes() == _bits(want).tobytes()
    finally:
        kconv.set_float32_path(old)


def test_conv_forward_bound_call_relu():
    x, w, b = _conv_case((4, 3, 16, 16), (32, 3, 3, 3), np.float32, 5)
    y = np.empty((4, 32, 16, 16), np.float32)
    yr = np.empty_like(y)
    plain = kconv.ConvForward(x, w, b, y, (1, 1), (1, 1))
    fused = kconv.ConvForward(x, w, b, yr, (1, 1), (1, 1), relu=True)
    for nt in THREADS:
        plain.run(nt)
        fused.run(nt)
        assert _bits(yr).tobytes() == _bits(_relu_ref(y)).tobytes()
    x2 = -x
    fused.bind_input(x2)
    fused.run(2)
    assert _bits(yr).tobytes() == _bits(_relu_ref(_conv(kconv, x2, w, b, (1, 1), (1, 1), 2))).tobytes()


@pytest.mark.parametrize("isa", ISAS)
def test_conv_relu_every_isa_build(isa):
    mod = _module("conv", isa)
    for xs, ws, s, p in CONV_CASES:
        s, p = _pair(s), _pair(p)
        for dtype in (np.float32, np.float64):
            x, w, b = _conv_case(xs, ws, dtype, 6, with_nan=True)
            want = _relu_ref(_conv(mod, x, w, b, s, p, 2))
            for nt in (1, 3):
                assert _bits(_conv(mod, x, w, b, s, p, nt, relu=True)).tobytes() == \
                    _bits(want).tobytes()


# Pooled: column tiles (stride 1 across, K < 12 or whole vectors), channel vectors
# (K >= 12 with ragged columns, or strides; whole images from batch 8 on, chunks
# below), odd output sizes (the last row / column dropped), tiny planes.
POOL_CASES = CONV_CASES + [
    ((9, 6, 14, 14), (16, 6, 5, 5), 1, 0),
    ((9, 5, 9, 13), (17, 5, 3, 3), 1, 1),
    ((10, 3, 11, 10), (33, 3, 3, 2), (2, 3), (0, 2)),
    ((9, 32, 8, 8), (64, 32, 3, 3), 1, 1),
    ((8, 2, 9, 20), (12, 2, 2, 7), (1, 2), (1, 2)),
    ((3, 3, 33, 35), (32, 3, 3, 3), 1, 1),
    ((2, 1, 3, 3), (2, 1, 2, 2), 1, 0),
    ((2, 0, 6, 6), (3, 0, 3, 3), 1, 1),
]


def _pooled_ref(mod, pmod, x, w, b, s, p, relu):
    y = _conv(mod, x, w, b, s, p, 2)
    out = np.empty(y.shape[:2] + (y.shape[2] // 2, y.shape[3] // 2), y.dtype)
    idx = np.empty(out.shape, np.int32)
    if relu:
        pmod.max_pool2d_relu_forward(y, out, idx, 1)
    else:
        pmod.max_pool2d_forward(y, out, idx, 2, 2, 2, 2, 0, 0, 1)
    return out


def _pooled(mod, x, w, b, s, p, nt, relu):
    oh, ow = _out_shape(x.shape, w.shape, s, p)[2:]
    out = np.full((x.shape[0], w.shape[0], oh // 2, ow // 2), np.nan, x.dtype)
    mod.conv2d_forward(x, w, b, out, s[0], s[1], p[0], p[1], nt, relu=relu, pool=True)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-p{c[3]}")
def test_conv_relu_pool_fused_equals_unfused(case, dtype):
    xs, ws, s, p = case
    s, p = _pair(s), _pair(p)
    paths = [0, 1, 2] if dtype == np.float32 else [0]
    for path in paths:
        if path == 1 and s[1] != 1:
            continue
        old = kconv.set_float32_path(path)
        try:
            x, w, b = _conv_case(xs, ws, dtype, 12, with_nan=xs[1] > 0)
            for relu in (True, False):
                for bias in (b, None):
                    want = _pooled_ref(kconv, kpool, x, w, bias, s, p, relu)
                    for nt in THREADS:
                        got = _pooled(kconv, x, w, bias, s, p, nt, relu)
                        assert _bits(got).tobytes() == _bits(want).tobytes(), \
                            f"path {path}, relu {relu}, {nt} threads"
        finally:
            kconv.set_float32_path(old)


def test_conv_forward_bound_call_pool():
    x, w, b = _conv_case((9, 3, 16, 16), (32, 3, 3, 3), np.float32, 13)
    out = np.empty((9, 32, 8, 8), np.float32)
    call = kconv.ConvForward(x, w, b, out, (1, 1), (1, 1), relu=True, pool=True)
    for nt in THREADS:
        call.run(nt)
        want = _pooled_ref(kconv, kpool, x, w, b, (1, 1), (1, 1), True)
        assert _bits(out).tobytes() == _bits(want).tobytes()


@pytest.mark.parametrize("isa", ISAS)
def test_conv_relu_pool_every_isa_build(isa):
    mod = _module("conv", isa)
    pmod = _module("pool", isa)
    for xs, ws, s, p in POOL_CASES:
        s, p = _pair(s), _pair(p)
        for dtype in (np.float32, np.float64):
            x, w, b = _conv_case(xs, ws, dtype, 14, with_nan=xs[1] > 0)
            for relu in (True, False):
                want = _pooled_ref(mod, pmod, x, w, b, s, p, relu)
                for nt in (1, 3):
                    assert _bits(_pooled(mod, x, w, b, s, p, nt, relu)).tobytes() == \
                        _bits(want).tobytes()


# First layers and their neighbours: NumPy twin, forward and input gradient (the
# column tiles serve both), and bitwise identical for 1, 2 and 3 threads.
FIRST_LAYERS = [
    ((9, 3, 32, 32), (32, 3, 3, 3), 1, 1),
    ((1, 3, 32, 32), (32, 3, 3, 3), 1, 1),
    ((7, 1, 28, 28), (6, 1, 5, 5), 1, 2),
    ((1, 1, 28, 28), (6, 1, 5, 5), 1, 2),
    ((3, 3, 30, 45), (20, 3, 5, 5), 1, 2),
    ((2, 1, 21, 18), (13, 1, 3, 3), (2, 1), 0),
    ((5, 3, 24, 24), (64, 3, 3, 3), 1, 0),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", FIRST_LAYERS, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-p{c[3]}")
def test_first_layer_tiles_match_reference_and_threads(case, isa):
    mod = _module("conv", isa)
    xs, ws, s, p = case
    s, p = _pair(s), _pair(p)
    x, w, b = _conv_case(xs, ws, np.float32, 7)
    ref = ref_conv2d(x, w, b, s, p)
    g = np.random.default_rng(8).standard_normal(ref.shape).astype(np.float32)
    dx_ref = ref_conv2d_input_grad(g, x.shape, w, s, p)
    ys, dxs = [], []
    for nt in THREADS:
        y = _conv(mod, x, w, b, s, p, nt)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        ys.append(_bits(y).tobytes())
        dx = np.full(x.shape, np.nan, np.float32)
        mod.conv2d_backward_input(g, w, dx, s[0], s[1], p[0], p[1], nt)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4 * np.abs(dx_ref).max())
        dxs.append(_bits(dx).tobytes())
    assert len(set(ys)) == 1 and len(set(dxs)) == 1


# ------------------------------------------------------------------------------ dense
# (batch, in, out): own GEMM tiles, dot products (few outputs), a batch of one
# (GEMV), a small batch with a big weight (row chunks), ragged tiles, no inputs.
DENSE_CASES = [(64, 784, 256), (300, 700, 257), (64, 4096, 10), (1, 784, 256), (3, 1024, 512),
               (5, 7, 3), (2, 3, 100), (33, 300, 31), (4, 0, 6), (1, 1, 1)]


def _linear(mod, x, w, b, nt, relu=None):
    y = np.full((x.shape[0], w.shape[0]), np.nan, x.dtype)
    if relu is None:
        mod.linear_forward(x, w, b, y, nt)
    else:
        mod.linear_forward(x, w, b, y, nt, relu=relu)
    return y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_linear_relu_fused_equals_unfused(case, dtype):
    n, fin, fout = case
    rng = np.random.default_rng(9)
    x = rng.standard_normal((n, fin)).astype(dtype)
    w = rng.standard_normal((fout, fin)).astype(dtype)
    b = rng.standard_normal(fout).astype(dtype)
    if x.size:
        x.reshape(-1)[x.size // 2] = np.nan
    for bias in (b, None):
        plain = _linear(kdense, x, w, bias, 2)
        assert _bits(_linear(kdense, x, w, bias, 2, relu=False)).tobytes() == \
            _bits(plain).tobytes()
        want = _relu_ref(plain)
        for nt in THREADS:
            got = _linear(kdense, x, w, bias, nt, relu=True)
            assert _bits(got).tobytes() == _bits(want).tobytes(), f"{nt} threads"
        ok = ~np.isnan(want)
        ref = np.maximum(x.astype(np.float64) @ w.T.astype(np.float64)
                         + (0 if bias is None else bias), 0)
        tol = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(want[ok], ref[ok], rtol=tol,
                                   atol=tol * (np.abs(ref[ok]).max(initial=0) + 1))


def test_linear_forward_bound_call_relu():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((64, 784)).astype(np.float32)
    w = rng.standard_normal((256, 784)).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    y, yr = np.empty((64, 256), np.float32), np.empty((64, 256), np.float32)
    plain = kdense.LinearForward(x, w, b, y)
    fused = kdense.LinearForward(x, w, b, yr, relu=True)
    for nt in THREADS:
        plain.run(nt)
        fused.run(nt)
        assert _bits(yr).tobytes() == _bits(_relu_ref(y)).tobytes()


@pytest.mark.parametrize("isa", ISAS)
def test_linear_relu_every_isa_build(isa):
    mod = _module("dense", isa)
    rng = np.random.default_rng(11)
    for n, fin, fout in DENSE_CASES:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((n, fin)).astype(dtype)
            w = rng.standard_normal((fout, fin)).astype(dtype)
            b = rng.standard_normal(fout).astype(dtype)
            want = _relu_ref(_linear(mod, x, w, b, 2))
            for nt in (1, 3):
                assert _bits(_linear(mod, x, w, b, nt, relu=True)).tobytes() == \
                    _bits(want).tobytes()


# ------------------------------------------------------------------------------ peak
@pytest.mark.parametrize("isa", ISAS)
def test_fma_peak_runs(isa):
    mod = _module("dense", isa)
    for nt in (1, 2):
        g = mod.fma_peak_gflops(0.01, nt)
        assert np.isfinite(g) and g > 0
