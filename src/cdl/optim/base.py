"""The optimizer base class: an update of the model's flat parameter pack.

An optimizer works on the public :class:`cdl.params.ParameterPack` of its model:
one kernel call updates every parameter. Its per-parameter state (momentum
buffers, Adam's moments) lives in flat buffers laid out like the pack, and
``state_dict()`` gives it with the step count and settings; model files store
it (``model.save(path, optimizer)``).

Every optimizer takes ``clip_grad_norm``: before the update, all gradients are
scaled by max_norm / (‖g‖ + 1e-6) when the global L2 norm ‖g‖ exceeds
max_norm (as ``torch.nn.utils.clip_grad_norm_``).
"""
import math
import numbers

import numpy as np

from .. import _config
from .._kernels import elementwise as _ew
from .._kernels import losses as _kl
from .._registry import register
from ..functional._checks import overflows, shape_str

__all__ = ["Optimizer", "OPTIMIZER_TYPES"]

OPTIMIZER_TYPES = {}
"""Every Optimizer subclass by its ``type_name`` (what model files and pickles may name)."""

# Step counts beyond this are refused (Adam's bias correction takes the count as a C
# long; 2**53 steps are far beyond any run).
MAX_STEPS = 2**53


def number(value, name, where, lo=None, lo_open=False, hi=None, hi_open=False):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: {name} must be a number, got {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if lo is not None:
        bad |= v <= lo if lo_open else v < lo
    if hi is not None:
        bad |= v >= hi if hi_open else v > hi
    if bad:
        rng = (f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}"
               f"{')' if hi_open or hi is None else ']'}")
        raise ValueError(f"{where}: {name} must be a finite number in {rng}, got {value!r}")
    return v


class Setting:
    """A setting (of an optimizer, or a loss) checked on every assignment as the
    constructor checks it: a value the constructor refuses would train, then make the
    optimizer's state and files unloadable (or train a loss silently otherwise).
    ``check(owner, value)`` returns the value to keep or raises."""

    def __init__(self, check):
        self.check = check

    def __set_name__(self, owner, name):
        self.attr = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(obj, self.attr)

    def __set__(self, obj, value):
        setattr(obj, self.attr, self.check(obj, value))


def positive_or_none(name):
    return Setting(lambda opt, v: None if v is None else
                   number(v, name, type(opt).__name__, lo=0.0, lo_open=True))


def at_least_zero(name):
    return Setting(lambda opt, v: number(v, name, type(opt).__name__, lo=0.0))


def _check_steps(opt, value, name="steps", where=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value <= MAX_STEPS:
        raise ValueError(f"{where or type(opt).__name__}: {name} must be an int in "
                         f"[0, 2**53], got {value!r}")
    return int(value)


# What train_step's fused route (Optimizer._step_if_finite) would bypass.
_STEP_METHODS = ("step", "clip_gradients", "_update")


def fuses_finite_check(optimizer):
    """Whether ``train_step`` may leave the finite-gradient check to
    ``optimizer._step_if_finite``: its class says so, and no attribute of the instance
    replaces ``step``, ``clip_gradients`` or ``_update``."""
    return bool(getattr(optimizer, "fuses_finite_check", False)) and not any(
        name in getattr(optimizer, "__dict__", {}) for name in _STEP_METHODS)


class Optimizer:
    """Base class. Subclasses name their per-parameter ``state_names`` and implement
    ``_bind()`` (make the update call once) and ``_update(nt)``. Every public subclass
    is registered in ``OPTIMIZER_TYPES`` under its ``type_name`` when it is defined."""

    state_names = ()
    type_name = "Optimizer"
    fuses_finite_check = False
    """Whether ``_step_if_finite`` checks the gradients itself (SGD and Adam in their
    update kernel, through ``_update(nt, check_finite=True)``, which returns whether it
    updated): ``train_step`` and ``fit`` then leave that check to it, saving a pass over
    them, where they would otherwise check and call ``step``. A subclass that overrides
    ``step``, ``clip_gradients`` or ``_update`` (itself or through a mixin) gets False, so
    its methods run as written, unless it sets this itself; so does an instance whose
    own attributes replace one of them (:func:`fuses_finite_check`)."""
    clip_grad_norm = positive_or_none("clip_grad_norm")
    base_lr = at_least_zero("base_lr")
    steps = Setting(_check_steps)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__     # (what files record; register may qualify it)
        if "fuses_finite_check" not in cls.__dict__:
            # (methods resolved through the whole MRO: a mixin's override counts too)
            setter = next(c for c in cls.__mro__ if "fuses_finite_check" in c.__dict__)
            if any(getattr(cls, name) is not getattr(setter, name) for name in _STEP_METHODS):
                cls.fuses_finite_check = False
        if not cls.__name__.startswith("_"):
            register(OPTIMIZER_TYPES, cls)    # as layers are (cdl._registry)

    def __init__(self, model, lr, clip_grad_norm=None):
        where = type(self).__name__
        if getattr(model, "parameter_pack", None) is None:
            raise TypeError(f"{where}: model must be a cdl.Sequential, got "
                            f"{type(model).__name__}")
        self.lr = lr                # (also the schedules' base_lr)
        self.clip_grad_norm = clip_grad_norm
        self.model = model
        self.pack = model.parameter_pack
        self.steps = 0
        self.buffers = {}
        if self.pack.params is not None:
            self.buffers = {name: self.pack.zeros() for name in self.state_names}
            self._bind()

    @property
    def lr(self):
        """The learning rate of the next step. Set by hand, it is also ``base_lr``, the
        value learning-rate schedules start from (as for a PyTorch scheduler made after
        the change); the schedules' own per-epoch values leave ``base_lr`` alone."""
        return self._lr

    @lr.setter
    def lr(self, value):
        self.set_scheduled_lr(value)
        self.base_lr = self._lr

    def set_scheduled_lr(self, value):
        """Set ``lr`` for a schedule's epoch, keeping ``base_lr``. An lr is a finite
        number >= 0, as in PyTorch (0: a cosine schedule's end)."""
        self._lr = number(value, "lr", type(self).__name__, lo=0.0)

    def _setting_order(self, config):
        """The order in which load_state_dict applies ``config``'s settings."""
        return list(config)

    def _bind(self):
        raise NotImplementedError

    def _update(self, nt):
        raise NotImplementedError

    def step(self, threads=None):
        """One update of every parameter from its current gradient."""
        nt = _config.fork_safe_threads(threads) if threads else _config.step_threads()
        self._steps += 1            # (the step count, unchecked on the hot path)
        if self.pack.params is None:
            return
        if self.clip_grad_norm is not None:
            self.clip_gradients(self.clip_grad_norm, nt)
        self._update(nt)

    def gradient_hook(self, loss_value, batch_size, threads=None):
        """The gradient hook: ``train_step`` and ``fit`` call it on every step, between
        the backward pass and :meth:`step`, also when the loss is not finite (the
        gradients are then stale: nothing was back-propagated). ``batch_size`` is the
        number of samples the gradients come from. The step runs only when the value
        returned is finite.

        The base class returns ``loss_value`` unchanged (so a plain optimizer trains
        exactly as before). :class:`cdl.distributed.DistributedOptimizer` overrides it:
        it averages the gradients of all ranks and returns the global loss, or NaN on
        every rank when the step must be skipped. A subclass may change the gradients
        in place here (clip, add noise, log a norm) as long as it returns a loss value.
        """
        return loss_value

    def _step_if_finite(self, nt):
        """``step`` for ``train_step`` and ``fit`` where ``fuses_finite_check``: nothing
        changes (the step count included) and False is returned when a gradient is NaN
        or infinite."""
        if self.pack.params is None:
            self._steps += 1
            return True
        check = True
        if self.clip_grad_norm is not None:
            grads = self.pack.grads
            norm = math.sqrt(_kl.sum_squares(grads))
            # A finite norm means finite gradients; an infinite one may also be the
            # overflow of large finite float64 ones, which the old order clipped.
            if not math.isfinite(norm) and not _ew.all_finite(grads, nt):
                return False
            self._clip_to(grads, norm, self.clip_grad_norm, nt)
            check = False
        self._steps += 1
        if self._update(nt, check):
            return True
        self._steps -= 1
        return False

    def clip_gradients(self, max_norm, nt=None):
        """Scale every gradient by max_norm / (‖g‖ + 1e-6) if the global norm ‖g‖ is
        larger; returns ‖g‖ before clipping."""
        grads = self.pack.grads
        if grads is None:
            return 0.0
        norm = math.sqrt(_kl.sum_squares(grads))
        self._clip_to(grads, norm, max_norm, nt)
        return norm

    @staticmethod
    def _clip_to(grads, norm, max_norm, nt):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            _ew.scale(grads, coef, nt or _config.step_threads())

    # -- pickling --------------------------------------------------------------------
    def __reduce__(self):
        # The optimizer carries its model object (pickled through the safe model format,
        # see Sequential.__reduce__) and its state as plain bytes. Pickle memoizes the
        # model: a pickled (model, optimizer) gives an optimizer bound to the unpickled
        # model, and an optimizer pickled alone brings its own copy of the model.
        # Unpickling builds only registered optimizer types.
        state = self.state_dict()
        packed = {b: {k: (a.dtype.str, list(a.shape), a.tobytes()) for k, a in per.items()}
                  for b, per in state["state"].items()}
        spec = {"type": state["type"], "config": state["config"], "base_lr": state["base_lr"],
                "step": state["step"], "state": packed}
        return _rebuild_optimizer, (self.model, spec)

    # -- state ---------------------------------------------------------------------
    def get_config(self):
        return {"lr": self.lr, "clip_grad_norm": self.clip_grad_norm}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def state_dict(self):
        """{"type", "config", "base_lr", "step", "state": {buffer name: {param name:
        array}}}: everything needed to resume (arrays are copies)."""
        state = {b: {name: self.pack.view(flat, name).copy() for name in self.pack.names}
                 for b, flat in self.buffers.items()}
        return {"type": self.type_name, "config": self.get_config(),
                "base_lr": self.base_lr, "step": self.steps, "state": state}

    def load_state_dict(self, state, where=None):
        """Load what ``state_dict`` gave: the settings (as ``torch.optim`` does), the
        step count, ``base_lr`` and the per-parameter state. Everything is checked
        before anything changes."""
        where = where or f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{where}: expected a dict, got {type(state).__name__}")
        if state.get("type", self.type_name) != self.type_name:
            raise ValueError(f"{where}: the state is of a {state.get('type')}, not a "
                             f"{self.type_name}")
        # Settings other than this optimizer's are checked by building one from them
        # (get_config gives constructor arguments); they are set once all else passed.
        config = state.get("config")
        settings = self
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"{where}: 'config' must be a dict of settings")
        if config is not None and config != self.get_config():
            try:
                settings = type(self)(self.model, **config)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{where}: bad optimizer settings: {exc}") from None
        step = _check_steps(self, state.get("step", 0), "step", where)
        base_lr = self.base_lr
        if "base_lr" in state:
            base_lr = number(state["base_lr"], "base_lr", where, lo=0.0)
        arrays = state.get("state", {})
        problems, values = [], []
        if not isinstance(arrays, dict):
            raise ValueError(f"{where}: 'state' must be a dict")
        extra = sorted(set(arrays) - set(settings.buffers))
        if extra:
            problems.append(f"unexpected state {extra}")
        for b in settings.buffers:
            per = arrays.get(b)
            if per is None:
                problems.append(f"missing state {b!r}")
                continue
            if not isinstance(per, dict):
                problems.append(f"state {b!r} is not a dict of arrays")
                continue
            missing = sorted(set(self.pack.names) - set(per))
            unexpected = sorted(set(per) - set(self.pack.names))
            if missing or unexpected:
                problems.append(f"state {b!r}: missing {missing}, unexpected {unexpected}")
                continue
            for name in self.pack.names:
                a = np.asarray(per[name])
                if a.shape != self.pack.shapes[name] or a.dtype.kind not in "fiu":
                    problems.append(f"{b}[{name}] is {a.dtype} {shape_str(a.shape)}, needs "
                                    f"{shape_str(self.pack.shapes[name])}")
                elif overflows(a, self.pack.dtype):     # (a float64 state into float32)
                    problems.append(f"{b}[{name}] overflows {self.pack.dtype}")
                else:
                    values.append((b, name, a))
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        if settings is not self:
            for key in self._setting_order(config):   # (SGD's momentum setter adds or
                setattr(self, key, getattr(settings, key))    # drops its buffer)
        for b, name, a in values:
            self.pack.view(self.buffers[b], name)[...] = a
        self.steps = int(step)
        self.base_lr = base_lr


def _rebuild_optimizer(model, spec):
    """What pickle calls to rebuild an optimizer (see Optimizer.__reduce__)."""
    where = "cdl: unpickling an optimizer"
    if not isinstance(spec, dict) or spec.get("type") not in OPTIMIZER_TYPES \
            or not isinstance(spec.get("config"), dict) or not isinstance(spec.get("state"), dict):
        raise ValueError(f"{where}: malformed or unknown optimizer")
    opt = OPTIMIZER_TYPES[spec["type"]](model, **spec["config"])
    state = {}
    for b, per in spec["state"].items():
        if not isinstance(per, dict):
            raise ValueError(f"{where}: malformed state {b!r}")
        state[b] = {}
        for k, packed in per.items():
            try:
                dtype, shape, raw = packed
                dtype = np.dtype(dtype)
                if dtype.kind != "f" or len(raw) != int(np.prod(shape)) * dtype.itemsize:
                    raise ValueError("size mismatch")
                state[b][k] = np.frombuffer(raw, dtype).reshape(shape)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: malformed state {b}[{k}] ({exc})") from None
    opt.load_state_dict({"type": spec["type"], "step": spec.get("step", 0),
                         "base_lr": spec.get("base_lr", opt.lr), "state": state}, where=where)
    return opt
