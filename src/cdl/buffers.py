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
  fresh arrays (no page faults to save). It remembers two arrays per shape and at
  most ``RESULT_POOL_BYTES`` in all (the least recently used shapes go first), so
  predicting many batch sizes does not keep an array for each.
"""
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping

import numpy as np

__all__ = ["GradArena", "RunnerPool", "ResultPool", "RESULT_POOL_BYTES", "WsView", "nbytes_of"]


class WsView(MutableMapping):
    """A layer's workspace with some entries replaced for one planned pass (a lent
    input-gradient buffer, a Residual's join): reads see the replacements first, then
    the workspace itself, live, so an entry a layer's ``_forward`` rebinds is the one
    its ``_backward`` reads (a copy of the dict would keep the old one); writes of
    other keys go to the workspace."""

    __slots__ = ("_over", "_base")

    def __init__(self, base, **over):
        self._base, self._over = base, over

    def __getitem__(self, key):
        return self._over[key] if key in self._over else self._base[key]

    def __setitem__(self, key, value):
        (self._over if key in self._over else self._base)[key] = value

    def __delitem__(self, key):
        del (self._over if key in self._over else self._base)[key]

    def __contains__(self, key):
        return key in self._over or key in self._base

    def __iter__(self):
        yield from self._over
        yield from (k for k in self._base if k not in self._over)

    def __len__(self):
        return sum(1 for _ in self)

    def copy(self):
        """A plain dict of what the view shows (as ``dict.copy`` gives a user layer)."""
        return dict(self)


def _forget_oldest(groups, held, budget):
    """Drop the least recently used items of ``groups`` (an OrderedDict of lists of
    objects with ``nbytes``, oldest first) until ``held`` bytes fit ``budget``; returns
    the bytes still held. Lists emptied on the way go too."""
    while held > budget:
        key, oldest = next(iter(groups.items()))
        if oldest:
            held -= oldest.pop(0).nbytes
        if not oldest:
            del groups[key]
    return held


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
            self._held = _forget_oldest(self._free, self._held + runner.nbytes, self.budget)

    def clear(self):
        with self._lock:
            self._free.clear()
            self._held = 0

    def sizes(self):
        """The batch sizes with a runner kept (for tests and diagnostics)."""
        with self._lock:
            return [n for n, rs in self._free.items() for _ in rs]


def nbytes_of(spaces):
    """Bytes of the distinct memory held by the arrays in ``spaces``: arrays, and
    mappings, lists and tuples of them, nested to any depth (a Residual's inference workspace keeps
    its branches' workspaces in ws["inner"]); views count once, with the array they view."""
    seen, total = set(), 0
    stack, visited = list(spaces), set()
    while stack:
        a = stack.pop()
        if isinstance(a, np.ndarray):
            base = a
            while isinstance(base.base, np.ndarray):
                base = base.base
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
        elif isinstance(a, (Mapping, list, tuple)) and id(a) not in visited:
            # (a workspace may refer to others, and to itself through a plan's trace)
            visited.add(id(a))
            stack.extend(a.values() if isinstance(a, Mapping) else a)
    return total


SMALL_RESULT_BYTES = 64 << 10
"""Results smaller than this are fresh arrays: malloc serves them from its heap (below
glibc's 128 KB mmap threshold), with no page faults to save and no pool to search."""


RESULT_POOL_BYTES = 256 << 20
"""A model's ResultPool remembers at most this many bytes of arrays (held ones included)."""


class ResultPool:
    """Arrays to return from public calls, reused once their holders let go.

    At most ``keep`` arrays per (shape, dtype) and ``budget`` bytes in all are
    remembered; past the budget the least recently asked-for shapes are forgotten
    (their holders keep them): a model predicting many batch sizes keeps no more."""

    def __init__(self, keep=2, budget=None):
        self.keep = keep
        # (read when the pool is made, as INFERENCE_CACHE_BYTES is: setting it affects
        # models built later)
        self.budget = RESULT_POOL_BYTES if budget is None else budget
        self._arrays = OrderedDict()  # (shape, dtype) -> [array, ...], least recently used first
        self._held = 0
        self._lock = threading.Lock()

    def get(self, shape, dtype):
        dtype = np.dtype(dtype)
        if math.prod(shape) * dtype.itemsize < SMALL_RESULT_BYTES:
            return np.empty(shape, dtype)
        key = (tuple(shape), dtype)
        with self._lock:
            arrays = self._arrays.get(key)
            if arrays is None:
                self._arrays[key] = arrays = []
            else:
                self._arrays.move_to_end(key)
            for a in arrays:
                # References: this list, the loop variable, getrefcount's argument.
                if sys.getrefcount(a) == 3:
                    return a
            a = np.empty(key[0], key[1])
            if a.nbytes > self.budget:
                if not arrays:
                    del self._arrays[key]
                return a             # used once, never remembered
            arrays.append(a)
            self._held += a.nbytes
            if len(arrays) > self.keep:
                self._held -= arrays.pop(0).nbytes   # forgotten; its holder keeps it
            self._held = _forget_oldest(self._arrays, self._held, self.budget)
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
            self._held = 0


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
        lent = WsView(ws, dx=flat.reshape(dx.shape),
                      **{k: flat.reshape(v.shape) for k, v in views.items()})
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
