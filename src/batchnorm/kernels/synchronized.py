"""Moments of the global batch across the processes of a ``torch.distributed`` group.

The composite kernel computes each process's moments and, when synchronized,
replaces them by those of the union of every process's values with
:func:`global_moments`: one packed ``all_gather`` of ``(count, mean, M2)`` per
feature in the forward pass, one packed ``all_reduce`` of the gradients of the
global mean and variance in the backward pass. Any backend works (gloo, nccl).

The combination is the parallel-variance formula (Chan, Golub and LeVeque),
numerically stable in the statistics' dtype, with no ``E[x^2] - E[x]^2``::

    N = sum n_i,   mean = sum n_i m_i / N,   M2 = sum M2_i + sum n_i (m_i - mean)^2

Its gradient, for the global statistics' summed upstream gradients ``G_mean`` and
``G_var`` (summed over processes: every process's loss depends on them)::

    dL/dm_i  = (G_mean + 2 G_var (m_i - mean)) n_i / N
    dL/dM2_i = G_var / N

from which autograd continues into each process's input through ``m_i`` and
``M2_i``: ``dL/dx = (G_mean + 2 G_var (x - mean)) / N`` per selected value,
which is the gradient of the sum of every process's loss.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["global_moments", "resolve_group"]

_warned_uninitialized = False


def resolve_group(process_group=None):
    """The group to synchronize over, or None (local statistics) when torch.distributed is not
    initialized; that case warns once per process."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD if process_group is None else process_group
    global _warned_uninitialized
    if not _warned_uninitialized:
        _warned_uninitialized = True
        warnings.warn(
            "BatchNorm(synchronized=True): torch.distributed is not initialized, so batch "
            "statistics are those of this process only; call "
            "torch.distributed.init_process_group() first to synchronize them (warned once)",
            RuntimeWarning, stacklevel=4)
    return None


def _collective(op, *args, group) -> None:
    try:
        op(*args, group=group)
    except RuntimeError as error:
        size = dist.get_world_size(group)
        raise RuntimeError(
            f"BatchNorm(synchronized=True): synchronizing statistics across the {size} "
            "processes of the group failed. A process may have died, or stopped calling this "
            "layer (every process must call it, in training mode, in the same order, and run "
            "backward through it). The wait is bounded by the group's timeout: "
            "init_process_group(timeout=...) or new_group(timeout=...). Cause: "
            f"{error}") from error


def _all_gather(packed: Tensor, group) -> Tensor:
    """Every process's ``packed``, stacked along a new leading axis: one collective."""
    size = dist.get_world_size(group)
    out = packed.new_empty((size * packed.shape[0], *packed.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _collective(gather, out, packed, group=group)
    return out.view(size, *packed.shape)


class _GlobalMoments(torch.autograd.Function):
    """(local mean, local M2) -> (global mean, global variance); counts carry no gradient."""

    @staticmethod
    def forward(ctx, mean: Tensor, m2: Tensor, count: Tensor, group):
        n, m, s = _all_gather(torch.stack([count, mean, m2]), group).unbind(1)
        total = n.sum(0)
        safe = total.clamp_min(1)  # no process has a value: 0, not NaN
        global_mean = (n * m).sum(0) / safe
        global_m2 = s.sum(0) + (n * (m - global_mean).square()).sum(0)
        ctx.save_for_backward(mean, count, global_mean, safe)
        ctx.group = group
        ctx.mark_non_differentiable(total)
        return global_mean, global_m2 / safe, total

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_variance: Tensor, _grad_count):
        mean, count, global_mean, safe = ctx.saved_tensors
        summed = torch.stack([grad_mean, grad_variance]).contiguous()
        _collective(dist.all_reduce, summed, group=ctx.group)
        g_mean, g_variance = summed.unbind(0)
        grad_local_mean = (g_mean + 2 * g_variance * (mean - global_mean)) * (count / safe)
        return grad_local_mean, g_variance / safe, None, None


def global_moments(
    mean: Tensor, variance: Tensor, count: int | Tensor, group
) -> tuple[Tensor, Tensor, Tensor]:
    """The mean, biased variance and count of every process's values together.

    Each process passes the moments of its own values (``count`` an int or a
    tensor broadcastable to ``mean``; with 0 values, mean and variance may be
    NaN) and receives the same global ones, differentiable with respect to its
    own ``mean`` and ``variance``. Every process of ``group`` must call it, and
    run backward through it if any does.

    Example (under ``torchrun --nproc_per_node=2``, process ``r`` holding ``x_r``)::

        variance, mean = torch.var_mean(x_r, dim=0, correction=0)
        mean, variance, count = global_moments(mean, variance, len(x_r), dist.group.WORLD)
        # the moments of torch.cat([x_0, x_1])
    """
    count = torch.as_tensor(count, dtype=mean.dtype, device=mean.device).expand_as(mean)
    empty = count == 0
    mean = torch.where(empty, 0.0, mean)
    m2 = torch.where(empty, 0.0, variance * count)
    return _GlobalMoments.apply(mean.contiguous(), m2.contiguous(), count.contiguous(), group)
