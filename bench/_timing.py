"""Interleaved timing shared by the bench scripts."""
import time

import numpy as np


def median_times(fns, repeats, min_time=0.002):
    """Interleaved: each round runs every contender once (a few calls, timed together)."""
    calls = {}
    for name, fn in fns.items():
        fn()
        t = time.perf_counter()
        fn()
        per = time.perf_counter() - t
        calls[name] = max(1, int(min_time / max(per, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            k = calls[name]
            t = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - t) / k)
    return {name: float(np.median(v)) for name, v in times.items()}
