# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Loss kernels: the loss and its gradient with respect to the scores in one pass.

For scores s (N, C) and integer labels y (N,):
  softmax cross-entropy  L_i = -log(e^{s_{y_i}} / Σ_j e^{s_j})
                              = log Σ_j e^{s_j - m} − (s_{y_i} − m),  m = max_j s_j
                         dL_i/ds_j = p_j - [j = y_i]
  multiclass SVM         L_i = Σ_{j≠y_i} max(0, s_j - s_{y_i} + Δ)
                         dL_i/ds_j = [margin_j > 0] (j ≠ y_i),  dL_i/ds_{y_i} = -#{j: margin_j > 0}
  half squared error     L_i = ½ Σ_j (s_j - t_j)²,  dL_i/ds_j = s_j - t_j
                         (t a float array, or one-hot rows from labels)
Each row's loss goes into a float64 buffer; the buffer is then summed in row
order, so the total does not depend on the thread count. The gradient is
multiplied by ``grad_scale`` (1/N for the batch mean, 1 for the sum).
Labels are trusted to be in [0, C): cdl.functional checks them.
NaN in the scores gives a NaN loss (no comparison silently drops it).
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport NAN, exp, log
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free

# Below this many score elements a second thread costs more than it saves.
cdef Py_ssize_t PARALLEL_MIN_ELEMENTS = 1 << 14


cdef inline int _threads(Py_ssize_t work, int num_threads) noexcept nogil:
    return num_threads if work >= PARALLEL_MIN_ELEMENTS else 1


cdef double _ordered_sum(const double[::1] values) noexcept nogil:
    cdef Py_ssize_t i
    cdef double total = 0
    for i in range(values.shape[0]):
        total += values[i]
    return total


# ---------------------------------------------------------------- softmax

cdef inline floating _row_max(const floating* s, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating m = s[0]
    for j in range(1, C):
        if s[j] > m:
            m = s[j]
    return m


cdef double _softmax_row(const floating* s, floating* e, Py_ssize_t C) noexcept nogil:
    """e_j = exp(s_j - max); returns Σ e_j (accumulated in double)."""
    cdef Py_ssize_t j
    cdef floating m = _row_max(s, C)
    cdef double total = 0
    for j in range(C):
        e[j] = <floating>exp(s[j] - m)
        total += e[j]
    return total


def softmax(const floating[:, ::1] scores, floating[:, ::1] out, int num_threads):
    """out[i] = exp(s_i - max s_i) / Σ_j exp(s_ij - max s_i)."""
    cdef Py_ssize_t N = scores.shape[0], C = scores.shape[1], i, j
    cdef double total
    cdef floating inv
    if N == 0 or C == 0:
        return
    with nogil:
        for i in prange(N, schedule="static", num_threads=_threads(N * C, num_threads)):
            total = _softmax_row(&scores[i, 0], &out[i, 0], C)
            inv = <floating>(1.0 / total)
            for j in range(C):
                out[i, j] = out[i, j] * inv


cdef double _softmax_cross_entropy(const floating[:, ::1] scores,
                                   const int64_t[::1] labels, floating[:, ::1] probs,
                                   floating[:, ::1] grad, double[::1] sample_loss,
                                   double grad_scale, int num_threads) noexcept:
    cdef Py_ssize_t N = scores.shape[0], C = scores.shape[1], i, j, y
    cdef bint has_p = probs is not None, has_g = grad is not None
    cdef double total, m
    cdef floating inv, scale = <floating>grad_scale
    cdef const floating* s
    cdef floating* e
    if N == 0:
        return 0.0
    with nogil:
        for i in prange(N, schedule="static", num_threads=_threads(N * C, num_threads)):
            s = &scores[i, 0]
            y = labels[i]
            m = _row_max(s, C)
            # The exponentials are parked in grad (or probs) and reused below.
            if has_g:
                e = &grad[i, 0]
            elif has_p:
                e = &probs[i, 0]
            else:
                e = NULL
            total = 0
            for j in range(C):
                if e != NULL:
                    e[j] = <floating>exp(s[j] - m)
                    total = total + e[j]
                else:
                    total = total + exp(s[j] - m)
            # s[y] - m first (exact in double for float32 scores): added to m first,
            # log(total) would round away for scores of 1e17
            sample_loss[i] = log(total) - (<double>s[y] - <double>m)
            inv = <floating>(1.0 / total)
            if has_p:
                for j in range(C):
                    probs[i, j] = e[j] * inv
            if has_g:
                for j in range(C):
                    grad[i, j] = e[j] * inv * scale
                grad[i, y] = grad[i, y] - scale
        total = _ordered_sum(sample_loss)
    return total


def softmax_cross_entropy(const floating[:, ::1] scores, const int64_t[::1] labels,
                          floating[:, ::1] probs, floating[:, ::1] grad,
                          double[::1] sample_loss, double grad_scale, int num_threads):
    """Returns Σ_i L_i; fills sample_loss[i] = L_i, probs (if not None) with the
    softmax, grad (if not None) with grad_scale * (p - onehot(y))."""
    return _softmax_cross_entropy(scores, labels, probs, grad, sample_loss, grad_scale,
                                  num_threads)


# ---------------------------------------------------------------- multiclass SVM

cdef double _multiclass_svm(const floating[:, ::1] scores, const int64_t[::1] labels, double margin,
                            floating[:, ::1] grad, double[::1] sample_loss, double grad_scale,
                            int num_threads) noexcept:
    cdef Py_ssize_t N = scores.shape[0], C = scores.shape[1], i, j, y
    cdef bint has_g = grad is not None
    cdef floating delta = <floating>margin, scale = <floating>grad_scale, sy, d
    cdef double loss, total
    cdef Py_ssize_t active
    cdef bint nan_margin
    if N == 0:
        return 0.0
    with nogil:
        for i in prange(N, schedule="static", num_threads=_threads(N * C, num_threads)):
            y = labels[i]
            sy = scores[i, y]
            loss = 0
            active = 0
            nan_margin = False
            for j in range(C):
                if j == y:
                    if has_g:
                        grad[i, j] = 0
                    continue
                d = scores[i, j] - sy + delta
                # ``not (d <= 0)`` so that a NaN margin counts (and poisons the loss);
                # its gradient, and that of the label's score, is NaN too.
                if not (d <= 0):
                    loss = loss + d
                    active = active + 1
                    if d != d:
                        nan_margin = True
                    if has_g:
                        grad[i, j] = NAN if d != d else scale
                elif has_g:
                    grad[i, j] = 0
            if has_g:
                grad[i, y] = NAN if nan_margin else -scale * active
            sample_loss[i] = loss
        total = _ordered_sum(sample_loss)
    return total


def multiclass_svm(const floating[:, ::1] scores, const int64_t[::1] labels, double margin,
                   floating[:, ::1] grad, double[::1] sample_loss, double grad_scale,
                   int num_threads):
    """Returns Σ_i L_i with L_i = Σ_{j≠y_i} max(0, s_j - s_{y_i} + margin); fills grad."""
    return _multiclass_svm(scores, labels, margin, grad, sample_loss, grad_scale, num_threads)


# ---------------------------------------------------------------- half squared error

cdef double _mse(const floating[:, ::1] pred, const floating[:, ::1] target, floating[:, ::1] grad,
                 double[::1] sample_loss, double grad_scale, int num_threads) noexcept:
    cdef Py_ssize_t N = pred.shape[0], D = pred.shape[1], i, j
    cdef bint has_g = grad is not None
    cdef floating scale = <floating>grad_scale, r
    cdef double loss, total
    if N == 0:
        return 0.0
    with nogil:
        for i in prange(N, schedule="static", num_threads=_threads(N * D, num_threads)):
            loss = 0
            for j in range(D):
                r = pred[i, j] - target[i, j]
                loss = loss + <double>r * r
                if has_g:
                    grad[i, j] = scale * r
            sample_loss[i] = 0.5 * loss
        total = _ordered_sum(sample_loss)
    return total


def mse(const floating[:, ::1] pred, const floating[:, ::1] target, floating[:, ::1] grad,
        double[::1] sample_loss, double grad_scale, int num_threads):
    """Returns Σ_i ½ Σ_j (pred_ij - target_ij)²; grad = grad_scale * (pred - target)."""
    return _mse(pred, target, grad, sample_loss, grad_scale, num_threads)


cdef double _mse_labels(const floating[:, ::1] pred, const int64_t[::1] labels,
                        floating[:, ::1] grad, double[::1] sample_loss, double grad_scale,
                        int num_threads) noexcept:
    cdef Py_ssize_t N = pred.shape[0], D = pred.shape[1], i, j, y
    cdef bint has_g = grad is not None
    cdef floating scale = <floating>grad_scale, r
    cdef double loss, total
    if N == 0:
        return 0.0
    with nogil:
        for i in prange(N, schedule="static", num_threads=_threads(N * D, num_threads)):
            y = labels[i]
            loss = 0
            for j in range(D):
                r = pred[i, j] - (1 if j == y else 0)
                loss = loss + <double>r * r
                if has_g:
                    grad[i, j] = scale * r
            sample_loss[i] = 0.5 * loss
        total = _ordered_sum(sample_loss)
    return total


def mse_labels(const floating[:, ::1] pred, const int64_t[::1] labels, floating[:, ::1] grad,
               double[::1] sample_loss, double grad_scale, int num_threads):
    """mse against one-hot targets t_ij = [j = labels_i]."""
    return _mse_labels(pred, labels, grad, sample_loss, grad_scale, num_threads)


# ---------------------------------------------------------------- L2

# Elements per sum_squares part: parts are summed alone (in parallel) and their
# sums then added in part order, so the total is the same for any thread count.
cdef Py_ssize_t SUM_PART = 1 << 16


cdef double _sum_squares_part(const floating* w, Py_ssize_t n) noexcept nogil:
    """Σ w² in float64: four interleaved partial sums, then (a0 + a1) + (a2 + a3)."""
    cdef Py_ssize_t i = 0
    cdef double a0 = 0, a1 = 0, a2 = 0, a3 = 0, v
    while i + 4 <= n:
        a0 += <double>w[i] * w[i]
        a1 += <double>w[i + 1] * w[i + 1]
        a2 += <double>w[i + 2] * w[i + 2]
        a3 += <double>w[i + 3] * w[i + 3]
        i += 4
    while i < n:
        v = w[i]
        a0 += v * v
        i += 1
    return (a0 + a1) + (a2 + a3)


cdef double _sum_squares(const floating[::1] w, int num_threads) except? -1:
    cdef Py_ssize_t n = w.shape[0], parts, t, lo
    cdef double total = 0
    cdef double* sums
    if n == 0:
        return 0.0
    cdef const floating* wp = &w[0]
    if n <= SUM_PART:
        with nogil:
            total = _sum_squares_part(wp, n)
        return total
    parts = (n + SUM_PART - 1) // SUM_PART
    sums = <double*>malloc(parts * sizeof(double))
    if sums == NULL:
        raise MemoryError()
    with nogil:
        for t in prange(parts, schedule="static",
                        num_threads=num_threads if n >= 1 << 19 and num_threads > 0 else 1):
            lo = t * SUM_PART
            sums[t] = _sum_squares_part(wp + lo, min(SUM_PART, n - lo))
        for t in range(parts):
            total += sums[t]
    free(sums)
    return total


def sum_squares(const floating[::1] w, int num_threads=1):
    """Σ w² in float64, in a fixed order: parts of 65536 elements, each with four
    interleaved partial sums, added in part order (the same for any thread count;
    up to one part, the plain four-sum order)."""
    return _sum_squares(w, num_threads)


def label_range(const int64_t[::1] labels):
    """(min, max) of a non-empty label array, in one pass (NumPy's min and max cost
    two calls, a noticeable share of a batch-1 training step)."""
    cdef Py_ssize_t i
    cdef int64_t lo = labels[0], hi = labels[0], v
    with nogil:
        for i in range(1, labels.shape[0]):
            v = labels[i]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    return lo, hi



# ---------------------------------------------------------------- bound call
# A float32 loss with its arrays bound once (cdl.model's training plan), so
# ``run`` skips the per-call buffer checks and type dispatch; the targets are
# rebound every step.

cdef class LossForward:
    """Loss and gradient of ``scores`` into ``grad``; run() returns the reduced loss."""
    cdef const float[:, ::1] scores
    cdef float[:, ::1] grad
    cdef double[::1] sample_loss
    cdef const int64_t[::1] labels
    cdef const float[:, ::1] target
    cdef int kind
    cdef double margin, scale

    def __init__(self, kind, scores, grad, sample_loss, double scale, double margin=0.0):
        kinds = ("softmax_cross_entropy", "multiclass_svm", "mse")
        if kind not in kinds:
            raise ValueError(f"LossForward: kind must be one of {kinds}, got {kind!r}")
        self.kind = kinds.index(kind)
        self.scores, self.grad, self.sample_loss = scores, grad, sample_loss
        self.scale, self.margin = scale, margin

    def bind_labels(self, const int64_t[::1] labels):
        self.labels, self.target = labels, None

    def bind_target(self, const float[:, ::1] target):
        self.labels, self.target = None, target

    def run(self, int num_threads):
        cdef double total
        if self.kind == 0:
            total = _softmax_cross_entropy[float](self.scores, self.labels, None, self.grad,
                                           self.sample_loss, self.scale, num_threads)
        elif self.kind == 1:
            total = _multiclass_svm[float](self.scores, self.labels, self.margin, self.grad,
                                    self.sample_loss, self.scale, num_threads)
        elif self.target is not None:
            total = _mse[float](self.scores, self.target, self.grad, self.sample_loss, self.scale,
                         num_threads)
        else:
            total = _mse_labels[float](self.scores, self.labels, self.grad, self.sample_loss, self.scale,
                                num_threads)
        return total * self.scale
