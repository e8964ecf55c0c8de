"""Max-pool kernels against a plain NumPy twin, gradient checks, threads, ISAs, bad input."""
import importlib

import numpy as np
import pytest

import cdl.functional as F
from cdl._kernels import _runtime


# ------------------------------------------------------------ NumPy reference

def ref_pool(x, kh, kw, sh, sw, ph, pw):
    """Loop over windows; padded cells are skipped, ties keep the first, NaN wins."""
    n, c, h, w = x.shape
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    idx = np.empty((n, c, oh, ow), np.int32)
    for i in range(oh):
        for j in range(ow):
            best = np.full((n, c), -np.inf, x.dtype)
            arg = np.full((n, c), -1, np.int64)
            for r in range(kh):
                for s in range(kw):
                    hh, ww = i * sh - ph + r, j * sw - pw + s
                    if not (0 <= hh < h and 0 <= ww < w):
                        continue
                    v = x[:, :, hh, ww]
                    take = (v > best) | np.isnan(v) | (arg < 0)
                    best = np.where(take, v, best)
                    arg = np.where(take, hh * w + ww, arg)
            y[:, :, i, j] = best
            idx[:, :, i, j] = arg
    return y, idx


def ref_pool_backward(g, idx, shape):
    n, c, h, w = shape
    dx = np.zeros((n, c, h * w), g.dtype)
    for a in range(n):
        for b in range(c):
            np.add.at(dx[a, b], idx[a, b].ravel(), g[a, b].ravel())
    return dx.reshape(shape)


def random_case(rng):
    kh, kw = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    ph, pw = int(rng.integers(0, kh // 2 + 1)), int(rng.integers(0, kw // 2 + 1))
    h = int(rng.integers(max(1, kh - 2 * ph), 12))
    w = int(rng.integers(max(1, kw - 2 * pw), 12))
    n, c = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    return (n, c, h, w), (kh, kw), (sh, sw), (ph, pw)


CASES = [random_case(np.random.default_rng(seed)) for seed in range(60)] + [
    ((1, 1, 4, 4), (2, 2), (2, 2), (0, 0)),     # 2x2 fast path
    ((2, 3, 7, 5), (2, 2), (2, 2), (0, 0)),     # fast path, odd H and W
    ((1, 2, 9, 6), (3, 2), (3, 4), (1, 1)),     # stride > kernel (gaps), padding
    ((3, 1, 5, 8), (3, 3), (1, 1), (1, 1)),     # overlapping
    ((1, 1, 1, 1), (1, 1), (1, 1), (0, 0)),
    ((1, 1, 6, 3), (4, 1), (1, 3), (2, 0)),
    # wide rows: the vectorised interior sweep runs full vectors plus a tail
    ((2, 3, 9, 45), (3, 3), (1, 1), (1, 1)),
    ((1, 2, 11, 70), (3, 3), (2, 2), (1, 1)),
    ((2, 2, 8, 53), (2, 4), (3, 3), (1, 2)),
    ((1, 1, 5, 64), (1, 5), (1, 4), (0, 2)),
    ((1, 2, 6, 41), (2, 2), (2, 2), (0, 0)),
    # 2x2 on small planes (packed path) and on tall planes with short rows
    ((2, 2, 29, 31), (2, 2), (2, 2), (0, 0)),
    ((1, 1, 301, 21), (2, 2), (2, 2), (0, 0)),
    # 2x2 in vectors of 16 outputs: two whole vectors, one whole and an odd column
    ((1, 2, 10, 64), (2, 2), (2, 2), (0, 0)),
    ((2, 1, 7, 33), (2, 2), (2, 2), (0, 0)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,s,p", CASES)
def test_forward_backward_match_numpy(shape, k, s, p, dtype):
    rng = np.random.default_rng(abs(hash((shape, k, s, p))) % 2**32)
    x = rng.standard_normal(shape).astype(dtype)
    y, idx = F.max_pool2d(x, k, s, p)
    y_ref, idx_ref = ref_pool(x, *k, *s, *p)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(y, y_ref)
    g = rng.standard_normal(y.shape).astype(dtype)
    # Poison the buffer: every cell must be written by the kernel.
    dx = np.full(shape, np.nan, dtype)
    F.max_pool2d_backward(g, idx, shape, k, s, p, grad_input=dx)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(dx, ref_pool_backward(g, idx_ref, shape), rtol=tol, atol=tol)


def test_default_stride_is_kernel():
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 9))
    y1, i1 = F.max_pool2d(x, (2, 3))
    y2, i2 = F.max_pool2d(x, (2, 3), (2, 3), 0)
    assert y1.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(i1, i2)


@pytest.mark.parametrize("shape,k,s,p", [
    ((2, 2, 6, 6), (2, 2), (2, 2), (0, 0)),
    ((2, 2, 7, 5), (3, 2), (2, 1), (1, 1)),
    ((1, 3, 8, 9), (2, 3), (3, 4), (1, 0)),
])
def test_gradient_central_difference(shape, k, s, p):
    rng = np.random.default_rng(7)
    # Distinct, well separated values: no ties, so the max is differentiable.
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64) * 0.1
    y, idx = F.max_pool2d(x, k, s, p)
    g = rng.standard_normal(y.shape)
    dx = F.max_pool2d_backward(g, idx, shape, k, s, p)
    eps = 1e-6
    num = np.empty_like(x)
    flat = x.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        lp = np.sum(F.max_pool2d(x, k, s, p)[0] * g)
        flat[i] = old - eps
        lm = np.sum(F.max_pool2d(x, k, s, p)[0] * g)
        flat[i] = old
        num.reshape(-1)[i] = (lp - lm) / (2 * eps)
    err = np.abs(dx - num).max() / max(np.abs(num).max(), 1e-12)
    assert err < 1e-6


def test_ties_go_to_first_in_row_major_order():
    x = np.zeros((1, 1, 4, 4), np.float32)
    y, idx = F.max_pool2d(x, 2)
    np.testing.assert_array_equal(idx[0, 0], [[0, 2], [8, 10]])
    x = np.array([[[[1, 3], [3, 3]]]], np.float64)
    y, idx = F.max_pool2d(x, 2)
    assert idx[0, 0, 0, 0] == 1 and y[0, 0, 0, 0] == 3
    # Overlapping general path: window at (0, 1) sees columns 1..3.
    x = np.array([[[[5, 2, 7, 7], [1, 7, 0, 7]]]], np.float32)
    y, idx = F.max_pool2d(x, (2, 3), 1)
    np.testing.assert_array_equal(idx[0, 0, 0], [2, 2])


def test_padded_cells_never_win():
    # All inputs negative: a zero-padded window would pick the padding.
    x = -1.0 - np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    y, idx = F.max_pool2d(x, 3, 2, 1)
    y_ref, idx_ref = ref_pool(x, 3, 3, 2, 2, 1, 1)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    assert (y < 0).all() and (idx >= 0).all() and (idx < 16).all()
    x = np.full((1, 1, 3, 3), -np.inf)
    y, idx = F.max_pool2d(x, 2, 1, 1)
    assert np.isneginf(y).all()
    assert (idx >= 0).all() and (idx < 9).all()


@pytest.mark.parametrize("k,s,p", [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)),
                                   ((2, 2), (3, 3), (1, 1))])
def test_nan_propagates(k, s, p):
    x = np.random.default_rng(2).standard_normal((1, 2, 6, 6))
    x[0, 1, 2, 3] = np.nan
    y, idx = F.max_pool2d(x, k, s, p)
    y_ref, idx_ref = ref_pool(x, *k, *s, *p)
    np.testing.assert_array_equal(y, y_ref)       # assert_array_equal treats NaN == NaN
    np.testing.assert_array_equal(idx, idx_ref)
    assert np.isnan(y[0, 1]).any() and not np.isnan(y[0, 0]).any()
    assert (idx[0, 1][np.isnan(y[0, 1])] == 2 * 6 + 3).all()


@pytest.mark.parametrize("k,s,p", [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)),
                                   ((3, 2), (3, 4), (1, 1))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_bitwise(k, s, p, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 16, 20, 18)).astype(dtype)    # above the parallel threshold
    y1, i1 = F.max_pool2d(x, k, s, p, threads=1)
    y2, i2 = F.max_pool2d(x, k, s, p, threads=2)
    assert y1.tobytes() == y2.tobytes() and i1.tobytes() == i2.tobytes()
    g = rng.standard_normal(y1.shape).astype(dtype)
    d1 = F.max_pool2d_backward(g, i1, x.shape, k, s, p, threads=1)
    d2 = F.max_pool2d_backward(g, i1, x.shape, k, s, p, threads=2)
    assert d1.tobytes() == d2.tobytes()


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_build_agrees(isa):
    if isa not in _runtime.cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._pool_{isa}")
    rng = np.random.default_rng(4)
    for shape, k, s, p in CASES[:20] + CASES[-6:]:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(shape).astype(dtype)
            y_ref, idx_ref = ref_pool(x, *k, *s, *p)
            y = np.empty_like(y_ref)
            idx = np.empty_like(idx_ref)
            mod.max_pool2d_forward(x, y, idx, *k, *s, *p, 1)
            np.testing.assert_array_equal(y, y_ref)
            np.testing.assert_array_equal(idx, idx_ref)
            g = rng.standard_normal(y.shape).astype(dtype)
            dx = np.full(shape, np.nan, dtype)
            assert mod.max_pool2d_backward(g, idx, dx, *k, *s, *p, 1) == 0
            np.testing.assert_allclose(dx, ref_pool_backward(g, idx_ref, shape), rtol=1e-6)


def test_out_buffers_reused_and_noncontiguous_input_copied():
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 8)).astype(np.float32)
    xt = np.asfortranarray(x)
    y = np.empty((2, 3, 4, 4), np.float32)
    idx = np.empty((2, 3, 4, 4), np.int32)
    y2, idx2 = F.max_pool2d(xt, 2, out=y, indices=idx)
    assert y2 is y and idx2 is idx
    np.testing.assert_array_equal(y, ref_pool(x, 2, 2, 2, 2, 0, 0)[0])
    dx = np.empty_like(x)
    assert F.max_pool2d_backward(np.asfortranarray(y), idx, x.shape, 2, grad_input=dx) is dx


def test_bad_input():
    x = np.zeros((1, 2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="x must be 4-D, got 3-D"):
        F.max_pool2d(x[0], 2)
    with pytest.raises(TypeError, match="x must be float32 or float64, got dtype int64"):
        F.max_pool2d(np.zeros((1, 1, 4, 4), np.int64), 2)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        F.max_pool2d(x, 2, 0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        F.max_pool2d(x, 2, -1)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        F.max_pool2d(x, 2, 2, -1)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        F.max_pool2d(x, 0)
    with pytest.raises(ValueError, match="at most half the kernel"):
        F.max_pool2d(x, 2, 2, 2)
    with pytest.raises(ValueError, match=r"kernel W=5 is larger than the padded input W=4"):
        F.max_pool2d(x, (1, 5))
    with pytest.raises(TypeError, match="kernel_size must be an int or a pair"):
        F.max_pool2d(x, 2.5)
    with pytest.raises(ValueError, match="out must have shape 1x2x2x2, got 1x2x4x4"):
        F.max_pool2d(x, 2, out=np.empty_like(x))
    with pytest.raises(TypeError, match="indices must have dtype int32"):
        F.max_pool2d(x, 2, indices=np.empty((1, 2, 2, 2), np.int64))
    y, idx = F.max_pool2d(x, 2)
    with pytest.raises(ValueError, match="grad_out must have shape 1x2x2x2 for input 1x2x4x4, got 1x2x2x3"):
        F.max_pool2d_backward(np.zeros((1, 2, 2, 3), np.float32), idx, x.shape, 2)
    with pytest.raises(TypeError, match="indices must have dtype int32"):
        F.max_pool2d_backward(y, idx.astype(np.int64), x.shape, 2)
    with pytest.raises(ValueError, match="indices has shape 1x2x2x1"):
        F.max_pool2d_backward(y, idx[..., :1], x.shape, 2)
    with pytest.raises(ValueError, match="input_shape must be 4"):
        F.max_pool2d_backward(y, idx, (2, 4, 4), 2)
    with pytest.raises(ValueError, match="grad_input must have shape 1x2x4x4"):
        F.max_pool2d_backward(y, idx, x.shape, 2, grad_input=np.empty((1, 2, 4, 5), np.float32))


@pytest.mark.parametrize("k,s,p", [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)),
                                   ((2, 2), (3, 3), (1, 1))])
def test_foreign_indices_refused(k, s, p):
    x = np.random.default_rng(6).standard_normal((1, 2, 6, 6))
    y, idx = F.max_pool2d(x, k, s, p)
    for bad in (-1, 36, 10**6):
        wrong = idx.copy()
        wrong[0, 1, 0, 0] = bad
        with pytest.raises(ValueError, match="1 of .* indices do not point into their own"):
            F.max_pool2d_backward(np.ones_like(y), wrong, x.shape, k, s, p)
    wrong = idx.copy()
    wrong[0, 0, -1, -1] = idx[0, 0, 0, 0]          # a real cell, but in another window
    with pytest.raises(ValueError, match="do not point into their own"):
        F.max_pool2d_backward(np.ones_like(y), wrong, x.shape, k, s, p)


def test_matches_torch_if_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    for shape, k, s, p in CASES[:20]:
        x = rng.standard_normal(shape)
        y, idx = F.max_pool2d(x, k, s, p)
        ty, ti = torch.nn.functional.max_pool2d(torch.from_numpy(x), k, s, p, return_indices=True)
        np.testing.assert_array_equal(y, ty.numpy())
        np.testing.assert_array_equal(idx, ti.numpy())


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_relu_pool_2x2_agrees_with_the_baseline_build(isa):
    """The 2x2 kernels of a vector build (AVX-512 and AVX2 have their own in
    registers) against the portable build's,
    bit for bit, with NaN, signed zeros, ties and all-negative windows."""
    supported = _runtime.cpu_supports()
    if isa not in supported:
        pytest.skip(f"CPU lacks {isa}")
    fast, base = (importlib.import_module(f"cdl._kernels._pool_{i}") for i in (isa, "baseline"))
    rng = np.random.default_rng(9)
    # rows of at most 8 outputs and rows with a short last step (AVX2 writes whole
    # vectors into the next row, or several rows on tiny planes), odd widths
    for shape in [(2, 3, 28, 28), (1, 2, 10, 64), (2, 1, 7, 33), (1, 1, 2, 2), (1, 1, 5, 3),
                  (2, 3, 10, 11), (1, 2, 12, 10), (1, 2, 9, 17), (2, 2, 6, 22), (1, 3, 4, 36),
                  (2, 2, 8, 4), (1, 2, 6, 2), (2, 1, 5, 37)]:
        x = rng.standard_normal(shape).astype(np.float32)
        x.flat[::5] = 0.0
        x.flat[::7] = -0.0
        x.flat[::13] = np.nan
        x.flat[1::9] = x.flat[0]                     # ties
        x[:, :, :2, :2] = -1.0                       # an all-negative window
        oshape = shape[:2] + (shape[2] // 2, shape[3] // 2)
        g = rng.standard_normal(oshape).astype(np.float32)
        results = []
        for mod in (fast, base):
            y, idx = np.empty(oshape, np.float32), np.empty(oshape, np.int32)
            yr, ir = np.empty(oshape, np.float32), np.empty(oshape, np.int32)
            mod.max_pool2d_forward(x, y, idx, 2, 2, 2, 2, 0, 0, 1)
            mod.max_pool2d_relu_forward(x, yr, ir, 1)
            dx, dxr = np.full_like(x, 7.0), np.full_like(x, 7.0)
            bad = mod.max_pool2d_backward(g, idx, dx, 2, 2, 2, 2, 0, 0, 1)
            bad_r = mod.max_pool2d_relu_backward(g, yr, ir, dxr, 1)
            results.append([a.tobytes() for a in (y, idx, yr, ir, dx, dxr)] + [bad, bad_r])
        assert results[0] == results[1], shape
