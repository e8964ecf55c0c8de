# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dense (fully connected) kernels: f(x; W) = x W^T + b and its gradients.

Every product (out = x W^T, dx = G W, dW = G^T x) is cut into fixed tiles of
the output, each computed by one single-threaded GEMM over the full
reduction; OpenMP spreads the tiles. The tiling depends only on the shapes,
so results are bitwise identical for any thread count. Tiles are handed out
dynamically (which thread runs a tile never changes its result), so a thread
that the OS preempts on a busy machine does not hold the others up.

float32 tiles use our own GEMM (cdl_gemm.h, built per instruction set like
_conv): B packed into KC x NR panels and A into mr x KC panels (transposes
handled in the packing), an mr x NR microkernel in vector registers (14 x 32
on AVX-512, 6 x 16 on AVX2), edges by exact-height kernels and zero-padded
columns; a forward with few outputs takes dot products along in_features
instead. Why: where SciPy's OpenBLAS runs its AVX2 (Haswell) kernels (Zen 5),
ours on AVX-512 is ~1.7-2x faster per tile (2x on skinny 4096 -> 10 shapes,
where OpenBLAS's fixed costs dominate); against its AVX-512 kernels (Sapphire
Rapids, 1 thread) 1.1x on 1024 x 1024 x 256 and 2x on 784 -> 256, batch 64.
On AVX2 ours only ties on big products, so it is used for skinny or small
ones; on SSE only for 2-4 rows.
float64 and every other case stay on SciPy's BLAS, single-threaded while any
kernel (of any Python thread) is in its BLAS calls: cdl._runtime counts them, and
gives BLAS its thread count back only when none is. A float32 batch of one
takes our dot products (GEMV) on AVX builds, BLAS's GEMV on the baseline build,
and its backward one pass over the rows of W (_backward_one).
The choice depends on the shapes and the build only. Inputs are trusted:
cdl.functional validates them.

linear_forward(..., relu=True) fuses ReLU (v <= 0 gives +0, NaN passes): our
sgemm microkernels and dot products apply it as they store the last block of the
reduction, BLAS tiles (float64, and float32 where BLAS runs) in a pass over the
finished tile while it is in cache; bitwise the product followed by relu_forward.

A small batch with a big weight (e.g. 784 -> 256 at batch 1) only streams the
weight, so the forward and the weight gradient cut it into row chunks that
are dealt out round-robin (chunk c to thread c mod threads) instead of
dynamically; the SGD update deals the same chunks the same way (row_chunks
tells the model where they are). Each core then keeps its rows of W and dW in
its own L2 cache from step to step instead of fetching them from L3.
"""
from cython cimport floating
from cython.parallel cimport prange
from cdl._kernels._blas cimport gemm, gemv
from cdl._kernels._runtime cimport blas_done, ensure_single_threaded_blas
from cdl._kernels._openmp cimport omp_get_thread_num
from libc.stdlib cimport malloc, free

cdef extern from "cdl_simd.h" nogil:
    const int VF "CDL_VF"

from cdl._kernels._gemm cimport GEMM_NR, sgemm, sgemm_scratch

cdef extern from "cdl_gemm.h" nogil:
    const int DOT_RJ "CDL_DOT_RJ"
    void sdot_nt "cdl_sdot_nt"(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                               const float* a, Py_ssize_t lda, const float* b, Py_ssize_t ldb,
                               float* c, Py_ssize_t ldc, int beta_one, int relu)
    double fma_peak "cdl_fma_peak"(double seconds, int num_threads)

# Below this many multiply-adds a second thread costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN_MACS = 1 << 19


# Row chunks for a small batch: a weight of at least ROW_SPLIT_MIN elements in
# chunks of whole rows, about ROW_CHUNK elements each and at most MAX_ROW_CHUNKS
# (aimed at an even count, so that two threads get equal shares; rounding to
# whole rows can leave one chunk more). Below that size one thread streams the
# weight faster than two start.
cdef enum:
    SMALL_BATCH = 8
    ROW_SPLIT_MIN = 1 << 16
    ROW_CHUNK = 1 << 15
    MAX_ROW_CHUNKS = 16


cdef inline Py_ssize_t _row_chunk(Py_ssize_t fout, Py_ssize_t fin) noexcept nogil:
    """Rows per chunk of a (fout, fin) weight; fout (one chunk) if it is not split."""
    cdef Py_ssize_t parts = min(min(fout * fin // ROW_CHUNK, fout), MAX_ROW_CHUNKS)
    if fout * fin < ROW_SPLIT_MIN or parts < 2:
        return fout
    parts -= parts % 2
    return (fout + parts - 1) // parts


def row_chunks(Py_ssize_t fout, Py_ssize_t fin):
    """(rows per chunk, number of chunks) of a (fout, fin) weight at batch <= SMALL_BATCH;
    chunk c is handled by OpenMP thread c mod threads."""
    cdef Py_ssize_t rows = _row_chunk(fout, fin)
    return rows, ((fout + rows - 1) // rows if fout > 0 else 1)


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
    # where OpenBLAS packs all of B for a few rows. A batch of one is a GEMV
    # (dot products, see _forward_tile).
    if m < 2 or n < 2 or k < 1:
        return False
    if n < GEMM_NR and k < 16:
        # A few columns over a short reduction: ours ends in scalar stores
        # (C^T, or a part-width tile) and lost to BLAS (10 -> 4096, batch 1).
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
                        float* c, Py_ssize_t ldc, bint beta_one, float* scratch,
                        bint relu=False) noexcept nogil:
    if _flip(m, n):
        sgemm(n, m, k, b, cs_b, rs_b, a, cs_a, rs_a, c, 1, ldc, beta_one, relu, scratch)
    else:
        sgemm(m, n, k, a, rs_a, cs_a, b, rs_b, cs_b, c, ldc, 1, beta_one, relu, scratch)


cdef float* _scratch(Py_ssize_t tm, Py_ssize_t tn, Py_ssize_t k, int nt, Py_ssize_t* per) except? NULL:
    # Packing buffers for nt threads, allocated once per call.
    per[0] = max(sgemm_scratch(tm, tn, k), sgemm_scratch(tn, tm, k))
    cdef float* mem = <float*>malloc(nt * per[0] * sizeof(float))
    if mem == NULL:
        raise MemoryError()
    return mem


cdef inline int _threads(Py_ssize_t macs, int num_threads) noexcept nogil:
    return num_threads if macs >= PARALLEL_MIN_MACS else 1


cdef inline void _relu_tile(floating* out, Py_ssize_t fout, Py_ssize_t r0, Py_ssize_t mr,
                            Py_ssize_t c0, Py_ssize_t nc) noexcept nogil:
    # ReLU's rule (v <= 0 gives +0, NaN passes) on a finished tile, in cache.
    cdef Py_ssize_t i, j
    cdef floating v
    for i in range(r0, r0 + mr):
        for j in range(c0, c0 + nc):
            v = out[i * fout + j]
            out[i * fout + j] = 0 if v <= 0 else v


cdef void _forward_tile(const floating* x, const floating* weight, const floating* bias,
                        floating* out, Py_ssize_t fin, Py_ssize_t fout, Py_ssize_t r0,
                        Py_ssize_t mr, Py_ssize_t c0, Py_ssize_t nc, bint own, bint dot,
                        float* scratch, bint relu=False) noexcept nogil:
    """out[r0:r0+mr, c0:c0+nc] = x[r0:r0+mr] @ weight[c0:c0+nc].T + bias[c0:c0+nc]
    (then ReLU if relu: our float32 kernels apply it as they store the last block of
    the reduction, BLAS tiles in a pass over the finished tile)."""
    cdef Py_ssize_t i, j
    cdef bint has_bias = bias != NULL
    cdef floating beta = 0
    if has_bias:
        # Bias is written first and the GEMM accumulates onto it.
        beta = 1
        for i in range(r0, r0 + mr):
            for j in range(c0, c0 + nc):
                out[i * fout + j] = bias[j]
    if fin == 0:
        if not has_bias:
            for i in range(r0, r0 + mr):
                for j in range(c0, c0 + nc):
                    out[i * fout + j] = 0
        if relu:
            _relu_tile(out, fout, r0, mr, c0, nc)
        return
    if floating is float:
        if dot or (mr == 1 and VF >= 8):
            sdot_nt(mr, nc, fin, x + r0 * fin, fin, weight + c0 * fin, fin,
                    out + r0 * fout + c0, fout, has_bias, relu)
            return
        if own:
            _sgemm(mr, nc, fin, x + r0 * fin, fin, 1, weight + c0 * fin, 1, fin,
                   out + r0 * fout + c0, fout, has_bias, scratch, relu)
            return
    if mr == 1:
        gemv(False, <int>nc, <int>fin, <floating>1.0, weight + c0 * fin, <int>fin,
             x + r0 * fin, beta, out + r0 * fout + c0)
    else:
        gemm(False, True, <int>mr, <int>nc, <int>fin, <floating>1.0,
             x + r0 * fin, <int>fin, weight + c0 * fin, <int>fin,
             beta, out + r0 * fout + c0, <int>fout)
    if relu:
        _relu_tile(out, fout, r0, mr, c0, nc)


cdef int _linear_forward(const floating[:, ::1] x, const floating[:, ::1] weight,
                         const floating[::1] bias, floating[:, ::1] out, int num_threads,
                         bint relu=False) except -1:
    # BLAS is single-threaded until this kernel is done with it, even if it raises
    # (another thread's call returning must not restore it in between).
    ensure_single_threaded_blas()
    try:
        return _linear_forward_tiles(x, weight, bias, out, num_threads, relu)
    finally:
        blas_done()


cdef int _linear_forward_tiles(const floating[:, ::1] x, const floating[:, ::1] weight,
                               const floating[::1] bias, floating[:, ::1] out,
                               int num_threads, bint relu) except -1:
    cdef Py_ssize_t n = x.shape[0], fin = x.shape[1], fout = weight.shape[0]
    cdef Py_ssize_t tm, tn, tiles_m, tiles_n, t, r0, c0
    cdef int nt = _threads(n * fin * fout, num_threads)
    cdef bint own = floating is float and _own_gemm(n, fout, fin)
    cdef bint dot = own and _dot(fout)
    cdef bint chunked = n <= SMALL_BATCH and _row_chunk(fout, fin) < fout
    cdef float* mem = NULL
    cdef Py_ssize_t per = 0
    if n == 0 or fout == 0:
        return 0
    if chunked:
        tm, tn, nt = n, _row_chunk(fout, fin), num_threads
    else:
        _tiling(n, fout, fin, &tm, &tn)
    tiles_m = (n + tm - 1) // tm
    tiles_n = (fout + tn - 1) // tn
    if own and not dot:
        mem = _scratch(tm, tn, fin, nt, &per)
    cdef const floating* xp = &x[0, 0]
    cdef const floating* wp = &weight[0, 0]
    cdef const floating* bp = &bias[0] if bias is not None else NULL
    cdef floating* op = &out[0, 0]
    with nogil:
        if chunked:
            for t in prange(tiles_n, schedule="static", chunksize=1, num_threads=nt):
                c0 = t * tn
                _forward_tile(xp, wp, bp, op, fin, fout, 0, n, c0, min(tn, fout - c0),
                              own, dot, mem + omp_get_thread_num() * per, relu)
        else:
            for t in prange(tiles_m * tiles_n, schedule="dynamic", num_threads=nt):
                r0 = (t // tiles_n) * tm
                c0 = (t % tiles_n) * tn
                _forward_tile(xp, wp, bp, op, fin, fout, r0, min(tm, n - r0), c0,
                              min(tn, fout - c0), own, dot, mem + omp_get_thread_num() * per,
                              relu)
    free(mem)
    return 0


def linear_forward(const floating[:, ::1] x, const floating[:, ::1] weight,
                   const floating[::1] bias, floating[:, ::1] out, int num_threads,
                   bint relu=False):
    """out = x @ weight.T + bias (bias may be None).

    relu=True: out = max(0, x @ weight.T + bias) in the same pass over each tile,
    bitwise equal to the unfused product followed by relu_forward (v <= 0 gives +0,
    NaN passes)."""
    _linear_forward(x, weight, bias, out, num_threads, relu)


cdef void _wgrad_tile(const floating* grad_out, const floating* x, const floating* weight,
                      floating* grad_weight, Py_ssize_t n, Py_ssize_t fin, Py_ssize_t fout,
                      Py_ssize_t r0, Py_ssize_t mr, Py_ssize_t c0, Py_ssize_t nc, bint own,
                      floating two_l2, float* scratch) noexcept nogil:
    """grad_weight[r0:r0+mr, c0:c0+nc] = grad_out[:, r0:r0+mr].T @ x[:, c0:c0+nc] + 2*l2*W."""
    cdef Py_ssize_t i, j
    cdef floating* dw = grad_weight + r0 * fin + c0
    if own:
        if floating is float:
            _sgemm(mr, nc, n, grad_out + r0, 1, fout, x + c0, fin, 1, dw, fin, False, scratch)
    elif n > 0:
        gemm(True, False, <int>mr, <int>nc, <int>n, <floating>1.0, grad_out + r0, <int>fout,
             x + c0, <int>fin, <floating>0.0, dw, <int>fin)
    else:
        for i in range(mr):
            for j in range(nc):
                dw[i * fin + j] = 0
    if two_l2 != 0:
        # The L2 term 2*lambda*W is added while the tile is in cache.
        for i in range(r0, r0 + mr):
            for j in range(c0, c0 + nc):
                grad_weight[i * fin + j] += two_l2 * weight[i * fin + j]


cdef inline void _outer_rows(const floating* g, const floating* x, const floating* weight,
                             floating* grad_weight, Py_ssize_t fin, Py_ssize_t r0,
                             Py_ssize_t r1, floating two_l2) noexcept nogil:
    """grad_weight[i] = g[i] * x (+ 2*l2*W[i]) for rows r0 <= i < r1."""
    cdef Py_ssize_t i, j
    cdef floating gi
    cdef floating* dw
    cdef const floating* w
    for i in range(r0, r1):
        gi = g[i]
        dw = grad_weight + i * fin
        if two_l2 != 0:
            w = weight + i * fin
            for j in range(fin):
                dw[j] = gi * x[j] + two_l2 * w[j]
        else:
            for j in range(fin):
                dw[j] = gi * x[j]


cdef void _backward_one(const floating* g, const floating* x, const floating* weight,
                        floating* grad_input, floating* grad_weight, floating* grad_bias,
                        Py_ssize_t fin, Py_ssize_t fout, floating two_l2,
                        int num_threads) noexcept nogil:
    """A batch of one: the weight gradient is the outer product g x^T, the input
    gradient sum_i g[i] W[i] (rows added in order). One pass over the rows of W
    does both, where a GEMM would pack its operands and a GEMV read W again.
    A weight in row chunks gets its rows from the chunks' threads (as the forward
    and SGD), and the input gradient after them."""
    cdef Py_ssize_t i, j, t, rows = _row_chunk(fout, fin)
    cdef floating gi
    cdef const floating* w
    if grad_bias != NULL:
        for i in range(fout):
            grad_bias[i] = g[i]
    if rows < fout:
        for t in prange((fout + rows - 1) // rows, schedule="static", chunksize=1,
                        num_threads=num_threads):
            _outer_rows(g, x, weight, grad_weight, fin, t * rows, min(fout, t * rows + rows),
                        two_l2)
    if grad_input != NULL:
        for j in range(fin):
            grad_input[j] = 0
    for i in range(fout):
        gi = g[i]
        w = weight + i * fin
        if rows == fout:
            _outer_rows(g, x, weight, grad_weight, fin, i, i + 1, two_l2)
        if grad_input != NULL:
            for j in range(fin):
                grad_input[j] += gi * w[j]


cdef int _linear_backward(const floating[:, ::1] grad_out, const floating[:, ::1] x,
                          const floating[:, ::1] weight, floating[:, ::1] grad_input,
                          floating[:, ::1] grad_weight, floating[::1] grad_bias,
                          double l2, int num_threads) except -1:
    # as _linear_forward: BLAS single-threaded until this kernel is done with it
    ensure_single_threaded_blas()
    try:
        return _linear_backward_tiles(grad_out, x, weight, grad_input, grad_weight,
                                      grad_bias, l2, num_threads)
    finally:
        blas_done()


cdef int _linear_backward_tiles(const floating[:, ::1] grad_out, const floating[:, ::1] x,
                                const floating[:, ::1] weight, floating[:, ::1] grad_input,
                                floating[:, ::1] grad_weight, floating[::1] grad_bias,
                                double l2, int num_threads) except -1:
    cdef Py_ssize_t n = x.shape[0], fin = x.shape[1], fout = weight.shape[0]
    cdef Py_ssize_t t, i, j, r0, c0, mr, nc, tm, tn, tiles_m, tiles_n
    cdef floating two_l2 = <floating>(2.0 * l2)
    cdef int nt = _threads(n * fin * fout, num_threads)
    cdef bint own, chunked
    cdef float* mem = NULL
    cdef Py_ssize_t per = 0
    cdef const floating* gp
    cdef const floating* xp
    cdef const floating* wp
    cdef floating* dwp
    cdef floating* dxp = &grad_input[0, 0] if grad_input is not None else NULL
    cdef floating* dbp = &grad_bias[0] if grad_bias is not None else NULL
    if n == 1 and fin > 0 and fout > 0:
        with nogil:
            _backward_one(&grad_out[0, 0], &x[0, 0], &weight[0, 0], dxp, &grad_weight[0, 0],
                          dbp, fin, fout, two_l2, num_threads)
        return 0

    if grad_input is not None and n > 0 and fin > 0:
        _tiling(n, fin, fout, &tm, &tn)
        tiles_m = (n + tm - 1) // tm
        tiles_n = (fin + tn - 1) // tn
        own = floating is float and _own_gemm(n, fin, fout)
        if own:
            mem = _scratch(tm, tn, fout, nt, &per)
        with nogil:
            for t in prange(tiles_m * tiles_n, schedule="dynamic", num_threads=nt):
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
        chunked = n <= SMALL_BATCH and _row_chunk(fout, fin) < fout
        if chunked:
            # The forward's row chunks, dealt to the same threads.
            tm, tn, nt = _row_chunk(fout, fin), fin, num_threads
        else:
            _tiling(fout, fin, n, &tm, &tn)
        tiles_m = (fout + tm - 1) // tm
        tiles_n = (fin + tn - 1) // tn
        own = floating is float and _own_gemm(fout, fin, n)
        if own:
            mem = _scratch(tm, tn, n, nt, &per)
        gp, xp, wp = &grad_out[0, 0], &x[0, 0], &weight[0, 0]
        dwp = &grad_weight[0, 0]
        with nogil:
            if chunked:
                for t in prange(tiles_m, schedule="static", chunksize=1, num_threads=nt):
                    r0 = t * tm
                    _wgrad_tile(gp, xp, wp, dwp, n, fin, fout, r0, min(tm, fout - r0), 0, fin,
                                own, two_l2, mem + omp_get_thread_num() * per)
            else:
                for t in prange(tiles_m * tiles_n, schedule="dynamic", num_threads=nt):
                    r0 = (t // tiles_n) * tm
                    c0 = (t % tiles_n) * tn
                    _wgrad_tile(gp, xp, wp, dwp, n, fin, fout, r0, min(tm, fout - r0), c0,
                                min(tn, fin - c0), own, two_l2, mem + omp_get_thread_num() * per)
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
    return 0


def linear_backward(const floating[:, ::1] grad_out, const floating[:, ::1] x,
                    const floating[:, ::1] weight, floating[:, ::1] grad_input,
                    floating[:, ::1] grad_weight, floating[::1] grad_bias,
                    double l2, int num_threads):
    """grad_input = grad_out @ W (skipped if None); grad_weight = grad_out.T @ x + 2*l2*W;
    grad_bias = sum of grad_out over the batch (skipped if None)."""
    _linear_backward(grad_out, x, weight, grad_input, grad_weight, grad_bias, l2, num_threads)


# ---------------------------------------------------------------- bound calls
# A float32 kernel call with its arrays bound once (cdl.model's training plan):
# ``run`` then skips the per-call buffer checks and type dispatch, which cost
# more than the arithmetic of a batch-1 layer. The input can be rebound.

cdef class LinearForward:
    """linear_forward(x, weight, bias, out, num_threads, relu) with its arrays bound."""
    cdef const float[:, ::1] x
    cdef const float[:, ::1] weight
    cdef const float[::1] bias
    cdef float[:, ::1] out
    cdef bint relu

    def __init__(self, x, weight, bias, out, relu=False):
        self.x, self.weight, self.bias, self.out = x, weight, bias, out
        self.relu = relu

    def bind_input(self, const float[:, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _linear_forward(self.x, self.weight, self.bias, self.out, num_threads, self.relu)


cdef class LinearBackward:
    cdef const float[:, ::1] grad_out
    cdef const float[:, ::1] x
    cdef const float[:, ::1] weight
    cdef float[:, ::1] grad_input
    cdef float[:, ::1] grad_weight
    cdef float[::1] grad_bias

    def __init__(self, grad_out, x, weight, grad_input, grad_weight, grad_bias):
        self.grad_out, self.x, self.weight = grad_out, x, weight
        self.grad_input, self.grad_weight, self.grad_bias = grad_input, grad_weight, grad_bias

    def bind_input(self, const float[:, ::1] x):
        self.x = x

    def run(self, int num_threads, double l2):
        _linear_backward(self.grad_out, self.x, self.weight, self.grad_input, self.grad_weight,
                         self.grad_bias, l2, num_threads)


def fma_peak_gflops(double seconds=0.2, int num_threads=1):
    """The float32 multiply-add peak of this build, GFLOP/s summed over num_threads threads.

    Each thread runs 12 independent register-resident multiply-add chains of full
    vectors (zmm FMAs on the AVX-512 build, ymm FMAs on AVX2, SSE multiplies and
    adds on baseline) for about `seconds`; 2 flops per lane per multiply-add. A
    benchmark ceiling (bench/bench_peak.py), not a kernel."""
    cdef double r
    with nogil:
        r = fma_peak(seconds, num_threads)
    return r / 1e9
