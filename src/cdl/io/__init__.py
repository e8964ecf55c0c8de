"""Files and formats: cdl's own model file, bytes and pickling (format), and
state-dict files (safetensors)."""
from .format import dumps, load, loads, save

__all__ = ["save", "load", "dumps", "loads"]
