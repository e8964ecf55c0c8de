"""Concurrency: predict is safe from several Python threads at once (each call has
its own buffers; the kernels release the GIL), and gives the serial answers.
Training one model from two threads at once is not supported: train_step (and
fit, which uses it) hold a per-model lock taken without blocking, so the second
thread gets a RuntimeError instead of corrupting the weights.
"""
import pathlib
import re
import threading
import time

import numpy as np
import pytest

import cdl
import cdl.functional as F


def lenet(seed=0):
    return cdl.Sequential([cdl.Conv2d(1, 8, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Conv2d(8, 16, 3, padding=1), cdl.Sigmoid(), cdl.MaxPool2d(2),
                           cdl.Flatten(), cdl.Linear(16 * 4 * 4, 10)], (1, 16, 16), seed=seed)


def test_predict_from_four_threads_equals_serial():
    m = lenet()
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((n, 1, 16, 16)).astype(np.float32) for n in (37, 64, 5, 128)]
    serial = [m.predict(x, batch_size=bs) for x, bs in zip(inputs, (16, 64, 1, 50))]
    results = [[] for _ in inputs]
    errors = []
    start = threading.Barrier(len(inputs))

    def work(i):
        try:
            start.wait()
            for _ in range(25):
                results[i].append(m.predict(inputs[i], batch_size=(16, 64, 1, 50)[i]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, rs in enumerate(results):
        assert len(rs) == 25
        for r in rs:
            assert r.tobytes() == serial[i].tobytes(), f"thread {i}: predictions differ"


def test_functional_kernels_from_threads_equal_serial():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 4, 20, 20)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)

    def run():
        y = F.conv2d(x, w, padding=1)
        p, idx = F.max_pool2d(F.relu(y), 2)
        s = F.linear(p.reshape(8, -1), rng_w)
        return s, F.softmax_cross_entropy(s, labels)[0]
    rng_w = rng.standard_normal((10, 6 * 10 * 10)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    ref = run()
    out = [None] * 6

    def work(i):
        out[i] = [run() for _ in range(20)]
    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for rs in out:
        for s, loss in rs:
            assert s.tobytes() == ref[0].tobytes() and loss == ref[1]


def _main_thread_ran_during(call):
    """Run ``call`` in a worker; True if this thread executed Python code in the
    middle half of the call (possible only when the call released the GIL)."""
    window = []
    stamps = []

    def worker():
        t0 = time.perf_counter()
        call()
        window.extend((t0, time.perf_counter()))

    t = threading.Thread(target=worker)
    t.start()
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    t0, t1 = window
    lo, hi = t0 + 0.25 * (t1 - t0), t1 - 0.25 * (t1 - t0)
    return any(lo < s < hi for s in stamps), t1 - t0


@pytest.mark.parametrize("name", ["conv2d", "conv2d_backward", "linear", "predict"])
def test_kernels_release_the_gil(name):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 16, 48, 48)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    g = rng.standard_normal((32, 32, 46, 46)).astype(np.float32)
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    m = cdl.Sequential([cdl.Conv2d(16, 32, 3), cdl.ReLU(), cdl.Flatten(),
                        cdl.Linear(32 * 46 * 46, 4)], (16, 48, 48), seed=0)
    calls = {
        "conv2d": lambda: F.conv2d(x, w, threads=1),
        "conv2d_backward": lambda: F.conv2d_backward(g, x, w, threads=1),
        "linear": lambda: [F.linear(a, a, threads=1) for _ in range(1)],
        "predict": lambda: m.predict(x),
    }
    # On a loaded machine the OS may not schedule this thread inside one window: a
    # kernel holding the GIL fails every attempt, a releasing one passes almost always.
    with cdl.threads(1):
        for _ in range(4):
            ran, seconds = _main_thread_ran_during(calls[name])
            if ran:
                break
    assert ran, f"{name} ({seconds * 1e3:.0f} ms) held the GIL: no other Python thread ran"


def test_kernel_sources_release_the_gil():
    """Every public kernel in the .pyx sources does its work inside ``with nogil``
    (in its own body or in the ``cdef _name`` it delegates to, or the ``cdef _name_tiles``
    that one runs between taking and giving back SciPy's BLAS)."""
    src = pathlib.Path(__file__).resolve().parents[1] / "src" / "cdl" / "_kernels"
    files = sorted(src.glob("_*.pyx")) if src.is_dir() else []
    if not files:
        pytest.skip("kernel sources not next to the tests")
    missing = []
    for f in files:
        if f.name == "_runtime.pyx":
            continue
        text = f.read_text()
        defs = list(re.finditer(r"^def (\w+)\(", text, re.M))
        for i, d in enumerate(defs):
            body = text[d.end():defs[i + 1].start() if i + 1 < len(defs) else len(text)]
            body = body.split("\ndef ")[0]
            if d.group(1).startswith(("workspace", "cpu", "get", "set", "row_chunks")):
                continue
            core = re.search(rf"^cdef \w+ _{d.group(1)}\(.*?(?=^\S)", text, re.M | re.S)
            if f"_{d.group(1)}(" in body and core:
                body = core.group(0)
                tiles = re.search(rf"^cdef \w+ _{d.group(1)}_tiles\(.*?(?=^\S)", text,
                                  re.M | re.S)
                if f"_{d.group(1)}_tiles(" in body and tiles:
                    body = tiles.group(0)
            if "with nogil" not in body:
                missing.append(f"{f.name}:{d.group(1)}")
    assert not missing, f"kernels without `with nogil`: {missing}"


# ------------------------------------------------------------------ training from two threads
def _data(n=64):
    rng = np.random.default_rng(3)
    return (rng.standard_normal((n, 1, 16, 16)).astype(np.float32), rng.integers(0, 10, n))


def test_train_step_while_model_is_training_raises(lock_held_elsewhere):
    m = lenet()
    x, y = _data()
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.01)
    m.forward(x)
    with lock_held_elsewhere(m):
        with pytest.raises(RuntimeError, match=r"train_step: this model is being trained from "
                                               r"another thread"):
            m.train_step(x, y, loss, opt)
        with pytest.raises(RuntimeError, match=r"being trained from another thread"):
            m.fit(x, y, loss, opt, verbose=0)
        # the public training passes share the same buffers: refused too
        with pytest.raises(RuntimeError, match=r"Sequential.forward: this model is being "
                                               r"trained from another thread"):
            m.forward(x)
        with pytest.raises(RuntimeError, match=r"Sequential.backward: this model is being "
                                               r"trained from another thread"):
            m.backward(np.zeros((64, 10), np.float32))
        # writing the weights in the middle of another thread's step: refused, unchanged
        before = m.state_dict()
        changed = {k: v + 1 if v.dtype.kind == "f" else v for k, v in before.items()}
        with pytest.raises(RuntimeError, match=r"Sequential.load_state_dict: this model is "
                                               r"being trained from another thread"):
            m.load_state_dict(changed)
        with pytest.raises(RuntimeError, match=r"Sequential.set_weights: this model is being "
                                               r"trained from another thread"):
            m.set_weights({k: changed[k] for k in m.get_weights()})
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(v, before[k])
    m.train_step(x, y, loss, opt)            # the lock is free again
    m.backward(np.zeros((64, 10), np.float32))


def test_two_threads_training_one_model_is_detected():
    m = lenet()
    x, y = _data(256)
    opt = cdl.SGD(m, 0.01)
    seen = []
    stop = threading.Event()

    def trainer():
        loss = cdl.SoftmaxCrossEntropy()
        while not stop.is_set():
            try:
                m.train_step(x, y, loss, opt)
            except RuntimeError as exc:
                seen.append(str(exc))
                stop.set()

    ts = [threading.Thread(target=trainer) for _ in range(2)]
    for t in ts:
        t.start()
    stop.wait(timeout=60)
    stop.set()
    for t in ts:
        t.join()
    assert seen and "being trained from another thread" in seen[0]
    # the model is still usable and finite afterwards
    assert np.isfinite(m.predict(x)).all()
    m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)


def test_separate_models_train_concurrently_and_match_serial():
    x, y = _data(48)

    def run(out, i):
        m = lenet(seed=i)
        loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.05, momentum=0.9)
        out[i] = [m.train_step(x, y, loss, opt) for _ in range(10)], m.get_weights()

    serial, par = {}, {}
    for i in range(3):
        run(serial, i)
    ts = [threading.Thread(target=run, args=(par, i)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(3):
        assert par[i][0] == serial[i][0]
        assert all(par[i][1][k].tobytes() == serial[i][1][k].tobytes() for k in serial[i][1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_models_sharing_one_loss_object_train_and_evaluate_concurrently(dtype):
    # float32: training plans; float64: layer by layer through the loss's own buffers
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((256, 16)).astype(dtype) * (k + 1) for k in range(3)]
    ys = [rng.integers(0, 5, 256) for _ in range(3)]
    shared = cdl.SoftmaxCrossEntropy()

    def net(i):     # l2: a Python call between the loss and reading its gradient
        return cdl.Sequential([cdl.Linear(16, 32), cdl.ReLU(), cdl.Linear(32, 5)], (16,),
                              dtype=dtype, seed=i, l2=1e-3)

    def run(out, i, loss):
        m = net(i)
        opt = cdl.SGD(m, 0.05)
        out[i] = ([m.train_step(xs[i], ys[i], loss, opt) for _ in range(150)]
                  + [m.evaluate(xs[j], ys[j], loss) for j in range(3) for _ in range(50)])

    serial, par = {}, {}
    for i in range(3):
        run(serial, i, cdl.SoftmaxCrossEntropy())
    ts = [threading.Thread(target=run, args=(par, i, shared)) for i in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in range(3):
        assert par[i] == serial[i], i
    import copy
    import pickle
    assert pickle.loads(pickle.dumps(shared)).reduction == copy.deepcopy(shared).reduction


def test_fit_holds_the_training_lock_between_its_steps():
    """Another thread's train_step is refused for the whole of fit, between steps too
    (batch gathering, validation, callbacks); a callback in fit's own thread may step."""
    m = lenet()
    x, y = _data(64)
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.01)
    started, done, outcomes = threading.Event(), threading.Event(), []

    def intruder():                          # tries while fit's first callback runs
        started.wait(60)
        while len(outcomes) < 20:
            try:
                m.train_step(x[:8], y[:8], cdl.SoftmaxCrossEntropy(), opt)
                outcomes.append("stepped")
            except RuntimeError:
                outcomes.append("refused")
        done.set()

    class Between(cdl.Callback):
        def on_epoch_end(self, epoch, logs=None):
            started.set()
            done.wait(60)                    # a slow callback: the lock stays held
            m.train_step(x[:8], y[:8], loss, opt)    # fit's own thread: allowed

    t = threading.Thread(target=intruder)
    t.start()
    try:
        m.fit(x, y, loss, opt, epochs=3, batch_size=16, verbose=0, callbacks=[Between()])
    finally:
        done.set()
        t.join()
    assert outcomes == ["refused"] * 20 and opt.steps == 3 * 4 + 3


def test_a_runner_goes_back_to_the_pool_it_came_from():
    """A layer setting changed while a predict holds a runner (from another thread)
    resets the plans: the runner, built with the old setting, must not go into the new
    pool, where every later predict of its batch size would use it."""
    m = cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1), cdl.BatchNorm2d(4), cdl.Flatten(),
                        cdl.Linear(4 * 6 * 6, 3)], (2, 6, 6), seed=0)
    bn = m.layers[1]
    bn.buffers["running_var"][...] = 0.01     # so that eps matters
    x = np.random.default_rng(0).standard_normal((8, 2, 6, 6)).astype(np.float32)
    make = m._make_runner

    def make_then_change(n):
        runner = make(n)
        run = runner.run

        def run_and_change(*args):
            out = run(*args)
            bn.eps = 0.5                      # between this call's acquire and release
            return out
        runner.run = run_and_change
        return runner
    m._make_runner = make_then_change
    old = m.predict(x).copy()
    del m._make_runner
    after = m.predict(x).copy()               # from the pool, if one was kept
    m._runners.clear()
    fresh = m.predict(x)
    assert not np.allclose(old, fresh)
    np.testing.assert_array_equal(after, fresh)


def test_float64_predict_from_threads_is_bit_identical():
    """float64 Linear runs SciPy's BLAS, lowered to one thread during each kernel: one
    thread's call returning must not give BLAS its threads back while another thread's
    kernel is still in its BLAS calls (multi-threaded BLAS rounds differently)."""
    from cdl import _config
    from cdl._kernels import _runtime
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _runtime.blas_switchable():
        pytest.skip("SciPy's BLAS threads cannot be switched per call here")
    m = cdl.Sequential([cdl.Linear(50, 300)], (50,), seed=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((257, 50))
    with threadpoolctl.threadpool_limits(4, user_api="blas"):
        ref = m.predict(x, batch_size=64).copy()
        bad, deadline = [], time.monotonic() + 2.0

        def work():
            while not bad and time.monotonic() < deadline:
                if not np.array_equal(m.predict(x, batch_size=64), ref):
                    bad.append(1)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not bad, "a float64 predict differed from the serial answer"
        assert _runtime.blas_users() == 0
        assert _config.blas_info()[2] == 4      # given back once every call returned
