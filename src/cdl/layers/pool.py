"""Pooling: max (with argmax indices), average, and global average."""
import numpy as np

from .._kernels import pool as _pool
from ..functional._checks import conv_output_size, int_pair, shape_str
from .base import FixedOnceBuilt, Layer
from .chain import Op

__all__ = ["MaxPool2d", "AvgPool2d", "GlobalAvgPool2d"]


class _Pool2d(Layer):
    transparent = True
    writes_through_ws = True
    kernel_size = FixedOnceBuilt()
    stride = FixedOnceBuilt()
    padding = FixedOnceBuilt()

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        where = type(self).__name__
        self.kernel_size = int_pair(kernel_size, "kernel_size", where, 1)
        self.stride = self.kernel_size if stride is None else int_pair(stride, "stride",
                                                                       where, 1)
        self.padding = int_pair(padding, "padding", where, 0)
        for p, k in zip(self.padding, self.kernel_size):
            if 2 * p > k:
                raise ValueError(f"{where}: padding must be at most half the kernel size, "
                                 f"got padding={padding!r} for kernel_size={kernel_size!r}")

    def get_config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding)}

    def describe(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return f"{type(self).__name__}({kh}x{kw}, s={sh}" + (f",{sw}" if sw != sh else "") + \
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
        self._check_built("flops")
        kh, kw = self.kernel_size
        return int(np.prod(self.output_shape)) * kh * kw

    def to_onnx(self, graph, x):
        (ph, pw) = self.padding
        return graph.node(self.onnx_ops[0], [x], self, kernel_shape=list(self.kernel_size),
                          strides=list(self.stride), pads=[ph, pw, ph, pw],
                          **self._onnx_extra)

    @classmethod
    def from_onnx(cls, node, reader):
        """2-D pooling over NCHW: dilations 1, padding equal on both sides and at most
        half the kernel, ``ceil_mode`` only where it gives floor's output size."""
        allowed = {"auto_pad": "NOTSET", "ceil_mode": 0, "dilations": None,
                   "kernel_shape": None, "pads": None, "strides": None}
        allowed.update(cls._onnx_allowed)
        a = reader.attrs(node, allowed)
        if len(reader.shape) != 3 or a["kernel_shape"] is None or len(a["kernel_shape"]) != 2:
            raise reader.fail(node, f"pooling of per-sample shape {shape_str(reader.shape)} "
                                    f"with kernel_shape {a['kernel_shape']}; cdl pools 2-D "
                                    f"CxHxW inputs")
        kernel = tuple(int(k) for k in a["kernel_shape"])
        strides, pads = reader.window(node, a, kernel)
        cls._onnx_check(node, reader, a, pads)
        return [cls(kernel, stride=strides, padding=pads)]

    _onnx_extra = {}
    _onnx_allowed = {}

    @classmethod
    def _onnx_check(cls, node, reader, attrs, pads):
        pass

    @property
    def _window(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return kh, kw, sh, sw, ph, pw


class MaxPool2d(_Pool2d):
    """Max pooling: out[n, c, i, j] = max over the F×F window at (S·i − P, S·j − P).

    H2 = (H1 − F + 2P)/S + 1 (floor); ``stride`` defaults to ``kernel_size``;
    padding at most half the kernel (padded cells never win). ``indices`` holds
    the int32 argmax of the last forward: flat index h·W + w in the input plane.

    A ReLU right before a 2×2 stride-2 pool runs inside the pool's pass
    (``fused_previous``): x is then the ReLU's input, and results are identical.
    """

    onnx_ops = ("MaxPool",)
    _onnx_allowed = {"storage_order": 0}     # only orders the unused Indices output

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__(kernel_size, stride, padding)
        self.indices = None

    def absorbs_previous(self, layer):
        return (layer.activation == "relu"
                and self.kernel_size == (2, 2) and self.stride == (2, 2)
                and self.padding == (0, 0))

    @property
    def backward_reads_output(self):
        return self.fused_previous     # the fused ReLU's mask is out > 0

    def _alloc(self, n, train):
        ws = {"out": np.empty((n,) + self.output_shape, self.dtype),
              "indices": np.empty((n,) + self.output_shape, np.int32)}
        if train:
            ws["dx"] = np.empty((n,) + self.input_shape, self.dtype)
        return ws

    def _forward(self, x, ws, nt, train):
        out, idx = ws["out"], ws["indices"]
        if self._runs_previous(ws):
            _pool.max_pool2d_relu_forward(x, out, idx, nt)
        else:
            _pool.max_pool2d_forward(x, out, idx, *self._window, nt)
        if train:
            self.indices = idx
        return out

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        dx = ws["dx"]
        if self._runs_previous(ws):
            # The pair's ReLU has no parameters, so its input gradient is always wanted.
            _pool.max_pool2d_relu_backward(g, ws["out"], ws["indices"], dx, nt)
            return dx
        if not need_input_grad:
            return None
        _pool.max_pool2d_backward(g, ws["indices"], dx, *self._window, nt)
        return dx

    def plan_forward(self, x, ws, train):
        if self.fused_previous:
            k = _pool.ReluMaxPoolForward(x, ws["out"], ws["indices"])
        else:
            k = _pool.MaxPoolForward(x, ws["out"], ws["indices"], self.kernel_size,
                                     self.stride, self.padding)
        return [Op(k.run, k.bind_input, x.shape)], ws["out"]

    def on_train_forward(self, ws, x):
        self.indices = ws["indices"]

    def plan_backward(self, g, x, ws, need_input_grad):
        if self.fused_previous:
            k = _pool.ReluMaxPoolBackward(g, ws["out"], ws["indices"], ws["dx"])
            return [Op(k.run)], ws["dx"]
        if not need_input_grad:
            return [], None
        k = _pool.MaxPoolBackward(g, ws["indices"], ws["dx"], self.kernel_size, self.stride,
                                  self.padding)
        return [Op(k.run)], ws["dx"]


class AvgPool2d(_Pool2d):
    """Average pooling over F×F windows; padded cells count as zeros
    (PyTorch's default ``count_include_pad=True``): every window divides by kh·kw."""

    onnx_ops = ("AveragePool",)
    backward_reads_output = False
    _onnx_extra = {"count_include_pad": 1}
    _onnx_allowed = {"count_include_pad": 0}

    @classmethod
    def _onnx_check(cls, node, reader, attrs, pads):
        if any(pads) and not attrs["count_include_pad"]:
            raise reader.fail(node, "count_include_pad=0 with padding divides border windows "
                                    "by their count of real cells; cdl's AvgPool2d counts "
                                    "padded cells (count_include_pad=1)")

    def _forward(self, x, ws, nt, train):
        _pool.avg_pool2d_forward(x, ws["out"], *self._window, nt)
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        _pool.avg_pool2d_backward(g, ws["dx"], *self._window, nt)
        return ws["dx"]

    def plan_forward(self, x, ws, train):
        k = _pool.AvgPoolForward(x, ws["out"], self.kernel_size, self.stride, self.padding)
        return [Op(k.run, k.bind_input, x.shape)], ws["out"]

    def plan_backward(self, g, x, ws, need_input_grad):
        if not need_input_grad:
            return [], None
        k = _pool.AvgPoolBackward(g, ws["dx"], self.kernel_size, self.stride, self.padding)
        return [Op(k.run)], ws["dx"]


class GlobalAvgPool2d(Layer):
    """(N, C, H, W) → (N, C): the mean of each channel's plane."""

    transparent = True
    onnx_ops = ("GlobalAveragePool",)

    def to_onnx(self, graph, x):
        # ONNX keeps the 1x1 plane: (N, C, 1, 1), then Flatten to cdl's (N, C)
        y = graph.node("GlobalAveragePool", [x], self)
        return graph.node("Flatten", [y], self, axis=1)

    @classmethod
    def from_onnx(cls, node, reader):
        """GlobalAveragePool over CxHxW gives (C, 1, 1): a GlobalAvgPool2d when every use
        flattens it (Flatten/Reshape, or reads its Shape), otherwise an AvgPool2d over
        the whole plane."""
        reader.attrs(node, {})
        if len(reader.shape) != 3:
            raise reader.fail(node, f"input of per-sample shape {shape_str(reader.shape)}; "
                                    f"cdl pools 2-D CxHxW inputs")
        c, h, w = reader.shape
        uses = reader.consumers(node)

        def flattens(n):    # a Reshape to (N, m); one to (N, C, 1, 1) keeps the plane axes
            if n.op_type != "Reshape":
                return n.op_type == "Flatten"
            try:
                target = reader.const(n, 1, "shape", batch_ok=True)
            except ValueError:
                return True     # the Reshape's own import names what is wrong
            return np.ndim(target) == 1 and len(target) == 2

        flat = [n for n in uses if flattens(n)]
        if flat and not reader.is_graph_output(node) and \
                all(flattens(n) or n.op_type == "Shape" for n in uses):
            reader.set_onnx_shape((c, 1, 1))
            return [cls()]
        return [AvgPool2d((h, w), stride=(h, w))]

    def _configure(self, input_shape, source):
        if len(input_shape) != 3:
            raise ValueError(f"{self.name}: expects inputs of shape CxHxW, got "
                             f"{shape_str(input_shape)} ({source})")
        return (input_shape[0],)

    def flops(self):
        self._check_built("flops")
        return int(np.prod(self.input_shape))

    def _planes(self, a):
        c, h, w = self.input_shape
        return a.reshape(a.shape[0], c, h * w)

    def _forward(self, x, ws, nt, train):
        _pool.global_avg_pool_forward(self._planes(x), ws["out"], nt)
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        _pool.global_avg_pool_backward(g, self._planes(ws["dx"]), nt)
        return ws["dx"]

    def plan_forward(self, x, ws, train):
        planes = self._planes(x)
        k = _pool.GlobalAvgPoolForward(planes, ws["out"])
        return [Op(k.run, k.bind_input, planes.shape)], ws["out"]

    def plan_backward(self, g, x, ws, need_input_grad):
        if not need_input_grad:
            return [], None
        k = _pool.GlobalAvgPoolBackward(g, self._planes(ws["dx"]))
        return [Op(k.run)], ws["dx"]
