"""Datasets: scikit-learn digits and IDX files written here (no downloads)."""
import gzip
import struct
import sys

import numpy as np
import pytest

import cdl


def write_idx(path, arr, code=0x08, compress=False, dims=None):
    dims = arr.shape if dims is None else dims
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    data = bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) \
        + np.asarray(arr, dt).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:  # closed: flushed before reading
        f.write(data)


def test_load_digits():
    pytest.importorskip("sklearn")
    x, y = cdl.datasets.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0 and set(np.unique(y)) == set(range(10))


def test_load_digits_without_sklearn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        cdl.datasets.load_digits()


@pytest.mark.parametrize("code", [0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E])
@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_round_trip(tmp_path, code, compress):
    rng = np.random.default_rng(code)
    arr = rng.integers(0, 100, (5, 3, 4))
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    write_idx(path, arr, code, compress)
    got = cdl.datasets.load_idx(path)
    assert got.shape == (5, 3, 4) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)
    got[0, 0, 0] = 7                    # a writable array of its own (a view of the read)
    assert got[0, 0, 0] == 7


def test_load_idx_holds_its_data_once(tmp_path):
    """The data was read, then copied into the native byte order: a peak of twice its
    size. A plain file's data is now read once and swapped in place."""
    import tracemalloc
    arr = np.arange(1 << 20, dtype=">i4").reshape(1024, 1024)
    path = tmp_path / "big.idx"
    write_idx(path, arr, 0x0C)
    tracemalloc.start()
    try:
        got = cdl.datasets.load_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, arr)
    assert peak < 1.25 * arr.nbytes, peak / arr.nbytes


def test_load_idx_rejects_bad_headers(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        cdl.datasets.load_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="unknown IDX type code 0x07"):
        cdl.datasets.load_idx(p)
    write_idx(p, np.zeros(10), dims=(12,))
    with pytest.raises(ValueError, match=r"header says 12 of uint8 = 12 data bytes, file has 10 "
                                         r"\(truncated\)"):
        cdl.datasets.load_idx(p)
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated header"):
        cdl.datasets.load_idx(p)
    p.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="gzip"):
        cdl.datasets.load_idx(p)
    # no data, but dimensions NumPy cannot hold: NumPy's own error, named
    p.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 0, 2**32 - 1, 2**32 - 1))
    with pytest.raises(ValueError, match=r"load_idx: .*bad: header says 0x4294967295x4294967295 "
                                         r"of uint8 = 0 data bytes, which NumPy cannot "
                                         r"represent"):
        cdl.datasets.load_idx(p)
    with pytest.raises(TypeError, match=r"load_idx: path must be a file path, got int"):
        cdl.datasets.load_idx(3)


def test_load_idx_dataset(tmp_path):
    imgs = np.arange(4 * 6 * 6).reshape(4, 6, 6) % 256
    write_idx(tmp_path / "i.gz", imgs, compress=True)
    write_idx(tmp_path / "l", np.array([1, 0, 3, 2]))
    x, y = cdl.datasets.load_idx_dataset(tmp_path / "i.gz", tmp_path / "l")
    assert x.shape == (4, 1, 6, 6) and x.dtype == np.float32 and x.max() <= 1.0
    np.testing.assert_allclose(x[:, 0], imgs / 255.0, rtol=1e-6)
    assert y.dtype == np.int64 and y.tolist() == [1, 0, 3, 2]
    write_idx(tmp_path / "l3", np.array([1, 0, 3]))
    with pytest.raises(ValueError, match=r"expected \(4,\) labels"):
        cdl.datasets.load_idx_dataset(tmp_path / "i.gz", tmp_path / "l3")


def test_load_idx_refuses_more_than_the_machine_memory(tmp_path, monkeypatch):
    from cdl import datasets
    monkeypatch.setattr(datasets._config, "physical_memory", lambda: 1000)
    for compress in (False, True):
        path = tmp_path / f"big{int(compress)}"
        write_idx(path, np.zeros((2, 1000), np.uint8), compress=compress)
        with pytest.raises(ValueError, match=r"load_idx: .*big\d: header says 2x1000 of uint8 = "
                                             r"2000 data bytes, more than this machine's "
                                             r"memory \(1000 bytes\)"):
            datasets.load_idx(path)


def test_load_idx_reads_a_lying_gzip_header_in_bounded_chunks(tmp_path, monkeypatch):
    """A 42-byte gzip file promising 430 GB: with the machine's memory check out of the
    way, the read still allocates only what the stream holds and reports it truncated."""
    import tracemalloc
    from cdl import datasets
    monkeypatch.setattr(datasets._config, "physical_memory", lambda: 1 << 50)
    path = tmp_path / "liar.gz"
    write_idx(path, np.zeros((1, 12, 12)), compress=True, dims=(65535, 65535, 100))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"header says 65535x65535x100 of uint8 = 429483622500 "
                                             r"data bytes, file has 144 \(truncated\)"):
            datasets.load_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak


def test_load_idx_turns_a_memory_error_into_a_value_error(tmp_path, monkeypatch):
    from cdl import datasets

    def out_of_memory(f, n):
        raise MemoryError
    monkeypatch.setattr(datasets, "_read_at_most", out_of_memory)
    write_idx(tmp_path / "a.gz", np.zeros((3, 4)), compress=True)
    with pytest.raises(ValueError, match=r"load_idx: .*a.gz: header says 3x4 of uint8 = 12 data "
                                         r"bytes, more than the memory free to read it"):
        datasets.load_idx(tmp_path / "a.gz")
