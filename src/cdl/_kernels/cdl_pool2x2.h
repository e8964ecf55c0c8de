/* 2x2 stride-2 max pooling of one float plane in AVX-512 registers, optionally of
 * max(0, x) (ReLU's rule: v <= 0 gives 0, NaN passes), and its gradient.
 *
 * Sixteen outputs of a row at a time: the two input rows' 32 cells are loaded
 * (masked at the row's end), split into even and odd columns with two permutes,
 * and the window is reduced in the scalar kernels' order (top-left, top-right,
 * bottom-left, bottom-right; a later cell wins if it is greater or NaN), so
 * values and indices are bit for bit those of cdl_pool2_fwd_f. The scalar
 * kernels spent most of their time on short rows (LeNet's 28 and 10 columns).
 * AVX2 builds have the same kernels 8 outputs at a time. CDL_POOL2_VEC is 0 in
 * builds without AVX2 or AVX-512; the callers use the scalar kernels there. */
#ifndef CDL_POOL2X2_H
#define CDL_POOL2X2_H
#include <stddef.h>
#include <string.h>

/* The cells of a plane's gradient that lie in no window set to 0: the last column
 * of an odd width, the last row of an odd height. */
static inline void cdl_p2_zero_edges(float *dx, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                                     Py_ssize_t OW) {
    Py_ssize_t h, w;
    for (h = 0; h < 2 * OH; h++)
        for (w = 2 * OW; w < W; w++)
            dx[h * W + w] = 0;
    for (h = 2 * OH; h < H; h++)
        for (w = 0; w < W; w++)
            dx[h * W + w] = 0;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define CDL_POOL2_VEC 1

/* A later cell v replaces best where v > best or v is NaN. */
static inline __mmask16 cdl_p2_takes(__m512 v, __m512 best) {
    return _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
}

/* affine: the cells are (x - m) * s + b first, rounded as batch norm's scalar loop
 * (a subtraction, then one fused multiply-add), so BatchNorm's pooled pass pools
 * straight from its input with no normalised copy of the plane. */
static inline __attribute__((always_inline)) void
cdl_pool2_plane_fwd_core(const float *x, float *y, int *ind, Py_ssize_t W, Py_ssize_t OH,
                         Py_ssize_t OW, const int relu, const int affine, float m, float s,
                         float b) {
    const __m512 mv = _mm512_set1_ps(m), sv = _mm512_set1_ps(s), bv = _mm512_set1_ps(b);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    Py_ssize_t oh, j;
    for (oh = 0; oh < OH; oh++) {
        const float *r0 = x + 2 * oh * W, *r1 = r0 + W;
        for (j = 0; j < OW; j += 16) {
            Py_ssize_t n = OW - j < 16 ? OW - j : 16;
            __mmask32 cells = (__mmask32)(n == 16 ? 0xFFFFFFFFu : ((1u << (2 * n)) - 1u));
            __mmask16 lo = (__mmask16)cells, hi = (__mmask16)(cells >> 16);
            __mmask16 out = (__mmask16)((1u << n) - 1u);
            __m512 a0 = _mm512_maskz_loadu_ps(lo, r0 + 2 * j);
            __m512 a1 = _mm512_maskz_loadu_ps(hi, r0 + 2 * j + 16);
            __m512 b0 = _mm512_maskz_loadu_ps(lo, r1 + 2 * j);
            __m512 b1 = _mm512_maskz_loadu_ps(hi, r1 + 2 * j + 16);
            __m512 best;
            if (affine) {
                a0 = _mm512_fmadd_ps(_mm512_sub_ps(a0, mv), sv, bv);
                a1 = _mm512_fmadd_ps(_mm512_sub_ps(a1, mv), sv, bv);
                b0 = _mm512_fmadd_ps(_mm512_sub_ps(b0, mv), sv, bv);
                b1 = _mm512_fmadd_ps(_mm512_sub_ps(b1, mv), sv, bv);
            }
            best = _mm512_permutex2var_ps(a0, even, a1);
            __m512 v = _mm512_permutex2var_ps(a0, odd, a1);
            __m512i k = _mm512_setzero_si512();
            __mmask16 t = cdl_p2_takes(v, best);
            best = _mm512_mask_blend_ps(t, best, v);
            k = _mm512_mask_blend_epi32(t, k, _mm512_set1_epi32(1));
            v = _mm512_permutex2var_ps(b0, even, b1);
            t = cdl_p2_takes(v, best);
            best = _mm512_mask_blend_ps(t, best, v);
            k = _mm512_mask_blend_epi32(t, k, _mm512_set1_epi32((int)W));
            v = _mm512_permutex2var_ps(b0, odd, b1);
            t = cdl_p2_takes(v, best);
            best = _mm512_mask_blend_ps(t, best, v);
            k = _mm512_mask_blend_epi32(t, k, _mm512_set1_epi32((int)W + 1));
            if (relu) {
                /* The window of max(0, x): if its maximum is > 0 (or NaN) the same
                 * cell wins as for x; otherwise every cell is 0 and, ties going to
                 * the first, the top-left one wins with +0. */
                t = _mm512_cmp_ps_mask(best, _mm512_setzero_ps(), _CMP_LE_OQ);
                best = _mm512_mask_blend_ps(t, best, _mm512_setzero_ps());
                k = _mm512_mask_blend_epi32(t, k, _mm512_setzero_si512());
            }
            /* index = 2*oh*W + 2*(j + lane) + k */
            k = _mm512_add_epi32(k, _mm512_add_epi32(even, _mm512_set1_epi32(
                    (int)(2 * oh * W + 2 * j))));
            _mm512_mask_storeu_ps(y + oh * OW + j, out, best);
            _mm512_mask_storeu_epi32(ind + oh * OW + j, out, k);
        }
    }
}

/* dx of the plane (every cell written): each cell gets the gradient of its
 * window if it is that window's argmax, else 0; with yrelu (the pooled output of
 * the fused ReLU + pool) the gradient is first zeroed where yrelu <= 0. Returns
 * how many indices matched a cell of their own window. */
static Py_ssize_t cdl_pool2_plane_bwd(const float *g, const int *ind, const float *yrelu,
                                      float *dx, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                                      Py_ssize_t OW) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    /* Interleave two 16-vectors p, q as p0 q0 p1 q1 ...: low and high halves. */
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                          15, 31);
    const __m512 zero = _mm512_setzero_ps();
    Py_ssize_t oh, j, matched = 0;
    for (oh = 0; oh < OH; oh++) {
        float *d0 = dx + 2 * oh * W, *d1 = d0 + W;
        for (j = 0; j < OW; j += 16) {
            Py_ssize_t n = OW - j < 16 ? OW - j : 16;
            __mmask32 cells = (__mmask32)(n == 16 ? 0xFFFFFFFFu : ((1u << (2 * n)) - 1u));
            __mmask16 lo = (__mmask16)cells, hi = (__mmask16)(cells >> 16);
            __mmask16 out = (__mmask16)((1u << n) - 1u);
            __m512 gv = _mm512_maskz_loadu_ps(out, g + oh * OW + j);
            __m512i rel = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(out, ind + oh * OW + j),
                                           _mm512_add_epi32(even, _mm512_set1_epi32(
                                               (int)(2 * oh * W + 2 * j))));
            __mmask16 m0 = _mm512_mask_cmpeq_epi32_mask(out, rel, _mm512_setzero_si512());
            __mmask16 m1 = _mm512_mask_cmpeq_epi32_mask(out, rel, _mm512_set1_epi32(1));
            __mmask16 m2 = _mm512_mask_cmpeq_epi32_mask(out, rel, _mm512_set1_epi32((int)W));
            __mmask16 m3 = _mm512_mask_cmpeq_epi32_mask(out, rel, _mm512_set1_epi32((int)W + 1));
            __m512 p, q;
            if (yrelu) {
                __m512 yv = _mm512_maskz_loadu_ps(out, yrelu + oh * OW + j);
                gv = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(yv, zero, _CMP_LE_OQ), gv, zero);
            }
            /* an index equals at most one of the four cells */
            matched += _mm_popcnt_u32((unsigned)(m0 | m1 | m2 | m3));
            p = _mm512_maskz_mov_ps(m0, gv);
            q = _mm512_maskz_mov_ps(m1, gv);
            _mm512_mask_storeu_ps(d0 + 2 * j, lo, _mm512_permutex2var_ps(p, ilo, q));
            _mm512_mask_storeu_ps(d0 + 2 * j + 16, hi, _mm512_permutex2var_ps(p, ihi, q));
            p = _mm512_maskz_mov_ps(m2, gv);
            q = _mm512_maskz_mov_ps(m3, gv);
            _mm512_mask_storeu_ps(d1 + 2 * j, lo, _mm512_permutex2var_ps(p, ilo, q));
            _mm512_mask_storeu_ps(d1 + 2 * j + 16, hi, _mm512_permutex2var_ps(p, ihi, q));
        }
    }
    cdl_p2_zero_edges(dx, H, W, OH, OW);
    return matched;
}

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CDL_POOL2_VEC 1

/* The same kernels with 8 outputs a step: AVX2 has no mask registers, so masks
 * are vectors (compare results, blends); the row's end is a masked load, and
 * whole-vector stores into cells stored later or a short plain store
 * (cdl_p2_store_first); even and odd columns are split with a shuffle and a
 * 64-bit permute. */

/* Lanes i < n set (n <= 8). */
static inline __m256i cdl_p2_first(Py_ssize_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The first n (0 < n <= 8) lanes of v stored to d (floats, or ints as their
 * bits), in at most three plain stores: Zen 2's masked stores, and the rep movs
 * GCC makes of a memcpy of n lanes, took longer than the scalar kernels on short
 * rows. The stores go through may_alias vector types and a 4-byte memcpy (a mov),
 * so int arrays may be written this way. */
static inline void cdl_p2_store_first(void *d, __m256 v, Py_ssize_t n) {
    char *p = (char *)d;
    __m128 h = _mm256_castps256_ps128(v);
    if (n == 8) {
        _mm256_storeu_ps((float *)p, v);
        return;
    }
    if (n >= 4) {
        _mm_storeu_ps((float *)p, h);
        p += 16;
        n -= 4;
        h = _mm256_extractf128_ps(v, 1);
    }
    if (n >= 2) {
        _mm_storel_pi((__m64 *)p, h);
        p += 8;
        n -= 2;
        h = _mm_movehl_ps(h, h);
    }
    if (n) {
        float f = _mm_cvtss_f32(h);
        memcpy(p, &f, sizeof f);
    }
}

/* A later cell v replaces best where v > best or v is NaN. */
static inline __m256 cdl_p2_takes(__m256 v, __m256 best) {
    return _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* The even (0, 2, ..., 14) or odd cells of the 16 in a, b, in order: the shuffle
 * gives a's four, b's four per 128-bit half; the permute puts the halves' pairs
 * in order. */
static inline __m256 cdl_p2_pairs(__m256 t) {
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(t), _MM_SHUFFLE(3, 1, 2, 0)));
}
static inline __m256 cdl_p2_even(__m256 a, __m256 b) {
    return cdl_p2_pairs(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
}
static inline __m256 cdl_p2_odd(__m256 a, __m256 b) {
    return cdl_p2_pairs(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

static inline __attribute__((always_inline)) void
cdl_pool2_plane_fwd_core(const float *x, float *y, int *ind, Py_ssize_t W, Py_ssize_t OH,
                         Py_ssize_t OW, const int relu, const int affine, float m, float s,
                         float b) {
    const __m256 mv = _mm256_set1_ps(m), sv = _mm256_set1_ps(s), bv = _mm256_set1_ps(b);
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256 zero = _mm256_setzero_ps();
    Py_ssize_t oh, j;
    for (oh = 0; oh < OH; oh++) {
        const float *r0 = x + 2 * oh * W, *r1 = r0 + W;
        for (j = 0; j < OW; j += 8) {
            Py_ssize_t n = OW - j < 8 ? OW - j : 8;
            __m256 a0, a1, b0, b1, best, v, t;
            __m256i k;
            if (n == 8 || (2 * oh + 1) * W + 2 * j + 16 <= 2 * OH * W) {
                /* whole vectors, past the row's end where the plane goes on */
                a0 = _mm256_loadu_ps(r0 + 2 * j);
                a1 = _mm256_loadu_ps(r0 + 2 * j + 8);
                b0 = _mm256_loadu_ps(r1 + 2 * j);
                b1 = _mm256_loadu_ps(r1 + 2 * j + 8);
            } else {
                __m256i lo = cdl_p2_first(2 * n), hi = cdl_p2_first(2 * n - 8);
                a0 = _mm256_maskload_ps(r0 + 2 * j, lo);
                a1 = _mm256_maskload_ps(r0 + 2 * j + 8, hi);
                b0 = _mm256_maskload_ps(r1 + 2 * j, lo);
                b1 = _mm256_maskload_ps(r1 + 2 * j + 8, hi);
            }
            if (affine) {
                a0 = _mm256_fmadd_ps(_mm256_sub_ps(a0, mv), sv, bv);
                a1 = _mm256_fmadd_ps(_mm256_sub_ps(a1, mv), sv, bv);
                b0 = _mm256_fmadd_ps(_mm256_sub_ps(b0, mv), sv, bv);
                b1 = _mm256_fmadd_ps(_mm256_sub_ps(b1, mv), sv, bv);
            }
            best = cdl_p2_even(a0, a1);
            v = cdl_p2_odd(a0, a1);
            k = _mm256_setzero_si256();
            t = cdl_p2_takes(v, best);
            best = _mm256_blendv_ps(best, v, t);
            k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(k),
                    _mm256_castsi256_ps(_mm256_set1_epi32(1)), t));
            v = cdl_p2_even(b0, b1);
            t = cdl_p2_takes(v, best);
            best = _mm256_blendv_ps(best, v, t);
            k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(k),
                    _mm256_castsi256_ps(_mm256_set1_epi32((int)W)), t));
            v = cdl_p2_odd(b0, b1);
            t = cdl_p2_takes(v, best);
            best = _mm256_blendv_ps(best, v, t);
            k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(k),
                    _mm256_castsi256_ps(_mm256_set1_epi32((int)W + 1)), t));
            if (relu) {
                /* as in the AVX-512 kernel: a window with no cell > 0 gives its
                 * top-left cell and +0 */
                t = _mm256_cmp_ps(best, zero, _CMP_LE_OQ);
                best = _mm256_blendv_ps(best, zero, t);
                k = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(k), zero, t));
            }
            k = _mm256_add_epi32(k, _mm256_add_epi32(even, _mm256_set1_epi32(
                    (int)(2 * oh * W + 2 * j))));
            if (oh * OW + j + 8 <= OH * OW) {
                /* whole vectors: past the row's end they write cells of the
                 * next row, which its own step overwrites */
                _mm256_storeu_ps(y + oh * OW + j, best);
                _mm256_storeu_si256((__m256i *)(ind + oh * OW + j), k);
            } else {
                cdl_p2_store_first(y + oh * OW + j, best, n);
                cdl_p2_store_first(ind + oh * OW + j, _mm256_castsi256_ps(k), n);
            }
        }
    }
}

/* The lanes where rel == k (among the valid lanes out), as a float mask. */
static inline __m256 cdl_p2_at(__m256i rel, __m256i out, int k) {
    return _mm256_and_ps(_mm256_castsi256_ps(out), _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(rel, _mm256_set1_epi32(k))));
}

/* One row of a window's cells, left and right interleaved (gv where ml, then gv
 * where mr, lane by lane: 16 floats), of which the first m are stored to d. */
static inline void cdl_p2_store_row(float *d, __m256 gv, __m256 ml, __m256 mr, Py_ssize_t m) {
    __m256 p = _mm256_and_ps(ml, gv), q = _mm256_and_ps(mr, gv);
    __m256 lo = _mm256_unpacklo_ps(p, q);     /* p0 q0 p1 q1 | p4 q4 p5 q5 */
    __m256 hi = _mm256_unpackhi_ps(p, q);     /* p2 q2 p3 q3 | p6 q6 p7 q7 */
    p = _mm256_permute2f128_ps(lo, hi, 0x20);
    q = _mm256_permute2f128_ps(lo, hi, 0x31);
    if (m > 8) {
        _mm256_storeu_ps(d, p);
        cdl_p2_store_first(d + 8, q, m - 8);
    } else {
        cdl_p2_store_first(d, p, m);
    }
}

/* As the AVX-512 cdl_pool2_plane_bwd. */
static Py_ssize_t cdl_pool2_plane_bwd(const float *g, const int *ind, const float *yrelu,
                                      float *dx, Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                                      Py_ssize_t OW) {
    const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256 zero = _mm256_setzero_ps();
    Py_ssize_t oh, j, matched = 0;
    for (oh = 0; oh < OH; oh++) {
        float *d0 = dx + 2 * oh * W, *d1 = d0 + W;
        /* The row's steps from the last: a short step's whole vectors run past d0's
         * end into d1's first cells, which the steps after it store, and past d1's
         * into cells of later rows, stored later too (the odd row and column are
         * zeroed at the end). So only a step whose vectors would leave the plane
         * stores just its cells. */
        for (j = (OW - 1) / 8 * 8; j >= 0; j -= 8) {
            Py_ssize_t n = OW - j < 8 ? OW - j : 8;
            const int whole = n == 8 || (2 * oh + 1) * W + 2 * j + 16 <= H * W;
            const int inside = oh * OW + j + 8 <= OH * OW;   /* whole vectors load */
            __m256i out = cdl_p2_first(n), rel;
            __m256 gv, m0, m1, m2, m3;
            if (inside) {
                gv = _mm256_loadu_ps(g + oh * OW + j);
                rel = _mm256_loadu_si256((const __m256i *)(ind + oh * OW + j));
            } else {
                gv = _mm256_maskload_ps(g + oh * OW + j, out);
                rel = _mm256_maskload_epi32(ind + oh * OW + j, out);
            }
            rel = _mm256_sub_epi32(rel, _mm256_add_epi32(even, _mm256_set1_epi32(
                    (int)(2 * oh * W + 2 * j))));
            m0 = cdl_p2_at(rel, out, 0);
            m1 = cdl_p2_at(rel, out, 1);
            m2 = cdl_p2_at(rel, out, (int)W);
            m3 = cdl_p2_at(rel, out, (int)W + 1);
            if (yrelu) {
                const float *yr = yrelu + oh * OW + j;
                __m256 yv = inside ? _mm256_loadu_ps(yr) : _mm256_maskload_ps(yr, out);
                gv = _mm256_blendv_ps(gv, zero, _mm256_cmp_ps(yv, zero, _CMP_LE_OQ));
            }
            /* an index equals at most one of the four cells */
            matched += __builtin_popcount((unsigned)_mm256_movemask_ps(
                _mm256_or_ps(_mm256_or_ps(m0, m1), _mm256_or_ps(m2, m3))));
            cdl_p2_store_row(d0 + 2 * j, gv, m0, m1, whole ? 16 : 2 * n);
            cdl_p2_store_row(d1 + 2 * j, gv, m2, m3, whole ? 16 : 2 * n);
        }
    }
    cdl_p2_zero_edges(dx, H, W, OH, OW);
    return matched;
}

#else
#define CDL_POOL2_VEC 0
static inline void cdl_pool2_plane_fwd(const float *x, float *y, int *ind, Py_ssize_t W,
                                       Py_ssize_t OH, Py_ssize_t OW, int relu) {
    (void)x; (void)y; (void)ind; (void)W; (void)OH; (void)OW; (void)relu;
}
static inline void cdl_pool2_plane_fwd_affine(const float *x, float *y, int *ind, Py_ssize_t W,
                                              Py_ssize_t OH, Py_ssize_t OW, int relu, float m,
                                              float s, float b) {
    (void)x; (void)y; (void)ind; (void)W; (void)OH; (void)OW; (void)relu; (void)m; (void)s;
    (void)b;
}
static inline Py_ssize_t cdl_pool2_plane_bwd(const float *g, const int *ind, const float *yrelu,
                                             float *dx, Py_ssize_t H, Py_ssize_t W,
                                             Py_ssize_t OH, Py_ssize_t OW) {
    (void)g; (void)ind; (void)yrelu; (void)dx; (void)H; (void)W; (void)OH; (void)OW;
    return 0;
}
#endif

#if CDL_POOL2_VEC
/* The pool of x (or of max(0, x) with relu). */
static inline void cdl_pool2_plane_fwd(const float *x, float *y, int *ind, Py_ssize_t W,
                                       Py_ssize_t OH, Py_ssize_t OW, int relu) {
    if (relu)
        cdl_pool2_plane_fwd_core(x, y, ind, W, OH, OW, 1, 0, 0.0f, 1.0f, 0.0f);
    else
        cdl_pool2_plane_fwd_core(x, y, ind, W, OH, OW, 0, 0, 0.0f, 1.0f, 0.0f);
}

/* The pool of (x - m) * s + b, or of max(0, that) with relu. */
static inline void cdl_pool2_plane_fwd_affine(const float *x, float *y, int *ind, Py_ssize_t W,
                                              Py_ssize_t OH, Py_ssize_t OW, int relu, float m,
                                              float s, float b) {
    if (relu)
        cdl_pool2_plane_fwd_core(x, y, ind, W, OH, OW, 1, 1, m, s, b);
    else
        cdl_pool2_plane_fwd_core(x, y, ind, W, OH, OW, 0, 1, m, s, b);
}
#endif
#endif
