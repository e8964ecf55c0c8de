"""Activation kernels (pending: being written)."""


def relu(*args, **kwargs):
    raise NotImplementedError


def relu_backward(*args, **kwargs):
    raise NotImplementedError


def sigmoid(*args, **kwargs):
    raise NotImplementedError


def sigmoid_backward(*args, **kwargs):
    raise NotImplementedError
