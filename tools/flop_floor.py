#!/usr/bin/env python
"""How close is the ONNX Runtime target to what the machine can do at all?

For each net and batch of a committed bench_inference run, the forward FLOPs of one
``predict`` call (the layers' own ``flops()``), the time they take at the measured
FMA peak (no runtime can go below it), and the 0.7 x ONNX Runtime time that
issue 11 asks for. A ratio above 1 means the target is below the arithmetic floor.

    python tools/flop_floor.py --peak 230 > bench/results/inference_floor.md
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(HERE, "..", "bench", "results",
                                                     "inference.json"))
    p.add_argument("--peak", type=float, required=True,
                   help="float32 FMA peak in GFLOP/s (bench/bench_peak.py, same threads)")
    args = p.parse_args(argv)
    import cdl
    from bench_inference import nets

    with open(args.results) as f:
        run = json.load(f)
    rows = {(r["net"], r["batch"]): r for r in run["rows"]}
    meta = run["meta"]
    print(f"# The ONNX Runtime target against the FMA peak\n\n`python tools/flop_floor.py "
          f"--peak {args.peak:g}` on `{meta['command']}` ({meta['threads']} threads). "
          f"Floor: the call's forward FLOPs at {args.peak:g} GFLOP/s.\n")
    print("| net | batch | GFLOP per call | floor ms | 0.7 × ORT ms | floor / target | "
          "cdl GFLOP/s | ORT GFLOP/s |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, make, _ in nets(cdl):
        model = make()
        flops = sum(layer.flops() for _, layer in model.chain.walk()
                    if not list(layer.children()))
        for n in sorted(b for (net, b) in rows if net == name):
            r = rows[(name, n)]
            gflop = flops * n / 1e9
            floor, target = gflop / args.peak * 1e3, 0.7 * r["ORT"]
            print(f"| {name} | {n} | {gflop:.4f} | {floor:.4f} | {target:.4f} | "
                  f"{floor / target:.2f} | {gflop / r['cdl'] * 1e3:.0f} | "
                  f"{gflop / r['ORT'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
