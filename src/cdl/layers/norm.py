"""Batch normalisation over channels (BatchNorm2d) or features (BatchNorm1d)."""
import numbers

import numpy as np

from .._kernels import norm as _norm
from ..functional._checks import shape_str
from .base import Layer, bind_op, positive_int
from .chain import Op
from .pool import MaxPool2d

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _BatchNorm(Layer):
    """PyTorch's semantics: in training, y = (x − mean) / sqrt(var + eps) · weight + bias
    with the batch mean and biased variance per channel, and the running statistics
    updated with ``momentum`` (the unbiased variance); in inference (predict,
    evaluate), the running statistics. ``momentum=None`` keeps a cumulative average.

    Parameters ``weight``, ``bias`` (when ``affine``); buffers ``running_mean``,
    ``running_var``, ``num_batches_tracked``. A ReLU right after runs in this
    layer's pass (``fused_next``), with identical results. In a model's training
    pass, so does a 2x2 stride-2 ``MaxPool2d`` after them (``merged``) on planes of
    16 to 1024 cells with an even height and width: each plane is pooled as it is
    normalised, and the backward unpools the pool's gradient straight into this
    layer's input gradient, so the full-size output is never written or read back;
    results, indices and gradients are bitwise those of the separate passes. The
    layer's own ``forward``/``backward`` never merge.
    """

    transparent = True
    _ndim = None                # per-sample input dims accepted

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        where = type(self).__name__
        self.num_features = positive_int(num_features, "num_features", where)
        if momentum is not None and (isinstance(momentum, (bool, np.bool_))
                                     or not isinstance(momentum, numbers.Real)):
            raise TypeError(f"{where}: momentum must be a number, got {momentum!r}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"{where}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.eps = eps
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)

    @property
    def eps(self):
        return self._eps

    @eps.setter
    def eps(self, eps):
        where = type(self).__name__
        if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
            raise TypeError(f"{where}: eps must be a number, got {eps!r}")
        if not (eps > 0 and np.isfinite(eps)):
            raise ValueError(f"{where}: eps must be a finite number > 0, got {eps!r}")
        self._eps = float(eps)
        self._settings_changed()        # the plans (and the inference folding) hold it

    def get_config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine}

    @classmethod
    def declared_params(cls, config):
        # weight and bias (affine), running_mean and running_var: all in the file
        return (4 if config.get("affine", True) else 2) * max(int(config["num_features"]), 0)

    def describe(self):
        return f"{type(self).__name__}({self.num_features})"

    def _configure(self, input_shape, source):
        if len(input_shape) not in self._ndim or input_shape[0] != self.num_features:
            want = " or ".join({1: "F", 2: "CxL", 3: "CxHxW"}[d] for d in self._ndim)
            raise ValueError(f"{self.name}: expected inputs of shape {want} with "
                             f"{self.num_features} channels (num_features), got "
                             f"{shape_str(input_shape)} ({source})")
        return input_shape

    def _create(self, rng, init, dtype):
        c = self.num_features
        self._check_size((c,))          # before allocating
        if self.affine:
            self.add_param("weight", np.ones(c, dtype))
            self.add_param("bias", np.zeros(c, dtype))
        self.add_buffer("running_mean", np.zeros(c, dtype))
        self.add_buffer("running_var", np.ones(c, dtype))
        self.add_buffer("num_batches_tracked", np.zeros((), np.int64))

    def absorbs_next(self, layer):
        return layer.activation == "relu"

    def merges_next(self, layer):
        if not (type(layer) is MaxPool2d and not layer.fused_previous
                and layer.kernel_size == (2, 2) and layer.stride == (2, 2)
                and layer.padding == (0, 0) and len(self.input_shape) == 3):
            return False
        _, h, w = self.input_shape
        return (h % 2 == 0 and w % 2 == 0
                and _norm.POOLED_PLANE_MIN <= h * w <= _norm.POOLED_PLANE_MAX)

    def joins_residual(self):
        return self.merged is None and not self.fused_next

    # -- ONNX --------------------------------------------------------------------------
    def to_onnx(self, graph, x):
        c = self.num_features
        if self.affine:
            scale, shift = graph.param(self, "weight"), graph.param(self, "bias")
        else:
            scale = graph.constant(np.ones(c, self.dtype), self, "weight")
            shift = graph.constant(np.zeros(c, self.dtype), self, "bias")
        attrs = {"epsilon": self.eps}
        if self.momentum is not None:   # ONNX's momentum weighs the old running value
            attrs["momentum"] = 1.0 - self.momentum
        return graph.node("BatchNormalization",
                          [x, scale, shift, graph.param(self, "running_mean"),
                           graph.param(self, "running_var")], self, **attrs)

    @classmethod
    def from_onnx(cls, node, reader):
        """Inference BatchNormalization (training_mode 0) over (C,), (C, L) or (C, H, W)
        samples: BatchNorm1d or BatchNorm2d with the constant scale, bias and running
        statistics; ONNX's momentum m becomes cdl's (PyTorch's) 1 - m."""
        a = reader.attrs(node, {"epsilon": 1e-5, "momentum": 0.9, "training_mode": 0})
        if a["training_mode"]:
            raise reader.fail(node, "training_mode=1 normalises with the batch's statistics; "
                                    "cdl imports inference graphs")
        shape = reader.shape
        kind = BatchNorm1d if len(shape) in (1, 2) else BatchNorm2d if len(shape) == 3 else None
        if kind is None:
            raise reader.fail(node, f"input of per-sample shape {shape_str(shape)}; cdl "
                                    f"normalises (C,), (C, L) or (C, H, W) samples")
        c = shape[0]
        arrays = {}
        for i, key in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")):
            v = reader.const(node, i, key)
            if v.shape != (c,):
                raise reader.fail(node, f"{key} of shape {shape_str(v.shape)}, expected ({c},)")
            arrays[key] = v
        if not 0.0 <= a["momentum"] <= 1.0:
            raise reader.fail(node, f"momentum={a['momentum']} is outside [0, 1]")
        momentum = float(str(np.float32(1.0 - a["momentum"])))   # 0.9 -> 0.1, not 0.0999...
        layer = kind(c, eps=a["epsilon"], momentum=momentum)
        for key, v in arrays.items():
            reader.assign(layer, key, v)
        return [layer]

    def flops(self):
        self._check_built("flops")
        return 2 * int(np.prod(self.output_shape))

    # -- helpers ---------------------------------------------------------------------
    def _planes(self, a):
        return a.reshape(a.shape[0], self.num_features, -1)

    def _plane_size(self):
        return int(np.prod(self.input_shape[1:], dtype=np.int64))

    def check_train_batch(self, n):
        if n * self._plane_size() < 2:
            raise ValueError(f"{self.name}: training needs more than one value per channel, "
                             f"got a batch of {n} with input {shape_str(self.input_shape)}")

    def _factor(self):
        """The running statistics' update factor for this batch (after counting it)."""
        self.buffers["num_batches_tracked"] += 1
        if self.momentum is None:
            return 1.0 / float(self.buffers["num_batches_tracked"])
        return self.momentum

    def _alloc(self, n, train):
        c = self.num_features
        ws = {"out": np.empty((n,) + self.output_shape, self.dtype),
              "scale": np.empty(c, self.dtype), "shift": np.empty(c, self.dtype)}
        if train:
            ws["dx"] = np.empty((n,) + self.input_shape, self.dtype)
            ws["mean"] = np.empty(c, self.dtype)
            ws["invstd"] = np.empty(c, self.dtype)
            # the forward's per-channel scale, from which the backward rebuilds the
            # ReLU's mask instead of reading the output again (planes, not pooled)
            ws["train_scale"] = np.empty(c, self.dtype)
        return ws

    per_channel_affine = True

    def channel_affine(self, scale, shift):
        b = self.buffers
        _norm.batchnorm_eval_coefficients(self.params.get("weight"), self.params.get("bias"),
                                          b["running_mean"], b["running_var"], self.eps,
                                          scale, shift)

    def channel_affine_op(self, scale, shift):
        b = self.buffers
        return _norm.EvalCoefficients(self.params.get("weight"), self.params.get("bias"),
                                      b["running_mean"], b["running_var"], self.eps, scale,
                                      shift)

    def _coefficients(self, ws):
        self.channel_affine(ws["scale"], ws["shift"])

    # -- passes ------------------------------------------------------------------------
    def _forward(self, x, ws, nt, train):
        x3, out3 = self._planes(x), self._planes(ws["out"])
        if not train:
            self._coefficients(ws)
            _norm.batchnorm_forward_eval(x3, ws["scale"], ws["shift"], out3,
                                         self._runs_next(ws), nt)
            return ws["out"]
        self.check_train_batch(x.shape[0])
        b = self.buffers
        _norm.batchnorm_forward_train(x3, self.params.get("weight"), self.params.get("bias"),
                                      self._train_out(ws), ws["mean"], ws["invstd"],
                                      b["running_mean"], b["running_var"], self._factor(),
                                      self.eps, self._runs_next(ws), nt, **self._pool_args(ws),
                                      scale_out=ws["train_scale"])
        self.on_train_forward(ws, x)
        return self._pass_out(ws)

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        dx = ws["dx"] if need_input_grad else None
        _norm.batchnorm_backward(self._planes(g), self._planes(x),
                                 self._planes(self._pass_out(ws)), self.params.get("weight"),
                                 ws["mean"], ws["invstd"],
                                 None if dx is None else self._planes(dx),
                                 self.grads.get("weight"), self.grads.get("bias"),
                                 self._runs_next(ws), nt,
                                 **self._pool_args(ws, backward=True), **self._mask_args(ws))
        return dx

    def _mask_args(self, ws, join_mask=None):
        """The backward's arguments for rebuilding the fused ReLU's mask from x (the
        kernel does so for unpooled planes; a Residual's join masks by its own output)."""
        if not self._runs_next(ws) or join_mask is not None:
            return {}
        return {"scale": ws["train_scale"], "shift": self.params.get("bias")}

    # -- the merged max-pool (training) -----------------------------------------------
    # In a chain's training pass ws["merged"] is the max-pool's workspace: the kernels
    # write its output and indices there, and the full-size output is not written.
    def _pass_out(self, ws):
        pool = ws.get("merged")
        return ws["out"] if pool is None else pool["out"]

    def _train_out(self, ws):
        return None if "merged" in ws else self._planes(ws["out"])

    def _pool_args(self, ws, backward=False):
        """The training kernels' pool arguments (none without a merged max-pool)."""
        pool = ws.get("merged")
        if pool is None:
            return {}
        args = {"pool_indices": self._planes(pool["indices"]), "width": self.input_shape[2]}
        if not backward:
            args["pool_out"] = self._planes(pool["out"])
        return args

    def on_train_forward(self, ws, x):
        pool = ws.get("merged")
        if pool is not None and self.merged is not None:
            self.merged.indices = pool["indices"]

    def plan_forward(self, x, ws, train):
        x3, out3 = self._planes(x), self._planes(ws["out"])
        if not train:
            k = _norm.BatchNormEvalForward(x3, ws["scale"], ws["shift"], out3, self.fused_next)
            coef = self.channel_affine_op(ws["scale"], ws["shift"])
            # recomputed every run: the weights and running statistics change in between
            return [Op(lambda nt: coef.run()), Op(k.run, k.bind_input, x3.shape)], ws["out"]
        self.check_train_batch(x.shape[0])
        b = self.buffers
        join = ws.get("join_add")
        out, train_out = self._pass_out(ws), self._train_out(ws)
        relu, extra = self.fused_next, {}
        if join is not None:        # a Residual's join: out = relu?(y + addend)
            addend, out, relu, binds = join
            train_out = out.reshape(x3.shape)
            extra = {"residual": addend.reshape(x3.shape)}
        k = _norm.BatchNormTrainForward(x3, self.params.get("weight"), self.params.get("bias"),
                                        train_out, ws["mean"], ws["invstd"],
                                        b["running_mean"], b["running_var"],
                                        self.momentum or 0.0, self.eps, relu,
                                        **self._pool_args(ws), **extra,
                                        scale_out=ws["train_scale"])

        def run(nt):
            k.set_momentum(self._factor())
            k.run(nt)
        ops = [Op(run, k.bind_input, x3.shape)]
        if join is not None and binds is not None:
            binds.append(bind_op(k.bind_residual, x3.shape))
        return ops, out

    def plan_backward(self, g, x, ws, need_input_grad):
        dx = ws["dx"] if need_input_grad else None
        x3 = self._planes(x)
        # A Residual's join with a ReLU masks g by the join's output (join_mask).
        mask = ws.get("join_mask")
        k = _norm.BatchNormBackward(self._planes(g), x3,
                                    self._planes(self._pass_out(ws) if mask is None else mask),
                                    self.params.get("weight"), ws["mean"], ws["invstd"],
                                    None if dx is None else self._planes(dx),
                                    self.grads.get("weight"), self.grads.get("bias"),
                                    self.fused_next or mask is not None,
                                    **self._pool_args(ws, backward=True),
                                    **self._mask_args(ws, mask))
        return [Op(k.run, k.bind_input, x3.shape)], dx


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) over N, H and W, per channel."""

    _ndim = (3,)
    onnx_ops = ("BatchNormalization",)   # BatchNorm1d too: from_onnx picks by rank


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, F) per feature (or (N, C, L) per channel)."""

    _ndim = (1, 2)
