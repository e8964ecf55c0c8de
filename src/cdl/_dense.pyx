# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Dense (fully connected) kernels: f(x; W) = x W^T + b and its gradients.

Every product is cut into fixed tiles of the output, each computed by one
single-threaded BLAS GEMM over the full reduction; OpenMP spreads the tiles.
The tiling depends only on the shapes, so results are bitwise identical for
any thread count. Inputs are trusted: cdl.functional validates them.
"""
from cython cimport floating
from cython.parallel cimport prange
from cdl._blas cimport gemm
from cdl._runtime cimport ensure_single_threaded_blas

# Below this many multiply-adds a second thread costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN_MACS = 1 << 19


cdef inline void _tiling(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k,
                         Py_ssize_t* tm, Py_ssize_t* tn) noexcept nogil:
    # Output tiles of at most 64x128 (single-threaded sgemm runs near its peak
    # there), halved until there are 4 tiles or a tile would drop under 2M
    # multiply-adds. Depends on the shapes only, never on the thread count.
    tm[0] = m if m <= 64 else 64
    tn[0] = n if n <= 128 else 128
    while ((m + tm[0] - 1) // tm[0]) * ((n + tn[0] - 1) // tn[0]) < 4 \
            and tm[0] * tn[0] * k >= (1 << 21):
        if tn[0] >= 128:
            tn[0] = (tn[0] + 1) // 2
        elif tm[0] >= 32:
            tm[0] = (tm[0] + 1) // 2
        else:
            break


cdef inline int _threads(Py_ssize_t macs, int num_threads) noexcept nogil:
    return num_threads if macs >= PARALLEL_MIN_MACS else 1


def linear_forward(const floating[:, ::1] x, const floating[:, ::1] weight,
                   const floating[::1] bias, floating[:, ::1] out, int num_threads):
    """out = x @ weight.T + bias (bias may be None)."""
    cdef Py_ssize_t n = x.shape[0], fin = x.shape[1], fout = weight.shape[0]
    cdef Py_ssize_t tm, tn, tiles_m, tiles_n, t, i, j, r0, c0, mr, nc
    cdef bint has_bias = bias is not None
    cdef floating beta
    if n == 0 or fout == 0:
        return
    ensure_single_threaded_blas()
    _tiling(n, fout, fin, &tm, &tn)
    tiles_m = (n + tm - 1) // tm
    tiles_n = (fout + tn - 1) // tn
    with nogil:
        for t in prange(tiles_m * tiles_n, schedule="static",
                        num_threads=_threads(n * fin * fout, num_threads)):
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
            gemm(False, True, <int>mr, <int>nc, <int>fin, <floating>1.0,
                 &x[r0, 0], <int>fin, &weight[c0, 0], <int>fin,
                 beta, &out[r0, c0], <int>fout)


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
    ensure_single_threaded_blas()

    if grad_input is not None and n > 0 and fin > 0:
        _tiling(n, fin, fout, &tm, &tn)
        tiles_m = (n + tm - 1) // tm
        tiles_n = (fin + tn - 1) // tn
        with nogil:
            for t in prange(tiles_m * tiles_n, schedule="static", num_threads=nt):
                r0 = (t // tiles_n) * tm
                c0 = (t % tiles_n) * tn
                mr = min(tm, n - r0)
                nc = min(tn, fin - c0)
                if fout == 0:
                    for i in range(r0, r0 + mr):
                        for j in range(c0, c0 + nc):
                            grad_input[i, j] = 0
                    continue
                gemm(False, False, <int>mr, <int>nc, <int>fout, <floating>1.0,
                     &grad_out[r0, 0], <int>fout, &weight[0, c0], <int>fin,
                     <floating>0.0, &grad_input[r0, c0], <int>fin)

    if fout > 0 and fin > 0:
        _tiling(fout, fin, n, &tm, &tn)
        tiles_m = (fout + tm - 1) // tm
        tiles_n = (fin + tn - 1) // tn
        with nogil:
            for t in prange(tiles_m * tiles_n, schedule="static", num_threads=nt):
                r0 = (t // tiles_n) * tm
                c0 = (t % tiles_n) * tn
                mr = min(tm, fout - r0)
                nc = min(tn, fin - c0)
                if n > 0:
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
