# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Elementwise kernels on flat C-contiguous views: activations, SGD update, axpy.

ReLU        y = max(0, x)                      dx = dy * [y > 0]
Sigmoid     y = 1 / (1 + exp(-x))              dx = dy * y * (1 - y)
SGD         g = grad + wd * param;  v = mu * v + g;
            step = g + mu * v (Nesterov) or v;  param -= lr * step   (PyTorch SGD)
axpy        y += alpha * x

The backward kernels take the forward OUTPUT y, which is what layers keep.
Arrays are cut into fixed chunks spread over OpenMP threads; every element is
computed independently, so results are bitwise identical for any thread count.
NaN propagates: relu(NaN) = NaN, sigmoid(NaN) = NaN.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport exp, expf, fabs, fabsf

# Elements per parallel chunk, and the size below which one thread is faster
# (sigmoid, which calls exp, counts each element as 8).
cdef Py_ssize_t CHUNK = 1 << 14
cdef Py_ssize_t PARALLEL_MIN_ELEMENTS = 1 << 16


cdef inline int _threads(Py_ssize_t n, int num_threads) noexcept nogil:
    return num_threads if n >= PARALLEL_MIN_ELEMENTS else 1


cdef inline Py_ssize_t _chunks(Py_ssize_t n) noexcept nogil:
    return (n + CHUNK - 1) // CHUNK


# ---------------------------------------------------------------- ReLU

cdef void _relu(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v
    for i in range(n):
        v = x[i]
        # ``<= 0`` rather than ``> 0`` so that NaN passes through.
        y[i] = 0 if v <= 0 else v


cdef void _relu_backward(const floating* g, const floating* y, floating* dx,
                         Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = 0 if y[i] <= 0 else g[i]


def relu_forward(const floating[::1] x, floating[::1] out, int num_threads):
    """out = max(0, x); out may be x (in place)."""
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            _relu(xp + lo, yp + lo, min(CHUNK, n - lo))


def relu_backward(const floating[::1] grad_out, const floating[::1] y,
                  floating[::1] grad_input, int num_threads):
    """grad_input = grad_out where y > 0 else 0 (y: the forward output)."""
    cdef Py_ssize_t n = y.shape[0], t, lo
    if n == 0:
        return
    cdef const floating* gp = &grad_out[0]
    cdef const floating* yp = &y[0]
    cdef floating* dp = &grad_input[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            _relu_backward(gp + lo, yp + lo, dp + lo, min(CHUNK, n - lo))


# ---------------------------------------------------------------- Sigmoid

cdef inline floating _sigmoid1(floating z) noexcept nogil:
    # With e = exp(-|z|) <= 1 nothing overflows: sigma(z) = 1/(1+e) for z >= 0,
    # and e/(1+e) for z < 0.
    cdef floating e, s
    if floating is float:
        e = expf(-fabsf(z))
    else:
        e = exp(-fabs(z))
    s = 1 / (1 + e)
    return s if z >= 0 else e * s


cdef void _sigmoid(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = _sigmoid1(x[i])


cdef void _sigmoid_backward(const floating* g, const floating* y, floating* dx,
                            Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = g[i] * y[i] * (1 - y[i])


def sigmoid_forward(const floating[::1] x, floating[::1] out, int num_threads):
    """out = 1 / (1 + exp(-x)), stable for any |x|; out may be x."""
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(8 * n, num_threads)):
            lo = t * CHUNK
            _sigmoid(xp + lo, yp + lo, min(CHUNK, n - lo))


def sigmoid_backward(const floating[::1] grad_out, const floating[::1] y,
                     floating[::1] grad_input, int num_threads):
    """grad_input = grad_out * y * (1 - y) (y: the forward output)."""
    cdef Py_ssize_t n = y.shape[0], t, lo
    if n == 0:
        return
    cdef const floating* gp = &grad_out[0]
    cdef const floating* yp = &y[0]
    cdef floating* dp = &grad_input[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            _sigmoid_backward(gp + lo, yp + lo, dp + lo, min(CHUNK, n - lo))


# ---------------------------------------------------------------- SGD, axpy

cdef void _sgd(floating* p, const floating* g, floating* v, Py_ssize_t n, floating lr,
               floating mu, bint nesterov, floating wd) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, vi
    if v == NULL:
        for i in range(n):
            p[i] -= lr * (g[i] + wd * p[i])
    elif nesterov:
        for i in range(n):
            gi = g[i] + wd * p[i]
            vi = mu * v[i] + gi
            v[i] = vi
            p[i] -= lr * (gi + mu * vi)
    else:
        for i in range(n):
            gi = g[i] + wd * p[i]
            vi = mu * v[i] + gi
            v[i] = vi
            p[i] -= lr * vi


def sgd_update(floating[::1] param, const floating[::1] grad, floating[::1] velocity,
               double lr, double momentum, bint nesterov, double weight_decay,
               int num_threads):
    """One SGD step in place (PyTorch semantics, dampening 0).

    g = grad + weight_decay * param; v = momentum * v + g;
    param -= lr * (g + momentum * v if nesterov else v).
    velocity may be None only when momentum == 0 (then the step is lr * g);
    a zero-initialised velocity reproduces PyTorch's first step (v = g).
    """
    cdef Py_ssize_t n = param.shape[0], t, lo
    cdef bint has_v = velocity is not None
    if n == 0:
        return
    cdef floating* pp = &param[0]
    cdef const floating* gp = &grad[0]
    cdef floating* vp = NULL
    if has_v:
        vp = &velocity[0]
    cdef floating flr = <floating>lr, fmu = <floating>momentum, fwd = <floating>weight_decay
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            _sgd(pp + lo, gp + lo, vp + lo if has_v else NULL, min(CHUNK, n - lo),
                 flr, fmu, nesterov, fwd)


def axpy(double alpha, const floating[::1] x, floating[::1] y, int num_threads):
    """y += alpha * x."""
    cdef Py_ssize_t n = y.shape[0], t, lo, i
    if n == 0:
        return
    cdef const floating* xp = &x[0]
    cdef floating* yp = &y[0]
    cdef floating a = <floating>alpha
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            for i in range(lo, min(lo + CHUNK, n)):
                yp[i] += a * xp[i]
