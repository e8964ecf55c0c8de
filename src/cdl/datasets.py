"""Datasets: scikit-learn's 8x8 digits, and IDX files (MNIST / Fashion-MNIST) you have.

Nothing is downloaded. Images come back NCHW float32 (8-bit ones scaled to [0, 1]),
labels int64.
"""
import gzip as _gzip
import os as _os
import zlib as _zlib

import numpy as _np

from . import _config

__all__ = ["load_digits", "load_idx", "load_idx_dataset"]

# IDX type codes -> big-endian dtypes
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_DIMS = 32          # NumPy's own limit is 64; an IDX file has a handful
_MAX_BYTES = 1 << 40    # a gzip header promising more is damaged, not a dataset
_CHUNK = 1 << 24        # gzip data is read 16 MiB at a time: memory grows with what is there


def _read_at_most(f, n):
    """Up to n bytes of the stream f, in chunks: a header that promises more than the
    stream holds costs only what the stream holds, not an n-byte buffer up front."""
    data = bytearray()
    while len(data) < n:
        chunk = f.read(min(_CHUNK, n - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _out_of_memory(path, shape):
    # under the machine's memory but more than is free now (other processes, no swap)
    return ValueError(f"load_idx: {path}: header says {shape}, more than the memory free "
                      f"to read it")


def load_digits():
    """(x, y): the 1,797 handwritten 8x8 digits shipped with scikit-learn.

    x is float32 (1797, 1, 8, 8) scaled from 0..16 to [0, 1]; y int64 in 0..9.
    Needs scikit-learn (``pip install "cdl-cpu[data]"`` or ``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError:
        raise ImportError("cdl.datasets.load_digits needs scikit-learn, which ships the digits "
                          "data: pip install 'cdl-cpu[data]'  (or: pip install scikit-learn)"
                          ) from None
    d = _sk_load_digits()
    x = (_np.asarray(d.images, dtype=_np.float32) / _np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = _np.asarray(d.target, dtype=_np.int64)
    return _np.ascontiguousarray(x), y


def load_idx(path):
    """The array stored in an IDX file (gzip-compressed or not), in native byte order.

    Format: two zero bytes, a type byte (0x08 ubyte ... 0x0E double), the number of
    dimensions, each dimension as a big-endian uint32, then the data. The header is
    checked before the data is read, and no more data than it promises is read; a
    header promising more than this machine's memory is refused, and a gzip stream is
    read in chunks, so that a lying header cannot make it allocate what is not there.
    """
    try:
        path = _os.fspath(path)
    except TypeError:
        raise TypeError(f"load_idx: path must be a file path, got {type(path).__name__}") \
            from None
    with open(path, "rb") as f:
        magic = f.read(2)
    opener = _gzip.open if magic == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise ValueError(f"load_idx: {path} is not an IDX file (the header must start "
                                 f"with two zero bytes, got {head!r})")
            code, ndim = head[2], head[3]
            if code not in _IDX_TYPES:
                raise ValueError(f"load_idx: {path}: unknown IDX type code 0x{code:02X}")
            if not 1 <= ndim <= _MAX_DIMS:
                raise ValueError(f"load_idx: {path}: header says {ndim} dimensions (1 to "
                                 f"{_MAX_DIMS} are supported)")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise ValueError(f"load_idx: {path}: truncated header ({4 + len(raw)} bytes)")
            dims = tuple(int(d) for d in _np.frombuffer(raw, ">u4"))
            dtype = _np.dtype(_IDX_TYPES[code])
            expect = 1
            for d in dims:
                expect *= d
            expect *= dtype.itemsize
            shape = f"{'x'.join(map(str, dims))} of {dtype.name} = {expect} data bytes"
            if opener is open:          # the file's size says it all before any read
                got = _os.fstat(f.fileno()).st_size - 4 - 4 * ndim
                if got != expect:
                    raise ValueError(f"load_idx: {path}: header says {shape}, file has {got}"
                                     + (" (truncated)" if got < expect else ""))
            elif expect > _MAX_BYTES:
                raise ValueError(f"load_idx: {path}: header says {shape}, more than cdl "
                                 f"reads from a gzip stream")
            memory = _config.physical_memory()
            if memory is not None and expect > memory:
                raise ValueError(f"load_idx: {path}: header says {shape}, more than this "
                                 f"machine's memory ({memory} bytes)")
            # one byte more than promised: a longer stream is an error too
            if opener is open:
                data = bytearray(expect + 1)        # (writable: the result views it)
                del data[f.readinto(data):]
            else:
                data = _read_at_most(f, expect + 1)
    except (OSError, EOFError, _zlib.error) as exc:
        raise ValueError(f"load_idx: {path}: cannot read the gzip stream ({exc})") from None
    except MemoryError:
        raise _out_of_memory(path, shape) from None
    if len(data) != expect:
        got = f"{len(data)}" if len(data) <= expect else f"more than {expect}"
        raise ValueError(f"load_idx: {path}: header says {shape}, file has {got}"
                         + (" (truncated)" if len(data) < expect else ""))
    try:
        if not expect:
            return _np.empty(dims, dtype.newbyteorder("="))
        # a view of the bytes read, byte-swapped in place: no second copy of the data
        # (the peak was twice its size)
        a = _np.frombuffer(data, dtype, count=expect // dtype.itemsize).reshape(dims)
        if not dtype.isnative:
            a = a.byteswap(inplace=True).view(dtype.newbyteorder("="))
        return a
    except MemoryError:
        raise _out_of_memory(path, shape) from None
    except ValueError as exc:     # dims NumPy cannot hold, even of no data: (0, 2**32-1, ...)
        raise ValueError(f"load_idx: {path}: header says {shape}, which NumPy cannot "
                         f"represent ({exc})") from None


def load_idx_dataset(images_path, labels_path):
    """(x, y) from an IDX image file (N, H, W) and label file (N,) of labels >= 0: x
    float32 (N, 1, H, W), ubyte images scaled to [0, 1] (other types as they are), y
    int64."""
    images = load_idx(images_path)
    labels = load_idx(labels_path)
    if images.ndim != 3:
        raise ValueError(f"load_idx_dataset: {images_path}: expected images N x H x W, got "
                         f"{'x'.join(map(str, images.shape))}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"load_idx_dataset: {labels_path} has shape "
                         f"{'x'.join(map(str, labels.shape))}, expected ({images.shape[0]},) "
                         f"labels for the {images.shape[0]} images")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"load_idx_dataset: labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"load_idx_dataset: {labels_path}: labels must be >= 0, got "
                         f"{int(labels.min())}")
    x = images.astype(_np.float32)
    if images.dtype == _np.uint8:
        x /= _np.float32(255.0)
    return _np.ascontiguousarray(x[:, None]), labels.astype(_np.int64)
