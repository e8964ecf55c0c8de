"""Sequential: the model. Layers in a line, shape inference, and the passes.

``Sequential(layers, input_shape, dtype, seed, l2)`` builds every layer (shape
checks happen here), packs the parameters (:class:`cdl.params.ParameterPack`)
and runs the passes: ``forward``/``backward`` (training mode), ``predict`` and
``evaluate`` (inference mode), ``compute_gradients`` and ``train_step``. The
training loop is :func:`cdl.training.fit`, reached as ``model.fit``; files are
in :mod:`cdl.io`. Layers are reached only through the layer protocol
(:mod:`cdl.layers.base`).

L2 regularisation lives on the model: ``Sequential(..., l2=λ)`` adds λ Σ W²
over the parameters each layer lists in ``decay`` (Linear and Conv2d weights)
to every reported loss, and 2λW to their gradients.
"""
import functools
import math
import threading
import weakref

import numpy as np

from . import _config, plan as _plan
from ._kernels import elementwise as _ew, losses as _kl
from .functional._checks import (FLOAT_DTYPES, INT32_MAX, int_at_least, overflows,
                                 real_number, shape_str)
from .layers.base import OWNERS, Layer, check_grad
from .layers.chain import Chain, has_params
from .losses import Loss
from .optim.base import fuses_finite_check as _fuses_finite_check
from .buffers import ResultPool, RunnerPool, nbytes_of
from .params import ParameterPack

__all__ = ["Sequential"]

__all__ = ["Sequential"]


INFERENCE_CACHE_BYTES = 256 << 20
"""predict keeps at most this many bytes of inference buffers per model (see cdl.buffers)."""


def _input_shape(shape, where="Sequential"):
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, (str, bytes, dict, set)):
        raise TypeError(f"{where}: input_shape must be a tuple of ints (per sample, "
                        f"without the batch axis), got {shape!r}")
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(f"{where}: input_shape must be a tuple of ints (per sample, "
                        f"without the batch axis), got {shape!r}") from None
    if not shape or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                            and s >= 1 for s in shape):
        raise ValueError(f"{where}: input_shape must be a non-empty tuple of ints >= 1 "
                         f"(per sample, without the batch axis), got {shape!r}")
    return tuple(int(s) for s in shape)


class Sequential:
    """``Sequential(layers, input_shape, dtype=np.float32, seed=None, l2=0.0)``.

    ``input_shape`` is one sample's shape, e.g. (1, 28, 28) or (784,). Every
    layer's output shape is computed and checked here. ``seed`` makes the
    initial weights (and fit's shuffling) reproducible bit for bit.
    """

    @property
    def onnx_output_activation(self):
        """The final Softmax or LogSoftmax ("softmax", "log_softmax") that ``cdl.onnx.load``
        left out of the model (which returns the scores before it); None otherwise. Saved,
        copied and pickled with the model."""
        return self.__dict__.get("_onnx_output_activation")

    @onnx_output_activation.setter
    def onnx_output_activation(self, value):
        if value not in (None, "softmax", "log_softmax"):
            raise ValueError(f"Sequential: onnx_output_activation must be None, 'softmax' or "
                             f"'log_softmax', got {value!r}")
        self._onnx_output_activation = value

    def __init__(self, layers, input_shape, dtype=np.float32, seed=None, l2=0.0):
        self.chain = Chain(layers, "Sequential")
        try:
            dtype = np.dtype(np.float32 if dtype is None else dtype)    # (None: the default)
        except TypeError:
            raise TypeError(f"Sequential: dtype must be float32 or float64, got {dtype!r}") from None
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"Sequential: dtype must be float32 or float64, got {dtype}")
        self.input_shape = _input_shape(input_shape)
        seen = {}
        for path, layer in self.chain.walk():
            if id(layer) in seen:
                raise ValueError(f"Sequential: layers[{path.rstrip('.')}] "
                                 f"({type(layer).__name__}) appears twice (also at "
                                 f"{seen[id(layer)]}); create a new instance for each position")
            seen[id(layer)] = path.rstrip(".")
            owner = OWNERS.get(layer)
            if owner is not None and owner() is not None:
                # building would re-shape it and move its parameters into this model's
                # pack: the other model would then train parameters no layer reads
                raise ValueError(f"Sequential: layers[{path.rstrip('.')}] "
                                 f"({type(layer).__name__}) already belongs to another "
                                 f"model; a layer holds its shapes, parameters and buffers, so "
                                 f"give each model its own (copy.deepcopy(layer) copies one)")
        self.dtype = dtype
        self.seed = seed
        self.l2 = l2
        self.stop_training = False
        if seed is not None and (isinstance(seed, (bool, np.bool_))
                                 or not isinstance(seed, (int, np.integer))):
            raise TypeError(f"Sequential: seed must be None or a non-negative int, got "
                            f"{seed!r}")
        if seed is not None and seed < 0:
            raise ValueError(f"Sequential: seed must be None or a non-negative int, got "
                             f"{seed!r}")
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()       # training passes (see _enter)
        self._build()
        for _, layer in self.chain.walk():
            OWNERS[layer] = weakref.ref(self)

    @property
    def layers(self):
        """The top-level layers, in order (a tuple: the model is built from them, so
        another architecture is another Sequential)."""
        return self.chain.layers

    @property
    def l2(self):
        return self._l2

    @l2.setter
    def l2(self, value):
        self._l2 = real_number(value, "l2", "Sequential", minimum=0)

    # -- construction ---------------------------------------------------------------
    def _build(self):
        self.output_shape = self.chain.build(self.input_shape, self.dtype, self._rng)
        everything = [layer for _, layer in self.chain.walk()]
        # Largest per-sample activation: a batch of n needs n times this in one buffer.
        self._max_sample = max([int(np.prod(self.input_shape))]
                               + [int(np.prod(l.output_shape)) for l in everything])
        slots = [(f"{p}{k}", layer, k) for p, layer in self.chain.walk() for k in layer.params]
        self.parameter_pack = ParameterPack(slots, self.dtype)
        self._params = [(name, layer.params[k], layer.grads[k]) for name, layer, k in slots]
        self._buffers = [(f"{p}{k}", layer, k) for p, layer in self.chain.walk()
                         for k in layer.buffers]
        self._weights_flat = [layer.params[k].reshape(-1) for _, layer in self.chain.walk()
                              for k in layer.decay]
        self._results = ResultPool()
        self._use_plans = True

    @property
    def _use_plans(self):
        return self._plans_on

    @_use_plans.setter
    def _use_plans(self, value):
        self._plans_on = bool(value)
        self._reset_plans()

    def _reset_plans(self):
        self._plans = []                    # TrainPlans (the last two batch sizes)
        self._plannable = _plan.supported(self)
        self._runners = RunnerPool(INFERENCE_CACHE_BYTES)

    def _make_runner(self, n):
        """predict's runner for batch size n: a ForwardPlan, or layer-by-layer buffers."""
        if self._plans_on and self._plannable:
            return _plan.ForwardPlan(self, n)
        return _LayerRunner(self, n)

    @property
    def parameter_buffer(self):
        """Every parameter in one flat, aligned buffer (None without parameters); each
        parameter is a view of it (see :class:`cdl.params.ParameterPack`)."""
        return self.parameter_pack.params

    @property
    def gradient_buffer(self):
        """Every gradient in one flat buffer laid out like ``parameter_buffer``."""
        return self.parameter_pack.grads

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
        """Copy ``weights`` ({key: array}, e.g. from get_weights) into the parameters in
        place. Everything is checked first, as in ``load_state_dict``."""
        params = {k: p for k, p, _ in self._params}
        values = _checked_values(params, weights, "Sequential.set_weights", "the weights dict")
        self._enter("Sequential.set_weights")   # not in the middle of another thread's step
        try:
            for k, v in values.items():
                params[k][...] = v
        finally:
            self._lock.release()

    def buffers(self):
        """List of (key, array) of the layers' buffers ("1.running_mean", ...), live."""
        return [(name, layer.buffers[k]) for name, layer, k in self._buffers]

    def state_dict(self):
        """Every parameter and buffer as a flat {name: NumPy array} (copies), with the
        names of the equivalent ``torch.nn.Sequential``: "0.weight", "1.running_mean",
        "3.layers.0.weight", ..."""
        state = {}
        for path, layer in self.chain.walk():
            for k, a in layer.params.items():
                state[f"{path}{k}"] = a.copy()
            for k, a in layer.buffers.items():
                state[f"{path}{k}"] = a.copy()
        return state

    def _state_targets(self):
        return {f"{p}{k}": a for p, layer in self.chain.walk()
                for d in (layer.params, layer.buffers) for k, a in d.items()}

    def load_state_dict(self, state, where="Sequential.load_state_dict"):
        """Load a flat {name: array} (as ``state_dict`` gives, or a PyTorch state dict
        converted to NumPy). Everything is checked before anything changes: one
        ValueError names every missing, unexpected or mis-shaped key."""
        targets = self._state_targets()
        values = _checked_values(targets, state, where)
        self._enter(where)          # not in the middle of another thread's step
        try:
            for k, v in values.items():
                targets[k][...] = v
        finally:
            self._lock.release()

    def l2_penalty(self):
        """λ Σ W² over the decayed parameters (Linear and Conv2d weights); 0 when l2 = 0."""
        if not self._l2:
            return 0.0
        return self._l2 * sum(_kl.sum_squares(w) for w in self._weights_flat)

    # -- description ----------------------------------------------------------------
    def summary(self, file=None):
        """Print a table: layer, output shape, parameters, FLOPs per sample, totals."""
        if file is not None and not callable(getattr(file, "write", None)):
            raise TypeError(f"Sequential.summary: file must be a text stream (e.g. "
                            f"sys.stdout or open(path, 'w')), got {type(file).__name__}")
        rows = [("#", "Layer", "Output shape", "Params", "FLOPs/sample")]
        total_f = 0
        for path, layer in self.chain.walk():
            depth = path.count(".") - 1
            name = path.rstrip(".")
            label = "  " * (depth // 2) + layer.describe()
            rows.append((name, label, shape_str(layer.output_shape),
                         f"{layer.num_params():,}", f"{layer.flops():,}"))
            total_f += layer.flops()
        total_p = self.num_params()
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        fmt = lambda r: "  ".join(r[c].rjust(widths[c]) if c in (3, 4) else  # noqa: E731
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
                f"dtype={self.dtype.name}" + (f", l2={self._l2!r})" if self._l2 else ")"))

    # -- boundary checks ------------------------------------------------------------
    def _check_x(self, x, where, name="x", batch=False):
        if not isinstance(x, np.ndarray):
            if x is None or isinstance(x, (str, bytes, dict)):
                raise TypeError(f"{where}: {name} must be a numeric array, got "
                                f"{type(x).__name__}")
            from .functional.losses import _as_array    # (names x for ragged lists)
            x = _as_array(x, name, where)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{where}: {name} must be a numeric array, got dtype {x.dtype}")
        if x.shape[1:] != self.input_shape:
            hint = " (a single sample? add a batch axis: x[None])" \
                if x.shape == self.input_shape else ""
            raise ValueError(f"{where}: {name} must have shape Nx{shape_str(self.input_shape)}, "
                             f"got {shape_str(x.shape)}{hint}")
        if batch:
            self._check_batch_elements(x.shape[0], where, "use a smaller batch")
        if x.dtype != self.dtype or not x.flags.c_contiguous:
            need = x.size * self.dtype.itemsize
            # e.g. a broadcast view: refuse before allocating
            if need > (_config.physical_memory() or 2**62):
                raise ValueError(f"{where}: {name} of shape {shape_str(x.shape)} needs a "
                                 f"{need / 2**30:.1f} GiB {self.dtype.name} copy, more than "
                                 f"this machine's memory")
            x = np.ascontiguousarray(x, dtype=self.dtype)
        return x

    def _check_optimizer(self, optimizer, where):
        from .optim.base import Optimizer
        # A cdl.Optimizer, or a wrapper that steps one (DistributedOptimizer): anything
        # else (the class itself, a torch.optim optimizer) would fail only after the
        # forward pass had changed BatchNorm's statistics and Dropout's counter.
        if not isinstance(optimizer, Optimizer) and \
                not isinstance(getattr(optimizer, "optimizer", None), Optimizer):
            if isinstance(optimizer, type):
                got = (f"the class {optimizer.__module__}.{optimizer.__qualname__}; make one "
                       f"first: {optimizer.__name__}(model, lr=0.01)")
            else:
                kind = type(optimizer)
                got = (kind.__qualname__ if kind.__module__ == "builtins"
                       else f"{kind.__module__}.{kind.__qualname__}")
            raise TypeError(f"{where}: optimizer must be a cdl optimizer (e.g. cdl.SGD(model, "
                            f"lr=0.01)), got {got}")
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
    def _forward(self, x, nt, out=None):
        n = x.shape[0]
        self._last_n = None     # a forward that raises leaves no state for backward
        y = self.chain.forward(x, nt, True, lambda layer: layer._workspace(n), out)
        self._last_n = n
        return y

    def _backward(self, g, nt, need_input_grad=False):
        """Back-propagate g; the input gradient only if asked (otherwise layers before
        the first one with parameters are skipped)."""
        return self.chain.backward(g, nt, need_input_grad, self._l2)

    def forward(self, x, out=None):
        """Training-mode forward pass (keeps what backward needs); returns the output in
        a new array (reused memory, never one the caller still holds), or in ``out``,
        which must not share memory with x."""
        where = "Sequential.forward"
        x = self._check_x(x, where, batch=True)
        if x.shape[0] == 0:
            raise ValueError(f"{where}: x is an empty batch")
        out = self._result(out, (x.shape[0],) + self.output_shape, where)
        if np.may_share_memory(out, x):
            raise ValueError(f"{where}: out shares memory with x, which the layers keep for "
                             f"backward; pass another array")
        # the last layer writes straight into out when its backward does not read it
        self._enter(where)
        try:
            self._forward(x, _config.step_threads(), out)
        finally:
            self._lock.release()
            _config.restore_blas()
        return out

    def backward(self, grad, out=None):
        """Back-propagate dL/d(output); fills every layer's grads; returns dL/dx in a new
        array, or in ``out``."""
        where = "Sequential.backward"
        n = getattr(self, "_last_n", None)
        if n is None:
            raise RuntimeError(f"{where}: call forward first (again, if one of its layers' own "
                               f"forward or backward ran since: they share its buffers)")
        g = check_grad(grad, (n,) + self.output_shape, self.dtype, where)
        out = self._result(out, (n,) + self.input_shape, where)
        # the first layer writes its input gradient straight into out (no copy)
        self._enter(where)
        try:
            self.chain.backward(g, _config.step_threads(), True, self._l2, out=out)
        finally:
            self._lock.release()
            _config.restore_blas()
        return out

    def _enter(self, where):
        """Take the training passes' buffers for this call (release ``_lock`` after):
        a second thread in a training pass of the same model (or in its ``fit``) is
        refused, not left to corrupt them; the thread holding it may enter again."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{where}: this model is being trained from another thread; "
                               f"training one model from several threads is not supported")

    def predict(self, x, batch_size=None, out=None):
        """Inference in batches of ``batch_size`` (default 256); stores nothing for backward.

        Returns a new array, or fills ``out`` (shape ``(N,) + output_shape``, the
        model's dtype, C order, not sharing memory with x) and returns it. Arrays returned earlier are never overwritten
        while anything refers to them; once dropped, their memory is reused.
        Thread-safe: concurrent calls use separate buffers. Inference buffers are
        kept per batch size, at most ``cdl.model.INFERENCE_CACHE_BYTES`` per model, and
        arrays to return at most ``cdl.buffers.RESULT_POOL_BYTES``; neither keeps x.
        """
        where = "Sequential.predict"
        x = self._check_x(x, where)
        n = x.shape[0]
        bs = _batch_size(batch_size, where)
        self._check_batch_elements(min(n, bs), where, "pass a smaller batch_size")
        step = _config.step_threads
        # Runners go back to the pool they came from: a layer setting changed meanwhile
        # (another thread's) puts in a new pool, where a runner built before the change
        # would serve every later call of its batch size.
        pool = self._runners
        if out is None and 0 < n <= bs:
            # One batch, no out= (most calls): the result is a copy of the runner's.
            runner = pool.acquire(n, self._make_runner)
            try:
                return self._results.copy_of(runner.run(x, step()))
            finally:
                pool.release(runner, n)
                _config.restore_blas()
        out = self._result(out, (n,) + self.output_shape, where)
        if np.may_share_memory(out, x):
            raise ValueError(f"{where}: out shares memory with x (a batch's results would "
                             f"overwrite inputs not yet read); pass another array")
        if n == 0:
            return out
        try:
            for s in range(0, n, bs):
                e = min(s + bs, n)
                runner = pool.acquire(e - s, self._make_runner)
                try:
                    out[s:e] = runner.run(x[s:e], step())
                finally:
                    pool.release(runner, e - s)
        finally:
            _config.restore_blas()
        return out

    def _check_batch_elements(self, n, where, hint):
        if n * self._max_sample > INT32_MAX:
            raise ValueError(f"{where}: a batch of {n} needs {n * self._max_sample} elements "
                             f"in one layer buffer; at most {INT32_MAX} are supported ({hint})")

    def _result(self, out, shape, where):
        """``out`` checked, or an array from the result pool."""
        if out is None:
            return self._results.get(shape, self.dtype)
        problem = _out_problem(out, shape, self.dtype)
        if problem:
            raise ValueError(f"{where}: out must be a writeable C-contiguous {self.dtype} array "
                             f"of shape {shape_str(shape)}, got {problem}")
        return out

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
        bs = _batch_size(batch_size, where)
        self._check_batch_elements(min(n, bs), where, "pass a smaller batch_size")
        return self._score(self.predict(x, bs), y, loss, bs)

    def _score(self, scores, y, loss, bs):
        nt = _config.step_threads()
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
        the loss is NaN or infinite the update is skipped (weights stay finite); if the
        loss is finite but a gradient is not (an overflow, or 0 · Inf from an infinite
        input), the update is skipped too and NaN is returned.
        Buffers are reused, so nothing is allocated once a batch size has been seen.

        Between the backward pass and ``optimizer.step()`` the optimizer's
        ``gradient_hook(loss_value, batch_size, threads)`` runs and its value decides
        the step (see :meth:`cdl.Optimizer.gradient_hook`). SGD and Adam run that step's
        update with the gradient check inside their kernel (``fuses_finite_check``). With a
        :class:`cdl.distributed.DistributedOptimizer`, x and y are this rank's shard;
        the gradients of all ranks are averaged over the global sample count before
        the update, and the value returned is the global loss (the same on every rank).
        """
        where = "Sequential.train_step"
        x, y = self._check_batch(x, y, loss, where)
        self._check_optimizer(optimizer, where)
        check = getattr(optimizer, "check_loss", None)
        if check is not None:
            check(loss, where)
        return self._train_step(x, y, loss, optimizer, _config.step_threads())

    def compute_gradients(self, x, y, loss):
        """Forward and backward with no update: fills the gradients (``gradient_buffer``)
        and returns the loss, L2 included. A non-finite loss leaves the gradients as
        they are (nothing is back-propagated)."""
        x, y = self._check_batch(x, y, loss, "Sequential.compute_gradients")
        return self._train_step(x, y, loss, None, _config.step_threads())

    def _check_train_batch(self, n):
        """Raise ValueError if a layer cannot train on a batch of n (check_train_batch)."""
        for _, layer in self.chain.walk():
            layer.check_train_batch(n)

    def _check_batch(self, x, y, loss, where):
        x = self._check_x(x, where, batch=True)
        if x.shape[0] == 0:
            raise ValueError(f"{where}: x is an empty batch")
        self._check_loss(loss, where)
        return x, self._check_y(y, x.shape[0], loss, where)

    def _gradients(self, x, y, loss, nt):
        plan = self._plan(x.shape[0], loss)
        if plan is not None:
            value = plan.forward(x, y, nt)
            self._scores = plan.output
        else:
            self._scores = self._forward(x, nt)
            value = loss._compute(self._scores, y, nt)
        self._last_n = x.shape[0]
        self._step_penalty = self.l2_penalty() if self._l2 else 0.0
        value += self._step_penalty
        if not math.isfinite(value):
            return value
        if plan is not None:
            plan.backward(nt, self._l2)
        else:
            self._backward(loss._grad, nt)
        return value

    def _train_step(self, x, y, loss, optimizer, nt):
        """Gradients, the optimizer's gradient hook, then ``optimizer.step`` when the
        value is finite (no optimizer: gradients only, as compute_gradients)."""
        self._enter("train_step")
        try:
            # An optimizer may ask for the batch in micro-batches (cdl.distributed's
            # fixed gradient shards): then the hook runs after each one's backward pass
            # and the value of the last call decides the step.
            if optimizer is None:
                return self._gradients(x, y, loss, nt)
            split = getattr(optimizer, "micro_batches", None)
            pieces = None if split is None else split(x.shape[0])
            if pieces is not None:
                return self._micro_step(x, y, loss, optimizer, pieces, nt)
            value = self._gradients(x, y, loss, nt)
            # The gradient hook (Optimizer.gradient_hook) runs on every step, also when the
            # loss is not finite, and its value decides the step: a DistributedOptimizer
            # averages the ranks' gradients here and returns the global loss (NaN on every
            # rank when any rank's loss or gradient is not finite).
            hook = getattr(optimizer, "gradient_hook", None)
            if hook is not None:
                value = hook(value, x.shape[0], nt)
            return self._step_if_finite(value, optimizer, nt)
        finally:
            self._lock.release()
            _config.restore_blas()

    def _micro_step(self, x, y, loss, optimizer, pieces, nt):
        n = x.shape[0]
        scores = getattr(self, "_micro_scores", None)
        if scores is None or scores.shape[0] < n:
            scores = self._micro_scores = np.empty((n,) + self.output_shape, self.dtype)
        value = math.nan
        for lo, hi in pieces:
            v = 0.0
            if hi > lo:
                v = self._gradients(x[lo:hi], y[lo:hi], loss, nt)
                scores[lo:hi] = self._scores
            value = optimizer.gradient_hook(v, hi - lo, nt)
        self._scores = scores[:n]
        return self._step_if_finite(value, optimizer, nt)

    def _step_if_finite(self, value, optimizer, nt):
        """``optimizer.step`` when ``value`` and every gradient are finite; returns
        ``value``, or NaN when it is finite but a gradient is not (the step is then
        skipped; ``_skip_reason`` says why, for fit's message). An optimizer that
        fuses the gradient check into its update kernel runs it there."""
        self._skip_reason = None
        if not math.isfinite(value):
            return value
        if _fuses_finite_check(optimizer):
            stepped = optimizer._step_if_finite(nt)
        else:
            stepped = self._gradients_finite(nt)
            if stepped:
                optimizer.step(nt)
        if not stepped:
            self._skip_reason = f"a gradient was not finite (the loss was {value:.6g})"
            return math.nan
        return value

    def _gradients_finite(self, nt):
        """Whether no gradient is NaN or infinite (one scan of the flat buffer, by a
        check bound on first use: a batch-1 step runs it every time)."""
        check = self.__dict__.get("_finite_check")
        if check is None:
            grads = self.parameter_pack.grads
            check = self._finite_check = (
                (lambda nt: True) if grads is None else _ew.AllFinite(grads).run
                if grads.dtype == np.float32 else functools.partial(_ew.all_finite, grads))
        return check(nt)

    def _plan(self, n, loss):
        """The TrainPlan for batch size n and this loss (the last two are kept), or None
        where the model or loss has no plan (float64, a custom loss)."""
        if not (self._use_plans and self._plannable and _plan.supports_loss(loss)):
            return None
        for plan in self._plans:
            if plan.n == n and plan.fits(loss):
                return plan
        plan = _plan.TrainPlan(self, n, loss)
        self._plans = [plan] + self._plans[:1]
        return plan

    def fit(self, x, y, loss, optimizer, epochs=1, batch_size=32, validation_data=None,
            validation_split=0.0, shuffle=True, callbacks=(), verbose=1, comm=None,
            shard=True, initial_epoch=0):
        """Train for ``epochs`` passes over (x, y); returns a History. See
        :func:`cdl.training.fit` for the details (``comm``, ``shard``: distributed
        training over MPI)."""
        from .training import fit
        return fit(self, x, y, loss, optimizer, epochs=epochs, batch_size=batch_size,
                   validation_data=validation_data, validation_split=validation_split,
                   shuffle=shuffle, callbacks=callbacks, verbose=verbose, comm=comm,
                   shard=shard, initial_epoch=initial_epoch)

    # -- persistence ----------------------------------------------------------------
    def save(self, path, optimizer=None):
        """Write architecture + weights (+ optimizer state) to one file, atomically."""
        from .io.format import save
        save(self, path, optimizer=optimizer)

    def save_state_dict(self, path, format=None):
        """Write ``state_dict()`` to a ``.safetensors`` file (needs the safetensors
        package: ``pip install cdl-cpu[safetensors]``) or a ``.npz``, atomically; PyTorch
        reads the former with ``safetensors.torch.load_file``. ``cdl.load_state_dict_file``
        reads either back."""
        from .io.state_files import save_state_dict
        save_state_dict(self, path, format)

    def get_config(self):
        config = {"input_shape": list(self.input_shape), "dtype": self.dtype.name,
                  "l2": self._l2,
                  "layers": [l.spec() for l in self.layers]}
        if self.onnx_output_activation is not None:
            config["onnx_output_activation"] = self.onnx_output_activation
        return config

    def __reduce__(self):
        # Pickling (and copy.deepcopy, multiprocessing, Dask...) goes through the safe
        # model format: unpickling builds registered layers only, and the copy owns
        # its buffers and trains bit for bit like this model.
        from .io.format import _unpickle, dumps
        return _unpickle, (dumps(self),)


def _batch_size(batch_size, where):
    """predict's and evaluate's batch size: None gives 256."""
    return 256 if batch_size is None else int_at_least(batch_size, "batch_size", where, 1)


def _checked_values(targets, state, where, what="the state dict"):
    """{key: array} for copying ``state`` into ``targets`` (both {key: array}), after
    every check: one ValueError names every missing, unexpected, mis-shaped, wrongly
    typed or out-of-range key, so that nothing changes unless everything can."""
    if not hasattr(state, "keys"):
        raise TypeError(f"{where}: expected a dict of arrays, got {type(state).__name__}")
    problems = []
    missing = sorted(set(targets) - set(state))
    extra = sorted(set(state) - set(targets), key=str)
    if missing:
        problems.append(f"missing keys {missing}")
    if extra:
        problems.append(f"unexpected keys {extra}")
    values = {}
    for k in sorted(set(targets) & set(state)):
        t = targets[k]
        try:
            v = np.asarray(state[k])
        except Exception as exc:  # e.g. an object that is not array-like
            problems.append(f"{k} is not an array ({exc})")
            continue
        problem = _value_problem(v, t)
        if problem:
            problems.append(f"{k} {problem}")
        else:
            values[k] = v
    if problems:
        raise ValueError(f"{where}: {what} does not match the model: " + "; ".join(problems))
    return values


def _value_problem(v, t):
    """Why array v cannot be copied into t exactly enough (None if it can)."""
    if v.dtype.kind not in "fiub":
        return f"is not a numeric array (dtype {v.dtype}); the model needs {t.dtype} " \
               f"{shape_str(t.shape)}"
    if v.shape != t.shape:
        return f"has shape {shape_str(v.shape)}, the model needs {shape_str(t.shape)}"
    if t.dtype.kind == "f" and v.dtype.kind not in "fiu":
        return f"has dtype {v.dtype}, the model needs {t.dtype}"
    if t.dtype.kind == "i" and v.dtype.kind not in "iu":
        return f"has dtype {v.dtype}, the model needs an integer"
    if overflows(v, t.dtype):
        return f"overflows {t.dtype}"
    if t.dtype.kind == "i" and v.size:
        lo, hi = np.iinfo(t.dtype).min, np.iinfo(t.dtype).max
        if int(v.min()) < lo or int(v.max()) > hi:
            return f"holds values outside {t.dtype}'s range"
    return None


def _out_problem(out, shape, dtype):
    """What is wrong with ``out`` for a result of ``shape`` and ``dtype`` (None: nothing),
    naming the requirement it fails."""
    if not isinstance(out, np.ndarray):
        return f"{type(out).__name__}, not a NumPy array"
    what = f"{out.dtype} {shape_str(out.shape)}"
    if out.dtype != dtype:
        return f"{what} (wrong dtype)"
    if out.shape != shape:
        return f"{what} (wrong shape)"
    if not out.flags.c_contiguous:
        return f"{what} that is not C-contiguous (a transposed or strided view?)"
    if not out.flags.writeable:
        return f"{what} that is read-only"
    return None


class _LayerRunner:
    """predict's layer-by-layer passes for batch size n on buffers of its own (models
    without a plan: float64, or an output that is a view of the input)."""

    def __init__(self, model, n):
        self.chain = model.chain
        self.ws = {id(layer): layer._alloc(n, False) for _, layer in model.chain.infer_passes}
        self.nbytes = nbytes_of(self.ws.values())

    def run(self, x, nt):
        ws = self.ws
        return self.chain.forward(x, nt, False, lambda layer: ws[id(layer)])


def _accuracy_labels(y, num_classes):
    """Integer labels to compare with argmax(scores), or None when accuracy is undefined."""
    if y.dtype.kind in "iub":
        return y
    if y.ndim == 2 and y.shape[1] > 1:
        return np.argmax(y, axis=1).astype(np.int64)
    return None
