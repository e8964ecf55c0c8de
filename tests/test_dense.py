"""Dense kernels against a plain NumPy twin, numerical gradients, threads, bad input."""
import numpy as np
import pytest

import cdl
from cdl import functional as F

RNG = np.random.default_rng(0)
# (1, 784, 256), (3, 300, 200) and (8, 128, 513) take the small-batch row chunks.
SHAPES = [(1, 1, 1), (1, 784, 256), (3, 5, 7), (33, 17, 129), (64, 784, 256), (64, 4096, 10),
          (65, 130, 257), (2, 300, 1), (97, 1, 5), (3, 300, 200), (8, 128, 513), (9, 784, 256)]


def ref_linear(x, w, b):
    return x @ w.T + (0 if b is None else b)


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,fin,fout", SHAPES)
def test_linear_forward_matches_numpy(n, fin, fout, dtype):
    x = RNG.standard_normal((n, fin)).astype(dtype)
    w = RNG.standard_normal((fout, fin)).astype(dtype)
    b = RNG.standard_normal(fout).astype(dtype)
    np.testing.assert_allclose(F.linear(x, w, b), ref_linear(x, w, b), **tol(dtype))
    np.testing.assert_allclose(F.linear(x, w), ref_linear(x, w, None), **tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,fin,fout", SHAPES)
def test_linear_backward_matches_numpy(n, fin, fout, dtype):
    x = RNG.standard_normal((n, fin)).astype(dtype)
    w = RNG.standard_normal((fout, fin)).astype(dtype)
    g = RNG.standard_normal((n, fout)).astype(dtype)
    dx, dw, db = F.linear_backward(g, x, w, l2=0.25)
    np.testing.assert_allclose(dx, g @ w, **tol(dtype))
    np.testing.assert_allclose(dw, g.T @ x + 0.5 * w, **tol(dtype))
    np.testing.assert_allclose(db, g.sum(0), **tol(dtype))
    dx, dw, db = F.linear_backward(g, x, w, need_input_grad=False, need_bias_grad=False)
    assert dx is None and db is None
    np.testing.assert_allclose(dw, g.T @ x, **tol(dtype))


def test_linear_gradients_numerically():
    """Central differences of L = sum(G * f(x; W)) in float64."""
    x = RNG.standard_normal((5, 7))
    w = RNG.standard_normal((4, 7))
    b = RNG.standard_normal(4)
    g = RNG.standard_normal((5, 4))
    lam = 0.3
    dx, dw, db = F.linear_backward(g, x, w, l2=lam)

    def loss(x_, w_, b_):
        return float(np.sum(g * F.linear(x_, w_, b_)) + lam * np.sum(w_ ** 2))

    h = 1e-6
    for arr, grad in ((x, dx), (w, dw), (b, db)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + h
            up = loss(x, w, b)
            arr[idx] = old - h
            down = loss(x, w, b)
            arr[idx] = old
            num[idx] = (up - down) / (2 * h)
        err = np.abs(num - grad).max() / max(1e-8, np.abs(num).max())
        assert err < 1e-6, err


@pytest.mark.parametrize("n,fin,fout", [(64, 784, 256), (256, 1024, 1024), (64, 4096, 10),
                                        (1, 784, 256), (3, 300, 200), (8, 128, 513)])
def test_linear_bitwise_identical_for_any_thread_count(n, fin, fout):
    x = RNG.standard_normal((n, fin)).astype(np.float32)
    w = RNG.standard_normal((fout, fin)).astype(np.float32)
    b = RNG.standard_normal(fout).astype(np.float32)
    g = RNG.standard_normal((n, fout)).astype(np.float32)
    results = []
    for t in (1, 2, 3):
        y = F.linear(x, w, b, threads=t)
        results.append((y,) + F.linear_backward(g, x, w, l2=0.1, threads=t))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert np.array_equal(a, b_)


def test_linear_reuses_out_buffers():
    x = RNG.standard_normal((8, 6)).astype(np.float32)
    w = RNG.standard_normal((3, 6)).astype(np.float32)
    out = np.empty((8, 3), np.float32)
    assert F.linear(x, w, out=out) is out
    np.testing.assert_allclose(out, x @ w.T, rtol=1e-5)


def test_linear_copies_non_contiguous_input():
    x = RNG.standard_normal((6, 16)).astype(np.float32)[:, ::2]
    w = RNG.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(F.linear(x, w), x @ w.T, rtol=1e-5)


def test_linear_nan_propagates():
    x = np.ones((2, 3), np.float32)
    x[1, 2] = np.nan
    y = F.linear(x, np.ones((4, 3), np.float32))
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


def test_linear_bad_input():
    x = np.ones((4, 5), np.float32)
    w = np.ones((3, 5), np.float32)
    with pytest.raises(ValueError, match=r"linear: x has 6 features .*weight expects 5"):
        F.linear(np.ones((4, 6), np.float32), w)
    with pytest.raises(ValueError, match="x must be 2-D, got 3-D"):
        F.linear(np.ones((4, 5, 1), np.float32), w)
    with pytest.raises(TypeError, match="x must be float32 or float64, got dtype int64"):
        F.linear(np.ones((4, 5), np.int64), w)
    with pytest.raises(TypeError, match="weight has dtype float64 but x has float32"):
        F.linear(x, w.astype(np.float64))
    with pytest.raises(ValueError, match="bias has 2 entries but weight has 3"):
        F.linear(x, w, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="out must have shape 4x3, got 3x4"):
        F.linear(x, w, out=np.empty((3, 4), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        F.linear(x, w, out=np.empty((4, 3), np.float64))
    with pytest.raises(ValueError, match="out must be a writeable C-contiguous"):
        F.linear(x, w, out=np.empty((3, 4), np.float32).T)
    with pytest.raises(ValueError, match="grad_out must have shape 4x3"):
        F.linear_backward(np.ones((4, 2), np.float32), x, w)
    with pytest.raises(ValueError, match="l2 must be a finite number"):
        F.linear_backward(np.ones((4, 3), np.float32), x, w, l2=-1.0)
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, got str"):
        F.linear("abc", w)
    with pytest.raises(ValueError, match="linear: threads must be a positive int"):
        F.linear(x, w, threads=0)


def test_user_raising_blas_threads_does_not_break_kernels():
    """threadpoolctl raising SciPy's BLAS threads must not oversubscribe cdl's chunks."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from cdl import _config

    x = RNG.standard_normal((64, 784)).astype(np.float32)
    w = RNG.standard_normal((256, 784)).astype(np.float32)
    expected = F.linear(x, w, threads=2)
    with threadpoolctl.threadpool_limits(2):
        got = F.linear(x, w, threads=2)
        # single-threaded during the call, the user's count again after it
        assert _config.blas_info()[2] == 2
    assert np.array_equal(got, expected)


# Shapes around the float32 GEMM's blocking (microkernel 14 x 32 on AVX-512, 6 x 16 on
# AVX2; reduction blocks of 256, 1024 packed columns, 252 packed rows): sizes of 1, primes,
# one past a block, one row panel (B read in place), few columns (C^T computed instead),
# short reductions (C walked by row panels), and empty reductions.
GEMM_SHAPES = [(2, 1, 1), (2, 3, 2), (37, 37, 37), (15, 257, 33), (29, 300, 513),
               (14, 256, 32), (28, 512, 64), (5, 3, 1025), (300, 17, 600), (64, 11, 4097),
               (2, 700, 2), (50, 300, 3), (13, 64, 2047), (7, 1, 129), (253, 513, 31),
               (5, 0, 7), (3, 8, 0), (0, 4, 6)]


def _ref64(a):
    return a.astype(np.float64)


@pytest.mark.parametrize("n,fin,fout", GEMM_SHAPES)
def test_gemm_edges_match_numpy_float32(n, fin, fout):
    rng = np.random.default_rng(n * 10007 + fin * 101 + fout)
    x = rng.standard_normal((n, fin)).astype(np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    b = rng.standard_normal(fout).astype(np.float32)
    g = rng.standard_normal((n, fout)).astype(np.float32)
    x64, w64, g64 = _ref64(x), _ref64(w), _ref64(g)

    def close(got, want, k):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * (k + 1))

    # Outputs start as NaN: an overwriting product must never read them.
    out = np.full((n, fout), np.nan, np.float32)
    close(F.linear(x, w, b, out=out), x64 @ w64.T + b, fin)
    out = np.full((n, fout), np.nan, np.float32)
    close(F.linear(x, w, out=out), x64 @ w64.T, fin)
    dx = np.full((n, fin), np.nan, np.float32)
    dw = np.full((fout, fin), np.nan, np.float32)
    dx, dw, db = F.linear_backward(g, x, w, grad_input=dx, grad_weight=dw)
    close(dx, g64 @ w64, fout)
    close(dw, g64.T @ x64, n)
    close(db, g64.sum(0), n)


@pytest.mark.parametrize("n,fin,fout", [(37, 37, 37), (29, 300, 513), (300, 17, 600),
                                        (64, 11, 4097), (50, 300, 3), (253, 513, 31),
                                        (256, 4096, 10)])
def test_gemm_edges_bitwise_identical_for_1_and_2_threads(n, fin, fout):
    rng = np.random.default_rng(fin)
    x = rng.standard_normal((n, fin)).astype(np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    b = rng.standard_normal(fout).astype(np.float32)
    g = rng.standard_normal((n, fout)).astype(np.float32)
    runs = [(F.linear(x, w, b, threads=t),) + F.linear_backward(g, x, w, l2=0.1, threads=t)
            for t in (1, 2)]
    for a, c in zip(*runs):
        assert a.tobytes() == c.tobytes()


def test_row_chunks_cover_the_weight():
    """The small-batch row chunks: big weights split in whole rows (an even count
    where the rows allow, as 784 x 256), small ones whole."""
    dense = cdl._kernels.dense
    assert dense.row_chunks(256, 784) == (43, 6)
    assert dense.row_chunks(10, 128) == (10, 1)
    for fout, fin in ((256, 784), (200, 300), (513, 128), (7, 5), (3, 100000), (17, 40000)):
        rows, count = dense.row_chunks(fout, fin)
        assert 1 <= count <= 16 and (count - 1) * rows < fout <= count * rows


def test_sgd_parts_cover_every_parameter_once():
    """The model's SGD parts: a big Linear weight in its row chunks, another big
    parameter in 16K parts dealt round-robin, the rest whole on thread 0."""
    dense = cdl._kernels.dense
    model = cdl.Sequential([cdl.Conv2d(256, 256, 3), cdl.Flatten(), cdl.Linear(256, 256),
                            cdl.ReLU(), cdl.Linear(256, 10)], (256, 3, 3))
    pack = model.parameter_pack
    covered = np.zeros(pack.params.size, int)
    for start, stop, owner in pack.parts:
        covered[start:stop] += 1
    for _, p, _ in model.parameters():
        start = (p.ctypes.data - pack.params.ctypes.data) // p.itemsize
        assert (covered[start:start + p.size] == 1).all()
    assert covered.sum() == model.num_params()
    conv = model.layers[0].params["weight"]
    sizes, owners = pack.parts[:, 1] - pack.parts[:, 0], pack.parts[:, 2]
    assert list(owners[:36]) == list(range(36)) and conv.size == 36 << 14   # 16K parts
    assert dense.row_chunks(256, 256) == (128, 2)
    linear = [i for i in range(len(sizes)) if sizes[i] == 128 * 256]        # its 2 chunks
    assert len(linear) == 2 and list(owners[linear]) == [0, 1]
    assert (owners[sizes < (1 << 14)] == 0).all()                           # small, whole
