"""Callbacks for ``Sequential.fit``: History, EarlyStopping, ModelCheckpoint.

A callback gets ``model`` and ``optimizer`` set before training and may set
``model.stop_training = True`` to end training after the current epoch.
Epochs are counted from 0 in the calls and from 1 in messages.
"""
import math
import os
import warnings
import weakref

from .functional._checks import int_at_least, real_number

__all__ = ["Callback", "History", "EarlyStopping", "ModelCheckpoint"]


class Callback:
    """Base class. ``model`` and ``optimizer`` are held through weak references, so
    a History or callback kept after training does not keep a dropped model (and its
    buffers) alive."""

    _model_ref = None
    _optimizer_ref = None
    rank = 0
    """This process's rank in a distributed ``fit`` (set by fit; 0 otherwise): a
    callback that writes files or prints should do so where ``rank == 0``."""
    log_keys = ()
    """The keys every epoch's logs will hold (set by fit before ``on_train_begin``), so
    that a callback can check what it will ask of them before the first epoch."""

    @property
    def model(self):
        return None if self._model_ref is None else self._model_ref()

    @model.setter
    def model(self, value):
        self._model_ref = None if value is None else weakref.ref(value)

    @property
    def optimizer(self):
        return None if self._optimizer_ref is None else self._optimizer_ref()

    @optimizer.setter
    def optimizer(self, value):
        self._optimizer_ref = None if value is None else weakref.ref(value)

    def get_config(self):
        """The callback's settings (its constructor arguments), as its repr shows them."""
        return {}

    def __repr__(self):
        # A user subclass whose get_config reads attributes it does not set, or returns
        # something else than a dict, still has a repr (one must never raise).
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        except Exception:
            return object.__repr__(self)
        return f"{type(self).__name__}({args})"

    def set_context(self, model, optimizer):
        self.model = model
        self.optimizer = optimizer

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


class History(Callback):
    """Per-epoch metrics: ``history.history["loss"]`` etc. (also ``history["loss"]``).

    Keys: loss, accuracy, val_loss, val_accuracy (when there is validation data),
    lr, seconds. ``stop_reason`` says why training ended early (None otherwise).
    """

    def __init__(self):
        self.history = {}
        self.epochs = []
        self.stop_reason = None

    def on_train_begin(self, logs=None):
        self.history = {}
        self.epochs = []
        self.stop_reason = None

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)

    def __getitem__(self, key):
        return self.history[key]

    def __contains__(self, key):
        return key in self.history

    def __repr__(self):
        return f"History(epochs={len(self.epochs)}, keys={sorted(self.history)})"


def _better(mode, monitor, where):
    if not isinstance(monitor, str) or not monitor:
        raise TypeError(f"{where}: monitor must be a log key such as 'val_loss', got "
                        f"{monitor!r}")
    if mode == "auto":
        mode = "max" if "acc" in monitor else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"{where}: mode must be 'auto', 'min' or 'max', got {mode!r}")
    return mode


def _threshold(value, where):
    """``initial_value_threshold``: None or a finite real number."""
    return None if value is None else \
        real_number(value, "initial_value_threshold", where)


def _start(owner):
    """The best value at fit's start: ``initial_value_threshold`` if given (a resumed
    run's best so far), else the worst value."""
    if owner.initial_value_threshold is not None:
        return owner.initial_value_threshold
    return math.inf if owner.mode == "min" else -math.inf


def _falls_back(monitor, keys):
    """Whether a val_* monitor stands for its training twin: no validation data."""
    return monitor.startswith("val_") and "val_loss" not in keys and monitor[4:] in keys


def _warn_once(owner, message):
    # (in a distributed fit every rank sees the same logs: rank 0 says it)
    if owner.rank == 0 and not getattr(owner, "_warned", False):
        warnings.warn(f"{type(owner).__name__}: {message}", RuntimeWarning, stacklevel=4)
        owner._warned = True


def _check_monitor(owner):
    """At fit's start: warn if the monitored key is not among the logs fit will make
    (a typo such as 'acc' would leave the callback doing nothing, silently)."""
    owner._warned = False
    keys, monitor = owner.log_keys, owner.monitor
    if keys and monitor not in keys and not _falls_back(monitor, keys):
        _warn_once(owner, f"monitor {monitor!r} is not among fit's logs "
                          f"({', '.join(keys)}); unless another callback adds it, "
                          f"{type(owner).__name__} will never act")


def _monitored(logs, monitor, owner):
    logs = logs or {}
    value = logs.get(monitor)
    if value is None and _falls_back(monitor, logs):
        _warn_once(owner, f"no {monitor} (no validation data); monitoring {monitor[4:]} "
                          f"instead")
        value = logs.get(monitor[4:])
    elif value is None:
        _warn_once(owner, f"monitor {monitor!r} is not in the logs ({', '.join(logs)}); "
                          f"{type(owner).__name__} does nothing")
    return value


# The keys fit may put in an epoch's logs.
FIT_LOG_KEYS = ("loss", "accuracy", "lr", "val_loss", "val_accuracy", "seconds")


class _StandIns(dict):
    """Stand-in logs for trying a format string: 0.0 for the keys given and for keys
    fit does not make (another callback may add them); KeyError for fit's own keys
    that this run leaves out."""

    def __init__(self, keys, **known):
        super().__init__({k: 0.0 for k in keys}, **known)

    def __missing__(self, key):
        if key in FIT_LOG_KEYS:
            raise KeyError(key)
        return 0.0


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    As in Keras, the ``patience``-th epoch in a row without improvement is the last
    (``patience=0`` stops at the first, as 1 does), but never epoch 0. ``fit`` warns at
    the start when
    ``monitor`` is not one of its logs (``'acc'`` for ``'accuracy'``, say).

    With ``restore_best_weights=True`` the model gets back the weights of the best
    epoch when training ends (also when it ends because ``epochs`` ran out): its
    whole state dict, so BatchNorm's running statistics too, which its evaluation
    used. ``best_weights`` holds that state dict.

    Resuming (``fit(..., initial_epoch=k)``): ``best`` and ``wait`` start afresh in
    every ``fit``. To continue as the uninterrupted run, pass its state after epoch k:
    ``initial_value_threshold`` (the best value so far, which an epoch must beat by
    more than ``min_delta``; with ``min_delta=0``, the min of the History's ``val_loss``
    so far) and ``initial_wait`` (the epochs since then without improvement). Weights
    from before the resume are not restored: ``best_weights`` holds only this run's best.
    """

    def __init__(self, monitor="val_loss", patience=5, min_delta=0.0, mode="auto",
                 restore_best_weights=False, initial_value_threshold=None, initial_wait=0):
        where = "EarlyStopping"
        self.patience = int_at_least(patience, "patience", where, 0)
        self.mode = _better(mode, monitor, where)
        self.monitor = monitor
        self.min_delta = abs(real_number(min_delta, "min_delta", where))
        self.restore_best_weights = bool(restore_best_weights)
        self.initial_value_threshold = _threshold(initial_value_threshold, where)
        self.initial_wait = int_at_least(initial_wait, "initial_wait", where, 0)
        self.stopped_epoch = None
        self.best_epoch = None

    def get_config(self):
        return {"monitor": self.monitor, "patience": self.patience, "min_delta": self.min_delta,
                "mode": self.mode, "restore_best_weights": self.restore_best_weights,
                "initial_value_threshold": self.initial_value_threshold,
                "initial_wait": self.initial_wait}

    def on_train_begin(self, logs=None):
        self.best = _start(self)
        self.wait = self.initial_wait
        self.best_weights = None
        self.stopped_epoch = None
        self.best_epoch = None
        _check_monitor(self)

    def _improved(self, value):
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, epoch, logs=None):
        value = _monitored(logs, self.monitor, self)
        if value is None:
            return
        if math.isfinite(value) and self._improved(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.state_dict()
        else:
            # as Keras counts: the patience-th epoch without improvement stops (0 and 1
            # both stop at the first), never the run's first epoch
            self.wait += 1
            if self.wait >= self.patience and epoch > 0:
                self.stopped_epoch = epoch
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None:
            self.model.load_state_dict(self.best_weights, "EarlyStopping")


class ModelCheckpoint(Callback):
    """Save the model after each epoch (atomically: a temporary file, then a rename).

    In a distributed ``fit`` only rank 0 writes (the replicas are identical);
    ``saved`` lists the paths on every rank.

    ``path`` may contain ``{epoch}`` (from 1) and any log key, e.g.
    ``"ckpt-{epoch:02d}-{val_loss:.3f}.npz"``; ``fit`` checks that it can be filled
    before the first epoch, and missing folders are made. ``save_best_only`` saves
    only when ``monitor`` improves; ``save_optimizer`` stores the optimizer state too.

    ``initial_value_threshold`` (as in Keras): the value ``save_best_only`` must beat
    at the start, None for any. A resumed run (``fit(..., initial_epoch=k)``) passes
    the best value so far (e.g. the History's min of ``val_loss``), or its first epoch
    would overwrite the best file with whatever it gives.
    """

    def __init__(self, path, monitor="val_loss", save_best_only=False, mode="auto",
                 save_optimizer=False, initial_value_threshold=None):
        try:
            self.path = os.fspath(path)
        except TypeError:
            raise TypeError(f"ModelCheckpoint: path must be a str or path, got "
                            f"{type(path).__name__}") from None
        if isinstance(self.path, bytes):
            raise TypeError("ModelCheckpoint: path must be a str or path, got bytes")
        self.mode = _better(mode, monitor, "ModelCheckpoint")
        self.monitor = monitor
        self.save_best_only = bool(save_best_only)
        self.save_optimizer = bool(save_optimizer)
        self.initial_value_threshold = _threshold(initial_value_threshold, "ModelCheckpoint")
        self.saved = []

    def get_config(self):
        return {"path": self.path, "monitor": self.monitor,
                "save_best_only": self.save_best_only, "mode": self.mode,
                "save_optimizer": self.save_optimizer,
                "initial_value_threshold": self.initial_value_threshold}

    def on_train_begin(self, logs=None):
        self.best = _start(self)
        if not self.log_keys:       # not run by fit: the logs are unknown
            return
        if self.save_best_only:
            _check_monitor(self)
        # The path is tried on stand-in logs now, not after the first epoch has trained
        # (the same on every rank of a distributed fit, so every rank raises or none).
        # A key that another callback may add to the logs is taken on trust; one of
        # fit's own that this run will not have (val_loss without validation) is not.
        try:
            self.path.format_map(_StandIns(self.log_keys, epoch=1))
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"ModelCheckpoint: path {self.path!r} cannot be filled from "
                             f"epoch and the logs ({', '.join(self.log_keys)}): "
                             f"{type(exc).__name__}: {exc}") from None

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if self.save_best_only:
            value = _monitored(logs, self.monitor, self)
            if value is None or not math.isfinite(value):
                return
            if not (value < self.best if self.mode == "min" else value > self.best):
                return
            self.best = value
        try:
            path = self.path.format(epoch=epoch + 1, **logs)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise ValueError(f"ModelCheckpoint: path {self.path!r} cannot be filled from "
                             f"epoch and this epoch's logs ({', '.join(logs)}): "
                             f"{type(exc).__name__}: {exc}") from None
        if self.rank == 0:
            folder = os.path.dirname(path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self.model.save(path, optimizer=self.optimizer if self.save_optimizer else None)
        self.saved.append(path)
