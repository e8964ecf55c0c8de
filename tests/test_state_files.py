"""PyTorch weights both ways through safetensors, and cdl's state-dict files
(``model.save_state_dict``, ``cdl.load_state_dict_file``: .safetensors and .npz)."""
import io
import os

import numpy as np
import pytest

import cdl


def cdl_cnn(dtype=np.float32):
    return cdl.Sequential([
        cdl.Conv2d(3, 8, 3, padding=1), cdl.BatchNorm2d(8), cdl.ReLU(), cdl.MaxPool2d(2),
        cdl.Conv2d(8, 16, 3, padding=1, bias=False), cdl.BatchNorm2d(16), cdl.ReLU(),
        cdl.AvgPool2d(2), cdl.Flatten(), cdl.Dropout(0.25), cdl.Linear(16 * 4 * 4, 32),
        cdl.BatchNorm1d(32), cdl.ReLU(), cdl.Linear(32, 10)], (3, 16, 16), dtype=dtype, seed=0)


def torch_cnn(torch):
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(16 * 4 * 4, 32),
        nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():      # trained-looking statistics
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def x_batch(n=37, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_pytorch_to_cdl_and_back_through_safetensors(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    st_numpy = pytest.importorskip("safetensors.numpy")
    torch.manual_seed(0)
    net = torch_cnn(torch)
    x = x_batch()
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()

    # PyTorch -> file -> cdl, as the README shows
    p = tmp_path / "net.safetensors"
    st_torch.save_file(net.state_dict(), p)
    model = cdl_cnn()
    model.load_state_dict(st_numpy.load_file(p))
    scale = np.abs(want).max()
    assert np.abs(model.predict(x) - want).max() <= 1e-5 * scale   # float32 rounding
    assert int(model.state_dict()["1.num_batches_tracked"]) == 7
    # the same through cdl's own reader
    model2 = cdl.load_state_dict_file(cdl_cnn(), p)
    np.testing.assert_array_equal(model2.predict(x), model.predict(x))

    # cdl trains, then cdl -> file -> PyTorch
    y = np.arange(len(x)) % 10
    model.fit(x, y, cdl.SoftmaxCrossEntropy(), cdl.Adam(model, lr=1e-3), epochs=2,
              batch_size=8, verbose=0)
    back = tmp_path / "back.safetensors"
    model.save_state_dict(back)
    net2 = torch_cnn(torch)
    net2.load_state_dict(st_torch.load_file(back))
    net2.eval()
    with torch.no_grad():
        got = net2(torch.from_numpy(x)).numpy()
    mine = model.predict(x)
    assert np.abs(got - mine).max() <= 1e-5 * np.abs(mine).max()
    # and the README's variant: safetensors.numpy.save_file(model.state_dict(), ...)
    st_numpy.save_file(model.state_dict(), tmp_path / "b2.safetensors")
    net2.load_state_dict(st_torch.load_file(tmp_path / "b2.safetensors"))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_file_round_trip(tmp_path, suffix, dtype):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    model = cdl_cnn(dtype)
    x = x_batch(5).astype(dtype)
    model.fit(x, np.arange(5) % 10, cdl.SoftmaxCrossEntropy(), cdl.SGD(model, lr=0.01),
              epochs=1, batch_size=5, verbose=0)
    path = tmp_path / f"w{suffix}"
    model.save_state_dict(path)
    fresh = cdl_cnn(dtype)
    assert cdl.load_state_dict_file(fresh, path) is fresh
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[k], v)
    # file objects, with an explicit format
    buf = io.BytesIO()
    model.save_state_dict(buf, format=suffix[1:])
    buf.seek(0)
    cdl.load_state_dict_file(cdl_cnn(dtype), buf, format=suffix[1:])


def test_state_dict_file_errors(tmp_path, monkeypatch):
    model = cdl_cnn()
    with pytest.raises(ValueError, match="must end in .safetensors or .npz"):
        model.save_state_dict(tmp_path / "w.pt")
    with pytest.raises(ValueError, match="format must be"):
        model.save_state_dict(io.BytesIO(), format="pickle")
    # a state dict of another architecture: one error naming the problems, nothing changes
    other = cdl.Sequential([cdl.Linear(4, 2)], (4,))
    other.save_state_dict(tmp_path / "o.npz")
    before = model.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        cdl.load_state_dict_file(model, tmp_path / "o.npz")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])
    # damaged files are ValueErrors
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a valid .npz"):
        cdl.load_state_dict_file(model, tmp_path / "bad.npz")
    if pytest.importorskip("safetensors"):
        (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
        with pytest.raises(ValueError, match="not a valid safetensors"):
            cdl.load_state_dict_file(model, tmp_path / "bad.safetensors")
        # bfloat16 (PyTorch's common export) has no NumPy type: said so, with the remedy
        head = b'{"0.weight":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
        (tmp_path / "bf16.safetensors").write_bytes(len(head).to_bytes(8, "little") + head
                                                    + bytes(4))
        with pytest.raises(ValueError, match=r"holds '0.weight' as BF16, which NumPy cannot "
                                             r"hold \(1 such tensor\(s\)\); save it as float32"):
            cdl.load_state_dict_file(model, tmp_path / "bf16.safetensors")
    # pickled object arrays in an .npz are never unpickled
    np.savez(tmp_path / "obj.npz", **{"0.weight": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="Python objects"):
        cdl.load_state_dict_file(model, tmp_path / "obj.npz")


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "safetensors" or name.startswith("safetensors."):
            raise ImportError("No module named 'safetensors'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    model = cdl_cnn()
    with pytest.raises(ImportError, match=r"pip install cdl-cpu\[safetensors\]"):
        model.save_state_dict(tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install cdl-cpu\[safetensors\]"):
        cdl.load_state_dict_file(model, tmp_path / "x.safetensors")
    model.save_state_dict(tmp_path / "w.npz")       # .npz needs only NumPy


def test_state_dict_file_from_bytes(tmp_path):
    """A state-dict file's bytes load as cdl.loads' and cdl.onnx.load's do; they were taken
    for a path (an error quoting the whole blob, or "embedded null byte")."""
    model = cdl_cnn()
    buf = io.BytesIO()
    model.save_state_dict(buf, format="npz")
    data = buf.getvalue()
    for blob in (data, bytearray(data), memoryview(data)):
        twin = cdl_cnn()
        twin.layers[0].params["weight"][...] = 0
        cdl.load_state_dict_file(twin, blob, format="npz")
        for k, v in twin.state_dict().items():
            np.testing.assert_array_equal(v, model.state_dict()[k])
    with pytest.raises(ValueError) as info:
        cdl.load_state_dict_file(cdl_cnn(), data)
    assert str(info.value) == ("cdl.load_state_dict_file: pass format='safetensors' or 'npz' "
                               "with the file's bytes")
    with pytest.raises(ValueError, match=r"cdl.load_state_dict_file: <bytes> is not a valid "
                                         r"\.npz file"):
        cdl.load_state_dict_file(cdl_cnn(), data[:100], format="npz")
    with pytest.raises(TypeError, match=r"cdl.load_state_dict_file: expected a path, bytes or "
                                        r"a binary file object, got int"):
        cdl.load_state_dict_file(cdl_cnn(), 3, format="npz")
    # a bytes *path* (as os.fspath and cdl.load take) is still a path, for saving too
    for name in ("sd.npz", "sd.safetensors"):
        if name.endswith(".safetensors"):
            pytest.importorskip("safetensors")
        path = os.fsencode(tmp_path / name)
        model.save_state_dict(path)
        twin = cdl_cnn()
        twin.layers[0].params["weight"][...] = 0
        cdl.load_state_dict_file(twin, path)
        np.testing.assert_array_equal(twin.layers[0].params["weight"],
                                      model.layers[0].params["weight"])
    model.save(os.fsencode(tmp_path / "m.npz"))
    assert cdl.load(tmp_path / "m.npz").input_shape == model.input_shape
