# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Max-pooling kernels with argmax indices (PyTorch ``return_indices`` semantics);
average and global average pooling (at the end of this file).

Forward: y[n, c, i, j] = max over the KH x KW window at (i*S_h - P_h, j*S_w - P_w),
clipped to the input, so padded cells never win; ``indices`` holds the flat
position h*W + w of the winner within the input plane. Ties go to the first
maximum in row-major order (strict ``>``); a NaN always wins, so NaN propagates
(like PyTorch, the last NaN in the window is the one reported).

Backward: dx[idx] += dy. When windows do not overlap (stride >= kernel) every
input cell is written exactly once, as a gather (dy or 0), so no zeroing pass
is needed; overlapping windows zero the plane and scatter in output order.

Work is split over (n, c) planes, each computed whole by one thread, in fixed
order: results are bitwise identical for any thread count. (Handing planes out
dynamically cost up to 10x in a 2048-plane call; guided measured the same as
static.) The 2x2 stride-2 case without padding, the usual CNN pooling, has its
own branch-free loops that the compiler vectorises, and AVX-512 and AVX2 kernels of its
own (cdl_pool2x2.h). Inputs are trusted: cdl.functional validates them. The backward
kernels return how many indices did not point into their own window (0 for
indices made by the forward pass), so a caller can refuse foreign indices
instead of scattering silently wrong gradients.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport INFINITY, NAN
from libc.stdlib cimport malloc, free
from libc.string cimport memset
from cdl._kernels._openmp cimport omp_get_thread_num

# The inner loops are written in C (below) so that every select is a bit-mask
# blend: a ternary on floats compiles to a branch in the scalar remainder of a
# vectorised loop, and on random data that branch mispredicts half the time
# (a 2x2 pool over 28-wide rows ran 5x slower than over 32-wide ones).
#   cdl_pool_row_*: one window offset (h, c) applied to a run of n interior
#     outputs of a row; output j's candidate is xrow[j*sw], flat index idx0 + j*sw.
#     Strides 1 and 2 get their own loops (contiguous / deinterleaved loads).
#   cdl_pool2_fwd_* / cdl_pool2_bwd_*: one output row of the 2x2 stride-2 case.
# Winning rule everywhere: v > best (so ties keep the first) or v is NaN.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #define CDL_POOL_KERNELS(SFX, T, UT)                                            \
    static inline T cdl_pick_##SFX(int cond, T a, T b) {                            \
        UT ia, ib, m = (UT)0 - (UT)(cond != 0);                                     \
        memcpy(&ia, &a, sizeof ia);                                                 \
        memcpy(&ib, &b, sizeof ib);                                                 \
        ia = (ia & m) | (ib & ~m);                                                  \
        memcpy(&a, &ia, sizeof a);                                                  \
        return a;                                                                   \
    }                                                                               \
    static inline int cdl_ipick_##SFX(int cond, int a, int b) {                     \
        int m = -(cond != 0);                                                       \
        return (a & m) | (b & ~m);                                                  \
    }                                                                               \
    static inline void cdl_pool_row_##SFX##_s(const T *xrow, T *best, int *arg,     \
                                              Py_ssize_t n, Py_ssize_t sw, int idx0) { \
        Py_ssize_t j;                                                               \
        for (j = 0; j < n; j++) {                                                   \
            T v = xrow[j * sw], b = best[j];                                        \
            int take = (v > b) | (v != v);                                          \
            best[j] = cdl_pick_##SFX(take, v, b);                                   \
            arg[j] = cdl_ipick_##SFX(take, idx0 + (int)(j * sw), arg[j]);           \
        }                                                                           \
    }                                                                               \
    static void cdl_pool_row_##SFX(const T *xrow, T *best, int *arg, Py_ssize_t n,  \
                                   Py_ssize_t sw, int idx0) {                       \
        if (sw == 1) cdl_pool_row_##SFX##_s(xrow, best, arg, n, 1, idx0);           \
        else if (sw == 2) cdl_pool_row_##SFX##_s(xrow, best, arg, n, 2, idx0);      \
        else cdl_pool_row_##SFX##_s(xrow, best, arg, n, sw, idx0);                  \
    }                                                                               \
    static void cdl_pool2_fwd_##SFX(const T *r0, const T *r1, T *y, int *ind,       \
                                    Py_ssize_t ow_n, int base, int w) {             \
        Py_ssize_t j;                                                               \
        for (j = 0; j < ow_n; j++) {                                                \
            T best = r0[2 * j], v;                                                  \
            int k = 0, take;                                                        \
            v = r0[2 * j + 1]; take = (v > best) | (v != v);                        \
            best = cdl_pick_##SFX(take, v, best); k = cdl_ipick_##SFX(take, 1, k);  \
            v = r1[2 * j]; take = (v > best) | (v != v);                            \
            best = cdl_pick_##SFX(take, v, best); k = cdl_ipick_##SFX(take, w, k);  \
            v = r1[2 * j + 1]; take = (v > best) | (v != v);                        \
            best = cdl_pick_##SFX(take, v, best);                                   \
            k = cdl_ipick_##SFX(take, w + 1, k);                                    \
            y[j] = best;                                                            \
            ind[j] = base + 2 * (int)j + k;                                         \
        }                                                                           \
    }                                                                               \
    /* Gather form: each cell of the two input rows gets dy of its window if it   \
       is that window's argmax, else 0. Returns how many indices matched. */      \
    static Py_ssize_t cdl_pool2_bwd_##SFX(const T *g, const int *ind, T *d0, T *d1, \
                                          Py_ssize_t ow_n, int base, int w) {       \
        Py_ssize_t j, matched = 0;                                                  \
        for (j = 0; j < ow_n; j++) {                                                \
            T gv = g[j];                                                            \
            int rel = ind[j] - base - 2 * (int)j;                                   \
            d0[2 * j] = cdl_pick_##SFX(rel == 0, gv, (T)0);                         \
            d0[2 * j + 1] = cdl_pick_##SFX(rel == 1, gv, (T)0);                     \
            d1[2 * j] = cdl_pick_##SFX(rel == w, gv, (T)0);                         \
            d1[2 * j + 1] = cdl_pick_##SFX(rel == w + 1, gv, (T)0);                 \
            matched += (rel == 0) + (rel == 1) + (rel == w) + (rel == w + 1);       \
        }                                                                           \
        return matched;                                                             \
    }
    CDL_POOL_KERNELS(f, float, uint32_t)
    CDL_POOL_KERNELS(d, double, uint64_t)

    /* 2x2 stride 2 on a small plane (short rows, as LeNet's 28- and 10-wide maps):
       a row-by-row loop would be all scalar remainder. The even and the odd input
       rows are first packed into two contiguous buffers (2*OW cells per row), so
       output j's window is b0[2j], b0[2j+1], b1[2j], b1[2j+1] across the whole
       plane and one long loop vectorises; the index offset 2*oh*W + 2*ow is added
       row by row. Planes up to CDL_POOL2_SMALL cells (per row parity) qualify. */
    #define CDL_POOL2_SMALL 2048
    #define CDL_POOL2_PLANE(SFX, T)                                                 \
    static void cdl_pool2_fwd_small_##SFX(const T *x, T *y, int *ind, Py_ssize_t W, \
                                          Py_ssize_t OH, Py_ssize_t OW) {           \
        T b0[CDL_POOL2_SMALL], b1[CDL_POOL2_SMALL];                                  \
        Py_ssize_t oh, ow, w2 = 2 * OW;                                             \
        for (oh = 0; oh < OH; oh++) {                                               \
            memcpy(b0 + oh * w2, x + 2 * oh * W, (size_t)w2 * sizeof(T));           \
            memcpy(b1 + oh * w2, x + (2 * oh + 1) * W, (size_t)w2 * sizeof(T));     \
        }                                                                           \
        cdl_pool2_fwd_##SFX(b0, b1, y, ind, OH * OW, 0, (int)W);                    \
        /* cdl_pool2_fwd_ added 2j; the true offset of output (oh, ow) is           \
           2*oh*W + 2*ow = 2j + oh*(2W - 2*OW). */                                  \
        for (oh = 1; oh < OH; oh++) {                                               \
            int shift = (int)(oh * (2 * W - w2));                                   \
            for (ow = 0; ow < OW; ow++) ind[oh * OW + ow] += shift;                 \
        }                                                                           \
    }                                                                               \
    static Py_ssize_t cdl_pool2_bwd_small_##SFX(const T *g, const int *ind, T *dx,  \
                                                Py_ssize_t H, Py_ssize_t W,         \
                                                Py_ssize_t OH, Py_ssize_t OW) {     \
        T b0[CDL_POOL2_SMALL], b1[CDL_POOL2_SMALL];                                  \
        int rel[CDL_POOL2_SMALL / 2];                                                \
        Py_ssize_t oh, ow, w, h, w2 = 2 * OW, matched;                              \
        /* Indices relative to the packed layout (see the forward). */              \
        for (oh = 0; oh < OH; oh++) {                                               \
            int shift = (int)(oh * (2 * W - w2));                                   \
            for (ow = 0; ow < OW; ow++) rel[oh * OW + ow] = ind[oh * OW + ow] - shift; \
        }                                                                           \
        matched = cdl_pool2_bwd_##SFX(g, rel, b0, b1, OH * OW, 0, (int)W);          \
        for (oh = 0; oh < OH; oh++) {                                               \
            T *d0 = dx + 2 * oh * W, *d1 = d0 + W;                                  \
            memcpy(d0, b0 + oh * w2, (size_t)w2 * sizeof(T));                       \
            memcpy(d1, b1 + oh * w2, (size_t)w2 * sizeof(T));                       \
            for (w = w2; w < W; w++) { d0[w] = 0; d1[w] = 0; }                      \
        }                                                                           \
        for (h = 2 * OH; h < H; h++)                                                \
            for (w = 0; w < W; w++) dx[h * W + w] = 0;                              \
        return matched;                                                             \
    }
    CDL_POOL2_PLANE(f, float)
    CDL_POOL2_PLANE(d, double)
    """
    Py_ssize_t CDL_POOL2_SMALL
    void cdl_pool2_fwd_small_f(const float* x, float* y, int* ind, Py_ssize_t W,
                               Py_ssize_t OH, Py_ssize_t OW) noexcept nogil
    void cdl_pool2_fwd_small_d(const double* x, double* y, int* ind, Py_ssize_t W,
                               Py_ssize_t OH, Py_ssize_t OW) noexcept nogil
    Py_ssize_t cdl_pool2_bwd_small_f(const float* g, const int* ind, float* dx, Py_ssize_t H,
                                     Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW) noexcept nogil
    Py_ssize_t cdl_pool2_bwd_small_d(const double* g, const int* ind, double* dx, Py_ssize_t H,
                                     Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW) noexcept nogil
    void cdl_pool_row_f(const float* xrow, float* best, int* arg, Py_ssize_t n,
                        Py_ssize_t sw, int idx0) noexcept nogil
    void cdl_pool_row_d(const double* xrow, double* best, int* arg, Py_ssize_t n,
                        Py_ssize_t sw, int idx0) noexcept nogil
    void cdl_pool2_fwd_f(const float* r0, const float* r1, float* y, int* ind,
                         Py_ssize_t ow_n, int base, int w) noexcept nogil
    void cdl_pool2_fwd_d(const double* r0, const double* r1, double* y, int* ind,
                         Py_ssize_t ow_n, int base, int w) noexcept nogil
    Py_ssize_t cdl_pool2_bwd_f(const float* g, const int* ind, float* d0, float* d1,
                               Py_ssize_t ow_n, int base, int w) noexcept nogil
    Py_ssize_t cdl_pool2_bwd_d(const double* g, const int* ind, double* d0, double* d1,
                               Py_ssize_t ow_n, int base, int w) noexcept nogil

cdef extern from "cdl_pool2x2.h" nogil:
    const bint POOL2_VEC "CDL_POOL2_VEC"
    void pool2_plane_fwd "cdl_pool2_plane_fwd"(const float* x, float* y, int* ind, Py_ssize_t W,
                                                Py_ssize_t OH, Py_ssize_t OW, int relu)
    Py_ssize_t pool2_plane_bwd "cdl_pool2_plane_bwd"(const float* g, const int* ind,
                                                      const float* yrelu, float* dx, Py_ssize_t H,
                                                      Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW)


cdef inline void _pool_row(const floating* xrow, floating* best, int* arg, Py_ssize_t n,
                           Py_ssize_t sw, int idx0) noexcept nogil:
    if floating is float:
        cdl_pool_row_f(xrow, best, arg, n, sw, idx0)
    else:
        cdl_pool_row_d(xrow, best, arg, n, sw, idx0)


# Below this many input elements a second thread costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN_ELEMENTS = 1 << 15


cdef inline int _threads(Py_ssize_t work, int num_threads) noexcept nogil:
    return num_threads if work >= PARALLEL_MIN_ELEMENTS else 1


# ---------------------------------------------------------------- forward

cdef void _forward_2x2(const floating* x, floating* y, int* ind,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                       Py_ssize_t OW) noexcept nogil:
    cdef Py_ssize_t oh
    if floating is float and POOL2_VEC and OW < 16:
        # Short rows: the row kernel below is all remainder there. On rows of 16
        # or more outputs it measured 10-15% faster than the vector kernel.
        pool2_plane_fwd(x, y, ind, W, OH, OW, False)
        return
    if OW < 16 and 2 * OH * OW <= CDL_POOL2_SMALL:
        if floating is float:
            cdl_pool2_fwd_small_f(x, y, ind, W, OH, OW)
        else:
            cdl_pool2_fwd_small_d(x, y, ind, W, OH, OW)
        return
    for oh in range(OH):
        if floating is float:
            cdl_pool2_fwd_f(x + 2 * oh * W, x + (2 * oh + 1) * W, y + oh * OW, ind + oh * OW,
                            OW, <int>(2 * oh * W), <int>W)
        else:
            cdl_pool2_fwd_d(x + 2 * oh * W, x + (2 * oh + 1) * W, y + oh * OW, ind + oh * OW,
                            OW, <int>(2 * oh * W), <int>W)


cdef inline void _forward_one(const floating* x, floating* y, int* ind, Py_ssize_t W,
                              Py_ssize_t h0, Py_ssize_t h1, Py_ssize_t w0,
                              Py_ssize_t w1) noexcept nogil:
    """One output over rows [h0, h1) and columns [w0, w1), already clipped."""
    cdef Py_ssize_t h, w, k = h0 * W + w0
    cdef floating v, best = -INFINITY
    # Start from -inf at the first real cell: an all -inf window still reports
    # its first cell, and padding is never a candidate.
    for h in range(h0, h1):
        for w in range(w0, w1):
            v = x[h * W + w]
            if v > best or v != v:
                best = v
                k = h * W + w
    y[0] = best
    ind[0] = <int>k


cdef void _forward_plane(const floating* x, floating* y, int* ind,
                         Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                         Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                         Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    cdef Py_ssize_t oh, ow, h, c, h0, h1, col0, n
    # Interior outputs [ow_lo, ow_hi) have their whole window inside the columns;
    # only the few at the left and right edges are clipped one by one.
    cdef Py_ssize_t ow_lo = min((pw + sw - 1) // sw, OW)
    cdef Py_ssize_t ow_hi = ow_lo
    if W + pw - kw >= 0:
        ow_hi = max(min((W + pw - kw) // sw + 1, OW), ow_lo)
    cdef floating* yrow
    cdef int* irow
    n = ow_hi - ow_lo
    for oh in range(OH):
        h0 = oh * sh - ph
        h1 = min(h0 + kh, H)
        h0 = max(h0, 0)
        yrow = y + oh * OW
        irow = ind + oh * OW
        for ow in range(ow_lo):
            _forward_one(x, yrow + ow, irow + ow, W, h0, h1,
                         max(ow * sw - pw, 0), min(ow * sw - pw + kw, W))
        for ow in range(ow_hi, OW):
            _forward_one(x, yrow + ow, irow + ow, W, h0, h1,
                         max(ow * sw - pw, 0), min(ow * sw - pw + kw, W))
        if n <= 0:
            continue
        for ow in range(ow_lo, ow_hi):
            yrow[ow] = -INFINITY
            irow[ow] = <int>(h0 * W + ow * sw - pw)
        # Window offsets in row-major order, each swept across the interior
        # outputs: every output still sees its candidates in row-major order.
        for h in range(h0, h1):
            for c in range(kw):
                col0 = ow_lo * sw - pw + c
                _pool_row(x + h * W + col0, yrow + ow_lo, irow + ow_lo, n, sw,
                          <int>(h * W + col0))


cdef int _max_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                             int[:, :, :, ::1] indices, Py_ssize_t kh, Py_ssize_t kw,
                             Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                             int num_threads) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t p, planes = N * C
    cdef bint fast = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    if planes == 0 or OH == 0 or OW == 0:
        return 0
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* yp = &out[0, 0, 0, 0]
    cdef int* ip = &indices[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, schedule="static",
                        num_threads=_threads(planes * H * W, num_threads)):
            if fast:
                _forward_2x2(xp + p * H * W, yp + p * OH * OW, ip + p * OH * OW, H, W, OH, OW)
            else:
                _forward_plane(xp + p * H * W, yp + p * OH * OW, ip + p * OH * OW,
                               H, W, OH, OW, kh, kw, sh, sw, ph, pw)
    return 0


def max_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                       int[:, :, :, ::1] indices, Py_ssize_t kh, Py_ssize_t kw,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                       int num_threads):
    """out, indices = max-pool of x (KH x KW window, stride (sh, sw), padding (ph, pw))."""
    _max_pool2d_forward(x, out, indices, kh, kw, sh, sw, ph, pw, num_threads)


# ---------------------------------------------------------------- backward

cdef Py_ssize_t _backward_2x2(const floating* g, const int* ind, floating* dx,
                              Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                              Py_ssize_t OW) noexcept nogil:
    """Gather form: each input cell gets dy of its window if it was the argmax, else 0."""
    cdef Py_ssize_t oh, h, w
    cdef floating* d0
    cdef floating* d1
    cdef Py_ssize_t matched = 0
    if floating is float and POOL2_VEC:
        return OH * OW - pool2_plane_bwd(g, ind, NULL, dx, H, W, OH, OW)
    if OW < 16 and 2 * OH * OW <= CDL_POOL2_SMALL:
        if floating is float:
            matched = cdl_pool2_bwd_small_f(g, ind, dx, H, W, OH, OW)
        else:
            matched = cdl_pool2_bwd_small_d(g, ind, dx, H, W, OH, OW)
        return OH * OW - matched
    for oh in range(OH):
        d0 = dx + 2 * oh * W
        d1 = d0 + W
        if floating is float:
            matched += cdl_pool2_bwd_f(g + oh * OW, ind + oh * OW, d0, d1, OW,
                                       <int>(2 * oh * W), <int>W)
        else:
            matched += cdl_pool2_bwd_d(g + oh * OW, ind + oh * OW, d0, d1, OW,
                                       <int>(2 * oh * W), <int>W)
        for w in range(2 * OW, W):      # odd width: the last column is in no window
            d0[w] = 0
            d1[w] = 0
    for h in range(2 * OH, H):          # odd height: the last row is in no window
        for w in range(W):
            dx[h * W + w] = 0
    return OH * OW - matched


cdef Py_ssize_t _backward_disjoint(const floating* g, const int* ind, floating* dx,
                                   Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                                   Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                                   Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    """stride >= kernel: windows are disjoint, so gather and write every cell once."""
    cdef Py_ssize_t h, w, oh, ow, r, c, flat, o, cstop
    cdef Py_ssize_t matched = 0
    # Columns from here on lie right of the last window's stride span.
    cdef Py_ssize_t tail_w = max(OW * sw - pw, 0)
    cdef floating* row
    for h in range(H):
        row = dx + h * W
        oh = (h + ph) // sh
        r = (h + ph) - oh * sh
        if oh >= OH or r >= kh:
            for w in range(W):
                row[w] = 0
            continue
        for ow in range(OW):
            o = oh * OW + ow
            # (not all of a huge stride: only the columns of this row's plane)
            cstop = min(sw, W + pw - ow * sw)
            if cstop <= 0:
                break
            for c in range(cstop):
                w = ow * sw - pw + c
                if w < 0 or w >= W:
                    continue
                flat = h * W + w
                if c < kw and ind[o] == flat:
                    row[w] = g[o]
                    matched += 1
                else:
                    row[w] = 0
        for w in range(tail_w, W):
            row[w] = 0
    return OH * OW - matched


cdef Py_ssize_t _backward_overlap(const floating* g, const int* ind, floating* dx,
                                  Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                                  Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                                  Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    """Overlapping windows: zero the plane, then accumulate in output order."""
    cdef Py_ssize_t oh, ow, i, h, w, h0, w0
    cdef Py_ssize_t bad = 0
    memset(dx, 0, H * W * sizeof(floating))
    for oh in range(OH):
        h0 = oh * sh - ph
        for ow in range(OW):
            w0 = ow * sw - pw
            i = ind[oh * OW + ow]
            h = i // W if i >= 0 else -1
            w = i - h * W
            if h < max(h0, 0) or h >= min(h0 + kh, H) or w < max(w0, 0) or w >= min(w0 + kw, W):
                bad += 1
                continue
            dx[i] += g[oh * OW + ow]
    return bad


cdef Py_ssize_t _max_pool2d_backward(const floating[:, :, :, ::1] grad_out,
                                     const int[:, :, :, ::1] indices,
                                     floating[:, :, :, ::1] grad_input, Py_ssize_t kh,
                                     Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                                     Py_ssize_t pw, int num_threads) except -1:
    cdef Py_ssize_t N = grad_input.shape[0], C = grad_input.shape[1]
    cdef Py_ssize_t H = grad_input.shape[2], W = grad_input.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef Py_ssize_t p, planes = N * C, bad = 0
    cdef bint fast = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    cdef bint disjoint = sh >= kh and sw >= kw
    if planes == 0 or H == 0 or W == 0:
        return 0
    cdef floating* dp = &grad_input[0, 0, 0, 0]
    cdef const floating* gp = NULL
    cdef const int* ip = NULL
    if OH == 0 or OW == 0:
        memset(dp, 0, planes * H * W * sizeof(floating))
        return 0
    gp = &grad_out[0, 0, 0, 0]
    ip = &indices[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, schedule="static",
                        num_threads=_threads(planes * H * W, num_threads)):
            if fast:
                bad += _backward_2x2(gp + p * OH * OW, ip + p * OH * OW, dp + p * H * W,
                                     H, W, OH, OW)
            elif disjoint:
                bad += _backward_disjoint(gp + p * OH * OW, ip + p * OH * OW, dp + p * H * W,
                                          H, W, OH, OW, kh, kw, sh, sw, ph, pw)
            else:
                bad += _backward_overlap(gp + p * OH * OW, ip + p * OH * OW, dp + p * H * W,
                                         H, W, OH, OW, kh, kw, sh, sw, ph, pw)
    return bad


def max_pool2d_backward(const floating[:, :, :, ::1] grad_out, const int[:, :, :, ::1] indices,
                        floating[:, :, :, ::1] grad_input, Py_ssize_t kh, Py_ssize_t kw,
                        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                        int num_threads):
    """grad_input = scatter of grad_out through indices (every cell written).

    Returns the number of indices that do not lie in their own window (those are
    skipped); 0 for indices produced by max_pool2d_forward with the same parameters.
    """
    return _max_pool2d_backward(grad_out, indices, grad_input, kh, kw, sh, sw, ph, pw, num_threads)


# ---------------------------------------------------------------- ReLU then 2x2 pool
# A ReLU followed by a 2x2 stride-2 max-pool (the usual CNN block) in one pass:
# Sequential runs the pair through these, so the full-size ReLU output is never
# written and read back, nor its gradient. Each plane is rectified in vector
# registers (AVX-512 and AVX2 float32, cdl_pool2x2.h) or into a per-thread buffer in
# cache, and pooled, so values and indices are exactly those of the separate
# layers; the backward masks the pooled gradient with ReLU's rule (0 where the
# pooled value is <= 0; NaN passes) and gathers it.


cdef inline Py_ssize_t _lines(Py_ssize_t n, size_t itemsize) noexcept nogil:
    # n elements rounded up to whole 64-byte lines plus one spare line, so that
    # the threads' scratch buffers never share a cache line (sharing one made
    # the 2-thread runs no faster than 1 thread).
    cdef Py_ssize_t per_line = 64 // itemsize
    return (n + per_line - 1) // per_line * per_line + per_line


cdef void _relu_copy(const floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v, zero = 0
    for i in range(n):
        v = x[i]
        y[i] = zero if v <= zero else v       # ReLU's rule: NaN passes


cdef int _max_pool2d_relu_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                                  int[:, :, :, ::1] indices, int num_threads) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t p, planes = N * C, tid, per
    cdef int nt
    cdef floating* buf
    if planes == 0 or OH == 0 or OW == 0:
        return 0
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* yp = &out[0, 0, 0, 0]
    cdef int* ip = &indices[0, 0, 0, 0]
    nt = _threads(planes * H * W, num_threads)
    if floating is float and POOL2_VEC:
        with nogil:
            for p in prange(planes, schedule="static", num_threads=nt):
                pool2_plane_fwd(xp + p * H * W, yp + p * OH * OW, ip + p * OH * OW, W, OH, OW,
                                True)
        return 0
    per = _lines(H * W, sizeof(floating))
    buf = <floating*>malloc(nt * per * sizeof(floating))
    if buf == NULL:
        raise MemoryError()
    with nogil:
        for p in prange(planes, schedule="static", num_threads=nt):
            tid = omp_get_thread_num()
            _relu_copy(xp + p * H * W, buf + tid * per, H * W)
            _forward_2x2(buf + tid * per, yp + p * OH * OW, ip + p * OH * OW, H, W, OH, OW)
    free(buf)
    return 0


def max_pool2d_relu_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                            int[:, :, :, ::1] indices, int num_threads):
    """out, indices = 2x2 stride-2 max-pool of max(0, x); equal to ReLU then MaxPool2d(2)."""
    _max_pool2d_relu_forward(x, out, indices, num_threads)


cdef Py_ssize_t _max_pool2d_relu_backward(const floating[:, :, :, ::1] grad_out,
                                          const floating[:, :, :, ::1] out,
                                          const int[:, :, :, ::1] indices,
                                          floating[:, :, :, ::1] grad_input,
                                          int num_threads) except -1:
    cdef Py_ssize_t N = grad_input.shape[0], C = grad_input.shape[1]
    cdef Py_ssize_t H = grad_input.shape[2], W = grad_input.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef Py_ssize_t p, planes = N * C, bad = 0, tid, o, per
    cdef int nt
    cdef floating zero = 0, gv
    cdef floating* buf
    cdef floating* gm
    cdef const floating* gp
    cdef const floating* yp
    if planes == 0 or H == 0 or W == 0:
        return 0
    cdef floating* dp = &grad_input[0, 0, 0, 0]
    if OH == 0 or OW == 0:
        memset(dp, 0, planes * H * W * sizeof(floating))
        return 0
    gp = &grad_out[0, 0, 0, 0]
    yp = &out[0, 0, 0, 0]
    cdef const int* ip = &indices[0, 0, 0, 0]
    nt = _threads(planes * H * W, num_threads)
    if floating is float and POOL2_VEC:
        with nogil:
            for p in prange(planes, schedule="static", num_threads=nt):
                bad += OH * OW - pool2_plane_bwd(gp + p * OH * OW, ip + p * OH * OW,
                                                 yp + p * OH * OW, dp + p * H * W, H, W, OH, OW)
        return bad
    per = _lines(OH * OW, sizeof(floating))
    buf = <floating*>malloc(nt * per * sizeof(floating))
    if buf == NULL:
        raise MemoryError()
    with nogil:
        for p in prange(planes, schedule="static", num_threads=nt):
            gm = buf + omp_get_thread_num() * per
            for o in range(OH * OW):
                gv = gp[p * OH * OW + o]        # both loads unconditional: a blend, no branch
                gm[o] = zero if yp[p * OH * OW + o] <= zero else gv
            bad += _backward_2x2(gm, ip + p * OH * OW, dp + p * H * W, H, W, OH, OW)
    free(buf)
    return bad


def max_pool2d_relu_backward(const floating[:, :, :, ::1] grad_out,
                             const floating[:, :, :, ::1] out, const int[:, :, :, ::1] indices,
                             floating[:, :, :, ::1] grad_input, int num_threads):
    """Gradient of max_pool2d_relu_forward w.r.t. x (every cell written); returns the
    number of foreign indices, as max_pool2d_backward."""
    return _max_pool2d_relu_backward(grad_out, out, indices, grad_input, num_threads)


# ---------------------------------------------------------------- bound calls
# A float32 call with its arrays bound once (cdl.model's training plan), so
# ``run`` skips the per-call buffer checks and type dispatch. The input can be
# rebound.

cdef class MaxPoolForward:
    cdef const float[:, :, :, ::1] x
    cdef float[:, :, :, ::1] out
    cdef int[:, :, :, ::1] indices
    cdef Py_ssize_t kh, kw, sh, sw, ph, pw

    def __init__(self, x, out, indices, kernel_size, stride, padding):
        self.x, self.out, self.indices = x, out, indices
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel_size, stride, padding

    def bind_input(self, const float[:, :, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _max_pool2d_forward(self.x, self.out, self.indices, self.kh, self.kw, self.sh, self.sw,
                            self.ph, self.pw, num_threads)


cdef class MaxPoolBackward:
    cdef const float[:, :, :, ::1] grad_out
    cdef const int[:, :, :, ::1] indices
    cdef float[:, :, :, ::1] grad_input
    cdef Py_ssize_t kh, kw, sh, sw, ph, pw

    def __init__(self, grad_out, indices, grad_input, kernel_size, stride, padding):
        self.grad_out, self.indices, self.grad_input = grad_out, indices, grad_input
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel_size, stride, padding

    def run(self, int num_threads):
        _max_pool2d_backward(self.grad_out, self.indices, self.grad_input, self.kh, self.kw,
                             self.sh, self.sw, self.ph, self.pw, num_threads)


cdef class ReluMaxPoolForward:
    cdef const float[:, :, :, ::1] x
    cdef float[:, :, :, ::1] out
    cdef int[:, :, :, ::1] indices

    def __init__(self, x, out, indices):
        self.x, self.out, self.indices = x, out, indices

    def bind_input(self, const float[:, :, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _max_pool2d_relu_forward(self.x, self.out, self.indices, num_threads)


cdef class ReluMaxPoolBackward:
    cdef const float[:, :, :, ::1] grad_out
    cdef const float[:, :, :, ::1] out
    cdef const int[:, :, :, ::1] indices
    cdef float[:, :, :, ::1] grad_input

    def __init__(self, grad_out, out, indices, grad_input):
        self.grad_out, self.out, self.indices, self.grad_input = grad_out, out, indices, grad_input

    def run(self, int num_threads):
        _max_pool2d_relu_backward(self.grad_out, self.out, self.indices, self.grad_input,
                                  num_threads)


# ---------------------------------------------------------------- average pooling
# PyTorch's avg_pool2d with count_include_pad=True (its default): the sum over the
# window's cells inside the input, divided by kh*kw always. Each window is summed
# in row-major order (padded cells skipped); each plane is computed whole by one
# thread, so results are bitwise identical for any thread count. The backward
# adds g / (kh*kw) into every cell of each window, in output order, into a
# zeroed plane.

cdef inline Py_ssize_t _ow_first(Py_ssize_t off, Py_ssize_t sw) noexcept nogil:
    """First ow with ow*sw + off >= 0."""
    if off >= 0:
        return 0
    return (-off + sw - 1) // sw


cdef inline Py_ssize_t _ow_stop(Py_ssize_t off, Py_ssize_t sw, Py_ssize_t W,
                                Py_ssize_t OW) noexcept nogil:
    """One past the last ow < OW with ow*sw + off < W."""
    if W - 1 - off < 0:
        return 0
    return min((W - 1 - off) // sw + 1, OW)


cdef void _avg_plane(const floating* x, floating* y, Py_ssize_t H, Py_ssize_t W,
                     Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh, Py_ssize_t kw,
                     Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    cdef Py_ssize_t oh, ow, i, j, h, off, lo, hi
    cdef floating div = <floating>(kh * kw)
    cdef floating* yr
    cdef const floating* xr
    for oh in range(OH):
        yr = y + oh * OW
        for ow in range(OW):
            yr[ow] = 0
        for i in range(kh):
            h = oh * sh - ph + i
            if h < 0 or h >= H:
                continue
            xr = x + h * W
            # Window offset (i, j) swept across the row: every output still adds
            # its cells in row-major order.
            for j in range(kw):
                off = j - pw
                lo = _ow_first(off, sw)
                hi = _ow_stop(off, sw, W, OW)
                if sw == 1:
                    for ow in range(lo, hi):
                        yr[ow] += xr[ow + off]
                else:
                    for ow in range(lo, hi):
                        yr[ow] += xr[ow * sw + off]
        for ow in range(OW):
            yr[ow] = yr[ow] / div


cdef void _avg_plane_backward(const floating* g, floating* dx, Py_ssize_t H, Py_ssize_t W,
                              Py_ssize_t OH, Py_ssize_t OW, Py_ssize_t kh, Py_ssize_t kw,
                              Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                              Py_ssize_t pw) noexcept nogil:
    cdef Py_ssize_t oh, ow, i, j, h, off, lo, hi
    cdef floating div = <floating>(kh * kw)
    cdef const floating* gr
    cdef floating* dr
    memset(dx, 0, H * W * sizeof(floating))
    for oh in range(OH):
        gr = g + oh * OW
        for i in range(kh):
            h = oh * sh - ph + i
            if h < 0 or h >= H:
                continue
            dr = dx + h * W
            for j in range(kw):
                off = j - pw
                lo = _ow_first(off, sw)
                hi = _ow_stop(off, sw, W, OW)
                if sw == 1:
                    for ow in range(lo, hi):
                        dr[ow + off] += gr[ow] / div
                else:
                    for ow in range(lo, hi):
                        dr[ow * sw + off] += gr[ow] / div


cdef int _avg_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                             Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                             Py_ssize_t ph, Py_ssize_t pw, int num_threads) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t p, planes = N * C
    if planes == 0 or OH == 0 or OW == 0:
        return 0
    cdef const floating* xp = &x[0, 0, 0, 0]
    cdef floating* yp = &out[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, schedule="static",
                        num_threads=_threads(planes * H * W, num_threads)):
            _avg_plane(xp + p * H * W, yp + p * OH * OW, H, W, OH, OW, kh, kw, sh, sw, ph, pw)
    return 0


def avg_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                       Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                       Py_ssize_t ph, Py_ssize_t pw, int num_threads):
    """out = average pool of x (N, C, H, W), count_include_pad=True: each window's sum
    over the cells inside x divided by kh*kw."""
    _avg_pool2d_forward(x, out, kh, kw, sh, sw, ph, pw, num_threads)


cdef int _avg_pool2d_backward(const floating[:, :, :, ::1] grad_out,
                              floating[:, :, :, ::1] grad_input, Py_ssize_t kh, Py_ssize_t kw,
                              Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                              int num_threads) except -1:
    cdef Py_ssize_t N = grad_input.shape[0], C = grad_input.shape[1]
    cdef Py_ssize_t H = grad_input.shape[2], W = grad_input.shape[3]
    cdef Py_ssize_t OH = grad_out.shape[2], OW = grad_out.shape[3]
    cdef Py_ssize_t p, planes = N * C
    if planes == 0 or H == 0 or W == 0:
        return 0
    cdef floating* dp = &grad_input[0, 0, 0, 0]
    cdef const floating* gp = NULL
    if OH == 0 or OW == 0:
        with nogil:
            memset(dp, 0, planes * H * W * sizeof(floating))
        return 0
    gp = &grad_out[0, 0, 0, 0]
    with nogil:
        for p in prange(planes, schedule="static",
                        num_threads=_threads(planes * H * W, num_threads)):
            _avg_plane_backward(gp + p * OH * OW, dp + p * H * W, H, W, OH, OW, kh, kw, sh, sw,
                                ph, pw)
    return 0


def avg_pool2d_backward(const floating[:, :, :, ::1] grad_out, floating[:, :, :, ::1] grad_input,
                        Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                        Py_ssize_t ph, Py_ssize_t pw, int num_threads):
    """grad_input = gradient of avg_pool2d_forward (every cell written)."""
    _avg_pool2d_backward(grad_out, grad_input, kh, kw, sh, sw, ph, pw, num_threads)


# ---------------------------------------------------------------- global average pooling
# x (N, C, L) -> out (N, C): the mean over L, summed in double into 8 lanes by
# l mod 8 that are then added pairwise (a fixed order that vectorises).

cdef double _row_sum(const floating* x, Py_ssize_t L) noexcept nogil:
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    cdef Py_ssize_t i = 0
    while i + 8 <= L:
        a0 += x[i]
        a1 += x[i + 1]
        a2 += x[i + 2]
        a3 += x[i + 3]
        a4 += x[i + 4]
        a5 += x[i + 5]
        a6 += x[i + 6]
        a7 += x[i + 7]
        i += 8
    if i < L:
        a0 += x[i]
    if i + 1 < L:
        a1 += x[i + 1]
    if i + 2 < L:
        a2 += x[i + 2]
    if i + 3 < L:
        a3 += x[i + 3]
    if i + 4 < L:
        a4 += x[i + 4]
    if i + 5 < L:
        a5 += x[i + 5]
    if i + 6 < L:
        a6 += x[i + 6]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


cdef int _global_avg_pool_forward(const floating[:, :, ::1] x, floating[:, ::1] out,
                                  int num_threads) except -1:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2], r, rows = N * C
    if rows == 0:
        return 0
    cdef floating* yp = &out[0, 0]
    cdef const floating* xp
    if L == 0:
        with nogil:
            for r in range(rows):
                yp[r] = NAN             # the mean of nothing, as NumPy's
        return 0
    xp = &x[0, 0, 0]
    with nogil:
        for r in prange(rows, schedule="static", num_threads=_threads(rows * L, num_threads)):
            yp[r] = <floating>(_row_sum(xp + r * L, L) / <double>L)
    return 0


def global_avg_pool_forward(const floating[:, :, ::1] x, floating[:, ::1] out, int num_threads):
    """out[n, c] = mean of x[n, c, :] (x is (N, C, L), e.g. (N, C, H*W))."""
    _global_avg_pool_forward(x, out, num_threads)


cdef int _global_avg_pool_backward(const floating[:, ::1] grad_out, floating[:, :, ::1] grad_input,
                                   int num_threads) except -1:
    cdef Py_ssize_t N = grad_input.shape[0], C = grad_input.shape[1], L = grad_input.shape[2]
    cdef Py_ssize_t r, l, rows = N * C
    cdef floating v
    if rows == 0 or L == 0:
        return 0
    cdef const floating* gp = &grad_out[0, 0]
    cdef floating* dp = &grad_input[0, 0, 0]
    cdef floating fl = <floating>L
    with nogil:
        for r in prange(rows, schedule="static", num_threads=_threads(rows * L, num_threads)):
            v = gp[r] / fl
            for l in range(L):
                dp[r * L + l] = v
    return 0


def global_avg_pool_backward(const floating[:, ::1] grad_out, floating[:, :, ::1] grad_input,
                             int num_threads):
    """grad_input[n, c, :] = grad_out[n, c] / L."""
    _global_avg_pool_backward(grad_out, grad_input, num_threads)


cdef class AvgPoolForward:
    cdef const float[:, :, :, ::1] x
    cdef float[:, :, :, ::1] out
    cdef Py_ssize_t kh, kw, sh, sw, ph, pw

    def __init__(self, x, out, kernel_size, stride, padding):
        self.x, self.out = x, out
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel_size, stride, padding

    def bind_input(self, const float[:, :, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _avg_pool2d_forward(self.x, self.out, self.kh, self.kw, self.sh, self.sw, self.ph,
                            self.pw, num_threads)


cdef class AvgPoolBackward:
    cdef const float[:, :, :, ::1] grad_out
    cdef float[:, :, :, ::1] grad_input
    cdef Py_ssize_t kh, kw, sh, sw, ph, pw

    def __init__(self, grad_out, grad_input, kernel_size, stride, padding):
        self.grad_out, self.grad_input = grad_out, grad_input
        (self.kh, self.kw), (self.sh, self.sw), (self.ph, self.pw) = kernel_size, stride, padding

    def run(self, int num_threads):
        _avg_pool2d_backward(self.grad_out, self.grad_input, self.kh, self.kw, self.sh, self.sw,
                             self.ph, self.pw, num_threads)


cdef class GlobalAvgPoolForward:
    """global_avg_pool_forward with bound arrays; x is the (N, C, L) view."""
    cdef const float[:, :, ::1] x
    cdef float[:, ::1] out

    def __init__(self, x, out):
        self.x, self.out = x, out

    def bind_input(self, const float[:, :, ::1] x):
        self.x = x

    def run(self, int num_threads):
        _global_avg_pool_forward(self.x, self.out, num_threads)


cdef class GlobalAvgPoolBackward:
    cdef const float[:, ::1] grad_out
    cdef float[:, :, ::1] grad_input

    def __init__(self, grad_out, grad_input):
        self.grad_out, self.grad_input = grad_out, grad_input

    def run(self, int num_threads):
        _global_avg_pool_backward(self.grad_out, self.grad_input, num_threads)
