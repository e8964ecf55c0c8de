"""Sequential: a stack of layers with shape checks, training step and fit loop.

L2 regularisation lives on the model: ``Sequential(..., l2=λ)`` adds λ Σ W² over
the weights (not the biases) to every reported loss (train_step, fit, evaluate)
and 2λW to the weight gradients.
"""
import math
import numbers
import os
import signal
import sys
import threading
import time
import warnings

import numpy as np

from . import _config, _plan
from ._kernels import dense as _dense
from ._kernels import losses as _kl
from .callbacks import Callback, History
from .functional._checks import FLOAT_DTYPES, INT32_MAX, real_number, shape_str
from .layers import Flatten, Layer, Linear, MaxPool2d, ReLU, check_grad
from .losses import Loss
from .progress import ProgressBar

__all__ = ["Sequential"]


_PLAN_CACHE_BYTES = 4 << 20    # predict keeps a plan's buffers up to this size per thread


def _input_shape(shape):
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"Sequential: input_shape must be a tuple of ints (per sample, "
                        f"without the batch axis), got {shape!r}") from None
    if not shape or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                            and s >= 1 for s in shape):
        raise ValueError(f"Sequential: input_shape must be a non-empty tuple of ints >= 1 "
                         f"(per sample, without the batch axis), got {shape!r}")
    return tuple(int(s) for s in shape)


def _pack_parameters(layers, dtype):
    """Move every parameter and gradient into one flat buffer each, as views.

    The optimizer then updates the whole model in one kernel call (at batch 1
    a call per parameter cost more than the arithmetic). Each view starts on a
    64-byte boundary; the gaps stay zero in both buffers, so updates keep them
    zero. Returns (params, grads, chunks), the flat buffers and the parts the
    update deals to threads (see _sgd_parts), or Nones without parameters.
    """
    align = 64 // dtype.itemsize
    slots, total = [], 0
    for layer in layers:
        for key in layer.params:
            size = layer.params[key].size
            slots.append((layer, key, total, size))
            total += -(-size // align) * align
    if not slots:
        return None, None, None
    flat = []
    for _ in range(2):
        raw = np.zeros(total + align, dtype)
        skip = (-raw.ctypes.data % 64) // dtype.itemsize
        flat.append(raw[skip:skip + total])
    params, grads = flat
    for layer, key, start, size in slots:
        for store, buf in ((layer.params, params), (layer.grads, grads)):
            view = buf[start:start + size].reshape(store[key].shape)
            view[...] = store[key]
            store[key] = view
    return params, grads, _sgd_parts(slots)


_SGD_PART = 1 << 14            # elements per SGD part of a big parameter that is not split by rows
_SGD_SPLIT_MIN = 1 << 19       # ... from this size (as the elementwise kernels go parallel)


def _sgd_parts(slots):
    """(start, stop, owner) rows over the flat buffers for SGD (thread owner mod threads
    updates [start, stop)). A Linear weight comes in the row chunks that its
    small-batch kernels deal to threads (owner = chunk index, so the update runs
    where the gradient was computed); another parameter of 512K elements or more
    in parts of 16K dealt round-robin; anything else whole, on thread 0."""
    parts = []
    for layer, key, start, size in slots:
        rows, count = 0, 1
        if isinstance(layer, Linear) and key == "weight":
            fout, fin = layer.params[key].shape
            rows, count = _dense.row_chunks(fout, fin)
        if count > 1:
            for c in range(count):
                parts.append((start + c * rows * fin, start + min((c + 1) * rows, fout) * fin, c))
        elif size >= _SGD_SPLIT_MIN:
            for c, lo in enumerate(range(0, size, _SGD_PART)):
                parts.append((start + lo, start + min(lo + _SGD_PART, size), c))
        else:
            parts.append((start, start + size, 0))
    return np.array(parts, np.int64).reshape(-1, 3)


class Sequential:
    """``Sequential(layers, input_shape, dtype=np.float32, seed=None, l2=0.0)``.

    ``input_shape`` is one sample's shape, e.g. (1, 28, 28) or (784,). Every
    layer's output shape is computed and checked here. ``seed`` makes the
    initial weights (and fit's shuffling) reproducible bit for bit.
    """

    def __init__(self, layers, input_shape, dtype=np.float32, seed=None, l2=0.0):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential: needs at least one layer")
        seen = set()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: layers[{i}] must be a cdl layer, got "
                                f"{type(layer).__name__}")
            if id(layer) in seen:
                raise ValueError(f"Sequential: layers[{i}] ({type(layer).__name__}) appears "
                                 f"twice; create a new instance for each position")
            seen.add(id(layer))
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise TypeError(f"Sequential: dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"Sequential: dtype must be float32 or float64, got {dtype}")
        self.layers = layers
        self.input_shape = _input_shape(input_shape)
        self.dtype = dtype
        self.seed = seed
        self.l2 = l2
        self.stop_training = False
        try:
            self._rng = np.random.default_rng(seed)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Sequential: seed must be None or a non-negative int, got "
                            f"{seed!r} ({exc})") from None
        self._lock = threading.Lock()
        self._build()

    @property
    def l2(self):
        return self._l2

    @l2.setter
    def l2(self, value):
        self._l2 = real_number(value, "l2", "Sequential", minimum=0)

    # -- construction ---------------------------------------------------------------
    def _build(self):
        shape = self.input_shape
        source = f"from input {shape_str(shape)}"
        for i, layer in enumerate(self.layers):
            init = getattr(layer, "init", None)
            if init == "auto":
                init = "he" if self._followed_by_relu(i) else "xavier"
            out = layer.build(shape, self.dtype, index=i, source=source, rng=self._rng,
                              init=init)
            n = int(np.prod(out))
            if n > INT32_MAX:
                raise ValueError(f"{layer.name}: output {shape_str(out)} has {n} elements per "
                                 f"sample; at most {INT32_MAX} are supported")
            if not isinstance(layer, (ReLU, Flatten)) or i == 0:
                source = f"from {layer.name} output {shape_str(out)}"
            shape = out
        self.output_shape = shape
        # Largest per-sample activation: a batch of n needs n times this in one buffer.
        self._max_sample = max([int(np.prod(self.input_shape))]
                               + [int(np.prod(l.output_shape)) for l in self.layers])
        self._act_per_sample = sum(int(np.prod(l.output_shape)) for l in self.layers)
        self._flat_params, self._flat_grads, self._sgd_parts = _pack_parameters(
            self.layers, self.dtype)
        self._params = [(f"{i}.{k}", layer.params[k], layer.grads[k])
                        for i, layer in enumerate(self.layers) for k in layer.params]
        self._weights = [layer.params["weight"] for layer in self.layers
                         if "weight" in layer.params]
        self._weights_flat = [w.reshape(-1) for w in self._weights]
        # Layers before the first one with parameters need no backward in train_step.
        self._first_trained = next((i for i, l in enumerate(self.layers) if l.params),
                                   len(self.layers))
        self._use_plans = True
        self._plan_passes()

    def _plan_passes(self, fuse=True):
        """The passes forward runs, as (index, layer, fused): a ReLU followed by a 2x2
        max-pool runs inside that pool's pass (fused=True, identical results) and keeps
        no state of its own; backward walks the same list in reverse."""
        layers = self.layers
        fused = {i + 1 for i in range(len(layers) - 1)
                 if fuse and isinstance(layers[i], ReLU) and isinstance(layers[i + 1], MaxPool2d)
                 and layers[i + 1].fuses_relu()}
        self._passes = [(i, layer, i in fused) for i, layer in enumerate(layers)
                        if i + 1 not in fused]
        self._plans = []                    # TrainPlans follow the passes,
        self._local = threading.local()     # and so do predict's plans (per thread)
        self._plannable = _plan.supported(self)

    def _followed_by_relu(self, i):
        for layer in self.layers[i + 1:]:
            if isinstance(layer, ReLU):
                return True
            if not isinstance(layer, (Flatten, MaxPool2d)):
                return False
        return False

    # -- parameters -----------------------------------------------------------------
    def parameters(self):
        """List of (key, param, grad) with keys like "0.weight"; arrays are the live ones."""
        return list(self._params)

    def num_params(self):
        return sum(int(p.size) for _, p, _ in self._params)

    def get_weights(self):
        """A copy of every parameter, as {key: array}."""
        return {k: p.copy() for k, p, _ in self._params}

    def set_weights(self, weights):
        """Copy ``weights`` ({key: array}, e.g. from get_weights) into the parameters in place."""
        params = {k: p for k, p, _ in self._params}
        missing = set(params) - set(weights)
        extra = set(weights) - set(params)
        if missing or extra:
            raise ValueError(f"set_weights: keys differ from the model's: missing "
                             f"{sorted(missing)}, unexpected {sorted(extra)}")
        for k, p in params.items():
            w = np.asarray(weights[k])
            if w.shape != p.shape:
                raise ValueError(f"set_weights: {k} must have shape {shape_str(p.shape)}, got "
                                 f"{shape_str(w.shape)}")
            p[...] = w

    def l2_penalty(self):
        """λ Σ W² over the weights (biases excluded); 0 when l2 = 0."""
        if not self._l2:
            return 0.0
        return self._l2 * sum(_kl.sum_squares(w) for w in self._weights_flat)

    # -- description ----------------------------------------------------------------
    def summary(self, file=None):
        """Print a table: layer, output shape, parameters, FLOPs per sample, totals."""
        rows = [("#", "Layer", "Output shape", "Params", "FLOPs/sample")]
        for i, layer in enumerate(self.layers):
            rows.append((str(i), layer.describe(), shape_str(layer.output_shape),
                         f"{layer.num_params():,}", f"{layer.flops():,}"))
        total_p = self.num_params()
        total_f = sum(layer.flops() for layer in self.layers)
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        fmt = lambda r: "  ".join(r[c].rjust(widths[c]) if c in (0, 3, 4) else
                                  r[c].ljust(widths[c]) for c in range(5))
        rule = "-" * len(fmt(rows[0]))
        lines = [f"Sequential: input {shape_str(self.input_shape)}, {self.dtype.name}"
                 + (f", l2={self._l2:g}" if self._l2 else ""), rule, fmt(rows[0]), rule]
        lines += [fmt(r) for r in rows[1:]]
        lines += [rule, f"Total params: {total_p:,}   FLOPs/sample (forward): {total_f:,}   "
                  f"output {shape_str(self.output_shape)}"]
        text = "\n".join(lines)
        print(text, file=file)
        return text

    def __repr__(self):
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return (f"Sequential([\n{inner}\n], input_shape={self.input_shape}, "
                f"dtype={self.dtype.name})")

    # -- boundary checks ------------------------------------------------------------
    def _check_x(self, x, where, name="x", batch=False):
        if not isinstance(x, np.ndarray):
            if x is None or isinstance(x, (str, bytes, dict)):
                raise TypeError(f"{where}: {name} must be a numeric array, got "
                                f"{type(x).__name__}")
            x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{where}: {name} must be a numeric array, got dtype {x.dtype}")
        if x.shape[1:] != self.input_shape:
            hint = " (a single sample? add a batch axis: x[None])" \
                if x.shape == self.input_shape else ""
            raise ValueError(f"{where}: {name} must have shape Nx{shape_str(self.input_shape)}, "
                             f"got {shape_str(x.shape)}{hint}")
        if batch and x.shape[0] * self._max_sample > INT32_MAX:
            raise ValueError(f"{where}: a batch of {x.shape[0]} needs "
                             f"{x.shape[0] * self._max_sample} elements in one layer buffer; "
                             f"at most {INT32_MAX} are supported (use a smaller batch)")
        if x.dtype != self.dtype or not x.flags.c_contiguous:
            need = x.size * self.dtype.itemsize
            if need > _physical_memory():  # e.g. a broadcast view: refuse before allocating
                raise ValueError(f"{where}: {name} of shape {shape_str(x.shape)} needs a "
                                 f"{need / 2**30:.1f} GiB {self.dtype.name} copy, more than "
                                 f"this machine's memory")
            x = np.ascontiguousarray(x, dtype=self.dtype)
        return x

    def _check_optimizer(self, optimizer, where):
        if not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"{where}: optimizer must be a cdl optimizer (e.g. cdl.SGD(model, "
                            f"lr=0.01)), got {type(optimizer).__name__}")
        if getattr(optimizer, "model", self) is not self:
            raise ValueError(f"{where}: the optimizer was built for another model; create it "
                             f"with this model: cdl.SGD(model, ...)")

    def _check_loss(self, loss, where):
        if not isinstance(loss, Loss):
            raise TypeError(f"{where}: loss must be a cdl loss (e.g. cdl.SoftmaxCrossEntropy()), "
                            f"got {type(loss).__name__}")
        if len(self.output_shape) != 1:
            raise ValueError(f"{where}: the model's output {shape_str(self.output_shape)} must "
                             f"be flat (N, C) for a loss; end with Flatten/Linear")

    def _check_y(self, y, n, loss, where, name="y"):
        return loss.check_targets(y, n, self.output_shape[0], self.dtype, where, name)

    # -- passes ---------------------------------------------------------------------
    def _forward(self, x, nt):
        n = x.shape[0]
        for i, layer, fused in self._passes:
            ws = layer._workspace(n)
            if fused:
                self.layers[i - 1]._last = None
                y = layer._forward_relu(x, ws, nt, True)
            else:
                y = layer._forward(x, ws, nt, True)
            layer._last = (x, ws)
            x = y
        return x

    def _backward(self, g, nt, stop, need_input_grad=False):
        """Back-propagate g down to layer ``stop``; its input gradient only if asked."""
        l2 = self._l2
        for i, layer, fused in reversed(self._passes):
            if i < stop:
                break
            x, ws = layer._last
            if fused:
                # The pair's ReLU (i - 1) has no parameters, so it is never `stop`
                # unless stop is 0, where the input gradient is wanted anyway.
                g = layer._backward_relu(g, x, ws, nt)
            else:
                g = layer._backward(g, x, ws, nt, i > stop or need_input_grad, l2)
        return g

    def forward(self, x):
        """Training-mode forward pass (keeps what backward needs); returns a copy of the output."""
        x = self._check_x(x, "Sequential.forward", batch=True)
        if x.shape[0] == 0:
            raise ValueError("Sequential.forward: x is an empty batch")
        return self._forward(x, _config.get_num_threads()).copy()

    def backward(self, grad):
        """Back-propagate dL/d(output); fills every layer's grads; returns dL/dx (a copy)."""
        last = self.layers[-1]._last
        if last is None:
            raise RuntimeError("Sequential.backward: call forward first")
        n = last[0].shape[0]
        g = check_grad(grad, (n,) + self.output_shape, self.dtype, "Sequential.backward")
        return self._backward(g, _config.get_num_threads(), 0, need_input_grad=True).copy()

    def predict(self, x, batch_size=None):
        """Inference in batches of ``batch_size`` (default 256); stores nothing for backward.

        Thread-safe: each call uses its own buffers, so several threads may predict at once.
        """
        x = self._check_x(x, "Sequential.predict")
        n = x.shape[0]
        bs = 256 if batch_size is None else batch_size
        if isinstance(bs, (bool, np.bool_)) or not isinstance(bs, numbers.Integral):
            raise TypeError(f"Sequential.predict: batch_size must be an int, got {batch_size!r}")
        bs = int(bs)
        if bs < 1:
            raise ValueError(f"Sequential.predict: batch_size must be >= 1, got {batch_size!r}")
        out = np.empty((n,) + self.output_shape, self.dtype)
        if n == 0:
            return out
        nt = _config.get_num_threads()
        bufs = {}
        for s in range(0, n, bs):
            e = min(s + bs, n)
            m = e - s
            plan = self._forward_plan(m)
            if plan is not None:
                out[s:e] = plan.run(x[s:e], nt)
                continue
            wss = bufs.get(m)
            if wss is None:
                wss = bufs[m] = [layer._alloc(m, False) for layer in self.layers]
            h = x[s:e]
            for i, layer, fused in self._passes:
                if fused:
                    h = layer._forward_relu(h, wss[i], nt, False)
                else:
                    h = layer._forward(h, wss[i], nt, False)
            out[s:e] = h
        return out

    def _forward_plan(self, m):
        """predict's ForwardPlan for batch size m, or None (no plan for this model).

        Each thread keeps its own (two batch sizes), so concurrent predicts never
        share buffers. Batches whose buffers would exceed 4 MB run layer by layer
        on buffers freed after the call (a large predict does not hold its memory,
        and there the per-call overhead a plan saves is small)."""
        if not (self._use_plans and self._plannable):
            return None
        plans = getattr(self._local, "plans", [])
        for plan in plans:
            if plan.n == m:
                return plan
        if m * self._act_per_sample * self.dtype.itemsize > _PLAN_CACHE_BYTES:
            return None
        plan = _plan.ForwardPlan(self, m)
        self._local.plans = [plan] + plans[:1]
        return plan

    def evaluate(self, x, y, loss, batch_size=256):
        """(loss, accuracy) over the whole set; loss includes λ Σ W² when l2 > 0.

        Accuracy is the fraction where argmax of the scores equals the label (for
        MSE with float targets, the argmax of the target; NaN for one output).
        """
        where = "Sequential.evaluate"
        self._check_loss(loss, where)
        x = self._check_x(x, where)
        n = x.shape[0]
        if n == 0:
            raise ValueError(f"{where}: x is empty")
        y = self._check_y(y, n, loss, where)
        scores = self.predict(x, batch_size)
        return self._score(scores, y, loss, batch_size or 256)

    def _score(self, scores, y, loss, bs):
        nt = _config.get_num_threads()
        n = scores.shape[0]
        total = 0.0
        for s in range(0, n, bs):
            e = min(s + bs, n)
            part = loss._compute(scores[s:e], y[s:e], nt, need_grad=False)
            total += part * (e - s) if loss.reduction == "mean" else part
        value = total / n if loss.reduction == "mean" else total
        value += self.l2_penalty()
        labels = _accuracy_labels(y, self.output_shape[0])
        acc = float("nan") if labels is None else \
            float(np.count_nonzero(np.argmax(scores, axis=1) == labels)) / n
        return float(value), acc

    # -- training -------------------------------------------------------------------
    def train_step(self, x, y, loss, optimizer):
        """One forward, backward and update; returns the loss before the update.

        The loss includes λ Σ W² when l2 > 0. The input gradient is not computed. If
        the loss is NaN or infinite the update is skipped (weights stay finite).
        Buffers are reused, so nothing is allocated once a batch size has been seen.
        """
        where = "Sequential.train_step"
        x = self._check_x(x, where, batch=True)
        n = x.shape[0]
        if n == 0:
            raise ValueError(f"{where}: x is an empty batch")
        self._check_loss(loss, where)
        self._check_optimizer(optimizer, where)
        y = self._check_y(y, n, loss, where)
        return self._train_step(x, y, loss, optimizer, _config.get_num_threads())

    def _train_step(self, x, y, loss, optimizer, nt):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("train_step: this model is being trained from another thread; "
                               "training one model from several threads is not supported")
        try:
            plan = self._plan(x.shape[0], loss)
            if plan is not None:
                value = plan.forward(x, y, nt)
            else:
                value = loss._compute(self._forward(x, nt), y, nt)
            if self._l2:
                value += self.l2_penalty()
            if not math.isfinite(value):
                return value
            if plan is not None:
                plan.backward(nt, self._l2)
            else:
                self._backward(loss._grad, nt, self._first_trained)
            optimizer.step(nt)
            return value
        finally:
            self._lock.release()

    def _plan(self, n, loss):
        """The TrainPlan for batch size n and this loss (the last two are kept), or None
        where the model or loss has no plan (float64, a custom layer or loss)."""
        if not (self._use_plans and self._plannable and _plan.supports_loss(loss)):
            return None
        for plan in self._plans:
            if plan.n == n and plan.fits(loss):
                return plan
        plan = _plan.TrainPlan(self, n, loss)
        self._plans = [plan] + self._plans[:1]
        return plan

    def fit(self, x, y, loss, optimizer, epochs=1, batch_size=32, validation_data=None,
            validation_split=0.0, shuffle=True, callbacks=(), verbose=1):
        """Train for ``epochs`` passes over (x, y); returns a History.

        Each epoch shuffles without replacement (seeded by the model's ``seed``) and
        keeps the last partial batch. ``validation_split`` holds out the last fraction
        of the data (before shuffling). Learning-rate schedules and EarlyStopping /
        ModelCheckpoint go in ``callbacks``. Training stops with a warning naming the
        epoch and step when the loss becomes NaN or infinite (that update is skipped),
        and Ctrl-C stops it between steps; the model stays usable either way.
        ``verbose``: 0 silent, 1 progress bar (stderr), 2 one line per epoch.
        """
        where = "Sequential.fit"
        self._check_loss(loss, where)
        self._check_optimizer(optimizer, where)
        if isinstance(validation_split, (bool, np.bool_)) or \
                not isinstance(validation_split, numbers.Real):
            raise TypeError(f"{where}: validation_split must be a number in [0, 1), got "
                            f"{validation_split!r}")
        if verbose not in (0, 1, 2):
            raise ValueError(f"{where}: verbose must be 0, 1 or 2, got {verbose!r}")
        x = self._check_x(x, where)
        n_all = x.shape[0]
        y = self._check_y(y, n_all, loss, where)
        for name, value in (("epochs", epochs), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{where}: {name} must be an int >= 1, got {value!r}")
        if not 0.0 <= validation_split < 1.0:
            raise ValueError(f"{where}: validation_split must be in [0, 1), got "
                             f"{validation_split!r}")
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError(f"{where}: validation_data must be a pair (x_val, y_val)")
            xv = self._check_x(validation_data[0], where, "validation_data[0]")
            yv = self._check_y(validation_data[1], xv.shape[0], loss, where, "validation_data[1]")
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
            cb.set_context(self, optimizer)

        bs = min(int(batch_size), n)
        if bs * self._max_sample > INT32_MAX:
            raise ValueError(f"{where}: batch_size={bs} needs {bs * self._max_sample} elements "
                             f"in one layer buffer; at most {INT32_MAX} are supported")
        steps = -(-n // bs)
        nt = _config.get_num_threads()
        xb = np.empty((bs,) + self.input_shape, self.dtype)
        yb = np.empty((bs,) + y.shape[1:], y.dtype)
        acc_all = _accuracy_labels(y, self.output_shape[0])
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

        self.stop_training = False
        for cb in cbs:
            cb.on_train_begin()
        try:
            for epoch in range(epochs):
                for cb in cbs:
                    cb.on_epoch_begin(epoch)
                t0 = time.perf_counter()
                order = self._rng.permutation(n) if shuffle else np.arange(n)
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
                    value = self._train_step(xm, ym, loss, optimizer, nt)
                    if not math.isfinite(value):
                        bad_input = not np.isfinite(xm).all()
                        msg = (f"fit: loss became {value} at epoch {epoch + 1}, step {step + 1} "
                               f"of {steps}; training stopped and that update was skipped. "
                               + ("The batch contains NaN or Inf inputs." if bad_input else
                                  "Try a lower learning rate (lr) or check the data."))
                        history.stop_reason = msg
                        warnings.warn(msg, RuntimeWarning, stacklevel=2)
                        self.stop_training = True
                        break
                    loss_sum += value * m
                    done = e
                    if ab is not None:
                        np.take(acc_all, idx, out=ab[:m], mode="clip")
                        np.argmax(self.layers[-1]._last[1]["out"], axis=1, out=pred[:m])
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
                if self.stop_training and history.stop_reason:
                    break
                logs = {"loss": loss_sum / n,
                        "accuracy": correct / n if ab is not None else math.nan,
                        "lr": float(getattr(optimizer, "lr", math.nan))}
                if xv is not None:
                    logs["val_loss"], logs["val_accuracy"] = self.evaluate(xv, yv, loss)
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
                if self.stop_training:
                    break
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            for cb in cbs:
                cb.on_train_end()
        return history

    # -- persistence ----------------------------------------------------------------
    def save(self, path, optimizer=None):
        """Write architecture + weights (+ optimizer state) to one file, atomically."""
        from .serialization import save
        save(self, path, optimizer=optimizer)

    def get_config(self):
        return {"input_shape": list(self.input_shape), "dtype": self.dtype.name,
                "l2": self._l2,
                "layers": [{"type": type(l).__name__, "config": l.get_config()}
                           for l in self.layers]}


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62


def _accuracy_labels(y, num_classes):
    """Integer labels to compare with argmax(scores), or None when accuracy is undefined."""
    if y.dtype.kind in "iub":
        return y
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1).astype(np.int64)
    return None
