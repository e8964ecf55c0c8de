"""Max-pool 2x2 stride 2 forward+backward: cdl vs PyTorch CPU vs NumPy, interleaved.

    python bench/bench_pool.py [--shape 64 32 32 32] [--threads 2] [--repeat 30] [--burst 4]

Prints the median and minimum milliseconds of forward+backward for each
contender, measured round-robin in one run so machine noise hits all alike.
"""
import argparse
import statistics
import time

import numpy as np

import cdl
import cdl.functional as F


def numpy_pool(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        n, c, h // 2, w // 2, 4)
    k = win.argmax(axis=-1)
    y = np.take_along_axis(win, k[..., None], axis=-1)[..., 0]
    return y, k


def numpy_pool_backward(g, k, shape):
    n, c, h, w = shape
    win = np.zeros((n, c, h // 2, w // 2, 4), dtype=g.dtype)
    np.put_along_axis(win, k[..., None], g[..., None], axis=-1)
    return win.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=4, default=[64, 32, 32, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--burst", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(args.shape).astype(np.float32)
    n, c, h, w = x.shape
    g = rng.standard_normal((n, c, h // 2, w // 2)).astype(np.float32)
    y = np.empty_like(g)
    idx = np.empty(g.shape, np.int32)
    dx = np.empty_like(x)
    cdl.set_num_threads(args.threads)

    def run_cdl():
        F.max_pool2d(x, 2, out=y, indices=idx)
        F.max_pool2d_backward(g, idx, x.shape, 2, grad_input=dx)

    def run_numpy():
        yy, k = numpy_pool(x)
        numpy_pool_backward(g, k, x.shape)

    contenders = {"cdl": run_cdl, "numpy": run_numpy}
    try:
        import torch
        torch.set_num_threads(args.threads)
        tx = torch.from_numpy(x.copy()).requires_grad_(True)
        tg = torch.from_numpy(g.copy())

        def run_torch():
            tx.grad = None
            ty = torch.nn.functional.max_pool2d(tx, 2)
            ty.backward(tg)

        contenders["torch"] = run_torch
        run_torch()
        ty, ti = torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
        run_cdl()
        assert np.array_equal(ty.detach().numpy(), y) and np.array_equal(ti.numpy(), idx)
    except ImportError:
        print("torch not installed: skipped")
    for f in contenders.values():
        f()
    # Each round runs every contender ``burst`` times back to back. The first
    # call of a burst finds the caches filled by the other contenders ("after
    # others"); the later calls find its own data in cache ("warm", as in a
    # loop that repeats one step). Both are reported.
    first = {k: [] for k in contenders}
    warm = {k: [] for k in contenders}
    for _ in range(args.repeat):
        for name, f in contenders.items():
            for j in range(args.burst):
                t0 = time.perf_counter()
                f()
                (first if j == 0 else warm)[name].append(time.perf_counter() - t0)
    print(f"max-pool 2x2/2 forward+backward, float32, shape {'x'.join(map(str, x.shape))}, "
          f"{args.threads} threads, {args.repeat} interleaved rounds (ms)")
    for label, times in (("after others", first), ("warm", warm)):
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        best = {k: min(v) * 1e3 for k, v in times.items()}
        print(f"  [{label}] {'median':>9s} {'min':>9s}   cdl speed-up (median, min)")
        for name in contenders:
            print(f"  {name:14s} {med[name]:9.3f} {best[name]:9.3f}   "
                  f"{med[name] / med['cdl']:6.1f}x {best[name] / best['cdl']:6.1f}x")

if __name__ == "__main__":
    main()
