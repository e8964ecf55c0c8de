"""ParameterPack: every parameter and gradient of a model in one flat buffer each.

Optimizers update the whole model in one kernel call over these buffers (at
batch 1 a call per parameter cost more than the arithmetic). Each parameter is
a view that starts on a 64-byte boundary; the gaps stay zero in both buffers,
so updates keep them zero. ``parts`` deals the update to threads: rows
(start, stop, owner) over the flat buffers, thread ``owner mod threads``
updating [start, stop).
"""
import numpy as np

__all__ = ["ParameterPack"]

_PART = 1 << 14            # elements per part of a big parameter that is not split by rows
_SPLIT_MIN = 1 << 19       # ... from this size (as the elementwise kernels go parallel)


class ParameterPack:
    """The flat, aligned parameter and gradient buffers of a list of named slots.

    ``slots`` is a list of (name, layer, key) for every trained parameter, in
    state-dict order. Public members:

    - ``params``, ``grads``: the flat buffers (None when there are no parameters);
    - ``names``: the parameter names; ``offsets[name]``: (start, size) in the buffers;
    - ``parts``: the (start, stop, owner) update table (int64, shape (k, 3));
    - ``view(flat, name)``: ``name``'s view of any buffer laid out like ``params``.
    """

    def __init__(self, slots, dtype):
        dtype = np.dtype(dtype)
        align = 64 // dtype.itemsize
        self.dtype = dtype
        self.names = []
        self.offsets = {}
        self.shapes = {}
        placed, total = [], 0
        for name, layer, key in slots:
            size = layer.params[key].size
            placed.append((name, layer, key, total, size))
            self.names.append(name)
            self.offsets[name] = (total, size)
            self.shapes[name] = layer.params[key].shape
            total += -(-size // align) * align
        self.size = total
        if not placed:
            self.params = self.grads = None
            self.parts = np.zeros((0, 3), np.int64)
            return
        self.params = self.zeros()
        self.grads = self.zeros()
        for name, layer, key, start, size in placed:
            for store, buf in ((layer.params, self.params), (layer.grads, self.grads)):
                view = buf[start:start + size].reshape(store[key].shape)
                view[...] = store[key]
                store.put(key, view)        # (a layer's ArrayDict refuses "=")
        self.parts = self._parts(placed)

    def __repr__(self):
        # counts, not the arrays (a large model's would fill the screen)
        elements = sum(size for _, size in self.offsets.values())
        return (f"ParameterPack(parameters={len(self.names)}, elements={elements}, "
                f"dtype={self.dtype.name})")

    def zeros(self):
        """A new zeroed, 64-byte-aligned buffer laid out like ``params``."""
        raw = np.zeros(self.size + 64 // self.dtype.itemsize, self.dtype)
        skip = (-raw.ctypes.data % 64) // self.dtype.itemsize
        return raw[skip:skip + self.size]

    def view(self, flat, name):
        start, size = self.offsets[name]
        return flat[start:start + size].reshape(self.shapes[name])

    @staticmethod
    def _parts(placed):
        """A parameter that its layer updates in row chunks (``update_parts``) comes in
        those chunks (owner = chunk index, so the update runs where the gradient was
        computed); another of 512K elements or more in parts of 16K dealt round-robin;
        anything else whole, on thread 0."""
        parts = []
        for name, layer, key, start, size in placed:
            rows, count = layer.update_parts(key) or (0, 1)
            if count > 1:
                fout = layer.params[key].shape[0]
                fin = size // fout
                for c in range(count):
                    parts.append((start + c * rows * fin, start + min((c + 1) * rows, fout) * fin,
                                  c))
            elif size >= _SPLIT_MIN:
                for c, lo in enumerate(range(0, size, _PART)):
                    parts.append((start + lo, start + min(lo + _PART, size), c))
            else:
                parts.append((start, start + size, 0))
        return np.array(parts, np.int64).reshape(-1, 3)
