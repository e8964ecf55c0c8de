"""Plans: a model's passes for one batch size as bound calls, made once.

At batch 1 a layer's arithmetic takes a few microseconds, and calling a kernel
through its Python signature cost about as much again (every array checked
and converted, the dtype dispatched, the layer's bookkeeping). A plan asks
each layer for its ops once (``plan_forward``/``plan_backward`` of the layer
protocol); a step then rebinds only the model's input and the targets and runs
the list (an inference plan binds its own input buffer back after each call, so
that it keeps no caller's array alive). The ops are the same kernels on the same
buffers as the layer-by-layer passes, so results are bit for bit the same (tests compare
both). float32 models get plans; float64 ones run layer by layer.
"""
import numpy as np

from ._kernels import losses as _kl
from .buffers import GradArena, nbytes_of
from .layers.base import Layer, inherits_builtin_plan
from .layers.chain import replay

__all__ = ["ForwardPlan", "TrainPlan", "supported", "supports_loss"]


def supported(model):
    """Whether ``model`` runs through plans: float32, and an output that is not a
    view of the input (a model of Flatten layers only, say)."""
    if model.dtype != np.float32:
        return False
    probe = ForwardPlan(model, 1)
    return not np.shares_memory(probe.output, probe._input)


def supports_loss(loss):
    """Whether a TrainPlan can compute ``loss`` (a built-in loss class, not a subclass)."""
    return type(loss).__dict__.get("plan_kind") is not None


class ForwardPlan:
    """The forward passes of ``model`` for batch size ``n``, as bound calls.

    ``workspace(layer)`` gives each layer's buffers: the layer's own training
    workspace (TrainPlan) or fresh inference buffers (predict's plans, one set
    per thread). ``run(x, nt)`` returns the output buffer.
    """

    def __init__(self, model, n, workspace=None, train=False):
        self.n = n
        self._input = np.zeros((n,) + model.input_shape, np.float32)
        spaces = []
        if workspace is None:
            def workspace(layer):
                spaces.append(layer._alloc(n, False))
                return spaces[-1]
        ops, self.output, self._trace = model.chain.plan_forward(self._input, workspace, train)
        # the buffers this plan allocated (what predict's runner pool counts)
        self.nbytes = nbytes_of([self._input, *spaces])
        self._binders = [(op.bind, op.shape) for op in ops if op.bind is not None]
        self._forward = [op.run for op in ops]

    def _bind(self, x):
        for bind, shape in self._binders:
            bind(x if x.shape == shape else x.reshape(shape))

    def _forward_on(self, x, nt):
        self._bind(x)
        for run in self._forward:
            run(nt)

    def run(self, x, nt):
        """The output of the forward passes on x (N, *input_shape, float32, C order).

        The ops read x during the call only: they are bound back to the plan's own
        input after it, so a plan kept by predict's pool does not keep the caller's
        x alive (the output is never a view of x: see ``supported``)."""
        try:
            self._forward_on(x, nt)
        finally:
            self._bind(self._input)
        return self.output


class TrainPlan(ForwardPlan):
    """Forward, loss and backward of ``model`` for batch size ``n`` with ``loss``, on
    the layers' own workspaces (so layer state after a step is as layer by layer)."""

    def __init__(self, model, n, loss):
        super().__init__(model, n, lambda layer: layer._workspace(n), train=True)
        self.loss = loss
        self._loss_config = self._config_of(loss)
        scores = self.output
        # buffers of its own, not the loss object's: one loss may serve several models
        self.grad = np.empty(scores.shape, scores.dtype)
        sample = np.empty(scores.shape[0], np.float64)
        scale = 1.0 / n if loss.reduction == "mean" else 1.0
        self._loss = _kl.LossForward(type(loss).plan_kind, scores, self.grad, sample, scale,
                                     getattr(loss, "margin", 0.0))
        self._arena = GradArena()
        ops, _ = model.chain.plan_backward(self.grad, self._trace, False, arena=self._arena)
        self._binders += [(op.bind, op.shape) for op in ops if op.bind is not None]
        self._backward = [(op.run, op.takes_l2) for op in ops]
        # State the layers keep after a step: plain (layer, ws, input) for most, a
        # replay for layers that keep more (pool indices, a Residual's inner passes).
        self._last, self._hooked = [], []
        for entry in self._trace:
            _, layer, ws, h, from_input = entry
            if type(layer).on_train_forward is not Layer.on_train_forward and \
                    not inherits_builtin_plan(layer):
                self._hooked.append(entry)
            else:
                self._last.append((layer, ws, from_input, h))
        self._absorbed = list(model.chain.absorbed)

    @staticmethod
    def _config_of(loss):
        return (loss.reduction, getattr(loss, "margin", None))

    def fits(self, loss):
        """Whether this plan runs ``loss`` as it is configured now."""
        return loss is self.loss and self._config_of(loss) == self._loss_config

    def forward(self, x, y, nt):
        """Bind x (N, *input_shape, float32, C-contiguous) and the checked targets y,
        run the forward passes and the loss; returns the loss (without L2)."""
        if y.dtype == np.int64:
            self._loss.bind_labels(y)
        else:
            self._loss.bind_target(y)
        self._forward_on(x, nt)       # x stays bound: the backward passes read it
        for layer, ws, from_input, h in self._last:
            layer._last = (x.reshape(h.shape) if from_input else h, ws)
        if self._hooked:
            replay(self._hooked, x)
        for layer in self._absorbed:
            layer._last = None
        self.loss._grad = self.grad
        return self._loss.run(nt)

    def backward(self, nt, l2):
        """Gradients of every parameter (the model's input gets none)."""
        for run, takes_l2 in self._backward:
            if takes_l2:
                run(nt, l2)
            else:
                run(nt)
