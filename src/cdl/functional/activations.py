"""Activations and their gradients, elementwise on arrays of any shape.

ReLU     y = max(0, x),            dL/dx = dL/dy * [y > 0]
Sigmoid  y = σ(x) = 1/(1 + e^-x),  dL/dx = dL/dy * y (1 - y)

The backward functions take the forward OUTPUT y (what a layer keeps), not x.
``out`` may be the input itself for an in-place update (any other overlap with an
input is a ValueError). NaN propagates.
"""
from .._kernels import elementwise as _ew
from ._checks import float_array, num_threads, out_array, same_dtype, shape_str

__all__ = ["relu", "relu_backward", "sigmoid", "sigmoid_backward"]


def _unary(kernel, x, out, threads, where):
    x = float_array(x, "x", where)
    out = out_array(out, "out", where, x.shape, x.dtype, {"x": x}, in_place=("x",))
    kernel(x.reshape(-1), out.reshape(-1), num_threads(threads, where))
    return out


def _backward(kernel, grad_out, y, out, threads, where):
    grad_out = float_array(grad_out, "grad_out", where)
    y = float_array(y, "y", where)
    same_dtype(where, "y", y, grad_out=grad_out)
    if grad_out.shape != y.shape:
        raise ValueError(f"{where}: grad_out has shape {shape_str(grad_out.shape)} but y has "
                         f"{shape_str(y.shape)}")
    out = out_array(out, "out", where, y.shape, y.dtype, {"grad_out": grad_out, "y": y},
                    in_place=("grad_out", "y"))
    kernel(grad_out.reshape(-1), y.reshape(-1), out.reshape(-1), num_threads(threads, where))
    return out


def relu(x, *, out=None, threads=None):
    """y = max(0, x)."""
    return _unary(_ew.relu_forward, x, out, threads, "relu")


def relu_backward(grad_out, y, *, out=None, threads=None):
    """dL/dx = grad_out where y > 0, else 0 (y = relu(x))."""
    return _backward(_ew.relu_backward, grad_out, y, out, threads, "relu_backward")


def sigmoid(x, *, out=None, threads=None):
    """y = 1 / (1 + e^-x), computed without overflow for any ``|x|``."""
    return _unary(_ew.sigmoid_forward, x, out, threads, "sigmoid")


def sigmoid_backward(grad_out, y, *, out=None, threads=None):
    """dL/dx = grad_out * y * (1 - y) (y = sigmoid(x))."""
    return _backward(_ew.sigmoid_backward, grad_out, y, out, threads, "sigmoid_backward")
