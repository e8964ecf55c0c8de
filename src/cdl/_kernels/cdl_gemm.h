/* float32 GEMM for the dense layers: C (+)= A B, all operands strided.
 *
 *     C[i, j] (+)= sum_k A[i, k] B[k, j],   X[i, j] at x + i*rs_x + j*cs_x
 *
 * BLIS structure: the reduction is cut into KC blocks; per block B is packed
 * into KC x NR panels (zero-padded past n) and A into mr x KC panels
 * (mr = MR, or what is left at the edge), and a register-blocked microkernel
 * keeps an mr x NR tile of C in vector registers (cdl_simd.h: zmm on AVX-512,
 * ymm on AVX2, xmm on baseline). Transposes are handled in the packing, so one
 * kernel serves X W^T, G W and G^T X. Each C element is summed over k in
 * order within a block, and blocks are added onto C in order: the result
 * depends on the shapes only (not on where a tile starts or on threads).
 * beta_one = 0 overwrites C (it is never read, so garbage in it is harmless).
 * Short reductions walk C by row panels; a single row panel reads B in place.
 * Tile shapes were measured on Zen 5 (AVX-512 14 x 32 ~ 12 x 32 ~ 8 x 48 >
 * 6 x 64; KC 128-384 within noise) and Sapphire Rapids (14 x 32 > 6 x 64 ~
 * 8 x 48, 1 thread, with cdl_vf_bcast). cdl_sdot_nt below serves X W^T with
 * few outputs.
 */
#ifndef CDL_GEMM_H
#define CDL_GEMM_H

#include <stddef.h>
#include "cdl_simd.h"

#if defined(CDL_GEMM_MR)
/* given on the command line (tuning runs; CDL_GEMM_NV too) */
#elif defined(__AVX512F__)
#define CDL_GEMM_MR 14
#define CDL_GEMM_NV 2
#elif defined(__AVX__)
#define CDL_GEMM_MR 6
#define CDL_GEMM_NV 2
#else
#define CDL_GEMM_MR 6
#define CDL_GEMM_NV 2
#endif
#define CDL_GEMM_NR (CDL_GEMM_NV * CDL_VF)
#ifndef CDL_GEMM_KC
#define CDL_GEMM_KC 256
#endif
/* Rows of A packed at once: the whole A block stays in L2. */
#define CDL_GEMM_MC (CDL_GEMM_MR * (256 / CDL_GEMM_MR))
/* Columns of B packed at once (KC x NC floats, 1 MiB). */
#define CDL_GEMM_NC 1024

/* Packed B blocks up to this many floats (64 KiB) are walked row panel first. */
#define CDL_GEMM_ROWWISE (16 * 1024)

typedef ptrdiff_t cdl_idx;

/* Floats of packing scratch one thread needs for an m x n x k product. */
static inline cdl_idx cdl_sgemm_scratch(cdl_idx m, cdl_idx n, cdl_idx k) {
    cdl_idx kc = k < CDL_GEMM_KC ? k : CDL_GEMM_KC;
    cdl_idx mc = m < CDL_GEMM_MC ? m : CDL_GEMM_MC;
    cdl_idx nc = n < CDL_GEMM_NC ? n : CDL_GEMM_NC;
    nc = (nc + CDL_GEMM_NR - 1) / CDL_GEMM_NR * CDL_GEMM_NR;
    if (kc < 1) kc = 1;
    /* B first; A starts on a cache line. */
    return (kc * nc + 15) / 16 * 16 + mc * kc + 16;
}

/* dst[k*ldd + i] = src[i*lds + k] for i < ni, k < nk: 4 x 4 blocks through
 * SSE shuffles (strided scalar stores were a third of the time of X W^T). */
static inline void cdl_gemm_transpose_copy(cdl_idx ni, cdl_idx nk, const float *src, cdl_idx lds,
                                           float *dst, cdl_idx ldd) {
    cdl_idx i = 0, k;
#if defined(__SSE2__)
    for (; i + 4 <= ni; i += 4) {
        const float *s = src + i * lds;
        for (k = 0; k + 4 <= nk; k += 4) {
            __m128 r0 = _mm_loadu_ps(s + k), r1 = _mm_loadu_ps(s + lds + k);
            __m128 r2 = _mm_loadu_ps(s + 2 * lds + k), r3 = _mm_loadu_ps(s + 3 * lds + k);
            _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
            _mm_storeu_ps(dst + k * ldd + i, r0);
            _mm_storeu_ps(dst + (k + 1) * ldd + i, r1);
            _mm_storeu_ps(dst + (k + 2) * ldd + i, r2);
            _mm_storeu_ps(dst + (k + 3) * ldd + i, r3);
        }
        for (; k < nk; k++) {
            dst[k * ldd + i] = s[k];
            dst[k * ldd + i + 1] = s[lds + k];
            dst[k * ldd + i + 2] = s[2 * lds + k];
            dst[k * ldd + i + 3] = s[3 * lds + k];
        }
    }
#endif
    for (; i < ni; i++)
        for (k = 0; k < nk; k++)
            dst[k * ldd + i] = src[i * lds + k];
}

/* mc x kc block of A into panels of MR rows: panel p at buf + p*MR*kc, each
 * k holding mr consecutive floats (mr < MR only in the last panel). */
static inline void cdl_gemm_pack_a(cdl_idx mc, cdl_idx kc, const float *a,
                                   cdl_idx rs, cdl_idx cs, float *buf) {
    cdl_idx p, i, k;
    for (p = 0; p < mc; p += CDL_GEMM_MR) {
        cdl_idx mr = mc - p < CDL_GEMM_MR ? mc - p : CDL_GEMM_MR;
        const float *ap = a + p * rs;
        float *dst = buf + p * kc;
        if (rs == 1) {
            for (k = 0; k < kc; k++)
                for (i = 0; i < mr; i++)
                    dst[k * mr + i] = ap[k * cs + i];
        } else if (cs == 1) {
            cdl_gemm_transpose_copy(mr, kc, ap, rs, dst, mr);
        } else {
            for (i = 0; i < mr; i++)
                for (k = 0; k < kc; k++)
                    dst[k * mr + i] = ap[i * rs + k * cs];
        }
    }
}

/* kc x nc block of B into panels of NR columns, zero-padded past nc. */
static inline void cdl_gemm_pack_b(cdl_idx kc, cdl_idx nc, const float *b,
                                   cdl_idx rs, cdl_idx cs, float *buf) {
    cdl_idx q, j, k;
    for (q = 0; q < nc; q += CDL_GEMM_NR) {
        cdl_idx nr = nc - q < CDL_GEMM_NR ? nc - q : CDL_GEMM_NR;
        const float *bp = b + q * cs;
        float *dst = buf + q * kc;
        if (cs == 1 && nr == CDL_GEMM_NR) {
            for (k = 0; k < kc; k++) {
                int v;
                for (v = 0; v < CDL_GEMM_NV; v++)
                    cdl_vf_store(dst + k * CDL_GEMM_NR + v * CDL_VF,
                                 cdl_vf_load(bp + k * rs + v * CDL_VF));
            }
        } else if (rs == 1) {
            cdl_gemm_transpose_copy(nr, kc, bp, cs, dst, CDL_GEMM_NR);
            for (k = 0; k < kc; k++)
                for (j = nr; j < CDL_GEMM_NR; j++)
                    dst[k * CDL_GEMM_NR + j] = 0.0f;
        } else {
            for (k = 0; k < kc; k++) {
                for (j = 0; j < nr; j++)
                    dst[k * CDL_GEMM_NR + j] = bp[k * rs + j * cs];
                for (; j < CDL_GEMM_NR; j++)
                    dst[k * CDL_GEMM_NR + j] = 0.0f;
            }
        }
    }
}

/* ReLU's rule on a finished value (v <= 0 gives +0, NaN passes): bitwise the
 * result of _elementwise's relu_forward applied to it. */
static inline float cdl_gemm_relu1(float v) {
    return v <= 0.0f ? 0.0f : v;
}

static inline cdl_vf cdl_gemm_relu(cdl_vf y) {
    typedef int cdl_vi __attribute__((vector_size(CDL_VF * 4)));
    cdl_vi m = (y <= cdl_vf_set1(0.0f));
    return (cdl_vf)((cdl_vi)y & ~m);
}

/* The mr x NR microkernel over one packed panel pair. Always inlined with a
 * constant mr, so the accumulators become registers. relu: ReLU on the values
 * stored (the caller sets it on the last block of the reduction only). */
static inline __attribute__((always_inline)) void
cdl_gemm_ukr(const int mr, cdl_idx kc, const float *restrict ap, const float *restrict bp,
             cdl_idx ldb, float *restrict c, cdl_idx rs_c, cdl_idx cs_c, cdl_idx nr, int beta_one,
             int relu) {
    cdl_vf acc[CDL_GEMM_MR][CDL_GEMM_NV];
    cdl_idx k;
    int i, v;
    for (i = 0; i < mr; i++)
        for (v = 0; v < CDL_GEMM_NV; v++)
            acc[i][v] = cdl_vf_set1(0.0f);
    for (k = 0; k < kc; k++) {
        cdl_vf b[CDL_GEMM_NV];
        for (v = 0; v < CDL_GEMM_NV; v++)
            b[v] = cdl_vf_loadr(bp + v * CDL_VF);
        for (i = 0; i < mr; i++) {
            /* Keeps a -0 of A (cdl_vf_set1 made it +0, at 0.6x the speed on
             * Sapphire Rapids): the same values but for zeros' signs after an
             * FMA underflow and which of two NaNs propagates. */
            cdl_vf a = cdl_vf_bcast(ap[i]);
            for (v = 0; v < CDL_GEMM_NV; v++)
                acc[i][v] += a * b[v];
        }
        ap += mr;
        bp += ldb;
    }
    if (cs_c == 1 && nr == CDL_GEMM_NR) {
        for (i = 0; i < mr; i++)
            for (v = 0; v < CDL_GEMM_NV; v++) {
                float *cp = c + i * rs_c + v * CDL_VF;
                cdl_vf y = beta_one ? cdl_vf_load(cp) + acc[i][v] : acc[i][v];
                cdl_vf_store(cp, relu ? cdl_gemm_relu(y) : y);
            }
    } else {
        float t[CDL_GEMM_MR * CDL_GEMM_NR];
        cdl_idx j;
        for (i = 0; i < mr; i++)
            for (v = 0; v < CDL_GEMM_NV; v++)
                cdl_vf_store(t + i * CDL_GEMM_NR + v * CDL_VF, acc[i][v]);
        for (i = 0; i < mr; i++)
            for (j = 0; j < nr; j++) {
                float *cp = c + i * rs_c + j * cs_c;
                float y = beta_one ? *cp + t[i * CDL_GEMM_NR + j] : t[i * CDL_GEMM_NR + j];
                *cp = relu ? cdl_gemm_relu1(y) : y;
            }
    }
}

#define CDL_GEMM_CASE(r) \
    case r: cdl_gemm_ukr(r, kc, ap, bp, ldb, c, rs_c, cs_c, nr, beta_one, relu); break;

static void cdl_gemm_ukr_any(int mr, cdl_idx kc, const float *ap, const float *bp,
                             cdl_idx ldb, float *c, cdl_idx rs_c, cdl_idx cs_c, cdl_idx nr, int beta_one,
                             int relu) {
    switch (mr) {
    CDL_GEMM_CASE(1) CDL_GEMM_CASE(2) CDL_GEMM_CASE(3) CDL_GEMM_CASE(4)
    CDL_GEMM_CASE(5) CDL_GEMM_CASE(6)
#if CDL_GEMM_MR > 6
    CDL_GEMM_CASE(7) CDL_GEMM_CASE(8) CDL_GEMM_CASE(9) CDL_GEMM_CASE(10)
    CDL_GEMM_CASE(11) CDL_GEMM_CASE(12) CDL_GEMM_CASE(13) CDL_GEMM_CASE(14)
#endif
    default: break;
    }
}
#undef CDL_GEMM_CASE

static inline void cdl_gemm_tile(int mr, cdl_idx kc, const float *ap, const float *bp,
                                 cdl_idx ldb, float *c, cdl_idx rs_c, cdl_idx cs_c, cdl_idx nr,
                                 int beta, int relu) {
    if (mr == CDL_GEMM_MR && ldb == CDL_GEMM_NR)
        cdl_gemm_ukr(CDL_GEMM_MR, kc, ap, bp, CDL_GEMM_NR, c, rs_c, cs_c, nr, beta, relu);
    else
        cdl_gemm_ukr_any(mr, kc, ap, bp, ldb, c, rs_c, cs_c, nr, beta, relu);
}

/* C (+)= A B for an m x n x k product; scratch holds cdl_sgemm_scratch(m, n, k)
 * floats. k == 0 leaves C alone when beta_one, else zeroes it. relu: ReLU on C
 * as the last block of the reduction stores it (so C = relu(C (+) A B) exactly;
 * with k == 0 the caller applies it). */
static void cdl_sgemm(cdl_idx m, cdl_idx n, cdl_idx k,
                      const float *a, cdl_idx rs_a, cdl_idx cs_a,
                      const float *b, cdl_idx rs_b, cdl_idx cs_b,
                      float *c, cdl_idx rs_c, cdl_idx cs_c, int beta_one, int relu,
                      float *scratch) {
    cdl_idx jc, pc, ic, jr, ir, kcap = k < CDL_GEMM_KC ? k : CDL_GEMM_KC;
    cdl_idx ncap = n < CDL_GEMM_NC ? n : CDL_GEMM_NC;
    float *bbuf, *abuf;
    if (m <= 0 || n <= 0)
        return;
    if (k <= 0) {
        if (!beta_one)
            for (ir = 0; ir < m; ir++)
                for (jr = 0; jr < n; jr++)
                    c[ir * rs_c + jr * cs_c] = 0.0f;
        return;
    }
    ncap = (ncap + CDL_GEMM_NR - 1) / CDL_GEMM_NR * CDL_GEMM_NR;
    bbuf = (float *)(((size_t)scratch + 63) & ~(size_t)63);
    abuf = bbuf + (kcap * ncap + 15) / 16 * 16;
    for (jc = 0; jc < n; jc += CDL_GEMM_NC) {
        cdl_idx nc = n - jc < CDL_GEMM_NC ? n - jc : CDL_GEMM_NC;
        for (pc = 0; pc < k; pc += CDL_GEMM_KC) {
            cdl_idx kc = k - pc < CDL_GEMM_KC ? k - pc : CDL_GEMM_KC;
            int beta = beta_one || pc > 0;
            int rl = relu && pc + kc >= k;
            /* One row panel uses each B panel once: read B in place. */
            int direct = m <= CDL_GEMM_MR && cs_b == 1 && kc * nc > CDL_GEMM_ROWWISE;
            if (!direct)
                cdl_gemm_pack_b(kc, nc, b + pc * rs_b + jc * cs_b, rs_b, cs_b, bbuf);
            for (ic = 0; ic < m; ic += CDL_GEMM_MC) {
                cdl_idx mc = m - ic < CDL_GEMM_MC ? m - ic : CDL_GEMM_MC;
                cdl_gemm_pack_a(mc, kc, a + ic * rs_a + pc * cs_a, rs_a, cs_a, abuf);
                if (kc * nc <= CDL_GEMM_ROWWISE) {
                    /* Short reduction: walk C row panel by row panel, so its
                     * rows stream (C rows 4 KiB apart alias in L1 when a
                     * column panel's tiles are stored one below the other). */
                    for (ir = 0; ir < mc; ir += CDL_GEMM_MR) {
                        int mr = mc - ir < CDL_GEMM_MR ? (int)(mc - ir) : CDL_GEMM_MR;
                        for (jr = 0; jr < nc; jr += CDL_GEMM_NR)
                            cdl_gemm_tile(mr, kc, abuf + ir * kc, bbuf + jr * kc, CDL_GEMM_NR,
                                          c + (ic + ir) * rs_c + (jc + jr) * cs_c, rs_c, cs_c,
                                          nc - jr < CDL_GEMM_NR ? nc - jr : CDL_GEMM_NR, beta, rl);
                    }
                } else {
                    for (jr = 0; jr < nc; jr += CDL_GEMM_NR) {
                        cdl_idx nr = nc - jr < CDL_GEMM_NR ? nc - jr : CDL_GEMM_NR;
                        const float *bp = bbuf + jr * kc;
                        cdl_idx ldb = CDL_GEMM_NR;
                        if (direct && nr == CDL_GEMM_NR) {
                            bp = b + pc * rs_b + jc + jr;
                            ldb = rs_b;
                        } else if (direct) {
                            bp = bbuf;
                            cdl_gemm_pack_b(kc, nr, b + pc * rs_b + jc + jr, rs_b, 1, bbuf);
                        }
                        for (ir = 0; ir < mc; ir += CDL_GEMM_MR)
                            cdl_gemm_tile(mc - ir < CDL_GEMM_MR ? (int)(mc - ir) : CDL_GEMM_MR,
                                          kc, abuf + ir * kc, bp, ldb,
                                          c + (ic + ir) * rs_c + (jc + jr) * cs_c, rs_c, cs_c,
                                          nr, beta, rl);
                    }
                }
            }
        }
    }
}

/* Few outputs per row (C = A B^T with n below one microkernel's width, as in
 * a 4096 -> 10 layer): dot products along k, both operands read in place
 * (rows of A and B are contiguous in k), no packing. An ri x rj block of C
 * keeps one vector accumulator per element; the lanes are added in a fixed
 * order, then the k % VF tail in order. */
#if CDL_VREGS >= 32
#define CDL_DOT_RI 4
#else
#define CDL_DOT_RI 2
#endif
#define CDL_DOT_RJ 5

static inline __attribute__((always_inline)) void
cdl_dot_block(const int ri, const int rj, cdl_idx k, const float *restrict a, cdl_idx lda,
              const float *restrict b, cdl_idx ldb, float *restrict c, cdl_idx ldc,
              int beta_one, int relu) {
    cdl_vf acc[CDL_DOT_RI][CDL_DOT_RJ];
    cdl_idx p, kv = k / CDL_VF * CDL_VF;
    int i, j;
    for (i = 0; i < ri; i++)
        for (j = 0; j < rj; j++)
            acc[i][j] = cdl_vf_set1(0.0f);
    for (p = 0; p < kv; p += CDL_VF) {
        cdl_vf x[CDL_DOT_RI];
        for (i = 0; i < ri; i++)
            x[i] = cdl_vf_loadr(a + i * lda + p);
        for (j = 0; j < rj; j++) {
            cdl_vf w = cdl_vf_load(b + j * ldb + p);
            for (i = 0; i < ri; i++)
                acc[i][j] += x[i] * w;
        }
    }
    for (i = 0; i < ri; i++)
        for (j = 0; j < rj; j++) {
            float t = cdl_vf_sum(acc[i][j]);
            for (p = kv; p < k; p++)
                t += a[i * lda + p] * b[j * ldb + p];
            t = beta_one ? c[i * ldc + j] + t : t;
            c[i * ldc + j] = relu ? cdl_gemm_relu1(t) : t;
        }
}

#define CDL_DOT_J(ri, rj) \
    case rj: cdl_dot_block(ri, rj, k, a, lda, b, ldb, c, ldc, beta_one, relu); break;
#define CDL_DOT_I(ri) \
    case ri: switch (rj) { CDL_DOT_J(ri, 1) CDL_DOT_J(ri, 2) CDL_DOT_J(ri, 3) \
                           CDL_DOT_J(ri, 4) CDL_DOT_J(ri, 5) default: break; } break;

static void cdl_dot_any(int ri, int rj, cdl_idx k, const float *a, cdl_idx lda,
                        const float *b, cdl_idx ldb, float *c, cdl_idx ldc, int beta_one,
                        int relu) {
    switch (ri) {
    CDL_DOT_I(1) CDL_DOT_I(2)
#if CDL_DOT_RI > 2
    CDL_DOT_I(3) CDL_DOT_I(4)
#endif
    default: break;
    }
}
#undef CDL_DOT_I
#undef CDL_DOT_J

/* C[i, j] (+)= sum_k A[i, k] B[j, k]: A m x k and B n x k row-major, C m x n;
 * relu: ReLU on each stored value. */
static void cdl_sdot_nt(cdl_idx m, cdl_idx n, cdl_idx k, const float *a, cdl_idx lda,
                        const float *b, cdl_idx ldb, float *c, cdl_idx ldc, int beta_one,
                        int relu) {
    cdl_idx i, j;
    for (i = 0; i < m; i += CDL_DOT_RI) {
        int ri = m - i < CDL_DOT_RI ? (int)(m - i) : CDL_DOT_RI;
        for (j = 0; j < n; j += CDL_DOT_RJ) {
            int rj = n - j < CDL_DOT_RJ ? (int)(n - j) : CDL_DOT_RJ;
            const float *ap = a + i * lda, *bp = b + j * ldb;
            float *cp = c + i * ldc + j;
            if (ri == CDL_DOT_RI && rj == CDL_DOT_RJ)
                cdl_dot_block(CDL_DOT_RI, CDL_DOT_RJ, k, ap, lda, bp, ldb, cp, ldc, beta_one, relu);
            else
                cdl_dot_any(ri, rj, k, ap, lda, bp, ldb, cp, ldc, beta_one, relu);
        }
    }
}
/* ------------------------------------------------------------------------
 * The machine's multiply-add peak, for the benchmarks (bench/bench_peak.py):
 * each thread runs 12 independent vector multiply-add chains that stay in
 * registers (12 chains cover the latency x throughput of two FMA pipes) for
 * about `seconds`, and the threads' rates are summed. Built per instruction
 * set like the kernels: zmm FMAs on AVX-512, ymm FMAs on AVX2, and on the
 * baseline build SSE multiplies and adds (no FMA there), so it is the peak of
 * the build that runs. Counts 2 flops per lane per multiply-add.
 * ------------------------------------------------------------------------ */
#include <time.h>
#include "cdl_omp.h"

static inline double cdl_peak_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* One asm statement naming all 12 chains keeps each in its own register (one
 * statement per chain made GCC route them all through one register and spill). */
#if defined(__GNUC__) && defined(__AVX512F__)
#define CDL_PEAK_R "+v"
#elif defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define CDL_PEAK_R "+x"
#endif
#ifdef CDL_PEAK_R
#define CDL_PEAK_KEEP12() __asm__("" : CDL_PEAK_R(a0), CDL_PEAK_R(a1), CDL_PEAK_R(a2), \
    CDL_PEAK_R(a3), CDL_PEAK_R(a4), CDL_PEAK_R(a5), CDL_PEAK_R(a6), CDL_PEAK_R(a7), \
    CDL_PEAK_R(a8), CDL_PEAK_R(a9), CDL_PEAK_R(a10), CDL_PEAK_R(a11))
#else
#define CDL_PEAK_KEEP12() ((void)0)
#endif

/* Naturally aligned, unlike cdl_vf: an asm operand of an under-aligned vector
 * type is kept in memory. */
typedef float cdl_peak_v __attribute__((vector_size(CDL_VF * 4)));

/* iters steps of the 12 chains in st[0..11]; not inlined, so that the timer
 * calls between chunks do not make GCC keep the chains in memory. */
static __attribute__((noinline)) void cdl_peak_chunk(cdl_peak_v *st, long iters) {
    cdl_peak_v a0 = st[0], a1 = st[1], a2 = st[2], a3 = st[3], a4 = st[4], a5 = st[5],
               a6 = st[6], a7 = st[7], a8 = st[8], a9 = st[9], a10 = st[10], a11 = st[11];
    cdl_peak_v m = st[12], c = st[13];
    long k;
    for (k = 0; k < iters; k++) {
        a0 = a0 * m + c; a1 = a1 * m + c; a2 = a2 * m + c; a3 = a3 * m + c;
        a4 = a4 * m + c; a5 = a5 * m + c; a6 = a6 * m + c; a7 = a7 * m + c;
        a8 = a8 * m + c; a9 = a9 * m + c; a10 = a10 * m + c; a11 = a11 * m + c;
        CDL_PEAK_KEEP12();
    }
    st[0] = a0; st[1] = a1; st[2] = a2; st[3] = a3; st[4] = a4; st[5] = a5;
    st[6] = a6; st[7] = a7; st[8] = a8; st[9] = a9; st[10] = a10; st[11] = a11;
}

static double cdl_fma_peak_thread(double seconds) {
    cdl_peak_v st[14];
    double t0, t;
    long n = 0;
    int i;
    float out[CDL_VF];
    /* x -> x * 0.999 + 0.001 converges to 1: no overflow, no denormals. */
    for (i = 0; i < 12; i++)
        st[i] = (cdl_peak_v){0} + (float)i;
    st[12] = (cdl_peak_v){0} + 0.999f;
    st[13] = (cdl_peak_v){0} + 0.001f;
    cdl_peak_chunk(st, 1 << 12);   /* warm-up: clocks and the vector unit up */
    t0 = cdl_peak_now();
    do {
        cdl_peak_chunk(st, 1 << 14);
        n += 1 << 14;
        t = cdl_peak_now() - t0;
    } while (t < seconds);
    /* The sums are used, so the chains are not dropped. */
    for (i = 1; i < 12; i++)
        st[0] += st[i];
    __builtin_memcpy(out, &st[0], sizeof(out));
    if (out[0] == 12345.f)
        t += 1e-300;
    return 2.0 * CDL_VF * 12.0 * (double)n / t;
}

/* Summed multiply-add rate of num_threads threads (flop/s). */
static double cdl_fma_peak(double seconds, int num_threads) {
    double total = 0;
    int t;
    double rate[256];
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 256) num_threads = 256;
    for (t = 0; t < num_threads; t++) rate[t] = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
    rate[omp_get_thread_num()] = cdl_fma_peak_thread(seconds);
#else
    rate[0] = cdl_fma_peak_thread(seconds);
#endif
    for (t = 0; t < num_threads; t++) total += rate[t];
    return total;
}
#endif
