"""The layer protocol: a layer defined only here builds, trains through the fast
plan, saves, loads, pickles and passes gradcheck, with no change to the package."""
import copy
import pickle

import numpy as np
import pytest

import cdl


class ScaledReLU(cdl.Layer):
    """y = a · max(0, x) with one learnable scalar a (L2 applies to it)."""

    decay = ("scale",)

    def __init__(self, start=0.5):
        super().__init__()
        self.start = float(start)

    def get_config(self):
        return {"start": self.start}

    def _create(self, rng, init, dtype):
        self.add_param("scale", np.full(1, self.start, dtype))

    def flops(self):
        return 2 * int(np.prod(self.output_shape))

    def _forward(self, x, ws, nt, train):
        np.multiply(np.maximum(x, 0), self.params["scale"][0], out=ws["out"])
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        self.grads["scale"][0] = (g * np.maximum(x, 0)).sum(dtype=np.float64)
        if not need_input_grad:
            return None
        np.multiply(g, (x > 0) * self.params["scale"][0], out=ws["dx"])
        return ws["dx"]


def build(dtype=np.float32, l2=0.0, seed=0):
    return cdl.Sequential([cdl.Linear(6, 8), ScaledReLU(), cdl.Linear(8, 3)], (6,),
                          dtype=dtype, seed=seed, l2=l2)


def data(n=16, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


def test_custom_layer_state_dict_names_and_summary():
    m = build()
    assert list(m.state_dict()) == ["0.weight", "0.bias", "1.scale", "2.weight", "2.bias"]
    assert "ScaledReLU" in m.summary(file=open("/dev/null", "w"))
    assert cdl.layers.LAYER_TYPES["ScaledReLU"] is ScaledReLU


def test_custom_layer_trains_through_the_plan_bit_for_bit():
    x, y = data()
    loss = cdl.SoftmaxCrossEntropy()
    planned, layered = build(l2=1e-3), build(l2=1e-3)
    layered._use_plans = False
    opt_p = cdl.SGD(planned, lr=0.1, momentum=0.9)
    opt_l = cdl.SGD(layered, lr=0.1, momentum=0.9)
    for step in range(4):
        n = 16 if step % 2 == 0 else 5
        a = planned.train_step(x[:n], y[:n], loss, opt_p)
        b = layered.train_step(x[:n], y[:n], loss, opt_l)
        assert a == b
    assert planned._plans and not layered._plans
    for (k, p, g), (_, q, h) in zip(planned.parameters(), layered.parameters()):
        np.testing.assert_array_equal(p, q, err_msg=k)
        np.testing.assert_array_equal(g, h, err_msg=k)
    # The learnable scale moved, so its gradient reached the optimizer.
    assert planned.layers[1].params["scale"][0] != 0.5


def test_custom_layer_gradcheck_with_l2():
    x, y = data(6)
    errors = cdl.gradcheck(build(l2=0.01), x, y, cdl.SoftmaxCrossEntropy())
    assert set(errors) == {"0.weight", "0.bias", "1.scale", "2.weight", "2.bias", "input"}
    assert max(errors.values()) < 1e-6, errors


def test_custom_layer_l2_penalty_covers_its_decayed_parameter():
    m = build(l2=0.5)
    w = sum(float((l.params["weight"].astype(np.float64) ** 2).sum())
            for l in m.layers if "weight" in l.params)
    assert m.l2_penalty() == pytest.approx(0.5 * (w + 0.25), rel=1e-6)


def test_custom_layer_saves_loads_and_pickles(tmp_path):
    x, y = data()
    m = build()
    opt = cdl.Adam(m, lr=0.01) if hasattr(cdl, "Adam") else cdl.SGD(m, lr=0.1)
    m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
    path = tmp_path / "custom.npz"
    m.save(path)
    loaded = cdl.load(path)
    assert isinstance(loaded.layers[1], ScaledReLU)
    np.testing.assert_array_equal(loaded.predict(x), m.predict(x))
    for copied in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m), cdl.loads(cdl.dumps(m))):
        np.testing.assert_array_equal(copied.predict(x), m.predict(x))
        assert not np.shares_memory(copied.parameter_buffer, m.parameter_buffer)


def test_copies_train_bit_for_bit_like_the_original():
    x, y = data(32)
    loss = cdl.SoftmaxCrossEntropy()
    m = build()
    opt = cdl.SGD(m, lr=0.05, momentum=0.9)
    m.fit(x, y, loss, opt, epochs=1, batch_size=8, verbose=0)
    m2, opt2 = cdl.loads(cdl.dumps(m, opt), optimizer=True)
    h1 = m.fit(x, y, loss, opt, epochs=2, batch_size=8, verbose=0)
    h2 = m2.fit(x, y, loss, opt2, epochs=2, batch_size=8, verbose=0)
    assert h1.history["loss"] == h2.history["loss"]
    np.testing.assert_array_equal(m.parameter_buffer, m2.parameter_buffer)


def _copies(model):
    """The model through every way a copy is made: pickle, the model format, deepcopy."""
    return [pickle.loads(pickle.dumps(model)), cdl.loads(cdl.dumps(model)),
            copy.deepcopy(model)]


def test_a_layer_named_like_a_builtin_never_replaces_it():
    """A user's class that shares a built-in's name gets a type name of its own
    ("<module>.<qualname>"): models holding either still copy as what they were."""
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    builtin = cdl.Sequential([cdl.Linear(4, 3), cdl.Residual([cdl.Sigmoid()])], (4,), seed=0)
    saved = pickle.dumps(builtin)       # before the user's class exists

    class Sigmoid(cdl.ReLU):
        """The user's own Sigmoid, unrelated to cdl's."""

    own = f"{__name__}.{Sigmoid.__qualname__}"
    try:
        assert cdl.layers.LAYER_TYPES["Sigmoid"] is cdl.Sigmoid
        assert cdl.layers.LAYER_TYPES[own] is Sigmoid and Sigmoid.type_name == own
        for m in [pickle.loads(saved)] + _copies(builtin):
            assert type(m.layers[1].body.layers[0]) is cdl.Sigmoid
            assert m.predict(x).tobytes() == builtin.predict(x).tobytes()
        mine = cdl.Sequential([cdl.Linear(4, 3), cdl.Residual([Sigmoid()])], (4,), seed=0)
        for m in _copies(mine):
            assert type(m.layers[1].body.layers[0]) is Sigmoid
            assert m.predict(x).tobytes() == mine.predict(x).tobytes()

        class Sigmoid(cdl.Tanh):        # noqa: F811 (a notebook cell run again)
            pass

        assert cdl.layers.LAYER_TYPES[own] is Sigmoid
        assert cdl.layers.LAYER_TYPES["Sigmoid"] is cdl.Sigmoid
    finally:
        del cdl.layers.LAYER_TYPES[own]


def test_a_builtin_defined_after_a_users_layer_of_its_name_takes_the_name():
    class Zed(cdl.ReLU):
        pass

    assert cdl.layers.LAYER_TYPES["Zed"] is Zed
    # as a layer module of the package imported later would define it
    builtin = type("Zed", (cdl.Tanh,), {"__module__": "cdl.layers.zed"})
    own = f"{__name__}.{Zed.__qualname__}"
    try:
        assert cdl.layers.LAYER_TYPES["Zed"] is builtin
        assert cdl.layers.LAYER_TYPES[own] is Zed and Zed.type_name == own
        for layer in (Zed(), builtin()):
            m = cdl.Sequential([layer], (3,), seed=0)
            assert type(cdl.loads(cdl.dumps(m)).layers[0]) is type(layer)
    finally:
        del cdl.layers.LAYER_TYPES["Zed"], cdl.layers.LAYER_TYPES[own]
