"""batchnorm: batch normalization as TensorFlow defines it, on PyTorch.

>>> import torch, batchnorm as bn
>>> layer = bn.BatchNorm(16)              # (N, C, ...) input, TensorFlow's defaults
>>> y = layer(torch.randn(8, 16, 4, 4), training=True)
"""

from . import functional
from .functional import BatchNormState
from .layer import BatchNorm, apply_constraints, regularization_loss
from .updates import DeferredUpdates, deferred_updates

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormState",
    "DeferredUpdates",
    "apply_constraints",
    "deferred_updates",
    "functional",
    "regularization_loss",
]
