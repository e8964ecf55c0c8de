"""Public calls reuse memory without overwriting anything a caller still holds."""
import threading

import numpy as np
import pytest

import cdl


def net():
    return cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Flatten(), cdl.Linear(64, 5)], (2, 8, 8), seed=0)


def data(n=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 2, 8, 8)).astype(np.float32)


@pytest.mark.parametrize("call", ["predict", "forward", "backward"])
def test_held_results_are_never_overwritten_and_dropped_ones_are_reused(call):
    m = net()
    x1, x2 = data(seed=1), data(seed=2)

    def run(x):
        if call == "predict":
            return m.predict(x)
        y = m.forward(x)
        return y if call == "forward" else m.backward(np.ones_like(y))

    a = run(x1)
    kept = a.copy()
    view = a[1:]                      # a view keeps its base alive too
    del a
    b = run(x2)
    np.testing.assert_array_equal(view, kept[1:])
    assert not np.shares_memory(b, view)
    address = b.ctypes.data
    del b, view
    c = run(x1)
    np.testing.assert_array_equal(c, kept)
    d = run(x2)                       # c is held: d must be elsewhere
    assert not np.shares_memory(c, d)
    del d
    # a dropped result's memory is reused (no fresh allocation, no page faults)
    e = run(x2)
    assert e.ctypes.data in (address, c.ctypes.data) or not np.shares_memory(e, c)


def _pool_ref(x):
    """2x2 max-pool of x and the gradient routing of an upstream g (first max wins)."""
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, h // 2, w // 2, 4)
    first = win.argmax(-1)

    def backward(g):
        dx = np.zeros((n, c, h // 2, w // 2, 4), x.dtype)
        np.put_along_axis(dx, first[..., None], g[..., None], -1)
        return dx.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
            x.shape)
    return win.max(-1), backward


@pytest.mark.parametrize("first", [None, "sigmoid"])
def test_direct_results_of_forward_and_backward_stay_the_callers(first):
    # Large enough for the result pool (> 64 KB). MaxPool2d writes its output and
    # input gradient straight into the returned arrays; Sigmoid keeps views of its
    # buffers (writes_through_ws False), so its input gradient is copied instead.
    layers = [cdl.MaxPool2d(2)] if first is None else [cdl.Sigmoid(), cdl.MaxPool2d(2)]
    m = cdl.Sequential(layers, (8, 32, 32))
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((4, 8, 32, 32)).astype(np.float32) for _ in range(2)]
    gs = [rng.standard_normal((4, 8, 16, 16)).astype(np.float32) for _ in range(2)]
    held = []
    for x, g in zip(xs, gs):
        h = x if first is None else 1 / (1 + np.exp(-x.astype(np.float64)))
        y_ref, backward = _pool_ref(h)
        dx_ref = backward(g.astype(np.float64))
        if first is not None:
            dx_ref = dx_ref * h * (1 - h)
        y = m.forward(x)
        dx = m.backward(g)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-7)
        held.append((y, y.copy(), dx, dx.copy()))
    for y, y_kept, dx, dx_kept in held:   # later calls wrote elsewhere
        np.testing.assert_array_equal(y, y_kept)
        np.testing.assert_array_equal(dx, dx_kept)


def test_out_overlapping_an_operand_is_filled_by_a_copy_or_refused():
    # backward(g, out=g): a direct write would clobber g while the pass reads it, so
    # the result goes through the layer's buffer. forward(x, out=x) would overwrite
    # the input the layers keep for backward, and predict's later batches would read
    # results: both are refused before anything runs.
    m = cdl.Sequential([cdl.AvgPool2d(3, stride=1, padding=1)], (4, 16, 16))
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4, 16, 16)).astype(np.float32)
    g = rng.standard_normal((3, 4, 16, 16)).astype(np.float32)
    m.forward(x)
    dx_ref = m.backward(g).copy()
    g2 = g.copy()
    assert m.backward(g2, out=g2) is g2
    np.testing.assert_array_equal(g2, dx_ref)
    x2 = x.copy()
    for call in (lambda: m.forward(x2, out=x2), lambda: m.predict(x2, out=x2)):
        with pytest.raises(ValueError, match=r"Sequential.(forward|predict): out shares "
                                             r"memory with x"):
            call()
        np.testing.assert_array_equal(x2, x)


def test_backward_after_the_caller_changed_forwards_result():
    # Only layers whose backward does not read their output write it straight into
    # the returned array: a MaxPool2d with a fused ReLU reads it (its mask), so the
    # caller changing the result must not change the gradients.
    def run(scribble):
        m = cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2)],
                           (2, 16, 16), seed=0)
        x = data(3, seed=4).repeat(2, axis=2).repeat(2, axis=3)
        y = m.forward(x)
        if scribble:
            y[...] = -1.0
        dx = m.backward(np.ones(y.shape, np.float32)).copy()
        return dx, m.layers[0].grads["weight"].copy()
    for a, b in zip(run(False), run(True)):
        np.testing.assert_array_equal(a, b)


def test_out_arguments():
    m = net()
    x = data()
    out = np.empty((6, 5), np.float32)
    assert m.predict(x, out=out) is out
    np.testing.assert_array_equal(out, m.predict(x))
    assert m.forward(x, out=out) is out
    dx = np.empty((6, 2, 8, 8), np.float32)
    assert m.backward(np.ones((6, 5), np.float32), out=dx) is dx
    read_only = np.empty((6, 5), np.float32)
    read_only.flags.writeable = False
    # the message names the requirement that failed
    for bad, got in ((np.empty((6, 4), np.float32), r"float32 6x4 \(wrong shape\)"),
                     (np.empty((6, 5), np.float64), r"float64 6x5 \(wrong dtype\)"),
                     (np.empty((5, 6), np.float32).T, "float32 6x5 that is not C-contiguous"),
                     (read_only, "float32 6x5 that is read-only"),
                     ([[0.0] * 5] * 6, "list, not a NumPy array")):
        with pytest.raises(ValueError, match=r"Sequential.predict: out must be a writeable "
                                             r"C-contiguous float32 array of shape 6x5, got "
                                             + got):
            m.predict(x, out=bad)


def test_inference_cache_is_bounded_and_shared_by_threads():
    m = net()
    m._runners.budget = 3 * m._make_runner(64).nbytes       # room for three batches of 64
    x = data(64)
    ref = {n: m.predict(x[:n]) for n in (64, 63, 62, 61)}
    assert sorted(m._runners.sizes()) == [61, 62, 63]      # the oldest was let go
    results, errors = [], []

    def worker(n):
        try:
            for _ in range(20):
                results.append((n, m.predict(x[:n]).copy()))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(n,)) for n in (64, 63, 64, 61)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for n, r in results:
        np.testing.assert_array_equal(r, ref[n])
    assert len(m._runners.sizes()) <= 3 + 1


def test_runner_budget_counts_the_buffers_a_runner_holds():
    """BatchNorm and ReLU folded into the convolution allocate nothing at inference: the
    pool counts a runner's own buffers, so a batch whose every layer output would not
    fit the budget is still kept when its runner does (it was freed after each call)."""
    m = cdl.Sequential([cdl.Conv2d(2, 8, 3, padding=1, bias=False), cdl.BatchNorm2d(8),
                        cdl.ReLU(), cdl.Conv2d(8, 8, 3, padding=1), cdl.ReLU(),
                        cdl.Flatten(), cdl.Linear(8 * 8 * 8, 5)], (2, 8, 8), seed=0)
    n = 32
    runner = m._make_runner(n)
    every_output = n * 4 * sum(int(np.prod(layer.output_shape)) for layer in m.layers)
    assert runner.nbytes < every_output
    m._runners.budget = runner.nbytes
    x = data(n)
    first = m.predict(x).copy()
    assert m._runners.sizes() == [n]
    np.testing.assert_array_equal(m.predict(x), first)
    m._runners.budget = runner.nbytes - 1          # one byte short: used once, not kept
    m._runners.clear()
    m.predict(x)
    assert m._runners.sizes() == []


def test_a_huge_predict_keeps_no_buffers():
    m = net()
    m._runners.budget = 1 << 20
    n = (1 << 20) // m._make_runner(1).nbytes + 8
    m.predict(data(n), batch_size=n)
    assert m._runners.sizes() == []


def _unfused(model):
    """The same model with no fusion at all (every layer its own pass)."""
    def off(chain):
        chain.fuse(False)
        for layer in chain:
            for _, child in layer.children():
                off(child)
    off(model.chain)
    model._reset_plans()
    return model


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_inference_folds_batchnorm_and_relu_within_rounding(dtype, tol):
    import cdl.models
    x = np.random.default_rng(0).standard_normal((7, 3, 16, 16)).astype(dtype)
    xs = np.random.default_rng(1).standard_normal((7, 1, 28, 28)).astype(dtype)
    for build, data in ((lambda: cdl.models.resnet8((3, 16, 16), dtype=dtype, seed=0), x),
                        (lambda: cdl.models.lenet5(batchnorm=True, dtype=dtype, seed=0), xs)):
        fused, plain = build(), _unfused(build())
        folded = [l for _, l in fused.chain.walk() if getattr(l, "folded", None)]
        assert folded and not any(l.folded for _, l in plain.chain.walk())
        opt_f, opt_p = cdl.SGD(fused, lr=0.1), cdl.SGD(plain, lr=0.1)
        for _ in range(2):       # running statistics and weights move: folds follow them
            y = np.arange(7) % 10
            a = fused.train_step(data, y, cdl.SoftmaxCrossEntropy(), opt_f)
            b = plain.train_step(data, y, cdl.SoftmaxCrossEntropy(), opt_p)
            assert a == b        # training is not folded
            pf, pp = fused.predict(data), plain.predict(data)
            scale = np.abs(pp).max()
            assert np.abs(pf - pp).max() <= tol * scale
        outs = []
        for nt in (1, 2, 3):
            with cdl.threads(nt):
                outs.append(fused.predict(data).copy())
        assert all(o.tobytes() == outs[0].tobytes() for o in outs)


def test_runner_pool_keeps_at_most_its_budget_in_lru_order():
    from cdl.buffers import RunnerPool

    class Runner:
        def __init__(self, n):
            self.n, self.nbytes = n, 100 * n

    pool = RunnerPool(budget=500)
    made = []

    def make(n):
        made.append(n)
        return Runner(n)
    a = pool.acquire(1, make)        # checked out: its list stays, empty
    pool.release(pool.acquire(2, make), 2)
    pool.release(pool.acquire(3, make), 3)
    assert pool.sizes() == [2, 3] and pool._held == 500
    pool.release(a, 1)               # 600 > 500: the least recently used (2) goes
    assert pool.sizes() == [3, 1] and pool._held == 400
    assert pool.acquire(3, make).n == 3 and made == [1, 2, 3]
    assert pool.sizes() == [1] and pool._held == 100
    pool.release(Runner(6), 6)       # bigger than the budget: used once, never kept
    assert pool.sizes() == [1] and pool._held == 100
    assert pool.acquire(2, make).n == 2 and made == [1, 2, 3, 2]
    pool.release(Runner(5), 5)       # eviction passes the emptied list of 3, then takes 1
    assert pool.sizes() == [5] and pool._held == 500 and 3 not in pool._free


@pytest.mark.parametrize("first", ["bn", "conv"])
def test_kept_runners_see_in_place_changes_of_weights_and_buffers(first):
    # BatchNorm first is not folded (its own coefficients op); after a convolution
    # it is folded into the weights. Both are recomputed on every call, so a kept
    # runner follows parameters and running statistics changed in place.
    def make():
        head = [cdl.BatchNorm2d(2)] if first == "bn" else [cdl.Conv2d(2, 2, 3, padding=1),
                                                             cdl.BatchNorm2d(2)]
        return cdl.Sequential(head + [cdl.ReLU(), cdl.Flatten(), cdl.Linear(128, 3)],
                              (2, 8, 8), seed=0)
    m = make()
    x = data(4)
    before = m.predict(x).copy()
    assert m._runners.sizes() == [4]
    bn = m.layers[0 if first == "bn" else 1]
    bn.buffers["running_mean"][...] = [0.5, -0.25]
    bn.buffers["running_var"][...] = [4.0, 0.25]
    bn.params["weight"][...] = [2.0, -1.0]
    if first == "conv":
        m.layers[0].params["weight"][...] *= 0.5
    after = m.predict(x)
    assert m._runners.sizes() == [4] and not np.allclose(after, before)
    fresh = make()
    fresh.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(after, fresh.predict(x))


def test_nbytes_of_counts_nested_workspaces_once():
    from cdl.buffers import nbytes_of
    a, b, c = np.empty(100, np.uint8), np.empty(30, np.uint8), np.empty(7, np.uint8)
    inner = {"b": b, "b_view": b[2:], "deeper": {"c": c}}
    ws = {"a": a, "a_2d": a.reshape(10, 10), "inner": {1: inner, 2: {"again": b}},
          "trace": [(0, "layer", inner, a)]}
    ws["inner"][3] = ws                       # a cycle
    assert nbytes_of([ws]) == 137
    assert nbytes_of([a, ws]) == 137


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_runner_nbytes_counts_every_buffer_it_holds(dtype):
    """ResNet-8's Residual keeps its branches' inference buffers in a nested dict: the
    runner pool's budget must count them (they were 60% of the plan's memory)."""
    import gc
    import tracemalloc
    import cdl.models
    m = cdl.models.resnet8((3, 16, 16), dtype=dtype, seed=0)
    m._make_runner(16)                        # anything a first build caches
    gc.collect()
    tracemalloc.start()
    try:
        runner = m._make_runner(16)
        allocated = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # what the runner holds is its buffers, and a few Python objects besides
    assert runner.nbytes <= allocated < runner.nbytes + (256 << 10)


def test_result_pool_keeps_at_most_its_budget_in_lru_order():
    from cdl.buffers import ResultPool
    row = 64 << 10                             # bytes of one (1, 16384) float32 row
    pool = ResultPool(budget=10 * row)
    held = pool.get((3, 16384), np.float32)   # kept by its holder throughout
    held[...] = 7
    for n in range(1, 40):                    # many batch sizes, each result dropped
        pool.get((n, 16384), np.float32)
        pool.get((2, 16384), np.float32)      # used all along: never the least recent
        remembered = [a for arrays in pool._arrays.values() for a in arrays]
        assert pool._held == sum(a.nbytes for a in remembered) <= pool.budget
    assert list(pool._arrays)[-1] == ((2, 16384), np.dtype(np.float32))
    assert ((3, 16384), np.dtype(np.float32)) not in pool._arrays   # forgotten, not freed
    assert (held == 7).all()
    big = pool.get((11, 16384), np.float32)   # over the budget: used once, not remembered
    assert big.nbytes > pool.budget and not any(
        a is big for arrays in pool._arrays.values() for a in arrays)
    assert pool._held <= pool.budget


def test_predicting_many_batch_sizes_keeps_a_bounded_result_pool():
    m = cdl.Sequential([cdl.Linear(8, 1000)], (8,), seed=0)
    m._results.budget = 4 << 20
    x = np.zeros((600, 8), np.float32)
    for n in range(20, 600, 7):
        m.predict(x[:n])
        m.predict(x[:n], batch_size=16)
    assert sum(a.nbytes for arrays in m._results._arrays.values() for a in arrays) <= 4 << 20
