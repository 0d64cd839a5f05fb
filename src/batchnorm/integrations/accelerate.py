"""Hugging Face accelerate: one moving-average update per optimizer step with
``Accelerator(gradient_accumulation_steps=k)``.

``with accelerator.accumulate(model):`` holds gradients back between optimizer steps but lets
every micro-batch move the batch norms' averages. Entered beside it,
:class:`AccumulateStatistics` records each micro-batch's statistics instead, and on the
micro-batch where ``accelerator.sync_gradients`` is True (the optimizer steps) every
:class:`~batchnorm.BatchNorm` layer moves its averages once, with the pooled statistics of the
step's micro-batches (:func:`batchnorm.accumulate`)::

    statistics = AccumulateStatistics(accelerator, model)
    for inputs, targets in dataloader:
        with accelerator.accumulate(model), statistics:
            ...

Needs the ``accelerate`` extra: ``pip install "batchnorm[accelerate]"``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch

from ._steps import OptimizerStep

try:
    import accelerate
except ImportError as error:
    raise ImportError(
        "batchnorm.integrations.accelerate needs Hugging Face accelerate, which is not "
        'installed: pip install "batchnorm[accelerate]"') from error

__all__ = ["AccumulateStatistics"]


class AccumulateStatistics:
    """Enter it around each micro-batch, inside or beside ``accelerator.accumulate(model)``:
    the :class:`~batchnorm.BatchNorm` layers of ``model`` move their averages once per
    optimizer step (when ``accelerator.sync_gradients`` is True on leaving it), with the pooled
    statistics of the step's micro-batches. A micro-batch that raises drops the step's
    statistics (no average moves).

    Args:
        accelerator: the ``accelerate.Accelerator`` whose ``gradient_accumulation_steps``
            decide where the steps end.
        model: the model (prepared or not) whose layers accumulate.

    >>> import torch, batchnorm as bn
    >>> from accelerate import Accelerator
    >>> from batchnorm.integrations.accelerate import AccumulateStatistics
    >>> accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    >>> model = accelerator.prepare(torch.nn.Sequential(bn.BatchNorm(3, axis=-1)))
    >>> statistics = AccumulateStatistics(accelerator, model)
    >>> for micro in torch.randn(4, 8, 3):
    ...     with accelerator.accumulate(model), statistics:
    ...         y = model(micro)
    >>> model[0].num_updates.item()
    2
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module) -> None:
        if not isinstance(accelerator, accelerate.Accelerator):
            raise TypeError("AccumulateStatistics takes an accelerate.Accelerator, got "
                            f"{type(accelerator).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"AccumulateStatistics takes a torch.nn.Module, got "
                            f"{type(model).__name__}")
        self.accelerator, self.model = accelerator, model
        self._step = OptimizerStep()

    def __enter__(self) -> AccumulateStatistics:
        self._step.begin(self.model)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is not None:
            self._step.end(error)
        elif self.accelerator.sync_gradients:
            self._step.end()
