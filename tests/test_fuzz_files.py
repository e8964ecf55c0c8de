"""Fuzzing the file readers: mutated ONNX files (cdl.onnx.load), safetensors and .npz
state-dict files (cdl.load_state_dict_file) and cdl's own bytes (cdl.loads).

Mutations: truncation, bit flips, overwritten, inserted and deleted bytes, and
structured lies (initializer dims, attribute values, opsets and input shapes in
ONNX; shapes, offsets and dtypes in a safetensors header; layer configs, input
shapes, declared array shapes and .npy headers in cdl's format), including huge
and negative dimensions.

The contract, for every reader: a mutated file either loads (a harmless
mutation: then the model also predicts) or raises ValueError (or TypeError for a
value of the wrong kind); protobuf's DecodeError, zipfile's errors, safetensors'
SafetensorError and JSON errors are all wrapped in ValueError. Never another
exception, never a crash, never a hang (a 60 s alarm per example), never a
large allocation (tracemalloc, which sees NumPy's buffers, peaks under 64 MB per
example while the files are a few KB).

The budget is bounded (``FUZZ_EXAMPLES`` examples per reader, 100 by default, set
the environment variable CDL_FUZZ_EXAMPLES to run longer); Hypothesis keeps
failing examples in its database so a failure reproduces.
"""
import io
import json
import os
import signal
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

import cdl

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("CDL_FUZZ_EXAMPLES", "100"))
PEAK_LIMIT = 64 << 20
HANG_SECONDS = 60.0   # wall time: generous, since a busy CI machine stretches it
CLEAN = (ValueError, TypeError)
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang(f"a reader ran for more than {HANG_SECONDS} s")


def guarded(fn):
    """fn() under the contract: returns its result or the clean exception it raised."""
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        return fn()
    except CLEAN as exc:
        return exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_LIMIT, f"peak allocation {peak / 2**20:.0f} MiB"


def predict_small(model):
    """A loaded model must also run (on a tiny batch, if its input is small)."""
    if int(np.prod(model.input_shape)) <= 100_000:
        x = np.random.default_rng(0).standard_normal((2,) + model.input_shape)
        model.predict(x.astype(model.dtype))
    return model


# ----------------------------------------------------------------------------------
# byte-level mutations (any format)
# ----------------------------------------------------------------------------------
@st.composite
def byte_mutation(draw, data):
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
    if kind == "truncate":
        return data[:draw(st.integers(0, n - 1))]
    b = bytearray(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    pos = draw(st.integers(0, n - 1))
    if kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=8))
        b[pos:pos + len(chunk)] = chunk
        return bytes(b)
    if kind == "insert":
        return bytes(b[:pos]) + draw(st.binary(min_size=1, max_size=16)) + bytes(b[pos:])
    return bytes(b[:pos]) + bytes(b[pos + draw(st.integers(1, 16)):])


LIES = st.sampled_from([0, 1, 2, 3, 7, -1, -7, 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1])


# ----------------------------------------------------------------------------------
# ONNX
# ----------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")


def _onnx_bases():
    m1 = cdl.Sequential([
        cdl.Conv2d(2, 3, 3, padding=1, bias=False), cdl.BatchNorm2d(3), cdl.ReLU(),
        cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1), cdl.LeakyReLU(0.1)],
                     shortcut=[cdl.Conv2d(3, 3, 1)]),
        cdl.MaxPool2d(2), cdl.AvgPool2d(2, stride=1), cdl.GlobalAvgPool2d(), cdl.Dropout(0.5),
        cdl.Linear(3, 4), cdl.Sigmoid(), cdl.Linear(4, 3), cdl.Tanh()], (2, 6, 6), seed=0)
    buf = io.BytesIO()
    cdl.onnx.export(m1, buf)
    h = onnx.helper
    rng = np.random.default_rng(0)
    nodes = [h.make_node("Shape", ["x"], ["s"]),
             h.make_node("Constant", [], ["i0"], value=h.make_tensor("i0", 7, [], [0])),
             h.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             h.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
             h.make_node("ConstantOfShape", ["one"], ["m1"],
                         value=h.make_tensor("v", 7, [1], [-1])),
             h.make_node("Concat", ["n1", "m1"], ["shape"], axis=0),
             h.make_node("Reshape", ["x", "shape"], ["flat"]),
             h.make_node("MatMul", ["flat", "w"], ["mm"]),
             h.make_node("Add", ["mm", "b"], ["y"])]
    inits = {"w": rng.standard_normal((12, 5)).astype(np.float32),
             "b": rng.standard_normal(5).astype(np.float32), "ax": np.array([0]),
             "one": np.array([1])}
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", 1, ["N", 3, 2, 2])],
                     [h.make_tensor_value_info("y", 1, ["N", 5])],
                     initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    m2 = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    m2.ir_version = 7
    return [buf.getvalue(), m2.SerializeToString()]


ONNX_BASES = _onnx_bases()


@st.composite
def onnx_lie(draw, data):
    m = onnx.ModelProto()
    m.ParseFromString(data)
    g = m.graph
    kind = draw(st.sampled_from(["dims", "attr", "opset", "input", "tensor_type", "rename"]))
    if kind == "dims" and len(g.initializer):
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        dims = draw(st.lists(LIES, max_size=5))
        del t.dims[:]
        t.dims.extend([max(min(d, 2**63 - 1), -2**63) for d in dims])
    elif kind == "attr" and len(g.node):
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        ints = [a for a in node.attribute if a.type in (onnx.AttributeProto.INTS,
                                                        onnx.AttributeProto.INT)]
        if ints:
            a = ints[draw(st.integers(0, len(ints) - 1))]
            if a.type == onnx.AttributeProto.INT:
                a.i = draw(LIES)
            else:
                vals = draw(st.lists(LIES, max_size=6))
                del a.ints[:]
                a.ints.extend(vals)
    elif kind == "opset":
        m.opset_import[0].version = draw(st.sampled_from([1, 6, 7, 9, 11, 12, 13, 99, 2**40]))
    elif kind == "input":
        dims = g.input[0].type.tensor_type.shape.dim
        d = dims[draw(st.integers(0, len(dims) - 1))]
        d.dim_value = draw(LIES.filter(lambda v: v >= 0))
    elif kind == "tensor_type" and len(g.initializer):
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        t.data_type = draw(st.integers(0, 25))
    elif kind == "rename" and len(g.node):
        node = g.node[draw(st.integers(0, len(g.node) - 1))]
        if len(node.input):
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(
                st.sampled_from(["", "x", "input", "nonexistent", node.output[0]]))
    return m.SerializeToString()


@FUZZ
@given(data=st.data())
def test_fuzz_onnx_load(data):
    base = data.draw(st.sampled_from(ONNX_BASES))
    mutated = data.draw(st.one_of(byte_mutation(base), onnx_lie(base)))
    out = guarded(lambda: predict_small(cdl.onnx.load(mutated)))
    if isinstance(out, Exception):
        assert "cdl.onnx.load" in str(out), out


# ----------------------------------------------------------------------------------
# safetensors and .npz state dicts
# ----------------------------------------------------------------------------------
def _state_model():
    return cdl.Sequential([cdl.Conv2d(2, 3, 3), cdl.BatchNorm2d(3), cdl.ReLU(), cdl.Flatten(),
                           cdl.Linear(3 * 4 * 4, 2)], (2, 6, 6), seed=0)


def _state_bases():
    bases = {}
    for fmt in ("safetensors", "npz"):
        if fmt == "safetensors":
            try:
                import safetensors  # noqa: F401
            except ImportError:
                continue
        buf = io.BytesIO()
        _state_model().save_state_dict(buf, format=fmt)
        bases[fmt] = buf.getvalue()
    return bases


STATE_BASES = _state_bases()


@st.composite
def safetensors_lie(draw, data):
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    what = draw(st.sampled_from(["shape", "offsets", "dtype", "length"]))
    if what == "shape":
        header[key]["shape"] = draw(st.lists(LIES, max_size=4))
    elif what == "offsets":
        header[key]["data_offsets"] = [draw(LIES), draw(LIES)]
    elif what == "dtype":
        header[key]["dtype"] = draw(st.sampled_from(["F16", "BF16", "I8", "U64", "BOOL",
                                                     "F64", "X", 3]))
    raw = json.dumps(header).encode()
    length = len(raw) if what != "length" else draw(LIES.filter(lambda v: 0 <= v < 2**64))
    return struct.pack("<Q", length) + raw + data[8 + n:]


@st.composite
def npz_lie(draw, data, header_member=None):
    """Rewrite one member of a zip/npz: its .npy header claims another shape or dtype,
    or (for cdl's __cdl__ member) its JSON is changed by ``header_member``."""
    zin = zipfile.ZipFile(io.BytesIO(data))
    names = zin.namelist()
    target = draw(st.sampled_from(names))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for name in names:
            raw = zin.read(name)
            if name == target:
                f = io.BytesIO(raw)
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                payload = raw[f.tell():]
                if header_member is not None and name == "__cdl__.npy" and draw(st.booleans()):
                    payload = header_member(draw, payload)
                    shape = (len(payload),)
                else:
                    shape = tuple(draw(st.lists(LIES.filter(lambda v: v >= 0), max_size=4)))
                    dtype = np.dtype(draw(st.sampled_from(["<f4", "<f8", "<i8", "|u1", "<c16",
                                                           str(dtype)])))
                hdr = io.BytesIO()
                np.lib.format.write_array_header_1_0(
                    hdr, {"descr": np.lib.format.dtype_to_descr(dtype),
                          "fortran_order": fortran, "shape": shape})
                raw = hdr.getvalue() + payload
            zout.writestr(name, raw)
    return out.getvalue()


@pytest.mark.skipif(not STATE_BASES, reason="no state-dict base files")
@FUZZ
@given(data=st.data())
def test_fuzz_state_dict_files(data):
    fmt = data.draw(st.sampled_from(sorted(STATE_BASES)))
    base = STATE_BASES[fmt]
    lie = safetensors_lie(base) if fmt == "safetensors" else npz_lie(base)
    mutated = data.draw(st.one_of(byte_mutation(base), lie))
    model = _state_model()
    out = guarded(lambda: cdl.load_state_dict_file(model, io.BytesIO(mutated), format=fmt))
    if isinstance(out, Exception):
        assert "cdl.load_state_dict_file" in str(out), out
    else:
        predict_small(model)


# ----------------------------------------------------------------------------------
# cdl's own format (cdl.dumps / cdl.loads, the bytes pickling goes through)
# ----------------------------------------------------------------------------------
def _cdl_base():
    m = cdl.Sequential([
        cdl.Conv2d(2, 3, 3, padding=1), cdl.BatchNorm2d(3), cdl.ReLU(),
        cdl.Residual([cdl.Conv2d(3, 3, 3, padding=1, bias=False)]), cdl.MaxPool2d(2),
        cdl.Flatten(), cdl.Dropout(0.3), cdl.Linear(27, 4)], (2, 6, 6), seed=0)
    opt = cdl.SGD(m, lr=0.1, momentum=0.9)
    x = np.random.default_rng(0).standard_normal((4, 2, 6, 6)).astype(np.float32)
    m.train_step(x, np.arange(4), cdl.SoftmaxCrossEntropy(), opt)
    return cdl.dumps(m, opt)


CDL_BASE = _cdl_base()


def _json_lie(draw, payload):
    header = json.loads(payload.decode())
    where = draw(st.sampled_from(["config", "input_shape", "arrays", "optimizer", "nest"]))
    layers = header["model"]["layers"]
    if where == "config":
        spec = layers[draw(st.integers(0, len(layers) - 1))]
        if spec["config"]:
            key = draw(st.sampled_from(sorted(spec["config"])))
            spec["config"][key] = draw(st.one_of(LIES, st.lists(LIES, max_size=3),
                                                 st.sampled_from([None, "x", 0.5, {}, True])))
    elif where == "input_shape":
        header["model"]["input_shape"] = draw(st.lists(LIES, max_size=4))
    elif where == "arrays":
        e = header["arrays"][draw(st.integers(0, len(header["arrays"]) - 1))]
        e["shape"] = draw(st.lists(LIES, max_size=4))
    elif where == "optimizer":
        header["optimizer"]["config"]["momentum"] = draw(st.sampled_from([-1, 2, "x", None]))
    else:   # Residuals nested thousands deep (written as text: json.dumps would recurse)
        depth = draw(st.integers(1, 5000))
        deep = '{"type": "Residual", "config": {"shortcut": null, "layers": [' * depth + \
            '{"type": "ReLU", "config": {}}' + "]}}" * depth
        text = json.dumps(header)
        i = text.index('"layers": [') + len('"layers": [')
        return (text[:i] + deep + ", " + text[i:]).encode()
    return json.dumps(header).encode()


@FUZZ
@given(data=st.data())
def test_fuzz_cdl_loads(data):
    mutated = data.draw(st.one_of(byte_mutation(CDL_BASE), npz_lie(CDL_BASE, _json_lie)))
    out = guarded(lambda: cdl.loads(mutated, optimizer=True))
    if isinstance(out, Exception):
        assert "cdl.load" in str(out) or "cdl.loads" in str(out), out
    else:
        predict_small(out[0])


def test_unpickling_damaged_bytes_is_a_clean_error():
    from cdl.io.format import _unpickle     # what pickle calls for a Sequential

    with pytest.raises(ValueError):
        _unpickle(CDL_BASE[:100])
