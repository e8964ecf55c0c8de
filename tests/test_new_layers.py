"""BatchNorm, Dropout, average pooling, Tanh, LeakyReLU, Residual, and Adam/AdamW
inside models: NumPy twins, float64 gradchecks, plan = layer by layer bit for bit,
thread-count independence, PyTorch cross-checks, and bad input."""
import copy

import numpy as np
import pytest

import cdl


def conv_bn_net(dtype=np.float32, seed=0):
    return cdl.Sequential([
        cdl.Conv2d(3, 8, 3, padding=1, bias=False), cdl.BatchNorm2d(8), cdl.ReLU(),
        cdl.Residual([cdl.Conv2d(8, 8, 3, padding=1, bias=False), cdl.BatchNorm2d(8),
                      cdl.ReLU(), cdl.Conv2d(8, 8, 3, padding=1, bias=False),
                      cdl.BatchNorm2d(8)]),
        cdl.ReLU(),
        cdl.Residual([cdl.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                      cdl.BatchNorm2d(16), cdl.LeakyReLU(0.1)],
                     shortcut=[cdl.Conv2d(8, 16, 1, stride=2, bias=False), cdl.BatchNorm2d(16)]),
        cdl.Tanh(), cdl.AvgPool2d(2), cdl.Dropout(0.25), cdl.GlobalAvgPool2d(),
        cdl.Linear(16, 12, bias=False), cdl.BatchNorm1d(12), cdl.Sigmoid(), cdl.Dropout(0.1),
        cdl.Linear(12, 5)], (3, 8, 8), dtype=dtype, seed=seed, l2=1e-3)


def batch(n=6, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 8, 8)).astype(dtype), rng.integers(0, 5, n)


def test_names_match_torch_conventions():
    m = conv_bn_net()
    sd = m.state_dict()
    for key in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                "1.num_batches_tracked", "3.layers.0.weight", "3.layers.1.running_var",
                "5.layers.0.weight", "5.shortcut.0.weight", "5.shortcut.1.running_mean",
                "10.weight", "11.running_mean"):
        assert key in sd, key
    assert sd["1.num_batches_tracked"].dtype == np.int64
    assert "0.bias" not in sd


def test_gradcheck_every_new_layer():
    m = conv_bn_net(np.float64)
    x, y = batch(4, dtype=np.float64)
    errors = cdl.gradcheck(m, x, y, cdl.SoftmaxCrossEntropy(), max_checks=12)
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plan_equals_layer_by_layer_and_threads(dtype):
    x, y = batch(6, dtype=dtype)
    loss = cdl.SoftmaxCrossEntropy()
    results = []
    for use_plan, nt in ((True, 1), (False, 2), (True, 2), (True, 3)):
        m = conv_bn_net(dtype)
        m._use_plans = use_plan
        opt = cdl.AdamW(m, lr=1e-2)
        with cdl.threads(nt):
            values = [m.train_step(x[:n], y[:n], loss, opt) for n in (6, 5, 6)]
            pred = m.predict(x)
        results.append((values, m.state_dict(), pred, m.layers[8].passes))
    ref = results[0]
    for values, sd, pred, passes in results[1:]:
        assert values == ref[0]
        for k in sd:
            np.testing.assert_array_equal(sd[k], ref[1][k], err_msg=k)
        np.testing.assert_array_equal(pred, ref[2])
        assert passes == ref[3] == 3


def join_nets(dtype=np.float32):
    """Residuals whose join (the sum, and the ReLU after it) runs in the body's last
    BatchNorm in training plans: a conv + BN shortcut with a ReLU after, identity
    shortcuts without one, and Residuals whose input is the model input (their
    shortcut rebinds to every new batch): with a body of one pass or of several
    (whose last pass does not read the input itself), nested, and after a Flatten
    (a view of the input)."""
    return [
        cdl.Sequential([cdl.Conv2d(3, 8, 3, padding=1, bias=False), cdl.BatchNorm2d(8),
                        cdl.ReLU(),
                        cdl.Residual([cdl.Conv2d(8, 12, 3, stride=2, padding=1, bias=False),
                                      cdl.BatchNorm2d(12), cdl.ReLU(),
                                      cdl.Conv2d(12, 12, 3, padding=1, bias=False),
                                      cdl.BatchNorm2d(12)],
                                     shortcut=[cdl.Conv2d(8, 12, 1, stride=2, bias=False),
                                               cdl.BatchNorm2d(12)]),
                        cdl.ReLU(), cdl.GlobalAvgPool2d(), cdl.Linear(12, 5)],
                       (3, 8, 8), dtype=dtype, seed=1),
        cdl.Sequential([cdl.Residual([cdl.BatchNorm2d(3)]),
                        cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1), cdl.BatchNorm2d(3)]),
                        cdl.Flatten(), cdl.Linear(192, 5)], (3, 8, 8), dtype=dtype, seed=2),
        cdl.Sequential([cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1, bias=False),
                                      cdl.BatchNorm2d(3)]),
                        cdl.ReLU(), cdl.Flatten(), cdl.Linear(192, 5)], (3, 8, 8), dtype=dtype,
                       seed=3),
        cdl.Sequential([cdl.Residual([cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1, bias=False),
                                                    cdl.BatchNorm2d(3)]),
                                      cdl.Conv2d(3, 3, 1, bias=False), cdl.BatchNorm2d(3)]),
                        cdl.Flatten(), cdl.Linear(192, 5)], (3, 8, 8), dtype=dtype, seed=4),
        cdl.Sequential([cdl.Flatten(), cdl.Residual([cdl.Linear(192, 192), cdl.BatchNorm1d(192)]),
                        cdl.Linear(192, 5)], (3, 8, 8), dtype=dtype, seed=5)]


@pytest.mark.parametrize("which", range(5))
def test_residual_join_in_batchnorm_equals_layer_by_layer(which):
    # fresh inputs every step, so that a stale binding of the model input shows
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((6, 3, 8, 8)).astype(np.float32) * 2 for _ in range(3)]
    y = rng.integers(0, 5, 6)
    loss = cdl.SoftmaxCrossEntropy()
    results = []
    for use_plan, nt in ((False, 1), (True, 1), (True, 2)):
        m = join_nets()[which]
        m._use_plans = use_plan
        opt = cdl.SGD(m, lr=0.1, momentum=0.9)
        with cdl.threads(nt):
            values = [m.train_step(x.copy(), y, loss, opt) for x in xs]
        results.append((values, m.state_dict()))
        residuals = [l for l in m.layers if isinstance(l, cdl.Residual)]
        assert residuals and all(r._joins(True) for r in residuals)
    ref = results[0]
    for values, sd in results[1:]:
        assert values == ref[0]
        for k in sd:
            np.testing.assert_array_equal(sd[k], ref[1][k], err_msg=k)


def test_strided_shortcut_adds_its_input_grad_to_the_body():
    # In a training plan the 1x1 stride-2 shortcut's input gradient is added to the
    # body's by the shortcut's convolution: no sum of its own. The states after the
    # steps equal layer by layer's (test above); here the sum's op is gone, and the
    # first layer's weight gradient, which needs the summed input gradient, matches.
    from cdl._kernels import elementwise as ew
    x, y = batch(9)
    grads = []
    for use_plan in (True, False):
        m = join_nets()[0]
        m._use_plans = use_plan
        m.train_step(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(m, lr=0.1))
        grads.append(m.layers[0].grads["weight"].copy())
        if use_plan:
            plan = m._plans[0]
            runs = [getattr(run, "__self__", None) for run, _ in plan._backward]
            assert not any(isinstance(r, ew.Add) for r in runs)
    np.testing.assert_array_equal(grads[0], grads[1])


def test_residual_join_kernels_match_separate_passes():
    # the join's kernels against the passes they replace, on values with many zeros
    # and signed zeros, where a wrong mask or a wrong rounding order shows
    rng = np.random.default_rng(0)
    n, c, l = 5, 4, 37
    x = rng.standard_normal((n, c, l)).astype(np.float32)
    r = rng.standard_normal((n, c, l)).astype(np.float32)
    r[:, :, ::3] = -0.0
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    from cdl._kernels import elementwise as ew, norm
    for relu in (False, True):
        outs = []
        for joined in (False, True):
            out = np.empty_like(x)
            stats = [np.empty(c, np.float32) for _ in range(2)]
            norm.batchnorm_forward_train(x, w, b, out, *stats, None, None, 0.1, 1e-5,
                                         False if not joined else relu, 2,
                                         **({"residual": r} if joined else {}))
            if not joined:
                ew.add(out.reshape(-1), r.reshape(-1), out.reshape(-1), relu, 2)
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])
        assert (np.signbit(outs[0]) == np.signbit(outs[1])).all()
    g = rng.standard_normal(n * c * l).astype(np.float32)
    a = rng.standard_normal(n * c * l).astype(np.float32)
    mask = np.where(rng.random(n * c * l) < 0.5, 0.0, rng.standard_normal(n * c * l))
    mask = mask.astype(np.float32)
    mask[::7] = np.nan
    sep = np.empty_like(g)
    ew.relu_backward(g, mask, sep, 2)
    ew.add(a, sep, sep, False, 2)
    got = np.empty_like(g)
    ew.add_masked(a, g, mask, got, 2)
    np.testing.assert_array_equal(got, sep)
    np.testing.assert_array_equal(got, a + np.where(mask <= 0, 0, g))


def test_batchnorm_matches_numpy_twin_and_running_stats():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4, 3, 3)) * 3 + 1
    bn = cdl.BatchNorm2d(4, momentum=0.2)
    m = cdl.Sequential([bn, cdl.Flatten()], (4, 3, 3), dtype=np.float64)
    bn.params["weight"][:] = rng.standard_normal(4)
    bn.params["bias"][:] = rng.standard_normal(4)
    out = m.forward(x).reshape(x.shape)
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    ref = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5) \
        * bn.params["weight"][:, None, None] + bn.params["bias"][:, None, None]
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_mean"], 0.2 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.buffers["running_var"], 0.8 + 0.2 * var * 45 / 44, rtol=1e-12)
    assert int(bn.buffers["num_batches_tracked"]) == 1
    # inference uses the running statistics
    pred = m.predict(x).reshape(x.shape)
    rm, rv = bn.buffers["running_mean"], bn.buffers["running_var"]
    ref = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5) \
        * bn.params["weight"][:, None, None] + bn.params["bias"][:, None, None]
    np.testing.assert_allclose(pred, ref, rtol=1e-12, atol=1e-12)


def test_dropout_is_identity_in_inference_and_reproducible_in_training():
    x = np.ones((64, 100), np.float32)
    def make(seed):
        return cdl.Sequential([cdl.Dropout(0.3), cdl.Linear(100, 2)], (100,), seed=seed)
    a, b, c = make(1), make(1), make(2)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    fa, fb, fc = a.forward(x), b.forward(x), c.forward(x)
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(fa, fc)
    kept = a.layers[0]._ws[64]["out"]
    assert abs((kept != 0).mean() - 0.7) < 0.02
    np.testing.assert_allclose(kept[kept != 0], 1 / 0.7, rtol=1e-6)
    assert not np.array_equal(a.forward(x), fa)     # the next step draws a new mask


def test_avgpool_and_gap_and_activations_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 7, 7))
    m = cdl.Sequential([cdl.AvgPool2d(3, stride=2, padding=1)], (3, 7, 7), dtype=np.float64)
    out = m.predict(x)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.array([[[[xp[n, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].sum() / 9
                       for j in range(4)] for i in range(4)] for c in range(3)]
                    for n in range(2)])
    np.testing.assert_allclose(out, ref, rtol=1e-12)
    g = cdl.Sequential([cdl.GlobalAvgPool2d()], (3, 7, 7), dtype=np.float64).predict(x)
    np.testing.assert_allclose(g, x.mean(axis=(2, 3)), rtol=1e-12)
    flat = x.reshape(2, -1)
    t = cdl.Sequential([cdl.Tanh()], (147,), dtype=np.float64).predict(flat)
    np.testing.assert_allclose(t, np.tanh(flat), rtol=1e-12, atol=1e-15)
    lr = cdl.Sequential([cdl.LeakyReLU(0.2)], (147,), dtype=np.float64).predict(flat)
    np.testing.assert_array_equal(lr, np.where(flat > 0, flat, 0.2 * flat))


def test_torch_cross_check_resnet_block():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False),
                                        nn.BatchNorm2d(16), nn.ReLU(),
                                        nn.Conv2d(16, 16, 3, 1, 1, bias=False),
                                        nn.BatchNorm2d(16))
            self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                          nn.BatchNorm2d(16))

        def forward(self, x):
            return self.layers(x) + self.shortcut(x)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        Block(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    m = cdl.Sequential([
        cdl.Conv2d(3, 8, 3, padding=1, bias=False), cdl.BatchNorm2d(8), cdl.ReLU(),
        cdl.Residual([cdl.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
                      cdl.BatchNorm2d(16), cdl.ReLU(),
                      cdl.Conv2d(16, 16, 3, padding=1, bias=False), cdl.BatchNorm2d(16)],
                     shortcut=[cdl.Conv2d(8, 16, 1, stride=2, bias=False), cdl.BatchNorm2d(16)]),
        cdl.ReLU(), cdl.GlobalAvgPool2d(), cdl.Linear(16, 10)], (3, 8, 8))
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    sd = {k.replace("6.", "X.") if False else k: v for k, v in sd.items()}
    # torch's Flatten at 6 shifts the Linear to 7; cdl's GlobalAvgPool2d flattens itself
    sd = {("6." + k[2:] if k.startswith("7.") else k): v for k, v in sd.items()}
    m.load_state_dict(sd)
    x, y = batch(5)
    tx = torch.from_numpy(x)
    opt_t = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt_c = cdl.AdamW(m, lr=1e-2)
    loss_t = nn.CrossEntropyLoss()
    for _ in range(3):
        opt_t.zero_grad()
        lt = loss_t(net(tx), torch.from_numpy(y))
        lt.backward()
        opt_t.step()
        lc = m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt_c)
        assert lc == pytest.approx(lt.item(), rel=1e-4)
    net.eval()
    with torch.no_grad():
        ref = net(tx).numpy()
    np.testing.assert_allclose(m.predict(x), ref, rtol=1e-3, atol=1e-4)
    got = m.state_dict()
    for k, v in net.state_dict().items():
        k2 = "6." + k[2:] if k.startswith("7.") else k
        np.testing.assert_allclose(got[k2], v.numpy(), rtol=1e-3, atol=1e-5, err_msg=k)


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"BatchNorm2d\[1\]: expected inputs of shape CxHxW "
                                         r"with 4 channels \(num_features\), got 3x8x8"):
        cdl.Sequential([cdl.Conv2d(3, 3, 1), cdl.BatchNorm2d(4)], (3, 8, 8))
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\)"):
            cdl.Dropout(p)
    with pytest.raises(TypeError, match="Dropout: p must be a number"):
        cdl.Dropout("0.5")
    with pytest.raises(ValueError, match=r"Residual\[0\]: the branches' outputs differ: layers "
                                         r"give 3x8x8 -> Conv2d.* -> 4x4x4, shortcut gives the "
                                         r"identity 3x8x8"):
        cdl.Sequential([cdl.Residual([cdl.Conv2d(3, 4, 3, stride=2, padding=1)])], (3, 8, 8))
    m = cdl.Sequential([cdl.Linear(3, 2)], (3,))
    for kw, match in (({"betas": (0.9, 1.0)}, r"Adam: betas\[1\] must be a finite number in "
                                              r"\[0.0, 1.0\)"),
                      ({"betas": (-0.1, 0.9)}, r"betas\[0\]"),
                      ({"eps": 0.0}, r"Adam: eps must be a finite number in \(0.0, inf\)")):
        with pytest.raises(ValueError, match=match):
            cdl.Adam(m, **kw)
    with pytest.raises(TypeError, match="Adam: betas must be a pair"):
        cdl.Adam(m, betas=0.9)
    bn = cdl.Sequential([cdl.BatchNorm1d(3)], (3,))
    with pytest.raises(ValueError, match="more than one value per channel"):
        bn.train_step(np.ones((1, 3), np.float32), np.array([0]), cdl.SoftmaxCrossEntropy(),
                      cdl.SGD(bn, lr=0.1))


def test_fit_refuses_a_batch_batchnorm_cannot_train_on_before_any_step():
    # 13 samples in batches of 4 leave a last batch of 1: refused up front, not after
    # three updates, with the model and optimizer as they were
    m = cdl.Sequential([cdl.Linear(5, 6), cdl.BatchNorm1d(6), cdl.ReLU(), cdl.Linear(6, 3)],
                       (5,), seed=0)
    x = np.random.default_rng(0).standard_normal((13, 5)).astype(np.float32)
    y = np.arange(13) % 3
    opt = cdl.SGD(m, lr=0.1, momentum=0.9)
    before = {k: v.copy() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"Sequential.fit: 13 training samples in batches of "
                                         r"4 give a batch of 1, and BatchNorm1d\[1\]: training "
                                         r"needs more than one value per channel"):
        m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, batch_size=4, verbose=0)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert opt.state_dict()["step"] == 0
    # batches of 5 leave 3: trains; so does a BatchNorm2d plane of 4 cells for a batch of 1
    m.fit(x, y, cdl.SoftmaxCrossEntropy(), opt, batch_size=5, verbose=0)
    conv = cdl.Sequential([cdl.Conv2d(1, 2, 1), cdl.BatchNorm2d(2), cdl.Flatten(),
                           cdl.Linear(8, 3)], (1, 2, 2), seed=0)
    conv.fit(np.ones((5, 1, 2, 2), np.float32), np.arange(5) % 3, cdl.SoftmaxCrossEntropy(),
             cdl.SGD(conv, lr=0.1), batch_size=4, verbose=0)


def test_model_file_with_mismatched_buffers_is_refused(tmp_path):
    import json
    m = conv_bn_net()
    path = tmp_path / "m.npz"
    m.save(path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays.pop("__cdl__").tobytes())
    arrays["buffer/1.running_mean"] = np.zeros(7, np.float32)
    for e in header["arrays"]:
        if e["name"] == "buffer/1.running_mean":
            e["shape"] = [7]
    np.savez(tmp_path / "bad.npz", __cdl__=np.frombuffer(json.dumps(header).encode(), np.uint8),
             **arrays)
    with pytest.raises(ValueError, match=r"buffer 1.running_mean is float32 7 but the "
                                         r"architecture needs float32 8"):
        cdl.load(tmp_path / "bad.npz")
    loaded = cdl.load(path)
    x, _ = batch(3)
    np.testing.assert_array_equal(loaded.predict(x), m.predict(x))


def test_adam_matches_torch_formulas_over_steps():
    torch = pytest.importorskip("torch")
    m = cdl.Sequential([cdl.Linear(4, 3)], (4,), dtype=np.float64, seed=0)
    w = torch.tensor(m.layers[0].params["weight"].copy(), requires_grad=True)
    b = torch.tensor(m.layers[0].params["bias"].copy(), requires_grad=True)
    for cls, tcls, wd in ((cdl.Adam, torch.optim.Adam, 0.1), (cdl.AdamW, torch.optim.AdamW, 0.1)):
        mm = cdl.Sequential([cdl.Linear(4, 3)], (4,), dtype=np.float64, seed=0)
        opt = cls(mm, lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=wd, clip_grad_norm=0.5)
        tw, tb = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        topt = tcls([tw, tb], lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=wd)
        rng = np.random.default_rng(0)
        for _ in range(5):
            x = rng.standard_normal((8, 4))
            y = rng.integers(0, 3, 8)
            mm.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
            topt.zero_grad()
            out = torch.from_numpy(x) @ tw.T + tb
            torch.nn.functional.cross_entropy(out, torch.from_numpy(y)).backward()
            torch.nn.utils.clip_grad_norm_([tw, tb], 0.5)
            topt.step()
        np.testing.assert_allclose(mm.layers[0].params["weight"], tw.detach().numpy(),
                                   rtol=1e-10, atol=1e-12)
        assert opt.state_dict()["step"] == 5


def test_compute_gradients_is_train_step_without_the_update():
    x, y = batch(6)
    a, b = conv_bn_net(), conv_bn_net()
    before = a.get_weights()
    va = a.compute_gradients(x, y, cdl.SoftmaxCrossEntropy())
    assert all(np.array_equal(before[k], v) for k, v in a.get_weights().items())
    ga = a.gradient_buffer.copy()
    vb = b.train_step(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(b, lr=0.1))
    assert va == vb                                    # L2 included in both
    np.testing.assert_array_equal(ga, b.gradient_buffer)


@pytest.mark.parametrize("make", [
    lambda m: cdl.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda m: cdl.Adam(m, lr=0.01, betas=(0.8, 0.95), eps=1e-6),
    lambda m: cdl.AdamW(m, lr=0.01, weight_decay=0.05)])
def test_optimizer_state_dict_resumes_with_its_settings(make):
    # A state dict carries the settings (torch.optim restores them too): an optimizer
    # made with other settings, even one without momentum buffers, resumes bit for bit
    x, y = batch(6)
    loss = cdl.SoftmaxCrossEntropy()
    a = conv_bn_net()
    oa = make(a)
    for _ in range(2):
        a.train_step(x, y, loss, oa)
    oa.lr *= 0.5                                      # a setting changed mid-run
    b = copy.deepcopy(a)                              # Dropout's generator position too
    ob = type(oa)(b, lr=1.0)                          # (SGD: without momentum buffers)
    ob.load_state_dict(oa.state_dict())
    assert ob.get_config() == oa.get_config()
    for _ in range(2):
        assert a.train_step(x, y, loss, oa) == b.train_step(x, y, loss, ob)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k], err_msg=k)


def test_optimizer_load_state_dict_checks_everything_first():
    m = conv_bn_net()
    x, y = batch(6)
    opt = cdl.Adam(m, lr=0.01)
    m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
    good = opt.state_dict()
    for change, exc, match in (
            ({"base_lr": "abc"}, TypeError, r"base_lr must be a number"),
            ({"base_lr": float("nan")}, ValueError, r"base_lr must be a finite number"),
            ({"base_lr": -1.0}, ValueError, r"base_lr must be a finite number in \[0.0, inf\)"),
            ({"step": 2**63}, ValueError, r"step must be an int in \[0, 2\*\*53\]"),
            ({"config": dict(good["config"], betas=[0.9, 1.5])}, ValueError,
             r"Adam.load_state_dict: bad optimizer settings: Adam: betas\[1\]"),
            ({"config": dict(good["config"], nope=1)}, TypeError, r"bad optimizer settings")):
        other = cdl.Adam(m, lr=0.5)
        before = other.state_dict()
        with pytest.raises(exc, match=match):
            other.load_state_dict(dict(good, **change))
        after = other.state_dict()
        assert after["config"] == before["config"] and after["step"] == before["step"]
        assert after["base_lr"] == before["base_lr"]
        for b, per in before["state"].items():
            for k, v in per.items():
                np.testing.assert_array_equal(after["state"][b][k], v)


def test_sgd_momentum_set_after_construction_takes_effect():
    # the buffer is made at the first step that needs it (PyTorch: v = g at first)
    x, y = batch(6)
    loss = cdl.SoftmaxCrossEntropy()
    a, b = conv_bn_net(), conv_bn_net()
    oa, ob = cdl.SGD(a, lr=0.1, momentum=0.9), cdl.SGD(b, lr=0.1)
    ob.momentum = 0.9
    for _ in range(3):
        assert a.train_step(x, y, loss, oa) == b.train_step(x, y, loss, ob)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k], err_msg=k)
    assert list(ob.state_dict()["state"]) == ["momentum_buffer"]
    # its state dict loads before any step too, and back to no momentum drops the buffer
    oc = cdl.SGD(b, lr=0.1)
    oc.momentum = 0.5
    cdl.SGD(b, lr=0.1).load_state_dict(oc.state_dict())
    oc.momentum = 0.0
    assert oc.state_dict()["state"] == {}


def test_optimizer_load_state_dict_keeps_its_buffers_and_base_lr_when_it_can():
    m = conv_bn_net()
    x, y = batch(6)
    opt = cdl.SGD(m, lr=0.1, momentum=0.9)
    m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
    views = opt.velocities                       # views into the buffer stay live
    sd = opt.state_dict()
    opt.base_lr = 0.05
    del sd["base_lr"]
    opt.load_state_dict(sd)
    assert opt.base_lr == 0.05
    for name, v in views.items():
        np.testing.assert_array_equal(v, sd["state"]["momentum_buffer"][name])
        assert np.shares_memory(v, opt.buffers["momentum_buffer"])


def test_changed_settings_reach_the_fast_plans():
    # Dropout's p, BatchNorm's eps and LeakyReLU's slope are held by the plans: a change
    # rebuilds them, so every batch size computes what a fresh model with the setting does
    def make(p, eps, slope):
        return cdl.Sequential([cdl.Conv2d(3, 4, 3, padding=1), cdl.BatchNorm2d(4, eps=eps),
                               cdl.LeakyReLU(slope), cdl.Dropout(p), cdl.Flatten(),
                               cdl.Linear(256, 5)], (3, 8, 8), seed=7)
    x, y = batch(6)
    loss = cdl.SoftmaxCrossEntropy()
    m = make(0.3, 1e-5, 0.1)
    m.train_step(x, y, loss, cdl.SGD(m, lr=0.1))
    m.predict(x)
    m.layers[1].eps, m.layers[2].negative_slope, m.layers[3].p = 0.5, 0.9, 0.0
    ref = make(0.0, 0.5, 0.9)
    ref.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(m.predict(x), ref.predict(x))
    np.testing.assert_array_equal(m.predict(x[:3]), ref.predict(x[:3]))
    assert m.compute_gradients(x, y, loss) == ref.compute_gradients(x, y, loss)
    np.testing.assert_array_equal(m.gradient_buffer, ref.gradient_buffer)
    with pytest.raises(ValueError, match=r"Dropout: p must be in \[0, 1\), got 1.5"):
        m.layers[3].p = 1.5
    with pytest.raises(ValueError, match=r"BatchNorm2d: eps must be a finite number > 0"):
        m.layers[1].eps = 0.0
    assert m.layers[3].p == 0.0 and m.layers[1].eps == 0.5


def test_shapes_and_layers_are_fixed_once_built():
    m = cdl.Sequential([cdl.Conv2d(1, 2, 3), cdl.MaxPool2d(2), cdl.Flatten(),
                        cdl.Linear(2, 3)], (1, 4, 4))
    for layer, name, value in ((m.layers[0], "stride", (3, 3)), (m.layers[0], "padding", 1),
                               (m.layers[1], "kernel_size", (1, 1)),
                               (m.layers[3], "out_features", 7)):
        with pytest.raises(AttributeError, match=rf"{type(layer).__name__}: {name} is fixed "
                                                 rf"once the layer is built"):
            setattr(layer, name, value)
    with pytest.raises(TypeError):              # a tuple: another architecture is a new model
        m.layers[1] = cdl.ReLU()
    assert not hasattr(m.layers, "append")


def test_a_parameter_array_is_filled_in_place_not_replaced():
    # the pack, the plans and the optimizer hold the array: a new one would be read by
    # some paths only
    m = conv_bn_net()
    w = m.layers[0].params["weight"]
    with pytest.raises(TypeError, match=r"the array 'weight' is held by the model .* set its "
                                        r"values in place"):
        m.layers[0].params["weight"] = np.zeros_like(w)
    with pytest.raises(TypeError, match=r"the array 'running_var' is held by the model"):
        m.layers[1].buffers["running_var"] = np.ones(8, np.float32)
    assert m.layers[0].params["weight"] is w
    m.layers[0].params["weight"][...] = 0          # in place: every path sees it
    x, _ = batch(4)
    ref = conv_bn_net()
    ref.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(m.predict(x), ref.predict(x))
