"""cdl: fast CPU deep-learning layers built on typed Cython + OpenMP kernels."""
__version__ = "0.2.0.dev0"

from . import _config  # noqa: E402
from ._config import get_num_threads, set_num_threads, show_config, threads  # noqa: E402
from . import functional  # noqa: E402
from .layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sigmoid  # noqa: E402
from .losses import MSE, MulticlassSVM, SoftmaxCrossEntropy  # noqa: E402
from .callbacks import Callback, EarlyStopping, History, ModelCheckpoint  # noqa: E402
from .optim import SGD, CosineLR, ExponentialLR, StepLR  # noqa: E402
from .model import Sequential  # noqa: E402
from .serialization import load  # noqa: E402
from .gradcheck import gradcheck  # noqa: E402
from . import datasets  # noqa: E402

_config._pin_blas()  # cdl's OpenMP chunks are the parallelism; see _config

__all__ = ["__version__", "functional", "get_num_threads", "set_num_threads",
           "show_config", "threads",
           "Linear", "Conv2d", "MaxPool2d", "ReLU", "Sigmoid", "Flatten", "Sequential",
           "SoftmaxCrossEntropy", "MulticlassSVM", "MSE", "SGD", "StepLR", "ExponentialLR",
           "CosineLR", "Callback", "EarlyStopping", "ModelCheckpoint", "History", "load",
           "gradcheck", "datasets"]
