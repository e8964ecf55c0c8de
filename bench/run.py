#!/usr/bin/env python
"""cdl benchmark suite: cdl vs best-idiom NumPy vs PyTorch CPU, against the machine's ceilings.

    python bench/run.py                  # full run (< 10 min on 2 cores)
    python bench/run.py --quick          # a subset, fewer repeats (< 1 min on 2 cores)
    python bench/run.py --only conv,nets --threads 2
    python bench/run.py --compare bench/results/old.json          # run, then per-row change
    python bench/run.py --compare old.json new.json               # compare two saved runs, no run

Method: one process; one thread count for every contender (threadpoolctl for
NumPy's BLAS, torch.set_num_threads, cdl.set_num_threads); each contender's
output is checked against the NumPy reference before timing (a mismatch is
reported, never timed); warm-up; contenders interleaved block by block in a
rotating order with a short pause between blocks so spinning thread pools go
idle; the median of >= 5 samples (each sample averages enough calls to last a
few ms). Ceilings (sgemm GFLOP/s of a large NumPy matmul, copy bandwidth) are
measured in the same run. Before anything runs, glibc keeps blocks up to 32 MiB in its heap
(keep_large_blocks_in_heap; ``--malloc default`` leaves the allocator alone): with its
defaults PyTorch maps, faults in and unmaps its large tensors on every step, which made its
CIFAR-CNN step at batch 256 take 118 ms against 72 ms (results/nets-malloc-*.md), and which a
large free elsewhere in the process can switch off halfway through a run.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import numpy_ref as nref  # noqa: E402

CONTENDERS = ("cdl", "NumPy", "PyTorch")
GROUPS = ("dense", "conv", "pool", "relu", "loss", "nets", "scaling")
NA = "n/a (not available)"
UNAVAILABLE = (NotImplementedError, ImportError, AttributeError)


# ============================================================================ contenders
def _import_cdl():
    try:
        import cdl
        return cdl, None
    except Exception as exc:  # broken build: report, keep NumPy vs PyTorch going
        return None, f"cdl import failed: {exc}"


def _import_torch():
    try:
        import torch
        import torch_ref
        return torch, torch_ref
    except Exception:
        return None, None


cdl, CDL_ERROR = _import_cdl()
torch, tref = _import_torch()


def _numpy_blas_controllers():
    """threadpoolctl controllers of NumPy's own BLAS (not SciPy's, which cdl pins to 1)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    libs = ThreadpoolController().select(user_api="blas").lib_controllers
    npdir = os.path.dirname(np.__file__)
    own = [c for c in libs if "numpy" in c.filepath or c.filepath.startswith(npdir)]
    return own


def set_threads(n):
    """Give every contender n threads."""
    for c in _numpy_blas_controllers():
        c.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)
    if cdl is not None:
        cdl.set_num_threads(n)


class Contender:
    """``fn()`` is timed; ``check()`` (default: fn) returns the outputs compared with the
    other contenders'."""

    def __init__(self, fn, check=None):
        self.fn = fn
        self.check = check or fn


def _as_np(v):
    if v is None:
        return None
    if torch is not None and isinstance(v, torch.Tensor):
        return v.detach().numpy()
    return np.asarray(v)


def _outputs(res):
    if not isinstance(res, (tuple, list)):
        res = (res,)
    return [_as_np(v) for v in res]


def rel_err(a, ref):
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if a.shape != ref.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    return float(np.max(np.abs(a - ref))) / scale


# ============================================================================ timing
class Timer:
    def __init__(self, repeats, pause, min_sample, warm=0.005):
        self.repeats = repeats
        self.pause = pause
        self.min_sample = min_sample
        self.warm = warm

    def run(self, fns):
        """Median seconds per call of each fn, interleaved. ``fns``: dict name -> callable."""
        names = list(fns)
        inner, per_call = {}, {}
        for name in names:                      # warm-up and calibration (steady state)
            fn = fns[name]
            t0 = time.perf_counter()
            fn()                                # warm-up
            first = time.perf_counter() - t0
            times = [first] if first > 0.05 else []   # slow calls: the warm-up calibrates
            while sum(times) < 0.3:             # median of single calls: robust to a hiccup
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
                if (sum(times) >= self.min_sample and len(times) >= 3) or len(times) >= 1000:
                    break
            per_call[name] = statistics.median(times)
            inner[name] = max(1, min(10000, int(math.ceil(self.min_sample / per_call[name]))))
        samples = {name: [] for name in names}
        for r in range(self.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                fn, k = fns[name], inner[name]
                time.sleep(self.pause)          # let the previous contender's pool go idle
                self._warm(fn, per_call[name])  # then back to steady state, untimed
                t0 = time.perf_counter()
                for _ in range(k):
                    fn()
                samples[name].append((time.perf_counter() - t0) / k)
        return {name: (statistics.median(s), s, inner[name]) for name, s in samples.items()}

    def _warm(self, fn, per_call):
        # After the pause the first milliseconds of calls run up to 2x slower (threads and
        # caches cold, the VM's core clocked down): a training loop never sees that, so
        # calls are repeated, untimed, for a quarter of a sample and at least ``warm``
        # (5 ms by default; 1 ms left PyTorch's batch-1 MLP step at 2.3x its steady time).
        if per_call >= 0.02:
            fn()
            return
        end = time.perf_counter() + max(self.min_sample / 4, self.warm)
        fn()
        while time.perf_counter() < end:
            fn()


# ============================================================================ rows
class Row:
    """One benchmark line: a group, a shape, an operation, its work, and the contenders."""

    def __init__(self, group, name, op, flops=None, nbytes=None, tol=5e-4, quick=False):
        self.group, self.name, self.op = group, name, op
        self.flops, self.nbytes, self.tol, self.quick = flops, nbytes, tol, quick
        self.makers = {}

    @property
    def key(self):
        return f"{self.group}|{self.name}|{self.op}"

    def add(self, contender, maker):
        """``maker()`` builds the Contender (may raise NotImplementedError etc. -> n/a)."""
        self.makers[contender] = maker
        return self


def evaluate(row, timer, threads):
    """Check every contender against the reference, time the ones that agree."""
    status, fns, outs = {}, {}, {}
    for name in CONTENDERS:
        maker = row.makers.get(name)
        if maker is None:
            status[name] = NA
            continue
        try:
            c = maker()
            outs[name] = _outputs(c.check())
            fns[name] = c.fn
            status[name] = "ok"
        except UNAVAILABLE as exc:
            status[name] = NA
            outs.pop(name, None)
            fns.pop(name, None)
            _ = exc
        except Exception as exc:
            status[name] = f"error: {type(exc).__name__}: {exc}"[:200]
            outs.pop(name, None)
            fns.pop(name, None)
    ref_name = "NumPy" if "NumPy" in outs else next(iter(outs), None)
    errors = {}
    if ref_name is not None:
        ref = outs[ref_name]
        for name, o in outs.items():
            if name == ref_name:
                continue
            errs = [rel_err(a, b) for a, b in zip(o, ref) if a is not None and b is not None]
            if len(o) != len(ref):
                errs.append(math.inf)
            err = max(errs) if errs else 0.0
            errors[name] = err
            if not err <= row.tol:
                status[name] = f"mismatch vs {ref_name} (rel err {err:.2e} > {row.tol:.0e})"
                fns.pop(name)
    timed = timer.run(fns) if fns else {}
    result = {"group": row.group, "name": row.name, "op": row.op, "key": row.key,
              "flops": row.flops, "bytes": row.nbytes, "threads": threads,
              "reference": ref_name, "contenders": {}}
    for name in CONTENDERS:
        entry = {"status": status[name]}
        if name in errors:
            entry["rel_err"] = errors[name]
        if name in timed:
            med, samples, inner = timed[name]
            entry.update(median_s=med, samples_s=samples, calls_per_sample=inner)
        result["contenders"][name] = entry
    return result


def _rng(seed=0):
    return np.random.default_rng(seed)


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- dense
def dense_rows():
    rows = []
    shapes = [(1, 784, 256), (64, 784, 256), (256, 784, 256),
              (1, 4096, 10), (64, 4096, 10), (256, 4096, 10), (256, 1024, 1024)]
    quick = {(1, 784, 256), (64, 784, 256), (256, 1024, 1024)}
    for n, fin, fout in shapes:
        rng = _rng(1)
        x, w, b = _randn(rng, n, fin), _randn(rng, fout, fin) * 0.05, _randn(rng, fout)
        g = _randn(rng, n, fout)
        name = f"N={n} {fin}->{fout}"
        f = 2 * n * fin * fout
        q = (n, fin, fout) in quick
        for op, flops in (("fwd", f), ("bwd", 2 * f), ("fwd+bwd", 3 * f)):
            quick_op = op == ("fwd" if n == 1 else "fwd+bwd")
            row = Row("dense", name, op, flops=flops, quick=q and quick_op)
            row.add("NumPy", _np_dense(op, x, w, b, g))
            row.add("cdl", _cdl_dense(op, x, w, b, g))
            if torch is not None:
                row.add("PyTorch", _torch_dense(op, x, w, b, g))
            rows.append(row)
    return rows


def _np_dense(op, x, w, b, g):
    def make():
        def fwd():
            return nref.linear(x, w, b)

        def bwd():
            return nref.linear_backward(g, x, w)

        def both():
            return (nref.linear(x, w, b),) + nref.linear_backward(g, x, w)
        return Contender({"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[op])
    return make


def _cdl_dense(op, x, w, b, g):
    def make():
        if cdl is None:
            raise ImportError(CDL_ERROR)
        F = cdl.functional
        y, dx, dw, db = (np.empty((x.shape[0], w.shape[0]), np.float32), np.empty_like(x),
                         np.empty_like(w), np.empty_like(b))

        def fwd():
            return F.linear(x, w, b, out=y)

        def bwd():
            return F.linear_backward(g, x, w, grad_input=dx, grad_weight=dw, grad_bias=db)

        def both():
            return (F.linear(x, w, b, out=y),) + F.linear_backward(
                g, x, w, grad_input=dx, grad_weight=dw, grad_bias=db)
        return Contender({"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[op])
    return make


def _torch_dense(op, x, w, b, g):
    def make():
        tx, tw, tb, tg = (tref.t(a) for a in (x, w, b, g))

        def fwd():
            return tref.linear(tx, tw, tb)

        def bwd():
            return tref.linear_backward(tg, tx, tw)

        def both():
            return (tref.linear(tx, tw, tb),) + tref.linear_backward(tg, tx, tw)
        return Contender({"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[op])
    return make


# ----------------------------------------------------------------------------- conv
CONV_SHAPES = [
    # name, N, C, H, W, K, k, stride, pad, quick ops
    ("N=64 C=32->K=64 16x16 3x3 p1", 64, 32, 16, 16, 64, 3, 1, 1, ("fwd", "fwd+bwd")),
    ("N=64 C=3->K=32 32x32 3x3 p1", 64, 3, 32, 32, 32, 3, 1, 1, ("fwd",)),
    ("LeNet conv1 N=64 C=1->K=6 28x28 5x5 p2", 64, 1, 28, 28, 6, 5, 1, 2,
     ("fwd+bwd_w", "bwd_in")),
    ("LeNet conv2 N=64 C=6->K=16 14x14 5x5", 64, 6, 14, 14, 16, 5, 1, 0, ()),
    ("N=1 C=32->K=64 16x16 3x3 p1", 1, 32, 16, 16, 64, 3, 1, 1, ()),
    ("LeNet conv1 N=1 C=1->K=6 28x28 5x5 p2", 1, 1, 28, 28, 6, 5, 1, 2, ()),
]
CONV_OPS = ("fwd", "bwd_in", "bwd_w", "fwd+bwd", "fwd+bwd_w")


def conv_data(n, c, h, w, k, ks, s, p, seed=2):
    rng = _rng(seed)
    x = _randn(rng, n, c, h, w)
    wt = _randn(rng, k, c, ks, ks) * np.float32(1.0 / math.sqrt(c * ks * ks))
    b = _randn(rng, k)
    ho, wo = nref.out_size(h, ks, s, p), nref.out_size(w, ks, s, p)
    g = _randn(rng, n, k, ho, wo)
    return x, wt, b, g


def conv_rows(shapes=CONV_SHAPES, ops=CONV_OPS, group="conv"):
    rows = []
    for name, n, c, h, w, k, ks, s, p, quick_ops in shapes:
        x, wt, b, g = conv_data(n, c, h, w, k, ks, s, p)
        ho, wo = g.shape[2:]
        f = 2 * n * k * c * ks * ks * ho * wo
        flops = {"fwd": f, "bwd_in": f, "bwd_w": f, "fwd+bwd": 3 * f, "fwd+bwd_w": 2 * f}
        for op in ops:
            if op == "fwd+bwd_w" and c > 3:
                continue                         # only first layers skip the input gradient
            row = Row(group, name, op, flops=flops[op], quick=op in quick_ops)
            row.add("NumPy", _np_conv(op, x, wt, b, g, s, p))
            row.add("cdl", _cdl_conv(op, x, wt, b, g, s, p))
            if torch is not None:
                row.add("PyTorch", _torch_conv(op, x, wt, b, g, s, p))
            rows.append(row)
    return rows


def _np_conv(op, x, w, b, g, s, p):
    def make():
        def fwd():
            return nref.conv2d(x, w, b, s, p)

        def bwd_in():
            return nref.conv2d_backward(g, x, w, s, p)[0]

        def bwd_w():
            return nref.conv2d_backward(g, x, w, s, p, need_input_grad=False)[1:]

        def both():
            y, cols = nref.conv2d(x, w, b, s, p, return_cols=True)
            return (y,) + nref.conv2d_backward(g, x, w, s, p, cols=cols)

        def both_w():
            y, cols = nref.conv2d(x, w, b, s, p, return_cols=True)
            return (y,) + nref.conv2d_backward(g, x, w, s, p, need_input_grad=False,
                                               cols=cols)[1:]
        return Contender({"fwd": fwd, "bwd_in": bwd_in, "bwd_w": bwd_w, "fwd+bwd": both,
                          "fwd+bwd_w": both_w}[op])
    return make


def _cdl_conv(op, x, w, b, g, s, p):
    def make():
        if cdl is None:
            raise ImportError(CDL_ERROR)
        F = cdl.functional
        y, dx, dw, db = np.empty_like(g), np.empty_like(x), np.empty_like(w), np.empty_like(b)

        def fwd():
            return F.conv2d(x, w, b, s, p, out=y)

        def bwd_in():
            # the functional API always computes dW; time the input-gradient kernel alone
            from cdl._kernels import conv as kconv
            kconv.conv2d_backward_input(g, w, dx, s, s, p, p, cdl.get_num_threads())
            return dx

        def bwd_w():
            return F.conv2d_backward(g, x, w, s, p, need_input_grad=False, grad_weight=dw,
                                     grad_bias=db)[1:]

        def both():
            return (F.conv2d(x, w, b, s, p, out=y),) + F.conv2d_backward(
                g, x, w, s, p, grad_input=dx, grad_weight=dw, grad_bias=db)

        def both_w():
            return (F.conv2d(x, w, b, s, p, out=y),) + F.conv2d_backward(
                g, x, w, s, p, need_input_grad=False, grad_weight=dw, grad_bias=db)[1:]
        return Contender({"fwd": fwd, "bwd_in": bwd_in, "bwd_w": bwd_w, "fwd+bwd": both,
                          "fwd+bwd_w": both_w}[op])
    return make


def _torch_conv(op, x, w, b, g, s, p):
    def make():
        tx, tw, tb, tg = (tref.t(a) for a in (x, w, b, g))

        def fwd():
            return tref.conv2d(tx, tw, tb, s, p)

        def bwd_in():
            return tref.conv2d_backward(tg, tx, tw, s, p, need_weight_grad=False)[0]

        def bwd_w():
            return tref.conv2d_backward(tg, tx, tw, s, p, need_input_grad=False)[1:]

        def both():
            return (tref.conv2d(tx, tw, tb, s, p),) + tuple(tref.conv2d_backward(tg, tx, tw, s, p))

        def both_w():
            return (tref.conv2d(tx, tw, tb, s, p),) + tuple(
                tref.conv2d_backward(tg, tx, tw, s, p, need_input_grad=False)[1:])
        return Contender({"fwd": fwd, "bwd_in": bwd_in, "bwd_w": bwd_w, "fwd+bwd": both,
                          "fwd+bwd_w": both_w}[op])
    return make


# ----------------------------------------------------------------------------- pool
def pool_rows():
    rows = []
    for n, c, h, w, quick in ((64, 32, 32, 32, True), (64, 64, 16, 16, False)):
        rng = _rng(3)
        x = _randn(rng, n, c, h, w)
        g = _randn(rng, n, c, h // 2, w // 2)
        name = f"2x2 s2 on {n}x{c}x{h}x{w}"
        xb, yb = x.nbytes, x.nbytes // 4
        # essential traffic: fwd reads x, writes y; bwd reads g, writes dx
        for op, nbytes in (("fwd", xb + yb), ("bwd", yb + xb), ("fwd+bwd", 2 * (xb + yb))):
            row = Row("pool", name, op, nbytes=nbytes, tol=1e-6, quick=quick and op == "fwd+bwd")
            row.add("NumPy", _np_pool(op, x, g))
            row.add("cdl", _cdl_pool(op, x, g))
            if torch is not None:
                row.add("PyTorch", _torch_pool(op, x, g))
            rows.append(row)
    return rows


def _np_pool(op, x, g):
    def make():
        y0, arg0 = nref.max_pool2d(x, 2)

        def fwd():
            return nref.max_pool2d(x, 2)[0]

        def bwd():
            return nref.max_pool2d_backward(g, x, y0, arg0, 2)

        def both():
            y, arg = nref.max_pool2d(x, 2)
            return y, nref.max_pool2d_backward(g, x, y, arg, 2)

        def check():
            # also the argmax indices (general im2col + argmax path) to compare with cdl/PyTorch
            arg = nref.pool_cols(x, 2, 2, 2, 2, 0, 0).argmax(axis=-1)
            idx = nref.window_argmax_to_flat(arg, x.shape, 2)
            fn = {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[op]
            out = _outputs(fn())
            return out + [idx] if op == "fwd" else out
        return Contender({"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[op], check)
    return make


def _cdl_pool(op, x, g):
    def make():
        if cdl is None:
            raise ImportError(CDL_ERROR)
        F = cdl.functional
        y, idx = np.empty_like(g), np.empty(g.shape, np.int32)
        dx = np.empty_like(x)
        F.max_pool2d(x, 2, out=y, indices=idx)
        idx0 = idx.copy()

        def fwd():
            return F.max_pool2d(x, 2, out=y, indices=idx)

        def bwd():
            return F.max_pool2d_backward(g, idx0, x.shape, 2, grad_input=dx)

        def both():
            yy, ii = F.max_pool2d(x, 2, out=y, indices=idx)
            return yy, F.max_pool2d_backward(g, ii, x.shape, 2, grad_input=dx)
        return Contender({"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[op])
    return make


def _torch_pool(op, x, g):
    def make():
        tx, tg = tref.t(x), tref.t(g)
        _, idx0 = tref.max_pool2d(tx, 2)

        def fwd():
            return tref.max_pool2d(tx, 2)

        def bwd():
            return tref.max_pool2d_backward(tg, tx, idx0, 2)

        def both():
            y, idx = tref.max_pool2d(tx, 2)
            return y, tref.max_pool2d_backward(tg, tx, idx, 2)
        return Contender({"fwd": fwd, "bwd": bwd, "fwd+bwd": both}[op])
    return make


# ----------------------------------------------------------------------------- relu, loss
def relu_rows():
    rows = []
    rng = _rng(4)
    x = _randn(rng, 64, 32, 32, 32)
    g = _randn(rng, *x.shape)
    y0 = np.maximum(x, 0)
    name = "64x32x32x32"
    for op, nbytes, q in (("fwd", 2 * x.nbytes, True), ("bwd", 3 * x.nbytes, True)):
        row = Row("relu", name, op, nbytes=nbytes, tol=0.0, quick=q)

        def np_make(op=op):
            out = np.empty_like(x)
            return Contender((lambda: nref.relu(x, out)) if op == "fwd"
                             else (lambda: nref.relu_backward(g, y0, out)))

        def cdl_make(op=op):
            if cdl is None:
                raise ImportError(CDL_ERROR)
            F, out = cdl.functional, np.empty_like(x)
            return Contender((lambda: F.relu(x, out=out)) if op == "fwd"
                             else (lambda: F.relu_backward(g, y0, out=out)))

        def torch_make(op=op):
            tx, tg, ty = tref.t(x), tref.t(g), tref.t(y0)
            return Contender((lambda: tref.relu(tx)) if op == "fwd"
                             else (lambda: tref.relu_backward(tg, ty)))
        row.add("NumPy", np_make).add("cdl", cdl_make)
        if torch is not None:
            row.add("PyTorch", torch_make)
        rows.append(row)
    return rows


def loss_rows():
    rows = []
    for n, c, q in ((256, 10, True), (1024, 1000, False)):
        rng = _rng(5)
        s = _randn(rng, n, c) * 3
        labels = rng.integers(0, c, n).astype(np.int64)
        row = Row("loss", f"softmax CE N={n} C={c}", "loss+grad", nbytes=2 * s.nbytes,
                  tol=1e-4, quick=q)

        def np_make(s=s, labels=labels):
            return Contender(lambda: nref.softmax_cross_entropy(s, labels))

        def cdl_make(s=s, labels=labels):
            if cdl is None:
                raise ImportError(CDL_ERROR)
            F, grad = cdl.functional, np.empty_like(s)
            return Contender(lambda: F.softmax_cross_entropy(s, labels, grad=grad))

        def torch_make(s=s, labels=labels):
            ts, tl = tref.t(s), tref.t(labels)
            return Contender(lambda: tref.softmax_cross_entropy(ts, tl))
        row.add("NumPy", np_make).add("cdl", cdl_make)
        if torch is not None:
            row.add("PyTorch", torch_make)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- networks
LR = 0.01


def build_cdl_net(spec, input_shape, params):
    """cdl.Sequential from a spec, weights copied in place from ``params``."""
    if cdl is None:
        raise ImportError(CDL_ERROR)
    layers = []
    for layer in spec:
        kind = layer[0]
        if kind == "linear":
            layers.append(cdl.Linear(layer[1], layer[2]))
        elif kind == "conv":
            layers.append(cdl.Conv2d(layer[1], layer[2], layer[3], stride=layer[4],
                                     padding=layer[5]))
        elif kind == "relu":
            layers.append(cdl.ReLU())
        elif kind == "pool":
            layers.append(cdl.MaxPool2d(layer[1]))
        elif kind == "flatten":
            layers.append(cdl.Flatten())
    model = cdl.Sequential(layers, input_shape, dtype=np.float32, seed=0)
    with_params = [l for l in layers if l.params]
    for layer, (w, b) in zip(with_params, params):
        layer.params["weight"][...] = w
        layer.params["bias"][...] = b
    loss = cdl.SoftmaxCrossEntropy()
    opt = cdl.SGD(model, lr=LR)

    def step(x, y):
        return model.train_step(x, y, loss, opt)

    def current():
        return [(l.params["weight"], l.params["bias"]) for l in with_params]
    return model, step, current


def net_data(input_shape, n, seed=6):
    rng = _rng(seed)
    x = _randn(rng, n, *input_shape)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


def _step_check(step, current, params0, x, y):
    loss = step(x, y)
    return [np.float64(loss)] + [np.asarray(a, np.float64) - b for (w, bb), (w0, b0)
                                 in zip(current(), params0) for a, b in ((w, w0), (bb, b0))]


def net_rows(batches=(1, 64, 256)):
    rows = []
    for net, (input_shape, spec) in nref.NETWORKS.items():
        params0 = nref.init_params(spec, seed=0)
        fps = nref.flops_per_sample(input_shape, spec)
        for n in batches:
            x, y = net_data(input_shape, n)
            for op in ("train_step", "predict"):
                flops = fps * n * (3 if op == "train_step" else 1)
                q = op == "train_step" and n in (1, 64)
                row = Row("nets", f"{net} N={n}", op, flops=flops, tol=2e-3, quick=q)
                row.add("NumPy", _np_net(op, spec, params0, x, y))
                row.add("cdl", _cdl_net(op, spec, input_shape, params0, x, y))
                if torch is not None:
                    row.add("PyTorch", _torch_net(op, spec, params0, x, y))
                rows.append(row)
    return rows


def _np_net(op, spec, params0, x, y):
    def make():
        if op == "predict":
            net = nref.NumpyNet(spec, params0, LR)
            return Contender(lambda: net.predict(x))
        net = nref.NumpyNet(spec, params0, LR)
        fresh = nref.NumpyNet(spec, params0, LR)
        return Contender(lambda: net.train_step(x, y),
                         lambda: _step_check(fresh.train_step, lambda: fresh.params,
                                             params0, x, y))
    return make


def _cdl_net(op, spec, input_shape, params0, x, y):
    def make():
        model, step, _ = build_cdl_net(spec, input_shape, params0)
        if op == "predict":
            return Contender(lambda: model.predict(x))
        _, fstep, fcur = build_cdl_net(spec, input_shape, params0)
        return Contender(lambda: step(x, y), lambda: _step_check(fstep, fcur, params0, x, y))
    return make


def _torch_net(op, spec, params0, x, y):
    def make():
        tx, ty = tref.t(x), tref.t(y)
        net = tref.TorchNet(spec, params0, LR)
        if op == "predict":
            return Contender(lambda: net.predict(tx))
        fresh = tref.TorchNet(spec, params0, LR)
        return Contender(lambda: net.train_step(tx, ty),
                         lambda: _step_check(fresh.train_step, fresh.params, params0, tx, ty))
    return make


# ============================================================================ ceilings, machine
def sgemm_peak(n, repeats, threads):
    """Best GFLOP/s of a float32 n^3 NumPy matmul with 1 or ``threads`` BLAS threads (on a
    shared machine spinning BLAS threads can lose to one thread; the ceiling is the best)."""
    rng = _rng(7)
    a, b = _randn(rng, n, n), _randn(rng, n, n)
    c = np.empty((n, n), np.float32)
    best = math.inf
    for t in sorted({1, threads}, reverse=True):
        for ctl in _numpy_blas_controllers():
            ctl.set_num_threads(t)
        np.matmul(a, b, out=c)
        for _ in range(repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c)
            best = min(best, time.perf_counter() - t0)
    for ctl in _numpy_blas_controllers():
        ctl.set_num_threads(threads)
    return 2.0 * n ** 3 / best / 1e9


def copy_bandwidth(nbytes, nthreads, repeats):
    """GB/s of a copy counted as read + write, split over nthreads (NumPy releases the GIL)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), nthreads)
    bounds = [(c[0], c[-1] + 1) for c in chunks if c.size]
    pool = ThreadPoolExecutor(nthreads) if nthreads > 1 else None

    def one(bd):
        np.copyto(dst[bd[0]:bd[1]], src[bd[0]:bd[1]])

    def run():
        if pool is None:
            np.copyto(dst, src)
        else:
            list(pool.map(one, bounds))
    run()
    best = math.inf
    reps = repeats if nbytes >= 64 << 20 else repeats * 10
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    if pool is not None:
        pool.shutdown()
    return 2.0 * src.nbytes / best / 1e9


def l3_bytes():
    try:
        txt = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1], 1)
        return int(txt.rstrip("KM")) * mult
    except (OSError, ValueError):
        return 32 << 20


def measure_ceilings(threads, quick):
    set_threads(threads)
    n = 1536 if quick else 2048
    l3 = l3_bytes()
    cache_set = min(16 << 20, l3 // 2)               # src + dst fit in L3
    dram_set = 128 << 20 if quick else 512 << 20
    out = {"sgemm_n": n, "sgemm_gflops": sgemm_peak(n, 4 if quick else 6, threads),
           "l3_bytes": l3, "copy_cache_bytes": cache_set, "copy_dram_bytes": dram_set}
    out["copy_cache_gbs"] = max(copy_bandwidth(cache_set // 2, t, 5) for t in {1, threads})
    out["copy_dram_gbs"] = max(copy_bandwidth(dram_set // 2, t, 3) for t in {1, threads})
    return out


def machine_info(threads):
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "numpy": np.__version__, "cpus": os.cpu_count(), "threads": threads}
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cores_usable"] = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu
    try:
        import scipy
        info["scipy"] = scipy.__version__
    except ImportError:
        pass
    try:
        import threadpoolctl
        info["threadpoolctl"] = threadpoolctl.__version__
    except ImportError:
        pass
    blas = _numpy_blas_controllers()
    if blas:
        info["numpy_blas"] = f"{blas[0].internal_api} {blas[0].version}"
    info["torch"] = torch.__version__ if torch is not None else None
    if cdl is not None:
        try:
            cfg = cdl._config.config()
            info["cdl"] = cfg["cdl"]
            info["cdl_isa"] = cfg["isa"]
            info["cdl_openmp"] = cfg["openmp"]
            info["cdl_blas"] = f"{cfg['blas']} {cfg['blas_version']}"
            info["cdl_adaptive_threads"] = cfg["adaptive"]["adaptive"]
        except Exception as exc:
            info["cdl"] = getattr(cdl, "__version__", "?")
            info["cdl_config_error"] = str(exc)
    else:
        info["cdl"] = CDL_ERROR
    try:
        info["loadavg_start"] = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "CDL_ISA", "OPENBLAS_CORETYPE",
                                              "OPENBLAS_L2_SIZE") if k in os.environ}
    return info


# ============================================================================ report
def _rate(res, name, ceilings):
    """(rate, unit, fraction of ceiling) of one contender, or (None, unit, None)."""
    c = res["contenders"][name]
    if "median_s" not in c:
        return None, None, None
    t = c["median_s"]
    if res.get("flops"):
        r = res["flops"] / t / 1e9
        return r, "GFLOP/s", r / ceilings["sgemm_gflops"]
    if res.get("bytes"):
        r = res["bytes"] / t / 1e9
        cache = res["bytes"] <= 0.75 * ceilings["l3_bytes"]
        ceil = ceilings["copy_cache_gbs"] if cache else ceilings["copy_dram_gbs"]
        return r, "GB/s", r / ceil
    return None, None, None


def _ms(res, name):
    c = res["contenders"][name]
    if "median_s" in c:
        return f"{c['median_s'] * 1e3:.3f}"
    s = c["status"]
    return "n/a" if s == NA else ("mismatch" if s.startswith("mismatch") else "error")


def _ratio(res, a, b):
    ca, cb = res["contenders"][a], res["contenders"][b]
    if "median_s" in ca and "median_s" in cb:
        return ca["median_s"] / cb["median_s"]
    return None


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(results, ceilings, machine, command=None):
    c = ceilings
    lines = [f"Command: `{command}`", ""] if command else []
    lines += [f"### Machine: {machine['cpu']}, {machine['cores_usable']} usable cores, "
              f"{machine['threads']} threads; cdl {machine.get('cdl')} (ISA "
              f"{machine.get('cdl_isa', '?')}), numpy {machine['numpy']} "
              f"({machine.get('numpy_blas', '?')}), torch {machine.get('torch') or 'n/a'}; "
              f"allocator: {machine.get('malloc', 'default')}",
              "",
              f"Ceilings (same run, best of several checks): sgemm {c['sgemm_gflops']:.1f} "
              f"GFLOP/s (NumPy float32 {c['sgemm_n']}^3, best of 1 and N threads); copy "
              f"{c['copy_cache_gbs']:.1f} GB/s in cache ({c['copy_cache_bytes'] >> 20} MiB), "
              f"{c['copy_dram_gbs']:.1f} GB/s from DRAM ({c['copy_dram_bytes'] >> 20} MiB), "
              f"read+write counted.", ""]
    # At the end the load average includes the benchmark's own threads: count only the rest.
    load = max(machine.get("loadavg_start", 0.0),
               machine.get("loadavg_end", 0.0) - machine.get("threads", 0))
    if load > 0.5 * machine["cores_usable"]:
        lines += [f"**Warning: the machine was busy (1-min load average of other work up to "
                  f"{load:.1f} on {machine['cores_usable']} cores). Multi-threaded timings are "
                  f"unreliable: "
                  f"threads that spin at barriers lose their core to other processes.**", ""]
    groups = []
    for r in results:
        g = r["group"] if r["group"] != "scaling" else f"scaling ({r['threads']} threads)"
        if g not in groups:
            groups.append(g)
    for g in groups:
        rows = [r for r in results if (r["group"] if r["group"] != "scaling"
                                       else f"scaling ({r['threads']} threads)") == g]
        unit = "GFLOP/s" if rows[0].get("flops") else "GB/s"
        lines += [f"#### {g}", "",
                  f"| case | op | cdl ms | NumPy ms | PyTorch ms | cdl {unit} | NumPy {unit} | "
                  f"PyTorch {unit} | cdl % ceiling | cdl/NumPy | cdl/PyTorch |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            rates = {n: _rate(r, n, ceilings) for n in CONTENDERS}
            frac = rates["cdl"][2]
            lines.append(
                f"| {r['name']} | {r['op']} | {_ms(r, 'cdl')} | {_ms(r, 'NumPy')} | "
                f"{_ms(r, 'PyTorch')} | {_fmt(rates['cdl'][0], '.1f')} | "
                f"{_fmt(rates['NumPy'][0], '.1f')} | {_fmt(rates['PyTorch'][0], '.1f')} | "
                f"{_fmt(None if frac is None else 100 * frac, '.0f')} | "
                f"{_fmt(_ratio(r, 'cdl', 'NumPy'), '.2f')} | "
                f"{_fmt(_ratio(r, 'cdl', 'PyTorch'), '.2f')} |")
        notes = [f"{r['name']} {r['op']} {n}: {r['contenders'][n]['status']}"
                 for r in rows for n in CONTENDERS
                 if r["contenders"][n]["status"] not in ("ok", NA)]
        lines.append("")
        if notes:
            lines += [f"- {x}" for x in notes] + [""]
    return "\n".join(lines)


# targets of issues 2 and 3: (description, row key, kind, contender, bound)
#   kind "ratio": cdl time / <contender> time <= bound;  "ceiling": cdl fraction of sgemm >= bound
TARGETS = [
    ("dense fwd+bwd N=64 784->256 >= 0.9x NumPy GFLOP/s", "dense|N=64 784->256|fwd+bwd",
     "ratio", "NumPy", 1 / 0.9),
    ("dense fwd+bwd N=64 4096->10 >= 0.9x NumPy GFLOP/s", "dense|N=64 4096->10|fwd+bwd",
     "ratio", "NumPy", 1 / 0.9),
    ("dense fwd+bwd N=256 1024->1024 >= 0.9x NumPy GFLOP/s", "dense|N=256 1024->1024|fwd+bwd",
     "ratio", "NumPy", 1 / 0.9),
    ("dense fwd N=1 784->256 within 2x of NumPy", "dense|N=1 784->256|fwd", "ratio", "NumPy", 2.0),
    ("conv C32->K64 fwd >= 50% of sgemm", "conv|N=64 C=32->K=64 16x16 3x3 p1|fwd",
     "ceiling", None, 0.50),
    ("conv C32->K64 fwd+bwd >= 45% of sgemm", "conv|N=64 C=32->K=64 16x16 3x3 p1|fwd+bwd",
     "ceiling", None, 0.45),
    ("conv C3->K32 fwd >= 30% of sgemm", "conv|N=64 C=3->K=32 32x32 3x3 p1|fwd",
     "ceiling", None, 0.30),
    ("LeNet conv1 fwd+dW+db >= 2x faster than PyTorch",
     "conv|LeNet conv1 N=64 C=1->K=6 28x28 5x5 p2|fwd+bwd_w", "ratio", "PyTorch", 0.5),
    ("LeNet conv1 input grad >= 10x faster than PyTorch",
     "conv|LeNet conv1 N=64 C=1->K=6 28x28 5x5 p2|bwd_in", "ratio", "PyTorch", 0.1),
    ("max-pool 2x2 fwd+bwd 64x32x32x32 >= 10x faster than PyTorch",
     "pool|2x2 s2 on 64x32x32x32|fwd+bwd", "ratio", "PyTorch", 0.1),
    ("LeNet-5 train_step N=64 <= 0.35x PyTorch", "nets|LeNet-5 N=64|train_step",
     "ratio", "PyTorch", 0.35),
    ("CIFAR-CNN train_step N=64 <= 0.8x PyTorch", "nets|CIFAR-CNN N=64|train_step",
     "ratio", "PyTorch", 0.8),
    ("MLP train_step N=64 <= 0.7x PyTorch", "nets|MLP N=64|train_step", "ratio", "PyTorch", 0.7),
    ("MLP train_step N=1 <= 0.3x PyTorch", "nets|MLP N=1|train_step", "ratio", "PyTorch", 0.3),
    ("LeNet-5 train_step N=1 <= 0.3x PyTorch", "nets|LeNet-5 N=1|train_step",
     "ratio", "PyTorch", 0.3),
    ("CIFAR-CNN train_step N=1 <= 0.3x PyTorch", "nets|CIFAR-CNN N=1|train_step",
     "ratio", "PyTorch", 0.3),
    ("LeNet-5 train_step N=64 >= 8x faster than NumPy", "nets|LeNet-5 N=64|train_step",
     "ratio", "NumPy", 1 / 8),
    ("CIFAR-CNN train_step N=64 >= 8x faster than NumPy", "nets|CIFAR-CNN N=64|train_step",
     "ratio", "NumPy", 1 / 8),
]


def check_targets(results, ceilings):
    by_key = {r["key"]: r for r in results if r["group"] != "scaling"}
    out = []
    for desc, key, kind, other, bound in TARGETS:
        r = by_key.get(key)
        entry = {"target": desc, "key": key, "value": None, "met": None}
        if r is not None:
            if kind == "ratio":
                v = _ratio(r, "cdl", other)
                entry.update(value=v, measure=f"cdl/{other} time", bound=f"<= {bound:.3g}")
                if v is not None:
                    entry["met"] = v <= bound
            else:
                v = _rate(r, "cdl", ceilings)[2]
                entry.update(value=v, measure="cdl fraction of sgemm", bound=f">= {bound:.2f}")
                if v is not None:
                    entry["met"] = v >= bound
        out.append(entry)
    return out


def targets_markdown(targets):
    lines = ["#### targets (issues 2 and 3)", "", "| target | measured | bound | met |",
             "|---|--:|--:|---|"]
    for t in targets:
        if t["value"] is None and "measure" not in t:
            continue
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {v} ({t.get('measure', '')}) | {t.get('bound', '')} "
                     f"| {met} |")
    return "\n".join(lines) + "\n"


def compare(old, new):
    """Per-row change of each contender's median between two result dicts."""
    old_rows = {(r["key"], r["threads"]): r for r in old["results"]}
    lines = [f"### Change: {old.get('created', '?')} -> {new.get('created', '?')} "
             f"(ratio new/old; > 1 is slower)", "",
             "| case | op | threads | contender | old ms | new ms | new/old |",
             "|---|---|--:|---|--:|--:|--:|"]
    for r in new["results"]:
        o = old_rows.get((r["key"], r["threads"]))
        if o is None:
            continue
        for n in CONTENDERS:
            a, b = o["contenders"].get(n, {}), r["contenders"].get(n, {})
            if "median_s" in a and "median_s" in b:
                ratio = b["median_s"] / a["median_s"]
                flag = " slower" if ratio > 1.10 else (" faster" if ratio < 0.91 else "")
                lines.append(f"| {r['name']} | {r['op']} | {r['threads']} | {n} | "
                             f"{a['median_s'] * 1e3:.3f} | {b['median_s'] * 1e3:.3f} | "
                             f"{ratio:.2f}{flag} |")
    return "\n".join(lines) + "\n"


def plots(results, out_stem):
    """PNG charts of the network results and the thread scaling (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib not installed: skipped the charts (pip install matplotlib)"]
    written = []
    nets = [r for r in results if r["group"] == "nets"]
    if nets:
        names = list(nref.NETWORKS)
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
        for ax, net in zip(np.atleast_1d(axes), names):
            rows = [r for r in nets if r["name"].startswith(net + " ")]
            labels = [f"{r['name'].split()[-1]}\n{r['op']}" for r in rows]
            xs = np.arange(len(rows))
            for i, n in enumerate(CONTENDERS):
                vals = [r["contenders"][n].get("median_s", np.nan) * 1e3 for r in rows]
                ax.bar(xs + (i - 1) * 0.27, vals, 0.27, label=n)
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("ms (log)")
            ax.set_title(net)
        np.atleast_1d(axes)[0].legend()
        fig.suptitle("Networks: time per call (lower is better)")
        fig.tight_layout()
        path = f"{out_stem}_networks.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    sc = [r for r in results if r["group"] == "scaling"]
    if sc:
        keys = list(dict.fromkeys(r["key"] for r in sc))
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
        for ax, key in zip(np.atleast_1d(axes), keys):
            rows = sorted((r for r in sc if r["key"] == key), key=lambda r: r["threads"])
            for n in CONTENDERS:
                pts = [(r["threads"], r["contenders"][n]["median_s"] * 1e3) for r in rows
                       if "median_s" in r["contenders"][n]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=n)
            ax.set_xlabel("threads")
            ax.set_ylabel("ms")
            ax.set_xticks([r["threads"] for r in rows])
            ax.set_title(f"{rows[0]['name']} {rows[0]['op']}", fontsize=9)
            ax.legend()
        fig.suptitle("Thread scaling")
        fig.tight_layout()
        path = f"{out_stem}_scaling.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ============================================================================ main
def build_rows(groups, quick):
    makers = {"dense": dense_rows, "conv": conv_rows, "pool": pool_rows, "relu": relu_rows,
              "loss": loss_rows, "nets": net_rows}
    rows = []
    for g in groups:
        if g in makers:
            rows += makers[g]()
    if quick:
        rows = [r for r in rows if r.quick]
    return rows


def scaling_rows():
    conv = [s for s in CONV_SHAPES if s[0].startswith("N=64 C=32")]
    rows = conv_rows(conv, ("fwd+bwd",), group="scaling")
    input_shape, spec = nref.NETWORKS["LeNet-5"]
    params0 = nref.init_params(spec, seed=0)
    x, y = net_data(input_shape, 64)
    fps = nref.flops_per_sample(input_shape, spec)
    row = Row("scaling", "LeNet-5 N=64", "train_step", flops=3 * fps * 64, tol=2e-3)
    row.add("NumPy", _np_net("train_step", spec, params0, x, y))
    row.add("cdl", _cdl_net("train_step", spec, input_shape, params0, x, y))
    if torch is not None:
        row.add("PyTorch", _torch_net("train_step", spec, params0, x, y))
    return rows + [row]


def keep_large_blocks_in_heap():
    """mallopt: blocks up to 32 MiB come from the heap and up to 256 MiB of free heap
    stays mapped, fixed for the whole run (glibc otherwise moves its mmap threshold up
    after a large free). Returns a description for the results, or None where there is
    no glibc."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return None
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)):
        return None
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 256 MiB"


def add_malloc_argument(parser):
    """The benches' shared ``--malloc heap|default`` option (see keep_large_blocks_in_heap)."""
    parser.add_argument("--malloc", choices=("heap", "default"), default="heap",
                        help="heap: keep large blocks in glibc's heap for every contender "
                             "(bench/run.py's notes); default: leave the allocator alone")


def apply_malloc(args):
    """Set the allocator up as ``args.malloc`` asks; the description for the results."""
    return (keep_large_blocks_in_heap() if args.malloc == "heap" else None) or "default"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="subset, 5 repeats (< 1 min on 2 cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every contender (default: cdl's default, the usable cores)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated groups: {','.join(GROUPS)}")
    p.add_argument("--repeats", type=int, default=None, help="samples per contender (>= 5)")
    p.add_argument("--pause", type=float, default=None, help="seconds between timed blocks")
    p.add_argument("--min-sample", type=float, default=None,
                   help="seconds one sample lasts at least (calls are repeated to reach it)")
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"),
                   help="JSON results path (markdown and PNGs written beside it)")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OLD [NEW]: print the per-row change vs OLD (NEW given: no run)")
    p.add_argument("--no-plots", action="store_true")
    add_malloc_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.compare and len(args.compare) == 2:
        old, new = (json.loads(Path(f).read_text()) for f in args.compare)
        print(compare(old, new))
        return 0
    if args.compare and len(args.compare) > 2:
        print("--compare takes OLD [NEW]", file=sys.stderr)
        return 2
    groups = GROUPS if args.only is None else tuple(g.strip() for g in args.only.split(","))
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        print(f"unknown group(s) {bad}; choose from {','.join(GROUPS)}", file=sys.stderr)
        return 2
    if args.quick and args.only is None:
        groups = tuple(g for g in groups if g != "scaling")
    threads = args.threads or (cdl.get_num_threads() if cdl is not None
                               else len(os.sched_getaffinity(0)))
    repeats = max(5, args.repeats or 5)
    pause = args.pause if args.pause is not None else (0.1 if args.quick else 0.12)
    min_sample = args.min_sample if args.min_sample is not None else (
        0.004 if args.quick else 0.02)
    timer = Timer(repeats, pause, min_sample)
    t_start = time.perf_counter()
    malloc = apply_malloc(args)

    machine = machine_info(threads)
    machine["malloc"] = malloc
    ceilings = measure_ceilings(threads, args.quick)
    if machine.get("loadavg_start", 0.0) > 0.5 * machine["cores_usable"]:
        print(f"warning: load average {machine['loadavg_start']:.1f} on "
              f"{machine['cores_usable']} cores; timings will be noisy", file=sys.stderr)
    print(f"ceilings: sgemm {ceilings['sgemm_gflops']:.1f} GFLOP/s, copy "
          f"{ceilings['copy_cache_gbs']:.1f} GB/s (cache) / {ceilings['copy_dram_gbs']:.1f} GB/s "
          f"(DRAM)", file=sys.stderr)
    results = []
    set_threads(threads)
    ceilings["sgemm_gflops_checks"] = [ceilings["sgemm_gflops"]]
    group = None
    for row in build_rows(groups, args.quick):
        if row.group != group and group is not None:
            # the machine may be shared: re-measure the peak between groups, keep the best
            ceilings["sgemm_gflops_checks"].append(sgemm_peak(ceilings["sgemm_n"], 2, threads))
            set_threads(threads)
        group = row.group
        results.append(evaluate(row, timer, threads))
        print(f"  {row.key}: " + ", ".join(f"{n} {_ms(results[-1], n)}" for n in CONTENDERS),
              file=sys.stderr)
    if "scaling" in groups:
        for t in range(1, threads + 1):
            set_threads(t)
            for row in scaling_rows():
                results.append(evaluate(row, timer, t))
                print(f"  {row.key} @{t}: " + ", ".join(f"{n} {_ms(results[-1], n)}"
                                                       for n in CONTENDERS), file=sys.stderr)
        set_threads(threads)
    # a ceiling is a best case: measure it again at the end and keep the higher value
    again = measure_ceilings(threads, args.quick)
    for k in ("sgemm_gflops", "copy_cache_gbs", "copy_dram_gbs"):
        ceilings[k + "_start"], ceilings[k + "_end"] = ceilings[k], again[k]
        ceilings[k] = max(ceilings[k], again[k])
    ceilings["sgemm_gflops_checks"].append(again["sgemm_gflops"])
    ceilings["sgemm_gflops"] = max(ceilings["sgemm_gflops_checks"])
    set_threads(threads)
    targets = check_targets(results, ceilings)
    try:
        machine["loadavg_end"] = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    doc = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "quick" if args.quick
           else "full", "argv": sys.argv[1:], "machine": machine, "ceilings": ceilings,
           "method": {"repeats": repeats, "pause_s": pause, "min_sample_s": timer.min_sample,
                      "statistic": "median", "malloc": malloc},
           "results": results, "targets": targets,
           "elapsed_s": time.perf_counter() - t_start}
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(results, ceilings, machine, command.strip()) + "\n" + targets_markdown(targets)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(md)
    written = [] if args.no_plots else plots(results, str(out.with_suffix("")))
    for w in written:
        print(w if w.startswith("matplotlib") else f"chart: {w}")
    print(f"results: {out}  ({doc['elapsed_s']:.0f} s)")
    if args.compare:
        print(compare(json.loads(Path(args.compare[0]).read_text()), doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
