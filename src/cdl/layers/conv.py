"""Conv2d: direct 2-D convolution over NCHW batches."""
import numpy as np

from .._kernels import conv as _conv
from ..functional._checks import conv_output_size, int_pair, shape_str
from .base import FixedOnceBuilt, FoldsAtInference, Layer, check_init, positive_int
from .chain import Op

__all__ = ["Conv2d"]


class Conv2d(FoldsAtInference, Layer):
    """2-D convolution (cross-correlation) over NCHW inputs.

    out[n, k, i, j] = b[k] + Σ_c Σ_u Σ_v W[k, c, u, v] · x[n, c, S·i + u − P, S·j + v − P],
    with output size H2 = (H1 − F + 2P)/S + 1 (floor), W2 likewise.
    ``weight`` is (out_channels, in_channels, kh, kw), ``bias`` (out_channels,);
    ``bias=False`` leaves it out (as before a BatchNorm2d).
    """

    decay = ("weight",)
    in_channels = FixedOnceBuilt()
    out_channels = FixedOnceBuilt()
    kernel_size = FixedOnceBuilt()
    stride = FixedOnceBuilt()
    padding = FixedOnceBuilt()

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, init="auto"):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels", "Conv2d")
        self.out_channels = positive_int(out_channels, "out_channels", "Conv2d")
        self.kernel_size = int_pair(kernel_size, "kernel_size", "Conv2d", 1)
        self.stride = int_pair(stride, "stride", "Conv2d", 1)
        self.padding = int_pair(padding, "padding", "Conv2d", 0)
        self.use_bias = bool(bias)
        self.init = check_init(init, "Conv2d")
        self._draw(np.random.default_rng(), "he" if init == "auto" else init, np.float32)
        self.dtype = np.dtype(np.float32)

    def get_config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "bias": self.use_bias, "init": self.init}

    @classmethod
    def declared_params(cls, config):
        ks = config["kernel_size"]
        kh, kw = (ks, ks) if isinstance(ks, int) else (int(ks[0]), int(ks[1]))
        i, o = int(config["in_channels"]), int(config["out_channels"])
        return max(o, 0) * max(i, 0) * max(kh, 0) * max(kw, 0) + \
            (max(o, 0) if config.get("bias", True) else 0)

    def describe(self):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        s = f"s={sh}" if sh == sw else f"s={sh},{sw}"
        p = f"p={ph}" if ph == pw else f"p={ph},{pw}"
        return (f"Conv2d({self.in_channels}, {self.out_channels}, {kh}x{kw}, {s}, {p}"
                + ("" if self.use_bias else ", no bias") + ")")

    def _create(self, rng, init, dtype):
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        self._new_weight(shape, self.in_channels * kh * kw, self.out_channels * kh * kw,
                         rng, init, dtype, self.use_bias)

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
        self._check_built("flops")
        kh, kw = self.kernel_size
        _, h2, w2 = self.output_shape
        # multiply-adds, then the bias adds (as Linear counts them)
        return (2 * self.in_channels * kh * kw + (1 if self.use_bias else 0)) \
            * self.out_channels * h2 * w2

    writes_through_ws = True
    backward_reads_output = False   # it reads x and the weights

    def _forward(self, x, ws, nt, train):
        out = ws["out"]
        (sh, sw), (ph, pw) = self.stride, self.padding
        if train:
            _conv.conv2d_forward(x, self.params["weight"], self.params.get("bias"), out,
                                 sh, sw, ph, pw, nt)
        else:
            w, b = self._folded_params(ws)
            _conv.conv2d_forward(x, w, b, out, sh, sw, ph, pw, nt, self.fold_relu)
        return out

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        (sh, sw), (ph, pw) = self.stride, self.padding
        _conv.conv2d_backward_weight(g, x, self.grads["weight"], self.grads.get("bias"),
                                     sh, sw, ph, pw, nt)
        if not need_input_grad:
            return None
        _conv.conv2d_backward_input(g, self.params["weight"], ws["dx"], sh, sw, ph, pw, nt)
        return ws["dx"]

    # -- ONNX --------------------------------------------------------------------------
    onnx_ops = ("Conv",)

    def to_onnx(self, graph, x):
        inputs = [x, graph.param(self, "weight")]
        if self.use_bias:
            inputs.append(graph.param(self, "bias"))
        (ph, pw) = self.padding
        return graph.node("Conv", inputs, self, kernel_shape=list(self.kernel_size),
                          strides=list(self.stride), pads=[ph, pw, ph, pw], dilations=[1, 1],
                          group=1)

    @classmethod
    def from_onnx(cls, node, reader):
        """Conv over NCHW with a constant weight: group 1, dilations 1, padding equal on
        both sides (``pads`` or ``auto_pad``), any strides; bias optional."""
        a = reader.attrs(node, {"auto_pad": "NOTSET", "dilations": None, "group": 1,
                                "kernel_shape": None, "pads": None, "strides": None})
        w = reader.const(node, 1, "W (weight)")
        if w.ndim != 4:
            raise reader.fail(node, f"a {w.ndim - 2}-D convolution (weight "
                                    f"{shape_str(w.shape)}); cdl's Conv2d is 2-D")
        if len(reader.shape) != 3:
            raise reader.fail(node, f"input of per-sample shape {shape_str(reader.shape)}; "
                                    f"Conv2d takes CxHxW")
        if a["group"] != 1:
            raise reader.fail(node, f"group={a['group']} (grouped or depthwise convolution) is "
                                    f"not supported; cdl's Conv2d has group=1")
        kernel = tuple(int(k) for k in w.shape[2:])
        if a["kernel_shape"] is not None and tuple(a["kernel_shape"]) != kernel:
            raise reader.fail(node, f"kernel_shape {a['kernel_shape']} differs from the "
                                    f"weight's {list(kernel)}")
        if w.shape[1] != reader.shape[0]:
            raise reader.fail(node, f"weight {shape_str(w.shape)} expects {w.shape[1]} input "
                                    f"channels, the input has {reader.shape[0]}")
        strides, pads = reader.window(node, a, kernel)
        b = reader.const(node, 2, "B (bias)", optional=True)
        if b is not None and b.shape != (w.shape[0],):
            raise reader.fail(node, f"bias of shape {shape_str(b.shape)}, expected "
                                    f"({w.shape[0]},)")
        layer = cls(int(w.shape[1]), int(w.shape[0]), kernel, stride=strides, padding=pads,
                    bias=b is not None)
        reader.assign(layer, "weight", w)
        if b is not None:
            reader.assign(layer, "bias", b)
        return [layer]

    def plan_forward(self, x, ws, train):
        if train:
            k = _conv.ConvForward(x, self.params["weight"], self.params.get("bias"), ws["out"],
                                  self.stride, self.padding)
            return [Op(k.run, k.bind_input, x.shape)], ws["out"]
        return self._inference_ops(lambda w, b: _conv.ConvForward(
            x, w, b, ws["out"], self.stride, self.padding, self.fold_relu), x, ws)

    def adds_input_grad(self):
        return True

    def plan_backward(self, g, x, ws, need_input_grad):
        add = ws.get("dx_add") if need_input_grad else None
        dx = add if add is not None else ws["dx"] if need_input_grad else None
        k = _conv.ConvBackward(g, x, self.params["weight"], dx, self.grads["weight"],
                               self.grads.get("bias"), self.stride, self.padding,
                               accumulate=add is not None)
        return [Op(k.run, k.bind_input, x.shape)], dx
