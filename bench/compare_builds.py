"""Whole models on this build's kernels against an older build's, in one process.

    python bench/compare_builds.py --before DIR [--repeats 15] [--threads 2] [--out PATH]

DIR holds copies of an older build's ``_conv_<isa>*.so``, ``_pool_<isa>*.so`` and
``_norm_<isa>*.so`` (as for bench_peak.py and conv_parts.py). Each model is built twice:
once as usual, once with its layers' conv, pool and norm kernel modules swapped for the
older ones while its training plan is made, so that plan's bound ops run the older
kernels. After one step from the same seed both copies must hold bit for bit the same
state (the run stops otherwise); then their train_step at batch 64 is timed, interleaved
(_timing.median_times), through the public API, adaptive threads included. Run it beside a
busy process too: the ratios should hold.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _machine import describe  # noqa: E402
from _timing import median_times  # noqa: E402
from bench_peak import load_before, rel_err  # noqa: E402

import cdl  # noqa: E402
import cdl.layers.base as _base  # noqa: E402
import cdl.layers.conv as _lconv  # noqa: E402
import cdl.layers.norm as _lnorm  # noqa: E402
import cdl.layers.pool as _lpool  # noqa: E402
from cdl import models  # noqa: E402

MODELS = [
    ("LeNet-5", lambda: models.lenet5(seed=0), (1, 28, 28)),
    ("LeNet-5 + BN + Dropout", lambda: models.lenet5(batchnorm=True, dropout=0.3, seed=0),
     (1, 28, 28)),
    ("ResNet-8", lambda: models.resnet8(seed=0), (3, 32, 32)),
]


def _built(factory, x, y, loss, kernels):
    """The model and optimizer after one step, its plan made with ``kernels`` (None: this
    build's) as the layers' conv, pool and norm modules."""
    saved = (_lconv._conv, _lpool._pool, _lnorm._norm, _base._norm)
    if kernels is not None:
        _lconv._conv, _lpool._pool = kernels["_conv"], kernels["_pool"]
        _lnorm._norm = _base._norm = kernels["_norm"]
    try:
        model = factory()
        opt = cdl.SGD(model, lr=0.01)
        model.train_step(x, y, loss, opt)
    finally:
        _lconv._conv, _lpool._pool, _lnorm._norm, _base._norm = saved
    return model, opt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="directory with an older build's .so copies")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write a markdown table to this path")
    ap.add_argument("--note", default="", help="a sentence for the header (what ran beside)")
    ap.add_argument("--rtol", type=float, default=0.0,
                    help="the states after one step may differ by this much relative to the "
                         "largest entry of each array (default 0: bit for bit equal); for "
                         "kernels whose rounding changed")
    args = ap.parse_args(argv)
    older = {m: load_before(args.before, m) for m in ("_conv", "_pool", "_norm")}
    cdl.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    loss = cdl.SoftmaxCrossEntropy()
    load = os.getloadavg()[0]
    fns, labels, worst = {}, [], {}
    for name, factory, shape in MODELS:
        x = rng.standard_normal((64,) + shape, dtype=np.float32)
        y = rng.integers(0, 10, 64)
        pair = {side: _built(factory, x, y, loss, kernels)
                for side, kernels in (("this", None), ("before", older))}
        a, b = (pair[s][0].state_dict() for s in ("this", "before"))
        gap = {k: rel_err(a[k], b[k]) for k in a}
        differ = [k for k in a if gap[k] > args.rtol or (args.rtol == 0 and
                                                          not np.array_equal(a[k], b[k]))]
        if differ:
            sys.exit(f"{name}: the builds' states differ after one step: {differ}")
        worst[name] = max(gap.values())
        for side, (model, opt) in pair.items():
            fns[(name, side)] = (lambda m=model, o=opt, x=x, y=y: m.train_step(x, y, loss, o))
        labels.append(name)
    t = median_times(fns, args.repeats)
    lines = ["| model | train_step, this build ms | older build ms | this / older |",
             "|---|--:|--:|--:|"]
    for name in labels:
        new, old = t[(name, "this")], t[(name, "before")]
        lines.append(f"| {name} | {new * 1e3:.2f} | {old * 1e3:.2f} | {new / old:.2f} |")
    head = (f"`python bench/compare_builds.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" ({time.strftime('%Y-%m-%d %H:%M')}): batch 64, {args.threads} threads, "
            f"{describe()}, load average {load:.2f} before and {os.getloadavg()[0]:.2f} after. "
            + ("Each model's two copies held bit for bit the same state after one step."
               if args.rtol == 0 else
               "After one step the two copies' states differed by at most "
               + ", ".join(f"{worst[n]:.1e} ({n})" for n in labels)
               + " relative to each array's largest entry.")
            + (" " + args.note if args.note else ""))
    print(head)
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# This build's kernels against an older build's, whole models\n\n"
                     + head + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
