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


class FusedL2Linear(cdl.Layer):
    """y = x Wᵀ; its backward adds 2λW itself (fuses_l2)."""

    decay = ("weight",)
    fuses_l2 = True

    def __init__(self, i, o):
        super().__init__()
        self.i, self.o = i, o

    def get_config(self):
        return {"i": self.i, "o": self.o}

    def _configure(self, input_shape, source):
        return (self.o,)

    def _create(self, rng, init, dtype):
        self.add_param("weight", (rng.standard_normal((self.o, self.i)) * 0.3).astype(dtype))

    def _forward(self, x, ws, nt, train):
        np.matmul(x, self.params["weight"].T, out=ws["out"])
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        self.grads["weight"][...] = g.T @ x + 2 * l2 * self.params["weight"]
        if not need_input_grad:
            return None
        np.matmul(g, self.params["weight"], out=ws["dx"])
        return ws["dx"]


class Holder(cdl.Layer):
    """A container of its own (not Residual): its layers in a chain; ``pass_l2``
    decides whether it passes l2 on (fuses_l2) or leaves it to the model."""

    def __init__(self, layers, pass_l2=False):
        super().__init__()
        from cdl.layers.chain import Chain
        self.pass_l2 = pass_l2
        self.fuses_l2 = pass_l2
        self.body = Chain(layers, "Holder")

    def get_config(self):
        return {"layers": [l.spec() for l in self.body], "pass_l2": self.pass_l2}

    @classmethod
    def from_config(cls, config):
        from cdl.layers.residual import layer_from_spec
        return cls([layer_from_spec(s) for s in config["layers"]], config["pass_l2"])

    def children(self):
        return [("layers", self.body)]

    def build(self, input_shape, dtype, index=None, source=None, rng=None, init=None,
              keep_params=False):
        if index is not None:
            self.path = str(index)
        self.dtype, self.input_shape = np.dtype(dtype), tuple(input_shape)
        self.output_shape = tuple(self.body.build(self.input_shape, dtype, rng,
                                                  f"{self.path}.layers."))
        self._ws, self._last = {}, None
        return self.output_shape

    def _forward(self, x, ws, nt, train):
        n = x.shape[0]
        y = self.body.forward(x, nt, train, (lambda l: l._workspace(n)) if train
                              else (lambda l: l._alloc(n, False)))
        ws["out"][...] = y
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        r = self.body.backward(g, nt, need_input_grad, l2)
        if not need_input_grad:
            return None
        ws["dx"][...] = r
        return ws["dx"]


@pytest.mark.parametrize("make", [
    lambda: [FusedL2Linear(4, 6), cdl.ReLU(), cdl.Linear(6, 3)],
    lambda: [Holder([cdl.Linear(4, 6), cdl.ReLU()]), cdl.Linear(6, 3)],
    lambda: [Holder([cdl.Linear(4, 6), cdl.ReLU()], pass_l2=True), cdl.Linear(6, 3)],
    lambda: [Holder([cdl.Residual([cdl.Linear(4, 4)]), FusedL2Linear(4, 6)]),
             cdl.Linear(6, 3)]], ids=["fuses_l2", "container", "container_passing_l2",
                                      "container_of_residual"])
def test_l2_reaches_custom_layers_and_containers_on_every_path(make):
    """L2 is in the loss (λ Σ W² over every decayed weight) and so in every gradient:
    gradcheck in float64, and the plan equal to layer by layer in float32."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    m = cdl.Sequential(make(), (4,), dtype=np.float64, seed=0, l2=0.5)
    errors = cdl.gradcheck(m, x, y, cdl.SoftmaxCrossEntropy())
    assert max(errors.values()) < 1e-7, errors
    runs = []
    for use_plans in (True, False):
        m = cdl.Sequential(make(), (4,), seed=0, l2=0.5)
        m._use_plans = use_plans
        opt = cdl.SGD(m, lr=0.1)
        runs.append(([m.train_step(x.astype(np.float32), y, cdl.SoftmaxCrossEntropy(), opt)
                      for _ in range(3)], m.parameter_buffer.copy()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1].tobytes() == runs[1][1].tobytes()


def test_user_classes_of_one_name_in_two_modules_keep_apart():
    def block(module, factor):
        def _forward(self, x, ws, nt, train):
            np.multiply(x, factor, out=ws["out"])
            return ws["out"]
        return type("Block", (cdl.Layer,), {"__module__": module, "_forward": _forward})
    a, b = block("user_mod_a", 2.0), block("user_mod_b", -1.0)
    try:
        assert cdl.layers.LAYER_TYPES["Block"] is a and b.type_name == "user_mod_b.Block"
        x = np.ones((1, 3), np.float32)
        for cls, want in ((a, 2.0), (b, -1.0)):
            m = cdl.Sequential([cls()], (3,))
            for twin in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
                assert type(twin.layers[0]) is cls
                np.testing.assert_array_equal(twin.predict(x), want)
    finally:
        for key in ("Block", "user_mod_b.Block"):
            cdl.layers.LAYER_TYPES.pop(key, None)


def test_a_layer_that_could_not_be_rebuilt_is_refused_when_saved(tmp_path):
    class Mul(cdl.Layer):                       # arguments, and no get_config
        def __init__(self, k=1.0):
            super().__init__()
            self.k = k

        def _forward(self, x, ws, nt, train):
            np.multiply(x, self.k, out=ws["out"])
            return ws["out"]

    class _Private(cdl.ReLU):                   # not registered
        pass

    class Odd(cdl.ReLU):                        # a config JSON cannot hold
        def get_config(self):
            return {"k": np.float32(1)}

    for layer, match in ((Mul(3.0), r"Mul takes constructor arguments but does not define "
                                    r"get_config"),
                         (_Private(), r"its class .*_Private is not registered"),
                         (Odd(), r"Odd\[0\]: get_config\(\) must return JSON-able values")):
        m = cdl.Sequential([layer], (3,))
        for call in (lambda: pickle.dumps(m), lambda: copy.deepcopy(m),
                     lambda: m.save(str(tmp_path / "m.npz"))):
            with pytest.raises(TypeError, match=match):
                call()
        assert not (tmp_path / "m.npz").exists()


def test_a_subclass_whose_constructor_disagrees_with_its_inherited_config_is_refused(
        tmp_path):
    class Scaled(cdl.Conv2d):                   # a new argument the config does not know
        def __init__(self, *args, scale=2.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = scale

    class Square(cdl.Conv2d):                   # the config's keys are not its arguments
        def __init__(self, channels):
            super().__init__(channels, channels, 3, padding=1)

    class Same(cdl.Conv2d):                     # passes everything on: rebuilt as it is
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    class Own(Scaled):                          # its own get_config gives the argument
        def get_config(self):
            return dict(super().get_config(), scale=self.scale)

    try:
        for layer, match in (
                (Scaled(3, 4, 3, scale=5.0), r"Scaled\[0\]: .*Scaled.__init__ takes \['scale'\], "
                                             r"which the get_config\(\) it inherits from "
                                             r"Conv2d does not return"),
                (Square(3), r"Square\[0\]: get_config\(\) gives \['in_channels', .*\] but "
                            r".*Square.__init__ does not take them")):
            m = cdl.Sequential([layer], (3, 6, 6))
            for call in (lambda: pickle.dumps(m), lambda: copy.deepcopy(m),
                         lambda: m.save(str(tmp_path / "m.npz"))):
                with pytest.raises(TypeError, match=match):
                    call()
            assert not (tmp_path / "m.npz").exists()
        for layer in (Same(3, 4, 3, stride=2), Own(3, 4, 3, scale=5.0)):
            m = cdl.Sequential([layer], (3, 6, 6), seed=0)
            twin = copy.deepcopy(m)
            assert type(twin.layers[0]) is type(layer)
            assert twin.layers[0].stride == layer.stride
            assert getattr(twin.layers[0], "scale", None) == getattr(layer, "scale", None)
    finally:
        for key in ("Scaled", "Square", "Same", "Own"):
            cdl.layers.LAYER_TYPES.pop(key, None)


@pytest.mark.parametrize("mistake", ["none", "narrow", "rows", "float64", "backward_none"])
@pytest.mark.parametrize("dtype,use_plans", [(np.float32, True), (np.float32, False),
                                             (np.float64, False)])
def test_a_user_layer_returning_the_wrong_array_is_a_clear_error(mistake, dtype, use_plans):
    class Bad(cdl.Layer):
        def _forward(self, x, ws, nt, train):
            return {"none": None, "narrow": ws["out"][:, :1], "rows": ws["out"][:1],
                    "float64": ws["out"].astype(np.float64) if x.dtype == np.float32
                    else ws["out"].astype(np.float32)}.get(mistake, ws["out"])

        def _backward(self, g, x, ws, nt, need_input_grad, l2):
            return None if mistake == "backward_none" else g

    m = cdl.Sequential([cdl.Linear(4, 8), Bad(), cdl.Linear(8, 3)], (4,), dtype=dtype)
    m._use_plans = use_plans
    x = np.ones((5, 4), dtype)
    which = "_backward" if mistake == "backward_none" else "_forward"
    with pytest.raises(TypeError, match=rf"Bad\[1\]: {which} returned .*; the layer protocol "
                                        rf"needs a C-contiguous {np.dtype(dtype)} array of "
                                        rf"shape 5x8"):
        m.train_step(x, np.zeros(5, np.int64), cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1))


def test_a_subclass_of_batchnorm_merging_the_pool_after_it_passes_the_checks():
    # in training BatchNorm runs the ReLU and 2x2 max-pool after it: its pass returns the
    # pooled output, which a user subclass's check must expect
    class MyBN(cdl.BatchNorm2d):
        pass

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        m = cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1), MyBN(4), cdl.ReLU(),
                            cdl.MaxPool2d(2), cdl.Flatten(), cdl.Linear(64, 3)], (2, 8, 8),
                           dtype=dtype, seed=0)
        assert m.layers[1].merged is m.layers[3]
        x, y = rng.standard_normal((5, 2, 8, 8)).astype(dtype), rng.integers(0, 3, 5)
        assert m.forward(x).shape == (5, 3)
        m._use_plans = False
        assert np.isfinite(m.train_step(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1)))
    errors = cdl.gradcheck(m, x, y, cdl.SoftmaxCrossEntropy(), max_checks=6)
    assert max(errors.values()) < 1e-6, errors


def test_a_model_built_before_its_layer_class_was_defined_again_still_copies():
    def define():                       # a notebook cell run twice
        class Again(cdl.Layer):
            def _forward(self, x, ws, nt, train):
                np.multiply(x, 2.0, out=ws["out"])
                return ws["out"]
        return Again
    first = define()
    try:
        m = cdl.Sequential([first()], (3,))
        second = define()
        assert cdl.layers.LAYER_TYPES[first.type_name] is second
        twin = pickle.loads(pickle.dumps(m))
        assert type(twin.layers[0]) is second
        np.testing.assert_array_equal(twin.predict(np.ones((1, 3), np.float32)), 2.0)
    finally:
        cdl.layers.LAYER_TYPES.pop(first.type_name, None)


def test_a_workspace_entry_the_forward_rebinds_is_what_the_planned_backward_reads():
    # the plan handed backward a copy of the workspace made when it was built: a layer
    # storing a new array in ws during _forward trained on a stale one (or KeyError)
    class MaskReLU(cdl.Layer):
        def _forward(self, x, ws, nt, train):
            ws["mask"] = (x > 0).astype(self.dtype)
            np.multiply(x, ws["mask"], out=ws["out"])
            return ws["out"]

        def _backward(self, g, x, ws, nt, need_input_grad, l2):
            if not need_input_grad:
                return None
            np.multiply(g, ws["mask"], out=ws["dx"])
            return ws["dx"]

    try:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((6, 4)).astype(np.float32)
        y = rng.integers(0, 3, 6)
        for make in (lambda: [cdl.Linear(4, 8), MaskReLU(), cdl.Linear(8, 3)],
                     lambda: [cdl.Linear(4, 8), cdl.Residual([MaskReLU(), cdl.Linear(8, 8)]),
                              cdl.ReLU(), cdl.Linear(8, 3)]):
            plan, ref = (cdl.Sequential(make(), (4,), seed=0) for _ in range(2))
            ref._use_plans = False
            for model in (plan, ref):
                opt = cdl.SGD(model, lr=0.1)
                for _ in range(3):
                    model.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
            np.testing.assert_array_equal(plan.gradient_buffer, ref.gradient_buffer)
            for k, v in plan.state_dict().items():
                np.testing.assert_array_equal(v, ref.state_dict()[k])
    finally:
        cdl.layers.LAYER_TYPES.pop("MaskReLU", None)


def test_a_container_held_by_a_layer_child_is_walked():
    # children() giving a Layer that itself holds layers: its parameters were not in the
    # pack (never trained), the state dict, summary, copies or files
    from cdl.layers.residual import layer_from_spec

    class Wrap(cdl.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_config(self):
            return {"inner": self.inner.spec()}

        @classmethod
        def from_config(cls, config):
            return cls(layer_from_spec(config["inner"]))

        def children(self):
            return [("inner", self.inner)]

        def build(self, input_shape, dtype, index=None, source=None, rng=None, init=None,
                  keep_params=False):
            self.path, self.dtype = str(index), np.dtype(dtype)
            self.input_shape = tuple(input_shape)
            self.output_shape = self.inner.build(input_shape, dtype, index=f"{self.path}.inner",
                                                 rng=rng)
            self._ws, self._last = {}, None
            return self.output_shape

        def _forward(self, x, ws, nt, train):
            inner = self.inner._workspace(x.shape[0]) if train else \
                self.inner._alloc(x.shape[0], False)
            ws["out"][...] = self.inner._forward(x, inner, nt, train)
            return ws["out"]

        def _backward(self, g, x, ws, nt, need_input_grad, l2):
            r = self.inner._backward(g, x, self.inner._workspace(x.shape[0]), nt, True, l2)
            if need_input_grad:
                ws["dx"][...] = r
                return ws["dx"]

    try:
        m = cdl.Sequential([Wrap(cdl.Residual([cdl.Linear(4, 4)])), cdl.Linear(4, 3)], (4,),
                           seed=0)
        assert list(m.state_dict()) == ["0.inner.layers.0.weight", "0.inner.layers.0.bias",
                                        "1.weight", "1.bias"]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((8, 4)).astype(np.float32)
        y = np.arange(8) % 3
        before = m.state_dict()["0.inner.layers.0.weight"]
        opt = cdl.SGD(m, lr=0.1)
        for _ in range(3):
            m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
        assert not np.array_equal(m.state_dict()["0.inner.layers.0.weight"], before)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(m)).predict(x), m.predict(x))
        assert sum(p.size for _, p, _ in m.parameters()) == 20 + 15
    finally:
        cdl.layers.LAYER_TYPES.pop("Wrap", None)


def test_a_subclass_overriding_a_builtins_passes_is_not_fused_as_the_builtin():
    # a ReLU6 from ReLU: neighbours ran it as a plain ReLU (folded into Linear's tiles,
    # BatchNorm's pass, a Residual's join) and the plan ran ReLU's kernel
    class ReLU6(cdl.ReLU):
        def _forward(self, x, ws, nt, train):
            np.clip(x, 0, 6, out=ws["out"])
            return ws["out"]

        def _backward(self, g, x, ws, nt, need_input_grad, l2):
            if need_input_grad:
                np.multiply(g, (x > 0) & (x < 6), out=ws["dx"])
                return ws["dx"]

    try:
        x = 50 * np.arange(1, 5, dtype=np.float32)[:, None] * np.ones((4, 4), np.float32)
        for first in (lambda: cdl.Linear(4, 4), lambda: cdl.BatchNorm1d(4),
                      lambda: cdl.Residual([cdl.Linear(4, 4)])):
            m = cdl.Sequential([first(), ReLU6(), cdl.Linear(4, 3)], (4,), seed=0)
            assert m.predict(x).shape == (4, 3)
            inner = cdl.Sequential([first(), ReLU6()], (4,), seed=0)
            assert inner.predict(x).max() <= 6.0
            plan, ref = (cdl.Sequential([first(), ReLU6(), cdl.Linear(4, 3)], (4,), seed=0)
                         for _ in range(2))
            ref._use_plans = False
            y = np.arange(4) % 3
            for model in (plan, ref):
                model.compute_gradients(x / 20, y, cdl.SoftmaxCrossEntropy())
            np.testing.assert_array_equal(plan.gradient_buffer, ref.gradient_buffer)
        # overriding the plan ops as well: still no fusion as a ReLU
        class ReLU6Planned(ReLU6):
            def plan_forward(self, x, ws, train):
                return cdl.Layer.plan_forward(self, x, ws, train)

            def plan_backward(self, g, x, ws, need_input_grad):
                return cdl.Layer.plan_backward(self, g, x, ws, need_input_grad)
        m = cdl.Sequential([cdl.Linear(4, 4), ReLU6Planned()], (4,), seed=0)
        assert m.layers[0].folded == [] and m.predict(x).max() <= 6.0

        # a BatchNorm subclass ending a Residual's branch: the Residual's join (the sum,
        # and the ReLU mask after it) ran in no pass (a NaN loss, or wrong gradients)
        class MyBN(cdl.BatchNorm2d):
            def _forward(self, x, ws, nt, train):
                return super()._forward(x, ws, nt, train)
        xi = np.random.default_rng(1).standard_normal((4, 2, 6, 6)).astype(np.float32)
        yi = np.arange(4) % 3
        def net(bn_in_body):
            block = cdl.Residual([cdl.Conv2d(2, 2, 3, padding=1), MyBN(2)]) if bn_in_body \
                else cdl.Residual([cdl.Conv2d(2, 2, 3, padding=1)], [MyBN(2)])
            return cdl.Sequential([block, cdl.ReLU(), cdl.Flatten(), cdl.Linear(72, 3)],
                                  (2, 6, 6), seed=0)
        for bn_in_body in (True, False):
            plan, ref = net(bn_in_body), net(bn_in_body)
            ref._use_plans = False
            for model in (plan, ref):
                model.compute_gradients(xi, yi, cdl.SoftmaxCrossEntropy())
            assert np.isfinite(plan.gradient_buffer).all()
            np.testing.assert_array_equal(plan.gradient_buffer, ref.gradient_buffer)
    finally:
        for key in ("ReLU6", "ReLU6Planned", "MyBN"):
            cdl.layers.LAYER_TYPES.pop(key, None)



def test_a_forward_that_raises_leaves_nothing_for_backward_and_bad_output_shapes_are_named():
    class Boom(cdl.Layer):
        fail = False

        def _forward(self, x, ws, nt, train):
            if Boom.fail:
                raise RuntimeError("boom")
            np.copyto(ws["out"], x)
            return ws["out"]

        def _backward(self, g, x, ws, nt, need_input_grad, l2):
            return g.copy() if need_input_grad else None

    class Odd(cdl.Layer):
        shape = None

        def _configure(self, input_shape, source):
            return Odd.shape

    try:
        m = cdl.Sequential([cdl.Linear(6, 6), Boom(), cdl.Linear(6, 3)], (6,), seed=0)
        x = np.ones((4, 6), np.float32)
        m.forward(x)
        Boom.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            m.forward(x)
        with pytest.raises(RuntimeError, match=r"Sequential.backward: call forward first"):
            m.backward(np.ones((4, 3), np.float32))
        layer = m.layers[1]
        with pytest.raises(RuntimeError, match="boom"):
            layer.forward(x)
        with pytest.raises(RuntimeError, match=r"backward called before forward"):
            layer.backward(np.ones((4, 6), np.float32))
        for shape in ((2.7,), (0,), (-2,), "ab", None, (True,)):
            Odd.shape = shape
            with pytest.raises(ValueError, match=r"Odd\[0\]: _configure must give the "
                                                 r"per-sample output shape as a tuple of "
                                                 r"ints >= 1"):
                cdl.Sequential([Odd()], (3,))
    finally:
        for key in ("Boom", "Odd"):
            cdl.layers.LAYER_TYPES.pop(key, None)
