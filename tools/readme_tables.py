#!/usr/bin/env python
"""Regenerate the README's benchmark tables from the committed results files.

Every number in README.md's benchmark tables comes from a results file that
``bench/run.py``, ``bench/bench_resnet.py`` or ``bench/bench_inference.py`` wrote
(bench/results/*.json). This script rewrites the text between
the marker comments

    <!-- readme_tables:NAME:begin --> ... <!-- readme_tables:NAME:end -->

for each block NAME below, from its JSON file:

    python tools/readme_tables.py            # rewrite README.md
    python tools/readme_tables.py --check    # exit 1 if README.md is not up to date

After a new full run (python bench/run.py --out bench/results/latest.json), run this
and commit both files. tests/test_readme_tables.py checks that the README matches.
"""
import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LATEST = ROOT / "bench" / "results" / "latest.json"
SCALING = ROOT / "bench" / "results" / "scaling-16core-xeon.json"

# (label in the README, result key in latest.json: group|name|op)
SUMMARY_ROWS = [
    ("conv N=64 C=32→K=64 16×16 3×3 p1, forward", "conv|N=64 C=32->K=64 16x16 3x3 p1|fwd"),
    ("same, forward + both gradients", "conv|N=64 C=32->K=64 16x16 3x3 p1|fwd+bwd"),
    ("conv N=64 C=3→K=32 32×32 3×3 p1, forward + both gradients",
     "conv|N=64 C=3->K=32 32x32 3x3 p1|fwd+bwd"),
    ("LeNet conv1 N=64, forward + weight gradients",
     "conv|LeNet conv1 N=64 C=1->K=6 28x28 5x5 p2|fwd+bwd_w"),
    ("LeNet conv1 N=64, input gradient", "conv|LeNet conv1 N=64 C=1->K=6 28x28 5x5 p2|bwd_in"),
    ("LeNet conv2 N=64, forward + both gradients",
     "conv|LeNet conv2 N=64 C=6->K=16 14x14 5x5|fwd+bwd"),
    ("max-pool 2×2 on 64×32×32×32, forward + backward", "pool|2x2 s2 on 64x32x32x32|fwd+bwd"),
    ("dense 784→256, N=64, forward + backward", "dense|N=64 784->256|fwd+bwd"),
    ("dense 4096→10, N=64, forward + backward", "dense|N=64 4096->10|fwd+bwd"),
    ("dense 1024→1024, N=256, forward + backward", "dense|N=256 1024->1024|fwd+bwd"),
    ("MLP 784-256-128-10 `train_step`, N=64", "nets|MLP N=64|train_step"),
    ("MLP `train_step`, N=1", "nets|MLP N=1|train_step"),
    ("MLP `predict`, N=1", "nets|MLP N=1|predict"),
    ("LeNet-5 `train_step`, N=64", "nets|LeNet-5 N=64|train_step"),
    ("LeNet-5 `train_step`, N=1", "nets|LeNet-5 N=1|train_step"),
    ("CIFAR-style CNN `train_step`, N=64", "nets|CIFAR-CNN N=64|train_step"),
    ("CIFAR-style CNN `train_step`, N=1", "nets|CIFAR-CNN N=1|train_step"),
    ("CIFAR-style CNN `train_step`, N=256", "nets|CIFAR-CNN N=256|train_step"),
    ("CIFAR-style CNN `predict`, N=64", "nets|CIFAR-CNN N=64|predict"),
]

SCALING_CASES = [("conv", "scaling|N=64 C=32->K=64 16x16 3x3 p1|fwd+bwd"),
                 ("LeNet-5 step", "scaling|LeNet-5 N=64|train_step")]


def ms(v):
    """Milliseconds to three significant figures (no exponent)."""
    if v >= 100:
        return f"{v:.0f}"
    return f"{float(f'{v:.3g}'):g}" if v >= 1e-3 else f"{v:.2g}"


def _median_ms(row, who):
    c = row["contenders"].get(who, {})
    return c["median_s"] * 1e3 if c.get("status") == "ok" else None


def _rows_by_key(doc):
    out = {}
    for r in doc["results"]:
        out.setdefault(r["key"], r)  # the first; scaling keys repeat per thread count
    return out


def _busy_load(machine):
    """The 1-min load average of other work, as bench/run.py computes it for its warning."""
    return max(machine.get("loadavg_start", 0.0),
               machine.get("loadavg_end", 0.0) - machine.get("threads", 0))


def _cmd(doc):
    argv = list(doc.get("argv", []))
    shown = []
    skip = False
    for a in argv:  # the output path of the run is where it was written, not how to run it
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        shown.append(a)
    return " ".join(["python bench/run.py"] + shown)


def summary_block(doc):
    m, c = doc["machine"], doc["ceilings"]
    rows = _rows_by_key(doc)
    isa = {"avx512": "AVX-512", "avx2": "AVX2", "baseline": "baseline"}.get(m["cdl_isa"],
                                                                            m["cdl_isa"])
    load = _busy_load(m)
    peak = max((r["flops"] / r["contenders"]["cdl"]["median_s"] / 1e9, r["key"])
               for r in doc["results"]
               if r["group"] in ("dense", "conv") and r.get("flops")
               and r["contenders"].get("cdl", {}).get("status") == "ok")
    env = m.get("env", {})
    lines = [
        f"Latest full run (`{_cmd(doc)}`, {doc['created'][:10]}, {doc['elapsed_s']:.0f} s): "
        f"{m['cpu']}, {m['cores_usable']} usable cores, {m['threads']} threads, cdl "
        f"{m['cdl']} {isa} build, NumPy {m['numpy']}, PyTorch {m.get('torch') or 'n/a'}"
        + (f" (allocator: {m['malloc']})" if m.get("malloc") else "") + ". "
        f"1-minute load average of other work: up to {load:.1f} on {m['cores_usable']} cores"
        + (" (busy: multi-threaded timings may be pessimistic)"
           if load > 0.5 * m["cores_usable"] else "") + ". "
        f"sgemm ceiling measured in the same run: {c['sgemm_gflops']:.0f} GFLOP/s (NumPy "
        f"float32 {c['sgemm_n']}³); cdl's dense and convolution kernels reached up to "
        f"{peak[0]:.0f} GFLOP/s in it (`{peak[1]}`)"
        + (f"; the run's environment set `OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE']}`, which "
           f"holds NumPy's and SciPy's OpenBLAS to that CPU type's kernels"
           if env.get("OPENBLAS_CORETYPE") else "") + ". "
        "Times in ms; ratios are time ratios, below 1 means cdl is faster.",
        "",
        "| case | cdl | NumPy | PyTorch | cdl/NumPy | cdl/PyTorch |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for label, key in SUMMARY_ROWS:
        r = rows[key]
        t = {w: _median_ms(r, w) for w in ("cdl", "NumPy", "PyTorch")}
        cells = [label] + [ms(t[w]) if t[w] is not None else "n/a" for w in t]
        for other in ("NumPy", "PyTorch"):
            cells.append(f"{t['cdl'] / t[other]:.2f}" if t["cdl"] and t[other] else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scaling_block(doc):
    m = doc["machine"]
    by = {}
    for r in doc["results"]:
        by[(r["key"], r["threads"])] = r
    threads = sorted({t for (_, t) in by})
    head = ["threads"]
    for name, _ in SCALING_CASES:
        head += [f"{name} cdl ms", "speed-up", "PyTorch ms"]
    lines = [
        f"Thread scaling, `{_cmd(doc)}` ({doc['created'][:10]}): {m['cpu']}, "
        f"{m['cores_usable']} usable cores, cdl {m['cdl']}, NumPy {m['numpy']}, PyTorch "
        f"{m.get('torch') or 'n/a'}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "--:|" * len(head),
    ]
    for t in threads:
        cells = [str(t)]
        for _, key in SCALING_CASES:
            r, r1 = by.get((key, t)), by.get((key, threads[0]))
            c, c1 = _median_ms(r, "cdl"), _median_ms(r1, "cdl")
            p = _median_ms(r, "PyTorch")
            cells += [ms(c), f"{c1 / c:.1f}x", ms(p) if p is not None else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(v):
    return "—" if v is None else f"{v:.2f}"


def _run_line(m):
    """The command, date, machine, threads, cores, load average and allocator a bench
    script's JSON records (older runs recorded no machine or allocator)."""
    where = f"{m['machine']}" if m.get("machine") else f"{m['cores']} cores"
    malloc = f" (allocator: {m['malloc']})" if m.get("malloc") else ""
    return (f"`{m['command'].strip()}` ({m['date']}): {where}; {m['threads']} threads, "
            f"load average {m['loadavg_before'][0]:.2f} before and "
            f"{m['loadavg_after'][0]:.2f} after{malloc}")


def resnet_block(doc):
    """bench/bench_resnet.py's run: ResNet-8 and LeNet-5 (± BatchNorm + Dropout) vs PyTorch,
    and ResNet-8 vs NumPy (runs from before it had a NumPy contender have no such column)."""
    m = doc["meta"]
    numpy = any("numpy_ms" in r for r in doc["rows"])
    lines = [f"{_run_line(m)}, PyTorch {m['torch']}.", "",
             "| net | batch | op | cdl ms | PyTorch ms | cdl/PyTorch |"
             + (" NumPy ms | cdl/NumPy |" if numpy else ""),
             "|---|--:|---|--:|--:|--:|" + ("--:|--:|" if numpy else "")]
    for r in doc["rows"]:
        t = r["torch_ms"]
        line = (f"| {r['net']} | {r['batch']} | `{r['op']}` | {ms(r['cdl_ms'])} | "
                f"{'n/a' if t is None else ms(t)} | {_ratio(r['cdl/torch'])} |")
        if numpy:
            u = r.get("numpy_ms")
            line += f" {'—' if u is None else ms(u)} | {_ratio(r.get('cdl/numpy'))} |"
        lines.append(line)
    if "bn_dropout_overhead_lenet_n64" in m:
        pair = m.get("lenet_n64_interleaved_ms")
        blocks = m.get("bn_dropout_overhead_blocks")
        timed = "" if pair is None else (
            f" ({ms(pair['plain'])} → {ms(pair['bn'])} ms, the steps timed in one interleaved "
            f"block)" if blocks is None else
            f" (the median of {len(blocks)} interleaved blocks, "
            + ", ".join(f"{o:.0%}" for o in blocks)
            + f"; median times {ms(pair['plain'])} → {ms(pair['bn'])} ms)")
        lines += ["", f"BatchNorm + Dropout add {m['bn_dropout_overhead_lenet_n64']:.0%} to the "
                      f"LeNet-5 `train_step` at batch 64{timed}."]
        if "bn_pool_merge_gain_lenet_n64" in m:
            sys.path.insert(0, str(ROOT / "bench"))
            from bench_resnet import saves
            lines[-1] += (f" Its BatchNorm layers running the max-pool after them in their own "
                          f"pass {saves(m['bn_pool_merge_gain_lenet_n64'], '.0%', plural=True)} "
                          f"of that step "
                          f"({ms(pair['bn_unmerged'])} ms without, in the same "
                          + ("block)." if blocks is None else "blocks)."))
    if "resnet_n64_blocks_ms" in m:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_resnet import resnet_blocks_line
        lines += ["", resnet_blocks_line(m)]
    return "\n".join(lines)


def inference_block(doc):
    """bench/bench_inference.py's run: predict vs ONNX Runtime and PyTorch, public paths."""
    m = doc["meta"]
    lines = [f"{_run_line(m)}, ONNX Runtime {m['onnxruntime']}, PyTorch {m['torch']}. "
             f"`predict`/plan: the public call over its plan alone.", "",
             "| net | batch | cdl ms | ORT ms | PyTorch ms | cdl/ORT | cdl/PyTorch | predict/plan |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in doc["rows"]:
        lines.append(f"| {r['net']} | {r['batch']} | {ms(r['cdl'])} | "
                     f"{'n/a' if r.get('ORT') is None else ms(r['ORT'])} | "
                     f"{'n/a' if r.get('PyTorch') is None else ms(r['PyTorch'])} | "
                     f"{_ratio(r['cdl/ORT'])} | {_ratio(r['cdl/PyTorch'])} | "
                     f"{_ratio(r['predict/plan'])} |")
    for p in doc.get("public_paths", []):
        lines += ["", f"{p['case']} through the public `forward` and `backward`: "
                      f"{ms(p['public_ms'])} ms against {ms(p['kernels_ms'])} ms for its kernels "
                      f"on preallocated buffers ({p['public/kernels']:.2f}x)."]
    return "\n".join(lines)


RESNET = ROOT / "bench" / "results" / "resnet.json"
INFERENCE = ROOT / "bench" / "results" / "inference.json"
BLOCKS = {"summary": (LATEST, summary_block), "scaling": (SCALING, scaling_block),
          "resnet": (RESNET, resnet_block), "inference": (INFERENCE, inference_block)}


def render(text, blocks=BLOCKS):
    """README text with every marked block regenerated; a block without markers is an error."""
    for name, (path, make) in blocks.items():
        begin, end = f"<!-- readme_tables:{name}:begin -->", f"<!-- readme_tables:{name}:end -->"
        pat = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pat.search(text):
            raise SystemExit(f"readme_tables: README.md has no {begin} ... {end} block")
        body = make(json.loads(Path(path).read_text()))
        text = pat.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if README.md differs from what would be written")
    args = ap.parse_args(argv)
    old = README.read_text(encoding="utf-8")
    new = render(old)
    if args.check:
        if new != old:
            print("README.md's benchmark tables are out of date: run python "
                  "tools/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        README.write_text(new, encoding="utf-8")
        print("README.md updated")
    else:
        print("README.md already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
