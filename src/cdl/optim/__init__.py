"""Optimizers (one base class over the model's flat parameter pack) and schedules."""
from .base import OPTIMIZER_TYPES, Optimizer
from .sgd import SGD
from .adam import Adam, AdamW
from .schedules import CosineLR, ExponentialLR, StepLR

__all__ = ["Optimizer", "OPTIMIZER_TYPES", "SGD", "Adam", "AdamW", "StepLR", "ExponentialLR",
           "CosineLR"]
