"""Each convolution of ResNet-8, LeNet-5 and the CIFAR-style CNN alone: forward, input gradient and weight
gradient, timed interleaved, with their GFLOP/s and the gradients' time over the forward's;
for strided layers also the input gradient's other paths, each forced (cdl picks the fused
3x3 stride-2 pass on the AVX-512 build where it applies; elsewhere the GEMM and scatter
for kernels wider than 1x1 below 8 images, the phases otherwise); for 3x3
stride-1 layers each part's time over its time with the Winograd path turned off (cdl
takes it from 16 channels in and out on the AVX2 build; "–" where it does not), and
over its time in tiles of 2 output rows (F(2x2, 3x3); the AVX-512 build takes 4-row
tiles, F(4x2, 3x3), from 12 output rows on: 1.00 where a part keeps 2 rows).
GFLOP/s counts the direct sum's multiply-adds, whatever path ran.

    python bench/conv_parts.py [--batch 64] [--threads 2] [--repeats 15] [--out PATH]
                               [--before DIR]

With --before DIR (a directory holding a copy of an older build's _conv_<isa>*.so, as
for bench_peak.py) the older kernels are timed too, interleaved with this build's in
the same blocks, and each part gets a column of this build's time over the older one's,
with whether the two results are bit for bit the same.

A backward pass does twice the forward's multiply-adds (the first layer's input gradient
aside), so each gradient at 1.0x the forward's time runs as fast per FLOP. Times are the
float32 kernels alone (cdl._kernels.conv) on random data; a model's step adds the cache
misses of its neighbours (bench/profile_plan.py shows those).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import describe  # noqa: E402
from _timing import median_times  # noqa: E402

# (name, C, K, H, kernel, stride, padding)
LAYERS = [
    ("ResNet-8 stem", 3, 16, 32, 3, 1, 1),
    ("ResNet-8 stage 1", 16, 16, 32, 3, 1, 1),
    ("ResNet-8 stage 2 first", 16, 32, 32, 3, 2, 1),
    ("ResNet-8 stage 2", 32, 32, 16, 3, 1, 1),
    ("ResNet-8 stage 2 shortcut", 16, 32, 32, 1, 2, 0),
    ("ResNet-8 stage 3 first", 32, 64, 16, 3, 2, 1),
    ("ResNet-8 stage 3", 64, 64, 8, 3, 1, 1),
    ("ResNet-8 stage 3 shortcut", 32, 64, 16, 1, 2, 0),
    ("LeNet-5 conv1", 1, 6, 28, 5, 1, 2),
    ("LeNet-5 conv2", 6, 16, 14, 5, 1, 0),
    ("CIFAR-style CNN conv1", 3, 32, 32, 3, 1, 1),
    ("CIFAR-style CNN conv2", 32, 64, 16, 3, 1, 1),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="write a markdown table to this path")
    ap.add_argument("--before", default=None,
                    help="directory with an older build's _conv_<isa>*.so to time against")
    args = ap.parse_args(argv)
    from cdl._kernels import conv
    old = None
    if args.before:
        from bench_peak import load_before
        old = load_before(args.before, "_conv")
    rng = np.random.default_rng(0)
    n, nt = args.batch, args.threads
    load = os.getloadavg()[0]
    lines = ["| layer | C→K | H | kernel, stride | forward ms | GFLOP/s | input grad / forward "
             "| weight grad / forward | strided input grad: fused / phases "
             "| strided input grad: GEMM / phases "
             "| Winograd / direct: forward, input grad, weight grad "
             "| Winograd / 2-row tiles: forward, input grad, weight grad |",
             "|---|---|--:|---|--:|--:|--:|--:|--:|--:|---|---|"]
    if old is not None:
        lines[0] += " forward: this / before | input grad: this / before | weight grad: this / before |"
        lines[1] += "--:|--:|--:|"
    for name, c, k, h, f, s, p in LAYERS:
        x = rng.standard_normal((n, c, h, h), dtype=np.float32)
        w = rng.standard_normal((k, c, f, f), dtype=np.float32)
        oh = (h + 2 * p - f) // s + 1
        g = rng.standard_normal((n, k, oh, oh), dtype=np.float32)
        y, dx, dw = np.empty_like(g), np.empty_like(x), np.empty_like(w)
        fns = {
            "forward": lambda: conv.conv2d_forward(x, w, None, y, s, s, p, p, nt),
            "input": lambda: conv.conv2d_backward_input(g, w, dx, s, s, p, p, nt),
            "weight": lambda: conv.conv2d_backward_weight(g, x, dw, None, s, s, p, p, nt),
        }
        fused = s == 2 and f == 3 and p <= 1
        if s > 1:
            # the strided input gradient's other paths, each forced
            for key, mode in (("phases", 1), ("gemm", 2)) + ((("fused", 3),) if fused else ()):
                fns[key] = (lambda mode=mode: _forced(conv, mode, g, w, dx, s, p, nt))
        wino = f == 3 and s == 1 and _winograd_runs(conv, x, w, y)
        if wino:
            for part in ("forward", "input", "weight"):
                fns[part + "_direct"] = (lambda fn=fns[part]: _direct(conv, fn))
                fns[part + "_rows2"] = (lambda fn=fns[part]: _two_row_tiles(conv, fn))
        same = {}
        if old is not None:
            y0, dx0, dw0 = np.empty_like(g), np.empty_like(x), np.empty_like(w)
            fns["forward_before"] = lambda: old.conv2d_forward(x, w, None, y0, s, s, p, p, nt)
            fns["input_before"] = lambda: old.conv2d_backward_input(g, w, dx0, s, s, p, p, nt)
            fns["weight_before"] = lambda: old.conv2d_backward_weight(g, x, dw0, None, s, s, p,
                                                                      p, nt)
            for part, a, b in (("forward", y, y0), ("input", dx, dx0), ("weight", dw, dw0)):
                fns[part]()
                fns[part + "_before"]()
                same[part] = np.array_equal(a, b)
        t = median_times(fns, args.repeats)
        gflop = 2.0 * n * k * c * f * f * oh * oh / 1e9
        paths = (f"{t['fused'] / t['phases']:.2f}" if fused else "–",
                 f"{t['gemm'] / t['phases']:.2f}" if s > 1 else "–")
        wratio, tratio = (", ".join(f"{t[part] / t[part + suffix]:.2f}"
                                    for part in ("forward", "input", "weight")) if wino else "–"
                          for suffix in ("_direct", "_rows2"))
        row = (f"| {name} | {c}→{k} | {h} | {f}×{f}, {s} | {t['forward'] * 1e3:.3f} | "
               f"{gflop / t['forward']:.0f} | {t['input'] / t['forward']:.2f} | "
               f"{t['weight'] / t['forward']:.2f} | {paths[0]} | {paths[1]} | {wratio} | {tratio} |")
        if old is not None:
            row += "".join(f" {t[part] / t[part + '_before']:.2f}"
                           f"{'' if same[part] else ' (results differ)'} |"
                           for part in ("forward", "input", "weight"))
        print(row, flush=True)
        lines.append(row)
    head = (f"`python bench/conv_parts.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" ({time.strftime('%Y-%m-%d %H:%M')}): batch {n}, {nt} threads, {describe()}, "
            f"load average {load:.2f} before and {os.getloadavg()[0]:.2f} after. GFLOP/s "
            f"counts the direct sum's multiply-adds, whatever path ran (so the Winograd "
            f"path's can pass the FMA peak).")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Convolution kernels by layer\n\n" + head + "\n\n" + "\n".join(lines)
                     + "\n")


def _winograd_runs(conv, x, w, y):
    """Whether the auto mode takes the Winograd path for this layer (its forward's bits
    differ from the direct path's)."""
    conv.conv2d_forward(x[:2], w, None, y[:2], 1, 1, 1, 1, 1)
    auto = y[:2].copy()
    _direct(conv, lambda: conv.conv2d_forward(x[:2], w, None, y[:2], 1, 1, 1, 1, 1))
    return not np.array_equal(auto, y[:2])


def _with(setter, value, fn):
    """fn() with a kernel setting (setter returns the old value) at value."""
    old = setter(value)
    try:
        fn()
    finally:
        setter(old)


def _direct(conv, fn):
    _with(conv.set_winograd_path, 1, fn)


def _two_row_tiles(conv, fn):
    _with(conv.set_winograd_tile, 2, fn)


def _forced(conv, mode, g, w, dx, s, p, nt):
    _with(conv.set_strided_input_grad_path, mode,
          lambda: conv.conv2d_backward_input(g, w, dx, s, s, p, p, nt))


if __name__ == "__main__":
    main()
