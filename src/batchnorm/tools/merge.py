"""Batch-norm statistics of several models pooled into one: federated averaging, model soups.

Averaging the parameters of models trained on different data (FedAvg, model soups) leaves
their batch-norm statistics to be dealt with: forgotten, they are those of one model (or
the initial 0/1); averaged like parameters, the variances lose the spread between the
models' means. :func:`merge_statistics` gives them the statistics of the union of the
models' data instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedBuffer

from ..layer import BatchNorm
from ..statistics import merge_moments
from ._model import (
    accumulation_dtype,
    batch_norm_layers,
    held_statistics,
    set_statistics,
    stored_statistics,
)

__all__ = ["merge_statistics"]


def _layers(model: nn.Module, which: str) -> dict[str, nn.Module]:
    """The batch-norm layers of ``model`` that keep statistics, checked to have them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{which} must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: layer for name, layer in batch_norm_layers(model, torch_nn=True).items()
              if stored_statistics(layer) is not None}
    for name, layer in layers.items():
        lazy = (layer.num_features is None if isinstance(layer, BatchNorm)
                else isinstance(layer.running_mean, UninitializedBuffer))
        if lazy:
            raise ValueError(f"{which}'s layer {name or '(model)'!r} is lazy and not built yet: "
                             "call the model once on an input before merging statistics")
    return layers


def _counter(layer: nn.Module) -> Tensor | None:
    """The layer's count of updates: ``num_updates`` (``num_batches_tracked``), if it has one."""
    return getattr(layer, "num_batches_tracked", None)


def _weights(weights: Sequence[float] | None, k: int) -> list[float]:
    """The weights as floats, checked: one finite number >= 0 per source, not all 0."""
    if weights is None:
        return [1.0] * k
    if isinstance(weights, (str, bytes, Tensor)) or not isinstance(weights, Iterable):
        raise TypeError(f"weights must be a list of numbers, one per source, got "
                        f"{type(weights).__name__}")
    weights = list(weights)
    if len(weights) != k:
        raise ValueError(f"weights has {len(weights)} entries for {k} source model(s): give "
                         "one per source (e.g. the number of samples of each one's data)")
    for w in weights:
        if not isinstance(w, numbers.Real) or isinstance(w, bool):
            raise TypeError(f"weights must be numbers, got {type(w).__name__} {w!r}")
        if not 0 <= w < math.inf:
            raise ValueError(f"weights must be finite and >= 0, got {list(weights)!r}")
    if not any(weights):
        raise ValueError(f"weights are all 0, got {list(weights)!r}: at least one source must "
                         "count")
    return [float(w) for w in weights]


def merge_statistics(
    target: nn.Module,
    sources: Sequence[nn.Module],
    weights: Sequence[float] | None = None,
) -> list[str]:
    """Set the batch-norm statistics of ``target`` to those of the union of the data of the
    models ``sources`` (the same architecture), for federated averaging and model soups.

    For each batch-norm layer (:class:`~batchnorm.BatchNorm` and ``torch.nn``'s, found by
    name), with ``w_k`` the weight of source ``k``, ``m_k`` and ``v_k`` the mean and
    variance its layer normalizes with in inference (``debias`` applied):

    - ``mean = sum(w_k m_k) / sum(w_k)``;
    - ``variance = sum(w_k (v_k + (m_k - mean)**2)) / sum(w_k)``: the mean of the
      variances plus the spread of the means (the law of total variance; averaging the
      variances alone would leave the spread out);
    - ``num_updates`` (``num_batches_tracked``) is the sum of the sources' (the batches
      of the union: a ``momentum=None`` layer continues its cumulative average from there).

    It is the parallel-variance merge (:func:`batchnorm.statistics.merge_moments`), in
    float64 (float32 on MPS). With statistics re-estimated exactly on each source's data
    (:func:`~batchnorm.recalibrate`) and the number of values each layer saw as weights
    (the number of samples, for inputs without masks), it gives the exact statistics of
    the union of the data, as :func:`~batchnorm.recalibrate` on all of it does, for
    layers storing the biased variance. A layer storing the Bessel-corrected one
    (``unbiased_moving_variance``, ``torch.nn``'s) gets the same pooled value of its
    stored variances, which differs from the corrected variance of the union by less than
    ``1 / n`` relative (``n``: the fewest values a source's statistics come from).

    The target gets them as :func:`~batchnorm.recalibrate` writes statistics: renorm layers
    also get ``moving_stddev = renorm_stddev = sqrt(variance + epsilon)`` and
    ``renorm_mean = mean``, ``debias`` layers initial values that make the correction the
    identity. Nothing else changes: parameters (average those yourself), other buffers,
    the sources. ``target`` may be one of the sources. ``torch.nn`` layers with
    ``track_running_stats=False`` keep no statistics and are left out.

    Args:
        target: the model whose statistics are set.
        sources: the models whose statistics are pooled (a list, tuple or
            ``nn.ModuleList``), with the batch-norm layers of ``target`` (the same names
            and feature sizes); any device and dtype.
        weights: one number >= 0 per source, e.g. the number of samples of its data (None:
            equal weights). Only their ratios matter.

    Returns:
        The names of the layers set, in ``named_modules()`` order.

    Raises:
        TypeError: a target or source that is not a module, weights that are not numbers.
        ValueError: no source, no batch-norm layer, sources whose batch-norm layers differ
            from the target's (names, feature sizes, statistics kept or not), a lazy layer
            not built yet, weights of the wrong length, negative, not finite or all 0.
            Nothing is changed then.

    Examples:
        >>> import copy, torch, batchnorm as bn
        >>> clients = [torch.nn.Sequential(torch.nn.Linear(4, 3), bn.BatchNorm(3))
        ...            for _ in range(2)]
        >>> for shift, client in zip((-1.0, 1.0), clients):   # each on data of its own
        ...     _ = bn.recalibrate(client, [torch.randn(64, 4) + shift], progress=False)
        >>> server = copy.deepcopy(clients[0])
        >>> bn.merge_statistics(server, clients, weights=[64, 64])
        ['1']
        >>> int(server[1].num_updates)
        2
    """
    if isinstance(sources, nn.ModuleList):
        sources = list(sources)
    if isinstance(sources, nn.Module) or not isinstance(sources, Sequence):
        raise TypeError(f"sources must be a sequence (a list) of models, got "
                        f"{type(sources).__name__}")
    if not sources:
        raise ValueError("sources is empty: give at least one model to take statistics from")
    layers = _layers(target, "target")
    if not layers:
        raise ValueError("target contains no batch normalization layer with statistics "
                         "(bn.BatchNorm, or torch.nn's with track_running_stats=True) to merge")
    per_source = [_layers(source, f"sources[{k}]") for k, source in enumerate(sources)]
    for k, source_layers in enumerate(per_source):
        if list(source_layers) != list(layers):
            missing = [n for n in layers if n not in source_layers]
            extra = [n for n in source_layers if n not in layers]
            raise ValueError(f"sources[{k}] does not have the target's batch-norm layers: "
                             f"missing {missing}, not in the target {extra}; merge models of "
                             "the same architecture")
        for name, layer in layers.items():
            shape, other = (held_statistics(m)[0].shape for m in (layer, source_layers[name]))
            if shape != other:
                raise ValueError(f"layer {name or '(model)'!r} has {tuple(shape)} features in "
                                 f"the target but {tuple(other)} in sources[{k}]: merge models "
                                 "of the same architecture")
    w = _weights(weights, len(sources))

    merged = {}
    for name, layer in layers.items():
        device = held_statistics(layer)[0].device
        dtype = accumulation_dtype(device)
        means, variances = (torch.stack([t.to(device=device, dtype=dtype) for t in ts])
                            for ts in zip(*(held_statistics(s[name]) for s in per_source),
                                          strict=True))
        count = torch.tensor(w, dtype=dtype, device=device).reshape(-1, *[1] * (means.ndim - 1))
        count = (count / count.max()).expand_as(means)  # ratios only; the largest is 1
        total, mean, m2 = merge_moments(count, means, variances * count)
        counters = [c for c in (_counter(s[name]) for s in per_source) if c is not None]
        updates = sum(c.to(device) for c in counters) if counters else 0
        merged[name] = (mean, m2 / total, updates)
    for name, (mean, variance, updates) in merged.items():  # every source read before writing
        set_statistics(layers[name], mean, variance, updates)
    return list(layers)
