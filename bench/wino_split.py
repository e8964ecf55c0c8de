"""How the Winograd convolution should split its work at small batches: by blocks of
tile rows, or by output-channel slices (each thread transforming its own slice's
filters and the whole input), against cdl's automatic choice. Interleaved, medians.

    python bench/wino_split.py [--threads 2] [--batches 1,2,4,8,16] [--repeats 7]

Forward and input gradient of 3x3 stride-1 layers (forced onto the Winograd path);
every split gives the same bits, so only the time differs.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import describe  # noqa: E402
from _timing import median_times  # noqa: E402

from cdl._kernels import conv  # noqa: E402

LAYERS = [(16, 16, 32), (32, 32, 16), (64, 64, 8), (32, 64, 16)]   # C, K, H
MODES = {"auto": 0, "blocks": 1, "slices": 2}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    nt = args.threads
    print(f"`python bench/wino_split.py --threads {nt} --batches {args.batches} --repeats "
          f"{args.repeats}`: {describe()}. µs a call (medians); the last columns are over "
          f"the block split's time.\n")
    print("| batch | C→K | H | part | blocks | slices | auto | slices/blocks | auto/blocks |")
    print("|--:|---|--:|---|--:|--:|--:|--:|--:|")
    old_path = conv.set_winograd_path(2)
    try:
        for n in (int(b) for b in args.batches.split(",")):
            for c, k, h in LAYERS:
                x = rng.standard_normal((n, c, h, h)).astype(np.float32)
                w = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
                g = rng.standard_normal((n, k, h, h)).astype(np.float32)
                b = np.zeros(k, np.float32)
                y, dx = np.empty_like(g), np.empty_like(x)
                parts = {"forward": lambda: conv.conv2d_forward(x, w, b, y, 1, 1, 1, 1, nt),
                         "input grad": lambda: conv.conv2d_backward_input(g, w, dx, 1, 1, 1, 1,
                                                                          nt)}
                for part, call in parts.items():
                    def mode(m, call=call):
                        def run():
                            old = conv.set_winograd_split(m)
                            call()
                            conv.set_winograd_split(old)
                        return run
                    t = median_times({name: mode(m) for name, m in MODES.items()},
                                     args.repeats, pause=0.02)
                    print(f"| {n} | {c}→{k} | {h} | {part} | {t['blocks'] * 1e6:.1f} | "
                          f"{t['slices'] * 1e6:.1f} | {t['auto'] * 1e6:.1f} | "
                          f"{t['slices'] / t['blocks']:.2f} | {t['auto'] / t['blocks']:.2f} |")
    finally:
        conv.set_winograd_path(old_path)


if __name__ == "__main__":
    main()
