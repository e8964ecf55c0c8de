"""Conv2d kernels against a plain NumPy reference, gradient checks, thread and ISA agreement."""
import importlib
import sys

import numpy as np
import pytest

import cdl
import cdl.functional as F
from cdl._kernels import conv as kconv
from cdl._kernels._runtime import cpu_supports


# ---------------------------------------------------------------------------
# Plain NumPy reference: one einsum per kernel offset (i, j) over a padded copy.
# ---------------------------------------------------------------------------

def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def _windows(xp, i, j, oh, ow, s):
    # x_pad[:, :, oh*S + i, ow*S + j] for all output positions
    return xp[:, :, i:i + s[0] * (oh - 1) + 1:s[0], j:j + s[1] * (ow - 1) + 1:s[1]]


def ref_conv2d(x, w, b, stride, padding):
    s, p = _pair(stride), _pair(padding)
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, c, h, wd = x.shape
    k, _, kh, kw = w.shape
    oh = (h + 2 * p[0] - kh) // s[0] + 1
    ow = (wd + 2 * p[1] - kw) // s[1] + 1
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    y = np.zeros((n, k, oh, ow))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("nchw,kc->nkhw", _windows(xp, i, j, oh, ow, s), w[:, :, i, j])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def ref_conv2d_backward(g, x, w, stride, padding):
    s, p = _pair(stride), _pair(padding)
    g = g.astype(np.float64)
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    h, wd = x.shape[2:]
    kh, kw = w.shape[2:]
    oh, ow = g.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    dxp = np.zeros_like(xp)
    dw = np.zeros(w.shape)
    for i in range(kh):
        for j in range(kw):
            dw[:, :, i, j] = np.einsum("nkhw,nchw->kc", g, _windows(xp, i, j, oh, ow, s))
            _windows(dxp, i, j, oh, ow, s)[...] += np.einsum("nkhw,kc->nchw", g, w[:, :, i, j])
    dx = dxp[:, :, p[0]:p[0] + h, p[1]:p[1] + wd]
    return dx, dw, g.sum(axis=(0, 2, 3))


def _random_case(rng):
    n = int(rng.integers(1, 4))
    c = int(rng.integers(1, 6))
    k = int(rng.integers(1, 12))
    kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    p = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
    h = max(kh - 2 * p[0], 1) + int(rng.integers(0, 19))
    w = max(kw - 2 * p[1], 1) + int(rng.integers(0, 37))
    return (n, c, h, w), (k, c, kh, kw), s, p


# Hand-picked shapes: stride 1 (the vector path), ragged widths and channel
# counts, batch 1, one channel, kernel equal to the padded input, H != W.
FIXED = [
    ((2, 3, 16, 16), (8, 3, 3, 3), 1, 1),
    ((1, 1, 28, 28), (6, 1, 5, 5), 1, 2),
    ((3, 4, 7, 19), (5, 4, 2, 3), 1, 0),
    ((2, 2, 9, 33), (7, 2, 3, 1), (1, 1), (2, 0)),
    ((1, 5, 5, 5), (3, 5, 5, 5), 1, 0),
    ((1, 2, 3, 4), (4, 2, 7, 8), 1, 2),
    ((2, 3, 6, 40), (17, 3, 1, 6), 1, (0, 2)),
    ((1, 1, 1, 1), (1, 1, 1, 1), 1, 0),
    ((2, 3, 11, 13), (9, 3, 4, 4), 2, 1),
    ((2, 2, 12, 10), (3, 2, 3, 3), (3, 1), (1, 2)),
    ((1, 3, 10, 12), (2, 3, 3, 2), (1, 3), (2, 1)),
    ((2, 6, 18, 21), (12, 6, 7, 2), 1, (3, 0)),
    # One input channel: the input gradient takes the row-reuse tile (kh 3 or 5).
    ((3, 1, 28, 28), (6, 1, 5, 5), 1, 2),
    ((2, 1, 19, 37), (5, 1, 3, 3), 1, (1, 0)),
    ((1, 1, 9, 17), (4, 1, 5, 3), 1, (2, 1)),
    # Shapes the float32 channel-vector path takes: many output channels and
    # output widths that are not whole vectors, or horizontal stride > 1.
    ((3, 6, 14, 14), (16, 6, 5, 5), 1, 0),
    ((2, 5, 9, 13), (17, 5, 3, 3), 1, 1),
    ((5, 3, 11, 10), (33, 3, 3, 2), (2, 3), (0, 2)),
    ((1, 4, 12, 12), (20, 4, 7, 7), 1, 2),
    # 1x1 without padding (a GEMM per image): strides, column chunks at batch 1,
    # more channels than one reduction block.
    ((1, 16, 32, 32), (32, 16, 1, 1), 2, 0),
    ((3, 7, 9, 11), (5, 7, 1, 1), (2, 3), 0),
    ((2, 260, 6, 5), (20, 260, 1, 1), 1, 0),
    ((1, 3, 1, 1), (4, 3, 1, 1), 1, 0),
    # Strided input gradients run phase by phase: ResNet's 3x3 stride 2, padding
    # past half the kernel (phases that read before the first row), phases that
    # no tap reaches (kernel 2, stride 3), odd sizes.
    ((2, 16, 32, 32), (32, 16, 3, 3), 2, 1),
    ((2, 32, 16, 16), (64, 32, 3, 3), 2, 1),            # 8x8 phases: channel vectors
    ((2, 4, 9, 10), (6, 4, 3, 3), 2, 2),
    ((1, 3, 11, 7), (5, 3, 2, 2), 3, 0),
    # Kernels of at most 2x2 taps on the column path run their taps as one loop
    # (AVX2), from a table of at most 1024 taps: 2x2, 1x2 and 2x1 kernels, and
    # 600 input channels of 2x2 (2400 taps: the nested loops).
    ((2, 5, 17, 19), (12, 5, 2, 2), 1, 1),
    ((2, 7, 16, 18), (8, 7, 1, 2), 1, (0, 1)),
    ((1, 3, 18, 16), (4, 3, 2, 1), 1, (1, 0)),
    ((1, 600, 9, 10), (4, 600, 2, 2), 1, 0),
    ((2, 5, 13, 9), (7, 5, 5, 3), (2, 3), (2, 1)),
    ((2, 3, 1, 5), (4, 3, 1, 1), 2, 0),                 # fewer rows than the stride
    ((2, 3, 7, 8), (4, 3, 3, 3), 2, 4),                 # padding past the kernel
    # Narrow planes: the stride-1 input gradient takes the channel-vector forward
    # path with flipped filters; padding past the kernel cannot (column tiles).
    ((3, 64, 8, 8), (64, 64, 3, 3), 1, 1),
    ((2, 20, 6, 6), (24, 20, 3, 3), 1, 0),
    ((2, 20, 6, 6), (24, 20, 3, 3), 1, 3),
]


def _check_case(xs, ws, s, p, dtype, rng, rtol):
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    y = F.conv2d(x, w, b, s, p)
    y_ref = ref_conv2d(x, w, b, s, p)
    assert y.dtype == dtype and y.shape == y_ref.shape
    scale = np.abs(y_ref).max() + 1e-30
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=rtol * scale)
    g = rng.standard_normal(y.shape).astype(dtype)
    dx, dw, db = F.conv2d_backward(g, x, w, s, p)
    for got, want in zip((dx, dw, db), ref_conv2d_backward(g, x, w, s, p)):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * (np.abs(want).max() + 1e-30))


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("case", FIXED, ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-p{c[3]}")
def test_fixed_shapes_match_reference(case, dtype, rtol):
    _check_case(*case, dtype, np.random.default_rng(1), rtol)


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-4), (np.float64, 1e-10)])
@pytest.mark.parametrize("seed", range(40))
def test_random_shapes_match_reference(seed, dtype, rtol):
    rng = np.random.default_rng(seed)
    xs, ws, s, p = _random_case(rng)
    if seed % 2 == 0:
        s = (1, 1)      # half the cases exercise the stride-1 vector path
    _check_case(xs, ws, s, p, dtype, rng, rtol)


@pytest.mark.parametrize("xs,ws,s,p", [
    ((40, 5, 9, 11), (70, 5, 3, 3), 1, 1),      # several channel groups, ragged last group
    ((33, 2, 8, 21), (13, 2, 5, 5), 1, 2),      # image chunks of uneven size
    ((9, 7, 6, 5), (66, 7, 2, 4), (2, 1), (1, 3)),
])
def test_large_batches_and_channel_groups(xs, ws, s, p):
    _check_case(xs, ws, s, p, np.float32, np.random.default_rng(2), 1e-4)


def test_bias_none_and_skipped_gradients():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    y = F.conv2d(x, w, None, 1, 1)
    np.testing.assert_allclose(y, ref_conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = F.conv2d_backward(g, x, w, 1, 1, need_input_grad=False, need_bias_grad=False)
    assert dx is None and db is None
    np.testing.assert_allclose(dw, ref_conv2d_backward(g, x, w, 1, 1)[1], rtol=1e-4, atol=1e-3)
    # 1x1 (the GEMM path), strided, without bias: plain and with ReLU
    x = rng.standard_normal((2, 16, 16, 16)).astype(np.float32)
    w = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)
    want = ref_conv2d(x, w, None, 2, 0)
    np.testing.assert_allclose(F.conv2d(x, w, None, 2, 0), want, rtol=1e-4, atol=1e-4)
    y = np.empty(want.shape, np.float32)
    kconv.conv2d_forward(x, w, None, y, 2, 2, 0, 0, 2, relu=True)
    np.testing.assert_allclose(y, np.maximum(want, 0), rtol=1e-4, atol=1e-4)


def test_out_buffers_are_used():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 6, 7))
    w = rng.standard_normal((3, 2, 3, 3))
    out = np.full((2, 3, 6, 7), np.nan)
    assert F.conv2d(x, w, None, 1, 1, out=out) is out
    g = rng.standard_normal(out.shape)
    bufs = (np.full(x.shape, np.nan), np.full(w.shape, np.nan), np.full(3, np.nan))
    dx, dw, db = F.conv2d_backward(g, x, w, 1, 1, grad_input=bufs[0], grad_weight=bufs[1],
                                   grad_bias=bufs[2])
    assert dx is bufs[0] and dw is bufs[1] and db is bufs[2]
    assert np.isfinite(dx).all() and np.isfinite(dw).all() and np.isfinite(db).all()


def test_non_contiguous_input_is_copied():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 10, 12)).astype(np.float32)[:, :, ::2, ::2]
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(F.conv2d(x, w, None, 1, 1), ref_conv2d(x, w, None, 1, 1),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Central-difference gradient checks (float64)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("xs,ws,s,p", [
    ((2, 2, 5, 6), (3, 2, 3, 2), 1, 1),
    ((1, 3, 7, 5), (2, 3, 2, 3), (2, 1), (0, 2)),
    ((2, 1, 6, 6), (2, 1, 3, 3), 2, 1),
])
def test_gradients_central_difference(xs, ws, s, p):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(xs)
    w = rng.standard_normal(ws)
    b = rng.standard_normal(ws[0])
    g = rng.standard_normal(F.conv2d(x, w, b, s, p).shape)

    def loss(x_, w_, b_):
        return float(np.sum(F.conv2d(x_, w_, b_, s, p) * g))

    dx, dw, db = F.conv2d_backward(g, x, w, s, p)
    eps = 1e-6
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = loss(x, w, b)
            arr[idx] = old - eps
            down = loss(x, w, b)
            arr[idx] = old
            num[idx] = (up - down) / (2 * eps)
        rel = np.abs(num - grad).max() / max(np.abs(num).max(), 1e-12)
        assert rel < 1e-6, rel


# ---------------------------------------------------------------------------
# Determinism across thread counts, and agreement of every ISA build
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs,ws,s,p", [
    ((64, 32, 16, 16), (64, 32, 3, 3), 1, 1),
    ((64, 1, 28, 28), (6, 1, 5, 5), 1, 2),
    ((33, 3, 17, 23), (10, 3, 3, 5), 1, (1, 2)),
    ((20, 4, 15, 15), (7, 4, 3, 3), 2, 1),
    ((64, 6, 14, 14), (16, 6, 5, 5), 1, 0),           # channel-vector path
    ((13, 5, 13, 17), (33, 5, 3, 3), (2, 3), (2, 1)),  # channel vectors, strides
    ((1, 32, 16, 16), (64, 32, 3, 3), 1, 1),           # batch 1: tile groups
    ((1, 16, 32, 32), (16, 16, 3, 3), 1, 1),           # batch 1: rows split too
    ((2, 16, 32, 32), (16, 16, 3, 3), 1, 1),
    ((1, 16, 32, 32), (32, 16, 1, 1), 2, 0),           # 1x1: column chunks
    ((3, 32, 16, 16), (64, 32, 1, 1), 1, 0),
    ((8, 16, 32, 32), (32, 16, 3, 3), 2, 1),           # strided input gradient phases
    ((1, 16, 32, 32), (32, 16, 3, 3), 2, 1),           # ... as a GEMM and scatter
    ((3, 32, 16, 16), (64, 32, 3, 3), 2, 1),
    ((8, 32, 16, 16), (64, 32, 3, 3), 2, 1),           # phases on channel vectors
    ((2, 32, 15, 17), (64, 32, 1, 1), 2, 0),           # 1x1: phases no tap reaches, odd W
    ((16, 64, 8, 8), (64, 64, 3, 3), 1, 1),            # input gradient on channel vectors
])
def test_bitwise_identical_for_1_and_2_threads(xs, ws, s, p, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    y1 = F.conv2d(x, w, b, s, p, threads=1)
    y2 = F.conv2d(x, w, b, s, p, threads=2)
    assert np.array_equal(y1, y2)
    g = rng.standard_normal(y1.shape).astype(dtype)
    r1 = F.conv2d_backward(g, x, w, s, p, threads=1)
    r2 = F.conv2d_backward(g, x, w, s, p, threads=2)
    for a, b_ in zip(r1, r2):
        assert np.array_equal(a, b_)
    with cdl.threads(2):
        assert np.array_equal(F.conv2d(x, w, b, s, p), y1)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-4), (np.float64, 1e-10)])
def test_every_isa_build_matches_reference(isa, dtype, rtol):
    if isa not in cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._conv_{isa}")
    rng = np.random.default_rng(8)
    for xs, ws, s, p in FIXED + [_random_case(rng)[:2] + ((1, 1), (1, 1)) for _ in range(6)]:
        s, p = _pair(s), _pair(p)
        x = rng.standard_normal(xs).astype(dtype)
        w = rng.standard_normal(ws).astype(dtype)
        b = rng.standard_normal(ws[0]).astype(dtype)
        y_ref = ref_conv2d(x, w, b, s, p)
        y = np.empty(y_ref.shape, dtype)
        mod.conv2d_forward(x, w, b, y, s[0], s[1], p[0], p[1], 2)
        np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=rtol * np.abs(y_ref).max())
        g = rng.standard_normal(y.shape).astype(dtype)
        dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
        mod.conv2d_backward_input(g, w, dx, s[0], s[1], p[0], p[1], 2)
        mod.conv2d_backward_weight(g, x, dw, db, s[0], s[1], p[0], p[1], 2)
        for got, want in zip((dx, dw, db), ref_conv2d_backward(g, x, w, s, p)):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# Both float32 paths forced on every shape they accept: channel vectors (any
# stride) and column vectors (stride 1), whichever the shape would pick.
FORCED = [
    ((1, 6, 14, 14), (16, 6, 5, 5), 1, 0),
    ((9, 6, 14, 14), (16, 6, 5, 5), 1, 0),      # chunks of 2 images, last one short
    ((2, 32, 8, 8), (64, 32, 3, 3), 1, 1),
    ((3, 5, 13, 11), (17, 5, 3, 3), 2, 1),
    ((5, 4, 12, 15), (33, 4, 3, 2), (1, 3), (2, 0)),
    ((4, 3, 10, 10), (1, 3, 5, 5), 3, 2),
    ((2, 2, 7, 9), (40, 2, 1, 1), 1, 0),
    ((3, 2, 9, 20), (12, 2, 2, 7), (1, 2), (1, 2)),   # kernel wider than 5 columns
    ((2, 1, 28, 28), (6, 1, 5, 5), 1, 2),
    ((17, 3, 6, 5), (70, 3, 4, 4), (3, 1), (2, 1)),
    ((1, 7, 5, 5), (13, 7, 5, 5), 1, 0),              # one output position
]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("path", [1, 2])
def test_forced_float32_paths_match_reference(isa, path):
    if isa not in cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._conv_{isa}")
    rng = np.random.default_rng(9)
    old = mod.set_float32_path(path)
    try:
        for xs, ws, s, p in FORCED:
            s, p = _pair(s), _pair(p)
            x = rng.standard_normal(xs).astype(np.float32)
            w = rng.standard_normal(ws).astype(np.float32)
            b = rng.standard_normal(ws[0]).astype(np.float32)
            y_ref = ref_conv2d(x, w, b, s, p)
            g = rng.standard_normal(y_ref.shape).astype(np.float32)
            _, dw_ref, db_ref = ref_conv2d_backward(g, x, w, s, p)
            res = []
            for nt in (1, 2):
                y = np.full(y_ref.shape, np.nan, np.float32)
                dw = np.full(w.shape, np.nan, np.float32)
                db = np.full(b.shape, np.nan, np.float32)
                mod.conv2d_forward(x, w, b, y, s[0], s[1], p[0], p[1], nt)
                mod.conv2d_backward_weight(g, x, dw, db, s[0], s[1], p[0], p[1], nt)
                np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.abs(y_ref).max())
                np.testing.assert_allclose(dw, dw_ref, rtol=1e-4,
                                           atol=1e-4 * (np.abs(dw_ref).max() + 1e-30))
                np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-4 * np.abs(db_ref).max())
                res.append((y, dw, db))
            for a, b_ in zip(*res):
                assert np.array_equal(a, b_)
            dw2 = np.full(w.shape, np.nan, np.float32)
            mod.conv2d_backward_weight(g, x, dw2, None, s[0], s[1], p[0], p[1], 2)
            assert np.array_equal(dw2, res[0][1])        # grad_bias=None: same weights
            y = np.full(y_ref.shape, np.nan, np.float32)
            mod.conv2d_forward(x, w, None, y, s[0], s[1], p[0], p[1], 2)
            np.testing.assert_allclose(y + b[:, None, None], y_ref, rtol=1e-4,
                                       atol=1e-4 * np.abs(y_ref).max())
    finally:
        mod.set_float32_path(old)


# Strided input gradients: phases (1), GEMM + scatter (2) and the fused 3x3 stride-2
# pass (3), each forced, against the reference; odd sizes, padding past the kernel,
# strides 3 and (2, 3), a 1x1 with phases no tap reaches, and an image shorter than
# the stride. The fused pass's shapes: planes of 16 columns a vector and of two rows
# a vector (at most 8 columns), several vectors with a ragged last one or a last one
# exactly a vector wide (48 and 24 columns: AVX-512, AVX2), padding 0, 1, (1, 0) and
# (0, 1), input channels in tiles of 4, 2 and 1, rows no tap reaches (zero), images
# of 1-4 rows or columns.
STRIDED = [
    ((2, 16, 32, 32), (32, 16, 3, 3), 2, 1),
    ((9, 32, 16, 16), (64, 32, 3, 3), 2, 1),
    ((3, 5, 13, 11), (17, 5, 3, 3), 2, 1),
    ((2, 7, 40, 70), (5, 7, 3, 3), 2, 1),
    ((3, 10, 10, 7), (8, 10, 3, 3), 2, 0),
    ((1, 9, 33, 35), (4, 9, 3, 3), 2, (1, 0)),
    ((2, 6, 12, 14), (3, 6, 3, 3), 2, 0),
    ((1, 3, 10, 48), (4, 3, 3, 3), 2, 1),
    ((1, 3, 6, 24), (2, 3, 3, 3), 2, (0, 1)),
    ((2, 3, 9, 17), (5, 3, 3, 3), 2, (0, 1)),
    ((2, 3, 3, 2), (2, 3, 3, 3), 2, 1),
    ((1, 2, 1, 4), (3, 2, 3, 3), 2, 1),
    ((1, 5, 4, 3), (2, 5, 3, 3), 2, (0, 1)),
    ((2, 4, 12, 15), (6, 4, 3, 2), (2, 3), (2, 0)),
    ((4, 3, 10, 10), (1, 3, 5, 5), 3, 2),
    ((2, 3, 9, 8), (5, 3, 3, 3), 2, 3),
    ((2, 32, 15, 17), (64, 32, 1, 1), 2, 0),
    ((1, 3, 2, 7), (4, 3, 1, 3), 3, (1, 0)),
]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("path", [1, 2, 3])
def test_forced_strided_input_grad_paths_match_reference(isa, path):
    if isa not in cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._conv_{isa}")
    rng = np.random.default_rng(10)
    old = mod.set_strided_input_grad_path(path)
    try:
        for xs, ws, s, p in STRIDED:
            s, p = _pair(s), _pair(p)
            x = rng.standard_normal(xs).astype(np.float32)
            w = rng.standard_normal(ws).astype(np.float32)
            g = rng.standard_normal(ref_conv2d(x, w, None, s, p).shape).astype(np.float32)
            want = ref_conv2d_backward(g, x, w, s, p)[0]
            got = []
            for nt in (1, 2):
                dx = np.full(x.shape, np.nan, np.float32)
                mod.conv2d_backward_input(g, w, dx, s[0], s[1], p[0], p[1], nt)
                np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
                got.append(dx)
            assert np.array_equal(got[0], got[1]), (xs, ws, s, p)
            # accumulate=True adds the same values onto what is there (this build's)
            base = rng.standard_normal(xs).astype(np.float32)
            acc = base.copy()
            mod.conv2d_backward_input(g, w, acc, s[0], s[1], p[0], p[1], 2, accumulate=True)
            np.testing.assert_array_equal(acc, base + got[0])
    finally:
        mod.set_strided_input_grad_path(old)


def test_fused_strided_input_grad_is_auto_on_avx512_and_sums_each_cell_alone():
    # The AVX-512 build takes the fused 3x3 stride-2 pass unforced (bench/conv_parts.py:
    # 0.68-0.85x the phases' time on ResNet-8's strided layers at batch 64, 0.8x the
    # GEMM's at 1-8). Each cell's sum is its own: a batch's images give the bits of
    # their own calls, and any thread count the same.
    if "avx512" not in cpu_supports():
        pytest.skip("CPU lacks avx512")
    mod = importlib.import_module("cdl._kernels._conv_avx512")
    rng = np.random.default_rng(13)
    for xs, ws in [((5, 16, 32, 32), (32, 16, 3, 3)), ((5, 32, 16, 16), (64, 32, 3, 3))]:
        g = rng.standard_normal((xs[0], ws[0], xs[2] // 2, xs[3] // 2)).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        runs = {}
        for path in (0, 3):
            old = mod.set_strided_input_grad_path(path)
            try:
                for nt in (1, 2, 3):
                    dx = np.empty(xs, np.float32)
                    mod.conv2d_backward_input(g, w, dx, 2, 2, 1, 1, nt)
                    runs[path, nt] = dx.tobytes()
                one = np.empty(xs, np.float32)
                for n in range(xs[0]):
                    mod.conv2d_backward_input(g[n:n + 1], w, one[n:n + 1], 2, 2, 1, 1, 2)
                runs[path, "alone"] = one.tobytes()
            finally:
                mod.set_strided_input_grad_path(old)
        assert len(set(runs.values())) == 1, xs
        old = mod.set_strided_input_grad_path(1)
        try:
            phases = np.empty(xs, np.float32)
            mod.conv2d_backward_input(g, w, phases, 2, 2, 1, 1, 2)
            gemm = np.empty(xs, np.float32)
            mod.set_strided_input_grad_path(2)
            mod.conv2d_backward_input(g, w, gemm, 2, 2, 1, 1, 2)
        finally:
            mod.set_strided_input_grad_path(old)
        # (the phases and the GEMM sum in other orders: auto took neither)
        assert phases.tobytes() != runs[0, 1] and gemm.tobytes() != runs[0, 1]


# Each runs in a child process whose address space is capped at what it uses + 400 MB,
# after a warm-up call on 2 threads has started the OpenMP workers (their stacks).
_LIMITED = """
import resource, sys
import numpy as np
import cdl.functional as F
from cdl._kernels import conv
F.conv2d(np.ones((1, 8, 64, 64), np.float32), np.ones((8, 8, 3, 3), np.float32), threads=2)
with open("/proc/self/statm") as f:
    vm = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (400 << 20), resource.RLIM_INFINITY))
"""

_BOUNDED_COLUMNS = _LIMITED + """
N, C, K, H, k = eval(sys.argv[1])
rng = np.random.default_rng(3)
OH = (H - k) // 2 + 1
go = rng.standard_normal((N, K, OH, OH), dtype=np.float32)
w = rng.standard_normal((K, C, k, k), dtype=np.float32)
dx = np.empty((N, C, H, H), np.float32)
conv.set_strided_input_grad_path(2)
conv.conv2d_backward_input(go, w, dx, 2, 2, 0, 0, 2)
np.save(sys.stdout.buffer, dx)
"""


def _in_limited_child(code, *args):
    import subprocess
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          timeout=300)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("shape", [(1, 1, 1, 1024, 32), (8, 64, 4, 256, 9)])
def test_strided_gemm_input_grad_columns_are_bounded(shape):
    # The GEMM path (forced) sized its columns (taps x positions x a group of channels)
    # without a bound: one 32x32 stride-2 kernel on 1024x1024 needs 1 GB for its one
    # channel (it goes to the phases now); 8 images of 64 channels of 9x9 took all 64
    # channels a group, 318 MB a thread (now smaller groups). Under 400 MB more address
    # space both run, with the bits of runs grouped otherwise.
    import io
    r = _in_limited_child(_BOUNDED_COLUMNS, repr(shape))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    got = np.load(io.BytesIO(r.stdout))
    N, C, K, H, k = shape
    rng = np.random.default_rng(3)
    OH = (H - k) // 2 + 1
    go = rng.standard_normal((N, K, OH, OH), dtype=np.float32)
    w = rng.standard_normal((K, C, k, k), dtype=np.float32)
    # one image a call: groups of 8 channels (N = 1) on the GEMM path; the phases for
    # the single channel too large for it
    old = kconv.set_strided_input_grad_path(1 if C == 1 else 2)
    try:
        want = np.empty((N, C, H, H), np.float32)
        for n in range(N):
            kconv.conv2d_backward_input(go[n:n + 1], w, want[n:n + 1], 2, 2, 0, 0, 2)
    finally:
        kconv.set_strided_input_grad_path(old)
    assert got.tobytes() == want.tobytes()
    # and the numbers themselves, on a corner the reference can afford
    x0 = np.zeros((1, C, k + 10, k + 10), np.float32)
    ref = ref_conv2d_backward(go[:1, :, :6, :6], x0, w, (2, 2), (0, 0))[0]
    np.testing.assert_allclose(got[:1, :, :10, :10], ref[:, :, :10, :10], rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())


def test_strided_input_grad_of_an_empty_grad_out_is_zero():
    # No output positions (P = 0: only the private kernel API reaches this; the public
    # one refuses an output size of 0): zeros on every path, as before the columns'
    # bound divided by P (SIGFPE).
    w = np.ones((1, 1, 3, 3), np.float32)
    for path in (0, 1, 2, 3):
        old = kconv.set_strided_input_grad_path(path)
        try:
            dx = np.full((1, 1, 2, 2), np.nan, np.float32)
            kconv.conv2d_backward_input(np.zeros((1, 1, 0, 0), np.float32), w, dx, 2, 2, 0, 0,
                                        1)
        finally:
            kconv.set_strided_input_grad_path(old)
        assert not dx.any(), path


_SCRATCH_REFUSED = _LIMITED + """
x = np.ones((1, 1, 5, 5), np.float32)
w = np.ones((1, 1, 3, 3), np.float32)
s = int(sys.argv[2])
oh = (5 + 2 * 10000 - 3) // s + 1
g = np.ones((1, 1, oh, oh), np.float32)
calls = {"forward": lambda: F.conv2d(x, w, stride=s, padding=10000),
         "input gradient": lambda: F.conv2d_backward(g, x, w, stride=s, padding=10000),
         "weight gradient": lambda: F.conv2d_backward(g, x, w, stride=s, padding=10000,
                                                      need_input_grad=False)}
try:
    calls[sys.argv[1]]()
except MemoryError as e:
    print(e)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")
@pytest.mark.parametrize("call, stride", [("forward", 20000), ("input gradient", 1000000),
                                          ("weight gradient", 20000)])
def test_scratch_memory_refused_names_the_call_and_shapes(call, stride):
    # Padding 10000 stages a 20005 x 20005 image (1.6 GB) where the windows reach both
    # ends: past the address space left, a MemoryError that says which kernel and on
    # what, not a bare MemoryError(); the stride as given (the input gradient clamps a
    # stride past the padded image to 20003 before it stages it).
    r = _in_limited_child(_SCRATCH_REFUSED, call, str(stride))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout.decode() == (f"conv2d {call}: could not allocate its scratch memory "
                                 f"(input (1, 1, 5, 5), weight (1, 1, 3, 3), stride ({stride}, "
                                 f"{stride}), padding (10000, 10000))\n")


@pytest.mark.parametrize("path", [0, 1, 2, 3])
def test_input_grad_accumulate_adds_to_what_is_there(path):
    # accumulate=True: dx = base + the input gradient, on every path (phases add in
    # their interleave pass; stride 1, the GEMM path and float64 go through a
    # scratch array). Cells no phase reaches keep base's bits, -0 included.
    rng = np.random.default_rng(12)
    old = kconv.set_strided_input_grad_path(path)
    try:
        for xs, ws, s, p in STRIDED + [((3, 4, 9, 9), (5, 4, 3, 3), 1, 1)]:
            s, p = _pair(s), _pair(p)
            for dt in (np.float32, np.float64):
                x = rng.standard_normal(xs).astype(dt)
                w = rng.standard_normal(ws).astype(dt)
                g = rng.standard_normal(ref_conv2d(x, w, None, s, p).shape).astype(dt)
                base = rng.standard_normal(xs).astype(dt)
                base[..., ::2] = -0.0
                plain = np.empty_like(base)
                kconv.conv2d_backward_input(g, w, plain, s[0], s[1], p[0], p[1], 2)
                want = ref_conv2d_backward(g, x, w, s, p)[0] + base
                got = []
                for nt in (1, 2):
                    dx = base.copy()
                    kconv.conv2d_backward_input(g, w, dx, s[0], s[1], p[0], p[1], nt,
                                                accumulate=True)
                    tol = 1e-4 if dt == np.float32 else 1e-10
                    np.testing.assert_allclose(dx, want, rtol=tol, atol=tol * np.abs(want).max())
                    np.testing.assert_array_equal(dx, base + plain)
                    got.append(dx)
                assert got[0].tobytes() == got[1].tobytes(), (xs, ws, s, p, dt)
                if ws[2:] == (1, 1) and p == (0, 0) and s[0] > 1 and dt == np.float32 \
                        and path != 2:
                    # the phases of a 1x1 strided kernel reach the cells (s*i, s*j) only
                    reached = np.zeros(xs, bool)
                    reached[:, :, ::s[0], ::s[1]] = True
                    assert got[0][~reached].tobytes() == base[~reached].tobytes()
    finally:
        kconv.set_strided_input_grad_path(old)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

X = np.zeros((2, 3, 8, 8), np.float32)
W = np.zeros((4, 3, 3, 3), np.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: F.conv2d(X[0], W), ValueError, "x must be 4-D"),
    (lambda: F.conv2d(X, W[0]), ValueError, "weight must be 4-D"),
    (lambda: F.conv2d(X, np.zeros((4, 2, 3, 3), np.float32)), ValueError, "3 channels.*expects 2"),
    (lambda: F.conv2d(X.astype(np.int32), W), TypeError, "x must be float32 or float64"),
    (lambda: F.conv2d(X, W.astype(np.float64)), TypeError, "weight has dtype float64"),
    (lambda: F.conv2d(X, W, np.zeros(5, np.float32)), ValueError, "bias has 5 entries"),
    (lambda: F.conv2d(X, W, stride=0), ValueError, "stride must be >= 1"),
    (lambda: F.conv2d(X, W, stride=(1, -2)), ValueError, "stride must be >= 1"),
    (lambda: F.conv2d(X, W, stride=1.5), TypeError, "stride must be an int"),
    (lambda: F.conv2d(X, W, padding=-1), ValueError, "padding must be >= 0"),
    (lambda: F.conv2d(X, np.zeros((4, 3, 11, 3), np.float32)), ValueError,
     r"kernel H=11 is larger than the padded input H=8\+2\*0=8"),
    (lambda: F.conv2d(X, np.zeros((4, 3, 3, 12), np.float32), padding=(0, 1)), ValueError,
     "kernel W=12 is larger than the padded input W=8"),
    (lambda: F.conv2d(X, W, out=np.zeros((2, 4, 8, 8), np.float32)), ValueError,
     "out must have shape 2x4x6x6, got 2x4x8x8"),
    (lambda: F.conv2d(X, W, out=np.zeros((2, 4, 6, 6), np.float64)), TypeError,
     "out must have dtype float32"),
    (lambda: F.conv2d(X, W, out=np.zeros((2, 4, 6, 12), np.float32)[..., ::2]), ValueError,
     "C-contiguous"),
    (lambda: F.conv2d_backward(np.zeros((2, 4, 7, 6), np.float32), X, W), ValueError,
     "grad_out must have shape 2x4x6x6"),
    (lambda: F.conv2d_backward(np.zeros((2, 4, 6, 6), np.float64), X, W), TypeError,
     "grad_out has dtype float64"),
    (lambda: F.conv2d_backward(np.zeros((2, 4, 6, 6), np.float32), X, W,
                               grad_weight=np.zeros((4, 3, 3, 2), np.float32)), ValueError,
     "grad_weight must have shape 4x3x3x3"),
    (lambda: F.conv2d_backward(np.zeros((2, 4, 6, 6), np.float32), X, W, stride=0), ValueError,
     "stride must be >= 1"),
    (lambda: F.conv2d(X, W, threads=0), ValueError, "conv2d: threads must be a positive int"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_nan_propagates():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    x[0, 1, 2, 3] = np.nan
    y = F.conv2d(x, w, None, 1, 0)
    # Exactly the outputs whose window covers the NaN are NaN.
    expect = np.zeros((4, 4), bool)
    expect[0:3, 1:4] = True
    for k in range(3):
        assert np.array_equal(np.isnan(y[0, k]), expect)
    g = np.ones_like(y)
    dx, dw, db = F.conv2d_backward(g, x, w, 1, 0)
    assert np.isnan(dw[:, 1]).all() and np.isfinite(dw[:, 0]).all()
    assert np.isfinite(dx).all() and np.isfinite(db).all()

# ---------------------------------------------------------------------------
# The Winograd path of float32 3x3 stride-1 convolutions, F(2x2, 3x3) and F(4x2, 3x3)
# (forward and both gradients): forced on (set_winograd_path(2), each tile height
# forced with set_winograd_tile) in every build this CPU runs, against the
# reference; its bits across thread counts and batch sizes; the auto mode's choice.
# ---------------------------------------------------------------------------

# (x shape, K, padding): planes smaller than a tile, odd sizes (part tiles at the
# right and bottom), more tiles than one vector, padding 0-2, channel counts that
# are not a multiple of the GEMM tile, a batch that splits blocks across images.
WINO_CASES = [
    ((2, 16, 32, 32), 16, 1),
    ((3, 5, 7, 9), 7, 1),
    ((1, 3, 1, 1), 2, 1),
    ((2, 8, 8, 8), 20, 0),
    ((2, 17, 10, 5), 13, 2),
    ((4, 33, 8, 8), 64, 1),
    ((1, 4, 2, 3), 5, 2),
    ((5, 9, 6, 11), 3, 0),
    ((7, 6, 3, 19), 9, 1),
    ((3, 2, 13, 4), 1, 2),
    ((130, 4, 8, 8), 4, 1),    # weight gradient: 9 blocks of tile rows in 8 chunks (2 rows)
    ((260, 4, 8, 8), 4, 1),    # ... 17 in 8 (2 rows), 13 in 8 (4 rows)
]


def _wino_modules():
    out = []
    for isa in ("baseline", "avx2", "avx512"):
        if isa in cpu_supports():
            out.append(importlib.import_module(f"cdl._kernels._conv_{isa}"))
    return out


class _Forced:
    """The Winograd path in `mode` (0 auto, 1 off, 2 forced) and, where given, its
    tile height (2 or 4 output rows; 0 auto)."""

    def __init__(self, mod, mode, tile=0):
        self.mod, self.mode, self.tile = mod, mode, tile

    def __enter__(self):
        self.old = self.mod.set_winograd_path(self.mode)
        self.old_tile = self.mod.set_winograd_tile(self.tile)
        return self.mod

    def __exit__(self, *exc):
        self.mod.set_winograd_path(self.old)
        self.mod.set_winograd_tile(self.old_tile)


WINO_TILES = (2, 4)


def _wino_case(xs, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal((k, xs[1], 3, 3)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    return x, w, b


def _wino_forward(mod, x, w, b, p, nt, relu=False):
    oh, ow = x.shape[2] + 2 * p - 2, x.shape[3] + 2 * p - 2
    y = np.full((x.shape[0], w.shape[0], oh, ow), np.nan, np.float32)
    mod.conv2d_forward(x, w, b, y, 1, 1, p, p, nt, relu=relu)
    return y


def _wino_input_grad(mod, g, w, x_shape, p, nt):
    dx = np.full(x_shape, np.nan, np.float32)
    mod.conv2d_backward_input(g, w, dx, 1, 1, p, p, nt)
    return dx


@pytest.mark.parametrize("mod", _wino_modules(), ids=lambda m: m.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("tile", WINO_TILES, ids=lambda t: f"rows{t}")
@pytest.mark.parametrize("case", WINO_CASES, ids=lambda c: f"{c[0]}-K{c[1]}-p{c[2]}")
def test_forced_winograd_matches_reference(mod, tile, case):
    xs, k, p = case
    x, w, b = _wino_case(xs, k, 3)
    y_ref = ref_conv2d(x, w, b, 1, p)
    g = np.random.default_rng(4).standard_normal(y_ref.shape).astype(np.float32)
    dx_ref = ref_conv2d_backward(g, x, w, 1, p)[0]
    with _Forced(mod, 2, 6 - tile):
        other_tile = _wino_forward(mod, x, w, b, p, 2), _wino_input_grad(mod, g, w, xs, p, 2)
        dw_other = np.empty_like(w)
        mod.conv2d_backward_weight(g, x, dw_other, None, 1, 1, p, p, 2)
    with _Forced(mod, 2, tile):
        ys = [_wino_forward(mod, x, w, b, p, nt) for nt in (1, 2)]
        yr = _wino_forward(mod, x, w, b, p, 2, relu=True)
        y0 = _wino_forward(mod, x, w, None, p, 2)
        dxs = [_wino_input_grad(mod, g, w, xs, p, nt) for nt in (1, 2)]
        dws = []
        for nt in (1, 2):
            dw = np.full(w.shape, np.nan, np.float32)
            db = np.full(b.shape, np.nan, np.float32)
            mod.conv2d_backward_weight(g, x, dw, db, 1, 1, p, p, nt)
            dws.append((dw, db))
    with _Forced(mod, 1):
        y_direct = _wino_forward(mod, x, w, b, p, 2)
    scale = np.abs(y_ref).max()
    np.testing.assert_allclose(ys[0], y_ref, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(y0 + b[:, None, None], y_ref, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(dxs[0], dx_ref, rtol=1e-4, atol=1e-5 * np.abs(dx_ref).max())
    _, dw_ref, db_ref = ref_conv2d_backward(g, x, w, 1, p)
    np.testing.assert_allclose(dws[0][0], dw_ref, rtol=1e-4, atol=1e-5 * np.abs(dw_ref).max())
    np.testing.assert_allclose(dws[0][1], db_ref, rtol=1e-4, atol=1e-5 * np.abs(db_ref).max())
    assert np.array_equal(ys[0], ys[1]) and np.array_equal(dxs[0], dxs[1])
    assert np.array_equal(dws[0][0], dws[1][0]) and np.array_equal(dws[0][1], dws[1][1])
    # ReLU in the epilogue is ReLU's rule on the stored value, bit for bit.
    want = np.where(ys[0] <= 0, np.float32(0), ys[0])
    assert want.tobytes() == yr.tobytes()
    # The path really ran: its sums round differently from the direct ones, and
    # the two tile heights' from each other.
    if xs[1] * 9 >= 16 and y_ref.size >= 64:
        assert not np.array_equal(ys[0], y_direct)
        assert not np.array_equal(ys[0], other_tile[0])
        assert not np.array_equal(dxs[0], other_tile[1])
        assert not np.array_equal(dws[0][0], dw_other)


@pytest.mark.parametrize("mod", _wino_modules(), ids=lambda m: m.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("tile", WINO_TILES, ids=lambda t: f"rows{t}")
def test_winograd_bits_do_not_depend_on_batch(mod, tile):
    # Blocks of tile rows run across images; an image's outputs must not depend
    # on which block, lane or batch it landed in.
    # A small batch splits by output channels instead, each thread transforming the
    # filters of its slice (forward and input gradient alike): the same bits.
    # 12 rows: whole tiles; 10: the last tile row of each image part-filled.
    for rows in (12, 10):
        x, w, b = _wino_case((11, 16, rows, 14), 24, 5)
        g = np.random.default_rng(6).standard_normal((11, 24, rows, 14)).astype(np.float32)
        with _Forced(mod, 2, tile):
            y = _wino_forward(mod, x, w, b, 1, 2)
            dx = _wino_input_grad(mod, g, w, x.shape, 1, 2)
            for i in (0, 4, 10):
                for nt in (1, 2, 3, 4):
                    assert np.array_equal(_wino_forward(mod, x[i:i + 1], w, b, 1, nt),
                                          y[i:i + 1])
                    assert np.array_equal(_wino_input_grad(mod, g[i:i + 1], w,
                                                           (1,) + x.shape[1:], 1, nt),
                                          dx[i:i + 1])
            assert np.array_equal(_wino_forward(mod, x[3:9], w, b, 1, 2), y[3:9])
            assert np.array_equal(_wino_input_grad(mod, g[3:9], w, (6,) + x.shape[1:], 1, 2),
                                  dx[3:9])


@pytest.mark.parametrize("mod", _wino_modules(), ids=lambda m: m.__name__.rsplit("_", 1)[-1])
@pytest.mark.parametrize("tile", WINO_TILES, ids=lambda t: f"rows{t}")
def test_winograd_work_splits_give_the_same_bits(mod, tile):
    # By blocks of tile rows or by output-channel slices (each thread transforming
    # its slice's filters): speed only, for any batch and thread count.
    rng = np.random.default_rng(8)
    for n, c, k, h in ((1, 16, 40, 9), (3, 24, 16, 12), (6, 16, 64, 8)):
        x, w, b = _wino_case((n, c, h, h), k, n)
        g = rng.standard_normal((n, k, h, h)).astype(np.float32)
        got = {}
        with _Forced(mod, 2, tile):
            for split in (0, 1, 2):
                old = mod.set_winograd_split(split)
                try:
                    for nt in (1, 2, 3, 4):
                        got[split, nt] = (_wino_forward(mod, x, w, b, 1, nt),
                                          _wino_input_grad(mod, g, w, x.shape, 1, nt))
                finally:
                    mod.set_winograd_split(old)
        y0, dx0 = got[1, 1]
        assert not np.isnan(y0).any() and not np.isnan(dx0).any()
        for key, (y, dx) in got.items():
            assert y.tobytes() == y0.tobytes() and dx.tobytes() == dx0.tobytes(), (n, key)


def _wino_wgrad_modes(mod, g, x, w):
    """The weight gradient in modes 0 (auto), 1 (off) and 2 (forced)."""
    got = {}
    for mode in (0, 1, 2):
        with _Forced(mod, mode):
            dw = np.empty_like(w)
            mod.conv2d_backward_weight(g, x, dw, None, 1, 1, 1, 1, 2)
            got[mode] = dw
    assert not np.array_equal(got[1], got[2])
    return got


@pytest.mark.parametrize("mod", _wino_modules(), ids=lambda m: m.__name__.rsplit("_", 1)[1])
def test_auto_mode_takes_winograd_where_the_build_measured_it(mod):
    # Measured on the AVX2 build (Zen 2) and the AVX-512 build (Sapphire Rapids);
    # the baseline build keeps the direct sums.
    isa = mod.__name__.rsplit("_", 1)[1]
    measured = isa in ("avx2", "avx512")
    x, w, b = _wino_case((4, 16, 16, 16), 32, 6)
    with _Forced(mod, 2):
        forced = _wino_forward(mod, x, w, b, 1, 2)
    with _Forced(mod, 1):
        direct = _wino_forward(mod, x, w, b, 1, 2)
    auto = _wino_forward(mod, x, w, b, 1, 2)
    assert np.array_equal(auto, forced if measured else direct)
    # The forward and the input gradient at any batch size; the weight gradient from
    # 512 tiles on (8 images of 8 x 8 tiles here).
    one = _wino_forward(mod, x[:1], w, b, 1, 2)
    assert np.array_equal(one, auto[:1])
    rng = np.random.default_rng(7)
    g = rng.standard_normal(auto.shape).astype(np.float32)
    for n, wino in ((8, True), (7, False), (1, False)):
        gn, xn = np.tile(g, (2, 1, 1, 1))[:n], np.tile(x, (2, 1, 1, 1))[:n]
        got = _wino_wgrad_modes(mod, gn, xn, w)
        assert np.array_equal(got[0], got[2 if wino and measured else 1]), n
        dx = {}
        for mode in (0, 1, 2):
            with _Forced(mod, mode):
                dx[mode] = _wino_input_grad(mod, gn, w, xn.shape, 1, 2)
        assert not np.array_equal(dx[1], dx[2])
        assert np.array_equal(dx[0], dx[2 if measured else 1]), n
    # ... and where a tile row fills a vector: 8 x 8 planes (4 tiles a row) take it
    # on AVX2 (8 floats a vector) but not on AVX-512 (16), 512 tiles either way.
    x8 = rng.standard_normal((32, 16, 8, 8)).astype(np.float32)
    g8 = rng.standard_normal((32, 32, 8, 8)).astype(np.float32)
    got = _wino_wgrad_modes(mod, g8, x8, w)
    assert np.array_equal(got[0], got[2 if isa == "avx2" else 1])
    # Tiles of 4 output rows on the AVX-512 build from 12 output rows on (the planes
    # above have 16, x11's 11), in the forward and both gradients; 2 rows elsewhere.
    tall = isa == "avx512"
    x11 = np.ascontiguousarray(x[:, :, :11, :11])
    g11 = np.ascontiguousarray(g[:, :, :11, :11])
    xw, gw = np.tile(x, (2, 1, 1, 1)), np.tile(g, (2, 1, 1, 1))   # 512 2x2 tiles

    def parts():
        dw, dw11 = np.empty_like(w), np.empty_like(w)
        mod.conv2d_backward_weight(gw, xw, dw, None, 1, 1, 1, 1, 2)
        mod.conv2d_backward_weight(g11, x11, dw11, None, 1, 1, 1, 1, 2)
        return (_wino_forward(mod, x, w, b, 1, 2), _wino_input_grad(mod, g, w, x.shape, 1, 2), dw,
                _wino_forward(mod, x11, w, b, 1, 2), _wino_input_grad(mod, g11, w, x11.shape, 1, 2),
                dw11)
    rows = {}
    for tile in WINO_TILES:
        with _Forced(mod, 2, tile):
            rows[tile] = parts()
    for a, b2 in zip(rows[2], rows[4]):
        assert not np.array_equal(a, b2)
    with _Forced(mod, 2):
        auto = parts()
    for i, a in enumerate(auto):
        assert np.array_equal(a, rows[4 if tall and i < 3 else 2][i]), i
    # the boundary: exactly 12 output rows take 4-row tiles
    x12 = np.ascontiguousarray(x[:, :, :12, :12])
    by_tile = {}
    for tile in (0,) + WINO_TILES:
        with _Forced(mod, 2, tile):
            by_tile[tile] = _wino_forward(mod, x12, w, b, 1, 2)
    assert np.array_equal(by_tile[0], by_tile[4 if tall else 2])
    assert not np.array_equal(by_tile[2], by_tile[4])
    with pytest.raises(ValueError, match="rows must be 0, 2 or 4"):
        mod.set_winograd_tile(3)
    # Too few channels: the direct path, whatever the build.
    x3, w3, b3 = _wino_case((4, 3, 16, 16), 16, 6)
    with _Forced(mod, 1):
        direct3 = _wino_forward(mod, x3, w3, b3, 1, 2)
    assert np.array_equal(_wino_forward(mod, x3, w3, b3, 1, 2), direct3)


def test_forced_float32_paths_turn_winograd_off():
    x, w, b = _wino_case((2, 16, 8, 8), 16, 7)
    with _Forced(kconv, 2):
        old = kconv.set_float32_path(1)
        try:
            column = _wino_forward(kconv, x, w, b, 1, 1)
        finally:
            kconv.set_float32_path(old)
    with _Forced(kconv, 1):
        old = kconv.set_float32_path(1)
        try:
            assert np.array_equal(_wino_forward(kconv, x, w, b, 1, 1), column)
        finally:
            kconv.set_float32_path(old)


@pytest.mark.parametrize("mod", _wino_modules(), ids=lambda m: m.__name__.rsplit("_", 1)[1])
@pytest.mark.parametrize("tile", WINO_TILES, ids=lambda t: f"rows{t}")
def test_winograd_input_grad_accumulates(mod, tile):
    # The epilogue adds to what dx holds (whole vectors and the part vectors at the
    # right edge): the bits of base + the plain input gradient, at any thread count.
    x, w, _ = _wino_case((3, 16, 10, 9), 16, 8)
    g = np.random.default_rng(9).standard_normal((3, 16, 10, 9)).astype(np.float32)
    base = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    base[..., ::3] = -0.0
    with _Forced(mod, 2, tile):
        plain = _wino_input_grad(mod, g, w, x.shape, 1, 2)
        for nt in (1, 2):
            acc = base.copy()
            mod.conv2d_backward_input(g, w, acc, 1, 1, 1, 1, nt, accumulate=True)
            assert np.array_equal(acc, base + plain)
            assert not np.array_equal(acc, plain)


@pytest.mark.parametrize("tile", WINO_TILES, ids=lambda t: f"rows{t}")
def test_winograd_nan_reaches_its_windows_and_stays_in_its_tiles(tile):
    # Exactly the direct path's NaNs are not kept: a NaN enters every cell of
    # the (tile + 2) x 4 input patches that hold it, so it reaches the whole
    # tile x 2 output tiles of those patches (a superset of the windows that
    # cover it), and no tile whose patch misses it.
    x, w, _ = _wino_case((1, 16, 12, 12), 16, 11)
    x[0, 3, 5, 6] = np.nan
    with _Forced(kconv, 2, tile):
        y = _wino_forward(kconv, x, w, None, 0, 2)
    covers = np.zeros((10, 10), bool)
    covers[3:6, 4:7] = True                      # windows holding input (5, 6)
    tiles = np.zeros((10, 10), bool)
    for ty in range(-(-10 // tile)):
        for tx in range(5):
            if tile * ty <= 5 < tile * ty + tile + 2 and 2 * tx <= 6 < 2 * tx + 4:
                tiles[tile * ty:tile * ty + tile, 2 * tx:2 * tx + 2] = True
    assert not tiles.all()
    nan = np.isnan(y[0])
    assert nan[:, covers].all()
    assert not nan[:, ~tiles].any()


def test_a_stride_past_the_input_changes_nothing_and_allocates_nothing():
    # one output along an axis whatever the stride: the strided input gradient sized its
    # phase table by s_h * s_w (a stride near 2**31 overflowed the malloc: a segfault;
    # 10**4 took 821 MB), and the max-pool backward looped over every stride column
    import subprocess
    import sys
    from cdl import functional as F
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    for stride in ((2147352580, 1073807362), (10000, 3), (2, 2**31 - 1)):
        for pad in (0, 1):
            y = F.conv2d(x, w, stride=stride, padding=pad)
            g = rng.standard_normal(y.shape).astype(np.float32)
            got = F.conv2d_backward(g, x, w, stride=stride, padding=pad)
            # the NumPy twin (its windows are views: any stride costs it nothing)
            want = ref_conv2d_backward(g, x, w, stride, pad)
            for a, b in zip(got, want):
                if a is not None:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(y, ref_conv2d(x, w, None, stride, pad), rtol=1e-5,
                                       atol=1e-5)
    code = ("import numpy as np; from cdl import functional as F\n"
            "x = np.random.default_rng(0).standard_normal((8, 16, 4, 4)).astype(np.float32)\n"
            "y, i = F.max_pool2d(x, 2, stride=2**31 - 1)\n"
            "dx = F.max_pool2d_backward(np.ones_like(y), i, x.shape, 2, stride=2**31 - 1)\n"
            "assert (dx != 0).sum() == y.size\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)   # it ran for hours
