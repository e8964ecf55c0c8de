"""Reused buffers for the public calls: inference runners and returned arrays.

A fresh multi-megabyte array per call costs page faults that can exceed the
kernels' time (a 8 MB gradient: 2-7x). Two bounded pools remove them:

- ``RunnerPool`` keeps inference runners (a plan, or layer-by-layer buffers)
  per batch size, shared by the threads: a call checks one out and returns it,
  so concurrent predicts never share buffers. At most ``budget`` bytes stay
  cached, counted from the buffers each runner actually holds (``nbytes``; the
  least recently used go first); a runner bigger than the budget is used once
  and freed, so a huge predict does not keep its memory.
- ``ResultPool`` hands out the arrays that public calls return. An array is
  reused only when nothing outside the pool refers to it any more (no variable,
  no view): results a user holds are never overwritten. Results under 64 KB are
  fresh arrays (no page faults to save).
"""
import math
import sys
import threading
from collections import OrderedDict

import numpy as np

__all__ = ["GradArena", "RunnerPool", "ResultPool", "nbytes_of"]


class RunnerPool:
    """Inference runners by batch size, at most ``budget`` bytes kept."""

    def __init__(self, budget):
        self.budget = budget
        self._free = OrderedDict()   # n -> [runner, ...], least recently used first
        self._held = 0
        self._lock = threading.Lock()

    def acquire(self, n, make):
        """A runner for batch size n: a kept one, or ``make(n)``."""
        with self._lock:
            runners = self._free.get(n)
            if runners:
                runner = runners.pop()
                self._held -= runner.nbytes
                return runner
        return make(n)

    def release(self, runner, n):
        if runner.nbytes > self.budget:
            return
        with self._lock:
            # Lists emptied by acquire stay in place (a call's pair costs two dict
            # lookups, not a delete and an insert); eviction skips them.
            runners = self._free.get(n)
            if runners is None:
                self._free[n] = runners = []
            else:
                self._free.move_to_end(n)
            runners.append(runner)
            self._held += runner.nbytes
            while self._held > self.budget:
                m, oldest = next(iter(self._free.items()))
                if oldest:
                    self._held -= oldest.pop(0).nbytes
                if not oldest:
                    del self._free[m]

    def clear(self):
        with self._lock:
            self._free.clear()
            self._held = 0

    def sizes(self):
        """The batch sizes with a runner kept (for tests and diagnostics)."""
        with self._lock:
            return [n for n, rs in self._free.items() for _ in rs]


def nbytes_of(spaces):
    """Bytes of the distinct memory held by the arrays in ``spaces`` (dicts of arrays and
    other values; views count once, with the array they view)."""
    seen, total = set(), 0
    for ws in spaces:
        for a in ws.values():
            if isinstance(a, np.ndarray):
                base = a
                while isinstance(base.base, np.ndarray):
                    base = base.base
                if id(base) not in seen:
                    seen.add(id(base))
                    total += base.nbytes
    return total


SMALL_RESULT_BYTES = 64 << 10
"""Results smaller than this are fresh arrays: malloc serves them from its heap (below
glibc's 128 KB mmap threshold), with no page faults to save and no pool to search."""


class ResultPool:
    """Arrays to return from public calls, reused once their holders let go."""

    def __init__(self, keep=2):
        self.keep = keep
        self._arrays = {}            # (shape, dtype) -> [array, ...]
        self._lock = threading.Lock()

    def get(self, shape, dtype):
        dtype = np.dtype(dtype)
        if math.prod(shape) * dtype.itemsize < SMALL_RESULT_BYTES:
            return np.empty(shape, dtype)
        key = (tuple(shape), dtype)
        with self._lock:
            arrays = self._arrays.setdefault(key, [])
            for a in arrays:
                # References: this list, the loop variable, getrefcount's argument.
                if sys.getrefcount(a) == 3:
                    return a
            a = np.empty(key[0], key[1])
            arrays.append(a)
            if len(arrays) > self.keep:
                arrays.pop(0)        # forgotten by the pool; its holder keeps it
            return a

    def copy_of(self, a):
        """A result holding a copy of ``a``."""
        if a.nbytes < SMALL_RESULT_BYTES:
            return a.copy()
        out = self.get(a.shape, a.dtype)
        np.copyto(out, a)
        return out

    def clear(self):
        with self._lock:
            self._arrays.clear()


class GradArena:
    """Input-gradient buffers shared by a training plan's backward passes.

    A pass's input gradient is read by the pass before it and then dead, so the
    plan lends each pass a buffer and takes it back once the reader's ops are
    planned (ops run in the order they are planned). A few buffers a size then
    serve a whole backward, and a pass writes into lines the step used moments
    ago instead of its own buffer, last touched a step earlier and long evicted
    (ResNet-8's step works on about 100 MB; see bench/profile_plan.py).
    """

    def __init__(self):
        self._free = {}              # (size, dtype) -> [flat array, ...]
        self._lent = {}              # data address -> flat array

    @staticmethod
    def _address(a):
        return a.__array_interface__["data"][0]

    def lend(self, ws):
        """(ws with "dx" and its whole-array views on a lent buffer, the buffer), or
        (ws, None) when the pass has no input-gradient buffer or keeps other views of it."""
        dx = ws.get("dx")
        if not isinstance(dx, np.ndarray) or not dx.flags.c_contiguous or dx.size == 0:
            return ws, None
        views = {k: v for k, v in ws.items()
                 if k != "dx" and isinstance(v, np.ndarray) and np.may_share_memory(v, dx)}
        if any(v.size != dx.size or not v.flags.c_contiguous
               or self._address(v) != self._address(dx) for v in views.values()):
            return ws, None
        key = (dx.size, dx.dtype)
        free = self._free.get(key)
        flat = free.pop() if free else np.empty(dx.size, dx.dtype)
        self._lent[self._address(flat)] = flat
        lent = dict(ws, dx=flat.reshape(dx.shape))
        lent.update((k, flat.reshape(v.shape)) for k, v in views.items())
        return lent, lent["dx"]

    def buffers(self):
        """Every buffer made so far (lent or free)."""
        return [*self._lent.values(), *(a for free in self._free.values() for a in free)]

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.buffers())

    def release(self, a):
        """Take back the lent buffer ``a`` is (a whole view of); anything else is ignored."""
        if not isinstance(a, np.ndarray) or a.size == 0:
            return
        flat = self._lent.get(self._address(a))
        if flat is not None and flat.size == a.size:
            del self._lent[self._address(a)]
            self._free.setdefault((flat.size, flat.dtype), []).append(flat)
