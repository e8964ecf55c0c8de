"""The `cdl` command (`python -m cdl`), mostly run as a subprocess."""
import gzip
import os
import signal
import time
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
    with (gzip.open if compress else open)(path, "wb") as f:  # closed: flushed before reading
        f.write(data)


def run(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "cdl", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


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
    assert r.returncode == 2 and "must be >= 1" in r.stderr
    r = run("train", "--data", "missing-images", "missing-labels", cwd=tmp_path)
    assert r.returncode == 2 and "missing-images" in r.stderr
    assert not os.path.exists(tmp_path / "cdl-out")



def test_labels_that_are_not_class_indices_are_refused_before_the_model(tmp_path):
    # one stray label (a 255 "unlabelled" marker, a typo) sized the output layer: a label
    # of 1,000,000 built a model of 8 GB, silently, for minutes
    rng = np.random.default_rng(0)
    imgs = (rng.random((40, 8, 8)) * 255).astype(np.uint8)
    y = rng.integers(0, 3, 40)
    y[7] = 255
    write_idx(tmp_path / "img", imgs)
    write_idx(tmp_path / "lab", y)
    r = run("train", "--epochs", "1", "--data", "img", "lab", "--out", "o", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "lab: the labels must be class indices 0..C-1, but 4 distinct values go up to " \
           "255 (a model of 256 outputs)" in r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_images_too_small_for_the_cnn_are_refused_up_front(tmp_path):
    """The CNN's two 2x2 max-pools need images of at least 4x4: the error says so (not
    "Linear: in_features must be >= 1, got 0") before anything is printed; the ResNet,
    whose strided convolutions are padded, trains on them."""
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "lab", rng.integers(0, 3, 20))
    for side in (2, 3):
        write_idx(tmp_path / f"img{side}", rng.integers(0, 256, (20, side, side)))
        r = run("train", "--epochs", "1", "--data", f"img{side}", "lab", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert (f"cdl train: error: --model cnn needs images of at least 4x4, got "
                f"{side}x{side} in img{side}") in r.stderr
        assert r.stdout == "" and "Traceback" not in r.stderr
    write_idx(tmp_path / "img3x9", rng.integers(0, 256, (20, 3, 9)))
    r = run("train", "--epochs", "1", "--data", "img3x9", "lab", cwd=tmp_path)
    assert r.returncode == 2 and "needs images of at least 4x4, got 3x9" in r.stderr
    r = run("train", "--model", "resnet", "--epochs", "1", "--batch-size", "8",
            "--data", "img3", "lab", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert cdl.load(tmp_path / "cdl-out" / "model.npz").input_shape == (1, 3, 3)


def test_a_gzip_header_promising_too_much_is_an_error_not_a_traceback(tmp_path):
    """42 bytes of gzip whose header promises 430 GB: refused from the header (more than
    this machine's memory) or, on a machine with more, read only as far as it goes."""
    data = bytes([0, 0, 0x08, 3]) + b"".join(struct.pack(">I", d) for d in (65535, 65535, 100))
    with gzip.open(tmp_path / "img.gz", "wb") as f:
        f.write(data + bytes(144))
    write_idx(tmp_path / "lab", np.zeros(5, np.uint8))
    r = run("train", "--epochs", "1", "--data", "img.gz", "lab", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert ("cdl train: error: load_idx: img.gz: header says 65535x65535x100 of uint8 = "
            "429483622500 data bytes, ") in r.stderr
    assert "Traceback" not in r.stderr and "MemoryError" not in r.stderr


# ----------------------------------------------------------------------------- options and help
def test_version():
    r = run("--version", cwd=None)
    assert r.returncode == 0
    assert r.stdout.startswith(f"cdl {cdl.__version__} (") and "Python" in r.stdout


def _subparsers():
    from cdl.cli import build_parser
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    return p, sub.choices


@pytest.mark.parametrize("command", ["train", "bench"])
def test_every_option_has_help_with_its_default(command):
    _, subs = _subparsers()
    sp = subs[command]
    text = sp.format_help()
    for action in sp._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings}: no help text"
        # the help line(s) of this option, up to the next option
        opt = action.option_strings[0]
        block = text.split("\n  " + opt, 1)[1].split("\n  -", 1)[0]
        block = " ".join(block.split())
        if isinstance(action.default, bool):  # a flag: its help says what it changes
            continue
        assert "default" in block, f"{command} {opt}: no default shown in {block!r}"
        if action.default is not None:
            assert f"(default: {action.default})" in block


def test_help_is_plain_text():
    p, subs = _subparsers()
    for text in [p.format_help()] + [sp.format_help() for sp in subs.values()]:
        assert "``" not in text and ":func:" not in text and "`" not in text


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lr", "-1"], "--lr: must be > 0"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--momentum", "1"], "--momentum: must be < 1"),
    (["--momentum", "-0.1"], "--momentum: must be >= 0"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--epochs", "two"], "--epochs: expected an integer"),
    (["--threads", "0"], "--threads: must be >= 1 and <= 1024"),
    (["--threads", "5000"], "--threads: must be >= 1 and <= 1024"),
    (["--seed", "-1"], "--seed: must be >= 0"),
    (["--out", "a-file"], "--out: a-file exists and is not a folder"),
    (["--out", "a-file/sub"], "is not a folder"),
    (["--out", ""], "--out: expected a folder name, got an empty string"),
    (["--data", "nope.idx", "labels.idx"], "--data: nope.idx: no such file"),
    (["--out", "has-dir"], "--out: has-dir/model.npz is a folder"),
    (["--out", "has-png-dir"], "--out: has-png-dir/curves.png is a folder"),
    (["--out", "dangling"], "--out: dangling is a symbolic link to nothing"),
    (["--model", "resnet", "--momentum", "0.5"], "--momentum: the resnet model trains with "
                                                 "AdamW"),
])
def test_bad_options_stop_before_any_work(tmp_path, args, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "has-dir" / "model.npz").mkdir(parents=True)     # found at the end before
    (tmp_path / "has-png-dir" / "curves.png").mkdir(parents=True)
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    r = run("train", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert r.stdout == ""  # no data summary, no model summary
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "cdl-out").exists()


def test_missing_scikit_learn_is_reported_before_any_work(monkeypatch, capsys, tmp_path):
    from cdl import cli
    monkeypatch.chdir(tmp_path)
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert cli.main(["train"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "needs scikit-learn" in err


# ----------------------------------------------------------------------------- how a run ends
def test_diverging_run_ends_with_one_clear_message(tmp_path):
    pytest.importorskip("sklearn")
    r = run("train", "--lr", "1e6", "--epochs", "2", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert "cdl train: error: training diverged" in r.stderr
    assert r.stderr.count("loss became") == 1  # not the warning and the message both
    assert "RuntimeWarning" not in r.stderr
    assert not (tmp_path / "cdl-out" / "model.npz").exists()
    assert not (tmp_path / "cdl-out" / "curves.png").exists()


def test_ctrl_c_during_training_ends_cleanly(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "cdl", "train", "--epochs", "100000",
                          "--threads", "1"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env,
                         # a background job (nohup, CI runners) may start with SIGINT ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in p.stdout:  # wait until training has started
            lines.append(line)
            if line.startswith("Total params"):
                break
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "cdl train: interrupted" in err and "nothing was saved" in err
    assert not (tmp_path / "cdl-out" / "model.npz").exists()


def test_ctrl_c_outside_fit_ends_cleanly(monkeypatch, capsys, tmp_path):
    from cdl import cli, datasets
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(datasets, "load_digits", interrupted)
    assert cli.main(["train"]) == 130
    assert "cdl train: interrupted (Ctrl-C)" in capsys.readouterr().err


def test_plot_skipped_without_a_finished_epoch(tmp_path):
    from cdl import cli
    h = cdl.History()
    h.on_train_begin()
    if "matplotlib" in sys.modules or __import__("importlib").util.find_spec("matplotlib"):
        h.on_epoch_end(0, {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4})
        assert cli._plot(h, str(tmp_path / "c.png"))
        assert (tmp_path / "c.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- cdl bench
def test_bench_runs_and_writes_json(tmp_path):
    r = run("bench", "--repeats", "3", "--no-torch", "--threads", "1", "--json", "b.json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "| case | cdl ms | NumPy ms | cdl/NumPy |" in r.stdout
    import json
    doc = json.loads((tmp_path / "b.json").read_text())
    from cdl._quickbench import CASES
    assert [row["case"] for row in doc["results"]] == [c.name for c in CASES]
    for row in doc["results"]:
        assert not row["errors"], row
        assert row["ms"]["cdl"] > 0 and row["ms"]["NumPy"] > 0
    assert doc["threads"] == 1 and doc["torch"] is None


@pytest.mark.parametrize("path, message", [
    ("no_such_dir/b.json", "no_such_dir does not exist"),
    ("a-file/b.json", "is not a folder"),
    ("a-folder", "a-folder is a folder"),
    ("", "expected a file name, got an empty string"),
])
def test_bench_checks_json_before_running(tmp_path, path, message):
    """--json is written after the whole benchmark: a path it cannot write is refused first."""
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    r = run("bench", "--repeats", "3", "--no-torch", "--threads", "1", "--json", path,
            cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "cdl bench: error: --json: " in r.stderr and message in r.stderr, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr


def test_bench_reports_a_wrong_contender(monkeypatch, capsys):
    """The check before timing catches a contender that computes something else."""
    from cdl import _quickbench as qb

    def build(torch):
        x = np.arange(6.0)
        return {"NumPy": lambda: x * 2, "cdl": lambda: x * 2 + 1}
    monkeypatch.setattr(qb, "CASES", [qb.Case("wrong", build)])
    assert qb.main(repeats=3, torch=False) == 1
    out, err = capsys.readouterr()
    assert "MISMATCH" in out and "cdl on 'wrong'" in err


def test_bench_numpy_twins_agree_with_cdl():
    """The NumPy versions the bench times are right: they match cdl's kernels and model."""
    import cdl.functional as F
    from cdl import _quickbench as qb
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 5))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    g = rng.standard_normal((2, 4, 6, 5))
    y, win = qb.np_conv(x, w, b, 1)
    np.testing.assert_allclose(y, F.conv2d(x, w, b, padding=1), rtol=1e-10)
    for a, ref in zip(qb.np_conv_backward(g, x, w, 1, win), F.conv2d_backward(g, x, w, padding=1)):
        np.testing.assert_allclose(a, ref, rtol=1e-10, atol=1e-12)
    x = rng.standard_normal((2, 3, 6, 4))
    yp, mask = qb.np_pool(x)
    ref, idx = F.max_pool2d(x, 2)
    np.testing.assert_array_equal(yp, ref)
    gp = rng.standard_normal(yp.shape)
    np.testing.assert_array_equal(qb.np_pool_backward(gp, mask),
                                  F.max_pool2d_backward(gp, idx, x.shape, 2))
    # a whole LeNet step from the same weights: same loss, same updated weights
    ls, shape = qb.lenet_layers(cdl)
    model = cdl.Sequential(ls, shape, dtype=np.float64, seed=1)
    twin = qb.NumpyNet(model, 0.1, 0.9)
    xb = rng.random((3,) + shape)
    yb = np.array([1, 7, 3])
    opt = cdl.SGD(model, lr=0.1, momentum=0.9)
    for _ in range(2):
        lc = model.train_step(xb, yb, cdl.SoftmaxCrossEntropy(), opt)
        ln = twin.step(xb, yb)
        assert abs(lc - ln) <= 1e-10 * abs(ln)
    np.testing.assert_allclose(model.layers[0].params["weight"], twin.params[0], rtol=1e-9)
    np.testing.assert_allclose(model.predict(xb), twin.predict(xb), rtol=1e-9)


def test_train_resnet_on_digits(tmp_path):
    pytest.importorskip("sklearn")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "cdl", "train", "--model", "resnet", "--epochs", "3",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Residual" in r.stdout and "BatchNorm2d" in r.stdout
    acc = float(r.stdout.split("test accuracy: ")[1].split("%")[0])
    assert acc > 80.0, r.stdout
    import cdl
    model, opt = cdl.load(tmp_path / "model.npz", optimizer=True)
    assert type(opt).__name__ == "AdamW" and opt.steps > 0


def test_bench_pytorch_twins_agree(capsys):
    """With PyTorch installed, its versions of every case pass the check against NumPy."""
    pytest.importorskip("torch")
    from cdl import _quickbench as qb
    doc = qb.run(threads=1, repeats=3, torch=True)
    for row in doc["results"]:
        assert not row["errors"], row
        assert row["ms"]["PyTorch"] > 0
    assert "PyTorch ms" in capsys.readouterr().out
