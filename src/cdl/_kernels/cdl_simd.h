/* Portable SIMD vectors for the conv kernels: GCC/Clang vector extensions.
 *
 * One source serves every build: the compiler maps cdl_vf arithmetic to zmm on
 * the AVX-512 build, ymm on AVX2 and xmm on baseline x86-64. CDL_VF is the
 * number of floats in one vector. Loads and stores go through memcpy, so they
 * need no alignment (aligned(4) on the type says the same to the compiler).
 */
#ifndef CDL_SIMD_H
#define CDL_SIMD_H

/* CDL_VREGS: vector registers the kernels may plan their tiles around. */
#if defined(__AVX512F__)
#define CDL_VF 16
#define CDL_VREGS 32
#elif defined(__AVX__)
#define CDL_VF 8
#define CDL_VREGS 16
#else
#define CDL_VF 4
#define CDL_VREGS 16
#endif

typedef float cdl_vf __attribute__((vector_size(CDL_VF * 4), aligned(4)));

/* Unaligned loads and stores. On AVX2 and SSE builds they go through the
 * intrinsics: GCC expands a 32-byte memcpy as two 16-byte moves via the stack,
 * which keeps the tiles' vectors out of registers. */
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#endif

static inline cdl_vf cdl_vf_load(const float *p) {
#if !defined(__AVX512F__) && defined(__AVX__)
    return (cdl_vf)_mm256_loadu_ps(p);
#elif !defined(__AVX512F__) && defined(__SSE2__)
    return (cdl_vf)_mm_loadu_ps(p);
#else
    cdl_vf v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
#endif
}

/* A load the compiler must keep in a register: without the empty asm, GCC may
 * fold a vector that several multiply-adds share into each of them as a memory
 * operand, turning one load into many. */
static inline cdl_vf cdl_vf_loadr(const float *p) {
    cdl_vf v = cdl_vf_load(p);
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#if defined(__AVX512F__)
    __asm__("" : "+v"(v));
#else
    __asm__("" : "+x"(v));
#endif
#endif
    return v;
}

static inline void cdl_vf_store(float *p, cdl_vf v) {
#if !defined(__AVX512F__) && defined(__AVX__)
    _mm256_storeu_ps(p, (__m256)v);
#elif !defined(__AVX512F__) && defined(__SSE2__)
    _mm_storeu_ps(p, (__m128)v);
#else
    __builtin_memcpy(p, &v, sizeof(v));
#endif
}

/* The first n lanes (0 < n < CDL_VF) from p, zeros after; and their store.
 * Masked moves on AVX2 and AVX-512: a vector load right after scalar stores
 * to the same bytes waits for them (a failed store forward). */
#if defined(__AVX512F__)
static inline cdl_vf cdl_vf_loadn(const float *p, int n) {
    return (cdl_vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
static inline void cdl_vf_storen(float *p, cdl_vf v, int n) {
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), (__m512)v);
}
#elif defined(__AVX2__)
static inline __m256i cdl_vf_lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline cdl_vf cdl_vf_loadn(const float *p, int n) {
    return (cdl_vf)_mm256_maskload_ps(p, cdl_vf_lanes_below(n));
}
static inline void cdl_vf_storen(float *p, cdl_vf v, int n) {
    _mm256_maskstore_ps(p, cdl_vf_lanes_below(n), (__m256)v);
}
#else
static inline cdl_vf cdl_vf_loadn(const float *p, int n) {
    cdl_vf v = {0};
    int i;
    for (i = 0; i < n; i++)
        v[i] = p[i];
    return v;
}
static inline void cdl_vf_storen(float *p, cdl_vf v, int n) {
    int i;
    for (i = 0; i < n; i++)
        p[i] = v[i];
}
#endif

/* v to p's first n floats, a whole vector from n >= CDL_VF on (n > 0); acc:
 * what they hold plus v instead (the bits of a separate sum). The stores of
 * a kernel's output rows, whose last vector may be part of one. */
static inline __attribute__((always_inline)) void cdl_vf_put(float *p, cdl_vf v, long n,
                                                             int acc) {
    if (n >= CDL_VF) {
        if (acc)
            v = cdl_vf_load(p) + v;
        cdl_vf_store(p, v);
    } else {
        if (acc)
            v = cdl_vf_loadn(p, (int)n) + v;
        cdl_vf_storen(p, v, (int)n);
    }
}

static inline cdl_vf cdl_vf_set1(float a) {
    cdl_vf v = {0};
    return v + a;
}

/* Every lane = a, through the intrinsics: one broadcast load when a comes from
 * memory (the FMA can take it as its operand), where cdl_vf_set1's `{0} + a`
 * costs a scalar add and a register broadcast (the add stays: -0 + 0 is +0).
 * On Sapphire Rapids both compete with the 512-bit FMAs for their ports: the
 * dense GEMM's 1 thread, 1024 x 1024 x 256, ran at 96 against 156 GFLOP/s.
 * cdl_vf_set1 stays for constants: using this for every broadcast slowed the
 * column kernels by ~5% (CIFAR conv2 forward). */
static inline __attribute__((always_inline)) cdl_vf cdl_vf_bcast(float a) {
#if defined(__AVX512F__)
    return (cdl_vf)_mm512_set1_ps(a);
#elif defined(__AVX__)
    return (cdl_vf)_mm256_set1_ps(a);
#elif defined(__SSE2__)
    return (cdl_vf)_mm_set1_ps(a);
#else
    return cdl_vf_set1(a);
#endif
}

/* Sum of the lanes in a fixed order (pairwise halves), so results are reproducible. */
static inline float cdl_vf_sum(cdl_vf v) {
#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
    /* The same pairwise halves in registers (the array version compiles to a
     * store and scalar adds): bitwise the same result. */
    __m128 h;
#if defined(__AVX512F__)
    __m256 q = _mm256_add_ps(_mm512_castps512_ps256((__m512)v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)v), 1)));
    h = _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
#elif defined(__AVX__)
    h = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
#else
    h = (__m128)v;
#endif
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
#else
    float t[CDL_VF];
    int n;
    __builtin_memcpy(t, &v, sizeof(v));
    for (n = CDL_VF / 2; n >= 1; n /= 2) {
        int i;
        for (i = 0; i < n; i++) t[i] += t[i + n];
    }
    return t[0];
#endif
}
#endif
