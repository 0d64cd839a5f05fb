"""Tools for the pitfalls of batch normalization, working on whole models.

- :func:`convert` / :func:`to_torch`: ``torch.nn`` batch normalization to
  :class:`~batchnorm.BatchNorm` and back, keeping what the model computes.
- :func:`freeze` / :func:`unfreeze`: fixed statistics for fine-tuning, whatever
  ``train()`` says.
- :func:`fold`: an inference copy with batch normalization folded into the
  convolution or linear layer before it.
- :func:`recalibrate`: exact population statistics over a set of batches (PreciseBN), or
  blended with the current ones (``prior``: adapting to shifted inputs).
- :func:`merge_statistics`: the statistics of several models pooled into one (federated
  averaging, model soups).
- :func:`diagnose`: the usual mistakes, found in a model, with remedies.
- :class:`Monitor`: batch statistics next to the moving averages during training.
- :func:`load_keras_batchnorms`: BatchNormalization layers from a saved Keras model.

Each tool's helpers and lower-level pieces (the Keras readers ``read_keras_batchnorms`` and
``batchnorm_from_keras``, ``LayerRecalibration``, ...) live in its module
(:mod:`batchnorm.tools.keras_io`, ...), which lists them in its own ``__all__``.
"""

from .convert import ConversionResult, convert, to_torch
from .diagnose import Finding, diagnose
from .fold import FoldResult, fold
from .freeze import freeze, unfreeze
from .keras_io import load_keras_batchnorms
from .merge import merge_statistics
from .monitor import Monitor, Record
from .recalibrate import RecalibrationReport, recalibrate

__all__ = [
    "ConversionResult",
    "Finding",
    "FoldResult",
    "Monitor",
    "RecalibrationReport",
    "Record",
    "convert",
    "diagnose",
    "fold",
    "freeze",
    "load_keras_batchnorms",
    "merge_statistics",
    "recalibrate",
    "to_torch",
    "unfreeze",
]
