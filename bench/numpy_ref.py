"""Best-idiom NumPy implementations of cdl's kernels and networks (the benchmark's baseline).

Not naive loops: dense is one matmul; conv is a strided im2col (``as_strided``
view, one copy) and one GEMM, its backward two GEMMs plus a col2im made of
kh*kw strided adds; a 2x2/stride-2 max-pool uses the reshape trick (a mask in
backward), any other pool im2col + argmax. Layouts and conventions are cdl's:
NCHW, weights (out, in) and (K, C, kh, kw), output size floor((H + 2P - F)/S) + 1,
losses averaged over the batch.
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------- dense
def linear(x, w, b=None):
    """f(x; W) = x W^T + b."""
    y = x @ w.T
    if b is not None:
        y += b
    return y


def linear_backward(g, x, w, need_input_grad=True):
    """(dx = g W, dW = g^T x, db = sum_n g)."""
    dx = g @ w if need_input_grad else None
    return dx, g.T @ x, g.sum(axis=0)


# ----------------------------------------------------------------------------- conv
def im2col(x, kh, kw, sh, sw, ph, pw):
    """Columns (N*Ho*Wo, C*kh*kw) of the zero-padded input, via one strided view and one copy."""
    n, c, h, w = x.shape
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = out_size(h, kh, sh, ph)
    wo = out_size(w, kw, sw, pw)
    s0, s1, s2, s3 = x.strides
    view = as_strided(x, shape=(n, ho, wo, c, kh, kw),
                      strides=(s0, s2 * sh, s3 * sw, s1, s2, s3), writeable=False)
    return view.reshape(n * ho * wo, c * kh * kw), ho, wo


def col2im(dcols, x_shape, kh, kw, sh, sw, ph, pw, ho, wo):
    """Adjoint of im2col: kh*kw strided adds into a padded buffer, then crop."""
    n, c, h, w = x_shape
    d = dcols.reshape(n, ho, wo, c, kh, kw)
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += \
                d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, ph:ph + h, pw:pw + w]


def conv2d(x, w, b=None, stride=1, padding=0, return_cols=False):
    """y[n,k] = sum_{c,i,j} W[k,c,i,j] x_pad[n,c,S*h+i,S*w+j] + b[k], NCHW out (contiguous)."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    k, c, kh, kw = w.shape
    n = x.shape[0]
    cols, ho, wo = im2col(x, kh, kw, sh, sw, ph, pw)
    y = cols @ w.reshape(k, -1).T                      # (N*Ho*Wo, K): one GEMM
    if b is not None:
        y += b
    y = np.ascontiguousarray(y.reshape(n, ho, wo, k).transpose(0, 3, 1, 2))
    return (y, cols) if return_cols else y


def conv2d_backward(g, x, w, stride=1, padding=0, need_input_grad=True, need_bias_grad=True,
                    cols=None):
    """(dx, dW, db) of conv2d; ``cols`` (the forward's im2col) is reused when given."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    k, c, kh, kw = w.shape
    n, _, ho, wo = g.shape
    gm = g.transpose(0, 2, 3, 1).reshape(n * ho * wo, k)
    dx = None
    if need_input_grad:
        dcols = gm @ w.reshape(k, -1)                  # (N*Ho*Wo, C*kh*kw)
        dx = col2im(dcols, x.shape, kh, kw, sh, sw, ph, pw, ho, wo)
    if cols is None:
        cols = im2col(x, kh, kw, sh, sw, ph, pw)[0]
    dw = (gm.T @ cols).reshape(w.shape)
    db = g.sum(axis=(0, 2, 3)) if need_bias_grad else None
    return dx, dw, db


# ----------------------------------------------------------------------------- pool
def _is_reshape_pool(x_shape, kh, kw, sh, sw, ph, pw):
    return (kh, kw) == (sh, sw) and ph == pw == 0 and x_shape[2] % kh == 0 and x_shape[3] % kw == 0


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """Max over each window; returns (y, argmax) where argmax is the window offset i*kw+j
    (None on the reshape path, whose backward recomputes a mask)."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    n, c, h, w = x.shape
    if _is_reshape_pool(x.shape, kh, kw, sh, sw, ph, pw):
        return x.reshape(n, c, h // kh, kh, w // kw, kw).max(axis=(3, 5)), None
    cols = pool_cols(x, kh, kw, sh, sw, ph, pw)        # (N, C, Ho, Wo, kh*kw), -inf padding
    arg = cols.argmax(axis=-1)
    y = np.take_along_axis(cols, arg[..., None], axis=-1)[..., 0]
    return y, arg


def pool_cols(x, kh, kw, sh, sw, ph, pw):
    n, c, h, w = x.shape
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)
    ho, wo = out_size(h, kh, sh, ph), out_size(w, kw, sw, pw)
    s0, s1, s2, s3 = x.strides
    view = as_strided(x, shape=(n, c, ho, wo, kh, kw),
                      strides=(s0, s1, s2 * sh, s3 * sw, s2, s3), writeable=False)
    return view.reshape(n, c, ho, wo, kh * kw)


def max_pool2d_backward(g, x, y, arg, kernel_size, stride=None, padding=0):
    """dx: the upstream gradient routed to each window's max (mask on the reshape path,
    strided adds over the kh*kw window offsets otherwise)."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    n, c, h, w = x.shape
    if arg is None:
        ho, wo = h // kh, w // kw
        xr = x.reshape(n, c, ho, kh, wo, kw)
        mask = xr == y[:, :, :, None, :, None]
        return (mask * g[:, :, :, None, :, None]).reshape(x.shape)
    ho, wo = g.shape[2:]
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += \
                g * (arg == i * kw + j)
    return dxp[:, :, ph:ph + h, pw:pw + w]


def window_argmax_to_flat(arg, x_shape, kernel_size, stride=None, padding=0):
    """Convert window offsets i*kw+j to cdl/PyTorch flat indices h*W+w in the input plane."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride is not None else kernel_size)
    ph, pw = _pair(padding)
    ho, wo = arg.shape[2:]
    oh = np.arange(ho)[:, None] * sh - ph
    ow = np.arange(wo)[None, :] * sw - pw
    return ((oh + arg // kw) * x_shape[3] + (ow + arg % kw)).astype(np.int32)


# ----------------------------------------------------------------------------- elementwise, loss
def relu(x, out=None):
    return np.maximum(x, 0, out=out)


def relu_backward(g, y, out=None):
    return np.multiply(g, y > 0, out=out)


def softmax_cross_entropy(scores, labels):
    """Mean over the batch of -log softmax(s)_y, and its gradient (p - onehot(y)) / N."""
    n = scores.shape[0]
    m = scores.max(axis=1, keepdims=True)
    e = np.exp(scores - m)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - scores[rows, labels]))
    grad = e / s
    grad[rows, labels] -= 1
    grad /= n
    return loss, grad


# ----------------------------------------------------------------------------- networks
# A network spec is a list of tuples shared by the NumPy, PyTorch and cdl builders:
#   ("linear", fin, fout) | ("conv", cin, cout, k, stride, pad) | ("pool", k) | ("relu",)
#   | ("flatten",)
NETWORKS = {
    "MLP": ((784,), [("linear", 784, 256), ("relu",), ("linear", 256, 128), ("relu",),
                     ("linear", 128, 10)]),
    "LeNet-5": ((1, 28, 28), [("conv", 1, 6, 5, 1, 2), ("relu",), ("pool", 2),
                              ("conv", 6, 16, 5, 1, 0), ("relu",), ("pool", 2), ("flatten",),
                              ("linear", 400, 120), ("relu",), ("linear", 120, 84), ("relu",),
                              ("linear", 84, 10)]),
    "CIFAR-CNN": ((3, 32, 32), [("conv", 3, 32, 3, 1, 1), ("relu",), ("pool", 2),
                                ("conv", 32, 64, 3, 1, 1), ("relu",), ("pool", 2), ("flatten",),
                                ("linear", 4096, 10)]),
}


def init_params(spec, seed=0, dtype=np.float32):
    """He-initialised (weight, bias) for each layer with parameters, in spec order."""
    rng = np.random.default_rng(seed)
    params = []
    for layer in spec:
        if layer[0] == "linear":
            shape = (layer[2], layer[1])
        elif layer[0] == "conv":
            shape = (layer[2], layer[1], layer[3], layer[3])
        else:
            continue
        fan_in = int(np.prod(shape[1:]))
        w = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
        b = (rng.standard_normal(shape[0]) * 0.01).astype(dtype)
        params.append((w, b))
    return params


def flops_per_sample(input_shape, spec):
    """Multiply-adds x 2 of the forward pass for one sample (conv and linear only)."""
    shape = tuple(input_shape)
    total = 0
    for layer in spec:
        kind = layer[0]
        if kind == "linear":
            total += 2 * layer[1] * layer[2]
            shape = (layer[2],)
        elif kind == "conv":
            _, cin, cout, k, s, p = layer
            ho, wo = out_size(shape[1], k, s, p), out_size(shape[2], k, s, p)
            total += 2 * cout * cin * k * k * ho * wo
            shape = (cout, ho, wo)
        elif kind == "pool":
            shape = (shape[0], shape[1] // layer[1], shape[2] // layer[1])
        elif kind == "flatten":
            shape = (int(np.prod(shape)),)
    return total


class NumpyNet:
    """A Sequential network in NumPy with a fused SGD train_step (no input gradient)."""

    def __init__(self, spec, params, lr=0.01):
        self.spec = spec
        self.lr = lr
        self.params = [(w.copy(), b.copy()) for w, b in params]

    def _forward(self, x, train):
        cache = []
        pi = 0
        for layer in self.spec:
            kind = layer[0]
            if kind == "linear":
                w, b = self.params[pi]
                pi += 1
                cache.append(x)
                x = linear(x, w, b)
            elif kind == "conv":
                w, b = self.params[pi]
                pi += 1
                x_in = x
                x, cols = conv2d(x, w, b, layer[4], layer[5], return_cols=True)
                cache.append((x_in, cols) if train else None)
            elif kind == "relu":
                x = relu(x)
                cache.append(x)
            elif kind == "pool":
                x_in = x
                x, arg = max_pool2d(x, layer[1])
                cache.append((x_in, x, arg))
            elif kind == "flatten":
                cache.append(x.shape)
                x = x.reshape(x.shape[0], -1)
        return x, cache

    def predict(self, x):
        return self._forward(x, train=False)[0]

    def train_step(self, x, y):
        scores, cache = self._forward(x, train=True)
        loss, g = softmax_cross_entropy(scores, y)
        pi = len(self.params)
        grads = [None] * pi
        for li in range(len(self.spec) - 1, -1, -1):
            layer, c = self.spec[li], cache[li]
            kind = layer[0]
            first = li == 0
            if kind == "linear":
                pi -= 1
                dx, dw, db = linear_backward(g, c, self.params[pi][0], need_input_grad=not first)
                grads[pi] = (dw, db)
                g = dx
            elif kind == "conv":
                pi -= 1
                x_in, cols = c
                dx, dw, db = conv2d_backward(g, x_in, self.params[pi][0], layer[4], layer[5],
                                             need_input_grad=not first, cols=cols)
                grads[pi] = (dw, db)
                g = dx
            elif kind == "relu":
                g = relu_backward(g, c)
            elif kind == "pool":
                x_in, y_out, arg = c
                g = max_pool2d_backward(g, x_in, y_out, arg, layer[1])
            elif kind == "flatten":
                g = g.reshape(c)
        for (w, b), (dw, db) in zip(self.params, grads):
            w -= self.lr * dw
            b -= self.lr * db
        return loss
