"""Pick, once at import, the kernel build for the best instruction set this CPU has.

The hot modules are compiled three times (baseline x86-64, AVX2+FMA, AVX-512);
``CDL_ISA=baseline|avx2|avx512`` forces one (tests use it to compare them).
"""
import importlib
import os

from . import _runtime

__all__ = ["SUPPORTED", "ISA", "load"]

SUPPORTED = tuple(_runtime.cpu_supports())


def _select():
    forced = os.environ.get("CDL_ISA", "").strip().lower()
    if not forced:
        return SUPPORTED[-1]
    if forced not in ("baseline", "avx2", "avx512"):
        raise ImportError(f"CDL_ISA={forced!r}: expected one of baseline, avx2, avx512")
    if forced not in SUPPORTED:
        raise ImportError(f"CDL_ISA={forced!r}: this CPU supports only {', '.join(SUPPORTED)}")
    return forced


ISA = _select()


def load(module):
    """Import ``cdl._kernels.<module>_<ISA>``."""
    return importlib.import_module(f"cdl._kernels.{module}_{ISA}")
