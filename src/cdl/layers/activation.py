"""Elementwise activations: ReLU, Sigmoid, Tanh, LeakyReLU."""
import numbers

import numpy as np

from .._kernels import elementwise as _ew
from .base import CallOp, Layer
from .chain import Op

__all__ = ["ReLU", "Sigmoid", "Tanh", "LeakyReLU"]


class _Elementwise(Layer):
    """y = f(x) elementwise on flat views; the backward reads the output y."""

    _kernels = None             # names of the forward and backward kernels in _elementwise

    def flops(self):
        self._check_built("flops")
        return int(np.prod(self.output_shape))

    def _alloc(self, n, train):
        out = np.empty((n,) + self.output_shape, self.dtype)
        ws = {"out": out, "out_flat": out.reshape(-1)}
        if train:
            dx = np.empty((n,) + self.input_shape, self.dtype)
            ws["dx"] = dx
            ws["dx_flat"] = dx.reshape(-1)
        return ws

    def _forward(self, x, ws, nt, train):
        getattr(_ew, self._kernels[0])(x.reshape(-1), ws["out_flat"], nt)
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        getattr(_ew, self._kernels[1])(g.reshape(-1), ws["out_flat"], ws["dx_flat"], nt)
        return ws["dx"]

    def to_onnx(self, graph, x):
        return graph.node(self.onnx_ops[0], [x], self)

    @classmethod
    def from_onnx(cls, node, reader):
        reader.attrs(node, {})
        return [cls()]

    def plan_forward(self, x, ws, train):
        flat = x.reshape(-1)
        k = _ew.ActivationForward(self.activation, flat, ws["out_flat"])
        return [Op(k.run, k.bind_input, flat.shape)], ws["out"]

    def plan_backward(self, g, x, ws, need_input_grad):
        if not need_input_grad:
            return [], None
        k = _ew.ActivationBackward(self.activation, g.reshape(-1), ws["out_flat"],
                                   ws["dx_flat"])
        return [Op(k.run)], ws["dx"]


class ReLU(_Elementwise):
    """f(x) = max(0, x); gradient 1 where the output is positive, else 0."""

    activation = "relu"
    names_source = False
    onnx_ops = ("Relu",)
    _kernels = ("relu_forward", "relu_backward")


class Sigmoid(_Elementwise):
    """σ(x) = 1 / (1 + e^{−x}); gradient σ(x)(1 − σ(x)), computed from the output."""

    activation = "sigmoid"
    onnx_ops = ("Sigmoid",)
    _kernels = ("sigmoid_forward", "sigmoid_backward")

    def flops(self):
        self._check_built("flops")
        return 4 * int(np.prod(self.output_shape))


class Tanh(_Elementwise):
    """tanh(x); gradient 1 − tanh(x)², computed from the output."""

    activation = "tanh"
    onnx_ops = ("Tanh",)
    _kernels = ("tanh_forward", "tanh_backward")

    def flops(self):
        self._check_built("flops")
        return 4 * int(np.prod(self.output_shape))


class LeakyReLU(_Elementwise):
    """f(x) = x for x > 0, else negative_slope · x; its backward reads the input."""

    activation = "leaky_relu"
    onnx_ops = ("LeakyRelu",)

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = negative_slope

    @property
    def negative_slope(self):
        return self._negative_slope

    @negative_slope.setter
    def negative_slope(self, value):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                or not np.isfinite(value):
            raise TypeError(f"LeakyReLU: negative_slope must be a finite number, got "
                            f"{value!r}")
        self._negative_slope = float(value)
        self._settings_changed()        # the plans hold it

    def get_config(self):
        return {"negative_slope": self.negative_slope}

    def describe(self):
        return f"LeakyReLU({self.negative_slope:g})"

    def to_onnx(self, graph, x):
        return graph.node("LeakyRelu", [x], self, alpha=self.negative_slope)

    @classmethod
    def from_onnx(cls, node, reader):
        return [cls(reader.attrs(node, {"alpha": 0.01})["alpha"])]

    def _forward(self, x, ws, nt, train):
        _ew.leaky_relu_forward(x.reshape(-1), ws["out_flat"], self.negative_slope, nt)
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        _ew.leaky_relu_backward(g.reshape(-1), x.reshape(-1), ws["dx_flat"],
                                self.negative_slope, nt)
        return ws["dx"]

    def plan_forward(self, x, ws, train):
        flat = x.reshape(-1)
        k = _ew.ActivationForward(self.activation, flat, ws["out_flat"], self.negative_slope)
        return [Op(k.run, k.bind_input, flat.shape)], ws["out"]

    def plan_backward(self, g, x, ws, need_input_grad):
        if not need_input_grad:
            return [], None
        op = CallOp(lambda xv, nt: self._backward(g, xv, ws, nt, True, 0.0), x)
        return [Op(op.run, op.bind_input, x.shape)], ws["dx"]
