# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Batch-normalisation kernels (PyTorch semantics) on x viewed as (N, C, L).

BatchNorm2d on (N, C, H, W) is L = H*W; BatchNorm1d on (N, F) is C = F, L = 1.
Per channel c, over its M = N*L values:
  training   with k = the channel's first value, in one pass, in double:
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
channels are grouped: for each element position l of a channel, the N values
are added in n order into a double (a vectorised column sum over the rows of
the (N, C·L) matrix); those L column sums are then folded into 8 lanes by
l mod 8 and the lanes added pairwise. Channels are dealt to threads in blocks
(one channel, or several short ones whose C·L rows still fit a tile of
CDL_BN_TILE elements), each computed whole by one thread, so results are
bitwise identical for any thread count. A block's data is read twice in
training (the sums, then the output), the second time mostly from cache.

Pooled training pass (a 2x2 stride-2 max-pool after the batch norm, planes of
CDL_BN_RUN..CDL_BN_TILE cells): the forward pools each plane as it normalises
it (AVX-512 and AVX2; elsewhere it normalises the plane into the thread's workspace and
pools it there), writing only the pool's output and indices; the backward
unpools the pool's gradient (masked by the pooled ReLU output) into dx four
planes at a time, sums those rows, and then turns dx into the input gradient in
place. Every result is bitwise that of the batch norm and the max-pool run
apart.

Kernels trust their inputs (shapes, dtypes, C-contiguity, M > 1); the layers
validate. weight and bias may be None (affine=False); so may the running
statistics (track_running_stats=False).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
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
    /* A tile: the column sums of one block (<= CDL_BN_TILE doubles). Shorter
       channels (L < CDL_BN_RUN) use per-element copies of the per-channel
       coefficients so that the loop runs over the whole block, not over runs
       of L. */
    #define CDL_BN_TILE 1024
    #define CDL_BN_RUN 16
    /* Per-thread workspace in doubles: 6 tiles (two accumulators, a double
       mean, 3 per-channel arrays), 4 tiles of coefficients as T, and 4 tiles for
       the pooled pass's four unpooled gradient planes (as T). */
    #define CDL_BN_WS (14 * CDL_BN_TILE + 8)

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
    /* Shifted sums over `rows` rows `st` apart, in row order: s1[j] += x - k,      \\
       s2[j] += (x - k)^2, k = kv[j] when kv is given, else k (kv: channels shorter \\
       than CDL_BN_RUN, one k per element). k is the channel's first value, so the  \\
       variance Σ(x-k)² - (Σ(x-k))²/M loses nothing to cancellation in double unless\\
       a channel's values lie ~1e4 standard deviations from its first one. Four rows\\
       per sweep: the accumulators are loaded and stored once per four. Inlined, so \\
       each call site's kv (NULL or not) is a constant the compiler folds. */       \\
    static inline __attribute__((always_inline)) void cdl_bn_sum2_##SFX(              \\
                                         double *__restrict s1,                     \\
                                         double *__restrict s2,                     \\
                                         const T *x, Py_ssize_t st, Py_ssize_t rows,\\
                                         const double *__restrict kv, double k,     \\
                                         Py_ssize_t n) {                            \\
        Py_ssize_t j;                                                               \\
        for (; rows >= 4; rows -= 4, x += 4 * st) {                                 \\
            const T *x1 = x + st, *x2 = x1 + st, *x3 = x2 + st;                     \\
            for (j = 0; j < n; j++) {                                               \\
                double a = s1[j], q = s2[j], kj = kv ? kv[j] : k, d;                \\
                d = (double)x[j] - kj;  a += d; q += d * d;                         \\
                d = (double)x1[j] - kj; a += d; q += d * d;                         \\
                d = (double)x2[j] - kj; a += d; q += d * d;                         \\
                d = (double)x3[j] - kj; a += d; q += d * d;                         \\
                s1[j] = a; s2[j] = q;                                               \\
            }                                                                       \\
        }                                                                           \\
        for (; rows > 0; rows--, x += st)                                           \\
            for (j = 0; j < n; j++) {                                               \\
                double d = (double)x[j] - (kv ? kv[j] : k);                         \\
                s1[j] += d; s2[j] += d * d;                                         \\
            }                                                                       \\
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
    /* Backward sums over `rows` rows (of g and y `st` apart, of x `xst` apart), four \\
       per sweep in row order: ag += g, agx += g * (x - m), g masked to 0 where     \\
       y <= 0 (if y). */                                                            \\
    static inline T cdl_bn_gmask_##SFX(const T *g, const T *y, Py_ssize_t j) {      \\
        return y ? cdl_bn_pick_##SFX(y[j] <= (T)0, (T)0, g[j]) : g[j];              \\
    }                                                                               \\
    static inline __attribute__((always_inline)) void cdl_bn_bsum_rows_##SFX(         \\
            double *__restrict ag, double *__restrict agx, const T *g, const T *x,  \\
            const T *y, Py_ssize_t st, Py_ssize_t xst, Py_ssize_t rows,             \\
            const double *__restrict mv, double m, Py_ssize_t n) {                  \\
        Py_ssize_t j;                                                               \\
        for (; rows >= 4; rows -= 4, g += 4 * st, x += 4 * xst, y = y ? y + 4 * st : y) { \\
            for (j = 0; j < n; j++) {                                               \\
                double a = ag[j], b = agx[j], mj = mv ? mv[j] : m, gv;              \\
                gv = (double)cdl_bn_gmask_##SFX(g, y, j);                           \\
                a += gv; b += gv * ((double)x[j] - mj);                             \\
                gv = (double)cdl_bn_gmask_##SFX(g + st, y ? y + st : y, j);         \\
                a += gv; b += gv * ((double)x[xst + j] - mj);                       \\
                gv = (double)cdl_bn_gmask_##SFX(g + 2 * st, y ? y + 2 * st : y, j); \\
                a += gv; b += gv * ((double)x[2 * xst + j] - mj);                   \\
                gv = (double)cdl_bn_gmask_##SFX(g + 3 * st, y ? y + 3 * st : y, j); \\
                a += gv; b += gv * ((double)x[3 * xst + j] - mj);                   \\
                ag[j] = a; agx[j] = b;                                              \\
            }                                                                       \\
        }                                                                           \\
        for (; rows > 0; rows--, g += st, x += xst, y = y ? y + st : y)             \\
            for (j = 0; j < n; j++) {                                               \\
                double mj = mv ? mv[j] : m;                                         \\
                double gv = (double)cdl_bn_gmask_##SFX(g, y, j);                    \\
                ag[j] += gv;                                                        \\
                agx[j] += gv * ((double)x[j] - mj);                                 \\
            }                                                                       \\
    }                                                                               \\
    /* The cases as separate loops (y and mv known), each vectorised. */            \\
    static void cdl_bn_bsum_##SFX(double *ag, double *agx, const T *g, const T *x,  \\
                                  const T *y, Py_ssize_t st, Py_ssize_t rows,       \\
                                  double m, Py_ssize_t n) {                         \\
        if (y) cdl_bn_bsum_rows_##SFX(ag, agx, g, x, y, st, st, rows, NULL, m, n);  \\
        else cdl_bn_bsum_rows_##SFX(ag, agx, g, x, NULL, st, st, rows, NULL, m, n); \\
    }                                                                               \\
    static void cdl_bn_bsum_v_##SFX(double *ag, double *agx, const T *g, const T *x, \\
                                    const T *y, Py_ssize_t st, Py_ssize_t rows,     \\
                                    const double *mv, Py_ssize_t n) {               \\
        if (y) cdl_bn_bsum_rows_##SFX(ag, agx, g, x, y, st, st, rows, mv, 0.0, n);  \\
        else cdl_bn_bsum_rows_##SFX(ag, agx, g, x, NULL, st, st, rows, mv, 0.0, n); \\
    }                                                                               \\
    /* Rows of g `st` apart (no mask), of x `xst` apart: the pooled pass's sums. */ \\
    static void cdl_bn_bsum_x_##SFX(double *ag, double *agx, const T *g, Py_ssize_t st, \\
                                    const T *x, Py_ssize_t xst, Py_ssize_t rows,    \\
                                    double m, Py_ssize_t n) {                       \\
        cdl_bn_bsum_rows_##SFX(ag, agx, g, x, NULL, st, xst, rows, NULL, m, n);     \\
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
    /* Training forward of channels [c0, c0 + nc) (nc > 1 only if nc*L <= TILE). */\\
    static void cdl_bn_fwd_block_##SFX(const T *x, T *y, const T *res, Py_ssize_t N, \\
            Py_ssize_t C, \\
            Py_ssize_t L, Py_ssize_t c0, Py_ssize_t nc, const T *w, const T *b,     \\
            T *mean_out, T *invstd_out, T *rm, T *rv, double momentum, double eps,  \\
            int relu, T *pout, int *pind, Py_ssize_t W, double *ws) {               \\
        double *acc = ws, *mexp = ws + CDL_BN_TILE, *mean = ws + 2 * CDL_BN_TILE;   \\
        double *ssq = ws + 3 * CDL_BN_TILE, *acc2 = ws + 4 * CDL_BN_TILE;           \\
        T *mf = (T *)(ws + 6 * CDL_BN_TILE), *sf = mf + CDL_BN_TILE;                \\
        T *bf = sf + CDL_BN_TILE, *tmp = bf + CDL_BN_TILE;                          \\
        const Py_ssize_t CL = C * L, M = N * L;                                     \\
        const T *xb = x + c0 * L;                                                   \\
        T *yb = y ? y + c0 * L : NULL;     /* NULL when pooled: not written */     \\
        const T *rb = res ? res + c0 * L : NULL;   /* added after normalising */    \\
        Py_ssize_t n, c, l0, len, S = nc * L;                                       \\
        double s1, s2;                                                              \\
        /* one pass: shifted sums, then mean = k + s1/M, M var = s2 - s1²/M */      \\
        if (L > CDL_BN_TILE) {          /* one channel, in pieces of a tile */      \\
            double l1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, l2[8] = {0, 0, 0, 0, 0, 0, 0, 0};\\
            double k = (double)xb[0];                                               \\
            for (l0 = 0; l0 < L; l0 += CDL_BN_TILE) {                               \\
                len = L - l0 < CDL_BN_TILE ? L - l0 : CDL_BN_TILE;                  \\
                memset(acc, 0, (size_t)len * sizeof(double));                       \\
                memset(acc2, 0, (size_t)len * sizeof(double));                      \\
                cdl_bn_sum2_##SFX(acc, acc2, xb + l0, CL, N, NULL, k, len);         \\
                cdl_bn_fold(l1, acc, len);                                          \\
                cdl_bn_fold(l2, acc2, len);                                         \\
            }                                                                       \\
            s1 = cdl_bn_total(l1);                                                  \\
            s2 = cdl_bn_total(l2);                                                  \\
            mean[0] = k + s1 / (double)M;                                           \\
            ssq[0] = s2 - s1 * (s1 / (double)M);                                    \\
        } else {                                                                    \\
            memset(acc, 0, (size_t)S * sizeof(double));                             \\
            memset(acc2, 0, (size_t)S * sizeof(double));                            \\
            if (L >= CDL_BN_RUN) {                                                  \\
                for (c = 0; c < nc; c++)                                            \\
                    cdl_bn_sum2_##SFX(acc + c * L, acc2 + c * L, xb + c * L, CL, N, \\
                                      NULL, (double)xb[c * L], L);                  \\
            } else {                                                                \\
                for (c = 0; c < nc; c++)                                            \\
                    for (l0 = 0; l0 < L; l0++) mexp[c * L + l0] = (double)xb[c * L];\\
                cdl_bn_sum2_##SFX(acc, acc2, xb, CL, N, mexp, 0.0, S);              \\
            }                                                                       \\
            for (c = 0; c < nc; c++) {                                              \\
                s1 = cdl_bn_fold_total(acc + c * L, L);                             \\
                s2 = cdl_bn_fold_total(acc2 + c * L, L);                            \\
                mean[c] = (double)xb[c * L] + s1 / (double)M;                       \\
                ssq[c] = s2 - s1 * (s1 / (double)M);                                \\
            }                                                                       \\
        }                                                                           \\
        /* rounding can leave a constant channel just below 0 (NaN stays NaN) */     \\
        for (c = 0; c < nc; c++)                                                    \\
            if (!(ssq[c] > 0.0) && ssq[c] == ssq[c]) ssq[c] = 0.0;                  \\
        for (c = 0; c < nc; c++) {                                                  \\
            double mu = mean[c], var = ssq[c] / (double)M;                          \\
            double is = 1.0 / sqrt(var + eps);                                      \\
            double wc = w ? (double)w[c0 + c] : 1.0, bc = b ? (double)b[c0 + c] : 0.0; \\
            mean_out[c0 + c] = (T)mu;                                               \\
            invstd_out[c0 + c] = (T)is;                                             \\
            if (rm) rm[c0 + c] = (T)(momentum * mu + (1.0 - momentum) * (double)rm[c0 + c]); \\
            if (rv) rv[c0 + c] = (T)(momentum * (ssq[c] / (double)(M - 1))          \\
                                     + (1.0 - momentum) * (double)rv[c0 + c]);      \\
            mf[c] = (T)mu;                                                          \\
            sf[c] = (T)(is * wc);                                                   \\
            bf[c] = (T)bc;                                                          \\
        }                                                                           \\
        if (pout) {                                                                 \\
            /* pooled (CDL_BN_RUN <= L <= CDL_BN_TILE): each plane pooled as it is \\
               normalised (AVX-512, AVX2), or normalised into tile 5, which the     \\
               forward does not use otherwise, and pooled there */                  \\
            T *yp = (T *)(ws + 5 * CDL_BN_TILE);                                    \\
            Py_ssize_t OH = L / W / 2, OW = W / 2, P = OH * OW;                     \\
            for (n = 0; n < N; n++)                                                 \\
                for (c = 0; c < nc; c++) {                                          \\
                    Py_ssize_t o = (n * C + c0 + c) * P;                            \\
                    const T *xp = xb + n * CL + c * L;                              \\
                    if (cdl_bn_normpool2_vec_##SFX(xp, W, OH, OW, mf[c], sf[c], bf[c], \\
                                                   relu, pout + o, pind + o))       \\
                        continue;                                                   \\
                    cdl_bn_norm_##SFX(yp, xp, NULL, mf[c], sf[c], bf[c], L, relu);  \\
                    cdl_bn_pool2_##SFX(yp, W, OH, OW, pout + o, pind + o);          \\
                }                                                                   \\
        } else if (L >= CDL_BN_RUN) {                                               \\
            for (n = 0; n < N; n++)                                                 \\
                for (c = 0; c < nc; c++)                                            \\
                    cdl_bn_norm_##SFX(yb + n * CL + c * L, xb + n * CL + c * L,     \\
                                      rb ? rb + n * CL + c * L : NULL, mf[c], sf[c], \\
                                      bf[c], L, relu);                              \\
        } else {                                                                    \\
            /* per-element copies in the tiles no longer needed */                  \\
            T *me = tmp, *se = (T *)mexp, *be = (T *)ssq;                           \\
            cdl_bn_spread_##SFX(me, mf, nc, L);                                     \\
            cdl_bn_spread_##SFX(se, sf, nc, L);                                     \\
            cdl_bn_spread_##SFX(be, bf, nc, L);                                     \\
            for (n = 0; n < N; n++)                                                 \\
                cdl_bn_norm_v_##SFX(yb + n * CL, xb + n * CL, rb ? rb + n * CL : NULL, \\
                                    me, se, be, S, relu);                           \\
        }                                                                           \\
    }                                                                               \\
                                                                                    \\
    /* Backward of channels [c0, c0 + nc). y: forward output (relu) or NULL;         \\
       w, dx, dw, db may be NULL. With pind (a pooled forward): g and y are the     \\
       pool's (N, C, L/4) gradient and output (cdl_bn_unpool2); returns how many    \\
       indices lay outside their window. */                                         \\
    static Py_ssize_t cdl_bn_bwd_block_##SFX(const T *g, const T *x, const T *y,     \\
            const T *w, const T *mean_in, const T *invstd_in, T *dx, T *dw, T *db,  \\
            Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c0, Py_ssize_t nc, \\
            const int *pind, Py_ssize_t W, double *ws) {                            \\
        double *ag = ws, *agx = ws + CDL_BN_TILE, *mexp = ws + 2 * CDL_BN_TILE;     \\
        double *sg = ws + 3 * CDL_BN_TILE, *sgx = ws + 4 * CDL_BN_TILE;             \\
        T *mf = (T *)(ws + 6 * CDL_BN_TILE), *kf = mf + CDL_BN_TILE;                \\
        T *gf = kf + CDL_BN_TILE, *cf = gf + CDL_BN_TILE;                           \\
        const Py_ssize_t CL = C * L, M = N * L;                                     \\
        const Py_ssize_t off = c0 * L;                                              \\
        Py_ssize_t n, c, l0, len, S = nc * L, bad = 0;                              \\
        const Py_ssize_t OH = pind ? L / W / 2 : 0, OW = W / 2, P = OH * OW;        \\
        if (pind) {                                                                 \\
            /* Each channel's gradient planes unpooled four images at a time and   \\
               summed as rows there: the same additions, in the same order, as over \\
               the full-size gradient. They are unpooled into dx, where the dx pass \\
               reads them back, or, with no dx, into tiles 10..13. */               \\
            T *gb = dx ? dx + off : (T *)(ws + 10 * CDL_BN_TILE);                   \\
            const Py_ssize_t gst = dx ? CL : L;    /* one image's plane to the next */ \\
            memset(ag, 0, (size_t)S * sizeof(double));                              \\
            memset(agx, 0, (size_t)S * sizeof(double));                             \\
            for (n = 0; n < N; n += 4) {                                            \\
                Py_ssize_t r, nr = N - n < 4 ? N - n : 4;                           \\
                for (c = 0; c < nc; c++) {                                          \\
                    T *gr = dx ? gb + n * CL + c * L : gb;                          \\
                    for (r = 0; r < nr; r++) {                                      \\
                        Py_ssize_t o = ((n + r) * C + c0 + c) * P;                  \\
                        cdl_bn_unpool2_##SFX(gr + r * gst, g + o, y ? y + o : NULL, \\
                                             pind + o, W, L, OH, OW, &bad);         \\
                    }                                                               \\
                    cdl_bn_bsum_x_##SFX(ag + c * L, agx + c * L, gr, gst,           \\
                                        x + off + n * CL + c * L, CL, nr,           \\
                                        (double)mean_in[c0 + c], L);                \\
                }                                                                   \\
            }                                                                       \\
            for (c = 0; c < nc; c++) {                                              \\
                sg[c] = cdl_bn_fold_total(ag + c * L, L);                           \\
                sgx[c] = cdl_bn_fold_total(agx + c * L, L);                         \\
            }                                                                       \\
        } else if (L > CDL_BN_TILE) {                                               \\
            double l1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, l2[8] = {0, 0, 0, 0, 0, 0, 0, 0}; \\
            double m = (double)mean_in[c0];                                         \\
            for (l0 = 0; l0 < L; l0 += CDL_BN_TILE) {                               \\
                len = L - l0 < CDL_BN_TILE ? L - l0 : CDL_BN_TILE;                  \\
                memset(ag, 0, (size_t)len * sizeof(double));                        \\
                memset(agx, 0, (size_t)len * sizeof(double));                       \\
                {                                                                   \\
                    Py_ssize_t o = off + l0;                                        \\
                    cdl_bn_bsum_##SFX(ag, agx, g + o, x + o, y ? y + o : NULL, CL, N, m, len); \\
                }                                                                   \\
                cdl_bn_fold(l1, ag, len);                                           \\
                cdl_bn_fold(l2, agx, len);                                          \\
            }                                                                       \\
            sg[0] = cdl_bn_total(l1);                                               \\
            sgx[0] = cdl_bn_total(l2);                                              \\
        } else {                                                                    \\
            memset(ag, 0, (size_t)S * sizeof(double));                              \\
            memset(agx, 0, (size_t)S * sizeof(double));                             \\
            if (L >= CDL_BN_RUN) {                                                  \\
                for (c = 0; c < nc; c++) {                                          \\
                    Py_ssize_t o = off + c * L;                                     \\
                    cdl_bn_bsum_##SFX(ag + c * L, agx + c * L, g + o, x + o,        \\
                                      y ? y + o : NULL, CL, N, (double)mean_in[c0 + c], L); \\
                }                                                                   \\
            } else {                                                                \\
                for (c = 0; c < nc; c++)                                            \\
                    for (l0 = 0; l0 < L; l0++) mexp[c * L + l0] = (double)mean_in[c0 + c]; \\
                cdl_bn_bsum_v_##SFX(ag, agx, g + off, x + off, y ? y + off : NULL, CL, N, \\
                                    mexp, S);                                       \\
            }                                                                       \\
            for (c = 0; c < nc; c++) {                                              \\
                sg[c] = cdl_bn_fold_total(ag + c * L, L);                           \\
                sgx[c] = cdl_bn_fold_total(agx + c * L, L);                         \\
            }                                                                       \\
        }                                                                           \\
        for (c = 0; c < nc; c++) {                                                  \\
            double is = (double)invstd_in[c0 + c];                                  \\
            double wc = w ? (double)w[c0 + c] : 1.0;                                \\
            if (db) db[c0 + c] = (T)sg[c];                                          \\
            if (dw) dw[c0 + c] = (T)(sgx[c] * is);                                  \\
            mf[c] = mean_in[c0 + c];                                                \\
            kf[c] = (T)(sgx[c] * is * is / (double)M);                              \\
            gf[c] = (T)(sg[c] / (double)M);                                         \\
            cf[c] = (T)(is * wc);                                                   \\
        }                                                                           \\
        if (!dx) return bad;                                                        \\
        if (pind) {                                                                 \\
            /* dx holds the unpooled gradient: the formula in place */              \\
            for (n = 0; n < N; n++)                                                 \\
                for (c = 0; c < nc; c++) {                                          \\
                    Py_ssize_t q = off + n * CL + c * L;                            \\
                    cdl_bn_dx_##SFX(dx + q, dx + q, x + q, NULL, mf[c], kf[c], gf[c], \\
                                    cf[c], L);                                      \\
                }                                                                   \\
        } else if (L >= CDL_BN_RUN) {                                               \\
            for (n = 0; n < N; n++)                                                 \\
                for (c = 0; c < nc; c++) {                                          \\
                    Py_ssize_t o = off + n * CL + c * L;                            \\
                    cdl_bn_dx_##SFX(dx + o, g + o, x + o, y ? y + o : NULL, mf[c], kf[c], \\
                                    gf[c], cf[c], L);                               \\
                }                                                                   \\
        } else {                                                                    \\
            /* per-element copies in the tiles no longer needed */                  \\
            T *me = (T *)ag, *ke = (T *)agx, *ge = (T *)mexp, *ce = (T *)(ws + 5 * CDL_BN_TILE); \\
            cdl_bn_spread_##SFX(me, mf, nc, L);                                     \\
            cdl_bn_spread_##SFX(ke, kf, nc, L);                                     \\
            cdl_bn_spread_##SFX(ge, gf, nc, L);                                     \\
            cdl_bn_spread_##SFX(ce, cf, nc, L);                                     \\
            for (n = 0; n < N; n++) {                                               \\
                Py_ssize_t o = off + n * CL;                                        \\
                cdl_bn_dx_v_##SFX(dx + o, g + o, x + o, y ? y + o : NULL, me, ke, ge, ce, S); \\
            }                                                                       \\
        }                                                                           \\
        return bad;                                                                 \\
    }                                                                               \\
                                                                                    \\
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
    Py_ssize_t CDL_BN_WS
    void cdl_bn_fwd_block_f(const float* x, float* y, const float* res, Py_ssize_t N,
                            Py_ssize_t C, Py_ssize_t L,
                            Py_ssize_t c0, Py_ssize_t nc, const float* w, const float* b,
                            float* mean_out, float* invstd_out, float* rm, float* rv,
                            double momentum, double eps, int relu, float* pout, int* pind,
                            Py_ssize_t W, double* ws) noexcept nogil
    void cdl_bn_fwd_block_d(const double* x, double* y, const double* res, Py_ssize_t N,
                            Py_ssize_t C, Py_ssize_t L,
                            Py_ssize_t c0, Py_ssize_t nc, const double* w, const double* b,
                            double* mean_out, double* invstd_out, double* rm, double* rv,
                            double momentum, double eps, int relu, double* pout, int* pind,
                            Py_ssize_t W, double* ws) noexcept nogil
    Py_ssize_t cdl_bn_bwd_block_f(const float* g, const float* x, const float* y,
                                  const float* w, const float* mean_in, const float* invstd_in,
                                  float* dx, float* dw, float* db, Py_ssize_t N, Py_ssize_t C,
                                  Py_ssize_t L, Py_ssize_t c0, Py_ssize_t nc, const int* pind,
                                  Py_ssize_t W, double* ws) noexcept nogil
    Py_ssize_t cdl_bn_bwd_block_d(const double* g, const double* x, const double* y,
                                  const double* w, const double* mean_in,
                                  const double* invstd_in, double* dx, double* dw, double* db,
                                  Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t c0,
                                  Py_ssize_t nc, const int* pind, Py_ssize_t W,
                                  double* ws) noexcept nogil
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


cdef inline int _threads(Py_ssize_t work, int num_threads) noexcept nogil:
    if num_threads < 1:
        return 1
    return num_threads if work >= PARALLEL_MIN_ELEMENTS else 1


cdef inline Py_ssize_t _block_channels(Py_ssize_t C, Py_ssize_t L, int nt) noexcept nogil:
    """Channels per block: one for planes (L >= CDL_BN_RUN), whose loops run channel
    by channel anyway; else as many as fit a tile but no more than a thread's share
    (so every thread gets a block). The grouping does not change any result, only the
    work split. With one thread's group of plane channels per block, both threads
    wrote the cache lines where their groups meet, image by image at the same time:
    a pooled backward of (64, 16, 10, 10) took longer on two threads than on one."""
    cdef Py_ssize_t cb, share
    if L >= CDL_BN_RUN:
        return 1
    cb = CDL_BN_TILE // L
    share = (C + nt - 1) // nt
    return max(1, min(cb, share))


cdef inline Py_ssize_t _ws_stride() noexcept nogil:
    # Whole cache lines plus one spare, so threads never share a line.
    return (CDL_BN_WS + 7) // 8 * 8 + 8


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


cdef int _batchnorm_forward_train(const floating[:, :, ::1] x, const floating[::1] weight,
                                  const floating[::1] bias, floating[:, :, ::1] out,
                                  floating[::1] mean, floating[::1] invstd,
                                  floating[::1] running_mean, floating[::1] running_var,
                                  double momentum, double eps, bint relu,
                                  int num_threads, floating[:, :, ::1] pool_out=None,
                                  int[:, :, ::1] pool_indices=None,
                                  Py_ssize_t width=0,
                                  const floating[:, :, ::1] residual=None) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t cb, nblocks, blk, c0, stride = _ws_stride()
    cdef int nt
    cdef double* ws
    cdef floating* pp = NULL
    cdef int* pi = NULL
    if pool_out is None and (pool_indices is not None or out is None):
        raise ValueError("batch norm: out is needed unless pool_out and pool_indices are given")
    if pool_out is not None:
        _check_pool(N, C, L, width, _shape3(pool_out.shape), pool_indices is not None
                    and _shape3(pool_indices.shape) == _shape3(pool_out.shape))
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
    nt = _threads(N * C * L, num_threads)
    cb = _block_channels(C, L, nt)
    nblocks = (C + cb - 1) // cb
    if nt > nblocks:
        nt = <int>nblocks
    cdef const floating* xp = &x[0, 0, 0]
    cdef floating* yp = NULL if out is None else &out[0, 0, 0]
    cdef const floating* wp = _ptr_or_null(weight)
    cdef const floating* bp = _ptr_or_null(bias)
    cdef floating* mp = &mean[0]
    cdef floating* ip = &invstd[0]
    cdef floating* rmp = _wptr_or_null(running_mean)
    cdef floating* rvp = _wptr_or_null(running_var)
    ws = <double*>malloc(nt * stride * sizeof(double))
    if ws == NULL:
        raise MemoryError()
    with nogil:
        for blk in prange(nblocks, schedule="static", num_threads=nt):
            c0 = blk * cb
            if floating is float:
                cdl_bn_fwd_block_f(xp, yp, rp, N, C, L, c0, min(cb, C - c0), wp, bp, mp, ip, rmp,
                                   rvp, momentum, eps, relu, pp, pi, width,
                                   ws + omp_get_thread_num() * stride)
            else:
                cdl_bn_fwd_block_d(xp, yp, rp, N, C, L, c0, min(cb, C - c0), wp, bp, mp, ip, rmp,
                                   rvp, momentum, eps, relu, pp, pi, width,
                                   ws + omp_get_thread_num() * stride)
    free(ws)
    return 0


def batchnorm_forward_train(const floating[:, :, ::1] x, const floating[::1] weight,
                            const floating[::1] bias, floating[:, :, ::1] out,
                            floating[::1] mean, floating[::1] invstd,
                            floating[::1] running_mean, floating[::1] running_var,
                            double momentum, double eps, bint relu, int num_threads,
                            floating[:, :, ::1] pool_out=None,
                            int[:, :, ::1] pool_indices=None, Py_ssize_t width=0,
                            const floating[:, :, ::1] residual=None):
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
    """
    _batchnorm_forward_train(x, weight, bias, out, mean, invstd, running_mean, running_var,
                             momentum, eps, relu, num_threads, pool_out, pool_indices, width,
                             residual)


# ---------------------------------------------------------------- backward

cdef Py_ssize_t _batchnorm_backward(const floating[:, :, ::1] grad_out, const floating[:, :, ::1] x,
                             const floating[:, :, ::1] out, const floating[::1] weight,
                                    const floating[::1] mean, const floating[::1] invstd,
                                    floating[:, :, ::1] grad_input,
                                    floating[::1] grad_weight, floating[::1] grad_bias,
                                    bint relu, int num_threads,
                             const int[:, :, ::1] pool_indices=None,
                             Py_ssize_t width=0) except -1:
    # Returns how many pool indices lay outside their window (0 unpooled).
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef size_t cells, n
    cdef const char* d
    cdef Py_ssize_t cb, nblocks, blk, c0, stride = _ws_stride(), bad = 0
    cdef int nt
    cdef double* ws
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
    cb = _block_channels(C, L, nt)
    nblocks = (C + cb - 1) // cb
    if nt > nblocks:
        nt = <int>nblocks
    cdef const floating* gp = &grad_out[0, 0, 0]
    cdef const floating* xp = &x[0, 0, 0]
    cdef const floating* yp = &out[0, 0, 0] if relu else NULL
    cdef const floating* wp = _ptr_or_null(weight)
    cdef const floating* mp = &mean[0]
    cdef const floating* ip = &invstd[0]
    cdef floating* dxp = NULL if grad_input is None else &grad_input[0, 0, 0]
    cdef floating* dwp = _wptr_or_null(grad_weight)
    cdef floating* dbp = _wptr_or_null(grad_bias)
    if pool_indices is not None:
        pi = &pool_indices[0, 0, 0]
    ws = <double*>malloc(nt * stride * sizeof(double))
    if ws == NULL:
        raise MemoryError()
    with nogil:
        for blk in prange(nblocks, schedule="static", num_threads=nt):
            c0 = blk * cb
            if floating is float:
                bad += cdl_bn_bwd_block_f(gp, xp, yp, wp, mp, ip, dxp, dwp, dbp, N, C, L, c0,
                                          min(cb, C - c0), pi, width,
                                          ws + omp_get_thread_num() * stride)
            else:
                bad += cdl_bn_bwd_block_d(gp, xp, yp, wp, mp, ip, dxp, dwp, dbp, N, C, L, c0,
                                          min(cb, C - c0), pi, width,
                                          ws + omp_get_thread_num() * stride)
    free(ws)
    return bad


def batchnorm_backward(const floating[:, :, ::1] grad_out, const floating[:, :, ::1] x,
                       const floating[:, :, ::1] out, const floating[::1] weight,
                       const floating[::1] mean, const floating[::1] invstd,
                       floating[:, :, ::1] grad_input, floating[::1] grad_weight,
                       floating[::1] grad_bias, bint relu, int num_threads,
                       const int[:, :, ::1] pool_indices=None, Py_ssize_t width=0):
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
    """
    return _batchnorm_backward(grad_out, x, out, weight, mean, invstd, grad_input,
                               grad_weight, grad_bias, relu, num_threads, pool_indices, width)


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

    def __init__(self, x, weight, bias, out, mean, invstd, running_mean, running_var,
                 double momentum, double eps, bint relu, pool_out=None, pool_indices=None,
                 Py_ssize_t width=0, residual=None):
        self.x, self.weight, self.bias, self.out = x, weight, bias, out
        self.mean, self.invstd = mean, invstd
        self.running_mean, self.running_var = running_mean, running_var
        self.momentum, self.eps, self.relu = momentum, eps, relu
        self.pool_out, self.pool_indices, self.width = pool_out, pool_indices, width
        self.residual = residual

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
                                        self.residual)


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

    def __init__(self, grad_out, x, out, weight, mean, invstd, grad_input, grad_weight,
                 grad_bias, bint relu, pool_indices=None, Py_ssize_t width=0):
        self.grad_out, self.x, self.out, self.weight = grad_out, x, out, weight
        self.mean, self.invstd = mean, invstd
        self.grad_input, self.grad_weight, self.grad_bias = grad_input, grad_weight, grad_bias
        self.relu = relu
        self.pool_indices, self.width = pool_indices, width

    def bind_input(self, const float[:, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _batchnorm_backward[float](self.grad_out, self.x, self.out, self.weight, self.mean,
                                   self.invstd, self.grad_input, self.grad_weight,
                                   self.grad_bias, self.relu, num_threads,
                                   self.pool_indices, self.width)


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
