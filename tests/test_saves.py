"""Nothing is lost: save is atomic (temporary file in the same folder, fsync, rename),
so an exception, Ctrl-C or SIGKILL during a save leaves the previous file intact
and loadable; an exception leaves no temporary file behind (a SIGKILL can leave a
hidden ``.<name>.*.tmp`` file, never a damaged target). ModelCheckpoint saves the
same way. load checks the header and the declared sizes before building, rejects
truncated, bit-flipped and foreign files with a ValueError, and never unpickles.
"""
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

import cdl
import cdl.io.format as ser


def make_model(seed=0):
    return cdl.Sequential([cdl.Conv2d(1, 4, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Flatten(), cdl.Linear(4 * 4 * 4, 10)], (1, 8, 8), seed=seed)


X = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)


def weights_equal(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    return wa.keys() == wb.keys() and all(wa[k].tobytes() == wb[k].tobytes() for k in wa)


def others(folder, keep=("model.npz",)):
    return sorted(f for f in os.listdir(folder) if f not in keep)


# ------------------------------------------------------------------ atomic save
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failing_save_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, exc):
    path = tmp_path / "model.npz"
    old = make_model(0)
    old.save(path)
    before = path.read_bytes()
    real = np.savez

    def half_then_fail(f, **arrays):
        buf = io.BytesIO()
        real(buf, **arrays)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])   # part of the file is written
        raise exc

    monkeypatch.setattr(ser.np, "savez", half_then_fail)
    with pytest.raises(type(exc)):
        make_model(1).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert weights_equal(cdl.load(path), old)
    assert others(tmp_path) == [], "a temporary file was left behind"


def test_failing_first_save_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ser.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        make_model().save(tmp_path / "model.npz")
    assert os.listdir(tmp_path) == []


CHILD = textwrap.dedent("""
    import sys, numpy as np, cdl
    path = sys.argv[1]
    m = cdl.Sequential([cdl.Linear(1500, 1500), cdl.ReLU(), cdl.Linear(1500, 10)], (1500,),
                       seed=0)
    i = 0
    while True:
        for _, p, _ in m.parameters():
            p[...] = i
        m.save(path)
        if i == 0:
            print("saved", flush=True)
        i += 1
""")


def test_sigkill_during_save_leaves_a_loadable_file(tmp_path):
    """Kill a child at random moments while it saves a 9 MB model in a loop."""
    path = tmp_path / "model.npz"
    rng = np.random.default_rng(0)
    for attempt in range(4):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout.readline().strip() == "saved"
            time.sleep(float(rng.uniform(0.05, 0.6)))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        m = cdl.load(path)              # never a half-written target
        ws = m.get_weights()
        values = {float(v.flat[0]) for v in ws.values()}
        assert len(values) == 1 and all((v == v.flat[0]).all() for v in ws.values()), \
            "the file mixes two saves"
        # a SIGKILL can leave a hidden temporary file, never a visible one
        assert all(f.startswith(".model.npz.") and f.endswith(".tmp") for f in others(tmp_path))


def test_model_checkpoint_never_leaves_half_written_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    m = make_model()
    opt = cdl.SGD(m, 0.05)
    ckpt = tmp_path / "model.npz"
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=1, verbose=0,
          callbacks=[cdl.ModelCheckpoint(ckpt, save_optimizer=True)])
    first = ckpt.read_bytes()
    real = np.savez
    calls = {"n": 0}

    def fail_in_second_epoch(f, **arrays):
        calls["n"] += 1
        buf = io.BytesIO()
        real(buf, **arrays)
        f.write(buf.getvalue()[:1000])
        raise OSError("disk full")

    monkeypatch.setattr(ser.np, "savez", fail_in_second_epoch)
    with pytest.raises(OSError, match="disk full"):
        m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=3, verbose=0,
              callbacks=[cdl.ModelCheckpoint(ckpt, save_optimizer=True)])
    monkeypatch.undo()
    assert calls["n"] == 1
    assert ckpt.read_bytes() == first and others(tmp_path) == []
    loaded, lopt = cdl.load(ckpt, optimizer=True)
    assert isinstance(lopt, cdl.SGD)
    # the model is still usable after the failed checkpoint
    assert np.isfinite(m.predict(x)).all()


def test_round_trip_is_bit_identical(tmp_path):
    m = make_model(3)
    m.save(tmp_path / "m.npz")
    assert m.predict(X).tobytes() == cdl.load(tmp_path / "m.npz").predict(X).tobytes()


# ------------------------------------------------------------------ damaged and foreign files
@pytest.fixture
def saved(tmp_path):
    m = make_model(2)
    path = tmp_path / "model.npz"
    m.save(path)
    return m, path, path.read_bytes()


@pytest.mark.parametrize("keep", [0, 3, 4, 30, 100, 0.25, 0.5, 0.9, -1])
def test_truncated_files(saved, tmp_path, keep):
    _, _, data = saved
    n = keep if isinstance(keep, int) and keep >= 0 else \
        (len(data) - 1 if keep == -1 else int(len(data) * keep))
    bad = tmp_path / "cut.npz"
    bad.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"cdl.load: .*cut.npz is not a valid cdl model file: "):
        cdl.load(bad)


def test_bit_flips_are_rejected_or_harmless(saved, tmp_path):
    """Every flipped bit gives a ValueError, or (in bytes load does not use, such as zip
    timestamps) the very same weights: never a crash, never silently different weights."""
    m, _, data = saved
    rng = np.random.default_rng(0)
    bad = tmp_path / "flip.npz"
    rejected = 0
    positions = np.concatenate([rng.integers(0, len(data), 150), np.arange(0, 64),
                                np.arange(len(data) - 64, len(data))])
    for pos in positions:
        b = bytearray(data)
        b[pos] ^= 1 << int(rng.integers(0, 8))
        bad.write_bytes(bytes(b))
        try:
            loaded = cdl.load(bad)
        except ValueError as exc:
            assert "is not a valid cdl model file" in str(exc)
            rejected += 1
            continue
        assert weights_equal(loaded, m), f"flip at byte {pos} changed the weights silently"
    assert rejected > len(positions) // 2


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_foreign_files(tmp_path):
    cases = {
        "text.npz": (b"hello, I am a text file\n", r"it is not a zip/npz container"),
        "npy.npz": (None, r"it is not a zip/npz container"),
        "zip.npz": (None, r"no '__cdl__' header \(a foreign .npz\?\)"),
        "random.npz": (None, r"no '__cdl__' header"),
        "badjson.npz": (None, r"the header is not valid JSON"),
        "otherformat.npz": (None, r"the header does not name the cdl-model format"),
        "version.npz": (None, r"format version 99 is not supported"),
        "floatheader.npz": (None, r"the header is not a byte string"),
        "deepjson.npz": (None, r"the header is not valid JSON"),
    }
    (tmp_path / "text.npz").write_bytes(cases["text.npz"][0])
    np.save(tmp_path / "npy.npz.npy", np.zeros(3))
    os.replace(tmp_path / "npy.npz.npy", tmp_path / "npy.npz")
    with zipfile.ZipFile(tmp_path / "zip.npz", "w") as z:
        z.writestr("readme.txt", "not a model")
    _write_npz(tmp_path / "random.npz", a=np.random.rand(3, 3))
    _write_npz(tmp_path / "badjson.npz", __cdl__=np.frombuffer(b"{not json", np.uint8))
    _write_npz(tmp_path / "otherformat.npz",
               __cdl__=np.frombuffer(json.dumps({"format": "keras"}).encode(), np.uint8))
    _write_npz(tmp_path / "version.npz", __cdl__=np.frombuffer(
        json.dumps({"format": "cdl-model", "version": 99}).encode(), np.uint8))
    _write_npz(tmp_path / "floatheader.npz", __cdl__=np.zeros(4))
    _write_npz(tmp_path / "deepjson.npz",   # 100,000 nested lists: RecursionError in json
               __cdl__=np.frombuffer(b"[" * 100000 + b"]" * 100000, np.uint8))
    for name, (_, match) in cases.items():
        with pytest.raises(ValueError, match=rf"cdl.load: .*{name} is not a valid cdl model "
                                             rf"file: {match}"):
            cdl.load(tmp_path / name)


MARKER = None


class Evil:
    """Unpickling this would create the marker file."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


def _header_of(path):
    with np.load(path, allow_pickle=False) as z:
        return json.loads(z["__cdl__"].tobytes())


def test_pickle_bearing_files_are_never_unpickled(saved, tmp_path):
    global MARKER
    m, path, _ = saved
    MARKER = str(tmp_path / "PWNED")
    header = _header_of(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    evil = np.array([Evil()], dtype=object)
    # 1. the header itself is a pickled object array
    _write_npz(tmp_path / "h.npz", __cdl__=evil)
    # 2. a valid header, one weight replaced by a pickled object array
    a2 = dict(arrays)
    a2["param/0.weight"] = evil
    _write_npz(tmp_path / "w.npz", **a2)
    # 3. a valid header naming an object dtype for a weight
    h3 = json.loads(json.dumps(header))
    for e in h3["arrays"]:
        if e["name"] == "param/0.weight":
            e["dtype"], e["shape"] = "object", [1]
    a3 = dict(arrays)
    a3["__cdl__"] = np.frombuffer(json.dumps(h3).encode(), np.uint8)
    a3["param/0.weight"] = evil
    _write_npz(tmp_path / "d.npz", **a3)
    for name in ("h.npz", "w.npz", "d.npz"):
        with pytest.raises(ValueError, match=rf"cdl.load: .*{name} is not a valid cdl model file"):
            cdl.load(tmp_path / name, optimizer=True)
        assert not os.path.exists(MARKER), f"loading {name} executed code from the file"


def _rewrite(path, out, header=None, **replace):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if header is not None:
        arrays["__cdl__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    arrays.update(replace)
    _write_npz(out, **arrays)
    return out


def test_header_is_checked_against_the_architecture(saved, tmp_path):
    m, path, _ = saved
    h = _header_of(path)

    def variant(fn):
        hh = json.loads(json.dumps(h))
        fn(hh)
        return hh

    cases = [
        (variant(lambda hh: hh["model"]["layers"].__setitem__(0, {"type": "os.system",
                                                                  "config": {}})),
         r"layer 0 has unknown type"),
        (variant(lambda hh: hh["model"]["layers"][0].__setitem__("type", "__import__")),
         r"layer 0 has unknown type"),
        (variant(lambda hh: hh["model"]["layers"][4]["config"].__setitem__("in_features", 65)),
         r"the architecture is inconsistent: Linear\[4\]: expected 65 input features, got 64"),
        (variant(lambda hh: hh["model"]["layers"][0]["config"].__setitem__("kernel_size", [0, 3])),
         r"layer 0 \(Conv2d\): Conv2d: kernel_size must be >= 1"),
        (variant(lambda hh: hh["model"]["layers"][0]["config"].__setitem__("evil", 1)),
         r"layer 0 \(Conv2d\)"),
        (variant(lambda hh: hh["model"].__setitem__("dtype", "int8")), r"unsupported dtype 'int8'"),
        (variant(lambda hh: hh["model"].__setitem__("input_shape", [1, -8, 8])),
         r"the architecture is inconsistent: Sequential: input_shape"),
        (variant(lambda hh: hh["arrays"][0].__setitem__("shape", [4, 1, 3, 4])),
         r"parameter 0.weight is float32 4x1x3x4 but the architecture needs float32 4x1x3x3"),
        (variant(lambda hh: hh["arrays"][0].__setitem__("dtype", "float64")),
         r"parameter 0.weight is float64 4x1x3x3 but the architecture needs float32"),
        (variant(lambda hh: hh["arrays"].pop(0)), r"parameter 0.weight is not in the file"),
        (variant(lambda hh: hh.__setitem__("arrays", "nope")), r"the array list in the header is malformed"),
        (variant(lambda hh: hh.__setitem__("model", None)), r"the header has no layer list"),
        # numpy raises OverflowError for these; the file is still just malformed
        (variant(lambda hh: hh["rng"]["state"].__setitem__("state", -1)),
         r"the generator state is malformed"),
        (variant(lambda hh: hh["rng"].__setitem__("has_uint32", 1e308)),
         r"the generator state is malformed"),
        # a header asking for 46340x46340 weights (8.6 GB) in a tiny file: refused before
        # anything is allocated
        (variant(lambda hh: hh["model"]["layers"].__setitem__(4, {
            "type": "Linear", "config": {"in_features": 46340, "out_features": 46340}})),
         r"the architecture needs \d+ bytes of weights but the file has only \d+ bytes"),
    ]
    for i, (header, match) in enumerate(cases):
        bad = _rewrite(path, tmp_path / f"h{i}.npz", header)
        with pytest.raises(ValueError, match=rf"cdl.load: .* is not a valid cdl model file: {match}"):
            cdl.load(bad)


def test_bad_optimizer_sections(tmp_path):
    m = make_model()
    path = tmp_path / "m.npz"
    m.save(path, optimizer=cdl.SGD(m, 0.1, momentum=0.9))
    h = _header_of(path)
    for i, (opt, match) in enumerate([
            ("garbage", r"unknown optimizer 'garbage'"),
            ({"type": "Adagrad", "config": {}}, r"unknown optimizer 'Adagrad'"),
            ({"type": "SGD", "config": {"lr": "x"}}, r"bad optimizer settings: SGD: lr must be"),
            ({"type": "SGD", "config": {"lr": 0.1}, "state": 5}, r"the optimizer.s state list is malformed"),
            ({"type": "SGD", "config": {"lr": 0.1}, "state": ["momentum_buffer"]},
             r"optimizer state 'momentum_buffer' does not match the optimizer"),
            ({"type": "SGD", "config": {"lr": 0.1, "momentum": 0.9}, "state": []},
             r"bad optimizer state: .*missing state 'momentum_buffer'"),
            ({"type": "SGD", "config": {"lr": 0.1}, "base_lr": [1]}, r"bad optimizer settings"),
            ({"type": "SGD", "config": {"lr": 0.1}, "base_lr": -1.0},
             r"bad optimizer state: .*base_lr must be a finite number"),
            ({"type": "SGD", "config": {"lr": 0.1}, "step": 2**70},
             r"bad optimizer state: .*step must be an int in \[0, 2\*\*53\]")]):
        hh = dict(h, optimizer=opt)
        bad = _rewrite(path, tmp_path / f"o{i}.npz", hh)
        with pytest.raises(ValueError, match=rf"is not a valid cdl model file: {match}"):
            cdl.load(bad, optimizer=True)


def test_stored_arrays_must_match_the_header(saved, tmp_path):
    _, path, _ = saved
    for i, arr in enumerate([np.zeros((4, 1, 3, 4), np.float32), np.zeros((4, 1, 3, 3)),
                             np.zeros((4, 1, 3, 3), np.int32)]):
        bad = _rewrite(path, tmp_path / f"a{i}.npz", **{"param/0.weight": arr})
        with pytest.raises(ValueError, match=r"array 'param/0.weight' is .* the header says "
                                             r"float32 4x1x3x3"):
            cdl.load(bad)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_saves_honour_the_umask(tmp_path, umask):
    """A save gets the mode a plain open() would give, for a new file and over an old one."""
    model = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=0)
    old = os.umask(umask)
    try:
        (tmp_path / "plain").write_bytes(b"")  # what open() gives under this umask
        model.save(tmp_path / "m.npz")
        model.save(tmp_path / "m.npz")  # replacing an existing file
        cb_path = tmp_path / "ck.npz"
        cb = cdl.ModelCheckpoint(str(cb_path))
        cb.set_context(model, None)
        cb.on_epoch_end(0, {"loss": 1.0})
    finally:
        os.umask(old)
    want = (tmp_path / "plain").stat().st_mode & 0o777
    assert want == 0o666 & ~umask
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == want
    assert cb_path.stat().st_mode & 0o777 == want
    assert ser._umask() == old  # reading the umask does not change it


def test_umask_is_read_without_proc(monkeypatch):
    """Where /proc is missing, the umask is still read correctly and left as it was."""
    real_open = open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", no_proc)
    old = os.umask(0o037)
    try:
        assert ser._umask() == 0o037
        assert ser._umask() == 0o037
    finally:
        os.umask(old)


# ------------------------------------------------------------------ modes, links, long names
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664])
def test_saving_over_a_file_keeps_its_mode(tmp_path, mode):
    """As open() would: an existing file keeps its permission bits (a private checkpoint
    stays private), whatever the umask."""
    model = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=0)
    old = os.umask(0o022)
    try:
        for name, save in (("m.npz", model.save), ("s.npz", model.save_state_dict)):
            save(tmp_path / name)
            os.chmod(tmp_path / name, mode)
            save(tmp_path / name)
            assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_saving_through_a_symlink_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "m.npz", tmp_path / "link.npz"
    cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=0).save(target)
    link.symlink_to(target)
    cdl.Sequential([cdl.Linear(3, 5)], (3,), seed=0).save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert cdl.load(target).output_shape == (5,)
    # a dangling link: the file is created where it points, as open() would
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "real" / "new.npz")
    make_model().save(dangling)
    assert dangling.is_symlink() and weights_equal(cdl.load(dangling), make_model())
    assert others(tmp_path, keep=("real", "link.npz", "dangling.npz")) == []
    assert others(tmp_path / "real", keep=("m.npz", "new.npz")) == []


def test_long_file_names_save_and_errors_name_the_path(tmp_path, monkeypatch):
    model = make_model()
    long = tmp_path / ("m" * 246 + ".npz")     # 250 bytes: open() takes it
    model.save(long)
    assert weights_equal(cdl.load(long), model)
    assert others(tmp_path, keep=(long.name,)) == []
    # an OSError names the file asked for, never the hidden temporary file
    missing = tmp_path / "no such folder" / "m.npz"
    with pytest.raises(FileNotFoundError) as info:
        model.save(missing)
    assert info.value.filename == str(missing) and ".tmp" not in str(info.value)
    monkeypatch.setattr(ser.np, "savez", lambda f, **a: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    with pytest.raises(OSError, match=r"No space left on device: '.*full.npz'"):
        model.save(tmp_path / "full.npz")
    assert others(tmp_path, keep=(long.name,)) == []


# ------------------------------------------------------------------ what a load inflates
def _deflated_zeros(z, name, shape, descr="<f4"):
    """A member ``name``.npy of zeros declaring ``shape``, deflated (about 1000:1)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": descr, "fortran_order": False,
                                                "shape": tuple(shape)})
    n = int(np.prod(shape)) * np.dtype(descr).itemsize
    chunk = bytes(1 << 22)
    with z.open(name + ".npy", "w", force_zip64=True) as f:
        f.write(head.getvalue())
        for i in range(0, n, len(chunk)):
            f.write(chunk[:min(len(chunk), n - i)])


def _peak(fn):
    """(what fn raised, the peak bytes it allocated)."""
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    except Exception as exc:
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    raise AssertionError("no error")


def test_a_compressed_header_member_is_capped(tmp_path):
    """A small file whose deflated header claims 32 MB is refused before it is read
    (it was inflated in full, then found not to be JSON)."""
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        _deflated_zeros(z, "__cdl__", (32 << 20,), "|u1")
    assert path.stat().st_size < 100_000
    exc, peak = _peak(lambda: cdl.load(path))
    assert isinstance(exc, ValueError)
    assert f"array '__cdl__' declares {32 << 20} bytes, more than the 16777216" in str(exc)
    assert peak < 4 << 20


def test_optimizer_arrays_are_checked_against_the_optimizer_before_reading(tmp_path):
    model = make_model()
    opt = cdl.SGD(model, 0.1, momentum=0.9)
    model.save(tmp_path / "m.npz", optimizer=opt)
    header = _header_of(tmp_path / "m.npz")
    name = "optim/momentum_buffer/0.weight"
    [entry] = [e for e in header["arrays"] if e["name"] == name]
    entry["shape"] = [8 << 20]      # 32 MB of float32, deflated to a few KB
    with np.load(tmp_path / "m.npz") as src, \
            zipfile.ZipFile(tmp_path / "bad.npz", "w", zipfile.ZIP_DEFLATED) as z:
        for key in src.files:
            if key == name:
                _deflated_zeros(z, key, entry["shape"])
            else:
                a = np.frombuffer(json.dumps(header).encode(), np.uint8) \
                    if key == "__cdl__" else src[key]
                with z.open(key + ".npy", "w") as f:
                    np.lib.format.write_array(f, a)
    assert cdl.load(tmp_path / "bad.npz") is not None     # the model alone still loads
    exc, peak = _peak(lambda: cdl.load(tmp_path / "bad.npz", optimizer=True))
    assert isinstance(exc, ValueError)
    assert (f"optimizer state '{name}' is float32 {8 << 20} but the optimizer holds float32 "
            f"4x1x3x3") in str(exc)
    assert peak < 4 << 20


def test_a_state_dict_npz_is_read_only_as_far_as_the_model_goes(tmp_path):
    """Members the model has no place for are not inflated: twelve deflated 16 MB members
    (a 200 KB file) took 190 MB before the keys were compared."""
    path = tmp_path / "sd.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(12):
            _deflated_zeros(z, f"w{i}", (4 << 20,))
        _deflated_zeros(z, "0.weight", (4 << 20,))          # a model key, another shape
    model = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=0)
    before = model.state_dict()
    exc, peak = _peak(lambda: cdl.load_state_dict_file(model, path))
    assert isinstance(exc, ValueError)
    assert str(exc).startswith("cdl.load_state_dict_file: the state dict does not match the "
                               "model: missing keys ['0.bias']; unexpected keys ['w0', ")
    assert f"0.weight has shape {4 << 20}, the model needs 2x3" in str(exc)
    assert peak < 4 << 20
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())


def test_only_stored_and_deflated_members_are_read(tmp_path):
    """bzip2 and lzma can inflate one small read into megabytes: refused, for model files
    and state dicts alike (np.savez and np.savez_compressed write neither)."""
    model = make_model()
    for kind, save in (("model", model.save), ("state", model.save_state_dict)):
        plain = tmp_path / f"{kind}.npz"
        save(plain)
        for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
            packed = tmp_path / f"{kind}{method}.npz"
            with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", method) as z:
                for n in src.namelist():
                    z.writestr(n, src.read(n))
            load = (lambda p: cdl.load(p)) if kind == "model" else \
                (lambda p: cdl.load_state_dict_file(make_model(), p))
            with pytest.raises(ValueError, match=rf"is compressed with zip method {method}; "
                                                 r"only stored and deflated members"):
                load(packed)
    # deflated (np.savez_compressed) loads
    with np.load(tmp_path / "state.npz") as z:
        np.savez_compressed(tmp_path / "c.npz", **{k: z[k] for k in z.files})
    assert weights_equal(cdl.load_state_dict_file(make_model(1), tmp_path / "c.npz"), model)
