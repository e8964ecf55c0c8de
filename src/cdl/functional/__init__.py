"""cdl.functional: the validated low-level kernels, usable without layer classes.

Every function takes float32 or float64 NCHW / (N, features) arrays, checks
them once, and calls a compiled kernel. ``out=``/``grad=`` buffers may be
passed so that a caller repeating a step allocates nothing; ``threads=``
overrides cdl.get_num_threads() for one call. Results are bitwise identical
for any thread count.
"""
from ._checks import conv_output_size
from .activations import relu, relu_backward, sigmoid, sigmoid_backward
from .conv import conv2d, conv2d_backward
from .dense import linear, linear_backward
from .losses import l2_penalty, mse, multiclass_svm, softmax, softmax_cross_entropy
from .optim import sgd_update
from .pool import max_pool2d, max_pool2d_backward

__all__ = [
    "conv2d", "conv2d_backward", "conv_output_size", "l2_penalty", "linear",
    "linear_backward", "max_pool2d", "max_pool2d_backward", "mse", "multiclass_svm",
    "relu", "relu_backward", "sgd_update", "sigmoid", "sigmoid_backward", "softmax",
    "softmax_cross_entropy",
]
