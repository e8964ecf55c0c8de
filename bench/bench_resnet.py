"""ResNet-8 (3x32x32) and LeNet-5 with and without BatchNorm + Dropout: cdl against
PyTorch, and ResNet-8 also against NumPy, same weights, same threads, interleaved runs,
medians.

    python bench/bench_resnet.py [--threads 2] [--repeats 30] [--out bench/results/resnet]

Rows: train_step (SGD, lr 0.01, cross-entropy) and predict at batch 1 and 64. NumPy is
numpy_ref.NumpyResNet8 (im2col + one GEMM per convolution, BatchNorm in NumPy
expressions; tests/test_bench.py checks its step against cdl's), whose BLAS runs
with the same thread count through threadpoolctl, timed against cdl in a block of its
own (cdl/NumPy uses cdl's time from that block); LeNet-5 against NumPy is in run.py's
table. The machine's load average is recorded before and after.

glibc's allocator is set up first (``--malloc default`` leaves it alone; run.py's
``keep_large_blocks_in_heap``) so that large blocks stay in the heap: with its defaults
PyTorch maps and unmaps its 4 MB tensors on every step. Its ResNet-8 step at batch 64 took 4,448 page faults and 47 ms in a fresh
process against 410 and 40 ms once a large free had raised glibc's mmap threshold (a /tmp
script on a Sapphire Rapids VM). The NumPy twin's arrays did that halfway through the run,
so the rows before it and the blocks after it saw two different PyTorches. cdl reuses its
buffers and takes no faults either way.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from _machine import describe
from _timing import median_times
from run import add_malloc_argument, apply_malloc
from numpy_ref import NumpyResNet8


def _unmerged(model):
    """The model with BatchNorm's training merge of the max-pool after it turned off
    (every other fusion kept), for the A/B of that merge."""
    model.chain.fuse(merge=False)
    model._reset_plans()
    return model


def _separate_shortcut_sums(model):
    """The model with each Residual's shortcut input gradient summed with the body's in a
    pass of its own (Layer.adds_input_grad turned off on the shortcut's first layer),
    for the A/B of that fusion."""
    import cdl
    for _, layer in model.chain.walk():
        if isinstance(layer, cdl.Residual) and layer.shortcut is not None:
            layer.shortcut.layers[0].adds_input_grad = lambda: False
    model._reset_plans()
    return model


def _masks_from_output(model):
    """The model with each BatchNorm's fused ReLU mask read from its output in the
    backward instead of rebuilt from its input (BatchNorm._mask_args turned off), for
    the A/B of that change."""
    import cdl
    for _, layer in model.chain.walk():
        if isinstance(layer, cdl.layers.norm._BatchNorm):
            layer._mask_args = lambda ws, join_mask=None: {}
    model._reset_plans()
    return model


def _direct_convs(model):
    """A train_step of the model with the Winograd path of 3x3 stride-1 convolutions
    turned off (cdl._kernels.conv.set_winograd_path(1) around the step), for the A/B of
    that path."""
    from cdl._kernels import conv

    def step(*args):
        old = conv.set_winograd_path(1)
        try:
            return model.train_step(*args)
        finally:
            conv.set_winograd_path(old)
    return step


def torch_resnet8(torch):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                        nn.BatchNorm2d(cout), nn.ReLU(),
                                        nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                        nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential() if stride == 1 and cin == cout else \
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return self.layers(x) + self.shortcut(x)

    class GAP(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         Block(16, 16, 1), nn.ReLU(), Block(16, 32, 2), nn.ReLU(),
                         Block(32, 64, 2), nn.ReLU(), GAP(), nn.Linear(64, 10))


def torch_train_step(torch, net, x, y):
    """PyTorch's SGD step (lr 0.01, cross-entropy) of net on (x, y), as a call."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        net.train()
        opt.zero_grad()
        lossf(net(tx), ty).backward()
        opt.step()
    return step


def torch_lenet(torch, bn, p):
    nn = torch.nn
    b2 = (lambda n: [nn.BatchNorm2d(n)]) if bn else (lambda n: [])
    b1 = (lambda n: [nn.BatchNorm1d(n)]) if bn else (lambda n: [])
    d = (lambda: [nn.Dropout(p)]) if p else (lambda: [])
    return nn.Sequential(*([nn.Conv2d(1, 6, 5, padding=2, bias=not bn)] + b2(6)
                           + [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5, bias=not bn)]
                           + b2(16) + [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()] + d()
                           + [nn.Linear(400, 120, bias=not bn)] + b1(120) + [nn.ReLU()] + d()
                           + [nn.Linear(120, 84, bias=not bn)] + b1(84)
                           + [nn.ReLU(), nn.Linear(84, 10)]))


def saves(gain, fmt=".1%", plural=False):
    """'saves 6.2%', or 'costs 1.4%' where the variant without it was the faster one."""
    verb = ("save" if gain >= 0 else "cost") + ("" if plural else "s")
    return f"{verb} {abs(gain):{fmt}}"


def resnet_blocks_line(meta):
    """The ResNet-8 batch-64 blocks as a sentence (also tools/readme_tables.py's)."""
    ratios = meta["resnet_n64_train_vs_torch_blocks"]
    blocks = meta["resnet_n64_blocks_ms"]
    med = {k: float(np.median([b[k] for b in blocks])) for k in blocks[0]}
    return (f"ResNet-8's train_step at batch 64 against PyTorch's in {len(ratios)} interleaved "
            f"blocks: {meta['resnet_n64_train_vs_torch']:.2f}x, the median ("
            + ", ".join(f"{r:.2f}" for r in ratios)
            + f"; median times {med['cdl']:.1f} ms and {med['torch']:.1f} ms; target ≤ 0.5). "
            f"The strided shortcuts adding their input gradient to the body's in their "
            f"convolution {saves(meta['shortcut_sum_fusion_gain'], plural=True)} of that step "
            f"({med['cdl_separate']:.1f} ms with the sum in a pass of its own, same blocks)."
            + ("" if "bn_mask_rebuild_gain" not in meta else
               f" BatchNorm's backward rebuilding its fused ReLU's mask from its input "
               f"instead of reading its output {saves(meta['bn_mask_rebuild_gain'])} "
               f"({med['cdl_read_mask']:.1f} ms reading it).")
            + ("" if "winograd_gain" not in meta else
               f" The Winograd path of the 3x3 stride-1 convolutions "
               f"{saves(meta['winograd_gain'])} ({med['cdl_direct']:.1f} ms with direct sums "
               f"only)."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    # 15: at 5, one run's blocks spread 11-20% around a 15% target (2026-12-05, Xeon VM)
    ap.add_argument("--overhead-blocks", type=int, default=15,
                    help="interleaved blocks of the LeNet-5 BatchNorm + Dropout overhead")
    ap.add_argument("--resnet-blocks", type=int, default=5,
                    help="interleaved blocks of ResNet-8's train_step at batch 64 against "
                         "PyTorch's (0: none)")
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    malloc = apply_malloc(args)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    import cdl
    import cdl.models as models
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch is not installed: cdl rows only", file=sys.stderr)
    cdl.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits
    blas = threadpool_limits(limits=args.threads, user_api="blas")
    load_before = os.getloadavg()
    nets = [("ResNet-8", lambda: models.resnet8(seed=0),
             (lambda: torch_resnet8(torch)) if torch else None, (3, 32, 32)),
            ("LeNet-5", lambda: models.lenet5(seed=0),
             (lambda: torch_lenet(torch, False, 0)) if torch else None, (1, 28, 28)),
            ("LeNet-5 + BN + Dropout", lambda: models.lenet5(batchnorm=True, dropout=0.3, seed=0),
             (lambda: torch_lenet(torch, True, 0.3)) if torch else None, (1, 28, 28))]
    rows = []
    for name, make_cdl, make_torch, shape in nets:
        for n in (1, 64):
            rng = np.random.default_rng(0)
            x = rng.standard_normal((n,) + shape).astype(np.float32)
            y = rng.integers(0, 10, n)
            m = make_cdl()
            if n == 1 and any(isinstance(l, (cdl.BatchNorm1d,)) for l in m.layers):
                continue      # BatchNorm1d cannot train on one sample (as in PyTorch)
            opt = cdl.SGD(m, lr=0.01)
            loss = cdl.SoftmaxCrossEntropy()
            fns = {"cdl train_step": lambda: m.train_step(x, y, loss, opt),
                   "cdl predict": lambda: m.predict(x)}
            twin = NumpyResNet8(m.state_dict(), lr=0.01) if name == "ResNet-8" else None
            if make_torch is not None:
                net = make_torch()
                tsd = net.state_dict()
                ours = m.state_dict()
                # same weights (names differ only where torch has a Flatten layer)
                for (tk, tv), (ck, cv) in zip(tsd.items(), ours.items()):
                    tv.copy_(torch.from_numpy(np.asarray(cv).reshape(tv.shape)))
                t_step = torch_train_step(torch, net, x, y)
                tx = torch.from_numpy(x)

                def t_pred():
                    net.eval()
                    with torch.no_grad():
                        net(tx)
                fns["torch train_step"] = t_step
                fns["torch predict"] = t_pred
            res = median_times(fns, args.repeats)
            if twin is not None:
                # NumPy in a block of its own, against cdl: its BLAS threads spin for about
                # 0.1 s after each call and its temporaries are large, which would slow
                # the cdl/PyTorch pairs above; a longer pause lets the threads sleep.
                vs = median_times({"cdl train_step": fns["cdl train_step"],
                                   "cdl predict": fns["cdl predict"],
                                   "numpy train_step": lambda: twin.train_step(x, y),
                                   "numpy predict": lambda: twin.predict(x)},
                                  max(5, args.repeats // 3), pause=0.3)
                for op in ("train_step", "predict"):
                    res[f"numpy {op}"] = vs[f"numpy {op}"]
                    res[f"cdl vs numpy {op}"] = vs[f"cdl {op}"]
            for op in ("train_step", "predict"):
                c = res[f"cdl {op}"]
                t = res.get(f"torch {op}")
                npy = res.get(f"numpy {op}")
                cn = res.get(f"cdl vs numpy {op}")
                rows.append({"net": name, "batch": n, "op": op, "cdl_ms": c * 1e3,
                             "torch_ms": None if t is None else t * 1e3,
                             "cdl/torch": None if t is None else c / t,
                             "numpy_ms": None if npy is None else npy * 1e3,
                             "cdl/numpy": None if npy is None else cn / npy})
                print(f"{name:24s} N={n:<3d} {op:10s} cdl {c * 1e3:8.3f} ms"
                      + ("" if t is None else f"  torch {t * 1e3:8.3f} ms  ratio {c / t:.2f}")
                      + ("" if npy is None else f"  numpy {npy * 1e3:8.3f} ms  ratio "
                                                f"{cn / npy:.2f}"),
                      flush=True)
    # The BatchNorm + Dropout overhead from the two LeNet-5 steps timed in interleaved
    # blocks: the rows above come from separate blocks, minutes apart on a VM whose speed
    # drifts by tens of percent, so their ratio mixes the drift into the overhead. One
    # block still drifted (7% and 15% in two runs of the same build, 1-6% in blocks run
    # alone), so the overhead is the median of --overhead-blocks blocks, with their range.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    loss = cdl.SoftmaxCrossEntropy()
    pair = {}
    for key, m in (("plain", models.lenet5(seed=0)),
                   ("bn", models.lenet5(batchnorm=True, dropout=0.3, seed=0)),
                   ("bn_unmerged", _unmerged(models.lenet5(batchnorm=True, dropout=0.3, seed=0)))):
        opt = cdl.SGD(m, lr=0.01)
        pair[key] = (lambda m=m, opt=opt: m.train_step(x, y, loss, opt))
    blocks = [median_times(pair, args.repeats) for _ in range(args.overhead_blocks)]
    both = {k: float(np.median([b[k] for b in blocks])) for k in pair}
    overheads = [b["bn"] / b["plain"] - 1 for b in blocks]
    # ResNet-8 at batch 64 against PyTorch in interleaved blocks as well: single runs of
    # one build gave 0.52-0.61 within half an hour on the VM, and each block also times
    # the step with the shortcuts' input gradients summed in a pass of their own, with
    # BatchNorm reading its ReLU mask, and with the Winograd path off.
    resnet_blocks = []
    if torch is not None and args.resnet_blocks > 0:
        rng = np.random.default_rng(0)
        x8 = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
        y8 = rng.integers(0, 10, 64)
        trio = {}
        for key, m in (("cdl", models.resnet8(seed=0)),
                       ("cdl_separate", _separate_shortcut_sums(models.resnet8(seed=0))),
                       ("cdl_read_mask", _masks_from_output(models.resnet8(seed=0)))):
            opt = cdl.SGD(m, lr=0.01)
            trio[key] = (lambda m=m, opt=opt: m.train_step(x8, y8, loss, opt))
        m = models.resnet8(seed=0)
        trio["cdl_direct"] = (lambda step=_direct_convs(m), opt=cdl.SGD(m, lr=0.01):
                              step(x8, y8, loss, opt))
        trio["torch"] = torch_train_step(torch, torch_resnet8(torch), x8, y8)
        resnet_blocks = [{k: v * 1e3 for k, v in median_times(trio, args.repeats).items()}
                         for _ in range(args.resnet_blocks)]
    blas.restore_original_limits()
    load_after = os.getloadavg()
    meta = {"command": "python bench/bench_resnet.py " + " ".join(argv or sys.argv[1:]),
            "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "machine": describe(), "cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
            "torch": None if torch is None else torch.__version__,
            "malloc": malloc,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    meta["bn_dropout_overhead_lenet_n64"] = float(np.median(overheads))
    meta["bn_dropout_overhead_blocks"] = overheads
    meta["bn_pool_merge_gain_lenet_n64"] = float(np.median(
        [1 - b["bn"] / b["bn_unmerged"] for b in blocks]))
    meta["lenet_n64_interleaved_ms"] = {k: v * 1e3 for k, v in both.items()}
    if resnet_blocks:
        ratios = [b["cdl"] / b["torch"] for b in resnet_blocks]
        meta["resnet_n64_blocks_ms"] = resnet_blocks
        meta["resnet_n64_train_vs_torch"] = float(np.median(ratios))
        meta["resnet_n64_train_vs_torch_blocks"] = ratios
        meta["shortcut_sum_fusion_gain"] = float(np.median(
            [1 - b["cdl"] / b["cdl_separate"] for b in resnet_blocks]))
        meta["bn_mask_rebuild_gain"] = float(np.median(
            [1 - b["cdl"] / b["cdl_read_mask"] for b in resnet_blocks]))
        meta["winograd_gain"] = float(np.median(
            [1 - b["cdl"] / b["cdl_direct"] for b in resnet_blocks]))
        print(f"ResNet-8 train_step at batch 64 takes {meta['resnet_n64_train_vs_torch']:.2f}x "
              f"PyTorch's time (median of {len(ratios)} interleaved blocks, "
              f"{min(ratios):.2f} to {max(ratios):.2f}); the shortcuts adding their input "
              f"gradient in their convolution "
              f"{saves(meta['shortcut_sum_fusion_gain'], plural=True)}; BatchNorm rebuilding "
              f"its ReLU mask {saves(meta['bn_mask_rebuild_gain'])}; the Winograd path "
              f"{saves(meta['winograd_gain'])}")
    print(f"BatchNorm + Dropout add {meta['bn_dropout_overhead_lenet_n64']:.0%} to LeNet-5's "
          f"step at batch 64 (median of {len(blocks)} interleaved blocks, "
          f"{min(overheads):.0%} to {max(overheads):.0%}; median times "
          f"{both['plain'] * 1e3:.3f} -> {both['bn'] * 1e3:.3f} ms)")
    print(f"BatchNorm running the max-pool after it in its own pass "
          f"{saves(meta['bn_pool_merge_gain_lenet_n64'], '.0%')} of that step "
          f"({both['bn_unmerged'] * 1e3:.3f} ms unmerged)")
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        lines = [f"# ResNet-8 and LeNet-5 (+BN, Dropout): cdl vs PyTorch", "",
                 f"`{meta['command']}`, {args.threads} threads, {meta['machine']}, "
                 f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after, "
                 f"torch {meta['torch']}, {meta['date']}; allocator: {meta['malloc']}.", "",
                 "| net | batch | op | cdl ms | PyTorch ms | cdl/PyTorch | NumPy ms | cdl/NumPy |",
                 "|---|--:|---|--:|--:|--:|--:|--:|"]
        for r in rows:
            t = "—" if r["torch_ms"] is None else f"{r['torch_ms']:.3f}"
            q = "—" if r["cdl/torch"] is None else f"{r['cdl/torch']:.2f}"
            u = "—" if r["numpy_ms"] is None else f"{r['numpy_ms']:.3f}"
            v = "—" if r["cdl/numpy"] is None else f"{r['cdl/numpy']:.2f}"
            lines.append(f"| {r['net']} | {r['batch']} | {r['op']} | {r['cdl_ms']:.3f} | {t} | "
                         f"{q} | {u} | {v} |")
        ms = meta["lenet_n64_interleaved_ms"]
        lines += ["", f"BatchNorm + Dropout add {meta['bn_dropout_overhead_lenet_n64']:.0%} "
                      f"to LeNet-5's train_step at batch 64 (the median of "
                      f"{len(overheads)} interleaved blocks, "
                      + ", ".join(f"{o:.0%}" for o in overheads)
                      + f"; median times {ms['plain']:.3f} -> {ms['bn']:.3f} ms; "
                      f"target ≤ 15%). Its BatchNorm layers running the max-pool after them "
                      f"in their own pass "
                      f"{saves(meta['bn_pool_merge_gain_lenet_n64'], '.0%', plural=True)} "
                      f"of that step ({ms['bn_unmerged']:.3f} ms without)."]
        if resnet_blocks:
            lines += ["", resnet_blocks_line(meta)]
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
