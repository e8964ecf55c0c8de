"""Random architectures: the training and inference plans (fused passes, residual joins,
merged max-pools, shared gradient buffers) against the layer-by-layer passes, bit for
bit: losses, every parameter and buffer after the steps, and predictions.

Hypothesis draws a net from a small grammar (convolutions of 1 to 16 channels, so the
Winograd and strided paths run too; BatchNorm, activations, pools, Dropout, Residuals
with identity or projection shortcuts, nested, or ending in Flatten; then dense layers);
a failure prints the architecture and shrinks to a small one.
"""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cdl

SETTINGS = dict(deadline=None, max_examples=100, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# A spec is (name, args) or ("Residual", body, shortcut); make() builds fresh layers.
ACTIVATIONS = [("ReLU", ()), ("LeakyReLU", (0.1,)), ("Tanh", ()), ("Sigmoid", ())]


def make(spec):
    if spec[0] == "Residual":
        _, body, shortcut = spec
        return cdl.Residual([make(s) for s in body],
                            shortcut=None if shortcut is None else [make(s) for s in shortcut])
    name, args = spec
    return getattr(cdl, name)(*args)


@st.composite
def keep_shape(draw, c, h, depth):
    """A spatial layer that keeps (c, h, h)."""
    options = ["conv", "bn", "act", "dropout"] + (["residual"] if depth < 2 else [])
    kind = draw(st.sampled_from(options))
    if kind == "conv":
        return ("Conv2d", (c, c, 3, 1, 1, draw(st.booleans())))
    if kind == "bn":
        return ("BatchNorm2d", (c,))
    if kind == "act":
        return draw(st.sampled_from(ACTIVATIONS))
    if kind == "dropout":
        return ("Dropout", (draw(st.sampled_from([0.0, 0.3])),))
    body = draw(st.lists(keep_shape(c, h, depth + 1), min_size=1, max_size=3))
    return ("Residual", body, None)


@st.composite
def spatial(draw, c, h):
    """(specs, c, h): a stage of spatial layers."""
    specs = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "keep", "pool", "project", "keep", "bn_pool"]))
        if kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            s = draw(st.sampled_from([1, 2])) if h >= 2 else 1
            c2 = draw(st.sampled_from([2, 3, 16]))
            specs.append(("Conv2d", (c, c2, k, s, k // 2, draw(st.booleans()))))
            c, h = c2, (h + 2 * (k // 2) - k) // s + 1
        elif kind == "keep":
            specs.append(draw(keep_shape(c, h, 0)))
        elif kind == "bn_pool" and h >= 2 and h % 2 == 0:
            # BatchNorm runs the ReLU and the max-pool after it in its own training pass
            specs += [("BatchNorm2d", (c,))] + ([("ReLU", ())] if draw(st.booleans()) else []) \
                + [("MaxPool2d", (2,))]
            h //= 2
        elif kind == "pool" and h >= 2 and h % 2 == 0:
            specs.append((draw(st.sampled_from(["MaxPool2d", "AvgPool2d"])), (2,)))
            h //= 2
        elif kind == "project":
            c2 = draw(st.sampled_from([3, 16]))
            s = draw(st.sampled_from([1, 2])) if h >= 2 else 1
            body = [("Conv2d", (c, c2, 3, s, 1, False)), ("BatchNorm2d", (c2,))]
            if draw(st.booleans()):
                body += [("ReLU", ()), ("Conv2d", (c2, c2, 3, 1, 1, False)), ("BatchNorm2d", (c2,))]
            shortcut = [("Conv2d", (c, c2, 1, s, 0, False))]
            if draw(st.booleans()):
                shortcut.append(("BatchNorm2d", (c2,)))
            specs.append(("Residual", body, shortcut))
            if draw(st.booleans()):
                specs.append(("ReLU", ()))
            c, h = c2, (h - 1) // s + 1
    return specs, c, h


@st.composite
def dense(draw, f):
    specs = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["linear", "bn", "act", "dropout", "residual", "flat"]))
        if kind == "linear":
            f2 = draw(st.sampled_from([4, 8]))
            specs.append(("Linear", (f, f2, draw(st.booleans()))))
            f = f2
        elif kind == "bn":
            specs.append(("BatchNorm1d", (f,)))
        elif kind == "act":
            specs.append(draw(st.sampled_from(ACTIVATIONS)))
        elif kind == "dropout":
            specs.append(("Dropout", (0.25,)))
        elif kind == "residual":
            body = [("Linear", (f, f, True))] + draw(st.lists(
                st.sampled_from([("BatchNorm1d", (f,)), ("ReLU", ()), ("Linear", (f, f, False))]),
                max_size=2))
            specs.append(("Residual", body, None))
        else:       # a pass whose gradient is a view of its incoming one, in a Residual
            body = [("Linear", (f, f, True))] * draw(st.integers(1, 3)) + [("Flatten", ())]
            specs.append(("Residual", body, draw(st.sampled_from(
                [None, [("Linear", (f, f, False))], [("Flatten", ())]]))))
    return specs + [("Linear", (f, 5, True))]


@st.composite
def architectures(draw):
    c, h = draw(st.sampled_from([1, 3])), draw(st.sampled_from([4, 6, 8]))
    specs, c2, h2 = draw(spatial(c, h))
    end = draw(st.sampled_from(["flatten", "gap", "residual_flatten"]))
    if end == "flatten":
        specs.append(("Flatten", ()))
        f = c2 * h2 * h2
    elif end == "gap":
        specs.append(("GlobalAvgPool2d", ()))
        f = c2
    else:       # a body and shortcut ending in Flatten (views of the caller's gradient)
        body = [("Conv2d", (c2, c2, 3, 1, 1, True))] * draw(st.integers(1, 2))
        specs.append(("Residual", body + [("Flatten", ())], [("Flatten", ())]))
        f = c2 * h2 * h2
    specs += draw(dense(f))
    return specs, (c, h, h)


def _run(specs, shape, use_plans, xs, y, nt):
    m = cdl.Sequential([make(s) for s in specs], shape, seed=7, l2=1e-3)
    m._use_plans = use_plans
    opt = cdl.SGD(m, lr=0.05, momentum=0.9)
    with cdl.threads(nt):
        losses = [m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt) for x in xs]
        pred = m.predict(xs[0])
    grads = [g.copy() for _, _, g in m.parameters()]
    return losses, m.state_dict(), grads, pred


@settings(**SETTINGS)
@given(architectures(), st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_plans_equal_layer_by_layer_on_random_architectures(arch, seed, nt):
    specs, shape = arch
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((4,) + shape).astype(np.float32) for _ in range(2)]
    y = rng.integers(0, 5, 4)
    planned = _run(specs, shape, True, xs, y, nt)         # and any thread count
    layered = _run(specs, shape, False, xs, y, 2)
    assert planned[0] == layered[0], specs
    for k, v in layered[1].items():
        assert planned[1][k].tobytes() == v.tobytes(), (k, specs)
    for a, b in zip(planned[2], layered[2]):
        assert a.tobytes() == b.tobytes(), specs
    assert planned[3].tobytes() == layered[3].tobytes(), specs
