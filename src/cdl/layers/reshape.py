"""Flatten: each sample CxHxW -> (C·H·W,), a view."""
import numpy as np

from ..functional._checks import shape_str
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

    # -- ONNX --------------------------------------------------------------------------
    onnx_ops = ("Flatten", "Reshape")

    def to_onnx(self, graph, x):
        return graph.node("Flatten", [x], self, axis=1)

    @classmethod
    def from_onnx(cls, node, reader):
        """Flatten with axis 1, and a Reshape that keeps the batch axis and flattens the
        rest ((N, -1), (0, -1), (N, C·H·W), ...) or changes nothing."""
        shape = reader.shape
        size = int(np.prod(shape))
        if node.op_type == "Flatten":
            axis = reader.attrs(node, {"axis": 1})["axis"]
            rank = len(reader.onnx_shape) + 1
            if axis not in (1, 1 - rank):
                raise reader.fail(node, f"Flatten with axis={axis} on a rank-{rank} "
                                        f"input mixes the batch axis with others; cdl flattens "
                                        f"from axis 1")
            reader.set_onnx_shape((size,))
            return [] if len(shape) == 1 else [cls()]
        allowzero = reader.attrs(node, {"allowzero": 0})["allowzero"]
        target = reader.const(node, 1, "shape", batch_ok=True)
        per_sample = reader.batch_reshape(node, target, allowzero)
        reader.set_onnx_shape(per_sample)
        if per_sample == tuple(shape):
            return []
        if per_sample == (size,):
            return [cls()]
        raise reader.fail(node, f"a reshape of per-sample {shape_str(shape)} to "
                                f"{shape_str(per_sample)}; cdl only flattens to (N, -1)")
