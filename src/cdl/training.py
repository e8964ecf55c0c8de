"""The training loop: ``fit`` and what it reports (callbacks, progress, History).

``Sequential.fit`` calls :func:`fit`. Each step is ``model._train_step`` (the
same step as ``train_step``: a plan where the model has one), so fit trains bit
for bit as a loop of train_step calls over the same batches.
"""
import math
import numbers
import signal
import sys
import threading
import time
import warnings

import numpy as np

from . import _config
from .callbacks import Callback, History
from .functional._checks import INT32_MAX
from .model import _accuracy_labels
from .progress import ProgressBar

__all__ = ["fit"]


def fit(model, x, y, loss, optimizer, epochs=1, batch_size=32, validation_data=None,
        validation_split=0.0, shuffle=True, callbacks=(), verbose=1):
    """Train ``model`` for ``epochs`` passes over (x, y); returns a History.

    Each epoch shuffles without replacement (seeded by the model's ``seed``) and
    keeps the last partial batch. ``validation_split`` holds out the last fraction
    of the data (before shuffling). Learning-rate schedules and EarlyStopping /
    ModelCheckpoint go in ``callbacks``. Training stops with a warning naming the
    epoch and step when the loss becomes NaN or infinite (that update is skipped),
    and Ctrl-C stops it between steps; the model stays usable either way.
    ``verbose``: 0 silent, 1 progress bar (stderr), 2 one line per epoch.
    """
    where = "Sequential.fit"
    model._check_loss(loss, where)
    model._check_optimizer(optimizer, where)
    if isinstance(validation_split, (bool, np.bool_)) or \
            not isinstance(validation_split, numbers.Real):
        raise TypeError(f"{where}: validation_split must be a number in [0, 1), got "
                        f"{validation_split!r}")
    if verbose not in (0, 1, 2):
        raise ValueError(f"{where}: verbose must be 0, 1 or 2, got {verbose!r}")
    x = model._check_x(x, where)
    n_all = x.shape[0]
    y = model._check_y(y, n_all, loss, where)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"{where}: validation_split must be in [0, 1), got "
                         f"{validation_split!r}")
    if validation_data is not None:
        if len(validation_data) != 2:
            raise ValueError(f"{where}: validation_data must be a pair (x_val, y_val)")
        xv = model._check_x(validation_data[0], where, "validation_data[0]")
        yv = model._check_y(validation_data[1], xv.shape[0], loss, where, "validation_data[1]")
    elif validation_split > 0:
        n_val = int(round(n_all * validation_split))
        if n_val < 1 or n_val >= n_all:
            raise ValueError(f"{where}: validation_split={validation_split} of {n_all} "
                             f"samples leaves an empty training or validation set")
        xv, yv = x[n_all - n_val:], y[n_all - n_val:]
        x, y = x[:n_all - n_val], y[:n_all - n_val]
    else:
        xv = yv = None
    if xv is not None and xv.shape[0] == 0:
        xv = yv = None
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"{where}: x is empty")
    history = History()
    cbs = [history] + list(callbacks)
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"{where}: callbacks must be cdl callbacks, got "
                            f"{type(cb).__name__}")
        cb.set_context(model, optimizer)

    bs = min(int(batch_size), n)
    if bs * model._max_sample > INT32_MAX:
        raise ValueError(f"{where}: batch_size={bs} needs {bs * model._max_sample} elements "
                         f"in one layer buffer; at most {INT32_MAX} are supported")
    steps = -(-n // bs)
    step_threads = _config.step_threads  # re-read per step: the load changes
    xb = np.empty((bs,) + model.input_shape, model.dtype)
    yb = np.empty((bs,) + y.shape[1:], y.dtype)
    acc_all = _accuracy_labels(y, model.output_shape[0])
    ab = None if acc_all is None else np.empty(bs, np.int64)
    pred = np.empty(bs, np.intp)
    hit = np.empty(bs, np.bool_)

    stop = {"interrupted": False}
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if stop["interrupted"]:  # a second Ctrl-C aborts at once
                raise KeyboardInterrupt
            stop["interrupted"] = True
        try:
            old_handler = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:
            old_handler = None

    model.stop_training = False
    for cb in cbs:
        cb.on_train_begin()
    try:
        for epoch in range(epochs):
            for cb in cbs:
                cb.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            order = model._rng.permutation(n) if shuffle else np.arange(n)
            bar = ProgressBar(n, epoch + 1, epochs, start=t0) if verbose == 1 else None
            loss_sum = 0.0
            correct = 0
            done = 0
            for step in range(steps):
                s = step * bs
                e = min(s + bs, n)
                m = e - s
                idx = order[s:e]
                xm, ym = xb[:m], yb[:m]
                np.take(x, idx, axis=0, out=xm, mode="clip")
                np.take(y, idx, axis=0, out=ym, mode="clip")
                value = model._train_step(xm, ym, loss, optimizer, step_threads())
                if not math.isfinite(value):
                    bad_input = not np.isfinite(xm).all()
                    msg = (f"fit: loss became {value} at epoch {epoch + 1}, step {step + 1} "
                           f"of {steps}; training stopped and that update was skipped. "
                           + ("The batch contains NaN or Inf inputs." if bad_input else
                              "Try a lower learning rate (lr) or check the data."))
                    history.stop_reason = msg
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    model.stop_training = True
                    break
                loss_sum += value * m
                done = e
                if ab is not None:
                    np.take(acc_all, idx, out=ab[:m], mode="clip")
                    np.argmax(model._scores, axis=1, out=pred[:m])
                    np.equal(pred[:m], ab[:m], out=hit[:m])
                    correct += int(np.count_nonzero(hit[:m]))
                if bar is not None:
                    bar.update(done, {"loss": loss_sum / done,
                                      "acc": correct / done if ab is not None else math.nan})
                if stop["interrupted"]:
                    break
            if stop["interrupted"]:
                history.stop_reason = (f"fit: interrupted (Ctrl-C) at epoch {epoch + 1}, "
                                       f"step {step + 1} of {steps}; the model keeps the "
                                       f"weights after that step")
                if verbose:
                    print("\n" + history.stop_reason, file=sys.stderr)
                break
            if model.stop_training and history.stop_reason:
                break
            logs = {"loss": loss_sum / n,
                    "accuracy": correct / n if ab is not None else math.nan,
                    "lr": float(getattr(optimizer, "lr", math.nan))}
            if xv is not None:
                logs["val_loss"], logs["val_accuracy"] = model.evaluate(xv, yv, loss)
            logs["seconds"] = time.perf_counter() - t0
            if verbose:
                shown = {k: v for k, v in logs.items() if k not in ("lr", "seconds")}
                if bar is None:
                    # verbose=2: one plain line per epoch, timed from its start
                    bar = ProgressBar(n, epoch + 1, epochs, start=t0)
                    bar.tty = False
                bar.finish(n, shown)
            for cb in cbs:
                cb.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
        for cb in cbs:
            cb.on_train_end()
    return history

