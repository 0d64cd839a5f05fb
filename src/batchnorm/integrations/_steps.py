"""One optimizer step's :func:`batchnorm.accumulate` block, opened and closed by an engine's
hooks (the micro-batches of a step run in several calls, not inside one ``with``)."""

from __future__ import annotations

from contextlib import ExitStack

import torch

from ..updates import accumulate

__all__ = ["OptimizerStep"]


class OptimizerStep:
    """The :func:`~batchnorm.accumulate` block of the optimizer step under way, if any."""

    def __init__(self) -> None:
        self._block: ExitStack | None = None

    @property
    def open(self) -> bool:
        """Whether a step's block is open (its micro-batches recorded, no update yet)."""
        return self._block is not None

    def begin(self, model: torch.nn.Module) -> None:
        """Open the step's block for ``model``, unless one is open already."""
        if self._block is None:
            block = ExitStack()
            block.enter_context(accumulate(model))
            self._block = block

    def end(self, error: BaseException | None = None) -> None:
        """Close the step's block: each layer moves its averages once, with the pooled
        statistics of the step's micro-batches; with ``error``, the step changes nothing."""
        block, self._block = self._block, None
        if block is None:
            return
        if error is None:
            block.close()
        else:
            block.__exit__(type(error), error, error.__traceback__)
