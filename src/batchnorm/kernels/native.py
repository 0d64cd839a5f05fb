"""The plain training mode on ATen's fused batch-norm kernel (one pass for the statistics,
one for the output, and a fused backward)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import BatchNormState, BatchStatistics, statistics_dtype, values_per_feature


def train(x: Tensor, state: BatchNormState, axes: tuple[int, ...], *, gamma: Tensor | None,
          beta: Tensor | None, epsilon: float, **_unused) -> tuple[Tensor, BatchStatistics]:
    (axis,) = axes
    # ATen normalizes along dim 1; moving another axis there is a view (channels-last
    # layouts keep their fast path).
    xm = x if axis == 1 else x.movedim(axis, 1)
    features = xm.shape[1]
    if x.dtype in (torch.float16, torch.bfloat16):
        # ATen keeps its statistics in the parameters' dtype: float32 parameters make it
        # accumulate and return float32 statistics for half-precision inputs.
        gamma = torch.ones(features, device=x.device) if gamma is None else gamma.float()
        beta = torch.zeros(features, device=x.device) if beta is None else beta.float()
    count = values_per_feature(x, axes)
    if count > 1 and not traced(x):
        # ATen moves "running" statistics it is given by momentum * (batch statistic, the
        # unbiased variance) + (1 - momentum) * running. From zeros with momentum
        # (n - 1) / n that is the biased variance, written by the kernel itself.
        dtype = statistics_dtype(x.dtype)
        unused = torch.zeros(features, dtype=dtype, device=x.device)
        variance = torch.zeros(1, features, dtype=dtype, device=x.device)
        y, mean, _ = torch.ops.aten.native_batch_norm(
            xm, gamma, beta, unused, variance[0], True, (count - 1) / count, epsilon)
        mean = mean.detach()[None]
    else:  # traced: torch.func transforms cannot write into the unbatched tensor above
        y, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(
            xm, gamma, beta, True, 0.0, epsilon)
        # The kernel keeps 1 / sqrt(var + eps); the biased variance is recovered from it.
        variance = invstd.detach().pow(-2).sub_(epsilon).clamp_min_(0.0)
        mean, variance = mean.detach()[None], variance[None]
    y = y if axis == 1 else y.movedim(1, axis)
    return y, BatchStatistics(mean, variance, count)


def traced(x: Tensor) -> bool:
    """Whether ``x`` is being traced: by ``torch.compile``, or inside a ``torch.func``
    transform (``vmap``, ``grad``)."""
    if torch.compiler.is_compiling():
        return True
    functorch = getattr(torch._C, "_functorch", None)
    return functorch is not None and functorch.is_functorch_wrapped_tensor(x)
