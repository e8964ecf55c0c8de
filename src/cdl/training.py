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
from .callbacks import FIT_LOG_KEYS, Callback, History
from .functional._checks import INT32_MAX, shape_str
from .model import _accuracy_labels
from .progress import ProgressBar

__all__ = ["fit"]


def fit(model, x, y, loss, optimizer, epochs=1, batch_size=32, validation_data=None,
        validation_split=0.0, shuffle=True, callbacks=(), verbose=1, comm=None, shard=True,
        initial_epoch=0):
    """Train ``model`` for ``epochs`` passes over (x, y); returns a History.

    Each epoch shuffles without replacement (seeded by the model's ``seed``) and
    keeps the last partial batch; a batch size that some layer cannot train on (a
    last batch of one sample through BatchNorm1d) is refused before the first step.
    ``validation_split`` holds out the last fraction
    of the data (before shuffling); it cannot be given with ``validation_data`` (which
    set would be meant is unclear), and empty ``validation_data`` is refused, as
    ``evaluate`` refuses it, rather than silently training without validation.
    Learning-rate schedules and EarlyStopping / ModelCheckpoint go in ``callbacks``.
    Training stops with a warning naming the epoch and step when the loss becomes NaN
    or infinite (that update is skipped), and Ctrl-C stops it between steps; the model
    stays usable either way.
    The History's ``loss`` is the epoch's mean loss, or with ``reduction="sum"`` its
    total over the samples (as ``evaluate`` and ``val_loss`` give it), L2 included.
    ``verbose``: 0 silent, 1 progress bar (stderr), 2 one line per epoch.
    ``initial_epoch``: resume at that epoch (counted from 0; ``epochs`` is then the
    number of the last one, as in Keras): callbacks and learning-rate schedules see
    the epochs of the whole run, so a model and optimizer saved after epoch k (e.g. by
    ModelCheckpoint with ``save_optimizer=True``) continue as if never stopped.

    **Distributed** (``comm``, an mpi4py communicator, or a
    :class:`cdl.distributed.DistributedOptimizer`, whose ``comm`` is then used): run
    the same call on every rank. With ``shard=True`` every rank passes the same full
    (x, y); ``batch_size`` is the global batch, each one dealt to the ranks in
    contiguous pieces (:func:`cdl.distributed.batch_piece`), so every rank runs the
    same number of steps, last partial batch included (one smaller than the number of
    ranks joins the batch before it), in an order shuffled from rank 0's seed. With
    ``shard=False`` each rank passes its own part (e.g. from
    :func:`cdl.distributed.shard`) and splits it into as many steps as the rank with
    the most batches of ``batch_size / ranks``. Validation data is sharded the same
    way (``shard=True``) or taken as each rank's part. The loss and metrics in the
    History (on every rank) are global averages; the progress bar and messages come
    from rank 0 only, and so do ModelCheckpoint's files (written atomically). A
    non-finite loss or gradient on any rank stops every rank at the same step, and
    Ctrl-C stops them all after the same step. The loss must average over the batch
    (``reduction="mean"``). On one rank, fit trains exactly as without ``comm``.
    """
    where = "Sequential.fit"
    if comm is None:
        comm = getattr(optimizer, "comm", None)
    if comm is not None:
        from .distributed import DistributedOptimizer
        if not isinstance(optimizer, DistributedOptimizer):
            raise TypeError(f"{where}: with comm, the optimizer must be a "
                            f"cdl.distributed.DistributedOptimizer (it averages the ranks' "
                            f"gradients), got {type(optimizer).__name__}")
    rank, ranks = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    if rank != 0:
        verbose = 0  # distributed: rank 0 prints
    agree = comm if ranks > 1 else None     # what every rank must decide alike
    try:
        # (every check that one rank alone could fail, before the first collective call)
        model._check_loss(loss, where)
        model._check_optimizer(optimizer, where)
        if comm is not None:
            optimizer.check_loss(loss, where)
        callbacks = _checked_callbacks(callbacks, where)
        # (with shard=False each rank passes its own part of the validation data, and
        # some parts may be empty; below, the ranks check that not all are)
        x, y, xv, yv = _checked_data(model, x, y, loss, epochs, batch_size, validation_data,
                                     validation_split, verbose, where,
                                     empty_val_ok=ranks > 1 and not shard)
        if isinstance(initial_epoch, (bool, np.bool_)) or \
                not isinstance(initial_epoch, (int, np.integer)) \
                or not 0 <= initial_epoch < epochs:
            raise ValueError(f"{where}: initial_epoch must be an int in [0, epochs={epochs}), "
                             f"got {initial_epoch!r}")
        problem = None
    except (TypeError, ValueError) as exc:
        problem = exc
    # (before the first collective call, which a rank that raised alone would leave the
    # others waiting in)
    _raise_on_every_rank(agree, problem,
                         lambda bad, said: ValueError(f"{where}: rank {bad} refused its "
                                                      f"arguments ({said})"))
    n = x.shape[0]
    if agree is not None:
        # Every rank must run the same steps: check the sizes and the settings that make
        # them collectively (everyone sees the same lists, so everyone raises or no one).
        settings = comm.allgather((int(epochs), int(initial_epoch), int(batch_size),
                                   bool(shuffle), float(validation_split), bool(shard))
                                  + _replica_fingerprint(model, loss, optimizer, callbacks,
                                                         xv if shard else None))
        names = ("epochs", "initial_epoch", "batch_size", "shuffle", "validation_split",
                 "shard") + _FINGERPRINT
        for i, name in enumerate(names):
            if any(s[i] != settings[0][i] for s in settings):
                hint = _FINGERPRINT_HINTS.get(name, "run the same call on each")
                if name in _FINGERPRINT[:2]:     # (long or opaque: which ranks differ)
                    shown = f"ranks {[r for r, v in enumerate(settings) if v[i] != settings[0][i]]} " \
                            f"differ from rank 0"
                else:
                    shown = f"the ranks have {[v[i] for v in settings]}"
                raise ValueError(f"{where}: {name} must be the same on every rank ({hint}); "
                                 f"{shown}")
        sizes = comm.allgather(n)
        if shard and any(s != sizes[0] for s in sizes):
            raise ValueError(f"{where}: with shard=True every rank must pass the same full "
                             f"data; the ranks have {sizes} training samples (pass "
                             f"shard=False if each rank passes its own part)")
        if min(sizes) == 0 if shard else sum(sizes) == 0:
            raise ValueError(f"{where}: x is empty")
        # the same shuffling generator on every rank (rank 0's)
        model._rng.bit_generator.state = comm.bcast(model._rng.bit_generator.state, root=0)
    elif n == 0:
        raise ValueError(f"{where}: x is empty")
    history = History()
    cbs = [history] + list(callbacks)
    for cb in cbs:
        cb.set_context(model, optimizer)
        cb.rank = rank

    if comm is None:
        bs = min(int(batch_size), n)
        bounds = [(s, min(s + bs, n)) for s in range(0, n, bs)]
        n_total = n
    else:
        bounds, n_total = _local_batches(comm, n, int(batch_size), shard, optimizer)
        bs = max([e - s for s, e in bounds] + [1])
    if bs * model._max_sample > INT32_MAX:
        raise ValueError(f"{where}: batch_size={bs} needs {bs * model._max_sample} elements "
                         f"in one layer buffer; at most {INT32_MAX} are supported")
    steps = len(bounds)
    _check_batch_sizes(model, bounds, where, agree,
                       f"{n} training samples in batches of {bs}" if comm is None or ranks == 1
                       else f"batches of {batch_size} dealt to {ranks} ranks", optimizer)
    step_threads = _config.step_threads  # re-read per step: the load changes
    xb = np.empty((bs,) + model.input_shape, model.dtype)
    yb = np.empty((bs,) + y.shape[1:], y.dtype)
    acc_all = _accuracy_labels(y, model.output_shape[0])
    ab = None if acc_all is None else np.empty(bs, np.int64)
    pred = np.empty(bs, np.intp)
    hit = np.empty(bs, np.bool_)
    shards = None if comm is None else optimizer.shards
    # whether any rank validates (one whose part is empty still joins the scoring)
    has_val = xv is not None
    if agree is not None:
        said = agree.allgather((has_val, validation_data is not None))
        has_val = any(h for h, _ in said)
        if any(given for _, given in said) and not has_val:   # (every rank raises)
            raise ValueError(f"{where}: validation_data is empty on every rank")
    val_everywhere = comm is not None and (ranks > 1 or shards) and has_val
    val_pieces = 1
    if val_everywhere and shard and xv is not None:
        lo, hi = optimizer.piece(0, xv.shape[0])
        xv, yv = xv[lo:hi], yv[lo:hi]
        # with fixed gradient shards the validation set is scored shard by shard too, so
        # the metrics do not depend on the number of ranks either
        val_pieces = shards // ranks if shards else 1

    # The model's training lock for the whole run, so another thread's train_step is
    # refused between steps too (re-entrant: a callback in this thread may still step).
    model._enter(where)
    try:
        model.stop_training = False    # (callbacks may raise here: nothing is set up yet)
        log_keys = tuple(k for k in FIT_LOG_KEYS if has_val or not k.startswith("val_"))
        for cb in cbs:
            cb.log_keys = log_keys
        _callbacks(cbs, lambda cb: cb.on_train_begin(), agree, where, "before training")
        # Ctrl-C: "interrupted" is this process's request; with comm it rides on the next
        # step's message and "agreed" says when every rank has it (so all stop together)
        stop = {"interrupted": False, "agreed": False}
        old_handler = None
        # (a process told to ignore SIGINT, as `cmd &` from a script is, keeps ignoring it)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            def on_sigint(signum, frame):
                if stop["interrupted"]:  # a second Ctrl-C aborts at once
                    raise KeyboardInterrupt
                stop["interrupted"] = True
            try:
                old_handler = signal.signal(signal.SIGINT, on_sigint)
            except ValueError:
                old_handler = None
    except BaseException:
        model._lock.release()
        raise

    try:
        for epoch in range(int(initial_epoch), epochs):
            _callbacks(cbs, lambda cb: cb.on_epoch_begin(epoch), agree, where,
                       f"at the start of epoch {epoch + 1}")
            t0 = time.perf_counter()
            order = model._rng.permutation(n) if shuffle else np.arange(n)
            bar = ProgressBar(n_total, epoch + 1, epochs, start=t0) if verbose == 1 else None
            loss_sum = 0.0
            correct = 0
            done = done_here = 0
            for step, (s, e) in enumerate(bounds):
                m = e - s
                idx = order[s:e]
                xm, ym = xb[:m], yb[:m]
                nt = step_threads()
                if comm is not None and stop["interrupted"]:
                    optimizer.request_stop()
                if m:
                    np.take(x, idx, axis=0, out=xm, mode="clip")
                    np.take(y, idx, axis=0, out=ym, mode="clip")
                    value = model._train_step(xm, ym, loss, optimizer, nt)
                else:  # a rank with no samples in this step still joins it
                    value = optimizer.gradient_hook(0.0, 0, nt)
                    if math.isfinite(value):
                        optimizer.step(nt)
                if comm is not None:
                    stop["agreed"] = optimizer.stop_requested
                    mg = optimizer.last_count
                else:
                    mg = m
                if not math.isfinite(value):
                    bad_input = not np.isfinite(xm).all()
                    if agree is not None:    # every rank is here: one message
                        bad_input = any(agree.allgather(bad_input))
                    why = getattr(optimizer, "last_skip", None)
                    grad_why = getattr(model, "_skip_reason", None) if m else None
                    if grad_why is None and why and "gradient" in why:
                        grad_why = "a gradient was not finite"      # (the ranks' average)
                    msg = (f"fit: {grad_why or f'loss became {value}'} at epoch {epoch + 1}, "
                           f"step {step + 1} of {steps}; training stopped and that update was "
                           f"skipped"
                           + (f" on every rank ({why})" if comm is not None and why else "")
                           + ". " + ("The batch contains NaN or Inf inputs." if bad_input else
                                     "Try a lower learning rate (lr) or check the data."))
                    history.stop_reason = msg
                    if rank == 0:       # (every rank has it in stop_reason)
                        warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    model.stop_training = True
                    break
                if loss.reduction == "mean":
                    loss_sum += value * mg
                else:
                    # the epoch's total, with the L2 penalty once (as evaluate has it),
                    # averaged over the steps by their samples like a mean loss's
                    pen = model._step_penalty
                    loss_sum += value - pen + pen * mg / n_total
                done += mg
                done_here += m
                if ab is not None and m:
                    np.take(acc_all, idx, out=ab[:m], mode="clip")
                    np.argmax(model._scores, axis=1, out=pred[:m])
                    np.equal(pred[:m], ab[:m], out=hit[:m])
                    correct += int(np.count_nonzero(hit[:m]))
                if bar is not None:
                    # (distributed: the global loss; the accuracy of rank 0's samples)
                    bar.update(done, {"loss": loss_sum / done if loss.reduction == "mean"
                                      else loss_sum,
                                      "acc": correct / max(done_here, 1) if ab is not None
                                      else math.nan})
                if stop["agreed" if comm is not None else "interrupted"]:
                    break
            if stop["agreed" if comm is not None else "interrupted"]:
                history.stop_reason = (f"fit: interrupted (Ctrl-C) at epoch {epoch + 1}, "
                                       f"step {step + 1} of {steps}; the model keeps the "
                                       f"weights after that step")
                if verbose:
                    print("\n" + history.stop_reason, file=sys.stderr)
                break
            if model.stop_training and history.stop_reason:
                break
            if agree is not None:
                correct = _sum_in_rank_order(agree, correct)
            logs = {"loss": loss_sum / n_total if loss.reduction == "mean" else loss_sum,
                    "accuracy": correct / n_total if ab is not None else math.nan,
                    "lr": float(getattr(optimizer, "lr", math.nan))}
            if val_everywhere:
                logs["val_loss"], logs["val_accuracy"] = _evaluate_everywhere(
                    comm, model, xv, yv, loss, val_pieces)
            elif xv is not None:
                logs["val_loss"], logs["val_accuracy"] = model.evaluate(xv, yv, loss)
            logs["seconds"] = time.perf_counter() - t0
            if verbose:
                shown = {k: v for k, v in logs.items() if k not in ("lr", "seconds")}
                if bar is None:
                    # verbose=2: one plain line per epoch, timed from its start
                    bar = ProgressBar(n_total, epoch + 1, epochs, start=t0)
                    bar.tty = False
                bar.finish(n_total, shown)
            _callbacks(cbs, lambda cb: cb.on_epoch_end(epoch, logs), agree, where,
                       f"after epoch {epoch + 1}")
            # A Ctrl-C during validation or the callbacks, or a callback's stop_training:
            # stop before the next epoch begins (or, after the last, report the Ctrl-C),
            # on every rank alike.
            interrupted = stop["interrupted"] or stop["agreed"]
            if agree is not None:
                said = agree.allgather((interrupted, bool(model.stop_training)))
                interrupted = any(i for i, _ in said)
                model.stop_training = any(t for _, t in said)
            if interrupted:
                history.stop_reason = (f"fit: interrupted (Ctrl-C) at the end of epoch "
                                       f"{epoch + 1}; the model keeps that epoch's weights")
                if verbose:
                    print(history.stop_reason, file=sys.stderr)
                break
            if model.stop_training:
                break
    finally:
        try:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            for cb in cbs:
                cb.on_train_end()
        finally:
            model._lock.release()
    return history


def _callbacks(cbs, call, comm, where, when):
    """``call(cb)`` for every callback; with comm, every rank raises if one's callback did
    (rank 0 alone writes checkpoints: a full disk there must not leave the others
    waiting in the next step)."""
    failure = None
    try:
        for cb in cbs:
            call(cb)
    except Exception as exc:     # noqa: BLE001 (re-raised below, after the agreement)
        failure = exc
    _raise_on_every_rank(comm, failure,
                         lambda bad, said: RuntimeError(f"{where}: stopped {when}: a "
                                                        f"callback on rank {bad} failed "
                                                        f"({said})"))


def _checked_callbacks(callbacks, where):
    if callbacks is None:
        return ()
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"{where}: callbacks must be a list of cdl callbacks, got "
                        f"{type(callbacks).__name__}")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"{where}: callbacks must be cdl callbacks, got "
                            f"{type(cb).__name__}")
    return tuple(callbacks)


# What the ranks of a distributed fit must hold alike, beside its arguments: replicas
# that differ in any of these average the gradients of different models (or steps), or
# leave one rank waiting in a message of another size.
_FINGERPRINT = ("the model (architecture and dtype)", "the model's weights and buffers",
                "the loss", "the optimizer's settings", "the learning-rate schedules",
                "the validation data's size")
_FINGERPRINT_HINTS = {
    "the model's weights and buffers": "build the model from one seed on every rank, or "
                                       "call cdl.distributed.broadcast_parameters(model) "
                                       "first",
    "the learning-rate schedules": "give every rank the same schedule callbacks",
    "the validation data's size": "with shard=True every rank passes the same full "
                                  "validation data",
}


def _replica_fingerprint(model, loss, optimizer, callbacks, xv):
    import hashlib
    import json

    from .optim.schedules import _Schedule
    arch = (model.dtype.name, tuple((p, type(l).__qualname__, l.output_shape)
                                    for p, l in model.chain.walk()))
    h = hashlib.blake2b(digest_size=16)
    params = model.parameter_buffer          # (one flat pack: one call, not one an array)
    if params is not None:
        h.update(params.view(np.uint8).data)
    for _, b in model.buffers():
        h.update(np.ascontiguousarray(b).view(np.uint8).reshape(-1).data)
    config = lambda obj: json.dumps(obj.get_config(), sort_keys=True, default=repr)  # noqa: E731
    inner = getattr(optimizer, "optimizer", optimizer)
    opt = (type(inner).__qualname__, config(inner), float(inner.lr), float(inner.base_lr),
           int(inner.steps), getattr(optimizer, "shards", None),
           getattr(optimizer, "algorithm", None))
    # (reprs: a NaN attribute is then equal to itself)
    schedules = tuple((type(cb).__qualname__,
                       sorted((k, repr(v)) for k, v in vars(cb).items()
                              if not k.startswith("_") and k != "rank"
                              and isinstance(v, (int, float, str))))
                      for cb in callbacks if isinstance(cb, _Schedule))
    return (arch, h.hexdigest(), (type(loss).__qualname__, config(loss)), opt, schedules,
            None if xv is None else int(xv.shape[0]))


def _raise_on_every_rank(comm, problem, other):
    """Raise ``problem`` (an exception or None) here, and on every other rank of comm
    ``other(rank, what it said)``, so that no rank is left waiting for one that
    stopped. Without comm: raise ``problem`` if any."""
    if comm is not None:
        said = comm.allgather(None if problem is None else f"{type(problem).__name__}: "
                                                             f"{problem}")
        if problem is None and any(said):
            bad = next(i for i, p in enumerate(said) if p)
            raise other(bad, said[bad])
    if problem is not None:
        raise problem


def _checked_data(model, x, y, loss, epochs, batch_size, validation_data, validation_split,
                  verbose, where, empty_val_ok=False):
    """fit's arguments checked: (x, y, x_val, y_val), the validation pair None if there
    is none (or, with ``empty_val_ok``, this rank's part of it is empty)."""
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
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError(f"{where}: validation_data must be a pair (x_val, y_val), got "
                             f"{type(validation_data).__name__}")
        if validation_split:
            raise ValueError(f"{where}: give validation_data or validation_split, not both "
                             f"(got validation_split={validation_split!r} with "
                             f"validation_data)")
        xv = model._check_x(validation_data[0], where, "validation_data[0]")
        yv = model._check_y(validation_data[1], xv.shape[0], loss, where, "validation_data[1]")
        if xv.shape[0] == 0 and not empty_val_ok:
            raise ValueError(f"{where}: validation_data is empty (validation_data[0] has shape "
                             f"{shape_str(xv.shape)}); pass None for no validation")
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
    return x, y, xv, yv


def _check_batch_sizes(model, bounds, where, comm, batches, optimizer=None):
    """Refuse, before the first step, a batch some layer cannot train on (BatchNorm on
    one value per channel), rather than stop in the middle of an epoch; with comm,
    every rank raises if one would. ``batches`` says how the batches were made. With
    fixed gradient shards (``DistributedOptimizer(shards=S)``) each shard is a pass of
    its own, so the shards' sizes are checked."""
    problem = None
    sizes = {e - s for s, e in bounds if e > s}
    shards = getattr(optimizer, "shards", None)
    if shards:
        from .distributed import batch_piece
        k = shards // optimizer.size
        sizes = {hi - lo for m in sizes for lo, hi in (batch_piece(0, m, i, k)
                                                       for i in range(k)) if hi > lo}
    for m in sorted(sizes):
        try:
            model._check_train_batch(m)
        except ValueError as exc:
            piece = "a batch" if comm is None else f"rank {comm.Get_rank()} a piece"
            if shards:
                piece += f" (its gradient shard of shards={shards})"
            problem = ValueError(f"{where}: {batches} give {piece} of {m}, and {exc}; choose "
                                 f"a batch_size that leaves no such batch")
            break
    _raise_on_every_rank(comm, problem, lambda bad, said: ValueError(
        f"{where}: rank {bad} cannot train on its batches ({said})"))


def _local_batches(comm, n, batch_size, shard, optimizer):
    """(this rank's (start, stop) per step over its order, the global sample count)."""
    from .distributed import batch_piece, global_batches
    rank, ranks = comm.Get_rank(), comm.Get_size()
    if shard and optimizer.shards is not None:
        # fixed gradient shards: the batches and their shards do not depend on the ranks
        bs = min(batch_size, n)
        return [optimizer.piece(s, min(s + bs, n)) for s in range(0, n, bs)], n
    if shard:
        bs = min(batch_size, n)
        return [batch_piece(s, e, rank, ranks) for s, e in global_batches(n, bs, ranks)], n
    sizes = comm.allgather(n) if ranks > 1 else [n]
    b = max(1, -(-batch_size // ranks))
    steps = max(-(-k // b) for k in sizes)
    local = [(s, min(s + b, n)) for s in range(0, n, b)]
    return local + [(n, n)] * (steps - len(local)), sum(sizes)


def _sum_in_rank_order(comm, value):
    total = 0
    for v in comm.allgather(value):
        total += v
    return total


def _evaluate_everywhere(comm, model, xv, yv, loss, pieces=1):
    """Global (loss, accuracy) over every rank's validation part, scored in ``pieces``
    pieces per rank: Σ m·loss / Σ m over the pieces in rank order."""
    from .distributed import batch_piece
    m = 0 if xv is None else xv.shape[0]
    mine = []
    for i in range(pieces):
        lo, hi = batch_piece(0, m, i, pieces)
        if hi > lo:
            value, acc = model.evaluate(xv[lo:hi], yv[lo:hi], loss)
            mine.append((hi - lo, value, acc * (hi - lo)))
    parts = [p for ps in comm.allgather(mine) for p in ps]
    total = sum(p[0] for p in parts)
    if total == 0:
        return math.nan, math.nan
    loss_sum = hits_sum = 0.0
    for k, v, h in parts:
        loss_sum += v * k
        hits_sum += h
    acc = hits_sum / total
    return loss_sum / total, (round(acc * total) / total if math.isfinite(acc) else acc)
