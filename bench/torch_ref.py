"""The benchmark's kernels and networks in PyTorch CPU (optional contender).

Same weights as the NumPy reference (copied in), float32, NCHW. Backward
kernels call the aten ops autograd itself uses (``convolution_backward``,
``max_pool2d_with_indices_backward``, ``threshold_backward``) so that a
gradient that is not asked for is not computed, as in a real first layer.
Import fails with ImportError when torch is missing; run.py then reports n/a.
"""
import numpy as np
import torch
import torch.nn.functional as F

aten = torch.ops.aten


def t(a):
    """Tensor sharing memory with a NumPy array."""
    return torch.from_numpy(np.ascontiguousarray(a))


def linear(x, w, b):
    return F.linear(x, w, b)


def linear_backward(g, x, w, need_input_grad=True):
    dx = g @ w if need_input_grad else None
    return dx, g.t() @ x, g.sum(0)


def conv2d(x, w, b, stride, padding):
    return F.conv2d(x, w, b, stride, padding)


def conv2d_backward(g, x, w, stride, padding, need_input_grad=True, need_weight_grad=True):
    s, p = _pair(stride), _pair(padding)
    return aten.convolution_backward(g, x, w, [w.shape[0]], list(s), list(p), [1, 1], False,
                                     [0, 0], 1, [need_input_grad, need_weight_grad,
                                                 need_weight_grad])


def max_pool2d(x, k):
    return F.max_pool2d(x, k, k, return_indices=True)


def max_pool2d_backward(g, x, idx, k):
    return aten.max_pool2d_with_indices_backward(g, x, [k, k], [k, k], [0, 0], [1, 1], False, idx)


def relu(x):
    return torch.relu(x)


def relu_backward(g, y):
    return aten.threshold_backward(g, y, 0)


def softmax_cross_entropy(scores, labels):
    s = scores.detach().requires_grad_(True)
    loss = F.cross_entropy(s, labels)
    loss.backward()
    return loss.item(), s.grad


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def build_model(spec, params):
    """nn.Sequential from a numpy_ref spec, weights copied from ``params``."""
    layers = []
    for layer in spec:
        kind = layer[0]
        if kind == "linear":
            layers.append(torch.nn.Linear(layer[1], layer[2]))
        elif kind == "conv":
            layers.append(torch.nn.Conv2d(layer[1], layer[2], layer[3], layer[4], layer[5]))
        elif kind == "relu":
            layers.append(torch.nn.ReLU())
        elif kind == "pool":
            layers.append(torch.nn.MaxPool2d(layer[1]))
        elif kind == "flatten":
            layers.append(torch.nn.Flatten())
    model = torch.nn.Sequential(*layers)
    with_params = [m for m in model if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        for m, (w, b) in zip(with_params, params):
            m.weight.copy_(t(w))
            m.bias.copy_(t(b))
    return model


class TorchNet:
    """train_step (forward, cross-entropy, backward, SGD) and predict, like cdl's model API."""

    def __init__(self, spec, params, lr=0.01):
        self.model = build_model(spec, params)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)

    def train_step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x)

    def params(self):
        out = []
        for m in self.model:
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                out.append((m.weight.detach().numpy(), m.bias.detach().numpy()))
        return out
