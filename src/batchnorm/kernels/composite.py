"""Every training mode in plain torch operations.

The batch is viewed with an explicit group axis when it is split into ghost
batches; statistics reduce over every axis but the group and feature axes,
counting only the positions a mask selects; the renorm correction and the
adjustment are folded into one scale and one offset per feature, so the
output is a single ``normalize`` call:

    y = gamma * (adj_scale * (r * xhat + d) + adj_bias) + beta

which is the order tf_keras composes them in.

With a ``process_group`` (synchronized statistics) the local moments are
replaced by those of every process's batch together
(:func:`~batchnorm.kernels.synchronized.global_moments`); ghost batches are
never synchronized, so the kernel is not given a group for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..functional import (
    BatchNormState,
    BatchStatistics,
    broadcast,
    mask_shape,
    normalize,
    pooled_statistics,
    reduction_axes,
    renorm_correction,
    statistics_dtype,
)
from .synchronized import global_moments


def _group_view(x: Tensor, axes: tuple[int, ...], size: int | None, layout: str):
    """``x`` with a group axis for ghost batches: ``(view, kept axes)``.

    tf_keras reshapes ``(N, ...)`` to ``(size, N // size, ...)``, which puts
    sample ``n`` in group ``n % (N // size)`` ("strided"); the Ghost Batch
    Normalization paper's split takes consecutive samples, ``(N // size, size, ...)``.
    """
    if size is None:
        return x, axes
    groups = x.shape[0] // size
    if layout == "strided":
        view, group_axis = x.reshape(size, groups, *x.shape[1:]), 1
    else:
        view, group_axis = x.reshape(groups, size, *x.shape[1:]), 0
    return view, (group_axis, *(a + 1 for a in axes))


def _adjustment_term(t, x: Tensor, axes: tuple[int, ...], name: str) -> Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == x.ndim or t.numel() == 1:
        return t
    features = tuple(x.shape[a] for a in axes)
    if tuple(t.shape) != features:
        raise ValueError(
            f"adjustment returned a {name} of shape {tuple(t.shape)}: expected a scalar, the "
            f"feature shape {features}, or a tensor of the input's rank {x.ndim}")
    return broadcast(t, x, axes)


def train(
    x: Tensor,
    state: BatchNormState,
    axes: tuple[int, ...],
    *,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: float,
    renorm: bool,
    renorm_clipping: Mapping[str, float] | None,
    virtual_batch_size: int | None,
    ghost_layout: str,
    adjustment: Callable | None,
    mask: Tensor | None,
    process_group=None,
) -> tuple[Tensor, BatchStatistics]:
    view, kept = _group_view(x, axes, virtual_batch_size, ghost_layout)
    reduce = reduction_axes(view.ndim, kept)
    feature_axes = kept[-len(axes):]
    xs = view.to(statistics_dtype(x.dtype))
    group_shape = [view.shape[d] for d in kept]  # (groups?, *features)
    if virtual_batch_size is None:
        group_shape = [1, *group_shape]

    if mask is None:
        variance, mean = torch.var_mean(xs, dim=reduce, correction=0, keepdim=True)
        count: int | Tensor = xs.numel() // max(mean.numel(), 1)  # no ghost batch: 0
        if process_group is not None:
            mean, variance, count = global_moments(mean, variance, count, process_group)
            count = count.reshape(group_shape)
        stats = BatchStatistics(mean.reshape(group_shape), variance.reshape(group_shape), count)
    else:
        m = mask.reshape(mask_shape(mask, x, axes)).expand(x.shape).reshape(view.shape)
        weights = m.to(xs.dtype)
        count = weights.sum(dim=reduce, keepdim=True)
        # Dividing by at least 1 keeps empty groups finite (0), so that no NaN reaches
        # the gradient through the torch.where below; pooled_statistics skips them.
        safe = count.clamp_min(1)
        mean = (xs * weights).sum(dim=reduce, keepdim=True) / safe
        variance = ((xs - mean).square() * weights).sum(dim=reduce, keepdim=True) / safe
        if process_group is not None:
            mean, variance, count = global_moments(mean, variance, count, process_group)
        stats = BatchStatistics(mean.reshape(group_shape), variance.reshape(group_shape),
                                count.reshape(group_shape))
        # A group with no selected position is normalized with the moving statistics.
        empty = count == 0
        mean = torch.where(empty, broadcast(state.moving_mean, view, feature_axes), mean)
        variance = torch.where(
            empty, broadcast(state.moving_variance, view, feature_axes), variance)

    scale: Tensor | None = None
    offset: Tensor | None = None
    if renorm:
        r, d = renorm_correction(*pooled_statistics(stats), state, epsilon=epsilon,
                                 clipping=renorm_clipping)
        scale, offset = broadcast(r, view, feature_axes), broadcast(d, view, feature_axes)
    if adjustment is not None:
        adj_scale, adj_bias = adjustment(x.shape)
        adj_scale = _adjustment_term(adj_scale, x, axes, "scale")
        adj_bias = _adjustment_term(adj_bias, x, axes, "bias")
        scale = adj_scale if scale is None else scale * adj_scale
        offset = adj_bias if offset is None else offset * adj_scale + adj_bias
    g = broadcast(gamma, view, feature_axes)
    b = broadcast(beta, view, feature_axes)
    if g is not None:
        scale = g if scale is None else scale * g
        offset = None if offset is None else offset * g
    if b is not None:
        offset = b if offset is None else offset + b
    y = normalize(view, mean, variance, offset, scale, epsilon)
    return y.reshape(x.shape), stats
