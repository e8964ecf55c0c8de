"""tanh, leaky ReLU, dropout, residual add, scale, sum of squares and Adam/AdamW
kernels against NumPy twins, central differences, PyTorch and thread counts."""
import numpy as np
import pytest

from cdl._kernels import elementwise as ew
from cdl._kernels import losses

DTYPES = [np.float32, np.float64]
BIG = 600_001            # over the 2^19 elements from which the flat kernels go parallel


def numeric_grad(f, a, h=1e-6):
    g = np.zeros_like(a)
    for i in range(a.size):
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


# ------------------------------------------------------------ tanh

SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.3999999, 0.4, 0.4000001, -0.4, 0.7, 1.0, 5.0,
           9.0, 9.1, 19.0, 20.0, 44.0, -44.0, 400.0, 1e30, -1e30]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_forward_within_a_few_ulp(dtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(50_000) * 3, np.linspace(-1, 1, 100_001),
                        rng.uniform(-25, 25, 20_000), SPECIAL]).astype(dtype)
    y = np.empty_like(x)
    ew.tanh_forward(x, y, 1)
    ref = np.tanh(x.astype(np.float64)).astype(dtype)
    np.testing.assert_array_max_ulp(y, ref, maxulp=4)
    assert np.signbit(y[x == 0]).tolist() == np.signbit(x[x == 0]).tolist()
    z = np.array([np.inf, -np.inf, np.nan], dtype)
    ew.tanh_forward(z, z, 1)                    # in place
    assert z[0] == 1 and z[1] == -1 and np.isnan(z[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_backward_and_gradcheck(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(1000).astype(dtype)
    y, g, dx = np.empty_like(x), rng.standard_normal(1000).astype(dtype), np.empty_like(x)
    ew.tanh_forward(x, y, 1)
    ew.tanh_backward(g, y, dx, 1)
    y64 = y.astype(np.float64)
    want = g.astype(np.float64) * (1 - y64 * y64)
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(dx, want, rtol=tol, atol=tol)
    if dtype == np.float64:
        x, G = rng.standard_normal(50) * 2, rng.standard_normal(50)
        out = np.empty_like(x)

        def loss():
            ew.tanh_forward(x, out, 1)
            return float(out @ G)
        ew.tanh_forward(x, out, 1)
        ew.tanh_backward(G, out, dx[:50], 1)
        np.testing.assert_allclose(dx[:50], numeric_grad(loss, x), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------ leaky ReLU

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.01, 0.2, 0.0, -0.5])
def test_leaky_relu_matches_numpy(dtype, slope):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal(1001), [0.0, -0.0, np.inf, -np.inf]]).astype(dtype)
    y, g, dx = np.empty_like(x), rng.standard_normal(x.size).astype(dtype), np.empty_like(x)
    ew.leaky_relu_forward(x, y, slope, 1)
    s = dtype(slope)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(y, np.where(x > 0, x, x * s))
    ew.leaky_relu_backward(g, x, dx, slope, 1)
    np.testing.assert_array_equal(dx, np.where(x > 0, g, g * s))
    n = np.array([np.nan], dtype)
    ew.leaky_relu_forward(n, n, slope, 1)
    assert np.isnan(n[0])


def test_leaky_relu_gradcheck():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(60)
    x[np.abs(x) < 1e-3] = 0.5                   # keep away from the kink
    G, out, dx = rng.standard_normal(60), np.empty(60), np.empty(60)

    def loss():
        ew.leaky_relu_forward(x, out, 0.1, 1)
        return float(out @ G)
    ew.leaky_relu_backward(G, x, dx, 0.1, 1)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["relu", "sigmoid", "tanh", "leaky_relu"])
def test_activation_bound_calls_equal_functions(kind):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(BIG).astype(np.float32)
    g = rng.standard_normal(BIG).astype(np.float32)
    fwd = {"relu": lambda a, o, nt: ew.relu_forward(a, o, nt),
           "sigmoid": lambda a, o, nt: ew.sigmoid_forward(a, o, nt),
           "tanh": lambda a, o, nt: ew.tanh_forward(a, o, nt),
           "leaky_relu": lambda a, o, nt: ew.leaky_relu_forward(a, o, 0.3, nt)}[kind]
    want_y = np.empty_like(x)
    fwd(x, want_y, 2)
    y = np.empty_like(x)
    f = ew.ActivationForward(kind, np.zeros_like(x), y, slope=0.3)
    f.bind_input(x)
    f.run(2)
    assert y.tobytes() == want_y.tobytes()
    saved = x if kind == "leaky_relu" else y
    want_dx = np.empty_like(x)
    if kind == "leaky_relu":
        ew.leaky_relu_backward(g, x, want_dx, 0.3, 2)
    else:
        getattr(ew, f"{kind}_backward")(g, y, want_dx, 2)
    dx = np.empty_like(x)
    ew.ActivationBackward(kind, g, saved, dx, slope=0.3).run(2)
    assert dx.tobytes() == want_dx.tobytes()
    for nt in (1, 3):                           # and any thread count gives the same bits
        y2, dx2 = np.empty_like(x), np.empty_like(x)
        f2 = ew.ActivationForward(kind, x, y2, 0.3)
        f2.run(nt)
        ew.ActivationBackward(kind, g, x if kind == "leaky_relu" else y2, dx2, 0.3).run(nt)
        assert y2.tobytes() == y.tobytes() and dx2.tobytes() == dx.tobytes()


def test_activation_kind_is_checked():
    a = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="kind must be one of"):
        ew.ActivationForward("gelu", a, a)
    with pytest.raises(ValueError, match="kind must be one of"):
        ew.ActivationBackward("elu", a, a, a)


# ------------------------------------------------------------ dropout

def uniforms(n, seed, stream, counter):
    u = np.empty(n)
    ew.dropout_uniforms(u, seed, stream, counter)
    return u


def dropout(x, p, seed, stream, counter, nt=1):
    out, mask = np.empty_like(x), np.empty(x.size, np.uint8)
    ew.dropout_forward(x, out, mask, p, seed, stream, counter, nt)
    return out, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_dropout_matches_its_numpy_twin(dtype, p):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(10_007).astype(dtype)
    out, mask = dropout(x, p, 123, 4, 9)
    keep = uniforms(x.size, 123, 4, 9) >= p
    np.testing.assert_array_equal(mask, keep.astype(np.uint8))
    scale = dtype(1 / (1 - p)) if p < 1 else dtype(0)
    np.testing.assert_array_equal(out, np.where(keep, x * scale, dtype(0)))
    g = rng.standard_normal(x.size).astype(dtype)
    dx = np.empty_like(g)
    ew.dropout_backward(g, mask, dx, p, 1)
    np.testing.assert_array_equal(dx, np.where(keep, g * scale, dtype(0)))
    if p == 1.0:
        assert not mask.any() and not out.any() and not np.isnan(out).any()
    if p == 0.0:
        assert mask.all() and out.tobytes() == x.tobytes()


def test_uniforms_are_uniform_and_use_all_53_bits():
    stats = pytest.importorskip("scipy.stats")
    u = uniforms(200_000, 1, 0, 0)
    assert ((u >= 0) & (u < 1)).all()
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    k = (u * 2.0 ** 53).astype(np.uint64)
    assert np.array_equal(k.astype(np.float64) * 2.0 ** -53, u)       # u = k / 2^53 exactly
    assert np.unique(k & 1).size == 2 and np.unique(k >> 52).size == 2
    # successive elements are not correlated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(u.size)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keep_rate(p):
    n = 400_000
    _, mask = dropout(np.ones(n, np.float32), p, 7, 1, 2)
    assert abs(mask.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)


def test_dropout_streams_counters_and_seeds_are_independent():
    n, p = 200_000, 0.5
    x = np.ones(n, np.float32)
    masks = {key: dropout(x, p, *key)[1].astype(np.float64)
             for key in [(1, 0, 0), (1, 1, 0), (1, 0, 1), (2, 0, 0), (1, 2, 0), (1, 0, 2),
                         (0, 0, 0), (1, 1, 1)]}
    keys = list(masks)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            corr = np.corrcoef(masks[a], masks[b])[0, 1]
            assert abs(corr) < 5 / np.sqrt(n), (a, b, corr)
    # a shifted copy of another mask is no independent mask either
    a, b = masks[(1, 0, 0)], masks[(1, 0, 1)]
    for shift in (1, 2, 3, 64):
        assert abs(np.corrcoef(a[shift:], b[:-shift])[0, 1]) < 5 / np.sqrt(n)
        assert abs(np.corrcoef(a[shift:], a[:-shift])[0, 1]) < 5 / np.sqrt(n)
    # and the same key gives the same mask
    assert np.array_equal(dropout(x, p, 1, 1, 0)[1], masks[(1, 1, 0)].astype(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_bitwise_for_any_thread_count_and_bound_calls(dtype):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(BIG).astype(dtype)
    g = rng.standard_normal(BIG).astype(dtype)
    res = []
    for nt in (1, 2, 3):
        out, mask = dropout(x, 0.3, 11, 5, 17, nt)
        dx = np.empty_like(g)
        ew.dropout_backward(g, mask, dx, 0.3, nt)
        res.append((out.tobytes(), mask.tobytes(), dx.tobytes()))
    assert res[0] == res[1] == res[2]
    if dtype == np.float32:
        out, mask, dx = np.empty_like(x), np.empty(BIG, np.uint8), np.empty_like(g)
        f = ew.DropoutForward(np.zeros_like(x), out, mask, 0.3, 11, 5)
        f.bind_input(x)
        f.run(2, 17)
        ew.DropoutBackward(g, mask, dx, 0.3).run(2)
        assert (out.tobytes(), mask.tobytes(), dx.tobytes()) == res[0]
        f.run(2, 18)                            # the next counter: a new mask
        assert mask.tobytes() != res[0][1]


def test_dropout_seed_and_stream_take_full_64_bits():
    x = np.ones(1000, np.float32)
    big = 2 ** 64 - 1
    m1 = dropout(x, 0.5, big, big, big)[1]
    m2 = dropout(x, 0.5, big - 1, big, big)[1]
    assert not np.array_equal(m1, m2)
    np.testing.assert_array_equal(m1, (uniforms(1000, big, big, big) >= 0.5).astype(np.uint8))


# ------------------------------------------------------------ add, scale, sum of squares

@pytest.mark.parametrize("dtype", DTYPES)
def test_add(dtype):
    rng = np.random.default_rng(7)
    a = rng.standard_normal(BIG).astype(dtype)
    b = rng.standard_normal(BIG).astype(dtype)
    for relu in (False, True):
        want = a + b
        if relu:
            want = np.maximum(want, 0)
        outs = []
        for nt in (1, 2, 3):
            out = np.empty_like(a)
            ew.add(a, b, out, relu, nt)
            outs.append(out.tobytes())
        assert outs[0] == outs[1] == outs[2] == want.tobytes()
        a2, b2 = a.copy(), b.copy()
        ew.add(a2, b, a2, relu, 2)               # out aliases a
        ew.add(a, b2, b2, relu, 2)               # out aliases b
        assert a2.tobytes() == want.tobytes() and b2.tobytes() == want.tobytes()
    n = np.array([np.nan, -1.0], dtype)
    ew.add(n, n, n, True, 1)
    assert np.isnan(n[0]) and n[1] == 0


def test_add_bound_call():
    rng = np.random.default_rng(8)
    a, b = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
    out = np.empty_like(a)
    f = ew.Add(np.zeros_like(a), np.zeros_like(b), out, True)
    f.bind_a(a)
    f.bind_b(b)
    f.run(1)
    assert out.tobytes() == np.maximum(a + b, 0).tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale(dtype):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(BIG).astype(dtype)
    res = []
    for nt in (1, 2, 3):
        y = x.copy()
        ew.scale(y, 0.37, nt)
        res.append(y.tobytes())
    assert res[0] == res[1] == res[2] == (x * dtype(0.37)).tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_squares_threads(dtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal(1_000_003).astype(dtype)
    sums = [losses.sum_squares(x, nt) for nt in (1, 2, 3)]
    assert sums[0] == sums[1] == sums[2] == losses.sum_squares(x)
    np.testing.assert_allclose(sums[0], np.sum(x.astype(np.float64) ** 2), rtol=1e-12)
    small = x[:1001]
    v = small.astype(np.float64) ** 2
    # up to one part: the four interleaved sums of before
    want = (v[0:1000:4].sum() + v[1000] + v[1:1000:4].sum()) + \
        (v[2:1000:4].sum() + v[3:1000:4].sum())
    np.testing.assert_allclose(losses.sum_squares(small, 2), want, rtol=1e-14)
    assert losses.sum_squares(x[:0], 2) == 0.0


# ------------------------------------------------------------ Adam / AdamW

def ref_adam(p, g, m, v, lr, b1, b2, eps, wd, decoupled, step):
    """torch.optim.Adam's single-tensor step in float64; returns new p, m, v."""
    if wd:
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    m = m + (1 - b1) * (g - m)
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / np.sqrt(1 - b2 ** step) + eps
    return p - lr / (1 - b1 ** step) * m / denom, m, v


ADAM_CASES = [dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.0),
              dict(lr=1e-2, b1=0.8, b2=0.99, eps=1e-6, wd=0.05),
              dict(lr=3e-3, b1=0.3, b2=0.9, eps=1e-8, wd=0.3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("opts", ADAM_CASES)
def test_adam_matches_numpy_twin(dtype, decoupled, opts):
    rng = np.random.default_rng(11)
    n = 3000
    p = rng.standard_normal(n).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    chunks = np.array([[0, 1000, 0], [1000, 1990, 1], [2000, 3000, 2]], np.int64)
    p0 = p.copy()
    rp, rm, rv = (a.astype(np.float64) for a in (p, m, v))
    for step in range(1, 6):
        g = rng.standard_normal(n).astype(dtype)
        ew.adam_update_chunks(p, g, m, v, chunks, opts["lr"], opts["b1"], opts["b2"],
                              opts["eps"], opts["wd"], decoupled, step, 2)
        rp, rm, rv = ref_adam(rp, g.astype(np.float64), rm, rv, opts["lr"], opts["b1"],
                              opts["b2"], opts["eps"], opts["wd"], decoupled, step)
    live = np.r_[0:1990, 2000:3000]
    tol = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(p[live], rp[live], rtol=tol, atol=tol * 1e-2)
    np.testing.assert_allclose(m[live], rm[live], rtol=tol, atol=tol)
    np.testing.assert_allclose(v[live], rv[live], rtol=tol, atol=tol)
    assert p[1990:2000].tobytes() == p0[1990:2000].tobytes()      # the gap is untouched
    assert not m[1990:2000].any() and not v[1990:2000].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_torch(dtype, decoupled):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    n = 257
    p = rng.standard_normal(n).astype(dtype)
    m, v = np.zeros_like(p), np.zeros_like(p)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = cls([tp], lr=0.01, betas=(0.85, 0.995), eps=1e-7, weight_decay=0.1,
              foreach=False)
    chunks = np.array([[0, 100, 0], [100, n, 1]], np.int64)
    for step in range(1, 8):
        g = rng.standard_normal(n).astype(dtype)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        ew.adam_update_chunks(p, g, m, v, chunks, 0.01, 0.85, 0.995, 1e-7, 0.1, decoupled,
                              step, 2)
    st = opt.state[tp]
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p, tp.detach().numpy(), **tol)
    np.testing.assert_allclose(m, st["exp_avg"].numpy(), **tol)
    np.testing.assert_allclose(v, st["exp_avg_sq"].numpy(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_bitwise_for_any_thread_count_and_bound_call(dtype):
    rng = np.random.default_rng(13)
    n = 100_000
    p0 = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    chunks = np.array([[lo, min(lo + 16384, n), c] for c, lo in enumerate(range(0, n, 16384))],
                      np.int64)
    res = []
    for nt in (1, 2, 3, 5):
        p, m, v = p0.copy(), np.full_like(p0, 0.1), np.full_like(p0, 0.2)
        ew.adam_update_chunks(p, g, m, v, chunks, 1e-3, 0.9, 0.999, 1e-8, 0.01, True, 3, nt)
        res.append((p.tobytes(), m.tobytes(), v.tobytes()))
    assert all(r == res[0] for r in res)
    if dtype == np.float32:
        p, m, v = p0.copy(), np.full_like(p0, 0.1), np.full_like(p0, 0.2)
        ew.AdamChunks(p, g, m, v, chunks).run(1e-3, 0.9, 0.999, 1e-8, 0.01, True, 3, 2)
        assert (p.tobytes(), m.tobytes(), v.tobytes()) == res[0]


def test_adam_refuses_bad_chunks_and_step():
    p = np.zeros(10, np.float32)
    for bad in ([[0, 11, 0]], [[5, 4, 0]], [[0, 3, -1]]):
        with pytest.raises(ValueError, match="adam_update_chunks: chunk 0"):
            ew.adam_update_chunks(p, p, p.copy(), p.copy(), np.array(bad, np.int64), 0.1, 0.9,
                                  0.999, 1e-8, 0.0, False, 1, 1)
    with pytest.raises(ValueError, match="one length"):
        ew.adam_update_chunks(p, p[:5], p.copy(), p.copy(), np.array([[0, 5, 0]], np.int64),
                              0.1, 0.9, 0.999, 1e-8, 0.0, False, 1, 1)
    with pytest.raises(ValueError, match="step counts from 1"):
        ew.adam_update_chunks(p, p, p.copy(), p.copy(), np.array([[0, 5, 0]], np.int64),
                              0.1, 0.9, 0.999, 1e-8, 0.0, False, 0, 1)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_build_agrees(isa):
    import importlib

    from cdl._kernels import _runtime
    if isa not in _runtime.cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._elementwise_{isa}")
    rng = np.random.default_rng(14)
    for dtype in DTYPES:
        x = (rng.standard_normal(5001) * 3).astype(dtype)
        y = np.empty_like(x)
        mod.tanh_forward(x, y, 2)
        np.testing.assert_array_max_ulp(y, np.tanh(x.astype(np.float64)).astype(dtype), 4)
        mask = np.empty(x.size, np.uint8)
        mod.dropout_forward(x, y, mask, 0.4, 5, 6, 7, 2)
        # the mask is integer arithmetic: the same bits in every build
        np.testing.assert_array_equal(mask, (uniforms(x.size, 5, 6, 7) >= 0.4).astype(np.uint8))
        p, m, v = x.copy(), np.zeros_like(x), np.zeros_like(x)
        g = rng.standard_normal(x.size).astype(dtype)
        mod.adam_update_chunks(p, g, m, v, np.array([[0, x.size, 0]], np.int64), 1e-2, 0.9,
                               0.999, 1e-8, 0.1, True, 1, 2)
        rp, _, _ = ref_adam(x.astype(np.float64), g.astype(np.float64), 0.0, 0.0, 1e-2, 0.9,
                            0.999, 1e-8, 0.1, True, 1)
        tol = 2e-6 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(p, rp, rtol=tol, atol=tol * 1e-2)
