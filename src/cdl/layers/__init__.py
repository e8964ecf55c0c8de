"""Layers: one class each, owning its shapes, parameters, buffers, passes and plan ops.

The protocol every layer follows is described in :mod:`cdl.layers.base`.
"""
from .base import LAYER_TYPES, Layer, check_grad
from .chain import Chain
from .dense import Linear
from .conv import Conv2d
from .pool import AvgPool2d, GlobalAvgPool2d, MaxPool2d
from .activation import LeakyReLU, ReLU, Sigmoid, Tanh
from .reshape import Flatten
from .norm import BatchNorm1d, BatchNorm2d
from .dropout import Dropout
from .residual import Residual, layer_from_spec

__all__ = ["Layer", "LAYER_TYPES", "Chain", "check_grad", "layer_from_spec", "Linear",
           "Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "ReLU", "Sigmoid", "Tanh",
           "LeakyReLU", "Flatten", "BatchNorm1d", "BatchNorm2d", "Dropout", "Residual"]
