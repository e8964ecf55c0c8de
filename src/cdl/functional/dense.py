"""Dense layer kernels: f(x; W) = x W^T + b, and its gradients."""


from .. import _config
from .._kernels import dense as _dense
from ._checks import (flag, float_array, num_threads, out_array, real_number, same_dtype,
                      shape_str)

__all__ = ["linear", "linear_backward"]


def linear(x, weight, bias=None, *, out=None, threads=None):
    """Scores f(x; W) = x W^T + b for a batch x of shape (N, in_features).

    ``weight`` is (out_features, in_features) and ``bias`` (out_features,) or None.
    Returns ``out`` of shape (N, out_features), allocated if not given.
    """
    where = "linear"
    x = float_array(x, "x", where, ndim=2)
    weight = float_array(weight, "weight", where, ndim=2)
    if bias is not None:
        bias = float_array(bias, "bias", where, ndim=1)
    same_dtype(where, "x", x, weight=weight, bias=bias)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: x has {x.shape[1]} features (shape {shape_str(x.shape)}) but "
                         f"weight expects {weight.shape[1]} (shape {shape_str(weight.shape)})")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{where}: bias has {bias.shape[0]} entries but weight has "
                         f"{weight.shape[0]} output features")
    out = out_array(out, "out", where, (x.shape[0], weight.shape[0]), x.dtype,
                    {"x": x, "weight": weight, "bias": bias})
    try:
        _dense.linear_forward(x, weight, bias, out, num_threads(threads, where))
    finally:
        _config.restore_blas()  # SciPy's BLAS was single-threaded only for this call
    return out


def linear_backward(grad_out, x, weight, *, need_input_grad=True, need_bias_grad=True,
                    l2=0.0, grad_input=None, grad_weight=None, grad_bias=None, threads=None):
    """Gradients of f(x; W) = x W^T + b given dL/df = ``grad_out`` (N, out_features).

    Returns (dx, dW, db): dx = grad_out W (None unless ``need_input_grad``),
    dW = grad_out^T x + 2 l2 W (the L2 penalty's gradient, if l2 > 0),
    db = the batch sum of grad_out (None unless ``need_bias_grad``).
    """
    where = "linear_backward"
    need_input_grad = flag(need_input_grad, "need_input_grad", where)
    need_bias_grad = flag(need_bias_grad, "need_bias_grad", where)
    grad_out = float_array(grad_out, "grad_out", where, ndim=2)
    x = float_array(x, "x", where, ndim=2)
    weight = float_array(weight, "weight", where, ndim=2)
    same_dtype(where, "x", x, grad_out=grad_out, weight=weight)
    n, fin = x.shape
    fout = weight.shape[0]
    if weight.shape[1] != fin:
        raise ValueError(f"{where}: x has {fin} features but weight has shape "
                         f"{shape_str(weight.shape)}")
    if grad_out.shape != (n, fout):
        raise ValueError(f"{where}: grad_out must have shape {shape_str((n, fout))} "
                         f"(batch x out_features), got {shape_str(grad_out.shape)}")
    l2 = real_number(l2, "l2", where, minimum=0)
    reads = {"grad_out": grad_out, "x": x, "weight": weight}
    dx = (out_array(grad_input, "grad_input", where, x.shape, x.dtype, reads)
          if need_input_grad else None)
    dw = out_array(grad_weight, "grad_weight", where, weight.shape, x.dtype,
                   dict(reads, grad_input=dx))
    db = (out_array(grad_bias, "grad_bias", where, (fout,), x.dtype,
                    dict(reads, grad_input=dx, grad_weight=dw)) if need_bias_grad else None)
    try:
        _dense.linear_backward(grad_out, x, weight, dx, dw, db, float(l2),
                               num_threads(threads, where))
    finally:
        _config.restore_blas()
    return dx, dw, db
