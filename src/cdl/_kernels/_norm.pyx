# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batch-normalisation kernels (PyTorch semantics) on x viewed as (N, C, L).

BatchNorm2d on (N, C, H, W) is L = H*W; BatchNorm1d on (N, F) is C = F, L = 1.
Per channel c, over its M = N*L values:
  training   with k = the channel's first value (or its mean, below), in one pass:
             s1 = Σ (x - k),  s2 = Σ (x - k)²
             mean = k + s1 / M,  var = (s2 - s1² / M) / M  (biased; max(0, ·))
             invstd = 1 / sqrt(var + eps)
             y = (x - mean) · invstd · w + b            (then max(0, y) with relu)
             running_mean = (1 - m) · rm + m · mean
             running_var  = (1 - m) · rv + m · var · M / (M - 1)   (M > 1: callers check)
  backward   g masked to 0 where the forward output <= 0 (relu only)
             dβ = Σ g,  dγ = Σ g · x̂,  x̂ = (x - mean) · invstd
             dx = γ · invstd / M · (M g - dβ - x̂ dγ)
  eval       y = x · scale[c] + shift[c],  scale = w / sqrt(rv + eps), shift = b - rm · scale

Sums run over a fixed order that depends on neither the thread count nor how
the work is split. The batch is cut into groups of CDL_BN_GROUP (4) images. In
a group, the 4 values at one position of a channel are added in the input's
type, ((a0 + a1) + (a2 + a3)) (fewer in the last group), and converted to
double; a channel's positions fold into 8 double lanes by position mod 8, and
the lanes' pairwise total is the group's sum. The group sums are added in group
order. (Channels shorter than CDL_BN_RUN add each position's group sums in
group order first, then fold once.) In float32, x - k, its square and g (x - m)
are formed in float32 and each 4-value partial sum is rounded to float32: the
statistics carry relative errors of about 1e-7 times 1 + ((mean - k) / std)²,
where double sums had none. So when a channel's first value lies more than 4
standard deviations from its mean, the sums run again shifted by that mean
(_reshift), and the factor stays below 17. (x - k)² overflows beyond
|x - k| ~ 1.8e19.

Training passes run in three steps: the group sums, split by (group, block of
channels); the per-channel statistics (split by channels from
COEF_PARALLEL_MIN_CHANNELS channels, else on one thread); the elementwise pass,
split by (image, block of channels). Both loops are image-major with static
schedules, as are the convolutions', so a thread reads the images its own core
wrote (with the sums split by channels, half of every read came from the other
core: the LeNet-5 + BatchNorm step took 1.15x as long). Channels shorter than
CDL_BN_RUN are split by blocks of channels in both loops instead, each block
over every image, so a thread's second pass finds its block in its cache.

Pooled training pass (a 2x2 stride-2 max-pool after the batch norm, planes of
CDL_BN_RUN..CDL_BN_TILE cells): the forward pools each plane as it normalises
it (AVX-512 and AVX2; elsewhere it normalises the plane into the thread's workspace and
pools it there), writing only the pool's output and indices; the backward
unpools the pool's gradient (masked by the pooled ReLU output) into dx a group
of planes at a time, sums those rows, and then turns dx into the input gradient in
place. Every result is bitwise that of the batch norm and the max-pool run
apart (the sums are the same function over the same rows).

Kernels trust their inputs (shapes, dtypes, C-contiguity, M > 1); the layers
validate. weight and bias may be None (affine=False); so may the running
statistics (track_running_stats=False).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport INFINITY, sqrt
from libc.stdlib cimport malloc, free
from cdl._kernels._openmp cimport omp_get_thread_num

# The element loops are C, so each is one simple loop the compiler vectorises;
# relu's select is a bit-mask blend (a ternary on floats can become a branch).
cdef extern from *:
    """
    #include <math.h>
    #include <stdint.h>
    #include <string.h>
    #include "cdl_pool2x2.h"
    /* A tile: CDL_BN_TILE values. Channels shorter than CDL_BN_RUN run several
       at a time, a tile of positions, with per-element copies of the
       per-channel coefficients, so that loops run over the whole block, not
       over runs of L. A pooled pass's planes have at most a tile of cells. */
    #define CDL_BN_TILE 1024
    #define CDL_BN_RUN 16
    #define CDL_BN_GROUP 4
    /* Vectors of CDL_BN_VB bytes (GCC vector types; 32 with AVX, else 16, which
       SSE2 keeps in registers) for the sums. cdl_bn_acc_*: lanes [h, h + the
       vector's length) of 8 double lanes (acc: vectors of CDL_BN_DL doubles)
       += s as double; floats convert by halves. */
    #if defined(__AVX__)
    #define CDL_BN_VB 32
    #else
    #define CDL_BN_VB 16
    #endif
    #define CDL_BN_DL (CDL_BN_VB / 8)
    /* An empty asm the value passes through: the compiler cannot see how it was made. */
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #define CDL_BN_OPAQUE(v) __asm__("" : "+x"(v))
    #else
    #define CDL_BN_OPAQUE(v) __asm__("" : "+m"(v))
    #endif
    typedef double cdl_bn_dv __attribute__((vector_size(CDL_BN_VB)));
    typedef float cdl_bn_v_f __attribute__((vector_size(CDL_BN_VB)));
    typedef double cdl_bn_v_d __attribute__((vector_size(CDL_BN_VB)));
    typedef float cdl_bn_fh __attribute__((vector_size(CDL_BN_VB / 2)));
    static inline void cdl_bn_acc_f(cdl_bn_dv *acc, cdl_bn_v_f s, Py_ssize_t h) {
        cdl_bn_fh a, b;
        memcpy(&a, &s, sizeof a);
        memcpy(&b, (const char *)&s + sizeof a, sizeof b);
        acc[h / CDL_BN_DL] += __builtin_convertvector(a, cdl_bn_dv);
        acc[h / CDL_BN_DL + 1] += __builtin_convertvector(b, cdl_bn_dv);
    }
    static inline void cdl_bn_acc_d(cdl_bn_dv *acc, cdl_bn_v_d s, Py_ssize_t h) {
        acc[h / CDL_BN_DL] += s;
    }
    /* The eval pass's per-thread workspace in doubles: two tiles of
       per-element coefficients (as T). Training's is _train_stride's. */
    #define CDL_BN_WS (2 * CDL_BN_TILE + 8)

    /* lanes[l % 8] += a[l]; calls continuing the same lanes must follow one
       with n % 8 == 0. */
    static inline void cdl_bn_fold(double *lanes, const double *a, Py_ssize_t n) {
        Py_ssize_t i = 0;
        int k;
        for (; i + 8 <= n; i += 8)
            for (k = 0; k < 8; k++) lanes[k] += a[i + k];
        for (k = 0; i < n; i++, k++) lanes[k] += a[i];
    }
    static inline double cdl_bn_total(const double *l) {
        return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    }
    static inline double cdl_bn_fold_total(const double *a, Py_ssize_t n) {
        double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        cdl_bn_fold(lanes, a, n);
        return cdl_bn_total(lanes);
    }

    /* Pooled index k if it lies in the 2x2 window whose first cell is p (rows of W),
       with *ok = 1; else p with *ok = 0 (the caller then uses a zero gradient there,
       which leaves every result as it is). Masks, not conditionals: where the argmax
       falls in its window is random, and the branches GCC made of conditionals
       mispredicted often enough to double the backward's time. */
    static inline Py_ssize_t cdl_bn_window_cell(int k, Py_ssize_t W, Py_ssize_t p,
                                                size_t *ok) {
        size_t r = (size_t)((Py_ssize_t)k - p);
        *ok = (size_t)((r >> 1) == 0) | (size_t)(((r - (size_t)W) >> 1) == 0);
        return p + (Py_ssize_t)(r & ((size_t)0 - *ok));
    }
    /* The vector 2x2 pool of cdl_pool2x2.h of the normalised plane (x - m) * s + b
       (then max(0, ·) with relu), read straight from x, float only (1: done). */
    static inline int cdl_bn_normpool2_vec_f(const float *x, Py_ssize_t W, Py_ssize_t OH,
            Py_ssize_t OW, float m, float s, float b, int relu, float *out, int *ind) {
        if (!CDL_POOL2_VEC) return 0;
        cdl_pool2_plane_fwd_affine(x, out, ind, W, OH, OW, relu, m, s, b);
        return 1;
    }
    static inline int cdl_bn_normpool2_vec_d(const double *x, Py_ssize_t W, Py_ssize_t OH,
            Py_ssize_t OW, double m, double s, double b, int relu, double *out, int *ind) {
        (void)x; (void)W; (void)OH; (void)OW; (void)m; (void)s; (void)b; (void)relu;
        (void)out; (void)ind;
        return 0;
    }
    /* Its backward into a dense plane gb (max-pool's input gradient, masked where
       the pooled ReLU output y <= 0; y NULL: no ReLU), float only (1: done); adds
       the indices outside their window to *bad. */
    static inline int cdl_bn_unpool2_vec_f(float *gb, const float *g, const float *y,
            const int *ind, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t *bad) {
        if (!CDL_POOL2_VEC) return 0;
        *bad += OH * OW - cdl_pool2_plane_bwd(g, ind, y, gb, 2 * OH, W, OH, OW);
        return 1;
    }
    static inline int cdl_bn_unpool2_vec_d(double *gb, const double *g, const double *y,
            const int *ind, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t *bad) {
        (void)gb; (void)g; (void)y; (void)ind; (void)W; (void)OH; (void)OW; (void)bad;
        return 0;
    }

    #define CDL_BN_KERNELS(SFX, T, UT)                                              \\
    static inline T cdl_bn_pick_##SFX(int cond, T a, T b) {                         \\
        UT ia, ib, m = (UT)0 - (UT)(cond != 0);                                     \\
        memcpy(&ia, &a, sizeof ia);                                                 \\
        memcpy(&ib, &b, sizeof ib);                                                 \\
        ia = (ia & m) | (ib & ~m);                                                  \\
        memcpy(&a, &ia, sizeof a);                                                  \\
        return a;                                                                   \\
    }                                                                               \\
    /* Sums run by groups of CDL_BN_GROUP (4) images. Within a group the values of  \\
       one position are added in T, ((a0 + a1) + (a2 + a3)), then                   \\
       converted to double; positions fold into 8 double lanes by position mod 8,   \\
       and the lanes' total (pairwise) is the group's sum for the channel. The      \\
       group sums are added in group order (cdl_bn_*_coef). Channels shorter than   \\
       CDL_BN_RUN instead add each position's group sums in group order, then fold  \\
       once. Work is split by groups, images and channels, never inside one of      \\
       these sums, so no result depends on the threads. */                          \\
    /* Vectors of T, CDL_BN_VB bytes, in GCC's vector types: the compiler did not   \\
       vectorise the lanes' loops written with arrays. */                           \\
    static inline cdl_bn_v_##SFX cdl_bn_load_##SFX(const T *p) {                    \\
        cdl_bn_v_##SFX v;                                                           \\
        memcpy(&v, p, sizeof v);                                                    \\
        return v;                                                                   \\
    }                                                                               \\
    /* Rows past a short group's nr count as zeros, so it runs the code of a        \\
       full group (the sums are the same up to how FMA contraction falls). */       \\
    /* x[r * st] - k for rows r < nr, else 0 (not read) */                          \\
    static inline T cdl_bn_dev_##SFX(const T *x, Py_ssize_t st, Py_ssize_t r,       \\
                                     Py_ssize_t nr, T k) {                          \\
        return r < nr ? x[r * st] - k : (T)0;                                       \\
    }                                                                               \\
    /* One group's shifted sums of one channel, o1 = Σ (x - k), o2 = Σ (x - k)²,    \\
       over nr <= 4 rows `st` apart of L positions, eight positions a step. */      \\
    static void cdl_bn_csum2_##SFX(const T *x, Py_ssize_t st, Py_ssize_t nr,        \\
                                   Py_ssize_t L, T k, double *o1, double *o2) {     \\
        cdl_bn_dv v1[8 / CDL_BN_DL] = {{0}}, v2[8 / CDL_BN_DL] = {{0}};             \\
        double l1[8], l2[8];                                                        \\
        Py_ssize_t j = 0, h;                                                        \\
        for (; j + 8 <= L; j += 8)                                                  \\
            for (h = 0; h < 8; h += (Py_ssize_t)(CDL_BN_VB / sizeof(T))) {          \\
                const T *p = x + j + h;                                             \\
                cdl_bn_v_##SFX z = {0}, d0 = cdl_bn_load_##SFX(p) - k;              \\
                cdl_bn_v_##SFX d1 = nr > 1 ? cdl_bn_load_##SFX(p + st) - k : z;     \\
                cdl_bn_v_##SFX d2 = nr > 2 ? cdl_bn_load_##SFX(p + 2 * st) - k : z; \\
                cdl_bn_v_##SFX d3 = nr > 3 ? cdl_bn_load_##SFX(p + 3 * st) - k : z; \\
                cdl_bn_acc_##SFX(v1, (d0 + d1) + (d2 + d3), h);                     \\
                cdl_bn_acc_##SFX(v2, (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3), h); \\
            }                                                                       \\
        memcpy(l1, &v1, sizeof l1);                                                 \\
        memcpy(l2, &v2, sizeof l2);                                                 \\
        for (; j < L; j++) {                                                        \\
            T d0 = cdl_bn_dev_##SFX(x + j, st, 0, nr, k);                           \\
            T d1 = cdl_bn_dev_##SFX(x + j, st, 1, nr, k);                           \\
            T d2 = cdl_bn_dev_##SFX(x + j, st, 2, nr, k);                           \\
            T d3 = cdl_bn_dev_##SFX(x + j, st, 3, nr, k);                           \\
            l1[j % 8] += (double)((d0 + d1) + (d2 + d3));                           \\
            l2[j % 8] += (double)((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3));       \\
        }                                                                           \\
        *o1 = cdl_bn_total(l1);                                                     \\
        *o2 = cdl_bn_total(l2);                                                     \\
    }                                                                               \\
    /* Channels shorter than CDL_BN_RUN, several at once: a1[p] += and a2[p] +=     \\
       the group's sums at each position p < S of the rows (shift kv[p]). */        \\
    static void cdl_bn_tsum2_##SFX(const T *x, Py_ssize_t st, Py_ssize_t nr,        \\
                                   Py_ssize_t S, const T *kv, double *a1,           \\
                                   double *a2) {                                    \\
        Py_ssize_t p;                                                               \\
        if (nr == 4) {                                                              \\
            const T *x1 = x + st, *x2 = x1 + st, *x3 = x2 + st;                     \\
            for (p = 0; p < S; p++) {                                               \\
                T k = kv[p], d0 = x[p] - k, d1 = x1[p] - k;                         \\
                T d2 = x2[p] - k, d3 = x3[p] - k;                                   \\
                a1[p] += (double)((d0 + d1) + (d2 + d3));                           \\
                a2[p] += (double)((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3));       \\
            }                                                                       \\
            return;                                                                 \\
        }                                                                           \\
        for (p = 0; p < S; p++) {                                                   \\
            T d0 = cdl_bn_dev_##SFX(x + p, st, 0, nr, kv[p]);                       \\
            T d1 = cdl_bn_dev_##SFX(x + p, st, 1, nr, kv[p]);                       \\
            T d2 = cdl_bn_dev_##SFX(x + p, st, 2, nr, kv[p]);                       \\
            a1[p] += (double)((d0 + d1) + d2);                                      \\
            a2[p] += (double)((d0 * d0 + d1 * d1) + d2 * d2);                       \\
        }                                                                           \\
    }                                                                               \\
    /* y = (x - m) * s + b (+ r when r: a Residual's join, the shortcut added to \\
       the rounded value), then max(0, y) (NaN passes) */                           \\
    static void cdl_bn_norm_##SFX(T *y, const T *x, const T *r, T m, T s, T b,      \\
                                  Py_ssize_t n, int relu) {                         \\
        Py_ssize_t j;                                                               \\
        if (r && relu) {                                                            \\
            for (j = 0; j < n; j++) {                                               \\
                T v = (x[j] - m) * s + b;                                           \\
                v = v + r[j];                                                       \\
                y[j] = cdl_bn_pick_##SFX(v <= (T)0, (T)0, v);                       \\
            }                                                                       \\
        } else if (r) {                                                             \\
            for (j = 0; j < n; j++) {                                               \\
                T v = (x[j] - m) * s + b;                                           \\
                y[j] = v + r[j];                                                    \\
            }                                                                       \\
        } else if (relu) {                                                          \\
            for (j = 0; j < n; j++) {                                               \\
                T v = (x[j] - m) * s + b;                                           \\
                y[j] = cdl_bn_pick_##SFX(v <= (T)0, (T)0, v);                       \\
            }                                                                       \\
        } else {                                                                    \\
            for (j = 0; j < n; j++) y[j] = (x[j] - m) * s + b;                      \\
        }                                                                           \\
    }                                                                               \\
    static void cdl_bn_norm_v_##SFX(T *y, const T *x, const T *r, const T *m,       \\
                                    const T *s, const T *b, Py_ssize_t n, int relu) {\\
        Py_ssize_t j;                                                               \\
        if (r && relu) {                                                            \\
            for (j = 0; j < n; j++) {                                               \\
                T v = (x[j] - m[j]) * s[j] + b[j];                                  \\
                v = v + r[j];                                                       \\
                y[j] = cdl_bn_pick_##SFX(v <= (T)0, (T)0, v);                       \\
            }                                                                       \\
        } else if (r) {                                                             \\
            for (j = 0; j < n; j++) {                                               \\
                T v = (x[j] - m[j]) * s[j] + b[j];                                  \\
                y[j] = v + r[j];                                                    \\
            }                                                                       \\
        } else if (relu) {                                                          \\
            for (j = 0; j < n; j++) {                                               \\
                T v = (x[j] - m[j]) * s[j] + b[j];                                  \\
                y[j] = cdl_bn_pick_##SFX(v <= (T)0, (T)0, v);                       \\
            }                                                                       \\
        } else {                                                                    \\
            for (j = 0; j < n; j++) y[j] = (x[j] - m[j]) * s[j] + b[j];             \\
        }                                                                           \\
    }                                                                               \\
    /* y = x * s + b (eval) */                                                      \\
    static void cdl_bn_affine_##SFX(T *y, const T *x, T s, T b, Py_ssize_t n,       \\
                                    int relu) {                                     \\
        Py_ssize_t j;                                                               \\
        if (relu) {                                                                 \\
            for (j = 0; j < n; j++) {                                               \\
                T v = x[j] * s + b;                                                 \\
                y[j] = cdl_bn_pick_##SFX(v <= (T)0, (T)0, v);                       \\
            }                                                                       \\
        } else {                                                                    \\
            for (j = 0; j < n; j++) y[j] = x[j] * s + b;                            \\
        }                                                                           \\
    }                                                                               \\
    static void cdl_bn_affine_v_##SFX(T *y, const T *x, const T *s, const T *b,     \\
                                      Py_ssize_t n, int relu) {                     \\
        Py_ssize_t j;                                                               \\
        if (relu) {                                                                 \\
            for (j = 0; j < n; j++) {                                               \\
                T v = x[j] * s[j] + b[j];                                           \\
                y[j] = cdl_bn_pick_##SFX(v <= (T)0, (T)0, v);                       \\
            }                                                                       \\
        } else {                                                                    \\
            for (j = 0; j < n; j++) y[j] = x[j] * s[j] + b[j];                      \\
        }                                                                           \\
    }                                                                               \\
    /* Backward sums of one group and channel: o1 = Σ g, o2 = Σ g (x - m), g masked \\
       to 0 where y <= 0 (if y); rows of g and y `st` apart, of x `xst` apart. The  \\
       association is the forward's. Inlined, so each call site's y                 \\
       (NULL or not) is a constant. */                                              \\
    static inline T cdl_bn_gmask_##SFX(const T *g, const T *y, Py_ssize_t o) {      \\
        return y ? cdl_bn_pick_##SFX(y[o] <= (T)0, (T)0, g[o]) : g[o];              \\
    }                                                                               \\
    static inline cdl_bn_v_##SFX cdl_bn_gmaskv_##SFX(const T *g, const T *y,        \\
                                                     Py_ssize_t o) {                \\
        cdl_bn_v_##SFX gv = cdl_bn_load_##SFX(g + o);                               \\
        if (y) {                                                                    \\
            typedef UT cdl_bn_u __attribute__((vector_size(CDL_BN_VB)));            \\
            cdl_bn_u m = (cdl_bn_u)(cdl_bn_load_##SFX(y + o) <= (T)0);              \\
            gv = (cdl_bn_v_##SFX)((cdl_bn_u)gv & ~m);                               \\
        }                                                                           \\
        return gv;                                                                  \\
    }                                                                               \\
    /* The same mask from x - m (e): the forward's y = e * s + b <= 0, computed     \\
       as the forward computes it (bitwise its mask), instead of read from y. */    \\
    static inline cdl_bn_v_##SFX cdl_bn_remask_##SFX(cdl_bn_v_##SFX gv,             \\
            cdl_bn_v_##SFX e, T s, T b) {                                           \\
        typedef UT cdl_bn_u __attribute__((vector_size(CDL_BN_VB)));                \\
        cdl_bn_u m = (cdl_bn_u)(e * s + b <= (T)0);                                 \\
        gv = (cdl_bn_v_##SFX)((cdl_bn_u)gv & ~m);                                   \\
        /* opaque, as a masked load is: the sums after it contract as on y's path */\\
        CDL_BN_OPAQUE(gv);                                                          \\
        return gv;                                                                  \\
    }                                                                               \\
    static inline __attribute__((always_inline)) void cdl_bn_cbsum_##SFX(           \\
            const T *g, const T *y, Py_ssize_t st, const T *x, Py_ssize_t xst,      \\
            Py_ssize_t nr, Py_ssize_t L, T m, int rm, T rs, T rb, double *o1,       \\
            double *o2) {                                                           \\
        cdl_bn_dv v1[8 / CDL_BN_DL] = {{0}}, v2[8 / CDL_BN_DL] = {{0}};             \\
        double l1[8], l2[8];                                                        \\
        Py_ssize_t j = 0, r, h;                                                     \\
        for (; j + 8 <= L; j += 8)                                                  \\
            for (h = 0; h < 8; h += (Py_ssize_t)(CDL_BN_VB / sizeof(T))) {          \\
                const Py_ssize_t o = j + h;                                         \\
                cdl_bn_v_##SFX z = {0};                                             \\
                cdl_bn_v_##SFX g0 = cdl_bn_gmaskv_##SFX(g, y, o);                   \\
                cdl_bn_v_##SFX g1 = nr > 1 ? cdl_bn_gmaskv_##SFX(g, y, o + st) : z; \\
                cdl_bn_v_##SFX g2 = nr > 2 ? cdl_bn_gmaskv_##SFX(g, y, o + 2 * st) : z;\\
                cdl_bn_v_##SFX g3 = nr > 3 ? cdl_bn_gmaskv_##SFX(g, y, o + 3 * st) : z;\\
                cdl_bn_v_##SFX e0 = cdl_bn_load_##SFX(x + o) - m;                   \\
                cdl_bn_v_##SFX e1 = nr > 1 ? cdl_bn_load_##SFX(x + xst + o) - m : z;\\
                cdl_bn_v_##SFX e2 = nr > 2 ? cdl_bn_load_##SFX(x + 2 * xst + o) - m : z;\\
                cdl_bn_v_##SFX e3 = nr > 3 ? cdl_bn_load_##SFX(x + 3 * xst + o) - m : z;\\
                if (rm) {                                                           \\
                    g0 = cdl_bn_remask_##SFX(g0, e0, rs, rb);                       \\
                    g1 = cdl_bn_remask_##SFX(g1, e1, rs, rb);                       \\
                    g2 = cdl_bn_remask_##SFX(g2, e2, rs, rb);                       \\
                    g3 = cdl_bn_remask_##SFX(g3, e3, rs, rb);                       \\
                }                                                                   \\
                cdl_bn_acc_##SFX(v1, (g0 + g1) + (g2 + g3), h);                     \\
                cdl_bn_acc_##SFX(v2, (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3), h); \\
            }                                                                       \\
        memcpy(l1, &v1, sizeof l1);                                                 \\
        memcpy(l2, &v2, sizeof l2);                                                 \\
        for (; j < L; j++) {                                                        \\
            T gv[4] = {0, 0, 0, 0}, ex[4] = {0, 0, 0, 0};                           \\
            for (r = 0; r < nr; r++) {                                              \\
                gv[r] = cdl_bn_gmask_##SFX(g, y, j + r * st);                       \\
                ex[r] = x[j + r * xst] - m;                                         \\
                if (rm)                                                             \\
                    gv[r] = cdl_bn_pick_##SFX(ex[r] * rs + rb <= (T)0, (T)0, gv[r]);\\
            }                                                                       \\
            l1[j % 8] += (double)((gv[0] + gv[1]) + (gv[2] + gv[3]));               \\
            l2[j % 8] += (double)((gv[0] * ex[0] + gv[1] * ex[1]) + (gv[2] * ex[2] + gv[3] * ex[3]));\\
        }                                                                           \\
        *o1 = cdl_bn_total(l1);                                                     \\
        *o2 = cdl_bn_total(l2);                                                     \\
    }                                                                               \\
    /* The same at each position p < S (mean mv[p]) for channels shorter than       \\
       CDL_BN_RUN, added to a1[p], a2[p]. */                                        \\
    static inline __attribute__((always_inline)) void cdl_bn_tbsum_##SFX(           \\
            const T *g, const T *y, Py_ssize_t st, const T *x, Py_ssize_t nr,       \\
            Py_ssize_t S, const T *mv, double *a1, double *a2) {                    \\
        Py_ssize_t p, r;                                                            \\
        if (nr == 4) {                                                              \\
            for (p = 0; p < S; p++) {                                               \\
                T g0 = cdl_bn_gmask_##SFX(g, y, p);                                 \\
                T g1 = cdl_bn_gmask_##SFX(g, y, p + st);                            \\
                T g2 = cdl_bn_gmask_##SFX(g, y, p + 2 * st);                        \\
                T g3 = cdl_bn_gmask_##SFX(g, y, p + 3 * st);                        \\
                T e0 = x[p] - mv[p], e1 = x[p + st] - mv[p];                        \\
                T e2 = x[p + 2 * st] - mv[p], e3 = x[p + 3 * st] - mv[p];           \\
                a1[p] += (double)((g0 + g1) + (g2 + g3));                           \\
                a2[p] += (double)((g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3));       \\
            }                                                                       \\
            return;                                                                 \\
        }                                                                           \\
        for (p = 0; p < S; p++) {                                                   \\
            T gv[4] = {0, 0, 0, 0}, ex[4] = {0, 0, 0, 0};                           \\
            for (r = 0; r < nr; r++) {                                              \\
                gv[r] = cdl_bn_gmask_##SFX(g, y, p + r * st);                       \\
                ex[r] = x[p + r * st] - mv[p];                                      \\
            }                                                                       \\
            a1[p] += (double)((gv[0] + gv[1]) + (gv[2] + gv[3]));                   \\
            a2[p] += (double)((gv[0] * ex[0] + gv[1] * ex[1]) + (gv[2] * ex[2] + gv[3] * ex[3]));\\
        }                                                                           \\
    }                                                                               \\
    /* dx = ((g - gm) - (x - m) * k) * sc, g masked as above */                     \\
    static void cdl_bn_dx_##SFX(T *dx, const T *g, const T *x, const T *y, T m, T k, \\
                                T gm, T sc, Py_ssize_t n) {                         \\
        Py_ssize_t j;                                                               \\
        if (y) {                                                                    \\
            for (j = 0; j < n; j++) {                                               \\
                T gv = cdl_bn_pick_##SFX(y[j] <= (T)0, (T)0, g[j]);                 \\
                dx[j] = ((gv - gm) - (x[j] - m) * k) * sc;                          \\
            }                                                                       \\
        } else {                                                                    \\
            for (j = 0; j < n; j++) dx[j] = ((g[j] - gm) - (x[j] - m) * k) * sc;    \\
        }                                                                           \\
    }                                                                               \\
    /* dx as cdl_bn_dx, the mask from x: (x - m) * s + b <= 0, as the forward */    \\
    static void cdl_bn_dxr_##SFX(T *dx, const T *g, const T *x, T m, T k, T gm,     \\
                                 T sc, T s, T b, Py_ssize_t n) {                    \\
        Py_ssize_t j;                                                               \\
        for (j = 0; j < n; j++) {                                                   \\
            T e = x[j] - m;                                                         \\
            T gv = cdl_bn_pick_##SFX(e * s + b <= (T)0, (T)0, g[j]);                \\
            dx[j] = ((gv - gm) - e * k) * sc;                                       \\
        }                                                                           \\
    }                                                                               \\
    static void cdl_bn_dx_v_##SFX(T *dx, const T *g, const T *x, const T *y,        \\
                                  const T *m, const T *k, const T *gm, const T *sc, \\
                                  Py_ssize_t n) {                                   \\
        Py_ssize_t j;                                                               \\
        if (y) {                                                                    \\
            for (j = 0; j < n; j++) {                                               \\
                T gv = cdl_bn_pick_##SFX(y[j] <= (T)0, (T)0, g[j]);                 \\
                dx[j] = ((gv - gm[j]) - (x[j] - m[j]) * k[j]) * sc[j];              \\
            }                                                                       \\
        } else {                                                                    \\
            for (j = 0; j < n; j++)                                                 \\
                dx[j] = ((g[j] - gm[j]) - (x[j] - m[j]) * k[j]) * sc[j];            \\
        }                                                                           \\
    }                                                                               \\
    /* Spread one value per channel over the channel's L elements. */               \\
    static void cdl_bn_spread_##SFX(T *dst, const T *per_channel, Py_ssize_t nc,    \\
                                    Py_ssize_t L) {                                 \\
        Py_ssize_t c, l;                                                            \\
        for (c = 0; c < nc; c++)                                                    \\
            for (l = 0; l < L; l++) dst[c * L + l] = per_channel[c];                \\
    }                                                                               \\
    /* A following 2x2 stride-2 max-pool of one plane y (even height, rows of W):  \\
       max-pool's rule, bitwise: cells in the order TL, TR, BL, BR, a later one     \\
       wins if greater or NaN (branch-free: random data mispredicts); ind = the     \\
       winner's flat index in the plane. (float on AVX-512 or AVX2 pools in       \\
       cdl_bn_normpool2_vec_f instead.) */                                          \\
    static void cdl_bn_pool2_##SFX(const T *y, Py_ssize_t W, Py_ssize_t OH,         \\
                                   Py_ssize_t OW, T *out, int *ind) {               \\
        Py_ssize_t oh, ow, p;                                                       \\
        for (oh = 0; oh < OH; oh++)                                                 \\
            for (ow = 0; ow < OW; ow++) {                                           \\
                T best, v;                                                          \\
                int k, t;                                                           \\
                p = 2 * oh * W + 2 * ow;                                            \\
                best = y[p]; k = (int)p;                                            \\
                v = y[p + 1]; t = (v > best) | (v != v);                            \\
                best = cdl_bn_pick_##SFX(t, v, best); k = t ? (int)p + 1 : k;       \\
                v = y[p + W]; t = (v > best) | (v != v);                            \\
                best = cdl_bn_pick_##SFX(t, v, best); k = t ? (int)(p + W) : k;     \\
                v = y[p + W + 1]; t = (v > best) | (v != v);                        \\
                best = cdl_bn_pick_##SFX(t, v, best); k = t ? (int)(p + W) + 1 : k; \\
                out[oh * OW + ow] = best;                                           \\
                ind[oh * OW + ow] = k;                                              \\
            }                                                                       \\
    }                                                                               \\
    /* That pool's input gradient for one plane (L cells, rows of W, even height):   \\
       g of each window at its argmax, masked to 0 where the pooled ReLU output y  \\
       is <= 0 (y NULL: no ReLU), 0 elsewhere: bitwise max-pool's backward and the \\
       ReLU mask. Adds the indices outside their window to *bad (they give 0).     \\
       float on AVX-512 or AVX2: cdl_pool2x2.h's kernel. */                         \\
    static void cdl_bn_unpool2_##SFX(T *gb, const T *g, const T *y, const int *ind, \\
            Py_ssize_t W, Py_ssize_t L, Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t *bad) { \\
        Py_ssize_t oh, ow;                                                          \\
        if (cdl_bn_unpool2_vec_##SFX(gb, g, y, ind, W, OH, OW, bad)) return;        \\
        memset(gb, 0, (size_t)L * sizeof(T));                                       \\
        for (oh = 0; oh < OH; oh++)                                                 \\
            for (ow = 0; ow < OW; ow++) {                                           \\
                Py_ssize_t o = oh * OW + ow;                                        \\
                size_t ok;                                                          \\
                Py_ssize_t k = cdl_bn_window_cell(ind[o], W, 2 * oh * W + 2 * ow, &ok); \\
                T gv = y ? cdl_bn_pick_##SFX(y[o] <= (T)0, (T)0, g[o]) : g[o];      \\
                *bad += (Py_ssize_t)(ok ^ 1);                                       \\
                gb[k] = cdl_bn_pick_##SFX((int)ok, gv, (T)0);                       \\
            }                                                                       \\
    }                                                                               \\
    /* The training forward in three steps (a parallel loop each, then one for the  \\
       next): cdl_bn_fwd_sums (one group of images, channels [c0, c0 + nc)),        \\
       cdl_bn_fwd_coef (blocks of channels), cdl_bn_fwd_apply (one image,     \\
       channels [c0, c0 + nc)). Splitting by images keeps each thread on the        \\
       images whose convolution output its core wrote, as the convolutions split    \\
       them. s1, s2: [groups][C]; kf: the shifts (each channel's first value);      \\
       ke: kf spread over each channel's L positions (channels shorter than         \\
       CDL_BN_RUN, else unused); tile: 2 * CDL_BN_TILE doubles of the thread's. */  \\
    static void cdl_bn_fwd_sums_##SFX(const T *x, Py_ssize_t N, Py_ssize_t C,       \\
            Py_ssize_t L, Py_ssize_t gi, Py_ssize_t c0, Py_ssize_t nc, const T *kf, \\
            const T *ke, double *s1, double *s2, double *tile) {                    \\
        const Py_ssize_t CL = C * L, n0 = gi * CDL_BN_GROUP;                        \\
        const Py_ssize_t nr = N - n0 < CDL_BN_GROUP ? N - n0 : CDL_BN_GROUP;        \\
        const T *xb = x + n0 * CL;                                                  \\
        double *t1 = tile, *t2 = tile + CDL_BN_TILE;                                \\
        Py_ssize_t c, n, o = gi * C;                                                \\
        if (L >= CDL_BN_RUN) {                                                      \\
            for (c = c0; c < c0 + nc; c++)                                          \\
                cdl_bn_csum2_##SFX(xb + c * L, CL, nr, L, kf[c], s1 + o + c, s2 + o + c);\\
            return;                                                                 \\
        }                                                                           \\
        /* short channels: gi is 0 and one item runs every group (G is 1) */        \\
        memset(t1, 0, (size_t)(nc * L) * sizeof(double));                           \\
        memset(t2, 0, (size_t)(nc * L) * sizeof(double));                           \\
        for (n = 0; n < N; n += CDL_BN_GROUP)                                       \\
            cdl_bn_tsum2_##SFX(x + n * CL + c0 * L, CL, N - n < CDL_BN_GROUP ?      \\
                               N - n : CDL_BN_GROUP, nc * L, ke + c0 * L, t1, t2);  \\
        for (c = 0; c < nc; c++) {                                                  \\
            s1[c0 + c] = cdl_bn_fold_total(t1 + c * L, L);                          \\
            s2[c0 + c] = cdl_bn_fold_total(t2 + c * L, L);                          \\
        }                                                                           \\
    }                                                                               \\
    /* Channels [c0, c0 + nc)' statistics from the group sums (in group order);   \\
       mf, sf, bf: the                                                              \\
       normalisation's per-channel mean, scale (invstd * w) and shift (b) as T;     \\
       me, se, be: the same spread over L positions (CDL_BN_RUN > L only). */       \\
    static void cdl_bn_fwd_coef_##SFX(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,     \\
            Py_ssize_t G, const double *s1, const double *s2, const T *kf,          \\
            const T *w, const T *b, T *mean_out, T *invstd_out, T *rm, T *rv,       \\
            double momentum, double eps, T *mf, T *sf, T *bf, T *me, T *se, T *be,  \\
            Py_ssize_t c0, Py_ssize_t nc) {                                         \\
        const Py_ssize_t M = N * L;                                                 \\
        Py_ssize_t c, gi;                                                           \\
        for (c = c0; c < c0 + nc; c++) {                                            \\
            double a = 0.0, q = 0.0, mu, ssq, var, is, wc, bc;                      \\
            for (gi = 0; gi < G; gi++) {                                            \\
                a += s1[gi * C + c];                                                \\
                q += s2[gi * C + c];                                                \\
            }                                                                       \\
            mu = (double)kf[c] + a / (double)M;                                     \\
            ssq = q - a * (a / (double)M);                                          \\
            /* rounding can leave a constant channel just below 0 (NaN stays) */    \\
            if (!(ssq > 0.0) && ssq == ssq) ssq = 0.0;                              \\
            var = ssq / (double)M;                                                  \\
            is = 1.0 / sqrt(var + eps);                                             \\
            wc = w ? (double)w[c] : 1.0;                                            \\
            bc = b ? (double)b[c] : 0.0;                                            \\
            mean_out[c] = (T)mu;                                                    \\
            invstd_out[c] = (T)is;                                                  \\
            if (rm) rm[c] = (T)(momentum * mu + (1.0 - momentum) * (double)rm[c]);  \\
            if (rv) rv[c] = (T)(momentum * (ssq / (double)(M - 1))                  \\
                                + (1.0 - momentum) * (double)rv[c]);                \\
            mf[c] = (T)mu;                                                          \\
            sf[c] = (T)(is * wc);                                                   \\
            bf[c] = (T)bc;                                                          \\
        }                                                                           \\
        if (L < CDL_BN_RUN) {                                                       \\
            cdl_bn_spread_##SFX(me + c0 * L, mf + c0, nc, L);                       \\
            cdl_bn_spread_##SFX(se + c0 * L, sf + c0, nc, L);                       \\
            cdl_bn_spread_##SFX(be + c0 * L, bf + c0, nc, L);                       \\
        }                                                                           \\
    }                                                                               \\
    /* Image n's channels [c0, c0 + nc): y = the normalised x (+ res, then the      \\
       ReLU), or pooled into pout, pind (planes of L <= CDL_BN_TILE cells, rows     \\
       of W; tmp: L T's where the pool is not vectorised). */                       \\
    static void cdl_bn_fwd_apply_##SFX(const T *x, T *y, const T *res, Py_ssize_t C,\\
            Py_ssize_t L, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t nc, const T *mf,  \\
            const T *sf, const T *bf, const T *me, const T *se, const T *be,        \\
            int relu, T *pout, int *pind, Py_ssize_t W, T *tmp) {                   \\
        const Py_ssize_t CL = C * L;                                                \\
        Py_ssize_t c;                                                               \\
        if (pout) {                                                                 \\
            const Py_ssize_t OH = L / W / 2, OW = W / 2, P = OH * OW;               \\
            for (c = c0; c < c0 + nc; c++) {                                        \\
                const Py_ssize_t o = (n * C + c) * P;                               \\
                const T *xp = x + n * CL + c * L;                                   \\
                if (cdl_bn_normpool2_vec_##SFX(xp, W, OH, OW, mf[c], sf[c], bf[c],  \\
                                               relu, pout + o, pind + o))           \\
                    continue;                                                       \\
                cdl_bn_norm_##SFX(tmp, xp, NULL, mf[c], sf[c], bf[c], L, relu);     \\
                cdl_bn_pool2_##SFX(tmp, W, OH, OW, pout + o, pind + o);             \\
            }                                                                       \\
        } else if (L >= CDL_BN_RUN) {                                               \\
            for (c = c0; c < c0 + nc; c++) {                                        \\
                const Py_ssize_t o = n * CL + c * L;                                \\
                cdl_bn_norm_##SFX(y + o, x + o, res ? res + o : NULL, mf[c], sf[c], \\
                                  bf[c], L, relu);                                  \\
            }                                                                       \\
        } else {                                                                    \\
            const Py_ssize_t o = n * CL + c0 * L;                                   \\
            cdl_bn_norm_v_##SFX(y + o, x + o, res ? res + o : NULL, me + c0 * L,    \\
                                se + c0 * L, be + c0 * L, nc * L, relu);            \\
        }                                                                           \\
    }                                                                               \\
                                                                                    \\
    /* The backward in the same three steps. y: the forward output (relu) or        \\
       NULL. With pind (a pooled forward), g and y are the pool's (N, C, L/4)       \\
       gradient and output: cdl_bn_bwd_sums unpools the group's planes into dx      \\
       (or, with no dx, into planes: 4 * L T's of the thread's) and sums those,     \\
       and cdl_bn_bwd_apply turns dx into the input gradient in place. Returns      \\
       how many indices lay outside their window. ms (channels of CDL_BN_RUN or     \\
       more, not pooled): the ReLU mask from x, the forward's scale ms and shift    \\
       mb (NULL: 0) instead of from y (one array less to read in both steps). */    \\
    static Py_ssize_t cdl_bn_bwd_sums_##SFX(const T *g, const T *x, const T *y,     \\
            const T *mean_in, T *dx, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,      \\
            Py_ssize_t gi, Py_ssize_t c0, Py_ssize_t nc, const T *mexp,             \\
            const int *pind, Py_ssize_t W, double *sg, double *sgx, double *tile,   \\
            T *planes, const T *ms, const T *mb) {                                  \\
        const Py_ssize_t CL = C * L, n0 = gi * CDL_BN_GROUP;                        \\
        const Py_ssize_t nr = N - n0 < CDL_BN_GROUP ? N - n0 : CDL_BN_GROUP;        \\
        const Py_ssize_t o = gi * C;                                                \\
        double *t1 = tile, *t2 = tile + CDL_BN_TILE;                                \\
        Py_ssize_t c, r, bad = 0;                                                   \\
        if (pind) {                                                                 \\
            const Py_ssize_t OH = L / W / 2, OW = W / 2, P = OH * OW;               \\
            const Py_ssize_t gst = dx ? CL : L;    /* one image's plane to the next */\\
            for (c = c0; c < c0 + nc; c++) {                                        \\
                T *gb = dx ? dx + n0 * CL + c * L : planes;                         \\
                for (r = 0; r < nr; r++) {                                          \\
                    const Py_ssize_t q = ((n0 + r) * C + c) * P;                    \\
                    cdl_bn_unpool2_##SFX(gb + r * gst, g + q, y ? y + q : NULL,     \\
                                         pind + q, W, L, OH, OW, &bad);             \\
                }                                                                   \\
                cdl_bn_cbsum_##SFX(gb, NULL, gst, x + n0 * CL + c * L, CL, nr, L,   \\
                                   mean_in[c], 0, 0, 0, sg + o + c, sgx + o + c);   \\
            }                                                                       \\
        } else if (L >= CDL_BN_RUN) {                                               \\
            for (c = c0; c < c0 + nc; c++) {                                        \\
                const Py_ssize_t q = n0 * CL + c * L;                               \\
                if (ms)                                                             \\
                    cdl_bn_cbsum_##SFX(g + q, NULL, CL, x + q, CL, nr, L, mean_in[c],\\
                                       1, ms[c], mb ? mb[c] : (T)0, sg + o + c,     \\
                                       sgx + o + c);                                \\
                else if (y)                                                         \\
                    cdl_bn_cbsum_##SFX(g + q, y + q, CL, x + q, CL, nr, L, mean_in[c],\\
                                       0, 0, 0, sg + o + c, sgx + o + c);           \\
                else                                                                \\
                    cdl_bn_cbsum_##SFX(g + q, NULL, CL, x + q, CL, nr, L, mean_in[c],\\
                                       0, 0, 0, sg + o + c, sgx + o + c);           \\
            }                                                                       \\
        } else {                                                                    \\
            /* short channels: gi is 0 and one item runs every group (G is 1) */    \\
            Py_ssize_t q;                                                           \\
            memset(t1, 0, (size_t)(nc * L) * sizeof(double));                       \\
            memset(t2, 0, (size_t)(nc * L) * sizeof(double));                       \\
            for (q = c0 * L; q < N * CL; q += CDL_BN_GROUP * CL) {                  \\
                const Py_ssize_t left = N - q / CL;                                 \\
                const Py_ssize_t k = left < CDL_BN_GROUP ? left : CDL_BN_GROUP;     \\
                if (y)                                                              \\
                    cdl_bn_tbsum_##SFX(g + q, y + q, CL, x + q, k, nc * L, mexp + c0 * L,\\
                                       t1, t2);                                     \\
                else                                                                \\
                    cdl_bn_tbsum_##SFX(g + q, NULL, CL, x + q, k, nc * L, mexp + c0 * L,\\
                                       t1, t2);                                     \\
            }                                                                       \\
            for (c = 0; c < nc; c++) {                                              \\
                sg[c0 + c] = cdl_bn_fold_total(t1 + c * L, L);                      \\
                sgx[c0 + c] = cdl_bn_fold_total(t2 + c * L, L);                     \\
            }                                                                       \\
        }                                                                           \\
        return bad;                                                                 \\
    }                                                                               \\
    /* Parameter gradients (dw, db may be NULL) and dx's coefficients:              \\
       dx = ((g - gf) - (x - mean) * kf) * cf, spread over L positions into         \\
       ke, ge, ce when CDL_BN_RUN > L (the caller spread the mean for the           \\
       sums). */                                                                    \\
    static void cdl_bn_bwd_coef_##SFX(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,     \\
            Py_ssize_t G, const double *sg, const double *sgx, const T *w,          \\
            const T *invstd_in, T *dw, T *db, T *kf, T *gf, T *cf, T *ke, T *ge,    \\
            T *ce, Py_ssize_t c0, Py_ssize_t nc) {                                  \\
        const Py_ssize_t M = N * L;                                                 \\
        Py_ssize_t c, gi;                                                           \\
        for (c = c0; c < c0 + nc; c++) {                                            \\
            double a = 0.0, bx = 0.0;                                               \\
            double is = (double)invstd_in[c], wc = w ? (double)w[c] : 1.0;          \\
            for (gi = 0; gi < G; gi++) {                                            \\
                a += sg[gi * C + c];                                                \\
                bx += sgx[gi * C + c];                                              \\
            }                                                                       \\
            if (db) db[c] = (T)a;                                                   \\
            if (dw) dw[c] = (T)(bx * is);                                           \\
            kf[c] = (T)(bx * is * is / (double)M);                                  \\
            gf[c] = (T)(a / (double)M);                                             \\
            cf[c] = (T)(is * wc);                                                   \\
        }                                                                           \\
        if (L < CDL_BN_RUN) {                                                       \\
            cdl_bn_spread_##SFX(ke + c0 * L, kf + c0, nc, L);                       \\
            cdl_bn_spread_##SFX(ge + c0 * L, gf + c0, nc, L);                       \\
            cdl_bn_spread_##SFX(ce + c0 * L, cf + c0, nc, L);                       \\
        }                                                                           \\
    }                                                                               \\
    /* Image n's channels [c0, c0 + nc) of dx (in place on the unpooled gradient    \\
       when pooled). */                                                             \\
    static void cdl_bn_bwd_apply_##SFX(const T *g, const T *x, const T *y, T *dx,   \\
            Py_ssize_t C, Py_ssize_t L, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t nc, \\
            const T *mf, const T *kf, const T *gf, const T *cf, const T *me,        \\
            const T *ke, const T *ge, const T *ce, int pooled, const T *ms,         \\
            const T *mb) {                                                          \\
        const Py_ssize_t CL = C * L;                                                \\
        Py_ssize_t c;                                                               \\
        if (pooled) {                                                               \\
            for (c = c0; c < c0 + nc; c++) {                                        \\
                const Py_ssize_t q = n * CL + c * L;                                \\
                cdl_bn_dx_##SFX(dx + q, dx + q, x + q, NULL, mf[c], kf[c], gf[c], cf[c], L);\\
            }                                                                       \\
        } else if (L >= CDL_BN_RUN && ms) {                                         \\
            for (c = c0; c < c0 + nc; c++) {                                        \\
                const Py_ssize_t q = n * CL + c * L;                                \\
                cdl_bn_dxr_##SFX(dx + q, g + q, x + q, mf[c], kf[c], gf[c], cf[c],  \\
                                 ms[c], mb ? mb[c] : (T)0, L);                      \\
            }                                                                       \\
        } else if (L >= CDL_BN_RUN) {                                               \\
            for (c = c0; c < c0 + nc; c++) {                                        \\
                const Py_ssize_t q = n * CL + c * L;                                \\
                cdl_bn_dx_##SFX(dx + q, g + q, x + q, y ? y + q : NULL, mf[c], kf[c],\\
                                gf[c], cf[c], L);                                   \\
            }                                                                       \\
        } else {                                                                    \\
            const Py_ssize_t q = n * CL + c0 * L;                                   \\
            cdl_bn_dx_v_##SFX(dx + q, g + q, x + q, y ? y + q : NULL, me + c0 * L,  \\
                              ke + c0 * L, ge + c0 * L, ce + c0 * L, nc * L);       \\
        }                                                                           \\
    }                                                                               \\
    /* Eval: y = x * scale[c] + shift[c] over channels [c0, c0 + nc). */            \\
    static void cdl_bn_eval_block_##SFX(const T *x, T *y, const T *scale, const T *shift, \\
            Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c0, Py_ssize_t nc, \\
            int relu, double *ws) {                                                 \\
        const Py_ssize_t CL = C * L, off = c0 * L, S = nc * L;                      \\
        Py_ssize_t n, c;                                                            \\
        if (L >= CDL_BN_RUN) {                                                      \\
            for (n = 0; n < N; n++)                                                 \\
                for (c = 0; c < nc; c++)                                            \\
                    cdl_bn_affine_##SFX(y + off + n * CL + c * L, x + off + n * CL + c * L, \\
                                        scale[c0 + c], shift[c0 + c], L, relu);     \\
        } else {                                                                    \\
            T *se = (T *)ws, *be = (T *)(ws + CDL_BN_TILE);                         \\
            cdl_bn_spread_##SFX(se, scale + c0, nc, L);                             \\
            cdl_bn_spread_##SFX(be, shift + c0, nc, L);                             \\
            for (n = 0; n < N; n++)                                                 \\
                cdl_bn_affine_v_##SFX(y + off + n * CL, x + off + n * CL, se, be, S, relu); \\
        }                                                                           \\
    }
    CDL_BN_KERNELS(f, float, uint32_t)
    CDL_BN_KERNELS(d, double, uint64_t)
    """
    Py_ssize_t CDL_BN_TILE
    Py_ssize_t CDL_BN_RUN
    Py_ssize_t CDL_BN_GROUP
    Py_ssize_t CDL_BN_WS
    void cdl_bn_fwd_sums_f(const float* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                              Py_ssize_t gi, Py_ssize_t c0, Py_ssize_t nc, const float* kf,
                              const float* ke, double* s1, double* s2, double* tile) noexcept nogil
    void cdl_bn_fwd_coef_f(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t G,
                              const double* s1, const double* s2, const float* kf, const float* w,
                              const float* b, float* mean_out, float* invstd_out, float* rm, float* rv,
                              double momentum, double eps, float* mf, float* sf, float* bf, float* me,
                              float* se, float* be, Py_ssize_t c0, Py_ssize_t nc) noexcept nogil
    void cdl_bn_fwd_apply_f(const float* x, float* y, const float* res, Py_ssize_t C,
                               Py_ssize_t L, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t nc,
                               const float* mf, const float* sf, const float* bf, const float* me,
                               const float* se, const float* be, int relu, float* pout, int* pind,
                               Py_ssize_t W, float* tmp) noexcept nogil
    Py_ssize_t cdl_bn_bwd_sums_f(const float* g, const float* x, const float* y,
                                    const float* mean_in, float* dx, Py_ssize_t N, Py_ssize_t C,
                                    Py_ssize_t L, Py_ssize_t gi, Py_ssize_t c0, Py_ssize_t nc,
                                    const float* mexp, const int* pind, Py_ssize_t W,
                                    double* sg, double* sgx, double* tile,
                                    float* planes, const float* ms, const float* mb) noexcept nogil
    void cdl_bn_bwd_coef_f(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t G,
                              const double* sg, const double* sgx, const float* w,
                              const float* invstd_in, float* dw, float* db, float* kf, float* gf,
                              float* cf, float* ke, float* ge, float* ce, Py_ssize_t c0,
                              Py_ssize_t nc) noexcept nogil
    void cdl_bn_bwd_apply_f(const float* g, const float* x, const float* y, float* dx,
                               Py_ssize_t C, Py_ssize_t L, Py_ssize_t n, Py_ssize_t c0,
                               Py_ssize_t nc, const float* mf, const float* kf, const float* gf,
                               const float* cf, const float* me, const float* ke, const float* ge,
                               const float* ce, int pooled, const float* ms,
                               const float* mb) noexcept nogil
    void cdl_bn_fwd_sums_d(const double* x, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                              Py_ssize_t gi, Py_ssize_t c0, Py_ssize_t nc, const double* kf,
                              const double* ke, double* s1, double* s2, double* tile) noexcept nogil
    void cdl_bn_fwd_coef_d(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t G,
                              const double* s1, const double* s2, const double* kf, const double* w,
                              const double* b, double* mean_out, double* invstd_out, double* rm, double* rv,
                              double momentum, double eps, double* mf, double* sf, double* bf, double* me,
                              double* se, double* be, Py_ssize_t c0, Py_ssize_t nc) noexcept nogil
    void cdl_bn_fwd_apply_d(const double* x, double* y, const double* res, Py_ssize_t C,
                               Py_ssize_t L, Py_ssize_t n, Py_ssize_t c0, Py_ssize_t nc,
                               const double* mf, const double* sf, const double* bf, const double* me,
                               const double* se, const double* be, int relu, double* pout, int* pind,
                               Py_ssize_t W, double* tmp) noexcept nogil
    Py_ssize_t cdl_bn_bwd_sums_d(const double* g, const double* x, const double* y,
                                    const double* mean_in, double* dx, Py_ssize_t N, Py_ssize_t C,
                                    Py_ssize_t L, Py_ssize_t gi, Py_ssize_t c0, Py_ssize_t nc,
                                    const double* mexp, const int* pind, Py_ssize_t W,
                                    double* sg, double* sgx, double* tile,
                                    double* planes, const double* ms, const double* mb) noexcept nogil
    void cdl_bn_bwd_coef_d(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t G,
                              const double* sg, const double* sgx, const double* w,
                              const double* invstd_in, double* dw, double* db, double* kf, double* gf,
                              double* cf, double* ke, double* ge, double* ce, Py_ssize_t c0,
                              Py_ssize_t nc) noexcept nogil
    void cdl_bn_bwd_apply_d(const double* g, const double* x, const double* y, double* dx,
                               Py_ssize_t C, Py_ssize_t L, Py_ssize_t n, Py_ssize_t c0,
                               Py_ssize_t nc, const double* mf, const double* kf, const double* gf,
                               const double* cf, const double* me, const double* ke, const double* ge,
                               const double* ce, int pooled, const double* ms,
                               const double* mb) noexcept nogil
    void cdl_bn_eval_block_f(const float* x, float* y, const float* scale, const float* shift,
                             Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c0,
                             Py_ssize_t nc, int relu, double* ws) noexcept nogil
    void cdl_bn_eval_block_d(const double* x, double* y, const double* scale, const double* shift,
                             Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c0,
                             Py_ssize_t nc, int relu, double* ws) noexcept nogil


# The plane sizes (cells) a pooled training pass takes.
POOLED_PLANE_MIN = CDL_BN_RUN
POOLED_PLANE_MAX = CDL_BN_TILE

# Below this many elements one thread runs the call (a second costs more than it saves).
cdef Py_ssize_t PARALLEL_MIN_ELEMENTS = 1 << 15
# From this many channels a training pass's per-channel statistics (a square root and
# divisions each) run on every thread.
cdef Py_ssize_t COEF_PARALLEL_MIN_CHANNELS = 1024


cdef inline int _threads(Py_ssize_t work, int num_threads) noexcept nogil:
    if num_threads < 1:
        return 1
    return num_threads if work >= PARALLEL_MIN_ELEMENTS else 1


cdef inline Py_ssize_t _block_channels(Py_ssize_t C, Py_ssize_t L, int nt) noexcept nogil:
    """The eval pass's channels per block: one for planes (L >= CDL_BN_RUN), whose
    loops run channel by channel anyway (blocks of several made threads write the
    cache lines where their blocks meet at the same time); else as many as fit a
    tile but no more than a thread's share, so every thread gets a block."""
    cdef Py_ssize_t cb, share
    if L >= CDL_BN_RUN:
        return 1
    cb = CDL_BN_TILE // L
    share = (C + nt - 1) // nt
    return max(1, min(cb, share))


cdef inline Py_ssize_t _ws_stride() noexcept nogil:
    # Whole cache lines plus one spare, so threads never share a line.
    return (CDL_BN_WS + 7) // 8 * 8 + 8


cdef struct _Split:
    Py_ssize_t G, nbA, cbA, itemsA, nbC, cbC, itemsC


cdef inline void _split(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, int nt,
                        _Split* s) noexcept nogil:
    """A training pass's work items: its sums by (group of CDL_BN_GROUP images,
    block of channels), its elementwise pass by (image, block of channels), both
    image-major. With static schedules each thread then takes the same images in
    both loops, the ones the convolutions' static split gave its core, so it reads
    what its own cache holds. Channels are split only as far as it takes to give
    every thread an item. Below CDL_BN_RUN both loops run blocks of channels (that fit
    a tile) over every image instead. No split changes a result."""
    cdef Py_ssize_t nb
    # channels shorter than CDL_BN_RUN: one item runs all groups of its channels
    s.G = (N + CDL_BN_GROUP - 1) // CDL_BN_GROUP if L >= CDL_BN_RUN else 1
    nb = max(1, min(C, (nt + s.G - 1) // s.G))
    s.cbA = (C + nb - 1) // nb
    if L < CDL_BN_RUN:
        s.cbA = max(1, min(s.cbA, CDL_BN_TILE // L))
    s.nbA = (C + s.cbA - 1) // s.cbA
    s.itemsA = s.G * s.nbA
    if L < CDL_BN_RUN:
        # short channels: the elementwise pass by the same blocks, over every image
        # (a thread's block is still in its cache from the sums)
        s.cbC, s.nbC, s.itemsC = s.cbA, s.nbA, s.nbA
        return
    nb = max(1, min(C, (nt + N - 1) // N))
    s.cbC = (C + nb - 1) // nb
    s.nbC = (C + s.cbC - 1) // s.cbC
    s.itemsC = N * s.nbC


cdef inline Py_ssize_t _train_stride() noexcept nogil:
    # A thread's doubles: 2 tiles of sums, then 4 planes of T; whole cache lines
    # plus one spare, so threads never share a line.
    return (6 * CDL_BN_TILE + 7) // 8 * 8 + 8


cdef inline size_t _train_bytes(int nt, Py_ssize_t G, Py_ssize_t C, Py_ssize_t L,
                                int per_channel, int spread, size_t item) noexcept nogil:
    """A training pass's workspace: the threads' tiles, two [G][C] double arrays,
    per_channel arrays of C T's and, below CDL_BN_RUN, spread arrays of C * L."""
    cdef size_t n = (nt * _train_stride() + 2 * G * C) * sizeof(double)
    n += per_channel * C * item
    if L < CDL_BN_RUN:
        n += spread * C * L * item
    return n + 64


cdef inline bint _overlaps(const char* a, size_t na, const char* b, size_t nb) noexcept nogil:
    return a < b + nb and b < a + na


cdef inline const floating* _ptr_or_null(const floating[::1] a) noexcept nogil:
    if a is None:
        return NULL
    return &a[0]


cdef inline floating* _wptr_or_null(floating[::1] a) noexcept nogil:
    if a is None:
        return NULL
    return &a[0]


# ---------------------------------------------------------------- training forward

cdef inline tuple _shape3(Py_ssize_t* shape):
    return (shape[0], shape[1], shape[2])


def _check_pool(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t width, pool_shape,
                bint others_match):
    # The pooled path's shapes (the layers choose it only where these hold);
    # others_match: the indices (and the pool's output) have pool_shape too.
    if width <= 0 or L % width or (L // width) % 2 or width % 2 \
            or not CDL_BN_RUN <= L <= CDL_BN_TILE:
        raise ValueError(f"pooled batch norm: planes of {L} cells in rows of {width} must "
                         f"have an even height and width and {CDL_BN_RUN} to "
                         f"{CDL_BN_TILE} cells")
    want = (N, C, L // 4)
    if tuple(pool_shape) != want or not others_match:
        raise ValueError(f"pooled batch norm: the pool's arrays must have shape {want}")


cdef inline bint _reshift(const double* s1, const double* s2, Py_ssize_t G, Py_ssize_t C,
                          Py_ssize_t M, floating* kf) noexcept nogil:
    """Moves the shift kf[c] of each channel whose mean lies more than 4 standard
    deviations from it to the mean (as the group sums give them); True if any moved.
    Depends on the sums only, so on no thread count."""
    cdef Py_ssize_t c, gi
    cdef double a, q, d, v
    cdef bint moved = False
    for c in range(C):
        a = 0.0
        q = 0.0
        for gi in range(G):
            a = a + s1[gi * C + c]
            q = q + s2[gi * C + c]
        d = a / M
        v = q / M - d * d
        if d * d > 16.0 * v and d == d and d * d < INFINITY:
            kf[c] = <floating>(kf[c] + d)
            moved = True
    return moved


cdef int _batchnorm_forward_train(const floating[:, :, ::1] x, const floating[::1] weight,
                                  const floating[::1] bias, floating[:, :, ::1] out,
                                  floating[::1] mean, floating[::1] invstd,
                                  floating[::1] running_mean, floating[::1] running_var,
                                  double momentum, double eps, bint relu,
                                  int num_threads, floating[:, :, ::1] pool_out=None,
                                  int[:, :, ::1] pool_indices=None,
                                  Py_ssize_t width=0,
                                  const floating[:, :, ::1] residual=None,
                                  floating[::1] scale_out=None) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t it, c, gi, n, n0, c0, cbB, attempt, stride = _train_stride()
    cdef int nbB
    cdef int nt, tid
    cdef _Split sp
    cdef char* mem
    cdef double* ws
    cdef double* s1
    cdef double* s2
    cdef floating* kf
    cdef floating* coef
    cdef floating* spread
    cdef floating* sp1
    cdef floating* sp2
    cdef floating* pp = NULL
    cdef int* pi = NULL
    if pool_out is None and (pool_indices is not None or out is None):
        raise ValueError("batch norm: out is needed unless pool_out and pool_indices are given")
    if pool_out is not None:
        _check_pool(N, C, L, width, _shape3(pool_out.shape), pool_indices is not None
                    and _shape3(pool_indices.shape) == _shape3(pool_out.shape))
    if scale_out is not None and scale_out.shape[0] != C:
        raise ValueError(f"batch norm: scale_out has {scale_out.shape[0]} entries for {C} "
                         f"channels")
    if residual is not None and (pool_out is not None or out is None
                                 or _shape3(residual.shape) != _shape3(x.shape)
                                 or _shape3(out.shape) != _shape3(x.shape)):
        raise ValueError(f"batch norm: the residual must have x's shape {_shape3(x.shape)}, "
                         f"as out does, and cannot be pooled")
    if N == 0 or C == 0 or L == 0:
        return 0
    cdef const floating* rp = NULL if residual is None else &residual[0, 0, 0]
    if pool_out is not None:
        pp = &pool_out[0, 0, 0]
        pi = &pool_indices[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = NULL if out is None else &out[0, 0, 0]
    cdef const floating* wp = _ptr_or_null(weight)
    cdef const floating* bp = _ptr_or_null(bias)
    cdef floating* mp = &mean[0]
    cdef floating* ip = &invstd[0]
    cdef floating* rmp = _wptr_or_null(running_mean)
    cdef floating* rvp = _wptr_or_null(running_var)
    nt = _threads(N * C * L, num_threads)
    _split(N, C, L, nt, &sp)
    nt = <int>min(nt, max(sp.itemsA, sp.itemsC))    # no tiles for threads without items
    # the statistics by blocks of channels: on every thread only for many channels
    nbB = nt if C >= COEF_PARALLEL_MIN_CHANNELS else 1
    cbB = (C + nbB - 1) // nbB
    nbB = <int>((C + cbB - 1) // cbB)
    # threads' tiles, then s1, s2 [groups][C], then kf, mf, sf, bf [C] and,
    # below CDL_BN_RUN, ke (the sums' shifts; the statistics write me over it), se, be
    # [C * L]
    mem = <char*>malloc(_train_bytes(nt, sp.G, C, L, 4, 3, sizeof(floating)))
    if mem == NULL:
        raise MemoryError()
    ws = <double*>mem
    s1 = ws + nt * stride
    s2 = s1 + sp.G * C
    kf = <floating*>(s2 + sp.G * C)
    coef = kf + C
    spread = coef + 3 * C
    sp1 = spread + C * L if L < CDL_BN_RUN else NULL
    sp2 = spread + 2 * C * L if L < CDL_BN_RUN else NULL
    if L >= CDL_BN_RUN:
        spread = NULL
    with nogil:
        for c in range(C):
            kf[c] = xp[c * L]
        # The sums, shifted by each channel's first value; again, shifted by the mean,
        # if that value lay more than 4 standard deviations from it (float32's
        # partial sums lose about 1e-7 x (1 + (mean - shift)² / variance) of the
        # variance to cancellation).
        for attempt in range(2):
            if L < CDL_BN_RUN:
                for c in range(C):
                    for it in range(L):
                        spread[c * L + it] = kf[c]
            for it in prange(sp.itemsA, schedule="static", num_threads=min(nt, sp.itemsA)):
                tid = omp_get_thread_num()
                gi = it // sp.nbA
                c0 = (it % sp.nbA) * sp.cbA
                if floating is float:
                    cdl_bn_fwd_sums_f(xp, N, C, L, gi, c0, min(sp.cbA, C - c0), kf, spread,
                                      s1, s2, ws + tid * stride)
                else:
                    cdl_bn_fwd_sums_d(xp, N, C, L, gi, c0, min(sp.cbA, C - c0), kf, spread,
                                      s1, s2, ws + tid * stride)
            if attempt == 1 or not _reshift(s1, s2, sp.G, C, N * L, kf):
                break
        for it in prange(nbB, schedule="static", num_threads=nbB):
            c0 = it * cbB
            if floating is float:
                cdl_bn_fwd_coef_f(N, C, L, sp.G, s1, s2, kf, wp, bp, mp, ip, rmp, rvp,
                                  momentum, eps, coef, coef + C, coef + 2 * C, spread,
                                  sp1, sp2, c0, min(cbB, C - c0))
            else:
                cdl_bn_fwd_coef_d(N, C, L, sp.G, s1, s2, kf, wp, bp, mp, ip, rmp, rvp,
                                  momentum, eps, coef, coef + C, coef + 2 * C, spread,
                                  sp1, sp2, c0, min(cbB, C - c0))
        if scale_out is not None:
            for c in range(C):
                scale_out[c] = coef[C + c]
        for it in prange(sp.itemsC, schedule="static", num_threads=min(nt, sp.itemsC)):
            tid = omp_get_thread_num()
            c0 = (it % sp.nbC) * sp.cbC
            n0 = it // sp.nbC if L >= CDL_BN_RUN else 0
            for n in range(n0, n0 + 1 if L >= CDL_BN_RUN else N):
                if floating is float:
                    cdl_bn_fwd_apply_f(xp, yp, rp, C, L, n, c0, min(sp.cbC, C - c0), coef,
                                       coef + C, coef + 2 * C, spread, sp1, sp2, relu, pp,
                                       pi, width,
                                       <float*>(ws + tid * stride))
                else:
                    cdl_bn_fwd_apply_d(xp, yp, rp, C, L, n, c0, min(sp.cbC, C - c0), coef,
                                       coef + C, coef + 2 * C, spread, sp1, sp2, relu, pp,
                                       pi, width,
                                       <double*>(ws + tid * stride))
    free(mem)
    return 0


def batchnorm_forward_train(const floating[:, :, ::1] x, const floating[::1] weight,
                            const floating[::1] bias, floating[:, :, ::1] out,
                            floating[::1] mean, floating[::1] invstd,
                            floating[::1] running_mean, floating[::1] running_var,
                            double momentum, double eps, bint relu, int num_threads,
                            floating[:, :, ::1] pool_out=None,
                            int[:, :, ::1] pool_indices=None, Py_ssize_t width=0,
                            const floating[:, :, ::1] residual=None,
                            floating[::1] scale_out=None):
    """Training-mode batch norm of x (N, C, L) into out (may be x).

    Fills mean and invstd (C,) with the batch mean and 1/sqrt(var + eps) (kept for
    the backward) and updates running_mean / running_var in place (PyTorch's
    momentum rule, unbiased variance); weight, bias and the running statistics
    may each be None. relu applies max(0, ·) to the output. Needs N*L > 1.

    With pool_out and pool_indices (N, C, L/4) and the planes' width (L = H * W,
    H and W even, CDL_BN_RUN <= L <= CDL_BN_TILE): a 2x2 stride-2 max-pool of the
    result instead, with its argmax indices, bitwise max_pool2d_forward of the
    unpooled output; out is not written (may be None). Each plane is pooled as it
    is normalised (float32 on AVX-512 and AVX2; elsewhere through a per-thread buffer), so
    no full-size output is stored.

    With residual (N, C, L; not pooled): out = the normalised value (rounded) +
    residual, then the ReLU, bitwise the batch norm followed by add(..., relu) (a
    Residual's join in one pass). out may be residual.

    scale_out (C,), if given, receives the normalisation's per-channel scale as the
    output was computed with it (invstd · weight rounded once from double), which
    batchnorm_backward can take to rebuild the ReLU's mask from x.
    """
    _batchnorm_forward_train(x, weight, bias, out, mean, invstd, running_mean, running_var,
                             momentum, eps, relu, num_threads, pool_out, pool_indices, width,
                             residual, scale_out)


# ---------------------------------------------------------------- backward

cdef Py_ssize_t _batchnorm_backward(const floating[:, :, ::1] grad_out, const floating[:, :, ::1] x,
                             const floating[:, :, ::1] out, const floating[::1] weight,
                                    const floating[::1] mean, const floating[::1] invstd,
                                    floating[:, :, ::1] grad_input,
                                    floating[::1] grad_weight, floating[::1] grad_bias,
                                    bint relu, int num_threads,
                             const int[:, :, ::1] pool_indices=None,
                             Py_ssize_t width=0, const floating[::1] scale=None,
                             const floating[::1] shift=None) except -1:
    # Returns how many pool indices lay outside their window (0 unpooled).
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef size_t cells, n
    cdef const char* d
    cdef Py_ssize_t it, c, gi, im, n0, c0, cbB, stride = _train_stride(), bad = 0
    cdef int nbB
    cdef int nt, tid
    cdef _Split sp
    cdef char* mem
    cdef double* ws
    cdef double* sg
    cdef double* sgx
    cdef floating* coef
    cdef floating* spread
    cdef floating* sp1
    cdef floating* sp2
    cdef floating* sp3
    cdef const int* pi = NULL
    if pool_indices is not None:
        _check_pool(N, C, L, width, _shape3(grad_out.shape),
                    _shape3(pool_indices.shape) == _shape3(grad_out.shape)
                    and (not relu or _shape3(out.shape) == _shape3(grad_out.shape)))
    if C == 0:
        return 0
    if N == 0 or L == 0:
        # No elements: the parameter gradients are empty sums.
        for c0 in range(C):
            if grad_weight is not None:
                grad_weight[c0] = 0
            if grad_bias is not None:
                grad_bias[c0] = 0
        return 0
    if pool_indices is not None and grad_input is not None:
        # The unpooled gradient is staged in grad_input before the inputs are read.
        cells = N * C * L                 # of x and dx; the pool's arrays have a quarter
        n = cells * sizeof(floating)
        d = <const char*>&grad_input[0, 0, 0]
        if _overlaps(d, n, <const char*>&x[0, 0, 0], n) \
                or _overlaps(d, n, <const char*>&grad_out[0, 0, 0], n // 4) \
                or (relu and _overlaps(d, n, <const char*>&out[0, 0, 0], n // 4)) \
                or _overlaps(d, n, <const char*>&pool_indices[0, 0, 0],
                             cells // 4 * sizeof(int)):
            raise ValueError("pooled batch norm backward: grad_input must not overlap "
                             "grad_out, x, out or pool_indices")
    nt = _threads(N * C * L, num_threads)
    _split(N, C, L, nt, &sp)
    nt = <int>min(nt, max(sp.itemsA, sp.itemsC))    # no tiles for threads without items
    # the statistics by blocks of channels: on every thread only for many channels
    nbB = nt if C >= COEF_PARALLEL_MIN_CHANNELS else 1
    cbB = (C + nbB - 1) // nbB
    nbB = <int>((C + cbB - 1) // cbB)
    cdef const floating* gp = &grad_out[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef const floating* yp = &out[0, 0, 0] if relu else NULL
    # The ReLU's mask rebuilt from x with the forward's scale and shift (planes, not
    # pooled) instead of read from out: one array less to read in both steps.
    cdef const floating* msp = NULL
    cdef const floating* mbp = NULL
    if relu and scale is not None and pool_indices is None and L >= CDL_BN_RUN:
        if scale.shape[0] != C or (shift is not None and shift.shape[0] != C):
            raise ValueError(f"batch norm backward: scale and shift need {C} entries")
        msp = &scale[0]
        mbp = _ptr_or_null(shift)
        yp = NULL
    cdef const floating* wp = _ptr_or_null(weight)
    cdef const floating* mp = &mean[0]
    cdef const floating* ip = &invstd[0]
    cdef floating* dxp = NULL if grad_input is None else &grad_input[0, 0, 0]
    cdef floating* dwp = _wptr_or_null(grad_weight)
    cdef floating* dbp = _wptr_or_null(grad_bias)
    cdef int pooled = pool_indices is not None
    if pooled:
        pi = &pool_indices[0, 0, 0]
    # threads' tiles, then sg, sgx [groups][C], then kf, gf, cf [C] and, below
    # CDL_BN_RUN, the mean (read by the sums and dx), ke, ge, ce spread [C * L]
    mem = <char*>malloc(_train_bytes(nt, sp.G, C, L, 3, 4, sizeof(floating)))
    if mem == NULL:
        raise MemoryError()
    ws = <double*>mem
    sg = ws + nt * stride
    sgx = sg + sp.G * C
    coef = <floating*>(sgx + sp.G * C)
    spread = coef + 3 * C
    sp1 = spread + C * L if L < CDL_BN_RUN else NULL
    sp2 = spread + 2 * C * L if L < CDL_BN_RUN else NULL
    sp3 = spread + 3 * C * L if L < CDL_BN_RUN else NULL
    if L >= CDL_BN_RUN:
        spread = NULL
    with nogil:
        if L < CDL_BN_RUN:
            for c in range(C):
                for it in range(L):
                    spread[c * L + it] = mp[c]
        for it in prange(sp.itemsA, schedule="static", num_threads=min(nt, sp.itemsA)):
            tid = omp_get_thread_num()
            gi = it // sp.nbA
            c0 = (it % sp.nbA) * sp.cbA
            if floating is float:
                bad += cdl_bn_bwd_sums_f(gp, xp, yp, mp, dxp, N, C, L, gi, c0,
                                         min(sp.cbA, C - c0), spread, pi, width, sg, sgx,
                                         ws + tid * stride,
                                         <float*>(ws + tid * stride + 2 * CDL_BN_TILE),
                                         msp, mbp)
            else:
                bad += cdl_bn_bwd_sums_d(gp, xp, yp, mp, dxp, N, C, L, gi, c0,
                                         min(sp.cbA, C - c0), spread, pi, width, sg, sgx,
                                         ws + tid * stride,
                                         <double*>(ws + tid * stride + 2 * CDL_BN_TILE),
                                         msp, mbp)
        for it in prange(nbB, schedule="static", num_threads=nbB):
            c0 = it * cbB
            if floating is float:
                cdl_bn_bwd_coef_f(N, C, L, sp.G, sg, sgx, wp, ip, dwp, dbp, coef, coef + C,
                                  coef + 2 * C, sp1, sp2, sp3, c0, min(cbB, C - c0))
            else:
                cdl_bn_bwd_coef_d(N, C, L, sp.G, sg, sgx, wp, ip, dwp, dbp, coef, coef + C,
                                  coef + 2 * C, sp1, sp2, sp3, c0, min(cbB, C - c0))
        if dxp != NULL:
            for it in prange(sp.itemsC, schedule="static", num_threads=min(nt, sp.itemsC)):
                c0 = (it % sp.nbC) * sp.cbC
                n0 = it // sp.nbC if L >= CDL_BN_RUN else 0
                for im in range(n0, n0 + 1 if L >= CDL_BN_RUN else N):
                    if floating is float:
                        cdl_bn_bwd_apply_f(gp, xp, yp, dxp, C, L, im, c0, min(sp.cbC, C - c0),
                                           mp, coef, coef + C, coef + 2 * C,
                                           spread, sp1, sp2, sp3, pooled, msp, mbp)
                    else:
                        cdl_bn_bwd_apply_d(gp, xp, yp, dxp, C, L, im, c0, min(sp.cbC, C - c0),
                                           mp, coef, coef + C, coef + 2 * C,
                                           spread, sp1, sp2, sp3, pooled, msp, mbp)
    free(mem)
    return bad


def batchnorm_backward(const floating[:, :, ::1] grad_out, const floating[:, :, ::1] x,
                       const floating[:, :, ::1] out, const floating[::1] weight,
                       const floating[::1] mean, const floating[::1] invstd,
                       floating[:, :, ::1] grad_input, floating[::1] grad_weight,
                       floating[::1] grad_bias, bint relu, int num_threads,
                       const int[:, :, ::1] pool_indices=None, Py_ssize_t width=0,
                       const floating[::1] scale=None, const floating[::1] shift=None):
    """Gradients of batchnorm_forward_train given grad_out (N, C, L).

    mean / invstd are the forward's; out (the forward output) is read only with
    relu (the gradient is 0 where out <= 0). grad_input (may be grad_out) may be
    None (parameter gradients only); weight (None: 1), grad_weight and grad_bias
    may be None. grad_weight = Σ g·x̂, grad_bias = Σ g, overwritten (not added to).

    With pool_indices (the pooled forward's) and width: grad_out and out are the
    pool's (N, C, L/4) gradient and output; bitwise the gradients of the unpooled
    pass given max_pool2d_backward's input gradient; grad_input then must not
    overlap grad_out, x, out or pool_indices (it holds the unpooled gradient in
    between; ValueError otherwise). Returns how many indices lay outside their
    2x2 window (skipped; 0 for indices the forward made).

    With relu, scale (the forward's scale_out) and shift (its bias; None: 0), the
    ReLU's mask of planes (L >= CDL_BN_RUN, not pooled) is rebuilt from x as the
    forward computed the output, bit for bit the mask read from out, which is then
    not read.
    """
    return _batchnorm_backward(grad_out, x, out, weight, mean, invstd, grad_input,
                               grad_weight, grad_bias, relu, num_threads, pool_indices, width,
                               scale, shift)


# ---------------------------------------------------------------- eval

cdef int _batchnorm_forward_eval(const floating[:, :, ::1] x, const floating[::1] scale,
                                 const floating[::1] shift, floating[:, :, ::1] out, bint relu,
                                 int num_threads) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t cb, nblocks, blk, c0, stride = _ws_stride()
    cdef int nt
    cdef double* ws
    if N == 0 or C == 0 or L == 0:
        return 0
    nt = _threads(N * C * L, num_threads)
    cb = _block_channels(C, L, nt)
    nblocks = (C + cb - 1) // cb
    if nt > nblocks:
        nt = <int>nblocks
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = &out[0, 0, 0]
    cdef const floating* sp = &scale[0]
    cdef const floating* hp = &shift[0]
    ws = <double*>malloc(nt * stride * sizeof(double))
    if ws == NULL:
        raise MemoryError()
    with nogil:
        for blk in prange(nblocks, schedule="static", num_threads=nt):
            c0 = blk * cb
            if floating is float:
                cdl_bn_eval_block_f(xp, yp, sp, hp, N, C, L, c0, min(cb, C - c0), relu,
                                    ws + omp_get_thread_num() * stride)
            else:
                cdl_bn_eval_block_d(xp, yp, sp, hp, N, C, L, c0, min(cb, C - c0), relu,
                                    ws + omp_get_thread_num() * stride)
    free(ws)
    return 0


def batchnorm_forward_eval(const floating[:, :, ::1] x, const floating[::1] scale,
                           const floating[::1] shift, floating[:, :, ::1] out, bint relu,
                           int num_threads):
    """Inference batch norm: out = x · scale[c] + shift[c] (then max(0, ·) with relu);
    out may be x. scale and shift come from batchnorm_eval_coefficients."""
    _batchnorm_forward_eval(x, scale, shift, out, relu, num_threads)


cdef int _batchnorm_eval_coefficients(const floating[::1] weight, const floating[::1] bias,
                                      const floating[::1] running_mean,
                                      const floating[::1] running_var, double eps,
                                      floating[::1] scale, floating[::1] shift) except -1:
    cdef Py_ssize_t C = running_mean.shape[0], c
    cdef bint has_w = weight is not None, has_b = bias is not None
    cdef double s, w, b
    with nogil:
        for c in range(C):
            w = weight[c] if has_w else 1.0
            b = bias[c] if has_b else 0.0
            s = w / sqrt(<double>running_var[c] + eps)
            scale[c] = <floating>s
            shift[c] = <floating>(b - <double>running_mean[c] * s)
    return 0


def batchnorm_eval_coefficients(weight, bias, const floating[::1] running_mean,
                                const floating[::1] running_var, double eps,
                                floating[::1] scale, floating[::1] shift):
    """scale = w / sqrt(rv + eps), shift = b - rm · scale (in double, then rounded);
    weight (None: 1) and bias (None: 0) may be None."""
    # weight and bias are typed here, not in the signature: Cython picks a fused
    # def's type from its first typed argument, and None there picked float32.
    cdef const floating[::1] w = weight
    cdef const floating[::1] b = bias
    _batchnorm_eval_coefficients(w, b, running_mean, running_var, eps, scale, shift)


cdef int _fold_channel_affine(const floating[:, ::1] weight, const floating[::1] bias,
                              const floating[::1] scale, const floating[::1] shift,
                              floating[:, ::1] w_out, floating[::1] b_out) except -1:
    cdef bint has_bias = bias is not None
    cdef Py_ssize_t k, j, K = weight.shape[0], M = weight.shape[1]
    cdef floating sk
    with nogil:
        for k in range(K):
            sk = scale[k]
            for j in range(M):
                w_out[k, j] = weight[k, j] * sk
            if has_bias:
                # float32: b * scale is exact in double, so an FMA changes nothing
                b_out[k] = <floating>(<double>bias[k] * sk + shift[k])
            else:
                b_out[k] = shift[k]
    return 0


def fold_channel_affine(const floating[:, ::1] weight, bias, const floating[::1] scale,
                        const floating[::1] shift, floating[:, ::1] w_out,
                        floating[::1] b_out):
    """Fold a per-output-channel affine (y * scale + shift) into the layer before it:
    w_out = weight * scale (row k by scale[k]); b_out = bias * scale + shift, in double
    then rounded (bias None: shift). Rows of weight are output channels."""
    cdef const floating[::1] b = bias
    _fold_channel_affine(weight, b, scale, shift, w_out, b_out)


# ---------------------------------------------------------------- bound calls
# A float32 call with its arrays bound once (cdl.model's training plan), so
# ``run`` skips the per-call buffer checks and type dispatch. The input can be
# rebound.

cdef class BatchNormTrainForward:
    """batchnorm_forward_train with bound arrays; x is the (N, C, L) view."""
    cdef const float[:, :, ::1] x
    cdef const float[::1] weight
    cdef const float[::1] bias
    cdef float[:, :, ::1] out
    cdef float[::1] mean
    cdef float[::1] invstd
    cdef float[::1] running_mean
    cdef float[::1] running_var
    cdef double momentum, eps
    cdef bint relu
    cdef float[:, :, ::1] pool_out
    cdef int[:, :, ::1] pool_indices
    cdef Py_ssize_t width
    cdef const float[:, :, ::1] residual
    cdef float[::1] scale_out

    def __init__(self, x, weight, bias, out, mean, invstd, running_mean, running_var,
                 double momentum, double eps, bint relu, pool_out=None, pool_indices=None,
                 Py_ssize_t width=0, residual=None, scale_out=None):
        self.x, self.weight, self.bias, self.out = x, weight, bias, out
        self.mean, self.invstd = mean, invstd
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.relu = momentum, eps, relu
        self.pool_out, self.pool_indices, self.width = pool_out, pool_indices, width
        self.residual = residual
        self.scale_out = scale_out

    def bind_input(self, const float[:, :, ::1] x):
        self.x = x

    def bind_residual(self, const float[:, :, ::1] residual):
        self.residual = residual

    def set_momentum(self, double momentum):
        self.momentum = momentum

    def run(self, int num_threads):
        _batchnorm_forward_train[float](self.x, self.weight, self.bias, self.out, self.mean,
                                        self.invstd, self.running_mean, self.running_var,
                                        self.momentum, self.eps, self.relu, num_threads,
                                        self.pool_out, self.pool_indices, self.width,
                                        self.residual, self.scale_out)


cdef class BatchNormBackward:
    """batchnorm_backward with bound arrays; x is the (N, C, L) view of the input."""
    cdef const float[:, :, ::1] grad_out
    cdef const float[:, :, ::1] x
    cdef const float[:, :, ::1] out
    cdef const float[::1] weight
    cdef const float[::1] mean
    cdef const float[::1] invstd
    cdef float[:, :, ::1] grad_input
    cdef float[::1] grad_weight
    cdef float[::1] grad_bias
    cdef bint relu
    cdef const int[:, :, ::1] pool_indices
    cdef Py_ssize_t width
    cdef const float[::1] scale
    cdef const float[::1] shift

    def __init__(self, grad_out, x, out, weight, mean, invstd, grad_input, grad_weight,
                 grad_bias, bint relu, pool_indices=None, Py_ssize_t width=0, scale=None,
                 shift=None):
        self.grad_out, self.x, self.out, self.weight = grad_out, x, out, weight
        self.mean, self.invstd = mean, invstd
        self.grad_input, self.grad_weight, self.grad_bias = grad_input, grad_weight, grad_bias
        self.relu = relu
        self.pool_indices, self.width = pool_indices, width
        self.scale, self.shift = scale, shift

    def bind_input(self, const float[:, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _batchnorm_backward[float](self.grad_out, self.x, self.out, self.weight, self.mean,
                                   self.invstd, self.grad_input, self.grad_weight,
                                   self.grad_bias, self.relu, num_threads,
                                   self.pool_indices, self.width, self.scale, self.shift)


cdef class BatchNormEvalForward:
    """batchnorm_forward_eval with bound arrays."""
    cdef const float[:, :, ::1] x
    cdef const float[::1] scale
    cdef const float[::1] shift
    cdef float[:, :, ::1] out
    cdef bint relu

    def __init__(self, x, scale, shift, out, bint relu):
        self.x, self.scale, self.shift, self.out, self.relu = x, scale, shift, out, relu

    def bind_input(self, const float[:, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _batchnorm_forward_eval[float](self.x, self.scale, self.shift, self.out, self.relu,
                                       num_threads)


cdef class EvalCoefficients:
    """batchnorm_eval_coefficients with bound arrays (weight and bias may be None)."""
    cdef const float[::1] weight
    cdef const float[::1] bias
    cdef const float[::1] running_mean
    cdef const float[::1] running_var
    cdef float[::1] scale
    cdef float[::1] shift
    cdef double eps

    def __init__(self, weight, bias, running_mean, running_var, double eps, scale, shift):
        self.weight, self.bias = weight, bias
        self.running_mean, self.running_var = running_mean, running_var
        self.eps, self.scale, self.shift = eps, scale, shift

    def run(self):
        _batchnorm_eval_coefficients(self.weight, self.bias, self.running_mean,
                                     self.running_var, self.eps, self.scale, self.shift)


cdef class FoldChannelAffine:
    """fold_channel_affine with bound arrays (bias may be None)."""
    cdef const float[:, ::1] weight
    cdef const float[::1] bias
    cdef const float[::1] scale
    cdef const float[::1] shift
    cdef float[:, ::1] w_out
    cdef float[::1] b_out

    def __init__(self, weight, bias, scale, shift, w_out, b_out):
        self.weight, self.bias, self.scale, self.shift = weight, bias, scale, shift
        self.w_out, self.b_out = w_out, b_out

    def run(self):
        _fold_channel_affine(self.weight, self.bias, self.scale, self.shift, self.w_out,
                             self.b_out)
