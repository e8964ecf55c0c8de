"""cdl.dask on a LocalCluster of 2 worker processes (one thread each): predict is
bit-identical to a local predict; the learning-rate search (examples/dask_search.py)
trains in parallel and reports the best."""
import importlib.util
import os

import numpy as np
import pytest

import cdl

pytest.importorskip("dask.array", reason="Dask not installed (pip install cdl-cpu[dask])")
distributed = pytest.importorskip("distributed",
                                  reason="dask.distributed not installed (pip install cdl-cpu[dask])")
import cdl.dask  # noqa: E402
import dask  # noqa: E402
import dask.array as da  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def client():
    # two spawned workers import distributed and cdl; on a busy machine that can take
    # longer than the default 30 s connect timeout
    with dask.config.set({"distributed.comm.timeouts.connect": "120s"}), \
            distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                     dashboard_address=None, silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def cnn(seed=0):
    return cdl.Sequential([cdl.Conv2d(1, 4, 3, padding=1), cdl.BatchNorm2d(4), cdl.ReLU(),
                           cdl.MaxPool2d(2), cdl.Flatten(), cdl.Linear(64, 10)], (1, 8, 8),
                          seed=seed)


def test_predict_bit_identical(client):
    model = cnn()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 1000)
    model.train_step(x[:64], y[:64], cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.1))
    for chunks, bs in ((137, 64), (500, 256), (1000, 1000)):
        lazy = cdl.dask.predict(model, da.from_array(x, chunks=(chunks, 1, 8, 8)), batch_size=bs)
        assert lazy.shape == (1000, 10) and lazy.dtype == np.float32
        got = lazy.compute()
        assert np.array_equal(got, model.predict(x, batch_size=bs)), (chunks, bs)
    # the graph holds the model as it was: training it before compute() changes nothing,
    # on the distributed client and on the local threaded scheduler
    want = model.predict(x, batch_size=64)
    lazy = cdl.dask.predict(model, da.from_array(x, chunks=(250, 1, 8, 8)), batch_size=64)
    model.train_step(x[:64], y[:64], cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.1))
    assert not np.array_equal(model.predict(x, batch_size=64), want)
    assert np.array_equal(lazy.compute(), want)
    assert np.array_equal(lazy.compute(scheduler="threads"), want)
    # float64 input, a flat model (no dropped axes), a NumPy input
    mlp = cdl.Sequential([cdl.Linear(5, 7), cdl.Tanh(), cdl.Linear(7, 2)], (5,), seed=1)
    x2 = rng.standard_normal((301, 5))
    got = cdl.dask.predict(mlp, x2, batch_size=32).compute()
    assert np.array_equal(got, mlp.predict(x2, batch_size=32))
    with pytest.raises(ValueError, match="shape"):
        cdl.dask.predict(mlp, da.zeros((4, 6), chunks=2))


def _example():
    spec = importlib.util.spec_from_file_location(
        "dask_search", os.path.join(ROOT, "examples", "dask_search.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_search_example(client, capsys):
    pytest.importorskip("sklearn")
    example = _example()
    results = example.run(client, learning_rates=(1e-4, 0.05, 50.0), epochs=2)
    assert [r["lr"] for r in results][0] == 0.05          # the sensible one wins
    scores = [r["score"] for r in results]
    assert scores == sorted(scores) and sorted(r["lr"] for r in results) == [1e-4, 0.05, 50.0]
    assert results[0]["history"]["val_accuracy"][-1] > 0.5
    best = results[0]["model"]
    (x, y), (xv, yv) = example.digits_split()
    assert best.evaluate(xv, yv, cdl.SoftmaxCrossEntropy())[0] == \
        pytest.approx(results[0]["score"], rel=1e-6)
    out = capsys.readouterr().out
    assert "best: lr=0.05" in out


def test_search_twice_by_accuracy_and_bad_arguments(client):
    # identical data in two calls in a row (it reused the first call's released keys and
    # failed or hung); an accuracy ranks highest first; arguments are checked up front
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    y = (x.reshape(64, -1).mean(axis=1) > 0).astype(np.int64)
    val = (x[:16], y[:16])
    for _ in range(2):
        results = cdl.dask.search(cnn(), x, y, cdl.SoftmaxCrossEntropy(), [1e-4, 0.1],
                                  epochs=2, validation_data=val, monitor="val_accuracy",
                                  client=client)
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True)
        assert scores[0] == results[0]["history"]["val_accuracy"][-1]
    m, loss = cnn(), cdl.SoftmaxCrossEntropy()
    for kw, exc, match in ((dict(learning_rates=0.1), TypeError, "learning_rates must be a list"),
                           (dict(learning_rates=[0.1, -1]), ValueError, "learning rates must be finite numbers > 0"),
                           (dict(learning_rates=[0.1], optimizer="Sgd"), ValueError,
                            "unknown optimizer 'Sgd'"),
                           (dict(learning_rates=[0.1], monitor="val_acc", validation_data=val),
                            ValueError, "monitor 'val_acc' is not in fit's logs"),
                           (dict(learning_rates=[0.1], monitor="val_loss"), ValueError,
                            "monitor 'val_loss' is not in fit's logs"),
                           # what a trial would refuse, refused before anything is sent
                           (dict(learning_rates=[0.1], epochs=0), ValueError,
                            "epochs must be >= 1"),
                           (dict(learning_rates=[0.1], batch_size=0), ValueError,
                            "batch_size must be >= 1"),
                           (dict(learning_rates=[0.1], optimizer_kwargs={"momentm": 0.9}),
                            TypeError, "optimizer_kwargs: .*momentm"),
                           (dict(learning_rates=[0.1], validation_data=(x[:, :, :4], y)),
                            ValueError, "validation_data\\[0\\] must have shape")):
        with pytest.raises(exc, match=rf"cdl.dask.search: {match}"):
            cdl.dask.search(m, x, y, loss, client=client, **kw)
    for bad_model, bad_x, bad_y, bad_loss, exc, match in (
            ("model", x, y, loss, TypeError, "model must be a cdl.Sequential"),
            (m, x[:, :, :4], y, loss, ValueError, "x must have shape"),
            (m, x, y[:10], loss, ValueError, "y must have shape"),
            (m, x, y, None, TypeError, "loss must be a cdl loss")):
        with pytest.raises(exc, match=rf"cdl.dask.search: {match}"):
            cdl.dask.search(bad_model, bad_x, bad_y, bad_loss, [0.1], client=client)
