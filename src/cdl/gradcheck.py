"""Numerical gradient check of a model: float64 central differences vs backward.

For every parameter element θ (and, with ``check_input``, every input element),
    g_num = (J(θ + ε) − J(θ − ε)) / (2ε),   J = loss(model(x), y) + λ Σ W²,
and each array's error is reported relative to its gradient's scale:
    err = max_i |g_i − g_num,i| / max(s, 1e-3 · S, 1e-12),   s = max_i |g_i| + max_i |g_num,i|,
S the largest s over the arrays checked (a per-element ratio would flag round-off on
elements whose gradient is ~0; the floor 1e-3 · S does so for a whole array whose
gradient is zero, such as a bias just before BatchNorm, whose central differences are
then round-off of J alone). A float32 model is checked through a float64 copy (same
weights), because float32 round-off swamps ε.
"""
import numpy as np

from . import _config

__all__ = ["gradcheck"]


def _float64_copy(model):
    from .layers import layer_from_spec
    from .model import Sequential

    if model.dtype == np.float64:
        return model
    cfg = model.get_config()
    layers = [layer_from_spec(s) for s in cfg["layers"]]
    clone = Sequential(layers, model.input_shape, dtype=np.float64, l2=model.l2)
    clone.load_state_dict(model.state_dict())
    for (path, a), (_, b) in zip(model.chain.walk(), clone.chain.walk()):
        b.set_extra_state(a.extra_state())
    return clone


def gradcheck(model, x, y, loss, eps=1e-6, max_checks=None, seed=0, check_input=True):
    """Relative error (see the module notes) per parameter key ("0.weight", ...; "input" for dL/dx).

    ``max_checks`` limits the elements tried per array (chosen at random with ``seed``);
    by default every element is checked.
    """
    m = _float64_copy(model)
    x = m._check_x(x, "gradcheck").copy()
    y = m._check_y(y, x.shape[0], loss, "gradcheck")
    nt = _config.step_threads()

    # The objective runs in training mode, as the backward does (BatchNorm's batch
    # statistics, the same Dropout masks); running statistics and generator positions
    # are put back after every pass.
    buffers = [(b, b.copy()) for _, b in m.buffers()]
    extra = [(layer, layer.extra_state()) for _, layer in m.chain.walk()]

    def restore():
        for b, saved in buffers:
            b[...] = saved
        for layer, e in extra:
            layer.set_extra_state(e)

    def objective():
        restore()
        scores = m._forward(x, nt).copy()
        return loss._compute(scores, y, nt, need_grad=False) + m.l2_penalty()

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
            flat[i] = old + eps
            jp = objective()
            flat[i] = old - eps
            jm = objective()
            flat[i] = old
            nums[t] = (jp - jm) / (2 * eps)
        a = ga[idx]
        scales[key] = np.abs(a).max(initial=0.0) + np.abs(nums).max(initial=0.0)
        diffs[key] = np.abs(a - nums).max(initial=0.0)
    floor = max(1e-3 * max(scales.values(), default=0.0), 1e-12)
    return {key: float(diffs[key] / max(scales[key], floor)) for key in diffs}
