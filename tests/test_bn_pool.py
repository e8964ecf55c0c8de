"""BatchNorm (+ ReLU) with the 2x2 max-pool after it as one training pass.

- The pooled kernels (batchnorm_forward_train / batchnorm_backward with pool
  arrays) give bit for bit the batch norm followed by max_pool2d_forward, and
  max_pool2d_backward followed by the batch norm's backward: values, indices,
  every gradient and the running statistics, with and without ReLU, ties, NaN,
  all-negative windows, the smallest and largest planes taken, both dtypes,
  1/2/3 threads, every ISA build, and the float32 bound calls.
- Indices outside their window are counted, never followed.
- Sequential merges the pool into the BatchNorm's training pass (Chain.fuse:
  ``merges_next``) where the shapes allow, keeps it at inference, and every
  result, index and gradient equals the unmerged model's, layer by layer and
  on the training plan.
"""
import importlib

import numpy as np
import pytest

import cdl
from cdl._kernels import norm, pool
from cdl._kernels._runtime import cpu_supports

THREADS = (1, 2, 3)


def _case(shape, dtype, seed=0, nan=True):
    rng = np.random.default_rng(seed)
    n, c, h, w = shape
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2, (1, c, 1, 1))
         + rng.uniform(-1, 1, (1, c, 1, 1))).astype(dtype)
    x[0, 0, :2, :2] = 0.25                      # a tie in one window
    x[0, -1, 2:4, :2] = -50                     # an all-negative window after ReLU
    if nan and n > 1 and c > 1:
        x[1, 1, 1, 1] = np.nan                  # NaN wins its window (channel 1 all NaN)
    w_ = rng.uniform(0.5, 1.5, c).astype(dtype)
    b_ = rng.standard_normal(c).astype(dtype)
    return x, w_, b_


def _unpooled(mod, pmod, x, w, b, relu, nt):
    n, c, h, wd = x.shape
    dtype = x.dtype
    out = np.empty_like(x)
    mean, invstd = np.empty(c, dtype), np.empty(c, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    x3, out3 = x.reshape(n, c, -1), out.reshape(n, c, -1)
    mod.batchnorm_forward_train(x3, w, b, out3, mean, invstd, rm, rv, 0.1, 1e-5, relu, nt)
    po = np.empty((n, c, h // 2, wd // 2), dtype)
    pi = np.empty(po.shape, np.int32)
    pmod.max_pool2d_forward(out, po, pi, 2, 2, 2, 2, 0, 0, nt)
    g = np.random.default_rng(5).standard_normal(po.shape).astype(dtype)
    g[0, 0, 0, 0] = -0.0
    gp = np.empty_like(x)
    pmod.max_pool2d_backward(g, pi, gp, 2, 2, 2, 2, 0, 0, nt)
    dx, dw, db = np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)
    mod.batchnorm_backward(gp.reshape(n, c, -1), x3, out3, w, mean, invstd,
                           dx.reshape(n, c, -1), dw, db, relu, nt)
    return g, (po, pi, mean, invstd, rm, rv, dx, dw, db)


def _pooled(mod, x, w, b, g, relu, nt):
    n, c, h, wd = x.shape
    dtype = x.dtype
    mean, invstd = np.empty(c, dtype), np.empty(c, dtype)
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    po = np.full((n, c, h // 2, wd // 2), np.nan, dtype)
    pi = np.full(po.shape, -7, np.int32)
    x3 = x.reshape(n, c, -1)
    mod.batchnorm_forward_train(x3, w, b, None, mean, invstd, rm, rv, 0.1, 1e-5, relu, nt,
                                po.reshape(n, c, -1), pi.reshape(n, c, -1), wd)
    dx, dw, db = np.full_like(x, np.nan), np.empty(c, dtype), np.empty(c, dtype)
    bad = mod.batchnorm_backward(g.reshape(n, c, -1), x3, po.reshape(n, c, -1), w, mean,
                                 invstd, dx.reshape(n, c, -1), dw, db, relu, nt,
                                 pi.reshape(n, c, -1), wd)
    assert bad == 0
    return po, pi, mean, invstd, rm, rv, dx, dw, db


def _same(a, b):
    return all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))


SHAPES = [(64, 6, 28, 28), (5, 16, 10, 10), (3, 7, 4, 4), (2, 3, 32, 32), (4, 5, 6, 8),
          (1, 2, 4, 6), (3, 4, 6, 22)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [True, False])
def test_pooled_pass_equals_batchnorm_then_maxpool(shape, dtype, relu):
    x, w, b = _case(shape, dtype)
    results = []
    for nt in THREADS:
        g, want = _unpooled(norm, pool, x, w, b, relu, nt)
        got = _pooled(norm, x, w, b, g, relu, nt)
        assert _same(got, want), f"threads={nt}"
        results.append(got)
    assert all(_same(r, results[0]) for r in results)


def test_pooled_pass_matches_numpy():
    # the pooled output and gradients from plain NumPy (float64)
    x, w, b = _case((4, 3, 6, 8), np.float64, seed=3)
    x[1, 1, 1, 1] = 0.5
    n, c, h, wd = x.shape
    g = np.random.default_rng(4).standard_normal((n, c, h // 2, wd // 2))
    po, pi, mean, invstd, rm, rv, dx, dw, db = _pooled(norm, x, w, b, g, True, 2)
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    xhat = (x - mu) / np.sqrt(var + 1e-5)
    y = np.maximum(xhat * w[:, None, None] + b[:, None, None], 0)
    win = y.reshape(n, c, h // 2, 2, wd // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, h // 2, wd // 2, 4)
    np.testing.assert_allclose(po, win.max(axis=-1), rtol=1e-12, atol=1e-12)
    k = win.argmax(axis=-1)
    rows = 2 * np.arange(h // 2)[:, None] + k // 2
    cols = 2 * np.arange(wd // 2)[None, :] + k % 2
    np.testing.assert_array_equal(pi, rows * wd + cols)
    gy = np.zeros_like(x)
    np.put_along_axis(gy.reshape(n, c, -1), pi.reshape(n, c, -1),
                      np.where(po > 0, g, 0).reshape(n, c, -1), axis=2)
    m = n * h * wd
    db_ref = gy.sum(axis=(0, 2, 3))
    dw_ref = (gy * xhat).sum(axis=(0, 2, 3))
    dx_ref = (w / np.sqrt(var.ravel() + 1e-5))[:, None, None] / m * (
        m * gy - db_ref[:, None, None] - xhat * dw_ref[:, None, None])
    np.testing.assert_allclose(db, db_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)


def test_foreign_indices_are_counted_not_followed():
    x, w, b = _case((2, 3, 8, 8), np.float32, nan=False)
    n, c, h, wd = x.shape
    g = np.ones((n, c, 4, 4), np.float32)
    po, pi, mean, invstd, *_ = _pooled(norm, x, w, b, g, False, 1)
    bad_idx = pi.copy()
    bad_idx[0, 0, 0, 0] = 10 ** 6          # far outside the plane
    bad_idx[1, 2, 3, 3] = 0                # another window's cell
    bad_idx[1, 1, 0, 1] = -1
    dx = np.empty_like(x)
    bad = norm.batchnorm_backward(g.reshape(n, c, -1), x.reshape(n, c, -1), po.reshape(n, c, -1),
                                  w, mean, invstd, dx.reshape(n, c, -1), None, None, False, 2,
                                  bad_idx.reshape(n, c, -1), wd)
    assert bad == 3
    assert np.isfinite(dx).all()


@pytest.mark.parametrize("shape", [(64, 6, 28, 28), (5, 16, 10, 10)], ids=str)
def test_parameter_gradients_alone_equal_those_with_dx(shape):
    # Without grad_input the unpooled gradient goes to the workspace, not dx.
    x, w, b = _case(shape, np.float32)
    n, c, h, wd = shape
    g = np.random.default_rng(2).standard_normal((n, c, h // 2, wd // 2)).astype(np.float32)
    po, pi, mean, invstd, _, _, _, dw, db = _pooled(norm, x, w, b, g, True, 2)
    dw2, db2 = np.empty_like(dw), np.empty_like(db)
    norm.batchnorm_backward(g.reshape(n, c, -1), x.reshape(n, c, -1), po.reshape(n, c, -1),
                            w, mean, invstd, None, dw2, db2, True, 2, pi.reshape(n, c, -1), wd)
    assert dw2.tobytes() == dw.tobytes() and db2.tobytes() == db.tobytes()


@pytest.mark.parametrize("target", ["x", "grad_out", "out", "pool_indices"])
@pytest.mark.parametrize("start", [8, "last", "after", "ends_at_first", "before"])
def test_pooled_backward_refuses_overlapping_grad_input(target, start):
    # dx holds the unpooled gradient before x, grad_out, out and the indices are all
    # read: an array sharing even dx's first or last element is refused; one right
    # before or after it is taken, with the results of separate arrays.
    x, w, b = _case((2, 3, 8, 8), np.float32, nan=False)
    n, c, h, wd = x.shape
    size = n * c * h * wd
    g = np.random.default_rng(3).standard_normal((n, c, 4, 4)).astype(np.float32)
    po, pi, mean, invstd, *_, dw, db = _pooled(norm, x, w, b, g, True, 1)
    want = np.empty_like(x)
    norm.batchnorm_backward(g.reshape(n, c, -1), x.reshape(n, c, -1), po.reshape(n, c, -1),
                            w, mean, invstd, want.reshape(n, c, -1), None, None, True, 1,
                            pi.reshape(n, c, -1), wd)
    arrays = {"x": x.reshape(n, c, -1), "grad_out": g.reshape(n, c, -1),
              "out": po.reshape(n, c, -1), "pool_indices": pi.reshape(n, c, -1)}
    big = np.zeros(size * 3, np.float32)
    dx = big[size:2 * size].reshape(n, c, -1)
    src = arrays[target]
    at = size + {"last": size - 1, "after": size, "ends_at_first": 1 - src.size,
                 "before": -src.size}.get(start, start)
    pool = big.view(np.int32) if src.dtype == np.int32 else big
    view = pool[at:at + src.size].reshape(src.shape)
    view[...] = src
    arrays[target] = view
    call = lambda: norm.batchnorm_backward(  # noqa: E731
        arrays["grad_out"], arrays["x"], arrays["out"], w, mean, invstd, dx, None, None,
        True, 1, arrays["pool_indices"], wd)
    if start in ("after", "before"):
        assert call() == 0
        assert dx.tobytes() == want.reshape(dx.shape).tobytes()
    else:
        with pytest.raises(ValueError, match="overlap"):
            call()


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=7), "even height and width"),          # 8x8 plane read as rows of 7
    (dict(width=4, shape=(2, 3, 2, 4)), "16 to"),        # 8 cells: too small
    (dict(width=8, pool_shape=(2, 3, 4, 3)), "shape"),
])
def test_pooled_shapes_are_checked(kwargs, match):
    shape = kwargs.get("shape", (2, 3, 8, 8))
    x, w, b = _case(shape, np.float32)
    n, c, h, wd = shape
    ps = kwargs.get("pool_shape", (n, c, h // 2, wd // 2))
    po, pi = np.empty(ps, np.float32), np.empty(ps, np.int32)
    with pytest.raises(ValueError, match=match):
        norm.batchnorm_forward_train(x.reshape(n, c, -1), w, b, None, np.empty(c, np.float32),
                                     np.empty(c, np.float32), None, None, 0.1, 1e-5, True, 1,
                                     po.reshape(n, c, -1), pi.reshape(n, c, -1),
                                     kwargs["width"])


def test_bound_calls_equal_the_functions():
    x, w, b = _case((8, 4, 12, 10), np.float32)
    n, c, h, wd = x.shape
    g, _ = _unpooled(norm, pool, x, w, b, True, 2)
    want = _pooled(norm, x, w, b, g, True, 2)
    mean, invstd = np.empty(c, np.float32), np.empty(c, np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    po, pi = np.empty_like(want[0]), np.empty_like(want[1])
    dx, dw, db = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
    x3, p3, i3 = x.reshape(n, c, -1), po.reshape(n, c, -1), pi.reshape(n, c, -1)
    norm.BatchNormTrainForward(x3, w, b, None, mean, invstd, rm, rv, 0.1, 1e-5, True,
                               pool_out=p3, pool_indices=i3, width=wd).run(2)
    norm.BatchNormBackward(g.reshape(n, c, -1), x3, p3, w, mean, invstd, dx.reshape(n, c, -1),
                           dw, db, True, pool_indices=i3, width=wd).run(2)
    assert _same((po, pi, mean, invstd, rm, rv, dx, dw, db), want)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_build(isa):
    if isa not in cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._norm_{isa}")
    pmod = importlib.import_module(f"cdl._kernels._pool_{isa}")
    for dtype in (np.float32, np.float64):
        for shape in ((6, 5, 14, 14), (3, 4, 32, 32), (2, 3, 4, 6)):
            for relu in (True, False):
                x, w, b = _case(shape, dtype, seed=11)
                g, want = _unpooled(mod, pmod, x, w, b, relu, 2)
                assert _same(_pooled(mod, x, w, b, g, relu, 2), want), (dtype, shape, relu)


# ------------------------------------------------------------ the layer's merge

def _net(dtype, hw=(12, 12), relu=True, pool=2, seed=4):
    layers = [cdl.Conv2d(2, 4, 3, padding=1, bias=False), cdl.BatchNorm2d(4)]
    layers += [cdl.ReLU()] if relu else []
    h, w = hw
    layers += [cdl.MaxPool2d(pool), cdl.Flatten(), cdl.Linear(4 * (h // pool) * (w // pool), 5)]
    return cdl.Sequential(layers, (2, h, w), dtype=dtype, seed=seed)


def _unmerge(model):
    model.chain.fuse(merge=False)
    model._reset_plans()
    return model


def test_the_chain_merges_only_where_the_shapes_allow():
    m = _net(np.float32)
    bn, mp = m.layers[1], m.layers[3]
    assert bn.merged is mp
    assert [type(l).__name__ for _, l in m.chain.passes] == ["Conv2d", "BatchNorm2d",
                                                             "Flatten", "Linear"]
    assert mp in [l for _, l in m.chain.infer_passes]        # inference keeps the pool
    assert _net(np.float32, relu=False).layers[1].merged is not None   # BN -> MaxPool
    for odd in (_net(np.float32, hw=(11, 12)), _net(np.float32, hw=(34, 34)),
                _net(np.float32, pool=3)):
        assert odd.layers[1].merged is None
    assert _unmerge(_net(np.float32)).layers[1].merged is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [True, False])
def test_merged_model_equals_unmerged(dtype, relu):
    merged, plain = _net(dtype, relu=relu), _unmerge(_net(dtype, relu=relu))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 12, 12)).astype(dtype)
    x[0, :, :3, :3] = np.nan if dtype == np.float64 else 0
    y = rng.integers(0, 5, 6)
    g = rng.standard_normal((6, 5)).astype(dtype)
    pool_layer = 2 + relu
    for nt in (1, 2):
        with cdl.threads(nt):
            outs = []
            for m in (merged, plain):
                out = m.forward(x)
                dx = m.backward(g)
                grads = [gr.copy() for _, _, gr in m.parameters()]
                idx = m.layers[pool_layer].indices.copy()
                loss = cdl.SoftmaxCrossEntropy()
                m.train_step(x, y, loss, cdl.SGD(m, lr=0.1))      # the plan (float32)
                idx2 = m.layers[pool_layer].indices.copy()
                outs.append((out, dx, *grads, idx, idx2, m.predict(x),
                             *[b_.copy() for b_ in m.layers[1].buffers.values()],
                             *[p.copy() for _, p, _ in m.parameters()]))
            assert _same(outs[0], outs[1]), f"threads={nt}"


def test_the_layer_alone_never_merges():
    # BatchNorm2d's own forward/backward keep its shapes; the model's pass merges.
    m = _net(np.float32)
    bn = m.layers[1]
    h = np.random.default_rng(1).standard_normal((3, 4, 12, 12)).astype(np.float32)
    y = bn.forward(h)
    assert y.shape == (3,) + bn.output_shape
    dx = bn.backward(np.ones_like(y))
    assert dx.shape == h.shape
    x = np.random.default_rng(2).standard_normal((3, 2, 12, 12)).astype(np.float32)
    assert m.forward(x).shape == (3, 5) and bn.merged is m.layers[3]
    assert m.layers[3].indices.shape == (3, 4, 6, 6)


def test_fusion_turned_off_and_on_between_steps():
    # Workspaces whose layout follows the fusion (a Residual's) are rebuilt.
    rng = np.random.default_rng(3)
    m = cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1, bias=False), cdl.BatchNorm2d(4),
                        cdl.ReLU(),
                        cdl.Residual([cdl.Conv2d(4, 4, 3, padding=1), cdl.BatchNorm2d(4)]),
                        cdl.ReLU(), cdl.MaxPool2d(2), cdl.Flatten(), cdl.Linear(4 * 16, 3)],
                       (2, 8, 8), seed=1)
    x = rng.standard_normal((5, 2, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    loss, opt = cdl.SoftmaxCrossEntropy(), None
    for enable in (True, False, True):
        m.chain.fuse(enable)
        m._reset_plans()
        opt = cdl.SGD(m, lr=0.01)
        m.train_step(x, y, loss, opt)
        m.forward(x)
        m.backward(np.ones((5, 3), np.float32))
