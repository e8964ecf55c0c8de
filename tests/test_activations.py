"""ReLU and Sigmoid kernels against NumPy twins, gradient checks, threads, ISAs, bad input."""
import importlib
import warnings

import numpy as np
import pytest

import cdl.functional as F
from cdl._kernels import _runtime


def ref_relu(x):
    return np.where(np.isnan(x), x, np.maximum(x, 0))


def ref_relu_backward(g, y):
    return np.where(y > 0, g, 0).astype(g.dtype)


def ref_sigmoid(x):
    # exp of a non-positive number only: no overflow.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


def ref_sigmoid_backward(g, y):
    return g * y * (1 - y)


SHAPES = [(1,), (7,), (3, 5), (2, 3, 4, 5), (1, 1, 1, 1), (0, 4), (17, 33), (5, 1000)]
TOL = {np.float32: 1e-6, np.float64: 1e-14}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_match_numpy(shape, dtype):
    rng = np.random.default_rng(len(shape) * 100 + int(np.prod(shape)))
    x = (rng.standard_normal(shape) * 5).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    y = F.relu(x)
    np.testing.assert_array_equal(y, ref_relu(x))
    np.testing.assert_array_equal(F.relu_backward(g, y), ref_relu_backward(g, y))
    s = F.sigmoid(x)
    np.testing.assert_allclose(s, ref_sigmoid(x), rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(F.sigmoid_backward(g, s), ref_sigmoid_backward(g, s),
                               rtol=TOL[dtype], atol=TOL[dtype])
    assert y.dtype == s.dtype == dtype and y.shape == s.shape == shape


@pytest.mark.parametrize("name", ["relu", "sigmoid"])
def test_gradient_central_difference(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 7))
    x[np.abs(x) < 1e-3] = 0.5      # keep ReLU away from its kink
    g = rng.standard_normal(x.shape)
    fwd, bwd = getattr(F, name), getattr(F, name + "_backward")
    dx = bwd(g, fwd(x))
    eps = 1e-6
    num = np.empty_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        lp = np.sum(fwd(x) * g)
        x[i] = old - eps
        lm = np.sum(fwd(x) * g)
        x[i] = old
        num[i] = (lp - lm) / (2 * eps)
    assert np.abs(dx - num).max() / np.abs(num).max() < 1e-6


def test_sigmoid_is_stable_at_large_inputs():
    x = np.array([-1e4, -800, -100, -30, 0, 30, 100, 800, 1e4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (np.float32, np.float64):
            s = F.sigmoid(x.astype(dtype))
            assert np.isfinite(s).all()
            assert s[0] == 0 and s[-1] == 1 and s[4] == 0.5
            assert (np.diff(s) >= 0).all()
            d = F.sigmoid_backward(np.ones_like(s), s)
            assert np.isfinite(d).all()
    z = np.array([-30.0, -100.0, -700.0, -80.0])
    np.testing.assert_allclose(F.sigmoid(z), np.exp(z) / (1 + np.exp(z)), rtol=1e-14)
    np.testing.assert_allclose(F.sigmoid(z[[0, 3]].astype(np.float32)),
                               np.exp(z[[0, 3]]) / (1 + np.exp(z[[0, 3]])), rtol=1e-6)


def test_nan_propagates():
    x = np.array([np.nan, -1.0, 1.0])
    assert np.isnan(F.relu(x)[0]) and np.isnan(F.sigmoid(x)[0])
    assert F.relu(np.array([-0.0]))[0] == 0


def test_in_place_and_out_buffer():
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    expect = ref_relu(x)
    assert F.relu(x, out=x) is x
    np.testing.assert_array_equal(x, expect)
    out = np.empty_like(x)
    assert F.sigmoid(x, out=out) is out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_bitwise(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(300_001).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    for name in ("relu", "sigmoid"):
        fwd, bwd = getattr(F, name), getattr(F, name + "_backward")
        y1, y2 = fwd(x, threads=1), fwd(x, threads=2)
        assert y1.tobytes() == y2.tobytes()
        assert bwd(g, y1, threads=1).tobytes() == bwd(g, y1, threads=2).tobytes()


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_build_agrees(isa):
    if isa not in _runtime.cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._elementwise_{isa}")
    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):
        x = (rng.standard_normal(70_001) * 10).astype(dtype)
        g = rng.standard_normal(x.shape).astype(dtype)
        y = np.empty_like(x)
        mod.relu_forward(x, y, 2)
        np.testing.assert_array_equal(y, ref_relu(x))
        d = np.empty_like(x)
        mod.relu_backward(g, y, d, 2)
        np.testing.assert_array_equal(d, ref_relu_backward(g, y))
        mod.sigmoid_forward(x, y, 2)
        np.testing.assert_allclose(y, ref_sigmoid(x), rtol=TOL[dtype], atol=TOL[dtype])
        mod.sigmoid_backward(g, y, d, 2)
        np.testing.assert_allclose(d, ref_sigmoid_backward(g, y), rtol=TOL[dtype], atol=TOL[dtype])


def test_noncontiguous_input_is_copied():
    x = np.random.default_rng(5).standard_normal((6, 8))[:, ::2]
    np.testing.assert_array_equal(F.relu(x), ref_relu(x))
    np.testing.assert_allclose(F.sigmoid(x.T), ref_sigmoid(x.T), rtol=1e-14)


def test_bad_input():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="relu: x must be float32 or float64, got dtype int64"):
        F.relu(np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="sigmoid: x must be a float32 or float64 array, got str"):
        F.sigmoid("abc")
    with pytest.raises(ValueError, match="relu: out must have shape 2x3, got 3x2"):
        F.relu(x, out=np.empty((3, 2), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32, got float64"):
        F.sigmoid(x, out=np.empty((2, 3)))
    with pytest.raises(ValueError, match="out must be a writeable C-contiguous"):
        F.relu(x, out=np.empty((3, 2), np.float32).T)
    with pytest.raises(ValueError, match="relu_backward: grad_out has shape 2x2 but y has 2x3"):
        F.relu_backward(np.zeros((2, 2), np.float32), x)
    with pytest.raises(TypeError, match="sigmoid_backward: grad_out has dtype float64 but y has float32"):
        F.sigmoid_backward(np.zeros((2, 3)), x)
    with pytest.raises(ValueError, match="relu: threads must be a positive int"):
        F.relu(x, threads=0)
