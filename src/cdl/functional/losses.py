"""Losses over a batch of scores s (N, C), each with its gradient in one pass.

  softmax_cross_entropy  L_i = -log(e^{s_{y_i}} / Σ_j e^{s_j})      dL_i/ds = p - onehot(y_i)
  multiclass_svm         L_i = Σ_{j≠y_i} max(0, s_j - s_{y_i} + Δ)
  mse                    L_i = ½ Σ_j (s_j - t_j)²                    dL_i/ds = s - t
  l2_penalty             R(W) = λ Σ W²                               dR/dW = 2λW

L = (1/N) Σ_i L_i with reduction="mean" (the default) or Σ_i L_i with "sum";
the returned gradient is dL/ds for that L. Labels are integer class indices in
[0, C) (any integer or boolean dtype, as the loss classes take them; converted to
int64); labels with no elements (``[]``, which NumPy makes float64) count as integer
labels. The loss is a Python float, summed in a fixed order: identical for any
thread count.
"""

import numpy as np

from .._kernels import losses as _losses
from ._checks import float_array, num_threads, out_array, real_number, shape_str

__all__ = ["softmax", "softmax_cross_entropy", "multiclass_svm", "mse", "l2_penalty"]


def _reduction(reduction, n, where):
    if reduction == "mean":
        return 1.0 / n if n else 0.0
    if reduction == "sum":
        return 1.0
    raise ValueError(f"{where}: reduction must be 'mean' or 'sum', got {reduction!r}")


def _as_array(a, name, where):
    """np.asarray(a), or a ValueError naming the argument: NumPy's own error for nested
    lists of unequal lengths names neither the call nor the argument."""
    try:
        return np.asarray(a)
    except ValueError as exc:
        raise ValueError(f"{where}: {name} must be an array (nested lists of equal lengths); "
                         f"NumPy could not make one: {exc}") from None


def _empty_as_labels(a, given):
    """``a`` (made from ``given``) as int64 when it has no elements and came from a list
    or is 1-D: NumPy makes ``[]`` float64, but an empty batch of labels holds no value that
    is not a class index. (A float ndarray of another shape is refused as any float array
    of that shape would be.)"""
    if a.size == 0 and a.dtype.kind not in "iub" and (
            a.ndim == 1 or not isinstance(given, np.ndarray)):
        return a.astype(np.int64)
    return a


def _labels(labels, scores_shape, where, scores_name="scores"):
    """labels as a C-contiguous int64 (N,) array with values in [0, C) for scores (N, C)."""
    n, classes = scores_shape[0], scores_shape[1]
    given = labels
    if not isinstance(labels, np.ndarray):
        labels = _as_array(labels, "labels", where)
    labels = _empty_as_labels(labels, given)
    if labels.dtype.kind not in "iub":
        raise TypeError(f"{where}: labels must be integer class indices, got dtype "
                        f"{labels.dtype} (shape {shape_str(labels.shape)})")
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D (N,), got shape {shape_str(labels.shape)} "
                         f"for {scores_name} of shape {shape_str(scores_shape)}")
    if labels.shape[0] != n:
        raise ValueError(f"{where}: labels has {labels.shape[0]} entries but {scores_name} has "
                         f"{n} rows (shape {shape_str(scores_shape)})")
    if n:
        lo, hi = labels.min(), labels.max()
        if lo < 0 or hi >= classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: labels must lie in [0, {classes}) for {classes} classes "
                             f"({scores_name} shape {shape_str(scores_shape)}), got {int(bad)}")
    return np.ascontiguousarray(labels, dtype=np.int64)


def _scores(scores, name, where):
    if isinstance(scores, (list, tuple)):
        scores = _as_array(scores, name, where)
    scores = float_array(scores, name, where, ndim=2)
    if scores.shape[1] == 0:
        raise ValueError(f"{where}: {name} needs at least one class, got shape "
                         f"{shape_str(scores.shape)}")
    return scores


def softmax(scores, *, out=None, threads=None):
    """p_ij = e^{s_ij - m_i} / Σ_k e^{s_ik - m_i} with m_i = max_k s_ik, for scores (N, C)."""
    where = "softmax"
    scores = _scores(scores, "scores", where)
    out = out_array(out, "out", where, scores.shape, scores.dtype, {"scores": scores})
    _losses.softmax(scores, out, num_threads(threads, where))
    return out


def softmax_cross_entropy(scores, labels, *, reduction="mean", grad=None, probs=None,
                          threads=None):
    """Softmax cross-entropy of scores (N, C) against labels (N,); returns (loss, dL/ds).

    If ``probs`` (an (N, C) array) is given it is filled with the softmax p.
    """
    where = "softmax_cross_entropy"
    scores = _scores(scores, "scores", where)
    n, c = scores.shape
    labels = _labels(labels, scores.shape, where)
    scale = _reduction(reduction, n, where)
    reads = {"scores": scores, "labels": labels}
    grad = out_array(grad, "grad", where, scores.shape, scores.dtype, reads)
    if probs is not None:
        probs = out_array(probs, "probs", where, scores.shape, scores.dtype,
                          dict(reads, grad=grad))
    sample = np.empty(n, dtype=np.float64)
    total = _losses.softmax_cross_entropy(scores, labels, probs, grad, sample, scale,
                                          num_threads(threads, where))
    return float(total * scale), grad


def multiclass_svm(scores, labels, *, margin=1.0, reduction="mean", grad=None, threads=None):
    """Multiclass hinge loss L_i = Σ_{j≠y_i} max(0, s_j - s_{y_i} + Δ), Δ = ``margin``
    (>= 0); returns (loss, dL/ds)."""
    where = "multiclass_svm"
    scores = _scores(scores, "scores", where)
    n, c = scores.shape
    labels = _labels(labels, scores.shape, where)
    margin = real_number(margin, "margin", where, minimum=0)     # (as MulticlassSVM)
    scale = _reduction(reduction, n, where)
    grad = out_array(grad, "grad", where, scores.shape, scores.dtype,
                     {"scores": scores, "labels": labels})
    sample = np.empty(n, dtype=np.float64)
    total = _losses.multiclass_svm(scores, labels, float(margin), grad, sample, scale,
                                   num_threads(threads, where))
    return float(total * scale), grad


def mse(pred, target, *, reduction="mean", grad=None, threads=None):
    """Half squared error L_i = ½ Σ_j (pred_ij - t_ij)²; returns (loss, dL/dpred).

    ``target`` is a float array shaped like ``pred`` (N, ...), or integer (or boolean)
    labels (N,) meaning one-hot rows t_ij = [j = label_i] (pred must then be (N, C)).
    """
    where = "mse"
    if isinstance(pred, (list, tuple)):
        pred = _as_array(pred, "pred", where)
    pred = float_array(pred, "pred", where)
    if pred.ndim < 1:
        raise ValueError(f"{where}: pred must have a batch axis, got a scalar")
    n = pred.shape[0]
    scale = _reduction(reduction, n, where)
    nt = num_threads(threads, where)
    t = target if isinstance(target, np.ndarray) else _as_array(target, "target", where)
    if t is not target and t.shape != pred.shape and pred.ndim == 2:
        t = _empty_as_labels(t, target)      # (a [] that cannot be pred's float target)
    if t.dtype.kind in "iub":
        if pred.ndim != 2:
            raise ValueError(f"{where}: with integer labels pred must be 2-D (N, C), got shape "
                             f"{shape_str(pred.shape)}")
        t = _labels(t, pred.shape, where, "pred")
    else:
        t = float_array(t, "target", where)
        if t.dtype != pred.dtype:
            raise TypeError(f"{where}: target has dtype {t.dtype} but pred has {pred.dtype}")
        if t.shape != pred.shape:
            raise ValueError(f"{where}: target has shape {shape_str(t.shape)} but pred has "
                             f"{shape_str(pred.shape)}")
    grad = out_array(grad, "grad", where, pred.shape, pred.dtype, {"pred": pred, "target": t})
    sample = np.empty(n, dtype=np.float64)
    if t.dtype.kind in "iu":
        total = _losses.mse_labels(pred, t, grad, sample, scale, nt)
    else:
        cols = pred.size // n if n else 0
        total = _losses.mse(pred.reshape(n, cols), t.reshape(n, cols), grad.reshape(n, cols),
                            sample, scale, nt)
    return float(total * scale), grad


def l2_penalty(weights, lam):
    """R = λ Σ W² over ``weights`` (one array or an iterable of arrays); returns a float.

    Its gradient 2λW is added by linear_backward(l2=λ) or by the caller.
    """
    where = "l2_penalty"
    lam = real_number(lam, "lam", where, minimum=0)
    if isinstance(weights, np.ndarray):
        arrays = [weights]
    else:
        try:
            arrays = list(weights)
        except TypeError:
            raise TypeError(f"{where}: weights must be an array or an iterable of arrays, "
                            f"got {type(weights).__name__}") from None
    total = 0.0
    for k, w in enumerate(arrays):
        w = float_array(w, f"weights[{k}]", where)
        total += _losses.sum_squares(w.reshape(-1))
    return float(lam) * total
