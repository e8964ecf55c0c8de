"""Inference: cdl's predict against ONNX Runtime and PyTorch on the same weights, and
each public call against the same work through the plan or the kernels.

    python bench/bench_inference.py [--threads 2] [--repeats 25] [--out bench/results/inference]

ONNX Runtime (an optional dependency: skipped with a message when it is absent) runs
the graph that ``cdl.onnx.export`` writes from the cdl model's own weights, with
ORT_ENABLE_ALL and ``--threads`` intra-op threads; PyTorch gets the same weights
through the state dict. Runs are interleaved and medians reported, with the
machine's load average before and after. The public-path rows compare
``predict``/``forward``/``backward`` with the model's plan (``ForwardPlan.run``)
or the bare kernels on preallocated buffers. glibc's allocator keeps large blocks in
the heap for every contender (``--malloc``, as in bench/run.py).
"""
import argparse
import io
import json
import os
import platform
import sys
import time

import numpy as np

from _machine import describe
from _timing import median_times
from run import add_malloc_argument, apply_malloc


def nets(cdl):
    from cdl import models
    mlp = lambda: cdl.Sequential([cdl.Linear(784, 256), cdl.ReLU(), cdl.Linear(256, 128),  # noqa
                                  cdl.ReLU(), cdl.Linear(128, 10)], (784,), seed=0)
    cifar = lambda: cdl.Sequential([  # noqa: E731
        cdl.Conv2d(3, 32, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
        cdl.Conv2d(32, 64, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2), cdl.Flatten(),
        cdl.Linear(64 * 8 * 8, 10)], (3, 32, 32), seed=0)
    return [("MLP 784-256-128-10", mlp, (784,)),
            ("LeNet-5", lambda: models.lenet5(seed=0), (1, 28, 28)),
            ("CIFAR-style CNN", cifar, (3, 32, 32)),
            ("ResNet-8", lambda: models.resnet8(seed=0), (3, 32, 32))]


def torch_twin(torch, model):
    """A torch module computing model's inference with the same weights, built from
    the exported ONNX graph's structure would need onnx2torch; instead rebuild it."""
    nn = torch.nn
    import cdl

    def build(layers):
        mods = []
        for layer in layers:
            if isinstance(layer, cdl.Linear):
                m = nn.Linear(layer.in_features, layer.out_features, bias=layer.use_bias)
            elif isinstance(layer, cdl.Conv2d):
                m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                              layer.stride, layer.padding, bias=layer.use_bias)
            elif isinstance(layer, cdl.MaxPool2d):
                m = nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
            elif isinstance(layer, cdl.ReLU):
                m = nn.ReLU()
            elif isinstance(layer, cdl.Flatten):
                m = nn.Flatten()
            elif isinstance(layer, cdl.BatchNorm2d):
                m = nn.BatchNorm2d(layer.num_features)
            elif isinstance(layer, cdl.GlobalAvgPool2d):
                m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            elif isinstance(layer, cdl.Residual):
                body = build(layer.body.layers)
                short = None if layer.shortcut is None else build(layer.shortcut.layers)

                class Res(nn.Module):
                    def __init__(self):
                        super().__init__()
                        self.layers, self.shortcut = body, short

                    def forward(self, x):
                        return self.layers(x) + (x if self.shortcut is None else self.shortcut(x))
                m = Res()
            else:
                raise TypeError(type(layer).__name__)
            mods.append(m)
        return nn.Sequential(*mods)
    net = build(model.layers)
    tsd = net.state_dict()
    ours = model.state_dict()
    # same order of parameters and buffers; GlobalAvgPool2d adds no entries
    assert len(tsd) == len(ours), (list(tsd), list(ours))
    for (tk, tv), (ck, cv) in zip(tsd.items(), ours.items()):
        tv.copy_(torch.from_numpy(np.asarray(cv)).reshape(tv.shape))
    return net.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    add_malloc_argument(ap)
    args = ap.parse_args(argv)
    malloc = apply_malloc(args)
    import cdl
    cdl.set_num_threads(args.threads)
    try:
        import onnxruntime as ort
        import cdl.onnx as conx
    except ImportError as exc:
        ort = None
        print(f"ONNX Runtime or onnx not installed ({exc}): no ORT column", file=sys.stderr)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
        print("PyTorch not installed: no PyTorch column", file=sys.stderr)
    load_before = os.getloadavg()
    rows = []
    for name, make, shape in nets(cdl):
        model = make()
        sess = tnet = None
        if ort is not None:
            buf = io.BytesIO()
            conx.export(model, buf)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
            in_name = sess.get_inputs()[0].name
        if torch is not None:
            tnet = torch_twin(torch, model)
        for n in [int(b) for b in args.batches.split(",")]:
            x = np.random.default_rng(0).standard_normal((n,) + shape).astype(np.float32)
            fns = {"cdl": lambda: model.predict(x)}
            plan = model._make_runner(n)
            fns["cdl plan"] = lambda: plan.run(x, args.threads)
            ref = model.predict(x)
            if sess is not None:
                got = sess.run(None, {in_name: x})[0]
                assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max()), name
                fns["ORT"] = lambda: sess.run(None, {in_name: x})
            if tnet is not None:
                tx = torch.from_numpy(x)
                with torch.no_grad():
                    assert np.abs(tnet(tx).numpy() - ref).max() <= 1e-3 * max(1, np.abs(ref).max())

                def tpred():
                    with torch.no_grad():
                        tnet(tx)
                fns["PyTorch"] = tpred
            res = median_times(fns, args.repeats)
            row = {"net": name, "batch": n, **{k: v * 1e3 for k, v in res.items()}}
            row["cdl/ORT"] = res["cdl"] / res["ORT"] if "ORT" in res else None
            row["cdl/PyTorch"] = res["cdl"] / res["PyTorch"] if "PyTorch" in res else None
            row["predict/plan"] = res["cdl"] / res["cdl plan"]
            rows.append(row)
            print(f"{name:20s} N={n:<4d} " + "  ".join(
                f"{k} {v:.4g}" for k, v in row.items() if k not in ("net", "batch") and v),
                flush=True)
    # public paths against the kernels: pooling forward + backward on 64x32x32x32
    from cdl._kernels import pool as kpool
    x = np.random.default_rng(1).standard_normal((64, 32, 32, 32)).astype(np.float32)
    g = np.random.default_rng(2).standard_normal((64, 32, 16, 16)).astype(np.float32)
    pm = cdl.Sequential([cdl.MaxPool2d(2)], (32, 32, 32))
    out, idx, dx = (np.empty((64, 32, 16, 16), np.float32), np.empty((64, 32, 16, 16), np.int32),
                    np.empty_like(x))

    def public():
        pm.forward(x)
        pm.backward(g)

    def kernels():
        kpool.max_pool2d_forward(x, out, idx, 2, 2, 2, 2, 0, 0, args.threads)
        kpool.max_pool2d_backward(g, idx, dx, 2, 2, 2, 2, 0, 0, args.threads)
    res = median_times({"public": public, "kernels": kernels}, args.repeats)
    pool_row = {"case": "MaxPool2d(2) forward+backward, 64x32x32x32",
                "public_ms": res["public"] * 1e3, "kernels_ms": res["kernels"] * 1e3,
                "public/kernels": res["public"] / res["kernels"]}
    print(pool_row)
    load_after = os.getloadavg()
    meta = {"command": "python bench/bench_inference.py " + " ".join(argv or sys.argv[1:]),
            "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "machine": describe(), "cores": os.cpu_count(), "loadavg_before": load_before,
            "loadavg_after": load_after, "onnxruntime": None if ort is None else ort.__version__,
            "torch": None if torch is None else torch.__version__, "malloc": malloc,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows, "public_paths": [pool_row]}, f, indent=1)
        fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
        lines = ["# Inference: cdl predict vs ONNX Runtime and PyTorch", "",
                 f"`{meta['command']}`, {args.threads} threads, load "
                 f"average {load_before[0]:.2f} before / {load_after[0]:.2f} after, onnxruntime "
                 f"{meta['onnxruntime']}, torch {meta['torch']}, {meta['date']}; "
                 f"{meta['machine']}; allocator: {malloc}. Times in ms "
                 f"(medians); ratios below 1 mean cdl is faster.", "",
                 "| net | batch | cdl | ORT | PyTorch | cdl/ORT | cdl/PyTorch | predict/plan |",
                 "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for r in rows:
            lines.append(f"| {r['net']} | {r['batch']} | {fmt(r['cdl'])} | {fmt(r.get('ORT'))} | "
                         f"{fmt(r.get('PyTorch'))} | {fmt(r['cdl/ORT'])} | "
                         f"{fmt(r['cdl/PyTorch'])} | {fmt(r['predict/plan'])} |")
        lines += ["", "| public path | public ms | kernels ms | public/kernels |", "|---|--:|--:|--:|",
                  f"| {pool_row['case']} | {pool_row['public_ms']:.3g} | "
                  f"{pool_row['kernels_ms']:.3g} | {pool_row['public/kernels']:.2f} |"]
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
