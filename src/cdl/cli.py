"""``cdl train``: train a small LeNet-style CNN on handwritten digits.

By default the 1,797 8x8 digits from scikit-learn; ``--data IMAGES LABELS`` takes
IDX files (e.g. MNIST). 20% of the samples are held out for testing. Writes the
model (``model.npz``) and loss/accuracy curves (``curves.png``, if matplotlib
is installed) to ``--out``.
"""
import argparse
import os
import sys
import time

import numpy as np


def lenet(in_shape, num_classes):
    """conv 3x3 (c→16, p1), ReLU, pool 2; conv 3x3 (16→32, p1), ReLU, pool 2; Linear → classes."""
    from . import Conv2d, Flatten, Linear, MaxPool2d, ReLU

    c, h, w = in_shape
    h2, w2 = h // 2 // 2, w // 2 // 2
    return [Conv2d(c, 16, 3, padding=1), ReLU(), MaxPool2d(2),
            Conv2d(16, 32, 3, padding=1), ReLU(), MaxPool2d(2),
            Flatten(), Linear(32 * h2 * w2, num_classes)]


def _split(n, test_fraction, seed):
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return order[n_test:], order[:n_test]


def _plot(history, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    h = history.history
    epochs = np.arange(1, len(h.get("loss", [])) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, h["loss"], label="train")
    if "val_loss" in h:
        a.plot(epochs, h["val_loss"], label="test")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend(), a.set_title("loss")
    b.plot(epochs, h["accuracy"], label="train")
    if "val_accuracy" in h:
        b.plot(epochs, h["val_accuracy"], label="test")
    b.set_xlabel("epoch"), b.set_ylabel("accuracy"), b.legend(), b.set_title("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def train(args):
    import cdl
    from cdl import datasets

    if args.threads is not None:
        cdl.set_num_threads(args.threads)
    if args.data:
        x, y = datasets.load_idx_dataset(*args.data)
        source = f"{args.data[0]} ({x.shape[0]} images)"
    else:
        x, y = datasets.load_digits()
        source = "scikit-learn digits (1,797 8x8 images)"
    num_classes = int(y.max()) + 1
    train_idx, test_idx = _split(x.shape[0], 0.2, args.seed)
    x_train, y_train = x[train_idx], y[train_idx]
    x_test, y_test = x[test_idx], y[test_idx]
    print(f"data: {source}; {len(train_idx)} for training, {len(test_idx)} held out for testing")

    model = cdl.Sequential(lenet(x.shape[1:], num_classes), x.shape[1:], seed=args.seed)
    model.summary()
    loss = cdl.SoftmaxCrossEntropy()
    opt = cdl.SGD(model, lr=args.lr, momentum=args.momentum)
    t0 = time.perf_counter()
    history = model.fit(x_train, y_train, loss, opt, epochs=args.epochs,
                        batch_size=args.batch_size, validation_data=(x_test, y_test),
                        callbacks=[cdl.CosineLR(args.epochs)], verbose=1)
    seconds = time.perf_counter() - t0
    if history.stop_reason:
        print(history.stop_reason, file=sys.stderr)
    test_loss, test_acc = model.evaluate(x_test, y_test, loss)
    print(f"test accuracy: {test_acc * 100:.2f}%  (loss {test_loss:.4f}, "
          f"{len(history.epochs)} epochs in {seconds:.1f} s, {cdl.get_num_threads()} threads)")

    os.makedirs(args.out, exist_ok=True)
    model_path = os.path.join(args.out, "model.npz")
    model.save(model_path, optimizer=opt)
    print(f"saved model: {model_path}")
    png = os.path.join(args.out, "curves.png")
    if _plot(history, png):
        print(f"saved curves: {png}")
    else:
        print("skipped the curves plot: matplotlib is not installed "
              "(pip install 'cdl[plot]')")
    return 0 if not history.stop_reason else 1


def _positive(kind):
    def parse(text):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def build_parser():
    p = argparse.ArgumentParser(prog="cdl", description="cdl: fast CPU deep-learning layers")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a small CNN on handwritten digits",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--epochs", type=_positive(int), default=15)
    t.add_argument("--batch-size", type=_positive(int), default=32)
    t.add_argument("--lr", type=_positive(float), default=0.05)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--threads", type=_positive(int), default=None,
                   help="threads for the kernels (default: usable cores)")
    t.add_argument("--data", nargs=2, metavar=("IMAGES", "LABELS"),
                   help="IDX image and label files (gzip or not) instead of the digits")
    t.add_argument("--out", default="cdl-out", help="folder for model.npz and curves.png")
    t.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train(args)
    except (ImportError, ValueError, OSError) as exc:
        print(f"cdl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
