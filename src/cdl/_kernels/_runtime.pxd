# Shared by the kernel modules (cimport cdl._runtime).

# Call before running BLAS from inside an OpenMP region: keeps the BLAS behind
# scipy.linalg.cython_blas single-threaded even if the user raised its
# thread count (e.g. with threadpoolctl), which would oversubscribe the cores.
cdef void ensure_single_threaded_blas() noexcept nogil
# Call once the kernel's BLAS calls are over, also when it raises: until every
# kernel that called ensure_single_threaded_blas has, restore_blas leaves the count.
cdef void blas_done() noexcept nogil
