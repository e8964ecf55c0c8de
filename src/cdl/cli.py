"""The ``cdl`` command: ``cdl train``, ``cdl bench``, ``cdl --version``.

Every option is checked before any work starts (nothing is loaded, printed or
written for a bad value). Exit codes: 0 success, 2 bad options or input (argparse's
convention), 3 a training run that diverged, 130 interrupted by Ctrl-C.
"""
import argparse
import importlib.util
import math
import os
import sys
import time
import warnings

import numpy as np

__all__ = ["main", "build_parser", "lenet"]

EXIT_OK, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 130
_RANK = None            # a distributed run's rank other than 0 (see _distributed)
MAX_THREADS = 1024

TRAIN_DESCRIPTION = """\
Train a small LeNet-style CNN (--model cnn, with SGD) or a small residual network
with BatchNorm and global average pooling (--model resnet, with AdamW) on
handwritten digits and report its test accuracy.

By default the data are the 1,797 8x8 digits that ship with scikit-learn
(pip install scikit-learn); --data IMAGES LABELS takes IDX files instead
(e.g. MNIST, gzip-compressed or not). 20% of the samples are held out for
testing. Writes the model (model.npz, with the optimizer state) and the
loss/accuracy curves (curves.png, when matplotlib is installed) to --out.

A run that diverges (the loss becomes NaN or infinite; try a lower --lr) ends
with exit code 3 and saves nothing; Ctrl-C ends it with exit code 130 and
saves nothing.
"""

BENCH_DESCRIPTION = """\
A quick benchmark of this installation: a few kernels (dense, convolution,
max pooling) and whole train_step / predict calls of small networks, timed
against the same computation written in NumPy and, when it is installed,
PyTorch CPU, with the same thread count for everyone. Every contender's result
is checked against NumPy's before it is timed. Times are medians; ratios below
1 mean cdl is faster. The full suite (more cases, ceilings, charts) is
bench/run.py in a source checkout.
"""


def lenet(in_shape, num_classes):
    """The layers: conv 3x3 (c->16, p1), ReLU, pool 2; conv 3x3 (16->32, p1), ReLU, pool 2;
    Linear -> classes."""
    from . import Conv2d, Flatten, Linear, MaxPool2d, ReLU

    c, h, w = in_shape
    h2, w2 = h // 2 // 2, w // 2 // 2
    return [Conv2d(c, 16, 3, padding=1), ReLU(), MaxPool2d(2),
            Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
            Flatten(), Linear(32 * h2 * w2, num_classes)]


def _count(n, noun):
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _split(n, test_fraction, seed):
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def _plot(history, path):
    """curves.png from a History with at least one finished epoch; False if matplotlib is
    missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import MaxNLocator
    h = history.history
    epochs = np.arange(1, len(h["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        # markers: one epoch is a single point, which a line alone does not show
        ax.plot(epochs, h[key], marker="o", label="train")
        if f"val_{key}" in h:
            ax.plot(epochs, h[f"val_{key}"], marker="o", label="test")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch"), ax.set_ylabel(key), ax.legend(), ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class _Stop(Exception):
    """End the command with ``code`` after printing ``message`` to stderr (``agreed``:
    every rank of a distributed run stops with it, so rank 0 alone says it)."""

    def __init__(self, message, code, agreed=False):
        super().__init__(message)
        self.code = code
        self.agreed = agreed


def _check_train_args(args):
    """Everything that can be checked before work starts; raises _Stop(..., 2)."""
    def bad(msg):
        return _Stop(f"cdl train: error: {msg}", EXIT_USAGE)

    if args.data:
        for path in args.data:
            if not os.path.isfile(path):
                raise bad(f"--data: {path}: no such file")
    elif importlib.util.find_spec("sklearn") is None:
        raise bad("the default data (scikit-learn's digits) needs scikit-learn: "
                  "pip install scikit-learn  (or pass --data IMAGES LABELS)")
    if args.model == "resnet" and args.momentum is not None:
        raise bad("--momentum: the resnet model trains with AdamW, which has no momentum "
                  "setting (--momentum is for --model cnn)")
    if not args.out:    # abspath("") would be the current folder, and makedirs("") fails
        raise bad("--out: expected a folder name, got an empty string")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise bad(f"--out: {args.out} exists and is not a folder")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise bad(f"--out: cannot create {args.out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise bad(f"--out: cannot write to {parent}")
    if os.path.islink(args.out) and not os.path.exists(out):
        raise bad(f"--out: {args.out} is a symbolic link to nothing")
    for name in ("model.npz", "curves.png"):     # written at the end: not after training
        inside = os.path.join(out, name)
        if os.path.isdir(inside):
            raise bad(f"--out: {os.path.join(args.out, name)} is a folder")
        if os.path.exists(inside) and not os.access(inside, os.W_OK):
            raise bad(f"--out: cannot write {os.path.join(args.out, name)}")


def train(args):
    _check_train_args(args)
    import cdl
    from cdl import datasets

    if args.threads is not None:
        cdl.set_num_threads(args.threads)
    comm = _distributed() if args.distributed else None
    if args.data:
        x, y = datasets.load_idx_dataset(*args.data)
        source = f"{args.data[0]} ({_count(x.shape[0], 'image')})"
    else:
        x, y = datasets.load_digits()
        source = "scikit-learn digits (1,797 8x8 images)"
    if x.shape[0] < 2:
        raise _Stop(f"cdl train: error: {source}: need at least 2 samples", EXIT_USAGE)
    num_classes = int(y.max()) + 1
    distinct = len(np.unique(y))
    if num_classes > max(2 * distinct, distinct + 100):
        # (one stray label would size the output layer, and its memory, by itself)
        raise _Stop(f"cdl train: error: {args.data[1] if args.data else 'labels'}: the labels "
                    f"must be class indices 0..C-1, but {distinct} distinct values go up to "
                    f"{num_classes - 1} (a model of {num_classes} outputs); relabel them",
                    EXIT_USAGE)
    model = _checked_model(args, x.shape[1:], num_classes, source)
    train_idx, test_idx = _split(x.shape[0], 0.2, args.seed)
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]
    print(f"data: {source}; {len(train_idx)} for training, {len(test_idx)} held out for testing")

    if args.model == "resnet":
        lr = 0.003 if args.lr is None else args.lr
        opt = cdl.AdamW(model, lr=lr)
    else:
        lr = 0.05 if args.lr is None else args.lr
        opt = cdl.SGD(model, lr=lr, momentum=0.9 if args.momentum is None else args.momentum)
    if comm is not None:
        from .distributed import DistributedOptimizer
        opt = DistributedOptimizer(opt, comm)  # threads per rank unless --threads
        print(f"distributed: {comm.Get_size()} ranks x {cdl.get_num_threads()} threads")
    model.summary()
    loss = cdl.SoftmaxCrossEntropy()
    t0 = time.perf_counter()
    # fit reports a diverging loss as a RuntimeWarning and in history.stop_reason; the
    # command reports it once, as its error, instead of also printing the warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        history = model.fit(x_train, y_train, loss, opt, epochs=args.epochs,
                            batch_size=args.batch_size, validation_data=(x_test, y_test),
                            callbacks=[cdl.CosineLR(args.epochs)], verbose=1)
    for w in caught:
        if not (history.stop_reason and str(w.message) == history.stop_reason):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    seconds = time.perf_counter() - t0
    if history.stop_reason:
        # (fit warns on rank 0 only; every rank has the reason)
        diverged = "interrupted (Ctrl-C)" not in history.stop_reason
        if diverged:
            raise _Stop(f"cdl train: error: training diverged, nothing was saved. "
                        f"{history.stop_reason} (--lr is {lr:g})", EXIT_DIVERGED, agreed=True)
        raise _Stop(f"cdl train: interrupted after {len(history.epochs)} finished epoch(s); "
                    f"nothing was saved", EXIT_INTERRUPTED, agreed=True)
    test_loss, test_acc = model.evaluate(x_test, y_test, loss)
    print(f"test accuracy: {test_acc * 100:.2f}%  (loss {test_loss:.4f}, "
          f"{_count(len(history.epochs), 'epoch')} in {seconds:.1f} s, "
          f"{_count(cdl.get_num_threads(), 'thread')})")

    if comm is not None and comm.Get_rank() != 0:
        return EXIT_OK  # the replicas are identical: rank 0 saves
    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "model.npz")
    model.save(model_path, optimizer=opt)
    print(f"saved model: {model_path}")
    png = os.path.join(args.out, "curves.png")
    if not history.history.get("loss"):
        print("skipped the curves plot: no finished epoch")
    elif _plot(history, png):
        print(f"saved curves: {png}")
    else:
        print("skipped the curves plot: matplotlib is not installed (pip install matplotlib)")
    return EXIT_OK


def _model(name, shape, num_classes, seed):
    """The network --model names, for images of ``shape`` (C, H, W)."""
    import cdl

    if name == "resnet":
        from .models import resnet8
        return resnet8(shape, num_classes, seed=seed)
    return cdl.Sequential(lenet(shape, num_classes), shape, seed=seed)


def _checked_model(args, shape, num_classes, source):
    """The model for the data; images too small for it stop the command with the
    smallest size it takes (found by building it, so it follows the layers)."""
    try:
        return _model(args.model, shape, num_classes, args.seed)
    except ValueError:
        c, h, w = shape
        side = next((s for s in range(1, 257)
                     if _builds(args.model, (c, s, s), num_classes)), None)
        if side is None or min(h, w) >= side:
            raise   # not the image size: the layer's own message says what
        raise _Stop(f"cdl train: error: --model {args.model} needs images of at least "
                    f"{side}x{side}, got {h}x{w} in {source}", EXIT_USAGE) from None


def _builds(name, shape, num_classes):
    try:
        _model(name, shape, num_classes, 0)
    except ValueError:
        return False
    return True


def _distributed():
    """COMM_WORLD for --distributed; ranks other than 0 print nothing to stdout."""
    try:
        from .distributed import world
        comm = world()
    except ImportError as exc:
        raise _Stop(f"cdl train: error: --distributed: {exc}", EXIT_USAGE) from None
    if comm.Get_rank() != 0:
        global _RANK
        _RANK = comm.Get_rank()
        sys.stdout = open(os.devnull, "w")
    return comm


def _check_bench_args(args):
    """--json is written after the whole benchmark: check now that it can be."""
    def bad(msg):
        return _Stop(f"cdl bench: error: --json: {msg}", EXIT_USAGE)

    if args.json is None:
        return
    if not args.json:
        raise bad("expected a file name, got an empty string")
    path = os.path.abspath(args.json)
    if os.path.isdir(path):
        raise bad(f"{args.json} is a folder")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        why = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise bad(f"cannot write {args.json}: {folder} {why}")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        raise bad(f"cannot write {args.json}: permission denied")


def bench(args):
    _check_bench_args(args)
    from . import _quickbench

    return _quickbench.main(threads=args.threads, repeats=args.repeats, torch=args.torch,
                            json_path=args.json)


def _int_in(lo, hi=None):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(
                f"must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}")
        return v
    return parse


def _float_in(lo, hi=None, lo_open=True, hi_open=True):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if v < lo or (lo_open and v == lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo:g}, "
                                             f"got {text}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi:g}, "
                                             f"got {text}")
        return v
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default. An option whose
    default is None says in its help what happens without it."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _version():
    from . import __version__
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            dist = f"distribution cdl-cpu {version('cdl-cpu')}"
        except PackageNotFoundError:
            dist = "not installed as a distribution"
    except ImportError:  # pragma: no cover - Python < 3.8
        dist = ""
    py = ".".join(map(str, sys.version_info[:3]))
    return f"cdl {__version__} ({dist}; Python {py}; {os.path.dirname(os.path.abspath(__file__))})"


def build_parser():
    p = argparse.ArgumentParser(
        prog="cdl", formatter_class=_HelpFormatter,
        description="cdl: fast CPU deep-learning layers (typed Cython + OpenMP kernels).",
        epilog="Run 'cdl COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=_version(),
                   help="print the version, the distribution and where cdl is installed")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a small CNN on handwritten digits",
                       description=TRAIN_DESCRIPTION, formatter_class=_HelpFormatter)
    t.add_argument("--epochs", type=_int_in(1), default=15, help="passes over the training data")
    t.add_argument("--batch-size", type=_int_in(1), default=32, help="samples per SGD step")
    t.add_argument("--model", choices=("cnn", "resnet"), default="cnn",
                   help="cnn: conv-ReLU-pool x2 + Linear, trained with SGD; resnet: ResNet-8 "
                        "(conv-BN-ReLU stem, three residual blocks, global average pooling), "
                        "trained with AdamW")
    t.add_argument("--lr", type=_float_in(0.0), default=None,
                   help="learning rate, the start of a cosine schedule to 0 (default: 0.05 "
                        "for cnn, 0.003 for resnet)")
    t.add_argument("--momentum", type=_float_in(0.0, 1.0, lo_open=False), default=None,
                   help="SGD momentum, in [0, 1) (cnn only; default 0.9)")
    t.add_argument("--threads", type=_int_in(1, MAX_THREADS), default=None,
                   help="threads for the kernels (default: OMP_NUM_THREADS, else the usable "
                        "cores)")
    t.add_argument("--data", nargs=2, metavar=("IMAGES", "LABELS"), default=None,
                   help="IDX image and label files, gzip-compressed or not (default: "
                        "scikit-learn's 8x8 digits)")
    t.add_argument("--out", default="cdl-out", help="folder for model.npz and curves.png")
    t.add_argument("--seed", type=_int_in(0), default=0,
                   help="seed of the weights, the shuffling and the train/test split")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel training over MPI, one process per rank: "
                        "mpiexec -n 2 cdl train --distributed (needs pip install "
                        "cdl-cpu[mpi]); --batch-size is the global batch, threads per rank "
                        "default to the usable cores / ranks on the node, rank 0 prints "
                        "and saves")
    t.set_defaults(run=train)

    b = sub.add_parser("bench", help="quick benchmark against NumPy (and PyTorch)",
                       description=BENCH_DESCRIPTION, formatter_class=_HelpFormatter)
    b.add_argument("--threads", type=_int_in(1, MAX_THREADS), default=None,
                   help="threads for every contender (default: cdl's default, "
                        "OMP_NUM_THREADS or the usable cores)")
    b.add_argument("--repeats", type=_int_in(3, 1000), default=7,
                   help="timed samples per case and contender (the median is shown)")
    b.add_argument("--no-torch", dest="torch", action="store_false",
                   help="leave PyTorch out even when it is installed")
    b.add_argument("--json", metavar="PATH", default=None,
                   help="also write the results as JSON to PATH (default: no file)")
    b.set_defaults(run=bench)
    return p


def main(argv=None):
    """Run the ``cdl`` command with ``argv`` (default: sys.argv[1:]); returns the exit code."""
    cmd = "cdl"
    try:
        args = build_parser().parse_args(argv)
        cmd = f"cdl {args.command}"
        return args.run(args)
    except _Stop as stop:
        _say(stop, stop.agreed)
        return stop.code
    except KeyboardInterrupt:
        _say(f"\n{cmd}: interrupted (Ctrl-C); nothing was saved", agreed=True)
        return EXIT_INTERRUPTED
    except (ImportError, ValueError, TypeError, OSError) as exc:
        _say(f"{cmd}: error: {exc}")
        return EXIT_USAGE


def _say(message, agreed=False):
    """An error to stderr: on a distributed run's other ranks only one of their own
    (prefixed with the rank), not one every rank stops with."""
    if _RANK is not None:
        if agreed:
            return
        message = f"rank {_RANK}: {message}"
    print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
