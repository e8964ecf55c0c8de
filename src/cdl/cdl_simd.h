/* Portable SIMD vectors for the conv kernels: GCC/Clang vector extensions.
 *
 * One source serves every build: the compiler maps cdl_vf arithmetic to zmm on
 * the AVX-512 build, ymm on AVX2 and xmm on baseline x86-64. CDL_VF is the
 * number of floats in one vector. Loads and stores go through memcpy, so they
 * need no alignment (aligned(4) on the type says the same to the compiler).
 */
#ifndef CDL_SIMD_H
#define CDL_SIMD_H

#if defined(__AVX512F__)
#define CDL_VF 16
#elif defined(__AVX__)
#define CDL_VF 8
#else
#define CDL_VF 4
#endif

typedef float cdl_vf __attribute__((vector_size(CDL_VF * 4), aligned(4)));

static inline cdl_vf cdl_vf_load(const float *p) {
    cdl_vf v;
    __builtin_memcpy(&v, p, sizeof(v));
    return v;
}

static inline void cdl_vf_store(float *p, cdl_vf v) {
    __builtin_memcpy(p, &v, sizeof(v));
}

static inline cdl_vf cdl_vf_set1(float a) {
    cdl_vf v = {0};
    return v + a;
}

/* Sum of the lanes in a fixed order (pairwise halves), so results are reproducible. */
static inline float cdl_vf_sum(cdl_vf v) {
    float t[CDL_VF];
    int n;
    __builtin_memcpy(t, &v, sizeof(v));
    for (n = CDL_VF / 2; n >= 1; n /= 2) {
        int i;
        for (i = 0; i < n; i++) t[i] += t[i + n];
    }
    return t[0];
}
#endif
