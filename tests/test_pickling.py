"""Pickling through the safe model format: cloudpickle, a spawn multiprocessing pool,
and optimizers that come back bound to the unpickled model when pickled with it."""
import copy
import multiprocessing
import operator
import pickle

import numpy as np
import pytest

import cdl
import cdl.models


def small_model(seed=0):
    return cdl.Sequential([cdl.Conv2d(2, 4, 3, padding=1), cdl.BatchNorm2d(4), cdl.ReLU(),
                           cdl.MaxPool2d(2), cdl.Flatten(), cdl.Dropout(0.2),
                           cdl.Linear(4 * 4 * 4, 3)], (2, 8, 8), seed=seed)


def data(n=24, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 8, 8)).astype(np.float32), rng.integers(0, 3, n)


LOSS = cdl.SoftmaxCrossEntropy()


def train(model, opt, steps=3):
    x, y = data()
    for i in range(steps):
        model.train_step(x[8 * i:8 * i + 8], y[8 * i:8 * i + 8], LOSS, opt)


@pytest.mark.parametrize("make_opt", [
    lambda m: cdl.SGD(m, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda m: cdl.Adam(m, lr=1e-2, clip_grad_norm=1.0),
    lambda m: cdl.AdamW(m, lr=1e-2, weight_decay=0.05)], ids=["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy", "cloudpickle"])
def test_model_and_optimizer_pickled_together_stay_bound(make_opt, how):
    model = small_model()
    opt = make_opt(model)
    train(model, opt)
    if how == "pickle":
        m2, o2 = pickle.loads(pickle.dumps((model, opt)))
    elif how == "deepcopy":
        m2, o2 = copy.deepcopy((model, opt))
    else:
        cloudpickle = pytest.importorskip("cloudpickle")
        m2, o2 = cloudpickle.loads(cloudpickle.dumps((model, opt)))
    assert o2.model is m2 and o2.pack is m2.parameter_pack
    assert type(o2) is type(opt) and o2.get_config() == opt.get_config()
    assert o2.steps == opt.steps
    assert not np.shares_memory(m2.parameter_buffer, model.parameter_buffer)
    # the copy trains bit for bit like the original (optimizer state, Dropout's
    # generator, BatchNorm statistics all carried over) ...
    train(model, opt)
    train(m2, o2)
    np.testing.assert_array_equal(m2.parameter_buffer, model.parameter_buffer)
    x, _ = data(5, seed=9)
    np.testing.assert_array_equal(m2.predict(x), model.predict(x))
    # ... and its updates reach the layers the model runs
    before = m2.predict(x)
    train(m2, o2, steps=1)
    assert not np.array_equal(m2.predict(x), before)


def test_optimizer_pickled_alone_brings_its_model():
    model = small_model()
    opt = cdl.SGD(model, lr=0.1, momentum=0.9)
    train(model, opt)
    o2 = pickle.loads(pickle.dumps(opt))
    assert isinstance(o2.model, cdl.Sequential) and o2.model is not model
    np.testing.assert_array_equal(o2.model.parameter_buffer, model.parameter_buffer)
    for b in opt.buffers:
        np.testing.assert_array_equal(o2.buffers[b], opt.buffers[b])
    # two optimizers of one model share it after unpickling too
    opt_b = cdl.Adam(model, lr=1e-3)
    m3, oa, ob = pickle.loads(pickle.dumps((model, opt, opt_b)))
    assert oa.model is m3 and ob.model is m3


def test_optimizer_pickle_holds_no_numpy_pickles():
    """The optimizer's state travels as bytes, not as pickled NumPy arrays; only the
    model format and the optimizer builder are called on unpickling."""
    import pickletools

    model = small_model()
    opt = cdl.Adam(model, lr=1e-3)
    train(model, opt)
    strings = {arg for op, arg, _ in pickletools.genops(pickle.dumps((model, opt)))
               if isinstance(arg, str)}
    text = " ".join(sorted(strings))
    assert "numpy" not in text
    assert "_unpickle" in text and "_rebuild_optimizer" in text


def test_corrupt_optimizer_pickles_are_refused():
    from cdl.optim.base import _rebuild_optimizer

    model = small_model()
    with pytest.raises(ValueError, match="unknown optimizer"):
        _rebuild_optimizer(model, {"type": "os.system", "config": {}, "state": {}})
    spec = cdl.SGD(model, lr=0.1, momentum=0.9).__reduce__()[1][1]
    b = next(iter(spec["state"]))
    k = next(iter(spec["state"][b]))
    dtype, shape, raw = spec["state"][b][k]
    spec["state"][b][k] = (dtype, [10**9], raw)
    with pytest.raises(ValueError, match="malformed state"):
        _rebuild_optimizer(model, spec)


def test_cloudpickle_model_and_resnet():
    cloudpickle = pytest.importorskip("cloudpickle")
    model = cdl.models.resnet8(input_shape=(3, 8, 8), seed=0)
    copy_ = cloudpickle.loads(cloudpickle.dumps(model))
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(copy_.predict(x), model.predict(x))


def test_spawn_pool_predicts():
    model = small_model()
    opt = cdl.SGD(model, lr=0.1)
    train(model, opt)
    x, _ = data(7, seed=3)
    want = model.predict(x)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        # operator.methodcaller pickles by reference; the model through its __reduce__
        got = pool.map(operator.methodcaller("predict", x), [model, model])
    for g in got:
        np.testing.assert_array_equal(g, want)


def test_a_layer_copies_after_its_model_trained_and_the_copy_works_alone():
    # a Residual's buffers hold a training plan's ops, which do not copy: they are left out
    import copy
    m = cdl.Sequential([cdl.Conv2d(2, 8, 3, padding=1), cdl.ReLU(),
                        cdl.Residual([cdl.Conv2d(8, 8, 3, padding=1), cdl.BatchNorm2d(8)]),
                        cdl.ReLU(), cdl.GlobalAvgPool2d(), cdl.Linear(8, 3)], (2, 8, 8), seed=0)
    x = np.random.default_rng(0).standard_normal((4, 2, 8, 8)).astype(np.float32)
    m.train_step(x, np.arange(4) % 3, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1))
    block = m.layers[2]
    h = m.layers[1].forward(m.layers[0].forward(x)).copy()
    want = block.forward(h).copy()
    for twin in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        alone = cdl.Sequential([twin], (8, 8, 8), seed=1)        # keeps its trained values
        np.testing.assert_array_equal(alone.layers[0].forward(h), want)
        assert twin._ws is not block._ws


def test_a_layer_copied_before_draws_were_recorded_still_joins_a_model():
    # layers pickled by a cdl without Layer._drawn: their values count as their own
    layer = pickle.loads(pickle.dumps(cdl.Linear(4, 3)))
    del layer.__dict__["_drawn"]
    w = layer.params["weight"].copy()
    m = cdl.Sequential([layer, cdl.ReLU()], (4,), seed=1)
    np.testing.assert_array_equal(m.layers[0].params["weight"], w)
