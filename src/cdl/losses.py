"""Loss classes: ``forward(scores, targets) -> float`` and ``backward() -> dL/dscores``.

Scores s are (N, C). With ``reduction="mean"`` (default) the loss is the batch
average (1/N) Σ_i L_i, with ``"sum"`` it is Σ_i L_i. The kernel computes the
loss and its gradient in one pass; ``backward`` returns that gradient (a buffer
the loss owns and reuses). Labels may be any integer (or boolean) array; they
are used as int64.
"""

import threading

import numpy as np

from . import _config
from ._kernels import losses as _kl
from .functional._checks import FLOAT_DTYPES, real_number, shape_str
from .functional.losses import _as_array, _empty_as_labels
from .optim.base import Setting

__all__ = ["Loss", "SoftmaxCrossEntropy", "MulticlassSVM", "MSE", "LOSS_TYPES"]

_KEEP = 3  # (shape, dtype) buffer sets kept: training batch, last partial batch, evaluation


def _check_reduction(loss, value):
    if not isinstance(value, str) or value not in ("mean", "sum"):
        raise ValueError(f"{type(loss).__name__}: reduction must be 'mean' or 'sum', "
                         f"got {value!r}")
    return value


class Loss:
    """Base class; see the subclasses for the formulas. Settings are checked when
    assigned too (``loss.reduction = "none"`` would train as a sum)."""

    needs_labels = True
    plan_kind = None    # the compiled loss a training plan runs for exactly this class
    reduction = Setting(_check_reduction)

    def __init__(self, reduction="mean"):
        self.reduction = reduction
        self._local = threading.local()     # each thread's buffers and gradient

    @property
    def _grad(self):
        """This thread's last gradient (the loss object may serve several threads)."""
        return getattr(self._local, "grad", None)

    @_grad.setter
    def _grad(self, value):
        self._local.grad = value

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self._local = threading.local()
        for key, value in state.items():    # ("reduction" of an older pickle: checked)
            setattr(self, key, value)

    def get_config(self):
        return {"reduction": self.reduction}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # -- validation (once per call at the boundary, once per dataset in fit) -------
    def check_scores(self, scores, where=None):
        where = where or f"{type(self).__name__}.forward"
        if not isinstance(scores, np.ndarray):
            scores = _as_array(scores, "scores", where)
        if scores.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{where}: scores must be float32 or float64, got dtype {scores.dtype}")
        if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
            raise ValueError(f"{where}: scores must be 2-D (N, C) with N, C >= 1, got shape "
                             f"{shape_str(scores.shape)}")
        return np.ascontiguousarray(scores)

    def check_targets(self, targets, n, num_classes, dtype, where=None, name="targets"):
        """Targets as the kernel wants them (int64 labels in [0, C)), or a clear error."""
        where = where or f"{type(self).__name__}.forward"
        return _labels(targets, n, num_classes, where, name)

    # -- hot path -----------------------------------------------------------------
    def _buffers(self, shape, dtype):
        # Per thread: one loss object may serve models trained or evaluated in
        # several threads at once (training plans have buffers of their own).
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        key = (shape, dtype)
        b = bufs.get(key)
        if b is None:
            if len(bufs) >= _KEEP:
                bufs.pop(next(iter(bufs)))
            b = bufs[key] = (np.empty(shape, dtype), np.empty(shape[0], np.float64))
        return b

    def _compute(self, scores, targets, nt, need_grad=True):
        """Loss of trusted inputs; the gradient (if asked) is left in ``self._grad``."""
        grad, sample = self._buffers(scores.shape, scores.dtype)
        n = scores.shape[0]
        scale = 1.0 / n if self.reduction == "mean" else 1.0
        total = self._kernel(scores, targets, grad if need_grad else None, sample, scale, nt)
        self._grad = grad if need_grad else None
        return total * scale

    def _kernel(self, scores, targets, grad, sample, scale, nt):
        raise NotImplementedError

    # -- public -------------------------------------------------------------------
    def forward(self, scores, targets):
        """The loss (a Python float) of ``scores`` (N, C) against ``targets``."""
        scores = self.check_scores(scores)
        targets = self.check_targets(targets, scores.shape[0], scores.shape[1], scores.dtype)
        return self._compute(scores, targets, _config.step_threads())

    __call__ = forward

    def backward(self):
        """dL/dscores for the last forward (the loss's own buffer)."""
        if self._grad is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first")
        return self._grad


def _labels(targets, n, num_classes, where, name):
    given = targets
    if not isinstance(targets, np.ndarray):
        if targets is None or isinstance(targets, (str, bytes, dict)):
            raise TypeError(f"{where}: {name} must be an integer array of class labels, "
                            f"got {type(targets).__name__}")
        targets = _as_array(targets, name, where)
    targets = _empty_as_labels(targets, given)
    if targets.dtype.kind not in "iub":
        raise TypeError(f"{where}: {name} must be integer class labels, got dtype "
                        f"{targets.dtype}")
    if targets.shape != (n,):
        raise ValueError(f"{where}: {name} must have shape ({n},) (one label per sample), "
                         f"got {shape_str(targets.shape)}")
    if targets.dtype.kind == "u" and targets.dtype.itemsize == 8 and n \
            and targets.max() > np.iinfo(np.int64).max:
        # int64 would wrap such a label to a negative one: name the value given
        raise ValueError(f"{where}: {name} must be class labels in [0, {num_classes}), "
                         f"got {targets.max()}")
    labels = np.ascontiguousarray(targets, dtype=np.int64)
    if n:
        lo, hi = _kl.label_range(labels)
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{where}: {name} must be class labels in [0, {num_classes}), "
                             f"got values from {lo} to {hi}")
    return labels


class SoftmaxCrossEntropy(Loss):
    """L_i = −log(e^{s_{y_i}} / Σ_j e^{s_j}) (log-sum-exp, stable); dL_i/ds = p − onehot(y_i)."""

    plan_kind = "softmax_cross_entropy"

    def _kernel(self, scores, targets, grad, sample, scale, nt):
        return _kl.softmax_cross_entropy(scores, targets, None, grad, sample, scale, nt)


class MulticlassSVM(Loss):
    """L_i = Σ_{j≠y_i} max(0, s_j − s_{y_i} + Δ), Δ = ``margin`` (PyTorch MultiMarginLoss × C)."""

    plan_kind = "multiclass_svm"
    margin = Setting(lambda loss, v: real_number(v, "margin", type(loss).__name__, minimum=0))

    def __init__(self, margin=1.0, reduction="mean"):
        super().__init__(reduction)
        self.margin = margin

    def get_config(self):
        return {"margin": self.margin, "reduction": self.reduction}

    def _kernel(self, scores, targets, grad, sample, scale, nt):
        return _kl.multiclass_svm(scores, targets, self.margin, grad, sample, scale, nt)


class MSE(Loss):
    """L_i = ½ Σ_j (y_ij − ŷ_ij)²; dL_i/dŷ = ŷ − y.

    Targets: a float array shaped like the predictions ((N,) allowed when C = 1),
    or integer class labels, used as one-hot rows.
    """

    plan_kind = "mse"

    def check_targets(self, targets, n, num_classes, dtype, where=None, name="targets"):
        where = where or "MSE.forward"
        if not isinstance(targets, np.ndarray):
            if targets is None or isinstance(targets, (str, bytes, dict)):
                raise TypeError(f"{where}: {name} must be a float array or integer labels, "
                                f"got {type(targets).__name__}")
            given, targets = targets, _as_array(targets, name, where)
            if targets.shape != (n, num_classes) and (targets.shape != (n,) or num_classes > 1):
                targets = _empty_as_labels(targets, given)  # (a [] that cannot be float targets)
        if targets.dtype.kind in "iub":
            return _labels(targets, n, num_classes, where, name)
        if targets.dtype.kind != "f":
            raise TypeError(f"{where}: {name} must be a float array or integer labels, "
                            f"got dtype {targets.dtype}")
        if targets.shape == (n,) and num_classes == 1:
            targets = targets.reshape(n, 1)
        if targets.shape != (n, num_classes):
            raise ValueError(f"{where}: {name} must have shape {shape_str((n, num_classes))} "
                             f"like the predictions, got {shape_str(targets.shape)}")
        return np.ascontiguousarray(targets, dtype=dtype)

    def _kernel(self, scores, targets, grad, sample, scale, nt):
        if targets.dtype == np.int64:
            return _kl.mse_labels(scores, targets, grad, sample, scale, nt)
        return _kl.mse(scores, targets, grad, sample, scale, nt)


LOSS_TYPES = {cls.__name__: cls for cls in (SoftmaxCrossEntropy, MulticlassSVM, MSE)}
