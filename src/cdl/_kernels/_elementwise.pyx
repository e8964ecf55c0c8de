# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Elementwise kernels on flat C-contiguous views: activations, dropout, residual
add, optimiser updates.

ReLU        y = max(0, x)                      dx = dy * [y > 0]
Sigmoid     y = 1 / (1 + exp(-x))              dx = dy * y * (1 - y)
Tanh        y = tanh(x)                        dx = dy * (1 - y²)
LeakyReLU   y = x if x > 0 else slope * x      dx = dy if x > 0 else slope * dy
Dropout     y = x * mask / (1 - p), mask from a counter-based generator
add         y = a + b (optionally max(0, ·))   scale  x *= alpha
SGD         g = grad + wd * param;  v = mu * v + g;
            step = g + mu * v (Nesterov) or v;  param -= lr * step   (PyTorch SGD)
Adam(W)     torch.optim.Adam / AdamW (see adam_update_chunks)
axpy        y += alpha * x

The backward kernels take the forward OUTPUT y, which is what layers keep,
except leaky ReLU's, which takes the input x.
Arrays are cut into fixed chunks spread over OpenMP threads; every element is
computed independently, so results are bitwise identical for any thread count.
NaN propagates: relu(NaN) = NaN, sigmoid(NaN) = NaN, tanh(NaN) = NaN.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange
from libc.math cimport ceil, pow, sqrt
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
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

# tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|) <= 1, for |x| >= 0.4
# (there 1 - e >= 0.55, so the subtraction loses nothing); below 0.4 the odd
# Taylor series of tanh, through x^13 for float and x^27 for double (the first
# term left out is < 4e-9 and < 2e-17 of |x|). Both sides computed, then picked
# by mask, so the loop vectorises; NaN stays NaN, tanh(+-inf) = +-1.
#
# Dropout draws u_i = (z_i >> 11) * 2^-53 in [0, 1) from z_i = mix(key + (i + 1) * gamma),
# the splitmix64 sequence (Steele, Lea, Flood 2014) started at
# key = mix(mix(mix(seed ^ A) ^ stream ^ B) ^ counter ^ C): element i depends on
# (seed, stream, counter, i) only, so the mask is the same for any thread count.
# u_i >= p is tested as (z_i >> 11) >= ceil(p * 2^53), the same comparison in integers.
cdef extern from *:
    """
    static inline float cdl_tanh_f(float x) {
        float a = fabsf(x);
        float e = cdl_exp_nonpos_f(-2.0f * a);
        float big = (1.0f - e) / (1.0f + e);
        float z = a * a;
        float p = 0.003592128036572481f;
        p = p * z + -0.008863235529902197f;
        p = p * z + 0.021869488536155203f;
        p = p * z + -0.05396825396825397f;
        p = p * z + 0.13333333333333333f;
        p = p * z + -0.3333333333333333f;
        float small = a + a * (z * p);
        return copysignf(cdl_pick_f(a < 0.4f, small, big), x);
    }
    static inline double cdl_tanh_d(double x) {
        double a = fabs(x);
        double e = cdl_exp_nonpos_d(-2.0 * a);
        double big = (1.0 - e) / (1.0 + e);
        double z = a * a;
        double p = -6.451689215655431e-06;
        p = p * z + 1.5918905069328964e-05;
        p = p * z + -3.927832388331683e-05;
        p = p * z + 9.691537956929451e-05;
        p = p * z + -0.00023912911424355248;
        p = p * z + 0.000590027440945586;
        p = p * z + -0.0014558343870513183;
        p = p * z + 0.003592128036572481;
        p = p * z + -0.008863235529902197;
        p = p * z + 0.021869488536155203;
        p = p * z + -0.05396825396825397;
        p = p * z + 0.13333333333333333;
        p = p * z + -0.3333333333333333;
        double small = a + a * (z * p);
        return copysign(cdl_pick_d(a < 0.4, small, big), x);
    }
    static void cdl_tanh_arr_f(const float *x, float *y, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) y[i] = cdl_tanh_f(x[i]);
    }
    static void cdl_tanh_arr_d(const double *x, double *y, Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) y[i] = cdl_tanh_d(x[i]);
    }
    /* y = x > 0 ? x : x * slope;  dx = x > 0 ? g : g * slope */
    static void cdl_leaky_f(const float *x, float *y, Py_ssize_t n, float s) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) { float v = x[i]; y[i] = cdl_pick_f(v > 0.0f, v, v * s); }
    }
    static void cdl_leaky_d(const double *x, double *y, Py_ssize_t n, double s) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) { double v = x[i]; y[i] = cdl_pick_d(v > 0.0, v, v * s); }
    }
    static void cdl_leaky_bwd_f(const float *g, const float *x, float *dx, Py_ssize_t n,
                                float s) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) { float gv = g[i]; dx[i] = cdl_pick_f(x[i] > 0.0f, gv, gv * s); }
    }
    static void cdl_leaky_bwd_d(const double *g, const double *x, double *dx, Py_ssize_t n,
                                double s) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) { double gv = g[i]; dx[i] = cdl_pick_d(x[i] > 0.0, gv, gv * s); }
    }
    /* out = a + b, optionally max(0, .) (NaN passes); out may be a or b */
    static void cdl_add_f(const float *a, const float *b, float *y, Py_ssize_t n, int relu) {
        Py_ssize_t i;
        if (relu) {
            for (i = 0; i < n; i++) { float v = a[i] + b[i]; y[i] = cdl_pick_f(v <= 0.0f, 0.0f, v); }
        } else {
            for (i = 0; i < n; i++) y[i] = a[i] + b[i];
        }
    }
    static void cdl_add_d(const double *a, const double *b, double *y, Py_ssize_t n, int relu) {
        Py_ssize_t i;
        if (relu) {
            for (i = 0; i < n; i++) { double v = a[i] + b[i]; y[i] = cdl_pick_d(v <= 0.0, 0.0, v); }
        } else {
            for (i = 0; i < n; i++) y[i] = a[i] + b[i];
        }
    }

    /* out = a + (b where y > 0, else 0): an add after relu_backward(b, y), bitwise,
       in one pass (a Residual's input gradient); out may be a or b */
    static void cdl_add_masked_f(const float *a, const float *b, const float *m, float *y,
                                 Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) y[i] = a[i] + cdl_pick_f(m[i] <= 0.0f, 0.0f, b[i]);
    }
    static void cdl_add_masked_d(const double *a, const double *b, const double *m, double *y,
                                 Py_ssize_t n) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) y[i] = a[i] + cdl_pick_d(m[i] <= 0.0, 0.0, b[i]);
    }

    #define CDL_GAMMA 0x9E3779B97F4A7C15ULL
    static inline uint64_t cdl_mix64(uint64_t z) {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    static uint64_t cdl_dropout_key(uint64_t seed, uint64_t stream, uint64_t counter) {
        uint64_t k = cdl_mix64(seed ^ 0x243F6A8885A308D3ULL);
        k = cdl_mix64(k ^ stream ^ 0x13198A2E03707344ULL);
        return cdl_mix64(k ^ counter ^ 0xA4093822299F31D0ULL);
    }
    /* The 53-bit integer of u_i for i = start .. start + n - 1. */
    static inline uint64_t cdl_dropout_bits(uint64_t key, uint64_t i) {
        return cdl_mix64(key + (i + 1) * CDL_GAMMA) >> 11;
    }
    static void cdl_uniforms(double *u, Py_ssize_t n, uint64_t key) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) u[i] = (double)cdl_dropout_bits(key, (uint64_t)i) * 0x1p-53;
    }
    static void cdl_dropout_f(const float *x, float *y, uint8_t *mask, Py_ssize_t n,
                              uint64_t start, uint64_t key, uint64_t thresh, float scale) {
        Py_ssize_t i;
        uint64_t z = key + (start + 1) * CDL_GAMMA;    /* cdl_dropout_bits' argument, by adds */
        for (i = 0; i < n; i++, z += CDL_GAMMA) {
            int keep = (cdl_mix64(z) >> 11) >= thresh;
            mask[i] = (uint8_t)keep;
            y[i] = x[i] * cdl_pick_f(keep, scale, 0.0f);
        }
    }
    static void cdl_dropout_d(const double *x, double *y, uint8_t *mask, Py_ssize_t n,
                              uint64_t start, uint64_t key, uint64_t thresh, double scale) {
        Py_ssize_t i;
        uint64_t z = key + (start + 1) * CDL_GAMMA;    /* cdl_dropout_bits' argument, by adds */
        for (i = 0; i < n; i++, z += CDL_GAMMA) {
            int keep = (cdl_mix64(z) >> 11) >= thresh;
            mask[i] = (uint8_t)keep;
            y[i] = x[i] * cdl_pick_d(keep, scale, 0.0);
        }
    }
    static void cdl_dropout_bwd_f(const float *g, const uint8_t *mask, float *dx, Py_ssize_t n,
                                  float scale) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) dx[i] = g[i] * cdl_pick_f(mask[i] != 0, scale, 0.0f);
    }
    static void cdl_dropout_bwd_d(const double *g, const uint8_t *mask, double *dx, Py_ssize_t n,
                                  double scale) {
        Py_ssize_t i;
        for (i = 0; i < n; i++) dx[i] = g[i] * cdl_pick_d(mask[i] != 0, scale, 0.0);
    }

    /* The optimiser updates run with subnormals flushed to zero (FTZ and DAZ, this
       thread only, restored after). A parameter whose gradient stays 0 (a dead ReLU,
       an input pixel that is always 0) decays its momentum or Adam moments into the
       subnormal range, where they stick (0.9 * the smallest subnormal rounds back to
       it) and every operation on them takes a microcode assist: LeNet-5's batch-1
       step ran 4x (SGD momentum) and 25x (Adam) slower after 2000 steps. */
    #if defined(__SSE2__) || defined(__x86_64__)
    #include <xmmintrin.h>
    static inline unsigned int cdl_flush_subnormals(void) {
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040u);
        return csr;
    }
    static inline void cdl_restore_fp(unsigned int csr) { _mm_setcsr(csr); }
    #else
    static inline unsigned int cdl_flush_subnormals(void) { return 0; }
    static inline void cdl_restore_fp(unsigned int csr) { (void)csr; }
    #endif

    /* The updates' finite check runs in their own parallel region: every thread
       scans the chunks it owns, raises a shared flag on a NaN or Inf, and waits at
       this (orphaned) barrier before any thread updates anything. */
    static inline void cdl_team_barrier(void) {
    #ifdef _OPENMP
        #pragma omp barrier
    #endif
    }
    static inline void cdl_flag_raise(int *flag) { __atomic_store_n(flag, 1, __ATOMIC_RELAXED); }
    static inline int cdl_flag_read(int *flag) { return __atomic_load_n(flag, __ATOMIC_RELAXED); }

    /* Adam / AdamW on n elements (torch.optim.Adam, single-tensor path):
       AdamW: p *= decay;  Adam: g += wd * p;
       m = lerp(m, g, w1);  v = v * b2 + omb2 * g * g;
       p += nstep * (m / (sqrt(v) / bc2s + eps)). Coefficients come rounded to T.
       The loop vectorises because this module is built with -fno-math-errno
       (CMakeLists.txt; sqrt's values are the same, only errno is not set). */
    #define CDL_ADAM(SFX, T, SQRT)                                                   \
    static void cdl_adam_##SFX(T *p, const T *g, T *m, T *v, Py_ssize_t n,          \
                               int decoupled, T decay, T wd, T w1, T b2, T omb2,    \
                               T bc2s, T eps, T nstep) {                            \
        Py_ssize_t i;                                                               \
        const T one = (T)1;                                                         \
        const int small_w = w1 < (T)0.5 && w1 > (T)-0.5;                            \
        for (i = 0; i < n; i++) {                                                   \
            T pi = p[i], gi = g[i], mi = m[i], vi = v[i], d;                        \
            if (decoupled) pi = pi * decay;                                         \
            else gi = gi + wd * pi;                                                 \
            d = gi - mi;                                                            \
            mi = small_w ? mi + w1 * d : gi - d * (one - w1);                       \
            vi = vi * b2;                                                           \
            vi = vi + omb2 * gi * gi;                                               \
            m[i] = mi;                                                              \
            v[i] = vi;                                                              \
            p[i] = pi + nstep * (mi / (SQRT(vi) / bc2s + eps));                     \
        }                                                                           \
    }
    CDL_ADAM(f, float, sqrtf)
    CDL_ADAM(d, double, sqrt)
    """
    void cdl_tanh_arr_f(const float* x, float* y, Py_ssize_t n) noexcept nogil
    void cdl_tanh_arr_d(const double* x, double* y, Py_ssize_t n) noexcept nogil
    void cdl_leaky_f(const float* x, float* y, Py_ssize_t n, float s) noexcept nogil
    void cdl_leaky_d(const double* x, double* y, Py_ssize_t n, double s) noexcept nogil
    void cdl_leaky_bwd_f(const float* g, const float* x, float* dx, Py_ssize_t n,
                         float s) noexcept nogil
    void cdl_leaky_bwd_d(const double* g, const double* x, double* dx, Py_ssize_t n,
                         double s) noexcept nogil
    void cdl_add_f(const float* a, const float* b, float* y, Py_ssize_t n, int relu) noexcept nogil
    void cdl_add_d(const double* a, const double* b, double* y, Py_ssize_t n,
                   int relu) noexcept nogil
    void cdl_add_masked_f(const float* a, const float* b, const float* m, float* y,
                          Py_ssize_t n) noexcept nogil
    void cdl_add_masked_d(const double* a, const double* b, const double* m, double* y,
                          Py_ssize_t n) noexcept nogil
    unsigned int cdl_flush_subnormals() noexcept nogil
    void cdl_restore_fp(unsigned int csr) noexcept nogil
    void cdl_team_barrier() noexcept nogil
    void cdl_flag_raise(int* flag) noexcept nogil
    int cdl_flag_read(int* flag) noexcept nogil
    uint64_t cdl_dropout_key(uint64_t seed, uint64_t stream, uint64_t counter) noexcept nogil
    void cdl_uniforms(double* u, Py_ssize_t n, uint64_t key) noexcept nogil
    void cdl_dropout_f(const float* x, float* y, uint8_t* mask, Py_ssize_t n, uint64_t start,
                       uint64_t key, uint64_t thresh, float scale) noexcept nogil
    void cdl_dropout_d(const double* x, double* y, uint8_t* mask, Py_ssize_t n, uint64_t start,
                       uint64_t key, uint64_t thresh, double scale) noexcept nogil
    void cdl_dropout_bwd_f(const float* g, const uint8_t* mask, float* dx, Py_ssize_t n,
                           float scale) noexcept nogil
    void cdl_dropout_bwd_d(const double* g, const uint8_t* mask, double* dx, Py_ssize_t n,
                           double scale) noexcept nogil
    void cdl_adam_f(float* p, const float* g, float* m, float* v, Py_ssize_t n, int decoupled,
                    float decay, float wd, float w1, float b2, float omb2, float bc2s, float eps,
                    float nstep) noexcept nogil
    void cdl_adam_d(double* p, const double* g, double* m, double* v, Py_ssize_t n,
                    int decoupled, double decay, double wd, double w1, double b2, double omb2,
                    double bc2s, double eps, double nstep) noexcept nogil

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
    cdef unsigned int csr
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            csr = cdl_flush_subnormals()
            _sgd(pp + lo, gp + lo, vp + lo if has_v else NULL, min(CHUNK, n - lo),
                 flr, fmu, nesterov, fwd)
            cdl_restore_fp(csr)


cdef int _check_chunks(str name, Py_ssize_t n, const int64_t[:, ::1] chunks) except -1:
    cdef Py_ssize_t r
    if chunks.shape[1] != 3:
        raise ValueError(f"{name}: chunks must be (rows, 3), got {chunks.shape[1]} columns")
    for r in range(chunks.shape[0]):
        if not 0 <= chunks[r, 0] <= chunks[r, 1] <= n or chunks[r, 2] < 0:
            raise ValueError(f"{name}: chunk {r} = {list(chunks[r])} is not a part "
                             f"[start, stop) of {n} elements with an owner >= 0")
    return 0


cdef bint _owned_nonfinite(const floating* g, const int64_t[:, ::1] chunks, Py_ssize_t tid,
                           Py_ssize_t team) noexcept nogil:
    # Whether a chunk this thread owns holds a NaN or Inf (the update's finite check).
    cdef Py_ssize_t r
    cdef bint bad = False
    for r in range(chunks.shape[0]):
        if chunks[r, 2] % team == tid:
            bad |= _chunk_nonfinite(g + chunks[r, 0], chunks[r, 1] - chunks[r, 0])
    return bad


cdef int _sgd_update_chunks(floating[::1] param, const floating[::1] grad, floating[::1] velocity,
                            const int64_t[:, ::1] chunks, double lr, double momentum, bint nesterov,
                            double weight_decay, int num_threads, bint check_finite) except -1:
    # Returns 1 when check_finite found a gradient that is not finite: then nothing
    # was updated (every thread checks its own chunks before any thread updates).
    cdef Py_ssize_t rows = chunks.shape[0], r, tid, team
    cdef bint has_v = velocity is not None
    cdef int nt = 1, nonfinite = 0
    cdef int* flag = &nonfinite
    if rows == 0:
        return 0
    for r in range(rows):
        if chunks[r, 2] > 0:
            nt = num_threads
    cdef floating* pp = &param[0]
    cdef const floating* gp = &grad[0]
    cdef floating* vp = &velocity[0] if has_v else NULL
    cdef floating flr = <floating>lr, fmu = <floating>momentum, fwd = <floating>weight_decay
    cdef unsigned int csr
    with nogil, parallel(num_threads=nt):
        tid = omp_get_thread_num()
        team = omp_get_num_threads()
        if check_finite:
            if _owned_nonfinite(gp, chunks, tid, team):
                cdl_flag_raise(flag)
            cdl_team_barrier()
        if not cdl_flag_read(flag):
            csr = cdl_flush_subnormals()
            for r in range(rows):
                if chunks[r, 2] % team == tid:
                    _sgd(pp + chunks[r, 0], gp + chunks[r, 0],
                         vp + chunks[r, 0] if has_v else NULL, chunks[r, 1] - chunks[r, 0],
                         flr, fmu, nesterov, fwd)
            cdl_restore_fp(csr)
    return nonfinite


def sgd_update_chunks(floating[::1] param, const floating[::1] grad, floating[::1] velocity,
                      const int64_t[:, ::1] chunks, double lr, double momentum, bint nesterov,
                      double weight_decay, int num_threads, bint check_finite=False):
    """sgd_update over the parts of flat buffers listed in ``chunks``, rows of
    (start, stop, owner): OpenMP thread owner mod threads updates [start, stop).

    The model deals the parts (cdl.model._sgd_parts): a big Linear weight's are
    the dense kernels' row chunks, so each is updated by the thread that computed
    its gradient and has it in its cache. With every owner 0 it runs on one thread.
    weight_decay adds weight_decay * param to the gradient first (0: exactly the
    update without it).

    With check_finite, nothing is updated when a listed gradient is NaN or
    infinite (each thread first checks the parts it owns). Returns whether the
    update ran.
    """
    cdef Py_ssize_t n = param.shape[0]
    _check_chunks("sgd_update_chunks", n, chunks)
    if grad.shape[0] != n or (velocity is not None and velocity.shape[0] != n):
        raise ValueError("sgd_update_chunks: param, grad and velocity must have one length")
    return _sgd_update_chunks(param, grad, velocity, chunks, lr, momentum, nesterov,
                              weight_decay, num_threads, check_finite) == 0


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


# ---------------------------------------------------------------- tanh, leaky ReLU

cdef inline void _tanh_chunk(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    if floating is float:
        cdl_tanh_arr_f(x, y, n)
    else:
        cdl_tanh_arr_d(x, y, n)


cdef void _tanh_backward_chunk(const floating* g, const floating* y, floating* dx,
                               Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating one = 1, yv
    for i in range(n):
        yv = y[i]
        dx[i] = g[i] * (one - yv * yv)


cdef int _tanh_forward(const floating[::1] x, floating[::1] out, int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(8 * n, num_threads)):
            lo = t * CHUNK
            _tanh_chunk(xp + lo, yp + lo, min(CHUNK, n - lo))
    return 0


def tanh_forward(const floating[::1] x, floating[::1] out, int num_threads):
    """out = tanh(x) (within a few ulp); out may be x."""
    _tanh_forward(x, out, num_threads)


cdef int _tanh_backward(const floating[::1] grad_out, const floating[::1] y,
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
            _tanh_backward_chunk(gp + lo, yp + lo, dp + lo, min(CHUNK, n - lo))
    return 0


def tanh_backward(const floating[::1] grad_out, const floating[::1] y,
                  floating[::1] grad_input, int num_threads):
    """grad_input = grad_out * (1 - y²) (y: the forward output)."""
    _tanh_backward(grad_out, y, grad_input, num_threads)


cdef int _leaky_relu_forward(const floating[::1] x, floating[::1] out, double slope,
                             int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    cdef floating s = <floating>slope
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            if floating is float:
                cdl_leaky_f(xp + lo, yp + lo, min(CHUNK, n - lo), s)
            else:
                cdl_leaky_d(xp + lo, yp + lo, min(CHUNK, n - lo), s)
    return 0


def leaky_relu_forward(const floating[::1] x, floating[::1] out, double slope, int num_threads):
    """out = x where x > 0 else slope * x (NaN passes); out may be x."""
    _leaky_relu_forward(x, out, slope, num_threads)


cdef int _leaky_relu_backward(const floating[::1] grad_out, const floating[::1] x,
                              floating[::1] grad_input, double slope,
                              int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* gp = &grad_out[0]
    cdef const floating* xp = &x[0]
    cdef floating* dp = &grad_input[0]
    cdef floating s = <floating>slope
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            if floating is float:
                cdl_leaky_bwd_f(gp + lo, xp + lo, dp + lo, min(CHUNK, n - lo), s)
            else:
                cdl_leaky_bwd_d(gp + lo, xp + lo, dp + lo, min(CHUNK, n - lo), s)
    return 0


def leaky_relu_backward(const floating[::1] grad_out, const floating[::1] x,
                        floating[::1] grad_input, double slope, int num_threads):
    """grad_input = grad_out where x > 0 else slope * grad_out (x: the forward INPUT)."""
    _leaky_relu_backward(grad_out, x, grad_input, slope, num_threads)


# ---------------------------------------------------------------- dropout

cdef inline uint64_t _keep_threshold(double p) noexcept nogil:
    """u >= p with u = k * 2^-53 is k >= ceil(p * 2^53) (p * 2^53 is exact)."""
    if p <= 0:
        return 0
    if p >= 1:
        return (<uint64_t>1) << 53
    return <uint64_t>ceil(p * 9007199254740992.0)


cdef inline double _keep_scale(double p) noexcept nogil:
    """1 / (1 - p), or 0 when nothing is kept (p = 1), as PyTorch."""
    return 0.0 if p >= 1 else 1.0 / (1.0 - p)


# The generator costs about 3 cycles an element (two 64-bit multiplies, which AVX2
# emulates), so the forward is compute-bound: it splits into smaller chunks and goes
# parallel from two of them (a LeNet-5 Dropout of 64 x 400 took 27 us on one thread).
cdef Py_ssize_t DROPOUT_CHUNK = 1 << 12


cdef int _dropout_forward(const floating[::1] x, floating[::1] out, uint8_t[::1] mask, double p,
                          uint64_t seed, uint64_t stream, uint64_t counter,
                          int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* xp = &x[0]
    cdef floating* yp = &out[0]
    cdef uint8_t* mp = &mask[0]
    cdef uint64_t key = cdl_dropout_key(seed, stream, counter), thresh = _keep_threshold(p)
    cdef floating scale = <floating>_keep_scale(p)
    cdef Py_ssize_t chunks = (n + DROPOUT_CHUNK - 1) // DROPOUT_CHUNK
    cdef int nt = num_threads if chunks >= 2 and num_threads > 1 else 1
    with nogil:
        for t in prange(chunks, schedule="static", num_threads=nt):
            lo = t * DROPOUT_CHUNK
            if floating is float:
                cdl_dropout_f(xp + lo, yp + lo, mp + lo, min(DROPOUT_CHUNK, n - lo),
                              <uint64_t>lo, key, thresh, scale)
            else:
                cdl_dropout_d(xp + lo, yp + lo, mp + lo, min(DROPOUT_CHUNK, n - lo),
                              <uint64_t>lo, key, thresh, scale)
    return 0


def dropout_forward(const floating[::1] x, floating[::1] out, uint8_t[::1] mask, double p,
                    uint64_t seed, uint64_t stream, uint64_t counter, int num_threads):
    """Inverted dropout: element i is kept iff u_i >= p, u_i = dropout_uniforms(...)[i];
    mask[i] = 1 if kept else 0; out = x * mask * (1 / (1 - p)) (the scale rounded to
    x's type once; 0 for p = 1). out may be x. The mask depends on (seed, stream,
    counter, i) only: the same for any thread count."""
    _dropout_forward(x, out, mask, p, seed, stream, counter, num_threads)


cdef int _dropout_uniforms(double[::1] out, uint64_t seed, uint64_t stream,
                           uint64_t counter) except -1:
    cdef Py_ssize_t n = out.shape[0]
    cdef uint64_t key = cdl_dropout_key(seed, stream, counter)
    if n == 0:
        return 0
    cdef double* up = &out[0]
    with nogil:
        cdl_uniforms(up, n, key)
    return 0


def dropout_uniforms(double[::1] out, uint64_t seed, uint64_t stream, uint64_t counter):
    """out[i] = u_i in [0, 1), the uniforms dropout_forward compares with p (for tests
    and twins: dropout keeps element i iff out[i] >= p)."""
    _dropout_uniforms(out, seed, stream, counter)


cdef int _dropout_backward(const floating[::1] grad_out, const uint8_t[::1] mask,
                           floating[::1] grad_input, double p, int num_threads) except -1:
    cdef Py_ssize_t n = grad_out.shape[0], t, lo
    if n == 0:
        return 0
    cdef const floating* gp = &grad_out[0]
    cdef const uint8_t* mp = &mask[0]
    cdef floating* dp = &grad_input[0]
    cdef floating scale = <floating>_keep_scale(p)
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            if floating is float:
                cdl_dropout_bwd_f(gp + lo, mp + lo, dp + lo, min(CHUNK, n - lo), scale)
            else:
                cdl_dropout_bwd_d(gp + lo, mp + lo, dp + lo, min(CHUNK, n - lo), scale)
    return 0


def dropout_backward(const floating[::1] grad_out, const uint8_t[::1] mask,
                     floating[::1] grad_input, double p, int num_threads):
    """grad_input = grad_out * mask * (1 / (1 - p)); grad_input may be grad_out."""
    _dropout_backward(grad_out, mask, grad_input, p, num_threads)


# ---------------------------------------------------------------- residual add, scale

cdef int _add(const floating[::1] a, const floating[::1] b, floating[::1] out, bint relu,
              int num_threads, const floating[::1] mask=None) except -1:
    cdef Py_ssize_t n = out.shape[0], t, lo
    if a.shape[0] != n or b.shape[0] != n or (mask is not None and mask.shape[0] != n):
        raise ValueError(f"add: a, b, mask and out need one length, got {a.shape[0]}, "
                         f"{b.shape[0]}, {'-' if mask is None else mask.shape[0]} and {n}")
    if mask is not None and relu:
        raise ValueError("add: a mask and relu do not combine")
    if n == 0:
        return 0
    cdef const floating* ap = &a[0]
    cdef const floating* bp = &b[0]
    cdef const floating* mp = NULL if mask is None else &mask[0]
    cdef floating* yp = &out[0]
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            if floating is float:
                if mp != NULL:
                    cdl_add_masked_f(ap + lo, bp + lo, mp + lo, yp + lo, min(CHUNK, n - lo))
                else:
                    cdl_add_f(ap + lo, bp + lo, yp + lo, min(CHUNK, n - lo), relu)
            else:
                if mp != NULL:
                    cdl_add_masked_d(ap + lo, bp + lo, mp + lo, yp + lo, min(CHUNK, n - lo))
                else:
                    cdl_add_d(ap + lo, bp + lo, yp + lo, min(CHUNK, n - lo), relu)
    return 0


def add(const floating[::1] a, const floating[::1] b, floating[::1] out, bint relu,
        int num_threads):
    """out = a + b, then max(0, ·) with relu (NaN passes); out may be a or b."""
    _add(a, b, out, relu, num_threads)


def add_masked(const floating[::1] a, const floating[::1] b, const floating[::1] mask,
               floating[::1] out, int num_threads):
    """out = a + (b where mask > 0, else 0), bitwise add(a, relu_backward(b, mask)); out
    may be a or b."""
    _add(a, b, out, False, num_threads, mask)


cdef int _scale(floating[::1] x, double alpha, int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], t, lo, i
    if n == 0:
        return 0
    cdef floating* xp = &x[0]
    cdef floating a = <floating>alpha
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=_threads(n, num_threads)):
            lo = t * CHUNK
            for i in range(lo, min(lo + CHUNK, n)):
                xp[i] = xp[i] * a
    return 0


cdef bint _chunk_nonfinite(const floating* p, Py_ssize_t n) noexcept nogil:
    # An exponent of all ones is Inf or NaN: adding one to the exponent field then
    # carries into the sign bit, and an integer OR collects the carries (a loop GCC
    # vectorises, where a float test would need an ordered, NaN-aware reduction).
    cdef Py_ssize_t i
    cdef uint32_t c32 = 0
    cdef uint64_t c64 = 0
    if floating is float:
        for i in range(n):
            c32 |= ((<const uint32_t*>p)[i] & 0x7f800000u) + 0x00800000u
        return (c32 >> 31) != 0
    else:
        for i in range(n):
            c64 |= ((<const uint64_t*>p)[i] & 0x7ff0000000000000u) + 0x0010000000000000u
        return (c64 >> 63) != 0


cdef bint _all_finite(const floating[::1] x, int num_threads) noexcept:
    cdef Py_ssize_t n = x.shape[0], t, lo
    cdef int bad = 0, nt = _threads(n, num_threads)
    if n == 0:
        return True
    cdef const floating* xp = &x[0]
    if nt == 1:     # no parallel region: a batch-1 step checks every step
        return not _chunk_nonfinite(xp, n)
    with nogil:
        for t in prange(_chunks(n), schedule="static", num_threads=nt):
            lo = t * CHUNK
            bad |= _chunk_nonfinite(xp + lo, min(CHUNK, n - lo))
    return bad == 0


def all_finite(const floating[::1] x, int num_threads):
    """Whether x holds no NaN and no ±Inf."""
    return _all_finite(x, num_threads)


cdef class AllFinite:
    """all_finite of one float32 array, bound once (a model's gradient buffer, checked
    every step: a call without the argument's conversion)."""
    cdef const float[::1] x

    def __init__(self, x):
        self.x = x

    def run(self, int num_threads):
        return _all_finite(self.x, num_threads)


def scale(floating[::1] x, double alpha, int num_threads):
    """x *= alpha in place (alpha rounded to x's type, as PyTorch's mul_)."""
    _scale(x, alpha, num_threads)


# ---------------------------------------------------------------- Adam / AdamW

cdef int _adam_update_chunks(floating[::1] param, const floating[::1] grad,
                             floating[::1] exp_avg, floating[::1] exp_avg_sq,
                             const int64_t[:, ::1] chunks, double lr, double beta1, double beta2,
                             double eps, double weight_decay, bint decoupled, long step,
                             int num_threads, bint check_finite) except -1:
    # Returns 1, having updated nothing, when check_finite found a gradient that is
    # not finite (as _sgd_update_chunks).
    cdef Py_ssize_t rows = chunks.shape[0], r, tid, team, lo
    cdef int nt = 1, nonfinite = 0
    cdef int* flag = &nonfinite
    if rows == 0:
        return 0
    for r in range(rows):
        if chunks[r, 2] > 0:
            nt = num_threads
    cdef floating* pp = &param[0]
    cdef const floating* gp = &grad[0]
    cdef floating* mp = &exp_avg[0]
    cdef floating* vp = &exp_avg_sq[0]
    # PyTorch's scalars, in double, then rounded to the parameters' type. Adam with
    # weight_decay 0 skips the decay (as PyTorch does), so it runs as AdamW with decay 1.
    cdef bint dec = decoupled or weight_decay == 0
    cdef floating decay = <floating>(1.0 - lr * weight_decay) if decoupled else 1
    cdef floating wd = <floating>weight_decay
    cdef floating w1 = <floating>(1.0 - beta1), b2 = <floating>beta2
    cdef floating omb2 = <floating>(1.0 - beta2)
    cdef floating bc2s = <floating>sqrt(1.0 - pow(beta2, <double>step))
    cdef floating feps = <floating>eps
    cdef floating nstep = <floating>(-(lr / (1.0 - pow(beta1, <double>step))))
    cdef unsigned int csr
    with nogil, parallel(num_threads=nt):
        tid = omp_get_thread_num()
        team = omp_get_num_threads()
        if check_finite:
            if _owned_nonfinite(gp, chunks, tid, team):
                cdl_flag_raise(flag)
            cdl_team_barrier()
        if not cdl_flag_read(flag):
            csr = cdl_flush_subnormals()
            for r in range(rows):
                if chunks[r, 2] % team == tid:
                    lo = chunks[r, 0]
                    if floating is float:
                        cdl_adam_f(pp + lo, gp + lo, mp + lo, vp + lo, chunks[r, 1] - lo, dec,
                                   decay, wd, w1, b2, omb2, bc2s, feps, nstep)
                    else:
                        cdl_adam_d(pp + lo, gp + lo, mp + lo, vp + lo, chunks[r, 1] - lo, dec,
                                   decay, wd, w1, b2, omb2, bc2s, feps, nstep)
            cdl_restore_fp(csr)
    return nonfinite


def adam_update_chunks(floating[::1] param, const floating[::1] grad, floating[::1] exp_avg,
                       floating[::1] exp_avg_sq, const int64_t[:, ::1] chunks, double lr,
                       double beta1, double beta2, double eps, double weight_decay,
                       bint decoupled, long step, int num_threads, bint check_finite=False):
    """One Adam (decoupled=False) or AdamW (decoupled=True) step in place over the
    parts of flat buffers listed in ``chunks`` (rows of (start, stop, owner), as
    sgd_update_chunks), with torch.optim.Adam's formulas; step counts from 1.

    Adam: g += wd·p;  AdamW: p *= 1 - lr·wd.  Then m = lerp(m, g, 1 - β1),
    v = β2·v + (1 - β2)·g², p -= lr / (1 - β1^t) · m / (sqrt(v) / sqrt(1 - β2^t) + eps).
    exp_avg and exp_avg_sq start at zero. check_finite and the value returned are
    sgd_update_chunks'.
    """
    cdef Py_ssize_t n = param.shape[0]
    _check_chunks("adam_update_chunks", n, chunks)
    if grad.shape[0] != n or exp_avg.shape[0] != n or exp_avg_sq.shape[0] != n:
        raise ValueError("adam_update_chunks: param, grad, exp_avg and exp_avg_sq must have "
                         "one length")
    if step < 1:
        raise ValueError(f"adam_update_chunks: step counts from 1, got {step}")
    return _adam_update_chunks(param, grad, exp_avg, exp_avg_sq, chunks, lr, beta1, beta2, eps,
                               weight_decay, decoupled, step, num_threads, check_finite) == 0


# ---------------------------------------------------------------- bound calls
# A float32 call with its arrays bound once (cdl.model's training plan), so
# ``run`` skips the per-call buffer checks and type dispatch. The input can be
# rebound.

cdef int _kind_index(str cls, kind) except -1:
    kinds = ("relu", "sigmoid", "tanh", "leaky_relu")
    if kind not in kinds:
        raise ValueError(f"{cls}: kind must be one of {', '.join(map(repr, kinds))}, got {kind!r}")
    return kinds.index(kind)


cdef class ActivationForward:
    """ReLU, sigmoid, tanh or leaky ReLU (slope) forward on flat views."""
    cdef const float[::1] x
    cdef float[::1] out
    cdef int kind
    cdef double slope

    def __init__(self, kind, x, out, double slope=0.0):
        self.kind = _kind_index("ActivationForward", kind)
        self.x, self.out, self.slope = x, out, slope

    def bind_input(self, const float[::1] x):
        self.x = x

    def run(self, int num_threads):
        if self.kind == 0:
            _relu_forward(self.x, self.out, num_threads)
        elif self.kind == 1:
            _sigmoid_forward(self.x, self.out, num_threads)
        elif self.kind == 2:
            _tanh_forward(self.x, self.out, num_threads)
        else:
            _leaky_relu_forward(self.x, self.out, self.slope, num_threads)


cdef class ActivationBackward:
    """The matching backward: y_or_x is the forward output (relu, sigmoid, tanh)
    or the forward input (leaky_relu)."""
    cdef const float[::1] grad_out
    cdef const float[::1] y
    cdef float[::1] grad_input
    cdef int kind
    cdef double slope

    def __init__(self, kind, grad_out, y_or_x, grad_input, double slope=0.0):
        self.kind = _kind_index("ActivationBackward", kind)
        self.grad_out, self.y, self.grad_input, self.slope = grad_out, y_or_x, grad_input, slope

    def run(self, int num_threads):
        if self.kind == 0:
            _relu_backward(self.grad_out, self.y, self.grad_input, num_threads)
        elif self.kind == 1:
            _sigmoid_backward(self.grad_out, self.y, self.grad_input, num_threads)
        elif self.kind == 2:
            _tanh_backward(self.grad_out, self.y, self.grad_input, num_threads)
        else:
            _leaky_relu_backward(self.grad_out, self.y, self.grad_input, self.slope, num_threads)


cdef class SGDChunks:
    """sgd_update_chunks over a model's flat buffers (cdl.SGD.step)."""
    cdef float[::1] param
    cdef const float[::1] grad
    cdef float[::1] velocity
    cdef const int64_t[:, ::1] chunks

    def __init__(self, param, grad, velocity, chunks):
        self.param, self.grad, self.velocity, self.chunks = param, grad, velocity, chunks

    def run(self, double lr, double momentum, bint nesterov, double weight_decay,
            int num_threads, bint check_finite=False):
        return _sgd_update_chunks(self.param, self.grad, self.velocity, self.chunks, lr,
                                  momentum, nesterov, weight_decay, num_threads,
                                  check_finite) == 0


cdef class AdamChunks:
    """adam_update_chunks over a model's flat buffers."""
    cdef float[::1] param
    cdef const float[::1] grad
    cdef float[::1] exp_avg
    cdef float[::1] exp_avg_sq
    cdef const int64_t[:, ::1] chunks

    def __init__(self, param, grad, exp_avg, exp_avg_sq, chunks):
        self.param, self.grad, self.exp_avg, self.exp_avg_sq = param, grad, exp_avg, exp_avg_sq
        self.chunks = chunks

    def run(self, double lr, double beta1, double beta2, double eps, double weight_decay,
            bint decoupled, long step, int num_threads, bint check_finite=False):
        return _adam_update_chunks(self.param, self.grad, self.exp_avg, self.exp_avg_sq,
                                   self.chunks, lr, beta1, beta2, eps, weight_decay, decoupled,
                                   step, num_threads, check_finite) == 0


cdef class DropoutForward:
    """dropout_forward with bound arrays; run draws the mask for the given counter."""
    cdef const float[::1] x
    cdef float[::1] out
    cdef uint8_t[::1] mask
    cdef double p
    cdef uint64_t seed, stream

    def __init__(self, x, out, mask, double p, uint64_t seed, uint64_t stream):
        self.x, self.out, self.mask = x, out, mask
        self.p, self.seed, self.stream = p, seed, stream

    def bind_input(self, const float[::1] x):
        self.x = x

    def run(self, int num_threads, uint64_t counter):
        _dropout_forward(self.x, self.out, self.mask, self.p, self.seed, self.stream, counter,
                         num_threads)


cdef class DropoutBackward:
    cdef const float[::1] grad_out
    cdef const uint8_t[::1] mask
    cdef float[::1] grad_input
    cdef double p

    def __init__(self, grad_out, mask, grad_input, double p):
        self.grad_out, self.mask, self.grad_input, self.p = grad_out, mask, grad_input, p

    def run(self, int num_threads):
        _dropout_backward(self.grad_out, self.mask, self.grad_input, self.p, num_threads)


cdef class Add:
    """add with bound arrays; either operand can be rebound (e.g. to the model input).
    With mask: add_masked (b taken as 0 where mask <= 0; run raises ValueError with relu)."""
    cdef const float[::1] a
    cdef const float[::1] b
    cdef float[::1] out
    cdef bint relu
    cdef const float[::1] mask

    def __init__(self, a, b, out, bint relu, mask=None):
        self.a, self.b, self.out, self.relu, self.mask = a, b, out, relu, mask

    def bind_a(self, const float[::1] a):
        self.a = a

    def bind_b(self, const float[::1] b):
        self.b = b

    def run(self, int num_threads):
        _add(self.a, self.b, self.out, self.relu, num_threads, self.mask)
