"""Adam and AdamW, with PyTorch's update formulas (bias correction included).

For step t with gradient g (Adam adds weight_decay·W to g; AdamW first scales
W by 1 − lr·weight_decay):
    m ← m + (1 − β1)(g − m);   v ← β2 v + (1 − β2) g²
    W ← W − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)
One kernel call over the model's flat buffers per step.
"""
import functools

import numpy as np

from .._kernels import elementwise as _ew
from .base import Optimizer, Setting, at_least_zero, number

__all__ = ["Adam", "AdamW"]


def _check_betas(opt, betas):
    where = type(opt).__name__
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"{where}: betas must be a pair of numbers in [0, 1), got "
                        f"{betas!r}") from None
    return (number(b1, "betas[0]", where, lo=0.0, hi=1.0, hi_open=True),
            number(b2, "betas[1]", where, lo=0.0, hi=1.0, hi_open=True))


class Adam(Optimizer):
    """``Adam(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)``."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False
    fuses_finite_check = True
    betas = Setting(_check_betas)
    eps = Setting(lambda opt, v: number(v, "eps", type(opt).__name__, lo=0.0, lo_open=True))
    weight_decay = at_least_zero("weight_decay")

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 clip_grad_norm=None):
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        super().__init__(model, lr, clip_grad_norm)

    def _bind(self):
        pack = self.pack
        bound = (pack.params, pack.grads, self.buffers["exp_avg"], self.buffers["exp_avg_sq"],
                 pack.parts)
        self._run = _ew.AdamChunks(*bound).run if pack.dtype == np.float32 else \
            functools.partial(_ew.adam_update_chunks, *bound)

    def _update(self, nt, check_finite=False):
        b1, b2 = self.betas
        return self._run(self.lr, b1, b2, self.eps, self.weight_decay, self.decoupled,
                         self.steps, nt, check_finite)

    def get_config(self):
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "clip_grad_norm": self.clip_grad_norm}


class AdamW(Adam):
    """``AdamW(model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)``:
    Adam with decoupled weight decay (Loshchilov & Hutter)."""

    decoupled = True

    def __init__(self, model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                 clip_grad_norm=None):
        super().__init__(model, lr, betas, eps, weight_decay, clip_grad_norm)
