# Row-major GEMM on top of SciPy's Fortran BLAS, for float32 and float64.
#
# C = alpha * op(A) @ op(B) + beta * C, all row-major and C-contiguous rows
# (leading dimensions given). Row-major C = A @ B is column-major C^T = B^T A^T,
# so the operands are swapped before calling the Fortran routine.
from cython cimport floating
from scipy.linalg.cython_blas cimport sgemm, dgemm


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k,
                      floating alpha, const floating* a, int lda,
                      const floating* b, int ldb,
                      floating beta, floating* c, int ldc) noexcept nogil:
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda,
              &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &alpha, <double*>b, &ldb, <double*>a, &lda,
              &beta, c, &ldc)


from scipy.linalg.cython_blas cimport sgemv, dgemv


cdef inline void gemv(bint trans_a, int m, int n, floating alpha, const floating* a, int lda,
                      const floating* x, floating beta, floating* y) noexcept nogil:
    """y = alpha * op(A) @ x + beta * y for a row-major m x n matrix A.

    A batch of one is a matrix-vector product: GEMM would pack the whole
    weight matrix for a single row, GEMV streams it once.
    """
    # Row-major A (m x n) is column-major A^T (n x m), so the flag flips.
    cdef char t = b'N' if trans_a else b'T'
    cdef int one = 1
    if floating is float:
        sgemv(&t, &n, &m, &alpha, <float*>a, &lda, <float*>x, &one, &beta, y, &one)
    else:
        dgemv(&t, &n, &m, &alpha, <double*>a, &lda, <double*>x, &one, &beta, y, &one)
