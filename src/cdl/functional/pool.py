"""Max-pooling with argmax indices: forward and backward.

H2 = floor((H1 + 2P - F) / S) + 1 per axis; the default stride is the kernel
size. ``indices`` (int32, shaped like the output) holds the flat position
h*W + w of each maximum within its input H x W plane, as PyTorch's
``return_indices=True`` does. Padded cells never win (padding is at most half
the kernel, as in PyTorch, so every window holds a real cell); ties go to the
first maximum in row-major order; a NaN in a window is its maximum.
"""
import numbers

import numpy as np

from .._kernels import pool as _pool
from ._checks import (conv_output_size, float_array, int_pair, num_threads, out_array,
                      shape_str)

__all__ = ["max_pool2d", "max_pool2d_backward"]


def _params(kernel_size, stride, padding, where):
    kh, kw = int_pair(kernel_size, "kernel_size", where, 1)
    sh, sw = (kh, kw) if stride is None else int_pair(stride, "stride", where, 1)
    ph, pw = int_pair(padding, "padding", where, 0)
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{where}: padding {ph}x{pw} must be at most half the kernel "
                         f"{kh}x{kw} (<= {kh // 2}x{kw // 2}) so every window holds an input cell")
    return kh, kw, sh, sw, ph, pw


def _output_hw(H, W, kh, kw, sh, sw, ph, pw, where):
    return (conv_output_size(H, kh, sh, ph, where, "H"),
            conv_output_size(W, kw, sw, pw, where, "W"))


def max_pool2d(x, kernel_size, stride=None, padding=0, *, out=None, indices=None, threads=None):
    """Max-pool x (N, C, H, W) over KH x KW windows; returns (y, indices).

    y[n, c, i, j] = max over rows i*S_h - P_h + [0, KH) and columns j*S_w - P_w + [0, KW)
    (cells inside the input only). ``out`` and ``indices`` (int32) may be given,
    shaped (N, C, H2, W2).
    """
    where = "max_pool2d"
    x = float_array(x, "x", where, ndim=4)
    kh, kw, sh, sw, ph, pw = _params(kernel_size, stride, padding, where)
    n, c, h, w = x.shape
    oh, ow = _output_hw(h, w, kh, kw, sh, sw, ph, pw, where)
    shape = (n, c, oh, ow)
    out = out_array(out, "out", where, shape, x.dtype, {"x": x})
    indices = out_array(indices, "indices", where, shape, np.int32, {"x": x, "out": out})
    _pool.max_pool2d_forward(x, out, indices, kh, kw, sh, sw, ph, pw, num_threads(threads, where))
    return out, indices


def max_pool2d_backward(grad_out, indices, input_shape, kernel_size, stride=None, padding=0, *,
                        grad_input=None, threads=None):
    """dL/dx for max-pooling: each dL/dy[n, c, i, j] goes to the cell indices[n, c, i, j]
    of plane (n, c); every other cell gets 0 (overlapping windows add up).

    ``input_shape`` is x's (N, C, H, W). ``indices`` must come from
    max_pool2d with the same parameters: an index outside its window is a ValueError.
    """
    where = "max_pool2d_backward"
    if (not isinstance(input_shape, (tuple, list)) or len(input_shape) != 4
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0
                       for s in input_shape)):
        raise ValueError(f"{where}: input_shape must be 4 non-negative ints (N, C, H, W), "
                         f"got {input_shape!r}")
    n, c, h, w = (int(s) for s in input_shape)
    grad_out = float_array(grad_out, "grad_out", where, ndim=4)
    kh, kw, sh, sw, ph, pw = _params(kernel_size, stride, padding, where)
    oh, ow = _output_hw(h, w, kh, kw, sh, sw, ph, pw, where)
    if grad_out.shape != (n, c, oh, ow):
        raise ValueError(f"{where}: grad_out must have shape {shape_str((n, c, oh, ow))} for "
                         f"input {shape_str((n, c, h, w))}, got {shape_str(grad_out.shape)}")
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"{where}: indices must be an int32 array, got {type(indices).__name__}")
    if indices.dtype != np.int32:
        raise TypeError(f"{where}: indices must have dtype int32 (as max_pool2d returns), "
                        f"got {indices.dtype}")
    if indices.shape != grad_out.shape:
        raise ValueError(f"{where}: indices has shape {shape_str(indices.shape)} but grad_out "
                         f"has {shape_str(grad_out.shape)}")
    indices = np.ascontiguousarray(indices)
    dx = out_array(grad_input, "grad_input", where, (n, c, h, w), grad_out.dtype,
                   {"grad_out": grad_out, "indices": indices})
    # The kernel finds a bad index as it writes. Checking first (a pass over the
    # indices) or filling a scratch array and copying cost up to 3.5x the call
    # (64x32x32x32: 0.88 against 0.25 ms), so a caller's grad_input holds partial
    # results after this error (the error is a misuse: max_pool2d's indices pass).
    bad = _pool.max_pool2d_backward(grad_out, indices, dx, kh, kw, sh, sw, ph, pw,
                                    num_threads(threads, where))
    if bad:
        raise ValueError(f"{where}: {bad} of {indices.size} indices do not point into their "
                         f"own {kh}x{kw} window of the {h}x{w} input; pass the indices "
                         f"max_pool2d returned for the same kernel_size/stride/padding")
    return dx
