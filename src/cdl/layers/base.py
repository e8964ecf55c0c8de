"""The layer protocol: what every layer owns, and what the model asks of it.

A layer is one class that owns everything about itself. ``Sequential``, the
training and inference plans, files, ``summary``, ``gradcheck``, L2 and the
optimizers reach it only through these members:

shapes and state
    ``_configure(input_shape, source) -> output_shape`` checks the per-sample
    input shape; ``_create(rng, init, dtype)`` makes ``params`` (trained,
    each with a same-shaped entry in ``grads``) and ``buffers`` (state that is
    not trained, such as running statistics) through ``add_param`` and
    ``add_buffer``. ``decay`` names the parameters that L2 applies to. Their arrays
    are filled in place, never replaced (``ArrayDict``): the model's pack, plans and
    optimizer hold them. The model lays parameters out in its pack when it is built,
    so passes read ``self.params[name]`` (not an array kept from ``add_param``). A setting the plans hold is a property that calls
    ``_settings_changed()``; one the shapes follow is ``FixedOnceBuilt``.
passes
    ``_alloc(n, train)`` returns the buffers for a batch of n (``"out"``
    always); ``check_train_batch(n)`` raises ValueError if the layer cannot
    train on a batch of n (BatchNorm on a single value per channel), so that
    ``fit`` refuses such a batch before its first step; ``_forward(x, ws, nt,
    train)`` writes ``ws["out"]`` and returns it (or returns a view of x);
    ``_backward(g, x, ws, nt, need_input_grad, l2)`` overwrites ``grads`` and
    returns dL/dx (or None when not needed); a user layer's results are checked
    (``checked_pass``: a C-contiguous array of its dtype and shape). A layer
    with ``fuses_l2 = True`` adds 2λW to its decayed gradients itself (a container
    then passes l2 on to the layers it holds); otherwise the model does, right after
    its backward, for its decayed weights and those of every layer inside it.
direct results
    ``writes_through_ws = True`` promises that ``_forward`` writes its output
    only through ``ws["out"]`` and ``_backward`` its input gradient only
    through ``ws["dx"]`` (no views of them kept elsewhere). The model's public
    ``backward`` then lets the first pass write into the array it returns, and
    its ``forward`` the last pass, if also ``backward_reads_output`` is False.
    Otherwise the result is copied.
plan ops
    ``plan_forward(x, ws, train)`` and ``plan_backward(g, x, ws, need_input_grad)``
    return the same work as lists of bound calls (objects with ``run(nt)``;
    forward ones that read x also have ``bind_input``). The defaults wrap
    ``_forward``/``_backward``, so any layer runs on the fast plan; the built-in
    layers return their kernels' bound-call classes.
random state
    ``extra_state()`` / ``set_extra_state(state)``: JSON-able state a copy needs to
    train bit for bit (Dropout's generator position); ``set_replica(index)``:
    the data-parallel replica, for layers that draw random numbers.
description and files
    ``get_config()`` (constructor arguments, JSON-able), ``from_config``,
    ``flops()`` per sample, ``describe()``.
fusion
    ``absorbs_previous(layer)`` / ``absorbs_next(layer)``: whether this layer
    runs a neighbour (a ReLU) inside its own pass. The chain asks, then sets
    ``fused_previous`` / ``fused_next`` on the layer that runs the pair.
    ``merges_next(layer)``: whether, in training only, this pass also runs the
    next pass (BatchNorm + ReLU, then a 2x2 max-pool); the chain sets ``merged``.
    ``joins_residual()``: whether, as the last pass of a ``Residual``'s branch
    in training plans, this layer runs the join: with ws["join_add"] = (addend,
    out, relu, binds) its ``plan_forward`` writes its output (rounded) plus
    addend, then the ReLU if relu, into out and returns out (binds: None, or,
    when addend is a view of the Residual's input, a list to which it appends
    the ops that rebind addend, ``bind_op``; the Residual runs them as its own,
    because a chain keeps binds only for passes that read its input); with
    ws["join_mask"] its ``plan_backward`` takes the incoming
    gradient as 0 where that array is <= 0. Results are bitwise those of the
    separate passes.
    ``adds_input_grad()``: whether, as the first pass of a ``Residual``'s
    shortcut in training plans, with ws["dx_add"] (an array of its input's
    shape holding the body's input gradient) its ``plan_backward`` adds its own
    input gradient to that array and returns it, so the branches' gradients
    need no sum of their own. Values are those of the separate sum (a -0 may
    stay -0 where the sum would give +0).
containers
    ``children()`` lists (name, Layer or chain) held inside; parameters,
    buffers, names, summary and files recurse into them.
ONNX
    ``to_onnx(graph, x) -> name`` adds the layer's inference computation to an
    export graph (:class:`cdl.io.onnx.GraphBuilder`) reading the value named x,
    and returns its output's name. ``onnx_ops`` names the ONNX op types the
    class builds from, and ``from_onnx(node, reader) -> [layers]`` builds them
    for one node (:class:`cdl.io.onnx.NodeReader`). Neither needs the onnx
    package: the builder and the reader hold it. A layer without them exports
    and imports with a clear error.

Every subclass is registered in ``LAYER_TYPES`` when it is defined, under its
``type_name`` (what model files and pickles record); model files only ever build
registered classes.
"""
import hashlib
import inspect
import json
import weakref
from typing import Callable, NamedTuple, Optional

import numpy as np

from .. import _config
from .._kernels import elementwise as _ew
from .._kernels import norm as _norm
from .._registry import builtin, register
from ..functional._checks import FLOAT_DTYPES, INT32_MAX, int_at_least, shape_str
from ..init import INITS, initialize

__all__ = ["Layer", "LAYER_TYPES", "Op", "bind_op", "check_grad"]

_KEEP_SIZES = 2  # batch sizes whose buffers a layer keeps

LAYER_TYPES = {}
"""Every Layer subclass by its ``type_name`` (the whitelist model files are built from)."""


def positive_int(value, name, where):
    return int_at_least(value, name, where, 1)


def check_grad(grad, expect, dtype, where):
    """An upstream gradient of shape ``expect``, as a C-contiguous array of ``dtype``."""
    g = np.asarray(grad)
    if g.shape != expect:
        raise ValueError(f"{where}: grad must have shape {shape_str(expect)}, "
                         f"got {shape_str(g.shape)}")
    if g.dtype.kind not in "fiu":
        raise TypeError(f"{where}: grad must be a float array, got {g.dtype}")
    return np.ascontiguousarray(g, dtype=dtype)


def check_init(init, where):
    if init != "auto" and init not in INITS:
        raise ValueError(f"{where}: init must be 'auto', 'he' or 'xavier', got {init!r}")
    return init


class _CallWith:
    """``run()`` calls fn(*args)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def run(self):
        self.fn(*self.args)


class ArrayDict(dict):
    """A layer's ``params``, ``grads`` or ``buffers``. A name's array is filled in place
    (``params["weight"][...] = w``, or ``load_state_dict``), never replaced: the
    model's parameter pack, its plans and the optimizer hold that very array, so a new
    one would be read by some paths and not others."""

    def __setitem__(self, key, value):
        if key in self and self[key] is not value:      # (an in-place "+=" is the same)
            raise TypeError(f"the array {key!r} is held by the model (its parameter pack, "
                            f"plans and optimizer): set its values in place, "
                            f"[{key!r}][...] = value, or use load_state_dict")
        super().__setitem__(key, value)

    def put(self, key, value):
        """Replace the array (the layer and the parameter pack, as they lay it out)."""
        super().__setitem__(key, value)


class FixedOnceBuilt:
    """A layer setting its shapes follow (a kernel size, a stride): set freely until the
    layer is built, then fixed, since its buffers and the model's plans come from it."""

    def __set_name__(self, owner, name):
        self.name, self.slot = name, "_" + name

    def __get__(self, layer, cls=None):
        return self if layer is None else layer.__dict__[self.slot]

    def __set__(self, layer, value):
        if layer.__dict__.get("input_shape") is not None:
            raise AttributeError(f"{type(layer).__name__}: {self.name} is fixed once the "
                                 f"layer is built; make a new layer (and a new model)")
        layer.__dict__[self.slot] = value


# Each built layer's model (weakly: a layer whose model is gone may join another).
OWNERS = weakref.WeakKeyDictionary()


class Op(NamedTuple):
    """One bound call of a plan: ``run(nt)`` (``run(nt, l2)`` when ``takes_l2``).

    ``bind`` is set when the op reads the pass's input x: the plan rebinds it to
    each step's input, reshaped to ``shape``."""
    run: Callable
    bind: Optional[Callable] = None
    shape: Optional[tuple] = None
    takes_l2: bool = False


def _noop(nt):
    pass


def bind_op(bind, shape):
    """An op that runs nothing and only rebinds an operand to the model input."""
    return Op(_noop, bind, shape)


class CallOp:
    """A plan op that calls a Python function ``fn(x, nt)`` (``fn(x, nt, l2)`` for an
    op that takes l2) on a rebindable input."""

    __slots__ = ("fn", "x")

    def __init__(self, fn, x):
        self.fn, self.x = fn, x

    def bind_input(self, x):
        self.x = x

    def run(self, nt, *l2):
        self.fn(self.x, nt, *l2)


def checked_pass(layer, result, shape, what):
    """``result`` of a user layer's pass, refused unless it is what the next kernel
    reads: a C-contiguous array of the layer's dtype and ``shape`` (a wrong one would be
    read out of bounds, or broadcast into the buffer, silently). Built-in layers are
    trusted as they are."""
    if type(layer)._trusted:
        return result
    if not isinstance(result, np.ndarray) or result.shape != shape \
            or result.dtype != layer.dtype or not result.flags.c_contiguous:
        got = (f"{result.dtype} {shape_str(result.shape)}"
               + ("" if result.flags.c_contiguous else " (not C-contiguous)")
               if isinstance(result, np.ndarray) else type(result).__name__)
        raise TypeError(f"{layer.name}: {what} returned {got}; the layer protocol needs a "
                        f"C-contiguous {layer.dtype} array of shape {shape_str(shape)}")
    return result


def _owner(cls, name):
    return next(k for k in cls.__mro__ if name in k.__dict__)


def overrides_builtin_passes(layer):
    """Whether ``layer`` is of a user's subclass of a built-in layer that overrides
    ``_forward`` or ``_backward`` (a ReLU6 from ReLU): it then takes part in no fusion
    (a neighbour running it as a ReLU, a BatchNorm folded into a convolution or joining a
    Residual), since those run the built-in's computation, not its own."""
    cls = type(layer)
    if cls._trusted or not any(k._trusted and k is not Layer for k in cls.__mro__[1:]
                               if issubclass(k, Layer)):
        return False
    return not (_owner(cls, "_forward")._trusted and _owner(cls, "_backward")._trusted)


def inherits_builtin_plan(layer):
    """Whether ``layer`` overrides a built-in's passes but inherits its plan ops (which
    run the built-in's kernels): its plan then wraps its own passes (Layer's generic ops)."""
    if not overrides_builtin_passes(layer):
        return False
    cls = type(layer)
    return any(_owner(cls, plan)._trusted and _owner(cls, plan) is not Layer
               for plan in ("plan_forward", "plan_backward"))


def walk_inside(layer, prefix=""):
    """Every layer inside ``layer`` (not itself), depth first, as (state-dict prefix,
    layer): a chain's layers and what they hold, a layer child and what it holds."""
    for name, child in layer.children():
        p = f"{prefix}{name}."
        if hasattr(child, "walk"):          # a Chain
            yield from child.walk(p)
        else:
            yield p, child
            yield from walk_inside(child, p)


def unfused_decay(layer):
    """The layers, ``layer`` and inside it, whose L2 gradient the chain adds after
    ``layer``'s backward (see L2Op)."""
    if layer.fuses_l2:
        return []
    found = [layer] if layer.decay else []
    return found + [l for _, l in walk_inside(layer) if l.decay]


class L2Op:
    """dW += 2λW for the layers whose backward does not add it: ``layer`` unless it
    fuses L2, and, inside a container that does not pass l2 on to what it holds
    (``fuses_l2`` False), every layer there with decayed weights."""

    __slots__ = ("pairs",)

    def __init__(self, layer):
        self.pairs = [(l.params[k].reshape(-1), l.grads[k].reshape(-1))
                      for l in unfused_decay(layer) for k in l.decay]

    def run(self, nt, l2):
        if l2:
            for w, dw in self.pairs:
                _ew.axpy(2.0 * l2, w, dw, nt)


class Layer:
    """Base class of every layer; see the module notes for the protocol."""

    decay = ()                 # parameter names that L2 applies to
    fuses_l2 = False           # True: _backward adds 2*l2*W to the decayed grads itself
    writes_through_ws = False      # see "direct results" above
    backward_reads_output = True   # False: _backward never reads ws["out"]
    activation = None          # "relu" etc. for activations ("auto" init before a ReLU is He)
    transparent = False        # passes an activation through for "auto" init (Flatten, pooling)
    names_source = True        # error messages about the next layer name this one's output
    init = None                # "auto", "he", "xavier" for layers with weights
    onnx_ops = ()              # ONNX op types from_onnx builds this class from

    type_name = "Layer"        # the name model files record (cdl._registry.register)
    _trusted = False           # built-in classes: their passes' results are not checked
    _drawn = None              # _fingerprint() of the last random draw (_draw); None for
                               # a layer copied by a cdl before it was kept

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._trusted = builtin(cls)      # passes' results not checked (checked_pass)
        cls.type_name = cls.__name__
        if not cls.__name__.startswith("_"):
            register(LAYER_TYPES, cls)

    def __init__(self):
        self.params = ArrayDict()
        self.grads = ArrayDict()
        self.buffers = ArrayDict()
        self.path = None           # "3" or "3.layers.0": the state-dict prefix
        self.dtype = None
        self.input_shape = None    # per sample, without the batch axis
        self.output_shape = None
        self.fused_previous = False
        self.fused_next = False
        self.folded = []           # passes taken into this one at inference (Chain.fuse)
        self.merged = None         # the pass run inside this one in training (Chain.fuse)
        self._ws = {}
        self._last = None

    def __getstate__(self):
        # A copy (copy.deepcopy, pickle) leaves out the buffers and the last pass: they
        # are rebuilt on use, and a training plan's ops in them do not copy.
        state = dict(self.__dict__)
        state["_ws"], state["_last"] = {}, None
        return state

    # -- description -------------------------------------------------------------
    @property
    def name(self):
        t = type(self).__name__
        return f"{t}[{self.path}]" if self.path is not None else t

    @property
    def index(self):
        """Position in the model (None for a standalone layer)."""
        return None if self.path is None else self.path

    def get_config(self):
        """Constructor arguments as a JSON-able dict (what model files store)."""
        return {}

    def spec(self):
        """{"type": type_name, "config": get_config()}: the layer in a model file (and in
        a pickle or copy). Refused (TypeError) for what could not be rebuilt as it is:
        a class that is not registered, one whose constructor takes arguments that
        ``get_config`` does not give, or a config that is not JSON-able."""
        cls = type(self)
        held = LAYER_TYPES.get(cls.type_name)       # (or a later definition of it)
        if held is None or (held.__module__, held.__qualname__) != \
                (cls.__module__, cls.__qualname__):
            why = (" (a class whose name starts with '_' is private)"
                   if cls.__name__.startswith("_") else "")
            raise TypeError(f"{self.name}: its class {cls.__qualname__} is not registered"
                            f"{why}, so a model holding it cannot be saved, copied or "
                            f"pickled")
        if cls.get_config is Layer.get_config and len(
                inspect.signature(cls.__init__).parameters) > 1:
            raise TypeError(f"{self.name}: {cls.__qualname__} takes constructor arguments but "
                            f"does not define get_config() to return them, so a saved, "
                            f"copied or pickled model could not rebuild it as it is")
        config = self.get_config()
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{self.name}: get_config() must return JSON-able values "
                            f"(numbers, strings, lists, dicts): {exc}") from None
        if not cls._trusted:
            self._check_config_fits_constructor(config)
        return {"type": cls.type_name, "config": config}

    def _check_config_fits_constructor(self, config):
        # A user's subclass that changes the constructor but inherits get_config would be
        # rebuilt without its new arguments, or not at all (from_config passes keys its
        # __init__ does not take): refuse it here, not at load time.
        cls = type(self)
        if not isinstance(config, dict) or cls.from_config.__func__ is not \
                Layer.from_config.__func__:
            return
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        kinds = inspect.Parameter
        named = [p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD,
                                                       kinds.KEYWORD_ONLY)]
        takes_any = any(p.kind == kinds.VAR_KEYWORD for p in params)
        unknown = [k for k in config if k not in named and not takes_any]
        if unknown:
            raise TypeError(f"{self.name}: get_config() gives {unknown} but "
                            f"{cls.__qualname__}.__init__ does not take "
                            f"{'it' if len(unknown) == 1 else 'them'}, so a saved, copied "
                            f"or pickled model could not rebuild it; define get_config() "
                            f"for {cls.__qualname__}")
        owner = lambda name: next(k for k in cls.__mro__ if name in k.__dict__)  # noqa: E731
        if issubclass(owner("__init__"), owner("get_config")) and \
                owner("__init__") is not owner("get_config"):
            missing = [k for k in named if k not in config]
            if missing:
                raise TypeError(f"{self.name}: {cls.__qualname__}.__init__ takes {missing}, "
                                f"which the get_config() it inherits from "
                                f"{owner('get_config').__qualname__} does not return, so a "
                                f"saved, copied or pickled model would lose "
                                f"{'it' if len(missing) == 1 else 'them'}; define "
                                f"get_config() for {cls.__qualname__}")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def declared_params(cls, config):
        """Parameter elements a layer with this config creates, from the config alone
        (files are checked against their size before anything is built); 0 if unknown."""
        return 0

    def extra_state(self):
        """JSON-able state that is neither a parameter nor a buffer but that a copy
        needs to train bit for bit like this layer (Dropout's generator position)."""
        return {}

    def set_extra_state(self, state):
        """Restore what ``extra_state`` gave."""

    def set_replica(self, index):
        """This copy's index among data-parallel replicas (an MPI rank). Layers that draw
        random numbers in training key them by it, so replicas do not draw alike;
        replica 0 draws as a single process does. Not saved: it is the process's role."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def describe(self):
        """Short form for summary tables."""
        return f"{type(self).__name__}()"

    def flops(self):
        """Floating-point operations per sample of one forward pass (a multiply-add is 2).
        A count that follows the input shape is a RuntimeError until the layer is built
        (``_check_built``)."""
        return 0

    def _check_built(self, what):
        """RuntimeError, naming the layer, for ``what`` (a method) that needs the shapes
        of a layer that is not built yet."""
        if self.output_shape is None:
            raise RuntimeError(f"{self.name}.{what}: the layer is not built yet, so its input "
                               f"shape is unknown; build it first: put it in a Sequential "
                               f"with an input_shape, or call its forward on a batch")

    def num_params(self):
        return sum(int(p.size) for p in self.params.values())

    def children(self):
        """(name, Layer or Chain) pairs held inside this layer; none by default."""
        return []

    # -- ONNX ----------------------------------------------------------------------
    def to_onnx(self, graph, x):
        """Add this layer's inference computation on the value named ``x`` to ``graph``
        (a :class:`cdl.io.onnx.GraphBuilder`: ``node``, ``param``, ``constant``) and
        return the name of its output. Fusion flags are runtime details: export the
        logical layer."""
        raise NotImplementedError(f"{type(self).__name__} has no ONNX export (define to_onnx)")

    @classmethod
    def from_onnx(cls, node, reader):
        """The layers computing ONNX ``node`` (its op type is one of ``onnx_ops``) on its
        first input, as a list (empty for an op that is the identity at inference).
        ``reader`` (a :class:`cdl.io.onnx.NodeReader`) gives the attributes, constant
        inputs and the input's per-sample shape, takes the weights (``assign``) and
        refuses what cdl cannot compute (``fail``)."""
        raise NotImplementedError(f"{cls.__name__} has no ONNX import (define from_onnx)")

    # -- fusion --------------------------------------------------------------------
    def absorbs_previous(self, layer):
        """Whether this layer can run ``layer`` (just before it) inside its own pass."""
        return False

    def absorbs_next(self, layer):
        """Whether this layer can run ``layer`` (just after it) inside its own pass."""
        return False

    def folds(self, layer):
        """Whether, at inference, this layer can take the pass of ``layer`` (right after
        it, or after the passes it has already folded, listed in ``folded``) into its own."""
        return False

    def merges_next(self, layer):
        """Whether, in training, this pass can also run the pass of ``layer`` (right after
        it) inside its own; the chain then sets ``merged`` to that layer."""
        return False

    def joins_residual(self):
        """Whether this pass can run a Residual's join (see "fusion" in the module notes)."""
        return False

    def adds_input_grad(self):
        """Whether this pass's ``plan_backward`` can add its input gradient to another
        branch's, ws["dx_add"] (see "fusion" in the module notes)."""
        return False

    per_channel_affine = False   # at inference y = x·scale[c] + shift[c] (channel_affine)

    def channel_affine(self, scale, shift):
        """Fill the inference (scale, shift) of a ``per_channel_affine`` layer."""
        raise NotImplementedError

    def channel_affine_op(self, scale, shift):
        """An object whose ``run()`` fills (scale, shift) as ``channel_affine`` does, for
        plans (a layer can return a bound kernel call instead)."""
        return _CallWith(self.channel_affine, scale, shift)

    # -- set-up ------------------------------------------------------------------
    def build(self, input_shape, dtype, index=None, source=None, rng=None, init=None,
              keep_params=False):
        """Check ``input_shape`` (per sample), fix dtype, (re)create parameters and buffers.

        ``source`` describes where the input comes from, for error messages.
        Returns the per-sample output shape.
        """
        if index is not None:
            self.path = str(index)
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self.name}: dtype must be float32 or float64, got {dtype}")
        src = source or f"input {shape_str(input_shape)}"
        output_shape = self._checked_output_shape(self._configure(tuple(input_shape), src))
        keep = keep_params and bool(self.params or self.buffers)
        if keep:
            self._check_kept_shapes(dtype, init)
        self.output_shape = output_shape
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = dtype
        if keep:
            for d in (self.params, self.grads, self.buffers):
                for k in d:
                    if d[k].dtype.kind == "f":
                        d.put(k, np.require(d[k], dtype, "C"))
        else:
            self.params, self.grads, self.buffers = ArrayDict(), ArrayDict(), ArrayDict()
            self._draw(np.random.default_rng() if rng is None else rng, init or "he", dtype)
        self.fused_previous = self.fused_next = False
        self.merged = None
        self._ws = {}
        self._last = None
        return self.output_shape

    def _checked_output_shape(self, shape):
        """``_configure``'s per-sample output shape, as a tuple of ints >= 1 (a user
        layer's float or zero sizes were truncated, or blamed on the next layer)."""
        try:
            dims = tuple(shape)
        except TypeError:
            dims = None
        if dims is None or not all(isinstance(d, (int, np.integer))
                                   and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"{self.name}: _configure must give the per-sample output shape "
                             f"as a tuple of ints >= 1, got {shape!r}")
        return tuple(int(d) for d in dims)

    def _check_kept_shapes(self, dtype, init):
        """The values a layer holds must be the arrays its settings make (a setting changed
        after they were set, say): the kernels trust those shapes. Found by a trial
        ``_create``, after which the layer is restored as it was (a ``_create`` may set
        more than parameters: Dropout's stream)."""
        kept = dict(self.__dict__)
        try:
            self.params, self.grads, self.buffers = ArrayDict(), ArrayDict(), ArrayDict()
            self._create(np.random.default_rng(0), init or "he", dtype)
            want = {k: v.shape for d in (self.params, self.buffers) for k, v in d.items()}
        finally:
            self.__dict__.clear()
            self.__dict__.update(kept)
        have = {k: v.shape for d in (self.params, self.buffers) for k, v in d.items()}
        if have != want:
            show = lambda d: ", ".join(f"{k} {shape_str(v)}" for k, v in d.items())  # noqa: E731
            raise ValueError(f"{self.name}: the values it holds ({show(have)}) are not the "
                             f"arrays its settings make ({show(want)}); a setting changed "
                             f"after they were set? Make a new layer")

    def _configure(self, input_shape, source):
        return input_shape

    def _create(self, rng, init, dtype):
        """Create parameters and buffers (add_param / add_buffer); none by default."""

    def _draw(self, rng, init, dtype):
        """``_create``, remembering the values drawn, so that a model can tell them from
        values of the layer's own (``holds_own_values``)."""
        self._create(rng, init, dtype)
        self._drawn = self._fingerprint()

    def _fingerprint(self):
        h = hashlib.blake2b(digest_size=16)
        for d in (self.params, self.buffers):
            for k in d:
                h.update(k.encode())
                h.update(np.ascontiguousarray(d[k]).view(np.uint8).reshape(-1).data)
        return h.digest()

    def holds_own_values(self):
        """Whether the parameters or buffers hold values of their own (set by hand,
        trained, loaded or copied from a trained layer) rather than the random draw they
        were made with. A model keeps such values; it draws the others from its seed."""
        return bool(self.params or self.buffers) and self._fingerprint() != self._drawn

    def add_param(self, name, value):
        """Register a trained parameter (its gradient starts at zero). The array returned
        is for filling now: a model moves every parameter into its flat pack, so passes
        read ``self.params[name]``, never a reference kept from here."""
        value = np.require(value, requirements="C")
        self._check_size(value.shape)
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    def add_buffer(self, name, value):
        """Register state that is saved and loaded but not trained."""
        self.buffers[name] = np.require(value, requirements="C")
        return self.buffers[name]

    def _check_size(self, shape):
        n = int(np.prod(shape, dtype=object))
        if n > INT32_MAX:
            raise ValueError(f"{self.name}: weight {shape_str(shape)} has {n} elements; at most "
                             f"{INT32_MAX} are supported")

    def _new_weight(self, shape, fan_in, fan_out, rng, init, dtype, bias):
        """Weight of ``shape`` drawn by ``init`` (L2 applies to it); zero bias if ``bias``."""
        self._check_size(shape)
        self.add_param("weight", initialize(init, shape, fan_in, fan_out, rng, dtype))
        if bias:
            self.add_param("bias", np.zeros(shape[0], dtype))

    def update_parts(self, key):
        """(rows, count) when the optimizer should update parameter ``key`` in row chunks
        dealt to fixed threads (as this layer's kernels compute it); None otherwise."""
        return None

    # -- buffers -------------------------------------------------------------------
    def _workspace(self, n):
        ws = self._ws.get(n)
        if ws is None:
            if len(self._ws) >= _KEEP_SIZES:
                self._ws.pop(next(iter(self._ws)))
            ws = self._ws[n] = self._alloc(n, True)
        return ws

    def _settings_changed(self):
        """A setting the fast plans hold (Dropout's p, BatchNorm's eps, ...) changed: the
        owning model rebuilds its plans on the next call."""
        model = self._owner()
        if model is not None:
            model._reset_plans()

    def check_train_batch(self, n):
        """Raise ValueError (naming the layer) if a training pass cannot take n samples."""

    def _alloc(self, n, train):
        """Buffers for batch size n: 'out' always, backward ones if ``train``."""
        ws = {"out": np.empty((n,) + self.output_shape, self.dtype)}
        if train:
            ws["dx"] = np.empty((n,) + self.input_shape, self.dtype)
        return ws

    # -- public, validated -------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{self.name}: x must be a numeric array, got dtype {x.dtype}")
        if self.input_shape is None:
            # a call that is refused leaves the layer unbuilt
            if x.ndim < 2 or x.shape[0] < 1:
                raise ValueError(f"{self.name}: x must have a batch axis with N >= 1 "
                                 f"samples, got shape {shape_str(x.shape)}")
            # built in the input's float dtype, as a model of that dtype builds it (the
            # values Linear and Conv2d are made with, float32, are kept: widened exactly)
            dt = x.dtype if x.dtype in FLOAT_DTYPES else np.dtype(np.float32)
            self.build(x.shape[1:], dt, keep_params=True)
        if x.shape[1:] != self.input_shape or x.shape[0] < 1:
            raise ValueError(f"{self.name}: expected x of shape Nx{shape_str(self.input_shape)} "
                             f"(N >= 1), got {shape_str(x.shape)}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def forward(self, x):
        """Training-mode forward pass on a batch; the result is the layer's own buffer
        (reused by the next call with the same batch size). It computes this layer
        alone, also inside a model that runs a neighbour (a ReLU) in its pass. Inside a
        model it runs on the buffers of the model's training passes: the model's next
        ``backward`` then asks for a ``forward`` of its own first, and this layer's
        ``backward`` needs this forward to be the last pass the model ran."""
        x = self._check_input(x)
        model = self._enter_model(f"{self.name}.forward")
        try:
            self._last = None       # a forward that raises leaves no state for backward
            ws = dict(self._workspace(x.shape[0]), solo=True)
            y = self._forward(x, ws, _config.step_threads(), True)
            self._last = (x, ws)
        finally:
            if model is not None:
                model._lock.release()
            _config.restore_blas()
        return y

    def backward(self, grad):
        """Gradient w.r.t. the input of the last forward; fills ``self.grads``."""
        if self._last is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        x, ws = self._last
        if "solo" not in ws:
            raise RuntimeError(f"{self.name}: its model has run a pass since this layer's own "
                               f"forward (or it never ran one); call {self.name}.forward "
                               f"again first")
        g = check_grad(grad, (x.shape[0],) + self.output_shape, self.dtype, self.name)
        model = self._enter_model(f"{self.name}.backward")
        try:
            return self._backward(g, x, ws, _config.step_threads(), True, 0.0)
        finally:
            if model is not None:
                model._lock.release()
            _config.restore_blas()

    def _owner(self):
        """The model this layer belongs to, if it is alive."""
        owner = OWNERS.get(self)
        return owner() if owner is not None else None

    def _enter_model(self, where):
        """The layer's own passes run on the buffers its model's training passes use: take
        the model's training lock (refused while another thread trains it), and make the
        model's next backward ask for a forward of its own first. Returns the model."""
        model = self._owner()
        if model is not None:
            model._enter(where)
            model._last_n = None
        return model

    def _runs_next(self, ws):
        """Whether this pass also runs the next layer's (``fused_next``): in a chain's
        passes, not in the layer's own forward/backward (ws marked "solo")."""
        return self.fused_next and "solo" not in ws

    def _runs_previous(self, ws):
        return self.fused_previous and "solo" not in ws

    # -- hot path (trusted inputs) -------------------------------------------------
    def _forward(self, x, ws, nt, train):
        raise NotImplementedError(f"{type(self).__name__} does not implement _forward")

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        raise NotImplementedError(f"{type(self).__name__} does not implement _backward")

    def plan_forward(self, x, ws, train):
        """(ops, output): bound calls computing this layer's pass on x into ws."""
        out = ws["out"]

        def run(xv, nt):
            y = checked_pass(self, self._forward(xv, ws, nt, train), out.shape, "_forward")
            if y is not out:
                np.copyto(out, y)
        op = CallOp(run, x)
        return [Op(op.run, op.bind_input, x.shape)], out

    def plan_backward(self, g, x, ws, need_input_grad):
        """(ops, input gradient or None): bound calls of this layer's backward; each op's
        ``run(nt)``; ops that read x have ``bind_input``. L2 is added by the plan."""
        dx = ws.get("dx") if need_input_grad else None

        def run(xv, nt, l2=0.0):
            r = self._backward(g, xv, ws, nt, need_input_grad, l2)
            if need_input_grad and r is not dx:
                np.copyto(dx, checked_pass(self, r, dx.shape, "_backward"))
        op = CallOp(run, x)
        # a layer that fuses L2 (or passes it on to layers it holds) gets l2 here
        return [Op(op.run, op.bind_input, x.shape, takes_l2=self.fuses_l2)], dx

    def on_train_forward(self, ws, x):
        """Called by plans after a planned training forward, so state that the layer
        keeps (pool indices, say) is what the layer-by-layer pass would leave."""


class FoldsAtInference:
    """For Conv2d and Linear: at inference, a following per-channel affine pass
    (BatchNorm, with its fused ReLU) folds into the weights and bias, and a ReLU
    into the output tiles; fused and unfused results agree to float32 rounding."""

    def folds(self, layer):
        if self.folded and (self.folded[-1].activation == "relu" or self.folded[-1].fused_next):
            return False
        if layer.activation == "relu":
            return True
        return (not self.folded and layer.per_channel_affine
                and layer.output_shape[0] == self.output_shape[0])

    @property
    def fold_relu(self):
        return any(l.activation == "relu" or l.fused_next for l in self.folded)

    def _alloc(self, n, train):
        ws = super()._alloc(n, train)
        return ws if train else self._fold_buffers(ws)

    def _fold_buffers(self, ws):
        if any(l.per_channel_affine for l in self.folded):
            w = self.params["weight"]
            k = w.shape[0]
            ws.update(w_fold=np.empty_like(w), b_fold=np.empty(k, w.dtype),
                      scale=np.empty(k, w.dtype), shift=np.empty(k, w.dtype))
        return ws

    def _inference_ops(self, bound, x, ws):
        """(ops, output) running ``bound(weight, bias)`` (a bound kernel call on x) with the
        folded parameters, refolded before every run (the weights change in between)."""
        w, b = self._folded_params(ws)
        k = bound(w, b)
        ops = [Op(k.run, k.bind_input, x.shape)]
        if "w_fold" in ws:
            w, b = self.params["weight"], self.params.get("bias")
            n = w.shape[0]
            coef = self.folded[0].channel_affine_op(ws["scale"], ws["shift"])
            fold = _norm.FoldChannelAffine(w.reshape(n, -1), b, ws["scale"], ws["shift"],
                                           ws["w_fold"].reshape(n, -1), ws["b_fold"])

            def refold(nt):
                coef.run()
                fold.run()
            ops.insert(0, Op(refold))
        return ops, ws["out"]

    def _folded_params(self, ws):
        """(weight, bias) to run with: the layer's own, or with the affine folded in."""
        w, b = self.params["weight"], self.params.get("bias")
        if "w_fold" not in ws:
            return w, b
        scale, shift = ws["scale"], ws["shift"]
        self.folded[0].channel_affine(scale, shift)
        k = w.shape[0]
        _norm.fold_channel_affine(w.reshape(k, -1), b, scale, shift,
                                  ws["w_fold"].reshape(k, -1), ws["b_fold"])
        return ws["w_fold"], ws["b_fold"]
