"""State-dict files: ``model.save_state_dict(path)`` and ``cdl.load_state_dict_file(model,
path)``.

``.safetensors`` (the optional extra ``pip install cdl-cpu[safetensors]``; the
package is imported only here, when such a file is read or written) holds the
flat state dict with PyTorch's ``torch.nn.Sequential`` names, so the same file
loads into PyTorch with ``safetensors.torch.load_file``; ``.npz`` (NumPy only) is
the same dict in NumPy's format, read with ``allow_pickle=False``. Damaged files
are ValueErrors; the safetensors library checks every declared shape and offset
against the file before it makes an array. Of an .npz, only the arrays whose names
and shapes the model has are read (see ``format.checked_npz_arrays``), so a small
file of compressed members cannot make a load inflate more than the model holds.

A file is given by a path, a binary file object (read from its position to the end
of the file there, and left after it) or its bytes; a path or bytes holding several
files back to back give the first, as a file object does.
"""
import io
import os

import numpy as np

__all__ = ["save_state_dict", "load_state_dict_file"]

_KINDS = (".safetensors", ".npz")


def _require_safetensors():
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError("reading or writing .safetensors files needs the safetensors "
                          "package: pip install cdl-cpu[safetensors] (or pip install "
                          f"safetensors) ({exc})") from exc
    return safetensors.numpy


_BYTES = (bytes, bytearray, memoryview)


def _is_data(path):
    """Whether ``path`` is a file's bytes rather than a path: a bytearray or memoryview, or
    bytes that start as a zip (.npz) or a safetensors file does (a bytes path, as os.fspath
    takes, starts with neither)."""
    if isinstance(path, (bytearray, memoryview)):
        return True
    if not isinstance(path, bytes):
        return False
    if path[:4] == b"PK\x03\x04":
        return True
    return len(path) > 8 and path[8:9] == b"{" and \
        int.from_bytes(path[:8], "little") <= len(path) - 8


def _kind(path, where):
    if _is_data(path):
        raise ValueError(f"{where}: pass format='safetensors' or 'npz' with the file's bytes")
    name = os.fspath(path) if not hasattr(path, "read") and not hasattr(path, "write") \
        else getattr(path, "name", "")
    name = os.fsdecode(name) if isinstance(name, (str, bytes)) else ""
    for kind in _KINDS:
        if name.lower().endswith(kind):
            return kind
    if not name:
        raise ValueError(f"{where}: pass format='safetensors' or 'npz' for a file object "
                         f"with no such name")
    raise ValueError(f"{where}: {name!r} must end in .safetensors or .npz (for a file "
                     f"object, pass format='safetensors' or 'npz')")


def _format(path, format, where):
    if format is None:
        return _kind(path, where)
    kind = "." + str(format).lstrip(".").lower()
    if kind not in _KINDS:
        raise ValueError(f"{where}: format must be 'safetensors' or 'npz', got {format!r}")
    return kind


def save_state_dict(model, path, format=None):
    """Write ``model.state_dict()`` to ``path`` (atomically) or a binary file object, as
    safetensors or npz (from the suffix, or ``format``)."""
    from .format import check_target, write_to
    where = "Sequential.save_state_dict"
    check_target(path, where)
    kind = _format(path, format, where)
    state = {k: np.require(v, requirements="C") for k, v in model.state_dict().items()}
    if kind == ".safetensors":
        data = _require_safetensors().save(state, metadata={"format": "np",
                                                             "producer": "cdl"})
    else:
        buf = io.BytesIO()
        np.savez(buf, **state)
        data = buf.getvalue()
    write_to(path, lambda f: f.write(data))


def _safetensors_extent(data):
    """The length of the safetensors file at the start of ``data`` (8-byte header size,
    JSON header, then the tensors up to the last one's end), or None if its header
    cannot be read (the safetensors library then says what is wrong)."""
    import json
    try:
        n = int.from_bytes(bytes(data[:8]), "little")
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, AttributeError, KeyError, IndexError,
            UnicodeDecodeError, RecursionError):
        return None
    return 8 + n + max(ends, default=0)


def read_state_dict_file(path, format=None, where="cdl.load_state_dict_file", expect=None):
    """The {name: array} a .safetensors or .npz state-dict file (a path, a binary file
    object or bytes) holds: the first file there. A file object is read from its position
    up to the end of the file there and left right after it. ``expect``: the model's
    {name: array}, to read of an .npz only what the model can take."""
    from .format import read_stream, zip_extent

    binary = f"{where}: the file object must be opened in binary mode ('rb')"
    if isinstance(path, io.TextIOBase):
        raise TypeError(binary)
    if not hasattr(path, "read") and not isinstance(path, (str, bytes, os.PathLike) + _BYTES):
        raise TypeError(f"{where}: expected a path, bytes or a binary file object, got "
                        f"{type(path).__name__}")
    kind = _format(path, format, where)
    extent = _safetensors_extent if kind == ".safetensors" else zip_extent
    if _is_data(path):
        name = "<bytes>"
        data, whole = read_stream(io.BytesIO(path), extent)
    elif hasattr(path, "read"):
        (data, whole), name = read_stream(path, extent), getattr(path, "name", "<file object>")
    else:
        name = os.fspath(path)
        with open(name, "rb") as f:
            data, whole = read_stream(f, extent)
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(binary)
    if kind == ".npz" and not whole and data[:4] == b"PK\x03\x04":
        # a zip without its end here: zipfile would read a later archive, if any
        raise ValueError(f"{where}: {name} is not a valid .npz file: it is truncated or "
                         f"damaged (no zip archive that starts here ends)")
    if kind == ".safetensors":
        st = _require_safetensors()
        try:
            return dict(st.load(bytes(data)))
        except Exception as exc:  # SafetensorError, unknown dtypes, ...
            odd = _dtypes_numpy_lacks(data)
            if odd:
                raise ValueError(f"{where}: {name} holds {odd[0][0]!r} as {odd[0][1]}, which "
                                 f"NumPy cannot hold ({len(odd)} such tensor(s)); save it as "
                                 f"float32 (in PyTorch: {{k: v.float() for k, v in "
                                 f"sd.items()}})") from None
            raise ValueError(f"{where}: {name} is not a valid safetensors file "
                             f"({type(exc).__name__}: {exc})") from None
    from .format import checked_npz_arrays
    return checked_npz_arrays(io.BytesIO(bytes(data)), name, len(data), where, expect)


def _dtypes_numpy_lacks(data):
    """[(tensor name, dtype)] of a safetensors header's tensors in dtypes such as BF16 or
    FP8 that NumPy has no type for ([] if the header cannot be read)."""
    import json
    try:
        n = int.from_bytes(bytes(data[:8]), "little")
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
        return [(k, v["dtype"]) for k, v in header.items()
                if k != "__metadata__" and isinstance(v, dict)
                and (v.get("dtype") == "BF16" or str(v.get("dtype", "")).startswith("F8"))]
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError):
        return []


def load_state_dict_file(model, path, format=None):
    """Load a .safetensors or .npz state-dict file (e.g. written by PyTorch with
    ``safetensors.torch.save_file(net.state_dict(), path)``) into ``model``: every key,
    shape and dtype is checked before anything changes. ``path``: a path, a binary file
    object or the file's bytes (then ``format`` is needed). Returns the model."""
    from ..model import Sequential

    where = "cdl.load_state_dict_file"
    if not isinstance(model, Sequential):
        raise TypeError(f"{where}: model must be a cdl.Sequential, got {type(model).__name__}")
    state = read_state_dict_file(path, format, where, expect=model._state_targets())
    model.load_state_dict(state, where=where)
    return model
