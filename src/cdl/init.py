"""Weight initialisation: He (for layers followed by ReLU) and Xavier/Glorot.

Values are drawn in float64 from a ``numpy.random.Generator`` and then cast, so a
given seed gives the same weights (up to rounding) in float32 and float64 and
bit-identical weights on every run.
"""
import numpy as np

__all__ = ["INITS", "he_normal", "xavier_uniform", "initialize"]

INITS = ("he", "xavier")


def he_normal(shape, fan_in, rng, dtype=np.float32):
    """W ~ N(0, 2 / fan_in) (He et al., 2015): keeps the variance through ReLU layers."""
    std = np.sqrt(2.0 / fan_in)
    return (rng.standard_normal(shape) * std).astype(dtype)


def xavier_uniform(shape, fan_in, fan_out, rng, dtype=np.float32):
    """W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio, 2010)."""
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-a, a, size=shape).astype(dtype)


def initialize(kind, shape, fan_in, fan_out, rng, dtype):
    if kind == "he":
        return he_normal(shape, fan_in, rng, dtype)
    if kind == "xavier":
        return xavier_uniform(shape, fan_in, fan_out, rng, dtype)
    raise ValueError(f"init must be one of 'auto', 'he', 'xavier', got {kind!r}")
