"""One-file model format: an uncompressed .npz (zip) holding

- ``__cdl__``: a uint8 array with a UTF-8 JSON header: format name and version,
  the architecture (input shape, dtype, l2, each layer's type and config), the
  name, shape and dtype of every stored array, and optional optimizer settings;
- ``param/<i>.<name>``: each parameter, ``optim/<i>.<name>``: each velocity.

Files are read with ``allow_pickle=False`` and only whitelisted layer types are
built, so loading never runs code from the file. The header is validated
against the architecture before any weight is read; zip CRCs catch corrupted
data. ``save`` writes a temporary file in the same folder, syncs it and renames
it over the target (``os.replace``), so an interrupted save leaves any previous
file intact.
"""
import json
import os
import tempfile

import numpy as np

from .functional._checks import shape_str

__all__ = ["save", "load", "FORMAT", "VERSION"]

FORMAT = "cdl-model"
VERSION = 1
HEADER = "__cdl__"


def _header(model, optimizer):
    arrays = {}
    entries = []
    for key, p, _ in model.parameters():
        name = f"param/{key}"
        arrays[name] = p
        entries.append({"name": name, "shape": list(p.shape), "dtype": p.dtype.name})
    opt = None
    if optimizer is not None:
        if getattr(optimizer, "model", None) is not model:
            raise ValueError("save: optimizer belongs to another model")
        opt = {"type": type(optimizer).__name__, "config": optimizer.get_config(),
               "base_lr": optimizer.base_lr, "velocities": []}
        for key, v in optimizer.velocities.items():
            name = f"optim/{key}"
            arrays[name] = v
            opt["velocities"].append(key)
            entries.append({"name": name, "shape": list(v.shape), "dtype": v.dtype.name})
    header = {"format": FORMAT, "version": VERSION, "model": model.get_config(),
              "arrays": entries, "optimizer": opt}
    return header, arrays


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


def save(model, path, optimizer=None):
    """Write ``model`` (and ``optimizer``'s state, if given) to ``path`` atomically."""
    path = os.fspath(path)
    header, arrays = _header(model, optimizer)
    blob = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; give it the mode a plain open() would
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            np.savez(f, **{HEADER: blob}, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _fail(path, why):
    return ValueError(f"cdl.load: {path!s} is not a valid cdl model file: {why}")


def _member(npz, name, path):
    """One stored array; any failure to decode it is the file's fault, reported as such."""
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


def _read_header(npz, path):
    if HEADER not in npz.files:
        raise _fail(path, f"no '{HEADER}' header (a foreign .npz?)")
    raw = _member(npz, HEADER, path)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _fail(path, "the header is not a byte string")
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(path, "the header does not name the cdl-model format")
    if header.get("version") != VERSION:
        raise _fail(path, f"format version {header.get('version')!r} is not supported "
                          f"(this cdl reads version {VERSION})")
    return header


def _declared_params(spec):
    """Parameter count a layer config asks for, computed without building the layer."""
    c = spec.get("config") or {}
    if not isinstance(c, dict):
        return 0
    try:
        if spec.get("type") == "Linear":
            n, k = int(c["in_features"]), int(c["out_features"])
            return max(n, 0) * max(k, 0) + max(k, 0)
        if spec.get("type") == "Conv2d":
            ks = c["kernel_size"]
            kh, kw = (ks, ks) if isinstance(ks, int) else (int(ks[0]), int(ks[1]))
            i, o = int(c["in_channels"]), int(c["out_channels"])
            return max(o, 0) * max(i, 0) * max(kh, 0) * max(kw, 0) + max(o, 0)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return 0  # the layer's own constructor reports the bad config
    return 0


def _build(header, path):
    from .layers import LAYER_TYPES
    from .model import Sequential

    cfg = header.get("model")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
        raise _fail(path, "the header has no layer list")
    if cfg.get("dtype") not in ("float32", "float64"):
        raise _fail(path, f"unsupported dtype {cfg.get('dtype')!r}")
    # Before allocating anything: the weights the architecture needs must fit in the
    # file (a damaged or hostile header cannot make load allocate gigabytes).
    need = sum(_declared_params(s) for s in cfg["layers"] if isinstance(s, dict)) \
        * np.dtype(cfg["dtype"]).itemsize
    have = os.path.getsize(path)
    if need > have:
        raise _fail(path, f"the architecture needs {need} bytes of weights but the file has "
                          f"only {have} bytes")
    layers = []
    for i, spec in enumerate(cfg["layers"]):
        if not isinstance(spec, dict) or spec.get("type") not in LAYER_TYPES:
            raise _fail(path, f"layer {i} has unknown type {spec!r}")
        kwargs = spec.get("config") or {}
        if not isinstance(kwargs, dict):
            raise _fail(path, f"layer {i} has a malformed config")
        try:
            layers.append(LAYER_TYPES[spec["type"]](**kwargs))
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"layer {i} ({spec['type']}): {exc}") from None
    try:
        return Sequential(layers, cfg.get("input_shape"), dtype=cfg["dtype"],
                          l2=cfg.get("l2", 0.0))
    except (TypeError, ValueError) as exc:
        raise _fail(path, f"the architecture is inconsistent: {exc}") from None


def _read_array(npz, entry, path):
    a = _member(npz, entry["name"], path)
    if a.shape != tuple(entry["shape"]) or a.dtype.name != entry["dtype"]:
        raise _fail(path, f"array {entry['name']!r} is {a.dtype} {shape_str(a.shape)}, the "
                          f"header says {entry['dtype']} {shape_str(entry['shape'])}")
    return a


def load(path, optimizer=False):
    """Read a model saved with ``model.save``; predictions are bit-identical.

    With ``optimizer=True`` returns (model, SGD or None), restoring lr, momentum
    and velocities when the file has them.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise _fail(path, "it is not a zip/npz container" if magic else "the file is empty")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile raises several types for damaged containers
        raise _fail(path, f"the container is truncated or damaged "
                          f"({type(exc).__name__}: {exc})") from None
    with npz:
        header = _read_header(npz, path)
        model = _build(header, path)
        entries = header.get("arrays")
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("name"), str)
                and isinstance(e.get("shape"), list) and isinstance(e.get("dtype"), str)
                for e in entries):
            raise _fail(path, "the array list in the header is malformed")
        by_name = {e["name"]: e for e in entries}
        # Check the header against the architecture before reading any weights.
        for key, p, _ in model.parameters():
            e = by_name.get(f"param/{key}")
            if e is None:
                raise _fail(path, f"parameter {key} is not in the file")
            if tuple(e["shape"]) != p.shape or e["dtype"] != p.dtype.name:
                raise _fail(path, f"parameter {key} is {e['dtype']} {shape_str(e['shape'])} "
                                  f"but the architecture needs {p.dtype} {shape_str(p.shape)}")
        for key, p, _ in model.parameters():
            p[...] = _read_array(npz, by_name[f"param/{key}"], path)
        if not optimizer:
            return model
        opt = None
        spec = header.get("optimizer")
        if spec:
            from .optim import SGD

            if not isinstance(spec, dict) or spec.get("type") != "SGD" \
                    or not isinstance(spec.get("config"), dict):
                kind = spec.get("type") if isinstance(spec, dict) else spec
                raise _fail(path, f"unknown optimizer {kind!r}")
            vel = spec.get("velocities", [])
            if not isinstance(vel, list) or not all(isinstance(k, str) for k in vel):
                raise _fail(path, "the optimizer's velocity list is malformed")
            try:
                opt = SGD(model, **spec["config"])
                opt.base_lr = float(spec.get("base_lr", opt.lr))
            except (TypeError, ValueError) as exc:
                raise _fail(path, f"bad optimizer settings: {exc}") from None
            for key in spec.get("velocities", []):
                if key not in opt.velocities or f"optim/{key}" not in by_name:
                    raise _fail(path, f"optimizer state {key!r} does not match the model")
                opt.velocities[key][...] = _read_array(npz, by_name[f"optim/{key}"], path)
        return model, opt
