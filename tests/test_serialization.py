"""save / load: bit-identical round trip, atomic writes, damaged and foreign files,
several saved objects in one stream."""
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import cdl


def cnn(dtype=np.float32, l2=0.0):
    return cdl.Sequential([cdl.Conv2d(1, 4, 3, padding=1), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Conv2d(4, 6, (3, 2), stride=(1, 2)), cdl.Sigmoid(), cdl.Flatten(),
                           cdl.Linear(6 * 2 * 2, 3, bias=False)], (1, 8, 8), dtype=dtype,
                          seed=3, l2=l2)


def trained(dtype=np.float32):
    m = cnn(dtype, l2=1e-3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 1, 8, 8)).astype(dtype)
    y = rng.integers(0, 3, 20)
    opt = cdl.SGD(m, lr=0.05, momentum=0.9, nesterov=True)
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, epochs=2, batch_size=8, verbose=0)
    return m, opt, x, y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_bit_identical(tmp_path, dtype):
    m, opt, x, y = trained(dtype)
    path = tmp_path / "m.npz"
    m.save(path)
    m2 = cdl.load(path)
    assert m2.dtype == dtype and m2.l2 == m.l2 and m2.input_shape == m.input_shape
    assert [l.describe() for l in m2.layers] == [l.describe() for l in m.layers]
    assert m2.predict(x).tobytes() == m.predict(x).tobytes()


def test_round_trip_with_optimizer_state_continues_identically(tmp_path):
    m, opt, x, y = trained()
    m.save(tmp_path / "m.npz", optimizer=opt)
    m2, opt2 = cdl.load(tmp_path / "m.npz", optimizer=True)
    assert (opt2.lr, opt2.momentum, opt2.nesterov) == (opt.lr, opt.momentum, opt.nesterov)
    loss = cdl.SoftmaxCrossEntropy()
    for _ in range(3):
        a = m.train_step(x[:8], y[:8], loss, opt)
        b = m2.train_step(x[:8], y[:8], loss, opt2)
        assert a == b
    assert m2.predict(x).tobytes() == m.predict(x).tobytes()
    m.save(tmp_path / "plain.npz")
    assert cdl.load(tmp_path / "plain.npz", optimizer=True)[1] is None


def test_save_is_atomic(tmp_path, monkeypatch):
    m, _, x, _ = trained()
    path = tmp_path / "m.npz"
    m.save(path)
    before = path.read_bytes()
    for _, p, _ in m.parameters():
        p += 1

    def crash(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        m.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]


def test_truncated_files_are_rejected(tmp_path):
    m, _, _, _ = trained()
    path = tmp_path / "m.npz"
    m.save(path)
    data = path.read_bytes()
    for cut in (0, 3, 10, 100, len(data) // 2, len(data) - 30, len(data) - 1):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a valid cdl model file"):
            cdl.load(bad)


def test_corrupted_bytes_never_pass_silently(tmp_path):
    m, _, x, _ = trained()
    path = tmp_path / "m.npz"
    m.save(path)
    data = bytearray(path.read_bytes())
    ref = m.predict(x).tobytes()
    # A flipped byte inside the weights must be caught (zip CRC).
    w = m.layers[0].params["weight"].tobytes()
    at = bytes(data).find(w)
    assert at > 0
    bad = bytearray(data)
    bad[at + 5] ^= 0xFF
    (tmp_path / "w.npz").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="corrupted"):
        cdl.load(tmp_path / "w.npz")
    # Anywhere else: a clear ValueError, or (padding bytes) the very same model.
    for off in range(0, len(data), 53):
        bad = bytearray(data)
        bad[off] ^= 0x55
        (tmp_path / "b.npz").write_bytes(bytes(bad))
        try:
            m2 = cdl.load(tmp_path / "b.npz")
        except ValueError as exc:
            assert "not a valid cdl model file" in str(exc)
        else:
            assert m2.predict(x).tobytes() == ref


def test_foreign_files_are_rejected(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    with pytest.raises(ValueError, match="no '__cdl__' header"):
        cdl.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello, not a model")
    with pytest.raises(ValueError, match="not a zip/npz container"):
        cdl.load(tmp_path / "text.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        cdl.load(tmp_path / "empty.npz")
    np.savez(tmp_path / "pickle.npz", __cdl__=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a valid cdl model file"):
        cdl.load(tmp_path / "pickle.npz")


def _rewrite_header(src, dst, edit):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(arrays["__cdl__"].tobytes())
    edit(header)
    arrays["__cdl__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(dst, **arrays)


def test_header_is_validated_before_building(tmp_path):
    m, _, _, _ = trained()
    src = tmp_path / "m.npz"
    m.save(src)

    def unknown(h):
        h["model"]["layers"][0]["type"] = "os.system"
    _rewrite_header(src, tmp_path / "a.npz", unknown)
    with pytest.raises(ValueError, match="unknown type"):
        cdl.load(tmp_path / "a.npz")

    def widen(h):
        h["model"]["layers"][6]["config"]["in_features"] = 25
    _rewrite_header(src, tmp_path / "b.npz", widen)
    with pytest.raises(ValueError, match=r"inconsistent: Linear\[6\]: expected 25 input features"):
        cdl.load(tmp_path / "b.npz")

    def shapes(h):
        h["arrays"][0]["shape"] = [4, 1, 3, 4]
    _rewrite_header(src, tmp_path / "c.npz", shapes)
    with pytest.raises(ValueError, match=r"parameter 0.weight is float32 4x1x3x4"):
        cdl.load(tmp_path / "c.npz")

    def version(h):
        h["version"] = 99
    _rewrite_header(src, tmp_path / "d.npz", version)
    with pytest.raises(ValueError, match="version 99 is not supported"):
        cdl.load(tmp_path / "d.npz")

    with zipfile.ZipFile(tmp_path / "e.npz", "w") as z:
        z.writestr("__cdl__.npy", b"garbage")
    with pytest.raises(ValueError, match="not a valid cdl model file"):
        cdl.load(tmp_path / "e.npz")


# ------------------------------------------------------------------ several objects in one stream
def _two_models():
    a = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=1)
    b = cdl.Sequential([cdl.Linear(5, 4), cdl.ReLU(), cdl.Linear(4, 2)], (5,), seed=2)
    return a, b


class _Unseekable(io.RawIOBase):
    """A pipe-like binary stream: read only, no tell or seek."""

    def __init__(self, data):
        self._buf = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        chunk = self._buf.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)


def test_a_stream_of_models_loads_them_in_turn(tmp_path):
    """zipfile reads the archive whose end record is last: a stream holding two models
    must still give the first, and leave the position after it."""
    a, b = _two_models()
    opt = cdl.Adam(b)
    for make in (io.BytesIO, lambda: open(tmp_path / "stream.bin", "w+b")):
        with make() as f:
            f.write(b"my own header")
            a.save(f)
            after_a = f.tell()
            b.save(f, optimizer=opt)
            after_b = f.tell()
            pickle.dump({"epoch": 3}, f)
            f.seek(len(b"my own header"))
            first = cdl.load(f)
            assert f.tell() == after_a
            second, opt2 = cdl.load(f, optimizer=True)
            assert f.tell() == after_b
            assert pickle.load(f) == {"epoch": 3}
        x = np.ones((2, 3), np.float32)
        assert first.input_shape == (3,) and first.predict(x).tobytes() == a.predict(x).tobytes()
        assert second.input_shape == (5,) and isinstance(opt2, cdl.Adam)
        assert second.get_config() == b.get_config()


def test_a_stream_of_zip64_models_loads_them_in_turn(monkeypatch):
    # zip64 end records (over 65535 arrays, or 4 GiB), here forced by a lower limit
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    a, b = _two_models()
    f = io.BytesIO()
    a.save(f)
    b.save(f)
    assert b"PK\x06\x06" in f.getvalue()
    f.seek(0)
    assert cdl.load(f).input_shape == (3,)
    assert cdl.load(f).input_shape == (5,)
    assert f.read() == b""


def test_a_damaged_stream_is_still_refused_clearly():
    a, b = _two_models()
    one = cdl.dumps(a)
    cases = [b"", b"hello", one[:len(one) // 2], one[:-1], one[:-30] + one]
    for data in cases:
        with pytest.raises(ValueError, match=r"cdl.load: <file object> is not a valid cdl "
                                             r"model file"):
            cdl.load(io.BytesIO(data))
    # the first model is whole, the second cut short
    f = io.BytesIO(one + cdl.dumps(b)[:200])
    assert cdl.load(f).input_shape == (3,)
    with pytest.raises(ValueError, match="truncated or damaged"):
        cdl.load(f)
    # a stream that cannot seek back is read to its end, and loads
    assert cdl.load(_Unseekable(one + b"trailing bytes")).input_shape == (3,)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_a_stream_of_state_dict_files_loads_them_in_turn(fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    a, _ = _two_models()
    other = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=9)
    f = io.BytesIO()
    a.save_state_dict(f, format=fmt)
    end_a = f.tell()
    other.save_state_dict(f, format=fmt)
    f.write(b"trailing")
    f.seek(0)
    target = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=5)
    for want, end in ((a, end_a), (other, len(f.getvalue()) - len(b"trailing"))):
        cdl.load_state_dict_file(target, f, format=fmt)
        assert f.tell() == end
        assert all(np.array_equal(v, want.state_dict()[k])
                   for k, v in target.state_dict().items())
    assert f.read() == b"trailing"


def test_a_pipe_gives_its_first_model_and_a_clear_error_after():
    # a stream that cannot seek back is read to its end: its first model loads, and the
    # next load says the stream is used up (not that fd 3 "is not a valid file")
    import os
    a = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=0)
    r, w = os.pipe()
    with os.fdopen(w, "wb") as f:
        a.save(f)
        a.save(f)
    with os.fdopen(r, "rb") as f:
        back = cdl.load(f)
        np.testing.assert_array_equal(back.layers[0].params["weight"],
                                      a.layers[0].params["weight"])
        with pytest.raises(ValueError, match=r"cdl.load: <file object> is not a valid cdl "
                                             r"model file: the file is empty"):
            cdl.load(f)


def test_a_path_holding_two_models_gives_the_first_as_a_file_object_does(tmp_path):
    """zipfile alone reads the last archive: by path, two models back to back gave the
    second, by file object or bytes the first."""
    a, b = _two_models()
    path = tmp_path / "two.npz"
    with open(path, "wb") as f:
        a.save(f)
        b.save(f)
    with open(path, "rb") as f:
        by_file = cdl.load(f)
    for got in (cdl.load(path), cdl.load(str(path)), by_file, cdl.loads(path.read_bytes())):
        assert got.get_config() == a.get_config()
    one = tmp_path / "one.npz"          # one model alone is read from its path as before
    a.save(one)
    assert cdl.load(one).get_config() == a.get_config()


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_a_path_holding_two_state_dict_files_gives_the_first(tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    a = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=1)
    other = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=9)
    path = tmp_path / f"two.{fmt}"
    with open(path, "wb") as f:
        a.save_state_dict(f, format=fmt)
        other.save_state_dict(f, format=fmt)
    with open(path, "rb") as f:
        sources = [path, f, path.read_bytes()]
        for source in sources:
            target = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=5)
            cdl.load_state_dict_file(target, source, format=fmt)
            assert all(np.array_equal(v, a.state_dict()[k])
                       for k, v in target.state_dict().items()), source


def _with_header_text(data, edit):
    """``data`` (cdl.dumps bytes) with its JSON header text passed through ``edit``."""
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    text = edit(arrays["__cdl__"].tobytes().decode())
    arrays["__cdl__"] = np.frombuffer(text.encode(), np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def test_header_values_of_the_wrong_kind_are_clean_errors():
    m = cdl.Sequential([cdl.Linear(3, 4), cdl.ReLU(), cdl.Linear(4, 2)], (3,), seed=0)
    data = cdl.dumps(m, cdl.SGD(m, 0.1, momentum=0.9))

    def header(edit):
        def change(text):
            h = json.loads(text)
            edit(h)
            return json.dumps(h)
        return change

    cases = {
        "layer type list": (header(lambda h: h["model"]["layers"][0].update(type=["Linear"])),
                            "layer 0 has unknown type"),
        "layer type dict": (header(lambda h: h["model"]["layers"][2].update(type={})),
                            "layer 2 has unknown type"),
        "optimizer type list": (header(lambda h: h["optimizer"].update(type=["SGD"])),
                                r"unknown optimizer \['SGD'\]"),
        "state names nested": (header(lambda h: h["optimizer"].update(
            state=[["momentum_buffer"]])), "the optimizer's state list is malformed"),
        # an int of 5000 digits: Python's int() refuses it with a ValueError of its own
        "huge int": (lambda t: t.replace('"l2": 0.0', '"l2": 1' + "0" * 5000),
                     "the header is not valid JSON"),
    }
    for what, (edit, why) in cases.items():
        with pytest.raises(ValueError, match=r"cdl.load: <file object> is not a valid cdl "
                                             rf"model file: {why}"):
            cdl.loads(_with_header_text(data, edit), optimizer=True)


def test_text_mode_files_and_other_objects_are_refused_clearly(tmp_path):
    m = cdl.Sequential([cdl.Linear(3, 2)], (3,), seed=0)
    m.save(tmp_path / "m.npz")
    m.save_state_dict(tmp_path / "s.npz")
    with open(tmp_path / "m.npz", encoding="latin-1") as f, \
            pytest.raises(TypeError, match=r"cdl.load: the file object must be opened in "
                                           r"binary mode \('rb'\)"):
        cdl.load(f)
    with open(tmp_path / "s.npz", encoding="latin-1") as f, \
            pytest.raises(TypeError, match=r"cdl.load_state_dict_file: the file object must "
                                           r"be opened in binary mode \('rb'\)"):
        cdl.load_state_dict_file(m, f, format="npz")
    with open(tmp_path / "t.npz", "w") as f:
        with pytest.raises(TypeError, match=r"Sequential.save: the file object must be "
                                            r"opened in binary mode \('wb'\)"):
            m.save(f)
        with pytest.raises(TypeError, match=r"Sequential.save_state_dict: the file object "
                                            r"must be opened in binary mode \('wb'\)"):
            m.save_state_dict(f, format="npz")

    class Text:                         # a file-like object that reads str
        def read(self, n=-1):
            return "PK\x03\x04 text"
    with pytest.raises(TypeError, match="cdl.load: the file object must be opened in binary"):
        cdl.load(Text())
    for bad in (None, 3):
        with pytest.raises(TypeError, match=r"cdl.load: path must be a path or a binary file "
                                            rf"object, got {type(bad).__name__}"):
            cdl.load(bad)
        with pytest.raises(TypeError, match=r"Sequential.save: path must be a path or a "
                                            r"binary file object"):
            m.save(bad)
