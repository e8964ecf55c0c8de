"""Validation shared by the functional API: done once, at the Python boundary.

Conventions: inputs must be float32 or float64 arrays (anything else is a
TypeError); non-contiguous inputs are copied to C order; ``out=`` buffers are
never copied, so they must already be C-contiguous with the exact shape and
dtype, or a ValueError/TypeError says what was expected.
"""
import math
import numbers

import numpy as np

from .. import _config
from .._kernels import _runtime

__all__ = ["FLOAT_DTYPES", "MAX_THREADS", "shape_str", "float_array", "same_dtype", "out_array",
           "real_number", "overflows", "flag", "int_pair", "conv_output_size", "num_threads"]

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Kernels index with Py_ssize_t, but BLAS and per-plane indices are 32-bit.
INT32_MAX = 2**31 - 1
# More OpenMP threads than this is a mistake (and libgomp crashes when thread
# creation fails for ~1e5 threads): refuse it with a ValueError.
MAX_THREADS = 1024


def shape_str(shape):
    return "x".join(str(int(s)) for s in shape) if len(shape) else "scalar"


def float_array(a, name, where, ndim=None):
    """``a`` as a C-contiguous float32/float64 ndarray, or a clear error."""
    if type(a) is not np.ndarray:       # (a subclass too: np.matrix stays 2-D when flat)
        if a is None or isinstance(a, (str, bytes, dict, set)):
            raise TypeError(f"{where}: {name} must be a float32 or float64 array, "
                            f"got {type(a).__name__}")
        try:
            a = np.asarray(a)
        except ValueError as exc:       # nested lists of unequal lengths
            raise ValueError(f"{where}: {name} must be an array (nested lists of equal "
                             f"lengths); NumPy could not make one: {exc}") from None
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: {name} must be float32 or float64, got dtype {a.dtype} "
                        f"(shape {shape_str(a.shape)}); cast it first, e.g. x.astype(np.float32)")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{where}: {name} must be {ndim}-D, got {a.ndim}-D array of shape "
                         f"{shape_str(a.shape)}")
    if a.size > INT32_MAX:
        raise ValueError(f"{where}: {name} has {a.size} elements (shape {shape_str(a.shape)}); "
                         f"at most {INT32_MAX} are supported")
    # (np.ascontiguousarray would turn a 0-d array into 1-d)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def same_dtype(where, first_name, first, **others):
    for name, a in others.items():
        if a is not None and a.dtype != first.dtype:
            raise TypeError(f"{where}: {name} has dtype {a.dtype} but {first_name} has "
                            f"{first.dtype}; use one dtype for all arrays")


def out_array(out, name, where, shape, dtype, reads=None, in_place=()):
    """Check a caller-provided output buffer, or allocate one if ``out`` is None.

    ``reads`` ({name: array or None}): the arrays the call reads (inputs, and outputs
    checked before this one). A given ``out`` that shares memory with one of them is a
    ValueError, since the kernels read while they write and the result would be silently
    wrong; the names in ``in_place`` may be exactly ``out`` (an elementwise update)."""
    shape = tuple(int(s) for s in shape)
    size = 1
    for s in shape:
        size *= s
    if size > INT32_MAX:  # before allocating: this would overflow indices or memory
        raise ValueError(f"{where}: {name} would have shape {shape_str(shape)} = {size} "
                         f"elements; at most {INT32_MAX} are supported")
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{where}: {name} must be a numpy array, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{where}: {name} must have dtype {np.dtype(dtype)}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"{where}: {name} must have shape {shape_str(shape)}, "
                         f"got {shape_str(out.shape)}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{where}: {name} must be a writeable C-contiguous array")
    for other, a in (reads or {}).items():
        if a is None or not np.may_share_memory(out, a):
            continue
        if other in in_place and (a is out or (a.ctypes.data == out.ctypes.data
                                               and a.strides == out.strides
                                               and a.shape == out.shape)):
            continue
        raise ValueError(f"{where}: {name} shares memory with {other}; give it an array of "
                         f"its own")
    return out


def int_at_least(value, name, where, least):
    """An int (NumPy's too, not a bool) >= least, as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    if value < least:
        raise ValueError(f"{where}: {name} must be >= {least}, got {value!r}")
    return int(value)


def real_number(value, name, where, minimum=None):
    """A finite real number (>= minimum when given) as a float; TypeError for non-numbers."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (minimum is not None and v < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise ValueError(f"{where}: {name} must be a finite number{bound}, got {value!r}")
    return v


def overflows(a, dtype):
    """Whether float array ``a`` holds finite values that ``dtype`` (narrower) makes
    infinite."""
    dtype = np.dtype(dtype)
    if a.dtype.kind != "f" or dtype.kind != "f" or a.dtype.itemsize <= dtype.itemsize:
        return False
    with np.errstate(over="ignore"):
        return bool((np.isfinite(a) & ~np.isfinite(a.astype(dtype))).any())


def flag(value, name, where):
    """A bool (NumPy's too) as a Python bool; anything else is a TypeError (a string such
    as "no" would count as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be True or False, got {value!r}")
    return bool(value)


def int_pair(value, name, where, minimum):
    """An int or a pair of ints, each >= minimum, as a tuple (h, w)."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise ValueError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
    out = []
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{where}: {name} must be an int or a pair of ints, got {value!r}")
        if v < minimum:
            raise ValueError(f"{where}: {name} must be >= {minimum}, got {value!r}")
        if v > INT32_MAX:
            raise ValueError(f"{where}: {name}={value!r} is too large")
        out.append(int(v))
    return tuple(out)


def conv_output_size(size, kernel, stride=1, padding=0, where="conv_output_size", axis="H"):
    """Output size of a convolution or pooling along one axis: H2 = floor((H1 - F + 2P) / S) + 1.

    ``size`` is H1, ``kernel`` F, ``stride`` S, ``padding`` P. A window larger than the
    padded input is a ValueError that shows the arithmetic (``where`` names the caller,
    ``axis`` the axis in the message).
    """
    # size 0 is refused: padding alone would make an output with no input cell in it
    size, kernel, stride, padding = (
        int_at_least(value, name, where, least)
        for name, value, least in (("size", size, 1), ("kernel", kernel, 1),
                                   ("stride", stride, 1), ("padding", padding, 0)))
    span = size + 2 * padding - kernel
    if span < 0:
        raise ValueError(
            f"{where}: kernel {axis}={kernel} is larger than the padded input "
            f"{axis}={size}+2*{padding}={size + 2 * padding}: "
            f"{axis}2 = ({axis}1 - F + 2P)/S + 1 = ({size} - {kernel} + 2*{padding})/{stride} + 1 < 1")
    return span // stride + 1


def num_threads(n=None, where="cdl"):
    """A call's ``threads`` argument: None gives the configured (adaptive) count."""
    if n is None:
        return _config.step_threads()
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{where}: threads must be a positive int, got {n!r}")
    if n < 1:
        raise ValueError(f"{where}: threads must be a positive int, got {n!r}")
    if n > MAX_THREADS:
        raise ValueError(f"{where}: threads={n} is more than the {MAX_THREADS} cdl supports")
    return _runtime.fork_safe_threads(int(n))
