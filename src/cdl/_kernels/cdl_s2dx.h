/* The input gradient of a 3x3 stride-2 convolution (padding 0 or 1) in one
 * pass, float32 (_conv.pyx, "fused strided input gradient").
 *
 *   dx[c, y, x] = sum_k sum_{i, j} w[k, c, i, j] dy[k, (y + ph - i) / 2, (x + pw - j) / 2]
 *
 * over the taps where both divisions are exact. Input row y = 2u + a takes the
 * kernel rows i with a + ph - i even (one or two), grad_out row u + (a + ph - i) / 2;
 * column x = 2v + b likewise. A register tile holds KR input channels x RB rows
 * of one parity a x one vector of v for both column parities b: per output
 * channel k and tap, RB row loads of grad_out (staged per image with a zero
 * border, so the loads need no bounds checks), KR weight broadcasts and KR*RB
 * multiply-adds, each into the parity its tap reaches. The two parities are
 * then interleaved in registers and stored as whole rows of dx. The phase path
 * it replaces computed each parity pair apart into a buffer of its own and
 * interleaved them in another pass (with its staging and transposes, about
 * half of its time on ResNet-8's stage-2 layer).
 *
 * Each cell sums over k, then its kernel rows in order, then its columns in
 * order, whatever the tile, item or thread: bitwise the same for any thread
 * count and batch size. Cells no tap reaches get 0 (their taps read the zero
 * border).
 */
#ifndef CDL_S2DX_H
#define CDL_S2DX_H

#include "cdl_cvtile.h"

/* Taken without being forced only where measured: the AVX-512 build (Sapphire
 * Rapids, bench/conv_parts.py). */
#if CDL_VREGS >= 32
#define CDL_S2DX_AUTO 1
#define CDL_S2DX_KR 4
#define CDL_S2DX_RB 2
#else
#define CDL_S2DX_AUTO 0
#define CDL_S2DX_KR 2
#define CDL_S2DX_RB 2
#endif

/* Even lanes from a, odd from b: the two halves of the interleaved pair. */
#if CDL_VF == 16
#define CDL_S2_LO 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define CDL_S2_HI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#elif CDL_VF == 8
#define CDL_S2_LO 0, 8, 1, 9, 2, 10, 3, 11
#define CDL_S2_HI 4, 12, 5, 13, 6, 14, 7, 15
#else
#define CDL_S2_LO 0, 4, 1, 5
#define CDL_S2_HI 2, 6, 3, 7
#endif

typedef struct {
    Py_ssize_t C, H, W, K, OH, OW, ph, pw;
    Py_ssize_t hp, wp;        /* rows and columns of the larger parity (a, b = 0) */
    Py_ssize_t sr, sw, sk;    /* staged grad_out: rows, row length, floats a channel */
    int packed;               /* two rows a vector (cdl_s2dx_tile's PACK) */
} CdlS2dx;

#if CDL_VF == 16
/* Planes of at most 8 columns (ResNet-8's 16x16 -> 8x8 layer) waste half of each
 * 16-lane vector of v: there a vector holds two rows of grad_out, staged 8
 * floats a row with nothing between them, and the lanes a shifted load brings
 * from the neighbouring row are masked to zero; the halves of the interleaved
 * pair are then two rows of dx. */
#define CDL_S2DX_PACK 1
#else
#define CDL_S2DX_PACK 0
#endif

static void cdl_s2dx_setup(CdlS2dx *g) {
    Py_ssize_t rows;
    g->hp = (g->H + 1) / 2;
    g->wp = (g->W + 1) / 2;
    g->packed = CDL_S2DX_PACK && g->wp <= CDL_VF / 2 && g->OW <= CDL_VF / 2;
    if (g->packed) {
        rows = (g->hp + 2 * CDL_S2DX_RB - 1) / (2 * CDL_S2DX_RB) * (2 * CDL_S2DX_RB) + 2;
        g->sr = rows > g->OH + 2 ? rows : g->OH + 2;
        g->sw = CDL_VF / 2;
        g->sk = g->sr * g->sw + CDL_VF;   /* the last row's load reads 8 floats past it */
        return;
    }
    /* row u + d (d in -1..1) at staged row u + d + 1; whole tiles of rows and
     * vectors read past the last ones */
    rows = (g->hp + CDL_S2DX_RB - 1) / CDL_S2DX_RB * CDL_S2DX_RB + 2;
    g->sr = rows > g->OH + 2 ? rows : g->OH + 2;
    g->sw = (g->wp + CDL_VF - 1) / CDL_VF * CDL_VF + 2;
    if (g->sw < g->OW + 2)
        g->sw = g->OW + 2;
    g->sw = (g->sw + 15) / 16 * 16;
    g->sk = g->sr * g->sw;
}

/* Floats of scratch one thread needs (zeroed before its first image). */
static Py_ssize_t cdl_s2dx_scratch(const CdlS2dx *g) {
    return g->K * g->sk;
}

/* grad_out's image (K x OH x OW) into the staged buffer's interior; the border
 * stays zero. */
static void cdl_s2dx_stage(const CdlS2dx *g, const float *dy, float *st) {
    Py_ssize_t k, r, q;
    for (k = 0; k < g->K; k++)
        for (r = 0; r < g->OH; r++) {
            const float *s = dy + (k * g->OH + r) * g->OW;
            float *d = st + k * g->sk + (r + 1) * g->sw + (g->packed ? 0 : 1);
            for (q = 0; q + CDL_VF <= g->OW; q += CDL_VF)
                cdl_vf_store(d + q, cdl_vf_loadr(s + q));
            for (; q < g->OW; q++)
                d[q] = s[q];
        }
}

/* Input channels c .. c + KR - 1 (w, dx from channel c on), rows u0 .. u0 + RB - 1
 * of parity a, v0 .. v0 + VF - 1. PACK: two rows a vector, rows u0 + 2r (lanes
 * 0-7) and u0 + 2r + 1 (lanes 8-15), v = lane % 8; a load shifted by dv reads
 * column v + dv of its row, and the lanes where that leaves the row are masked to
 * zero (the columns past OW are staged zeros). */
CDL_CV_INLINE void cdl_s2dx_tile(const CdlS2dx *g, const float *st, const float *w, int a,
                                 Py_ssize_t u0, Py_ssize_t v0, float *dx, Py_ssize_t hpa,
                                 int acc_out, const int KR, const int RB, const int PW,
                                 const int PACK) {
    cdl_vf acc[CDL_S2DX_KR * CDL_S2DX_RB * 2], yv[CDL_S2DX_RB];
    const Py_ssize_t rstep = PACK ? 2 * g->sw : g->sw;
    Py_ssize_t k, C9 = g->C * 9, nrow = 0, i, r;
    Py_ssize_t ri[2], rd[2];
    int j, c, q;
    for (i = 0; i < 3; i++)
        if (((a + g->ph - i) & 1) == 0) {
            ri[nrow] = i;
            rd[nrow] = (a + g->ph - i) / 2;
            nrow++;
        }
#pragma GCC unroll 24
    for (q = 0; q < KR * RB * 2; q++)
        acc[q] = cdl_vf_set1(0);
    for (k = 0; k < g->K; k++) {
        const float *sk = st + k * g->sk + v0 + (PACK ? 0 : 1);
        const float *wk = w + k * C9;
        Py_ssize_t t;
        for (t = 0; t < nrow; t++) {
            const float *rows = sk + (u0 + rd[t] + 1) * g->sw;
            const float *wt = wk + ri[t] * 3;
#pragma GCC unroll 3
            for (j = 0; j < 3; j++) {
                /* column x = 2v + b: (b + PW - j) / 2 columns of grad_out off v */
                const int b = (j + PW) & 1, dv = (b + PW - j) / 2;
#if CDL_S2DX_PACK
                if (PACK) {
                    const __mmask16 m = dv < 0 ? 0xfefe : (dv > 0 ? 0x7f7f : 0xffff);
#pragma GCC unroll 8
                    for (r = 0; r < RB; r++)
                        yv[r] = (cdl_vf)_mm512_maskz_loadu_ps(m, rows + r * rstep + dv);
                } else
#endif
                {
#pragma GCC unroll 8
                    for (r = 0; r < RB; r++)
                        yv[r] = cdl_vf_loadr(rows + r * rstep + dv);
                }
#pragma GCC unroll 8
                for (c = 0; c < KR; c++) {
                    cdl_vf wv = cdl_vf_bcast(wt[c * 9 + j]);
#pragma GCC unroll 8
                    for (r = 0; r < RB; r++)
                        acc[(c * RB + r) * 2 + b] += wv * yv[r];
                }
            }
        }
    }
    for (c = 0; c < KR; c++)
        for (r = 0; r < RB; r++) {
            cdl_vf e = acc[(c * RB + r) * 2], o = acc[(c * RB + r) * 2 + 1];
            /* the pair interleaved: x = 2v0 .. 2v0 + VF - 1, then the next VF */
            cdl_vf half[2];
            int h;
            half[0] = CDL_SHUF(e, o, CDL_S2_LO);
            half[1] = CDL_SHUF(e, o, CDL_S2_HI);
            if (PACK) {
                /* each half is a whole row of at most 16 columns */
                for (h = 0; h < 2; h++) {
                    Py_ssize_t u = u0 + 2 * r + h;
                    if (u >= hpa)
                        break;
                    cdl_vf_put(dx + (c * g->H + 2 * u + a) * g->W, half[h], g->W, acc_out);
                }
                continue;
            }
            if (u0 + r >= hpa)
                break;
            {
                float *row = dx + (c * g->H + 2 * (u0 + r) + a) * g->W + 2 * v0;
                Py_ssize_t n = g->W - 2 * v0;
                for (h = 0; h < 2 && n > 0; h++, row += CDL_VF, n -= CDL_VF)
                    cdl_vf_put(row, half[h], n, acc_out);
            }
        }
}

/* One copy per channel count, horizontal padding and row packing: the parity
 * each tap reaches is then a constant, and the accumulators stay in registers. */
#define CDL_S2DX_DEF(KR) \
    static void cdl_s2dx_tile_##KR(const CdlS2dx *g, const float *st, const float *w, int a, \
                                   Py_ssize_t u0, Py_ssize_t v0, float *dx, Py_ssize_t hpa, \
                                   int acc_out) { \
        if (CDL_S2DX_PACK && g->packed && g->pw) \
            cdl_s2dx_tile(g, st, w, a, u0, v0, dx, hpa, acc_out, KR, CDL_S2DX_RB, 1, 1); \
        else if (CDL_S2DX_PACK && g->packed) \
            cdl_s2dx_tile(g, st, w, a, u0, v0, dx, hpa, acc_out, KR, CDL_S2DX_RB, 0, 1); \
        else if (g->pw) \
            cdl_s2dx_tile(g, st, w, a, u0, v0, dx, hpa, acc_out, KR, CDL_S2DX_RB, 1, 0); \
        else \
            cdl_s2dx_tile(g, st, w, a, u0, v0, dx, hpa, acc_out, KR, CDL_S2DX_RB, 0, 0); }
CDL_S2DX_DEF(1)
CDL_S2DX_DEF(2)
#if CDL_S2DX_KR >= 4
CDL_S2DX_DEF(4)
#endif
#if CDL_S2DX_KR >= 8
CDL_S2DX_DEF(8)
#endif

/* Input channels [c0, c1) of image n's gradient: dx_n (C x H x W) from the
 * staged grad_out st (cdl_s2dx_stage) and the layer's weight (K x C x 3 x 3);
 * acc_out: dx_n += the gradient (the separate sum's bits, dx + result). */
static void cdl_s2dx_channels(const CdlS2dx *g, const float *st, const float *weight,
                              float *dx_n, Py_ssize_t c0, Py_ssize_t c1, int acc_out) {
    Py_ssize_t c = c0;
    int a;
    while (c < c1) {
        Py_ssize_t left = c1 - c;
        int kr = left >= CDL_S2DX_KR ? CDL_S2DX_KR : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const float *w = weight + c * 9;
        float *d = dx_n + c * g->H * g->W;
        for (a = 0; a < 2; a++) {
            Py_ssize_t hpa = (g->H - a + 1) / 2, u0, v0;
            Py_ssize_t ustep = g->packed ? 2 * CDL_S2DX_RB : CDL_S2DX_RB;
            for (u0 = 0; u0 < hpa; u0 += ustep)
                for (v0 = 0; v0 < g->wp; v0 += CDL_VF)
                    switch (kr) {
#if CDL_S2DX_KR >= 8
                    case 8: cdl_s2dx_tile_8(g, st, w, a, u0, v0, d, hpa, acc_out); break;
#endif
#if CDL_S2DX_KR >= 4
                    case 4: cdl_s2dx_tile_4(g, st, w, a, u0, v0, d, hpa, acc_out); break;
#endif
                    case 2: cdl_s2dx_tile_2(g, st, w, a, u0, v0, d, hpa, acc_out); break;
                    default: cdl_s2dx_tile_1(g, st, w, a, u0, v0, d, hpa, acc_out); break;
                    }
        }
        c += kr;
    }
}

#endif
