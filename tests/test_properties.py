"""Property tests: random shapes and parameters for every functional kernel, against
plain NumPy references written here (float64 math), including the edge sizes
(1x1 inputs, kernel equal to the padded input, stride larger than the kernel,
batch 1, one channel, odd sizes). The loss values and gradients, max-pool
indices (ties included) and conv/linear gradients are all checked.

Hypothesis draws the shapes; the array contents come from a drawn seed so a
failure shrinks to a small, reproducible case.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cdl.functional as F

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=False, print_blob=True)   # a failure says how to rerun it
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)
threads = st.integers(1, 3)


def tol(dtype):
    # float32 kernels vs a float64 reference: relative to the sum of |terms|
    return 2e-5 if dtype == np.float32 else 1e-11


def assert_close(got, ref, absref, dtype, what):
    """|got - ref| <= tol * (sum of |terms| that made ref) + tiny, elementwise."""
    got = np.asarray(got, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    bound = tol(dtype) * (absref + 1.0)
    err = np.abs(got - ref)
    bad = ~(err <= bound)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - bound, -np.inf)), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} of {err.size} wrong; at {i} got {got[i]!r}, "
                             f"expected {ref[i]!r} (bound {bound[i]:.3g})")


# ---------------------------------------------------------------- references
def ref_conv(x, w, b, s, p):
    """y[n,k,i,j] = b[k] + Σ_{c,u,v} W[k,c,u,v] x_pad[n,c,i*S+u,j*S+v], and Σ|terms|."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, c, h, wd = x.shape
    k, _, kh, kw = w.shape
    oh, ow = (h + 2 * p[0] - kh) // s[0] + 1, (wd + 2 * p[1] - kw) // s[1] + 1
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    y = np.zeros((n, k, oh, ow))
    ay = np.zeros((n, k, oh, ow))
    for u in range(kh):
        for v in range(kw):
            win = xp[:, :, u:u + s[0] * (oh - 1) + 1:s[0], v:v + s[1] * (ow - 1) + 1:s[1]]
            y += np.einsum("nchw,kc->nkhw", win, w[:, :, u, v])
            ay += np.einsum("nchw,kc->nkhw", np.abs(win), np.abs(w[:, :, u, v]))
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
        ay += np.abs(b.astype(np.float64))[None, :, None, None]
    return y, ay


def ref_conv_backward(g, x, w, s, p):
    g, x, w = g.astype(np.float64), x.astype(np.float64), w.astype(np.float64)
    h, wd = x.shape[2:]
    kh, kw = w.shape[2:]
    oh, ow = g.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))
    dxp, adxp = np.zeros_like(xp), np.zeros_like(xp)
    dw, adw = np.zeros(w.shape), np.zeros(w.shape)
    for u in range(kh):
        for v in range(kw):
            sl = (slice(None), slice(None), slice(u, u + s[0] * (oh - 1) + 1, s[0]),
                  slice(v, v + s[1] * (ow - 1) + 1, s[1]))
            dw[:, :, u, v] = np.einsum("nkhw,nchw->kc", g, xp[sl])
            adw[:, :, u, v] = np.einsum("nkhw,nchw->kc", np.abs(g), np.abs(xp[sl]))
            dxp[sl] += np.einsum("nkhw,kc->nchw", g, w[:, :, u, v])
            adxp[sl] += np.einsum("nkhw,kc->nchw", np.abs(g), np.abs(w[:, :, u, v]))
    crop = (slice(None), slice(None), slice(p[0], p[0] + h), slice(p[1], p[1] + wd))
    return (dxp[crop], adxp[crop]), (dw, adw), (g.sum(axis=(0, 2, 3)),
                                               np.abs(g).sum(axis=(0, 2, 3)))


def ref_pool(x, k, s, p):
    """Max and first-max flat index h*W+w per window; padded cells never win."""
    n, c, h, wd = x.shape
    oh, ow = (h + 2 * p[0] - k[0]) // s[0] + 1, (wd + 2 * p[1] - k[1]) // s[1] + 1
    y = np.empty((n, c, oh, ow), x.dtype)
    idx = np.empty((n, c, oh, ow), np.int32)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * s[0] - p[0], j * s[1] - p[1]
            r1, c1 = max(r0, 0), max(c0, 0)
            r2, c2 = min(r0 + k[0], h), min(c0 + k[1], wd)
            win = x[:, :, r1:r2, c1:c2].reshape(n, c, -1)
            a = np.argmax(win, axis=2)  # first max in row-major order
            y[:, :, i, j] = np.take_along_axis(win, a[..., None], 2)[..., 0]
            cols = c2 - c1
            idx[:, :, i, j] = (r1 + a // cols) * wd + (c1 + a % cols)
    return y, idx


def ref_pool_backward(g, idx, shape):
    n, c, h, wd = shape
    dx = np.zeros((n, c, h * wd))
    for a in range(n):
        for b in range(c):
            np.add.at(dx[a, b], idx[a, b].reshape(-1), g[a, b].reshape(-1).astype(np.float64))
    return dx.reshape(shape)


def ref_logsumexp(s):
    m = s.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))[:, 0]


# ---------------------------------------------------------------- strategies
@st.composite
def conv_case(draw):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    k = draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    # H from "kernel equals the padded input" up to a few more
    h = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + 9))
    w = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + 9))
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw)
    return (n, c, h, w), (k, c, kh, kw), (sh, sw), (ph, pw)


@st.composite
def pool_case(draw):
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h = draw(st.integers(max(1, kh - 2 * ph), max(1, kh - 2 * ph) + 9))
    w = draw(st.integers(max(1, kw - 2 * pw), max(1, kw - 2 * pw) + 9))
    return (n, c, h, w), (kh, kw), (sh, sw), (ph, pw)


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ---------------------------------------------------------------- conv2d
@settings(max_examples=150, **SETTINGS)
@given(conv_case(), dtypes, seeds, threads, st.booleans())
def test_conv2d_forward_backward(case, dtype, seed, nt, use_bias):
    xs, ws, s, p = case
    rng = np.random.default_rng(seed)
    x, w = rand(rng, xs, dtype), rand(rng, ws, dtype)
    b = rand(rng, ws[0], dtype) if use_bias else None
    y = F.conv2d(x, w, b, stride=s, padding=p, threads=nt)
    ref, aref = ref_conv(x, w, b, s, p)
    assert y.dtype == dtype
    assert_close(y, ref, aref, dtype, f"conv2d {xs} {ws} s={s} p={p}")

    g = rand(rng, y.shape, dtype)
    dx, dw, db = F.conv2d_backward(g, x, w, stride=s, padding=p, threads=nt)
    (rdx, adx), (rdw, adw), (rdb, adb) = ref_conv_backward(g, x, w, s, p)
    assert_close(dx, rdx, adx, dtype, "conv2d_backward dx")
    assert_close(dw, rdw, adw, dtype, "conv2d_backward dW")
    assert_close(db, rdb, adb, dtype, "conv2d_backward db")


# ---------------------------------------------------------------- max pool
@settings(max_examples=120, **SETTINGS)
@given(pool_case(), dtypes, seeds, threads, st.booleans())
def test_max_pool2d_forward_backward(case, dtype, seed, nt, ties):
    xs, k, s, p = case
    rng = np.random.default_rng(seed)
    # ties=True: small integers, so windows hold equal maxima (first one must win)
    x = (rng.integers(-2, 3, xs) if ties else rng.standard_normal(xs)).astype(dtype)
    y, idx = F.max_pool2d(x, k, stride=s, padding=p, threads=nt)
    ry, ridx = ref_pool(x, k, s, p)
    np.testing.assert_array_equal(y, ry, err_msg=f"max_pool2d {xs} k={k} s={s} p={p}")
    np.testing.assert_array_equal(idx, ridx, err_msg=f"indices {xs} k={k} s={s} p={p}")
    g = rand(rng, y.shape, dtype)
    dx = F.max_pool2d_backward(g, idx, xs, k, stride=s, padding=p, threads=nt)
    rdx = ref_pool_backward(g, ridx, xs)
    assert_close(dx, rdx, np.abs(rdx) * 4, dtype, "max_pool2d_backward")


# ---------------------------------------------------------------- linear
@settings(max_examples=80, **SETTINGS)
@given(st.integers(1, 40), st.integers(1, 70), st.integers(1, 40), dtypes, seeds, threads,
       st.booleans(), st.sampled_from([0.0, 0.0, 0.01, 1.5]))
def test_linear_forward_backward(n, fin, fout, dtype, seed, nt, use_bias, l2):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, (n, fin), dtype), rand(rng, (fout, fin), dtype)
    b = rand(rng, fout, dtype) if use_bias else None
    y = F.linear(x, w, b, threads=nt)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T + (0 if b is None else b.astype(np.float64))
    aref = np.abs(x64) @ np.abs(w64).T + (0 if b is None else np.abs(b.astype(np.float64)))
    assert_close(y, ref, aref, dtype, f"linear {n}x{fin} -> {fout}")
    g = rand(rng, (n, fout), dtype)
    g64 = g.astype(np.float64)
    dx, dw, db = F.linear_backward(g, x, w, l2=l2, need_bias_grad=use_bias, threads=nt)
    assert_close(dx, g64 @ w64, np.abs(g64) @ np.abs(w64), dtype, "linear dx")
    assert_close(dw, g64.T @ x64 + 2 * l2 * w64,
                 np.abs(g64).T @ np.abs(x64) + 2 * l2 * np.abs(w64), dtype, "linear dW")
    if use_bias:
        assert_close(db, g64.sum(0), np.abs(g64).sum(0), dtype, "linear db")
    else:
        assert db is None


# ---------------------------------------------------------------- activations
shapes_any = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


@settings(max_examples=40, **SETTINGS)
@given(shapes_any, dtypes, seeds, threads, st.sampled_from([1.0, 10.0, 1e4]))
def test_relu_sigmoid(shape, dtype, seed, nt, scale):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, dtype, scale)
    g = rand(rng, shape, dtype)
    y = F.relu(x, threads=nt)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    np.testing.assert_array_equal(F.relu_backward(g, y, threads=nt), np.where(y > 0, g, 0))
    s = F.sigmoid(x, threads=nt)
    x64 = x.astype(np.float64)
    ref = np.where(x64 >= 0, 1 / (1 + np.exp(-np.abs(x64))),
                   np.exp(-np.abs(x64)) / (1 + np.exp(-np.abs(x64))))
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    rel = 4e-7 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(s, ref, rtol=rel * 4, atol=rel)
    s64 = s.astype(np.float64)
    assert_close(F.sigmoid_backward(g, s, threads=nt), g * s64 * (1 - s64),
                 np.abs(g * s64 * (1 - s64)) * 4, dtype, "sigmoid_backward")


# ---------------------------------------------------------------- losses
@settings(max_examples=100, **SETTINGS)
@given(st.integers(1, 20), st.integers(1, 12), dtypes, seeds, threads,
       st.sampled_from(["mean", "sum"]), st.sampled_from([1.0, 30.0, 1e4]),
       st.sampled_from([np.int64, np.int32, np.uint8]))
def test_losses(n, c, dtype, seed, nt, reduction, scale, label_dtype):
    rng = np.random.default_rng(seed)
    s = rand(rng, (n, c), dtype, scale)
    y = rng.integers(0, c, n).astype(label_dtype)
    s64 = s.astype(np.float64)
    yi = y.astype(np.int64)
    k = 1.0 / n if reduction == "mean" else 1.0
    onehot = np.eye(c)[yi]
    rows = np.arange(n)
    rel = 5e-6 if dtype == np.float32 else 1e-12

    # softmax cross-entropy
    lse = ref_logsumexp(s64)
    li = lse - s64[rows, yi]
    p = np.exp(s64 - lse[:, None])
    probs = np.empty_like(s)
    loss, g = F.softmax_cross_entropy(s, y, reduction=reduction, probs=probs, threads=nt)
    assert np.isfinite(loss) and np.isfinite(g).all()
    np.testing.assert_allclose(loss, k * li.sum(), rtol=rel, atol=rel * (1 + np.abs(lse).max()))
    np.testing.assert_allclose(g, k * (p - onehot), rtol=0, atol=rel * 4 * k)
    np.testing.assert_allclose(probs, p, rtol=0, atol=rel * 4)
    np.testing.assert_allclose(F.softmax(s, threads=nt), p, rtol=0, atol=rel * 4)

    # multiclass SVM
    margin = 1.0
    m = np.maximum(0, s64 - s64[rows, yi][:, None] + margin)
    m[rows, yi] = 0
    gs = (m > 0).astype(np.float64)
    gs[rows, yi] = -gs.sum(1)
    loss, g = F.multiclass_svm(s, y, margin=margin, reduction=reduction, threads=nt)
    aterm = np.abs(s64).max() * 2 + 1
    np.testing.assert_allclose(loss, k * m.sum(), rtol=rel, atol=rel * aterm * c * n)
    # a margin term within rounding of 0 may go either way in float32
    near = np.abs(s64 - s64[rows, yi][:, None] + margin) < rel * aterm * 4
    ok = np.isclose(g, k * gs, rtol=0, atol=1e-6 * k) | near | near.any(1, keepdims=True)
    assert ok.all(), f"svm grad wrong at {np.argwhere(~ok)[:3]}"

    # MSE with labels (one-hot) and with float targets
    loss, g = F.mse(s, y, reduction=reduction, threads=nt)
    np.testing.assert_allclose(loss, k * 0.5 * ((s64 - onehot) ** 2).sum(), rtol=rel * 4)
    np.testing.assert_allclose(g, k * (s64 - onehot), rtol=rel, atol=rel * k)
    t = rand(rng, (n, c), dtype, scale)
    loss, g = F.mse(s, t, reduction=reduction, threads=nt)
    d = s64 - t.astype(np.float64)
    np.testing.assert_allclose(loss, k * 0.5 * (d ** 2).sum(), rtol=rel * 4)
    np.testing.assert_allclose(g, k * d, rtol=rel, atol=rel * k * scale)

    # L2
    lam = 0.25
    np.testing.assert_allclose(F.l2_penalty([s, t], lam),
                               lam * ((s64 ** 2).sum() + (t.astype(np.float64) ** 2).sum()),
                               rtol=1e-12)


@settings(max_examples=25, **SETTINGS)
@given(shapes_any, dtypes, seeds, threads, st.floats(0.0, 0.99), st.booleans(),
       st.sampled_from([0.0, 1e-3]))
def test_sgd_update(shape, dtype, seed, nt, mu, nesterov, wd):
    rng = np.random.default_rng(seed)
    p, g = rand(rng, shape, dtype), rand(rng, shape, dtype)
    v = rand(rng, shape, dtype) if mu > 0 else None
    nesterov = nesterov and mu > 0
    p64, g64 = p.astype(np.float64), g.astype(np.float64) + wd * p.astype(np.float64)
    if v is not None:
        v64 = mu * v.astype(np.float64) + g64
        step = g64 + mu * v64 if nesterov else v64
    else:
        step = g64
    ref = p64 - 0.1 * step
    F.sgd_update(p, g, lr=0.1, velocity=v, momentum=mu, nesterov=nesterov, weight_decay=wd,
                 threads=nt)
    assert_close(p, ref, np.abs(p64) + 0.1 * (np.abs(g64) + 2 * np.abs(step)) * 4, dtype, "sgd")


# ---------------------------------------------------------------- fixed edge cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("xs,ws,s,p", [
    ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1), (0, 0)),    # 1x1 everything
    ((1, 1, 1, 1), (2, 1, 3, 3), (1, 1), (1, 1)),    # 1x1 input, 3x3 kernel via padding
    ((2, 3, 5, 5), (4, 3, 5, 5), (1, 1), (0, 0)),    # kernel == input
    ((1, 2, 3, 4), (2, 2, 5, 6), (1, 1), (1, 1)),    # kernel == padded input
    ((2, 1, 9, 9), (3, 1, 2, 2), (5, 5), (0, 0)),    # stride > kernel
    ((1, 1, 7, 3), (1, 1, 1, 1), (4, 2), (3, 0)),    # 1x1 kernel, padding larger than kernel
    ((1, 1, 32, 1), (1, 1, 3, 1), (1, 1), (1, 0)),   # one column
])
def test_conv2d_edges(xs, ws, s, p, dtype):
    rng = np.random.default_rng(0)
    x, w, b = rand(rng, xs, dtype), rand(rng, ws, dtype), rand(rng, ws[0], dtype)
    y = F.conv2d(x, w, b, stride=s, padding=p)
    ref, aref = ref_conv(x, w, b, s, p)
    assert_close(y, ref, aref, dtype, "conv2d edge")
    g = rand(rng, y.shape, dtype)
    dx, dw, db = F.conv2d_backward(g, x, w, stride=s, padding=p)
    (rdx, adx), (rdw, adw), (rdb, adb) = ref_conv_backward(g, x, w, s, p)
    assert_close(dx, rdx, adx, dtype, "dx edge")
    assert_close(dw, rdw, adw, dtype, "dW edge")


@pytest.mark.parametrize("xs,k,s,p", [
    ((1, 1, 1, 1), (1, 1), (1, 1), (0, 0)),
    ((1, 1, 3, 3), (3, 3), (1, 1), (1, 1)),
    ((2, 3, 4, 4), (4, 4), (1, 1), (0, 0)),          # kernel == input
    ((1, 1, 9, 9), (2, 2), (5, 5), (0, 0)),          # stride > kernel: cells skipped
    ((1, 1, 2, 5), (2, 1), (3, 7), (1, 0)),
])
def test_max_pool2d_edges(xs, k, s, p):
    x = np.random.default_rng(1).standard_normal(xs).astype(np.float32)
    y, idx = F.max_pool2d(x, k, stride=s, padding=p)
    ry, ridx = ref_pool(x, k, s, p)
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    dx = F.max_pool2d_backward(np.ones_like(y), idx, xs, k, stride=s, padding=p)
    np.testing.assert_array_equal(dx, ref_pool_backward(np.ones_like(y), ridx, xs))
