#!/usr/bin/env python
"""Convolution (and dense) forward kernels against the machine's measured FMA peak.

    python bench/bench_peak.py                       # 2 threads, every shape
    python bench/bench_peak.py --threads 1 --repeats 11
    python bench/bench_peak.py --before /tmp/before  # also time an older build's kernels
    python bench/bench_peak.py --quick               # one small shape each, a smoke run

The peak is measured in the same run: ``cdl._kernels.dense.fma_peak_gflops``, a
register-resident loop of independent vector multiply-adds (zmm FMAs on the AVX-512
build) on every thread, best of several checks (start, between shapes, end), since a
ceiling is a best case and the machine may be shared. NumPy's sgemm is no ceiling
here: this machine's OPENBLAS_CORETYPE holds OpenBLAS to its AVX2 kernels.

Each row times the kernel call with preallocated buffers, as a layer's plan calls
it: cdl (this build), the same call on an older build's kernels (``--before DIR``:
a directory holding copies of an older build's ``_conv_<isa>*.so`` and
``_dense_<isa>*.so``, e.g. copied from site-packages/cdl/_kernels before
rebuilding), and PyTorch CPU (``torch.nn.functional``, same thread count, under
``torch.inference_mode``). Fused rows compare conv + bias + ReLU in one call with
the conv then ReLU, conv + bias + ReLU + 2x2 max-pool in one call with the conv
then the fused ReLU + pool kernel (max_pool2d_relu_forward), and the dense layer
with and without its ReLU fused. Contenders are interleaved block
by block in a rotating order with a pause before each block (bench/run.py's Timer);
the median of the samples is shown. Every contender's output is checked against
cdl's before timing (max error relative to the largest value <= 1e-4; fused
against unfused bit for bit).

GFLOP/s counts 2 per multiply-add; "% peak" is that over the FMA peak of the same
run at the same thread count.
"""
import argparse
import glob
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import cdl  # noqa: E402
from cdl._kernels import _dispatch, conv, dense, elementwise, pool  # noqa: E402
from run import Timer, add_malloc_argument, apply_malloc  # noqa: E402

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # PyTorch is optional
    torch = None

# name, (N, C, H, W), (K, KH, KW), padding
CONV_SHAPES = [
    ("first layer C3->K32 32x32 3x3 p1", (64, 3, 32, 32), (32, 3, 3), 1),
    ("LeNet conv1 C1->K6 28x28 5x5 p2", (64, 1, 28, 28), (6, 5, 5), 2),
    ("LeNet conv2 C6->K16 14x14 5x5", (64, 6, 14, 14), (16, 5, 5), 0),
    ("C32->K64 16x16 3x3 p1", (64, 32, 16, 16), (64, 3, 3), 1),
    ("first layer C3->K32 32x32 3x3 p1", (1, 3, 32, 32), (32, 3, 3), 1),
    ("LeNet conv1 C1->K6 28x28 5x5 p2", (1, 1, 28, 28), (6, 5, 5), 2),
    ("LeNet conv2 C6->K16 14x14 5x5", (1, 6, 14, 14), (16, 5, 5), 0),
    ("C32->K64 16x16 3x3 p1", (1, 32, 16, 16), (64, 3, 3), 1),
]
DENSE_SHAPES = [(64, 784, 256), (256, 784, 256), (1, 784, 256), (256, 1024, 1024)]


def load_before(directory, module):
    """An older build's kernel module (a copied .so) under another package name."""
    pattern = os.path.join(directory, f"{module}_{_dispatch.ISA}*.so")
    found = sorted(glob.glob(pattern))
    if not found:
        sys.exit(f"--before: no {pattern}")
    name = f"cdl_before.{module}_{_dispatch.ISA}"
    spec = importlib.util.spec_from_file_location(name, found[0])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(a, ref):
    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


class Peak:
    """Best FMA peak (GFLOP/s) seen at the run's thread count."""

    def __init__(self, threads, seconds=0.25):
        self.threads = threads
        self.seconds = seconds
        self.best = 0.0
        self.checks = []

    def check(self):
        time.sleep(0.05)
        g = dense.fma_peak_gflops(self.seconds, self.threads)
        self.checks.append(g)
        self.best = max(self.best, g)
        return g


def conv_rows(args, timer, peak, old_conv):
    rows = []
    rng = np.random.default_rng(0)
    for name, (n, c, h, w), (k, kh, kw), p in CONV_SHAPES:
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        wt = (rng.standard_normal((k, c, kh, kw)) / np.sqrt(c * kh * kw)).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        oh, ow = h + 2 * p - kh + 1, w + 2 * p - kw + 1
        flops = 2.0 * n * k * oh * ow * c * kh * kw
        y = np.empty((n, k, oh, ow), np.float32)
        y2 = np.empty_like(y)
        yr = np.empty_like(y)
        yp = np.empty((n, k, oh // 2, ow // 2), np.float32)
        yp2 = np.empty_like(yp)
        idx = np.empty(yp.shape, np.int32)
        nt = args.threads
        fns = {"cdl": lambda: conv.conv2d_forward(x, wt, b, y, 1, 1, p, p, nt)}
        if old_conv is not None:
            fns["before"] = lambda: old_conv.conv2d_forward(x, wt, b, y2, 1, 1, p, p, nt)
        fused = {"cdl fused ReLU": lambda: conv.conv2d_forward(x, wt, b, yr, 1, 1, p, p, nt, True)}

        def unfused():
            conv.conv2d_forward(x, wt, b, y2, 1, 1, p, p, nt)
            elementwise.relu_forward(y2.reshape(-1), y2.reshape(-1), nt)
        fused["cdl conv, then ReLU"] = unfused
        fused["cdl fused ReLU+pool"] = lambda: conv.conv2d_forward(x, wt, b, yp, 1, 1, p, p, nt,
                                                                   True, True)

        def unfused_pool():
            conv.conv2d_forward(x, wt, b, y2, 1, 1, p, p, nt)
            pool.max_pool2d_relu_forward(y2, yp2, idx, nt)
        fused["cdl conv, then ReLU+pool"] = unfused_pool
        if torch is not None:
            xt, wt_t, bt = torch.from_numpy(x), torch.from_numpy(wt), torch.from_numpy(b)

            def torch_fwd():
                with torch.inference_mode():
                    return TF.conv2d(xt, wt_t, bt, 1, p)

            def torch_block():
                with torch.inference_mode():
                    return TF.max_pool2d(TF.relu(TF.conv2d(xt, wt_t, bt, 1, p)), 2)
            fns["PyTorch"] = torch_fwd
            fused["PyTorch conv+ReLU+pool"] = torch_block
        # Checks before timing.
        fns["cdl"]()
        ref = y.copy()
        if old_conv is not None:
            fns["before"]()
            assert rel_err(y2, ref) <= 1e-4, f"{name}: before disagrees"
        fused["cdl fused ReLU"]()
        unfused()
        assert np.array_equal(yr, y2) and np.array_equal(yr, np.where(ref <= 0, 0, ref)), \
            f"{name}: fused ReLU differs from conv then ReLU"
        fused["cdl fused ReLU+pool"]()
        unfused_pool()
        assert np.array_equal(yp, yp2), f"{name}: fused ReLU+pool differs from conv then ReLU+pool"
        if torch is not None:
            assert rel_err(torch_fwd().numpy(), ref) <= 1e-4, f"{name}: PyTorch disagrees"
            assert rel_err(torch_block().numpy(), yp) <= 1e-4, f"{name}: PyTorch block disagrees"
        if not args.no_fused:
            fns.update(fused)
        pk0 = peak.checks[-1]
        res = timer.run(fns)
        pk = peak.check()
        # The row's peak checks, just before and just after it.
        rows.append((f"{name}, N={n}", flops, {k_: v[0] for k_, v in res.items()}, min(pk0, pk)))
        print(f"  {name}, N={n}: " + ", ".join(f"{k_} {v[0] * 1e3:.4f} ms" for k_, v in res.items())
              + f"; peak check {pk:.0f} GFLOP/s", flush=True)
    return rows


def dense_rows(args, timer, old_dense):
    rows = []
    rng = np.random.default_rng(1)
    nt = args.threads
    for n, fin, fout in DENSE_SHAPES:
        x = rng.standard_normal((n, fin)).astype(np.float32)
        w = (rng.standard_normal((fout, fin)) / np.sqrt(fin)).astype(np.float32)
        b = rng.standard_normal(fout).astype(np.float32)
        y, y2, yr = (np.empty((n, fout), np.float32) for _ in range(3))
        fns = {"cdl": lambda: dense.linear_forward(x, w, b, y, nt)}
        if old_dense is not None:
            fns["before"] = lambda: old_dense.linear_forward(x, w, b, y2, nt)
        fns["cdl fused ReLU"] = lambda: dense.linear_forward(x, w, b, yr, nt, True)

        def unfused():
            dense.linear_forward(x, w, b, y2, nt)
            elementwise.relu_forward(y2.reshape(-1), y2.reshape(-1), nt)
        fns["cdl linear, then ReLU"] = unfused
        if torch is not None:
            xt, wt_t, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)

            def torch_fwd():
                with torch.inference_mode():
                    return TF.relu(TF.linear(xt, wt_t, bt))
            fns["PyTorch linear+ReLU"] = torch_fwd
        fns["cdl"]()
        ref = y.copy()
        fns["cdl fused ReLU"]()
        unfused()
        assert np.array_equal(yr, y2), "dense: fused ReLU differs from linear then ReLU"
        res = timer.run(fns)
        rows.append((f"dense N={n} {fin}->{fout}", 2.0 * n * fin * fout,
                     {k_: v[0] for k_, v in res.items()}, None))
        print(f"  dense N={n} {fin}->{fout}: "
              + ", ".join(f"{k_} {v[0] * 1e3:.4f} ms" for k_, v in res.items()), flush=True)
    return rows


def fmt(v, digits=4):
    return "—" if v is None else f"{v:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--pause", type=float, default=0.1)
    ap.add_argument("--min-sample", type=float, default=0.004)
    ap.add_argument("--before", help="directory with an older build's _conv/_dense .so copies")
    ap.add_argument("--no-dense", action="store_true", help="leave out the dense rows")
    ap.add_argument("--no-fused", action="store_true",
                    help="leave out the fused conv contenders (a shorter run)")
    ap.add_argument("--quick", action="store_true",
                    help="one small conv and dense shape, 5 short samples (a smoke run)")
    add_malloc_argument(ap)
    args = ap.parse_args()
    malloc = apply_malloc(args)
    if args.quick:
        global CONV_SHAPES, DENSE_SHAPES
        CONV_SHAPES = [("first layer C3->K32 32x32 3x3 p1", (4, 3, 32, 32), (32, 3, 3), 1)]
        DENSE_SHAPES = [(16, 64, 32)]
        args.repeats, args.min_sample, args.pause = 5, 0.0005, 0.0
    cdl.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    old_conv = load_before(args.before, "_conv") if args.before else None
    old_dense = load_before(args.before, "_dense") if args.before else None
    timer = Timer(max(args.repeats, 5), args.pause, args.min_sample)
    peak = Peak(args.threads, 0.02 if args.quick else 0.25)
    load0 = os.getloadavg()[0]
    print(f"ISA {_dispatch.ISA}, {args.threads} threads, torch "
          f"{torch.__version__ if torch is not None else 'absent'}; FMA peak check "
          f"{peak.check():.0f} GFLOP/s", flush=True)
    rows = conv_rows(args, timer, peak, old_conv)
    drows = [] if args.no_dense else dense_rows(args, timer, old_dense)
    peak.check()
    load1 = os.getloadavg()[0]
    p1 = dense.fma_peak_gflops(peak.seconds, 1)
    print()
    print(f"Command: `python bench/bench_peak.py {' '.join(sys.argv[1:])}`")
    print(f"FMA peak ({_dispatch.ISA} build, {args.threads} threads): best {peak.best:.0f} GFLOP/s "
          f"of {len(peak.checks)} checks (range {min(peak.checks):.0f}-{max(peak.checks):.0f}); "
          f"1 thread {p1:.0f}. Load average {load0:.2f} at start, {load1:.2f} at end; "
          f"allocator: {malloc}.")
    print()
    print("Rows marked * had a peak check (just before or after them) under 90% of the best: "
          "the machine was busy then, and their times mean little.")
    print()
    print("| shape | before ms | after ms | GFLOP/s | % of FMA peak | PyTorch ms | after/PyTorch |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, flops, t, pk in rows:
        after = t["cdl"]
        gf = flops / after / 1e9
        pt = t.get("PyTorch")
        before = t.get("before")
        mark = " *" if pk < 0.9 * peak.best else ""
        print(f"| {name}{mark} | {fmt(before and before * 1e3)} | {after * 1e3:.4f} | {gf:.0f} | "
              f"{100 * gf / peak.best:.0f} | {fmt(pt and pt * 1e3)} | {fmt(pt and after / pt, 2)} |")
    if not args.no_fused:
        print()
        print("| shape | conv, then ReLU ms | fused conv+ReLU ms | conv, then ReLU+pool ms "
              "| fused conv+ReLU+pool ms | PyTorch conv+ReLU+pool ms |")
        print("|---|--:|--:|--:|--:|--:|")
        for name, flops, t, pk in rows:
            pt = t.get("PyTorch conv+ReLU+pool")
            mark = " *" if pk < 0.9 * peak.best else ""
            print(f"| {name}{mark} | {t['cdl conv, then ReLU'] * 1e3:.4f} | "
                  f"{t['cdl fused ReLU'] * 1e3:.4f} | {t['cdl conv, then ReLU+pool'] * 1e3:.4f} | "
                  f"{t['cdl fused ReLU+pool'] * 1e3:.4f} | {fmt(pt and pt * 1e3)} |")
    for i, (name, flops, t, _) in enumerate(drows):
        if i == 0:
            print()
            print("| dense | before ms | after ms | GFLOP/s | % of FMA peak | fused ReLU ms "
                  "| linear, then ReLU ms | PyTorch linear+ReLU ms |")
            print("|---|--:|--:|--:|--:|--:|--:|--:|")
        after = t["cdl"]
        gf = flops / after / 1e9
        pt = t.get("PyTorch linear+ReLU")
        before = t.get("before")
        print(f"| {name} | {fmt(before and before * 1e3)} | {after * 1e3:.4f} | {gf:.0f} | "
              f"{100 * gf / peak.best:.0f} | {t['cdl fused ReLU'] * 1e3:.4f} | "
              f"{t['cdl linear, then ReLU'] * 1e3:.4f} | {fmt(pt and pt * 1e3)} |")


if __name__ == "__main__":
    main()
