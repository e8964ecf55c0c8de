"""cdl.functional: the validated low-level kernels, usable without layer classes."""
from ._checks import conv_output_size
from .dense import linear, linear_backward

__all__ = ["conv_output_size", "linear", "linear_backward"]
