"""batchnorm: batch normalization as TensorFlow defines it, on PyTorch.

>>> import torch, batchnorm as bn
>>> layer = bn.BatchNorm(16)              # (N, C, ...) input, TensorFlow's defaults
>>> y = layer(torch.randn(8, 16, 4, 4), training=True)
"""

from . import functional
from .distributed import convert_sync
from .functional import BatchNormState
from .layer import BatchNorm
from .regularization import apply_constraints, regularization_loss
from .tools import (
    ConversionResult,
    Finding,
    FoldResult,
    Monitor,
    RecalibrationReport,
    convert,
    diagnose,
    fold,
    freeze,
    load_keras_batchnorms,
    merge_statistics,
    recalibrate,
    to_torch,
    unfreeze,
)
from .updates import Accumulation, DeferredUpdates, accumulate, deferred_updates

__version__ = "0.1.0"

__all__ = [
    "Accumulation",
    "BatchNorm",
    "BatchNormState",
    "ConversionResult",
    "DeferredUpdates",
    "Finding",
    "FoldResult",
    "Monitor",
    "RecalibrationReport",
    "accumulate",
    "apply_constraints",
    "convert",
    "convert_sync",
    "deferred_updates",
    "diagnose",
    "fold",
    "freeze",
    "functional",
    "load_keras_batchnorms",
    "merge_statistics",
    "recalibrate",
    "regularization_loss",
    "to_torch",
    "unfreeze",
]
