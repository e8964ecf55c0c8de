/* Register tiles of the channel-vector conv kernels (_conv.pyx, "channel-vector
 * path"), one copy per tile shape.
 *
 * A tile holds A x B x V vector accumulators: A pointers into the staged
 * input, B adjacent columns at constant offsets from each pointer, V vectors of
 * output channels. Each step loads V channel vectors, broadcasts A*B input
 * values and does A*B*V multiply-adds; with A pointers in general registers
 * and the columns as constant offsets no broadcast needs an address reload.
 * Kept in C so that every shape is compiled with A, B, V as constants (loops
 * unrolled, accumulators in registers): GCC neither inlines nor clones a
 * Cython helper for ~30 constant argument sets.
 */
#ifndef CDL_CVTILE_H
#define CDL_CVTILE_H

#include "cdl_simd.h"

#define CDL_CV_INLINE static inline __attribute__((always_inline))

/* am[a*am_a + b*kp + v*VF + l] += sum_{y, x} xs[poff[a] + b + y*rstep + x*sw]
 *                                   * gt[(y*ow + x)*kp + v*VF + l]
 * (weight gradient: A (c, i) pairs x B kernel columns x V channel vectors). */
CDL_CV_INLINE void cdl_cv_wtile(const float *xs, const Py_ssize_t *poff, Py_ssize_t oh,
                                Py_ssize_t ow, Py_ssize_t rstep, Py_ssize_t sw,
                                const float *gt, Py_ssize_t kp, float *am, Py_ssize_t am_a,
                                const int A, const int B, const int V) {
    cdl_vf acc[A * B * V], gv[V];
    const float *pt[A];
    const float *g = gt;
    Py_ssize_t y, x;
    int a, b, v;
    for (a = 0; a < A; a++)
        for (b = 0; b < B; b++)
            for (v = 0; v < V; v++)
                acc[(a * B + b) * V + v] = cdl_vf_load(am + a * am_a + b * kp + v * CDL_VF);
    /* Row by row over the output positions. 8- and 16-wide outputs at stride 1
       or 2 (ResNet's later stages) get a loop of constant trip count and stride,
       unrolled: the short variable-length loop and its exit cost ~20% of an 8x8
       tile's time. The sums run in the same order either way. Not with 16
       vector registers: unrolled, GCC shares broadcasts between neighbouring
       columns and spills accumulators to the stack inside the loop (AVX2 on
       Zen 2, C32->K32 16x16 weight gradient: 85 GFLOP/s unrolled, 157 not). */
#define CDL_CV_WROWS(OWC, SWC)                                              \
        for (y = 0; y < oh; y++) {                                          \
            for (a = 0; a < A; a++)                                         \
                pt[a] = xs + poff[a] + y * rstep;                           \
            for (x = 0; x < (OWC); x++, g += kp) {                          \
                for (v = 0; v < V; v++)                                     \
                    gv[v] = cdl_vf_loadr(g + v * CDL_VF);                   \
                for (a = 0; a < A; a++)                                     \
                    for (b = 0; b < B; b++) {                               \
                        cdl_vf bv = cdl_vf_bcast(pt[a][x * (SWC) + b]);     \
                        for (v = 0; v < V; v++)                             \
                            acc[(a * B + b) * V + v] += bv * gv[v];         \
                    }                                                       \
            }                                                               \
        }
#if CDL_VREGS >= 32
    if (ow == 8 && sw == 1) {
        CDL_CV_WROWS(8, 1)
    } else if (ow == 16 && sw == 1) {
        CDL_CV_WROWS(16, 1)
    } else if (ow == 8 && sw == 2) {
        CDL_CV_WROWS(8, 2)
    } else if (ow == 16 && sw == 2) {
        CDL_CV_WROWS(16, 2)
    } else {
        CDL_CV_WROWS(ow, sw)
    }
#else
    CDL_CV_WROWS(ow, sw)
#endif
    for (a = 0; a < A; a++)
        for (b = 0; b < B; b++)
            for (v = 0; v < V; v++)
                cdl_vf_store(am + a * am_a + b * kp + v * CDL_VF, acc[(a * B + b) * V + v]);
#undef CDL_CV_WROWS
}

/* tb[((a*B + b)*V + v)*VF + l] = sum_r xs[prow[a] + b + roff[r]] * wt[r*kp + v*VF + l]
 * (forward: A output rows x B adjacent output columns x V channel vectors). */
CDL_CV_INLINE void cdl_cv_ftile(const float *xs, const Py_ssize_t *prow, const Py_ssize_t *roff,
                                Py_ssize_t nr, const float *wt, Py_ssize_t kp, float *tb,
                                const int A, const int B, const int V) {
    cdl_vf acc[A * B * V], gv[V];
    const float *pt[A];
    const float *w = wt;
    Py_ssize_t r, o;
    int a, b, v;
    for (a = 0; a < A; a++)
        pt[a] = xs + prow[a];
    for (a = 0; a < A * B * V; a++)
        acc[a] = cdl_vf_set1(0);
    for (r = 0; r < nr; r++, w += kp) {
        o = roff[r];
        for (v = 0; v < V; v++)
            gv[v] = cdl_vf_loadr(w + v * CDL_VF);
        for (a = 0; a < A; a++)
            for (b = 0; b < B; b++) {
                cdl_vf bv = cdl_vf_bcast(pt[a][o + b]);
                for (v = 0; v < V; v++)
                    acc[(a * B + b) * V + v] += bv * gv[v];
            }
    }
    for (a = 0; a < A * B * V; a++)
        cdl_vf_store(tb + a * CDL_VF, acc[a]);
}

/* A for the tile of B columns x V vectors: A*B*V accumulators, V channel
 * vectors and a broadcast within the vector registers; A <= 10 pointers. */
static inline int cdl_cv_rows(int v, int b) {
#if CDL_VREGS >= 32
    static const int t[4][5] = {{10, 10, 8, 6, 5}, {10, 6, 4, 3, 2},
                                {8, 4, 2, 2, 1}, {6, 3, 2, 1, 1}};
#else
    static const int t[4][5] = {{8, 6, 4, 3, 2}, {6, 3, 2, 1, 1}, {1, 1, 1, 1, 1}, {1, 1, 1, 1, 1}};
#endif
    return t[v - 1][b - 1];
}

/* Largest V the build uses. */
#if CDL_VREGS >= 32
#define CDL_CV_VMAX 4
#else
#define CDL_CV_VMAX 2
#endif

#if defined(__AVX__)
/* Eight rows s, s + p, ... (rows m.. of the block read as zeros) of 8 floats,
 * transposed: column c of the block goes to d + c * kp, its first m floats. */
static inline void cdl_cv_transpose8(const float *s, Py_ssize_t p, Py_ssize_t m, float *d,
                                     Py_ssize_t kp) {
    __m256 z = _mm256_setzero_ps();
    __m256 r0v = _mm256_loadu_ps(s);
    __m256 r1 = m > 1 ? _mm256_loadu_ps(s + p) : z, r2 = m > 2 ? _mm256_loadu_ps(s + 2 * p) : z;
    __m256 r3 = m > 3 ? _mm256_loadu_ps(s + 3 * p) : z, r4 = m > 4 ? _mm256_loadu_ps(s + 4 * p) : z;
    __m256 r5 = m > 5 ? _mm256_loadu_ps(s + 5 * p) : z, r6 = m > 6 ? _mm256_loadu_ps(s + 6 * p) : z;
    __m256 r7 = m > 7 ? _mm256_loadu_ps(s + 7 * p) : z;
    __m256 t0 = _mm256_unpacklo_ps(r0v, r1), t1 = _mm256_unpackhi_ps(r0v, r1);
    __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    __m256 o[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                   _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                   _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                   _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
    int c;
    if (m == 8) {
        for (c = 0; c < 8; c++)
            _mm256_storeu_ps(d + c * kp, o[c]);
    } else {
        /* First m lanes set (loaded, not compared: AVX has no 256-bit integer compare). */
        static const int ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
        __m256i mask = _mm256_loadu_si256((const __m256i *)(ones + 8 - m));
        for (c = 0; c < 8; c++)
            _mm256_maskstore_ps(d + c * kp, mask, o[c]);
    }
}
#endif

/* dst[c*ld_dst + r] = src[r*ld_src + c] for r < nr, c < nc (ld_dst may be
 * negative): grad_out (K x P) to P x kp rows of channels, forward results back,
 * filters into the column path's blocks. 8 x 8 blocks are transposed in AVX
 * registers (8 loads, 24 shuffles, 8 stores for 64 floats, where scalar code
 * stores each float on its own), the last rows of a block with masked stores;
 * the last columns, and builds without AVX, copy floats. */
static void cdl_cv_transpose(const float *src, Py_ssize_t ld_src, Py_ssize_t nr, Py_ssize_t nc,
                             float *dst, Py_ssize_t ld_dst) {
    Py_ssize_t c, r, tail = 0;   /* columns from `tail` on are copied one by one */
#if defined(__AVX__)
    Py_ssize_t r0;
    tail = nc / 8 * 8;
    for (r0 = 0; r0 < nr; r0 += 8) {
        Py_ssize_t m = nr - r0 < 8 ? nr - r0 : 8;
        for (c = 0; c < tail; c += 8)
            cdl_cv_transpose8(src + r0 * ld_src + c, ld_src, m, dst + c * ld_dst + r0, ld_dst);
    }
#endif
    for (c = tail; c < nc; c++)
        for (r = 0; r < nr; r++)
            dst[c * ld_dst + r] = src[r * ld_src + c];
}

#define CDL_CV_WARGS const float *xs, const Py_ssize_t *poff, Py_ssize_t oh, Py_ssize_t ow, \
    Py_ssize_t rstep, Py_ssize_t sw, const float *gt, Py_ssize_t kp, float *am, Py_ssize_t am_a
#define CDL_CV_FARGS const float *xs, const Py_ssize_t *prow, const Py_ssize_t *roff, \
    Py_ssize_t nr, const float *wt, Py_ssize_t kp, float *tb

/* One function per shape (A, B, V); the residual column blocks of kernels wider
 * than 5 use B = 1..4 with the A of B = 5. */
#define CDL_CV_DEF(A, B, V) \
    static void cdl_cv_w_##A##_##B##_##V(CDL_CV_WARGS) { \
        cdl_cv_wtile(xs, poff, oh, ow, rstep, sw, gt, kp, am, am_a, A, B, V); } \
    static void cdl_cv_f_##A##_##B##_##V(CDL_CV_FARGS) { \
        cdl_cv_ftile(xs, prow, roff, nr, wt, kp, tb, A, B, V); }
#define CDL_CV_WCASE(A, B, V) \
    if (a == A && b == B && v == V) { cdl_cv_w_##A##_##B##_##V(xs, poff, oh, ow, rstep, sw, gt, kp, am, am_a); return; }
#define CDL_CV_FCASE(A, B, V) \
    if (a == A && b == B && v == V) { cdl_cv_f_##A##_##B##_##V(xs, prow, roff, nr, wt, kp, tb); return; }

#if CDL_VREGS >= 32
#define CDL_CV_SHAPES(X) \
    X(10, 1, 1) X(10, 2, 1) X(8, 3, 1) X(6, 4, 1) X(5, 5, 1) X(5, 1, 1) X(5, 2, 1) X(5, 3, 1) X(5, 4, 1) \
    X(10, 1, 2) X(6, 2, 2) X(4, 3, 2) X(3, 4, 2) X(2, 5, 2) X(2, 1, 2) X(2, 2, 2) X(2, 3, 2) X(2, 4, 2) \
    X(8, 1, 3) X(4, 2, 3) X(2, 3, 3) X(2, 4, 3) X(1, 5, 3) X(1, 1, 3) X(1, 2, 3) X(1, 3, 3) X(1, 4, 3) \
    X(6, 1, 4) X(3, 2, 4) X(2, 3, 4) X(1, 4, 4) X(1, 5, 4) X(1, 1, 4) X(1, 2, 4) X(1, 3, 4)
#else
#define CDL_CV_SHAPES(X) \
    X(8, 1, 1) X(6, 2, 1) X(4, 3, 1) X(3, 4, 1) X(2, 5, 1) X(2, 1, 1) X(2, 2, 1) X(2, 3, 1) X(2, 4, 1) \
    X(6, 1, 2) X(3, 2, 2) X(2, 3, 2) X(1, 4, 2) X(1, 5, 2) X(1, 1, 2) X(1, 2, 2) X(1, 3, 2)
#endif

CDL_CV_SHAPES(CDL_CV_DEF)

static void cdl_cv_wrun(int a, int b, int v, CDL_CV_WARGS) {
    CDL_CV_SHAPES(CDL_CV_WCASE)
}

static void cdl_cv_frun(int a, int b, int v, CDL_CV_FARGS) {
    CDL_CV_SHAPES(CDL_CV_FCASE)
}

/* ------------------------------------------------------------------------
 * Column-vector tiles with their epilogue in registers (_conv.pyx, column
 * path): KR output channels x RB output rows x one vector of VF output
 * columns, summed over (c, i, j) in that order (the order of _corr_tile, so
 * the sums are bitwise those of the tile-then-store path), then the bias added
 * (and ReLU applied) in registers and the vectors stored straight to the
 * output. KH and KW are constants for 3x3 and 5x5 kernels and run-time values
 * otherwise. The arrays have fixed sizes: a variable-length array keeps GCC
 * from holding the accumulators in registers.
 *
 *   y[a, r, l] = sum_{c,i,j} xs[c*xs_c + r*rstep + i*xs_r + j + l]
 *                            * wp[((c*KH + i)*KW + j)*KR + a] + bias[a]
 *
 * POOL = 0: dst[a*dst_k + r*dst_r + l] = relu?(y[a, r, l]) for a < nk, r < nr,
 * l < VF (whole vectors only: a part-width column is the tile-then-store
 * path's). POOL = 1 (RB even, the tile's first row and column even): the 2x2
 * stride-2 max-pool, dst[a*dst_k + (r/2)*dst_r + l/2] for even r < nr, l < VF,
 * then ReLU (relu?), bitwise the values of max_pool2d_relu_forward (or
 * max_pool2d_forward) on the stored y: a cell replaces the window's best so
 * far if it is greater or NaN, cells in the order top-left, top-right,
 * bottom-left, bottom-right. Pooled here as (TL vs TR) vs (BL vs BR), which
 * gives the same cell: ties keep the earlier cell either way, and a NaN wins
 * over everything before it and loses to a later NaN only.
 * ------------------------------------------------------------------------ */

typedef int cdl_vi __attribute__((vector_size(CDL_VF * 4)));
/* Half a vector, unaligned like cdl_vf. */
typedef float cdl_vh __attribute__((vector_size(CDL_VF * 2), aligned(4)));

/* ReLU's rule (y <= 0 gives +0, NaN passes), bitwise that of _elementwise's
 * relu_forward applied to the stored value. */
CDL_CV_INLINE cdl_vf cdl_cv_relu(cdl_vf y) {
    cdl_vi m = (y <= cdl_vf_set1(0));
    return (cdl_vf)((cdl_vi)y & ~m);
}

/* Lanewise: v where v > best or v is NaN, else best (the pooling rule). */
CDL_CV_INLINE cdl_vf cdl_cv_takes(cdl_vf best, cdl_vf v) {
    cdl_vi m = (v > best) | (v != v);
    return (cdl_vf)(((cdl_vi)v & m) | ((cdl_vi)best & ~m));
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define CDL_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define CDL_SHUF(a, b, ...) __builtin_shuffle(a, b, (cdl_vi){__VA_ARGS__})
#endif
#if CDL_VF == 16
#define CDL_EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define CDL_ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#define CDL_SWAP 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7
#define CDL_LOW 0, 1, 2, 3, 4, 5, 6, 7
#elif CDL_VF == 8
#define CDL_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define CDL_ODD 1, 3, 5, 7, 9, 11, 13, 15
#define CDL_SWAP 4, 5, 6, 7, 0, 1, 2, 3
#define CDL_LOW 0, 1, 2, 3
#else
#define CDL_EVEN 0, 2, 4, 6
#define CDL_ODD 1, 3, 5, 7
#define CDL_SWAP 2, 3, 0, 1
#define CDL_LOW 0, 1
#endif

/* The 2x2 max-pool of rows t (top) and b (bottom), VF columns: VF/2 values,
 * then ReLU if relu, stored at d. */
CDL_CV_INLINE void cdl_cv_pool2_store(float *d, cdl_vf t, cdl_vf b, int relu) {
    cdl_vf e = CDL_SHUF(t, b, CDL_EVEN);       /* TL | BL */
    cdl_vf o = CDL_SHUF(t, b, CDL_ODD);        /* TR | BR */
    cdl_vf h = cdl_cv_takes(e, o);             /* TL vs TR | BL vs BR */
    cdl_vf r = cdl_cv_takes(h, CDL_SHUF(h, h, CDL_SWAP));
    cdl_vh lo;
    if (relu)
        r = cdl_cv_relu(r);
    lo = CDL_SHUF(r, r, CDL_LOW);
    __builtin_memcpy(d, &lo, sizeof(lo));
}

/* The 2x2 stride-2 max-pool (floor) of one plane y of width ow into oh2 x ow2
 * by the rule of cdl_cv_pool2_store, whole vectors of input columns at a
 * time: rows at least a vector wide in steps of a vector (the last overlapping
 * the one before it); narrower rows one vector from each row's start, reading
 * into the next row (or plane), unused, while `avail` floats from y allow,
 * else from a zero-padded copy. (The scalar rule mispredicted its branches
 * half the time: ~30 cycles a window.) */
static void cdl_cv_pool2_plane(const float *y, float *o, Py_ssize_t ow, Py_ssize_t oh2,
                               Py_ssize_t ow2, Py_ssize_t avail) {
    Py_ssize_t i, j, wc = 2 * ow2;
    float tt[CDL_VF] = {0}, bb[CDL_VF] = {0}, oo[CDL_VF / 2];
    for (i = 0; i < oh2; i++) {
        const float *t = y + 2 * i * ow, *b = t + ow;
        float *d = o + i * ow2;
        if (wc >= CDL_VF) {
            for (j = 0; j < wc; j += CDL_VF) {
                Py_ssize_t j0 = j + CDL_VF > wc ? wc - CDL_VF : j;
                cdl_cv_pool2_store(d + j0 / 2, cdl_vf_load(t + j0), cdl_vf_load(b + j0), 0);
            }
        } else if ((2 * i + 1) * ow + CDL_VF <= avail) {
            cdl_cv_pool2_store(oo, cdl_vf_load(t), cdl_vf_load(b), 0);
            for (j = 0; j < ow2; j++)
                d[j] = oo[j];
        } else {
            for (j = 0; j < wc; j++) {
                tt[j] = t[j];
                bb[j] = b[j];
            }
            cdl_cv_pool2_store(oo, cdl_vf_load(tt), cdl_vf_load(bb), 0);
            for (j = 0; j < ow2; j++)
                d[j] = oo[j];
        }
    }
}

/* With 16 vector registers the tiles fill them (KR*RB accumulators, RB inputs,
 * a weight): unrolled tap loops spilled two of them per kernel row (AVX2
 * C32->K64 input gradient ~10% slower than the old tile), so they stay loops. */
#if CDL_VREGS >= 32
#define CDL_CT_ROLLED
#else
#define CDL_CT_ROLLED _Pragma("GCC unroll 1")
#endif
/* Taps of at most 2x2 (a 3x3 stride-2 input gradient's phases) as one loop over
 * (c, i, j): measured on AVX2 (Zen 2, ResNet-8's two stride-2 input gradients at
 * batch 64: 0.81-0.88x the nested loops' time, bit for bit the same); 3x3 taps
 * showed no gain. */
#if CDL_VREGS < 32 && defined(__AVX2__)
#define CDL_CT_FLAT 1
#else
#define CDL_CT_FLAT 0
#endif
/* Most taps (cin x kh x kw) of a flattened tap loop (a table on the stack). */
#define CDL_CT_TMAX 1024

CDL_CV_INLINE void cdl_ct_tile(const float *xs, Py_ssize_t xs_c, Py_ssize_t xs_r,
                               Py_ssize_t rstep, Py_ssize_t cin, const float *wp,
                               const Py_ssize_t *toff, const float *bias, int relu, float *dst,
                               Py_ssize_t dst_k, Py_ssize_t dst_r, int nk, int nr,
                               const int KR, const int RB, const int KH, const int KW,
                               const int POOL) {
    cdl_vf acc[24], xv[8];
    Py_ssize_t c, t;
    int a, r, i, j;
#pragma GCC unroll 24
    for (a = 0; a < KR * RB; a++)
        acc[a] = cdl_vf_set1(0);
    /* toff: the taps (c, i, j) in order as one loop, tap t at xs + toff[t] with its
     * weights at wp + t*KR: the same sums in the same order, without the short
     * kernel-row and kernel-column loops' exits. */
    if (toff) {
        CDL_CT_ROLLED
        for (t = 0; t < cin * KH * KW; t++) {
            const float *xt = xs + toff[t];
            for (r = 0; r < RB; r++)
                xv[r] = cdl_vf_loadr(xt + r * rstep);
            for (a = 0; a < KR; a++) {
                cdl_vf w = cdl_vf_bcast(wp[t * KR + a]);
                for (r = 0; r < RB; r++)
                    acc[a * RB + r] += w * xv[r];
            }
        }
    } else
    for (c = 0; c < cin; c++) {
        const float *xc = xs + c * xs_c;
        const float *wc = wp + c * KH * KW * KR;
        CDL_CT_ROLLED
        for (i = 0; i < KH; i++)
            CDL_CT_ROLLED
            for (j = 0; j < KW; j++) {
                for (r = 0; r < RB; r++)
                    xv[r] = cdl_vf_loadr(xc + r * rstep + i * xs_r + j);
                for (a = 0; a < KR; a++) {
                    cdl_vf w = cdl_vf_bcast(wc[(i * KW + j) * KR + a]);
                    for (r = 0; r < RB; r++)
                        acc[a * RB + r] += w * xv[r];
                }
            }
    }
    /* Loops with constant trip counts unrolled (here and at the top): left as
     * loops, they kept a copy of acc[] in memory, zeroed by a rep stos on every
     * call (~12% of the time of a 27-tap tile). */
#pragma GCC unroll 24
    for (a = 0; a < KR; a++) {
        cdl_vf b = cdl_vf_bcast(bias[a]);
#pragma GCC unroll 24
        for (r = 0; r < RB; r++) {
            acc[a * RB + r] += b;
            if (relu && !POOL)
                acc[a * RB + r] = cdl_cv_relu(acc[a * RB + r]);
        }
    }
    if (POOL) {
#pragma GCC unroll 24
        for (a = 0; a < KR; a++)
#pragma GCC unroll 24
            for (r = 0; r < RB; r += 2)
                if (a < nk && r < nr)
                    cdl_cv_pool2_store(dst + a * dst_k + (r / 2) * dst_r, acc[a * RB + r],
                                       acc[a * RB + r + 1], relu);
    } else if (nk == KR && nr == RB) {
#pragma GCC unroll 24
        for (a = 0; a < KR; a++)
#pragma GCC unroll 24
            for (r = 0; r < RB; r++)
                cdl_vf_store(dst + a * dst_k + r * dst_r, acc[a * RB + r]);
    } else {
#pragma GCC unroll 24
        for (a = 0; a < KR; a++)
#pragma GCC unroll 24
            for (r = 0; r < RB; r++)
                if (a < nk && r < nr)
                    cdl_vf_store(dst + a * dst_k + r * dst_r, acc[a * RB + r]);
    }
}

/* A block of tiles: row tiles ty0 <= ty < ty1 (RB rows each, the last ones cut
 * at ohc) x every column vector of the ohc x owc output (owc >= VF; the last
 * vector overlaps the one before it, recomputed bit for bit the same) of one
 * group of KR channels. One call per block, the tile inlined: called per tile,
 * the call and its stack arguments cost ~7% of a 27-tap first layer.
 * xs: staged input of the block's first output row and column; dst: output
 * (pooled: pooled output) of its first channel. */
CDL_CV_INLINE void cdl_ct_block(const float *xs, Py_ssize_t xs_c, Py_ssize_t xs_r,
                                Py_ssize_t rstep, Py_ssize_t cin, const float *wp,
                                const float *bias, int relu, float *dst, Py_ssize_t dst_k,
                                Py_ssize_t dst_r, int nk, Py_ssize_t ohc, Py_ssize_t owc,
                                Py_ssize_t ty0, Py_ssize_t ty1,
                                const int KR, const int RB, const int KH, const int KW,
                                const int POOL) {
    Py_ssize_t ty, ow0, oh0;
    Py_ssize_t toff[CDL_CT_TMAX];
    const Py_ssize_t *tp = NULL;
    if (CDL_CT_FLAT && KH * KW <= 4 && cin * KH * KW <= CDL_CT_TMAX) {
        Py_ssize_t c, i, j, t = 0;
        for (c = 0; c < cin; c++)
            for (i = 0; i < KH; i++)
                for (j = 0; j < KW; j++)
                    toff[t++] = c * xs_c + i * xs_r + j;
        tp = toff;
    }
    for (ty = ty0; ty < ty1; ty++) {
        int nr;
        oh0 = ty * RB;
        nr = ohc - oh0 < RB ? (int)(ohc - oh0) : RB;
        for (ow0 = 0; ow0 < owc; ow0 += CDL_VF) {
            Py_ssize_t c0 = ow0 + CDL_VF > owc ? owc - CDL_VF : ow0;
            float *d = POOL ? dst + (oh0 / 2) * dst_r + c0 / 2 : dst + oh0 * dst_r + c0;
            cdl_ct_tile(xs + oh0 * rstep + c0, xs_c, xs_r, rstep, cin, wp, tp, bias, relu, d,
                        dst_k, dst_r, nk, nr, KR, RB, KH, KW, POOL);
        }
    }
}

#define CDL_CT_ARGS const float *xs, Py_ssize_t xs_c, Py_ssize_t xs_r, Py_ssize_t rstep, \
    Py_ssize_t cin, Py_ssize_t kh, Py_ssize_t kw, const float *wp, const float *bias, int relu, \
    float *dst, Py_ssize_t dst_k, Py_ssize_t dst_r, int nk, Py_ssize_t ohc, Py_ssize_t owc, \
    Py_ssize_t ty0, Py_ssize_t ty1
#define CDL_CT_PASS xs, xs_c, xs_r, rstep, cin, kh, kw, wp, bias, relu, dst, dst_k, dst_r, nk, \
    ohc, owc, ty0, ty1
#define CDL_CT_BLOCK(KR, RB, KH, KW, P) \
    cdl_ct_block(xs, xs_c, xs_r, rstep, cin, wp, bias, relu, dst, dst_k, dst_r, nk, ohc, owc, \
                 ty0, ty1, KR, RB, KH, KW, P)
/* One function per (tile, taps 3x3 / 5x5 / other, pooled or not). */
#define CDL_CT_DEF1(KR, RB, P, S) \
    static void cdl_ct##S##_##KR##_##RB##_3(CDL_CT_ARGS) { \
        (void)kh; (void)kw; CDL_CT_BLOCK(KR, RB, 3, 3, P); } \
    static void cdl_ct##S##_##KR##_##RB##_5(CDL_CT_ARGS) { \
        (void)kh; (void)kw; CDL_CT_BLOCK(KR, RB, 5, 5, P); } \
    static void cdl_ct##S##_##KR##_##RB##_n(CDL_CT_ARGS) { \
        CDL_CT_BLOCK(KR, RB, (int)kh, (int)kw, P); }
#define CDL_CT_CASE1(KR, RB, S) \
    if (kr == KR && rb == RB) { \
        if (kh == 3 && kw == 3) cdl_ct##S##_##KR##_##RB##_3(CDL_CT_PASS); \
        else if (kh == 5 && kw == 5) cdl_ct##S##_##KR##_##RB##_5(CDL_CT_PASS); \
        else cdl_ct##S##_##KR##_##RB##_n(CDL_CT_PASS); \
        return 1; }
#define CDL_CT_DEF(KR, RB) CDL_CT_DEF1(KR, RB, 0, )
#define CDL_CT_DEFP(KR, RB) CDL_CT_DEF1(KR, RB, 1, p)
#define CDL_CT_CASE(KR, RB) CDL_CT_CASE1(KR, RB, )
#define CDL_CT_CASEP(KR, RB) CDL_CT_CASE1(KR, RB, p)

/* The column path's tile shapes (_conv.pyx, _choose_tile): KR*RB accumulators,
 * RB input vectors and a broadcast weight within the vector registers; those
 * with an even RB also pool. */
#if CDL_VREGS >= 32
#define CDL_CT_SHAPES(X) X(8, 3) X(6, 4) X(4, 4) X(3, 6) X(2, 8) X(1, 8)
#define CDL_CT_PSHAPES(X) X(6, 4) X(4, 4) X(3, 6) X(2, 8) X(1, 8)
#else
#define CDL_CT_SHAPES(X) X(4, 3) X(6, 2) X(3, 3) X(2, 4) X(1, 6)
#define CDL_CT_PSHAPES(X) X(6, 2) X(2, 4) X(1, 6)
#endif

CDL_CT_SHAPES(CDL_CT_DEF)
CDL_CT_PSHAPES(CDL_CT_DEFP)

/* Runs the block for (kr, rb), pooled or not; returns 0, having done nothing,
 * for a shape it does not have. */
static int cdl_ct_run(int kr, int rb, int pool, CDL_CT_ARGS) {
    if (pool) {
        CDL_CT_PSHAPES(CDL_CT_CASEP)
        return 0;
    }
    CDL_CT_SHAPES(CDL_CT_CASE)
    return 0;
}

#endif
