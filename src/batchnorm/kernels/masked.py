"""Masked statistics at a small call's cost: one statistics loop, ATen's inference kernel for
the output and ATen's fused backward corrected for the mask.

With a mask, the statistics come from the positions it selects (``S``, ``n`` of them per
feature: the mask never varies along the feature axis) and every position is normalized:
``y = gamma * (x - mean_S) * s + beta`` with ``s = 1 / sqrt(var_S + epsilon)``. The
device's masked statistics pass for contiguous inputs (:data:`batchnorm.kernels.protocol.
MOMENTS_PASSES`; on CPU one numba loop) gives ``mean_S``, ``var_S`` and ``n``; ATen's
inference kernel, given them as its running statistics, writes ``y`` (the composite's own
output pass, :func:`batchnorm.kernels.inference.normalize_features`). The gradient of a
position ``j`` is

    dx_j = gamma * s * (dy_j - [j in S] / n * (A + xhat_j * B))

with ``A = sum(dy)`` and ``B = sum(dy * xhat)`` over every position (the statistics depend
on the selected ones only, the output on all of them): ATen's backward in inference mode
gives ``gamma * s * dy``, ``B`` (gamma's gradient) and ``A`` (beta's), and the rest is one
affine term per feature, ``k0 + k1 * x_j``, subtracted where the mask selects (zeroed
elsewhere with ``masked_fill_``, never multiplied by the mask: a NaN at a position it
leaves out stays there). A double backward (``create_graph=True``) differentiates the
composite's torch operations, with the same statistics.

Where the mask selects fewer than two positions, the composite computes the call (such a
batch is normalized with the moving statistics); renorm, ghost batches, an adjustment,
several feature axes, synchronized statistics and layouts other than a contiguous input
with the features at dim 1 or last take it too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import broadcast, mask_shape, reduction_axes
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import PreparedUpdate, masked_moments, traced
from .composite import train_adjusted
from .inference import normalize, normalize_features
from .native import misread_by_cpu_backward, misreads_gradients
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
        if misread_by_cpu_backward(x if axis == 1 else x.movedim(axis, 1)):
            return "strides ATen's backward misreads (size-1 dimensions)"
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

    __slots__ = ("state", "call", "axis", "rows", "inner", "features", "statistics_dtype",
                 "hook")

    def __init__(self, x: Tensor, state: BatchNormState, call: KernelCall) -> None:
        self.state, self.call = state, call
        (self.axis,) = call.axes
        self.features = x.shape[self.axis]
        # The input as (rows, features, inner), contiguous: inner 1 where the features are
        # last, else the positions of each feature within a sample.
        if self.axis == x.ndim - 1:
            self.rows, self.inner = x.numel() // max(self.features, 1), 1
        else:
            self.rows = x.shape[0]
            self.inner = x.numel() // max(self.rows * self.features, 1)
        self.statistics_dtype = statistics_dtype(x.dtype)
        # Upstream gradients of some strides are misread by ATen's backward for inputs of
        # this shape (a size-1 dimension): copied in the backward where they are.
        self.hook = misreads_gradients(x if self.axis == 1 else x.movedim(self.axis, 1))

    def __call__(self, x: Tensor) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
        call, axis = self.call, self.axis
        assert call.mask is not None  # unsupported() declines unmasked calls
        # The mask as x's shape with a size-1 feature axis, one byte per position.
        shape = mask_shape(call.mask, x, call.axes)
        selected = call.mask.reshape(shape).expand(
            [1 if d == axis else n for d, n in enumerate(x.shape)]).contiguous()
        device = MOMENTS_PASSES[x.device.type]
        moments = device.masked_moments(x.detach().view(self.rows, self.features, self.inner),
                                        selected)
        if moments is None or moments[2] < 2:  # no pass; or normalized with moving statistics
            y, stats = train_adjusted(x, self.state, call, None)
            return y, stats, None
        mean, variance, count = moments
        xm = x if axis == 1 else x.movedim(axis, 1)
        mask = selected if axis == 1 else selected.movedim(axis, 1)
        y = MaskedFunction.apply(xm, call.gamma, call.beta, mask, mean, variance, count, self)
        if axis != 1:
            y = y.movedim(1, axis)
        if call.config.activation is not None:
            y = activate(y, call.config.activation)
        counts = torch.full((1, self.features), count, dtype=self.statistics_dtype,
                            device=x.device)
        return y, BatchStatistics(mean[None], variance[None], counts), None

    def differentiable(self, xm: Tensor, gamma: Tensor | None, beta: Tensor | None,
                       mask: Tensor) -> Tensor:
        """The output on ``xm`` (features at dim 1) in the composite's torch operations
        (what a double backward differentiates)."""
        dims = reduction_axes(xm.ndim, (1,))
        _, mean, variance = masked_moments(xm.to(self.statistics_dtype), mask.expand(xm.shape),
                                           dims)
        return normalize(xm, mean, variance, broadcast(beta, xm, (1,)),
                         broadcast(gamma, xm, (1,)), self.call.config.epsilon)


class MaskedFunction(torch.autograd.Function):
    """``y`` of the masked kernel on ``xm`` (features along dim 1), from the mask's
    statistics ``mean`` and ``variance`` of ``count`` positions per feature."""

    @staticmethod
    def forward(ctx, xm: Tensor, gamma: Tensor | None, beta: Tensor | None, mask: Tensor,
                mean: Tensor, variance: Tensor, count: int, o: MaskedCall) -> Tensor:
        y = normalize_features(xm, (1,), mean, variance,
                               None if beta is None else beta.detach(),
                               None if gamma is None else gamma.detach(),
                               o.call.config.epsilon)
        ctx.save_for_backward(xm, gamma, beta, mask, mean, variance)
        ctx.count, ctx.o = count, o
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        xm, gamma, beta, mask, mean, variance = ctx.saved_tensors
        o, needs = ctx.o, ctx.needs_input_grad[:3]
        none = (None,) * 5
        if torch.is_grad_enabled():  # create_graph: differentiate the torch operations
            wanted = [t for t, need in zip((xm, gamma, beta), needs, strict=True)
                      if need and t is not None]
            with torch.enable_grad():
                y = o.differentiable(xm, gamma, beta, mask)
            grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True))
            return (*(next(grads) if need and t is not None else None
                      for t, need in zip((xm, gamma, beta), needs, strict=True)), *none)
        if o.hook and misread_by_cpu_backward(dy):
            dy = dy.contiguous()  # strides ATen's backward would misread (see kernels.native)
        epsilon = o.call.config.epsilon
        weight = None if gamma is None else gamma.detach().to(mean.dtype)
        # Inference mode: dx = gamma * s * dy; B = sum(dy * xhat), A = sum(dy).
        direct, b_sum, a_sum = torch.ops.aten.native_batch_norm_backward(
            dy, xm, weight, mean, variance, None, None, False, epsilon,
            [needs[0], True, True])
        dx = None
        if needs[0]:
            s = torch.rsqrt(variance + epsilon)
            gs = s if weight is None else weight * s
            k1 = gs * s * b_sum / ctx.count
            k0 = (gs * (a_sum - s * b_sum * mean) / ctx.count)
            shape = (1, -1) + (1,) * (xm.ndim - 2)
            term = torch.addcmul(k0.view(shape), xm, k1.view(shape))
            # direct is ATen's fresh output: corrected in place, in x's dtype.
            dx = direct.sub_(term.masked_fill_(mask.logical_not(), 0))
        dgamma = b_sum.to(gamma.dtype) if gamma is not None and needs[1] else None
        dbeta = a_sum.to(beta.dtype) if beta is not None and needs[2] else None
        return (dx, dgamma, dbeta, *none)


MASKED = MaskedKernel()
