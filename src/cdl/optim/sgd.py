"""SGD with momentum, Nesterov and weight decay (PyTorch's formulation).

``SGD(model, lr, momentum=μ, nesterov=False, weight_decay=0.0)``; ``step()``
updates every parameter in one kernel call over the model's flat buffers:
    g ← g + wd·W;   v ← μ v + g;   W ← W − lr · v   (or W ← W − lr · (g + μ v) with Nesterov)
Plain SGD (μ = 0) is W ← W − lr · g. The model's ``l2`` adds 2λW to the weight
gradients (and λ Σ W² to the loss); ``weight_decay`` applies to every parameter,
as PyTorch's does.
"""
import functools

import numpy as np

from .._kernels import elementwise as _ew
from ..functional._checks import flag
from .base import Optimizer, Setting, at_least_zero, number

__all__ = ["SGD"]


def _check_nesterov(opt, value):
    value = flag(value, "nesterov", "SGD")      # ("no" would count as True)
    if value and opt.momentum == 0.0:
        raise ValueError("SGD: nesterov=True needs momentum > 0")
    return value


class SGD(Optimizer):
    """Stochastic gradient descent over all parameters of ``model``."""

    fuses_finite_check = True
    nesterov = Setting(_check_nesterov)
    weight_decay = at_least_zero("weight_decay")

    def __init__(self, model, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                 clip_grad_norm=None):
        self._momentum = number(momentum, "momentum", "SGD", lo=0.0, hi=1.0, hi_open=True)
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.state_names = ("momentum_buffer",) if self._momentum > 0 else ()
        super().__init__(model, lr, clip_grad_norm)

    @property
    def momentum(self):
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        # Set after construction: the momentum buffer appears (from zero, as PyTorch's
        # first step v = g) or goes with it, so state_dict always matches the settings.
        value = number(value, "momentum", "SGD", lo=0.0, hi=1.0, hi_open=True)
        if value == 0.0 and self.nesterov:
            raise ValueError("SGD: nesterov=True needs momentum > 0 (set nesterov=False first)")
        self._momentum = value
        names = ("momentum_buffer",) if self._momentum > 0 else ()
        if names != self.state_names:
            self.state_names = names
            if self.pack.params is not None:
                self.buffers = {n: self.buffers[n] if n in self.buffers else self.pack.zeros()
                                for n in names}
                self._bind()

    def _setting_order(self, config):
        # nesterov off before momentum goes to 0; on after momentum is set
        keys = [k for k in config if k != "nesterov"]
        return (["nesterov"] + keys) if not config.get("nesterov") else (keys + ["nesterov"])

    def _bind(self):
        pack = self.pack
        bound = (pack.params, pack.grads, self.buffers.get("momentum_buffer"), pack.parts)
        # float32 binds the arrays once (a batch-1 step is short enough to notice).
        self._run = _ew.SGDChunks(*bound).run if pack.dtype == np.float32 else \
            functools.partial(_ew.sgd_update_chunks, *bound)

    def _update(self, nt, check_finite=False):
        return self._run(self.lr, self._momentum, self.nesterov, self.weight_decay, nt,
                         check_finite)

    @property
    def velocities(self):
        """{param name: its momentum buffer} (views; empty without momentum)."""
        flat = self.buffers.get("momentum_buffer")
        return {} if flat is None else {n: self.pack.view(flat, n) for n in self.pack.names}

    def get_config(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay, "clip_grad_norm": self.clip_grad_norm}
