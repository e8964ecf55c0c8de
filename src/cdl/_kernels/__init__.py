"""The compiled kernel modules, each in the build for this CPU's instruction set.

Kernels trust their inputs (C-contiguous, matching shapes and dtypes); callers
validate first, as cdl.functional does and the layers do at construction.
"""
from . import _losses as losses
from ._dispatch import load

conv = load("_conv")
dense = load("_dense")
pool = load("_pool")
elementwise = load("_elementwise")
norm = load("_norm")

__all__ = ["conv", "dense", "elementwise", "losses", "norm", "pool"]
