"""Bad input never crashes: every public entry point answers with a ValueError or
TypeError that names the function or layer, the argument and the shapes.

Empty batches: the functional kernels treat N = 0 (and C = 0, features = 0) as a
documented no-op that returns correctly shaped (empty or bias-only) results;
Sequential.forward / train_step / evaluate / fit reject an empty batch with a
ValueError; Sequential.predict of N = 0 returns an empty (0, ...) array.
File-system failures (missing file, folder not found) stay OSError.
"""
import gzip
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import cdl
import cdl.functional as F

f32 = np.float32


def z(*shape, dtype=f32):
    return np.zeros(shape, dtype)


X = z(2, 3, 8, 8)
W = z(4, 3, 3, 3)
S = z(4, 3)
Y = np.array([0, 1, 2, 0])


# --------------------------------------------------------------- functional kernels
BAD_ARRAYS = [
    ("object", lambda a: a.astype(object), TypeError, "float32 or float64, got dtype object"),
    ("complex", lambda a: a.astype(complex), TypeError, "got dtype complex128"),
    ("str", lambda a: "abc", TypeError, "float32 or float64 array, got str"),
    ("int", lambda a: a.astype(np.int64), TypeError, "got dtype int64"),
    ("None", lambda a: None, TypeError, "got NoneType"),
    ("strings", lambda a: a.astype(str), TypeError, "got dtype <U"),
]


@pytest.mark.parametrize("kind,make,exc,msg", BAD_ARRAYS)
@pytest.mark.parametrize("fn,args,argname", [
    ("conv2d", lambda b: (b(X), W), "x"),
    ("conv2d", lambda b: (X, b(W)), "weight"),
    ("conv2d_backward", lambda b: (b(z(2, 4, 6, 6)), X, W), "grad_out"),
    ("max_pool2d", lambda b: (b(X), 2), "x"),
    ("linear", lambda b: (b(S), z(2, 3)), "x"),
    ("linear_backward", lambda b: (z(4, 2), S, b(z(2, 3))), "weight"),
    ("relu", lambda b: (b(S),), "x"),
    ("sigmoid", lambda b: (b(S),), "x"),
    ("relu_backward", lambda b: (S, b(S)), "y"),
    ("sigmoid_backward", lambda b: (b(S), S), "grad_out"),
    ("softmax", lambda b: (b(S),), "scores"),
    ("softmax_cross_entropy", lambda b: (b(S), Y), "scores"),
    ("multiclass_svm", lambda b: (b(S), Y), "scores"),
    ("mse", lambda b: (b(S), S), "pred"),
])
def test_functional_rejects_non_float_arrays(fn, args, argname, kind, make, exc, msg):
    with pytest.raises(exc, match=rf"{fn}: {argname} must be .*{msg}" if kind != "None"
                       else rf"{fn}: {argname} must be"):
        getattr(F, fn)(*args(make))


@pytest.mark.parametrize("call,exc,match", [
    (lambda: F.conv2d(X[0], W), ValueError, r"conv2d: x must be 4-D, got 3-D array of shape 3x8x8"),
    (lambda: F.conv2d(X, W[:, :2]), ValueError,
     r"conv2d: x has 3 channels \(shape 2x3x8x8\) but weight expects 2 \(shape 4x2x3x3"),
    (lambda: F.conv2d(X, W, stride=0), ValueError, r"conv2d: stride must be >= 1, got 0"),
    (lambda: F.conv2d(X, W, stride=-2), ValueError, r"conv2d: stride must be >= 1"),
    (lambda: F.conv2d(X, W, stride=1.5), TypeError, r"conv2d: stride must be an int"),
    (lambda: F.conv2d(X, W, stride=(1, 2, 3)), ValueError, r"conv2d: stride must be an int or a pair"),
    (lambda: F.conv2d(X, W, stride=True), TypeError, r"conv2d: stride must be an int"),
    (lambda: F.conv2d(X, W, padding=-1), ValueError, r"conv2d: padding must be >= 0, got -1"),
    (lambda: F.conv2d(X, W, padding="1"), TypeError, r"conv2d: padding must be an int"),
    (lambda: F.conv2d(X, z(4, 3, 9, 9)), ValueError,
     r"conv2d: kernel H=9 is larger than the padded input H=8\+2\*0=8: H2 = \(H1 - F \+ 2P\)/S \+ 1 "
     r"= \(8 - 9 \+ 2\*0\)/1 \+ 1 < 1"),
    (lambda: F.conv2d(X, z(4, 3, 3, 11), padding=1), ValueError, r"conv2d: kernel W=11 is larger"),
    (lambda: F.conv2d(X, z(4, 3, 0, 3)), ValueError, r"conv2d: weight must have a kernel of at least 1x1"),
    (lambda: F.conv2d(X, W, z(4, 1)), ValueError, r"conv2d: bias must be 1-D"),
    (lambda: F.conv2d(X, W, z(5)), ValueError, r"conv2d: bias has 5 entries but weight has 4"),
    (lambda: F.conv2d(X, W.astype(np.float64)), TypeError,
     r"conv2d: weight has dtype float64 but x has float32"),
    (lambda: F.conv2d(X, W, out=z(2, 4, 6, 5)), ValueError, r"conv2d: out must have shape 2x4x6x6, got 2x4x6x5"),
    (lambda: F.conv2d(X, W, out=z(2, 4, 6, 6, dtype=np.float64)), TypeError, r"conv2d: out must have dtype float32"),
    (lambda: F.conv2d(X, W, out=z(2, 4, 6, 12)[..., ::2]), ValueError, r"conv2d: out must be a writeable C-contiguous"),
    (lambda: F.conv2d(X, W, out=[0]), TypeError, r"conv2d: out must be a numpy array"),
    (lambda: F.conv2d_backward(z(2, 4, 5, 5), X, W), ValueError,
     r"conv2d_backward: grad_out must have shape 2x4x6x6 \(N x K x H2 x W2\), got 2x4x5x5"),
    (lambda: F.conv2d_backward(z(2, 4, 6, 6), X, W, grad_weight=z(4, 3, 3, 2)), ValueError,
     r"conv2d_backward: grad_weight must have shape 4x3x3x3"),
    (lambda: F.max_pool2d(X, 0), ValueError, r"max_pool2d: kernel_size must be >= 1, got 0"),
    (lambda: F.max_pool2d(X, 2.5), TypeError, r"max_pool2d: kernel_size must be an int"),
    (lambda: F.max_pool2d(X, 9), ValueError, r"max_pool2d: kernel H=9 is larger than the padded input"),
    (lambda: F.max_pool2d(X, 2, stride=0), ValueError, r"max_pool2d: stride must be >= 1"),
    (lambda: F.max_pool2d(X, 2, padding=2), ValueError, r"max_pool2d: padding 2x2 must be at most half"),
    (lambda: F.max_pool2d(X[0], 2), ValueError, r"max_pool2d: x must be 4-D"),
    (lambda: F.max_pool2d(X, 2, indices=z(2, 3, 4, 4, dtype=np.int64)), TypeError,
     r"max_pool2d: indices must have dtype int32"),
    (lambda: F.max_pool2d_backward(z(2, 3, 4, 4), np.full((2, 3, 4, 4), 99, np.int32), (2, 3, 8, 8), 2),
     ValueError, r"max_pool2d_backward: 96 of 96 indices do not point into their own 2x2 window"),
    (lambda: F.max_pool2d_backward(z(2, 3, 4, 4), np.full((2, 3, 4, 4), -1, np.int32), (2, 3, 8, 8), 2),
     ValueError, r"max_pool2d_backward: 96 of 96 indices"),
    (lambda: F.max_pool2d_backward(z(2, 3, 4, 4), z(2, 3, 4, 4, dtype=np.int64), (2, 3, 8, 8), 2),
     TypeError, r"max_pool2d_backward: indices must have dtype int32"),
    (lambda: F.max_pool2d_backward(z(2, 3, 4, 4), z(2, 3, 4, 3, dtype=np.int32), (2, 3, 8, 8), 2),
     ValueError, r"max_pool2d_backward: indices has shape 2x3x4x3 but grad_out has 2x3x4x4"),
    (lambda: F.max_pool2d_backward(z(2, 3, 4, 4), z(2, 3, 4, 4, dtype=np.int32), (2, 3, 8.0, 8), 2),
     ValueError, r"max_pool2d_backward: input_shape must be 4 non-negative ints"),
    (lambda: F.max_pool2d_backward(z(2, 3, 4, 4), z(2, 3, 4, 4, dtype=np.int32), (2, 3, 8), 2),
     ValueError, r"max_pool2d_backward: input_shape must be 4"),
    (lambda: F.max_pool2d_backward(z(2, 3, 4, 4), z(2, 3, 4, 4, dtype=np.int32), (2, 3, 10, 10), 2),
     ValueError, r"max_pool2d_backward: grad_out must have shape 2x3x5x5 for input 2x3x10x10, got 2x3x4x4"),
    (lambda: F.linear(z(3), z(2, 3)), ValueError, r"linear: x must be 2-D, got 1-D array of shape 3"),
    (lambda: F.linear(S, z(2, 4)), ValueError,
     r"linear: x has 3 features \(shape 4x3\) but weight expects 4 \(shape 2x4\)"),
    (lambda: F.linear(S, z(2, 3), z(3)), ValueError, r"linear: bias has 3 entries but weight has 2"),
    (lambda: F.linear_backward(z(4, 3), S, z(2, 3)), ValueError,
     r"linear_backward: grad_out must have shape 4x2 \(batch x out_features\), got 4x3"),
    (lambda: F.linear_backward(z(4, 2), S, z(2, 3), l2=-1), ValueError, r"linear_backward: l2 must be a finite number >= 0"),
    (lambda: F.linear_backward(z(4, 2), S, z(2, 3), l2=np.nan), ValueError, r"linear_backward: l2 must be a finite"),
    (lambda: F.linear_backward(z(4, 2), S, z(2, 3), l2="a"), TypeError, r"linear_backward: l2 must be a number"),
    (lambda: F.relu_backward(z(3), z(4)), ValueError, r"relu_backward: grad_out has shape 3 but y has 4"),
    (lambda: F.sigmoid_backward(z(3), z(3, dtype=np.float64)), TypeError, r"sigmoid_backward: grad_out has dtype float32"),
    (lambda: F.relu(S, out=np.broadcast_to(z(1, 3), (4, 3))), ValueError, r"relu: out must be a writeable"),
    (lambda: F.relu(S, threads=0), ValueError, r"relu: threads must be a positive int, got 0"),
    (lambda: F.relu(S, threads=2.0), TypeError, r"relu: threads must be a positive int, got 2.0"),
    (lambda: F.relu(S, threads="2"), TypeError, r"relu: threads must be a positive int"),
    (lambda: F.relu(S, threads=True), TypeError, r"relu: threads must be a positive int"),
    # libgomp segfaults when it cannot create ~1e5 threads: refused up front
    (lambda: F.relu(z(10**6), threads=100000), ValueError, r"relu: threads=100000 is more than the 1024"),
    (lambda: F.conv2d(X, W, threads=10**12), ValueError, r"conv2d: threads=1000000000000 is more than"),
])
def test_functional_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


LABEL_FNS = ["softmax_cross_entropy", "multiclass_svm", "mse"]


@pytest.mark.parametrize("fn", LABEL_FNS)
@pytest.mark.parametrize("labels,exc,match", [
    (np.zeros(3, int), ValueError, r"labels has 3 entries but (scores|pred) has 4 rows \(shape 4x3\)"),
    (np.array([0, 1, 2, 3]), ValueError, r"labels must lie in \[0, 3\) for 3 classes .*got 3"),
    (np.array([0, 1, 2, -1]), ValueError, r"labels must lie in \[0, 3\) .*got -1"),
    (np.array([2**63 + 5, 0, 0, 0], np.uint64), ValueError, r"labels must lie in \[0, 3\)"),
    (np.zeros((4, 1), int), ValueError, r"labels must be 1-D \(N,\), got shape 4x1"),
    (np.array([0, 1, 2, 0], object), TypeError, r"labels must be integer class indices, got dtype object"),
    ("abcd", TypeError, r"labels must be integer class indices, got dtype <U4"),
    (None, TypeError, r"labels must be integer class indices"),
])
def test_loss_labels(fn, labels, exc, match):
    if fn == "mse" and (labels is None or isinstance(labels, str)
                        or np.asarray(labels).dtype.kind not in "iu"):
        # mse takes float targets too: anything non-integer is checked as a target
        match = r"mse: target"
    with pytest.raises(exc, match=rf"{fn}: {match}" if not match.startswith("mse:") else match):
        getattr(F, fn)(S, labels)


@pytest.mark.parametrize("fn", ["softmax_cross_entropy", "multiclass_svm"])
def test_loss_float_labels(fn):
    with pytest.raises(TypeError, match=rf"{fn}: labels must be integer class indices, got dtype float64"):
        getattr(F, fn)(S, np.zeros(4))


def test_functional_losses_agree_with_the_loss_classes():
    """Bool labels are taken (as the classes take them) and a negative margin refused
    (as MulticlassSVM refuses it)."""
    scores = np.random.default_rng(0).standard_normal((4, 3)).astype(f32)
    labels = np.array([True, False, True, True])
    for fn, cls in ((F.softmax_cross_entropy, cdl.SoftmaxCrossEntropy()),
                    (F.multiclass_svm, cdl.MulticlassSVM()), (F.mse, cdl.MSE())):
        value, grad = fn(scores, labels)
        assert value == cls.forward(scores, labels) == fn(scores, labels.astype(int))[0]
        np.testing.assert_array_equal(grad, cls.backward())
    with pytest.raises(ValueError, match=r"multiclass_svm: margin must be a finite number >= 0, "
                                         r"got -1.0"):
        F.multiclass_svm(scores, Y, margin=-1.0)


@pytest.mark.parametrize("call,match", [
    (lambda: F.softmax_cross_entropy([[1.0, 2.0, 3.0], [1.0]], [0, 1]), r"softmax_cross_entropy: scores"),
    (lambda: F.multiclass_svm(S, [[0], [1, 2], [0], [1]]), r"multiclass_svm: labels"),
    (lambda: F.mse([[1.0, 2.0], [1.0]], [0, 1]), r"mse: pred"),
    (lambda: F.mse(S, [[1.0, 2.0, 3.0], [1.0], [1.0], [1.0]]), r"mse: target"),
    (lambda: cdl.SoftmaxCrossEntropy().forward([[1.0, 2.0, 3.0], [1.0]], [0, 1]),
     r"SoftmaxCrossEntropy.forward: scores"),
    (lambda: cdl.MulticlassSVM().forward(S, [[0], [1, 2], [0], [1]]), r"MulticlassSVM.forward: targets"),
    (lambda: cdl.MSE().forward(S, [[1.0, 2.0, 3.0], [1.0], [1.0], [1.0]]), r"MSE.forward: targets"),
])
def test_losses_name_ragged_lists(call, match):
    # NumPy's "inhomogeneous shape" error named neither the call nor the argument
    with pytest.raises(ValueError, match=match + r" must be an array \(nested lists of equal "
                                                 r"lengths\)"):
        call()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: F.softmax_cross_entropy(z(4, 0), np.zeros(4, int)), ValueError,
     r"softmax_cross_entropy: scores needs at least one class, got shape 4x0"),
    (lambda: F.softmax_cross_entropy(S, Y, reduction="avg"), ValueError,
     r"softmax_cross_entropy: reduction must be 'mean' or 'sum', got 'avg'"),
    (lambda: F.softmax_cross_entropy(S[0], Y[:1]), ValueError, r"softmax_cross_entropy: scores must be 2-D"),
    (lambda: F.softmax_cross_entropy(S, Y, grad=z(4, 2)), ValueError, r"softmax_cross_entropy: grad must have shape 4x3"),
    (lambda: F.multiclass_svm(S, Y, margin=np.nan), ValueError, r"multiclass_svm: margin must be a finite number"),
    (lambda: F.multiclass_svm(S, Y, margin="1"), TypeError, r"multiclass_svm: margin must be a number, got '1'"),
    (lambda: F.mse(S, z(4, 2)), ValueError, r"mse: target has shape 4x2 but pred has 4x3"),
    (lambda: F.mse(S, z(4, 3, dtype=np.float64)), TypeError, r"mse: target has dtype float64 but pred has float32"),
    (lambda: F.mse(S, z(4, 3).astype(complex)), TypeError, r"mse: target must be float32 or float64"),
    (lambda: F.mse(S[0], np.zeros(1, int)), ValueError, r"mse: with integer labels pred must be 2-D"),
    (lambda: F.mse(np.float32(1), np.float32(1)), ValueError, r"mse: pred must have a batch axis"),
    (lambda: F.l2_penalty(S, -1), ValueError, r"l2_penalty: lam must be a finite number >= 0"),
    (lambda: F.l2_penalty(S, "1"), TypeError, r"l2_penalty: lam must be a number"),
    (lambda: F.l2_penalty("abc", 1), TypeError, r"l2_penalty: weights\[0\] must be a float32 or float64"),
    (lambda: F.l2_penalty(None, 1), TypeError, r"l2_penalty: weights must be an array or an iterable"),
    (lambda: F.l2_penalty([S, S.astype(int)], 1), TypeError, r"l2_penalty: weights\[1\] must be float32"),
    (lambda: F.sgd_update(S.copy(), S, lr=-1), ValueError, r"sgd_update: lr must be a finite number >= 0, got -1"),
    (lambda: F.sgd_update(S.copy(), S, lr=np.inf), ValueError, r"sgd_update: lr must be a finite number"),
    (lambda: F.sgd_update(S.copy(), S, lr="0.1"), TypeError, r"sgd_update: lr must be a number"),
    (lambda: F.sgd_update(S.copy(), S[:2], lr=1), ValueError, r"sgd_update: grad has shape 2x3 but param has 4x3"),
    (lambda: F.sgd_update([1.0], S, lr=1), TypeError, r"sgd_update: param must be a numpy array, got list"),
    (lambda: F.sgd_update(S.astype(int), S, lr=1), TypeError, r"sgd_update: param must be float32 or float64"),
    (lambda: F.sgd_update(np.broadcast_to(S, S.shape), S, lr=1), ValueError, r"sgd_update: param must be a writeable"),
    (lambda: F.sgd_update(S.copy(), S, lr=1, momentum=0.9), ValueError, r"sgd_update: momentum=0.9 needs a velocity"),
    (lambda: F.sgd_update(S.copy(), S, lr=1, nesterov=True), ValueError, r"sgd_update: nesterov=True needs momentum > 0"),
])
def test_loss_and_sgd_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------- absurd sizes: error before allocating
@pytest.mark.parametrize("call,match", [
    # padding 2**20 would make a 128 TiB output
    (lambda: F.conv2d(X, W, padding=2**20), r"conv2d: out would have shape 2x4x2097158x2097158 = "
                                             r"\d+ elements; at most 2147483647"),
    (lambda: F.conv2d(X, W, padding=2**30), r"conv2d: out would have shape"),
    (lambda: F.conv2d(X, W, stride=2**40), r"conv2d: stride=1099511627776 is too large"),
    (lambda: F.max_pool2d(X, 1, padding=0, stride=1, out=None) if False else
     F.max_pool2d(np.broadcast_to(z(1, 1, 1, 1), (2**16, 2**16, 1, 1)), 1),
     r"max_pool2d: x has 4294967296 elements \(shape 65536x65536x1x1\); at most 2147483647"),
    (lambda: F.max_pool2d_backward(z(1, 1, 1, 1), z(1, 1, 1, 1, dtype=np.int32),
                                   (2**20, 2**20, 1, 1), 1),
     r"max_pool2d_backward: grad_out must have shape 1048576x1048576x1x1"),
    (lambda: F.max_pool2d_backward(np.broadcast_to(z(1, 1, 1, 1), (2**16, 2**16, 1, 1)),
                                   np.broadcast_to(z(1, 1, 1, 1, dtype=np.int32), (2**16, 2**16, 1, 1)),
                                   (2**16, 2**16, 1, 1), 1),
     r"max_pool2d_backward: grad_out has 4294967296 elements"),
    (lambda: F.linear(np.broadcast_to(z(1, 1), (2**32, 1)), z(1, 1)), r"linear: x has 4294967296 elements"),
    (lambda: F.linear(z(2**16, 1), np.broadcast_to(z(1, 1), (2**16, 1))),
     r"linear: out would have shape 65536x65536 = 4294967296 elements"),
    (lambda: F.relu(np.broadcast_to(f32(0), (2**31,))), r"relu: x has 2147483648 elements"),
    (lambda: cdl.Linear(2**20, 2**20), r"Linear: weight 1048576x1048576 has 1099511627776 elements"),
    (lambda: cdl.Conv2d(2**16, 2**16, 3), r"Conv2d: weight 65536x65536x3x3 has 38654705664 elements"),
    (lambda: cdl.Sequential([cdl.Flatten()], (2**20, 2**20, 4)),
     r"Flatten\[0\]: output 4398046511104 has 4398046511104 elements per sample"),
    (lambda: cdl.Sequential([cdl.Conv2d(1, 64, 1, padding=2**14)], (1, 8, 8)),
     r"Conv2d\[0\]: output 64x32776x32776 has 68753035264 elements per sample"),
])
def test_absurd_sizes_fail_before_allocating(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_model_refuses_absurd_batches_before_allocating():
    m = cdl.Sequential([cdl.Conv2d(1, 64, 3, padding=1), cdl.Flatten(), cdl.Linear(64 * 64, 2)],
                       (1, 8, 8), seed=0)
    # a zero-stride view: no memory, but 2**40 samples; a copy would need 256 TiB
    huge = np.broadcast_to(np.zeros((1, 1, 8, 8), np.float64), (2**40, 1, 8, 8))
    for call in (lambda: m.predict(huge), lambda: m.forward(huge),
                 lambda: m.evaluate(huge, np.broadcast_to(np.int64(0), (2**40,)),
                                    cdl.SoftmaxCrossEntropy())):
        with pytest.raises(ValueError, match=r"Sequential\.\w+: .*(x of shape 1099511627776x1x8x8 "
                                             r"needs a|a batch of 1099511627776 needs)"):
            call()
    # one batch whose 64x8x8 activations exceed 2**31 elements
    big = np.broadcast_to(np.zeros((1, 1, 8, 8), np.float32), (2**19, 1, 8, 8))
    with pytest.raises(ValueError, match=r"Sequential.train_step: a batch of 524288 needs "
                                         r"2147483648 elements in one layer buffer"):
        m.train_step(big, np.zeros(2**19, np.int64), cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.1))


# --------------------------------------------------------------- empty batches: documented no-ops
def test_functional_empty_batches_are_noops():
    y = F.conv2d(X[:0], W)
    assert y.shape == (0, 4, 6, 6)
    # zero input channels: an empty sum, the output is the bias
    b = np.arange(3, dtype=f32)
    y = F.conv2d(z(2, 0, 4, 4), z(3, 0, 3, 3), b)
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], (2, 3, 2, 2)))
    dx, dw, db = F.conv2d_backward(z(0, 4, 6, 6), X[:0], np.ones_like(W))
    assert dx.shape == (0, 3, 8, 8) and not dw.any() and not db.any()
    y, idx = F.max_pool2d(X[:0], 2)
    assert y.shape == idx.shape == (0, 3, 4, 4)
    assert F.max_pool2d_backward(z(0, 3, 4, 4), z(0, 3, 4, 4, dtype=np.int32), (0, 3, 8, 8), 2).shape == (0, 3, 8, 8)
    assert F.linear(z(0, 3), z(2, 3)).shape == (0, 2)
    np.testing.assert_array_equal(F.linear(z(2, 0), z(2, 0), np.ones(2, f32)), np.ones((2, 2)))
    dx, dw, db = F.linear_backward(z(0, 2), z(0, 3), np.ones((2, 3), f32), l2=1.0)
    np.testing.assert_array_equal(dw, 2 * np.ones((2, 3)))  # only the L2 gradient
    assert F.relu(z(0)).shape == (0,)
    for fn in ("softmax_cross_entropy", "multiclass_svm", "mse"):
        loss, g = getattr(F, fn)(z(0, 3), np.zeros(0, int))
        assert loss == 0.0 and g.shape == (0, 3)


# --------------------------------------------------------------- layers
@pytest.mark.parametrize("call,exc,match", [
    (lambda: cdl.Linear(0, 3), ValueError, r"Linear: in_features must be >= 1, got 0"),
    (lambda: cdl.Linear(3, -1), ValueError, r"Linear: out_features must be >= 1, got -1"),
    (lambda: cdl.Linear(2.0, 3), TypeError, r"Linear: in_features must be an int, got 2.0"),
    (lambda: cdl.Linear("2", 3), TypeError, r"Linear: in_features must be an int"),
    (lambda: cdl.Linear(2, 3, init="magic"), ValueError, r"Linear: init must be"),
    (lambda: cdl.Conv2d(1, 2, 0), ValueError, r"Conv2d: kernel_size must be >= 1, got 0"),
    (lambda: cdl.Conv2d(1, 2, 3, stride=0), ValueError, r"Conv2d: stride must be >= 1"),
    (lambda: cdl.Conv2d(1, 2, 3, padding=-1), ValueError, r"Conv2d: padding must be >= 0"),
    (lambda: cdl.Conv2d(1, 2, 2.5), TypeError, r"Conv2d: kernel_size must be an int"),
    (lambda: cdl.Conv2d(0, 2, 3), ValueError, r"Conv2d: in_channels must be >= 1"),
    (lambda: cdl.MaxPool2d(2, padding=3), ValueError, r"MaxPool2d: padding must be at most half"),
    (lambda: cdl.MaxPool2d(2.5), TypeError, r"MaxPool2d: kernel_size must be an int"),
    (lambda: cdl.MaxPool2d(0), ValueError, r"MaxPool2d: kernel_size must be >= 1"),
    (lambda: cdl.Linear(3, 2).forward(z(2, 4)), ValueError, r"Linear: expected 3 input features, got 4"),
    (lambda: cdl.Linear(3, 2).forward(z(2, 3).astype(object)), TypeError, r"Linear: x must be a numeric array, got dtype object"),
    (lambda: cdl.Linear(3, 2).forward(z(2, 3).astype(complex)), TypeError, r"Linear: x must be a numeric array, got dtype complex128"),
    (lambda: cdl.Linear(3, 2).forward(z(3)), ValueError, r"Linear: x must have a batch axis with N >= 1 samples, got shape 3"),
    (lambda: cdl.Conv2d(3, 2, 3).forward(z(2, 1, 8, 8)), ValueError, r"Conv2d: expected 3 input channels, got 1"),
    (lambda: cdl.Conv2d(1, 2, 5).forward(z(2, 1, 3, 3)), ValueError, r"Conv2d: kernel H=5 is larger than the padded input"),
    (lambda: cdl.Conv2d(1, 2, 3).forward(z(1, 8, 8)), ValueError, r"Conv2d: expects inputs of shape CxHxW, got 8x8"),
    (lambda: cdl.MaxPool2d(2).forward(z(2, 8)), ValueError, r"MaxPool2d: expects inputs of shape CxHxW, got 8"),
    (lambda: cdl.ReLU().backward(z(2, 3)), RuntimeError, r"ReLU: backward called before forward"),
])
def test_layers_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_conv_output_size():
    assert F.conv_output_size(32, 3, 2, 1) == 16
    assert F.conv_output_size(5, 5) == 1
    for args, exc, match in (((5, 3, 0), ValueError, r"stride must be >= 1, got 0"),
                             ((5, 0), ValueError, r"kernel must be >= 1, got 0"),
                             ((5, 3, 1, -1), ValueError, r"padding must be >= 0, got -1"),
                             ((5.0, 3), TypeError, r"size must be an int, got 5.0"),
                             (("5", 3), TypeError, r"size must be an int, got '5'"),
                             ((2, 3), ValueError, r"kernel H=3 is larger than the padded input"),
                             ((0, 1, 1, 1), ValueError, r"size must be >= 1, got 0")):
        with pytest.raises(exc, match=rf"conv_output_size: {match}"):
            F.conv_output_size(*args)
    # a plane with no cells gives no output from its padding (PyTorch refuses it too)
    empty = np.zeros((1, 1, 0, 4), np.float32)
    with pytest.raises(ValueError, match=r"max_pool2d: size must be >= 1, got 0"):
        F.max_pool2d(empty, 2, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"conv2d: size must be >= 1, got 0"):
        F.conv2d(empty, np.ones((1, 1, 1, 1), np.float32), np.ones(1, np.float32), padding=1)


def test_sgd_update_refuses_a_grad_that_overlaps_param_or_velocity_shifted():
    a = np.arange(1, 9, dtype=np.float32)
    with pytest.raises(ValueError, match=r"sgd_update: grad overlaps param without being the "
                                         r"same array"):
        F.sgd_update(a[1:], a[:-1], lr=0.5)
    np.testing.assert_array_equal(a, np.arange(1, 9))               # nothing written
    buf = np.zeros(9, np.float32)
    p = np.ones(8, np.float32)
    with pytest.raises(ValueError, match=r"grad overlaps velocity"):
        F.sgd_update(p, buf[1:], lr=0.1, velocity=buf[:-1], momentum=0.9)
    # the very same array is fine: each element reads its own value before writing it
    q = np.full(4, 2.0, np.float32)
    F.sgd_update(q, q, lr=0.5)
    np.testing.assert_array_equal(q, 1.0)


def test_a_refused_first_call_leaves_a_layer_unbuilt():
    # the layer takes its shape from its first input: not from one it refuses
    for layer, bad, good in ((cdl.ReLU(), z(0, 5), z(2, 6)),
                             (cdl.Flatten(), z(0, 2, 3), z(1, 4)),
                             (cdl.MaxPool2d(2), z(0, 1, 4, 4), z(1, 2, 6, 6))):
        with pytest.raises(ValueError, match=r"N >= 1"):
            layer.forward(bad)
        assert layer.input_shape is None
        layer.forward(good)


def test_layer_backward_checks_grad():
    layer = cdl.Linear(3, 2)
    layer.forward(z(2, 3))
    with pytest.raises(ValueError, match=r"Linear: grad must have shape 2x2, got 2x3"):
        layer.backward(z(2, 3))
    for dt in (object, complex):
        with pytest.raises(TypeError, match=r"Linear: grad must be a float array"):
            layer.backward(z(2, 2).astype(dt))
    with pytest.raises(ValueError, match=r"Linear: expected x of shape Nx3 \(N >= 1\), got 0x3"):
        layer.forward(z(0, 3))


# --------------------------------------------------------------- Sequential
@pytest.mark.parametrize("call,exc,match", [
    (lambda: cdl.Sequential([], (1, 8, 8)), ValueError, r"Sequential: needs at least one layer"),
    (lambda: cdl.Sequential([np.zeros(3)], (1, 8, 8)), TypeError, r"Sequential: layers\[0\] must be a cdl layer, got ndarray"),
    (lambda: cdl.Sequential([cdl.Flatten(), cdl.Linear(10, 3)], (1, 8, 8)), ValueError,
     r"Linear\[1\]: expected 10 input features, got 64 \(from Flatten\[0\] output 64\)"),
    (lambda: cdl.Sequential([cdl.Linear(64, 3)], (1, 8, 8)), ValueError,
     r"Linear\[0\]: expects flat inputs of 64 features, got 1x8x8 .*put a Flatten\(\) before it"),
    (lambda: cdl.Sequential([cdl.Conv2d(3, 4, 3)], (1, 8, 8)), ValueError,
     r"Conv2d\[0\]: expected 3 input channels, got 1 \(from input 1x8x8\)"),
    (lambda: cdl.Sequential([cdl.Conv2d(1, 4, 3), cdl.MaxPool2d(2), cdl.Conv2d(4, 4, 5)], (1, 8, 8)), ValueError,
     r"Conv2d\[2\]: kernel H=5 is larger than the padded input H=3\+2\*0=3: "
     r"H2 = \(H1 - F \+ 2P\)/S \+ 1 = \(3 - 5 \+ 2\*0\)/1 \+ 1 < 1 \(from MaxPool2d\[1\] output 4x3x3\)"),
    (lambda: cdl.Sequential([cdl.Flatten()], (1, 0, 8)), ValueError, r"Sequential: input_shape must be a non-empty tuple of ints >= 1"),
    (lambda: cdl.Sequential([cdl.Flatten()], (1, -1, 8)), ValueError, r"Sequential: input_shape must be"),
    (lambda: cdl.Sequential([cdl.Flatten()], (1, 8.0, 8)), ValueError, r"Sequential: input_shape must be"),
    (lambda: cdl.Sequential([cdl.Flatten()], None), TypeError, r"Sequential: input_shape must be a tuple of ints"),
    (lambda: cdl.Sequential([cdl.Flatten()], (4,), dtype=np.int32), TypeError, r"Sequential: dtype must be float32 or float64, got int32"),
    (lambda: cdl.Sequential([cdl.Flatten()], (4,), dtype="foo"), TypeError, r"Sequential: dtype must be float32 or float64"),
    (lambda: cdl.Sequential([cdl.Flatten()], (4,), l2=-1), ValueError, r"Sequential: l2 must be a finite number >= 0"),
    (lambda: cdl.Sequential([cdl.Flatten()], (4,), l2="x"), TypeError, r"Sequential: l2 must be a number"),
    (lambda: cdl.Sequential([cdl.Flatten()], (4,), l2=None), TypeError, r"Sequential: l2 must be a number"),
    (lambda: cdl.Sequential([cdl.Linear(4, 2)], (4,), seed="x"), TypeError, r"Sequential: seed must be None or"),
    (lambda: cdl.Sequential([cdl.Linear(4, 2)], (4,), seed=-1), ValueError, r"Sequential: seed must be None or"),
])
def test_sequential_construction(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_functional_outputs_overlapping_inputs_are_refused():
    # the kernels read their inputs while they write: an output sharing memory with an
    # input (or another output) gave silently wrong results
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 4)).astype(f32), rng.standard_normal((4, 4)).astype(f32)
    x4 = rng.standard_normal((2, 2, 5, 5)).astype(f32)
    w4 = rng.standard_normal((2, 2, 3, 3)).astype(f32)
    g4 = rng.standard_normal((2, 2, 5, 5)).astype(f32)
    s, lab = rng.standard_normal((3, 4)).astype(f32), np.array([0, 1, 2])
    y, idx = F.max_pool2d(x4, 3, 1, 1)
    big = np.zeros(200, f32)
    cases = [
        (lambda: F.linear(x, w, out=x), r"linear: out shares memory with x"),
        (lambda: F.linear(x, w, out=w), r"linear: out shares memory with weight"),
        (lambda: F.linear_backward(x, x, w, grad_weight=x), r"grad_weight shares memory with "
                                                            r"grad_out"),
        (lambda: F.linear_backward(x, x, w, grad_input=w), r"grad_input shares memory with "
                                                           r"weight"),
        (lambda: F.conv2d(x4, w4, padding=1, out=x4), r"conv2d: out shares memory with x"),
        (lambda: F.conv2d_backward(g4, x4, w4, 1, 1, grad_input=g4),
         r"conv2d_backward: grad_input shares memory with grad_out"),
        (lambda: F.conv2d_backward(g4, x4, w4, 1, 1, grad_input=big[:100].reshape(x4.shape),
                                   grad_weight=big[64:100].reshape(w4.shape)),
         r"grad_weight shares memory with grad_input"),
        (lambda: F.max_pool2d(x4, 1, out=x4), r"max_pool2d: out shares memory with x"),
        (lambda: F.max_pool2d_backward(y, idx, x4.shape, 3, 1, 1, grad_input=y),
         r"max_pool2d_backward: grad_input shares memory with grad_out"),
        (lambda: F.softmax(s, out=s), r"softmax: out shares memory with scores"),
        (lambda: F.softmax_cross_entropy(s, lab, grad=s), r"grad shares memory with scores"),
        (lambda: F.softmax_cross_entropy(s, lab, grad=big[:12].reshape(3, 4),
                                         probs=big[8:20].reshape(3, 4)),
         r"probs shares memory with grad"),
        (lambda: F.multiclass_svm(s, lab, grad=s), r"grad shares memory with scores"),
        (lambda: F.mse(s, s.copy(), grad=s), r"mse: grad shares memory with pred"),
        (lambda: F.linear(x, w, out=np.empty((4, 4), f32)), None),   # separate arrays
        (lambda: F.relu(x.reshape(-1)[1:], out=x.reshape(-1)[:-1]),
         r"relu: out shares memory with x"),
    ]
    for call, match in cases:
        if match is None:
            call()                      # fine: no overlap
            continue
        with pytest.raises(ValueError, match=match):
            call()
    # in place is still allowed where it is elementwise
    xr = x.copy()
    assert F.relu(xr, out=xr) is xr
    gr = x.copy()
    F.relu_backward(gr, np.abs(x), out=gr)


def test_max_pool_backward_refuses_indices_outside_their_window():
    # (a caller's grad_input holds partial results afterwards: checking first cost up to
    # 3.5x the call, see functional/pool.py)
    x = np.random.default_rng(1).standard_normal((1, 1, 4, 4)).astype(f32)
    y, idx = F.max_pool2d(x, 2)
    idx = idx.copy()
    idx[0, 0, 1, 1] = 0                 # a cell of the first window, not its own
    gi = np.full(x.shape, 7.0, f32)
    for out in (gi, None):
        with pytest.raises(ValueError, match=r"1 of 4 indices do not point into their own "
                                             r"2x2 window of the 4x4 input"):
            F.max_pool2d_backward(np.ones_like(y), idx, x.shape, 2, grad_input=out)


def test_sequential_same_layer_twice():
    r = cdl.ReLU()
    with pytest.raises(ValueError, match=r"Sequential: layers\[1\] \(ReLU\) appears twice"):
        cdl.Sequential([r, r], (4,))


def test_sequential_layer_of_another_model():
    # building would re-shape the layer and move its parameters into the new model's
    # pack, leaving the first model training parameters nothing reads
    c = cdl.Conv2d(1, 2, 3)
    first = cdl.Sequential([c, cdl.Flatten(), cdl.Linear(18, 2)], (1, 5, 5), seed=0)
    inner = cdl.Linear(4, 4)
    second = cdl.Sequential([cdl.Residual([inner])], (4,))  # noqa: F841 (kept alive)
    for layers, shape, where in (([c, cdl.Flatten(), cdl.Linear(2, 2)], (1, 3, 3), "0"),
                                 ([cdl.ReLU(), cdl.Residual([inner])], (4,), "1.layers.0")):
        with pytest.raises(ValueError, match=rf"Sequential: layers\[{re.escape(where)}\] "
                                             r"\((Conv2d|Linear)\) already belongs to another "
                                             r"model.*copy.deepcopy"):
            cdl.Sequential(layers, shape)
    # the first model is untouched and trains; a copy of the layer may join a new model
    x, y = np.ones((2, 1, 5, 5), f32), np.array([0, 1])
    w = c.params["weight"].copy()
    first.train_step(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(first, lr=0.5))
    assert not np.array_equal(w, c.params["weight"])
    import copy
    cdl.Sequential([copy.deepcopy(c), cdl.Flatten(), cdl.Linear(2, 2)], (1, 3, 3))


@pytest.fixture
def cnn():
    m = cdl.Sequential([cdl.Conv2d(1, 2, 3), cdl.ReLU(), cdl.MaxPool2d(2), cdl.Flatten(),
                        cdl.Linear(18, 3)], (1, 8, 8), seed=0)
    return m, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, 0.1)


XB = z(4, 1, 8, 8)


@pytest.mark.parametrize("method", ["forward", "predict", "train_step", "evaluate", "fit"])
@pytest.mark.parametrize("x,exc,match", [
    (XB.astype(object), TypeError, r"x must be a numeric array, got dtype object"),
    (XB.astype(complex), TypeError, r"x must be a numeric array, got dtype complex128"),
    ("abc", TypeError, r"x must be a numeric array, got str"),
    (None, TypeError, r"x must be a numeric array, got NoneType"),
    (z(4, 2, 8, 8), ValueError, r"x must have shape Nx1x8x8, got 4x2x8x8"),
    (z(1, 8, 8), ValueError, r"x must have shape Nx1x8x8, got 1x8x8 \(a single sample\? add a batch axis"),
    (z(4, 64), ValueError, r"x must have shape Nx1x8x8, got 4x64"),
    # ragged nested lists: NumPy's own error named neither the call nor x
    ([XB[0].tolist(), [[[0.0]]]], ValueError, r"x must be an array \(nested lists of equal "
                                              r"lengths\); NumPy could not make one"),
])
def test_sequential_bad_x(cnn, method, x, exc, match):
    m, loss, opt = cnn
    args = {"forward": (), "predict": (), "train_step": (Y, loss, opt), "evaluate": (Y, loss),
            "fit": (Y, loss, opt)}[method]
    kw = {"verbose": 0} if method == "fit" else {}
    with pytest.raises(exc, match=rf"Sequential\.{method}: {match}"):
        getattr(m, method)(x, *args, **kw)


@pytest.mark.parametrize("method", ["train_step", "evaluate", "fit"])
@pytest.mark.parametrize("y,exc,match", [
    (Y[:3], ValueError, r"y must have shape \(4,\) \(one label per sample\), got 3"),
    (Y + 1, ValueError, r"y must be class labels in \[0, 3\), got values from 1 to 3"),
    (Y - 1, ValueError, r"y must be class labels in \[0, 3\), got values from -1 to 1"),
    (Y.astype(float), TypeError, r"y must be integer class labels, got dtype float64"),
    (Y.astype(object), TypeError, r"y must be integer class labels, got dtype object"),
    (Y[:, None], ValueError, r"y must have shape \(4,\) \(one label per sample\), got 4x1"),
    ("abcd", TypeError, r"y must be an integer array of class labels, got str"),
    ([[0], [1, 2], [0], [1]], ValueError, r"y must be an array \(nested lists of equal lengths\)"),
])
def test_sequential_bad_labels(cnn, method, y, exc, match):
    m, loss, opt = cnn
    args = (loss, opt) if method != "evaluate" else (loss,)
    kw = {"verbose": 0} if method == "fit" else {}
    with pytest.raises(exc, match=rf"Sequential\.{method}: {match}"):
        getattr(m, method)(XB, y, *args, **kw)


def test_sequential_other_bad_arguments(cnn):
    m, loss, opt = cnn
    other = cdl.Sequential([cdl.Flatten(), cdl.Linear(64, 3)], (1, 8, 8))
    cases = [
        (lambda: m.forward(XB[:0]), ValueError, r"Sequential.forward: x is an empty batch"),
        (lambda: m.train_step(XB[:0], Y[:0], loss, opt), ValueError, r"Sequential.train_step: x is an empty batch"),
        (lambda: m.evaluate(XB[:0], Y[:0], loss), ValueError, r"Sequential.evaluate: x is empty"),
        (lambda: m.fit(XB[:0], Y[:0], loss, opt, verbose=0), ValueError, r"Sequential.fit: x is empty"),
        (lambda: m.predict(XB, batch_size=0), ValueError, r"Sequential.predict: batch_size must be >= 1, got 0"),
        (lambda: m.predict(XB, batch_size=2.5), TypeError, r"Sequential.predict: batch_size must be an int, got 2.5"),
        (lambda: m.predict(XB, batch_size="2"), TypeError, r"Sequential.predict: batch_size must be an int"),
        (lambda: m.train_step(XB, Y, "ce", opt), TypeError, r"Sequential.train_step: loss must be a cdl loss"),
        (lambda: m.train_step(XB, Y, loss, "sgd"), TypeError, r"Sequential.train_step: optimizer must be a cdl optimizer"),
        (lambda: m.train_step(XB, Y, loss, cdl.SGD(other, 0.1)), ValueError,
         r"Sequential.train_step: the optimizer was built for another model"),
        (lambda: m.fit(XB, Y, loss, None, verbose=0), TypeError, r"Sequential.fit: optimizer must be a cdl optimizer"),
        (lambda: m.fit(XB, Y, loss, cdl.SGD(other, 0.1), verbose=0), ValueError, r"Sequential.fit: the optimizer was built"),
        (lambda: cdl.Sequential([cdl.Conv2d(1, 2, 3)], (1, 8, 8)).train_step(XB, Y, loss, opt), ValueError,
         r"Sequential.train_step: the model's output 2x6x6 must be flat \(N, C\)"),
        (lambda: m.fit(XB, Y, loss, opt, epochs=0, verbose=0), ValueError, r"Sequential.fit: epochs must be an int >= 1, got 0"),
        (lambda: m.fit(XB, Y, loss, opt, epochs=1.5, verbose=0), ValueError, r"Sequential.fit: epochs must be an int >= 1"),
        (lambda: m.fit(XB, Y, loss, opt, batch_size=0, verbose=0), ValueError, r"Sequential.fit: batch_size must be an int >= 1"),
        (lambda: m.fit(XB, Y, loss, opt, batch_size=2.5, verbose=0), ValueError, r"Sequential.fit: batch_size must be"),
        (lambda: m.fit(XB, Y, loss, opt, validation_split=1.5, verbose=0), ValueError,
         r"Sequential.fit: validation_split must be in \[0, 1\), got 1.5"),
        (lambda: m.fit(XB, Y, loss, opt, validation_split="a", verbose=0), TypeError,
         r"Sequential.fit: validation_split must be a number"),
        (lambda: m.fit(XB, Y, loss, opt, validation_split=0.01, verbose=0), ValueError,
         r"Sequential.fit: validation_split=0.01 of 4 samples leaves an empty"),
        (lambda: m.fit(XB, Y, loss, opt, validation_data=(XB,), verbose=0), ValueError,
         r"Sequential.fit: validation_data must be a pair"),
        (lambda: m.fit(XB, Y, loss, opt, validation_data=(XB[:, :, :4], Y), verbose=0), ValueError,
         r"Sequential.fit: validation_data\[0\] must have shape Nx1x8x8, got 4x1x4x8"),
        (lambda: m.fit(XB, Y, loss, opt, validation_data=(XB, Y[:2]), verbose=0), ValueError,
         r"Sequential.fit: validation_data\[1\] must have shape \(4,\)"),
        (lambda: m.fit(XB, Y, loss, opt, callbacks=[1], verbose=0), TypeError, r"Sequential.fit: callbacks must be cdl callbacks"),
        (lambda: m.fit(XB, Y, loss, opt, verbose="x"), ValueError, r"Sequential.fit: verbose must be 0, 1 or 2"),
        (lambda: cdl.Sequential([cdl.Linear(3, 2)], (3,)).backward(z(2, 2)), RuntimeError,
         r"Sequential.backward: call forward first"),
        (lambda: m.set_weights({"x": 1}), ValueError, r"Sequential.set_weights: the weights dict does not match the model: "
                                              r"missing keys \['0.bias', '0.weight', '4.bias', "
                                              r"'4.weight'\]; unexpected keys \['x'\]"),
        (lambda: m.set_weights({k: np.zeros(3) for k, _, _ in m.parameters()}), ValueError,
         r"set_weights: .*0.weight has shape 3, the model needs 2x1x3x3"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    m.forward(XB)
    with pytest.raises(ValueError, match=r"Sequential.backward: grad must have shape 4x3, got 4x2"):
        m.backward(z(4, 2))
    with pytest.raises(TypeError, match=r"Sequential.backward: grad must be a float array, got complex128"):
        m.backward(z(4, 3).astype(complex))
    assert m.predict(XB[:0]).shape == (0, 3)  # documented: empty in, empty out


# --------------------------------------------------------------- losses and optimizer objects
@pytest.mark.parametrize("call,exc,match", [
    (lambda: cdl.SoftmaxCrossEntropy("avg"), ValueError, r"SoftmaxCrossEntropy: reduction must be 'mean' or 'sum'"),
    (lambda: cdl.MulticlassSVM(margin="x"), TypeError, r"MulticlassSVM: margin must be a number, got 'x'"),
    (lambda: cdl.MulticlassSVM(margin=-1), ValueError, r"MulticlassSVM: margin must be a finite number >= 0"),
    (lambda: cdl.MulticlassSVM(margin=np.inf), ValueError, r"MulticlassSVM: margin must be a finite"),
    (lambda: cdl.SoftmaxCrossEntropy().forward(z(3), np.zeros(1, int)), ValueError,
     r"SoftmaxCrossEntropy.forward: scores must be 2-D \(N, C\) with N, C >= 1, got shape 3"),
    (lambda: cdl.SoftmaxCrossEntropy().forward(z(0, 3), np.zeros(0, int)), ValueError,
     r"SoftmaxCrossEntropy.forward: scores must be 2-D \(N, C\) with N, C >= 1, got shape 0x3"),
    (lambda: cdl.SoftmaxCrossEntropy().forward(z(2, 3), np.zeros(2)), TypeError,
     r"SoftmaxCrossEntropy.forward: targets must be integer class labels, got dtype float64"),
    (lambda: cdl.MulticlassSVM().forward(z(2, 3), np.array([0, 3])), ValueError,
     r"MulticlassSVM.forward: targets must be class labels in \[0, 3\), got values from 0 to 3"),
    (lambda: cdl.SoftmaxCrossEntropy().forward(z(2, 3, dtype=int), np.zeros(2, int)), TypeError,
     r"SoftmaxCrossEntropy.forward: scores must be float32 or float64, got dtype int64"),
    (lambda: cdl.MSE().forward(z(2, 3), z(2, 4)), ValueError, r"MSE.forward: targets must have shape 2x3 like the predictions, got 2x4"),
    (lambda: cdl.MSE().forward(z(2, 3), z(2, 3).astype(complex)), TypeError, r"MSE.forward: targets must be a float array or integer labels"),
    (lambda: cdl.MSE().forward(z(2, 3), None), TypeError, r"MSE.forward: targets must be a float array"),
    (lambda: cdl.MSE().backward(), RuntimeError, r"MSE.backward: call forward first"),
    (lambda: cdl.SGD(None, 0.1), TypeError, r"SGD: model must be a cdl.Sequential, got NoneType"),
    (lambda: cdl.SGD("model", 0.1), TypeError, r"SGD: model must be a cdl.Sequential, got str"),
])
def test_losses_and_sgd_objects(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_an_optimizer_that_is_not_a_cdl_optimizer_is_refused_before_anything_runs(one_rank_comm):
    """The class itself (cdl.SGD, not cdl.SGD(model, ...)), a torch.optim optimizer or
    another object with a step method used to run the forward and backward passes
    (BatchNorm's statistics, Dropout's counter) and then fail with an AttributeError."""
    torch = pytest.importorskip("torch")
    m = cdl.Sequential([cdl.Linear(4, 6), cdl.BatchNorm1d(6), cdl.Dropout(0.5),
                        cdl.Linear(6, 3)], (4,), seed=0)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(f32)
    y = np.arange(8) % 3
    loss = cdl.SoftmaxCrossEntropy()

    class Stepper:
        def step(self, threads=None):
            pass

    before, passes = m.state_dict(), m.layers[2].passes
    p = torch.nn.Parameter(torch.zeros(3))
    for opt, got in [(cdl.SGD, r"the class cdl\.optim\.sgd\.SGD; make one first: "
                               r"SGD\(model, lr=0\.01\)"),
                     (torch.optim.SGD([p], lr=0.1), r"torch\.optim\.sgd\.SGD"),
                     (Stepper(), rf"{__name__}\..*Stepper")]:
        for where, call in [("train_step", lambda: m.train_step(x, y, loss, opt)),
                            ("fit", lambda: m.fit(x, y, loss, opt, verbose=0,
                                                  callbacks=[cdl.StepLR(1)]))]:
            expected = (rf"Sequential\.{where}: optimizer must be a cdl optimizer "
                        rf"\(e\.g\. cdl\.SGD\(model, lr=0\.01\)\), got {got}")
            with pytest.raises(TypeError, match=expected):
                call()
            for k, v in m.state_dict().items():
                np.testing.assert_array_equal(v, before[k], err_msg=k)
            assert m.layers[2].passes == passes
    # an optimizer wrapping one (cdl.distributed's, on one process) still trains
    from cdl.distributed import DistributedOptimizer
    opt = DistributedOptimizer(cdl.SGD(m, lr=0.1), comm=one_rank_comm, threads=None)
    assert np.isfinite(m.train_step(x, y, loss, opt)) and opt.steps == 1
    m.fit(x, y, loss, opt, batch_size=4, verbose=0, callbacks=[cdl.StepLR(1)])
    assert opt.steps == 3


def test_sgd_bad_numbers(cnn):
    m = cnn[0]
    for kw, exc, match in [({"lr": -1}, ValueError, r"SGD: lr must be a finite number in \[0.0, inf\)"),
                           ({"lr": np.nan}, ValueError, r"SGD: lr must be"),
                           ({"lr": "0.1"}, TypeError, r"SGD: lr must be a number"),
                           ({"lr": 0.1, "momentum": 1}, ValueError, r"SGD: momentum must be a finite number in \[0.0, 1.0\)"),
                           ({"lr": 0.1, "nesterov": True}, ValueError, r"SGD: nesterov=True needs momentum > 0"),
                           ({"lr": 0.1, "momentum": 0.9, "nesterov": "no"}, TypeError,
                            r"SGD: nesterov must be True or False, got 'no'")]:
        with pytest.raises(exc, match=match):
            cdl.SGD(m, **kw)
    for cls, args, match in [(cdl.StepLR, (0,), r"StepLR: step_size must be an int >= 1"),
                             (cdl.ExponentialLR, (-1,), r"ExponentialLR: gamma must be"),
                             (cdl.CosineLR, (0,), r"CosineLR: epochs must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            cls(*args)


def test_optimizer_settings_are_checked_when_assigned_too(cnn):
    """A setting the constructor refuses is refused on assignment, unchanged: it would
    train, then make the optimizer's state and files unloadable."""
    m = cnn[0]
    sgd, adam = cdl.SGD(m, lr=0.1, momentum=0.9, nesterov=True), cdl.Adam(m)
    for opt, key, value, exc, match in [
            (sgd, "momentum", 0.0, ValueError, r"SGD: nesterov=True needs momentum > 0"),
            (sgd, "weight_decay", -0.1, ValueError, r"SGD: weight_decay must be"),
            (sgd, "clip_grad_norm", 0.0, ValueError, r"SGD: clip_grad_norm must be"),
            (sgd, "lr", -1.0, ValueError, r"SGD: lr must be"),
            (sgd, "base_lr", float("nan"), ValueError, r"SGD: base_lr must be"),
            (sgd, "steps", -1, ValueError, r"SGD: steps must be an int in \[0, 2\*\*53\]"),
            (adam, "betas", (0.9, 1.0), ValueError, r"Adam: betas\[1\] must be"),
            (adam, "betas", 0.9, TypeError, r"Adam: betas must be a pair"),
            (adam, "eps", 0.0, ValueError, r"Adam: eps must be"),
            (adam, "weight_decay", "x", TypeError, r"Adam: weight_decay must be a number")]:
        before = opt.state_dict()
        with pytest.raises(exc, match=match):
            setattr(opt, key, value)
        after = opt.state_dict()
        assert (after["config"], after["base_lr"], after["step"]) == \
            (before["config"], before["base_lr"], before["step"])
    sgd.nesterov = False          # then momentum 0 is fine, and the state loads back
    sgd.momentum = 0.0
    twin = cdl.SGD(m, lr=0.1, momentum=0.9, nesterov=True)
    twin.load_state_dict(sgd.state_dict())
    assert twin.get_config() == sgd.get_config()
    twin.load_state_dict(cdl.SGD(m, lr=0.1, momentum=0.5, nesterov=True).state_dict())
    assert twin.nesterov and twin.momentum == 0.5


def test_loss_settings_are_checked_when_assigned_too():
    """As the optimizers' settings: a value the constructor refuses is refused on
    assignment, and the loss keeps its setting (reduction="none" trained as a sum)."""
    svm = cdl.MulticlassSVM(margin=0.5)
    for key, value, exc, match in [
            ("reduction", "none", ValueError, r"reduction must be 'mean' or 'sum', got 'none'"),
            ("reduction", None, ValueError, r"reduction must be 'mean' or 'sum', got None"),
            ("margin", -1.0, ValueError, r"margin must be a finite number >= 0, got -1.0"),
            ("margin", float("nan"), ValueError, r"margin must be a finite number >= 0"),
            ("margin", "1", TypeError, r"margin must be a number, got '1'")]:
        with pytest.raises(exc, match=rf"MulticlassSVM: {match}"):
            setattr(svm, key, value)
        assert (svm.margin, svm.reduction) == (0.5, "mean")
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: reduction must be"):
        cdl.SoftmaxCrossEntropy().reduction = "avg"
    svm.margin, svm.reduction = 2, "sum"
    assert svm.get_config() == {"margin": 2.0, "reduction": "sum"}
    s = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert svm.forward(s, [0, 0]) == cdl.MulticlassSVM(2.0, "sum").forward(s, [0, 0]) == 7.0


def test_gradcheck_bad_arguments():
    m = cdl.Sequential([cdl.Linear(4, 5), cdl.ReLU(), cdl.Linear(5, 3)], (4,), dtype=np.float64,
                       seed=0)
    x, y = np.ones((2, 4)), np.array([0, 2])
    ce = cdl.SoftmaxCrossEntropy()
    before = m.state_dict()
    for kw, exc, match in [
            ({"eps": 0.0}, ValueError, r"gradcheck: eps must be a finite number > 0, got 0.0"),
            ({"eps": -1e-6}, ValueError, r"gradcheck: eps must be a finite number > 0"),
            ({"eps": np.nan}, ValueError, r"gradcheck: eps must be a finite number"),
            ({"eps": "1e-6"}, TypeError, r"gradcheck: eps must be a number, got '1e-6'"),
            # max_checks=0 would check nothing and report every error as 0.0
            ({"max_checks": 0}, ValueError, r"gradcheck: max_checks must be >= 1, got 0"),
            ({"max_checks": 2.5}, TypeError, r"gradcheck: max_checks must be an int, got 2.5"),
            ({"max_checks": True}, TypeError, r"gradcheck: max_checks must be an int"),
            ({"seed": -1}, ValueError, r"gradcheck: seed must be >= 0, got -1"),
            ({"check_input": "no"}, TypeError, r"gradcheck: check_input must be True or False, got 'no'"),
            ({"loss": "cross_entropy"}, TypeError, r"gradcheck: loss must be a cdl loss \(e.g. "
                                                    r"cdl.SoftmaxCrossEntropy\(\)\), got str"),
            ({"model": "model"}, TypeError, r"gradcheck: model must be a cdl.Sequential, got str"),
            ({"x": x[:0], "y": y[:0]}, ValueError, r"gradcheck: x is an empty batch")]:
        args = dict({"model": m, "x": x, "y": y, "loss": ce}, **kw)
        with pytest.raises(exc, match=match):
            cdl.gradcheck(**args)
    after = m.state_dict()
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    assert cdl.gradcheck(m, x, y, ce, max_checks=1, seed=None)["0.weight"] < 1e-6


def test_thread_settings():
    with pytest.raises(ValueError, match=r"set_num_threads: n must be >= 1, got 0"):
        cdl.set_num_threads(0)
    with pytest.raises(TypeError, match=r"set_num_threads: n must be an int, got str"):
        cdl.set_num_threads("2")
    with pytest.raises(ValueError, match=r"set_num_threads: n=1000000000000 is more than the 1024"):
        cdl.set_num_threads(10**12)
    with pytest.raises(TypeError, match=r"set_num_threads: n must be an int"):
        with cdl.threads(2.0):
            pass
    # nothing changes when a call is refused, adaptive included
    before = cdl.thread_status()
    for call in (lambda: cdl.set_num_threads(0, adaptive=not before["adaptive"]),
                 lambda: cdl.set_num_threads(2, adaptive="no"),
                 lambda: cdl.threads(0, adaptive=not before["adaptive"]).__enter__()):
        with pytest.raises((TypeError, ValueError)):
            call()
        after = cdl.thread_status()
        assert (after["threads"], after["adaptive"]) == (before["threads"], before["adaptive"])
    with cdl.threads(np.int64(1), adaptive=np.bool_(before["adaptive"])):   # NumPy scalars
        assert cdl.thread_status()["threads"] == 1


# --------------------------------------------------------------- save / load / load_idx / CLI
def test_save_load_paths(cnn, tmp_path):
    m, _, _ = cnn
    with pytest.raises(OSError):
        m.save(tmp_path / "no" / "such" / "dir" / "m.npz")
    with pytest.raises(TypeError):
        m.save(None)
    other = cdl.Sequential([cdl.Flatten(), cdl.Linear(64, 3)], (1, 8, 8))
    with pytest.raises(ValueError, match=r"save: optimizer belongs to another model"):
        m.save(tmp_path / "m.npz", optimizer=cdl.SGD(other, 0.1))
    assert os.listdir(tmp_path) == []  # the refused save left nothing behind
    with pytest.raises(FileNotFoundError):
        cdl.load(tmp_path / "missing.npz")
    with pytest.raises(IsADirectoryError):
        cdl.load(tmp_path)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cdl.load: .*empty.npz is not a valid cdl model file: the file is empty"):
        cdl.load(tmp_path / "empty.npz")


def _idx(path, code, dims, payload=b""):
    head = bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    path.write_bytes(head + payload)
    return path


def test_load_idx_bad_files(tmp_path):
    from cdl.datasets import load_idx, load_idx_dataset
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "missing")
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(ValueError, match=r"load_idx: .*e is not an IDX file \(the header must start with two zero bytes"):
        load_idx(tmp_path / "e")
    (tmp_path / "t").write_bytes(b"PK\x03\x04hello")
    with pytest.raises(ValueError, match=r"load_idx: .* is not an IDX file"):
        load_idx(tmp_path / "t")
    with pytest.raises(ValueError, match=r"load_idx: .*: unknown IDX type code 0x07"):
        load_idx(_idx(tmp_path / "c", 0x07, [2]))
    with pytest.raises(ValueError, match=r"load_idx: .*: header says 0 dimensions"):
        load_idx(_idx(tmp_path / "d0", 0x08, []))
    (tmp_path / "nd").write_bytes(b"\0\0\x08\xff" + b"\0" * 8)
    with pytest.raises(ValueError, match=r"load_idx: .*: header says 255 dimensions \(1 to 32"):
        load_idx(tmp_path / "nd")
    (tmp_path / "th").write_bytes(b"\0\0\x08\x03" + b"\0" * 8)
    with pytest.raises(ValueError, match=r"load_idx: .*: truncated header \(12 bytes\)"):
        load_idx(tmp_path / "th")
    # absurd dimensions: refused from the header, before anything is allocated
    with pytest.raises(ValueError, match=r"load_idx: .*: header says 2147483648x2147483648x2147483648 of "
                                         r"uint8 = \d+ data bytes, file has 0 \(truncated\)"):
        load_idx(_idx(tmp_path / "huge", 0x08, [2**31] * 3))
    with pytest.raises(ValueError, match=r"load_idx: .*: header says 3x4 of uint8 = 12 data bytes, file has 5 \(truncated\)"):
        load_idx(_idx(tmp_path / "short", 0x08, [3, 4], b"\1" * 5))
    (tmp_path / "gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match=r"load_idx: .*: cannot read the gzip stream"):
        load_idx(tmp_path / "gz")
    # damaged deflate data: zlib's own error, also a ValueError naming the file
    packed = bytearray(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 64]) + bytes(range(64)),
                                     mtime=0))
    packed[11] ^= 0xFF                  # "invalid distance too far back"
    (tmp_path / "z.gz").write_bytes(bytes(packed))
    with pytest.raises(ValueError, match=r"load_idx: .*z.gz: "):
        load_idx(tmp_path / "z.gz")
    # a gzip stream far longer than its header says is read only as far as needed
    with gzip.open(tmp_path / "long.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]) + bytes(1 << 20))
    with pytest.raises(ValueError, match=r"header says 2 of uint8 = 2 data bytes, file has "
                                         r"more than 2"):
        load_idx(tmp_path / "long.gz")
    with gzip.open(tmp_path / "ok.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 9]))
    np.testing.assert_array_equal(load_idx(tmp_path / "ok.gz"), [7, 9])
    imgs = _idx(tmp_path / "imgs", 0x08, [2, 2, 2], b"\0" * 8)
    with pytest.raises(ValueError, match=r"load_idx_dataset: .* has shape 3, expected \(2,\) labels for the 2 images"):
        load_idx_dataset(imgs, _idx(tmp_path / "l3", 0x08, [3], b"\0" * 3))
    with pytest.raises(ValueError, match=r"load_idx_dataset: .*: labels must be >= 0, got -1"):
        load_idx_dataset(imgs, _idx(tmp_path / "neg", 0x09, [2], b"\x01\xff"))
    signed = _idx(tmp_path / "i8", 0x09, [1, 1, 2], b"\x05\xfb")      # int8: not scaled
    np.testing.assert_array_equal(load_idx_dataset(signed, _idx(tmp_path / "l1", 0x08, [1],
                                                                 b"\0"))[0].ravel(), [5, -5])
    with pytest.raises(ValueError, match=r"load_idx_dataset: labels must be integers, got float32"):
        load_idx_dataset(imgs, _idx(tmp_path / "lf", 0x0D, [2], b"\0" * 8))
    with pytest.raises(ValueError, match=r"load_idx_dataset: .*: expected images N x H x W, got 2x4"):
        load_idx_dataset(_idx(tmp_path / "i2", 0x08, [2, 4], b"\0" * 8), _idx(tmp_path / "l2", 0x08, [2], b"\0" * 2))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cdl", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.mark.parametrize("args,match", [
    (["train", "--epochs", "0"], r"argument --epochs: must be >= 1, got 0"),
    (["train", "--epochs", "x"], r"argument --epochs: expected an integer"),
    (["train", "--batch-size", "-3"], r"argument --batch-size: must be >= 1"),
    (["train", "--lr", "0"], r"argument --lr: must be > 0"),
    (["train", "--threads", "0"], r"argument --threads: must be >= 1 and <= 1024"),
    (["train", "--data", "only-one"], r"argument --data: expected 2 arguments"),
    (["frobnicate"], r"invalid choice: 'frobnicate'"),
    ([], r"the following arguments are required: COMMAND"),
])
def test_cli_rejects_bad_arguments(args, match, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r
    assert re.search(match, r.stderr), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_bad_data_files(tmp_path):
    (tmp_path / "imgs").write_bytes(b"not an idx file")
    (tmp_path / "labels").write_bytes(b"\0\0\x08\x01\0\0\0\x01\x05")
    r = _cli("train", "--data", "imgs", "labels", "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 2, r
    assert re.search(r"cdl train: error: load_idx: imgs is not an IDX file", r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("train", "--data", "missing", "labels", "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 2 and "cdl train: error: " in r.stderr and "Traceback" not in r.stderr
    r = _cli("train", "--threads", "100000", "--epochs", "1", cwd=tmp_path)
    assert r.returncode == 2, r
    assert "must be >= 1 and <= 1024" in r.stderr and "Traceback" not in r.stderr



def test_predict_and_evaluate_refuse_batches_past_int32_before_allocating():
    # 4095 x 4095 planes: 200 samples need 3.35e9 elements in one buffer
    m = cdl.Sequential([cdl.Conv2d(1, 1, 1, padding=2047), cdl.GlobalAvgPool2d()], (1, 1, 1),
                       seed=0)
    x, y = np.ones((200, 1, 1, 1), np.float32), np.zeros(200, np.int64)
    for where, call in (("predict", lambda: m.predict(x)),
                        ("evaluate", lambda: m.evaluate(x, y, cdl.MSE()))):
        with pytest.raises(ValueError, match=rf"Sequential.{where}: a batch of 200 needs "
                                             r"3353805000 elements in one layer buffer; at "
                                             r"most 2147483647 are supported \(pass a smaller "
                                             r"batch_size\)"):
            call()


def test_uint64_labels_past_int64_are_named_as_given():
    m = cdl.Sequential([cdl.Linear(3, 3)], (3,), seed=0)
    y = np.array([0, 1, 2**63], np.uint64)
    for call in (lambda: m.evaluate(np.ones((3, 3)), y, cdl.SoftmaxCrossEntropy()),
                 lambda: cdl.SoftmaxCrossEntropy().forward(np.ones((3, 3), np.float32), y)):
        with pytest.raises(ValueError, match=r"class labels in \[0, 3\), got "
                                             r"9223372036854775808$"):
            call()


def test_lenet5_input_shape_is_checked():
    from cdl.models import lenet5
    for shape, match in (((1, 8, 8), r"input_shape \(C, H, W\) needs C >= 1 and H, W >= 12"),
                         ((28, 28), r"input_shape must be \(C, H, W\), got \(28, 28\)"),
                         (784, r"input_shape must be \(C, H, W\), got 784")):
        with pytest.raises(ValueError, match=rf"lenet5: {match}"):
            lenet5(input_shape=shape)
    assert lenet5(input_shape=(1, 12, 12)).output_shape == (10,)
    assert lenet5(input_shape=np.array([1, 28, 28])).input_shape == (1, 28, 28)


def test_cli_errors_on_a_distributed_runs_other_ranks(monkeypatch, capsys):
    # an error only one rank hits is said there (with its rank); one every rank stops
    # with (fit agreed on it) is said by rank 0 alone
    from cdl import cli
    monkeypatch.setattr(cli, "_RANK", 1)
    cli._say("cdl train: error: a file missing on this node")
    cli._say("cdl train: error: training diverged", agreed=True)
    assert capsys.readouterr().err == "rank 1: cdl train: error: a file missing on this node\n"
    monkeypatch.setattr(cli, "_RANK", None)
    cli._say("cdl train: error: training diverged", agreed=True)
    assert capsys.readouterr().err == "cdl train: error: training diverged\n"


def test_a_distributed_optimizer_refuses_a_buffer_the_ranks_could_not_keep_identical(one_rank_comm):
    # a user layer's float64 statistics in a float32 model: the exchange carries buffers of
    # the model's dtype and integers only, so the ranks' copies drifted apart, silently
    import cdl.distributed as dist

    class Center64(cdl.Layer):
        def _create(self, rng, init, dtype):
            self.add_buffer("running_mean", np.zeros(self.input_shape, np.float64))

        def _forward(self, x, ws, nt, train):
            np.copyto(ws["out"], x)
            return ws["out"]

    try:
        m = cdl.Sequential([cdl.Linear(6, 6), Center64(), cdl.Linear(6, 3)], (6,), seed=0)
        with pytest.raises(ValueError, match=r"DistributedOptimizer: buffer 1.running_mean is "
                                             r"float64, neither the model's float32 nor an "
                                             r"integer"):
            dist.DistributedOptimizer(cdl.SGD(m, lr=0.1), comm=one_rank_comm)
        ok = cdl.Sequential([cdl.Linear(6, 6), cdl.BatchNorm1d(6), cdl.Linear(6, 3)], (6,))
        dist.DistributedOptimizer(cdl.SGD(ok, lr=0.1), comm=one_rank_comm, threads=None)
    finally:
        cdl.layers.LAYER_TYPES.pop("Center64", None)


def test_a_distributed_optimizers_settings_are_the_wrapped_optimizers(one_rank_comm):
    # `opt.momentum = 0` on the wrapper was kept there: it read back as set and trained
    # with the old momentum
    import cdl.distributed as dist
    m = cdl.Sequential([cdl.Linear(4, 3)], (4,), seed=0)
    opt = dist.DistributedOptimizer(cdl.SGD(m, lr=0.1, momentum=0.9), comm=one_rank_comm,
                                    threads=None)
    opt.momentum, opt.weight_decay = 0.0, 0.5
    assert (opt.optimizer.momentum, opt.optimizer.weight_decay) == (0.0, 0.5)
    assert opt.state_dict()["config"]["momentum"] == 0.0
    with pytest.raises(ValueError, match="momentum"):
        opt.momentum = 2.0               # checked as the optimizer checks it


def test_functional_kernels_take_ragged_lists_and_matrices_clearly():
    # a ragged list raised NumPy's own error (naming neither the call nor the argument);
    # an np.matrix stayed 2-D when flattened and failed in Cython's dispatch
    w = np.ones((1, 1, 1, 1), f32)
    with pytest.raises(ValueError, match=r"conv2d: x must be an array \(nested lists of "
                                         r"equal lengths\)"):
        F.conv2d([[1.0, 2.0], [3.0]], w)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)   # (np.matrix's own)
        m1, m2 = np.matrix([[1.0, -2.0]]), np.matrix([[0.0]])
    np.testing.assert_array_equal(F.relu(m1), [[1.0, 0.0]])
    np.testing.assert_array_equal(F.sigmoid(m2), [[0.5]])


def test_construction_and_config_arguments_are_checked():
    # a single layer, seeds of other kinds, a dict for input_shape, a path for file=,
    # adaptive=2: bare Python errors, or taken silently
    with pytest.raises(TypeError, match=r"Sequential: layers must be a list of cdl layers, "
                                        r"got Linear"):
        cdl.Sequential(cdl.Linear(2, 3), 2)
    for seed, exc in ((True, TypeError), ([1, 2], TypeError), (np.random.default_rng(0),
                                                               TypeError), (-1, ValueError)):
        with pytest.raises(exc, match=r"Sequential: seed must be None or a non-negative int"):
            cdl.Sequential([cdl.Linear(2, 3)], 2, seed=seed)
    with pytest.raises(TypeError, match=r"Sequential: input_shape must be a tuple of ints"):
        cdl.Sequential([cdl.Linear(2, 3)], {2: 1})
    assert cdl.Sequential([cdl.Linear(2, 3)], 2, dtype=None).dtype == np.float32
    m = cdl.Sequential([cdl.Linear(2, 3)], 2)
    with pytest.raises(TypeError, match=r"Sequential.summary: file must be a text stream"):
        m.summary(file="out.txt")
    with pytest.raises(TypeError, match=r"show_config: file must be a text stream"):
        cdl.show_config(file="out.txt")
    for bad in (2, -1):
        with pytest.raises(ValueError, match=r"adaptive must be True or False, got"):
            with cdl.threads(1, adaptive=bad):
                pass


def test_a_unicode_digit_in_omp_num_threads_is_ignored():
    import subprocess
    import sys
    code = "import cdl; cdl.show_config(); print(cdl.get_num_threads())"
    for value in ("\u00b2", "\u0663"):      # "²", "٣": str.isdigit() says yes, int() no
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=value), timeout=120)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout.split()[-1]) >= 1


def test_gradcheck_leaves_a_float64_model_and_its_loss_as_they_were():
    # it ran in place on a float64 model: a pending forward's backward then gave wrong
    # gradients, and the loss object's pending forward was lost
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((3, 6)), rng.standard_normal((5, 6))
    y2, g = np.arange(5) % 4, np.ones((3, 4))
    make = lambda: cdl.Sequential([cdl.Linear(6, 4)], (6,), dtype=np.float64, seed=0)  # noqa: E731
    a, b = make(), make()
    a.forward(x1)
    a.backward(g)
    b.forward(x1)
    loss = cdl.SoftmaxCrossEntropy()
    loss.forward(np.zeros((2, 4)), np.array([0, 1]))
    assert max(cdl.gradcheck(b, x2, y2, loss).values()) < 1e-6
    b.backward(g)
    np.testing.assert_array_equal(a.gradient_buffer, b.gradient_buffer)
    assert loss.backward().shape == (2, 4)


def test_functional_flags_take_only_bools():
    # "no" or 0.0 would be read by truthiness ("no" asking for the gradient): refused,
    # naming the function and the flag; NumPy's bools are bools
    x4, w4, g4 = z(1, 2, 4, 4), z(3, 2, 3, 3), z(1, 3, 2, 2)
    x2, w2, g2 = z(2, 3), z(4, 3), z(2, 4)
    p = z(3)
    calls = {
        ("conv2d_backward", "need_input_grad"):
            lambda v: F.conv2d_backward(g4, x4, w4, need_input_grad=v),
        ("conv2d_backward", "need_bias_grad"):
            lambda v: F.conv2d_backward(g4, x4, w4, need_bias_grad=v),
        ("linear_backward", "need_input_grad"):
            lambda v: F.linear_backward(g2, x2, w2, need_input_grad=v),
        ("linear_backward", "need_bias_grad"):
            lambda v: F.linear_backward(g2, x2, w2, need_bias_grad=v),
        ("sgd_update", "nesterov"):
            lambda v: F.sgd_update(p.copy(), p, lr=0.1, velocity=z(3), momentum=0.9,
                                   nesterov=v),
    }
    for (fn, flag), call in calls.items():
        for bad in ("no", "", 1, 0.0, None, [True], np.array([True])):
            with pytest.raises(TypeError, match=rf"^{fn}: {flag} must be True or False, "
                                                rf"got {re.escape(repr(bad))}$"):
                call(bad)
        for good in (True, False, np.bool_(True), np.False_):
            call(good)
    dx, _, db = F.linear_backward(g2, x2, w2, need_input_grad=np.False_, need_bias_grad=np.True_)
    assert dx is None and db.shape == (4,)
