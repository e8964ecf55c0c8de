"""ONNX export and import (``cdl.onnx.export`` / ``cdl.onnx.load``).

The ``onnx`` package is an optional extra (``pip install cdl-cpu[onnx]``): it is
imported only when a function here runs, never by ``import cdl``.

Each layer maps itself, through the layer protocol (:mod:`cdl.layers.base`):

export
    ``layer.to_onnx(graph, x) -> name`` adds nodes and initializers to a
    :class:`GraphBuilder`; a Residual exports its branches and an Add. Weights
    are initializers named by their state-dict keys ("3.layers.0.weight").
import
    every registered layer class lists the ops it builds from in ``onnx_ops``;
    ``cls.from_onnx(node, reader)`` returns the layers for one node, reading
    attributes and constant inputs through a :class:`NodeReader`. This module
    holds only what is no layer's: the walk over the graph, constant folding
    (``Constant``, ``ConstantOfShape``, ``Shape``→``Gather``→``Concat`` and a few
    more into the Reshape that uses them), ``Identity``, residual ``Add``/``Sum``
    of two branches from one input (they become ``Residual``), and a final
    ``Softmax``/``LogSoftmax`` (left out of the model and reported).

Loading only parses the protobuf and reads tensors: it never runs code, custom
ops or functions from the file. Anything cdl cannot compute exactly is refused
with a ValueError naming the node, its op type and the reason, and listing the
supported ops. Damaged files are ValueErrors too (protobuf's DecodeError is
wrapped). Sizes are checked before anything is allocated.
"""
import io
import math
import os
import warnings

import numpy as np

from ..functional._checks import shape_str

__all__ = ["export", "load", "supported_ops", "to_model", "GraphBuilder", "NodeReader",
           "OnnxImportError"]

MIN_OPSET = 13
_MAX_CONST_ELEMENTS = 1 << 24       # a folded constant (ConstantOfShape...) at most this big


def _require_onnx():
    try:
        import onnx
    except ImportError as exc:
        raise ImportError("cdl.onnx needs the onnx package: pip install cdl-cpu[onnx] "
                          f"(or pip install onnx) ({exc})") from exc
    return onnx


# ====================================================================================
# export
# ====================================================================================
class GraphBuilder:
    """What ``Layer.to_onnx`` writes into: nodes, initializers and unique names.

    ``node(op, inputs, layer=None, **attributes) -> output name``;
    ``param(layer, key) -> name`` adds a parameter or buffer as an initializer
    named by its state-dict key; ``constant(array, layer, what) -> name`` adds
    any other constant; ``unique(base)`` gives an unused value name.
    """

    def __init__(self, dtype, opset):
        self.onnx = _require_onnx()
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes = []
        self.initializers = []
        self._names = set()
        self._counts = {}

    def unique(self, base):
        base = str(base) or "value"
        name, i = base, 1
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    @staticmethod
    def _prefix(layer):
        return "" if layer is None or layer.path is None else f"{layer.path}."

    def node(self, op, inputs, layer=None, **attributes):
        for key, value in attributes.items():
            if isinstance(value, (float, np.floating)):
                with np.errstate(over="ignore", under="ignore"):
                    stored = np.float32(value)     # ONNX's float attributes are float32
                if not np.isfinite(stored) and np.isfinite(value) or stored == 0 != value:
                    where = layer.name if layer is not None else op
                    raise ValueError(f"{where}: ONNX stores {op}'s attribute {key} as a "
                                     f"float32, which turns {value!r} into {float(stored)}; "
                                     f"the exported graph would compute something else")
        prefix = self._prefix(layer)
        out = self.unique(f"{prefix}{op}")
        name = self.unique(f"node:{prefix}{op}")
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=name,
                                                     **attributes))
        return out

    def constant(self, array, layer=None, what="constant"):
        a = np.asarray(array)
        if a.dtype.kind == "f":
            a = a.astype(self.dtype)
        name = self.unique(f"{self._prefix(layer)}{what}")
        a = np.require(a, requirements="C")    # (keeps 0-d arrays 0-d)
        self.initializers.append(self.onnx.numpy_helper.from_array(a, name))
        return name

    def param(self, layer, key):
        a = layer.params[key] if key in layer.params else layer.buffers[key]
        return self.constant(a, layer, key)

    def export_layer(self, layer, x):
        try:
            return layer.to_onnx(self, x)
        except NotImplementedError as exc:
            raise ValueError(f"cdl.onnx.export: layer {layer.name} ({type(layer).__name__}) "
                             f"cannot be exported: {exc}") from None

    def rename(self, old, new):
        for n in self.nodes:
            for seq in (n.input, n.output):
                for i, v in enumerate(seq):
                    if v == old:
                        seq[i] = new


def _elem_type(onnx, dtype):
    return {np.dtype(np.float32): onnx.TensorProto.FLOAT,
            np.dtype(np.float64): onnx.TensorProto.DOUBLE}[np.dtype(dtype)]


def to_model(model, opset=17, dynamic_batch=True):
    """The ONNX ModelProto of a cdl ``Sequential`` (see :func:`export`)."""
    onnx = _require_onnx()
    from ..model import Sequential
    from .. import __version__

    if not isinstance(model, Sequential):
        raise TypeError(f"cdl.onnx.export: model must be a cdl.Sequential, got "
                        f"{type(model).__name__}")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) \
            or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"cdl.onnx.export: opset must be an int from {MIN_OPSET} to {newest} "
                         f"(the newest this onnx knows), got {opset!r}")
    opset = int(opset)
    graph = GraphBuilder(model.dtype, opset)
    graph._names.update(("input", "output"))
    out = model.chain.to_onnx(graph, "input")
    if out == "input":                      # e.g. a model of Dropout alone
        out = graph.node("Identity", ["input"])
    graph.rename(out, "output")
    elem = _elem_type(onnx, model.dtype)
    batch = "N" if dynamic_batch else 1
    h = onnx.helper
    g = h.make_graph(graph.nodes, "cdl_sequential",
                     [h.make_tensor_value_info("input", elem, [batch, *model.input_shape])],
                     [h.make_tensor_value_info("output", elem, [batch, *model.output_shape])],
                     initializer=graph.initializers)
    opsets = [h.make_opsetid("", opset)]
    m = h.make_model(g, opset_imports=opsets, producer_name="cdl", producer_version=__version__)
    m.ir_version = h.find_min_ir_version_for(opsets)
    onnx.checker.check_model(m, full_check=True)
    return m


def export(model, f, opset=17, dynamic_batch=True):
    """Write ``model`` (a cdl ``Sequential``) as an ONNX inference graph to ``f`` (a path,
    written atomically, or a binary file object); returns the ModelProto.

    Input "input" of shape ``(N,) + model.input_shape`` (N symbolic when ``dynamic_batch``,
    else 1), output "output"; float32 or float64 as the model. Weights and running
    statistics are initializers named by their state-dict keys; Dropout is left out;
    a Residual becomes its branches and an Add. The graph passes
    ``onnx.checker.check_model(full_check=True)``. ``opset`` from 13 to the newest the
    installed onnx knows.
    """
    from .format import check_target, write_to
    check_target(f, "cdl.onnx.export", "f", paths=(str, os.PathLike))
    m = to_model(model, opset, dynamic_batch)
    data = m.SerializeToString()
    write_to(f, lambda fh: fh.write(data))
    return m


# ====================================================================================
# import
# ====================================================================================
class _Batch:
    """The batch size inside a folded shape value (unknown until run time)."""

    def __repr__(self):
        return "N"


BATCH = _Batch()
_STRUCTURAL = ("Add", "Sum", "Identity", "Softmax", "LogSoftmax")
_FOLDED = ("Constant", "ConstantOfShape", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat",
           "Slice", "Cast", "Identity", "Reshape", "Transpose", "Add", "Sub", "Mul", "Div",
           "Neg", "Sqrt")


def _layer_ops():
    """{op type: layer class} from every registered layer's ``onnx_ops`` (a class
    defined later takes over an op, so a user's layer can replace a built-in one)."""
    from ..layers import LAYER_TYPES

    ops = {}
    for cls in LAYER_TYPES.values():
        for op in cls.__dict__.get("onnx_ops", ()):
            ops[op] = cls
    return ops


def supported_ops():
    """Op types ``load`` accepts: the layers' ``onnx_ops``, Add/Sum joining two branches,
    Identity, a final Softmax/LogSoftmax, and the constant-folded ones."""
    return sorted(set(_layer_ops()) | set(_STRUCTURAL) | set(_FOLDED))


class OnnxImportError(ValueError):
    """What cdl.onnx.load raises for a graph it cannot turn into a model (a ValueError
    naming the node, its op type and the reason, and listing the supported ops)."""


class _Dyn:
    """A value computed from the graph's input. ``idom`` is the value every path from
    the input to it passes through last (its immediate dominator): an op's input, or
    the value where an Add's two branches fork. ``depth`` counts the steps up to the
    input along ``idom``; ``jump`` is a farther ancestor, for ``_ancestor``."""

    __slots__ = ("kind", "node", "parents", "layers", "shape", "onnx_shape", "idom", "depth",
                 "jump", "fork", "used")

    def __init__(self, kind, node, parents, layers, shape, onnx_shape, fork=None):
        self.kind, self.node, self.parents, self.layers = kind, node, parents, layers
        self.shape, self.onnx_shape, self.fork, self.used = shape, onnx_shape, fork, False
        up = None if kind == "input" else parents[0] if kind == "op" else fork
        self.idom = up
        if up is None:
            self.depth, self.jump = 0, self
        else:
            # skew-binary jump pointers (Myers 1983): any ancestor is O(log depth) jumps
            # away, and each value stores one pointer, not the list of its dominators
            self.depth = up.depth + 1
            j = up.jump
            self.jump = j.jump if up.depth - j.depth == j.depth - j.jump.depth else up


def _ancestor(v, depth):
    """v's dominator at ``depth`` (at most v.depth)."""
    while v.depth > depth:
        v = v.jump if v.jump.depth >= depth else v.idom
    return v


def _fork(a, b):
    """The last value that every path from the input to a or to b passes through."""
    a, b = _ancestor(a, b.depth), _ancestor(b, a.depth)
    while a is not b:
        # a and b are at one depth, so are their jumps: where the jumps land apart, both
        # are still below the fork; else step up one
        a, b = (a.jump, b.jump) if a.jump is not b.jump else (a.idom, b.idom)
    return a


class NodeReader:
    """What ``Layer.from_onnx(node, reader)`` reads a node through.

    ``shape``: the per-sample shape of the node's input (first input, computed from
    the graph's input). ``attrs(node, {name: default})`` parses the attributes,
    refusing any not listed; ``const(node, i, what)`` gives constant input i as a
    NumPy array (refusing one computed from the input); ``window(node, attrs,
    kernel)`` reads strides, pads/auto_pad, dilations and ceil_mode into cdl's
    (strides, symmetric padding); ``assign(layer, key, array)`` sets a weight once
    the model is built; ``fail(node, reason)`` makes the ValueError to raise;
    ``consumers``/``sole_consumer``/``absorb`` look at (and take over) the nodes
    that use a node's output (MatMul takes the Add of its bias).
    """

    def __init__(self, importer):
        self._imp = importer
        self.shape = None
        self.onnx_shape = None
        self.dtype = importer.dtype

    # -- for layers -----------------------------------------------------------------
    def fail(self, node, reason):
        return self._imp.fail(node, reason)

    def attrs(self, node, allowed):
        return self._imp.attributes(node, allowed)

    def is_const(self, name):
        v = self._imp.value(name) if name else None
        return v is not None and not isinstance(v, _Dyn)

    def const(self, node, i, what, optional=False, batch_ok=False):
        name = node.input[i] if i < len(node.input) else ""
        if not name:
            if optional:
                return None
            raise self.fail(node, f"its {what} input is missing")
        v = self._imp.value(name)
        if isinstance(v, _Dyn):
            raise self.fail(node, f"its {what} ('{name}') is computed from the graph's input, "
                                  f"not a constant; cdl needs constant weights")
        if v is None:
            raise self.fail(node, f"its {what} ('{name}') is not defined")
        if v.dtype == object and not batch_ok:
            raise self.fail(node, f"its {what} ('{name}') depends on the batch size")
        return v

    def bias_vector(self, node, c, m):
        """A bias that broadcasts over (N, m) the same for every sample, as shape (m,)."""
        c = np.asarray(c)
        if c.dtype.kind not in "fiu" or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1) \
                or (c.ndim >= 1 and c.shape[-1] not in (1, m)):
            raise self.fail(node, f"bias of shape {shape_str(c.shape)} does not broadcast as "
                                  f"one ({m},) vector over every sample (a bias that varies "
                                  f"along the batch axis cannot be a cdl layer's)")
        return np.broadcast_to(c.reshape(-1) if c.ndim else c, (m,)).copy()

    def window(self, node, a, kernel):
        """(strides, pads) for a 2-D window op from its attributes, refusing dilations,
        unequal begin/end padding and a ceil_mode that changes the output size."""
        n = len(kernel)
        if n != 2:
            raise self.fail(node, f"a {n}-D window; cdl's layers are 2-D")
        if any(k < 1 for k in kernel):
            raise self.fail(node, f"kernel {list(kernel)} must be positive")
        dil = a.get("dilations")
        if dil is not None and (len(dil) != n or any(d != 1 for d in dil)):
            raise self.fail(node, f"dilations={list(dil)}; cdl supports dilation 1 only")
        strides = tuple(int(s) for s in (a.get("strides") or [1] * n))
        if len(strides) != n or any(s < 1 for s in strides):
            raise self.fail(node, f"strides={list(strides)} must be {n} ints >= 1")
        size = self.shape[1:]
        auto = a.get("auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            pads = a.get("pads") or [0] * (2 * n)
            if len(pads) != 2 * n or any(p < 0 for p in pads):
                raise self.fail(node, f"pads={list(pads)} must be {2 * n} ints >= 0")
            begin, end = list(pads[:n]), list(pads[n:])
        elif auto == "VALID":
            begin = end = [0] * n
        elif auto in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(n):
                total = (-(-size[i] // strides[i]) - 1) * strides[i] + kernel[i] - size[i]
                if total < 0 and node.op_type != "Conv":
                    # ONNX Runtime and the reference evaluator disagree here (crop or
                    # refuse); Conv's clamp to 0 they share
                    raise self.fail(node, f"auto_pad={auto} with kernel {list(kernel)} "
                                          f"smaller than strides {list(strides)} on a "
                                          f"{size[i]}-cell axis gives negative padding "
                                          f"({total}); cdl pads by 0 or more")
                total = max(total, 0)
                small, big = total // 2, total - total // 2
                begin.append(small if auto == "SAME_UPPER" else big)
                end.append(big if auto == "SAME_UPPER" else small)
        else:
            raise self.fail(node, f"auto_pad={auto!r} is not one of NOTSET, VALID, SAME_UPPER, "
                                  f"SAME_LOWER")
        if begin != end:
            raise self.fail(node, f"asymmetric padding (begin {begin}, end {end}"
                                  + (f", from auto_pad={auto}" if auto != "NOTSET" else "")
                                  + "); cdl pads both sides equally")
        if a.get("ceil_mode", 0):
            for i in range(n):
                span = size[i] + 2 * begin[i] - kernel[i]
                if span < 0:
                    break
                floor_out = span // strides[i] + 1
                ceil_out = -(-span // strides[i]) + 1
                if (ceil_out - 1) * strides[i] >= size[i] + begin[i]:
                    ceil_out -= 1          # the last window may not start in the end padding
                if ceil_out != floor_out:
                    raise self.fail(node, "ceil_mode=1 gives a larger output than cdl's "
                                          "floor rounding here")
        return strides, tuple(begin)

    def batch_reshape(self, node, target, allowzero=0):
        """The per-sample shape a Reshape to ``target`` gives, refusing a target that
        does not keep the batch axis as axis 0."""
        t = [v for v in np.asarray(target, dtype=object).reshape(-1)]
        if not t or any(not (v is BATCH or isinstance(v, (int, np.integer))) for v in t):
            raise self.fail(node, f"shape {t} is not a list of ints")
        onnx_shape = self.onnx_shape
        batch_fixed = self._imp.input_batch
        first = t[0]
        if first is BATCH or (first == 0 and not allowzero) or \
                (batch_fixed is not None and first is not BATCH and first == batch_fixed):
            rest = t[1:]
        elif first == -1:
            rest = t[1:]
            if -1 in rest or any(v is BATCH for v in rest):
                raise self.fail(node, f"shape {t} does not keep the batch axis")
        else:
            raise self.fail(node, f"shape {t} does not keep the batch axis as its first "
                                  f"dimension (batch is {batch_fixed or 'N'})")
        out = []
        for i, v in enumerate(rest):
            if v is BATCH:
                raise self.fail(node, f"shape {t} moves the batch size to another axis")
            v = int(v)
            if v == 0 and not allowzero:
                if i >= len(onnx_shape):
                    raise self.fail(node, f"shape {t} copies a dimension the input lacks")
                v = onnx_shape[i]
            out.append(v)
        size = int(np.prod(onnx_shape))
        if out.count(-1) > 1 or any(v < -1 for v in out):
            raise self.fail(node, f"shape {t} is not a valid reshape target")
        if -1 in out:
            known = int(np.prod([v for v in out if v != -1]))
            if known == 0 or size % known:
                raise self.fail(node, f"shape {t} does not divide {size} elements per sample")
            out[out.index(-1)] = size // known
        if int(np.prod(out)) != size:
            raise self.fail(node, f"shape {t} does not hold the {size} elements of a "
                                  f"{shape_str(onnx_shape)} sample")
        return tuple(out)

    def assign(self, layer, key, array):
        self._imp.assignments.append((layer, key, np.asarray(array)))

    def consumers(self, node):
        return self._imp.consumers(node.output[0])

    def is_graph_output(self, node):
        return node.output[0] in self._imp.graph_outputs

    def sole_consumer(self, node):
        """The one node using this node's output (None if several, none, or the output
        is the graph's)."""
        uses = self._imp.consumers(node.output[0])
        if len(uses) != 1 or node.output[0] in self._imp.graph_outputs:
            return None
        return uses[0]

    def absorb(self, nxt):
        """This node's layers also compute ``nxt`` (which uses its output): skip it."""
        self._imp.absorbed.add(id(nxt))
        self._imp.current_out = nxt.output[0]

    def set_onnx_shape(self, shape):
        """The node's ONNX output shape (per sample) when it differs from the layers'
        (GlobalAveragePool's (C, 1, 1) as cdl's (C,))."""
        self._imp.current_onnx_shape = tuple(shape)


def _prod(dims):
    n = 1
    for d in dims:
        n *= int(d)
    return n


class _Importer:
    def __init__(self, onnx, model, input_shape=None):
        self.onnx = onnx
        self.model = model
        self.graph = model.graph
        # one list of the node messages, kept alive: protobuf makes a new Python wrapper
        # on each access to graph.node[i], so identities are only stable for these
        self.nodes = list(model.graph.node)
        self.node_index = {id(n): i for i, n in enumerate(self.nodes)}
        self.layer_ops = _layer_ops()
        self.values = {}
        self.assignments = []
        self.absorbed = set()
        self.input_shape_override = input_shape
        self.dtype = None
        self.input_batch = None
        self.output_activation = None

    # -- errors -----------------------------------------------------------------------
    def _node_label(self, node):
        if node is None:
            return "the graph"
        idx = self.node_index.get(id(node), "?")
        name = node.name or f"#{idx}"
        return f"node {name!r} ({node.op_type})"

    def fail(self, node, reason):
        return OnnxImportError(f"cdl.onnx.load: {self._node_label(node)}: {reason}. Supported ops: "
                        f"{', '.join(supported_ops())}")

    # -- attributes and tensors -----------------------------------------------------
    def attributes(self, node, allowed):
        A = self.onnx.AttributeProto
        out = dict(allowed)
        seen = set()
        for attr in node.attribute:
            if attr.name not in allowed:
                raise self.fail(node, f"attribute {attr.name!r} is not supported (cdl reads "
                                      f"{', '.join(sorted(allowed)) or 'none'})")
            if attr.name in seen:
                raise self.fail(node, f"attribute {attr.name!r} appears twice")
            seen.add(attr.name)
            if attr.ref_attr_name:
                raise self.fail(node, f"attribute {attr.name!r} refers to a function's")
            if attr.type == A.INT:
                v = int(attr.i)
            elif attr.type == A.FLOAT:
                # float attributes are float32: read the shortest decimal that gives the
                # same float32 (an epsilon written as 1e-5 reads back as 1e-5)
                v = float(str(np.float32(attr.f)))
                if not math.isfinite(v):
                    raise self.fail(node, f"attribute {attr.name!r} is {v}")
            elif attr.type == A.INTS:
                v = [int(i) for i in attr.ints]
            elif attr.type == A.FLOATS:
                v = [float(f) for f in attr.floats]
            elif attr.type == A.STRING:
                try:
                    v = attr.s.decode("utf-8")
                except UnicodeDecodeError:
                    raise self.fail(node, f"attribute {attr.name!r} is not UTF-8") from None
            elif attr.type == A.TENSOR:
                v = self.tensor(attr.t, node)
            else:
                raise self.fail(node, f"attribute {attr.name!r} has an unsupported type "
                                      f"{attr.type}")
            if isinstance(v, list) and len(v) > 64:
                raise self.fail(node, f"attribute {attr.name!r} has {len(v)} values")
            out[attr.name] = v
        return out

    def tensor(self, t, node=None):
        """A TensorProto as a NumPy array, after checking that its declared size matches
        the data it holds (nothing is allocated for a size the file does not back)."""
        T = self.onnx.TensorProto
        where = f"tensor {t.name!r}" if t.name else "a tensor"
        if t.data_location == T.EXTERNAL or len(t.external_data):
            raise self.fail(node, f"{where} keeps its data in an external file, which cdl "
                                  f"does not read")
        fields = {T.FLOAT: "float_data", T.DOUBLE: "double_data", T.FLOAT16: "int32_data",
                  T.INT64: "int64_data", T.INT32: "int32_data", T.INT8: "int32_data",
                  T.UINT8: "int32_data", T.INT16: "int32_data", T.BOOL: "int32_data"}
        if t.data_type not in fields:
            name = T.DataType.Name(t.data_type) if t.data_type in T.DataType.values() \
                else str(t.data_type)
            raise self.fail(node, f"{where} has data type {name}, which cdl does not read")
        dims = list(t.dims)
        if len(dims) > 16 or any(d < 0 for d in dims):
            raise self.fail(node, f"{where} has invalid dims {dims[:17]}")
        n = _prod(dims)
        itemsize = self.onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if t.HasField("raw_data"):
            have, want = len(t.raw_data), n * itemsize
        else:
            have, want = len(getattr(t, fields[t.data_type])), n
        if have != want:
            raise self.fail(node, f"{where} declares dims {dims} ({n} values) but holds "
                                  f"{have // (itemsize if t.HasField('raw_data') else 1)}")
        try:
            a = self.onnx.numpy_helper.to_array(t)
        except Exception as exc:
            raise self.fail(node, f"{where} cannot be read ({type(exc).__name__}: {exc})") \
                from None
        return np.array(a, copy=True)

    # -- graph structure ------------------------------------------------------------
    def value(self, name):
        """A value by name: computed so far, or an initializer (read on first use)."""
        v = self.values.get(name)
        if v is None and name in self.inits:
            v = self.values[name] = self.tensor(self.inits[name])
        return v

    def consumers(self, name):
        """The needed nodes that read value ``name``, in graph order."""
        return list(self.uses.get(name, ()))

    def prepare(self):
        g = self.graph
        if len(g.output) != 1:
            raise self.fail(None, f"it has {len(g.output)} outputs; cdl models have one")
        self.graph_outputs = {g.output[0].name}
        if len(g.sparse_initializer):
            raise self.fail(None, "sparse initializers are not supported")
        inits = {}
        for t in g.initializer:
            if t.name in inits:
                raise self.fail(None, f"initializer {t.name!r} is defined twice")
            inits[t.name] = t
        self.inits = inits
        # what the output depends on, back from it
        producer = {}
        for n in self.nodes:
            for o in n.output:
                if o:
                    if o in producer or o in inits:
                        raise self.fail(n, f"value {o!r} is defined twice")
                    producer[o] = n
        needed, stack = set(), [g.output[0].name]
        seen_values = set()
        while stack:
            v = stack.pop()
            if v in seen_values:
                continue
            seen_values.add(v)
            n = producer.get(v)
            if n is not None and id(n) not in needed:
                needed.add(id(n))
                for sub in n.attribute:
                    if sub.type in (self.onnx.AttributeProto.GRAPH,
                                    self.onnx.AttributeProto.GRAPHS):
                        raise self.fail(n, "subgraphs (control flow) are not supported")
                stack.extend(i for i in n.input if i)
        self.needed_nodes = [n for n in self.nodes if id(n) in needed]
        self.uses = {}      # value name -> the needed nodes that read it (built once)
        for n in self.needed_nodes:
            for name in dict.fromkeys(n.input):
                self.uses.setdefault(name, []).append(n)
        ops = set(self.layer_ops) | set(_STRUCTURAL) | set(_FOLDED)
        for n in self.needed_nodes:
            if n.domain not in ("", "ai.onnx"):
                raise self.fail(n, f"domain {n.domain!r} (custom ops) is not supported")
            if n.op_type not in ops:
                raise self.fail(n, "this op is not supported")
        # the input
        real = [i for i in g.input if i.name not in inits and i.name in seen_values]
        if len(real) != 1:
            names = [i.name for i in real]
            raise self.fail(None, f"it needs {len(real)} inputs {names}; a cdl model has one "
                                  f"input (weights must be initializers)")
        return real[0]

    def read_input(self, vi):
        T = self.onnx.TensorProto
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise self.fail(None, f"input {vi.name!r} is not a tensor")
        dtypes = {T.FLOAT: np.float32, T.DOUBLE: np.float64}
        if tt.elem_type not in dtypes:
            kind = T.DataType.Name(tt.elem_type) if tt.elem_type in T.DataType.values() \
                else tt.elem_type
            raise self.fail(None, f"input {vi.name!r} has element type {kind}; cdl models are "
                                  f"float32 or float64")
        self.dtype = np.dtype(dtypes[tt.elem_type])
        dims = list(tt.shape.dim) if tt.HasField("shape") else None
        if dims is not None and len(dims) < 2:
            raise self.fail(None, f"input {vi.name!r} has rank {len(dims)}; cdl models take a "
                                  f"batch axis and at least one more")
        if dims is not None and dims[0].HasField("dim_value"):
            self.input_batch = int(dims[0].dim_value)
        if self.input_shape_override is not None:
            shape = tuple(int(s) for s in self.input_shape_override)
            if dims is not None and (len(dims) - 1 != len(shape) or any(
                    d.HasField("dim_value") and d.dim_value != s
                    for d, s in zip(dims[1:], shape))):
                graph = ", ".join(str(d.dim_value) if d.HasField("dim_value") else
                                  (d.dim_param or "?") for d in dims)
                raise self.fail(None, f"input_shape {shape} contradicts the graph's input "
                                      f"shape ({graph})")
        else:
            if dims is None or not all(d.HasField("dim_value") for d in dims[1:]):
                raise self.fail(None, f"input {vi.name!r} has no fixed per-sample shape; pass "
                                      f"input_shape=(C, H, W) to cdl.onnx.load")
            shape = tuple(int(d.dim_value) for d in dims[1:])
        if not shape or any(s < 1 for s in shape) or _prod(shape) > 2**31 - 1:
            raise self.fail(None, f"input per-sample shape {shape} is not supported")
        return shape

    # -- the walk -------------------------------------------------------------------
    def run(self):
        vi = self.prepare()
        shape = self.read_input(vi)
        self.input_shape = shape
        x = _Dyn("input", None, (), [], shape, shape)
        self.values[vi.name] = x
        reader = NodeReader(self)
        for n in self.needed_nodes:
            if id(n) in self.absorbed:
                continue
            for i in n.input:
                if i and self.value(i) is None:
                    raise self.fail(n, f"input {i!r} is not defined before it (the graph "
                                           f"is not in topological order, or names a missing "
                                           f"value)")
            self.step(n, reader)
        out_name = self.graph.output[0].name
        if out_name not in self.values and out_name in self.inits:
            raise self.fail(None, "the output is a constant")
        out = self.values.get(out_name)
        if not isinstance(out, _Dyn):
            raise self.fail(None, "the output does not depend on the input")
        self.check_output_shape(out)
        layers = self.linearize(out, x)
        if not layers:
            # the identity (as cdl exports a model of Dropout alone): a model needs a
            # layer, and Dropout(0) is the identity
            from ..layers import Dropout
            layers = [Dropout(0.0)]
        return layers, shape

    def check_output_shape(self, out):
        tt = self.graph.output[0].type.tensor_type
        if not tt.HasField("shape"):
            return
        dims = list(tt.shape.dim)
        want = (None,) + tuple(out.onnx_shape)
        if len(dims) != len(want) or any(d.HasField("dim_value") and w is not None
                                         and d.dim_value != w
                                         for d, w in zip(dims, want)):
            got = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                   for d in dims]
            raise self.fail(None, f"the graph declares output shape {got}, cdl computes "
                                  f"(N, {', '.join(map(str, out.onnx_shape))})")

    def dyn_inputs(self, n):
        return [i for i in n.input if i and isinstance(self.values.get(i), _Dyn)]

    def step(self, n, reader):
        op = n.op_type
        dyn = self.dyn_inputs(n)
        if op == "Shape" and dyn:
            self.fold(n, shape_of=self.values[n.input[0]])
            return
        if not dyn:
            if op not in _FOLDED:
                raise self.fail(n, "all its inputs are constants, and this op cannot be folded")
            self.fold(n)
            return
        extra = [o for o in n.output[1:] if o and (self.consumers(o) or o in self.graph_outputs)]
        if extra:
            raise self.fail(n, f"its extra output(s) {extra} are used; cdl layers give one")
        if op in ("Add", "Sum"):
            self.add(n, dyn)
            return
        if op not in self.layer_ops and op not in _STRUCTURAL:
            raise self.fail(n, "this op is not supported on values computed from the input "
                               "(cdl only folds it where all its inputs are constants)")
        if n.input[0] not in dyn or len(dyn) != 1:
            late = [f"{i} ({name!r})" for i, name in enumerate(n.input)
                    if i and isinstance(self.values.get(name), _Dyn)]
            raise self.fail(n, "cdl layers compute on their first input only; "
                               + (f"input {', '.join(late)} is computed from the graph's "
                                  f"input, not a constant (a non-constant weight)" if late
                                  else "its first input is a constant"))
        src = self.values[n.input[0]]
        if op == "Identity":
            self.attributes(n, {})
            self.values[n.output[0]] = src
            return
        if op in ("Softmax", "LogSoftmax"):
            self.final_activation(n, src)
            return
        cls = self.layer_ops[op]
        reader.shape, reader.onnx_shape = src.shape, src.onnx_shape
        self.current_out, self.current_onnx_shape = n.output[0], None
        try:
            layers = list(cls.from_onnx(n, reader))
        except OnnxImportError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
            raise self.fail(n, f"{type(exc).__name__}: {exc}") from None
        if not layers:
            onnx_shape = self.current_onnx_shape
            if onnx_shape is None or onnx_shape == src.onnx_shape:
                self.values[self.current_out] = src
            else:   # no cdl layer, but ONNX's shape changes ((C, 1, 1) flattened to (C,))
                self.values[self.current_out] = _Dyn("op", n, (src,), [], src.shape,
                                                     onnx_shape)
            return
        shape = src.shape
        for layer in layers:
            try:
                shape = tuple(int(s) for s in layer._configure(shape, f"input {shape_str(shape)}"))
            except (TypeError, ValueError) as exc:
                raise self.fail(n, str(exc)) from None
        onnx_shape = self.current_onnx_shape or shape
        self.values[self.current_out] = _Dyn("op", n, (src,), layers, shape, onnx_shape)

    def final_activation(self, n, src):
        a = self.attributes(n, {"axis": -1})
        rank = len(src.onnx_shape) + 1
        if n.output[0] not in self.graph_outputs:
            raise self.fail(n, f"{n.op_type} is only supported as the graph's last op (it is "
                               f"reported, and predict gives the scores before it)")
        if a["axis"] not in (-1, rank - 1) or rank != 2:
            raise self.fail(n, f"{n.op_type} over axis {a['axis']} of a rank-{rank} output; "
                               f"only over the classes of an (N, C) output")
        self.output_activation = "softmax" if n.op_type == "Softmax" else "log_softmax"
        self.values[n.output[0]] = src

    def add(self, n, dyn):
        if n.op_type == "Sum" and len(n.input) == 1:
            self.values[n.output[0]] = self.values[n.input[0]]
            return
        self.attributes(n, {})
        if len(n.input) != 2 or len(dyn) != 2:
            if len(n.input) == 2:
                raise self.fail(n, "adds a constant to a value computed from the input where "
                                   "no preceding Linear (MatMul) takes it as its bias")
            raise self.fail(n, f"{n.op_type} of {len(n.input)} inputs; cdl adds two branches")
        a, b = self.values[n.input[0]], self.values[n.input[1]]
        if a.shape != b.shape or a.onnx_shape != b.onnx_shape:
            raise self.fail(n, f"adds per-sample shapes {shape_str(a.onnx_shape)} and "
                               f"{shape_str(b.onnx_shape)}; a residual Add joins equal shapes")
        self.values[n.output[0]] = _Dyn("add", n, (a, b), [], a.shape, a.onnx_shape,
                                         fork=_fork(a, b))

    def linearize(self, v, stop, depth=1):
        """The cdl layers computing v from ``stop`` (a value v's branches pass through)."""
        from ..layers import Dropout, Residual
        from .format import MAX_NESTING

        if depth > MAX_NESTING:
            raise self.fail(v.node, f"residual branches nest more than {MAX_NESTING} levels "
                                    f"deep")
        path, e = [], v     # the values after stop up to v, walked back along idom
        while e is not stop:
            path.append(e)
            e = e.idom
        path.reverse()
        layers = []
        for e in path:
            if e.used:
                raise self.fail(e.node, "its result feeds two branches that cdl would have to "
                                        "compute twice (a branch cdl cannot express)")
            e.used = True
            if e.kind == "op":
                layers.extend(e.layers)
                continue
            a, b = e.parents
            body = self.linearize(a, e.fork, depth + 1)
            short = self.linearize(b, e.fork, depth + 1)
            if not body:
                body, short = short, body
            if not body:
                # it adds a value to itself (as cdl exports a Residual whose body is only
                # Dropout): a Residual's body needs a layer, and Dropout(0) is the identity
                body = [Dropout(0.0)]
            layers.append(Residual(body, short or None))
        return layers

    # -- constant folding -------------------------------------------------------------
    def fold(self, n, shape_of=None):
        op = n.op_type
        ins = []
        for i in n.input:
            ins.append(None if not i else self.values[i])
        if shape_of is None and any(isinstance(v, _Dyn) for v in ins):
            raise self.fail(n, "cannot fold")
        try:
            out = self._fold(n, op, ins, shape_of)
        except OnnxImportError:
            raise
        except (TypeError, ValueError, IndexError, OverflowError, ZeroDivisionError,
                MemoryError, KeyError) as exc:
            raise self.fail(n, f"cannot fold it ({type(exc).__name__}: {exc})") from None
        out = np.asarray(out)
        if out.size > _MAX_CONST_ELEMENTS:
            raise self.fail(n, f"it makes a constant of {out.size} values, more than cdl "
                               f"folds ({_MAX_CONST_ELEMENTS})")
        outs = [o for o in n.output if o]
        if len(outs) != 1:
            raise self.fail(n, "folded ops must have one output")
        self.values[outs[0]] = out

    def _fold(self, n, op, ins, shape_of):
        has_batch = any(isinstance(v, np.ndarray) and v.dtype == object for v in ins
                        if v is not None)
        numeric_only = op in ("Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "ConstantOfShape",
                              "Transpose")
        if has_batch and numeric_only:
            raise self.fail(n, "it computes with the batch size, which cdl does not fold")
        H = self.onnx.helper

        def need(k):
            if k >= len(ins) or ins[k] is None:
                raise self.fail(n, f"input {k} is missing")
            return ins[k]

        if op == "Constant":
            a = self.attributes(n, {"value": None, "value_float": None, "value_floats": None,
                                    "value_int": None, "value_ints": None})
            given = [(k, v) for k, v in a.items() if v is not None]
            if len(given) != 1:
                raise self.fail(n, "a Constant needs exactly one of value, value_float(s), "
                                   "value_int(s)")
            k, v = given[0]
            return np.asarray(v, dtype=np.float32 if k.startswith("value_float") else
                              np.int64 if k.startswith("value_int") else None)
        if op == "Shape":
            a = self.attributes(n, {"start": 0, "end": None})
            if shape_of is not None:
                shape = np.array([BATCH, *shape_of.onnx_shape], dtype=object)
            else:
                shape = np.array(need(0).shape, dtype=np.int64)
            r = len(shape)
            start = a["start"] + r if a["start"] < 0 else a["start"]
            end = r if a["end"] is None else (a["end"] + r if a["end"] < 0 else a["end"])
            out = shape[max(0, min(start, r)):max(0, min(end, r))]
            return out if out.dtype == object and any(v is BATCH for v in out) \
                else out.astype(np.int64)
        if op == "ConstantOfShape":
            a = self.attributes(n, {"value": None})
            shape = need(0)
            if shape.ndim != 1 or shape.dtype.kind not in "iu" or (shape < 0).any():
                raise self.fail(n, f"shape {shape.tolist()} is not a list of ints >= 0")
            if _prod(shape.tolist()) > _MAX_CONST_ELEMENTS:
                raise self.fail(n, f"it would make a constant of {_prod(shape.tolist())} values, "
                                   f"more than cdl folds ({_MAX_CONST_ELEMENTS})")
            value = a["value"] if a["value"] is not None else np.zeros(1, np.float32)
            if value.size != 1:
                raise self.fail(n, "value must hold one element")
            return np.full(tuple(int(s) for s in shape), value.reshape(-1)[0], value.dtype)
        if op == "Identity":
            self.attributes(n, {})
            return need(0)
        if op == "Gather":
            a = self.attributes(n, {"axis": 0})
            data, idx = need(0), need(1)
            if idx.dtype.kind not in "iu":
                raise self.fail(n, "indices must be integers")
            return np.take(data, idx.astype(np.int64), axis=a["axis"])
        if op in ("Unsqueeze", "Squeeze"):
            a = self.attributes(n, {"axes": None})
            data = need(0)
            axes = a["axes"]
            if len(ins) > 1 and ins[1] is not None:
                axes = [int(v) for v in ins[1].reshape(-1)]
            if op == "Squeeze":
                if axes is None:
                    return np.squeeze(data)
                return np.squeeze(data, axis=tuple(v + data.ndim if v < 0 else v for v in axes))
            if axes is None:
                raise self.fail(n, "Unsqueeze needs axes")
            r = data.ndim + len(axes)
            out = data
            for ax in sorted(v + r if v < 0 else v for v in axes):
                out = np.expand_dims(out, ax)
            return out
        if op == "Concat":
            a = self.attributes(n, {"axis": None})
            parts = [v for v in ins if v is not None]
            if a["axis"] is None or not parts:
                raise self.fail(n, "Concat needs an axis and inputs")
            if any(p.dtype == object for p in parts):
                parts = [p.astype(object) for p in parts]
            return np.concatenate(parts, axis=a["axis"])
        if op == "Slice":
            self.attributes(n, {})
            data = need(0)
            starts = [int(v) for v in need(1).reshape(-1)]
            ends = [int(v) for v in need(2).reshape(-1)]
            axes = list(range(len(starts))) if len(ins) < 4 or ins[3] is None else \
                [int(v) for v in ins[3].reshape(-1)]
            steps = [1] * len(starts) if len(ins) < 5 or ins[4] is None else \
                [int(v) for v in ins[4].reshape(-1)]
            if not len(starts) == len(ends) == len(axes) == len(steps) or 0 in steps:
                raise self.fail(n, "inconsistent starts/ends/axes/steps")
            index = [slice(None)] * data.ndim
            for s, e, ax, st in zip(starts, ends, axes, steps):
                index[ax + data.ndim if ax < 0 else ax] = slice(s, e, st)
            return data[tuple(index)]
        if op == "Cast":
            a = self.attributes(n, {"to": None, "saturate": 1})
            data = need(0)
            try:
                dt = H.tensor_dtype_to_np_dtype(a["to"])
            except Exception:
                raise self.fail(n, f"cast to an unknown type {a['to']}") from None
            if data.dtype == object:
                if dt.kind not in "iu":
                    raise self.fail(n, "casts the batch size to a non-integer")
                return data
            if dt.kind not in "fiub":
                raise self.fail(n, f"cast to {dt}")
            return data.astype(dt)
        if op == "Reshape":
            a = self.attributes(n, {"allowzero": 0})
            data, shape = need(0), need(1)
            if shape.dtype == object:
                raise self.fail(n, "reshapes a constant by the batch size")
            t = [int(v) for v in shape.reshape(-1)]
            if not a["allowzero"]:
                t = [data.shape[i] if v == 0 and i < data.ndim else v for i, v in enumerate(t)]
            return data.reshape(t)
        if op == "Transpose":
            a = self.attributes(n, {"perm": None})
            return np.transpose(need(0), a["perm"])
        if op in ("Add", "Sub", "Mul", "Div"):
            self.attributes(n, {})
            x, y = need(0), need(1)
            if x.dtype != y.dtype:
                raise self.fail(n, f"operands of types {x.dtype} and {y.dtype}")
            if np.broadcast_shapes(x.shape, y.shape) and \
                    _prod(np.broadcast_shapes(x.shape, y.shape)) > _MAX_CONST_ELEMENTS:
                raise self.fail(n, "the result is too large")
            if op == "Div" and x.dtype.kind in "iu":
                if (y == 0).any():
                    raise self.fail(n, "integer division by zero")
                q = np.abs(x) // np.abs(y)
                return (np.sign(x) * np.sign(y) * q).astype(x.dtype)
            with np.errstate(all="ignore"):
                return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
                        "Div": np.divide}[op](x, y)
        if op == "Neg":
            self.attributes(n, {})
            return np.negative(need(0))
        if op == "Sqrt":
            self.attributes(n, {})
            with np.errstate(all="ignore"):
                return np.sqrt(need(0))
        raise self.fail(n, "this op cannot be folded")

    # -- the model --------------------------------------------------------------------
    def build(self, layers, shape):
        from ..model import Sequential

        try:
            model = Sequential(layers, shape, dtype=self.dtype)
        except (TypeError, ValueError) as exc:
            raise self.fail(None, f"the layers do not make a cdl model: {exc}") from None
        live = {id(layer) for _, layer in model.chain.walk()}
        for layer, key, value in self.assignments:
            if id(layer) not in live:
                continue
            target = layer.params.get(key)
            if target is None:
                target = layer.buffers[key]
            if value.shape != target.shape or value.dtype.kind not in "fiub":
                raise self.fail(None, f"{layer.name}.{key}: a {value.dtype} "
                                      f"{shape_str(value.shape)} weight for "
                                      f"{shape_str(target.shape)}")
            with np.errstate(all="ignore"):
                target[...] = value
        model.onnx_output_activation = self.output_activation
        return model


def _read_bytes(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "<bytes>"
    if isinstance(source, io.TextIOBase):
        raise TypeError("cdl.onnx.load: the file object must be opened in binary mode ('rb')")
    if hasattr(source, "read"):
        data = source.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("cdl.onnx.load: the file object must be opened in binary mode")
        return bytes(data), getattr(source, "name", "<file object>")
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read(), os.fspath(source)
    if hasattr(source, "SerializeToString") and hasattr(source, "graph"):
        return source.SerializeToString(), "<ModelProto>"
    raise TypeError(f"cdl.onnx.load: expected a path, bytes, a binary file object or an onnx "
                    f"ModelProto, got {type(source).__name__}")


def _parse(onnx, data, name):
    if not data:
        raise ValueError(f"cdl.onnx.load: {name} is empty")
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception as exc:  # google.protobuf.message.DecodeError and kin
        raise ValueError(f"cdl.onnx.load: {name} is not a valid ONNX model (the protobuf "
                         f"does not decode: {type(exc).__name__}: {exc})") from exc
    if not m.HasField("graph"):
        raise ValueError(f"cdl.onnx.load: {name} is not an ONNX model (it has no graph)")
    return m


def _opset(onnx, m, name):
    versions = {}
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            versions[""] = int(o.version)
        elif o.domain:
            versions[o.domain] = int(o.version)
    if "" not in versions:
        if m.ir_version >= 3 or len(m.opset_import):
            raise ValueError(f"cdl.onnx.load: {name} does not import the default ONNX opset")
        versions[""] = 1
    return versions[""]


def load(source, input_shape=None):
    """A cdl ``Sequential`` from an ONNX model: a path, bytes, a binary file object or a
    ModelProto.

    The graph must be a chain of supported ops from one float32/float64 input with a
    batch axis (``input_shape`` gives the per-sample shape when the graph leaves it
    symbolic), with residual Adds joining two branches from one value (an Add of a
    value to itself, as export writes for a ``Residual`` of Dropout alone, gives a
    ``Residual`` whose body is ``Dropout(0.0)``, the identity). Constant subgraphs are
    folded; Dropout and Identity vanish (a graph that is the identity gives a model
    of one ``Dropout(0.0)``); a final Softmax/LogSoftmax is left out of the model
    with a warning and named in ``model.onnx_output_activation``
    ("softmax", "log_softmax" or None). Opsets before 13 are converted with
    ``onnx.version_converter`` first. Everything else is a ValueError naming the node,
    its op type and the reason, and listing the supported ops (``supported_ops()``).
    """
    if input_shape is not None:
        from ..model import _input_shape
        input_shape = _input_shape(input_shape, "cdl.onnx.load")
    onnx = _require_onnx()
    data, name = _read_bytes(source)
    m = _parse(onnx, data, name)
    version = _opset(onnx, m, name)
    newest = onnx.defs.onnx_opset_version()
    if version > newest:
        raise ValueError(f"cdl.onnx.load: {name} uses opset {version}, newer than this onnx "
                         f"knows ({newest}); upgrade onnx")
    if version < MIN_OPSET:
        # convert only graphs made of ops cdl reads (the converter is C++ code; it
        # does not get arbitrary graphs)
        _Importer(onnx, m, input_shape).prepare()
        try:
            m = onnx.version_converter.convert_version(m, MIN_OPSET)
        except Exception as exc:
            raise ValueError(f"cdl.onnx.load: {name} uses opset {version} and "
                             f"onnx.version_converter cannot bring it to {MIN_OPSET} "
                             f"({type(exc).__name__}: {exc})") from None
    imp = _Importer(onnx, m, input_shape)
    try:
        layers, shape = imp.run()
    except RecursionError:
        raise ValueError(f"cdl.onnx.load: {name}: the graph nests too deeply") from None
    model = imp.build(layers, shape)
    if imp.output_activation is not None:
        fn = "softmax" if imp.output_activation == "softmax" else "log-softmax"
        warnings.warn(f"cdl.onnx.load: the graph ends with a {fn} over the classes; the cdl "
                      f"model returns the scores before it (model.onnx_output_activation == "
                      f"{imp.output_activation!r}); apply cdl.functional.softmax to "
                      f"predictions for probabilities (SoftmaxCrossEntropy trains on the "
                      f"scores)", stacklevel=2)
    return model

