"""Sequential: construction checks, summary, gradient checks, train_step, SGD, L2."""
import threading

import numpy as np
import pytest

import cdl


def lenet5():
    return [cdl.Conv2d(1, 6, 5), cdl.ReLU(), cdl.MaxPool2d(2), cdl.Conv2d(6, 16, 5), cdl.ReLU(),
            cdl.MaxPool2d(2), cdl.Flatten(), cdl.Linear(400, 120), cdl.ReLU(),
            cdl.Linear(120, 10)]


def small_cnn():
    return [cdl.Conv2d(2, 3, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
            cdl.Conv2d(3, 4, 3, stride=1, padding=1), cdl.Sigmoid(), cdl.Flatten(),
            cdl.Linear(16, 5)]


def mlp():
    return [cdl.Linear(6, 8), cdl.ReLU(), cdl.Linear(8, 7), cdl.Sigmoid(), cdl.Linear(7, 5)]


def randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for _, p, _ in model.parameters():
        p[...] = rng.standard_normal(p.shape) * 0.4


def test_wrong_in_features_names_layer_and_source():
    with pytest.raises(ValueError, match=r"Linear\[7\]: expected 400 input features, got 256 "
                                         r"\(from MaxPool2d\[5\] output 16x4x4\)"):
        cdl.Sequential(lenet5(), (1, 28, 28))
    cdl.Sequential(lenet5(), (1, 32, 32))  # LeNet-5's own input size fits


def test_kernel_larger_than_input_shows_arithmetic():
    with pytest.raises(ValueError, match=r"Conv2d\[2\].*H2 = \(H1 - F \+ 2P\)/S \+ 1 = "
                                         r"\(2 - 3 \+ 2\*0\)/1 \+ 1 < 1.*from MaxPool2d\[1\]"):
        cdl.Sequential([cdl.Conv2d(1, 2, 3), cdl.MaxPool2d(2), cdl.Conv2d(2, 2, 3)], (1, 6, 6))


def test_other_construction_errors():
    with pytest.raises(ValueError, match=r"Conv2d\[0\]: expected 3 input channels, got 1 "
                                         r"\(from input 1x8x8\)"):
        cdl.Sequential([cdl.Conv2d(3, 4, 3)], (1, 8, 8))
    with pytest.raises(ValueError, match=r"Linear\[1\].*Flatten"):
        cdl.Sequential([cdl.Conv2d(1, 2, 3), cdl.Linear(72, 2)], (1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        cdl.Sequential([cdl.ReLU()], (0, 3))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        cdl.Sequential([cdl.ReLU()], (3,), dtype=np.int32)
    with pytest.raises(TypeError, match=r"layers\[1\] must be a cdl layer"):
        cdl.Sequential([cdl.ReLU(), "relu"], (3,))
    relu = cdl.ReLU()
    with pytest.raises(ValueError, match="appears twice"):
        cdl.Sequential([relu, relu], (3,))


def test_summary_table(capsys):
    m = cdl.Sequential(lenet5(), (1, 32, 32))
    text = m.summary()
    out = capsys.readouterr().out
    assert text in out
    for shape in ("6x28x28", "6x14x14", "16x10x10", "16x5x5", "400", "120", "10"):
        assert shape in out
    total = 6 * 25 + 6 + 16 * 6 * 25 + 16 + 400 * 120 + 120 + 120 * 10 + 10
    assert m.num_params() == total
    assert f"Total params: {total:,}" in out
    assert f"{(2 * 25 + 1) * 6 * 28 * 28:,}" in out  # conv1 FLOPs per sample, bias adds too
    assert f"{2 * 400 * 120 + 120:,}" in out         # as Linear counts its bias


@pytest.mark.parametrize("arch,shape", [(mlp, (6,)), (small_cnn, (2, 4, 4))])
@pytest.mark.parametrize("loss", [cdl.SoftmaxCrossEntropy(), cdl.MulticlassSVM(margin=0.7),
                                  cdl.MSE(), cdl.SoftmaxCrossEntropy(reduction="sum")],
                         ids=["ce", "svm", "mse", "ce-sum"])
@pytest.mark.parametrize("l2", [0.0, 0.01])
def test_model_gradcheck(arch, shape, loss, l2):
    m = cdl.Sequential(arch(), shape, dtype=np.float64, seed=0, l2=l2)
    randomize(m)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4,) + shape)
    y = np.array([0, 3, 4, 1])
    errs = cdl.gradcheck(m, x, y, loss)
    assert set(errs) == {k for k, _, _ in m.parameters()} | {"input"}
    assert max(errs.values()) < 1e-6, errs


def test_gradcheck_mse_float_targets_and_float32_model():
    m = cdl.Sequential(mlp(), (6,), seed=0)  # float32: checked through a float64 copy
    randomize(m)
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((3, 6)), rng.standard_normal((3, 5))
    errs = cdl.gradcheck(m, x, t, cdl.MSE())
    assert max(errs.values()) < 1e-6, errs
    assert m.dtype == np.float32


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    m = cdl.Sequential(mlp(), (6,), dtype=np.float64, seed=0)
    randomize(m)
    real = cdl.layers.Linear._backward

    def broken(self, g, x, ws, nt, need, l2):
        dx = real(self, g, x, ws, nt, need, l2)
        self.grads["weight"] *= 1.01
        return dx
    monkeypatch.setattr(cdl.layers.Linear, "_backward", broken)
    errs = cdl.gradcheck(m, np.ones((2, 6)), np.array([1, 2]), cdl.SoftmaxCrossEntropy())
    assert errs["4.weight"] > 1e-3


@pytest.mark.parametrize("layers,shape", [
    (lambda: [cdl.Linear(5, 6), cdl.BatchNorm1d(6), cdl.ReLU(), cdl.Linear(6, 3)], (5,)),
    (lambda: [cdl.Conv2d(2, 3, 3), cdl.BatchNorm2d(3), cdl.ReLU(), cdl.Flatten(),
              cdl.Linear(12, 3)], (2, 4, 4))])
def test_gradcheck_of_a_zero_gradient_before_batchnorm(layers, shape, monkeypatch):
    # BatchNorm cancels the bias before it: the true gradient is 0, the central
    # differences are round-off; measured on the model's scale that passes, and a
    # spurious gradient there is still caught
    m = cdl.Sequential(layers(), shape, dtype=np.float64, seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7,) + shape), np.arange(7) % 3
    errs = cdl.gradcheck(m, x, y, cdl.SoftmaxCrossEntropy())
    assert max(errs.values()) < 1e-6, errs
    first = type(m.layers[0])
    real = first._backward

    def spurious(self, g, x, ws, nt, need, l2):
        dx = real(self, g, x, ws, nt, need, l2)
        self.grads["bias"] += 0.01 * np.abs(self.grads["weight"]).max()
        return dx
    monkeypatch.setattr(first, "_backward", spurious)
    assert cdl.gradcheck(m, x, y, cdl.SoftmaxCrossEntropy())["0.bias"] > 1e-3


def test_seed_reproducible_bit_for_bit():
    a = cdl.Sequential(small_cnn(), (2, 4, 4), seed=42)
    b = cdl.Sequential(small_cnn(), (2, 4, 4), seed=42)
    c = cdl.Sequential(small_cnn(), (2, 4, 4), seed=43)
    for (k, p, _), (_, q, _), (_, r, _) in zip(a.parameters(), b.parameters(), c.parameters()):
        assert p.tobytes() == q.tobytes()
        if k.endswith("weight"):
            assert p.tobytes() != r.tobytes()


def test_init_scales():
    he = cdl.Sequential([cdl.Linear(500, 400), cdl.ReLU()], (500,), seed=0)
    xa = cdl.Sequential([cdl.Linear(500, 400), cdl.Sigmoid()], (500,), seed=0)
    assert abs(he.layers[0].params["weight"].std() - np.sqrt(2 / 500)) < 0.003
    a = np.sqrt(6 / 900)
    w = xa.layers[0].params["weight"]
    assert w.max() <= a and w.min() >= -a and abs(w.std() - a / np.sqrt(3)) < 0.003


def test_predict_batches_and_is_thread_safe():
    m = cdl.Sequential(small_cnn(), (2, 4, 4), seed=0)
    x = np.random.default_rng(0).standard_normal((37, 2, 4, 4)).astype(np.float32)
    full = m.predict(x, batch_size=37)
    np.testing.assert_allclose(m.predict(x, batch_size=5), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.forward(x), full, rtol=1e-6)
    results = [None] * 4

    def work(i):
        results[i] = m.predict(x, batch_size=37)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, full)
    assert m.predict(x[:0]).shape == (0, 5)


def test_inputs_cast_once_and_bad_inputs_rejected():
    m = cdl.Sequential(mlp(), (6,), seed=0)
    xi = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(m.predict(xi), m.predict(xi.astype(np.float32)))
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1)
    with pytest.raises(TypeError, match="x must be a numeric array"):
        m.predict(np.array([["a"] * 6]))
    with pytest.raises(TypeError, match="x must be a numeric array"):
        m.predict(np.zeros((2, 6), complex))
    with pytest.raises(ValueError, match=r"x must have shape Nx6, got 6 \(a single sample"):
        m.predict(np.zeros(6))
    with pytest.raises(TypeError, match="y must be integer class labels"):
        m.train_step(xi, np.array([0.0, 1.0]), loss, opt)
    with pytest.raises(ValueError, match=r"y must be class labels in \[0, 5\), got values from 0 to 5"):
        m.train_step(xi, np.array([0, 5]), loss, opt)
    with pytest.raises(ValueError, match=r"y must have shape \(2,\)"):
        m.train_step(xi, np.array([0, 1, 2]), loss, opt)
    with pytest.raises(ValueError, match="empty batch"):
        m.train_step(xi[:0], np.array([], np.int64), loss, opt)
    with pytest.raises(TypeError, match="loss must be a cdl loss"):
        m.train_step(xi, np.array([0, 1]), "ce", opt)
    m.train_step(xi, np.array([True, False]), loss, opt)  # boolean labels are fine


def test_train_step_loss_matches_forward_and_includes_l2():
    m = cdl.Sequential(mlp(), (6,), dtype=np.float64, seed=0, l2=0.05)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 6)), rng.integers(0, 5, 9)
    loss = cdl.SoftmaxCrossEntropy()
    expect = loss.forward(m.forward(x), y) + 0.05 * sum(
        (l.params["weight"] ** 2).sum() for l in m.layers if l.params)
    got = m.train_step(x, y, loss, cdl.SGD(m, lr=0.01))
    assert got == pytest.approx(expect, rel=1e-12)
    ev, _ = m.evaluate(x, y, loss)
    assert ev < got  # one step downhill


def test_train_step_skips_input_gradient(monkeypatch):
    calls = {"input": 0, "weight": 0}
    real = cdl.layers.conv._conv

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def conv2d_backward_input(self, *a):
            calls["input"] += 1
            return real.conv2d_backward_input(*a)

        def conv2d_backward_weight(self, *a):
            calls["weight"] += 1
            return real.conv2d_backward_weight(*a)
    monkeypatch.setattr(cdl.layers.conv, "_conv", Spy())
    m = cdl.Sequential(small_cnn(), (2, 4, 4), seed=0)
    x = np.ones((3, 2, 4, 4), np.float32)
    convs = [layer for layer in m.layers if isinstance(layer, cdl.Conv2d)]
    for plan in (True, False):
        m._use_plans = plan
        for conv in convs:
            conv._workspace(3)["dx"][...] = 7.0
        m.train_step(x, np.array([0, 1, 2]), cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1))
        # Only the second conv passes a gradient on: layer by layer into its own
        # buffer, in the plan into one the plan lends (no buffer of x's size is lent).
        assert (convs[0]._workspace(3)["dx"] == 7.0).all()
        written = convs[1]._workspace(3)["dx"]
        if plan:
            lent = m._plans[0]._arena.buffers()
            assert (written == 7.0).all() and not any(b.size == x.size for b in lent)
            written = [b for b in lent if b.size == written.size]
            assert len(written) == 1
            written = written[0]
        assert (written != 7.0).any()
    assert calls == {"input": 1, "weight": 2}  # the layer-by-layer step (the plan's calls are bound)
    m.forward(x)
    dx = m.backward(np.ones((3, 5), np.float32))
    assert dx.shape == x.shape and calls["input"] == 3  # model.backward: both convs


def test_train_step_allocates_nothing_after_warmup():
    import tracemalloc
    m = cdl.Sequential(small_cnn(), (2, 4, 4), seed=0, l2=1e-3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.01, momentum=0.9)
    for _ in range(3):
        m.train_step(x, y, loss, opt)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(300):
        m.train_step(x, y, loss, opt)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 16 * 1024, grown


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.8, True)])
def test_sgd_matches_numpy(momentum, nesterov):
    m = cdl.Sequential(mlp(), (6,), dtype=np.float64, seed=0)
    opt = cdl.SGD(m, lr=0.1, momentum=momentum, nesterov=nesterov)
    rng = np.random.default_rng(0)
    ref = {k: p.copy() for k, p, _ in m.parameters()}
    vel = {k: np.zeros_like(p) for k in ref for p in [ref[k]]}
    for _ in range(3):
        for k, p, g in m.parameters():
            g[...] = rng.standard_normal(g.shape)
            vel[k] = momentum * vel[k] + g
            step = g + momentum * vel[k] if nesterov else vel[k]
            ref[k] = ref[k] - 0.1 * step
        opt.step()
    for k, p, _ in m.parameters():
        np.testing.assert_allclose(p, ref[k], rtol=1e-12, atol=1e-14)
        if momentum:
            np.testing.assert_allclose(opt.velocities[k], vel[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parameters_share_one_aligned_buffer_and_stay_live(dtype):
    # The optimizer updates the whole model in one call over a flat buffer: every
    # parameter and gradient must be an aligned view of it, and the arrays a user
    # holds must be the ones training updates.
    m = cdl.Sequential([cdl.Conv2d(1, 3, 3), cdl.ReLU(), cdl.Flatten(), cdl.Linear(12, 5),
                        cdl.Linear(5, 2, bias=False)], (1, 4, 4), dtype=dtype, seed=0)
    held = {k: (p, g) for k, p, g in m.parameters()}
    for k, (p, g) in held.items():
        assert p.ctypes.data % 64 == 0 and g.ctypes.data % 64 == 0, k
        assert np.shares_memory(p, m.parameter_buffer) and np.shares_memory(g, m.gradient_buffer), k
    before = {k: p.copy() for k, (p, _) in held.items()}
    x = np.random.default_rng(1).standard_normal((4, 1, 4, 4)).astype(dtype)
    opt = cdl.SGD(m, lr=0.1, momentum=0.5)
    m.train_step(x, np.array([0, 1, 1, 0]), cdl.SoftmaxCrossEntropy(), opt)
    for k, (p, g) in held.items():
        np.testing.assert_allclose(p, before[k] - 0.1 * g, rtol=1e-5, atol=1e-6)
        assert np.shares_memory(opt.velocities[k], p) is False
    # The gaps between views stay zero, so no update leaks into another parameter.
    live = np.zeros(m.parameter_buffer.size, bool)
    for p, _ in held.values():
        start = (p.ctypes.data - m.parameter_buffer.ctypes.data) // p.itemsize
        live[start:start + p.size] = True
    assert not m.parameter_buffer[~live].any() and not m.gradient_buffer[~live].any()


def test_sgd_and_schedule_arguments():
    m = cdl.Sequential(mlp(), (6,))
    with pytest.raises(ValueError, match="lr must be"):
        cdl.SGD(m, lr=-0.1)
    assert cdl.SGD(m, lr=0).lr == 0.0            # as in PyTorch
    with pytest.raises(ValueError, match="momentum must be"):
        cdl.SGD(m, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="nesterov=True needs momentum"):
        cdl.SGD(m, lr=0.1, nesterov=True)
    assert cdl.StepLR(2, 0.5)(5, 1.0) == 0.25
    assert cdl.ExponentialLR(0.9)(2, 1.0) == pytest.approx(0.81)
    cos = cdl.CosineLR(10, min_lr=0.1)
    assert cos(0, 1.0) == 1.0 and cos(10, 1.0) == pytest.approx(0.1)
    assert cos(5, 1.0) == pytest.approx(0.55)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (1, 3)])
def test_relu_then_pool_runs_fused_with_identical_results(dtype, hw):
    # Sequential runs ReLU + MaxPool2d(2) as one pass; every output, index and
    # gradient must equal the separate layers' bit for bit (NaN, ties at zero,
    # all-negative windows and odd sizes included).
    def build():
        return cdl.Sequential([cdl.Conv2d(2, 3, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                               cdl.Flatten(), cdl.Linear(3 * (hw[0] // 2) * (hw[1] // 2), 4)],
                              (2,) + hw, dtype=dtype, seed=3)
    if min(hw) < 2:
        with pytest.raises(ValueError):
            build()
        return
    fused, plain = build(), build()
    assert [i for i, l in fused.chain.passes if l.fused_previous] == [2]  # the ReLU at 1 runs in the pool
    plain.chain.fuse(False)
    plain._reset_plans()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2) + hw).astype(dtype)
    x[0] = -np.abs(x[0])                                # conv output mostly <= 0
    x[1, :, 0, 0] = np.nan
    g = rng.standard_normal((5, 4)).astype(dtype)
    for nt in (1, 2):
        with cdl.threads(nt):
            outs = []
            for m in (fused, plain):
                y = m.forward(x)
                dx = m.backward(g)
                outs.append((y, dx, m.layers[2].indices.copy(),
                             [gr.copy() for _, _, gr in m.parameters()], m.predict(x)))
        (y1, dx1, i1, g1, p1), (y2, dx2, i2, g2, p2) = outs
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(dx1, dx2)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(p1, p2)
        for a, b in zip(g1, g2):
            np.testing.assert_array_equal(a, b)
    assert fused.layers[1]._last is None and plain.layers[1]._last is not None


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_pool_kernels_match_separate_kernels(isa, dtype):
    from cdl._kernels._dispatch import SUPPORTED
    if isa not in SUPPORTED:
        pytest.skip(f"CPU lacks {isa}")
    import importlib
    pool, ew = (importlib.import_module(f"cdl._kernels.{m}_{isa}") for m in ("_pool", "_elementwise"))
    rng = np.random.default_rng(1)
    for shape in [(2, 3, 28, 28), (1, 2, 9, 7), (3, 1, 32, 40), (1, 1, 2, 2)]:
        x = rng.standard_normal(shape).astype(dtype)
        x.flat[::7] = 0.0
        x.flat[::11] = -0.0
        x.flat[min(5, x.size - 1)] = np.nan
        oshape = shape[:2] + (shape[2] // 2, shape[3] // 2)
        r = np.empty_like(x)
        ew.relu_forward(x.reshape(-1), r.reshape(-1), 2)
        y_ref, i_ref = np.empty(oshape, dtype), np.empty(oshape, np.int32)
        pool.max_pool2d_forward(r, y_ref, i_ref, 2, 2, 2, 2, 0, 0, 2)
        y, idx = np.empty(oshape, dtype), np.empty(oshape, np.int32)
        pool.max_pool2d_relu_forward(x, y, idx, 2)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(idx, i_ref)
        g = rng.standard_normal(oshape).astype(dtype)
        dr, dx_ref, dx = np.empty_like(x), np.empty_like(x), np.full_like(x, 7.0)
        pool.max_pool2d_backward(g, i_ref, dr, 2, 2, 2, 2, 0, 0, 2)
        ew.relu_backward(dr.reshape(-1), r.reshape(-1), dx_ref.reshape(-1), 2)
        assert pool.max_pool2d_relu_backward(g, y, idx, dx, 2) == 0
        np.testing.assert_array_equal(dx, dx_ref)


def test_reprs_show_the_settings_and_no_arrays():
    assert repr(cdl.StepLR(10)) == "StepLR(step_size=10, gamma=0.1)"
    assert repr(cdl.ExponentialLR(0.5)) == "ExponentialLR(gamma=0.5)"
    assert repr(cdl.CosineLR(15, min_lr=0.001)) == "CosineLR(epochs=15, min_lr=0.001)"
    assert repr(cdl.EarlyStopping(patience=3)) == (
        "EarlyStopping(monitor='val_loss', patience=3, min_delta=0.0, mode='min', "
        "restore_best_weights=False, initial_value_threshold=None, initial_wait=0)")
    assert repr(cdl.ModelCheckpoint("ckpt-{epoch}.npz", monitor="val_accuracy",
                                    save_best_only=True)) == (
        "ModelCheckpoint(path='ckpt-{epoch}.npz', monitor='val_accuracy', "
        "save_best_only=True, mode='max', save_optimizer=False, initial_value_threshold=None)")
    assert repr(cdl.Callback()) == "Callback()"

    # a user subclass whose get_config cannot answer still has a repr
    class Late(cdl.StepLR):
        def __init__(self):         # (sets none of StepLR's settings)
            pass

    class Odd(cdl.Callback):
        def get_config(self):
            return ["not", "a", "dict"]
    for cb in (Late(), Odd()):
        assert repr(cb).startswith("<") and type(cb).__name__ in repr(cb)
    m = cdl.Sequential([cdl.Linear(300, 200), cdl.ReLU(), cdl.Linear(200, 10)], (300,),
                       seed=0, l2=1e-4)
    assert repr(m.parameter_pack) == "ParameterPack(parameters=4, elements=62210, dtype=float32)"
    assert repr(m).endswith("], input_shape=(300,), dtype=float32, l2=0.0001)")
    m.l2 = 0
    assert repr(m).endswith("], input_shape=(300,), dtype=float32)")
