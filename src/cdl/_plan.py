"""train_step's kernel calls for one batch size, bound to the layers' buffers once.

At batch 1 a layer's arithmetic takes a few microseconds, and calling a kernel
through its Python signature cost about as much again (every array checked
and converted, the dtype dispatched, the layer's bookkeeping). A plan makes
those calls once, as bound-call objects of the kernel modules; a step then
rebinds only the model's input and the targets and runs the list. It uses the
same kernels on the same buffers as Sequential's layer-by-layer passes, so
results are bit for bit the same (tests compare both). float32 models with
the built-in layers and losses get a plan; anything else runs layer by layer.
"""
import numpy as np

from ._kernels import conv as _conv
from ._kernels import dense as _dense
from ._kernels import elementwise as _ew
from ._kernels import losses as _kl
from ._kernels import pool as _pool
from .layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid
from .losses import MSE, MulticlassSVM, SoftmaxCrossEntropy

__all__ = ["supported", "supports_loss", "ForwardPlan", "TrainPlan"]

_LOSS_KINDS = {SoftmaxCrossEntropy: "softmax_cross_entropy", MulticlassSVM: "multiclass_svm",
               MSE: "mse"}
_ACTIVATIONS = {ReLU: "relu", Sigmoid: "sigmoid"}


def supported(model):
    """Whether ``model`` can run through a plan: float32, built-in layers, and an
    output that is not a view of the input (a model of Flatten layers only)."""
    return (model.dtype == np.float32
            and all(type(layer) in (Linear, Conv2d, MaxPool2d, ReLU, Sigmoid, Flatten)
                    for layer in model.layers)
            and not all(isinstance(layer, Flatten) for layer in model.layers))


def supports_loss(loss):
    """Whether a TrainPlan can compute ``loss`` (a built-in loss)."""
    return type(loss) in _LOSS_KINDS


def _conv_l2(layer):
    """run(nt, l2): 2*l2*W added to a Conv2d's dW by the call Conv2d._backward makes."""
    w, dw = layer.params["weight"].reshape(-1), layer.grads["weight"].reshape(-1)

    def run(nt, l2):
        if l2:
            _ew.axpy(2.0 * l2, w, dw, nt)
    return run


class ForwardPlan:
    """The forward passes of ``model`` for batch size ``n``, as bound calls.

    ``workspace(layer)`` gives each layer's buffers: the layer's own training
    workspace (TrainPlan) or fresh inference buffers (predict's plans, one set
    per thread). ``run(x, nt)`` returns the output buffer.
    """

    def __init__(self, model, n, workspace=None):
        self.n = n
        self._binders = []      # (op.bind_input, shape) of every op that reads the input
        self._forward = []      # run(num_threads)
        self._pools = []        # (layer, indices): MaxPool2d.indices after each step
        self._last = []         # (layer, ws, reads the input, input): state for backward
        self._saved = {}        # pass index -> (its input array, whether it is the model's)
        self._input = np.zeros((n,) + model.input_shape, np.float32)
        h, from_input = self._input, True
        for i, layer, fused in model._passes:
            ws = layer._alloc(n, False) if workspace is None else workspace(layer)
            self._saved[i] = (h, from_input)
            if isinstance(layer, Flatten):
                out = h.reshape(n, -1)
            else:
                op, bound = self._forward_op(layer, fused, h, ws)
                if from_input:
                    self._binders.append((op.bind_input, bound.shape))
                self._forward.append(op.run)
                out = ws["out"]
                if isinstance(layer, MaxPool2d):
                    self._pools.append((layer, ws["indices"]))
            self._last.append((layer, ws, from_input, h))
            if fused:
                self._last.append((model.layers[i - 1], None, False, None))
            h, from_input = out, from_input and isinstance(layer, Flatten)
        self.output = h

    @staticmethod
    def _forward_op(layer, fused, x, ws):
        """(bound call, the array it reads as input)."""
        if isinstance(layer, Linear):
            return _dense.LinearForward(x, layer.params["weight"], layer.params.get("bias"),
                                        ws["out"]), x
        if isinstance(layer, Conv2d):
            return _conv.ConvForward(x, layer.params["weight"], layer.params.get("bias"),
                                     ws["out"], layer.stride, layer.padding), x
        if isinstance(layer, MaxPool2d):
            if fused:
                return _pool.ReluMaxPoolForward(x, ws["out"], ws["indices"]), x
            return _pool.MaxPoolForward(x, ws["out"], ws["indices"], layer.kernel_size,
                                        layer.stride, layer.padding), x
        flat = x.reshape(-1)
        return _ew.ActivationForward(_ACTIVATIONS[type(layer)], flat, ws["out_flat"]), flat

    def run(self, x, nt):
        """The output of the forward passes on x (N, *input_shape, float32, C order)."""
        for bind, shape in self._binders:
            bind(x if x.shape == shape else x.reshape(shape))
        for run in self._forward:
            run(nt)
        return self.output


class TrainPlan(ForwardPlan):
    """Forward, loss and backward of ``model`` for batch size ``n`` with ``loss``, on
    the layers' own workspaces (so layer state after a step is as layer by layer)."""

    def __init__(self, model, n, loss):
        super().__init__(model, n, lambda layer: layer._workspace(n))
        self.loss = loss
        self._loss_config = self._config_of(loss)
        self._backward = []     # (run, takes_l2)
        kind = _LOSS_KINDS[type(loss)]
        scores = self.output
        self.grad, sample = loss._buffers(scores.shape, scores.dtype)
        scale = 1.0 / n if loss.reduction == "mean" else 1.0
        self._loss = _kl.LossForward(kind, scores, self.grad, sample, scale,
                                     getattr(loss, "margin", 0.0))

        g, stop = self.grad, model._first_trained
        for i, layer, fused in reversed(model._passes):
            if i < stop:
                break
            x, x_is_input = self._saved[i]
            ws = layer._ws[n]
            need_dx = i > stop
            if isinstance(layer, Flatten):
                g = g.reshape(x.shape)
                continue
            op, takes_l2 = self._backward_op(layer, fused, g, x, ws, need_dx)
            if op is None:
                g = None
                continue
            if x_is_input and isinstance(layer, (Linear, Conv2d)):
                # Their weight gradients read the input; no other backward does.
                self._binders.append((op.bind_input, x.shape))
            self._backward.append((op.run, takes_l2))
            if isinstance(layer, Conv2d):
                self._backward.append((_conv_l2(layer), True))
            g = ws.get("dx") if need_dx or fused else None

    @staticmethod
    def _config_of(loss):
        return (loss.reduction, getattr(loss, "margin", None))

    def fits(self, loss):
        """Whether this plan runs ``loss`` as it is configured now."""
        return loss is self.loss and self._config_of(loss) == self._loss_config

    @staticmethod
    def _backward_op(layer, fused, g, x, ws, need_dx):
        """(bound call, whether run takes l2); (None, False) when nothing is computed."""
        if isinstance(layer, Linear):
            return _dense.LinearBackward(g, x, layer.params["weight"],
                                         ws["dx"] if need_dx else None, layer.grads["weight"],
                                         layer.grads.get("bias")), True
        if isinstance(layer, Conv2d):
            return _conv.ConvBackward(g, x, layer.params["weight"],
                                      ws["dx"] if need_dx else None, layer.grads["weight"],
                                      layer.grads.get("bias"), layer.stride,
                                      layer.padding), False
        if isinstance(layer, MaxPool2d):
            if fused:
                return _pool.ReluMaxPoolBackward(g, ws["out"], ws["indices"], ws["dx"]), False
            if not need_dx:
                return None, False
            return _pool.MaxPoolBackward(g, ws["indices"], ws["dx"], layer.kernel_size,
                                         layer.stride, layer.padding), False
        if not need_dx:
            return None, False
        return _ew.ActivationBackward(_ACTIVATIONS[type(layer)], g.reshape(-1),
                                      ws["out_flat"], ws["dx_flat"]), False

    # -- running ---------------------------------------------------------------------
    def forward(self, x, y, nt):
        """Bind x (N, *input_shape, float32, C-contiguous) and the checked targets y,
        run the forward passes and the loss; returns the loss (without L2)."""
        if y.dtype == np.int64:
            self._loss.bind_labels(y)
        else:
            self._loss.bind_target(y)
        self.run(x, nt)
        for layer, indices in self._pools:
            layer.indices = indices
        for layer, ws, from_input, h in self._last:
            layer._last = None if ws is None else (x.reshape(h.shape) if from_input else h, ws)
        self.loss._grad = self.grad
        return self._loss.run(nt)

    def backward(self, nt, l2):
        """Gradients of every parameter (the model's input gets none)."""
        for run, takes_l2 in self._backward:
            if takes_l2:
                run(nt, l2)
            else:
                run(nt)
