"""Batch-norm training forward and backward, float32: cdl's kernels vs PyTorch CPU.

    python bench/bench_batchnorm.py [--shape 64 16 1024] [--threads 2] [--repeat 30] [--burst 4]

--shape is (N, C, L): BatchNorm2d on (N, C, H, W) is L = H*W, BatchNorm1d on (N, F)
is (N, F, 1). Forward: cdl.norm.BatchNormTrainForward against F.batch_norm(training=True);
backward (grad_input, grad_weight, grad_bias): cdl.norm.BatchNormBackward against
aten.native_batch_norm_backward (the kernel autograd calls, without the graph).
Prints the median and minimum microseconds of each, measured round-robin in one
run so machine noise hits all alike.
"""
import argparse
import statistics
import time

import numpy as np

from cdl._kernels import norm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 16, 1024])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--burst", type=int, default=4)
    args = ap.parse_args()
    n, c, l = args.shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, l)).astype(np.float32)
    g = rng.standard_normal((n, c, l)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    out, dx = np.empty_like(x), np.empty_like(x)
    mean, invstd = np.empty(c, np.float32), np.empty(c, np.float32)
    dw, db = np.empty(c, np.float32), np.empty(c, np.float32)
    fwd = norm.BatchNormTrainForward(x, w, b, out, mean, invstd, rm, rv, 0.1, 1e-5, False)
    bwd = norm.BatchNormBackward(g, x, out, w, mean, invstd, dx, dw, db, False)
    nt = args.threads
    contenders = {"cdl forward": lambda: fwd.run(nt), "cdl backward": lambda: bwd.run(nt)}
    try:
        import torch
        import torch.nn.functional as TF
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(nt)
        shape = (n, c, l) if l > 1 else (n, c)
        tx, tg = torch.from_numpy(x).reshape(shape), torch.from_numpy(g).reshape(shape)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        _, sm, si = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)

        def torch_fwd():
            with torch.no_grad():
                TF.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)

        def torch_bwd():
            torch.ops.aten.native_batch_norm_backward(tg, tx, tw, trm, trv, sm, si, True, 1e-5,
                                                      [True, True, True])
        contenders.update({"torch forward": torch_fwd, "torch backward": torch_bwd})
    times = {k: [] for k in contenders}
    for f in contenders.values():
        f()
    for _ in range(args.repeat):
        for name, f in contenders.items():
            t = time.perf_counter()
            for _ in range(args.burst):
                f()
            times[name].append((time.perf_counter() - t) / args.burst * 1e6)
    print(f"batch norm (N, C, L) = {tuple(args.shape)} float32, {nt} thread(s): "
          "median / min microseconds")
    for name, ts in times.items():
        print(f"  {name:15s} {statistics.median(ts):8.0f} {min(ts):8.0f}")


if __name__ == "__main__":
    main()
