"""``cdl bench``: a quick benchmark of an installed cdl against NumPy and PyTorch CPU.

A small, self-contained cousin of the benchmark suite (``bench/run.py`` in a source
checkout, which is not installed with the package). Method, as in the suite: one
process and one thread count for every contender (cdl.set_num_threads,
torch.set_num_threads, threadpoolctl for NumPy's own BLAS); each contender's result is
checked against the NumPy version before anything is timed (a mismatch is reported
and not timed); a warm-up; contenders interleaved sample by sample; the median of
the samples, each averaging enough calls to last a few milliseconds.
"""
import json
import platform
import statistics
import sys
import time

import numpy as np

__all__ = ["main", "run", "CASES"]

MIN_SAMPLE_S = 0.004


# ============================================================================ NumPy twins
def np_conv(x, w, b, p):
    """Stride-1 convolution, NCHW: windows of the padded input against the filters."""
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
    win = np.lib.stride_tricks.sliding_window_view(xp, w.shape[2:], axis=(2, 3))
    y = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    return y + b[None, :, None, None], win


def np_conv_backward(g, x, w, p, win):
    """(dx, dW, db) of np_conv given dL/dy = g; ``win`` are the forward's windows."""
    dw = np.tensordot(g, win, axes=([0, 2, 3], [0, 2, 3]))
    db = g.sum(axis=(0, 2, 3))
    n, c, h, ww = x.shape
    kh, kw = w.shape[2:]
    ho, wo = g.shape[2:]
    dxp = np.zeros((n, c, h + 2 * p, ww + 2 * p), x.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + ho, j:j + wo] += np.tensordot(w[:, :, i, j], g,
                                                          axes=([0], [1])).transpose(1, 0, 2, 3)
    return dxp[:, :, p:p + h, p:p + ww], dw, db


def np_pool(x):
    """2x2 stride-2 max pooling; returns (y, mask of the maxima)."""
    n, c, h, w = x.shape
    xr = x.reshape(n, c, h // 2, 2, w // 2, 2)
    y = xr.max(axis=(3, 5))
    return y, xr == y[:, :, :, None, :, None]


def np_pool_backward(g, mask):
    n, c, h2, _, w2, _ = mask.shape
    return (mask * g[:, :, :, None, :, None]).reshape(n, c, 2 * h2, 2 * w2)


def np_softmax_ce(s, y):
    z = s - s.max(axis=1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(axis=1, keepdims=True)
    n = s.shape[0]
    loss = -np.log(prob[np.arange(n), y]).mean()
    g = prob
    g[np.arange(n), y] -= 1
    return float(loss), g / n


class NumpyNet:
    """A Sequential's twin in NumPy: the same layers, weights (copied), softmax
    cross-entropy and SGD with momentum (PyTorch's form: v = m v + g; w -= lr v)."""

    def __init__(self, model, lr, momentum):
        self.spec = []
        self.params = []
        for layer in model.layers:
            kind = type(layer).__name__
            cfg = layer.get_config() if hasattr(layer, "get_config") else {}
            ps = [layer.params[k].copy() for k in ("weight", "bias")] if layer.params else []
            self.spec.append((kind, cfg, ps))
            self.params += ps
        self.vel = [np.zeros_like(p) for p in self.params]
        self.lr, self.momentum = lr, momentum

    def forward(self, x, keep):
        for kind, cfg, ps in self.spec:
            if kind == "Linear":
                keep.append(x)
                x = x @ ps[0].T + ps[1]
            elif kind == "Conv2d":
                y, win = np_conv(x, ps[0], ps[1], _padding(cfg))
                keep.append((x, win))
                x = y
            elif kind == "ReLU":
                x = np.maximum(x, 0)
                keep.append(x)
            elif kind == "MaxPool2d":
                x, mask = np_pool(x)
                keep.append(mask)
            elif kind == "Flatten":
                keep.append(x.shape)
                x = x.reshape(x.shape[0], -1)
            else:
                raise NotImplementedError(kind)
        return x

    def step(self, x, y):
        keep = []
        loss, g = np_softmax_ce(self.forward(x, keep), y)
        grads = []
        for (kind, cfg, ps), k in zip(reversed(self.spec), reversed(keep)):
            if kind == "Linear":
                grads += [g.sum(axis=0), g.T @ k]
                g = g @ ps[0]
            elif kind == "Conv2d":
                g, dw, db = np_conv_backward(g, k[0], ps[0], _padding(cfg), k[1])
                grads += [db, dw]
            elif kind == "ReLU":
                g = g * (k > 0)
            elif kind == "MaxPool2d":
                g = np_pool_backward(g, k)
            elif kind == "Flatten":
                g = g.reshape(k)
        grads.reverse()
        for p, v, d in zip(self.params, self.vel, grads):
            v *= self.momentum
            v += d
            p -= self.lr * v
        return loss

    def predict(self, x):
        return self.forward(x, [])


def _padding(cfg):
    p = cfg.get("padding", 0)
    return p[0] if isinstance(p, (tuple, list)) else p


# ============================================================================ cases
class Case:
    """One row: ``contenders`` maps a name to (fn, result) builders; ``check(a, ref)`` says
    whether result a matches the NumPy reference."""

    def __init__(self, name, build, rtol=2e-3):
        self.name, self.build, self.rtol = name, build, rtol


def _close(a, ref, rtol):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    if a.shape != ref.shape or not np.all(np.isfinite(a)):
        return False
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    return float(np.max(np.abs(a - ref))) <= rtol * scale


def _dense_case(torch):
    import cdl.functional as F
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 784), np.float32)
    w = (rng.standard_normal((256, 784), np.float32) * 0.05)
    b = rng.standard_normal(256).astype(np.float32)
    g = rng.standard_normal((64, 256), np.float32)
    y, dx, dw, db = (np.empty((64, 256), np.float32), np.empty_like(x), np.empty_like(w),
                     np.empty_like(b))

    def c_cdl():
        F.linear(x, w, b, out=y)
        F.linear_backward(g, x, w, grad_input=dx, grad_weight=dw, grad_bias=db)
        return y, dx, dw, db

    def c_np():
        return x @ w.T + b, g @ w, g.T @ x, g.sum(axis=0)

    out = {"cdl": c_cdl, "NumPy": c_np}
    if torch is not None:
        tx, tw, tb, tg = (torch.from_numpy(a) for a in (x, w, b, g))

        def c_torch():
            return (torch.nn.functional.linear(tx, tw, tb), tg @ tw, tg.T @ tx, tg.sum(0))
        out["PyTorch"] = c_torch
    return out


def _conv_case(torch):
    import cdl.functional as F
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 16, 16, 16), np.float32)
    w = (rng.standard_normal((32, 16, 3, 3), np.float32) * 0.1)
    b = rng.standard_normal(32).astype(np.float32)
    g = rng.standard_normal((32, 32, 16, 16), np.float32)
    y, dx, dw, db = (np.empty_like(g), np.empty_like(x), np.empty_like(w), np.empty_like(b))

    def c_cdl():
        F.conv2d(x, w, b, padding=1, out=y)
        F.conv2d_backward(g, x, w, padding=1, grad_input=dx, grad_weight=dw, grad_bias=db)
        return y, dx, dw, db

    def c_np():
        yy, win = np_conv(x, w, b, 1)
        return (yy,) + np_conv_backward(g, x, w, 1, win)

    out = {"cdl": c_cdl, "NumPy": c_np}
    if torch is not None:
        tx, tw, tb, tg = (torch.from_numpy(a) for a in (x, w, b, g))
        tf, grad = torch.nn.functional, torch.nn.grad

        def c_torch():
            return (tf.conv2d(tx, tw, tb, padding=1),
                    grad.conv2d_input(tx.shape, tw, tg, padding=1),
                    grad.conv2d_weight(tx, tw.shape, tg, padding=1), tg.sum((0, 2, 3)))
        out["PyTorch"] = c_torch
    return out


def _pool_case(torch):
    import cdl.functional as F
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 32, 32, 32), np.float32)
    g = rng.standard_normal((64, 32, 16, 16), np.float32)
    y, idx, dx = (np.empty_like(g), np.empty(g.shape, np.int32), np.empty_like(x))

    def c_cdl():
        F.max_pool2d(x, 2, out=y, indices=idx)
        F.max_pool2d_backward(g, idx, x.shape, 2, grad_input=dx)
        return y, dx

    def c_np():
        yy, mask = np_pool(x)
        return yy, np_pool_backward(g, mask)

    out = {"cdl": c_cdl, "NumPy": c_np}
    if torch is not None:
        tx, tg = torch.from_numpy(x), torch.from_numpy(g)
        tf = torch.nn.functional

        def c_torch():
            yy, ii = tf.max_pool2d(tx, 2, return_indices=True)
            return yy, tf.max_unpool2d(tg, ii, 2, output_size=tx.shape[2:])
        out["PyTorch"] = c_torch
    return out


def mlp_layers(cdl):
    return [cdl.Linear(784, 256), cdl.ReLU(), cdl.Linear(256, 128), cdl.ReLU(),
            cdl.Linear(128, 10)], (784,)


def lenet_layers(cdl):
    return [cdl.Conv2d(1, 6, 5, padding=2), cdl.ReLU(), cdl.MaxPool2d(2),
            cdl.Conv2d(6, 16, 5), cdl.ReLU(), cdl.MaxPool2d(2), cdl.Flatten(),
            cdl.Linear(400, 120), cdl.ReLU(), cdl.Linear(120, 84), cdl.ReLU(),
            cdl.Linear(84, 10)], (1, 28, 28)


def _torch_net(torch, model):
    """model's twin in PyTorch, with its weights copied."""
    nn = torch.nn
    mods = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "Linear":
            w = layer.params["weight"]
            m = nn.Linear(w.shape[1], w.shape[0])
        elif kind == "Conv2d":
            w = layer.params["weight"]
            m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:],
                          padding=_padding(layer.get_config()))
        elif kind == "ReLU":
            m = nn.ReLU()
        elif kind == "MaxPool2d":
            m = nn.MaxPool2d(2)
        elif kind == "Flatten":
            m = nn.Flatten()
        else:
            raise NotImplementedError(kind)
        if layer.params:
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.params["weight"]))
                m.bias.copy_(torch.from_numpy(layer.params["bias"]))
        mods.append(m)
    return nn.Sequential(*mods)


def _train_case(layers, n):
    lr, momentum = 0.01, 0.9

    def build(torch):
        import cdl
        ls, in_shape = layers(cdl)
        rng = np.random.default_rng(3)
        x = rng.random((n,) + in_shape, np.float32)
        y = rng.integers(0, 10, n)
        model = cdl.Sequential(ls, in_shape, seed=0)
        loss, opt = cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=lr, momentum=momentum)
        twin = NumpyNet(model, lr, momentum)

        def c_cdl():
            return model.train_step(x, y, loss, opt), model.layers[0].params["weight"]

        def c_np():
            return twin.step(x, y), twin.params[0]

        out = {"cdl": c_cdl, "NumPy": c_np}
        if torch is not None:
            net = _torch_net(torch, model)
            topt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)
            first = net[0].weight

            def c_torch():
                topt.zero_grad(set_to_none=True)
                tl = torch.nn.functional.cross_entropy(net(tx), ty)
                tl.backward()
                topt.step()
                return tl.item(), first.detach()
            out["PyTorch"] = c_torch
        return out
    return build


def _predict_case(layers, n):
    def build(torch):
        import cdl
        ls, in_shape = layers(cdl)
        x = np.random.default_rng(4).random((n,) + in_shape, np.float32)
        model = cdl.Sequential(ls, in_shape, seed=0)
        twin = NumpyNet(model, 0.0, 0.0)
        out = {"cdl": lambda: model.predict(x), "NumPy": lambda: twin.predict(x)}
        if torch is not None:
            net = _torch_net(torch, model).eval()
            tx = torch.from_numpy(x)

            def c_torch():
                with torch.no_grad():
                    return net(tx)
            out["PyTorch"] = c_torch
        return out
    return build


CASES = [
    Case("dense 784->256 N=64, forward + backward", _dense_case),
    Case("conv N=32 C=16->K=32 16x16 3x3 p1, forward + backward", _conv_case),
    Case("max-pool 2x2 on 64x32x32x32, forward + backward", _pool_case),
    Case("MLP 784-256-128-10 train_step, N=64", _train_case(mlp_layers, 64)),
    Case("MLP train_step, N=1", _train_case(mlp_layers, 1)),
    Case("MLP predict, N=1", _predict_case(mlp_layers, 1)),
    Case("LeNet-5 train_step, N=64", _train_case(lenet_layers, 64)),
    Case("LeNet-5 predict, N=64", _predict_case(lenet_layers, 64)),
]


# ============================================================================ timing
def _numpy_blas_controllers():
    """threadpoolctl controllers of NumPy's own BLAS (cdl keeps SciPy's at one thread)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return []
    import os
    npdir = os.path.dirname(np.__file__)
    return [c for c in ThreadpoolController().select(user_api="blas").lib_controllers
            if "numpy" in c.filepath or c.filepath.startswith(npdir)]


def _to_numpy(res):
    items = res if isinstance(res, tuple) else (res,)
    return [np.asarray(r.numpy() if hasattr(r, "numpy") else r) for r in items]


def _calls_per_sample(fn):
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(1000, int(MIN_SAMPLE_S / once) + 1))


def _sample(fn, k):
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t0) / k


def run(threads=None, repeats=7, torch=True, cases=None, out=None):
    """Run the cases; returns a dict of the results (what ``--json`` writes)."""
    import cdl
    from . import _config

    out = sys.stdout if out is None else out
    tmod = None
    if torch:
        try:
            import torch as tmod
        except ImportError:
            tmod = None
    n = cdl.get_num_threads() if threads is None else int(threads)
    ctls = _numpy_blas_controllers()
    saved = [c.num_threads for c in ctls]
    rows = []
    with cdl.threads(n):
        for c in ctls:
            c.set_num_threads(n)
        if tmod is not None:
            torch_saved = tmod.get_num_threads()
            tmod.set_num_threads(n)
        try:
            for case in (CASES if cases is None else cases):
                rows.append(_run_case(case, tmod, repeats))
                _print_row(rows[-1], out, first=len(rows) == 1, torch=tmod is not None)
        finally:
            for c, s in zip(ctls, saved):
                c.set_num_threads(s)
            if tmod is not None:
                tmod.set_num_threads(torch_saved)
    cfg = _config.config()
    return {"cdl": cdl.__version__, "isa": cfg.get("isa"), "threads": n,
            "numpy": np.__version__, "torch": None if tmod is None else tmod.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "repeats": repeats, "results": rows}


def _run_case(case, torch, repeats):
    fns = case.build(torch)
    row = {"case": case.name, "ms": {}, "errors": {}}
    ref = _to_numpy(fns["NumPy"]())
    live = {}
    for name, fn in fns.items():
        if name == "NumPy":
            live[name] = fn
            continue
        got = _to_numpy(fn())
        if len(got) != len(ref) or not all(_close(a, r, case.rtol) for a, r in zip(got, ref)):
            row["errors"][name] = "result differs from NumPy's; not timed"
        else:
            live[name] = fn
    ks = {}
    for name, fn in live.items():  # warm-up, and the calls per sample
        for _ in range(2):
            fn()
        ks[name] = _calls_per_sample(fn)
    samples = {name: [] for name in live}
    names = list(live)
    for r in range(repeats):
        rot = names[r % len(names):] + names[:r % len(names)]
        for name in rot:
            samples[name].append(_sample(live[name], ks[name]))
    for name in names:
        row["ms"][name] = statistics.median(samples[name]) * 1e3
    return row


def _fmt(ms):
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _print_row(row, out, first, torch):
    cols = ["cdl", "NumPy"] + (["PyTorch"] if torch else [])
    if first:
        head = ["case"] + [f"{c} ms" for c in cols] + ["cdl/NumPy"] + \
            (["cdl/PyTorch"] if torch else [])
        print("| " + " | ".join(head) + " |", file=out)
        print("|---" + "|--:" * (len(head) - 1) + "|", file=out)
    ms = row["ms"]
    cells = [row["case"]] + [_fmt(ms.get(c)) if c not in row["errors"] else "MISMATCH"
                             for c in cols]
    for other in cols[1:]:
        cells.append(f"{ms['cdl'] / ms[other]:.2f}" if "cdl" in ms and other in ms else "-")
    print("| " + " | ".join(cells) + " |", file=out, flush=True)


def main(threads=None, repeats=7, torch=True, json_path=None):
    """``cdl bench``: print the table (and write JSON); returns 0, or 1 if a contender's
    result did not match NumPy's."""
    import cdl
    from . import _config

    cfg = _config.config()
    tinfo = "PyTorch left out (--no-torch)" if not torch else "PyTorch not installed"
    if torch:
        try:
            import torch as tmod
            tinfo = f"PyTorch {tmod.__version__}"
        except ImportError:
            pass
    n = cdl.get_num_threads() if threads is None else threads
    print(f"cdl {cdl.__version__} ({cfg.get('isa')} build), NumPy {np.__version__}, {tinfo}; "
          f"{n} thread(s) for every contender; median of {repeats} samples, times in ms, "
          f"ratios below 1: cdl is faster")
    t0 = time.perf_counter()
    doc = run(threads=threads, repeats=repeats, torch=torch)
    print(f"({time.perf_counter() - t0:.1f} s)")
    bad = [(r["case"], who, why) for r in doc["results"] for who, why in r["errors"].items()]
    for case, who, why in bad:
        print(f"cdl bench: {who} on '{case}': {why}", file=sys.stderr)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {json_path}")
    return 1 if bad else 0
