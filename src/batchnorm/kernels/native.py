"""The plain training mode on ATen's fused batch-norm kernel (one pass for the statistics,
one for the output, and a fused backward)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import BatchNormState, BatchStatistics, values_per_feature


def train(x: Tensor, state: BatchNormState, axes: tuple[int, ...], *, gamma: Tensor | None,
          beta: Tensor | None, epsilon: float, **_unused) -> tuple[Tensor, BatchStatistics]:
    (axis,) = axes
    # ATen normalizes along dim 1; moving another axis there is a view (channels-last
    # layouts keep their fast path).
    xm = x if axis == 1 else x.movedim(axis, 1)
    if x.dtype in (torch.float16, torch.bfloat16):
        # ATen keeps its statistics in the parameters' dtype: float32 parameters make it
        # accumulate and return float32 statistics for half-precision inputs.
        features = xm.shape[1]
        gamma = torch.ones(features, device=x.device) if gamma is None else gamma.float()
        beta = torch.zeros(features, device=x.device) if beta is None else beta.float()
    y, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(
        xm, gamma, beta, True, 0.0, epsilon)
    # The kernel keeps 1 / sqrt(var + eps); the biased variance is recovered from it.
    variance = torch.clamp_min(invstd.detach().pow(-2) - epsilon, 0.0)
    count = values_per_feature(x, axes)
    y = y if axis == 1 else y.movedim(1, axis)
    return y, BatchStatistics(mean.detach().unsqueeze(0), variance.unsqueeze(0), count)
