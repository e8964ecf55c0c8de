"""Memory stays flat: thousands of train_step calls at one batch size allocate
nothing new after warm-up (RSS flat within a few MiB, tracemalloc without
growth); a new batch size reallocates once; a dropped model is freed at once
(no reference cycles keep its buffers alive).
"""
import gc
import tracemalloc
import weakref

import numpy as np
import pytest

import cdl

psutil = pytest.importorskip("psutil")
MiB = 2**20


def small_cnn(seed=0):
    return cdl.Sequential([cdl.Conv2d(1, 4, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Conv2d(4, 4, 3, padding=1), cdl.Sigmoid(), cdl.Flatten(),
                           cdl.Linear(4 * 4 * 4, 10)], (1, 8, 8), seed=seed, l2=1e-4)


def _setup(batch=16):
    rng = np.random.default_rng(0)
    m = small_cnn()
    x = rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    return m, x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.01, momentum=0.9)


def test_train_step_rss_flat():
    m, x, y, loss, opt = _setup()
    proc = psutil.Process()
    for _ in range(200):  # warm-up: buffers, OpenMP pool, BLAS
        m.train_step(x, y, loss, opt)
    gc.collect()
    rss0 = proc.memory_info().rss
    for _ in range(3000):
        m.train_step(x, y, loss, opt)
    gc.collect()
    rss1 = proc.memory_info().rss
    assert rss1 - rss0 < 4 * MiB, f"RSS grew {(rss1 - rss0) / MiB:.1f} MiB over 3,000 steps"


def _traced_growth(fn, warm=30, steps=300):
    for _ in range(warm):
        fn()
    tracemalloc.start()
    try:
        for _ in range(warm):
            fn()
        snap0 = tracemalloc.take_snapshot()
        cur0, _ = tracemalloc.get_traced_memory()
        for _ in range(steps):
            fn()
        cur1, _ = tracemalloc.get_traced_memory()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    top = "\n".join(map(str, snap1.compare_to(snap0, "lineno")[:5]))
    return cur1 - cur0, top


def test_train_step_allocates_nothing_after_warmup():
    m, x, y, loss, opt = _setup()
    growth, top = _traced_growth(lambda: m.train_step(x, y, loss, opt))
    # a leak of even 16 bytes per step would show as 4.8 kB
    assert growth < 4096, f"tracemalloc grew {growth} bytes over 300 steps:\n{top}"


def test_predict_and_evaluate_flat():
    m, x, y, loss, opt = _setup(64)

    def both():
        m.predict(x, batch_size=16)
        m.evaluate(x, y, loss, batch_size=16)
    growth, top = _traced_growth(both, steps=200)
    assert growth < 4096, f"predict/evaluate grew {growth} bytes over 200 calls:\n{top}"


def _buffer_ids(model):
    return {(i, k): id(a) for i, layer in enumerate(model.layers)
            for n, ws in layer._ws.items() for k, a in ws.items()}


def test_batch_size_change_reallocates_once():
    m, x, y, loss, opt = _setup(32)
    m.train_step(x, y, loss, opt)
    ws32 = {i: dict(layer._ws) for i, layer in enumerate(m.layers)}
    m.train_step(x[:20], y[:20], loss, opt)   # new size: one allocation
    ids = _buffer_ids(m)
    for _ in range(5):                        # alternating sizes (a last partial batch)
        m.train_step(x, y, loss, opt)
        m.train_step(x[:20], y[:20], loss, opt)
        assert _buffer_ids(m) == ids, "buffers were reallocated for a size already seen"
    for i, layer in enumerate(m.layers):
        assert set(layer._ws) <= {32, 20}
        if 32 in ws32[i]:
            assert layer._ws[32] is ws32[i][32]
    # allocation count: a third size allocates once, then never again
    m.train_step(x[:7], y[:7], loss, opt)
    tracemalloc.start()
    try:
        m.train_step(x[:7], y[:7], loss, opt)
        a0, _ = tracemalloc.get_traced_memory()
        for _ in range(100):
            m.train_step(x[:7], y[:7], loss, opt)
        a1, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert a1 - a0 < 4096


def test_fit_memory_flat_across_epochs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 200)
    m = small_cnn()
    opt = cdl.SGD(m, 0.01)
    loss = cdl.SoftmaxCrossEntropy()
    m.fit(x, y, loss, opt, epochs=2, batch_size=32, validation_split=0.1, verbose=0)
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    m.fit(x, y, loss, opt, epochs=30, batch_size=32, validation_split=0.1, verbose=0)
    gc.collect()
    assert proc.memory_info().rss - rss0 < 4 * MiB


def test_dropped_model_is_freed_without_gc():
    """No reference cycles: `del model` frees the model, its layers and their buffers
    by reference counting alone (the cycle collector is disabled here)."""
    m = cdl.Sequential([cdl.Conv2d(1, 64, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                        cdl.Flatten(), cdl.Linear(64 * 16 * 16, 10)], (1, 32, 32), seed=0)
    x = np.zeros((128, 1, 32, 32), np.float32)
    y = np.zeros(128, np.int64)
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.01, momentum=0.9)
    m.train_step(x, y, loss, opt)
    m.predict(x)
    m.evaluate(x, y, loss)
    refs = [weakref.ref(m)] + [weakref.ref(l) for l in m.layers]
    big = m.layers[0]._ws[128]["out"]   # 32 MiB activation buffer
    big_ref = weakref.ref(m.layers[0])
    del big
    gc.collect()
    gc.disable()
    try:
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        del m, opt
        assert all(r() is None for r in refs), "a reference cycle keeps the model alive"
        assert big_ref() is None
        # the loss keeps only its own small buffers, not the model
        assert sum(b[0].nbytes for b in getattr(loss._local, "bufs", {}).values()) < 1 * MiB
        rss1 = proc.memory_info().rss
    finally:
        gc.enable()
    assert rss0 - rss1 > 16 * MiB, f"RSS fell only {(rss0 - rss1) / MiB:.1f} MiB after del"


def test_fit_with_callbacks_does_not_keep_model_alive():
    x = np.zeros((40, 1, 8, 8), np.float32)
    y = np.zeros(40, np.int64)
    m = small_cnn()
    opt = cdl.SGD(m, 0.01)
    h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=1, verbose=0,
              callbacks=[cdl.EarlyStopping(monitor="loss", patience=0)])
    r = weakref.ref(m)
    gc.collect()
    gc.disable()
    try:
        del m, opt
        # the user keeps the History; it must not keep the model (or its buffers) alive
        assert r() is None, "History/callbacks keep a dropped model alive"
    finally:
        gc.enable()
    assert h.history["loss"] and h.model is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kept_runners_do_not_keep_the_callers_input(dtype):
    """predict keeps its runners (plans bound to the model input) for the next call;
    they must not keep the caller's x alive: a dropped input is freed at once."""
    for layers, shape in (([cdl.Conv2d(2, 4, 3), cdl.BatchNorm2d(4), cdl.ReLU(),
                            cdl.Flatten(), cdl.Linear(64, 3)], (2, 6, 6)),
                          ([cdl.ReLU(), cdl.Flatten(), cdl.Linear(72, 3)], (2, 6, 6)),
                          ([cdl.Residual([cdl.Linear(30, 30)]), cdl.Linear(30, 2)], (30,))):
        m = cdl.Sequential(layers, shape, dtype=dtype, seed=0)
        x = np.ones((12,) + shape, dtype)
        first = m.predict(x).copy()
        m.predict(x, batch_size=5)
        assert sorted(m._runners.sizes()) == [2, 5, 12]
        r = weakref.ref(x)
        del x
        gc.collect()
        alive = r() is not None
        assert not alive, f"a kept runner holds the input ({type(layers[0]).__name__} first)"
        np.testing.assert_array_equal(m.predict(np.ones((12,) + shape, dtype)), first)
