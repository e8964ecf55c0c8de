"""Batch-norm and average-pooling kernels against plain NumPy twins, central
differences, PyTorch, thread counts and the float32 bound calls."""
import numpy as np
import pytest

from cdl._kernels import norm, pool

TOL = {np.float32: 2e-5, np.float64: 1e-12}


def close(got, want, dtype, scale=1.0):
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * scale)


# ------------------------------------------------------------ NumPy twins

def ref_bn_train(x, w, b, rm, rv, momentum, eps, relu):
    """PyTorch's training-mode batch norm in float64; returns y, mean, invstd, rm, rv."""
    x = x.astype(np.float64)
    n, c, l = x.shape
    m = n * l
    mean = x.mean(axis=(0, 2))
    var = ((x - mean[:, None]) ** 2).mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean[:, None]) * invstd[:, None]
    if w is not None:
        y = y * w.astype(np.float64)[:, None]
    if b is not None:
        y = y + b.astype(np.float64)[:, None]
    if relu:
        y = np.maximum(y, 0)
    new_rm = new_rv = None
    if rm is not None:
        new_rm = (1 - momentum) * rm.astype(np.float64) + momentum * mean
        new_rv = (1 - momentum) * rv.astype(np.float64) + momentum * var * m / (m - 1)
    return y, mean, invstd, new_rm, new_rv


def ref_bn_backward(g, x, y, w, mean, invstd, relu):
    g, x = g.astype(np.float64), x.astype(np.float64)
    mean, invstd = mean.astype(np.float64)[:, None], invstd.astype(np.float64)[:, None]
    if relu:
        g = np.where(y > 0, g, 0.0)
    m = x.shape[0] * x.shape[2]
    xhat = (x - mean) * invstd
    db = g.sum(axis=(0, 2))
    dw = (g * xhat).sum(axis=(0, 2))
    wc = 1.0 if w is None else w.astype(np.float64)[:, None]
    dx = wc * invstd / m * (m * g - db[:, None] - xhat * dw[:, None])
    return dx, dw, db


def bn_case(shape, dtype, affine=True, running=True, seed=0):
    rng = np.random.default_rng(seed)
    n, c, l = shape
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, (1, c, 1))
         + rng.uniform(-2, 2, (1, c, 1))).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype) if affine else None
    b = rng.standard_normal(c).astype(dtype) if affine else None
    rm = rng.standard_normal(c).astype(dtype) if running else None
    rv = rng.uniform(0.5, 2, c).astype(dtype) if running else None
    return x, w, b, rm, rv


def run_train(x, w, b, rm, rv, momentum=0.1, eps=1e-5, relu=False, threads=1):
    c = x.shape[1]
    out = np.empty_like(x)
    mean, invstd = np.empty(c, x.dtype), np.empty(c, x.dtype)
    rm = None if rm is None else rm.copy()
    rv = None if rv is None else rv.copy()
    norm.batchnorm_forward_train(x, w, b, out, mean, invstd, rm, rv, momentum, eps, relu, threads)
    return out, mean, invstd, rm, rv


def run_backward(g, x, out, w, mean, invstd, relu, threads=1, want_dx=True, affine=True):
    c = x.shape[1]
    dx = np.empty_like(x) if want_dx else None
    dw = np.empty(c, x.dtype) if affine else None
    db = np.empty(c, x.dtype) if affine else None
    norm.batchnorm_backward(g, x, out, w, mean, invstd, dx, dw, db, relu, threads)
    return dx, dw, db


# Shapes reach every path: L = 1 (BatchNorm1d) and short rows (per-element
# coefficients, blocks of channels), planes of 16+ cells, planes longer than a tile
# and not a multiple of 8, and batches that end in a short group of images.
SHAPES = [(7, 5, 1), (64, 33, 1), (5, 9, 3), (6, 40, 15), (4, 7, 16), (3, 11, 100),
          (2, 3, 600), (3, 2, 1024), (2, 3, 2500), (1, 2, 5), (13, 1, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine,relu", [(True, False), (False, False), (True, True)])
def test_train_forward_matches_numpy(shape, dtype, affine, relu):
    x, w, b, rm, rv = bn_case(shape, dtype, affine)
    out, mean, invstd, rm2, rv2 = run_train(x, w, b, rm, rv, 0.1, 1e-5, relu)
    y, m, s, rm_ref, rv_ref = ref_bn_train(x, w, b, rm, rv, 0.1, 1e-5, relu)
    close(out, y, dtype, scale=4)
    close(mean, m, dtype, scale=4)
    close(invstd, s, dtype)
    close(rm2, rm_ref, dtype, scale=4)
    close(rv2, rv_ref, dtype, scale=4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 3, 1), (8, 4, 9), (16, 2, 49), (2, 1, 3000),
                                   (64, 3, 100)])
def test_statistics_of_offset_and_constant_channels(shape, dtype):
    """The one-pass statistics shift by each channel's first value: a channel far from
    zero with a small spread (where Σx² - (Σx)²/M in plain form would cancel), one whose
    first value is an outlier (500 standard deviations out: the sums run again shifted
    by the mean, or float32's partial sums would lose 3e-5 of the variance), and a
    constant one (variance exactly 0, never negative)."""
    rng = np.random.default_rng(3)
    x = (1e4 + 0.01 * rng.standard_normal(shape)).astype(dtype)
    if shape[1] > 1:
        x[:, 1] = rng.standard_normal((shape[0], shape[2]))
        x[0, 1, 0] = 500.0                     # the shift k is an outlier
    x[:, -1] = dtype(7.25)                     # constant channel
    _, mean, invstd, _, rv = run_train(x, None, None, np.zeros(shape[1], dtype),
                                       np.ones(shape[1], dtype), 1.0, 1e-5)
    ref = x.astype(np.float64)
    want_mean = ref.mean(axis=(0, 2))
    want_var = ref.var(axis=(0, 2))
    np.testing.assert_allclose(mean, want_mean, rtol=TOL[dtype])
    np.testing.assert_allclose(1 / invstd.astype(np.float64) ** 2 - 1e-5, want_var,
                               rtol=1e-6 if dtype == np.float32 else 1e-9, atol=1e-9)
    m = shape[0] * shape[2]
    np.testing.assert_allclose(rv, want_var * m / (m - 1), rtol=TOL[dtype] * 10, atol=1e-12)
    assert rv[-1] == 0 and invstd[-1] == dtype(1 / np.sqrt(1e-5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_forward_without_running_stats_and_in_place(dtype):
    x, w, b, _, _ = bn_case((4, 6, 20), dtype)
    out, mean, invstd, _, _ = run_train(x, w, b, None, None)
    y = x.copy()
    m2, s2 = np.empty(6, dtype), np.empty(6, dtype)
    norm.batchnorm_forward_train(y, w, b, y, m2, s2, None, None, 0.1, 1e-5, False, 1)
    assert y.tobytes() == out.tobytes()
    assert m2.tobytes() == mean.tobytes() and s2.tobytes() == invstd.tobytes()


def test_momentum_and_eps_are_used():
    x, w, b, rm, rv = bn_case((5, 3, 7), np.float64)
    for momentum, eps in ((0.0, 1e-5), (1.0, 1e-3), (0.3, 0.5)):
        out, mean, invstd, rm2, rv2 = run_train(x, w, b, rm, rv, momentum, eps)
        y, m, s, rm_ref, rv_ref = ref_bn_train(x, w, b, rm, rv, momentum, eps, False)
        close(out, y, np.float64, 4)
        close(invstd, s, np.float64)
        close(rm2, rm_ref, np.float64, 4)
        close(rv2, rv_ref, np.float64, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine,relu", [(True, False), (False, False), (True, True),
                                         (False, True)])
def test_backward_matches_numpy(shape, dtype, affine, relu):
    x, w, b, rm, rv = bn_case(shape, dtype, affine, seed=1)
    out, mean, invstd, _, _ = run_train(x, w, b, rm, rv, relu=relu)
    g = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    dx, dw, db = run_backward(g, x, out, w, mean, invstd, relu, affine=True)
    dx_ref, dw_ref, db_ref = ref_bn_backward(g, x, out, w, mean, invstd, relu)
    m = shape[0] * shape[2]
    close(dx, dx_ref, dtype, scale=4)
    close(dw, dw_ref, dtype, scale=4 * np.sqrt(m))
    close(db, db_ref, dtype, scale=4 * np.sqrt(m))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_optional_outputs(dtype):
    """grad_input=None gives the same parameter gradients; no parameter gradients
    (affine=False) gives the same grad_input; grad_input may be grad_out."""
    x, w, b, rm, rv = bn_case((6, 5, 30), dtype)
    out, mean, invstd, _, _ = run_train(x, w, b, rm, rv, relu=True)
    g = np.random.default_rng(3).standard_normal(x.shape).astype(dtype)
    dx, dw, db = run_backward(g, x, out, w, mean, invstd, True)
    _, dw2, db2 = run_backward(g, x, out, w, mean, invstd, True, want_dx=False)
    assert dw2.tobytes() == dw.tobytes() and db2.tobytes() == db.tobytes()
    dx3, dw3, db3 = run_backward(g, x, out, w, mean, invstd, True, affine=False)
    assert dx3.tobytes() == dx.tobytes() and dw3 is None and db3 is None
    g2 = g.copy()
    norm.batchnorm_backward(g2, x, out, w, mean, invstd, g2, None, None, True, 1)
    assert g2.tobytes() == dx.tobytes()
    # Without relu the forward output is not read: it may be None.
    out_n, mean_n, invstd_n, _, _ = run_train(x, w, b, rm, rv)
    dx4, _, _ = run_backward(g, x, out_n, w, mean_n, invstd_n, False)
    dx5 = np.empty_like(x)
    norm.batchnorm_backward(g, x, None, w, mean_n, invstd_n, dx5, None, None, False, 1)
    assert dx5.tobytes() == dx4.tobytes()


def test_relu_masks_where_output_is_not_positive():
    x = np.array([[[-1.0, 0.0, 1.0, 2.0]]])
    out, mean, invstd, _, _ = run_train(x, None, None, None, None, eps=0.0, relu=True)
    assert (out[0, 0, :2] == 0).all() and (out[0, 0, 2:] > 0).all()
    g = np.ones_like(x)
    _, dw, db = run_backward(g, x, out, None, mean, invstd, True)
    assert db[0] == 2.0                 # only the two positive outputs pass
    np.testing.assert_allclose(dw[0], ((x - mean) * invstd)[0, 0, 2:].sum(), rtol=1e-14)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_relu_mask_rebuilt_from_x_is_the_mask_read_from_out(isa):
    # batchnorm_backward with the forward's scale (scale_out) and shift rebuilds the
    # ReLU's mask from x; bit for bit the gradients that read the forward's output,
    # on data with many outputs at or near 0 (bias set to land them there), for
    # every build, both dtypes, with and without bias, and any thread count.
    import importlib

    from cdl._kernels import _runtime
    if isa not in _runtime.cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._norm_{isa}")
    for dtype in (np.float32, np.float64):
        for shape in ((5, 3, 16), (4, 7, 100), (9, 2, 1024), (3, 4, 37), (6, 3, 4)):
            for with_bias in (True, False):
                x, w, b, rm, rv = bn_case(shape, dtype, seed=23)
                c = shape[1]
                # x's values repeat, so that many land exactly where the output is 0
                x = np.round(x * 4) / 4
                mean, invstd = np.empty(c, dtype), np.empty(c, dtype)
                scale, out = np.empty(c, dtype), np.empty_like(x)
                b = b if with_bias else None
                mod.batchnorm_forward_train(x, w, b, out, mean, invstd, None, None, 0.1, 1e-5,
                                            True, 2, scale_out=scale)
                if with_bias:
                    # shift each channel so that an output lands on 0 (or just beside)
                    b = (-(x[0, :, 0] - mean) * scale).astype(dtype)
                    mod.batchnorm_forward_train(x, w, b, out, mean, invstd, None, None, 0.1,
                                                1e-5, True, 2, scale_out=scale)
                assert (out == 0).any() and (out > 0).any()
                g = np.random.default_rng(24).standard_normal(shape).astype(dtype)
                want = [np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)]
                mod.batchnorm_backward(g, x, out, w, mean, invstd, *want, True, 2)
                for nt in (1, 2, 3):
                    got = [np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)]
                    # out must not be read: garbage in it changes nothing
                    junk = np.full_like(out, np.nan)
                    mod.batchnorm_backward(g, x, junk if shape[2] >= 16 else out, w, mean,
                                           invstd, *got, True, nt, scale=scale, shift=b)
                    for u, v in zip(got, want):
                        assert u.tobytes() == v.tobytes(), (isa, dtype, shape, with_bias, nt)


def test_mask_scale_of_the_wrong_length_is_refused():
    x = np.ones((2, 3, 16), np.float32)
    c3 = lambda: np.empty(3, np.float32)  # noqa: E731
    with pytest.raises(ValueError, match="scale_out has 2 entries for 3 channels"):
        norm.batchnorm_forward_train(x, None, None, np.empty_like(x), c3(), c3(), None, None,
                                     0.1, 1e-5, True, 1, scale_out=np.empty(2, np.float32))
    with pytest.raises(ValueError, match="scale and shift need 3 entries"):
        norm.batchnorm_backward(x, x, x, None, c3(), c3(), np.empty_like(x), None, None, True,
                                1, scale=c3(), shift=np.empty(4, np.float32))


# ------------------------------------------------------------ central differences

def numeric_grad(f, a, h=1e-6):
    g = np.zeros_like(a)
    flat, gf = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("shape", [(4, 3, 5), (6, 2, 1), (2, 2, 20)])
@pytest.mark.parametrize("affine,relu", [(True, False), (False, False), (True, True),
                                         (False, True)])
def test_backward_gradcheck(shape, affine, relu):
    x, w, b, _, _ = bn_case(shape, np.float64, affine, running=False, seed=5)
    G = np.random.default_rng(6).standard_normal(shape)

    def loss():
        return float((run_train(x, w, b, None, None, relu=relu)[0] * G).sum())

    out, mean, invstd, _, _ = run_train(x, w, b, None, None, relu=relu)
    dx, dw, db = run_backward(G, x, out, w, mean, invstd, relu, affine=affine)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-7)
    if affine:
        np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ threads, bound calls

# Big enough to run in parallel (32K elements), in every work split: groups of 4
# images with a short last group (13), channels split to give threads items (one
# image), short channels over several tiles (300 x 15 > 1024), statistics of 1024
# channels or more split among threads.
THREAD_SHAPES = [(8, 12, 4096), (64, 40, 20), (2048, 24, 1), (16, 48, 49), (32, 3, 700),
                 (13, 6, 600), (1, 16, 4096), (9, 300, 15), (40, 1100, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", THREAD_SHAPES)
def test_bitwise_for_any_thread_count(shape, dtype):
    x, w, b, rm, rv = bn_case(shape, dtype, seed=7)
    g = np.random.default_rng(8).standard_normal(shape).astype(dtype)
    res = []
    for nt in (1, 2, 3, 5):
        fwd = run_train(x, w, b, rm, rv, relu=True, threads=nt)
        bwd = run_backward(g, x, fwd[0], w, fwd[1], fwd[2], True, threads=nt)
        scale, shift = np.empty_like(w), np.empty_like(w)
        norm.batchnorm_eval_coefficients(w, b, rm, rv, 1e-5, scale, shift)
        ev = np.empty_like(x)
        norm.batchnorm_forward_eval(x, scale, shift, ev, True, nt)
        res.append(b"".join(a.tobytes() for a in fwd + bwd + (ev,)))
    assert res[0] == res[1] == res[2] == res[3]


@pytest.mark.parametrize("shape", [(4, 6, 50), (2048, 24, 1), (8, 5, 3000)])
def test_bound_calls_equal_the_functions(shape):
    dtype = np.float32
    x, w, b, rm, rv = bn_case(shape, dtype, seed=9)
    c = shape[1]
    for relu in (False, True):
        want = run_train(x, w, b, rm, rv, 0.2, 1e-3, relu, threads=2)
        out, mean, invstd = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
        rm2, rv2 = rm.copy(), rv.copy()
        f = norm.BatchNormTrainForward(np.zeros_like(x), w, b, out, mean, invstd, rm2, rv2,
                                       0.9, 1e-3, relu)
        f.bind_input(x)
        f.set_momentum(0.2)
        f.run(2)
        for got, exp in zip((out, mean, invstd, rm2, rv2), want):
            assert got.tobytes() == exp.tobytes()
        g = np.random.default_rng(10).standard_normal(shape).astype(dtype)
        want_b = run_backward(g, x, out, w, mean, invstd, relu, threads=2)
        dx, dw, db = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
        bb = norm.BatchNormBackward(g, np.zeros_like(x), out, w, mean, invstd, dx, dw, db, relu)
        bb.bind_input(x)
        bb.run(2)
        for got, exp in zip((dx, dw, db), want_b):
            assert got.tobytes() == exp.tobytes()
        scale, shift = np.empty(c, dtype), np.empty(c, dtype)
        norm.batchnorm_eval_coefficients(w, b, rm, rv, 1e-3, scale, shift)
        want_e = np.empty_like(x)
        norm.batchnorm_forward_eval(x, scale, shift, want_e, relu, 2)
        got_e = np.empty_like(x)
        e = norm.BatchNormEvalForward(np.zeros_like(x), scale, shift, got_e, relu)
        e.bind_input(x)
        e.run(2)
        assert got_e.tobytes() == want_e.tobytes()
    # affine=False and no running statistics through the bound call
    out, mean, invstd = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
    norm.BatchNormTrainForward(x, None, None, out, mean, invstd, None, None, 0.1, 1e-5,
                               False).run(1)
    want = run_train(x, None, None, None, None)
    assert out.tobytes() == want[0].tobytes()
    dx = np.empty_like(x)
    norm.BatchNormBackward(x, x, out, None, mean, invstd, dx, None, None, False).run(1)
    assert dx.tobytes() == run_backward(x, x, out, None, mean, invstd, False,
                                        affine=False)[0].tobytes()


# ------------------------------------------------------------ eval

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 4, 1), (5, 6, 7), (2, 3, 40), (2, 2, 1500)])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_matches_numpy(shape, dtype, affine):
    x, w, b, rm, rv = bn_case(shape, dtype, affine, seed=11)
    c = shape[1]
    scale, shift = np.empty(c, dtype), np.empty(c, dtype)
    norm.batchnorm_eval_coefficients(w, b, rm, rv, 1e-4, scale, shift)
    s_ref = (1.0 if w is None else w.astype(np.float64)) / np.sqrt(rv.astype(np.float64) + 1e-4)
    h_ref = (0.0 if b is None else b.astype(np.float64)) - rm.astype(np.float64) * s_ref
    close(scale, s_ref, dtype, 2)
    close(shift, h_ref, dtype, 2)
    for relu in (False, True):
        out = np.empty_like(x)
        norm.batchnorm_forward_eval(x, scale, shift, out, relu, 1)
        y = (x.astype(np.float64) * s_ref[:, None] + h_ref[:, None])
        if relu:
            y = np.maximum(y, 0)
        close(out, y, dtype, 8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_channel_affine_matches_numpy_and_its_bound_call(dtype, with_bias):
    rng = np.random.default_rng(12)
    w = rng.standard_normal((5, 3 * 3 * 2)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype) if with_bias else None
    scale, shift = rng.standard_normal(5).astype(dtype), rng.standard_normal(5).astype(dtype)
    w_out, b_out = np.empty_like(w), np.empty(5, dtype)
    norm.fold_channel_affine(w, b, scale, shift, w_out, b_out)
    assert w_out.tobytes() == (w * scale[:, None]).tobytes()     # one rounding each
    want = shift if b is None else (b.astype(np.float64) * scale + shift).astype(dtype)
    if dtype == np.float32:   # b * scale is exact in double: one rounding, as here
        assert b_out.tobytes() == want.tobytes()
    else:
        np.testing.assert_allclose(b_out, want, rtol=1e-15, atol=1e-15)
    if dtype == np.float32:
        w2, b2 = np.empty_like(w), np.empty(5, dtype)
        norm.FoldChannelAffine(w, b, scale, shift, w2, b2).run()
        assert w2.tobytes() == w_out.tobytes() and b2.tobytes() == b_out.tobytes()
        s2, h2 = np.empty(5, dtype), np.empty(5, dtype)
        rm, rv = rng.standard_normal(5).astype(dtype), rng.random(5).astype(dtype)
        for gamma, beta in ((scale, shift), (None, None)):    # affine=False: no arrays
            norm.EvalCoefficients(gamma, beta, rm, rv, 1e-5, s2, h2).run()
            s1, h1 = np.empty(5, dtype), np.empty(5, dtype)
            norm.batchnorm_eval_coefficients(gamma, beta, rm, rv, 1e-5, s1, h1)
            assert s1.tobytes() == s2.tobytes() and h1.tobytes() == h2.tobytes()


# ------------------------------------------------------------ PyTorch

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(8, 6, 5, 7), (4, 3, 40, 40), (32, 10), (2, 5, 1, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch(shape, dtype, affine):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    c = shape[1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    mod = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(
        c, eps=1e-5, momentum=0.1, affine=affine, dtype=torch.float32 if dtype == np.float32
        else torch.float64)
    if affine:
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(dtype)))
            mod.bias.copy_(torch.from_numpy(rng.standard_normal(c).astype(dtype)))
    w = mod.weight.detach().numpy().copy() if affine else None
    b = mod.bias.detach().numpy().copy() if affine else None
    rm, rv = mod.running_mean.numpy().copy(), mod.running_var.numpy().copy()
    x3 = x.reshape(shape[0], c, -1)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    for step in range(2):               # two steps: the running statistics move twice
        ty = mod.train()(tx)
        out, mean, invstd, rm, rv = run_train(x3, w, b, rm, rv)
    ty.backward(torch.from_numpy(g))
    dx, dw, db = run_backward(g.reshape(x3.shape), x3, out, w, mean, invstd, False, affine=affine)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.reshape(shape), ty.detach().numpy(), **tol)
    np.testing.assert_allclose(rm, mod.running_mean.numpy(), **tol)
    np.testing.assert_allclose(rv, mod.running_var.numpy(), **tol)
    np.testing.assert_allclose(dx.reshape(shape), tx.grad.numpy(), **tol)
    if affine:
        np.testing.assert_allclose(dw, mod.weight.grad.numpy(), **tol)
        np.testing.assert_allclose(db, mod.bias.grad.numpy(), **tol)
    # eval mode with the running statistics both sides now hold
    scale, shift = np.empty(c, dtype), np.empty(c, dtype)
    norm.batchnorm_eval_coefficients(w, b, rm, rv, 1e-5, scale, shift)
    ev = np.empty_like(x3)
    norm.batchnorm_forward_eval(x3, scale, shift, ev, False, 1)
    with torch.no_grad():
        np.testing.assert_allclose(ev.reshape(shape), mod.eval()(tx).numpy(), **tol)


# ------------------------------------------------------------ average pooling

def ref_avg_pool(x, kh, kw, sh, sw, ph, pw):
    """count_include_pad=True: zero padding, every window divided by kh*kw."""
    n, c, h, w = x.shape
    xp = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    xp[:, :, ph:ph + h, pw:pw + w] = x
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].sum(axis=(2, 3))
    return y / (kh * kw)


def ref_avg_pool_backward(g, shape, kh, kw, sh, sw, ph, pw):
    n, c, h, w = shape
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            dxp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += \
                g[:, :, i, j, None, None] / (kh * kw)
    return dxp[:, :, ph:ph + h, pw:pw + w]


def out_hw(h, w, k, s, p):
    return (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1


AVG_CASES = [((2, 3, 8, 8), (2, 2), (2, 2), (0, 0)),
             ((1, 2, 9, 11), (3, 3), (1, 1), (1, 1)),
             ((2, 2, 7, 10), (3, 2), (2, 3), (1, 1)),
             ((1, 1, 5, 5), (5, 5), (1, 1), (2, 2)),
             ((2, 1, 6, 13), (1, 4), (1, 2), (0, 2)),
             ((1, 3, 12, 40), (3, 3), (2, 2), (1, 0)),
             ((1, 1, 1, 1), (1, 1), (1, 1), (0, 0)),
             ((1, 2, 4, 6), (2, 3), (3, 4), (1, 1))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,s,p", AVG_CASES)
def test_avg_pool_matches_numpy(shape, k, s, p, dtype):
    rng = np.random.default_rng(13)
    x = rng.standard_normal(shape).astype(dtype)
    oh, ow = out_hw(shape[2], shape[3], k, s, p)
    out = np.full((shape[0], shape[1], oh, ow), np.nan, dtype)
    pool.avg_pool2d_forward(x, out, *k, *s, *p, 1)
    close(out, ref_avg_pool(x.astype(np.float64), *k, *s, *p), dtype, 2)
    g = rng.standard_normal(out.shape).astype(dtype)
    dx = np.full_like(x, np.nan)
    pool.avg_pool2d_backward(g, dx, *k, *s, *p, 1)
    close(dx, ref_avg_pool_backward(g.astype(np.float64), shape, *k, *s, *p), dtype, 2)


@pytest.mark.parametrize("shape,k,s,p", AVG_CASES[1:4])
def test_avg_pool_gradcheck(shape, k, s, p):
    rng = np.random.default_rng(14)
    x = rng.standard_normal(shape)
    oh, ow = out_hw(shape[2], shape[3], k, s, p)
    out = np.empty((shape[0], shape[1], oh, ow))
    G = rng.standard_normal(out.shape)

    def loss():
        pool.avg_pool2d_forward(x, out, *k, *s, *p, 1)
        return float((out * G).sum())

    dx = np.empty_like(x)
    pool.avg_pool2d_backward(G, dx, *k, *s, *p, 1)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,k,s,p", AVG_CASES[:6])
def test_avg_pool_matches_torch(shape, k, s, p, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    x = rng.standard_normal(shape).astype(dtype)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = torch.nn.functional.avg_pool2d(tx, k, s, p, count_include_pad=True)
    out = np.empty(tuple(ty.shape), dtype)
    pool.avg_pool2d_forward(x, out, *k, *s, *p, 1)
    g = rng.standard_normal(out.shape).astype(dtype)
    ty.backward(torch.from_numpy(g))
    dx = np.empty_like(x)
    pool.avg_pool2d_backward(g, dx, *k, *s, *p, 1)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out, ty.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)


def test_global_avg_pool_matches_numpy_and_gradcheck():
    rng = np.random.default_rng(16)
    for dtype in (np.float32, np.float64):
        for shape in ((2, 3, 1), (3, 4, 7), (2, 5, 49), (1, 2, 1000)):
            x = (rng.standard_normal(shape) + 3).astype(dtype)
            out = np.empty(shape[:2], dtype)
            pool.global_avg_pool_forward(x, out, 1)
            close(out, x.astype(np.float64).mean(axis=2), dtype, 4)
            g = rng.standard_normal(shape[:2]).astype(dtype)
            dx = np.empty_like(x)
            pool.global_avg_pool_backward(g, dx, 1)
            close(dx, np.repeat(g.astype(np.float64)[:, :, None] / shape[2], shape[2], 2), dtype)
    x = rng.standard_normal((2, 3, 9))
    out = np.empty((2, 3))
    G = rng.standard_normal((2, 3))

    def loss():
        pool.global_avg_pool_forward(x, out, 1)
        return float((out * G).sum())

    dx = np.empty_like(x)
    pool.global_avg_pool_backward(G, dx, 1)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-7, atol=1e-10)


def test_global_avg_pool_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    x = rng.standard_normal((4, 6, 7, 7)).astype(np.float32)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = torch.nn.functional.adaptive_avg_pool2d(tx, 1).reshape(4, 6)
    out = np.empty((4, 6), np.float32)
    pool.global_avg_pool_forward(x.reshape(4, 6, 49), out, 1)
    g = rng.standard_normal((4, 6)).astype(np.float32)
    ty.backward(torch.from_numpy(g))
    dx = np.empty((4, 6, 49), np.float32)
    pool.global_avg_pool_backward(g, dx, 1)
    np.testing.assert_allclose(out, ty.detach().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx.reshape(x.shape), tx.grad.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pools_bitwise_for_any_thread_count_and_bound_calls(dtype):
    rng = np.random.default_rng(18)
    x = rng.standard_normal((8, 16, 30, 30)).astype(dtype)       # 115K elements: parallel
    k, s, p = (3, 3), (2, 2), (1, 1)
    oh, ow = out_hw(30, 30, k, s, p)
    g = rng.standard_normal((8, 16, oh, ow)).astype(dtype)
    x3 = x.reshape(8, 16, 900)
    g2 = g[:, :, 0, 0].copy()
    res = []
    for nt in (1, 2, 3):
        out, dx = np.empty_like(g), np.empty_like(x)
        pool.avg_pool2d_forward(x, out, *k, *s, *p, nt)
        pool.avg_pool2d_backward(g, dx, *k, *s, *p, nt)
        gout, gdx = np.empty((8, 16), dtype), np.empty_like(x3)
        pool.global_avg_pool_forward(x3, gout, nt)
        pool.global_avg_pool_backward(g2, gdx, nt)
        res.append((out.tobytes(), dx.tobytes(), gout.tobytes(), gdx.tobytes()))
    assert res[0] == res[1] == res[2]
    if dtype != np.float32:
        return
    out, dx = np.empty_like(g), np.empty_like(x)
    f = pool.AvgPoolForward(np.zeros_like(x), out, k, s, p)
    f.bind_input(x)
    f.run(2)
    pool.AvgPoolBackward(g, dx, k, s, p).run(2)
    gout, gdx = np.empty((8, 16), dtype), np.empty_like(x3)
    gf = pool.GlobalAvgPoolForward(np.zeros_like(x3), gout)
    gf.bind_input(x3)
    gf.run(2)
    pool.GlobalAvgPoolBackward(g2, gdx).run(2)
    assert (out.tobytes(), dx.tobytes(), gout.tobytes(), gdx.tobytes()) == res[0]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_build_agrees(isa):
    import importlib

    from cdl._kernels import _runtime
    if isa not in _runtime.cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._norm_{isa}")
    pmod = importlib.import_module(f"cdl._kernels._pool_{isa}")
    for dtype in (np.float32, np.float64):
        for shape in ((6, 5, 1), (4, 7, 9), (3, 4, 100), (2, 2, 1500)):
            x, w, b, rm, rv = bn_case(shape, dtype, seed=19)
            c = shape[1]
            out, mean, invstd = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
            rm2, rv2 = rm.copy(), rv.copy()
            mod.batchnorm_forward_train(x, w, b, out, mean, invstd, rm2, rv2, 0.1, 1e-5, True, 2)
            y, m, s, rm_ref, rv_ref = ref_bn_train(x, w, b, rm, rv, 0.1, 1e-5, True)
            close(out, y, dtype, 4)
            close(rv2, rv_ref, dtype, 4)
            g = np.random.default_rng(20).standard_normal(shape).astype(dtype)
            dx, dw, db = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
            mod.batchnorm_backward(g, x, out, w, mean, invstd, dx, dw, db, True, 2)
            dx_ref, dw_ref, db_ref = ref_bn_backward(g, x, out, w, mean, invstd, True)
            close(dx, dx_ref, dtype, 4)
            close(dw, dw_ref, dtype, 4 * np.sqrt(shape[0] * shape[2]))
        xp = np.random.default_rng(21).standard_normal((2, 3, 9, 11)).astype(dtype)
        out = np.empty((2, 3, 5, 6), dtype)
        pmod.avg_pool2d_forward(xp, out, 3, 3, 2, 2, 1, 1, 2)
        close(out, ref_avg_pool(xp.astype(np.float64), 3, 3, 2, 2, 1, 1), dtype, 2)
