# cdl's own packed float32 GEMM (cdl_gemm.h), shared by the dense and the
# convolution kernels (1x1 convolutions are GEMMs).
cdef extern from "cdl_gemm.h" nogil:
    const int GEMM_NR "CDL_GEMM_NR"
    Py_ssize_t sgemm_scratch "cdl_sgemm_scratch"(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k)
    void sgemm "cdl_sgemm"(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                           const float* a, Py_ssize_t rs_a, Py_ssize_t cs_a,
                           const float* b, Py_ssize_t rs_b, Py_ssize_t cs_b,
                           float* c, Py_ssize_t rs_c, Py_ssize_t cs_c, int beta_one,
                           int relu, float* scratch)
