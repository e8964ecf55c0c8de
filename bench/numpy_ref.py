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


# ----------------------------------------------------------------------------- ResNet-8
def batchnorm_train(x, w, b, eps=1e-5):
    """Training-mode batch norm of x (N, C, H, W) over N, H, W: (y, cache, mean, biased
    var). In x's dtype, as PyTorch's CPU kernel keeps float32 activations."""
    mean = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean[:, None, None]) * invstd[:, None, None]
    y = xhat * w[:, None, None] + b[:, None, None]
    return y, (xhat, invstd, w), mean, var


def batchnorm_backward(g, cache):
    """(dx, dw, db) of batchnorm_train."""
    xhat, invstd, w = cache
    m = g.shape[0] * g.shape[2] * g.shape[3]
    db = g.sum(axis=(0, 2, 3))
    dw = (g * xhat).sum(axis=(0, 2, 3))
    dx = (w * invstd / m)[:, None, None] * (m * g - db[:, None, None]
                                             - xhat * dw[:, None, None])
    return dx, dw, db


class NumpyResNet8:
    """cdl.models.resnet8 in NumPy from its state dict (the same names): train_step (SGD,
    cross-entropy, BatchNorm in training mode with PyTorch's running-statistics update)
    and predict (BatchNorm with the running statistics)."""

    BLOCKS = (("3", 1, False), ("5", 2, True), ("7", 2, True))

    def __init__(self, state, lr=0.01, momentum=0.1, eps=1e-5):
        self.p = {k: np.array(v, copy=True) for k, v in state.items()}
        self.lr, self.momentum, self.eps = lr, momentum, eps

    def _bn(self, x, key, train, cache):
        p = self.p
        if not train:
            inv = 1.0 / np.sqrt(p[key + ".running_var"] + self.eps)
            scale = p[key + ".weight"] * inv
            shift = p[key + ".bias"] - p[key + ".running_mean"] * scale
            return x * scale[:, None, None] + shift[:, None, None]
        y, c, mean, var = batchnorm_train(x, p[key + ".weight"], p[key + ".bias"], self.eps)
        m = x.shape[0] * x.shape[2] * x.shape[3]
        mo = self.momentum
        p[key + ".running_mean"] = (1 - mo) * p[key + ".running_mean"] + mo * mean
        p[key + ".running_var"] = (1 - mo) * p[key + ".running_var"] + mo * var * m / (m - 1)
        cache[key] = c
        return y

    def _conv(self, x, key, stride, pad, cache):
        y, cols = conv2d(x, self.p[key + ".weight"], None, stride, pad, return_cols=True)
        cache[key] = (x, cols, stride, pad)
        return y

    def _forward(self, x, train):
        c = {}
        h = relu(self._bn(self._conv(x, "0", 1, 1, c), "1", train, c))
        c["relu0"] = h
        for key, s, has_sc in self.BLOCKS:
            f = relu(self._bn(self._conv(h, key + ".layers.0", s, 1, c), key + ".layers.1",
                              train, c))
            c[key + ".relu"] = f
            f = self._bn(self._conv(f, key + ".layers.3", 1, 1, c), key + ".layers.4", train, c)
            sc = h
            if has_sc:
                sc = self._bn(self._conv(h, key + ".shortcut.0", s, 0, c), key + ".shortcut.1",
                              train, c)
            h = relu(f + sc)
            c[key + ".out"] = h
        pooled = h.mean(axis=(2, 3))
        c["gap"] = (pooled, h.shape)
        return linear(pooled, self.p["10.weight"], self.p["10.bias"]), c

    def predict(self, x):
        return self._forward(x, train=False)[0]

    def _conv_back(self, g, key, grads, need_input_grad=True):
        x, cols, s, pad = self._cache[key]
        dx, dw, _ = conv2d_backward(g, x, self.p[key + ".weight"], s, pad, need_input_grad,
                                    False, cols)
        grads[key + ".weight"] = dw
        return dx

    def _bn_back(self, g, key, grads):
        dx, dw, db = batchnorm_backward(g, self._cache[key])
        grads[key + ".weight"], grads[key + ".bias"] = dw, db
        return dx

    def train_step(self, x, y):
        scores, c = self._forward(x, train=True)
        self._cache = c
        loss, g = softmax_cross_entropy(scores, y)
        grads = {}
        pooled, shape = c["gap"]
        dx, grads["10.weight"], grads["10.bias"] = linear_backward(g, pooled, self.p["10.weight"])
        g = np.broadcast_to(dx[:, :, None, None] / (shape[2] * shape[3]), shape)
        for key, s, has_sc in reversed(self.BLOCKS):
            g = relu_backward(g, c[key + ".out"])
            df = self._bn_back(g, key + ".layers.4", grads)
            df = self._conv_back(df, key + ".layers.3", grads)
            df = relu_backward(df, c[key + ".relu"])
            df = self._bn_back(df, key + ".layers.1", grads)
            df = self._conv_back(df, key + ".layers.0", grads)
            if has_sc:
                ds = self._bn_back(g, key + ".shortcut.1", grads)
                g = df + self._conv_back(ds, key + ".shortcut.0", grads)
            else:
                g = df + g
        g = relu_backward(g, c["relu0"])
        g = self._bn_back(g, "1", grads)
        self._conv_back(g, "0", grads, need_input_grad=False)
        for k, d in grads.items():
            self.p[k] -= self.lr * d.astype(self.p[k].dtype)
        self._cache = None
        return loss
