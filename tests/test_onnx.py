"""ONNX export (cdl.onnx.export) and import (cdl.onnx.load).

Export: every layer type and ResNet-8 run in ONNX Runtime and match predict
(max abs error <= 1e-5 x the output scale in float32) at batch 1 and 37; float64
graphs run in ONNX Runtime where it has double kernels, else in onnx's reference
evaluator. Import: graphs exported by torch.onnx.export (dynamo=False) from
nn.Sequential CNNs with BatchNorm and from a torchvision-style BasicBlock ResNet
predict within 1e-5 of ONNX Runtime and train. ONNX's own backend test cases
are in tests/test_onnx_backend.py.
"""
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest

import cdl
import cdl.models

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def ort_run(data, x):
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def reference_run(data, x):
    from onnx.reference import ReferenceEvaluator
    return ReferenceEvaluator(onnx.load_from_string(data)).run(None, {"input": x})[0]


def exported(model, **kw):
    buf = io.BytesIO()
    cdl.onnx.export(model, buf, **kw)
    return buf.getvalue()


def randomise_buffers(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters."""
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = rng.uniform(-0.5, 0.5, v.shape)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 2.0, v.shape)
        elif k.endswith("bias") and v.ndim == 1:
            state[k] = rng.uniform(-0.3, 0.3, v.shape)
    model.load_state_dict(state)
    return model


def inputs(model, n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n,) + model.input_shape).astype(model.dtype)


# One small model per layer type (and per option that changes the exported graph).
LAYER_CASES = {
    "Linear": lambda: ([cdl.Linear(12, 7)], (12,)),
    "Linear_no_bias": lambda: ([cdl.Linear(12, 7, bias=False)], (12,)),
    "Conv2d": lambda: ([cdl.Conv2d(3, 4, 3, stride=2, padding=1)], (3, 9, 8)),
    "Conv2d_no_bias_rect": lambda: ([cdl.Conv2d(3, 4, (3, 1), stride=(1, 2), padding=(1, 0),
                                                bias=False)], (3, 7, 8)),
    "MaxPool2d": lambda: ([cdl.MaxPool2d(2)], (3, 8, 8)),
    "MaxPool2d_padded": lambda: ([cdl.MaxPool2d(3, stride=2, padding=1)], (2, 9, 7)),
    "AvgPool2d": lambda: ([cdl.AvgPool2d(2)], (3, 8, 8)),
    "AvgPool2d_padded": lambda: ([cdl.AvgPool2d(3, stride=2, padding=1)], (2, 9, 7)),
    "GlobalAvgPool2d": lambda: ([cdl.GlobalAvgPool2d()], (5, 6, 7)),
    "ReLU": lambda: ([cdl.ReLU()], (3, 5, 4)),
    "Sigmoid": lambda: ([cdl.Sigmoid()], (3, 5, 4)),
    "Tanh": lambda: ([cdl.Tanh()], (3, 5, 4)),
    "LeakyReLU": lambda: ([cdl.LeakyReLU(0.2)], (3, 5, 4)),
    "Flatten": lambda: ([cdl.Flatten()], (3, 5, 4)),
    "BatchNorm1d": lambda: ([cdl.Linear(6, 5), cdl.BatchNorm1d(5)], (6,)),
    "BatchNorm1d_CL": lambda: ([cdl.BatchNorm1d(4)], (4, 6)),
    "BatchNorm2d": lambda: ([cdl.BatchNorm2d(3)], (3, 5, 4)),
    "BatchNorm2d_no_affine_relu": lambda: ([cdl.BatchNorm2d(3, affine=False), cdl.ReLU()],
                                           (3, 5, 4)),
    "Dropout": lambda: ([cdl.Linear(6, 5), cdl.Dropout(0.3), cdl.ReLU()], (6,)),
    "Residual_identity_relu": lambda: ([cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1),
                                                      cdl.ReLU()]), cdl.ReLU()], (3, 6, 6)),
    "Residual_shortcut": lambda: ([cdl.Residual(
        [cdl.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), cdl.BatchNorm2d(4)],
        shortcut=[cdl.Conv2d(3, 4, 1, stride=2, bias=False), cdl.BatchNorm2d(4)])],
        (3, 6, 6)),
    "lenet5_bn_dropout": None,   # built below
}


def build_case(name, dtype):
    if name == "lenet5_bn_dropout":
        return randomise_buffers(cdl.models.lenet5(batchnorm=True, dropout=0.2, dtype=dtype,
                                                   seed=3))
    layers, shape = LAYER_CASES[name]()
    return randomise_buffers(cdl.Sequential(layers, shape, dtype=dtype, seed=0))


def test_every_layer_type_has_a_case():
    covered = set()
    for name in LAYER_CASES:
        covered |= {type(l).__name__ for _, l in build_case(name, np.float32).chain.walk()}
    builtin = {n for n, c in cdl.layers.LAYER_TYPES.items() if c.__module__.startswith("cdl.")}
    assert builtin <= covered, builtin - covered


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_export_float32_matches_predict_in_onnxruntime(name):
    model = build_case(name, np.float32)
    data = exported(model)
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    for n in (1, 37):
        x = inputs(model, n)
        want = model.predict(x)
        got = ort_run(data, x)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-3)


# ONNX Runtime's CPU kernels for Conv, AveragePool and GlobalAveragePool are float32-only.
_ORT_DOUBLE = {"Gemm", "MaxPool", "BatchNormalization", "Relu", "Sigmoid", "Tanh",
               "LeakyRelu", "Flatten", "Add", "Identity"}


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
def test_export_float64(name):
    model = build_case(name, np.float64)
    data = exported(model)
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in proto.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE))
    ops = {n.op_type for n in proto.graph.node}
    run = ort_run if ops <= _ORT_DOUBLE else reference_run
    # ONNX float attributes (LeakyRelu's alpha, BatchNormalization's epsilon) are float32
    tol = 1e-7 if ops & {"LeakyRelu", "BatchNormalization"} else 1e-12
    for n in (1, 37):
        x = inputs(model, n)
        want = model.predict(x)
        got = run(data, x)
        assert np.abs(got - want).max() <= tol * max(np.abs(want).max(), 1e-3)


@pytest.mark.parametrize("name", sorted(LAYER_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_export_then_import_gives_the_same_model(name, dtype):
    model = build_case(name, dtype)
    back = cdl.onnx.load(exported(model))
    assert back.dtype == model.dtype and back.input_shape == model.input_shape
    x = inputs(model, 37)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    # the logical layers come back (Dropout is dropped at export), with the same names
    kinds = lambda m: [type(l).__name__ for _, l in m.chain.walk()  # noqa: E731
                       if not isinstance(l, cdl.Dropout)]
    assert kinds(back) == kinds(model)
    # (ONNX has no untrained normalisation: BatchNorm2d(affine=False) comes back affine,
    # with weight 1 and bias 0, so it can be fine-tuned)
    if name not in ("BatchNorm2d_no_affine_relu", "lenet5_bn_dropout"):
        assert sorted(back.state_dict()) == sorted(model.state_dict())


def _trained_resnet8(dtype=np.float32):
    model = cdl.models.resnet8(input_shape=(3, 16, 16), dtype=dtype, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 16, 16)).astype(dtype)
    opt = cdl.SGD(model, lr=0.05, momentum=0.9)
    model.fit(x, np.arange(32) % 10, cdl.SoftmaxCrossEntropy(), opt, epochs=2, batch_size=8,
              verbose=0)
    return model


def test_resnet8_export_matches_predict_at_batch_1_and_37(tmp_path):
    model = _trained_resnet8()
    path = tmp_path / "resnet8.onnx"
    proto = cdl.onnx.export(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Add") == 3 and ops.count("Conv") == 9 and "Dropout" not in ops
    # weights are initializers named by their state-dict keys
    assert {t.name for t in proto.graph.initializer} == set(model.state_dict()) - {
        k for k in model.state_dict() if k.endswith("num_batches_tracked")}
    data = path.read_bytes()
    for n in (1, 37):
        x = inputs(model, n, seed=n)
        want = model.predict(x)
        got = ort_run(data, x)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    back = cdl.onnx.load(path)
    x = inputs(model, 37)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    with open(path, "rb") as f:     # binary file objects and ModelProtos load too
        np.testing.assert_array_equal(cdl.onnx.load(f).predict(x), model.predict(x))
    np.testing.assert_array_equal(cdl.onnx.load(proto).predict(x), model.predict(x))
    with pytest.raises(TypeError, match="expected a path, bytes"):
        cdl.onnx.load(42)


def test_export_options_and_errors(tmp_path):
    model = build_case("Conv2d", np.float32)
    fixed = onnx.load_from_string(exported(model, dynamic_batch=False, opset=13))
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 9, 8]
    assert fixed.opset_import[0].version == 13
    dyn = onnx.load_from_string(exported(model))
    assert dyn.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert dyn.opset_import[0].version == 17
    for bad in (12, 10**6, "17", True):
        with pytest.raises(ValueError, match="opset must be an int"):
            cdl.onnx.export(model, io.BytesIO(), opset=bad)
    with pytest.raises(TypeError, match="cdl.Sequential"):
        cdl.onnx.export(object(), io.BytesIO())

    class NoOnnx(cdl.Layer):
        def _forward(self, x, ws, nt, train):
            return x

    m = cdl.Sequential([cdl.Linear(3, 3), NoOnnx()], (3,))
    with pytest.raises(ValueError, match=r"NoOnnx\[1\].*cannot be exported"):
        cdl.onnx.export(m, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    # a model that is the identity at inference still gives a valid graph
    only = cdl.Sequential([cdl.Dropout(0.5)], (4,))
    x = inputs(only, 5)
    np.testing.assert_array_equal(ort_run(exported(only), x), x)


def test_import_cdl_never_imports_onnx():
    code = ("import sys, cdl, cdl.onnx, cdl.io.onnx; "
            "assert 'onnx' not in sys.modules and 'safetensors' not in sys.modules; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_missing_onnx_gives_a_clear_import_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("No module named 'onnx'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"pip install cdl-cpu\[onnx\]"):
        cdl.onnx.load(b"")


# ---------------------------------------------------------------------------------
# Import of graphs PyTorch exports
# ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


def _randomise_torch(torch, net):
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return net.eval()


def torch_export(torch, net, shape, dynamic=True, opset=17, **kw):
    buf = io.BytesIO()
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, x, buf, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"],
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None,
                          **kw)
    return buf.getvalue()


def _sequential_cnn(torch):
    nn = torch.nn
    return _randomise_torch(torch, nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(12),
        nn.LeakyReLU(0.1), nn.AvgPool2d(2), nn.Conv2d(12, 12, 3, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(12 * 4 * 4, 32), nn.BatchNorm1d(32),
        nn.Sigmoid(), nn.Linear(32, 10)))


def _check_against_ort(model, data, shape, n=37, tol=1e-5):
    x = np.random.default_rng(5).standard_normal((n,) + shape).astype(np.float32)
    want = ort_run(data, x)
    got = model.predict(x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol, np.abs(got - want).max()
    return x


def _fit_works(model, x):
    y = np.arange(len(x)) % model.output_shape[0]
    loss = cdl.SoftmaxCrossEntropy()
    before = model.evaluate(x, y, loss)[0]
    hist = model.fit(x, y, loss, cdl.Adam(model, lr=1e-3), epochs=5, batch_size=8, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    assert model.evaluate(x, y, loss)[0] < before


@pytest.mark.parametrize("training", ["EVAL", "PRESERVE"])
@pytest.mark.parametrize("dynamic", [True, False])
def test_torch_sequential_cnn_loads_predicts_and_trains(torch, training, dynamic):
    net = _sequential_cnn(torch)
    data = torch_export(torch, net, (3, 16, 16), dynamic=dynamic,
                        training=getattr(torch.onnx.TrainingMode, training))
    model = cdl.onnx.load(data)
    kinds = [type(l).__name__ for l in model.layers]
    # EVAL folds the 2-D BatchNorms into the convolutions; PRESERVE keeps them
    assert kinds.count("BatchNorm2d") == (2 if training == "PRESERVE" else 0)
    assert "BatchNorm1d" in kinds and "Dropout" not in kinds
    x = _check_against_ort(model, data, (3, 16, 16), n=37 if dynamic else 2)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(model.predict(x) - ref).max() <= 1e-5
    _fit_works(model, np.concatenate([x] * (16 if not dynamic else 1)))


class _BlockFactory:
    """A torchvision-style BasicBlock ResNet, defined here (torch is test-only)."""

    @staticmethod
    def make(torch, flatten="view"):
        nn = torch.nn

        class BasicBlock(nn.Module):
            expansion = 1

            def __init__(self, inplanes, planes, stride=1, downsample=None):
                super().__init__()
                self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(planes)
                self.relu = nn.ReLU(inplace=True)
                self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes)
                self.downsample = downsample

            def forward(self, x):
                identity = x
                out = self.relu(self.bn1(self.conv1(x)))
                out = self.bn2(self.conv2(out))
                if self.downsample is not None:
                    identity = self.downsample(x)
                out += identity
                return self.relu(out)

        class ResNet(nn.Module):
            def __init__(self, widths=(8, 16, 32), num_classes=10):
                super().__init__()
                self.inplanes = widths[0]
                self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(widths[0])
                self.relu = nn.ReLU(inplace=True)
                self.maxpool = nn.MaxPool2d(3, 2, 1)
                self.layer1 = self._make_layer(widths[0], 2)
                self.layer2 = self._make_layer(widths[1], 1, stride=2)
                self.layer3 = self._make_layer(widths[2], 1, stride=2)
                self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
                self.fc = nn.Linear(widths[2], num_classes)

            def _make_layer(self, planes, blocks, stride=1):
                down = None
                if stride != 1 or self.inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes))
                layers = [BasicBlock(self.inplanes, planes, stride, down)]
                self.inplanes = planes
                layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
                return nn.Sequential(*layers)

            def forward(self, x):
                x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
                x = self.layer3(self.layer2(self.layer1(x)))
                x = self.avgpool(x)
                x = x.view(x.size(0), -1) if flatten == "view" else torch.flatten(x, 1)
                return self.fc(x)

        return _randomise_torch(torch, ResNet())


@pytest.mark.parametrize("training", ["EVAL", "PRESERVE"])
@pytest.mark.parametrize("flatten", ["view", "flatten"])
def test_torch_basicblock_resnet_loads_predicts_and_trains(torch, training, flatten):
    net = _BlockFactory.make(torch, flatten)
    data = torch_export(torch, net, (3, 32, 32),
                        training=getattr(torch.onnx.TrainingMode, training))
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    if flatten == "view":   # x.view(x.size(0), -1): Shape -> Gather -> Concat -> Reshape
        assert {"Shape", "Gather", "Concat", "Reshape"} <= ops
    model = cdl.onnx.load(data)
    residuals = [l for l in model.layers if isinstance(l, cdl.Residual)]
    assert len(residuals) == 4 and sum(r.shortcut is not None for r in residuals) == 2
    for n in (1, 37):
        _check_against_ort(model, data, (3, 32, 32), n=n)
    x = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    _fit_works(model, x)


def test_torch_old_opset_is_converted(torch):
    net = _sequential_cnn(torch)
    data = torch_export(torch, net, (3, 16, 16), opset=11)
    assert onnx.load_from_string(data).opset_import[0].version == 11
    _check_against_ort(cdl.onnx.load(data), data, (3, 16, 16))


@pytest.mark.parametrize("kind", ["Softmax", "LogSoftmax"])
def test_final_softmax_is_reported(torch, kind):
    nn = torch.nn
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), getattr(nn, kind)(dim=1)).eval()
    data = torch_export(torch, net, (3, 4))
    with pytest.warns(UserWarning, match="ends with a"):
        model = cdl.onnx.load(data)
    assert model.onnx_output_activation == kind.lower().replace("logsoftmax", "log_softmax")
    x = np.random.default_rng(0).standard_normal((9, 3, 4)).astype(np.float32)
    probs = cdl.functional.softmax(model.predict(x))
    want = ort_run(data, x)
    if kind == "LogSoftmax":
        want = np.exp(want)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    plain = cdl.onnx.load(exported(cdl.Sequential([cdl.Linear(3, 2)], (3,))))
    assert plain.onnx_output_activation is None
    # it travels with the model: copies, pickles, files; other models have it as None
    import copy
    import pickle
    f = io.BytesIO()
    model.save(f)
    f.seek(0)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), cdl.load(f)):
        assert twin.onnx_output_activation == model.onnx_output_activation
    other = cdl.Sequential([cdl.Linear(3, 2)], (3,))
    assert other.onnx_output_activation is None
    with pytest.raises(ValueError, match=r"onnx_output_activation must be None, 'softmax' or "
                                         r"'log_softmax', got 'Softmax'"):
        other.onnx_output_activation = "Softmax"      # (a file that would not load)
    assert other.onnx_output_activation is None


# ---------------------------------------------------------------------------------
# Refusals: clean ValueErrors that name the node, its op type, the reason, the ops
# ---------------------------------------------------------------------------------
def graph_model(nodes, inits, in_shape, out_shape=None, opset=17, dtype=np.float32,
                extra_inputs=()):
    h = onnx.helper
    elem = onnx.TensorProto.FLOAT if dtype == np.float32 else onnx.TensorProto.DOUBLE
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", elem, in_shape)]
                     + list(extra_inputs),
                     [h.make_tensor_value_info(nodes[-1].output[0], elem, out_shape)],
                     initializer=[onnx.numpy_helper.from_array(np.asarray(v), k)
                                  for k, v in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 8
    return m.SerializeToString()


def refused(data, *patterns):
    with pytest.raises(ValueError) as info:
        cdl.onnx.load(data)
    msg = str(info.value)
    assert "Supported ops:" in msg or "not a valid ONNX" in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


def test_refusals_name_node_op_and_reason():
    h = onnx.helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv = lambda **kw: h.make_node("Conv", ["x", "w"], ["y"], name="c1", **kw)  # noqa: E731
    shape = ["N", 3, 8, 8]
    refused(graph_model([conv(dilations=[2, 2])], {"w": w}, shape),
            "node 'c1' (Conv)", "dilations=[2, 2]")
    refused(graph_model([h.make_node("Conv", ["x", "w"], ["y"], name="g", group=3)],
                        {"w": w[:, :1]}, shape), "(Conv)", "group=3")
    refused(graph_model([conv(pads=[1, 1, 0, 0])], {"w": w}, shape), "asymmetric padding")
    refused(graph_model([conv(auto_pad="SAME_UPPER")],
                        {"w": rng.standard_normal((4, 3, 2, 2)).astype(np.float32)}, shape),
            "asymmetric padding", "auto_pad=SAME_UPPER")
    # a weight that is computed from the input, not a constant
    refused(graph_model([h.make_node("Conv", ["x", "x"], ["y"], name="c")], {}, shape),
            "not a constant")
    refused(graph_model([h.make_node("Conv", ["x", "w"], ["y"], name="c")], {}, shape,
                        extra_inputs=[h.make_tensor_value_info("w", 1, [4, 3, 3, 3])]),
            "needs 2 inputs")
    # unsupported ops
    msg = refused(graph_model([h.make_node("Elu", ["x"], ["y"], name="e")], {}, shape),
                  "node 'e' (Elu)", "not supported")
    for op in ("Conv", "Gemm", "MatMul", "Relu", "BatchNormalization", "Add", "Reshape"):
        assert op in msg.split("Supported ops:")[1]
    refused(graph_model([h.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2],
                                     ceil_mode=1)], {}, ["N", 3, 7, 7]), "ceil_mode")
    refused(graph_model([h.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3],
                                     pads=[1, 1, 1, 1])], {}, shape), "count_include_pad=0")
    refused(graph_model([h.make_node("Relu", ["x"], ["y"], name="r", domain="com.example")],
                        {}, shape), "custom ops")
    refused(graph_model([h.make_node("Relu", ["x"], ["y"], foo=1)], {}, shape),
            "attribute 'foo'")
    # a branch cdl cannot express: a value used by two branches that are both kept
    nodes = [h.make_node("Relu", ["x"], ["a"], name="r1"),
             h.make_node("Add", ["a", "x"], ["b"], name="add1"),
             h.make_node("Add", ["b", "a"], ["y"], name="add2")]
    refused(graph_model(nodes, {}, shape), "two branches")
    refused(graph_model([h.make_node("Add", ["x", "c"], ["y"], name="ac")],
                        {"c": np.ones(8, np.float32)}, shape), "adds a constant")
    refused(graph_model([h.make_node("Relu", ["x"], ["y"])], {}, ["N", "C", 8, 8]),
            "input_shape=")
    refused(graph_model([h.make_node("Flatten", ["x"], ["y"], axis=0)], {}, shape),
            "axis=0")
    refused(b"\x08\x07garbage that is not a protobuf", "not a valid ONNX")


def test_input_shape_argument_fixes_a_symbolic_shape():
    h = onnx.helper
    data = graph_model([h.make_node("Relu", ["x"], ["y"])], {}, ["N", "C", 8, 8])
    model = cdl.onnx.load(data, input_shape=(3, 8, 8))
    assert model.input_shape == (3, 8, 8)
    for bad, error in (((3.7, 8, 8), ValueError), ((True, 8, 8), ValueError),
                       ((3, 8, None), ValueError), ("abc", TypeError), ((), ValueError)):
        with pytest.raises(error, match=r"cdl.onnx.load: input_shape must be"):
            cdl.onnx.load(data, input_shape=bad)
    with pytest.raises(ValueError, match=r"input_shape \(3, 8, 9\) contradicts the graph's "
                                         r"input shape \(N, C, 8, 8\)"):
        cdl.onnx.load(data, input_shape=(3, 8, 9))


def test_pool_with_negative_same_padding_is_refused():
    # kernel < stride with auto_pad=SAME_*: ONNX's formula gives negative padding, where
    # ONNX Runtime's AveragePool crops, its MaxPool refuses and cdl padded by 0 (a third
    # answer); Conv, where the runtimes clamp to 0 as cdl does, still loads
    h = onnx.helper
    for op in ("AveragePool", "MaxPool"):
        node = h.make_node(op, ["x"], ["y"], kernel_shape=[1, 1], strides=[3, 3],
                           auto_pad="SAME_UPPER")
        refused(graph_model([node], {}, ["N", 1, 3, 3]), f"({op})", "negative padding (-2)")
    w = np.ones((1, 1, 1, 1), np.float32)
    conv = h.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1], strides=[3, 3],
                       auto_pad="SAME_UPPER")
    data = graph_model([conv], {"w": w}, ["N", 1, 3, 3])
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(cdl.onnx.load(data).predict(x), ort_run(data, x))


def test_global_pool_reshaped_to_its_own_shape_loads():
    # GlobalAveragePool then a Reshape to (N, C, 1, 1): ONNX's own shape, not a flatten
    h = onnx.helper
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    gap = h.make_node("GlobalAveragePool", ["x"], ["g"])
    cases = [([gap, h.make_node("Reshape", ["g", "s"], ["y"])], [0, 3, 1, 1],
              ["AvgPool2d"], (2, 3, 1, 1)),
             ([gap, h.make_node("Reshape", ["g", "s"], ["r"]),
               h.make_node("Flatten", ["r"], ["y"])], [0, -1, 1, 1],
              ["AvgPool2d", "Flatten"], (2, 3)),
             ([gap, h.make_node("Reshape", ["g", "s"], ["y"])], [0, -1],
              ["GlobalAvgPool2d"], (2, 3))]
    for nodes, target, kinds, shape in cases:
        data = graph_model(nodes, {"s": np.array(target, np.int64)}, ["N", 3, 4, 4])
        model = cdl.onnx.load(data)
        assert [type(l).__name__ for l in model.layers] == kinds
        got, want = model.predict(x), ort_run(data, x)
        assert got.shape == want.shape == shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_export_refuses_settings_a_float32_attribute_cannot_hold():
    for layer, pattern in ((cdl.LeakyReLU(1e39), r"LeakyReLU\[0\]: ONNX stores LeakyRelu's "
                                                 r"attribute alpha as a float32, which turns "
                                                 r"1e\+39 into inf"),
                           (cdl.BatchNorm1d(4, eps=1e-50), r"BatchNorm1d\[0\]: .*epsilon .*"
                                                           r"turns 1e-50 into 0.0"),
                           (cdl.BatchNorm1d(4, eps=1e39), r"epsilon .* turns 1e\+39 into inf")):
        model = cdl.Sequential([layer], (4,), dtype=np.float64)
        out = io.BytesIO()
        with pytest.raises(ValueError, match=pattern):
            cdl.onnx.export(model, out)
        assert out.getvalue() == b""
    model = cdl.Sequential([cdl.BatchNorm1d(4, eps=1e-12)], (4,), dtype=np.float64)
    assert cdl.onnx.load(exported(model)).layers[0].eps == pytest.approx(1e-12, rel=1e-7)


def test_matmul_add_and_folded_reshape_shapes():
    h = onnx.helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    nodes = [
        h.make_node("Shape", ["x"], ["s"]),
        h.make_node("Constant", [], ["i0"], value=h.make_tensor("i0", 7, [], [0])),
        h.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        h.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
        h.make_node("ConstantOfShape", ["one"], ["m1f"],
                    value=h.make_tensor("v", 7, [1], [-1])),
        h.make_node("Concat", ["n1", "m1f"], ["shape"], axis=0),
        h.make_node("Reshape", ["x", "shape"], ["flat"]),
        h.make_node("MatMul", ["flat", "w"], ["mm"]),
        h.make_node("Add", ["b", "mm"], ["y"]),
    ]
    data = graph_model(nodes, {"w": w, "b": b, "ax": np.array([0]), "one": np.array([1])},
                       ["N", 3, 2, 2], ["N", 5])
    model = cdl.onnx.load(data)
    assert [type(l).__name__ for l in model.layers] == ["Flatten", "Linear"]
    _check_against_ort(model, data, (3, 2, 2))


# ---------------------------------------------------------------------------------
# Round trips of what export writes, and import cost on deep graphs
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,shape", [
    ([cdl.Linear(4, 4), cdl.Residual([cdl.Dropout(0.5)]), cdl.ReLU()], (4,)),
    ([cdl.Conv2d(2, 2, 1), cdl.Residual([cdl.Dropout(0.5)], shortcut=[cdl.Dropout(0.1)]),
      cdl.Flatten()], (2, 3, 3)),
    ([cdl.Linear(3, 3), cdl.Residual([cdl.Residual([cdl.Dropout(0.2)]), cdl.Dropout(0.1)]),
      cdl.Tanh()], (3,)),
], ids=["body", "both_branches", "nested"])
def test_a_residual_of_dropout_round_trips(layers, shape):
    """Export writes Add(x, x) for a Residual whose branches are only Dropout: it loads
    back as a Residual whose body is Dropout(0), the identity, and predicts the same."""
    model = cdl.Sequential(layers, shape, seed=0)
    data = exported(model)
    back = cdl.onnx.load(data)
    x = inputs(model, 5)
    np.testing.assert_allclose(ort_run(data, x), model.predict(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    def residuals(m):
        return [l for _, l in m.chain.walk() if isinstance(l, cdl.Residual)]
    assert len(residuals(back)) == len(residuals(model))
    assert all(l.p == 0 for _, l in back.chain.walk() if isinstance(l, cdl.Dropout))
    y = np.arange(5) % model.output_shape[0]
    assert np.isfinite(back.train_step(x, y, cdl.SoftmaxCrossEntropy(), cdl.SGD(back, 0.1)))


@pytest.mark.parametrize("layers", [[cdl.Dropout(0.5)], [cdl.Dropout(0.2), cdl.Dropout(0.1)]],
                         ids=["one", "two"])
def test_a_model_of_dropout_alone_round_trips(layers):
    """Export writes one Identity for it: it loads back as Dropout(0), the identity."""
    model = cdl.Sequential(layers, (3, 4), seed=0)
    data = exported(model)
    assert [n.op_type for n in onnx.load_from_string(data).graph.node] == ["Identity"]
    back = cdl.onnx.load(data)
    assert [l.describe() for l in back.layers] == ["Dropout(p=0)"]
    x = inputs(model, 5)
    np.testing.assert_array_equal(back.predict(x), model.predict(x))
    np.testing.assert_array_equal(ort_run(data, x), x)


def test_a_sum_of_a_value_with_itself_loads():
    h = onnx.helper
    data = graph_model([h.make_node("Relu", ["x"], ["r"]), h.make_node("Sum", ["r", "r"], ["y"])],
                       {}, ["N", 2, 3, 3])
    model = cdl.onnx.load(data)
    _check_against_ort(model, data, (2, 3, 3))


def _chain(op, n):
    """x -> op -> op -> ... (n nodes) on (N, 4); MatMul nodes share one 4x4 weight."""
    h = onnx.helper
    w = ["w"] if op == "MatMul" else []
    nodes = [h.make_node(op, ["x" if i == 0 else f"v{i - 1}"] + w, [f"v{i}"]) for i in range(n)]
    inits = {"w": np.eye(4, dtype=np.float32)} if w else {}
    return graph_model(nodes, inits, ["N", 4])


def _import_peak_memory(data):
    import tracemalloc

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        cdl.onnx.load(data)
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        if not tracing:
            tracemalloc.stop()


def _import_lines_run(data):
    """How many lines of cdl's Python code importing ``data`` runs."""
    import os

    root = os.path.dirname(cdl.__file__)
    count = 0

    def count_lines(frame, event, arg):
        nonlocal count
        count += event == "line"
        return count_lines

    def on_call(frame, event, arg):
        return count_lines if frame.f_code.co_filename.startswith(root) else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        cdl.onnx.load(data)
    finally:
        sys.settrace(previous)
    return count


def test_deep_chain_import_memory_grows_linearly():
    """Each value once kept a copy of the list of all values before it: a 32000-Relu
    chain took 4.4 GB and 32 s. Four times the depth must take about four times the
    memory (it took ten times)."""
    small, large = (_import_peak_memory(_chain("Relu", n)) for n in (500, 2000))
    assert large < 6 * small, (small, large)


def test_deep_chain_import_work_grows_linearly():
    """Layers ask which nodes use a node's output (MatMul looks for its bias Add): the
    answer once rescanned every node. Four times the depth must run about four times
    the lines of Python (it ran eight times)."""
    small, large = (_import_lines_run(_chain("MatMul", n)) for n in (200, 800))
    assert large < 5 * small, (small, large)


def test_file_arguments_are_checked(tmp_path):
    model = cdl.Sequential([cdl.Linear(3, 2)], (3,))
    path = tmp_path / "m.onnx"
    cdl.onnx.export(model, path)
    with open(path, "r") as text, pytest.raises(TypeError, match=r"cdl.onnx.load: .*binary "
                                                               r"mode \('rb'\)"):
        cdl.onnx.load(text)
    with open(tmp_path / "t.onnx", "w") as text, \
            pytest.raises(TypeError, match=r"cdl.onnx.export: .*binary mode \('wb'\)"):
        cdl.onnx.export(model, text)
    with pytest.raises(TypeError, match=r"cdl.onnx.export: f must be a path or a binary file "
                                        r"object, got int"):
        cdl.onnx.export(model, 123)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "t.onnx"]


def test_matmul_by_a_vector_says_so():
    h = onnx.helper
    data = graph_model([h.make_node("MatMul", ["x", "w"], ["y"])],
                       {"w": np.ones(5, np.float32)}, ["N", 5])
    refused(data, "(MatMul)", "weight B must be a matrix, got 5")
