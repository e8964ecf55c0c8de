# OpenMP functions through a shim, so a build without OpenMP still compiles.
cdef extern from "cdl_omp.h" nogil:
    int CDL_HAVE_OPENMP
    const char* CDL_COMPILED_ISA
    int omp_get_max_threads()
    int omp_get_thread_num()
    int omp_get_num_threads()
    int cdl_cpu_has_avx2_fma()
    int cdl_cpu_has_avx512()
