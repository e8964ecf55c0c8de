# cython: language_level=3
"""Build and CPU facts the Python side needs: OpenMP present, CPU instruction sets."""
from cdl._openmp cimport (CDL_HAVE_OPENMP, omp_get_max_threads,
                          cdl_cpu_has_avx2_fma, cdl_cpu_has_avx512)


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CDL_HAVE_OPENMP)


def openmp_max_threads():
    return omp_get_max_threads()


def cpu_supports():
    """Instruction sets usable on this CPU (and enabled by the OS), best last."""
    isas = ["baseline"]
    if cdl_cpu_has_avx2_fma():
        isas.append("avx2")
    if cdl_cpu_has_avx512():
        isas.append("avx512")
    return isas
