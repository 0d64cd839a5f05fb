"""The plain training mode on ATen's fused batch-norm kernel (one pass for the statistics,
one for the output, and a fused backward); an ``activation`` is one more pass after it
(ReLU in place: ATen's backward does not read its output, so nothing more is kept)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import values_per_feature
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from .protocol import KernelCall, traced

__all__ = ["NATIVE", "NativeKernel"]


class NativeKernel:
    """ATen's ``native_batch_norm``: the plain mode with one feature axis, any device."""

    name = "native"

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        reason = call.config.unfused_reason(masked=call.mask is not None,
                                            synchronized=call.process_group is not None)
        return None if reason is None else reason.removeprefix("for ")

    def prefers_fallback(self, x: Tensor, call: KernelCall) -> bool:
        return False

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        (axis,) = call.axes
        gamma, beta, epsilon = call.gamma, call.beta, call.config.epsilon
        # ATen normalizes along dim 1; moving another axis there is a view (channels-last
        # layouts keep their fast path).
        xm = x if axis == 1 else x.movedim(axis, 1)
        features = xm.shape[1]
        dtype = statistics_dtype(x.dtype)
        if x.dtype in (torch.float16, torch.bfloat16):
            # ATen keeps its statistics in the parameters' dtype: float32 parameters make it
            # accumulate and return float32 statistics for half-precision inputs.
            if gamma is None:
                gamma = torch.ones(features, device=x.device)
            if beta is None:
                beta = torch.zeros(features, device=x.device)
        # Parameters of another dtype (a float64 layer, a float32 input) are cast, as on every
        # kernel: ATen refuses mixed dtypes ("mixed dtype (CPU)").
        if gamma is not None and gamma.dtype != dtype:
            gamma = gamma.to(dtype)
        if beta is not None and beta.dtype != dtype:
            beta = beta.to(dtype)
        count = values_per_feature(x, call.axes)
        if count > 1 and not traced(x):
            # ATen moves "running" statistics it is given by momentum * (batch statistic, the
            # unbiased variance) + (1 - momentum) * running. From zeros with momentum
            # (n - 1) / n that is the biased variance, written by the kernel itself.
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
        activation = call.config.activation
        if activation is not None:  # y is fresh: ReLU overwrites it (its backward reads y)
            y = activate(y, activation, inplace=activation == "relu")
        y = y if axis == 1 else y.movedim(1, axis)
        return y, BatchStatistics(mean, variance, count)


NATIVE = NativeKernel()
