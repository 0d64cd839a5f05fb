"""Activation checkpointing: a training call that a backward pass runs a second time.

``torch.utils.checkpoint`` does not keep a segment's activations; the backward pass runs
the segment's forward again to get them, with either implementation (``use_reentrant=True``
runs the whole segment inside the checkpoint's backward; ``use_reentrant=False`` runs it
when backward first needs one of its tensors). Two things then go wrong for batch
normalization, and :class:`~batchnorm.BatchNorm` does neither:

- the recomputation is a training call, so it would move the moving averages a second time
  (``torch.nn.BatchNorm*d`` counts two batches per step, with either implementation).
  :func:`in_backward` tells a recomputation: a forward that runs while autograd executes a
  backward pass. The layer skips its update (and records nothing in a
  :func:`~batchnorm.deferred_updates` or :func:`~batchnorm.accumulate` block).
- the output of Batch Renormalization (``r``, ``d``) and of a masked group with no selected
  value (normalized with the moving statistics) depends on the state, which the original
  call's update has changed since. The recomputation must normalize with the state the
  original call saw, or its gradients differ. Before each update in those modes of a call
  that may be recomputed (:func:`may_recompute`) the layer keeps the values it is about to
  overwrite (:func:`remember`: the renorm averages, and the moving statistics with a mask;
  for the last :data:`KEPT` updates of each layer), keyed by the batch statistics of the
  calls that the update folds in. The recomputation computes
  its batch statistics again (bit for bit: the same input, the same kernel), and
  :func:`original_state` picks the values kept before the update of the call with those
  statistics, or the current state when no update followed that call yet (inside a block,
  or before the update). The selection runs on the device: nothing is read back.

A forward that runs in a backward pass, with gradients enabled, for another reason (a model
called from a backward hook) is treated as a recomputation too. ``torch.compile`` traces
neither check: a compiled model's activation checkpointing recomputes in the compiled
backward, which contains no update (tested), and a compiled module called again by an eager
checkpoint is not detected.

This module imports only :mod:`batchnorm.state`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import NamedTuple
from weakref import WeakKeyDictionary

import torch
from torch import Tensor

from .state import BatchNormState, BatchStatistics

__all__ = ["KEPT", "in_backward", "may_recompute", "original_state", "remember"]

KEPT = 4
"""Updates per layer whose previous values are kept for a recomputation: a layer called up to
this many times before the backward pass that recomputes its calls (a GAN's discriminator:
real, fake, and the generator's pass). Each keeps two to four feature-sized tensors and the
two of the batch statistics."""

# The state fields a training kernel reads: the moving statistics (a masked group with no
# selected value) and the renorm averages (r and d).
_MOVING = ("moving_mean", "moving_variance")
_RENORM = ("renorm_mean", "renorm_stddev")
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
# Where a torch release lacks it, every call counts as one that may be recomputed.
_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks",
                               lambda ignore_is_tracing: True)


class _Kept(NamedTuple):
    keys: tuple[tuple[Tensor, Tensor], ...]  # (mean, variance) of the calls the update folds in
    fields: dict[str, Tensor]  # the values those calls normalized with


_KEPT: WeakKeyDictionary[object, deque[_Kept]] = WeakKeyDictionary()


def in_backward() -> bool:
    """Whether the current forward runs inside a backward pass with gradients enabled:
    activation checkpointing's recomputation (both implementations recompute with gradients
    enabled; without them the recomputed activations would be of no use to backward).
    Always False while ``torch.compile`` traces.

    >>> in_backward()
    False
    """
    # Grad mode first: it is the cheapest check, it settles no_grad calls, and torch.compile
    # traces it (is_dynamo_compiling, unlike is_compiling, has no TorchScript check).
    return (torch.is_grad_enabled() and not torch.compiler.is_dynamo_compiling()
            and _graph_task_id() != -1)


def may_recompute() -> bool:
    """Whether activation checkpointing may run the current training call again: it runs
    without gradients (``use_reentrant=True``'s first forward, and every checkpoint built on
    an autograd Function, as DeepSpeed's and Megatron's) or with saved-tensor hooks
    (``use_reentrant=False``'s first forward, offloading hooks). A call with gradients and
    no hooks keeps its own activations, so nothing computes it again, and the layer need not
    :func:`remember` the state it read. False while ``torch.compile`` traces (a compiled
    model recomputes in its compiled backward, which contains no update).

    >>> may_recompute()
    False
    >>> with torch.no_grad():
    ...     may_recompute()
    True
    """
    if torch.compiler.is_dynamo_compiling():
        return False
    return not torch.is_grad_enabled() or _saved_tensors_hooks(False) is not None


def remember(layer: object, state: BatchNormState, stats: Sequence[BatchStatistics]) -> None:
    """Keep ``state``'s values that the training kernels read, before an update overwrites them,
    for the recomputation of the calls whose statistics are ``stats``: the renorm averages
    of a renorm state, the moving statistics when a count is a tensor (a mask). Nothing when
    neither applies, or while traced."""
    if torch.compiler.is_dynamo_compiling():
        return
    names = [*_RENORM] if state.renorm_mean is not None else []
    if any(not isinstance(s.count, int) for s in stats):
        names += _MOVING
    if not names:
        return
    keys = tuple((s.mean.detach(), s.variance.detach()) for s in stats)
    kept = _KEPT.get(layer)
    if kept is None:
        kept = _KEPT[layer] = deque(maxlen=KEPT)
    kept.append(_Kept(keys, {name: getattr(state, name).clone() for name in names}))


def original_state(layer: object, stats: BatchStatistics,
                   state: BatchNormState) -> BatchNormState:
    """The state the original call of a recomputation with batch statistics ``stats``
    normalized with: the values kept before the newest update that folded in statistics equal
    to ``stats``, else ``state`` (no update followed that call). Selected on the device."""
    kept = _KEPT.get(layer)
    mean, variance = stats.mean.detach(), stats.variance.detach()
    candidates = [(k_mean, k_variance, entry.fields) for entry in kept or ()
                  for k_mean, k_variance in entry.keys
                  if k_mean.shape == mean.shape and k_mean.dtype == mean.dtype
                  and k_mean.device == mean.device]
    if not candidates:
        return state
    same = ((torch.stack([c[0] for c in candidates]) == mean).flatten(1).all(1)
            & (torch.stack([c[1] for c in candidates]) == variance).flatten(1).all(1))
    order = torch.arange(1, len(candidates) + 1, device=mean.device)
    index = torch.where(same, order, 0).amax().reshape(1)  # 0: the current state
    chosen = {}
    for name in {name for *_, fields in candidates for name in fields}:
        current = getattr(state, name)  # also for a call whose update did not need this field
        stacked = torch.stack([current, *(fields.get(name, current) for *_, fields in candidates)])
        chosen[name] = stacked.index_select(0, index)[0]
    return state._replace(**chosen)
