/* OpenMP shim: the kernels compile and run serially when OpenMP is missing. */
#ifndef CDL_OMP_H
#define CDL_OMP_H
#ifdef _OPENMP
#include <omp.h>
#define CDL_HAVE_OPENMP 1
#else
#define CDL_HAVE_OPENMP 0
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_num_procs(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
#endif

/* Which instruction sets this CPU and OS support (GCC/Clang builtin; checks XCR0). */
#if defined(__x86_64__) || defined(__i386__)
static inline int cdl_cpu_has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
static inline int cdl_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && cdl_cpu_has_avx2_fma();
}
#else
static inline int cdl_cpu_has_avx2_fma(void) { return 0; }
static inline int cdl_cpu_has_avx512(void) { return 0; }
#endif

/* Instruction set this translation unit was compiled for. */
#if defined(__AVX512F__)
#define CDL_COMPILED_ISA "avx512"
#elif defined(__AVX2__)
#define CDL_COMPILED_ISA "avx2"
#else
#define CDL_COMPILED_ISA "baseline"
#endif
#endif
