"""SGD update and axpy kernels against a NumPy twin of torch.optim.SGD's rule."""
import importlib

import numpy as np
import pytest

import cdl.functional as F
from cdl._kernels import _runtime
from cdl._kernels import elementwise


def ref_sgd(p, g, v, lr, momentum, nesterov, wd):
    """One step of torch.optim.SGD (dampening 0) in plain NumPy; returns new (p, v)."""
    d = g + wd * p
    if momentum:
        v = momentum * v + d
        d = d + momentum * v if nesterov else v
    return p - lr * d, v


CASES = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=1e-3),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, momentum=0.9, weight_decay=5e-4),
    dict(lr=0.02, momentum=0.5, nesterov=True),
    dict(lr=0.02, momentum=0.99, nesterov=True, weight_decay=1e-2),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (16, 3, 3, 3), (100_003,)])
@pytest.mark.parametrize("opts", CASES)
def test_sgd_matches_numpy_over_steps(opts, shape, dtype):
    rng = np.random.default_rng(int(np.prod(shape)))
    p = rng.standard_normal(shape).astype(dtype)
    mom = opts.get("momentum", 0.0)
    v = np.zeros_like(p) if mom else None
    p_ref = p.astype(np.float64)
    v_ref = np.zeros_like(p_ref)
    for _ in range(4):
        g = rng.standard_normal(shape).astype(dtype)
        out = F.sgd_update(p, g, velocity=v, **opts)
        assert out is p
        p_ref, v_ref = ref_sgd(p_ref, g.astype(np.float64), v_ref, opts["lr"], mom,
                               opts.get("nesterov", False), opts.get("weight_decay", 0.0))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(p, p_ref, rtol=tol, atol=tol)
    if mom:
        np.testing.assert_allclose(v, v_ref, rtol=tol, atol=tol)


def test_velocity_with_zero_momentum_is_plain_sgd():
    p = np.ones(5)
    v = np.zeros(5)
    F.sgd_update(p, np.full(5, 2.0), lr=0.5, velocity=v)
    np.testing.assert_array_equal(p, np.zeros(5))
    np.testing.assert_array_equal(v, np.full(5, 2.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threads_bitwise(dtype):
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(200_001).astype(dtype)
    g = rng.standard_normal(p0.shape).astype(dtype)
    res = []
    for nt in (1, 2):
        p, v = p0.copy(), np.full_like(p0, 0.1)
        F.sgd_update(p, g, lr=0.1, velocity=v, momentum=0.9, nesterov=True,
                     weight_decay=1e-3, threads=nt)
        res.append((p.tobytes(), v.tobytes()))
    assert res[0] == res[1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_chunked_update_matches_whole(dtype, momentum, nesterov, wd):
    """sgd_update_chunks (parts dealt to threads by owner) updates exactly the listed
    parts, as sgd_update would, for any thread count; gaps stay untouched."""
    rng = np.random.default_rng(4)
    p0 = rng.standard_normal(1000).astype(dtype)
    g = rng.standard_normal(p0.shape).astype(dtype)
    v0 = rng.standard_normal(p0.shape).astype(dtype)
    chunks = np.array([[0, 300, 0], [300, 550, 1], [550, 551, 2], [560, 1000, 3]], np.int64)
    want_p, want_v = p0.copy(), v0.copy()
    for start, stop, _ in chunks:
        F.sgd_update(want_p[start:stop], g[start:stop], lr=0.1, momentum=momentum,
                     nesterov=nesterov, velocity=want_v[start:stop] if momentum else None,
                     weight_decay=wd)
    for nt in (1, 2, 3, 5):
        p, v = p0.copy(), v0.copy()
        elementwise.sgd_update_chunks(p, g, v if momentum else None, chunks, 0.1, momentum,
                                      nesterov, wd, nt)
        assert p.tobytes() == want_p.tobytes() and v.tobytes() == want_v.tobytes(), nt
        assert (p[551:560] == p0[551:560]).all()
    if dtype == np.float32:
        p, v = p0.copy(), v0.copy()
        elementwise.SGDChunks(p, g, v if momentum else None, chunks).run(0.1, momentum,
                                                                         nesterov, wd, 2)
        assert p.tobytes() == want_p.tobytes() and v.tobytes() == want_v.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_check_finite_updates_nothing_when_a_listed_gradient_is_not_finite(dtype, kind):
    """With check_finite, a NaN or Inf gradient in any listed part (whichever thread
    owns it) leaves every buffer untouched and returns False; otherwise (element 555
    lies in the gap between parts) the update is exactly the unchecked one."""
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(1000).astype(dtype)
    s0 = [rng.standard_normal(p0.shape).astype(dtype) for _ in range(2)]
    s0[1] = np.abs(s0[1])
    g0 = rng.standard_normal(p0.shape).astype(dtype)
    chunks = np.array([[0, 300, 0], [300, 550, 1], [550, 551, 2], [560, 1000, 3]], np.int64)

    def update(p, g, s, nt, check, bound):
        if kind == "sgd":
            args = (0.1, 0.9, False, 0.01, nt)
            if bound:
                return elementwise.SGDChunks(p, g, s[0], chunks).run(*args, check)
            return elementwise.sgd_update_chunks(p, g, s[0], chunks, *args, check)
        args = (1e-2, 0.9, 0.999, 1e-8, 0.01, True, 3, nt)
        if bound:
            return elementwise.AdamChunks(p, g, s[0], s[1], chunks).run(*args, check)
        return elementwise.adam_update_chunks(p, g, s[0], s[1], chunks, *args, check)

    want = [p0.copy()] + [a.copy() for a in s0]
    assert update(want[0], g0, want[1:], 1, False, False) is True
    for at, value in [(None, 0), (0, np.nan), (299, np.inf), (300, -np.inf), (550, np.nan),
                      (999, np.nan), (555, np.nan)]:
        g = g0.copy()
        if at is not None:
            g[at] = value
        skipped = at is not None and at != 555
        for nt in (1, 2, 3, 5):
            for bound in ([False, True] if dtype == np.float32 else [False]):
                p, s = p0.copy(), [a.copy() for a in s0]
                assert update(p, g, s, nt, True, bound) is (not skipped), (at, nt, bound)
                for got, w, old in zip([p] + s, want, [p0] + s0):
                    assert got.tobytes() == (old if skipped else w).tobytes(), (at, nt, bound)


def test_chunked_weight_decay_matches_torch_over_steps():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    for dtype, tol in ((np.float32, 1e-6), (np.float64, 1e-13)):
        for nesterov in (False, True):
            p = rng.standard_normal(300).astype(dtype)
            v = np.zeros_like(p)
            tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
            opt = torch.optim.SGD([tp], lr=0.05, momentum=0.9, nesterov=nesterov,
                                  weight_decay=0.02)
            chunks = np.array([[0, 120, 0], [120, 300, 1]], np.int64)
            for _ in range(5):
                g = rng.standard_normal(300).astype(dtype)
                tp.grad = torch.from_numpy(g.copy())
                opt.step()
                elementwise.sgd_update_chunks(p, g, v, chunks, 0.05, 0.9, nesterov, 0.02, 2)
            np.testing.assert_allclose(p, tp.detach().numpy(), rtol=tol, atol=tol)
            np.testing.assert_allclose(v, opt.state[tp]["momentum_buffer"].numpy(), rtol=tol,
                                       atol=tol)


def test_chunked_update_refuses_parts_outside_the_buffers():
    p, g = np.zeros(10, np.float32), np.zeros(10, np.float32)
    for bad in ([[0, 11, 0]], [[5, 4, 0]], [[-1, 3, 0]], [[0, 3, -1]]):
        with pytest.raises(ValueError, match="sgd_update_chunks: chunk 0"):
            elementwise.sgd_update_chunks(p, g, None, np.array(bad, np.int64), 0.1, 0.0,
                                          False, 0.0, 1)
    with pytest.raises(ValueError, match="one length"):
        elementwise.sgd_update_chunks(p, g[:5], None, np.array([[0, 5, 0]], np.int64), 0.1,
                                      0.0, False, 0.0, 1)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_isa_build_agrees(isa):
    if isa not in _runtime.cpu_supports():
        pytest.skip(f"CPU lacks {isa}")
    mod = importlib.import_module(f"cdl._kernels._elementwise_{isa}")
    rng = np.random.default_rng(2)
    for dtype, tol in ((np.float32, 1e-6), (np.float64, 1e-14)):
        p = rng.standard_normal(50_001).astype(dtype)
        g = rng.standard_normal(p.shape).astype(dtype)
        v = rng.standard_normal(p.shape).astype(dtype)
        p_ref, v_ref = ref_sgd(p.astype(np.float64), g.astype(np.float64),
                               v.astype(np.float64), 0.1, 0.8, True, 0.01)
        mod.sgd_update(p, g, v, 0.1, 0.8, True, 0.01, 2)
        np.testing.assert_allclose(p, p_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(v, v_ref, rtol=tol, atol=tol)
        y = rng.standard_normal(p.shape).astype(dtype)
        y_ref = y + 0.25 * p
        mod.axpy(0.25, p, y, 2)
        np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol)


def test_axpy():
    x = np.arange(5, dtype=np.float32)
    y = np.ones(5, np.float32)
    elementwise.axpy(-2.0, x, y, 1)
    np.testing.assert_array_equal(y, 1 - 2 * np.arange(5))


def test_bad_input():
    p = np.zeros((2, 3), np.float32)
    g = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="sgd_update: param must be float32 or float64, got dtype int64"):
        F.sgd_update(np.zeros(3, np.int64), np.zeros(3), lr=0.1)
    with pytest.raises(ValueError, match="sgd_update: grad has shape 3x2 but param has 2x3"):
        F.sgd_update(p, g.T.copy(), lr=0.1)
    with pytest.raises(TypeError, match="grad has dtype float64 but param has float32"):
        F.sgd_update(p, g.astype(np.float64), lr=0.1)
    with pytest.raises(ValueError, match="momentum=0.9 needs a velocity buffer"):
        F.sgd_update(p, g, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        F.sgd_update(p, g, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        F.sgd_update(p, g, lr=float("inf"))
    with pytest.raises(ValueError, match="lr must be a finite number >= 0, got -1.0"):
        F.sgd_update(p, g, lr=-1.0)
    with pytest.raises(ValueError, match="param must be a writeable C-contiguous"):
        F.sgd_update(np.zeros((3, 2), np.float32).T, g, lr=0.1)
    with pytest.raises(ValueError, match="velocity has shape 3 but param has 2x3"):
        F.sgd_update(p, g, lr=0.1, momentum=0.9, velocity=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="velocity must not share memory with param"):
        F.sgd_update(p, g, lr=0.1, momentum=0.9, velocity=p)
    with pytest.raises(TypeError, match="lr"):
        F.sgd_update(p, g)


def test_matches_torch_if_available():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    p = rng.standard_normal(10)
    v = np.zeros_like(p)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(3):
        g = rng.standard_normal(10)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        F.sgd_update(p, g, lr=0.1, velocity=v, momentum=0.9, nesterov=True, weight_decay=0.01)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_updates_flush_subnormal_state_and_restore_the_fp_mode(dtype):
    """Momentum and Adam moments of a parameter whose gradient stays 0 decay into the
    subnormal range and stick there (0.9 × the smallest subnormal rounds back to it),
    where every operation takes a microcode assist. The updates run with subnormals
    flushed to zero: such state becomes 0 at once, normal values are untouched, and
    the caller's floating-point mode is as before."""
    tiny = np.finfo(dtype).smallest_subnormal * 5
    n = 40_000                                   # more than one chunk
    p = np.full(n, 0.5, dtype)
    g = np.zeros(n, dtype)
    g[::2] = 0.25
    v = np.full(n, tiny, dtype)
    v[1::4] = 1e-3
    chunks = np.array([[0, n // 2, 0], [n // 2, n, 1]], np.int64)
    elementwise.sgd_update_chunks(p, g, v, chunks, 0.1, 0.9, False, 0.0, 2)
    assert not ((v != 0) & (np.abs(v) < np.finfo(dtype).tiny)).any()
    np.testing.assert_array_equal(v[3::4], 0)                       # g = 0, v was tiny
    np.testing.assert_array_equal(v[1::4], dtype(0.9) * dtype(1e-3))
    np.testing.assert_array_equal(v[::2], dtype(0.25))
    m, s = np.full(n, tiny, dtype), np.full(n, tiny, dtype)
    elementwise.adam_update_chunks(p, g, m, s, chunks, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, 3, 2)
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(m[1::2], 0)
    np.testing.assert_array_equal(s[1::2], 0)
    v = np.full(n, tiny, dtype)
    elementwise.sgd_update(p, g, v, 0.1, 0.9, False, 0.0, 2)
    np.testing.assert_array_equal(v[1::2], 0)
    # the caller's mode: NumPy on this thread still keeps subnormals
    assert np.array([tiny], dtype)[0] * dtype(1) == tiny
    assert dtype(tiny) / dtype(2) != 0
