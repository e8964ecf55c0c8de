"""The benchmark suite is a tool whose answers must be right: its NumPy (and PyTorch)
references agree with plain loops and with cdl, its checks catch a wrong contender,
and its quick mode runs end to end, writing results that --compare can read."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
nref = importlib.import_module("numpy_ref")
run = importlib.import_module("run")

try:
    import torch
    tref = importlib.import_module("torch_ref")
except ImportError:
    torch = tref = None

import cdl  # noqa: E402
import cdl.functional as F  # noqa: E402


def call_or_skip(fn, *args, **kwargs):
    """Run a cdl function; skip while it is still a placeholder on this branch."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        pytest.skip(f"{fn.__name__} not implemented yet")


# ----------------------------------------------------------------------------- plain loop twins
def loop_conv(x, w, b, s, p):
    n, c, h, ww = x.shape
    k, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    ho, wo = (h + 2 * p - kh) // s + 1, (ww + 2 * p - kw) // s + 1
    y = np.zeros((n, k, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * s:i * s + kh, j * s:j * s + kw]
            y[:, :, i, j] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    return y + b[None, :, None, None]


def loop_conv_backward(g, x, w, s, p):
    n, c, h, ww = x.shape
    k, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            patch = xp[:, :, i * s:i * s + kh, j * s:j * s + kw]
            dw += np.tensordot(g[:, :, i, j], patch, axes=([0], [0]))
            dxp[:, :, i * s:i * s + kh, j * s:j * s + kw] += np.tensordot(
                g[:, :, i, j], w, axes=([1], [0]))
    return dxp[:, :, p:p + h, p:p + ww], dw, g.sum(axis=(0, 2, 3))


def loop_pool(x, k, s, p):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    y = np.empty((n, c, ho, wo))
    idx = np.empty((n, c, ho, wo), np.int64)
    for a in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    win = xp[a, ch, i * s:i * s + k, j * s:j * s + k]
                    r = int(np.argmax(win))              # first max, row-major
                    y[a, ch, i, j] = win.flat[r]
                    idx[a, ch, i, j] = (i * s + r // k - p) * w + (j * s + r % k - p)
    return y, idx


CONV_CASES = [  # n, c, h, w, k, ks, s, p
    (2, 3, 7, 9, 4, 3, 1, 1), (1, 1, 8, 8, 2, 5, 1, 2), (3, 2, 9, 6, 3, 3, 2, 0),
    (2, 4, 10, 11, 5, 2, 3, 2), (1, 2, 5, 5, 1, 5, 1, 0),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_numpy_conv_matches_loops(case):
    n, c, h, w, k, ks, s, p = case
    rng = np.random.default_rng(sum(case))
    x, wt, b = (rng.standard_normal(sh) for sh in ((n, c, h, w), (k, c, ks, ks), (k,)))
    y = nref.conv2d(x, wt, b, s, p)
    np.testing.assert_allclose(y, loop_conv(x, wt, b, s, p), rtol=1e-10, atol=1e-12)
    g = rng.standard_normal(y.shape)
    dx, dw, db = nref.conv2d_backward(g, x, wt, s, p)
    ex, ew, eb = loop_conv_backward(g, x, wt, s, p)
    np.testing.assert_allclose(dx, ex, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, ew, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, eb, rtol=1e-10, atol=1e-12)
    # the cached-columns path of the network gives the same weight gradient
    _, cols = nref.conv2d(x, wt, b, s, p, return_cols=True)
    dw2 = nref.conv2d_backward(g, x, wt, s, p, need_input_grad=False, cols=cols)[1]
    np.testing.assert_allclose(dw2, ew, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,k,s,p", [((2, 3, 8, 6), 2, 2, 0), ((1, 2, 7, 9), 3, 2, 1),
                                         ((2, 1, 6, 6), 3, 1, 0), ((1, 2, 5, 7), 2, 3, 1)])
def test_numpy_pool_matches_loops(shape, k, s, p):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape)
    y, arg = nref.max_pool2d(x, k, s, p)
    ey, eidx = loop_pool(x, k, s, p)
    np.testing.assert_array_equal(y, ey)
    g = rng.standard_normal(y.shape)
    dx = nref.max_pool2d_backward(g, x, y, arg, k, s, p)
    edx = np.zeros(x.size)
    flat = (np.arange(shape[0] * shape[1])[:, None] * shape[2] * shape[3]
            + eidx.reshape(shape[0] * shape[1], -1)).ravel()
    np.add.at(edx, flat, g.ravel())
    np.testing.assert_allclose(dx, edx.reshape(shape), rtol=1e-12)
    if arg is not None:
        np.testing.assert_array_equal(nref.window_argmax_to_flat(arg, shape, k, s, p), eidx)


def test_numpy_pool_reshape_path_is_used_for_2x2():
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8))
    assert nref.max_pool2d(x, 2)[1] is None           # the reshape trick, not im2col
    assert nref.max_pool2d(x, 3, 2)[1] is not None


def test_numpy_softmax_cross_entropy():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((7, 5)) * 10
    y = rng.integers(0, 5, 7)
    loss, g = nref.softmax_cross_entropy(s, y)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(7), y])), rel=1e-12)
    onehot = np.eye(5)[y]
    np.testing.assert_allclose(g, (p - onehot) / 7, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("net", list(nref.NETWORKS))
def test_numpy_network_step_matches_finite_differences(net):
    input_shape, spec = nref.NETWORKS[net]
    params = nref.init_params(spec, seed=3, dtype=np.float64)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3,) + input_shape)
    y = rng.integers(0, 10, 3)
    lr = 1.0
    model = nref.NumpyNet(spec, params, lr)
    model.train_step(x, y)
    grads = [((w0 - w1) / lr, (b0 - b1) / lr) for (w0, b0), (w1, b1) in zip(params, model.params)]

    def loss_at(pi, which, flat_i, delta):
        ps = [(w.copy(), b.copy()) for w, b in params]
        ps[pi][which].flat[flat_i] += delta
        scores = nref.NumpyNet(spec, ps).predict(x)
        return nref.softmax_cross_entropy(scores, y)[0]

    for pi in range(len(params)):
        for which in (0, 1):
            a = params[pi][which]
            for flat_i in rng.choice(a.size, size=min(4, a.size), replace=False):
                h = 1e-6
                num = (loss_at(pi, which, flat_i, h) - loss_at(pi, which, flat_i, -h)) / (2 * h)
                got = grads[pi][which].flat[flat_i]
                assert abs(num - got) <= 1e-6 * max(1.0, abs(num)), (net, pi, which, num, got)


def test_numpy_resnet8_agrees_with_cdl_and_finite_differences():
    # The NumPy ResNet-8 (bench_resnet's NumPy contender) from cdl's state dict: one
    # float64 SGD step gives cdl's loss, parameters and running statistics, its
    # gradients match central differences of its own loss (training-mode BatchNorm),
    # and predict uses the running statistics as cdl's does.
    from cdl.models import resnet8
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 8, 8))
    y = rng.integers(0, 10, 4)
    m = resnet8(input_shape=(3, 8, 8), width=4, dtype=np.float64, seed=2)
    state = {k: np.array(v) for k, v in m.state_dict().items()}
    lr = 0.5
    twin = nref.NumpyResNet8(state, lr=lr)
    loss = twin.train_step(x, y)
    want = m.train_step(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=lr))
    assert abs(loss - want) <= 1e-12 * abs(want)
    after = m.state_dict()
    for k, v in twin.p.items():
        if k.endswith("num_batches_tracked"):
            continue
        np.testing.assert_allclose(v, after[k], rtol=1e-10, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(twin.predict(x), m.predict(x), rtol=1e-10, atol=1e-12)

    def loss_at(key, i, delta):
        st = {k: v.copy() for k, v in state.items()}
        st[key].flat[i] += delta
        t = nref.NumpyResNet8(st, lr=0.0)
        return t.train_step(x, y)      # training-mode loss; lr 0 leaves st as it is

    for key in ("0.weight", "1.weight", "3.layers.4.bias", "5.shortcut.0.weight",
                "7.layers.3.weight", "10.weight"):
        for i in rng.choice(state[key].size, size=2, replace=False):
            grad = (state[key].flat[i] - twin.p[key].flat[i]) / lr
            h = 1e-6
            num = (loss_at(key, i, h) - loss_at(key, i, -h)) / (2 * h)
            assert abs(num - grad) <= 1e-6 * max(1.0, abs(num)), (key, num, grad)


def test_flops_per_sample():
    assert nref.flops_per_sample((784,), nref.NETWORKS["MLP"][1]) == 2 * (
        784 * 256 + 256 * 128 + 128 * 10)
    cifar = 2 * (32 * 3 * 9 * 32 * 32 + 64 * 32 * 9 * 16 * 16 + 4096 * 10)
    assert nref.flops_per_sample((3, 32, 32), nref.NETWORKS["CIFAR-CNN"][1]) == cifar


# ----------------------------------------------------------------------------- NumPy vs cdl
@pytest.mark.parametrize("n,fin,fout", [(1, 784, 256), (64, 4096, 10), (17, 33, 65)])
def test_numpy_dense_agrees_with_cdl(n, fin, fout):
    rng = np.random.default_rng(n)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((n, fin), (fout, fin), (fout,)))
    g = rng.standard_normal((n, fout)).astype(np.float32)
    np.testing.assert_allclose(F.linear(x, w, b), nref.linear(x, w, b), rtol=1e-4, atol=1e-3)
    for got, exp in zip(F.linear_backward(g, x, w), nref.linear_backward(g, x, w)):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("case", CONV_CASES)
def test_numpy_conv_agrees_with_cdl(case):
    n, c, h, w, k, ks, s, p = case
    rng = np.random.default_rng(sum(case) + 1)
    x, wt, b = (rng.standard_normal(sh) for sh in ((n, c, h, w), (k, c, ks, ks), (k,)))
    y = call_or_skip(F.conv2d, x, wt, b, s, p)
    np.testing.assert_allclose(y, nref.conv2d(x, wt, b, s, p), rtol=1e-10, atol=1e-12)
    g = rng.standard_normal(y.shape)
    got = call_or_skip(F.conv2d_backward, g, x, wt, s, p)
    for a, e in zip(got, nref.conv2d_backward(g, x, wt, s, p)):
        np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape,k,s,p", [((2, 3, 8, 6), 2, None, 0), ((1, 2, 7, 9), 3, 2, 1)])
def test_numpy_pool_agrees_with_cdl(shape, k, s, p):
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    y, idx = call_or_skip(F.max_pool2d, x, k, s, p)
    ey, arg = nref.max_pool2d(x, k, s, p)
    np.testing.assert_array_equal(y, ey)
    g = np.random.default_rng(6).standard_normal(y.shape).astype(np.float32)
    dx = call_or_skip(F.max_pool2d_backward, g, idx, x.shape, k, s, p)
    np.testing.assert_allclose(dx, nref.max_pool2d_backward(g, x, ey, arg, k, s, p), rtol=1e-6)


def test_numpy_relu_and_loss_agree_with_cdl():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    y = call_or_skip(F.relu, x)
    np.testing.assert_array_equal(y, nref.relu(x))
    g = rng.standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(call_or_skip(F.relu_backward, g, y), nref.relu_backward(g, y))
    s = rng.standard_normal((9, 10)) * 5
    lab = rng.integers(0, 10, 9)
    loss, grad = call_or_skip(F.softmax_cross_entropy, s, lab)
    eloss, egrad = nref.softmax_cross_entropy(s, lab)
    assert loss == pytest.approx(eloss, rel=1e-10)
    np.testing.assert_allclose(grad, egrad, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- NumPy vs PyTorch
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch not installed")


@needs_torch
def test_torch_reference_kernels_agree_with_numpy():
    x, w, b, g = run.conv_data(2, 3, 9, 7, 4, 3, 2, 1)
    t = tref.t
    np.testing.assert_allclose(tref.conv2d(t(x), t(w), t(b), 2, 1).numpy(),
                               nref.conv2d(x, w, b, 2, 1), rtol=1e-4, atol=1e-5)
    for a, e in zip(tref.conv2d_backward(t(g), t(x), t(w), 2, 1),
                    nref.conv2d_backward(g, x, w, 2, 1)):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-4, atol=1e-5)
    xp = np.random.default_rng(8).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ty, tidx = tref.max_pool2d(t(xp), 2)
    y, _ = nref.max_pool2d(xp, 2)
    np.testing.assert_array_equal(ty.numpy(), y)
    gp = np.ones_like(y)
    np.testing.assert_array_equal(tref.max_pool2d_backward(t(gp), t(xp), tidx, 2).numpy(),
                                  nref.max_pool2d_backward(gp, xp, y, None, 2))


@needs_torch
@pytest.mark.parametrize("net", list(nref.NETWORKS))
def test_torch_network_step_agrees_with_numpy(net):
    input_shape, spec = nref.NETWORKS[net]
    params = nref.init_params(spec, seed=1)
    x, y = run.net_data(input_shape, 4)
    fresh_np = nref.NumpyNet(spec, params, 0.01)
    a = run._step_check(fresh_np.train_step, lambda: fresh_np.params, params, x, y)
    tn = tref.TorchNet(spec, params, 0.01)
    b = run._step_check(tn.train_step, tn.params, params, tref.t(x), tref.t(y))
    for u, v in zip(a, b):
        assert run.rel_err(v, u) < 2e-3
    np.testing.assert_allclose(tn.predict(tref.t(x)).numpy(),
                               nref.NumpyNet(spec, tn.params()).predict(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the harness
def _timer():
    return run.Timer(repeats=5, pause=0.0, min_sample=0.0)


def test_evaluate_rejects_a_wrong_contender_and_marks_missing_ones():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    row = run.Row("test", "toy", "double", flops=12, tol=1e-6)
    row.add("NumPy", lambda: run.Contender(lambda: x * 2))
    row.add("cdl", lambda: run.Contender(lambda: x * 2 + 1e-3))        # wrong
    row.add("PyTorch", lambda: (_ for _ in ()).throw(NotImplementedError()))
    res = run.evaluate(row, _timer(), threads=1)
    c = res["contenders"]
    assert "median_s" in c["NumPy"] and len(c["NumPy"]["samples_s"]) == 5
    assert c["cdl"]["status"].startswith("mismatch") and "median_s" not in c["cdl"]
    assert c["PyTorch"]["status"] == run.NA and "median_s" not in c["PyTorch"]


def test_evaluate_times_agreeing_contenders():
    x = np.ones(10, np.float32)
    row = run.Row("test", "toy", "copy", nbytes=80)
    for name in run.CONTENDERS:
        row.add(name, lambda: run.Contender(lambda: x.copy()))
    res = run.evaluate(row, _timer(), threads=1)
    assert all(res["contenders"][n]["status"] == "ok" for n in run.CONTENDERS)
    assert all(res["contenders"][n]["median_s"] > 0 for n in run.CONTENDERS)


def test_quick_mode_runs_and_compare_reads_its_output(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(BENCH / "run.py"), "--quick", "--pause", "0", "--min-sample", "0",
           "--threads", "1", "--no-plots", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "quick" and doc["machine"]["threads"] == 1
    assert doc["ceilings"]["sgemm_gflops"] > 0 and doc["ceilings"]["copy_dram_gbs"] > 0
    groups = {r["group"] for r in doc["results"]}
    assert {"dense", "conv", "pool", "relu", "loss", "nets"} <= groups
    for r in doc["results"]:
        np_entry = r["contenders"]["NumPy"]
        assert "median_s" in np_entry, (r["key"], np_entry)          # the baseline always runs
        for n in run.CONTENDERS:
            assert not r["contenders"][n]["status"].startswith(("mismatch", "error")), (
                r["key"], n, r["contenders"][n])
    dense = [r for r in doc["results"] if r["group"] == "dense"]
    assert all("median_s" in r["contenders"]["cdl"] for r in dense)     # linear has landed
    assert "| case | op | cdl ms |" in proc.stdout and "#### targets" in proc.stdout
    assert out.with_suffix(".md").exists()
    cmp = subprocess.run([sys.executable, str(BENCH / "run.py"), "--compare", str(out), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    assert "| 1.00 |" in cmp.stdout


def test_only_rejects_unknown_group(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--only", "nope",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown group" in proc.stderr


def test_without_torch_its_columns_say_na(tmp_path):
    out = tmp_path / "nt.json"
    code = ("import sys, runpy; sys.modules['torch'] = None; "
            f"sys.argv = ['run.py', '--quick', '--only', 'relu,loss', '--pause', '0', "
            f"'--min-sample', '0', '--threads', '1', '--no-plots', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(BENCH / 'run.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["torch"] is None
    for r in doc["results"]:
        assert r["contenders"]["PyTorch"]["status"] == run.NA
        assert "median_s" in r["contenders"]["NumPy"]
    assert "| n/a |" in proc.stdout
