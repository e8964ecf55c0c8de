"""Linear: the notes' score function f(x; W) = Wx + b, on a batch."""
import numpy as np

from .._kernels import dense as _dense
from ..functional._checks import shape_str
from .base import FixedOnceBuilt, FoldsAtInference, Layer, check_init, positive_int
from .chain import Op

__all__ = ["Linear"]


class Linear(FoldsAtInference, Layer):
    """Fully connected layer, f(x; W) = x W^T + b.

    ``weight`` is (out_features, in_features), ``bias`` (out_features,).
    ``init``: "he" (N(0, 2/fan_in)), "xavier" (U(±sqrt(6/(fan_in+fan_out)))) or
    "auto" (He when a ReLU follows, else Xavier; decided by Sequential).
    """

    decay = ("weight",)
    fuses_l2 = True             # the backward kernel adds 2*l2*W to dW in the same pass
    in_features = FixedOnceBuilt()
    out_features = FixedOnceBuilt()

    def __init__(self, in_features, out_features, bias=True, init="auto"):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features", "Linear")
        self.out_features = positive_int(out_features, "out_features", "Linear")
        self.use_bias = bool(bias)
        self.init = check_init(init, "Linear")
        self._draw(np.random.default_rng(), "he" if init == "auto" else init, np.float32)
        self.dtype = np.dtype(np.float32)

    def get_config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.use_bias, "init": self.init}

    @classmethod
    def declared_params(cls, config):
        n, k = int(config["in_features"]), int(config["out_features"])
        return max(n, 0) * max(k, 0) + (max(k, 0) if config.get("bias", True) else 0)

    def describe(self):
        return f"Linear({self.in_features}, {self.out_features}{'' if self.use_bias else ', no bias'})"

    def _create(self, rng, init, dtype):
        self._new_weight((self.out_features, self.in_features), self.in_features,
                         self.out_features, rng, init, dtype, self.use_bias)

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

    def update_parts(self, key):
        if key != "weight":
            return None
        return _dense.row_chunks(self.out_features, self.in_features)

    writes_through_ws = True
    backward_reads_output = False   # it reads x and the weights

    def _forward(self, x, ws, nt, train):
        out = ws["out"]
        if train:
            _dense.linear_forward(x, self.params["weight"], self.params.get("bias"), out, nt)
        else:
            w, b = self._folded_params(ws)
            _dense.linear_forward(x, w, b, out, nt, self.fold_relu)
        return out

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        dx = ws["dx"] if need_input_grad else None
        _dense.linear_backward(g, x, self.params["weight"], dx, self.grads["weight"],
                               self.grads.get("bias"), l2, nt)
        return dx

    # -- ONNX --------------------------------------------------------------------------
    onnx_ops = ("Gemm", "MatMul")

    def to_onnx(self, graph, x):
        inputs = [x, graph.param(self, "weight")]
        if self.use_bias:
            inputs.append(graph.param(self, "bias"))
        return graph.node("Gemm", inputs, self, transB=1)

    @classmethod
    def from_onnx(cls, node, reader):
        """Gemm (transA = 0; alpha and beta scale the weight and bias) and MatMul by a
        constant matrix, with a following Add of a constant absorbed as the bias."""
        if len(reader.shape) != 1:
            raise reader.fail(node, f"{node.op_type} on per-sample inputs of shape "
                                    f"{shape_str(reader.shape)}; cdl's Linear takes flat "
                                    f"(N, features) inputs")
        k = reader.shape[0]
        bias = None
        if node.op_type == "MatMul":
            reader.attrs(node, {})
            b = reader.const(node, 1, "B (weight)")
            if b.ndim != 2:
                raise reader.fail(node, f"weight B must be a matrix, got {shape_str(b.shape)} "
                                        f"(a vector or a stack of matrices does not give "
                                        f"(N, features) outputs)")
            if b.shape[0] != k:
                raise reader.fail(node, f"weight B of shape {shape_str(b.shape)} does not "
                                        f"multiply inputs of {k} features")
            weight = b.T
            add = reader.sole_consumer(node)
            if add is not None and add.op_type == "Add":
                other = 1 if add.input[0] == node.output[0] else 0
                if reader.is_const(add.input[other]):
                    bias = reader.bias_vector(add, reader.const(add, other, "bias"),
                                              weight.shape[0])
                    reader.absorb(add)
        else:
            a = reader.attrs(node, {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0})
            if a["transA"]:
                raise reader.fail(node, "transA=1 transposes the batch of inputs; cdl's "
                                        "Linear needs transA=0")
            b = reader.const(node, 1, "B (weight)")
            if b.ndim != 2:
                raise reader.fail(node, f"weight B must be a matrix, got {shape_str(b.shape)}")
            weight = b if a["transB"] else b.T
            if weight.shape[1] != k:
                raise reader.fail(node, f"weight B of shape {shape_str(b.shape)} (transB="
                                        f"{a['transB']}) does not multiply inputs of {k} "
                                        f"features")
            if a["alpha"] != 1.0:
                weight = weight * a["alpha"]
            c = reader.const(node, 2, "C (bias)", optional=True)
            if c is not None:
                bias = reader.bias_vector(node, c, weight.shape[0]) * a["beta"]
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None)
        reader.assign(layer, "weight", weight)
        if bias is not None:
            reader.assign(layer, "bias", bias)
        return [layer]

    def plan_forward(self, x, ws, train):
        if train:
            k = _dense.LinearForward(x, self.params["weight"], self.params.get("bias"), ws["out"])
            return [Op(k.run, k.bind_input, x.shape)], ws["out"]
        return self._inference_ops(lambda w, b: _dense.LinearForward(
            x, w, b, ws["out"], self.fold_relu), x, ws)

    def plan_backward(self, g, x, ws, need_input_grad):
        dx = ws["dx"] if need_input_grad else None
        k = _dense.LinearBackward(g, x, self.params["weight"], dx, self.grads["weight"],
                                  self.grads.get("bias"))
        return [Op(k.run, k.bind_input, x.shape, takes_l2=True)], dx
