"""Chain: layers in a line, with their passes, fusion and plan ops.

``Sequential`` holds one chain; a ``Residual`` holds one per branch. A chain
builds its layers (shape inference, "auto" init), decides which neighbours run
as one pass (a layer's ``absorbs_previous``/``absorbs_next``, and in training
``merges_next``), runs the passes
forward and backward, and turns them into plan ops. It reaches its layers only
through the layer protocol (layers/base.py).
"""
import numpy as np

from ..buffers import WsView
from ..functional._checks import INT32_MAX, shape_str
from .base import (L2Op, Layer, Op, checked_pass, inherits_builtin_plan,
                   overrides_builtin_passes, unfused_decay, walk_inside)

__all__ = ["Chain", "Op", "has_params", "replay"]


class Chain:
    """A list of layers run one after another (see the module notes)."""

    def __init__(self, layers, where):
        if isinstance(layers, (Layer, str, bytes, dict)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"{where}: layers must be a list of cdl layers, got "
                            f"{type(layers).__name__}")
        layers = list(layers)
        if not layers:
            raise ValueError(f"{where}: needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"{where}: layers[{i}] must be a cdl layer, got "
                                f"{type(layer).__name__}")
        self.layers = tuple(layers)     # fixed: the passes and buffers are built from it
        self.where = where

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    # -- construction ---------------------------------------------------------------
    def build(self, shape, dtype, rng, prefix="", source=None):
        """Build every layer from the per-sample input ``shape``; returns the output shape."""
        source = source or f"from input {shape_str(shape)}"
        for i, layer in enumerate(self.layers):
            init = layer.init
            if init == "auto":
                init = "he" if self._followed_by_relu(i) else "xavier"
            # values of a layer's own (set, trained, loaded) stay; random ones are redrawn
            # from the model's seed
            out = layer.build(shape, dtype, index=f"{prefix}{i}", source=source, rng=rng,
                              init=init, keep_params=layer.holds_own_values())
            n = int(np.prod(out))
            if n > INT32_MAX:
                raise ValueError(f"{layer.name}: output {shape_str(out)} has {n} elements per "
                                 f"sample; at most {INT32_MAX} are supported")
            if layer.names_source or i == 0:
                source = f"from {layer.name} output {shape_str(out)}"
            shape = out
        self.output_shape = shape
        self.first_trained = next((i for i, l in enumerate(self.layers) if has_params(l)),
                                  len(self.layers))
        self.fuse()
        return shape

    def _followed_by_relu(self, i):
        for layer in self.layers[i + 1:]:
            if layer.activation == "relu":
                return True
            if not layer.transparent:
                return False
        return False

    def fuse(self, enable=True, merge=True):
        """Decide the passes: (index, layer) for each layer that runs; a layer that
        runs a neighbour inside its own pass has fused_previous/fused_next set.
        ``enable=False``: no fusion at all; ``merge=False``: no training merges
        (``merges_next``), every other fusion kept."""
        layers = self.layers
        before = [(layer.fused_previous, layer.fused_next) for layer in layers]
        for layer in layers:
            layer.fused_previous = layer.fused_next = False
        absorbed = set()
        # a subclass overriding a built-in's passes takes part in no fusion
        plain = [not overrides_builtin_passes(layer) for layer in layers]
        for i in range(len(layers) - 1):
            if not enable or i in absorbed or not (plain[i] and plain[i + 1]):
                continue
            a, b = layers[i], layers[i + 1]
            if b.absorbs_previous(a):
                b.fused_previous = True
                absorbed.add(i)
            elif a.absorbs_next(b):
                a.fused_next = True
                absorbed.add(i + 1)
        self.passes = [(i, layer) for i, layer in enumerate(layers) if i not in absorbed]
        for layer, flags in zip(layers, before):
            if flags != (layer.fused_previous, layer.fused_next):
                layer._ws = {}       # a workspace's layout may follow the fusion (Residual's)
        # Inference folds further: a pass may take the passes after it into its own
        # (a BatchNorm, with its ReLU, into the convolution's weights; a ReLU into
        # the convolution's or Linear's output tiles).
        self.infer_passes = []
        for layer in layers:
            layer.folded = []
        k = 0
        while k < len(self.passes):
            i, layer = self.passes[k]
            self.infer_passes.append((i, layer))
            k += 1
            while enable and k < len(self.passes) and plain[i] and \
                    plain[self.passes[k][0]] and layer.folds(self.passes[k][1]):
                layer.folded.append(self.passes[k][1])
                k += 1
        # Training merges further: a pass may run the pass right after it inside its own
        # (a BatchNorm, with its ReLU, the 2x2 max-pool after them: the full-size
        # output is never read back). The chain hands it the merged layer's workspace
        # as ws["merged"] (_pass_ws). Inference keeps both passes, the BatchNorm folded.
        train_passes = []
        for k, (i, layer) in enumerate(self.passes):
            if train_passes and train_passes[-1][1].merged is layer:
                absorbed.add(i)
                continue
            layer.merged = None
            if enable and merge and k + 1 < len(self.passes) and plain[i] \
                    and plain[self.passes[k + 1][0]] and layer.merges_next(self.passes[k + 1][1]):
                layer.merged = self.passes[k + 1][1]
            train_passes.append((i, layer))
        self.passes = train_passes
        self.absorbed = [layers[i] for i in sorted(absorbed)]

    def passes_for(self, train):
        return self.passes if train else self.infer_passes

    @staticmethod
    def _pass_ws(layer, workspace, train):
        """A pass's workspace: the layer's own, with the merged layer's as "merged" in
        training (so the layer's own forward and backward, called alone, never merge)."""
        ws = workspace(layer)
        if train and layer.merged is not None:
            ws = WsView(ws, merged=workspace(layer.merged))
        return ws

    # -- walking ----------------------------------------------------------------------
    def walk(self, prefix=""):
        """Every layer inside, depth first, as (state-dict prefix, layer)."""
        for i, layer in enumerate(self.layers):
            p = f"{prefix}{i}."
            yield p, layer
            yield from walk_inside(layer, p)

    def to_onnx(self, graph, x):
        """Export the layers in order (see ``Layer.to_onnx``); the output's name."""
        for layer in self.layers:
            x = graph.export_layer(layer, x)
        return x

    # -- passes (layer by layer) -------------------------------------------------------
    def forward(self, x, nt, train, workspace, out=None):
        """The passes on x; returns the output, in ``out`` when given. The last pass
        writes straight into ``out`` when it ``writes_through_ws``, its backward
        does not read its output (``backward_reads_output``) and ``out`` overlaps
        none of its operands; otherwise the output is copied there."""
        if train:
            for layer in self.absorbed:
                layer._last = None
        passes = self.passes_for(train)
        last = passes[-1][1] if passes else None
        for _, layer in passes:
            ws = self._pass_ws(layer, workspace, train)
            run_ws = ws
            if out is not None and layer is last and layer.writes_through_ws \
                    and not layer.backward_reads_output and _can_write(ws, "out", out, x):
                run_ws = WsView(ws, out=out)
            # (a pass that runs the next one too, merged in training, returns its output)
            ran = layer.merged if train and layer.merged is not None else layer
            y = checked_pass(layer, layer._forward(x, run_ws, nt, train),
                             (x.shape[0],) + ran.output_shape, "_forward")
            if train:
                layer._last = (x, ws)
            x = y
        if out is not None and x is not out:
            np.copyto(out, x)
            x = out
        return x

    def backward(self, g, nt, need_input_grad, l2, out=None):
        """Back-propagate g; the chain's input gradient only if ``need_input_grad``
        (layers before the first one with parameters are then skipped).

        ``out``: where the input gradient goes. The first pass writes it there
        directly when it ``writes_through_ws`` and ``out`` overlaps none of its
        operands; otherwise it is copied. Returns ``out`` then."""
        stop = 0 if need_input_grad else self.first_trained
        first = self.passes[0][1] if self.passes else None
        for i, layer in reversed(self.passes):
            if i < stop:
                break
            x, ws = layer._last
            if out is not None and layer is first and layer.writes_through_ws \
                    and _can_write(ws, "dx", out, g, x):
                ws = WsView(ws, dx=out)
            wanted = i > stop or need_input_grad
            g = layer._backward(g, x, ws, nt, wanted, l2 if layer.fuses_l2 else 0.0)
            if wanted:
                g = checked_pass(layer, g, x.shape, "_backward")
            if l2 and unfused_decay(layer):
                L2Op(layer).run(nt, l2)
        if out is not None and g is not out:
            np.copyto(out, g)
            g = out
        return g

    # -- plan ops -----------------------------------------------------------------------
    def last_pass(self, train):
        """The layer whose pass runs last."""
        passes = self.passes_for(train)
        return passes[-1][1] if passes else None

    def plan_forward(self, x, workspace, train, join=None):
        """(ops, output, trace): the passes as ops on x. ``trace`` lists, per pass,
        (index, layer, ws, input array, whether that input is x itself or a view of it).
        ``join``: a Residual's join for the last pass, given to it as ws["join_add"]
        (see ``Layer.joins_residual``; the caller checks that it can take it)."""
        ops, trace = [], []
        h, from_input = x, True
        passes = self.passes_for(train)
        for i, layer in passes:
            ws = self._pass_ws(layer, workspace, train)
            if join is not None and layer is passes[-1][1]:
                ws = WsView(ws, join_add=join)
            layer_ops, out = _planner(layer).plan_forward(h, ws, train)
            for op in layer_ops:
                ops.append(op if from_input else op._replace(bind=None))
            trace.append((i, layer, ws, h, from_input))
            from_input = from_input and np.shares_memory(out, h)
            h = out
        return ops, h, trace

    def plan_backward(self, g, trace, need_input_grad, mask=None, add_to=None, arena=None):
        """(ops, input gradient): the backward of the passes recorded in ``trace``.
        ``mask``: g is to be taken as 0 where mask <= 0 (the ReLU after a Residual's
        join), given to the last pass as ws["join_mask"] (``Layer.joins_residual``).
        ``add_to``: the other branch's input gradient, given to the first pass as
        ws["dx_add"] if it can take it (``Layer.adds_input_grad``); the returned
        gradient is then ``add_to`` itself, holding the sum.
        ``arena``: a ``GradArena`` that lends the passes their input-gradient buffers
        (layers holding chains find it as ws["grad_arena"]); g stays the caller's,
        and so does the returned gradient."""
        stop = 0 if need_input_grad else self.first_trained
        ops, incoming = [], g
        for k, (i, layer, ws, x, x_is_input) in enumerate(reversed(trace)):
            if i < stop:
                break
            if mask is not None and k == 0:
                ws = WsView(ws, join_mask=mask)
            if add_to is not None and k == len(trace) - 1 and layer.adds_input_grad() \
                    and not overrides_builtin_passes(layer):
                ws = WsView(ws, dx_add=add_to)
            needs_dx, lent = i > stop or need_input_grad, None
            if arena is not None:
                if needs_dx:
                    ws, lent = arena.lend(ws)
                if any(True for _ in layer.children()):
                    ws = WsView(ws, grad_arena=arena)
            layer_ops, dx = _planner(layer).plan_backward(g, x, ws, needs_dx)
            for op in layer_ops:
                ops.append(op if x_is_input else op._replace(bind=None))
            if unfused_decay(layer):
                ops.append(Op(L2Op(layer).run, takes_l2=True))
            if arena is not None:
                # This pass's ops were the last to read g; later ops may reuse it, unless
                # it is (a view of) the caller's gradient, which the caller still reads
                # (a pass such as Flatten hands on a view of its g).
                if not _shares(dx, g) and not _shares(g, incoming):
                    arena.release(g)
                if lent is not None and not _shares(dx, lent):
                    arena.release(lent)
            g = dx
        return ops, g


def has_params(layer):
    """Whether a layer or anything inside it has trained parameters."""
    if layer.params:
        return True
    for _, child in layer.children():
        layers = child.layers if isinstance(child, Chain) else [child]
        if any(has_params(l) for l in layers):
            return True
    return False


def replay(trace, x):
    """After a planned training forward on input x: leave each pass's state (``_last``,
    and whatever ``on_train_forward`` sets) as the layer-by-layer pass would."""
    for _, layer, ws, h, from_input in trace:
        inp = x.reshape(h.shape) if from_input else h
        layer._last = (inp, ws)
        if not inherits_builtin_plan(layer):        # (the generic ops keep no more)
            layer.on_train_forward(ws, inp)


class _Generic:
    """Layer's generic plan ops (wrapping ``_forward``/``_backward``) bound to a layer."""

    __slots__ = ("layer",)

    def __init__(self, layer):
        self.layer = layer

    def plan_forward(self, x, ws, train):
        return Layer.plan_forward(self.layer, x, ws, train)

    def plan_backward(self, g, x, ws, need_input_grad):
        return Layer.plan_backward(self.layer, g, x, ws, need_input_grad)


def _planner(layer):
    """What builds ``layer``'s plan ops: the layer, or Layer's generic ops for a subclass
    that overrides a built-in's passes and not its plan ops (``inherits_builtin_plan``)."""
    return _Generic(layer) if inherits_builtin_plan(layer) else layer


def _shares(a, b):
    return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.may_share_memory(a, b)


def _can_write(ws, key, out, *operands):
    """Whether a pass can write ``ws[key]`` (its output "out", or its input gradient
    "dx") straight into ``out``: the buffer exists with out's shape and dtype, and
    ``out`` shares no memory with the pass's operands or its workspace."""
    buf = ws.get(key)
    if not isinstance(buf, np.ndarray) or buf.shape != out.shape or buf.dtype != out.dtype:
        return False
    return not any(isinstance(a, np.ndarray) and np.may_share_memory(a, out)
                   for a in (*operands, *ws.values()))
