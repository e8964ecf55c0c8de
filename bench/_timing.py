"""Interleaved timing shared by the bench scripts (bench/run.py's Timer)."""
from run import Timer


def median_times(fns, repeats, pause=0.1, min_sample=0.01, warm=0.03):
    """Median seconds per call of each fn. Blocks of calls lasting at least
    ``min_sample`` run contender by contender in a rotating order; before each block a
    pause lets the previous contender's spinning threads (OpenMP's, ONNX Runtime's,
    PyTorch's) go idle, then untimed calls for ``warm`` seconds bring the next one back
    to steady state (without them, 2-thread calls of a few ms ran up to 2x slow)."""
    timer = Timer(max(repeats, 5), pause, min_sample, warm)
    return {name: med for name, (med, _, _) in timer.run(fns).items()}
