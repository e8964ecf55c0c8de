"""cdl: fast CPU deep-learning layers built on typed Cython + OpenMP kernels."""
__version__ = "0.1.0"

from . import _config  # noqa: E402
from ._config import get_num_threads, set_num_threads, show_config, threads  # noqa: E402
from . import functional  # noqa: E402

_config._pin_blas()  # cdl's OpenMP chunks are the parallelism; see _config

__all__ = ["__version__", "functional", "get_num_threads", "set_num_threads",
           "show_config", "threads"]
