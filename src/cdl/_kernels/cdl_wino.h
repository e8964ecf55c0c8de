/* Winograd F(2x2, 3x3) and F(4x2, 3x3) for float32 3x3 stride-1 convolutions
 * (_conv.pyx, "Winograd path").
 *
 * Each output tile of th x 2 (th = 2 or 4 rows) is A'^T [ (G' g G^T) . (B'^T d
 * B) ] A summed over input channels, d the tile's (th + 2) x 4 input patch:
 * across columns F(2, 3)'s A, B, G; down the rows the same for th = 2 and
 * F(4, 3)'s for th = 4. That is 16 products per channel pair and 4 outputs
 * (th = 2) or 24 per 8 (th = 4) where the direct sum does 36 or 72; the rest
 * are additions. For a block of tiles (whole tile rows, possibly of several
 * images) the input transform writes V[pair][c][lane], a GEMM per pair gives
 * M[pair][k][lane] = sum_c U[pair][c][k] V[pair][c][lane], and the output
 * transform writes the outputs. SIMD vectors run over tiles, VF/2 of them side
 * by side, each tile's cells as pairs in neighbouring lanes (see
 * cdl_wino_in). The weight gradient (further down) reuses the input
 * transform. Every output is computed by the same operations in the
 * same order whatever the block, batch or thread, so results are bitwise the
 * same for any thread count (not those of the direct sum: the transforms
 * round differently: F(2, 3)'s within a few ulps of the sum's scale, F(4,
 * 3)'s larger points about 4x that, some 1e-6 of the scale at 128 channels).
 */
#ifndef CDL_WINO_H
#define CDL_WINO_H

#include <string.h>
#include "cdl_cvtile.h"

/* Taken without being forced only where measured: the AVX2 build (Zen 2) and
 * the AVX-512 build (Sapphire Rapids), bench/conv_parts.py. */
#if defined(__AVX2__)
#define CDL_WINO_AUTO 1
#else
#define CDL_WINO_AUTO 0
#endif
/* Tiles of 4 output rows (F(4x2, 3x3)) in the forward and input gradient
 * unforced only where measured: the AVX-512 build. */
#if defined(__AVX512F__)
#define CDL_WINO_TALL_AUTO 1
#else
#define CDL_WINO_TALL_AUTO 0
#endif

/* GEMM register tile: KR output channels x RB vectors of tiles (KR*RB
 * accumulators, RB loads and a broadcast within the vector registers). KR 8
 * on AVX-512: channel counts of 16, 32 and 64 need no padding (6 x 4 padded
 * them by up to 12.5%; 8 x 3 took 0.88-0.99x its time per part of ResNet-8's
 * layers in one A/B). */
#if CDL_VREGS >= 32
#define CDL_WG_KR 8
#define CDL_WG_RB 3
#else
#define CDL_WG_KR 4
#define CDL_WG_RB 3
#endif

/* Lane patterns: even lanes from a, odd from b; neighbours swapped. */
#if CDL_VF == 16
#define CDL_WN_BLEND 0, 17, 2, 19, 4, 21, 6, 23, 8, 25, 10, 27, 12, 29, 14, 31
#define CDL_WN_SWAP 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#define CDL_WN_REST4 , 8, 9, 10, 11, 12, 13, 14, 15
#define CDL_WN_REST2 , 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#elif CDL_VF == 8
#define CDL_WN_BLEND 0, 9, 2, 11, 4, 13, 6, 15
#define CDL_WN_SWAP 1, 0, 3, 2, 5, 4, 7, 6
#define CDL_WN_REST4
#define CDL_WN_REST2 , 4, 5, 6, 7
#else
#define CDL_WN_BLEND 0, 5, 2, 7
#define CDL_WN_SWAP 1, 0, 3, 2
#define CDL_WN_REST4
#define CDL_WN_REST2
#endif

/* Every lane pair = (p[0], p[1]): one 64-bit broadcast load. */
CDL_CV_INLINE cdl_vf cdl_wino_bcast2(const float *p) {
    double d;
    __builtin_memcpy(&d, p, sizeof(d));
#if defined(__AVX512F__)
    return (cdl_vf)_mm512_castpd_ps(_mm512_set1_pd(d));
#elif defined(__AVX__)
    return (cdl_vf)_mm256_castpd_ps(_mm256_set1_pd(d));
#elif defined(__SSE2__)
    return (cdl_vf)_mm_castpd_ps(_mm_set1_pd(d));
#else
    cdl_vf v;
    int l;
    for (l = 0; l < CDL_VF; l++)
        v[l] = p[l & 1];
    return v;
#endif
}

/* The 16 cells of a tile travel as 8 pairs in neighbouring lanes, tile t in
 * lanes 2t and 2t + 1: pair 2i holds cells (i, 0) and (i, 3), pair 2i + 1
 * cells (i, 1) and (i, 2). Then the column transforms need no lane
 * shuffles: with P0, P1, P2 a patch row read from columns 0, 1 and 2 on,
 * P0 - P2 is (d0 - d2, d1 - d3) and P1 + P2 / P1 - P0 blended is (d1 + d2,
 * d2 - d1) in every lane pair; the GEMM broadcasts the two cells' weights
 * as one 64-bit pair; the output transform's column step ends in output
 * columns 2t and 2t + 1, which are already neighbours. */

/* Cell e of pair p: tile cell (row, column) = (p/2, 0 or 3) for even p, (p/2,
 * 1 or 2) for odd p, as the index row*4 + column. */
CDL_CV_INLINE int cdl_wino_cell(int p, int e) {
    static const int col[2][2] = {{0, 3}, {1, 2}};
    return (p / 2) * 4 + col[p & 1][e];
}

/* U[((pair*C + c)*kp + k)*2 + e] = (G' g G^T) of filter g = w[k, c] (K x C x
 * 3 x 3), cell e of the pair, zero for K <= k < kp, for k in [k0, k1). G =
 * [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] (F(2, 3)) across
 * columns; down rows G' = G for tiles of th = 2 output rows, and F(4, 3)'s
 * [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6],
 * [1/24, -1/12, 1/6], [0, 0, 1]] for th = 4; worked in double, rounded once.
 * Eight output channels at a time, so the arithmetic runs in vectors across k
 * and a pair's cells for them are 16 neighbouring floats of U (one filter at a
 * time took 19 ns, 39 us of a 32 -> 64 channel layer's call). The filters are
 * first gathered for CDL_WF_CB channels: read back at once, the scalar stores
 * would stall each vector load that spans them. flipped: g = w[c, k] rotated
 * by 180 degrees, w being C x K x 3 x 3 (the input gradient's filters, read
 * from the layer's weight in place). */
#define CDL_WF_KB 8
#define CDL_WF_CB 16
static void cdl_wino_filters(const float *w, Py_ssize_t K, Py_ssize_t C, Py_ssize_t kp,
                             int flipped, int th, float *U, Py_ssize_t k0, Py_ssize_t k1) {
    float gt[CDL_WF_CB][9][CDL_WF_KB];
    Py_ssize_t kb, c0, c;
    int i, j, e, q, nk, cc, cb, nrow = th + 2;
    for (kb = k0; kb < k1; kb += CDL_WF_KB) {
        nk = (int)(k1 - kb < CDL_WF_KB ? k1 - kb : CDL_WF_KB);
        for (c0 = 0; c0 < C; c0 += CDL_WF_CB) {
            cb = (int)(C - c0 < CDL_WF_CB ? C - c0 : CDL_WF_CB);
            for (q = 0; q < CDL_WF_KB; q++)
                for (cc = 0; cc < cb; cc++)
                    for (j = 0; j < 9; j++)
                        gt[cc][j][q] = !(q < nk && kb + q < K) ? 0.0f :
                            flipped ? w[((c0 + cc) * K + kb + q) * 9 + 8 - j] :
                                      w[((kb + q) * C + c0 + cc) * 9 + j];
            for (cc = 0; cc < cb; cc++) {
                double t[6][3][CDL_WF_KB], u[24][CDL_WF_KB];
                c = c0 + cc;
                /* th outside the loops, which then run in vectors across q */
                if (th == 2) {
                    for (j = 0; j < 3; j++)
                        for (q = 0; q < CDL_WF_KB; q++) {
                            double g0 = gt[cc][j][q], g1 = gt[cc][3 + j][q];
                            double g2 = gt[cc][6 + j][q];
                            t[0][j][q] = g0;
                            t[1][j][q] = 0.5 * (g0 + g1 + g2);
                            t[2][j][q] = 0.5 * (g0 - g1 + g2);
                            t[3][j][q] = g2;
                        }
                } else {
                    for (j = 0; j < 3; j++)
                        for (q = 0; q < CDL_WF_KB; q++) {
                            double g0 = gt[cc][j][q], g1 = gt[cc][3 + j][q];
                            double g2 = gt[cc][6 + j][q];
                            t[0][j][q] = 0.25 * g0;
                            t[1][j][q] = (g0 + g1 + g2) * (-1.0 / 6);
                            t[2][j][q] = (g0 - g1 + g2) * (-1.0 / 6);
                            t[3][j][q] = (g0 + 2 * g1 + 4 * g2) * (1.0 / 24);
                            t[4][j][q] = (g0 - 2 * g1 + 4 * g2) * (1.0 / 24);
                            t[5][j][q] = g2;
                        }
                }
                for (i = 0; i < nrow; i++)
                    for (q = 0; q < CDL_WF_KB; q++) {
                        double a = t[i][0][q], b = t[i][1][q], d = t[i][2][q];
                        u[i * 4 + 0][q] = a;
                        u[i * 4 + 1][q] = 0.5 * (a + b + d);
                        u[i * 4 + 2][q] = 0.5 * (a - b + d);
                        u[i * 4 + 3][q] = d;
                    }
                for (i = 0; i < 2 * nrow; i++) {
                    float *dst = U + ((i * C + c) * kp + kb) * 2;
                    for (q = 0; q < nk; q++)
                        for (e = 0; e < 2; e++)
                            dst[q * 2 + e] = (float)u[cdl_wino_cell(i, e)][q];
                }
            }
        }
    }
}

/* B^T d B for VF/2 tiles side by side: rows[r] points at input row r of the
 * first tile's patch (padded, readable for VF + 2 floats); the 8 pair
 * vectors go to v + pair*vs. */
static inline void cdl_wino_in(const float *const rows[4], float *v, Py_ssize_t vs) {
    cdl_vf a[4], b[4];
    int r;
    for (r = 0; r < 4; r++) {
        const float *p = rows[r];
        cdl_vf p0 = cdl_vf_load(p), p1 = cdl_vf_load(p + 1), p2 = cdl_vf_load(p + 2);
        a[r] = p0 - p2;
        b[r] = CDL_SHUF(p1 + p2, p1 - p0, CDL_WN_BLEND);
    }
    cdl_vf_store(v + 0 * vs, a[0] - a[2]);
    cdl_vf_store(v + 1 * vs, b[0] - b[2]);
    cdl_vf_store(v + 2 * vs, a[1] + a[2]);
    cdl_vf_store(v + 3 * vs, b[1] + b[2]);
    cdl_vf_store(v + 4 * vs, a[2] - a[1]);
    cdl_vf_store(v + 5 * vs, b[2] - b[1]);
    cdl_vf_store(v + 6 * vs, a[1] - a[3]);
    cdl_vf_store(v + 7 * vs, b[1] - b[3]);
}

/* The same for tiles of 4 output rows: rows[r], r < 6, the patch rows; B'^T
 * (F(4, 3)'s, 6 x 6) down the rows, 12 pair vectors to v + pair*vs. */
static inline void cdl_wino_in6(const float *const rows[6], float *v, Py_ssize_t vs) {
    cdl_vf d[2][6];
    int r, h;
    for (r = 0; r < 6; r++) {
        const float *p = rows[r];
        cdl_vf p0 = cdl_vf_load(p), p1 = cdl_vf_load(p + 1), p2 = cdl_vf_load(p + 2);
        d[0][r] = p0 - p2;
        d[1][r] = CDL_SHUF(p1 + p2, p1 - p0, CDL_WN_BLEND);
    }
    for (h = 0; h < 2; h++) {
        const cdl_vf *x = d[h];
        cdl_vf four = cdl_vf_set1(4.0f), five = cdl_vf_set1(5.0f), two = cdl_vf_set1(2.0f);
        cdl_vf s12 = x[1] + x[2], s34 = x[3] + x[4], d12 = x[1] - x[2], d43 = x[4] - x[3];
        cdl_vf d42 = x[4] - x[2], d31 = x[3] - x[1];
        cdl_vf_store(v + (0 + h) * vs, four * x[0] - five * x[2] + x[4]);
        cdl_vf_store(v + (2 + h) * vs, s34 - four * s12);
        cdl_vf_store(v + (4 + h) * vs, four * d12 + d43);
        cdl_vf_store(v + (6 + h) * vs, two * d31 + d42);
        cdl_vf_store(v + (8 + h) * vs, d42 - two * d31);
        cdl_vf_store(v + (10 + h) * vs, four * x[1] - five * x[3] + x[5]);
    }
}

/* m[a*ms + r*VF + l] = sum_c u[(c*kp + a)*2 + l%2] * v[c*vs + r*VF + l], a < KR, r < RB. */
static inline __attribute__((always_inline)) void cdl_wino_gtile(
        const float *u, Py_ssize_t kp, const float *v, Py_ssize_t vs, Py_ssize_t C, float *m,
        Py_ssize_t ms, const int KR, const int RB) {
    cdl_vf acc[CDL_WG_KR * CDL_WG_RB], xv[CDL_WG_RB];
    Py_ssize_t c;
    int a, r;
#pragma GCC unroll 24
    for (a = 0; a < KR * RB; a++)
        acc[a] = cdl_vf_set1(0);
    for (c = 0; c < C; c++) {
#pragma GCC unroll 8
        for (r = 0; r < RB; r++)
            xv[r] = cdl_vf_loadr(v + c * vs + r * CDL_VF);
#pragma GCC unroll 8
        for (a = 0; a < KR; a++) {
            cdl_vf w = cdl_wino_bcast2(u + (c * kp + a) * 2);
#pragma GCC unroll 8
            for (r = 0; r < RB; r++)
                acc[a * RB + r] += w * xv[r];
        }
    }
#pragma GCC unroll 8
    for (a = 0; a < KR; a++)
#pragma GCC unroll 8
        for (r = 0; r < RB; r++)
            cdl_vf_store(m + a * ms + r * CDL_VF, acc[a * RB + r]);
}

#define CDL_WG_DEF(RB) \
    static void cdl_wino_gemm_##RB(const float *u, Py_ssize_t kp, const float *v, \
                                   Py_ssize_t vs, Py_ssize_t C, float *m, Py_ssize_t ms) { \
        cdl_wino_gtile(u, kp, v, vs, C, m, ms, CDL_WG_KR, RB); }
CDL_WG_DEF(1)
CDL_WG_DEF(2)
CDL_WG_DEF(3)
#if CDL_WG_RB >= 4
CDL_WG_DEF(4)
#endif

/* M[pair] = U[pair]^T V[pair] over nv vectors, channels [ka, kb) (multiples of
 * CDL_WG_KR), for one pair. */
static void cdl_wino_gemm(const float *u, Py_ssize_t kp, const float *v, Py_ssize_t vs,
                          Py_ssize_t C, float *m, Py_ssize_t nv, Py_ssize_t ka, Py_ssize_t kb) {
    Py_ssize_t k0, v0;
    for (k0 = ka; k0 < kb; k0 += CDL_WG_KR)
        for (v0 = 0; v0 < nv; v0 += CDL_WG_RB) {
            Py_ssize_t rb = nv - v0 < CDL_WG_RB ? nv - v0 : CDL_WG_RB;
            const float *vv = v + v0 * CDL_VF;
            const float *uu = u + k0 * 2;
            float *mm = m + k0 * vs + v0 * CDL_VF;
            switch (rb) {
            case 1: cdl_wino_gemm_1(uu, kp, vv, vs, C, mm, vs); break;
            case 2: cdl_wino_gemm_2(uu, kp, vv, vs, C, mm, vs); break;
#if CDL_WG_RB >= 4
            case 3: cdl_wino_gemm_3(uu, kp, vv, vs, C, mm, vs); break;
            default: cdl_wino_gemm_4(uu, kp, vv, vs, C, mm, vs); break;
#else
            default: cdl_wino_gemm_3(uu, kp, vv, vs, C, mm, vs); break;
#endif
            }
        }
}

/* One output row from its two pair vectors: lanes (s0, s3) in sa, (s1, s2) in
 * sb; adds bias, applies ReLU's rule if relu, and writes columns [0, VF) of y
 * cut at ncol (acc: adds to what they hold, the bits of y + result). */
CDL_CV_INLINE void cdl_wino_orow(cdl_vf sa, cdl_vf sb, cdl_vf bv, int relu, int acc, float *y,
                                 Py_ssize_t ncol) {
    /* (s2, s1) in sw: even lanes s0 + (s1 + s2), odd (s1 - s2) - s3 */
    cdl_vf sw = CDL_SHUF(sb, sb, CDL_WN_SWAP);
    cdl_vf e = sb + sw, d = sw - sb;
    cdl_vf o = CDL_SHUF(sa + e, d - sa, CDL_WN_BLEND) + bv;
    if (relu)
        o = cdl_cv_relu(o);
    cdl_vf_put(y, o, ncol, acc);
}

/* A^T M A for VF/2 tiles side by side: m + pair*ms holds pair `pair` of each;
 * writes output rows y[0], y[1] (NULL past the last row) through
 * cdl_wino_orow. */
static inline void cdl_wino_out(const float *m, Py_ssize_t ms, float bias, int relu, int acc,
                                float *y0, float *y1, Py_ssize_t ncol) {
    cdl_vf a[4], b[4], sa[2], sb[2];
    cdl_vf bv = cdl_vf_bcast(bias);
    int i, r;
    for (i = 0; i < 4; i++) {
        a[i] = cdl_vf_load(m + (2 * i) * ms);
        b[i] = cdl_vf_load(m + (2 * i + 1) * ms);
    }
    sa[0] = a[0] + a[1] + a[2];
    sb[0] = b[0] + b[1] + b[2];
    sa[1] = a[1] - a[2] - a[3];
    sb[1] = b[1] - b[2] - b[3];
    cdl_wino_orow(sa[0], sb[0], bv, relu, acc, y0, ncol);
    if (y1 != NULL)
        cdl_wino_orow(sa[1], sb[1], bv, relu, acc, y1, ncol);
}

/* The same for tiles of 4 output rows: 12 pairs, A'^T (F(4, 3)'s, 4 x 6) down
 * the rows, output rows y[0..3]. */
static inline void cdl_wino_out6(const float *m, Py_ssize_t ms, float bias, int relu, int acc,
                                 float *const y[4], Py_ssize_t ncol) {
    cdl_vf s[2][4];
    cdl_vf bv = cdl_vf_bcast(bias), two = cdl_vf_set1(2.0f), four = cdl_vf_set1(4.0f);
    cdl_vf eight = cdl_vf_set1(8.0f);
    int h, r;
    for (h = 0; h < 2; h++) {
        cdl_vf x0 = cdl_vf_load(m + (0 + h) * ms), x1 = cdl_vf_load(m + (2 + h) * ms);
        cdl_vf x2 = cdl_vf_load(m + (4 + h) * ms), x3 = cdl_vf_load(m + (6 + h) * ms);
        cdl_vf x4 = cdl_vf_load(m + (8 + h) * ms), x5 = cdl_vf_load(m + (10 + h) * ms);
        cdl_vf p = x1 + x2, q = x1 - x2, u = x3 + x4, w = x3 - x4;
        s[h][0] = x0 + p + u;
        s[h][1] = q + two * w;
        s[h][2] = p + four * u;
        s[h][3] = q + eight * w + x5;
    }
    for (r = 0; r < 4 && y[r] != NULL; r++)
        cdl_wino_orow(s[0][r], s[1][r], bv, relu, acc, y[r], ncol);
}

/* d[0, n) = s[0, n), whole vectors then floats. Short rows: no libc call (the
 * register load keeps GCC from turning the loop into memcpy, which took a
 * quarter of the input transform's time). */
static inline void cdl_wino_copy(float *d, const float *s, Py_ssize_t n) {
    Py_ssize_t q = 0;
    for (; q + CDL_VF <= n; q += CDL_VF)
        cdl_vf_store(d + q, cdl_vf_loadr(s + q));
    for (; q < n; q++)
        d[q] = s[q];
}

/* Scratch floats one thread needs for blocks of tr tile rows. */
typedef struct {
    Py_ssize_t N, C, H, W, K, ph, pw, OH, OW;  /* the convolution */
    Py_ssize_t th, npair;        /* output rows a tile (2 or 4); its cell pairs, 2*(th + 2) */
    Py_ssize_t nty, ntx, ntxv;   /* tile rows and columns; vectors per tile row */
    Py_ssize_t kp, tr, vs, nv;   /* K padded to KR; tile rows a block; row length of V and M; GEMM vectors */
    Py_ssize_t wq;               /* padded input row length */
    Py_ssize_t cp, nch;          /* weight gradient: rows of V a pair (C); chunks */
    Py_ssize_t per;              /* scratch floats per thread */
    Py_ssize_t rowbuf;           /* its first part, the row buffers (zeroed once) */
} CdlWino;

/* The forward's blocks for nt threads, tiles of g->th output rows (1: the
 * weight gradient's setup, which then sets its own). */
static void cdl_wino_setup(CdlWino *g, int nt) {
    Py_ssize_t tb, tstar, nb, rows, unit = CDL_VF / 2 * CDL_WG_RB, half = CDL_VF / 2;
    g->npair = 2 * (g->th + 2);
    g->nty = (g->OH + g->th - 1) / g->th;
    g->ntx = (g->OW + 1) / 2;
    g->ntxv = (g->ntx + half - 1) / half;
    g->kp = (g->K + CDL_WG_KR - 1) / CDL_WG_KR * CDL_WG_KR;
    /* Blocks of about 192 KB of V and M (L2), whole GEMM tiles of tiles. */
    tstar = 3072 * 8 / g->npair / (g->C + g->kp) / unit * unit;
    if (tstar < unit)
        tstar = unit;
    g->tr = tstar / g->ntx;
    if (g->tr < 1)
        g->tr = 1;
    /* Blocks of equal size (no bits change: each tile's sums are its own), and
     * where they are few, a whole number of them a thread, so that a small
     * batch's blocks split evenly across the threads (24 tile rows were 9
     * blocks on 2 threads, one thread doing five). */
    rows = g->N * g->nty;
    nb = (rows + g->tr - 1) / g->tr;
    if (nt > 1 && nb % nt && nb < 8 * nt)
        nb = nb > nt ? nb / nt * nt : nt;
    if (nb > 0)
        g->tr = (rows + nb - 1) / nb;
    tb = g->tr * g->ntx;
    g->nv = (2 * tb + CDL_VF - 1) / CDL_VF;
    /* The last tile row's vectors may run past tb: room for them. */
    g->vs = 2 * ((g->tr - 1) * g->ntx + g->ntxv * half);
    if (g->vs < g->nv * CDL_VF)
        g->vs = g->nv * CDL_VF;
    /* Whole cache lines, plus one: rows a power of two apart share cache sets
     * (Zen 2, the 8x8 weight gradient: 1.3x the time without it). */
    g->vs = (g->vs + 15) / 16 * 16 + 16;
    g->wq = (2 * g->ntxv * half + 2 + 15) / 16 * 16;
    g->rowbuf = (g->th * g->tr + 2) * g->wq;
    g->per = g->rowbuf + g->npair * (g->C + g->kp) * g->vs;
}

/* The input transform of tile rows [r0, r1) of the batch (row r: image
 * r / nty, tile row r % nty): pair p of channel c at V + (p*crows + c)*vs,
 * tile t of the block in lanes 2t, 2t + 1. rowbuf: (th*tr + 2)*wq floats,
 * once zeroed. Each channel's rows of an image's tile rows are copied into
 * rowbuf first (padding columns never written, rows outside the image
 * zeroed), then transformed. Rows copied just before their loads (th + 2
 * rotating row buffers) made the loads that straddle the copy's stores wait
 * for them: copying first takes 0.93-0.98x their time, every Winograd part
 * and plane of ResNet-8 at batches 1 and 64. A tile row's last vector may
 * spill into the next row's lanes, which that row then overwrites. */
CDL_CV_INLINE void cdl_wino_vblock_th(const CdlWino *g, const float *x, Py_ssize_t r0,
                                      Py_ssize_t r1, float *rowbuf, float *V, Py_ssize_t crows,
                                      const int TH) {
    Py_ssize_t vs = g->vs, wq = g->wq, r, c, tx0, iy;
    int i;
    const int nrow = TH + 2;
    for (c = 0; c < g->C; c++) {
        for (r = r0; r < r1;) {
            Py_ssize_t n = r / g->nty, ty0 = r % g->nty;
            Py_ssize_t rend = (n + 1) * g->nty < r1 ? (n + 1) * g->nty : r1;
            Py_ssize_t ylo = TH * ty0 - g->ph, yhi = TH * (ty0 + rend - r - 1) - g->ph + nrow;
            const float *xc = x + (n * g->C + c) * g->H * g->W;
            for (iy = ylo; iy < yhi; iy++) {
                float *d = rowbuf + (iy - ylo) * wq + g->pw;
                if (iy >= 0 && iy < g->H)
                    cdl_wino_copy(d, xc + iy * g->W, g->W);
                else
                    memset(d, 0, g->W * sizeof(float));
            }
            for (; r < rend; r++) {
                Py_ssize_t t0 = (r - r0) * g->ntx;
                const float *base = rowbuf + TH * (r % g->nty - ty0) * wq;
                for (tx0 = 0; tx0 < g->ntx; tx0 += CDL_VF / 2) {
                    const float *p[6];
                    for (i = 0; i < nrow; i++)
                        p[i] = base + i * wq + 2 * tx0;
                    if (TH == 2)
                        cdl_wino_in(p, V + c * vs + 2 * (t0 + tx0), crows * vs);
                    else
                        cdl_wino_in6(p, V + c * vs + 2 * (t0 + tx0), crows * vs);
                }
            }
        }
    }
}

/* One copy for each tile height, its row loops unrolled (a shared loop over
 * th + 2 rows took 1.09x the time on 8 x 8 planes). */
static void cdl_wino_vblock(const CdlWino *g, const float *x, Py_ssize_t r0, Py_ssize_t r1,
                            float *rowbuf, float *V, Py_ssize_t crows) {
    if (g->th == 2)
        cdl_wino_vblock_th(g, x, r0, r1, rowbuf, V, crows, 2);
    else
        cdl_wino_vblock_th(g, x, r0, r1, rowbuf, V, crows, 4);
}

/* The output transform of tile rows [r0, r1), channels [ka, kend), from M; TH a
 * constant, as in cdl_wino_vblock. */
CDL_CV_INLINE void cdl_wino_oblock(const CdlWino *g, const float *M, const float *bias, int relu,
                                   int acc, float *out, Py_ssize_t r0, Py_ssize_t r1,
                                   Py_ssize_t ka, Py_ssize_t kend, const int TH) {
    Py_ssize_t vs = g->vs, r, k, tx0;
    int i;
    for (r = r0; r < r1; r++) {
        Py_ssize_t n = r / g->nty, ty = r % g->nty, t0 = (r - r0) * g->ntx;
        for (k = ka; k < kend; k++) {
            float *y0 = out + ((n * g->K + k) * g->OH + TH * ty) * g->OW;
            float b = bias ? bias[k] : 0.0f;
            for (tx0 = 0; tx0 < g->ntx; tx0 += CDL_VF / 2) {
                float *y[4];
                /* rows past the plane: NULL, and so are the ones after them */
                for (i = 0; i < TH; i++)
                    y[i] = TH * ty + i < g->OH ? y0 + i * g->OW + 2 * tx0 : NULL;
                if (TH == 2)
                    cdl_wino_out(M + k * vs + 2 * (t0 + tx0), g->kp * vs, b, relu, acc, y[0],
                                 y[1], g->OW - 2 * tx0);
                else
                    cdl_wino_out6(M + k * vs + 2 * (t0 + tx0), g->kp * vs, b, relu, acc, y,
                                  g->OW - 2 * tx0);
            }
        }
    }
}

/* The forward of tile rows [r0, r1) of the batch, output channels [ka, kb)
 * (multiples of CDL_WG_KR, kb <= kp): out (N x K x OH x OW) from x (N x C x H x
 * W) and U. scratch: g->per floats, the first g->rowbuf once zeroed (lanes of
 * V and M past the last tile are computed, never stored). Each output's sums
 * are its own: any split of rows or channels gives the same bits. */
static void cdl_wino_block(const CdlWino *g, const float *x, const float *U, const float *bias,
                           int relu, int acc, float *out, Py_ssize_t r0, Py_ssize_t r1,
                           Py_ssize_t ka, Py_ssize_t kb, float *scratch) {
    float *V = scratch + g->rowbuf, *M = V + g->npair * g->C * g->vs;
    Py_ssize_t vs = g->vs, kend = kb < g->K ? kb : g->K;
    Py_ssize_t nv = (2 * (r1 - r0) * g->ntx + CDL_VF - 1) / CDL_VF;
    int p;
    cdl_wino_vblock(g, x, r0, r1, scratch, V, g->C);
    for (p = 0; p < g->npair; p++)
        cdl_wino_gemm(U + p * g->C * g->kp * 2, g->kp, V + p * g->C * vs, vs, g->C,
                      M + p * g->kp * vs, nv, ka, kb);
    if (g->th == 2)
        cdl_wino_oblock(g, M, bias, relu, acc, out, r0, r1, ka, kend, 2);
    else
        cdl_wino_oblock(g, M, bias, relu, acc, out, r0, r1, ka, kend, 4);
}

/* ------------------------------------------------------------------------
 * Weight gradient. y = A'^T (U . V) A is linear in U, so dL/dU[cell] =
 * sum_t (A' dy_t A^T)[cell] V_t[cell]: the grad_out tiles' transform (th x 2
 * to (th + 2) x 4, in the same cell pairs) times the input transform, summed
 * over tiles (a GEMM per pair that reduces over lanes), then dW = G'^T dU G. Blocks of
 * tile rows are grouped in chunks fixed by the shapes; each chunk's sums
 * run in block order and chunks are added in order, so the bits do not
 * depend on the thread count.
 * ------------------------------------------------------------------------ */

/* A dy A^T for VF/2 tiles side by side from grad_out rows g0, g1 (columns
 * 2t, 2t + 1 of tile t in lanes 2t, 2t + 1; zero past the plane): pair p to
 * y + p*ys. */
static inline void cdl_wino_gin(cdl_vf g0, cdl_vf g1, float *y, Py_ssize_t ys) {
    cdl_vf a[2], b[2];
    int r;
    for (r = 0; r < 2; r++) {
        cdl_vf v = r ? g1 : g0, sw = CDL_SHUF(v, v, CDL_WN_SWAP);
        a[r] = CDL_SHUF(v, -v, CDL_WN_BLEND);        /* (g0, -g1) */
        b[r] = CDL_SHUF(v + sw, sw - v, CDL_WN_BLEND); /* (g0 + g1, g0 - g1) */
    }
    cdl_vf_store(y + 0 * ys, a[0]);
    cdl_vf_store(y + 1 * ys, b[0]);
    cdl_vf_store(y + 2 * ys, a[0] + a[1]);
    cdl_vf_store(y + 3 * ys, b[0] + b[1]);
    cdl_vf_store(y + 4 * ys, a[0] - a[1]);
    cdl_vf_store(y + 5 * ys, b[0] - b[1]);
    cdl_vf_store(y + 6 * ys, -a[1]);
    cdl_vf_store(y + 7 * ys, -b[1]);
}

/* The same for tiles of 4 rows, from grad_out rows g[0..3]: A' (F(4, 3)'s, 6 x
 * 4) down the rows, 12 pairs. */
static inline void cdl_wino_gin6(const cdl_vf g[4], float *y, Py_ssize_t ys) {
    cdl_vf d[2][4];
    cdl_vf two = cdl_vf_set1(2.0f), four = cdl_vf_set1(4.0f), eight = cdl_vf_set1(8.0f);
    int r, h;
    for (r = 0; r < 4; r++) {
        cdl_vf v = g[r], sw = CDL_SHUF(v, v, CDL_WN_SWAP);
        d[0][r] = CDL_SHUF(v, -v, CDL_WN_BLEND);
        d[1][r] = CDL_SHUF(v + sw, sw - v, CDL_WN_BLEND);
    }
    for (h = 0; h < 2; h++) {
        const cdl_vf *x = d[h];
        cdl_vf e = x[0] + x[2], o = x[1] + x[3];
        cdl_vf e4 = x[0] + four * x[2], o8 = two * x[1] + eight * x[3];
        cdl_vf_store(y + (0 + h) * ys, x[0]);
        cdl_vf_store(y + (2 + h) * ys, e + o);
        cdl_vf_store(y + (4 + h) * ys, e - o);
        cdl_vf_store(y + (6 + h) * ys, e4 + o8);
        cdl_vf_store(y + (8 + h) * ys, e4 - o8);
        cdl_vf_store(y + (10 + h) * ys, x[3]);
    }
}

/* o[0] += the even lanes of v, o[1] += the odd ones (halves, a fixed order). */
CDL_CV_INLINE void cdl_wino_pairsum(cdl_vf v, float *o) {
#if CDL_VF == 16
    v = v + CDL_SHUF(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
#endif
#if CDL_VF >= 8
    v = v + CDL_SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3 CDL_WN_REST4);
#endif
    v = v + CDL_SHUF(v, v, 2, 3, 0, 1 CDL_WN_REST2);
    o[0] += v[0];
    o[1] += v[1];
}

/* out[a*ldk + r*2 + e] += sum over nv vectors of y[a*vs] * v[r*vs], lanes of
 * parity e, a < KR, r < RB. */
static inline __attribute__((always_inline)) void cdl_wino_wtile(
        const float *y, const float *v, Py_ssize_t vs, Py_ssize_t nv, float *out,
        Py_ssize_t ldk, const int KR, const int RB) {
    cdl_vf acc[CDL_WG_KR * CDL_WG_RB], xv[CDL_WG_RB];
    Py_ssize_t q;
    int a, r;
#pragma GCC unroll 24
    for (a = 0; a < KR * RB; a++)
        acc[a] = cdl_vf_set1(0);
    for (q = 0; q < nv * CDL_VF; q += CDL_VF) {
#pragma GCC unroll 8
        for (r = 0; r < RB; r++)
            xv[r] = cdl_vf_loadr(v + r * vs + q);
#pragma GCC unroll 8
        for (a = 0; a < KR; a++) {
            cdl_vf yv = cdl_vf_loadr(y + a * vs + q);
#pragma GCC unroll 8
            for (r = 0; r < RB; r++)
                acc[a * RB + r] += yv * xv[r];
        }
    }
#pragma GCC unroll 8
    for (a = 0; a < KR; a++)
#pragma GCC unroll 8
        for (r = 0; r < RB; r++)
            cdl_wino_pairsum(acc[a * RB + r], out + a * ldk + r * 2);
}

#define CDL_WW_DEF(RB) \
    static void cdl_wino_wgemm_##RB(const float *y, const float *v, Py_ssize_t vs, \
                                    Py_ssize_t nv, float *out, Py_ssize_t ldk) { \
        cdl_wino_wtile(y, v, vs, nv, out, ldk, CDL_WG_KR, RB); }
CDL_WW_DEF(1)
CDL_WW_DEF(2)
CDL_WW_DEF(3)
#if CDL_WG_RB >= 4
CDL_WW_DEF(4)
#endif

/* One pair: out[(k*C + c)*2 + e] += the lane sums, all kp x C. */
static void cdl_wino_wgemm(const float *y, const float *v, Py_ssize_t vs, Py_ssize_t nv,
                           Py_ssize_t kp, Py_ssize_t C, float *out) {
    Py_ssize_t k0, c0;
    for (k0 = 0; k0 < kp; k0 += CDL_WG_KR)
        for (c0 = 0; c0 < C; c0 += CDL_WG_RB) {
            const float *yy = y + k0 * vs, *vv = v + c0 * vs;
            float *o = out + (k0 * C + c0) * 2;
            switch (C - c0 < CDL_WG_RB ? C - c0 : CDL_WG_RB) {
            case 1: cdl_wino_wgemm_1(yy, vv, vs, nv, o, C * 2); break;
            case 2: cdl_wino_wgemm_2(yy, vv, vs, nv, o, C * 2); break;
#if CDL_WG_RB >= 4
            case 3: cdl_wino_wgemm_3(yy, vv, vs, nv, o, C * 2); break;
            default: cdl_wino_wgemm_4(yy, vv, vs, nv, o, C * 2); break;
#else
            default: cdl_wino_wgemm_3(yy, vv, vs, nv, o, C * 2); break;
#endif
            }
        }
}

#ifndef CDL_WINO_WTILES
#define CDL_WINO_WTILES 256
#endif
/* Block and chunk sizes of the weight gradient, tiles of g->th rows: longer
 * blocks than the forward's (each GEMM tile ends in lane sums), C padded to RB. */
static void cdl_wino_wsetup(CdlWino *g) {
    Py_ssize_t tstar, half = CDL_VF / 2, nblocks;
    cdl_wino_setup(g, 1);
    g->cp = g->C;
    tstar = CDL_WINO_WTILES * 8 / g->npair;
    g->tr = tstar / g->ntx;
    if (g->tr < 1)
        g->tr = 1;
    g->nv = (2 * g->tr * g->ntx + CDL_VF - 1) / CDL_VF;
    g->vs = 2 * ((g->tr - 1) * g->ntx + g->ntxv * half);
    if (g->vs < g->nv * CDL_VF)
        g->vs = g->nv * CDL_VF;
    g->vs = (g->vs + 15) / 16 * 16 + 16;
    nblocks = (g->N * g->nty + g->tr - 1) / g->tr;
    g->nch = nblocks < 8 ? nblocks : 8;
    g->rowbuf = (g->th * g->tr + 2) * g->wq;
    g->per = g->rowbuf + g->npair * (g->cp + g->kp) * g->vs;
}

/* Zeroes what the weight gradient's scratch needs zeroed once: the row
 * buffers and grad_out's transforms for channels K..kp-1. */
static void cdl_wino_wzero(const CdlWino *g, float *scratch) {
    float *Y = scratch + g->rowbuf + g->npair * g->cp * g->vs;
    int p;
    memset(scratch, 0, g->rowbuf * sizeof(float));
    for (p = 0; p < g->npair; p++)
        memset(Y + (p * g->kp + g->K) * g->vs, 0, (g->kp - g->K) * g->vs * sizeof(float));
}

/* Chunk ch of the weight gradient: part[((p*kp + k)*cp + c)*2 + e] = its sum
 * for pair p, cell e. scratch: g->per floats, prepared by cdl_wino_wzero. */
static void cdl_wino_wchunk(const CdlWino *g, const float *x, const float *go, Py_ssize_t ch,
                            float *part, float *scratch) {
    Py_ssize_t rows = g->N * g->nty, nblocks = (rows + g->tr - 1) / g->tr;
    Py_ssize_t b0 = ch * nblocks / g->nch, b1 = (ch + 1) * nblocks / g->nch, blk;
    Py_ssize_t vs = g->vs, kp = g->kp, cp = g->cp, half = CDL_VF / 2;
    float *V = scratch + g->rowbuf, *Y = V + g->npair * cp * vs;
    Py_ssize_t r, k, c, tx0, p;
    int i;
    memset(part, 0, 2 * g->npair * kp * cp * sizeof(float));
    for (blk = b0; blk < b1; blk++) {
        Py_ssize_t r0 = blk * g->tr, r1 = r0 + g->tr < rows ? r0 + g->tr : rows;
        Py_ssize_t lanes = 2 * (r1 - r0) * g->ntx;
        Py_ssize_t nv = (lanes + CDL_VF - 1) / CDL_VF;
        cdl_wino_vblock(g, x, r0, r1, scratch, V, cp);
        for (r = r0; r < r1; r++) {
            Py_ssize_t n = r / g->nty, ty = r % g->nty, t0 = (r - r0) * g->ntx;
            for (k = 0; k < g->K; k++) {
                const float *g0 = go + ((n * g->K + k) * g->OH + g->th * ty) * g->OW;
                for (tx0 = 0; tx0 < g->ntx; tx0 += half) {
                    Py_ssize_t col = 2 * tx0, m = g->OW - col;
                    cdl_vf v[4];
                    /* part of a vector past the plane, or rows past it: zeros */
                    for (i = 0; i < g->th; i++) {
                        const float *gi = g0 + i * g->OW + col;
                        v[i] = g->th * ty + i >= g->OH ? cdl_vf_set1(0.0f)
                             : m < CDL_VF ? cdl_vf_loadn(gi, (int)m) : cdl_vf_load(gi);
                    }
                    if (g->th == 2)
                        cdl_wino_gin(v[0], v[1], Y + k * vs + 2 * (t0 + tx0), kp * vs);
                    else
                        cdl_wino_gin6(v, Y + k * vs + 2 * (t0 + tx0), kp * vs);
                }
            }
        }
        /* Lanes past the block's tiles (a row's spill) join the sums: zeros. */
        for (p = 0; p < g->npair; p++) {
            for (c = 0; c < g->C; c++)
                memset(V + (p * cp + c) * vs + lanes, 0, (nv * CDL_VF - lanes) * sizeof(float));
            for (k = 0; k < g->K; k++)
                memset(Y + (p * kp + k) * vs + lanes, 0, (nv * CDL_VF - lanes) * sizeof(float));
        }
        for (p = 0; p < g->npair; p++)
            cdl_wino_wgemm(Y + p * kp * vs, V + p * cp * vs, vs, nv, kp, cp,
                           part + p * kp * cp * 2);
    }
}

/* gw[k, c] (K x C x 3 x 3) = G'^T (sum of the chunks' parts, in order) G. */
static void cdl_wino_wfinish(const CdlWino *g, const float *parts, Py_ssize_t part_size,
                             float *gw, Py_ssize_t k) {
    Py_ssize_t c, ch, kp = g->kp, cp = g->cp;
    int p, e, i, j;
    for (c = 0; c < g->C; c++) {
        double u[24], t[3][4];
        for (p = 0; p < g->npair; p++)
            for (e = 0; e < 2; e++) {
                double s = 0;
                for (ch = 0; ch < g->nch; ch++)
                    s += parts[ch * part_size + ((p * kp + k) * cp + c) * 2 + e];
                u[cdl_wino_cell(p, e)] = s;
            }
        for (j = 0; j < 4; j++) {
            if (g->th == 2) {
                t[0][j] = u[j] + 0.5 * (u[4 + j] + u[8 + j]);
                t[1][j] = 0.5 * (u[4 + j] - u[8 + j]);
                t[2][j] = 0.5 * (u[4 + j] + u[8 + j]) + u[12 + j];
            } else {
                double s12 = u[4 + j] + u[8 + j], d12 = u[4 + j] - u[8 + j];
                double s34 = u[12 + j] + u[16 + j], d34 = u[12 + j] - u[16 + j];
                t[0][j] = 0.25 * u[j] - s12 * (1.0 / 6) + s34 * (1.0 / 24);
                t[1][j] = -d12 * (1.0 / 6) + d34 * (1.0 / 12);
                t[2][j] = (s34 - s12) * (1.0 / 6) + u[20 + j];
            }
        }
        for (i = 0; i < 3; i++) {
            float *d = gw + ((k * g->C + c) * 3 + i) * 3;
            d[0] = (float)(t[i][0] + 0.5 * (t[i][1] + t[i][2]));
            d[1] = (float)(0.5 * (t[i][1] - t[i][2]));
            d[2] = (float)(0.5 * (t[i][1] + t[i][2]) + t[i][3]);
        }
    }
}

#endif
