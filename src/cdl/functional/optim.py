"""Parameter update: stochastic gradient descent with momentum (PyTorch semantics)."""

import numpy as np

from .._kernels import elementwise as _ew
from ._checks import FLOAT_DTYPES, flag, num_threads, real_number, shape_str

__all__ = ["sgd_update"]


def _buffer(a, name, where, like=None):
    """An in-place buffer: float32/float64, C-contiguous, writeable, never copied."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{where}: {name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be float32 or float64, got dtype {a.dtype}")
    if like is not None:
        if a.dtype != like.dtype:
            raise TypeError(f"{where}: {name} has dtype {a.dtype} but param has {like.dtype}")
        if a.shape != like.shape:
            raise ValueError(f"{where}: {name} has shape {shape_str(a.shape)} but param has "
                             f"{shape_str(like.shape)}")
    return a


def _number(value, name, where):
    return real_number(value, name, where, minimum=0)


def sgd_update(param, grad, *, lr, velocity=None, momentum=0.0, nesterov=False,
               weight_decay=0.0, threads=None):
    """One SGD step, in place on ``param`` (and ``velocity``):

        g = grad + weight_decay * param
        v = momentum * v + g
        param -= lr * (g + momentum * v if nesterov else v)

    as torch.optim.SGD with dampening 0. ``velocity`` (same shape, zero-initialised
    by the caller, kept between steps) is required when momentum > 0. ``param``
    and ``velocity`` must be C-contiguous and writeable; ``grad`` is copied to C
    order if needed. Returns ``param``.
    """
    where = "sgd_update"
    param = _buffer(param, "param", where)
    if not param.flags.c_contiguous or not param.flags.writeable:
        raise ValueError(f"{where}: param must be a writeable C-contiguous array (updated in place)")
    grad = np.ascontiguousarray(_buffer(grad, "grad", where, like=param))
    lr = _number(lr, "lr", where)
    momentum = _number(momentum, "momentum", where)
    weight_decay = _number(weight_decay, "weight_decay", where)
    nesterov = flag(nesterov, "nesterov", where)
    if nesterov and momentum == 0:
        raise ValueError(f"{where}: nesterov=True needs momentum > 0")
    if velocity is not None:
        velocity = _buffer(velocity, "velocity", where, like=param)
        if not velocity.flags.c_contiguous or not velocity.flags.writeable:
            raise ValueError(f"{where}: velocity must be a writeable C-contiguous array")
        if np.shares_memory(velocity, param):
            raise ValueError(f"{where}: velocity must not share memory with param")
    elif momentum != 0:
        raise ValueError(f"{where}: momentum={momentum} needs a velocity buffer "
                         f"(np.zeros_like(param), kept between steps)")
    for other, name in ((param, "param"), (velocity, "velocity")):
        # the same array is fine (each element reads its own value first); a shifted
        # overlap would read gradients the update has already overwritten
        if other is not None and np.shares_memory(grad, other) \
                and grad.ctypes.data != other.ctypes.data:
            raise ValueError(f"{where}: grad overlaps {name} without being the same array; "
                             f"pass a copy")
    _ew.sgd_update(param.reshape(-1), grad.reshape(-1),
                   None if velocity is None else velocity.reshape(-1),
                   lr, momentum, nesterov, weight_decay, num_threads(threads, where))
    return param
