"""What the check that every gradient is finite costs a train_step, in one process.

Three ways to run the same model's step, timed interleaved (bench/_timing.py):
  fused     SGD/Adam's own route: the check inside the update kernel (each thread scans
            the parts it updates, then a barrier);
  separate  the model's route for other optimizers: one scan of the whole gradient
            buffer before optimizer.step() (what every optimizer did before 719c444);
  none      no check at all (the model's check replaced by one that says yes).

    python bench/finite_check_cost.py [--net mlp|cifar-cnn] [--batch 1] [--repeats 15]

The MLP's batch-1 step is where the separate scan showed (bench/results/
bisect-finite-check.md): its update is a large part of a short step.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import describe  # noqa: E402
from _timing import median_times  # noqa: E402

import cdl  # noqa: E402


def build(net):
    if net == "mlp":
        return cdl.Sequential([cdl.Linear(784, 256), cdl.ReLU(), cdl.Linear(256, 128),
                               cdl.ReLU(), cdl.Linear(128, 10)], (784,), seed=0)
    return cdl.Sequential([cdl.Conv2d(3, 32, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Conv2d(32, 64, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Flatten(), cdl.Linear(4096, 10)], (3, 32, 32), seed=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=("mlp", "cifar-cnn"), default="mlp")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    model = build(args.net)
    opt = (cdl.SGD(model, lr=0.01, momentum=0.9) if args.optimizer == "sgd"
           else cdl.Adam(model, lr=1e-4))
    loss = cdl.SoftmaxCrossEntropy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch,) + model.input_shape).astype(np.float32)
    y = rng.integers(0, 10, args.batch)

    def mode(name):
        # the instance attributes shadow the class's route for this call only
        def step():
            opt.__dict__.pop("fuses_finite_check", None)
            model.__dict__.pop("_finite_check", None)
            if name != "fused":
                opt.fuses_finite_check = False
            if name == "none":
                model._finite_check = lambda nt: True
            model.train_step(x, y, loss, opt)
        return step

    times = median_times({m: mode(m) for m in ("fused", "separate", "none")}, args.repeats)
    opt.__dict__.pop("fuses_finite_check", None)
    model.__dict__.pop("_finite_check", None)
    print(f"`python bench/finite_check_cost.py --net {args.net} --batch {args.batch} "
          f"--optimizer {args.optimizer} --repeats {args.repeats}`: {describe()}, "
          f"{cdl.get_num_threads()} threads, {sum(p.size for _, p, _ in model.parameters())} parameters.\n")
    print("| route | µs a step | over no check |")
    print("|---|--:|--:|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e6:.1f} | {t / times['none']:.2f} |")


if __name__ == "__main__":
    main()
