"""What a training kernel is: the :class:`TrainingKernel` protocol and the :class:`KernelCall`
it receives.

A training kernel normalizes a batch with its own statistics and returns them:
``kernel.train(x, state, call) -> (y, stats)``. Every kernel computes the same
thing (the composite kernel is the definition; the tests compare the others to
it); they differ in which calls they can take (:meth:`TrainingKernel.unsupported`)
and in speed (:meth:`TrainingKernel.prefers_fallback`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..config import BatchNormConfig
from ..state import BatchNormState, BatchStatistics

__all__ = ["KernelCall", "TrainingKernel", "traced"]


class KernelCall(NamedTuple):
    """The per-call values a kernel needs besides the input and the state.

    ``axes`` are the resolved (sorted, non-negative) feature axes of this input;
    ``process_group`` is the ``torch.distributed`` group the statistics are
    synchronized over, or None for local statistics.
    """

    config: BatchNormConfig
    axes: tuple[int, ...]
    gamma: Tensor | None = None
    beta: Tensor | None = None
    mask: Tensor | None = None
    process_group: Any = None


@runtime_checkable
class TrainingKernel(Protocol):
    """A training-mode kernel. Implementations: ``composite`` (every mode), ``native`` (ATen's
    fused kernel, the plain mode), ``cpu`` (numba loops; every mode but adjustment)."""

    name: str

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        """Normalize ``x`` with its batch statistics; return ``(y, stats)``."""
        ...

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        """Why this kernel cannot compute the call (``"several feature axes"``, ...), or None."""
        ...

    def prefers_fallback(self, x: Tensor, call: KernelCall) -> bool:
        """For a fast path: whether the fallback (ATen's kernel in the plain mode, else the
        composite) is faster for this call, e.g. a small input."""
        ...


def traced(x: Tensor) -> bool:
    """Whether ``x`` is being traced: by ``torch.compile``, or inside a ``torch.func``
    transform (``vmap``, ``grad``)."""
    if torch.compiler.is_compiling():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.is_functorch_wrapped_tensor(x)
