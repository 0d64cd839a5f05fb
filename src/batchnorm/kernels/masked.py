"""Masked statistics at a small call's cost: one loop forward and one backward.

With a mask, the statistics come from the positions it selects (``S``, ``n`` of them per
feature: the mask never varies along the feature axis) and every position is normalized:
``y = gamma * (x - mean_S) * s + beta`` with ``s = 1 / sqrt(var_S + epsilon)``. The
device's masked pass for contiguous inputs (:meth:`batchnorm.kernels.protocol.MomentsPass.
masked_forward`; on CPU one numba loop, reading the input as ``(rows, features, inner)``)
gives ``mean_S``, ``var_S``, ``n`` and ``y``: two passes for the statistics, values chosen
with a select, never multiplied by the mask (a NaN or Inf at a position it leaves out
reaches neither statistic), then one for the output. The gradient of a position ``j`` is

    dx_j = gamma * s * (dy_j - [j in S] / n * (A + xhat_j * B))

with ``A = sum(dy)`` (beta's gradient) and ``B = sum(dy * xhat)`` (gamma's) over every
position (the statistics depend on the selected ones only, the output on all of them):
the device's :meth:`~batchnorm.kernels.protocol.MomentsPass.masked_backward`, one loop
shared with the folded kernel (the correction chosen with a select where the mask
selects). A double backward (``create_graph=True``) differentiates the composite's torch
operations, with the same statistics.

Where the mask selects fewer than two positions, the composite computes the call (such a
batch is normalized with the moving statistics); renorm, ghost batches, an adjustment,
several feature axes, synchronized statistics and layouts other than a contiguous input
with the features at dim 1 or last take it too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import broadcast, mask_shape
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import PreparedUpdate, masked_moments, traced
from .composite import train_adjusted
from .gradients import double_backward, gradient_bits
from .inference import normalize
from .protocol import MOMENTS_PASSES, Fallback, KernelCall, PreparedTraining

__all__ = ["MASKED", "MaskedCall", "MaskedFunction", "MaskedKernel"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


class MaskedKernel(Fallback):
    """A masked call with one feature axis, at dim 1 or last of a contiguous input: the
    fallback ``fused=None`` takes for masks where the device's fast path steps aside (small
    inputs), in place of the composite kernel."""

    name = "masked"
    takes = frozenset({"mask"})

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        mask = call.mask
        if mask is None:
            return "unmasked inputs"
        declined = self.declined_mode(call)
        if declined is not None:
            return declined
        (axis,) = call.axes
        if x.dtype not in _DTYPES:
            return f"{x.dtype} inputs"
        if not x.is_contiguous() or axis not in (1, x.ndim - 1):
            return "a layout other than a contiguous input with the features at dim 1 or last"
        if mask_shape(mask, x, call.axes)[axis] != 1:
            return "a mask that varies along the feature axis"
        if traced(x):
            return "tracing (torch.compile or torch.func)"
        if MOMENTS_PASSES.get(x.device.type) is None:
            return f"{x.device.type} inputs (no masked statistics pass)"
        return None

    def prepare(self, x: Tensor, state: BatchNormState, call: KernelCall,
                update: PreparedUpdate | None = None) -> PreparedTraining:
        """:class:`MaskedCall` for ``x``'s signature and ``call``'s mask."""
        return MaskedCall(x, state, call)


class MaskedCall:
    """The masked kernel for inputs like ``x`` and ``call``'s mask: ``call(x) -> (y, stats,
    None)`` (the update left to the caller, see :meth:`~batchnorm.kernels.protocol.
    TrainingKernel.prepare`)."""

    __slots__ = ("state", "call", "axis", "shape", "features", "statistics_dtype")

    def __init__(self, x: Tensor, state: BatchNormState, call: KernelCall) -> None:
        self.state, self.call = state, call
        (self.axis,) = call.axes
        self.features = x.shape[self.axis]
        # The input read as (rows, features, inner), contiguous: inner 1 where the features
        # are last, else the positions of each feature within a sample.
        if self.axis == x.ndim - 1:
            self.shape = (x.numel() // max(self.features, 1), self.features, 1)
        else:
            rows = x.shape[0]
            self.shape = (rows, self.features, x.numel() // max(rows * self.features, 1))
        self.statistics_dtype = statistics_dtype(x.dtype)

    def __call__(self, x: Tensor) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
        call, axis = self.call, self.axis
        assert call.mask is not None  # unsupported() declines unmasked calls
        # The mask as x's shape with a size-1 feature axis, one byte per position.
        shape = mask_shape(call.mask, x, call.axes)
        selected = call.mask.reshape(shape).expand(
            [1 if d == axis else n for d, n in enumerate(x.shape)]).contiguous()
        out = MOMENTS_PASSES[x.device.type].masked_forward(
            x.detach(), self.shape, selected, call.gamma, call.beta, call.config.epsilon)
        if out is None or out[4] < 2:  # no pass; or normalized with moving statistics
            y, stats = train_adjusted(x, self.state, call, None)
            return y, stats, None
        y, mean, variance, counts, count = out
        y = MaskedFunction.apply(x, call.gamma, call.beta, (y, selected, mean, variance,
                                                            count), self)
        if call.config.activation is not None:
            y = activate(y, call.config.activation)
        return y, BatchStatistics(mean[None], variance[None], counts), None

    def differentiable(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None,
                       selected: Tensor) -> Tensor:
        """The output on ``x`` in the composite's torch operations, read as ``(rows,
        features, inner)`` (what a double backward differentiates)."""
        x3 = x.view(self.shape)
        mask = selected.view(self.shape[0], 1, self.shape[2]).expand(x3.shape)
        _, mean, variance = masked_moments(x3.to(self.statistics_dtype), mask, (0, 2))
        return normalize(x3, mean, variance, broadcast(beta, x3, (1,)),
                         broadcast(gamma, x3, (1,)), self.call.config.epsilon).view(x.shape)


class MaskedFunction(torch.autograd.Function):
    """``y`` of the masked kernel on ``x``, computed by the device's pass (``result``:
    ``(y, selected, mean, variance, count)``, see
    :meth:`~batchnorm.kernels.protocol.MomentsPass.masked_forward`)."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None,
                result: tuple[Tensor, Tensor, Tensor, Tensor, int], o: MaskedCall) -> Tensor:
        y, selected, mean, variance, count = result
        ctx.save_for_backward(x, gamma, beta, selected, mean, variance)
        ctx.count, ctx.o = count, o
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, gamma, beta, selected, mean, variance = ctx.saved_tensors
        o, needs = ctx.o, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate the torch operations
            dx, dgamma, dbeta = double_backward(
                lambda x, gamma, beta: o.differentiable(x, gamma, beta, selected),
                (x, gamma, beta), needs, dy)
        else:
            dx, dgamma, dbeta = MOMENTS_PASSES[x.device.type].masked_backward(
                x, o.shape, dy, selected, mean, variance, gamma, ctx.count,
                gradient_bits(needs, gamma, beta), o.call.config.epsilon)
        return dx, dgamma, dbeta, None, None


MASKED = MaskedKernel()
