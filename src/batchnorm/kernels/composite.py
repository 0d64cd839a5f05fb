"""Every training mode in plain torch operations.

The batch is viewed with an explicit group axis when it is split into ghost
batches; statistics reduce over every axis but the group and feature axes,
counting only the positions a mask selects; the renorm correction and the
adjustment are folded into one scale and one offset per feature, so the
output is a single ``normalize`` call:

    y = gamma * (adj_scale * (r * xhat + d) + adj_bias) + beta

which is the order tf_keras composes them in. An ``activation`` is applied to that
output by torch's own operation (:func:`batchnorm.activations.apply`): the definition
the fused kernels, which apply it inside their passes, are tested against.

With a ``process_group`` (synchronized statistics) the local moments are
replaced by those of every process's batch together
(:func:`~batchnorm.kernels.synchronized.global_moments`); ghost batches are
never synchronized, so the kernel is not given a group for them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import broadcast, mask_shape, reduction_axes
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import (
    kept_for_backward,
    masked_moments,
    normalizing_statistics,
    output_affine,
    pooled_statistics,
    renorm_correction,
)
from .inference import normalize
from .protocol import KernelCall, TrainingKernel, Unprepared
from .synchronized import global_moments

__all__ = ["COMPOSITE", "CompositeKernel", "adjustment_terms", "train_adjusted"]


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


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether NumPy's rules broadcast ``shape`` to ``target`` itself (aligned on the last
    axis), decided from the sizes: torch.compile traces this, not a caught exception."""
    return len(shape) <= len(target) and all(
        n in (1, m) for n, m in zip(reversed(shape), reversed(target), strict=False))


def _adjustment_term(t, x: Tensor, axes: tuple[int, ...], name: str) -> Tensor:
    """An adjustment's scale or bias, broadcast against ``x`` as TensorFlow broadcasts it: by
    NumPy's rules (aligned on the last axis), so ``(C, 1, 1)`` for ``axis=1`` of a rank-4
    input. A feature-shaped result that does not broadcast so (``(C,)`` for ``axis=1`` of
    ``(N, C, L)`` with ``L != C``) is taken along the feature axes, a convenience TensorFlow
    does not have; where both would apply (``L == C``), NumPy's rule wins, as in TensorFlow."""
    t = torch.as_tensor(t, device=x.device)
    if _broadcasts_to(t.shape, x.shape):
        return t
    features = tuple(x.shape[a] for a in axes)
    if tuple(t.shape) != features:
        raise ValueError(
            f"adjustment returned a {name} of shape {tuple(t.shape)}, which does not broadcast "
            f"against the input of shape {tuple(x.shape)} by NumPy's rules (as TensorFlow "
            f"broadcasts it) and is not the feature shape {features}: return e.g. shape "
            f"{tuple(n if d in axes else 1 for d, n in enumerate(x.shape))} or a scalar")
    return broadcast(t, x, axes)


def adjustment_terms(x: Tensor, call: KernelCall) -> tuple[Tensor, Tensor] | None:
    """This call's ``adjustment(x.shape)``, its ``(scale, bias)`` broadcast against ``x`` as
    TensorFlow broadcasts them (a ``ValueError`` where they do not); None without one."""
    if call.config.adjustment is None:
        return None
    adj_scale, adj_bias = call.config.adjustment(x.shape)
    return (_adjustment_term(adj_scale, x, call.axes, "scale"),
            _adjustment_term(adj_bias, x, call.axes, "bias"))


class CompositeKernel(Unprepared):
    """Every mode, every device, several feature axes; what the other kernels are tested
    against."""

    name = "composite"

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        return None

    def prefers_fallback(self, x: Tensor, call: KernelCall, fallback: TrainingKernel) -> bool:
        return False

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        return train_adjusted(x, state, call, adjustment_terms(x, call))


def train_adjusted(x: Tensor, state: BatchNormState, call: KernelCall,
                   adjust: tuple[Tensor, Tensor] | None) -> tuple[Tensor, BatchStatistics]:
    """The composite kernel's training call with the adjustment's terms already drawn
    (:func:`adjustment_terms`): for a kernel that drew them and then found it cannot use
    them (the adjustment is called once per call)."""
    config, axes, mask, process_group = call.config, call.axes, call.mask, call.process_group
    virtual_batch_size = config.virtual_batch_size
    view, kept = _group_view(x, axes, virtual_batch_size, config.ghost_layout)
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
            mean, variance, count = global_moments(mean, variance, count, process_group,
                                                   mode="renorm" if config.renorm else "")
            count = count.reshape(group_shape)
        stats = BatchStatistics(mean.reshape(group_shape), variance.reshape(group_shape), count)
    else:
        m = mask.reshape(mask_shape(mask, x, axes)).expand(x.shape).reshape(view.shape)
        count, mean, variance = masked_moments(xs, m, reduce)
        if process_group is not None:
            mean, variance, count = global_moments(mean, variance, count, process_group,
                                                   mode="renorm" if config.renorm else "")
        stats = BatchStatistics(mean.reshape(group_shape), variance.reshape(group_shape),
                                count.reshape(group_shape))
        moving_mean, moving_variance = kept_for_backward(state.moving_mean,
                                                         state.moving_variance)
        mean, variance = normalizing_statistics(
            mean, variance, count, broadcast(moving_mean, view, feature_axes),
            broadcast(moving_variance, view, feature_axes))

    r = d = None
    if config.renorm:
        r, d = renorm_correction(*pooled_statistics(stats), state, epsilon=config.epsilon,
                                 clipping=config.clipping)
        r, d = broadcast(r, view, feature_axes), broadcast(d, view, feature_axes)
    scale, offset = output_affine(broadcast(call.gamma, view, feature_axes),
                                  broadcast(call.beta, view, feature_axes), r, d, adjust)
    y = normalize(view, mean, variance, offset, scale, config.epsilon).reshape(x.shape)
    if config.activation is not None:
        y = activate(y, config.activation)
    return y, stats


COMPOSITE = CompositeKernel()
