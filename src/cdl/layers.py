"""Layers: thin classes over the compiled kernels, no autograd.

Each layer runs ``forward(x)`` and ``backward(grad)``, keeps what backward
needs, and owns its buffers: one set per batch size (the two most recent sizes
are kept, so a last partial batch does not cause reallocation every epoch).
Shapes are checked once, when a :class:`cdl.Sequential` is built (or on a
standalone layer's first call); the per-step path only calls kernels.

Parameters live in ``layer.params`` (``"weight"``, ``"bias"``) and are updated
in place, so references to them stay valid; ``layer.grads`` holds the
gradients of the last backward with the same keys.
"""
import numpy as np

from . import _config
from ._kernels import conv as _conv
from ._kernels import dense as _dense
from ._kernels import elementwise as _ew
from ._kernels import pool as _pool
from .functional._checks import FLOAT_DTYPES, INT32_MAX, conv_output_size, int_pair, shape_str
from .init import INITS, initialize

__all__ = ["Layer", "Linear", "Conv2d", "MaxPool2d", "ReLU", "Sigmoid", "Flatten", "LAYER_TYPES"]

_KEEP_SIZES = 2  # batch sizes whose buffers a layer keeps


def _positive_int(value, name, where):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: {name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be >= 1, got {value!r}")
    return int(value)


def check_grad(grad, expect, dtype, where):
    """An upstream gradient of shape ``expect``, as a C-contiguous array of ``dtype``."""
    g = np.asarray(grad)
    if g.shape != expect:
        raise ValueError(f"{where}: grad must have shape {shape_str(expect)}, "
                         f"got {shape_str(g.shape)}")
    if g.dtype.kind not in "fiu":
        raise TypeError(f"{where}: grad must be a float array, got {g.dtype}")
    return np.ascontiguousarray(g, dtype=dtype)


def _check_init(init, where):
    if init != "auto" and init not in INITS:
        raise ValueError(f"{where}: init must be 'auto', 'he' or 'xavier', got {init!r}")
    return init


class Layer:
    """Base class. Subclasses implement ``_configure``, ``_alloc``, ``_forward``, ``_backward``."""

    has_params = False

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.index = None
        self.dtype = None
        self.input_shape = None    # per sample, without the batch axis
        self.output_shape = None
        self._ws = {}
        self._last = None

    # -- description -------------------------------------------------------------
    @property
    def name(self):
        t = type(self).__name__
        return f"{t}[{self.index}]" if self.index is not None else t

    def get_config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def describe(self):
        """Short form for summary tables."""
        return f"{type(self).__name__}()"

    def flops(self):
        """Floating-point operations per sample of one forward pass (a multiply-add is 2)."""
        return 0

    def num_params(self):
        return sum(int(p.size) for p in self.params.values())

    # -- set-up ------------------------------------------------------------------
    def build(self, input_shape, dtype, index=None, source=None, rng=None, init=None,
              keep_params=False):
        """Check ``input_shape`` (per sample), fix dtype, (re)initialise parameters.

        ``source`` describes where the input comes from, for error messages.
        Returns the per-sample output shape.
        """
        self.index = index
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{self.name}: dtype must be float32 or float64, got {dtype}")
        src = source or f"input {shape_str(input_shape)}"
        self.output_shape = tuple(int(s) for s in self._configure(tuple(input_shape), src))
        self.input_shape = tuple(int(s) for s in input_shape)
        self.dtype = dtype
        if self.has_params and keep_params:
            for d in (self.params, self.grads):
                for k in d:
                    d[k] = np.ascontiguousarray(d[k], dtype=dtype)
        elif self.has_params:
            if rng is None:
                rng = np.random.default_rng()
            self._init_params(rng, init or "he", dtype)
        self._ws = {}
        self._last = None
        return self.output_shape

    def _init_params(self, rng, init, dtype):
        pass

    def _new_params(self, shape, fan_in, fan_out, rng, init, dtype):
        """Weight of ``shape`` drawn by ``init``; zero bias (if used); zero gradients."""
        self._check_size(shape)
        w = initialize(init, shape, fan_in, fan_out, rng, dtype)
        self.params = {"weight": w}
        self.grads = {"weight": np.zeros_like(w)}
        if self.use_bias:
            self.params["bias"] = np.zeros(shape[0], dtype)
            self.grads["bias"] = np.zeros(shape[0], dtype)

    def _check_size(self, shape):
        n = int(np.prod(shape, dtype=object))
        if n > INT32_MAX:
            raise ValueError(f"{self.name}: weight {shape_str(shape)} has {n} elements; at most "
                             f"{INT32_MAX} are supported")

    def _configure(self, input_shape, source):
        return input_shape

    def _workspace(self, n):
        ws = self._ws.get(n)
        if ws is None:
            if len(self._ws) >= _KEEP_SIZES:
                self._ws.pop(next(iter(self._ws)))
            ws = self._ws[n] = self._alloc(n, True)
        return ws

    def _alloc(self, n, train):
        """Buffers for batch size n: 'out' always, backward ones if ``train``."""
        return {"out": np.empty((n,) + self.output_shape, self.dtype)}

    # -- public, validated -------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{self.name}: x must be a numeric array, got dtype {x.dtype}")
        if self.input_shape is None:
            if x.ndim < 2:
                raise ValueError(f"{self.name}: x must have a batch axis, got shape "
                                 f"{shape_str(x.shape)}")
            dt = x.dtype if x.dtype in FLOAT_DTYPES else np.dtype(np.float32)
            self.build(x.shape[1:], self.dtype or dt, index=self.index, keep_params=True)
        if x.shape[1:] != self.input_shape or x.shape[0] < 1:
            raise ValueError(f"{self.name}: expected x of shape Nx{shape_str(self.input_shape)} "
                             f"(N >= 1), got {shape_str(x.shape)}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def forward(self, x):
        """Forward pass on a batch; the result is the layer's own buffer (reused next call)."""
        x = self._check_input(x)
        ws = self._workspace(x.shape[0])
        y = self._forward(x, ws, _config.get_num_threads(), True)
        self._last = (x, ws)
        return y

    def backward(self, grad):
        """Gradient w.r.t. the input of the last forward; fills ``self.grads``."""
        if self._last is None:
            raise RuntimeError(f"{self.name}: backward called before forward")
        x, ws = self._last
        g = check_grad(grad, (x.shape[0],) + self.output_shape, self.dtype, self.name)
        return self._backward(g, x, ws, _config.get_num_threads(), True, 0.0)

    # -- hot path (trusted inputs) -------------------------------------------------
    def _forward(self, x, ws, nt, train):
        raise NotImplementedError

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        raise NotImplementedError


class Linear(Layer):
    """Fully connected layer, f(x; W) = x W^T + b.

    ``weight`` is (out_features, in_features), ``bias`` (out_features,).
    ``init``: "he" (N(0, 2/fan_in)), "xavier" (U(±sqrt(6/(fan_in+fan_out)))) or
    "auto" (He when a ReLU follows, else Xavier; decided by Sequential).
    """

    has_params = True

    def __init__(self, in_features, out_features, bias=True, init="auto"):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features", "Linear")
        self.out_features = _positive_int(out_features, "out_features", "Linear")
        self.use_bias = bool(bias)
        self.init = _check_init(init, "Linear")
        self._init_params(np.random.default_rng(), "he" if init == "auto" else init, np.float32)
        self.dtype = np.dtype(np.float32)
        self.input_shape = None

    def get_config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.use_bias, "init": self.init}

    def describe(self):
        return f"Linear({self.in_features}, {self.out_features}{'' if self.use_bias else ', no bias'})"

    def _init_params(self, rng, init, dtype):
        self._new_params((self.out_features, self.in_features), self.in_features,
                         self.out_features, rng, init, dtype)

    def _configure(self, input_shape, source):
        if len(input_shape) != 1:
            n = int(np.prod(input_shape))
            raise ValueError(f"{self.name}: expects flat inputs of {self.in_features} features, "
                             f"got {shape_str(input_shape)} ({source}); put a Flatten() before "
                             f"it ({shape_str(input_shape)} = {n} features)")
        if input_shape[0] != self.in_features:
            raise ValueError(f"{self.name}: expected {self.in_features} input features, "
                             f"got {input_shape[0]} ({source})")
        return (self.out_features,)

    def flops(self):
        return 2 * self.in_features * self.out_features + (self.out_features if self.use_bias else 0)

    def _alloc(self, n, train):
        ws = {"out": np.empty((n, self.out_features), self.dtype)}
        if train:
            ws["dx"] = np.empty((n, self.in_features), self.dtype)
        return ws

    def _forward(self, x, ws, nt, train):
        out = ws["out"]
        _dense.linear_forward(x, self.params["weight"], self.params.get("bias"), out, nt)
        return out

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        dx = ws["dx"] if need_input_grad else None
        # The kernel adds the L2 gradient 2*l2*W to dW in the same pass.
        _dense.linear_backward(g, x, self.params["weight"], dx, self.grads["weight"],
                               self.grads.get("bias"), l2, nt)
        return dx


class Conv2d(Layer):
    """2-D convolution (cross-correlation) over NCHW inputs.

    out[n, k, i, j] = b[k] + Σ_c Σ_u Σ_v W[k, c, u, v] · x[n, c, S·i + u − P, S·j + v − P],
    with output size H2 = (H1 − F + 2P)/S + 1 (floor), W2 likewise.
    ``weight`` is (out_channels, in_channels, kh, kw), ``bias`` (out_channels,).
    """

    has_params = True

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, init="auto"):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels", "Conv2d")
        self.out_channels = _positive_int(out_channels, "out_channels", "Conv2d")
        self.kernel_size = int_pair(kernel_size, "kernel_size", "Conv2d", 1)
        self.stride = int_pair(stride, "stride", "Conv2d", 1)
        self.padding = int_pair(padding, "padding", "Conv2d", 0)
        self.use_bias = bool(bias)
        self.init = _check_init(init, "Conv2d")
        self._init_params(np.random.default_rng(), "he" if init == "auto" else init, np.float32)
        self.dtype = np.dtype(np.float32)

    def get_config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "bias": self.use_bias, "init": self.init}

    def describe(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        s = f"s={sh}" if sh == sw else f"s={sh},{sw}"
        p = f"p={ph}" if ph == pw else f"p={ph},{pw}"
        return f"Conv2d({self.in_channels}, {self.out_channels}, {kh}x{kw}, {s}, {p})"

    def _init_params(self, rng, init, dtype):
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        self._new_params(shape, self.in_channels * kh * kw, self.out_channels * kh * kw,
                         rng, init, dtype)

    def _configure(self, input_shape, source):
        if len(input_shape) != 3:
            raise ValueError(f"{self.name}: expects inputs of shape CxHxW, got "
                             f"{shape_str(input_shape)} ({source})")
        c, h, w = input_shape
        if c != self.in_channels:
            raise ValueError(f"{self.name}: expected {self.in_channels} input channels, got {c} "
                             f"({source})")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        try:
            h2 = conv_output_size(h, kh, sh, ph, self.name, "H")
            w2 = conv_output_size(w, kw, sw, pw, self.name, "W")
        except ValueError as exc:
            raise ValueError(f"{exc} ({source})") from None
        return (self.out_channels, h2, w2)

    def flops(self):
        kh, kw = self.kernel_size
        _, h2, w2 = self.output_shape
        return 2 * self.in_channels * kh * kw * self.out_channels * h2 * w2

    def _alloc(self, n, train):
        ws = {"out": np.empty((n,) + self.output_shape, self.dtype)}
        if train:
            ws["dx"] = np.empty((n,) + self.input_shape, self.dtype)
        return ws

    def _forward(self, x, ws, nt, train):
        out = ws["out"]
        (sh, sw), (ph, pw) = self.stride, self.padding
        _conv.conv2d_forward(x, self.params["weight"], self.params.get("bias"), out,
                             sh, sw, ph, pw, nt)
        return out

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        (sh, sw), (ph, pw) = self.stride, self.padding
        w, dw = self.params["weight"], self.grads["weight"]
        _conv.conv2d_backward_weight(g, x, dw, self.grads.get("bias"), sh, sw, ph, pw, nt)
        if l2:
            _ew.axpy(2.0 * l2, w.reshape(-1), dw.reshape(-1), nt)
        if not need_input_grad:
            return None
        dx = ws["dx"]
        _conv.conv2d_backward_input(g, w, dx, sh, sw, ph, pw, nt)
        return dx


class MaxPool2d(Layer):
    """Max pooling: out[n, c, i, j] = max over the F×F window at (S·i − P, S·j − P).

    H2 = (H1 − F + 2P)/S + 1 (floor); ``stride`` defaults to ``kernel_size``;
    padding at most half the kernel (padded cells never win). ``indices`` holds
    the int32 argmax of the last forward: flat index h·W + w in the input plane.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = int_pair(kernel_size, "kernel_size", "MaxPool2d", 1)
        self.stride = self.kernel_size if stride is None else int_pair(stride, "stride",
                                                                       "MaxPool2d", 1)
        self.padding = int_pair(padding, "padding", "MaxPool2d", 0)
        for p, k in zip(self.padding, self.kernel_size):
            if 2 * p > k:
                raise ValueError(f"MaxPool2d: padding must be at most half the kernel size, "
                                 f"got padding={padding!r} for kernel_size={kernel_size!r}")
        self.indices = None

    def get_config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding)}

    def describe(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return f"MaxPool2d({kh}x{kw}, s={sh}" + (f",{sw}" if sw != sh else "") + \
            (f", p={ph}" + (f",{pw}" if pw != ph else "") if ph or pw else "") + ")"

    def _configure(self, input_shape, source):
        if len(input_shape) != 3:
            raise ValueError(f"{self.name}: expects inputs of shape CxHxW, got "
                             f"{shape_str(input_shape)} ({source})")
        c, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        try:
            h2 = conv_output_size(h, kh, sh, ph, self.name, "H")
            w2 = conv_output_size(w, kw, sw, pw, self.name, "W")
        except ValueError as exc:
            raise ValueError(f"{exc} ({source})") from None
        return (c, h2, w2)

    def flops(self):
        kh, kw = self.kernel_size
        return int(np.prod(self.output_shape)) * kh * kw

    def _alloc(self, n, train):
        ws = {"out": np.empty((n,) + self.output_shape, self.dtype),
              "indices": np.empty((n,) + self.output_shape, np.int32)}
        if train:
            ws["dx"] = np.empty((n,) + self.input_shape, self.dtype)
        return ws

    def _forward(self, x, ws, nt, train):
        out, idx = ws["out"], ws["indices"]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        _pool.max_pool2d_forward(x, out, idx, kh, kw, sh, sw, ph, pw, nt)
        if train:
            self.indices = idx
        return out

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        dx = ws["dx"]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        _pool.max_pool2d_backward(g, ws["indices"], dx, kh, kw, sh, sw, ph, pw, nt)
        return dx

    # A ReLU right before this pool, run as one pass (Sequential decides; see
    # _pool.max_pool2d_relu_forward): x is the ReLU's input, results are identical.
    def fuses_relu(self):
        return self.kernel_size == (2, 2) and self.stride == (2, 2) and self.padding == (0, 0)

    def _forward_relu(self, x, ws, nt, train):
        out, idx = ws["out"], ws["indices"]
        _pool.max_pool2d_relu_forward(x, out, idx, nt)
        if train:
            self.indices = idx
        return out

    def _backward_relu(self, g, x, ws, nt):
        dx = ws["dx"]
        _pool.max_pool2d_relu_backward(g, ws["out"], ws["indices"], dx, nt)
        return dx


class _Elementwise(Layer):
    def flops(self):
        return int(np.prod(self.output_shape))

    def _alloc(self, n, train):
        out = np.empty((n,) + self.output_shape, self.dtype)
        ws = {"out": out, "out_flat": out.reshape(-1)}
        if train:
            dx = np.empty((n,) + self.input_shape, self.dtype)
            ws["dx"] = dx
            ws["dx_flat"] = dx.reshape(-1)
        return ws

    def _forward(self, x, ws, nt, train):
        self._fwd_kernel(x.reshape(-1), ws["out_flat"], nt)
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        self._bwd_kernel(g.reshape(-1), ws["out_flat"], ws["dx_flat"], nt)
        return ws["dx"]


class ReLU(_Elementwise):
    """f(x) = max(0, x); gradient 1 where the output is positive, else 0."""

    _fwd_kernel = staticmethod(_ew.relu_forward)
    _bwd_kernel = staticmethod(_ew.relu_backward)


class Sigmoid(_Elementwise):
    """σ(x) = 1 / (1 + e^{−x}); gradient σ(x)(1 − σ(x)), computed from the output."""

    def flops(self):
        return 4 * int(np.prod(self.output_shape))

    _fwd_kernel = staticmethod(_ew.sigmoid_forward)
    _bwd_kernel = staticmethod(_ew.sigmoid_backward)


class Flatten(Layer):
    """Reshape each sample CxHxW -> (C·H·W,) (a view, no copy)."""

    def _configure(self, input_shape, source):
        return (int(np.prod(input_shape)),)

    def _alloc(self, n, train):
        return {}

    def _forward(self, x, ws, nt, train):
        return x.reshape(x.shape[0], -1)

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        return g.reshape(x.shape)


LAYER_TYPES = {cls.__name__: cls for cls in (Linear, Conv2d, MaxPool2d, ReLU, Sigmoid, Flatten)}
