"""Numerical gradient check of a model: float64 central differences vs backward.

For every parameter element θ (and, with ``check_input``, every input element),
    g_num = (J(θ + ε) − J(θ − ε)) / (2ε),   J = loss(model(x), y) + λ Σ W²,
and each array's error is reported relative to its gradient's scale:
    err = max_i |g_i − g_num,i| / max(s, 1e-3 · S, 1e-12),   s = max_i |g_i| + max_i |g_num,i|,
S the largest s over the arrays checked (a per-element ratio would flag round-off on
elements whose gradient is ~0; the floor 1e-3 · S does so for a whole array whose
gradient is zero, such as a bias just before BatchNorm, whose central differences are
then round-off of J alone). The check runs on a float64 copy of the model (same weights,
buffers and extra state): float32 round-off would swamp ε, and the model itself (its
pending forward and gradients, another thread's training of it) is left alone. A
float64 model that cannot be copied (a layer without ``get_config``) is checked in
place, under its training lock.
"""
import copy

import numpy as np

from . import _config

__all__ = ["gradcheck"]


def _float64_copy(model):
    """A float64 twin of ``model`` (same weights, buffers and extra state), taken under
    the model's training lock: the check runs on the twin, so the model (a float64 one
    too: its pending forward, its gradients) and another thread's training of it are
    left alone."""
    from .layers import layer_from_spec
    from .model import Sequential

    model._enter("gradcheck")
    try:
        cfg = model.get_config()
        state = model.state_dict()
        extra = [layer.extra_state() for _, layer in model.chain.walk()]
    finally:
        model._lock.release()
    layers = [layer_from_spec(s) for s in cfg["layers"]]
    clone = Sequential(layers, model.input_shape, dtype=np.float64, l2=model.l2)
    clone.load_state_dict(state)
    for (_, b), e in zip(clone.chain.walk(), extra):
        b.set_extra_state(e)
    return clone


def _check_args(model, loss, eps, max_checks, seed, check_input):
    """Everything gradcheck takes, checked before it runs anything (TypeError/ValueError)."""
    from .functional._checks import int_at_least, real_number
    from .model import Sequential

    where = "gradcheck"
    if not isinstance(model, Sequential):
        raise TypeError(f"{where}: model must be a cdl.Sequential, got {type(model).__name__}")
    model._check_loss(loss, where)
    eps = real_number(eps, "eps", where)
    if eps <= 0:
        raise ValueError(f"{where}: eps must be a finite number > 0, got {eps!r}")
    if max_checks is not None:
        # 0 would check nothing and report every error as 0.0: a pass that means nothing
        max_checks = int_at_least(max_checks, "max_checks", where, 1)
    if seed is not None:
        seed = int_at_least(seed, "seed", where, 0)
    if not isinstance(check_input, (bool, np.bool_)):
        raise TypeError(f"{where}: check_input must be True or False, got {check_input!r}")
    return eps, max_checks, seed


def gradcheck(model, x, y, loss, eps=1e-6, max_checks=None, seed=0, check_input=True):
    """Relative error (see the module notes) per parameter key ("0.weight", ...; "input" for dL/dx).

    ``eps`` (> 0) is the step of the central differences. ``max_checks`` (None or >= 1)
    limits the elements tried per array (chosen at random with ``seed``); by default
    every element is checked. The model is left as it was: weights, gradients, buffers
    (BatchNorm's running statistics) and extra state (Dropout's generator position).
    """
    eps, max_checks, seed = _check_args(model, loss, eps, max_checks, seed, check_input)
    loss = copy.deepcopy(loss)      # (its own buffers: a pending loss.forward is kept)
    try:
        m = _float64_copy(model)
    except TypeError:
        if model.dtype != np.float64:
            raise
        # a float64 model that cannot be rebuilt (a layer without get_config): checked in
        # place, under its training lock; its next backward needs a forward of its own
        model._enter("gradcheck")
        try:
            return _gradcheck(model, x, y, loss, eps, max_checks, seed, check_input)
        finally:
            model._last_n = None
            model._lock.release()
    return _gradcheck(m, x, y, loss, eps, max_checks, seed, check_input)


def _gradcheck(m, x, y, loss, eps, max_checks, seed, check_input):
    x = m._check_x(x, "gradcheck").copy()
    if x.shape[0] == 0:
        raise ValueError("gradcheck: x is an empty batch")
    y = m._check_y(y, x.shape[0], loss, "gradcheck")
    nt = _config.step_threads()

    # The objective runs in training mode, as the backward does (BatchNorm's batch
    # statistics, the same Dropout masks); running statistics and generator positions
    # are put back before every pass and once more at the end.
    buffers = [(b, b.copy()) for _, b in m.buffers()]
    extra = [(layer, layer.extra_state()) for _, layer in m.chain.walk()]
    grads = m.gradient_buffer
    saved_grads = None if grads is None else grads.copy()

    def restore():
        for b, saved in buffers:
            b[...] = saved
        for layer, e in extra:
            layer.set_extra_state(e)

    def objective():
        restore()
        scores = m._forward(x, nt).copy()
        return loss._compute(scores, y, nt, need_grad=False) + m.l2_penalty()

    try:
        scores = m._forward(x, nt)
        loss._compute(scores, y, nt)
        restore()
        g = loss._grad.copy()
        dx = m.backward(g)
        analytic = {k: gr.copy() for k, _, gr in m.parameters()}
        arrays = {k: p for k, p, _ in m.parameters()}
        if check_input:
            analytic["input"] = dx
            arrays["input"] = x
        rng = np.random.default_rng(seed)
        diffs, scales = {}, {}
        for key, a in arrays.items():
            flat = a.reshape(-1)
            idx = np.arange(flat.size)
            if max_checks is not None and flat.size > max_checks:
                idx = rng.choice(flat.size, max_checks, replace=False)
            ga = analytic[key].reshape(-1)
            nums = np.empty(len(idx))
            for t, i in enumerate(idx):
                old = flat[i]
                try:
                    flat[i] = old + eps
                    jp = objective()
                    flat[i] = old - eps
                    jm = objective()
                finally:
                    flat[i] = old       # the weight exactly as it was, even after an error
                nums[t] = (jp - jm) / (2 * eps)
            a = ga[idx]
            scales[key] = np.abs(a).max(initial=0.0) + np.abs(nums).max(initial=0.0)
            diffs[key] = np.abs(a - nums).max(initial=0.0)
    finally:
        restore()
        if grads is not None:
            grads[...] = saved_grads
    floor = max(1e-3 * max(scales.values(), default=0.0), 1e-12)
    return {key: float(diffs[key] / max(scales[key], floor)) for key in diffs}
