"""Loss kernels (softmax CE, multiclass SVM, half squared error, L2) against NumPy twins."""
import warnings

import numpy as np
import pytest

import cdl.functional as F


# ------------------------------------------------------------ NumPy reference

def ref_softmax(s):
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_cross_entropy(s, y):
    s = s.astype(np.float64)
    m = s.max(axis=1, keepdims=True)
    logp = s - m - np.log(np.exp(s - m).sum(axis=1, keepdims=True))
    loss = -logp[np.arange(len(y)), y]
    grad = np.exp(logp)
    grad[np.arange(len(y)), y] -= 1
    return loss, grad


def ref_svm(s, y, delta):
    s = s.astype(np.float64)
    n, c = s.shape
    loss = np.zeros(n)
    grad = np.zeros((n, c))
    for i in range(n):
        for j in range(c):
            if j == y[i]:
                continue
            d = s[i, j] - s[i, y[i]] + delta
            if d > 0:
                loss[i] += d
                grad[i, j] += 1
                grad[i, y[i]] -= 1
    return loss, grad


def ref_mse(p, t):
    r = (p - t).astype(np.float64).reshape(len(p), -1)
    return 0.5 * (r ** 2).sum(axis=1), (p - t).astype(np.float64)


def one_hot(y, c):
    t = np.zeros((len(y), c))
    t[np.arange(len(y)), y] = 1
    return t


SHAPES = [(1, 1), (1, 10), (5, 3), (13, 7), (64, 10), (3, 200), (257, 11)]
TOL = {np.float32: 1e-4, np.float64: 1e-10}


def reduce(per_sample, grad, reduction):
    n = len(per_sample)
    scale = 1.0 / n if reduction == "mean" else 1.0
    return per_sample.sum() * scale, grad * scale


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_losses_match_numpy(shape, dtype, reduction):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    s = (rng.standard_normal(shape) * 3).astype(dtype)
    y = rng.integers(0, shape[1], shape[0])
    tol = TOL[dtype]

    loss, grad = F.softmax_cross_entropy(s, y, reduction=reduction)
    ref_l, ref_g = reduce(*ref_cross_entropy(s, y), reduction)
    assert loss == pytest.approx(ref_l, rel=tol, abs=tol)
    np.testing.assert_allclose(grad, ref_g, rtol=tol, atol=tol)
    assert grad.dtype == dtype

    for delta in (1.0, 0.3):
        loss, grad = F.multiclass_svm(s, y, margin=delta, reduction=reduction)
        ref_l, ref_g = reduce(*ref_svm(s, y, delta), reduction)
        assert loss == pytest.approx(ref_l, rel=tol, abs=tol)
        np.testing.assert_allclose(grad, ref_g, rtol=tol, atol=tol)

    t = rng.standard_normal(shape).astype(dtype)
    loss, grad = F.mse(s, t, reduction=reduction)
    ref_l, ref_g = reduce(*ref_mse(s, t), reduction)
    assert loss == pytest.approx(ref_l, rel=tol, abs=tol)
    np.testing.assert_allclose(grad, ref_g, rtol=tol, atol=tol)

    loss, grad = F.mse(s, y.astype(np.int32), reduction=reduction)
    ref_l, ref_g = reduce(*ref_mse(s, one_hot(y, shape[1]).astype(dtype)), reduction)
    assert loss == pytest.approx(ref_l, rel=tol, abs=tol)
    np.testing.assert_allclose(grad, ref_g, rtol=tol, atol=tol)

    np.testing.assert_allclose(F.softmax(s), ref_softmax(s.astype(np.float64)), rtol=tol, atol=tol)


def test_probs_buffer_and_grad_buffer():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((6, 4)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    probs = np.empty_like(s)
    grad = np.empty_like(s)
    loss, g = F.softmax_cross_entropy(s, y, probs=probs, grad=grad)
    assert g is grad
    np.testing.assert_allclose(probs, ref_softmax(s.astype(np.float64)), rtol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-6)


def test_mse_accepts_nd_predictions():
    rng = np.random.default_rng(2)
    p = rng.standard_normal((4, 3, 2))
    t = rng.standard_normal((4, 3, 2))
    loss, grad = F.mse(p, t)
    assert loss == pytest.approx(0.5 * ((p - t) ** 2).sum() / 4, rel=1e-12)
    np.testing.assert_allclose(grad, (p - t) / 4, rtol=1e-12)
    loss, grad = F.mse(np.array([1.0, 2.0]), np.array([0.0, 0.0]), reduction="sum")
    assert loss == pytest.approx(2.5)


def numerical_grad(f, s, eps=1e-6):
    num = np.empty_like(s)
    for i in np.ndindex(s.shape):
        old = s[i]
        s[i] = old + eps
        lp = f(s)
        s[i] = old - eps
        lm = f(s)
        s[i] = old
        num[i] = (lp - lm) / (2 * eps)
    return num


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_central_difference(reduction):
    rng = np.random.default_rng(3)
    s = rng.standard_normal((5, 6))
    y = rng.integers(0, 6, 5)
    t = rng.standard_normal((5, 6))
    checks = {
        "softmax_cross_entropy": lambda a: F.softmax_cross_entropy(a, y, reduction=reduction),
        # margins are random reals: none sits exactly on the kink at 0
        "multiclass_svm": lambda a: F.multiclass_svm(a, y, margin=0.7, reduction=reduction),
        "mse": lambda a: F.mse(a, t, reduction=reduction),
        "mse_labels": lambda a: F.mse(a, y, reduction=reduction),
    }
    for name, f in checks.items():
        grad = f(s)[1]
        num = numerical_grad(lambda a: f(a)[0], s)
        err = np.abs(grad - num).max() / np.abs(num).max()
        assert err < 1e-6, name


def test_l2_penalty():
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((3, 4)), rng.standard_normal(7), rng.standard_normal((2, 2, 3))]
    expect = 0.01 * sum((w ** 2).sum() for w in ws)
    assert F.l2_penalty(ws, 0.01) == pytest.approx(expect, rel=1e-13)
    assert F.l2_penalty(ws[0], 0.5) == pytest.approx(0.5 * (ws[0] ** 2).sum(), rel=1e-13)
    assert F.l2_penalty(iter(ws), 0.0) == 0.0
    w32 = ws[0].astype(np.float32)
    assert F.l2_penalty(w32, 1.0) == pytest.approx(float((w32.astype(np.float64) ** 2).sum()),
                                                   rel=1e-12)
    # gradient 2*lam*W by central differences
    w = ws[0]
    num = numerical_grad(lambda a: F.l2_penalty(a, 0.3), w)
    np.testing.assert_allclose(num, 2 * 0.3 * w, rtol=1e-6, atol=1e-9)


def test_stable_for_large_scores():
    s = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [1000.0, 1000.0, 999.0]])
    y = np.array([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grad = F.softmax_cross_entropy(s, y, reduction="sum")
        p = F.softmax(s.astype(np.float32))
    assert np.isfinite(loss) and np.isfinite(grad).all() and np.isfinite(p).all()
    ref_l, ref_g = ref_cross_entropy(s, y)
    assert loss == pytest.approx(ref_l.sum(), rel=1e-12)
    np.testing.assert_allclose(grad, ref_g, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_keeps_its_precision_for_huge_scores(dtype):
    # log Σ e^{s_j − m} must not be added to m = 1e17 before s_y is taken off
    for big in (1e10, 1e17, 1e30):
        s = np.array([[big, big, big], [big, big - big / 1e3, big]], dtype)
        loss = [F.softmax_cross_entropy(s[i:i + 1], np.array([i]), reduction="sum")[0]
                for i in range(2)]
        np.testing.assert_allclose(loss, [np.log(3.0), np.log(2.0) + float(s[1, 0] - s[1, 1])],
                                   rtol=1e-6)


def test_nan_in_scores_gives_nan_loss():
    s = np.zeros((3, 4))
    s[1, 2] = np.nan
    y = np.array([0, 1, 3])
    for f in (lambda: F.softmax_cross_entropy(s, y), lambda: F.multiclass_svm(s, y),
              lambda: F.mse(s, y), lambda: F.mse(s, np.zeros_like(s))):
        loss, grad = f()
        assert np.isnan(loss)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_svm_nan_margin_gives_nan_gradient(dtype):
    # A NaN score poisons the loss; its gradient, and the label score's, must say so
    # too (a finite gradient would train on as if nothing happened).
    s = np.zeros((3, 4), dtype)
    s[1, 2] = np.nan            # a competing score
    s[2, 3] = np.nan            # the label's own score: every margin of row 2
    y = np.array([0, 1, 3])
    loss, grad = F.multiclass_svm(s, y)
    assert np.isnan(loss)
    expected_nan = np.zeros((3, 4), bool)
    expected_nan[1, [1, 2]] = True
    expected_nan[2] = True
    np.testing.assert_array_equal(np.isnan(grad), expected_nan)
    # the row without a NaN keeps its ordinary gradient (margins 1: every j != y active)
    np.testing.assert_array_equal(grad[0], np.array([-3, 1, 1, 1], dtype) / 3)
    np.testing.assert_array_equal(grad[1, [0, 3]], np.array([1, 1], dtype) / 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_bitwise(dtype):
    rng = np.random.default_rng(5)
    s = rng.standard_normal((1000, 37)).astype(dtype)
    y = rng.integers(0, 37, 1000)
    t = rng.standard_normal(s.shape).astype(dtype)
    calls = [lambda nt: F.softmax_cross_entropy(s, y, probs=np.empty_like(s), threads=nt),
             lambda nt: F.multiclass_svm(s, y, threads=nt),
             lambda nt: F.mse(s, t, threads=nt),
             lambda nt: F.mse(s, y, threads=nt),
             lambda nt: (0.0, F.softmax(s, threads=nt))]
    for call in calls:
        l1, g1 = call(1)
        l2, g2 = call(2)
        assert l1 == l2 and g1.tobytes() == g2.tobytes()


def test_bad_labels():
    s = np.zeros((4, 3), np.float32)
    for f in (F.softmax_cross_entropy, F.multiclass_svm, F.mse):
        name = f.__name__
        with pytest.raises(ValueError, match=rf"{name}: labels must lie in \[0, 3\) for 3 classes \((scores|pred) shape 4x3\), got 3"):
            f(s, np.array([0, 1, 2, 3]))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*got -1"):
            f(s, np.array([0, -1, 2, 1]))
        with pytest.raises(ValueError, match=rf"{name}: labels has 3 entries but (scores|pred) has 4 rows \(shape 4x3\)"):
            f(s, np.array([0, 1, 2]))
        with pytest.raises(ValueError, match=r"labels must be 1-D \(N,\), got shape 4x1"):
            f(s, np.zeros((4, 1), np.int64))
    with pytest.raises(TypeError, match="labels must be integer class indices, got dtype float64"):
        F.softmax_cross_entropy(s, np.array([0.0, 1.0, 2.0, 1.0]))
    # bool labels are classes 0 and 1, as the loss classes take them
    scores = np.arange(12, dtype=np.float32).reshape(4, 3)
    for got, want in zip(F.multiclass_svm(scores, np.array([True, False, True, False])),
                         F.multiclass_svm(scores, np.array([1, 0, 1, 0]))):
        np.testing.assert_array_equal(got, want)


def test_bad_scores_and_options():
    s = np.zeros((4, 3), np.float32)
    y = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match="softmax_cross_entropy: scores must be 2-D, got 1-D"):
        F.softmax_cross_entropy(s[0], y[:1])
    with pytest.raises(TypeError, match="scores must be float32 or float64, got dtype int64"):
        F.multiclass_svm(np.zeros((4, 3), np.int64), y)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        F.softmax_cross_entropy(s, y, reduction="none")
    with pytest.raises(ValueError, match="grad must have shape 4x3, got 3x4"):
        F.multiclass_svm(s, y, grad=np.empty((3, 4), np.float32))
    with pytest.raises(TypeError, match="probs must have dtype float32, got float64"):
        F.softmax_cross_entropy(s, y, probs=np.empty((4, 3)))
    with pytest.raises(ValueError, match="margin must be a finite number"):
        F.multiclass_svm(s, y, margin=float("nan"))
    with pytest.raises(ValueError, match="mse: target has shape 4x2 but pred has 4x3"):
        F.mse(s, np.zeros((4, 2), np.float32))
    with pytest.raises(TypeError, match="mse: target has dtype float64 but pred has float32"):
        F.mse(s, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"mse: with integer labels pred must be 2-D \(N, C\), got shape 4x3x1"):
        F.mse(s[..., None], y)
    with pytest.raises(ValueError, match="needs at least one class"):
        F.softmax(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="l2_penalty: lam must be a finite number >= 0, got -1"):
        F.l2_penalty(s, -1)
    with pytest.raises(TypeError, match=r"l2_penalty: weights\[1\] must be float32 or float64"):
        F.l2_penalty([s, np.zeros(3, np.int32)], 0.1)


def test_matches_torch_if_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    s = rng.standard_normal((16, 10))
    y = rng.integers(0, 10, 16)
    ts = torch.from_numpy(s)
    ty = torch.from_numpy(y)
    assert F.softmax_cross_entropy(s, y)[0] == pytest.approx(
        torch.nn.functional.cross_entropy(ts, ty).item(), rel=1e-12)
    assert F.multiclass_svm(s, y)[0] == pytest.approx(
        10 * torch.nn.functional.multi_margin_loss(ts, ty).item(), rel=1e-12)


def test_an_empty_label_list_is_integer_labels():
    # NumPy makes [] float64; labels with no elements hold no value that is not a class
    # index, so they are labels of no sample and the shape checks say what is wrong
    empty = np.zeros((0, 3), np.float32)
    for f in (F.softmax_cross_entropy, F.multiclass_svm, F.mse):
        for labels in ([], (), np.array([])):
            if f is F.mse and isinstance(labels, np.ndarray):
                continue        # (a float array is mse's float target)
            loss, grad = f(empty, labels)
            assert loss == 0.0 and grad.shape == (0, 3)
        name = f.__name__
        with pytest.raises(ValueError, match=rf"{name}: labels has 0 entries but (scores|pred) "
                                             rf"has 4 rows \(shape 4x3\)"):
            f(np.zeros((4, 3), np.float32), [])
        with pytest.raises(ValueError, match=r"labels must be 1-D \(N,\), got shape 1x0"):
            f(np.zeros((1, 3), np.float32), [[]])
        if f is not F.mse:
            # an empty float ndarray of another shape is refused as any float array is
            with pytest.raises(TypeError, match=r"labels must be integer class indices, got "
                                                r"dtype float64 \(shape 0x3\)"):
                f(empty, np.zeros((0, 3)))
    # mse: a [] against a pred that integer labels cannot fit keeps the shape error
    for pred, shown in ((np.zeros(4), "4"), (np.zeros((0, 3, 2)), "0x3x2")):
        with pytest.raises(ValueError, match=rf"mse: target has shape 0 but pred has {shown}$"):
            F.mse(pred, [])
    # the loss classes too
    import cdl
    s = np.zeros((2, 3), np.float32)
    for loss in (cdl.SoftmaxCrossEntropy(), cdl.MulticlassSVM(), cdl.MSE()):
        with pytest.raises(ValueError, match=rf"{type(loss).__name__}.forward: targets must "
                                             rf"have shape \(2,\) \(one label per sample\), "
                                             rf"got 0"):
            loss(s, [])
