"""A learning-rate search on Dask futures: one cdl model trained per learning rate, in
parallel on the workers of a LocalCluster (or of any Dask cluster: pass its scheduler's
address), the best reported.

    pip install cdl-cpu[dask,data]
    python examples/dask_search.py                       # a LocalCluster of 2 processes
    python examples/dask_search.py --scheduler tcp://host:8786 --epochs 10
"""
import argparse

import numpy as np

import cdl
import cdl.dask


def digits_split(seed=0):
    x, y = cdl.datasets.load_digits()
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = len(x) // 5
    return (x[order[n_val:]], y[order[n_val:]]), (x[order[:n_val]], y[order[:n_val]])


def run(client, learning_rates=(0.3, 0.1, 0.03, 0.01, 0.003), epochs=3, data=None,
        seed=0, verbose=True):
    """Search ``learning_rates`` for SGD (momentum 0.9) on the digits CNN of ``cdl train``;
    returns the results best first (see cdl.dask.search)."""
    from cdl.cli import lenet

    (x, y), (xv, yv) = data or digits_split(seed)
    model = cdl.Sequential(lenet(x.shape[1:], 10), x.shape[1:], seed=seed)
    results = cdl.dask.search(model, x, y, cdl.SoftmaxCrossEntropy(), learning_rates,
                              optimizer="SGD", optimizer_kwargs={"momentum": 0.9},
                              epochs=epochs, batch_size=32, validation_data=(xv, yv),
                              client=client)
    if verbose:
        print(f"{'lr':>8}  {'val_loss':>9}  {'val_accuracy':>12}")
        for r in sorted(results, key=lambda r: -r["lr"]):
            h = r["history"]
            acc = h["val_accuracy"][-1] if h.get("val_accuracy") else float("nan")
            print(f"{r['lr']:>8g}  {r['score']:>9.4f}  {acc:>12.4f}")
        best = results[0]
        print(f"best: lr={best['lr']:g}  val_loss {best['score']:.4f}  "
              f"val_accuracy {best['history']['val_accuracy'][-1]:.4f}")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheduler", default=None, help="a Dask scheduler's address "
                   "(default: a LocalCluster of 2 single-threaded worker processes)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, nargs="+", default=[0.3, 0.1, 0.03, 0.01, 0.003])
    args = p.parse_args(argv)
    from distributed import Client, LocalCluster

    if args.scheduler:
        with Client(args.scheduler) as client:
            return run(client, args.lr, args.epochs)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        return run(client, args.lr, args.epochs)


if __name__ == "__main__":
    main()
