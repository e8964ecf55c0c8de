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
from cython.parallel cimport parallel, prange
from libc.stdint cimport int64_t
from cdl._kernels._openmp cimport omp_get_num_threads, omp_get_thread_num
# exp(x) for x <= 0 without a libm call, so the sigmoid loop vectorises and has
# no branch (random signs made a branchy loop mispredict half the time).
# exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]
# (ln 2 split in two so n ln2_hi is exact); exp(r) by its Taylor series, long
# enough that the truncation is far below one ulp (degree 7 for float, 13 for
# double); 2^n is built in the exponent bits. Rounding uses the 1.5 * 2^23
# (2^52) shift trick, whose low mantissa bits then hold n. Below -87 (-708)
# the scale bits are garbage, so the result is replaced by 0 in a final select
# (sigmoid there is < 1e-38); x is not clamped first because GCC then splits the
# clamp into branches and the loop no longer vectorises. NaN stays NaN.
cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    /* Branch-free select by bit masks: a ternary lets GCC sink the arithmetic
       of one side into a branch, which it then cannot if-convert (the
       arithmetic might trap), and the loop stays scalar and branchy. */
    static inline float cdl_pick_f(int cond, float a, float b) {
        uint32_t ia, ib, m = (uint32_t)0 - (uint32_t)(cond != 0);
        memcpy(&ia, &a, sizeof ia);
        memcpy(&ib, &b, sizeof ib);
        ia = (ia & m) | (ib & ~m);
        memcpy(&a, &ia, sizeof a);
        return a;
    }
    static inline double cdl_pick_d(int cond, double a, double b) {
        uint64_t ia, ib, m = (uint64_t)0 - (uint64_t)(cond != 0);
        memcpy(&ia, &a, sizeof ia);
        memcpy(&ib, &b, sizeof ib);
        ia = (ia & m) | (ib & ~m);
        memcpy(&a, &ia, sizeof a);
        return a;
    }
    static inline float cdl_exp_nonpos_f(float x) {
        const float shift = 12582912.0f;                       /* 1.5 * 2^23 */
        float t = x * 1.44269504088896341f + shift;
        float n = t - shift;
        float r = (x - n * 0.693359375f) - n * -2.12194440054690583e-4f;
        float p = 1.0f / 5040.0f;
        p = p * r + 1.0f / 720.0f;
        p = p * r + 1.0f / 120.0f;
        p = p * r + 1.0f / 24.0f;
        p = p * r + 1.0f / 6.0f;
        p = p * r + 0.5f;
        p = p * r + 1.0f;
        p = p * r + 1.0f;
        uint32_t bits, scale_bits;
        float scale;
        memcpy(&bits, &t, sizeof bits);
        scale_bits = (bits + 127u) << 23;
        memcpy(&scale, &scale_bits, sizeof scale);
        p = p * scale;
        return cdl_pick_f(x < -87.0f, 0.0f, p);
    }
    static inline double cdl_exp_nonpos_d(double x) {
        const double shift = 6755399441055744.0;               /* 1.5 * 2^52 */
        double t = x * 1.4426950408889634 + shift;
        double n = t - shift;
        double r = (x - n * 0.6931471526622772) - n * 2.7897668087737545e-08;
        double p = 1.6059043836821613e-10;                     /* 1/13! */
        p = p * r + 2.08767569878681e-09;
        p = p * r + 2.505210838544172e-08;
        p = p * r + 2.755731922398589e-07;
        p = p * r + 2.7557319223985893e-06;
        p = p * r + 2.48015873015873e-05;
        p = p * r + 0.0001984126984126984;
        p = p * r + 0.001388888888888889;
        p = p * r + 0.008333333333333333;
        p = p * r + 0.041666666666666664;
        p = p * r + 0.16666666666666666;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        uint64_t bits, scale_bits;
        double scale;
        memcpy(&bits, &t, sizeof bits);
        scale_bits = (bits + 1023u) << 52;
        memcpy(&scale, &scale_bits, sizeof scale);
        p = p * scale;
        return cdl_pick_d(x < -708.0, 0.0, p);
    }
    /* sigma(z) = 1/(1+e) for z >= 0, e/(1+e) for z < 0, with e = exp(-|z|) <= 1, so
       nothing overflows. Both sides are computed and then picked by mask: a
       branch on the sign mispredicts on random signs and blocks SIMD. */
    static void cdl_sigmoid_f(const float *x, float *y, Py_ssize_t n) {
        Py_ssize_t i;
        #pragma omp simd
        for (i = 0; i < n; i++) {
            float z = x[i];
            float e = cdl_exp_nonpos_f(-fabsf(z));
            float s = 1.0f / (1.0f + e);
            float es = e * s;
            y[i] = cdl_pick_f(z >= 0.0f, s, es);
        }
    }
    static void cdl_sigmoid_d(const double *x, double *y, Py_ssize_t n) {
        Py_ssize_t i;
        #pragma omp simd
        for (i = 0; i < n; i++) {
            double z = x[i];
            double e = cdl_exp_nonpos_d(-fabs(z));
            double s = 1.0 / (1.0 + e);
            double es = e * s;
            y[i] = cdl_pick_d(z >= 0.0, s, es);
        }
    }
    """
    void cdl_sigmoid_f(const float* x, float* y, Py_ssize_t n) noexcept nogil
    void cdl_sigmoid_d(const double* x, double* y, Py_ssize_t n) noexcept nogil

# Elements per parallel chunk, and the size below which one thread runs it
# (sigmoid, which calls exp, counts each element as 8). A second thread halves a
# 235K-element SGD update in isolation (18 -> 10 us) but gained nothing inside a
# batch-1 MLP step, and in this VM's slow spells that step ran 0.19 ms with the
# parallel update against 0.07 ms with none (the serial work after a parallel
# call slowed down): memory-bound passes go parallel from 2 MB of float32.
cdef Py_ssize_t CHUNK = 1 << 14
cdef Py_ssize_t PARALLEL_MIN_ELEMENTS = 1 << 19


cdef inline int _threads(Py_ssize_t n, int num_threads) noexcept nogil:
    return num_threads if n >= PARALLEL_MIN_ELEMENTS else 1


cdef inline Py_ssize_t _chunks(Py_ssize_t n) noexcept nogil:
    return (n + CHUNK - 1) // CHUNK


# ---------------------------------------------------------------- ReLU

cdef void _relu_chunk(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v, zero = 0
    for i in range(n):
        v = x[i]
        # ``<= 0`` rather than ``> 0`` so that NaN passes through.
        y[i] = zero if v <= zero else v


cdef void _relu_backward_chunk(const floating* g, const floating* y, floating* dx,
                         Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gv, zero = 0
    for i in range(n):
        # Both loads unconditional: the select then vectorises as a blend. A
        # conditional load of g compiled to a branch on SSE2 (~20x slower).
        gv = g[i]
        dx[i] = zero if y[i] <= zero else gv


cdef int _relu_forward(const floating[::1] x, floating[::1] out, int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            _relu_chunk(xp + lo, yp + lo, min(CHUNK, n - lo))
    return 0


def relu_forward(const floating[::1] x, floating[::1] out, int num_threads):
    """out = max(0, x); out may be x (in place)."""
    _relu_forward(x, out, num_threads)


cdef int _relu_backward(const floating[::1] grad_out, const floating[::1] y,
                        floating[::1] grad_input, int num_threads) except -1:
    cdef Py_ssize_t n = y.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* gp = &grad_out[0]
    cdef const floating* yp = &y[0]
    cdef floating* dp = &grad_input[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            _relu_backward_chunk(gp + lo, yp + lo, dp + lo, min(CHUNK, n - lo))
    return 0


def relu_backward(const floating[::1] grad_out, const floating[::1] y,
                  floating[::1] grad_input, int num_threads):
    """grad_input = grad_out where y > 0 else 0 (y: the forward output)."""
    _relu_backward(grad_out, y, grad_input, num_threads)


# ---------------------------------------------------------------- Sigmoid

cdef inline void _sigmoid_chunk(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    if floating is float:
        cdl_sigmoid_f(x, y, n)
    else:
        cdl_sigmoid_d(x, y, n)


cdef void _sigmoid_backward_chunk(const floating* g, const floating* y, floating* dx,
                            Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating one = 1
    for i in range(n):
        dx[i] = g[i] * y[i] * (one - y[i])


cdef int _sigmoid_forward(const floating[::1] x, floating[::1] out, int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(8 * n, num_threads)):
            lo = t * CHUNK
            _sigmoid_chunk(xp + lo, yp + lo, min(CHUNK, n - lo))
    return 0


def sigmoid_forward(const floating[::1] x, floating[::1] out, int num_threads):
    """out = 1 / (1 + exp(-x)), stable for any |x|; out may be x."""
    _sigmoid_forward(x, out, num_threads)


cdef int _sigmoid_backward(const floating[::1] grad_out, const floating[::1] y,
                           floating[::1] grad_input, int num_threads) except -1:
    cdef Py_ssize_t n = y.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* gp = &grad_out[0]
    cdef const floating* yp = &y[0]
    cdef floating* dp = &grad_input[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            _sigmoid_backward_chunk(gp + lo, yp + lo, dp + lo, min(CHUNK, n - lo))
    return 0


def sigmoid_backward(const floating[::1] grad_out, const floating[::1] y,
                     floating[::1] grad_input, int num_threads):
    """grad_input = grad_out * y * (1 - y) (y: the forward output)."""
    _sigmoid_backward(grad_out, y, grad_input, num_threads)


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


cdef int _sgd_update_chunks(floating[::1] param, const floating[::1] grad, floating[::1] velocity,
                            const int64_t[:, ::1] chunks, double lr, double momentum, bint nesterov,
                            int num_threads) except -1:
    cdef Py_ssize_t rows = chunks.shape[0], r, tid, team
    cdef bint has_v = velocity is not None
    cdef int nt = 1
    if rows == 0:
        return 0
    for r in range(rows):
        if chunks[r, 2] > 0:
            nt = num_threads
    cdef floating* pp = &param[0]
    cdef const floating* gp = &grad[0]
    cdef floating* vp = &velocity[0] if has_v else NULL
    cdef floating flr = <floating>lr, fmu = <floating>momentum
    with nogil, parallel(num_threads=nt):
        tid = omp_get_thread_num()
        team = omp_get_num_threads()
        for r in range(rows):
            if chunks[r, 2] % team == tid:
                _sgd(pp + chunks[r, 0], gp + chunks[r, 0],
                     vp + chunks[r, 0] if has_v else NULL, chunks[r, 1] - chunks[r, 0],
                     flr, fmu, nesterov, 0)
    return 0


def sgd_update_chunks(floating[::1] param, const floating[::1] grad, floating[::1] velocity,
                      const int64_t[:, ::1] chunks, double lr, double momentum, bint nesterov,
                      int num_threads):
    """sgd_update over the parts of flat buffers listed in ``chunks``, rows of
    (start, stop, owner): OpenMP thread owner mod threads updates [start, stop).

    The model deals the parts (cdl.model._sgd_parts): a big Linear weight's are
    the dense kernels' row chunks, so each is updated by the thread that computed
    its gradient and has it in its cache. With every owner 0 it runs on one thread.
    """
    cdef Py_ssize_t r, n = param.shape[0]
    if chunks.shape[1] != 3:
        raise ValueError(f"sgd_update_chunks: chunks must be (rows, 3), got "
                         f"{chunks.shape[1]} columns")
    for r in range(chunks.shape[0]):
        if not 0 <= chunks[r, 0] <= chunks[r, 1] <= n or chunks[r, 2] < 0:
            raise ValueError(f"sgd_update_chunks: chunk {r} = {list(chunks[r])} is not a part "
                             f"[start, stop) of {n} elements with an owner >= 0")
    if grad.shape[0] != n or (velocity is not None and velocity.shape[0] != n):
        raise ValueError("sgd_update_chunks: param, grad and velocity must have one length")
    _sgd_update_chunks(param, grad, velocity, chunks, lr, momentum, nesterov, num_threads)


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


# ---------------------------------------------------------------- bound calls
# A float32 call with its arrays bound once (cdl.model's training plan), so
# ``run`` skips the per-call buffer checks and type dispatch. The input can be
# rebound.

cdef class ActivationForward:
    """ReLU or sigmoid forward on flat views."""
    cdef const float[::1] x
    cdef float[::1] out
    cdef bint sigmoid

    def __init__(self, kind, x, out):
        if kind not in ("relu", "sigmoid"):
            raise ValueError(f"ActivationForward: kind must be 'relu' or 'sigmoid', got {kind!r}")
        self.sigmoid = kind == "sigmoid"
        self.x, self.out = x, out

    def bind_input(self, const float[::1] x):
        self.x = x

    def run(self, int num_threads):
        if self.sigmoid:
            _sigmoid_forward(self.x, self.out, num_threads)
        else:
            _relu_forward(self.x, self.out, num_threads)


cdef class ActivationBackward:
    cdef const float[::1] grad_out
    cdef const float[::1] y
    cdef float[::1] grad_input
    cdef bint sigmoid

    def __init__(self, kind, grad_out, y, grad_input):
        if kind not in ("relu", "sigmoid"):
            raise ValueError(f"ActivationBackward: kind must be 'relu' or 'sigmoid', got {kind!r}")
        self.sigmoid = kind == "sigmoid"
        self.grad_out, self.y, self.grad_input = grad_out, y, grad_input

    def run(self, int num_threads):
        if self.sigmoid:
            _sigmoid_backward(self.grad_out, self.y, self.grad_input, num_threads)
        else:
            _relu_backward(self.grad_out, self.y, self.grad_input, num_threads)


cdef class SGDChunks:
    """sgd_update_chunks over a model's flat buffers (cdl.SGD.step)."""
    cdef float[::1] param
    cdef const float[::1] grad
    cdef float[::1] velocity
    cdef const int64_t[:, ::1] chunks

    def __init__(self, param, grad, velocity, chunks):
        self.param, self.grad, self.velocity, self.chunks = param, grad, velocity, chunks

    def run(self, double lr, double momentum, bint nesterov, int num_threads):
        _sgd_update_chunks(self.param, self.grad, self.velocity, self.chunks, lr, momentum,
                           nesterov, num_threads)
