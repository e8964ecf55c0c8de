"""State dicts: PyTorch's names, checks before changes, and version-1 files."""
import json

import numpy as np
import pytest

import cdl


def lenet(dtype=np.float32):
    return cdl.Sequential([cdl.Conv2d(1, 6, 5, padding=2), cdl.ReLU(), cdl.MaxPool2d(2),
                           cdl.Conv2d(6, 16, 5), cdl.ReLU(), cdl.MaxPool2d(2), cdl.Flatten(),
                           cdl.Linear(400, 120), cdl.ReLU(), cdl.Linear(120, 10)],
                          (1, 28, 28), dtype=dtype, seed=0)


def test_state_dict_round_trip_and_names():
    a, b = lenet(), cdl.Sequential(lenet().layers[:0] or [cdl.Conv2d(1, 6, 5, padding=2),
                                                         cdl.ReLU(), cdl.MaxPool2d(2),
                                                         cdl.Conv2d(6, 16, 5), cdl.ReLU(),
                                                         cdl.MaxPool2d(2), cdl.Flatten(),
                                                         cdl.Linear(400, 120), cdl.ReLU(),
                                                         cdl.Linear(120, 10)],
                                   (1, 28, 28), seed=1)
    sd = a.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias",
                        "9.weight", "9.bias"]
    b.load_state_dict(sd)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    sd["0.weight"][...] = 0          # a copy: the model is not changed through it
    assert a.layers[0].params["weight"].any()


def test_state_dict_keys_match_torch():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 10))
    m = lenet()
    assert list(m.state_dict()) == list(net.state_dict())
    m.load_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(m.predict(x), ref, rtol=1e-4, atol=1e-5)


def test_load_state_dict_names_every_problem_and_changes_nothing():
    m = lenet()
    before = m.state_dict()
    bad = dict(before)
    del bad["0.bias"]
    bad["extra.weight"] = np.zeros(3)
    bad["3.weight"] = np.zeros((16, 6, 3, 3), np.float32)
    bad["9.bias"] = np.array(["a"] * 10)
    with pytest.raises(ValueError) as err:
        m.load_state_dict(bad)
    msg = str(err.value)
    for needle in ("missing keys ['0.bias']", "unexpected keys ['extra.weight']",
                   "3.weight has shape 16x6x3x3, the model needs 16x6x5x5",
                   "9.bias is not a numeric array (dtype <U1); the model needs float32 10"):
        assert needle in msg, msg
    for value in ("abc", None):      # a 0-d string or object array: its dtype, not "scalar"
        with pytest.raises(ValueError, match=r"9.bias is not a numeric array \(dtype "):
            m.load_state_dict(dict(before, **{"9.bias": value}))
    after = m.state_dict()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    with pytest.raises(TypeError, match="expected a dict"):
        m.load_state_dict([1, 2])


def test_out_of_range_values_are_refused_and_set_weights_checks_first():
    m = cdl.Sequential([cdl.Linear(3, 4), cdl.BatchNorm1d(4), cdl.Linear(4, 2)], (3,), seed=0)
    before = m.state_dict()
    bad = dict(before)
    bad["2.bias"] = np.array([1e300, np.nan])                    # NaN beside an overflow
    bad["1.num_batches_tracked"] = np.array(2**64 - 1, np.uint64)  # would wrap to -1
    with pytest.raises(ValueError) as err:
        m.load_state_dict(bad)
    for needle in ("2.bias overflows float32", "1.num_batches_tracked holds values outside "
                   "int64's range"):
        assert needle in str(err.value), str(err.value)
    # set_weights: a bad last key leaves every earlier one as it was
    w = {k: np.full_like(p, 7) for k, p, _ in m.parameters()}
    w["2.weight"] = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"Sequential.set_weights: .*2.weight has shape 3x3, "
                                         r"the model needs 2x4"):
        m.set_weights(w)
    w["2.weight"] = np.array([["a"] * 4] * 2)
    with pytest.raises(ValueError, match=r"2.weight is not a numeric array \(dtype <U1\)"):
        m.set_weights(w)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_optimizer_state_that_overflows_the_model_dtype_is_refused():
    # A float64 optimizer's state into a float32 one: values past float32's range were
    # stored as inf (a NumPy warning only), where the model's own load refuses them.
    def make(dtype):
        return cdl.Sequential([cdl.Linear(3, 2)], input_shape=(3,), dtype=dtype, seed=0)
    m64 = make(np.float64)
    o64 = cdl.Adam(m64)
    m64.train_step(np.random.default_rng(0).standard_normal((4, 3)), np.array([0, 1, 0, 1]),
                   cdl.SoftmaxCrossEntropy(), o64)
    sd = o64.state_dict()
    o32 = cdl.Adam(make(np.float32))
    o32.load_state_dict(sd)                 # in range: taken, rounded to float32
    np.testing.assert_array_equal(o32.state_dict()["state"]["exp_avg"]["0.weight"],
                                  sd["state"]["exp_avg"]["0.weight"].astype(np.float32))
    before = o32.state_dict()
    sd["state"]["exp_avg_sq"]["0.weight"][...] = 1e40
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: exp_avg_sq\[0.weight\] "
                                         r"overflows float32"):
        o32.load_state_dict(sd)
    after = o32.state_dict()
    assert after["step"] == before["step"]
    for b in before["state"]:
        for k in before["state"][b]:
            np.testing.assert_array_equal(after["state"][b][k], before["state"][b][k])


def test_version_1_files_still_load(tmp_path):
    """A file as the version-1 writer laid it out: parameters and SGD velocities."""
    m = lenet()
    opt = cdl.SGD(m, lr=0.05, momentum=0.9)
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = np.arange(8) % 10
    m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
    arrays, entries = {}, []
    for k, p, _ in m.parameters():
        arrays[f"param/{k}"] = p
        entries.append({"name": f"param/{k}", "shape": list(p.shape), "dtype": "float32"})
    for k, v in opt.velocities.items():
        arrays[f"optim/{k}"] = v
        entries.append({"name": f"optim/{k}", "shape": list(v.shape), "dtype": "float32"})
    header = {"format": "cdl-model", "version": 1, "model": m.get_config(), "arrays": entries,
              "optimizer": {"type": "SGD", "config": {"lr": 0.05, "momentum": 0.9,
                                                     "nesterov": False},
                            "base_lr": 0.05, "velocities": list(opt.velocities)}}
    path = tmp_path / "v1.npz"
    np.savez(path, __cdl__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    loaded, opt2 = cdl.load(path, optimizer=True)
    np.testing.assert_array_equal(loaded.predict(x), m.predict(x))
    for k, v in opt.velocities.items():
        np.testing.assert_array_equal(opt2.velocities[k], v)
    a = m.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt)
    b = loaded.train_step(x, y, cdl.SoftmaxCrossEntropy(), opt2)
    assert a == b
