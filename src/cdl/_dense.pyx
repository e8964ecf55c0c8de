# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dense (fully connected) kernels: f(x; W) = x W^T + b and its gradients.

Every product (out = x W^T, dx = G W, dW = G^T x) is cut into fixed tiles of
the output, each computed by one single-threaded GEMM over the full
reduction; OpenMP spreads the tiles. The tiling depends only on the shapes,
so results are bitwise identical for any thread count.

float32 tiles use our own GEMM (cdl_gemm.h, built per instruction set like
_conv): B packed into KC x NR panels and A into mr x KC panels (transposes
handled in the packing), an mr x NR microkernel in vector registers (14 x 32
on AVX-512, 6 x 16 on AVX2), edges by exact-height kernels and zero-padded
columns; a forward with few outputs takes dot products along in_features
instead. Why: SciPy's OpenBLAS runs its AVX2 (Haswell) kernels here, and on
AVX-512 ours is ~1.7-2x faster per tile (2x on skinny 4096 -> 10 shapes,
where OpenBLAS's fixed costs dominate). On AVX2 ours only ties on big
products, so it is used for skinny or small ones; on SSE only for 2-4 rows.
float64, a batch of one (GEMV) and every other case stay on SciPy's BLAS.
The choice depends on the shapes and the build only. Inputs are trusted:
cdl.functional validates them.
"""
from cython cimport floating
from cython.parallel cimport prange
from cdl._blas cimport gemm, gemv
from cdl._runtime cimport ensure_single_threaded_blas
from cdl._openmp cimport omp_get_thread_num
from libc.stdlib cimport malloc, free

cdef extern from "cdl_simd.h" nogil:
    const int VF "CDL_VF"

cdef extern from "cdl_gemm.h" nogil:
    const int GEMM_NR "CDL_GEMM_NR"
    Py_ssize_t sgemm_scratch "cdl_sgemm_scratch"(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k)
    void sgemm "cdl_sgemm"(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                           const float* a, Py_ssize_t rs_a, Py_ssize_t cs_a,
                           const float* b, Py_ssize_t rs_b, Py_ssize_t cs_b,
                           float* c, Py_ssize_t rs_c, Py_ssize_t cs_c, int beta_one,
                           float* scratch)
    const int DOT_RJ "CDL_DOT_RJ"
    void sdot_nt "cdl_sdot_nt"(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                               const float* a, Py_ssize_t lda, const float* b, Py_ssize_t ldb,
                               float* c, Py_ssize_t ldc, int beta_one)

# Below this many multiply-adds a second thread costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN_MACS = 1 << 19


# Tile bounds, measured against NumPy's multi-threaded sgemm on 784->256 and
# 1024->1024 layers: smaller tiles repack panels more often and lost 10-25%.
cdef enum:
    TM = 256
    TN = 256
    MINT = 2
    SPLIT_MIN_MACS = 1 << 20


cdef inline Py_ssize_t _split(Py_ssize_t extent, Py_ssize_t parts, Py_ssize_t align) noexcept nogil:
    # Even parts (balanced over 2, 4, ... threads), each a multiple of align.
    if parts > 1 and parts % 2:
        parts += 1
    cdef Py_ssize_t size = (extent + parts - 1) // parts
    size = ((size + align - 1) // align) * align
    return min(size, extent)


cdef inline void _tiling(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                         Py_ssize_t* tm, Py_ssize_t* tn) noexcept nogil:
    # Output tiles of up to TM x TN: single-threaded sgemm runs near its peak
    # there, and fewer tiles repack fewer panels. A short tile may be wider
    # (the cap is on its area: each BLAS call has a fixed cost). Fewer than
    # MINT tiles are split in two, longer side first, while a half keeps
    # >= 1M multiply-adds. Depends on the shapes only, never on the thread
    # count, so results are identical for any thread count.
    cdef Py_ssize_t tn_cap = max(TN, (TM * TN) // min(m, TM))
    cdef Py_ssize_t pm = (m + TM - 1) // TM, pn = (n + tn_cap - 1) // tn_cap
    cdef bint split_n, split_m
    while pm * pn < MINT:
        split_n = (n // (2 * pn)) * (m // pm) * k >= SPLIT_MIN_MACS
        split_m = (m // (2 * pm)) * (n // pn) * k >= SPLIT_MIN_MACS
        if split_n and (n // pn >= m // pm or not split_m):
            pn *= 2
        elif split_m:
            pm *= 2
        else:
            break
    tm[0] = _split(m, pm, 4)
    tn[0] = _split(n, pn, 4)


cdef inline bint _own_gemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    # Our kernel where it measured faster than SciPy's OpenBLAS sgemm (Haswell
    # kernels): always on AVX-512 (zmm, 2x the lanes); on AVX2 (a tie on big
    # products) for skinny or small ones, where OpenBLAS's fixed costs show;
    # on SSE (3x slower than AVX2) only for 2-4 rows over a long reduction,
    # where OpenBLAS packs all of B for a few rows. A batch of one is GEMV.
    if m < 2 or n < 2 or k < 1:
        return False
    if VF >= 16:
        return True
    if VF >= 8:
        return min(m, min(n, k)) <= 32 or m * n * k <= (1 << 22)
    return m <= 4 and k >= 16


cdef inline bint _dot(Py_ssize_t fout) noexcept nogil:
    # Forward with few outputs: dot products along in_features, no packing.
    # On AVX-512 2x the packed GEMM (computing C^T) for fout below its width;
    # on AVX2 a tie there except for one block of outputs, where it wins.
    if VF >= 16:
        return fout < GEMM_NR
    return fout <= DOT_RJ


cdef inline bint _flip(Py_ssize_t m, Py_ssize_t n) noexcept nogil:
    # Fewer columns than one microkernel is wide: compute C^T = B^T A^T instead,
    # so the short side goes to the (exactly sized) rows of the microkernel.
    return n < GEMM_NR and m > n


cdef inline void _sgemm(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                        const float* a, Py_ssize_t rs_a, Py_ssize_t cs_a,
                        const float* b, Py_ssize_t rs_b, Py_ssize_t cs_b,
                        float* c, Py_ssize_t ldc, bint beta_one, float* scratch) noexcept nogil:
    if _flip(m, n):
        sgemm(n, m, k, b, cs_b, rs_b, a, cs_a, rs_a, c, 1, ldc, beta_one, scratch)
    else:
        sgemm(m, n, k, a, rs_a, cs_a, b, rs_b, cs_b, c, ldc, 1, beta_one, scratch)


cdef float* _scratch(Py_ssize_t tm, Py_ssize_t tn, Py_ssize_t k, int nt, Py_ssize_t* per) except? NULL:
    # Packing buffers for nt threads, allocated once per call.
    per[0] = max(sgemm_scratch(tm, tn, k), sgemm_scratch(tn, tm, k))
    cdef float* mem = <float*>malloc(nt * per[0] * sizeof(float))
    if mem == NULL:
        raise MemoryError()
    return mem


cdef inline int _threads(Py_ssize_t macs, int num_threads) noexcept nogil:
    return num_threads if macs >= PARALLEL_MIN_MACS else 1


def linear_forward(const floating[:, ::1] x, const floating[:, ::1] weight,
                   const floating[::1] bias, floating[:, ::1] out, int num_threads):
    """out = x @ weight.T + bias (bias may be None)."""
    cdef Py_ssize_t n = x.shape[0], fin = x.shape[1], fout = weight.shape[0]
    cdef Py_ssize_t tm, tn, tiles_m, tiles_n, t, i, j, r0, c0, mr, nc
    cdef bint has_bias = bias is not None
    cdef floating beta
    cdef int nt = _threads(n * fin * fout, num_threads)
    cdef bint own = floating is float and _own_gemm(n, fout, fin)
    cdef bint dot = own and _dot(fout)
    cdef float* mem = NULL
    cdef Py_ssize_t per = 0
    if n == 0 or fout == 0:
        return
    ensure_single_threaded_blas()
    _tiling(n, fout, fin, &tm, &tn)
    tiles_m = (n + tm - 1) // tm
    tiles_n = (fout + tn - 1) // tn
    if own and not dot:
        mem = _scratch(tm, tn, fin, nt, &per)
    with nogil:
        for t in prange(tiles_m * tiles_n, schedule="static", num_threads=nt):
            r0 = (t // tiles_n) * tm
            c0 = (t % tiles_n) * tn
            mr = min(tm, n - r0)
            nc = min(tn, fout - c0)
            beta = 0
            if has_bias:
                # Bias is written first and the GEMM accumulates onto it.
                beta = 1
                for i in range(r0, r0 + mr):
                    for j in range(c0, c0 + nc):
                        out[i, j] = bias[j]
            if fin == 0:
                if not has_bias:
                    for i in range(r0, r0 + mr):
                        for j in range(c0, c0 + nc):
                            out[i, j] = 0
                continue
            if floating is float:
                if dot:
                    sdot_nt(mr, nc, fin, &x[r0, 0], fin, &weight[c0, 0], fin,
                            &out[r0, c0], fout, has_bias)
                    continue
                if own:
                    _sgemm(mr, nc, fin, &x[r0, 0], fin, 1, &weight[c0, 0], 1, fin,
                           &out[r0, c0], fout, has_bias, mem + omp_get_thread_num() * per)
                    continue
            if mr == 1:
                gemv(False, <int>nc, <int>fin, <floating>1.0, &weight[c0, 0], <int>fin,
                     &x[r0, 0], beta, &out[r0, c0])
            else:
                gemm(False, True, <int>mr, <int>nc, <int>fin, <floating>1.0,
                     &x[r0, 0], <int>fin, &weight[c0, 0], <int>fin,
                     beta, &out[r0, c0], <int>fout)
    free(mem)


def linear_backward(const floating[:, ::1] grad_out, const floating[:, ::1] x,
                    const floating[:, ::1] weight, floating[:, ::1] grad_input,
                    floating[:, ::1] grad_weight, floating[::1] grad_bias,
                    double l2, int num_threads):
    """grad_input = grad_out @ W (skipped if None); grad_weight = grad_out.T @ x + 2*l2*W;
    grad_bias = sum of grad_out over the batch (skipped if None)."""
    cdef Py_ssize_t n = x.shape[0], fin = x.shape[1], fout = weight.shape[0]
    cdef Py_ssize_t t, i, j, r0, c0, mr, nc, tm, tn, tiles_m, tiles_n
    cdef floating two_l2 = <floating>(2.0 * l2)
    cdef int nt = _threads(n * fin * fout, num_threads)
    cdef bint own
    cdef float* mem = NULL
    cdef Py_ssize_t per = 0
    ensure_single_threaded_blas()

    if grad_input is not None and n > 0 and fin > 0:
        _tiling(n, fin, fout, &tm, &tn)
        tiles_m = (n + tm - 1) // tm
        tiles_n = (fin + tn - 1) // tn
        own = floating is float and _own_gemm(n, fin, fout)
        if own:
            mem = _scratch(tm, tn, fout, nt, &per)
        with nogil:
            for t in prange(tiles_m * tiles_n, schedule="static", num_threads=nt):
                r0 = (t // tiles_n) * tm
                c0 = (t % tiles_n) * tn
                mr = min(tm, n - r0)
                nc = min(tn, fin - c0)
                if floating is float:
                    if own:
                        _sgemm(mr, nc, fout, &grad_out[r0, 0], fout, 1, &weight[0, c0], fin, 1,
                               &grad_input[r0, c0], fin, False,
                               mem + omp_get_thread_num() * per)
                        continue
                if fout == 0:
                    for i in range(r0, r0 + mr):
                        for j in range(c0, c0 + nc):
                            grad_input[i, j] = 0
                    continue
                if mr == 1:
                    gemv(True, <int>fout, <int>nc, <floating>1.0, &weight[0, c0], <int>fin,
                         &grad_out[r0, 0], <floating>0.0, &grad_input[r0, c0])
                else:
                    gemm(False, False, <int>mr, <int>nc, <int>fout, <floating>1.0,
                         &grad_out[r0, 0], <int>fout, &weight[0, c0], <int>fin,
                         <floating>0.0, &grad_input[r0, c0], <int>fin)
        free(mem)
        mem = NULL

    if fout > 0 and fin > 0:
        _tiling(fout, fin, n, &tm, &tn)
        tiles_m = (fout + tm - 1) // tm
        tiles_n = (fin + tn - 1) // tn
        own = floating is float and _own_gemm(fout, fin, n)
        if own:
            mem = _scratch(tm, tn, n, nt, &per)
        with nogil:
            for t in prange(tiles_m * tiles_n, schedule="static", num_threads=nt):
                r0 = (t // tiles_n) * tm
                c0 = (t % tiles_n) * tn
                mr = min(tm, fout - r0)
                nc = min(tn, fin - c0)
                if own:
                    if floating is float:
                        _sgemm(mr, nc, n, &grad_out[0, r0], 1, fout, &x[0, c0], fin, 1,
                               &grad_weight[r0, c0], fin, False,
                               mem + omp_get_thread_num() * per)
                elif n > 0:
                    gemm(True, False, <int>mr, <int>nc, <int>n, <floating>1.0,
                         &grad_out[0, r0], <int>fout, &x[0, c0], <int>fin,
                         <floating>0.0, &grad_weight[r0, c0], <int>fin)
                else:
                    for i in range(r0, r0 + mr):
                        for j in range(c0, c0 + nc):
                            grad_weight[i, j] = 0
                if two_l2 != 0:
                    # The L2 term 2*lambda*W is added while the tile is in cache.
                    for i in range(r0, r0 + mr):
                        for j in range(c0, c0 + nc):
                            grad_weight[i, j] += two_l2 * weight[i, j]
        free(mem)

    if grad_bias is not None and fout > 0:
        # Column chunks summed row by row: contiguous reads, fixed summation order.
        tiles_n = (fout + 63) // 64
        with nogil:
            for t in prange(tiles_n, schedule="static",
                            num_threads=_threads(n * fout * 16, num_threads)):
                c0 = t * 64
                nc = min(64, fout - c0)
                for j in range(c0, c0 + nc):
                    grad_bias[j] = 0
                for i in range(n):
                    for j in range(c0, c0 + nc):
                        grad_bias[j] += grad_out[i, j]
