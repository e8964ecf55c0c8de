"""Same answer for any thread count: training with one seed gives bit-identical
losses and weights with 1, 2 and 3 threads, and every kernel is bitwise
identical across thread counts (work is split into chunks fixed by the shapes,
never by the thread count; reductions are summed in a fixed order; the dense
layers call single-threaded BLAS on shape-only tiles). No operation is exempt.
"""
import numpy as np
import pytest

import cdl
import cdl.functional as F

THREADS = (1, 2, 3)


def mlp(seed, dtype):
    return cdl.Sequential([cdl.Linear(64, 96), cdl.ReLU(), cdl.Linear(96, 48), cdl.Sigmoid(),
                           cdl.Linear(48, 10)], (64,), dtype=dtype, seed=seed, l2=1e-3)


def cnn(seed, dtype):
    return cdl.Sequential([cdl.Conv2d(1, 8, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Conv2d(8, 16, 3, padding=1), cdl.Sigmoid(),
                           cdl.MaxPool2d(3, stride=2, padding=1), cdl.Flatten(),
                           cdl.Linear(16 * 4 * 4, 10)], (1, 16, 16), dtype=dtype, seed=seed,
                          l2=1e-3)


LOSSES = {"ce": cdl.SoftmaxCrossEntropy, "svm": cdl.MulticlassSVM, "mse": cdl.MSE}


def train(build, loss_name, nt, dtype=np.float32, steps=6, nesterov=False):
    rng = np.random.default_rng(123)
    model = build(7, dtype)
    shape = model.input_shape
    x = rng.standard_normal((48,) + shape).astype(dtype)
    y = rng.integers(0, 10, 48)
    loss = LOSSES[loss_name]()
    opt = cdl.SGD(model, lr=0.05, momentum=0.9, nesterov=nesterov)
    losses = []
    with cdl.threads(nt):
        for s in range(steps):
            b = slice((s * 16) % 48, (s * 16) % 48 + 16)
            losses.append(model.train_step(x[b], y[b], loss, opt))
        pred = model.predict(x, batch_size=20)
        ev = model.evaluate(x, y, loss)
    return losses, model.get_weights(), {k: v.copy() for k, v in opt.velocities.items()}, pred, ev


@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_training_bitwise_identical_across_threads(build, loss_name):
    runs = [train(build, loss_name, nt, nesterov=(loss_name == "svm")) for nt in THREADS]
    base_losses, base_w, base_v, base_pred, base_ev = runs[0]
    assert all(np.isfinite(base_losses))
    assert base_losses[0] != base_losses[-1]  # it did train
    for nt, (losses, w, v, pred, ev) in zip(THREADS[1:], runs[1:]):
        assert losses == base_losses, f"{nt} threads: losses {losses} != {base_losses}"
        for k in base_w:
            assert w[k].tobytes() == base_w[k].tobytes(), f"{nt} threads: weight {k} differs"
            if k in base_v:
                assert v[k].tobytes() == base_v[k].tobytes(), f"{nt} threads: velocity {k}"
        assert pred.tobytes() == base_pred.tobytes()
        assert ev == base_ev


def test_small_batch_row_chunks_bitwise_identical_across_threads():
    """Batches of 1 and 4 on a 784 -> 256 layer take the row chunks dealt to fixed
    threads (forward, weight gradient, SGD); the result must not depend on how many."""
    runs = []
    for nt in THREADS:
        model = cdl.Sequential([cdl.Linear(784, 256), cdl.ReLU(), cdl.Linear(256, 10)], (784,),
                               seed=2)
        opt, loss = cdl.SGD(model, lr=0.01, momentum=0.9), cdl.SoftmaxCrossEntropy()
        rng = np.random.default_rng(8)
        losses = []
        with cdl.threads(nt):
            for n in (1, 4, 1, 4):      # the training plans of both sizes are reused
                x = rng.standard_normal((n, 784)).astype(np.float32)
                losses.append(model.train_step(x, rng.integers(0, 10, n), loss, opt))
        runs.append((losses, {k: w.tobytes() for k, w in model.get_weights().items()}))
    for other in runs[1:]:
        assert other == runs[0]


def test_float64_cnn_bitwise_identical():
    a = train(cnn, "ce", 1, np.float64, steps=3)
    b = train(cnn, "ce", 3, np.float64, steps=3)
    assert a[0] == b[0]
    assert all(a[1][k].tobytes() == b[1][k].tobytes() for k in a[1])


def test_fit_bitwise_identical_across_threads():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((70, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 70)
    out = []
    for nt in THREADS:
        m = cnn(3, np.float32)
        with cdl.threads(nt):
            h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.05, momentum=0.9), epochs=2,
                      batch_size=16, validation_split=0.2, verbose=0)
        out.append((h.history["loss"], h.history["val_loss"], m.get_weights()))
    for loss, vloss, w in out[1:]:
        assert loss == out[0][0] and vloss == out[0][1]
        assert all(w[k].tobytes() == out[0][2][k].tobytes() for k in w)


# ------------------------------------------------------------------ every kernel
def _same(results):
    first = results[0]
    for r in results[1:]:
        for a, b in zip(first, r):
            if isinstance(a, np.ndarray):
                assert a.tobytes() == b.tobytes()
            else:
                assert a == b


def _each_thread(fn):
    return [fn(nt) for nt in THREADS]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_bitwise_identical_across_threads(dtype):
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    # big enough that every kernel actually runs in parallel
    x, w, b = r(16, 8, 30, 30), r(16, 8, 5, 5), r(16)
    for s, p in [((1, 1), (2, 2)), ((2, 2), (1, 1)), ((1, 3), (0, 2))]:
        _same(_each_thread(lambda nt: (F.conv2d(x, w, b, stride=s, padding=p, threads=nt),)))
        g = r(*F.conv2d(x, w, b, stride=s, padding=p).shape)
        _same(_each_thread(lambda nt: F.conv2d_backward(g, x, w, stride=s, padding=p, threads=nt)))
    for k, s, p in [(2, None, 0), (3, 2, 1), ((3, 2), (1, 2), (1, 0))]:
        res = _each_thread(lambda nt: F.max_pool2d(x, k, stride=s, padding=p, threads=nt))
        _same(res)
        y, idx = res[0]
        g = r(*y.shape)
        _same(_each_thread(lambda nt: (F.max_pool2d_backward(g, idx, x.shape, k, stride=s,
                                                             padding=p, threads=nt),)))
    a, wl, bl = r(300, 700), r(257, 700), r(257)
    _same(_each_thread(lambda nt: (F.linear(a, wl, bl, threads=nt),)))
    g = r(300, 257)
    _same(_each_thread(lambda nt: F.linear_backward(g, a, wl, l2=0.01, threads=nt)))
    big = r(3_000_000)
    gb = r(3_000_000)
    for fwd, bwd in [(F.relu, F.relu_backward), (F.sigmoid, F.sigmoid_backward)]:
        _same(_each_thread(lambda nt: (fwd(big, threads=nt),)))
        yb = fwd(big)
        _same(_each_thread(lambda nt: (bwd(gb, yb, threads=nt),)))
    s, lab = r(5000, 100), rng.integers(0, 100, 5000)
    t = r(5000, 100)
    _same(_each_thread(lambda nt: (F.softmax(s, threads=nt),)))
    for red in ("mean", "sum"):
        _same(_each_thread(lambda nt: F.softmax_cross_entropy(s, lab, reduction=red, threads=nt)))
        _same(_each_thread(lambda nt: F.multiclass_svm(s, lab, reduction=red, threads=nt)))
        _same(_each_thread(lambda nt: F.mse(s, lab, reduction=red, threads=nt)))
        _same(_each_thread(lambda nt: F.mse(s, t, reduction=red, threads=nt)))

    def sgd(nt, nesterov):
        p, v = big.copy(), gb.copy()
        F.sgd_update(p, gb, lr=0.1, velocity=v, momentum=0.9, nesterov=nesterov,
                     weight_decay=1e-3, threads=nt)
        return p, v
    for nest in (False, True):
        _same(_each_thread(lambda nt: sgd(nt, nest)))
