# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Max-pooling kernels with argmax indices (PyTorch ``return_indices`` semantics).

Forward: y[n, c, i, j] = max over the KH x KW window at (i*S_h - P_h, j*S_w - P_w),
clipped to the input, so padded cells never win; ``indices`` holds the flat
position h*W + w of the winner within the input plane. Ties go to the first
maximum in row-major order (strict ``>``); a NaN always wins, so NaN propagates
(like PyTorch, the last NaN in the window is the one reported).

Backward: dx[idx] += dy. When windows do not overlap (stride >= kernel) every
input cell is written exactly once, as a gather (dy or 0), so no zeroing pass
is needed; overlapping windows zero the plane and scatter in output order.

Work is split over (n, c) planes, one plane per thread, in fixed order: results
are bitwise identical for any thread count. The 2x2 stride-2 case without
padding, the usual CNN pooling, has its own branch-free loops that the compiler
vectorises. Inputs are trusted: cdl.functional validates them. The backward
kernels return how many indices did not point into their own window (0 for
indices made by the forward pass), so a caller can refuse foreign indices
instead of scattering silently wrong gradients.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport INFINITY
from libc.string cimport memset

# Below this many input elements a second thread costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN_ELEMENTS = 1 << 15


cdef inline int _threads(Py_ssize_t work, int num_threads) noexcept nogil:
    return num_threads if work >= PARALLEL_MIN_ELEMENTS else 1


# ---------------------------------------------------------------- forward

cdef void _forward_2x2(const floating* x, floating* y, int* ind,
                       Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                       Py_ssize_t OW) noexcept nogil:
    cdef Py_ssize_t oh, ow
    cdef const floating* r0
    cdef const floating* r1
    cdef floating best, v
    cdef int k, base
    for oh in range(OH):
        r0 = x + 2 * oh * W
        r1 = r0 + W
        base = <int>(2 * oh * W)
        for ow in range(OW):
            # Row-major candidates a, b, c, d; ``>`` keeps the first of equal maxima.
            best = r0[2 * ow]
            k = 0
            v = r0[2 * ow + 1]
            k = 1 if (v > best or v != v) else k
            best = v if k == 1 else best
            v = r1[2 * ow]
            k = <int>W if (v > best or v != v) else k
            best = v if k == <int>W else best
            v = r1[2 * ow + 1]
            k = <int>W + 1 if (v > best or v != v) else k
            best = v if k == <int>W + 1 else best
            y[oh * OW + ow] = best
            ind[oh * OW + ow] = base + <int>(2 * ow) + k


cdef void _forward_plane(const floating* x, floating* y, int* ind,
                         Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH, Py_ssize_t OW,
                         Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw,
                         Py_ssize_t ph, Py_ssize_t pw) noexcept nogil:
    cdef Py_ssize_t oh, ow, h, w, h0, h1, w0, w1, k
    cdef floating best, v
    for oh in range(OH):
        h0 = oh * sh - ph
        h1 = min(h0 + kh, H)
        h0 = max(h0, 0)
        for ow in range(OW):
            w0 = ow * sw - pw
            w1 = min(w0 + kw, W)
            w0 = max(w0, 0)
            # Start from -inf at the first real cell: an all -inf window still
            # reports its first cell, and padding is never a candidate.
            best = -INFINITY
            k = h0 * W + w0
            for h in range(h0, h1):
                for w in range(w0, w1):
                    v = x[h * W + w]
                    if v > best or v != v:
                        best = v
                        k = h * W + w
            y[oh * OW + ow] = best
            ind[oh * OW + ow] = <int>k


def max_pool2d_forward(const floating[:, :, :, ::1] x, floating[:, :, :, ::1] out,
                       int[:, :, :, ::1] indices, Py_ssize_t kh, Py_ssize_t kw,
                       Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                       int num_threads):
    """out, indices = max-pool of x (KH x KW window, stride (sh, sw), padding (ph, pw))."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t OH = out.shape[2], OW = out.shape[3]
    cdef Py_ssize_t p, planes = N * C
    cdef bint fast = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    if planes == 0 or OH == 0 or OW == 0:
        return
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


# ---------------------------------------------------------------- backward

cdef Py_ssize_t _backward_2x2(const floating* g, const int* ind, floating* dx,
                              Py_ssize_t H, Py_ssize_t W, Py_ssize_t OH,
                              Py_ssize_t OW) noexcept nogil:
    """Gather form: each input cell gets dy of its window if it was the argmax, else 0."""
    cdef Py_ssize_t oh, ow, h, w
    cdef floating* d0
    cdef floating* d1
    cdef floating gv
    cdef int rel, iw = <int>W
    cdef Py_ssize_t matched = 0
    for oh in range(OH):
        d0 = dx + 2 * oh * W
        d1 = d0 + W
        for ow in range(OW):
            gv = g[oh * OW + ow]
            rel = ind[oh * OW + ow] - <int>(2 * oh * W + 2 * ow)
            d0[2 * ow] = gv if rel == 0 else 0
            d0[2 * ow + 1] = gv if rel == 1 else 0
            d1[2 * ow] = gv if rel == iw else 0
            d1[2 * ow + 1] = gv if rel == iw + 1 else 0
            matched += (rel == 0) + (rel == 1) + (rel == iw) + (rel == iw + 1)
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
    cdef Py_ssize_t h, w, oh, ow, r, c, flat, o
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
            for c in range(sw):
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


def max_pool2d_backward(const floating[:, :, :, ::1] grad_out, const int[:, :, :, ::1] indices,
                        floating[:, :, :, ::1] grad_input, Py_ssize_t kh, Py_ssize_t kw,
                        Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                        int num_threads):
    """grad_input = scatter of grad_out through indices (every cell written).

    Returns the number of indices that do not lie in their own window (those are
    skipped); 0 for indices produced by max_pool2d_forward with the same parameters.
    """
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
