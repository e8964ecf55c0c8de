"""Numerics: softmax, cross-entropy, the SVM loss and sigmoid stay finite (and
correct) for scores of ±1e4; a NaN or Inf in a batch stops fit with a message
naming the epoch and step, and the offending update is skipped.
"""
import warnings

import numpy as np
import pytest

import cdl
import cdl.functional as F


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e4, -1e4, 3e38])
def test_losses_finite_for_huge_scores(dtype, scale):
    if scale > 1e30 and dtype == np.float64:
        scale = 1e300
    s = np.array([[scale, 0.0, -scale], [0.0, scale, scale], [-scale, -scale, -scale]], dtype)
    y = np.array([2, 0, 1])
    p = F.softmax(s)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    loss, g = F.softmax_cross_entropy(s, y, reduction="sum")
    assert np.isfinite(loss) and np.isfinite(g).all()
    # reference in exact arithmetic: L_i = logsumexp(s_i) - s_{i, y_i}
    s64 = s.astype(np.float64)
    m = s64.max(1)
    ref = m + np.log(np.exp(s64 - m[:, None]).sum(1)) - s64[np.arange(3), y]
    np.testing.assert_allclose(loss, ref.sum(), rtol=1e-6)
    loss, g = F.multiclass_svm(s, y)
    if abs(scale) < 1e30:
        assert np.isfinite(loss) and np.isfinite(g).all()
    x = np.array([scale, -scale, 0.0, 1e4, -1e4, 88.0, -88.0, 710.0, -710.0], dtype)
    sg = F.sigmoid(x)
    assert np.isfinite(sg).all() and (sg >= 0).all() and (sg <= 1).all()
    assert sg[2] == 0.5 and sg[3] == 1.0 and sg[4] == 0.0
    assert np.isfinite(F.sigmoid_backward(np.ones_like(x), sg)).all()


def test_loss_classes_finite_for_huge_scores():
    s = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, -1e4]], np.float32)
    y = np.array([1, 2])
    for loss in (cdl.SoftmaxCrossEntropy(), cdl.MulticlassSVM(), cdl.MSE()):
        v = loss.forward(s, y)
        assert np.isfinite(v) and np.isfinite(loss.backward()).all(), type(loss).__name__
    assert cdl.SoftmaxCrossEntropy(reduction="sum").forward(s, y) == pytest.approx(2e4 + np.log(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_fit_stops_on_nan_or_inf_batch(bad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    x[23, 0, 3, 3] = bad   # sample 23: with shuffle=False, batch_size=8 -> epoch 1, step 3
    m = cdl.Sequential([cdl.Conv2d(1, 4, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                        cdl.Flatten(), cdl.Linear(64, 10)], (1, 8, 8), seed=0)
    opt = cdl.SGD(m, 0.01, momentum=0.9)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=3, batch_size=8, shuffle=False,
                  verbose=0)
    msgs = [str(i.message) for i in w if issubclass(i.category, RuntimeWarning)]
    assert any("at epoch 1, step 3 of 5" in s and "NaN or Inf inputs" in s for s in msgs), msgs
    assert h.stop_reason and "epoch 1, step 3" in h.stop_reason
    assert len(h.epochs) == 0            # stopped inside the first epoch
    for _, p, _ in m.parameters():       # the bad update was skipped: weights stay finite
        assert np.isfinite(p).all()
    assert all(np.isfinite(v).all() for v in opt.velocities.values())
    assert np.isfinite(m.predict(x[:16])).all()


def test_train_step_on_nan_batch_skips_update():
    m = cdl.Sequential([cdl.Flatten(), cdl.Linear(64, 10)], (1, 8, 8), seed=0)
    opt = cdl.SGD(m, 0.1)
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[1, 0, 0, 0] = np.nan
    before = m.get_weights()
    v = m.train_step(x, np.zeros(4, np.int64), cdl.SoftmaxCrossEntropy(), opt)
    assert np.isnan(v)
    after = m.get_weights()
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)


def test_fit_stops_when_loss_diverges():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 16)) * 1e3).astype(np.float32)
    y = rng.standard_normal((64, 4)).astype(np.float32) * 1e3
    m = cdl.Sequential([cdl.Linear(16, 4)], (16,), seed=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = m.fit(x, y, cdl.MSE(), cdl.SGD(m, 10.0), epochs=50, batch_size=16, verbose=0)
    assert h.stop_reason and "loss became" in h.stop_reason and "epoch" in h.stop_reason
    assert "lower learning rate" in h.stop_reason
    assert all(np.isfinite(p).all() for _, p, _ in m.parameters())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradcheck_leaves_the_model_as_it_was(dtype):
    """A float64 model is checked in place: its BatchNorm statistics, Dropout position,
    weights and gradients must all come back exactly as they were."""
    m = cdl.Sequential([cdl.Linear(4, 6), cdl.BatchNorm1d(6), cdl.ReLU(), cdl.Dropout(0.5),
                        cdl.Linear(6, 3)], (4,), dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4))
    y = rng.integers(0, 3, 8)
    m.compute_gradients(x, y, cdl.SoftmaxCrossEntropy())   # gradients the user still holds
    state = m.state_dict()
    extra = [layer.extra_state() for _, layer in m.chain.walk()]
    grads = m.gradient_buffer.copy()
    scores = m.predict(x)
    errors = cdl.gradcheck(m, x, y, cdl.SoftmaxCrossEntropy(), max_checks=5)
    assert max(errors.values()) < 1e-5, errors
    after = m.state_dict()
    assert [k for k in state if state[k].tobytes() != after[k].tobytes()] == []
    assert [layer.extra_state() for _, layer in m.chain.walk()] == extra
    assert m.gradient_buffer.tobytes() == grads.tobytes()
    assert m.predict(x).tobytes() == scores.tobytes()
