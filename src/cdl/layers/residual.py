"""Residual: y = F(x) + S(x), with F and S chains of layers."""
import numpy as np

from .._kernels import elementwise as _ew
from ..functional._checks import shape_str
from .base import LAYER_TYPES, Layer, bind_op, overrides_builtin_passes
from .chain import Chain, Op, replay

__all__ = ["Residual", "layer_from_spec"]


def layer_from_spec(spec, where="layer"):
    """Build a layer from ``{"type": name, "config": {...}}`` (only registered types)."""
    if not isinstance(spec, dict) or spec.get("type") not in LAYER_TYPES:
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise ValueError(f"{where}: unknown layer type {kind!r}")
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{where}: malformed config {config!r}")
    return LAYER_TYPES[spec["type"]].from_config(config)


class Residual(Layer):
    """``Residual(layers, shortcut=None)`` computes y = F(x) + S(x).

    F runs ``layers`` in order; S is the identity when ``shortcut`` is None, or
    else runs the ``shortcut`` layers (e.g. a 1×1 stride-2 Conv2d and a
    BatchNorm2d). Both must give the same shape, checked when the model is
    built. A ReLU after the sum is an ordinary next layer, run in this layer's
    pass. State-dict names: ``<i>.layers.<j>.*`` and ``<i>.shortcut.<j>.*``.
    """

    fuses_l2 = True             # passes l2 on to the layers inside

    def __init__(self, layers, shortcut=None):
        super().__init__()
        if isinstance(layers, Layer) or not hasattr(layers, "__iter__"):
            raise TypeError(f"Residual: layers must be a list of cdl layers, got "
                            f"{type(layers).__name__}")
        self.body = Chain(layers, "Residual: layers")
        if shortcut is not None and (isinstance(shortcut, Layer)
                                     or not hasattr(shortcut, "__iter__")):
            raise TypeError(f"Residual: shortcut must be None or a list of cdl layers, got "
                            f"{type(shortcut).__name__}")
        self.shortcut = None if shortcut is None else Chain(shortcut, "Residual: shortcut")
        seen = set()
        for layer in self.body.layers + (self.shortcut.layers if self.shortcut else ()):
            if id(layer) in seen:
                raise ValueError(f"Residual: {type(layer).__name__} appears twice; create a "
                                 f"new instance for each position")
            seen.add(id(layer))

    def children(self):
        kids = [("layers", self.body)]
        if self.shortcut is not None:
            kids.append(("shortcut", self.shortcut))
        return kids

    def get_config(self):
        return {"layers": [l.spec() for l in self.body],
                "shortcut": None if self.shortcut is None else [l.spec() for l in self.shortcut]}

    @classmethod
    def from_config(cls, config):
        layers = config.get("layers")
        shortcut = config.get("shortcut")
        if not isinstance(layers, list) or not (shortcut is None or isinstance(shortcut, list)):
            raise ValueError("Residual: config needs a list 'layers' and a list or None "
                             "'shortcut'")
        return cls([layer_from_spec(s, "Residual") for s in layers],
                   None if shortcut is None else
                   [layer_from_spec(s, "Residual") for s in shortcut])

    @classmethod
    def declared_params(cls, config):
        total = 0
        for spec in (config.get("layers") or []) + (config.get("shortcut") or []):
            if isinstance(spec, dict) and spec.get("type") in LAYER_TYPES \
                    and isinstance(spec.get("config"), dict):
                total += LAYER_TYPES[spec["type"]].declared_params(spec["config"])
        return total

    def __repr__(self):
        inner = ", ".join(repr(l) for l in self.body)
        sc = "None" if self.shortcut is None else "[" + ", ".join(repr(l) for l in self.shortcut) + "]"
        return f"Residual([{inner}], shortcut={sc})"

    def describe(self):
        return "Residual(+ identity)" if self.shortcut is None else "Residual(+ shortcut)"

    def absorbs_next(self, layer):
        return layer.activation == "relu"

    def to_onnx(self, graph, x):
        # the branches, joined by Add (a ReLU after it is the next layer, exported as such;
        # the fused pass is a runtime detail). ONNX import builds Residual from such Adds
        # (cdl.io.onnx), so it declares no op of its own.
        f = self.body.to_onnx(graph, x)
        s = x if self.shortcut is None else self.shortcut.to_onnx(graph, x)
        return graph.node("Add", [f, s], self)

    def flops(self):
        self._check_built("flops")
        return int(np.prod(self.output_shape))

    # -- set-up ----------------------------------------------------------------------
    def build(self, input_shape, dtype, index=None, source=None, rng=None, init=None,
              keep_params=False):
        if index is not None:
            self.path = str(index)
        self.dtype = np.dtype(dtype)
        self.input_shape = tuple(int(s) for s in input_shape)
        rng = np.random.default_rng() if rng is None else rng
        prefix = "" if self.path is None else f"{self.path}."
        src = f"from {self.name} input {shape_str(self.input_shape)}"
        out_f = self.body.build(self.input_shape, dtype, rng, f"{prefix}layers.", src)
        out_s = self.input_shape if self.shortcut is None else \
            self.shortcut.build(self.input_shape, dtype, rng, f"{prefix}shortcut.", src)
        if tuple(out_f) != tuple(out_s):
            raise ValueError(f"{self.name}: the branches' outputs differ: layers give "
                             f"{self._trace(self.body)}, shortcut gives "
                             + ("the identity " + shape_str(self.input_shape)
                                if self.shortcut is None else self._trace(self.shortcut))
                             + f" ({source or 'input ' + shape_str(input_shape)})")
        self.output_shape = tuple(out_f)
        self.fused_previous = self.fused_next = False
        self._ws, self._last = {}, None
        return self.output_shape

    def _trace(self, chain):
        steps = [shape_str(self.input_shape)]
        for layer in chain:
            steps.append(f"{layer.describe()} -> {shape_str(layer.output_shape)}")
        return " -> ".join(steps)

    def _alloc(self, n, train):
        out = np.empty((n,) + self.output_shape, self.dtype)
        ws = {"out": out, "out_flat": out.reshape(-1)}
        if train:
            dx = np.empty((n,) + self.input_shape, self.dtype)
            ws.update(dx=dx, dx_flat=dx.reshape(-1))
            if self.fused_next:
                ws["g"] = np.empty_like(out)
        else:
            ws["inner"] = {id(l): l._alloc(n, False)
                           for _, chain in self.children() for _, l in chain.infer_passes}
        return ws

    def _workspaces(self, n, ws, train):
        if train:
            return lambda layer: layer._workspace(n)
        inner = ws["inner"]
        return lambda layer: inner[id(layer)]

    # -- passes -----------------------------------------------------------------------
    def _forward(self, x, ws, nt, train):
        workspace = self._workspaces(x.shape[0], ws, train)
        f = self.body.forward(x, nt, train, workspace)
        s = x if self.shortcut is None else self.shortcut.forward(x, nt, train, workspace)
        _ew.add(f.reshape(-1), s.reshape(-1), ws["out_flat"], self._runs_next(ws), nt)
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if self._runs_next(ws):
            _ew.relu_backward(g.reshape(-1), ws["out_flat"], ws["g"].reshape(-1), nt)
            g = ws["g"]
        df = self.body.backward(g, nt, need_input_grad, l2)
        ds = g if self.shortcut is None else self.shortcut.backward(g, nt, need_input_grad, l2)
        if not need_input_grad:
            return None
        _ew.add(df.reshape(-1), ds.reshape(-1), ws["dx_flat"], False, nt)
        return ws["dx"]

    def _joins(self, train):
        """Whether the training plan runs the join (the sum, and the ReLU after it) in
        the body's last pass, and takes the gradient mask in both branches' last passes
        (Layer.joins_residual): then neither the sum nor the masked gradient is a pass
        of its own."""
        joins = lambda layer: layer.joins_residual() and \
            not overrides_builtin_passes(layer)    # (its own passes do not join)  # noqa: E731
        return train and joins(self.body.last_pass(True)) and (
            self.shortcut is None or joins(self.shortcut.last_pass(True)))

    def plan_forward(self, x, ws, train):
        workspace = self._workspaces(x.shape[0], ws, train)
        if self._joins(train):
            # the shortcut first: the body's last pass adds it
            ops, s, trace_s = [], x, []
            if self.shortcut is not None:
                ops, s, trace_s = self.shortcut.plan_forward(x, workspace, train)
            # An addend that is (a view of) x is rebound with it: the joining pass
            # hands over its bind ops, and they become this Residual's own, since the
            # body's chain keeps binds only for passes that read x themselves.
            binds = [] if np.shares_memory(s, x) else None
            join = (s, ws["out"], self.fused_next, binds)
            ops_f, _, trace_f = self.body.plan_forward(x, workspace, train, join=join)
            ws["trace"] = (trace_f, trace_s)
            return ops + ops_f + (binds or []), ws["out"]
        ops, f, trace_f = self.body.plan_forward(x, workspace, train)
        s, trace_s = x, []
        if self.shortcut is not None:
            ops_s, s, trace_s = self.shortcut.plan_forward(x, workspace, train)
            ops += ops_s
        f_flat, s_flat = f.reshape(-1), s.reshape(-1)
        k = _ew.Add(f_flat, s_flat, ws["out_flat"], self.fused_next)
        ops.append(Op(k.run))
        # An operand that is (a view of) x is rebound with it.
        if np.shares_memory(f, x):
            ops.append(bind_op(k.bind_a, f_flat.shape))
        if np.shares_memory(s, x):
            ops.append(bind_op(k.bind_b, s_flat.shape))
        ws["trace"] = (trace_f, trace_s)
        return ops, ws["out"]

    def on_train_forward(self, ws, x):
        for trace in ws["trace"]:
            replay(trace, x)
        for chain in self.children():
            for layer in chain[1].absorbed:
                layer._last = None

    @staticmethod
    def _takes_sum(df, g, x):
        """Whether the body's input gradient df can hold the branches' sum: an array of
        x's shape and dtype of its own (writable, sharing no memory with g or x)."""
        return (isinstance(df, np.ndarray) and df.shape == x.shape and df.dtype == x.dtype
                and df.flags.c_contiguous and df.flags.writeable
                and not np.may_share_memory(df, g)
                and not np.may_share_memory(df, x))

    def plan_backward(self, g, x, ws, need_input_grad):
        ops = []
        trace_f, trace_s = ws["trace"]
        # With the join the branches' last passes mask g by the ReLU's output
        # themselves; otherwise the masked gradient is a pass of its own.
        mask = None
        if self.fused_next:
            if self._joins(True):
                mask = ws["out"]
            else:
                k = _ew.ActivationBackward("relu", g.reshape(-1), ws["out_flat"],
                                           ws["g"].reshape(-1))
                ops.append(Op(k.run))
                g = ws["g"]
        arena = ws.get("grad_arena")
        ops_f, df = self.body.plan_backward(g, trace_f, need_input_grad, mask=mask,
                                            arena=arena)
        ops += ops_f
        ds = g
        if self.shortcut is not None:
            # The shortcut's first pass may add its input gradient to the body's
            # (a strided 1x1 convolution then touches only the cells it reaches).
            add_to = df if need_input_grad and self._takes_sum(df, g, x) else None
            ops_s, ds = self.shortcut.plan_backward(g, trace_s, need_input_grad, mask=mask,
                                                    add_to=add_to, arena=arena)
            ops += ops_s
            if add_to is not None and ds is add_to:
                return ops, df

        def give_back(*grads):      # the branches' gradients, unless views of g
            for a in grads:
                if arena is not None and not np.shares_memory(a, g):
                    arena.release(a)
        if not need_input_grad:
            give_back(*(a for a in (df, ds) if isinstance(a, np.ndarray)))
            return ops, None
        # identity shortcut with the mask: dx = df + (g where out > 0)
        k = _ew.Add(df.reshape(-1), ds.reshape(-1), ws["dx_flat"], False,
                    mask=None if mask is None or self.shortcut is not None else ws["out_flat"])
        ops.append(Op(k.run))
        give_back(df, ds)
        return ops, ws["dx"]
