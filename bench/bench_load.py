"""cdl beside other work: train_step and predict while other processes compete for the
cores, and right after a NumPy matmul in the same process.

    python bench/bench_load.py                 # everything (about 10-20 min on a loaded 2-core VM)
    python bench/bench_load.py --quick         # 40 calls, batch 64, 0 and 2 busy processes
    python bench/bench_load.py --only lenet,matmul --busy 0,1

Rows: MLP 784-256-128-10, LeNet-5 and the CIFAR-style CNN (``train_step`` and ``predict``
at batch 1 and 64), and ``cdl train``'s workload (the digits CNN of ``cdl train`` at its
batch size 32: ``train_step`` calls on shuffled batches, and ``fit`` over whole epochs).
Conditions: 0, 1 and 2 competing CPU-bound processes (``python -c "while True: pass"``,
started before the condition and killed after it), and a LeNet-5 / MLP ``train_step`` at
batch 64 each right after a 512x512 float32 NumPy matmul in the same process, with no
pause and with a 0.2 s pause in between.

Contenders, interleaved in one process (each condition runs its rounds of blocks in turn,
the order rotating, with a short pause between blocks so that one contender's spinning
threads do not land on the next): ``cdl`` (its defaults: all usable cores, adaptive
thread count), ``cdl 1 thread``, ``cdl fixed`` (the same thread count with the
adaptation off: cdl before this change) and ``PyTorch`` (``torch.set_num_threads`` the
same count, same weights). Each reports the median, p99 and total of its calls. Each
block starts with one more call, reported apart (``block's 1st call``): it comes after
the pause, with cold caches and sleeping threads, where a training loop's steps run back
to back; the "after a pause" condition measures that case on every call. Every
condition records the machine's load while it ran: ``os.getloadavg()`` and the runnable
count (field 4 of /proc/loadavg) before every block. Results go to
``bench/results/load.json`` and ``.md`` (``--out``).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import numpy_ref as nref  # noqa: E402
from run import add_malloc_argument, apply_malloc, build_cdl_net  # noqa: E402

import cdl  # noqa: E402
from cdl import _config  # noqa: E402

try:
    import torch
    import torch_ref as tref
except ImportError:  # PyTorch is optional: its column says n/a
    torch = tref = None

LR = 0.01
DIGITS_SPEC = ((1, 8, 8), [("conv", 1, 16, 3, 1, 1), ("relu",), ("pool", 2),
                           ("conv", 16, 32, 3, 1, 1), ("relu",), ("pool", 2), ("flatten",),
                           ("linear", 128, 10)])
NETS = {"mlp": "MLP", "lenet": "LeNet-5", "cifar": "CIFAR-CNN"}


# ------------------------------------------------------------------------------ load
def runnable():
    """Runnable tasks on the machine now (field 4 of /proc/loadavg), or None."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def spawn_busy(k):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    time.sleep(0.3 if k else 0.0)
    return procs


def stop_busy(procs):
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


# ------------------------------------------------------------------------------ models
def batches(input_shape, n, count, seed):
    """``count`` different batches of n (digits: shuffled real data, else random)."""
    rng = np.random.default_rng(seed)
    if input_shape == DIGITS_SPEC[0]:
        x, y = cdl.datasets.load_digits()
        x = x.reshape((-1,) + input_shape).astype(np.float32)
        out = []
        for _ in range(count):
            idx = rng.choice(x.shape[0], n, replace=False)
            out.append((np.ascontiguousarray(x[idx]), y[idx].astype(np.int64)))
        return out
    return [(rng.standard_normal((n,) + input_shape).astype(np.float32),
             rng.integers(0, 10, n).astype(np.int64)) for _ in range(count)]


class Case:
    """One row: a callable per contender, each doing one call on batch i % len."""

    def __init__(self, name, op, input_shape, spec, n, threads, torch_on, seed=0,
                 control=False):
        self.name, self.op, self.n = name, op, n
        params = nref.init_params(spec, seed=0)
        data = batches(input_shape, n, 8, seed)
        self.calls = {}
        settings = {"cdl": dict(n=threads, adaptive=True),
                    "cdl 1 thread": dict(n=1, adaptive=False),
                    "cdl fixed": dict(n=threads, adaptive=False)}
        if control:  # the same as "cdl fixed": their ratio is the measurement's noise
            settings["cdl fixed (control)"] = dict(n=threads, adaptive=False)
        for label, how in settings.items():
            model = build_cdl_net(spec, input_shape, params)[0]
            loss = cdl.SoftmaxCrossEntropy()
            opt = cdl.SGD(model, lr=LR)
            self.calls[label] = (how, self._cdl_call(model, loss, opt, data))
        if torch_on:
            net = tref.TorchNet(spec, params, LR)
            tdata = [(tref.t(x), tref.t(y)) for x, y in data]
            if op == "predict":
                def call(i, net=net, d=tdata):
                    net.predict(d[i % len(d)][0])
            else:
                def call(i, net=net, d=tdata):
                    x, y = d[i % len(d)]
                    net.train_step(x, y)
            self.calls["PyTorch"] = (None, call)

    def _cdl_call(self, model, loss, opt, data):
        if self.op == "predict":
            def call(i):
                model.predict(data[i % len(data)][0])
        else:
            def call(i):
                x, y = data[i % len(data)]
                model.train_step(x, y, loss, opt)
        return call


def run_block(how, call, calls, pre, budget_s, threads, first=None):
    """``calls`` timed calls of one contender; ``pre``: None, "matmul" or "pause".

    With ``first`` (a list), the block starts with one more call, timed into ``first``
    and not into the result: after the pause between blocks it finds cold caches and
    sleeping threads, which a training loop's back-to-back steps do not."""
    times = []
    a = pre_matrix()
    if how is None:
        torch.set_num_threads(threads)
        ctx = None
    else:
        ctx = cdl.threads(how["n"], adaptive=how["adaptive"])
        ctx.__enter__()
    try:
        if first is not None:
            t0 = time.perf_counter()
            call(calls)
            first.append(time.perf_counter() - t0)
        start = time.perf_counter()
        for i in range(calls):
            if pre is not None:
                a @ a
                if pre == "pause":
                    time.sleep(0.2)
            t0 = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start > budget_s and i >= 4:
                break  # a collapsing contender: keep what it did, say how many
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return times


_MATRIX = []


def pre_matrix():
    if not _MATRIX:
        _MATRIX.append(np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32))
    return _MATRIX[0]


def stats(times, calls):
    t = np.sort(np.asarray(times)) * 1e3
    if t.size == 0:
        return {"calls": 0}
    out = {"calls": int(t.size), "median_ms": float(np.median(t)),
           "p99_ms": float(t[min(t.size - 1, int(np.ceil(0.99 * t.size)) - 1)]),
           "total_ms": float(t.sum()), "max_ms": float(t[-1])}
    if t.size < calls:  # stopped early: the total for `calls` calls, extrapolated
        out["total_ms_extrapolated"] = float(t.mean() * calls)
    return out


def measure(case, calls, rounds, pre, budget_s, threads, pause_s):
    """Interleaved rounds of blocks; returns {contender: stats} and the load seen."""
    labels = list(case.calls)
    times = {k: [] for k in labels}
    firsts = {k: [] for k in labels}
    seen = []
    per_block = max(1, calls // rounds)
    for label in labels:  # warm-up: plans, buffers, thread pools
        how, call = case.calls[label]
        run_block(how, call, 3, None, budget_s, threads)
    prev = None
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            how, call = case.calls[label]
            # PyTorch's and a fixed cdl's idle threads spin for milliseconds (tens under
            # load) after their calls: a long pause after them, a short one otherwise
            time.sleep(pause_s if prev in ("cdl fixed", "PyTorch") else min(pause_s, 0.05))
            prev = label
            seen.append(runnable())
            before = dict(_config.thread_status()) if label == "cdl" else None
            got = run_block(how, call, per_block, pre, budget_s / rounds, threads,
                            firsts[label] if pre is None else None)
            times[label] += got
            if before is not None:
                after = _config.thread_status()
                times.setdefault("_reduced", []).append(
                    (after["reduced_calls"] - before["reduced_calls"],
                     after["calls"] - before["calls"]))
    reduced = times.pop("_reduced", [])
    res = {k: stats(v, per_block * rounds) for k, v in times.items()}
    for k, v in firsts.items():
        if v:
            res[k]["first_median_ms"] = float(np.median(v)) * 1e3
    if reduced:
        red, tot = map(sum, zip(*reduced))
        res["cdl"]["calls_on_fewer_threads"] = f"{red}/{tot}"
    return res, seen


# ------------------------------------------------------------------------------ fit
def fit_case(threads, epochs, rounds, budget_s):
    """cdl train's fit (digits CNN, SGD momentum 0.9, batch 32) over whole epochs."""
    x, y = cdl.datasets.load_digits()
    x = x.reshape((-1,) + DIGITS_SPEC[0]).astype(np.float32)
    params = nref.init_params(DIGITS_SPEC[1], seed=0)
    settings = {"cdl": dict(n=threads, adaptive=True), "cdl 1 thread": dict(n=1, adaptive=False),
                "cdl fixed": dict(n=threads, adaptive=False)}
    out = {k: [] for k in settings}
    seen = []
    for r in range(rounds):
        labels = list(settings)
        for label in labels[r % 3:] + labels[:r % 3]:
            time.sleep(0.25)
            seen.append(runnable())
            model = build_cdl_net(DIGITS_SPEC[1], DIGITS_SPEC[0], params)[0]
            opt = cdl.SGD(model, lr=0.05, momentum=0.9)
            with cdl.threads(**settings[label]):
                t0 = time.perf_counter()
                model.fit(x[:1437], y[:1437], cdl.SoftmaxCrossEntropy(), opt, epochs=epochs,
                          batch_size=32, verbose=0)
                out[label].append(time.perf_counter() - t0)
    return {k: {"runs": len(v), "median_s": float(np.median(v)), "all_s": v}
            for k, v in out.items()}, seen


# ------------------------------------------------------------------------------ report
def machine_info(threads):
    info = {"platform": platform.platform(), "python": sys.version.split()[0],
            "numpy": np.__version__, "cpus": os.cpu_count(), "threads": threads,
            "cdl": cdl.__version__, "torch": torch.__version__ if torch else None}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    cfg = _config.config()
    info["cdl_isa"] = cfg["isa"]
    info["env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "CDL_ADAPTIVE_THREADS",
                                              "GOMP_SPINCOUNT", "OMP_WAIT_POLICY",
                                              "OPENBLAS_THREAD_TIMEOUT") if k in os.environ}
    return info


TRAIN_ROWS = ("MLP", "LeNet-5", "CIFAR-CNN", "cdl train")


def total(s):
    """Total ms for the full count of calls (extrapolated when a contender was stopped)."""
    return s.get("total_ms_extrapolated", s["total_ms"])


def targets(doc):
    """The issue's targets, checked on this run's numbers."""
    out = []
    for cond in doc["conditions"]:
        if cond["kind"] == "busy" and cond["busy"] in (1, 2):
            for row in cond["rows"]:
                if row["op"] != "train_step" or not row["name"].startswith(TRAIN_ROWS):
                    continue
                r = row["results"]
                one, mine = r["cdl 1 thread"], r["cdl"]
                if not one.get("calls") or not mine.get("calls"):
                    continue
                ratio = total(mine) / total(one)
                tail = mine["p99_ms"] / mine["median_ms"]
                out.append({"target": f"{cond['busy']} busy: {row['name']} train_step total "
                                      f"<= 1.2x cdl 1 thread", "value": round(ratio, 3),
                            "ok": ratio <= 1.2})
                out.append({"target": f"{cond['busy']} busy: {row['name']} train_step "
                                      f"p99 <= 3x median", "value": round(tail, 3),
                            "ok": tail <= 3.0,
                            "one_thread": round(one["p99_ms"] / one["median_ms"], 3)})
        if cond["kind"] == "busy" and cond["busy"] == 0:
            for row in cond["rows"]:
                r = row["results"]
                mine, fixed = r["cdl"], r.get("cdl fixed", {})
                if mine.get("calls") and fixed.get("calls"):
                    ratio = mine["median_ms"] / fixed["median_ms"]
                    t = {"target": f"0 busy: {row['name']} {row['op']} median <= 1.05x "
                                   f"cdl fixed (adaptation off)",
                         "value": round(ratio, 3), "ok": ratio <= 1.05,
                         "quiet": cond.get("quiet", False)}
                    control = r.get("cdl fixed (control)", {})
                    if control.get("calls"):
                        t["control"] = round(control["median_ms"] / fixed["median_ms"], 3)
                    out.append(t)
    mm = {c["pre"]: c for c in doc["conditions"] if c["kind"] == "matmul"}
    if "matmul" in mm and "pause" in mm:
        for a, b in zip(mm["matmul"]["rows"], mm["pause"]["rows"]):
            ra, rb = a["results"]["cdl"], b["results"]["cdl"]
            if ra.get("calls") and rb.get("calls"):
                ratio = ra["median_ms"] / rb["median_ms"]
                out.append({"target": f"after a matmul: {a['name']} train_step median <= "
                                      f"1.3x after a 0.2 s pause", "value": round(ratio, 3),
                            "ok": ratio <= 1.3})
    return out


def _f(v, spec=".3g"):
    return "—" if v is None else format(v, spec)


def markdown(doc):
    m = doc["machine"]
    lines = ["# cdl beside other work (bench/bench_load.py)", "",
             f"Command: `{doc['command']}`  ",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; python {m['python']}, "
             f"numpy {m['numpy']}, torch {m['torch']}, cdl {m['cdl']} ({m['cdl_isa']}); "
             f"cdl threads {m['threads']}; env {m['env'] or '{}'}; "
             f"allocator: {m.get('malloc', 'default')}  ",
             f"Started {doc['started']}, took {doc['seconds']:.0f} s; load average "
             f"(1, 5, 15 min) at start {doc['loadavg_start']}, at end {doc['loadavg_end']}.", "",
             "Times in ms over the calls of each contender (interleaved in rounds). "
             "`total/1thr`: the contender's total over cdl's own 1-thread total under the same "
             "load. `runnable`: the machine's runnable-task count (field 4 of /proc/loadavg, "
             "including this benchmark's own threads and busy processes) read before each "
             "block. `cdl fixed` is cdl with the adaptation off (its previous behaviour). "
             "Each block starts with one more call, not counted in the others: `block's 1st "
             "call` is its median (after the pause between blocks: cold caches, sleeping "
             "threads). The timed calls are the back-to-back steps of a training loop. "
             "`cdl fixed (control)` (with `--control`) is `cdl fixed` again: its ratio to "
             "`cdl fixed` shows how far two identical contenders differ in this run.", ""]
    for cond in doc["conditions"]:
        if cond["kind"] == "busy":
            title = f"## {cond['busy']} competing busy process(es)"
        else:
            title = ("## right after a 512x512 NumPy matmul, no pause" if cond["pre"] == "matmul"
                     else "## after a 512x512 NumPy matmul and a 0.2 s pause")
        lines += [title, "",
                  f"Load average before {cond['loadavg_before']}, after {cond['loadavg_after']}; "
                  f"runnable counts seen: min {min(cond['runnable'], default='—')}, median "
                  f"{_f(float(np.median(cond['runnable'])) if cond['runnable'] else None)}, "
                  f"max {max(cond['runnable'], default='—')}.", "",
                  "| row | contender | calls | median | p99 | p99/median | total | total/1thr "
                  "| block's 1st call |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
        for row in cond["rows"]:
            r = row["results"]
            one = r.get("cdl 1 thread", {})
            one = total(one) if one.get("calls") else None
            for label, s in r.items():
                if not s.get("calls"):
                    continue
                star = "*" if "total_ms_extrapolated" in s else ""
                lines.append(f"| {row['name']} {row['op']} | {label} | {s['calls']}{star} | "
                             f"{_f(s['median_ms'])} | {_f(s['p99_ms'])} | "
                             f"{_f(s['p99_ms'] / s['median_ms'], '.2f')} | "
                             f"{_f(total(s), '.4g')} | "
                             f"{_f(total(s) / one if one else None, '.2f')} | "
                             f"{_f(s.get('first_median_ms'))} |")
        lines.append("")
    if doc.get("fit"):
        for cond in doc["fit"]:
            lines += [f"## `cdl train`'s fit, {cond['epochs']} epochs, {cond['busy']} busy "
                      f"process(es)", "",
                      f"Load average before {cond['loadavg_before']}, after "
                      f"{cond['loadavg_after']}; runnable counts seen {cond['runnable']}.", "",
                      "| contender | runs | median s | / 1 thread |", "|---|--:|--:|--:|"]
            one = cond["results"]["cdl 1 thread"]["median_s"]
            for label, s in cond["results"].items():
                lines.append(f"| {label} | {s['runs']} | {s['median_s']:.3f} | "
                             f"{s['median_s'] / one:.2f} |")
            lines.append("")
    lines += ["`*` a contender that collapsed was stopped after its time budget; its total is "
              "extrapolated to the full count of calls.", "", "## Targets (issue 12)", "",
              "| target | value | met | cdl 1 thread's p99/median | control / cdl fixed |",
              "|---|--:|---|--:|--:|"]
    for t in doc["targets"]:
        note = "" if t.get("quiet", True) else " (machine not quiet)"
        lines.append(f"| {t['target']} | {t['value']} | {'yes' if t['ok'] else 'no'}{note} | "
                     f"{t.get('one_thread', '')} | {t.get('control', '')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="timed calls per contender and row")
    p.add_argument("--rounds", type=int, default=10, help="interleaved blocks per contender")
    p.add_argument("--busy", default="0,1,2", help="competing busy processes, comma-separated")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--only", default="mlp,lenet,cifar,train,fit,matmul",
                   help="rows: mlp, lenet, cifar, train (cdl train's train_step), fit "
                        "(cdl train's fit), matmul (after a NumPy matmul)")
    p.add_argument("--ops", default="train_step,predict")
    p.add_argument("--fit-epochs", type=int, default=2)
    p.add_argument("--pause-calls", type=int, default=30,
                   help="calls after a matmul and a 0.2 s pause (each costs 0.2 s)")
    p.add_argument("--budget", type=float, default=5.0,
                   help="seconds a contender may spend on one row before it is stopped")
    p.add_argument("--pause", type=float, default=0.25,
                   help="seconds between blocks (lets spinning threads fall asleep)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--control", action="store_true",
                   help="a second 'cdl fixed' contender: its ratio to the first is the noise "
                        "of the quiet comparison")
    p.add_argument("--quick", action="store_true",
                   help="40 calls, batch 64, 0 and 2 busy processes, train_step only")
    p.add_argument("--out", default=str(HERE / "results" / "load.json"))
    p.add_argument("--report", metavar="JSON",
                   help="no run: rewrite the targets and the markdown of a saved run")
    add_malloc_argument(p)
    args = p.parse_args(argv)
    if args.report:
        path = Path(args.report)
        doc = json.loads(path.read_text())
        doc["targets"] = targets(doc)
        path.write_text(json.dumps(doc, indent=1))
        path.with_suffix(".md").write_text(markdown(doc))
        print(f"rewrote {path} and {path.with_suffix('.md')}")
        return 0
    if args.quick:
        args.calls, args.busy, args.batches, args.ops = 40, "0,2", "64", "train_step"
        args.pause_calls, args.fit_epochs, args.rounds = 8, 1, 2
    only = set(args.only.split(","))
    ops = args.ops.split(",")
    malloc = apply_malloc(args)
    threads = cdl.get_num_threads()
    torch_on = torch is not None and not args.no_torch
    if torch_on:
        torch.set_num_threads(threads)
    doc = {"command": "python bench/bench_load.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv),
           "machine": dict(machine_info(threads), malloc=malloc),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "loadavg_start": loadavg(), "conditions": [], "fit": []}
    t_start = time.perf_counter()
    rows = []
    for key, net in NETS.items():
        if key in only:
            shape, spec = nref.NETWORKS[net]
            rows += [(net, op, shape, spec, int(n)) for n in args.batches.split(",")
                     for op in ops]
    if "train" in only:
        rows += [("cdl train (digits CNN)", "train_step", DIGITS_SPEC[0], DIGITS_SPEC[1], 32)]
    for k in (int(v) for v in args.busy.split(",") if v != ""):
        cond = {"kind": "busy", "busy": k, "loadavg_before": loadavg(), "runnable": [],
                "rows": []}
        procs = spawn_busy(k)
        try:
            for name, op, shape, spec, n in rows:
                case = Case(f"{name} N={n}" if not name.startswith("cdl train") else name,
                            op, shape, spec, n, threads, torch_on, control=args.control)
                res, seen = measure(case, args.calls, args.rounds, None, args.budget, threads,
                                    args.pause)
                cond["runnable"] += [s for s in seen if s is not None]
                cond["rows"].append({"name": case.name, "op": op, "n": n, "results": res})
                print(f"{k} busy  {case.name:24s} {op:10s} " + "  ".join(
                    f"{lab}: {s['median_ms']:.3f}/{s['total_ms']:.0f}" for lab, s in res.items()
                    if s.get("calls")), flush=True)
            if "fit" in only:
                fres, seen = fit_case(threads, args.fit_epochs, 3, args.budget)
                doc["fit"].append({"busy": k, "epochs": args.fit_epochs, "results": fres,
                                   "runnable": seen, "loadavg_before": cond["loadavg_before"],
                                   "loadavg_after": loadavg()})
                print(f"{k} busy  fit: " + "  ".join(f"{lab}: {s['median_s']:.3f}s"
                                                     for lab, s in fres.items()), flush=True)
        finally:
            stop_busy(procs)
        cond["loadavg_after"] = loadavg()
        # "quiet": nothing but this benchmark ran (the runnable count never passed its
        # own main thread plus, at most, one worker or spinning BLAS thread)
        cond["quiet"] = k == 0 and bool(cond["runnable"]) and max(cond["runnable"]) <= 2
        doc["conditions"].append(cond)
    if "matmul" in only:
        for pre in ("matmul", "pause"):
            cond = {"kind": "matmul", "pre": pre, "loadavg_before": loadavg(), "runnable": [],
                    "rows": []}
            calls = args.calls if pre == "matmul" else args.pause_calls
            for net in ("LeNet-5", "MLP"):
                shape, spec = nref.NETWORKS[net]
                case = Case(f"{net} N=64", "train_step", shape, spec, 64, threads, torch_on)
                res, seen = measure(case, calls, args.rounds if pre == "matmul" else 3, pre,
                                    args.budget * (4 if pre == "pause" else 1), threads,
                                    args.pause)
                cond["runnable"] += [s for s in seen if s is not None]
                cond["rows"].append({"name": case.name, "op": "train_step", "n": 64,
                                     "results": res})
                print(f"{pre:7s} {case.name:24s} " + "  ".join(
                    f"{lab}: {s['median_ms']:.3f}" for lab, s in res.items() if s.get("calls")),
                    flush=True)
            cond["loadavg_after"] = loadavg()
            doc["conditions"].append(cond)
    doc["seconds"] = time.perf_counter() - t_start
    doc["loadavg_end"] = loadavg()
    doc["targets"] = targets(doc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    for t in doc["targets"]:
        print(f"  {'ok ' if t['ok'] else 'NO '} {t['target']}: {t['value']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
