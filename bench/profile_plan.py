"""Where a step's time goes: the median time of each op of a model's plan.

    python bench/profile_plan.py [--net resnet8|lenet5|lenet5-bn|cifar-cnn] [--batch 64]
                                 [--threads 2] [--mode train|predict] [--repeats 30]

Runs the plan once per repeat, timing every op alone (a train step: the forward
ops, the loss, the backward ops; predict: the inference plan, BatchNorm folded),
and prints each op's median with its layer, largest first, then the sum. The
ops run in order on the plan's own buffers, so each sees the caches the ops
before it left, as in a real step. A tool for finding hot spots, not a
benchmark against other libraries: use bench_resnet.py or run.py for those.

--torch also profiles PyTorch's train step of the same net (bench_resnet.py's twin, its
own random weights) under torch.profiler and prints each op's self time a step by input
shapes, largest first: which of PyTorch's layers are fast, to compare with cdl's ops
above. The profiler adds its own overhead, so compare layers, not the totals with
bench_resnet.py's. glibc's allocator is set up as in bench/run.py (``--malloc``).
"""
import argparse
import time

import numpy as np

from run import add_malloc_argument, apply_malloc

import cdl
from cdl.models import lenet5, resnet8
from cdl.plan import ForwardPlan, TrainPlan

NETS = {"resnet8": (lambda: resnet8(seed=0), (3, 32, 32)),
        "lenet5": (lambda: lenet5(seed=0), (1, 28, 28)),
        "lenet5-bn": (lambda: lenet5(batchnorm=True, dropout=0.5, seed=0), (1, 28, 28)),
        # bench/run.py's CIFAR-style CNN (no --torch twin here)
        "cifar-cnn": (lambda: cdl.Sequential(
            [cdl.Conv2d(3, 32, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
             cdl.Conv2d(32, 64, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
             cdl.Flatten(), cdl.Linear(4096, 10)], (3, 32, 32), seed=0), (3, 32, 32))}
TORCH_NETS = ("resnet8", "lenet5", "lenet5-bn")


def _label(fn):
    owner = getattr(fn, "__self__", None)
    return type(owner).__name__ if owner is not None else fn.__qualname__.split(".<locals>")[0]


def plan_ops(model, n, x, y, mode, nt):
    """[(label, zero-argument call)] for one step of ``mode`` on batch (x, y)."""
    if mode == "predict":
        plan = ForwardPlan(model, n)
        for bind, shape in plan._binders:
            bind(x.reshape(shape))
        return [(f"F{i} {_label(run)}", lambda run=run: run(nt))
                for i, run in enumerate(plan._forward)]
    loss = cdl.SoftmaxCrossEntropy()
    plan = TrainPlan(model, n, loss)
    plan.forward(x, y, nt)           # binds the input and the labels
    ops = [(f"F{i} {_label(run)}", lambda run=run: run(nt))
           for i, run in enumerate(plan._forward)]
    ops.append(("loss", lambda: plan._loss.run(nt)))
    ops += [(f"B{i} {_label(run)}", (lambda run=run: run(nt, 0.0)) if takes_l2 else
             (lambda run=run: run(nt)))
            for i, (run, takes_l2) in enumerate(plan._backward)]
    return ops


def torch_profile(net, threads, repeats, x, y):
    """[(ms a step, op, first input shapes)] of PyTorch's train step of ``net``."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from bench_resnet import torch_lenet, torch_resnet8, torch_train_step
    torch.set_num_threads(threads)
    make = {"resnet8": lambda: torch_resnet8(torch),
            "lenet5": lambda: torch_lenet(torch, False, 0),
            "lenet5-bn": lambda: torch_lenet(torch, True, 0.5)}[net]
    step = torch_train_step(torch, make(), x, y)
    for _ in range(10):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            step()
    rows = [(e.self_cpu_time_total / 1e3 / repeats, e.key, e.input_shapes[:2])
            for e in prof.key_averages(group_by_input_shape=True)]
    return sorted((r for r in rows if r[0] >= 0.01), key=lambda r: -r[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=sorted(NETS), default="resnet8")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=("train", "predict"), default="train")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--torch", action="store_true",
                   help="also PyTorch's train step of the same net under torch.profiler")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    if args.torch and args.mode != "train":
        p.error("--torch profiles PyTorch's train step only (--mode train)")
    if args.torch and args.net not in TORCH_NETS:
        p.error(f"--torch has PyTorch twins of {', '.join(TORCH_NETS)} only")
    malloc = apply_malloc(args)
    make, shape = NETS[args.net]
    model = make()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    ops = plan_ops(model, args.batch, x, y, args.mode, args.threads)
    times = np.empty((args.repeats, len(ops)))
    for r in range(args.repeats + 3):            # 3 untimed warm-up steps
        for i, (_, call) in enumerate(ops):
            t0 = time.perf_counter()
            call()
            if r >= 3:
                times[r - 3, i] = time.perf_counter() - t0
    med = np.median(times, axis=0) * 1e3
    total = med.sum()
    print(f"{args.net} {args.mode} batch {args.batch}, {args.threads} threads, "
          f"{args.repeats} repeats: op medians in ms")
    for i in np.argsort(-med):
        print(f"  {ops[i][0]:40s} {med[i]:8.3f}  {100 * med[i] / total:5.1f}%")
    print(f"  {'sum':40s} {total:8.3f}")
    print(f"allocator: {malloc}")
    if args.torch:
        rows = torch_profile(args.net, args.threads, args.repeats, x, y)
        total = sum(r[0] for r in rows)
        print(f"PyTorch train step under torch.profiler, {args.repeats} steps: self time a "
              f"step in ms by op and first input shapes (ops of 10 us and more)")
        for t, key, shapes in rows:
            name = key if len(key) <= 40 else "..." + key[-37:]   # autograd rows differ at the end
            print(f"  {name:40s} {str(shapes)[:44]:44s} {t:8.3f}  {100 * t / total:5.1f}%")
        print(f"  {'sum':85s} {total:8.3f}")


if __name__ == "__main__":
    main()
