"""`cdl train` / `python -m cdl train` run as a subprocess."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import cdl


def write_idx(path, arr, compress=False):
    """An unsigned-byte IDX file (the MNIST format)."""
    data = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) \
        + np.asarray(arr, np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "cdl", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_train_one_epoch_on_digits(tmp_path):
    pytest.importorskip("sklearn")
    r = run("train", "--epochs", "1", "--threads", "2", "--seed", "1", "--out", "out",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1438 for training, 359 held out" in r.stdout
    assert "test accuracy:" in r.stdout
    assert "Epoch 1/1" in r.stderr
    m = cdl.load(tmp_path / "out" / "model.npz")
    assert m.input_shape == (1, 8, 8)
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    except ImportError:
        assert "skipped the curves plot" in r.stdout


def test_train_on_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    imgs = (rng.random((40, 12, 12)) * 60).astype(np.uint8)
    imgs[np.arange(40), 2 + 3 * y, 5] = 255  # a learnable mark
    write_idx(tmp_path / "img.gz", imgs, compress=True)
    write_idx(tmp_path / "lab", y)
    r = run("train", "--epochs", "1", "--batch-size", "8", "--data", "img.gz", "lab",
            "--out", "o", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "32 for training, 8 held out" in r.stdout
    assert cdl.load(tmp_path / "o" / "model.npz").input_shape == (1, 12, 12)


def test_bad_arguments(tmp_path):
    r = run("train", "--epochs", "0", cwd=tmp_path)
    assert r.returncode == 2 and "must be > 0" in r.stderr
    r = run("train", "--data", "missing-images", "missing-labels", cwd=tmp_path)
    assert r.returncode == 2 and "missing-images" in r.stderr
    assert not os.path.exists(tmp_path / "cdl-out")
