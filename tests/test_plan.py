"""train_step through a TrainPlan (bound kernel calls) against the layer-by-layer step.

Both run the same kernels on the same buffers, so every loss, weight, velocity,
gradient and pooling index must be bit for bit the same.
"""
import numpy as np
import pytest

import cdl


def mlp():
    return [cdl.Linear(20, 48), cdl.ReLU(), cdl.Linear(48, 16), cdl.Sigmoid(), cdl.Linear(16, 5)]


def cnn():
    # Fused ReLU + 2x2 pool, a sigmoid, an overlapping padded pool, Flatten, Linear.
    return [cdl.Conv2d(2, 6, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
            cdl.Conv2d(6, 8, 3, stride=2, padding=1), cdl.Sigmoid(),
            cdl.MaxPool2d(3, stride=2, padding=1), cdl.Flatten(), cdl.Linear(8, 5)]


def flat_first():
    # The model's input goes through Flatten and a ReLU before the first parameters.
    return [cdl.Flatten(), cdl.ReLU(), cdl.Linear(2 * 4 * 4, 7), cdl.Linear(7, 5)]


def big_first():
    # A first layer big enough for the small-batch row chunks (784 x 256).
    return [cdl.Linear(784, 256), cdl.ReLU(), cdl.Linear(256, 5)]


NETS = {"mlp": (mlp, (20,), 0.05), "cnn": (cnn, (2, 8, 8), 0.05),
        "flat_first": (flat_first, (2, 4, 4), 0.05), "big_first": (big_first, (784,), 0.002)}


def _targets(loss_name, rng, n):
    if loss_name == "mse_float":
        return rng.standard_normal((n, 5)).astype(np.float32)
    return rng.integers(0, 5, n)


def _loss(loss_name):
    return {"ce": cdl.SoftmaxCrossEntropy(), "svm": cdl.MulticlassSVM(margin=0.5),
            "mse": cdl.MSE(reduction="sum"), "mse_float": cdl.MSE()}[loss_name]


def _run(net, loss_name, use_plan, batches, l2=0.0, momentum=0.0, nesterov=False):
    build, shape, lr = NETS[net]
    model = cdl.Sequential(build(), shape, seed=3, l2=l2)
    model._use_plans = use_plan
    loss = _loss(loss_name)
    opt = cdl.SGD(model, lr=lr, momentum=momentum, nesterov=nesterov)
    rng = np.random.default_rng(11)
    losses, record = [], []
    for n in batches:
        x = rng.standard_normal((n,) + shape).astype(np.float32)
        y = _targets(loss_name, rng, n)
        losses.append(model.train_step(x, y, loss, opt))
        record.append(loss.backward().copy())
        record += [g.copy() for _, _, g in model.parameters()]
        record += [layer.indices.copy() for layer in model.layers
                   if isinstance(layer, cdl.MaxPool2d)]
    record += [p.copy() for _, p, _ in model.parameters()]
    record += [v.copy() for v in opt.velocities.values()]
    return model, losses, record


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("loss_name,l2,momentum,nesterov", [
    ("ce", 0.0, 0.0, False), ("svm", 1e-3, 0.9, True), ("mse", 0.0, 0.5, False),
    ("mse_float", 1e-2, 0.0, False)])
def test_plan_matches_layer_by_layer_bitwise(net, loss_name, l2, momentum, nesterov):
    batches = [1, 3, 1, 8, 3, 17, 1]     # more sizes than plans kept: rebuilt on the way
    planned, losses, a = _run(net, loss_name, True, batches, l2, momentum, nesterov)
    layered, losses_ref, b = _run(net, loss_name, False, batches, l2, momentum, nesterov)
    assert planned._plans and not layered._plans
    assert losses == losses_ref and np.isfinite(losses).all()
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert u.tobytes() == v.tobytes(), f"item {i} differs"


def test_backward_after_a_planned_step_matches():
    """model.backward after train_step sees the step's forward, as layer by layer."""
    grads = []
    for use_plan in (True, False):
        model = cdl.Sequential(cnn(), (2, 8, 8), seed=1)
        model._use_plans = use_plan
        x = np.random.default_rng(0).standard_normal((4, 2, 8, 8)).astype(np.float32)
        model.train_step(x, np.arange(4), cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.1))
        grads.append(model.backward(np.ones((4, 5), np.float32)))
    assert grads[0].tobytes() == grads[1].tobytes()


def test_plan_rebinds_each_input():
    """A plan binds the arrays of the current step, never those of the one it was built in."""
    model = cdl.Sequential(mlp(), (20,), seed=0)
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.0001)
    rng = np.random.default_rng(5)
    x1, x2 = (rng.standard_normal((2, 20)).astype(np.float32) for _ in range(2))
    model.train_step(x1, np.array([0, 1]), loss, opt)
    got = model.train_step(x2, np.array([2, 3]), loss, opt)
    fresh = cdl.Sequential(mlp(), (20,), seed=0)
    fresh.set_weights(model.get_weights())
    want, _ = fresh.evaluate(x2, np.array([2, 3]), loss)
    assert got == pytest.approx(want, rel=1e-3)   # one tiny update apart
    assert len(model._plans) == 1


def test_no_plan_for_float64_or_custom_loss():
    model = cdl.Sequential(mlp(), (20,), dtype=np.float64, seed=0)
    x, y = np.ones((2, 20)), np.array([0, 1])
    model.train_step(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.1))
    assert model._plans == []

    class Halved(cdl.SoftmaxCrossEntropy):
        def _kernel(self, *args):
            return 0.5 * super()._kernel(*args)
    model = cdl.Sequential(mlp(), (20,), seed=0)
    value = model.train_step(x, y, Halved(), cdl.SGD(model, lr=0.1))
    assert model._plans == [] and np.isfinite(value)


def test_plan_skips_update_on_nan_loss():
    model = cdl.Sequential(mlp(), (20,), seed=0)
    before = model.get_weights()
    x = np.full((2, 20), np.nan, np.float32)
    value = model.train_step(x, np.array([0, 1]), cdl.SoftmaxCrossEntropy(),
                             cdl.SGD(model, lr=0.1))
    assert np.isnan(value) and model._plans
    for k, w in model.get_weights().items():
        assert w.tobytes() == before[k].tobytes()


@pytest.mark.parametrize("net", sorted(NETS))
def test_predict_plan_matches_layer_by_layer_bitwise(net):
    build, shape, _ = NETS[net]
    planned = cdl.Sequential(build(), shape, seed=4)
    layered = cdl.Sequential(build(), shape, seed=4)
    layered._use_plans = False
    rng = np.random.default_rng(2)
    for n, bs in ((1, None), (7, 3), (20, 8), (5, None)):
        x = rng.standard_normal((n,) + shape).astype(np.float32)
        a, b = planned.predict(x, batch_size=bs), layered.predict(x, batch_size=bs)
        assert a.tobytes() == b.tobytes(), (n, bs)
    assert sorted(planned._runners.sizes()) == [1, 3, 4, 5, 8]   # one runner per batch size
    # predict keeps no state for backward, and a training step is unaffected by it.
    assert all(layer._last is None for layer in planned.layers)


def test_predict_plan_large_batches_are_not_kept():
    model = cdl.Sequential(cnn(), (2, 8, 8), seed=0)
    model._runners.budget = 4 << 20
    per_sample = model._make_runner(1).nbytes
    n = (4 << 20) // per_sample + 1                 # buffers just over the 4 MB kept
    x = np.random.default_rng(0).standard_normal((n, 2, 8, 8)).astype(np.float32)
    ref = cdl.Sequential(cnn(), (2, 8, 8), seed=0)
    ref._use_plans = False
    assert model.predict(x, batch_size=n).tobytes() == ref.predict(x, batch_size=n).tobytes()
    assert model._runners.sizes() == []


def test_flatten_only_model_runs_layer_by_layer():
    """A model whose output is a view of its input has no plan (it would bind nothing)."""
    for use_plan in (True, False):
        model = cdl.Sequential([cdl.Flatten()], (5,))
        model._use_plans = use_plan
        x = np.arange(10, dtype=np.float32).reshape(2, 5)
        assert model.predict(x).tobytes() == x.tobytes()
        value = model.train_step(x, np.array([4, 0]), cdl.SoftmaxCrossEntropy(),
                                 cdl.SGD(model, lr=0.1))
        assert value == pytest.approx(float(np.mean([np.log(np.exp(x[0]).sum()) - x[0, 4],
                                                     np.log(np.exp(x[1]).sum()) - x[1, 0]])))
        assert model._plans == []


def test_changing_the_loss_or_the_flag_after_a_step_is_honoured():
    """A cached plan serves only the loss as configured when it was built, and
    _use_plans=False turns plans off even when one is cached."""
    x = np.random.default_rng(3).standard_normal((4, 20)).astype(np.float32)
    y = np.array([0, 1, 2, 3])
    results = []
    for use_plan in (True, False):
        model = cdl.Sequential(mlp(), (20,), seed=5)
        model._use_plans = use_plan
        loss, opt = cdl.MulticlassSVM(margin=1.0), cdl.SGD(model, lr=0.01)
        values = [model.train_step(x, y, loss, opt)]
        loss.margin = 5.0
        values.append(model.train_step(x, y, loss, opt))
        loss.reduction = "sum"
        values.append(model.train_step(x, y, loss, opt))
        results.append(values)
    assert results[0] == results[1]
    assert results[0][1] > results[0][0] and results[0][2] > results[0][1]
    model = cdl.Sequential(mlp(), (20,), seed=5)
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.01)
    model.train_step(x, y, loss, opt)
    assert model._plan(4, loss) is not None
    model._use_plans = False
    assert model._plan(4, loss) is None
    assert not isinstance(model._make_runner(4), cdl.plan.ForwardPlan)


class _FlatViewScale(cdl.Layer):
    """y = 2x through flat views of its buffers (ws holds views of dx), and an
    identity-like backward that returns a view of g when asked to (no dx written)."""

    def __init__(self, pass_g=False):
        super().__init__()
        self.pass_g = pass_g

    def get_config(self):
        return {"pass_g": self.pass_g}

    def _alloc(self, n, train):
        ws = super()._alloc(n, train)
        ws["out_flat"] = ws["out"].reshape(-1)
        if train:
            ws["dx_flat"] = ws["dx"].reshape(-1)
        return ws

    def _forward(self, x, ws, nt, train):
        np.multiply(x.reshape(-1), 2, out=ws["out_flat"])
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        if self.pass_g:
            return g
        np.multiply(g.reshape(-1), 2, out=ws["dx_flat"])
        return ws["dx"]


def arena_nets():
    """Gradient paths the shared input-gradient buffers must keep apart: Residuals
    without a join (their sum and masked gradient are passes of their own), a conv
    shortcut without BatchNorm, nested Residuals, Dropout and custom passes inside a
    body, and a backward that hands its incoming gradient on."""
    conv = lambda c, k, **kw: cdl.Conv2d(c, k, 3, padding=1, **kw)
    return [
        [conv(3, 4), cdl.ReLU(), cdl.Residual([conv(4, 4), cdl.Tanh(), conv(4, 4)]), cdl.ReLU(),
         cdl.Residual([conv(4, 6, stride=2), cdl.Sigmoid()],
                      shortcut=[cdl.Conv2d(4, 6, 1, stride=2)]),
         cdl.Flatten(), cdl.Linear(96, 5)],
        [conv(3, 4), cdl.Residual([cdl.Residual([conv(4, 4), cdl.BatchNorm2d(4)]),
                                   cdl.Dropout(0.3), _FlatViewScale(), conv(4, 4)]),
         cdl.ReLU(), cdl.Residual([_FlatViewScale(pass_g=True), conv(4, 4),
                                   _FlatViewScale(pass_g=True)]),
         cdl.GlobalAvgPool2d(), cdl.Linear(4, 5)],
        [cdl.Residual([conv(3, 3), cdl.BatchNorm2d(3)]), cdl.ReLU(),
         cdl.Residual([conv(3, 3), cdl.BatchNorm2d(3)]), cdl.ReLU(),
         cdl.Residual([conv(3, 3), cdl.BatchNorm2d(3)]), _FlatViewScale(),
         cdl.Flatten(), cdl.Linear(192, 5)],
        # Flatten hands on a view of its incoming gradient: a body or shortcut ending in it
        # (or made of it) gives back the caller's buffer, which is not the body's to lend
        [cdl.Flatten(), cdl.Linear(192, 8),
         cdl.Residual([cdl.Linear(8, 8), cdl.Linear(8, 8), cdl.Flatten()]), cdl.Linear(8, 5)],
        [cdl.Flatten(), cdl.Linear(192, 8),
         cdl.Residual([cdl.Linear(8, 8), cdl.Linear(8, 8), cdl.Flatten()],
                      shortcut=[cdl.Linear(8, 8)]), cdl.Linear(8, 5)],
        [conv(3, 4), cdl.Residual([conv(4, 4), conv(4, 4), cdl.Flatten()],
                                  shortcut=[cdl.Flatten()]), cdl.Linear(256, 5)],
        [cdl.Flatten(), cdl.Linear(192, 8),
         cdl.Residual([cdl.Linear(8, 8), cdl.Linear(8, 8), cdl.Residual([cdl.Flatten()])]),
         cdl.Linear(8, 5)],
    ]


@pytest.mark.parametrize("which", range(7))
def test_shared_gradient_buffers_keep_plan_equal_to_layer_by_layer(which):
    rng = np.random.default_rng(8)
    xs = [rng.standard_normal((5, 3, 8, 8)).astype(np.float32) for _ in range(3)]
    y = rng.integers(0, 5, 5)
    results = []
    for use_plan in (False, True):
        m = cdl.Sequential(arena_nets()[which], (3, 8, 8), seed=which)
        m._use_plans = use_plan
        opt = cdl.SGD(m, lr=0.05, momentum=0.9)
        values = [m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt) for x in xs]
        grads = [g.copy() for _, _, g in m.parameters()]
        results.append((values, m.state_dict(), grads))
    assert results[0][0] == results[1][0]
    for k in results[0][1]:
        np.testing.assert_array_equal(results[1][1][k], results[0][1][k], err_msg=k)
    for a, b in zip(results[0][2], results[1][2]):
        assert a.tobytes() == b.tobytes()


def test_backward_passes_share_gradient_buffers():
    """The plan lends input-gradient buffers: ResNet-8's backward writes far fewer
    bytes of them than its passes own, and no pass writes into its own."""
    from cdl.models import resnet8
    m = resnet8(seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, 4)
    loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1)
    m.train_step(x, y, loss, opt)
    arena = m._plans[0]._arena
    own = []

    def walk(layers):
        for layer in layers:
            ws = layer._ws.get(4)
            if ws is not None and isinstance(ws.get("dx"), np.ndarray):
                own.append(ws["dx"])
            for _, child in layer.children():
                walk(child.layers)
    walk(m.layers)
    assert 0 < arena.nbytes < sum(a.nbytes for a in own) / 2
    for a in own:
        a.fill(np.nan)
    m.train_step(x, y, loss, opt)
    assert all(np.isnan(a).all() for a in own)
    assert np.isfinite(m.layers[0].grads["weight"]).all()
