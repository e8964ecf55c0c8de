"""cdl's model file: an uncompressed .npz (zip) holding

- ``__cdl__``: a uint8 array with a UTF-8 JSON header: format name and version,
  the architecture (input shape, dtype, l2, each layer's type and config,
  nested for containers), the name, shape and dtype of every stored array,
  the optimizer's type, settings and step, and the state a copy needs to train
  bit for bit (the model's shuffling generator, Dropout's generator position);
- ``param/<name>``: each parameter, ``buffer/<name>``: each buffer (BatchNorm's
  running statistics), ``optim/<state>/<name>``: the optimizer's state.

Version 1 files (parameters and SGD velocities only) still load.

Files are read with ``allow_pickle=False`` and only registered layer and
optimizer types are built, so loading never runs code from the file. The
header is validated against the architecture before any weight is read; zip
CRCs catch corrupted data. What a load inflates is bounded by what the model
holds: the header member may take at most ``MAX_HEADER_BYTES``, and every
other member's .npy header is checked against the exact array the architecture
(or the optimizer) needs before its data is read, so a small file of
compressed members cannot make a load allocate more; members compressed other
than by deflate (what ``np.savez_compressed`` writes) are refused.

``save`` writes a temporary file in the same folder, syncs it and renames it
over the target (``os.replace``), so an interrupted save leaves any previous
file intact; as with a plain ``open()``, an existing file keeps its permission
bits and a symbolic link is written through (its target is replaced).
``dumps``/``loads`` and pickling use the same format in memory. A file object
is read from its position to the end of the model's archive and left there, so
several models (or a model and other data) can follow one another in one
stream; a path holding several gives the first, as a file object would.
"""
import hashlib
import io
import json
import os
import stat
import struct
import tempfile
import zipfile

import numpy as np

from ..functional._checks import shape_str

__all__ = ["save", "load", "dumps", "loads"]

FORMAT = "cdl-model"
VERSION = 2
HEADER = "__cdl__"
MAX_HEADER_BYTES = 16 << 20
"""The most the JSON header member may hold: a model of thousands of layers needs well
under 1 MiB, and a compressed member claiming more is refused before it is read."""


def _header(model, optimizer):
    arrays = {}
    entries = []

    def add(name, a):
        arrays[name] = a
        entries.append({"name": name, "shape": list(a.shape), "dtype": a.dtype.name})

    for key, p, _ in model.parameters():
        add(f"param/{key}", p)
    for key, b in model.buffers():
        add(f"buffer/{key}", b)
    opt = None
    if optimizer is not None:
        if getattr(optimizer, "model", None) is not model:
            raise ValueError("save: optimizer belongs to another model")
        state = optimizer.state_dict()
        opt = {"type": state["type"], "config": state["config"], "base_lr": state["base_lr"],
               "step": state["step"], "state": sorted(state["state"])}
        for b, per in state["state"].items():
            for key, a in per.items():
                add(f"optim/{b}/{key}", a)
    extra = {path.rstrip("."): layer.extra_state() for path, layer in model.chain.walk()
             if layer.extra_state()}
    header = {"format": FORMAT, "version": VERSION, "model": model.get_config(),
              "arrays": entries, "optimizer": opt, "extra": extra,
              "rng": model._rng.bit_generator.state}
    return header, arrays


def _write(model, f, optimizer):
    # (from the live weights: a save from another thread while one trains the model may
    # mix two steps; fit's callbacks run between steps, README "Threads")
    header, arrays = _header(model, optimizer)
    blob = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    np.savez(f, **{HEADER: blob}, **arrays)


def _umask():
    """The process umask, read without changing it where possible (os.umask can only read
    it by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(base):
    """The temporary file's name before mkstemp's random part: ".<name>." for the usual
    names; a long name is cut and given a hash, so the temporary name stays within the
    file system's limit whenever ``name`` itself does (255 bytes on most)."""
    if len(os.fsencode(base)) <= 200:
        return f".{base}."
    digest = hashlib.sha256(os.fsencode(base)).hexdigest()[:16]
    return f".{base[:40]}~{digest}."


def atomic_write(path, write):
    """Call ``write(f)`` on a temporary file in ``path``'s folder, sync it and rename it
    over ``path``: an interrupted write leaves any previous file intact. As a plain
    open() would, the file gets the umask's mode when new and keeps its permission bits
    when it exists, and a symbolic link is written through (the link stays). An OSError
    names ``path``, never the temporary file."""
    shown = path = os.fsdecode(os.fspath(path))     # (a bytes path too)
    target = os.path.realpath(path)     # (a dangling link: the file open() would create)
    folder, base = os.path.split(target)
    prefix = _temp_prefix(os.fsdecode(base))
    try:
        mode = os.stat(target).st_mode & 0o777
    except OSError:                     # a new file (or an unreadable folder: mkstemp says)
        mode = 0o666 & ~_umask()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)     # (mkstemp makes the file 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and exc.errno is not None and (
                exc.filename is None
                or os.path.basename(os.fsdecode(exc.filename)).startswith(prefix)):
            raise type(exc)(exc.errno, exc.strerror, shown) from None
        raise


def check_target(target, where, name="path", paths=(str, bytes, os.PathLike)):
    """Refuse (TypeError, naming the call) what a save cannot write to: a text-mode file
    object, or something neither a path nor a binary file object. Checked before the
    work that makes the bytes."""
    if isinstance(target, io.TextIOBase):
        raise TypeError(f"{where}: the file object must be opened in binary mode ('wb')")
    if not hasattr(target, "write") and not isinstance(target, paths):
        raise TypeError(f"{where}: {name} must be a path or a binary file object, got "
                        f"{type(target).__name__}")


def write_to(target, write):
    """``write(f)`` to a binary file object, or atomically to a path (``atomic_write``)."""
    if hasattr(target, "write"):
        write(target)
    else:
        atomic_write(target, write)


def save(model, path, optimizer=None):
    """Write ``model`` (and ``optimizer``'s state, if given) to ``path`` atomically, or
    to a binary file object."""
    check_target(path, "Sequential.save")
    write_to(path, lambda f: _write(model, f, optimizer))


def dumps(model, optimizer=None):
    """The model (and optimizer state) as bytes in the model-file format."""
    buf = io.BytesIO()
    _write(model, buf, optimizer)
    return buf.getvalue()


def loads(data, optimizer=False):
    """A model from ``dumps``'s bytes (``optimizer=True``: (model, optimizer or None))."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"cdl.loads: expected bytes, got {type(data).__name__}")
    return load(io.BytesIO(bytes(data)), optimizer=optimizer)


def _unpickle(data):
    """What pickle calls to rebuild a Sequential (see Sequential.__reduce__)."""
    return loads(data)


def _fail(path, why):
    return ValueError(f"cdl.load: {path!s} is not a valid cdl model file: {why}")


def _npy_header(npz, name, size, fail):
    """(shape, dtype) that member ``name`` declares in its .npy header, read without
    reading its data, after checking that the data it declares fits in what the
    member stores and the member in the container (so a lying header cannot make a
    reader allocate more than the file backs)."""
    zf = getattr(npz, "zip", None)
    if zf is None:
        raise fail(f"array {name!r} is not in a zip container")
    try:
        info = zf.getinfo(name + ".npy")
    except KeyError:
        raise fail(f"array {name!r} is missing") from None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # (bzip2 and lzma inflate one small read into megabytes, beyond any check here)
        raise fail(f"array {name!r} is compressed with zip method {info.compress_type}; only "
                   f"stored and deflated members (np.savez, np.savez_compressed) are read")
    stored_limit = max(size, 0) if info.compress_type == 0 else max(size, 0) * 1100
    if info.file_size > stored_limit:
        raise fail(f"array {name!r} declares {info.file_size} bytes, more than the "
                   f"{size}-byte file can hold")
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy version {version} is not supported")
            offset = f.tell()
    except Exception as exc:  # zipfile / numpy format errors of many kinds
        raise fail(f"array {name!r} is corrupted or unreadable "
                   f"({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise fail(f"array {name!r} holds Python objects (never unpickled)")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > info.file_size - offset:
        raise fail(f"array {name!r} declares {dtype} {shape_str(shape)} ({need} bytes) but "
                   f"stores {info.file_size - offset}")
    return tuple(shape), dtype


def _member(npz, name, path, expect=None, limit=None):
    """One stored array; any failure to decode it is the file's fault, reported as such.
    ``expect`` = (shape, dtype name) is checked against the .npy header first, as is
    ``limit``, the most bytes its data may take."""
    fail = lambda why: _fail(path, why)  # noqa: E731
    shape, dtype = _npy_header(npz, name, getattr(npz, "cdl_size", 0), fail)
    if expect is not None and (shape != tuple(expect[0]) or dtype.name != expect[1]):
        raise fail(f"array {name!r} is {dtype} {shape_str(shape)}, the header says "
                   f"{expect[1]} {shape_str(expect[0])}")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if limit is not None and need > limit:
        raise fail(f"array {name!r} declares {need} bytes, more than the {limit} it may take")
    try:
        a = npz[name]
    except KeyError:
        raise _fail(path, f"array {name!r} is missing") from None
    except Exception as exc:  # zipfile / numpy format errors of many kinds
        raise _fail(path, f"array {name!r} is corrupted or unreadable "
                          f"({type(exc).__name__}: {exc})") from None
    if not isinstance(a, np.ndarray):
        raise _fail(path, f"member {name!r} is not a .npy array")
    return a


def checked_npz_arrays(f, name, size, where, expect=None):
    """Every array of an .npz (a state-dict file) as {name: array}, each .npy header
    checked against the stored sizes before its data is read; never unpickles.

    With ``expect`` ({name: array}, the model's), only the arrays the model can take (its
    names and shapes, numeric) are read, so what a load inflates is bounded by the
    model's size; the others come back as stand-ins of their declared shape and dtype
    with no data (zero strides), for the model's checks to name."""
    fail = lambda why: ValueError(f"{where}: {name} is not a valid .npz file: {why}")  # noqa: E731
    try:
        npz = np.load(f, allow_pickle=False)
    except Exception as exc:
        raise fail(f"{type(exc).__name__}: {exc}") from None
    if not hasattr(npz, "files"):
        raise fail("it holds a single array, not a dict of arrays")
    out = {}
    with npz:
        declared = {key: _npy_header(npz, key, size, fail) for key in npz.files}
        for key, (shape, dtype) in declared.items():
            target = None if expect is None else expect.get(key)
            if expect is not None and (target is None or shape != target.shape
                                       or dtype.kind not in "fiub"):
                if dtype.itemsize > 64:     # (a stand-in holds one element)
                    raise fail(f"array {key!r} has {dtype.itemsize}-byte elements "
                               f"({dtype}), not numbers")
                try:
                    out[key] = np.broadcast_to(np.zeros((), dtype), shape)
                except ValueError as exc:   # (a shape beyond NumPy's sizes)
                    raise fail(f"array {key!r} declares {dtype} {shape_str(shape)} ({exc})") \
                        from None
                continue
            try:
                out[key] = npz[key]
            except Exception as exc:
                raise fail(f"array {key!r} is corrupted or unreadable "
                           f"({type(exc).__name__}: {exc})") from None
    return out


def _read_header(npz, path):
    if HEADER not in npz.files:
        raise _fail(path, f"no '{HEADER}' header (a foreign .npz?)")
    raw = _member(npz, HEADER, path, limit=MAX_HEADER_BYTES)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _fail(path, "the header is not a byte string")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (bad UTF-8 or JSON, ints over 4300 digits)
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(path, "the header does not name the cdl-model format")
    if header.get("version") not in (1, VERSION):
        raise _fail(path, f"format version {header.get('version')!r} is not supported "
                          f"(this cdl reads versions 1 and {VERSION})")
    return header


def _declared_params(spec):
    """Parameter count a layer spec asks for, from its class's ``declared_params``."""
    from ..layers import LAYER_TYPES

    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) \
            or spec["type"] not in LAYER_TYPES:
        return 0
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        return 0
    try:
        return int(LAYER_TYPES[spec["type"]].declared_params(config))
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return 0  # the layer's own constructor reports the bad config


MAX_NESTING = 64
"""Containers (Residual) nested deeper than this are refused: no real network needs
it, and a hostile header could otherwise make building the model slow."""


def _nesting(specs):
    """How deep container configs nest inside a layer list (iteratively: a hostile
    header cannot make this recurse)."""
    deepest, stack = 0, [(s, 1) for s in specs]
    while stack:
        spec, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_NESTING:
            break
        config = spec.get("config") if isinstance(spec, dict) else None
        if isinstance(config, dict):
            for value in config.values():
                if isinstance(value, list):
                    stack.extend((v, depth + 1) for v in value if isinstance(v, dict))
    return deepest


def _build(header, path, size):
    from ..layers import LAYER_TYPES
    from ..model import Sequential

    cfg = header.get("model")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
        raise _fail(path, "the header has no layer list")
    if cfg.get("dtype") not in ("float32", "float64"):
        raise _fail(path, f"unsupported dtype {cfg.get('dtype')!r}")
    if _nesting(cfg["layers"]) > MAX_NESTING:
        raise _fail(path, f"layers nest more than {MAX_NESTING} levels deep")
    # Before allocating anything: the weights the architecture needs must fit in the
    # file (a damaged or hostile header cannot make load allocate gigabytes).
    need = sum(_declared_params(s) for s in cfg["layers"]) * np.dtype(cfg["dtype"]).itemsize
    if need > size:
        raise _fail(path, f"the architecture needs {need} bytes of weights but the file has "
                          f"only {size} bytes")
    layers = []
    for i, spec in enumerate(cfg["layers"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) \
                or spec["type"] not in LAYER_TYPES:
            raise _fail(path, f"layer {i} has unknown type {spec!r}")
        kwargs = spec.get("config") or {}
        if not isinstance(kwargs, dict):
            raise _fail(path, f"layer {i} has a malformed config")
        try:
            layers.append(LAYER_TYPES[spec["type"]].from_config(kwargs))
        except (TypeError, ValueError, KeyError, RecursionError) as exc:
            raise _fail(path, f"layer {i} ({spec['type']}): {exc}") from None
    activation = cfg.get("onnx_output_activation")
    if activation not in (None, "softmax", "log_softmax"):
        raise _fail(path, f"onnx_output_activation {activation!r} is not 'softmax', "
                          f"'log_softmax' or absent")
    try:
        model = Sequential(layers, cfg.get("input_shape"), dtype=cfg["dtype"],
                           l2=cfg.get("l2", 0.0))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"the architecture is inconsistent: {exc}") from None
    if activation is not None:
        model.onnx_output_activation = activation
    return model


def _read_array(npz, entry, path):
    a = _member(npz, entry["name"], path, (entry["shape"], entry["dtype"]))
    if a.shape != tuple(entry["shape"]) or a.dtype.name != entry["dtype"]:
        raise _fail(path, f"array {entry['name']!r} is {a.dtype} {shape_str(a.shape)}, the "
                          f"header says {entry['dtype']} {shape_str(entry['shape'])}")
    return a


_EOCD = b"PK\x05\x06"              # a zip's end-of-central-directory record
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


def _archive_end(data, pos):
    """Where the zip archive that starts at data[0] ends, if the end record at ``pos``
    closes it, else None. It closes it when its central directory lies just before
    it, the directory's entries fill it exactly, and the first local header they name
    is at 0: the offsets count from wherever the writer's stream began, so they are
    compared only with each other."""
    if pos + 22 > len(data):
        return None
    entries, cd_size, cd_offset, comment = struct.unpack_from("<HIIH", data, pos + 10)
    cd_end = pos
    if pos >= 76 and data[pos - 20:pos - 16] == _ZIP64_LOCATOR \
            and data[pos - 76:pos - 72] == _ZIP64_EOCD:
        # zip64 (over 65535 entries or 4 GiB): the sizes are in the zip64 record
        entries, cd_size, cd_offset = struct.unpack_from("<QQQ", data, pos - 76 + 32)
        cd_end = pos - 76
    cd_start, end = cd_end - cd_size, pos + 22 + comment
    if cd_start < 0 or end > len(data):
        return None
    first, at = cd_start, cd_start     # an empty archive is its end record alone
    for _ in range(entries):
        if at + 46 > cd_end or data[at:at + 4] != b"PK\x01\x02":
            return None
        offset = struct.unpack_from("<I", data, at + 42)[0]
        if offset != 0xFFFFFFFF:        # (else in a zip64 extra field: not checked)
            first = min(first, offset - (cd_offset - cd_start))
        at += 46 + sum(struct.unpack_from("<HHH", data, at + 28))  # name, extra, comment
    return end if at == cd_end and first == 0 else None


def zip_extent(data):
    """The length of the zip archive at the start of ``data`` (bytes that may go on with
    more data), or None when no complete archive starts there. zipfile reads the
    archive whose end record is last, so on a stream holding two models it would give
    the second; here the first end record that closes the archive starting at 0 wins."""
    pos = data.find(_EOCD)
    while pos >= 0:
        end = _archive_end(data, pos)
        if end is not None:
            return end
        pos = data.find(_EOCD, pos + 1)
    return None


def read_stream(f, extent):
    """(data, whole): what a binary file object holds from its position. ``extent(data)``
    gives the length of the one saved object there (None if it is incomplete); data is
    that object, and ``f`` is left right after it, so whatever follows can be read
    next. When ``extent`` finds no end, data is all that is left and whole is False.
    A stream that cannot seek back stays at its end."""
    try:
        start = f.tell()
    except (AttributeError, OSError, ValueError):
        start = None
    data = f.read()
    if not isinstance(data, (bytes, bytearray)):
        return data, False          # a text-mode file: the caller rejects it
    end = extent(data)
    if end is None or not 0 < end < len(data):
        return bytes(data), end == len(data)
    if start is not None:
        try:
            f.seek(start + end)
        except (AttributeError, OSError, ValueError):
            pass
    return bytes(data[:end]), True


_BINARY = "cdl.load: the file object must be opened in binary mode ('rb')"


def _from_path(name):
    """(source for np.load, size, first bytes, whole) for the file at ``name``: its first
    zip archive, as for a file object (zipfile alone reads the archive whose end record
    is last, the second of two models). The path itself when zipfile's archive is the one
    at the start (one model: nothing is read twice), else the file's bytes up to the end
    of the first archive."""
    with open(name, "rb") as f:
        info = os.fstat(f.fileno())
        if stat.S_ISREG(info.st_mode):     # (else a pipe or a device: read as a stream)
            magic = f.read(4)
            if magic != b"PK\x03\x04":
                return name, info.st_size, magic, True      # (refused by its magic)
            try:
                with zipfile.ZipFile(f) as zf:
                    starts = min((i.header_offset for i in zf.infolist()), default=0)
            except Exception:   # zipfile's errors of many kinds: decided by zip_extent
                starts = None
            if starts == 0:
                return name, info.st_size, magic, True
            f.seek(0)
        data, whole = read_stream(f, zip_extent)
    return io.BytesIO(data), len(data), data[:4], whole


def _open(path):
    """(npz, display name, size in bytes) for a path or a binary file object (read up
    to the end of the first model there)."""
    if isinstance(path, io.TextIOBase):
        raise TypeError(_BINARY)
    if hasattr(path, "read"):
        name = getattr(path, "name", None)
        name = name if isinstance(name, str) else "<file object>"   # (a pipe's is its fd)
        data, whole = read_stream(path, zip_extent)
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(_BINARY)
        source, size, magic = io.BytesIO(data), len(data), data[:4]
    elif isinstance(path, (str, bytes, os.PathLike)):
        name = os.fspath(path)
        source, size, magic, whole = _from_path(name)
    else:
        raise TypeError(f"cdl.load: path must be a path or a binary file object, got "
                        f"{type(path).__name__}")
    if magic != b"PK\x03\x04":
        raise _fail(name, "it is not a zip/npz container" if magic else "the file is empty")
    if not whole:       # (zipfile would read a later archive in the stream, if any)
        raise _fail(name, "the container is truncated or damaged (no zip archive that "
                          "starts here ends)")
    try:
        npz = np.load(source, allow_pickle=False)
    except Exception as exc:  # zipfile raises several types for damaged containers
        raise _fail(name, f"the container is truncated or damaged "
                          f"({type(exc).__name__}: {exc})") from None
    if not hasattr(npz, "files"):
        raise _fail(name, "it holds a single array, not a cdl model")
    npz.cdl_size = size
    return npz, name, size


def load(path, optimizer=False):
    """Read a model saved with ``model.save`` (a path or a binary file object);
    predictions are bit-identical.

    With ``optimizer=True`` returns (model, optimizer or None), restoring the
    optimizer's settings, step and state when the file has them.
    """
    npz, path, size = _open(path)
    with npz:
        header = _read_header(npz, path)
        model = _build(header, path, size)
        entries = header.get("arrays")
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str)
                and isinstance(e.get("shape"), list) and isinstance(e.get("dtype"), str)
                for e in entries):
            raise _fail(path, "the array list in the header is malformed")
        by_name = {e["name"]: e for e in entries}
        # Check the header against the architecture before reading any weights.
        wanted = [(f"param/{k}", "parameter", k, p) for k, p, _ in model.parameters()]
        if header["version"] >= 2:
            wanted += [(f"buffer/{k}", "buffer", k, b) for k, b in model.buffers()]
            declared = {e["name"][7:] for e in entries if e["name"].startswith("buffer/")}
            extra = sorted(declared - {k for k, _ in model.buffers()})
            if extra:
                raise _fail(path, f"buffers {extra} do not belong to any layer")
        for name, kind, key, target in wanted:
            e = by_name.get(name)
            if e is None:
                raise _fail(path, f"{kind} {key} is not in the file")
            if tuple(e["shape"]) != target.shape or e["dtype"] != target.dtype.name:
                raise _fail(path, f"{kind} {key} is {e['dtype']} {shape_str(e['shape'])} "
                                  f"but the architecture needs {target.dtype} "
                                  f"{shape_str(target.shape)}")
        values = [(target, _read_array(npz, by_name[name], path))
                  for name, _, _, target in wanted]
        _restore_extra(model, header, path)
        for target, value in values:
            target[...] = value
        if not optimizer:
            return model
        return model, _load_optimizer(model, header, npz, by_name, path)


def _restore_extra(model, header, path):
    extra = header.get("extra") or {}
    if not isinstance(extra, dict):
        raise _fail(path, "the extra state is malformed")
    layers = {p.rstrip("."): layer for p, layer in model.chain.walk()}
    for key, state in extra.items():
        if key not in layers or not isinstance(state, dict):
            raise _fail(path, f"extra state for {key!r} matches no layer")
        try:
            layers[key].set_extra_state(state)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _fail(path, str(exc)) from None
    rng = header.get("rng")
    if rng is not None:
        try:
            model._rng.bit_generator.state = rng
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            raise _fail(path, f"the generator state is malformed ({exc})") from None


def _load_optimizer(model, header, npz, by_name, path):
    from ..optim import OPTIMIZER_TYPES

    spec = header.get("optimizer")
    if not spec:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) \
            or spec["type"] not in OPTIMIZER_TYPES or not isinstance(spec.get("config"), dict):
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise _fail(path, f"unknown optimizer {kind!r}")
    try:
        opt = OPTIMIZER_TYPES[spec["type"]](model, **spec["config"])
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"bad optimizer settings: {exc}") from None
    base_lr = spec.get("base_lr", opt.lr)
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)):
        raise _fail(path, f"bad optimizer settings: base_lr must be a number, got {base_lr!r}")
    if header["version"] == 1:     # SGD velocities as optim/<param>
        vel = spec.get("velocities", [])
        if not isinstance(vel, list) or not all(isinstance(k, str) for k in vel):
            raise _fail(path, "the optimizer's velocity list is malformed")
        names = {"momentum_buffer": vel} if vel else {}
        prefix = lambda b, k: f"optim/{k}"  # noqa: E731
    else:
        listed = spec.get("state", [])
        if not isinstance(listed, list) or not all(isinstance(b, str) for b in listed):
            raise _fail(path, "the optimizer's state list is malformed")
        names = {b: opt.pack.names for b in listed}
        prefix = lambda b, k: f"optim/{b}/{k}"  # noqa: E731
    state = {}
    for b, keys in names.items():
        if b not in opt.buffers:
            raise _fail(path, f"optimizer state {b!r} does not match the optimizer")
        state[b] = {}
        for key in keys:
            if key not in opt.pack.names or prefix(b, key) not in by_name:
                raise _fail(path, f"optimizer state {key!r} does not match the model")
            e, shape = by_name[prefix(b, key)], opt.pack.shapes[key]
            if tuple(e["shape"]) != shape or e["dtype"] != model.dtype.name:
                # (before its data is read: the header's shape is not to be trusted)
                raise _fail(path, f"optimizer state {prefix(b, key)!r} is {e['dtype']} "
                                  f"{shape_str(e['shape'])} but the optimizer holds "
                                  f"{model.dtype} {shape_str(shape)}")
            state[b][key] = _read_array(npz, e, path)
    if header["version"] == 1 and opt.buffers:
        for b in opt.buffers:
            per = state.setdefault(b, {})
            for key in opt.pack.names:
                per.setdefault(key, np.zeros(opt.pack.shapes[key], model.dtype))
    try:
        opt.load_state_dict({"type": spec["type"], "step": spec.get("step", 0),
                             "base_lr": base_lr, "state": state})
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"bad optimizer state: {exc}") from None
    return opt
