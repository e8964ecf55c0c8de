# cython: language_level=3
"""Build and CPU facts the Python side needs: OpenMP present, CPU instruction sets."""
from cdl._kernels._openmp cimport (CDL_HAVE_OPENMP, omp_get_max_threads,
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


ctypedef int (*get_threads_fn)() noexcept nogil
ctypedef void (*set_threads_fn)(int) noexcept nogil
cdef get_threads_fn _blas_get_threads = NULL
cdef set_threads_fn _blas_set_threads = NULL


def set_blas_thread_functions(size_t get_address, size_t set_address):
    """Register the BLAS library's get/set-num-threads C functions (addresses)."""
    global _blas_get_threads, _blas_set_threads
    _blas_get_threads = <get_threads_fn>get_address
    _blas_set_threads = <set_threads_fn>set_address


cdef void ensure_single_threaded_blas() noexcept nogil:
    if _blas_get_threads != NULL and _blas_get_threads() != 1:
        _blas_set_threads(1)
