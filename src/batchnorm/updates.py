"""Control over when moving-statistics updates happen (TensorFlow's UPDATE_OPS, made safe).

By default a :class:`~batchnorm.BatchNorm` called in training mode updates its
moving averages at once. Inside ``with deferred_updates() as updates:`` it
records the update instead; ``updates.apply()`` applies everything recorded, in
call order, and ``updates.discard()`` drops it. Leaving the block drops whatever is
still pending, with a ``RuntimeWarning`` unless an exception is leaving it (forgotten
updates are TensorFlow 1's ``UPDATE_OPS`` trap).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

from .callsite import user_stacklevel
from .state import BatchStatistics

__all__ = ["DeferredUpdates", "StatisticsSink", "deferred_updates"]


@runtime_checkable
class StatisticsSink(Protocol):
    """Something that folds a batch's statistics into its moving averages:
    :meth:`batchnorm.BatchNorm.update_statistics`."""

    def update_statistics(self, stats: BatchStatistics) -> None:
        """Fold ``stats`` into the moving averages now."""
        ...

# The innermost active recorder is last. A plain list (not a ContextVar) so that
# torch.compile can read it without a graph break.
_ACTIVE: list[DeferredUpdates] = []


class DeferredUpdates:
    """Moving-statistics updates recorded inside a :func:`deferred_updates` block."""

    def __init__(self) -> None:
        self._pending: list[tuple[StatisticsSink, BatchStatistics]] = []
        self._open = True

    def record(self, layer: StatisticsSink, stats: BatchStatistics) -> None:
        """Keep ``layer``'s batch statistics until :meth:`apply` or :meth:`discard`."""
        detached = BatchStatistics(stats.mean.detach(), stats.variance.detach(), stats.count)
        self._pending.append((layer, detached))

    def apply(self) -> int:
        """Apply every recorded update in the order the layers were called; return how many."""
        if not self._open:
            raise RuntimeError(
                "this deferred_updates block has already exited and its pending updates were "
                "discarded; call updates.apply() inside the `with` block"
            )
        pending, self._pending = self._pending, []
        for layer, stats in pending:
            layer.update_statistics(stats)
        return len(pending)

    def discard(self) -> int:
        """Drop every recorded update; return how many were dropped."""
        count = len(self._pending)
        self._pending = []
        return count

    def __len__(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"DeferredUpdates(pending={len(self._pending)}, open={self._open})"


@contextmanager
def deferred_updates() -> Iterator[DeferredUpdates]:
    """Record moving-statistics updates instead of applying them.

    Use it for a training-mode forward pass that must not touch the statistics
    (the second pass of SAM, adversarial examples), or to apply the updates only
    once the optimizer step succeeded. Updates neither applied nor discarded when the
    block ends are dropped with a ``RuntimeWarning`` saying how many (an exception leaving
    the block drops them silently):

    >>> import torch, batchnorm as bn
    >>> layer = bn.BatchNorm(2)
    >>> with bn.deferred_updates() as updates:
    ...     y = layer(torch.randn(8, 2), training=True)
    ...     print(len(updates), layer.num_updates.item())
    ...     updates.apply()
    1 0
    1
    >>> layer.num_updates.item()
    1
    """
    recorder = DeferredUpdates()
    _ACTIVE.append(recorder)
    raised = False
    try:
        yield recorder
    except BaseException:
        raised = True  # a failed step: dropping its updates is the point, no warning
        raise
    finally:
        _ACTIVE.remove(recorder)
        dropped = recorder.discard()
        recorder._open = False
        if dropped and not raised:
            warnings.warn(
                f"{dropped} moving-statistics update(s) recorded in this deferred_updates() "
                "block were neither applied nor discarded, and were dropped on leaving it (the "
                "moving averages did not change: TensorFlow 1's forgotten UPDATE_OPS); call "
                "updates.apply() inside the block to keep them, or updates.discard() to drop "
                "them on purpose without this warning", RuntimeWarning,
                stacklevel=user_stacklevel())


def active_recorder() -> DeferredUpdates | None:
    """The innermost open :class:`DeferredUpdates`, or None when updates apply at once."""
    return _ACTIVE[-1] if _ACTIVE else None
