"""Learning-rate schedules, as callbacks for ``fit``.

At the start of epoch e (counted from 0) each sets the optimizer's ``lr`` to
``schedule(e, base_lr)`` (``Optimizer.set_scheduled_lr``); ``base_lr`` is the lr the
optimizer was made with or last given by hand. They work with every optimizer.
"""
import math
import numbers

from ..callbacks import Callback
from .base import number

__all__ = ["StepLR", "ExponentialLR", "CosineLR"]


class _Schedule(Callback):
    def __call__(self, epoch, base_lr):
        raise NotImplementedError

    def on_train_begin(self, logs=None):
        self._base = self.optimizer.base_lr

    def on_epoch_begin(self, epoch, logs=None):
        self.optimizer.set_scheduled_lr(float(self(epoch, self._base)))


class StepLR(_Schedule):
    """lr_e = base_lr · γ^{floor(e / step_size)}."""

    def __init__(self, step_size, gamma=0.1):
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) or step_size < 1:
            raise ValueError(f"StepLR: step_size must be an int >= 1, got {step_size!r}")
        self.step_size = int(step_size)
        self.gamma = number(gamma, "gamma", "StepLR", lo=0.0, lo_open=True)

    def get_config(self):
        return {"step_size": self.step_size, "gamma": self.gamma}

    def __call__(self, epoch, base_lr):
        return base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(_Schedule):
    """lr_e = base_lr · γ^e."""

    def __init__(self, gamma):
        self.gamma = number(gamma, "gamma", "ExponentialLR", lo=0.0, lo_open=True)

    def get_config(self):
        return {"gamma": self.gamma}

    def __call__(self, epoch, base_lr):
        return base_lr * self.gamma ** epoch


class CosineLR(_Schedule):
    """lr_e = min_lr + ½ (base_lr − min_lr)(1 + cos(π · min(e, T) / T)), T = ``epochs``."""

    def __init__(self, epochs, min_lr=0.0):
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise ValueError(f"CosineLR: epochs must be an int >= 1, got {epochs!r}")
        self.epochs = int(epochs)
        self.min_lr = number(min_lr, "min_lr", "CosineLR", lo=0.0)

    def get_config(self):
        return {"epochs": self.epochs, "min_lr": self.min_lr}

    def __call__(self, epoch, base_lr):
        t = min(epoch, self.epochs) / self.epochs
        return self.min_lr + 0.5 * (base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t))
