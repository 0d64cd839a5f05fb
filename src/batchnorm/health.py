"""Skipped updates, noticed without waiting for the device.

A training call's update returns a boolean on the device: whether its batch entered
the moving averages (:func:`batchnorm.functional.apply_update`). Reading it at once
would stall an accelerator on every call, so :class:`SkipWatch` reads it
asynchronously: on CPU tensors through a NumPy view (there is no device to wait for),
elsewhere from a pinned host copy made without blocking, checked once the copy has
landed (in practice at the next call) or on demand.

This module imports only :mod:`batchnorm.state`, :mod:`batchnorm.statistics` and
:mod:`batchnorm.callsite`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from . import callsite
from .state import BatchStatistics
from .statistics import skip_reason

__all__ = ["SkipWatch", "warn_skipped"]

_MAX_PENDING = 64  # flags not yet landed that are kept; older ones are checked with a wait


class SkipWatch:
    """Reports the batches whose update was skipped, without a blocking read in the hot path.

    >>> watch = SkipWatch()
    >>> stats = BatchStatistics(torch.zeros(1, 1), torch.ones(1, 1), 4)
    >>> watch.watch(torch.tensor(False), stats)
    >>> watch.skipped() == [stats]
    True
    """

    def __init__(self) -> None:
        # (the flag, how to know it has landed: None (a CPU tensor, it has), the event of its
        # copy, or "wait" (only by waiting), the statistics)
        self._pending: list[tuple[Tensor, torch.cuda.Event | Literal["wait"] | None,
                                  BatchStatistics]] = []

    def watch(self, applied: Tensor, stats: BatchStatistics) -> None:
        """Keep an eye on one update's flag (``applied``: a 0-d boolean tensor)."""
        if applied.device.type == "cpu":
            self._pending.append((applied, None, stats))
            return
        if applied.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(applied, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event, stats))
        else:  # no asynchronous copy known for this device: check at the next wait
            self._pending.append((applied, "wait", stats))
        if len(self._pending) > _MAX_PENDING:
            self._pending[0] = (*self._pending[0][:1], "wait", self._pending[0][2])

    def skipped(self, *, wait: bool = False) -> list[BatchStatistics]:
        """The statistics of the watched updates known to be skipped, oldest first; flags
        whose copy has not landed yet stay watched unless ``wait``."""
        skipped, pending = [], []
        for flag, event, stats in self._pending:
            if event is None:  # a CPU tensor: its NumPy view reads it, no device involved
                ready = True
            elif event == "wait":
                ready = wait
            else:
                ready = wait or event.query()
                if ready:
                    event.synchronize()
            if not ready:
                pending.append((flag, event, stats))
            elif not flag.cpu().numpy():
                skipped.append(stats)
        self._pending = pending
        return skipped

    def __deepcopy__(self, memo: dict[int, Any]) -> SkipWatch:
        return SkipWatch()  # a copy's future skips are its own; events cannot be copied

    def __getstate__(self) -> dict[str, Any]:
        return {"_pending": []}


def warn_skipped(owner: str, skipped: list[BatchStatistics], *, unbiased: bool,
                 dtype: torch.dtype, stacklevel: int) -> None:
    """A ``RuntimeWarning`` for each batch of ``skipped`` left out of ``owner``'s moving
    averages (of ``dtype``), saying why (:func:`batchnorm.statistics.skip_reason`), at the
    user's line ``stacklevel`` frames up (:func:`batchnorm.callsite.warn`)."""
    for stats in skipped:
        reason = skip_reason(stats, unbiased=unbiased, dtype=dtype)
        callsite.warn(f"{owner}: {reason}; the moving averages were left unchanged for this "
                      "batch", RuntimeWarning, stacklevel)
