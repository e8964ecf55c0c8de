"""cdl: fast CPU deep-learning layers built on typed Cython + OpenMP kernels."""
__version__ = "0.2.0.dev0"

from . import _config  # noqa: E402
from ._config import (get_num_threads, set_num_threads, show_config, thread_status,  # noqa: E402
                      threads)
from . import functional  # noqa: E402
from .layers import (AvgPool2d, BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten,  # noqa: E402
                     GlobalAvgPool2d, Layer, LeakyReLU, Linear, MaxPool2d, ReLU, Residual,
                     Sigmoid, Tanh)
from .losses import MSE, MulticlassSVM, SoftmaxCrossEntropy  # noqa: E402
from .callbacks import Callback, EarlyStopping, History, ModelCheckpoint  # noqa: E402
from .optim import SGD, Adam, AdamW, CosineLR, ExponentialLR, Optimizer, StepLR  # noqa: E402
from .params import ParameterPack  # noqa: E402
from .model import Sequential  # noqa: E402
from .io import dumps, load, load_state_dict_file, loads  # noqa: E402
from .gradcheck import gradcheck  # noqa: E402
from . import datasets  # noqa: E402

_config._pin_blas()  # finds SciPy's BLAS; its thread count is left as it is (see _config)
_config.get_adaptive()  # adaptive thread count: on unless CDL_ADAPTIVE_THREADS=0

__all__ = ["__version__", "functional", "get_num_threads", "set_num_threads",
           "show_config", "thread_status", "threads",
           "Layer", "Linear", "Conv2d", "MaxPool2d", "AvgPool2d", "GlobalAvgPool2d", "ReLU",
           "Sigmoid", "Tanh", "LeakyReLU", "Flatten", "BatchNorm1d", "BatchNorm2d", "Dropout",
           "Residual", "Sequential", "ParameterPack",
           "SoftmaxCrossEntropy", "MulticlassSVM", "MSE", "Optimizer", "SGD", "Adam", "AdamW",
           "StepLR", "ExponentialLR", "CosineLR", "Callback", "EarlyStopping",
           "ModelCheckpoint", "History", "load", "dumps", "loads", "load_state_dict_file",
           "gradcheck", "datasets", "onnx"]


def __getattr__(name):
    # cdl.onnx is imported on first use: `import cdl` never imports the onnx package
    # (nor does `import cdl.onnx`; its functions import it when they run).
    if name == "onnx":
        import importlib
        return importlib.import_module(".onnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
