"""When moving-statistics updates happen, and with which statistics (TensorFlow's UPDATE_OPS,
made safe; gradient accumulation, made exact).

By default a :class:`~batchnorm.BatchNorm` called in training mode updates its moving
averages at once. Two blocks change that for the training calls made inside them:

- ``with deferred_updates() as updates:`` records every layer's updates instead;
  ``updates.apply()`` applies what was recorded, in call order, ``updates.discard()``
  drops it, and leaving the block drops whatever is still pending, with a
  ``RuntimeWarning`` unless an exception is leaving it (forgotten updates are
  TensorFlow 1's ``UPDATE_OPS`` trap) (:func:`deferred_updates`).
- ``with accumulate(model):`` declares the micro-batches of one optimizer step: each
  micro-batch is normalized with its own statistics, and at the end of the block every layer
  of ``model`` moves its averages once, with the statistics of all its micro-batches
  together (:func:`accumulate`).

**Nesting.** A training call goes to the innermost open block that takes it (a
``deferred_updates`` block takes every layer, an ``accumulate`` block the layers of its
model), or updates the layer at once. What leaves a block goes where the calls would have
gone without it:

- an ``accumulate`` block's one update per layer goes, at its end, to the innermost block
  around it that takes the layer: an enclosing ``deferred_updates`` block records it (and
  discards it unless applied), an enclosing ``accumulate`` block pools it with its other
  micro-batches (exactly: the pooling is associative);
- ``updates.apply()`` of a ``deferred_updates`` block sends each recorded call to the
  innermost ``accumulate`` block around it that takes the layer, else applies it to the
  layer; an enclosing ``deferred_updates`` block does not hold applied updates back.

**Threads and tasks.** The open blocks are per thread and per asyncio task (a
:class:`contextvars.ContextVar`): a block opened in one thread or task does not capture
another's training calls. ``torch.compile`` cannot trace a ``ContextVar`` (it would break the
graph, an error under ``fullgraph=True``), so compiled code reads a per-thread copy of the
open blocks instead (a :class:`threading.local` attribute, which ``torch.compile`` guards on
at every call): compiled calls are kept apart per thread, but two asyncio tasks of one thread
that interleave inside open blocks are told apart only by uncompiled code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial, reduce
from typing import Protocol, cast, runtime_checkable

import torch

from . import callsite, recompute
from .state import BatchStatistics
from .statistics import combine_statistics

__all__ = ["Accumulation", "DeferredUpdates", "StatisticsSink", "accumulate", "active_recorder",
           "deferred_updates"]


@runtime_checkable
class StatisticsSink(Protocol):
    """Something that folds a batch's statistics into its moving averages:
    :meth:`batchnorm.BatchNorm.update_statistics`."""

    def update_statistics(self, stats: BatchStatistics,
                          unbiased_moving_variance: bool | None = None) -> None:
        """Fold ``stats`` into the moving averages now (``unbiased_moving_variance``: the
        variance rule decided for the call that computed them; None: the sink's own)."""
        ...


# The open blocks of this thread or task, innermost last. Uncompiled code reads the ContextVar;
# compiled code the thread's copy, which every change also writes (see the module docstring).
_BLOCKS: ContextVar[tuple] = ContextVar("batchnorm_update_blocks", default=())


class _ThreadBlocks(threading.local):
    blocks: tuple = ()


_THREAD = _ThreadBlocks()
# How many blocks are open in the whole process: when none is (nearly always), a training call
# looks no further (one list read, which torch.compile guards on).
_OPEN = [0]
_OPEN_LOCK = threading.Lock()


def _set_blocks(blocks: tuple) -> None:
    _BLOCKS.set(blocks)
    _THREAD.blocks = blocks


@contextmanager
def _opened(block):
    block._enclosing = _BLOCKS.get()
    with _OPEN_LOCK:
        _OPEN[0] += 1
    _set_blocks((*block._enclosing, block))
    try:
        yield block
    finally:
        _set_blocks(tuple(b for b in _BLOCKS.get() if b is not block))
        block._open = False
        with _OPEN_LOCK:
            _OPEN[0] -= 1


def _open_blocks() -> tuple:
    return _THREAD.blocks if torch.compiler.is_dynamo_compiling() else _BLOCKS.get()


def active_recorder(layer: StatisticsSink | None = None) -> DeferredUpdates | Accumulation | None:
    """The block that takes ``layer``'s training calls: the innermost open block of this thread
    or task that takes it, or None when its updates apply at once."""
    if not _OPEN[0]:
        return None
    for block in reversed(_open_blocks()):
        if block._open and block.takes(layer):  # a task started in a block outlives it
            return block
    return None


def _detached(stats: BatchStatistics) -> BatchStatistics:
    return BatchStatistics(stats.mean.detach(), stats.variance.detach(), stats.count)


class _Link:
    """One recorded call, linked to the one before it. A chain, not a list: torch.compile
    guards on a list's length, so appending to one would compile a graph per call of a block
    (it guards only on the type of this attribute, the same for every call)."""

    def __init__(self, before: _Link | None, layer: StatisticsSink | None,
                 stats: BatchStatistics | None, unbiased: bool | None = None) -> None:
        self.before, self.layer, self.stats, self.unbiased = before, layer, stats, unbiased


class _Records:
    """The calls recorded by a block, in call order. Nothing but the chain's end changes when
    one is recorded (a counter would be an int torch.compile specializes on, too)."""

    def __init__(self) -> None:
        self.last = _Link(None, None, None)

    def append(self, layer: StatisticsSink, stats: BatchStatistics,
               unbiased: bool | None) -> None:
        self.last = _Link(self.last, layer, _detached(stats), unbiased)

    def items(self) -> list[tuple[StatisticsSink, BatchStatistics, bool | None]]:
        """``(layer, statistics, variance rule)`` per record, in call order."""
        found, link = [], self.last
        while link.before is not None:
            # Every link but the chain's start (the only one without a link before it) holds
            # a record.
            assert link.layer is not None and link.stats is not None
            found.append((link.layer, link.stats, link.unbiased))
            link = link.before
        return found[::-1]

    def take(self) -> list[tuple[StatisticsSink, BatchStatistics, bool | None]]:
        """Every record, in call order; the block keeps none."""
        found = self.items()
        self.last = _Link(None, None, None)
        return found


# torch.nn's batch norms (BatchNorm1d/2d/3d, SyncBatchNorm, their lazy forms), which update
# their running statistics at once whatever block is open.
_TORCH_BATCH_NORMS = (torch.nn.modules.batchnorm._BatchNorm,)


def _torch_batch_norms(model: torch.nn.Module) -> list[str]:
    """``"name (Type)"`` of each torch.nn batch norm of ``model`` that keeps running
    statistics."""
    return [f"{name or '(root)'!r} ({type(m).__name__})" for name, m in model.named_modules()
            if isinstance(m, _TORCH_BATCH_NORMS) and m.track_running_stats]


def _note_torch_batch_norm(module: torch.nn.Module, args: tuple) -> None:
    """A global forward pre-hook, installed while a deferred_updates block is open anywhere:
    a torch.nn batch norm called in training mode updates its running statistics at once,
    which the innermost deferred_updates block of this thread or task notes, to warn if it
    recorded nothing (an unconverted model; a model that also has bn.BatchNorm layers, and
    the tools that run one, keep torch's layers as they mean to)."""
    if module.training and isinstance(module, _TORCH_BATCH_NORMS) \
            and module.track_running_stats:
        block = next((b for b in reversed(_open_blocks())
                      if isinstance(b, DeferredUpdates) and b._open), None)
        if block is not None:
            block._torch_updated[type(module).__name__] = None


_HOOK: list = [None, 0]  # the installed hook's handle, the deferred_updates blocks open


def _watch_torch_batch_norms(opening: bool) -> None:
    """Install the hook when the first deferred_updates block opens, remove it when the last
    one closes: outside them, module calls keep torch's hook-free fast path."""
    with _OPEN_LOCK:
        _HOOK[1] += 1 if opening else -1
        if _HOOK[1] and _HOOK[0] is None:
            _HOOK[0] = torch.nn.modules.module.register_module_forward_pre_hook(
                _note_torch_batch_norm)
        elif not _HOOK[1] and _HOOK[0] is not None:
            _HOOK[0].remove()
            _HOOK[0] = None


class DeferredUpdates:
    """Moving-statistics updates recorded inside a :func:`deferred_updates` block."""

    def __init__(self) -> None:
        self._pending = _Records()
        self._open = True
        self._enclosing: tuple = ()
        self._recorded = False  # whether any call was recorded
        self._torch_updated: dict[str, None] = {}  # torch.nn batch norms that updated at once

    def takes(self, layer: StatisticsSink | None) -> bool:
        """Every layer's training calls: True."""
        return True

    def record(self, layer: StatisticsSink, stats: BatchStatistics,
               unbiased_moving_variance: bool | None = None) -> None:
        """Keep ``layer``'s batch statistics (and the variance rule decided for the call that
        computed them) until :meth:`apply` or :meth:`discard`."""
        self._pending.append(layer, stats, unbiased_moving_variance)
        self._recorded = True

    def apply(self) -> int:
        """Apply every recorded update in the order the layers were called; return how many.

        Inside an :func:`accumulate` block (opened before this block) whose model holds the
        layer, the update joins that block's micro-batches instead.
        """
        if not self._open:
            raise RuntimeError(
                "this deferred_updates block has already exited and its pending updates were "
                "discarded; call updates.apply() inside the `with` block"
            )
        pending = self._pending.take()
        for layer, stats, unbiased in pending:
            target = next((b for b in reversed(self._enclosing)
                           if isinstance(b, Accumulation) and b._open and b.takes(layer)), None)
            if target is None:
                layer.update_statistics(stats, unbiased)
            else:
                target.record(layer, stats, unbiased)
        return len(pending)

    def discard(self) -> int:
        """Drop every recorded update; return how many were dropped."""
        return len(self._pending.take())

    def __len__(self) -> int:
        return len(self._pending.items())

    def __repr__(self) -> str:
        return f"DeferredUpdates(pending={len(self)}, open={self._open})"


@contextmanager
def deferred_updates() -> Iterator[DeferredUpdates]:
    """Record moving-statistics updates instead of applying them.

    Use it for a training-mode forward pass that must not touch the statistics
    (the second pass of SAM, adversarial examples), or to apply the updates only
    once the optimizer step succeeded. It records the training calls of its own thread (or
    asyncio task) only; see the module's docstring for nested blocks. Updates neither
    applied nor discarded when the block ends are dropped with a ``RuntimeWarning`` saying
    how many (an exception leaving the block drops them silently). torch.nn's batch norms
    (an unconverted model: see :func:`batchnorm.convert`) are not recorded: they update their
    running statistics at once, and a block that recorded nothing warns at its end if one
    ran in training mode.

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
    raised = False
    _watch_torch_batch_norms(opening=True)
    with _opened(recorder):
        try:
            yield recorder
        except BaseException:
            raised = True  # a failed step: dropping its updates is the point, no warning
            raise
        finally:
            _watch_torch_batch_norms(opening=False)
            if recorder._torch_updated and not recorder._recorded and not raised:
                callsite.warn(
                    f"torch.nn batch norm layer(s) ({', '.join(recorder._torch_updated)}) ran "
                    "in training mode inside this deferred_updates() block: they are not "
                    "bn.BatchNorm layers, so their running statistics were updated at once, "
                    "not recorded; convert the model first with model = bn.convert(model)",
                    RuntimeWarning, 3)
            dropped = recorder.discard()
            if dropped and not raised:
                callsite.warn(
                    f"{dropped} moving-statistics update(s) recorded in this deferred_updates() "
                    "block were neither applied nor discarded, and were dropped on leaving it "
                    "(the moving averages did not change: TensorFlow 1's forgotten "
                    "UPDATE_OPS); call updates.apply() inside the block to keep them, or "
                    "updates.discard() to drop them on purpose without this warning",
                    RuntimeWarning, 3)


def _ghost(layer: StatisticsSink) -> bool:
    """Whether ``layer``'s statistics are per ghost batch (groups to concatenate, not merge)."""
    return getattr(getattr(layer, "config", None), "virtual_batch_size", None) is not None


class Accumulation:
    """The micro-batches of one optimizer step, recorded inside an :func:`accumulate` block."""

    def __init__(self, layers: tuple[StatisticsSink, ...]) -> None:
        self._layers = layers
        self._ids = frozenset(id(layer) for layer in layers)
        self._records = _Records()
        self._open = True
        self._enclosing: tuple = ()

    def takes(self, layer: StatisticsSink | None) -> bool:
        """Whether ``layer`` is one of the block's model's layers."""
        return id(layer) in self._ids

    def record(self, layer: StatisticsSink, stats: BatchStatistics,
               unbiased_moving_variance: bool | None = None) -> None:
        """Keep one micro-batch's statistics of ``layer`` (and the variance rule decided for
        its call) until the block ends."""
        self._records.append(layer, stats, unbiased_moving_variance)

    def statistics(self) -> dict[StatisticsSink, BatchStatistics]:
        """Each recorded layer's statistics of all its micro-batches so far, together (what the
        end of the block folds into its moving averages), in the order of their first calls.
        """
        return {layer: reduce(partial(combine_statistics, ghost=_ghost(layer)), micro)
                for layer, micro in self._by_layer().items()}

    def _by_layer(self, *, take: bool = False) -> dict[StatisticsSink, list[BatchStatistics]]:
        records = self._records.take() if take else self._records.items()
        grouped: dict[StatisticsSink, list[BatchStatistics]] = {}
        for layer, stats, _ in records:
            grouped.setdefault(layer, []).append(stats)
        return grouped

    def _rules(self) -> dict[StatisticsSink, bool | None]:
        """Each recorded layer's variance rule, as decided for its latest micro-batch."""
        return {layer: unbiased for layer, _, unbiased in self._records.items()}

    def discard(self) -> int:
        """Drop every recorded micro-batch (the block's end then changes nothing, e.g. when the
        optimizer step is skipped); return how many were dropped."""
        return len(self._records.take())

    def _finish(self) -> None:
        """One update per layer, or its statistics to the enclosing block that takes it."""
        rules = self._rules()
        micro = self._by_layer(take=True)
        pooled = {layer: reduce(partial(combine_statistics, ghost=_ghost(layer)), records)
                  for layer, records in micro.items()}  # every fold before any update
        for layer, stats in pooled.items():
            target = next((b for b in reversed(self._enclosing) if b._open and b.takes(layer)),
                          None)
            if target is not None:
                target.record(layer, stats, rules[layer])
                continue
            state = getattr(layer, "state", None)
            if callable(state):  # a checkpointed micro-batch recomputed after the block
                recompute.remember(layer, state(), micro[layer])
            layer.update_statistics(stats, rules[layer])

    def __len__(self) -> int:
        return len(self._records.items())

    def __repr__(self) -> str:
        return (f"Accumulation(layers={len(self._layers)}, micro_batches={len(self)}, "
                f"open={self._open})")


@contextmanager
def accumulate(model: torch.nn.Module) -> Iterator[Accumulation]:
    """Declare one optimizer step's micro-batches (gradient accumulation): the moving averages
    of ``model``'s layers move once, at the end of the block, with the statistics of all the
    block's training calls together.

    Each micro-batch is still normalized with its own statistics (and, with renorm or a masked
    empty group, with the state as it was when the block opened). At the end of the block each
    layer that was called folds the count-weighted pooled statistics of its micro-batches
    (:func:`batchnorm.functional.combine_statistics`: exact for micro-batches of any sizes and
    for masks) into its averages in one update, so that ``num_updates`` counts one step, and
    the averages equal (to float rounding) those of one training call on the concatenated
    batch. With ghost batches that batch has the ghost batches of all the micro-batches
    (``ghost_layout="consecutive"`` on the concatenation, when every micro-batch is a multiple
    of ``virtual_batch_size``). Synchronized layers already get the statistics of every
    process's micro-batch, so the step's update is that of the global batch.

    Leaving the block by an exception, or after :meth:`Accumulation.discard`, changes nothing.
    A micro-batch whose statistics are not finite makes the step's not finite: the layer
    skips the step's update, with its usual warning.
    Layers that are not in ``model`` update as usual. See the module's docstring for blocks
    inside blocks (an update recorded by an enclosing :func:`deferred_updates` block, for
    instance, is applied only if that block applies it).

    Args:
        model: the module whose :class:`~batchnorm.BatchNorm` layers (itself included) the
            block takes.

    Yields:
        The :class:`Accumulation`: ``len()`` micro-batch calls recorded,
        :meth:`~Accumulation.statistics`, :meth:`~Accumulation.discard`.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.

    Warns:
        RuntimeWarning: ``model`` has no :class:`~batchnorm.BatchNorm` layer, so the block
            changes nothing (torch.nn's batch norms update at every micro-batch: convert the
            model with :func:`batchnorm.convert` first).

    >>> import torch, batchnorm as bn
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), bn.BatchNorm(3, axis=-1))
    >>> with bn.accumulate(model) as step:
    ...     for micro in torch.randn(64, 4).split(16):
    ...         model(micro).sum().backward()
    ...     print(len(step), model[1].num_updates.item())
    4 0
    >>> model[1].num_updates.item()
    1
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"accumulate takes a torch.nn.Module, got {type(model).__name__}")
    # The modules with a callable update_statistics are the sinks (mypy does not narrow by
    # callable(getattr(...)); isinstance with the Protocol would not check it is callable).
    layers = cast("tuple[StatisticsSink, ...]", tuple(
        m for m in model.modules() if callable(getattr(m, "update_statistics", None))))
    if not layers:
        found = _torch_batch_norms(model)
        callsite.warn(
            f"accumulate(model): the {type(model).__name__} has no bn.BatchNorm layer, so "
            "this block changes no moving average"
            + (f"; its torch.nn batch norm layer(s) {', '.join(found[:3])}"
               f"{', ...' if len(found) > 3 else ''} update at every micro-batch: convert the "
               "model first with model = bn.convert(model)" if found else
               " (bn.convert(model) turns torch.nn batch norms into bn.BatchNorm layers)"),
            RuntimeWarning, 3)
    accumulation = Accumulation(layers)
    with _opened(accumulation):
        try:
            yield accumulation
        except BaseException:
            accumulation.discard()
            raise
        accumulation._finish()
