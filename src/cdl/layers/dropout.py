"""Dropout with masks from a counter-based generator."""
import numbers
import zlib

import numpy as np

from .._kernels import elementwise as _ew
from .base import Layer
from .chain import Op

__all__ = ["Dropout"]


class Dropout(Layer):
    """Inverted dropout: in training each element is zeroed with probability ``p``
    and the rest scaled by 1/(1 − p); the identity in predict and evaluate.

    Masks come from a counter-based generator keyed by a seed drawn from the
    model's seed when it is built, this layer's position and a count of its
    training passes, and the element's index: so training is reproducible from
    the model's seed and identical for any thread count. Data-parallel replicas
    (``set_replica``, called by :class:`cdl.distributed.DistributedOptimizer`) put
    their index in the counter's top 16 bits, so each rank draws its own masks and
    rank 0 draws those of a single process.
    """

    transparent = True
    names_source = False

    def __init__(self, p=0.5):
        super().__init__()
        self.p = p
        self.seed = 0
        self.stream = 0
        self.passes = 0         # training passes so far: the generator's counter
        self.replica = 0        # data-parallel replica index: the counter's top bits

    @property
    def p(self):
        return self._p

    @p.setter
    def p(self, p):
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, numbers.Real):
            raise TypeError(f"Dropout: p must be a number in [0, 1), got {p!r}")
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self._p = float(p)
        self._settings_changed()        # the plans hold it

    def get_config(self):
        return {"p": self.p}

    def describe(self):
        return f"Dropout(p={self.p:g})"

    def extra_state(self):
        return {"seed": self.seed, "stream": self.stream, "passes": self.passes}

    def set_extra_state(self, state):
        for key in ("seed", "stream", "passes"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
                raise ValueError(f"{self.name}: extra state {key!r} must be an int in "
                                 f"[0, 2**64), got {value!r}")
        self.seed, self.stream, self.passes = state["seed"], state["stream"], state["passes"]

    def set_replica(self, index):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**16:
            raise ValueError(f"{self.name}: replica index must be an int in [0, 65536), got "
                             f"{index!r}")
        self.replica = index

    def _counter(self):
        return (self.replica << 48) | (self.passes & (2**48 - 1))

    def _create(self, rng, init, dtype):
        self.seed = int(rng.integers(0, 2**63))
        self.stream = zlib.crc32((self.path or "").encode())
        self.passes = 0

    def flops(self):
        self._check_built("flops")
        return int(np.prod(self.output_shape))

    # -- ONNX --------------------------------------------------------------------------
    onnx_ops = ("Dropout",)

    def to_onnx(self, graph, x):
        return x                # the identity at inference: an inference graph drops it

    @classmethod
    def from_onnx(cls, node, reader):
        """An inference Dropout is the identity (no layer); one that trains
        (training_mode true) is refused."""
        reader.attrs(node, {"seed": 0, "ratio": 0.5, "is_test": 0})
        mode = reader.const(node, 2, "training_mode", optional=True)
        if mode is not None and mode.size == 1 and bool(mode.reshape(-1)[0]):
            raise reader.fail(node, "training_mode=true drops values at inference")
        if mode is not None and mode.size != 1:
            raise reader.fail(node, "training_mode must be a scalar")
        return []

    def _alloc(self, n, train):
        if not train:
            return {}
        out = np.empty((n,) + self.output_shape, self.dtype)
        dx = np.empty((n,) + self.input_shape, self.dtype)
        return {"out": out, "out_flat": out.reshape(-1), "dx": dx, "dx_flat": dx.reshape(-1),
                "mask": np.empty(out.size, np.uint8)}

    def _forward(self, x, ws, nt, train):
        if not train:
            return x
        _ew.dropout_forward(x.reshape(-1), ws["out_flat"], ws["mask"], self.p, self.seed,
                            self.stream, self._counter(), nt)
        self.passes += 1
        return ws["out"]

    def _backward(self, g, x, ws, nt, need_input_grad, l2):
        if not need_input_grad:
            return None
        _ew.dropout_backward(g.reshape(-1), ws["mask"], ws["dx_flat"], self.p, nt)
        return ws["dx"]

    def plan_forward(self, x, ws, train):
        if not train:
            return [], x
        flat = x.reshape(-1)
        k = _ew.DropoutForward(flat, ws["out_flat"], ws["mask"], self.p, self.seed, self.stream)

        def run(nt):
            k.run(nt, self._counter())
            self.passes += 1
        return [Op(run, k.bind_input, flat.shape)], ws["out"]

    def plan_backward(self, g, x, ws, need_input_grad):
        if not need_input_grad:
            return [], None
        k = _ew.DropoutBackward(g.reshape(-1), ws["mask"], ws["dx_flat"], self.p)
        return [Op(k.run)], ws["dx"]
