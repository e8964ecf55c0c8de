"""Layers against plain NumPy references, gradients, buffers and bad arguments."""
import numpy as np
import pytest

import cdl


def conv_ref(x, w, b, stride, pad):
    n, c, h, wd = x.shape
    k, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h2 = (h + 2 * pad - kh) // stride + 1
    w2 = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, k, h2, w2))
    for i in range(h2):
        for j in range(w2):
            patch = xp[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            out[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def pool_ref(x, k, s):
    n, c, h, w = x.shape
    h2, w2 = (h - k) // s + 1, (w - k) // s + 1
    out = np.zeros((n, c, h2, w2))
    idx = np.zeros((n, c, h2, w2), np.int64)
    for i in range(h2):
        for j in range(w2):
            win = x[:, :, i * s:i * s + k, j * s:j * s + k].reshape(n, c, -1)
            a = win.argmax(-1)
            out[:, :, i, j] = win.max(-1)
            idx[:, :, i, j] = (i * s + a // k) * w + (j * s + a % k)
    return out, idx


def model_of(layers, shape, **kw):
    return cdl.Sequential(layers, shape, dtype=np.float64, seed=1, **kw)


@pytest.mark.parametrize("n,fin,fout", [(1, 3, 2), (5, 7, 4), (33, 20, 130)])
def test_linear_forward_matches_numpy(n, fin, fout):
    rng = np.random.default_rng(n)
    layer = cdl.Linear(fin, fout)
    m = model_of([layer], (fin,))
    layer.params["bias"][:] = rng.standard_normal(fout)
    x = rng.standard_normal((n, fin))
    ref = x @ layer.params["weight"].T + layer.params["bias"]
    np.testing.assert_allclose(m.forward(x), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c,k,size,f,s,p", [(1, 2, 5, 3, 1, 0), (3, 4, 8, 3, 1, 1),
                                            (2, 3, 9, 3, 2, 1), (2, 2, 6, 5, 1, 2)])
def test_conv_forward_matches_numpy(c, k, size, f, s, p):
    rng = np.random.default_rng(size)
    layer = cdl.Conv2d(c, k, f, stride=s, padding=p)
    m = model_of([layer], (c, size, size))
    layer.params["bias"][:] = rng.standard_normal(k)
    x = rng.standard_normal((2, c, size, size))
    ref = conv_ref(x, layer.params["weight"], layer.params["bias"], s, p)
    np.testing.assert_allclose(m.forward(x), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("size,k,s", [(4, 2, 2), (7, 3, 2), (6, 3, 3), (5, 2, 1)])
def test_maxpool_forward_and_indices(size, k, s):
    rng = np.random.default_rng(size * k)
    layer = cdl.MaxPool2d(k, stride=s)
    m = model_of([layer], (3, size, size))
    x = rng.standard_normal((2, 3, size, size))
    y = m.forward(x)
    ref, idx = pool_ref(x, k, s)
    np.testing.assert_array_equal(y, ref)
    assert layer.indices.dtype == np.int32
    np.testing.assert_array_equal(layer.indices, idx)


def test_relu_sigmoid_flatten_forward():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4, 4))
    np.testing.assert_array_equal(model_of([cdl.ReLU()], (2, 4, 4)).forward(x), np.maximum(x, 0))
    np.testing.assert_allclose(model_of([cdl.Sigmoid()], (2, 4, 4)).forward(x),
                               1 / (1 + np.exp(-x)), rtol=1e-12)
    np.testing.assert_array_equal(model_of([cdl.Flatten()], (2, 4, 4)).forward(x),
                                  x.reshape(3, -1))


@pytest.mark.parametrize("layers,shape", [
    ([cdl.Linear(6, 5)], (6,)),
    ([cdl.Sigmoid(), cdl.Flatten(), cdl.Linear(12, 3)], (3, 2, 2)),
    ([cdl.Conv2d(2, 3, 3, stride=2, padding=1), cdl.Flatten(), cdl.Linear(27, 2)], (2, 5, 5)),
    ([cdl.Conv2d(1, 2, (3, 2), stride=(1, 2)), cdl.Flatten(), cdl.Linear(12, 2)], (1, 5, 5)),
    ([cdl.MaxPool2d(2), cdl.Flatten(), cdl.Linear(8, 3)], (2, 4, 4)),
])
def test_single_layer_gradients(layers, shape):
    m = model_of(layers, shape)
    rng = np.random.default_rng(3)
    for _, p, _ in m.parameters():
        p[...] = rng.standard_normal(p.shape) * 0.5
    x = rng.standard_normal((3,) + shape)
    errs = cdl.gradcheck(m, x, np.array([0, 1, 1]), cdl.SoftmaxCrossEntropy())
    assert max(errs.values()) < 1e-6, errs


def test_layer_standalone_forward_backward():
    rng = np.random.default_rng(0)
    layer = cdl.Linear(4, 3)
    x = rng.standard_normal((5, 4)).astype(np.float32)
    y = layer.forward(x)
    np.testing.assert_allclose(y, x @ layer.params["weight"].T, rtol=1e-5)
    g = rng.standard_normal((5, 3)).astype(np.float32)
    dx = layer.backward(g)
    np.testing.assert_allclose(dx, g @ layer.params["weight"], rtol=1e-5)
    np.testing.assert_allclose(layer.grads["weight"], g.T @ x, rtol=1e-5)
    np.testing.assert_allclose(layer.grads["bias"], g.sum(0), rtol=1e-5)
    with pytest.raises(ValueError, match="Linear: grad must have shape 5x3"):
        layer.backward(g[:, :2])


def test_buffers_are_reused_and_params_updated_in_place():
    layer = cdl.Linear(4, 3)
    m = cdl.Sequential([layer, cdl.ReLU(), cdl.Linear(3, 2)], (4,), seed=0)
    w = layer.params["weight"]
    x = np.ones((8, 4), np.float32)
    opt = cdl.SGD(m, lr=0.1)
    m.train_step(x, np.zeros(8, np.int64), cdl.SoftmaxCrossEntropy(), opt)
    out1 = m.layers[0]._workspace(8)["out"]
    before = w.copy()
    m.train_step(x, np.ones(8, np.int64), cdl.SoftmaxCrossEntropy(), opt)
    assert m.layers[0]._workspace(8)["out"] is out1
    assert layer.params["weight"] is w and not np.array_equal(w, before)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        cdl.Linear(0, 3)
    with pytest.raises(TypeError, match="out_features must be an int"):
        cdl.Linear(3, 2.5)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        cdl.Conv2d(1, 2, 0)
    with pytest.raises(TypeError, match="stride"):
        cdl.Conv2d(1, 2, 3, stride="1")
    with pytest.raises(ValueError, match="padding must be at most half"):
        cdl.MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match="init must be"):
        cdl.Linear(2, 2, init="zeros")
    with pytest.raises(ValueError, match="at most 2147483647"):
        cdl.Linear(2**20, 2**12)


def test_a_layers_own_passes_leave_out_the_neighbours_a_model_fuses_into_it():
    """Inside a model, BatchNorm and a Residual run the next ReLU in their pass, and a
    max-pool the ReLU before it; their own forward/backward still compute the layer alone,
    as the same layer in a model of its own does."""
    rng = np.random.default_rng(0)
    inside = cdl.Sequential([cdl.Conv2d(2, 3, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                             cdl.BatchNorm2d(3), cdl.ReLU(),
                             cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1)]), cdl.ReLU(),
                             cdl.Flatten(), cdl.Linear(12, 2)], (2, 4, 4), seed=1)
    assert inside.layers[2].fused_previous and inside.layers[3].fused_next \
        and inside.layers[5].fused_next
    state = inside.state_dict()
    for i, make in ((2, lambda: cdl.MaxPool2d(2)), (3, lambda: cdl.BatchNorm2d(3)),
                    (5, lambda: cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1)]))):
        layer = inside.layers[i]
        ref = cdl.Sequential([make()], layer.input_shape, seed=2)
        ref.load_state_dict({"0" + k[len(str(i)):]: v for k, v in state.items()
                             if k.startswith(f"{i}.")})
        x = -np.abs(rng.standard_normal((5,) + layer.input_shape)).astype(np.float32)
        x[0] += 3.0                                 # mostly negative: a ReLU would show
        y = layer.forward(x).copy()
        np.testing.assert_array_equal(y, ref.layers[0].forward(x), err_msg=layer.name)
        assert (y < 0).any()
        g = rng.standard_normal(y.shape).astype(np.float32)
        np.testing.assert_array_equal(layer.backward(g), ref.layers[0].backward(g),
                                      err_msg=layer.name)


def test_a_model_keeps_weights_a_layer_holds_and_draws_fresh_ones_from_its_seed():
    import copy
    import gc
    x = np.ones((2, 4), np.float32)
    # set by hand (docs/tutorial.rst), kept, also in a float64 model
    W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    for dtype in (np.float32, np.float64):
        layer = cdl.Linear(4, 3)
        layer.params["weight"][...] = W
        layer.params["bias"][...] = 1.0
        m = cdl.Sequential([layer], (4,), dtype=dtype, seed=0)
        np.testing.assert_array_equal(m.layers[0].params["weight"], W)
        np.testing.assert_allclose(m.predict(x.astype(dtype))[0], [1.6, 3.2, 4.8], rtol=1e-6)
    # trained, then reused after the model is gone or copied: weights and running statistics
    def net():
        return [cdl.Linear(4, 6), cdl.BatchNorm1d(6), cdl.ReLU(), cdl.Linear(6, 3)]
    m = cdl.Sequential(net(), (4,), seed=0)
    rng = np.random.default_rng(0)
    xs, ys = rng.standard_normal((8, 4)).astype(np.float32), np.arange(8) % 3
    opt = cdl.SGD(m, lr=0.5)
    for _ in range(3):
        m.train_step(xs, ys, cdl.SoftmaxCrossEntropy(), opt)
    state, ref = m.state_dict(), m.predict(xs)
    copies = copy.deepcopy(list(m.layers))
    layers = list(m.layers)
    del m, opt
    gc.collect()
    for reused in (cdl.Sequential(layers, (4,), seed=5), cdl.Sequential(copies, (4,), seed=6)):
        np.testing.assert_array_equal(reused.predict(xs), ref)
        for k, v in reused.state_dict().items():
            np.testing.assert_array_equal(v, state[k], err_msg=k)
    # fresh layers (and those of an untrained model) are drawn from the model's seed
    a, b = cdl.Sequential(net(), (4,), seed=3), cdl.Sequential(net(), (4,), seed=3)
    fresh = a.state_dict()
    del a
    gc.collect()
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, fresh[k], err_msg=k)
    untouched = list(b.layers)
    del b
    gc.collect()
    c = cdl.Sequential(untouched, (4,), seed=4)
    d = cdl.Sequential(net(), (4,), seed=4)
    for k, v in c.state_dict().items():
        np.testing.assert_array_equal(v, d.state_dict()[k], err_msg=k)


def test_held_values_that_no_longer_fit_the_layers_settings_are_refused():
    # A setting changed after the layer got values of its own (a copy's, or set by
    # hand): the kernels would read the old arrays out of bounds (a segfault, or NaN).
    import copy
    lin = cdl.Linear(3, 2)
    lin.params["weight"][...] = 1.0
    lin.in_features = 50
    with pytest.raises(ValueError, match=r"Linear\[0\]: the values it holds \(weight 2x3, "
                                         r"bias 2\) are not the arrays its settings make "
                                         r"\(weight 2x50, bias 2\)"):
        cdl.Sequential([lin], (50,), seed=0)
    lin.in_features = 3                     # put back: it builds and keeps its values
    m = cdl.Sequential([lin], (3,), seed=0)
    np.testing.assert_array_equal(m.layers[0].params["weight"], 1.0)

    # the check leaves all else a layer's _create sets as it was (its own seed, say)
    class Seeded(cdl.Layer):
        def _create(self, rng, init, dtype):
            self.add_param("weight", rng.standard_normal(2).astype(dtype))
            self.seed, self.calls = int(rng.integers(1 << 30)), 0

        def _forward(self, x, ws, nt, train):
            self.calls += 1
            np.copyto(ws["out"], x)
            return ws["out"]

        def _backward(self, g, x, ws, nt, need_input_grad, l2):
            return g
    try:
        layer = Seeded()
        layer.forward(np.ones((1, 4), np.float32))
        layer.params["weight"][...] = 5.0
        seed = layer.seed
        m = cdl.Sequential([layer], (4,), seed=123)
        assert (layer.seed, layer.calls) == (seed, 1)
        np.testing.assert_array_equal(layer.params["weight"], 5.0)
    finally:
        cdl.layers.LAYER_TYPES.pop("Seeded", None)

    a = cdl.Sequential([cdl.BatchNorm1d(4)], (4,), seed=0)
    x = np.ones((8, 4), np.float32)
    a.train_step(x, x, cdl.MSE(), cdl.SGD(a, 0.1))
    bn = copy.deepcopy(a.layers[0])         # keeps its running statistics
    bn.num_features = 100
    with pytest.raises(ValueError, match=r"BatchNorm1d\[0\]: the values it holds \(.*"
                                         r"running_mean 4.*\) are not the arrays its "
                                         r"settings make \(.*running_mean 100"):
        cdl.Sequential([bn], (100,), seed=0)


def test_batchnorm_counts_its_running_statistics_in_a_files_size_check():
    # affine=False has no parameters but two running statistics the file must hold: a
    # 500-byte header must not make load allocate them (2.3 GB here) before refusing
    import io
    import json
    F = 300_000_000
    header = {"format": "cdl-model", "version": 2, "arrays": [], "optimizer": None,
              "extra": {}, "model": {"input_shape": [F], "dtype": "float64", "l2": 0.0,
                                     "layers": [{"type": "BatchNorm1d", "config": {
                                         "num_features": F, "affine": False}}]}}
    f = io.BytesIO()
    np.savez(f, __cdl__=np.frombuffer(json.dumps(header).encode(), np.uint8))
    with pytest.raises(ValueError, match=r"the architecture needs 4800000000 bytes"):
        cdl.loads(f.getvalue())
    with pytest.raises(ValueError, match=r"BatchNorm1d\[0\]: .* at most 2147483647"):
        cdl.Sequential([cdl.BatchNorm1d(2**40, affine=False)], (2**40,))


def test_a_layers_own_passes_never_feed_its_models_backward_nor_the_reverse(
        lock_held_elsewhere):
    # A layer's own forward/backward run on the buffers of its model's training passes:
    # between model.forward and model.backward (a look at one layer while debugging) it
    # gave silently wrong gradients, and a model pass between a layer's own forward and
    # backward gave that backward the model's state.
    import copy
    rng = np.random.default_rng(13)
    tanh = cdl.Tanh()
    m = cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1), tanh, cdl.Conv2d(4, 3, 3, padding=1),
                        cdl.Flatten(), cdl.Linear(75, 2)], (2, 5, 5), seed=0)
    x, x2 = (rng.standard_normal((4, 2, 5, 5)).astype(np.float32) for _ in range(2))
    g = np.ones((4, 2), np.float32)
    ref = copy.deepcopy(m)
    ref.forward(x)
    want = ref.backward(g)
    m.forward(x)
    m.layers[0].forward(x2)
    with pytest.raises(RuntimeError, match=r"Sequential.backward: call forward first \(again, "
                                           r"if one of its layers' own forward"):
        m.backward(g)
    m.forward(x)                              # forward again: the model's own gradients
    np.testing.assert_array_equal(m.backward(g), want)

    xt = rng.standard_normal((4, 4, 5, 5)).astype(np.float32)
    y = tanh.forward(xt).copy()
    m.forward(x)
    with pytest.raises(RuntimeError, match=r"Tanh\[1\]: its model has run a pass since this "
                                           r"layer's own forward"):
        tanh.backward(np.ones_like(y))
    y = tanh.forward(xt).copy()
    np.testing.assert_allclose(tanh.backward(np.ones_like(y)), 1 - y * y, atol=1e-6)

    # and, like the model's passes, they wait for no other thread's step: refused
    with lock_held_elsewhere(m):
        with pytest.raises(RuntimeError, match=r"Tanh\[1\].forward: this model is being "
                                               r"trained from another thread"):
            tanh.forward(xt)


def test_flops_of_an_unbuilt_layer_asks_for_it_to_be_built():
    # its FLOPs per sample follow its input shape, which it does not know yet
    for layer in (cdl.Conv2d(3, 8, 3), cdl.MaxPool2d(2), cdl.AvgPool2d(2),
                  cdl.GlobalAvgPool2d(), cdl.ReLU(), cdl.Sigmoid(), cdl.Tanh(),
                  cdl.LeakyReLU(), cdl.BatchNorm1d(3), cdl.BatchNorm2d(3), cdl.Dropout(0.5),
                  cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1)])):
        name = type(layer).__name__
        with pytest.raises(RuntimeError, match=rf"^{name}\.flops: the layer is not built yet, "
                                               rf"so its input shape is unknown; build it "
                                               rf"first: put it in a Sequential"):
            layer.flops()
    conv = cdl.Conv2d(3, 8, 3)
    conv.forward(np.ones((1, 3, 5, 5), np.float32))
    assert conv.flops() == (2 * 3 * 3 * 3 + 1) * 8 * 3 * 3
    m = cdl.Sequential([cdl.Conv2d(3, 8, 3), cdl.ReLU()], (3, 5, 5))
    assert [l.flops() for l in m.layers] == [conv.flops(), 8 * 3 * 3]
    assert cdl.Linear(4, 3).flops() == 2 * 4 * 3 + 3       # (needs no input shape)


def test_a_layer_used_alone_computes_in_its_input_dtype():
    # Linear and Conv2d are made with float32 values; used alone on float64 input they
    # computed in float32 (the input and gradient cast down), where BatchNorm and every
    # layer without values took the input's dtype. They build in it now, their values
    # widened exactly.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 6, 6))
    for layer, xin in [(cdl.Linear(12, 2), x.reshape(4, -1)[:, :12].copy()),
                       (cdl.Conv2d(3, 2, 3, padding=1), x)]:
        w = layer.params["weight"].copy()
        assert w.dtype == np.float32
        y = layer.forward(xin)
        g = rng.standard_normal(y.shape)
        dx = layer.backward(g)
        assert layer.dtype == y.dtype == dx.dtype == layer.params["weight"].dtype == np.float64
        np.testing.assert_array_equal(layer.params["weight"], w.astype(np.float64))
        w64 = layer.params["weight"]
        if isinstance(layer, cdl.Linear):
            want = xin @ w64.T + layer.params["bias"]
            want_dx = g @ w64
        else:
            import cdl.functional as F
            want = F.conv2d(xin, w64, layer.params["bias"], padding=1)
            want_dx = F.conv2d_backward(g, xin, w64, padding=1)[0]
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
        # built: later input is cast to the layer's dtype, as a model's is
        assert layer.forward(xin.astype(np.float32)).dtype == np.float64
    lin = cdl.Linear(3, 2)
    assert lin.forward(np.ones((1, 3), np.float32)).dtype == np.float32
    assert lin.forward(np.ones((1, 3))).dtype == np.float32
