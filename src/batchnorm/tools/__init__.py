"""Tools for the pitfalls of batch normalization, working on whole models.

- :func:`convert` / :func:`to_torch`: ``torch.nn`` batch normalization to
  :class:`~batchnorm.BatchNorm` and back, keeping what the model computes.
- :func:`freeze` / :func:`unfreeze`: fixed statistics for fine-tuning, whatever
  ``train()`` says.
- :func:`fold`: an inference copy with batch normalization folded into the
  convolution or linear layer before it.
- :func:`recalibrate`: exact population statistics over a set of batches (PreciseBN).
- :func:`diagnose`: the usual mistakes, found in a model, with remedies.
- :class:`Monitor`: batch statistics next to the moving averages during training.
- :func:`load_keras_batchnorms`: BatchNormalization layers from a saved Keras model.
"""

from .convert import ConversionResult, convert, to_torch
from .diagnose import Finding, diagnose
from .fold import FoldResult, fold
from .freeze import freeze, unfreeze
from .keras_io import batchnorm_from_keras, load_keras_batchnorms, read_keras_batchnorms
from .monitor import Monitor, Record
from .recalibrate import LayerRecalibration, RecalibrationReport, recalibrate

__all__ = ["ConversionResult", "FoldResult", "convert", "fold", "freeze", "to_torch", "unfreeze"]
__all__ += [
    "Finding",
    "LayerRecalibration",
    "Monitor",
    "RecalibrationReport",
    "Record",
    "batchnorm_from_keras",
    "diagnose",
    "load_keras_batchnorms",
    "read_keras_batchnorms",
    "recalibrate",
]
