"""Small reference networks built from cdl's layers (also used by ``cdl train`` and bench/)."""
import numpy as np

from .layers import (BatchNorm1d, BatchNorm2d, Conv2d, Dropout, Flatten, GlobalAvgPool2d, Linear,
                     MaxPool2d, ReLU, Residual)
from .model import Sequential

__all__ = ["basic_block", "lenet5", "resnet8"]


def basic_block(cin, cout, stride=1):
    """A ResNet basic block: conv3×3–BN–ReLU–conv3×3–BN plus the identity, or a 1×1
    conv + BN shortcut when the shape changes; the ReLU after the sum is the next layer."""
    layers = [Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), BatchNorm2d(cout),
              ReLU(), Conv2d(cout, cout, 3, padding=1, bias=False), BatchNorm2d(cout)]
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = [Conv2d(cin, cout, 1, stride=stride, bias=False), BatchNorm2d(cout)]
    return Residual(layers, shortcut)


def resnet8(input_shape=(3, 32, 32), num_classes=10, width=16, dtype=np.float32, seed=None,
            l2=0.0):
    """ResNet-8: a ``width``-channel conv–BN–ReLU stem, three stages of one basic block
    (width, 2·width, 4·width channels; the second and third start at stride 2 with a
    1×1 conv + BN shortcut), global average pooling, then Linear(4·width, num_classes)."""
    c = input_shape[0]
    layers = [Conv2d(c, width, 3, padding=1, bias=False), BatchNorm2d(width), ReLU(),
              basic_block(width, width), ReLU(),
              basic_block(width, 2 * width, stride=2), ReLU(),
              basic_block(2 * width, 4 * width, stride=2), ReLU(),
              GlobalAvgPool2d(), Linear(4 * width, num_classes)]
    return Sequential(layers, input_shape, dtype=dtype, seed=seed, l2=l2)


def lenet5(input_shape=(1, 28, 28), num_classes=10, batchnorm=False, dropout=0.0,
           dtype=np.float32, seed=None, l2=0.0):
    """LeNet-5 (conv5×5(6)–ReLU–pool–conv5×5(16)–ReLU–pool–120–84–classes), optionally
    with BatchNorm after each conv and hidden Linear and Dropout before the two hidden
    Linear layers (120 and 84). ``input_shape`` is (C, H, W) with H and W >= 12 (the
    second convolution needs a 5×5 plane after the first pool)."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list, np.ndarray)) \
        else None
    if shape is None or len(shape) != 3 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shape):
        raise ValueError(f"lenet5: input_shape must be (C, H, W), got {input_shape!r}")
    c, h, w = shape
    if c < 1 or h < 12 or w < 12:
        raise ValueError(f"lenet5: input_shape (C, H, W) needs C >= 1 and H, W >= 12 (its "
                         f"two 2x2 pools with a 5x5 convolution between them), got {shape}")
    bn2 = (lambda n: [BatchNorm2d(n)]) if batchnorm else (lambda n: [])
    bn1 = (lambda n: [BatchNorm1d(n)]) if batchnorm else (lambda n: [])
    drop = (lambda: [Dropout(dropout)]) if dropout else (lambda: [])
    h2, w2 = ((h + 4 - 4) // 2 - 4) // 2, ((w + 4 - 4) // 2 - 4) // 2
    layers = ([Conv2d(c, 6, 5, padding=2, bias=not batchnorm)] + bn2(6) + [ReLU(), MaxPool2d(2),
              Conv2d(6, 16, 5, bias=not batchnorm)] + bn2(16) + [ReLU(), MaxPool2d(2), Flatten()]
              + drop() + [Linear(16 * h2 * w2, 120, bias=not batchnorm)] + bn1(120) + [ReLU()]
              + drop() + [Linear(120, 84, bias=not batchnorm)] + bn1(84) + [ReLU(),
              Linear(84, num_classes)])
    return Sequential(layers, input_shape, dtype=dtype, seed=seed, l2=l2)
