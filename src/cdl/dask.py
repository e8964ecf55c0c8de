"""Batch inference and hyper-parameter search on Dask (``pip install cdl-cpu[dask]``).

cdl models pickle through the safe model format (unpickling builds registered
layers only), so they travel to Dask workers as they are; Dask's workers set
``OMP_NUM_THREADS=1`` and cdl's results do not depend on the thread count.

- :func:`predict`: lazy predictions of a Dask array, bit-identical to
  ``model.predict`` on the computed array with the same ``batch_size``.
- :func:`search`: train a copy of a model for each of several learning rates in
  parallel on Dask futures; the results come back best first
  (``examples/dask_search.py`` runs it on a ``LocalCluster``).
"""
import copy
import hashlib
import math
import numbers

import numpy as np

__all__ = ["predict", "search", "INSTALL_HINT"]

INSTALL_HINT = "pip install cdl-cpu[dask]"


def _dask():
    try:
        import dask
        import dask.array as da
    except ImportError as exc:
        raise ImportError(f"cdl.dask needs Dask: {INSTALL_HINT} (dask[distributed]) "
                          f"({exc})") from exc
    return dask, da


def _model_from_bytes(blob):
    from .io.format import loads
    return loads(blob)


def _predict_block(block, model, batch_size):
    return model.predict(block, batch_size=batch_size)


def predict(model, x, batch_size=256):
    """``model``'s predictions of the Dask array ``x`` (N, *input_shape), as a lazy Dask
    array (N, *output_shape) in the model's dtype.

    The model is put in the graph once, as its file bytes at the time of the call (a
    Delayed named by their hash: training the model before ``compute()`` does not change
    the result), and each block is predicted on a worker with
    ``model.predict(block, batch_size)``.
    Blocks are rechunked to whole batches of ``batch_size`` samples along the first
    axis (and one chunk along the others), so every batch is the one a local
    ``model.predict(x.compute(), batch_size)`` runs: the result is bit-identical.
    A NumPy array is accepted too (wrapped with ``dask.array.from_array``).
    """
    dask, da = _dask()
    from .io.format import dumps

    where = "cdl.dask.predict"
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be an int >= 1, got {batch_size!r}")
    bs = int(batch_size)
    if not isinstance(x, da.Array):
        x = da.from_array(np.asarray(x), chunks=(max(bs, 4 * bs),) + np.shape(x)[1:])
    if tuple(x.shape[1:]) != model.input_shape:
        raise ValueError(f"{where}: x must have shape (N, {', '.join(map(str, model.input_shape))})"
                         f", got {x.shape}")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{where}: x must be a numeric array, got dtype {x.dtype}")
    if any(math.isnan(c) for c in x.chunks[0]):      # unknown chunk sizes (e.g. after a filter)
        x = x.compute_chunk_sizes()
    rows = max(x.chunks[0]) if x.shape[0] else bs
    rows = max(bs, rows // bs * bs)
    x = x.rechunk({0: rows, **{axis: -1 for axis in range(1, x.ndim)}})
    # The graph holds the model as it is now (its file bytes), as its key says: a model
    # trained or changed before compute() must not change these predictions.
    blob = dumps(model)
    token = hashlib.sha256(blob).hexdigest()[:20]
    shipped = dask.delayed(_model_from_bytes, pure=True)(blob,
                                                         dask_key_name=f"cdl-model-{token}")
    out_ndim = 1 + len(model.output_shape)
    chunks = (x.chunks[0],) + tuple((s,) for s in model.output_shape)
    extra = {}
    if x.ndim > out_ndim:
        extra["drop_axis"] = list(range(out_ndim, x.ndim))
    elif x.ndim < out_ndim:
        extra["new_axis"] = list(range(x.ndim, out_ndim))
    return da.map_blocks(_predict_block, x, shipped, bs, dtype=model.dtype, chunks=chunks,
                         meta=np.empty((0,) * out_ndim, model.dtype),
                         name=f"cdl-predict-{dask.base.tokenize(token, x.name, bs)}",
                         **extra)


def _train_one(model, x, y, loss, optimizer, lr, optimizer_kwargs, epochs, batch_size,
               validation_data):
    from .optim import OPTIMIZER_TYPES

    model = copy.deepcopy(model)        # tasks on one worker may share the scattered model
    cls = OPTIMIZER_TYPES[optimizer] if isinstance(optimizer, str) else optimizer
    opt = cls(model, lr=lr, **(optimizer_kwargs or {}))
    history = model.fit(x, y, loss, opt, epochs=epochs, batch_size=batch_size,
                        validation_data=validation_data, verbose=0)
    return {"lr": lr, "history": history.history, "stop_reason": history.stop_reason,
            "model": model}


def search(model, x, y, loss, learning_rates, optimizer="SGD", optimizer_kwargs=None,
           epochs=3, batch_size=32, validation_data=None, monitor=None, client=None):
    """Train a copy of ``model`` (the same initial weights) for each learning rate, in
    parallel on Dask futures, and return the results best first.

    ``optimizer``: a cdl optimizer class or its name ("SGD", "Adam", "AdamW"), built as
    ``optimizer(model, lr=lr, **optimizer_kwargs)``. ``client``: a
    ``distributed.Client`` (default: the current one). The data and the model are
    scattered to the workers once. Each result is a dict: ``lr``, ``history`` (the
    History's dict), ``score`` (the last ``monitor`` value: ``val_loss`` when there is
    validation data, else ``loss``; lower is better, except for accuracies; a diverged
    run scores worst), ``stop_reason`` and the trained ``model``. The arguments are
    checked here, before anything is sent.
    """
    from .callbacks import FIT_LOG_KEYS, _better
    from .optim import OPTIMIZER_TYPES, Optimizer

    _dask()
    try:
        from distributed import default_client
    except ImportError as exc:
        raise ImportError(f"cdl.dask.search needs dask.distributed: {INSTALL_HINT} "
                          f"({exc})") from exc
    where = "cdl.dask.search"
    if isinstance(learning_rates, (numbers.Number, str)) or \
            not hasattr(learning_rates, "__iter__"):
        raise TypeError(f"{where}: learning_rates must be a list of numbers, got "
                        f"{learning_rates!r}")
    lrs = list(learning_rates)
    if not lrs:
        raise ValueError(f"{where}: learning_rates is empty")
    for lr in lrs:
        if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real) \
                or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"{where}: learning rates must be finite numbers > 0, got {lr!r}")
    lrs = [float(lr) for lr in lrs]
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZER_TYPES:
            raise ValueError(f"{where}: unknown optimizer {optimizer!r}; one of "
                             f"{', '.join(sorted(OPTIMIZER_TYPES))}, or an Optimizer class")
    elif not (isinstance(optimizer, type) and issubclass(optimizer, Optimizer)):
        raise TypeError(f"{where}: optimizer must be a name or an Optimizer class, got "
                        f"{optimizer!r}")
    if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                        or len(validation_data) != 2):
        raise ValueError(f"{where}: validation_data must be a pair (x_val, y_val)")
    # everything a trial would refuse, refused here (before the data is scattered)
    from .functional._checks import int_at_least
    from .model import Sequential
    if not isinstance(model, Sequential):
        raise TypeError(f"{where}: model must be a cdl.Sequential, got {type(model).__name__}")
    model._check_loss(loss, where)
    int_at_least(epochs, "epochs", where, 1)
    int_at_least(batch_size, "batch_size", where, 1)
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"{where}: optimizer_kwargs must be a dict or None, got "
                        f"{type(optimizer_kwargs).__name__}")
    opt_cls = OPTIMIZER_TYPES[optimizer] if isinstance(optimizer, str) else optimizer
    try:
        opt_cls(model, lr=lrs[0], **(optimizer_kwargs or {}))
    except (TypeError, ValueError) as exc:
        kind = TypeError if isinstance(exc, TypeError) else ValueError
        raise kind(f"{where}: optimizer_kwargs: {exc}") from None
    x = model._check_x(x, where)
    y = model._check_y(y, x.shape[0], loss, where)
    if validation_data is not None:
        xv = model._check_x(validation_data[0], where, name="validation_data[0]")
        validation_data = (xv, model._check_y(validation_data[1], xv.shape[0], loss, where,
                                              name="validation_data[1]"))
    monitor = monitor or ("val_loss" if validation_data is not None else "loss")
    logged = [k for k in FIT_LOG_KEYS if validation_data is not None or not k.startswith("val_")]
    if monitor not in logged:
        raise ValueError(f"{where}: monitor {monitor!r} is not in fit's logs here "
                         f"({', '.join(logged)})")
    higher = _better("auto", monitor, where) == "max"      # EarlyStopping's rule
    client = client or default_client()
    # hash=False: identical data in a second call must not reuse the first call's keys,
    # which are being released
    shipped_model, sx, sy = client.scatter([model, x, y], broadcast=True, hash=False)
    val = None
    if validation_data is not None:
        val = tuple(client.scatter(list(validation_data), broadcast=True, hash=False))
    futures = [client.submit(_train_one, shipped_model, sx, sy, loss, optimizer, lr,
                             optimizer_kwargs, epochs, batch_size, val, pure=False)
               for lr in lrs]
    results = client.gather(futures)
    worst = -math.inf if higher else math.inf
    for r in results:
        values = r["history"].get(monitor) or [worst]
        score = values[-1]
        r["score"] = score if (math.isfinite(score) and not r["stop_reason"]) else worst
    return sorted(results, key=lambda r: -r["score"] if higher else r["score"])
