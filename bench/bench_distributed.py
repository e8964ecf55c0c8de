"""Data-parallel training on one machine: 1 process x 2 threads against 2 MPI ranks x 1
thread, and the cost of the gradient exchange.

    python bench/bench_distributed.py                 # 3 interleaved rounds (a few minutes)
    python bench/bench_distributed.py --rounds 1 --quick

For each network (MLP 784-256-128-10, LeNet-5, a CIFAR-style CNN, ResNet-8) and global
batch (64, 256), a round runs the single process (cdl.SGD, 2 threads) and then
``mpiexec -n 2`` (cdl.distributed.DistributedOptimizer, each rank 1 thread and half of
the batch); rounds alternate so that both see the same load. Reported: the median
step time over rounds and samples, throughput relative to the single process, and the
communication share (time inside the gradient hook: copy and scale, the exchange,
waiting for the other rank, the rank-ordered sum and the finiteness check, over the
step). The exchange is also timed alone for each network's flat buffers: MPI's
Allreduce, a bare Allgather, and the DistributedOptimizer's hook with each algorithm.
Results: bench/results/distributed.json and .md, with the command, the machine and
its load (1-minute load average before and after, and the CPU time other processes
took during the run).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NETS = ("MLP", "LeNet-5", "CIFAR-CNN", "ResNet-8")
BATCHES = (64, 256)


def build(name, seed=0):
    import cdl
    from cdl import models

    if name == "MLP":
        return cdl.Sequential([cdl.Linear(784, 256), cdl.ReLU(), cdl.Linear(256, 128),
                               cdl.ReLU(), cdl.Linear(128, 10)], (784,), seed=seed)
    if name == "LeNet-5":
        return models.lenet5(seed=seed)
    if name == "CIFAR-CNN":
        return cdl.Sequential([cdl.Conv2d(3, 32, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                               cdl.Conv2d(32, 64, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                               cdl.Flatten(), cdl.Linear(4096, 10)], (3, 32, 32), seed=seed)
    if name == "ResNet-8":
        return models.resnet8(seed=seed)
    raise ValueError(name)


def batch(model, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + model.input_shape).astype(np.float32)
    return x, rng.integers(0, 10, n).astype(np.int64)


def _steps_for(step, target):
    """How many calls make one sample of about ``target`` seconds."""
    t = time.perf_counter()
    step()
    dt = max(time.perf_counter() - t, 1e-6)
    return max(1, int(target / dt))


def _time(step, samples, target):
    for _ in range(2):
        step()
    k = _steps_for(step, target)
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(k):
            step()
        times.append((time.perf_counter() - t) / k)
    return times, k


def run_single(nets, batches, samples, target, shards):
    import cdl

    cdl.set_num_threads(2)
    loss = cdl.SoftmaxCrossEntropy()
    out = []
    for name in nets:
        for b in batches:
            model = build(name)
            opt = cdl.SGD(model, lr=1e-3)
            x, y = batch(model, b)
            times, k = _time(lambda: model.train_step(x, y, loss, opt), samples, target)
            row = {"net": name, "batch": b, "step_s": times, "steps_per_sample": k}
            if shards:
                # the fixed-gradient-shards option in one process (MPI's singleton init)
                from cdl import distributed as dist
                model = build(name)
                dopt = dist.DistributedOptimizer(cdl.SGD(model, lr=1e-3), shards=shards)
                row["shards_step_s"], _ = _time(lambda: model.train_step(x, y, loss, dopt),
                                                samples, target)
            out.append(row)
    return out


def run_ranks(nets, batches, samples, target, exchange_repeats):
    """Under mpiexec -n 2: step times with the DistributedOptimizer, and the exchange."""
    import cdl
    from cdl import distributed as dist

    comm = dist.world()
    rank, size = comm.Get_rank(), comm.Get_size()
    loss = cdl.SoftmaxCrossEntropy()
    steps, exchange = [], []
    for name in nets:
        for b in batches:
            model = build(name)
            dopt = dist.DistributedOptimizer(cdl.SGD(model, lr=1e-3), comm)
            hook_time = [0.0]
            inner_hook = dopt.gradient_hook

            def timed_hook(value, n, threads=None, _inner=inner_hook, _acc=hook_time):
                t = time.perf_counter()
                r = _inner(value, n, threads)
                _acc[0] += time.perf_counter() - t
                return r
            dopt.gradient_hook = timed_hook
            x, y = batch(model, b)
            lo, hi = dist.batch_piece(0, b, rank, size)
            xs, ys = x[lo:hi], y[lo:hi]
            step = lambda: model.train_step(xs, ys, loss, dopt)  # noqa: E731
            for _ in range(2):
                step()
            k = comm.bcast(_steps_for(step, target), root=0)  # every rank steps once
            comm.Barrier()
            times, shares = [], []
            for _ in range(samples):
                comm.Barrier()
                hook_time[0] = 0.0
                t = time.perf_counter()
                for _ in range(k):
                    step()
                dt = (time.perf_counter() - t) / k
                times.append(dt)
                shares.append(hook_time[0] / k / dt)
            assert dopt.size == size
            steps.append({"net": name, "batch": b, "step_s": times, "comm_share": shares,
                          "steps_per_sample": k, "threads": cdl.get_num_threads(),
                          "params": int(model.parameter_buffer.size)})
        # the exchange alone, on this network's flat buffers
        model = build(name)
        P = model.parameter_buffer.size
        row = {"net": name, "floats": int(P)}
        send = np.ones(P, np.float32)
        recv = np.empty(P, np.float32)
        gath = np.empty(size * P, np.float32)
        from mpi4py import MPI
        cases = {"Allreduce": lambda: comm.Allreduce(send, recv, op=MPI.SUM),
                 "Allgather": lambda: comm.Allgather(send, gath)}
        for algorithm in ("allgather", "alltoall", "allreduce"):
            d = dist.DistributedOptimizer(cdl.SGD(model, lr=1e-3), comm, algorithm=algorithm)
            model.gradient_buffer[...] = 1.0
            cases[f"hook:{algorithm}"] = lambda d=d: d.gradient_hook(1.0, 32)
        for label, fn in cases.items():
            for _ in range(5):
                fn()
            vals = []
            for _ in range(exchange_repeats):
                comm.Barrier()
                t = time.perf_counter()
                for _ in range(20):
                    fn()
                vals.append((time.perf_counter() - t) / 20)
            row[label] = vals
        exchange.append(row)
    return steps, exchange


def _busy_cpu_seconds():
    """(CPU-seconds the whole machine has been busy, CPU-seconds of this process and its
    waited-for children), from /proc/stat and os.times()."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz     # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def median(xs):
    return statistics.median(xs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=5, help="timed samples per case and round")
    p.add_argument("--target", type=float, default=0.15, help="seconds per sample")
    p.add_argument("--quick", action="store_true", help="MLP and CIFAR-CNN only, 1 sample")
    p.add_argument("--nets", default=",".join(NETS))
    p.add_argument("--out", default=os.path.join(HERE, "results", "distributed"))
    p.add_argument("--mpiexec", default=None)
    p.add_argument("--shards", type=int, default=4,
                   help="also time DistributedOptimizer(shards=S) in the single process "
                        "(0: no)")
    p.add_argument("--worker", choices=("single", "ranks"), help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    nets = args.nets.split(",")
    if args.quick:
        nets, args.samples = ["MLP", "CIFAR-CNN"], 1
    if args.worker == "single":
        res = run_single(nets, BATCHES, args.samples, args.target, args.shards)
        with open(args.json, "w") as f:
            json.dump(res, f)
        return 0
    if args.worker == "ranks":
        steps, exchange = run_ranks(nets, BATCHES, args.samples, args.target, 5)
        from cdl.distributed import world
        if world().Get_rank() == 0:
            with open(args.json, "w") as f:
                json.dump({"steps": steps, "exchange": exchange}, f)
        return 0

    mpiexec = args.mpiexec or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    base = [sys.executable, os.path.abspath(__file__), "--nets", ",".join(nets),
            "--samples", str(args.samples), "--target", str(args.target),
            "--shards", str(args.shards)]
    load_before = os.getloadavg()
    busy0, t0 = _busy_cpu_seconds(), time.time()
    single, ranks, exchange = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("single", "ranks") if r % 2 == 0 else ("ranks", "single")
            for which in order:
                path = os.path.join(tmp, f"{which}-{r}.json")
                cmd = base + ["--worker", which, "--json", path]
                if which == "ranks":
                    cmd = [mpiexec, "-n", "2"] + cmd
                subprocess.run(cmd, check=True, env=env)
                with open(path) as f:
                    res = json.load(f)
                if which == "single":
                    single.append(res)
                else:
                    ranks.append(res["steps"])
                    exchange.append(res["exchange"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    wall = time.time() - t0
    busy1 = _busy_cpu_seconds()
    load_after = os.getloadavg()

    rows = []
    for name in nets:
        for b in BATCHES:
            s = [t for rr in single for c in rr if c["net"] == name and c["batch"] == b
                 for t in c["step_s"]]
            d = [c for rr in ranks for c in rr if c["net"] == name and c["batch"] == b]
            dt = [t for c in d for t in c["step_s"]]
            sh = [x for c in d for x in c["comm_share"]]
            sh_s = [t for rr in single for c in rr if c["net"] == name and c["batch"] == b
                    for t in c.get("shards_step_s", [])]
            rows.append({"net": name, "batch": b, "single_ms": 1e3 * median(s),
                         "single_shards_ms": 1e3 * median(sh_s) if sh_s else None,
                         "single_best_ms": 1e3 * min(s), "ranks_best_ms": 1e3 * min(dt),
                         "best_ratio": min(s) / min(dt),
                         "single_shards_best_ms": 1e3 * min(sh_s) if sh_s else None,
                         "ranks_ms": 1e3 * median(dt), "ratio": median(s) / median(dt),
                         "comm_share": median(sh), "params": d[0]["params"],
                         "single_samples_ms": [1e3 * t for t in s],
                         "ranks_samples_ms": [1e3 * t for t in dt]})
    ex_rows = []
    for name in nets:
        rs = [row for rr in exchange for row in rr if row["net"] == name]
        labels = [k for k in rs[0] if k not in ("net", "floats")]
        ex_rows.append({"net": name, "floats": rs[0]["floats"],
                        **{k: 1e6 * median([v for row in rs for v in row[k]]) for k in labels}})
    import cdl
    meta = {
        "command": "python bench/bench_distributed.py " + " ".join(argv or sys.argv[1:]),
        "shards": args.shards,
        "machine": {"cpu": cdl._config._cpu_model(), "cores": os.cpu_count(),
                    "usable_cores": cdl._config.usable_cores(), "python": platform.python_version(),
                    "cdl": cdl.__version__, "mpi": _mpi_version()},
        "load": {"loadavg_1min_before": load_before[0], "loadavg_1min_after": load_after[0],
                 "others_cpu_seconds_per_second": None if busy0 is None or busy1 is None
                 else max(0.0, (busy1[0] - busy0[0]) - (busy1[1] - busy0[1])) / wall,
                 "wall_s": wall},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "steps": rows, "exchange": ex_rows}, f, indent=1)
    md = render(meta, rows, ex_rows)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


def _mpi_version():
    try:
        from mpi4py import MPI
        return MPI.Get_library_version().splitlines()[0].strip()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({exc})"


def render(meta, rows, ex_rows):
    load = meta["load"]
    others = load["others_cpu_seconds_per_second"]
    lines = [
        "# Data-parallel training: 1 process x 2 threads vs 2 MPI ranks x 1 thread", "",
        f"`{meta['command']}` on {meta['machine']['cpu']} ({meta['machine']['usable_cores']} "
        f"usable cores), {meta['machine']['mpi']}, {meta['date']}.", "",
        f"Load: 1-minute load average {load['loadavg_1min_before']:.2f} before, "
        f"{load['loadavg_1min_after']:.2f} after"
        + (f"; other processes used {others:.2f} CPU-seconds per second during the run"
           if others is not None else "") + ". Medians over interleaved rounds.", "",
        "Step times in ms, median (best) of every timed sample; throughput ratio = 1-process "
        "time / 2-rank time (above 1: the ranks are faster), from the medians (and from the "
        "best samples, the least disturbed by other processes on a shared machine).", "",
        "| network | params | global batch | 1 proc x 2 thr | 2 ranks x 1 thr | "
        "2-rank / 1-proc throughput | communication share |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['net']} | {r['params']:,} | {r['batch']} | {r['single_ms']:.2f} "
                     f"({r['single_best_ms']:.2f}) | {r['ranks_ms']:.2f} "
                     f"({r['ranks_best_ms']:.2f}) | {r['ratio']:.2f}x ({r['best_ratio']:.2f}x) "
                     f"| {100 * r['comm_share']:.0f}% |")
    if meta.get("shards") and rows[0]["single_shards_ms"] is not None:
        S = meta["shards"]
        lines += ["", f"The fixed-gradient-shards option (`shards={S}`, bit-identical on 1, 2, "
                  f"4, ... {S} ranks) in one process with 2 threads: the batch runs as {S} "
                  f"micro-batches, summed over a fixed tree:", "",
                  f"| network | global batch | plain step (ms) | shards={S} step (ms) | "
                  f"cost, medians (best) |",
                  "|---|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['net']} | {r['batch']} | {r['single_ms']:.2f} "
                         f"({r['single_best_ms']:.2f}) | {r['single_shards_ms']:.2f} "
                         f"({r['single_shards_best_ms']:.2f}) | "
                         f"{r['single_shards_ms'] / r['single_ms']:.2f}x "
                         f"({r['single_shards_best_ms'] / r['single_best_ms']:.2f}x) |")
    labels = [k for k in ex_rows[0] if k not in ("net", "floats")]
    lines += ["", "The exchange alone, 2 ranks (µs per call; `hook:*` is the "
              "DistributedOptimizer's whole gradient hook: copy and scale, exchange, "
              "rank-ordered sum, division, finiteness check):", "",
              "| network | floats | " + " | ".join(labels) + " |",
              "|---|---:|" + "---:|" * len(labels)]
    for r in ex_rows:
        lines.append(f"| {r['net']} | {r['floats']:,} | "
                     + " | ".join(f"{r[k]:.0f}" for k in labels) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
