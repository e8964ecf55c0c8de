"""Flatten: each sample CxHxW -> (C·H·W,), a view."""
import numpy as np

from .base import Layer

__all__ = ["Flatten"]


class Flatten(Layer):
    """Reshape each sample CxHxW -> (C·H·W,) (a view, no copy)."""

    transparent = True
    names_source = False

    def _configure(self, input_shape, source):
        return (int(np.prod(input_shape)),)

    def _alloc(self, n, train):
        return {}

    def _forward(self, x, ws, nt, train):
        return x.reshape(x.shape[0], -1)

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        return g.reshape(x.shape)

    def plan_forward(self, x, ws, train):
        return [], x.reshape(x.shape[0], -1)

    def plan_backward(self, g, x, ws, need_input_grad):
        return [], (g.reshape(x.shape) if need_input_grad else None)
