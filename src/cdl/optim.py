"""SGD with momentum / Nesterov, and learning-rate schedules.

``SGD(model, lr, momentum=μ, nesterov=False)``; ``step()`` updates every
parameter in place with the compiled kernel (PyTorch's formulation):
    v ← μ v + g;   W ← W − lr · v           (or W ← W − lr · (g + μ v) with Nesterov)
Plain SGD (μ = 0) is W ← W − lr · g. L2 regularisation is set on the model
(``Sequential(..., l2=λ)``), which adds 2λW to the weight gradients, not here.

Schedules are callbacks: pass them to ``fit(callbacks=[...])``; at the start of
epoch e (counted from 0) each sets ``optimizer.lr = schedule(e, base_lr)``.
"""
import functools
import math
import numbers

import numpy as np

from . import _config
from ._kernels import elementwise as _ew
from .callbacks import Callback

__all__ = ["SGD", "StepLR", "ExponentialLR", "CosineLR"]


def _number(value, name, where, lo=None, lo_open=False, hi=None, hi_open=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v >= hi if hi_open else v > hi
    if bad:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"{where}: {name} must be a finite number in {rng}, got {value!r}")
    return v


class SGD:
    """Stochastic gradient descent over all parameters of ``model``."""

    def __init__(self, model, lr, momentum=0.0, nesterov=False):
        self.lr = _number(lr, "lr", "SGD", lo=0.0, lo_open=True)
        self.momentum = _number(momentum, "momentum", "SGD", lo=0.0, hi=1.0, hi_open=True)
        if nesterov and self.momentum == 0.0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        self.nesterov = bool(nesterov)
        if not callable(getattr(model, "parameters", None)):
            raise TypeError(f"SGD: model must be a cdl.Sequential, got {type(model).__name__}")
        self.model = model
        self.base_lr = self.lr
        self.velocities = {}
        flat_p, flat_g = getattr(model, "_flat_params", None), getattr(model, "_flat_grads", None)
        if flat_p is not None:
            # One kernel call for the whole model; velocities are views of one buffer
            # laid out like the parameters (gaps included, which stay zero).
            flat_v = np.zeros_like(flat_p) if self.momentum > 0 else None
            bound = (flat_p, flat_g, flat_v, model._sgd_parts)
            # float32 binds the arrays once (a batch-1 step is short enough to notice).
            self._update = _ew.SGDChunks(*bound).run if flat_p.dtype == np.float32 else \
                functools.partial(_ew.sgd_update_chunks, *bound)
            if flat_v is not None:
                base = flat_p.ctypes.data
                for key, p, _ in model.parameters():
                    start = (p.ctypes.data - base) // p.itemsize
                    self.velocities[key] = flat_v[start:start + p.size].reshape(p.shape)
            return
        self._update = None
        self._slots = []
        for key, p, g in model.parameters():
            v = np.zeros_like(p) if self.momentum > 0 else None
            if v is not None:
                self.velocities[key] = v
            self._slots.append((p.reshape(-1), g.reshape(-1), None if v is None else v.reshape(-1)))

    def step(self, threads=None):
        """One update of every parameter from its current gradient."""
        nt = threads or _config.get_num_threads()
        lr, mu, nest = self.lr, self.momentum, self.nesterov
        if self._update is not None:
            self._update(lr, mu, nest, nt)
            return
        for p, g, v in self._slots:
            _ew.sgd_update(p, g, v, lr, mu, nest, 0.0, nt)

    def get_config(self):
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov}

    def __repr__(self):
        return f"SGD(lr={self.lr!r}, momentum={self.momentum!r}, nesterov={self.nesterov!r})"


class _Schedule(Callback):
    def __call__(self, epoch, base_lr):
        raise NotImplementedError

    def on_train_begin(self, logs=None):
        self._base = self.optimizer.base_lr

    def on_epoch_begin(self, epoch, logs=None):
        self.optimizer.lr = float(self(epoch, self._base))


class StepLR(_Schedule):
    """lr_e = base_lr · γ^{floor(e / step_size)}."""

    def __init__(self, step_size, gamma=0.1):
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) or step_size < 1:
            raise ValueError(f"StepLR: step_size must be an int >= 1, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = _number(gamma, "gamma", "StepLR", lo=0.0, lo_open=True)

    def __call__(self, epoch, base_lr):
        return base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(_Schedule):
    """lr_e = base_lr · γ^e."""

    def __init__(self, gamma):
        self.gamma = _number(gamma, "gamma", "ExponentialLR", lo=0.0, lo_open=True)

    def __call__(self, epoch, base_lr):
        return base_lr * self.gamma ** epoch


class CosineLR(_Schedule):
    """lr_e = min_lr + ½ (base_lr − min_lr)(1 + cos(π · min(e, T) / T)), T = ``epochs``."""

    def __init__(self, epochs, min_lr=0.0):
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"CosineLR: epochs must be an int >= 1, got {epochs!r}")
        self.epochs = int(epochs)
        self.min_lr = _number(min_lr, "min_lr", "CosineLR", lo=0.0)

    def __call__(self, epoch, base_lr):
        t = min(epoch, self.epochs) / self.epochs
        return self.min_lr + 0.5 * (base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))
