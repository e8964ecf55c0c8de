"""Conv2d kernels: direct convolution, NCHW, and its gradients.

    y[n, k, oh, ow] = b[k] + sum_{c, i, j} W[k, c, i, j] x[n, c, oh*S - P + i, ow*S - P + j]

with zero padding P, stride S (per axis) and H2 = (H1 - F + 2P)/S + 1 (floor).

float32 3x3 stride-1 convolutions with at least 16 input and output channels run on a
Winograd F(2x2, 3x3) path on the AVX2 and AVX-512 builds (their weight gradients from 512
2x2 tiles in the batch; on the AVX-512 build, outputs of 12 rows or more take F(4x2, 3x3),
tiles of 4 rows x 2 columns): the same values within float32 rounding, bitwise the same
for any thread count and, for the forward, any batch size; a NaN or Inf in x reaches whole
output tiles.
"""
from .._kernels import conv as _conv
from ._checks import (conv_output_size, flag, float_array, int_pair, num_threads, out_array,
                      same_dtype, shape_str)

__all__ = ["conv2d", "conv2d_backward"]


def _geometry(where, x_shape, w_shape, stride, padding):
    sh, sw = int_pair(stride, "stride", where, 1)
    ph, pw = int_pair(padding, "padding", where, 0)
    n, c, h, w = x_shape
    k, wc, kh, kw = w_shape
    if wc != c:
        raise ValueError(f"{where}: x has {c} channels (shape {shape_str(x_shape)}) but weight "
                         f"expects {wc} (shape {shape_str(w_shape)}, out_channels x in_channels "
                         f"x kh x kw)")
    if kh < 1 or kw < 1:
        raise ValueError(f"{where}: weight must have a kernel of at least 1x1, got shape "
                         f"{shape_str(w_shape)}")
    oh = conv_output_size(h, kh, sh, ph, where, "H")
    ow = conv_output_size(w, kw, sw, pw, where, "W")
    return sh, sw, ph, pw, oh, ow


def conv2d(x, weight, bias=None, stride=1, padding=0, *, out=None, threads=None):
    """y = conv(x; W) + b for x of shape (N, C, H, W) and weight (K, C, KH, KW).

    ``bias`` is (K,) or None; ``stride`` and ``padding`` are ints or (h, w) pairs.
    Returns ``out`` of shape (N, K, H2, W2), allocated if not given.
    """
    where = "conv2d"
    x = float_array(x, "x", where, ndim=4)
    weight = float_array(weight, "weight", where, ndim=4)
    if bias is not None:
        bias = float_array(bias, "bias", where, ndim=1)
    same_dtype(where, "x", x, weight=weight, bias=bias)
    sh, sw, ph, pw, oh, ow = _geometry(where, x.shape, weight.shape, stride, padding)
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{where}: bias has {bias.shape[0]} entries but weight has "
                         f"{weight.shape[0]} output channels")
    out = out_array(out, "out", where, (x.shape[0], weight.shape[0], oh, ow), x.dtype,
                    {"x": x, "weight": weight, "bias": bias})
    _conv.conv2d_forward(x, weight, bias, out, sh, sw, ph, pw, num_threads(threads, where))
    return out


def conv2d_backward(grad_out, x, weight, stride=1, padding=0, *, need_input_grad=True,
                    need_bias_grad=True, grad_input=None, grad_weight=None, grad_bias=None,
                    threads=None):
    """Gradients of y = conv(x; W) + b given dL/dy = ``grad_out`` (N, K, H2, W2).

    Returns (dx, dW, db):
    dx[n, c, h, w] = sum_{k, i, j} W[k, c, i, j] dy[n, k, oh, ow] over h = oh*S - P + i,
    w = ow*S - P + j (None unless ``need_input_grad``; a first layer can skip it);
    dW[k, c, i, j] = sum_{n, oh, ow} dy[n, k, oh, ow] x[n, c, oh*S - P + i, ow*S - P + j];
    db[k] = sum_{n, oh, ow} dy[n, k, oh, ow] (None unless ``need_bias_grad``).
    """
    where = "conv2d_backward"
    need_input_grad = flag(need_input_grad, "need_input_grad", where)
    need_bias_grad = flag(need_bias_grad, "need_bias_grad", where)
    grad_out = float_array(grad_out, "grad_out", where, ndim=4)
    x = float_array(x, "x", where, ndim=4)
    weight = float_array(weight, "weight", where, ndim=4)
    same_dtype(where, "x", x, grad_out=grad_out, weight=weight)
    sh, sw, ph, pw, oh, ow = _geometry(where, x.shape, weight.shape, stride, padding)
    expected = (x.shape[0], weight.shape[0], oh, ow)
    if grad_out.shape != expected:
        raise ValueError(f"{where}: grad_out must have shape {shape_str(expected)} (N x K x H2 x "
                         f"W2), got {shape_str(grad_out.shape)}")
    nt = num_threads(threads, where)
    reads = {"grad_out": grad_out, "x": x, "weight": weight}
    dx = (out_array(grad_input, "grad_input", where, x.shape, x.dtype, reads)
          if need_input_grad else None)
    dw = out_array(grad_weight, "grad_weight", where, weight.shape, x.dtype,
                   dict(reads, grad_input=dx))
    db = (out_array(grad_bias, "grad_bias", where, (weight.shape[0],), x.dtype,
                    dict(reads, grad_input=dx, grad_weight=dw)) if need_bias_grad else None)
    if dx is not None:
        _conv.conv2d_backward_input(grad_out, weight, dx, sh, sw, ph, pw, nt)
    _conv.conv2d_backward_weight(grad_out, x, dw, db, sh, sw, ph, pw, nt)
    return dx, dw, db
