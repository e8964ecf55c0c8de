"""Loss kernels (pending: being written)."""


def softmax(*args, **kwargs):
    raise NotImplementedError


def softmax_cross_entropy(*args, **kwargs):
    raise NotImplementedError


def multiclass_svm(*args, **kwargs):
    raise NotImplementedError


def mse(*args, **kwargs):
    raise NotImplementedError


def l2_penalty(*args, **kwargs):
    raise NotImplementedError
