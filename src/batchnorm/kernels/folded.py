"""Renorm and adjustment at ATen's per-call cost: one statistics pass, the renorm
correction and the adjustment folded into one scale and offset per feature, ATen's inference
kernel for the output and ATen's fused backward.

Batch Renormalization's ``(r, d)`` and an adjustment's ``(scale, bias)`` are per feature, so
the output the composite kernel defines,
``y = gamma * (adj_scale * (r * xhat + d) + adj_bias) + beta``, is ``y = xhat * a + b`` with
``(c, e) = output_affine(None, None, r, d, adjustment)``, ``a = gamma * c`` and
``b = gamma * e + beta`` (:func:`batchnorm.statistics.output_affine`, one place for the
order). A statistics pass gives the batch's mean and biased variance: the device's pass for
small inputs where it has one that takes the input (:data:`batchnorm.kernels.protocol.
MOMENTS_PASSES`; on CPU one numba loop for contiguous float32, float64 and bfloat16 inputs,
which at 32x64x8x8 float32 takes 34 us where ATen's takes 250), else ATen's
(``batch_norm_update_stats``, float32 for half-precision inputs). ``(r, d)`` follow from
them and the renorm averages (:func:`batchnorm.statistics.prepare_renorm_correction`:
renorm_correction's arithmetic, on CPU one numba loop, before this call's update moves
them). Then one of three paths, by size (:data:`LOOPS_MAX_NUMEL`, :data:`NATIVE_MAX_NUMEL`):

- Up to 32K values with renorm, where the device has them (CPU, numba: a contiguous
  float32, float64 or bfloat16 input with its features at dim 1 or last, no activation),
  one loop forward and one backward in :class:`LoopsFunction`
  (:meth:`~batchnorm.kernels.protocol.MomentsPass.prepare_folded`): the statistics,
  ``(r, d)``, the folded terms and the output in one call (its square root is the
  correctly rounded one, so ``r`` may differ from :func:`~batchnorm.statistics.
  renorm_correction`'s by an ulp), and ATen's training backward's formula with
  ``dgamma = c * sum(dy * xhat) + e * sum(dy)``. Measured, 32x64 float32, one thread:
  forward 87 us against 125 on the next path, forward and backward 214 against 245.
- Up to 32K values (half-precision inputs at any size), ATen's training kernel given ``a``
  and ``b`` as its weight and bias (:meth:`FoldedCall.through_native`), which autograd
  differentiates: ATen's fused backward
  for the input (through the batch statistics, which the kernel computes again, to the
  same values) and for ``a`` and ``b``, then their products for gamma and beta. No
  autograd Function of ours, whose own cost would dominate a small call.
- Above, the composite's own output pass with these statistics, ``a`` and ``b``
  (:func:`batchnorm.kernels.inference.normalize_features`: ATen's inference kernel, one
  rounding to the input's dtype), in :class:`FoldedFunction`, whose backward is ATen's,
  given ``a`` as its weight: the input gradient, ``sum(dy * xhat)`` and ``sum(dy)``, from
  which, ``r``, ``d`` and the adjustment being constants (no gradient, as in tf_keras),
  ``dgamma = c * sum(dy * xhat) + e * sum(dy)`` and ``dbeta = sum(dy)``. A double backward
  (``create_graph=True``) differentiates the same output written in torch operations, with
  the same constants. (ATen's training kernel would compute the statistics a second time:
  at 32x64x8x8 NCHW float32 its forward takes 300 us, this path's 90.)

An adjustment whose terms are not per feature (they vary along another axis), or need a
gradient, leaves the call to the composite kernel with the terms already drawn.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import reduction_axes, values_per_feature
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import (
    PreparedUpdate,
    output_affine,
    prepare_renorm_correction,
    traced,
)
from .composite import adjustment_terms, train_adjusted
from .gradients import double_backward, gradient_bits
from .inference import normalize, normalize_features
from .native import (
    NativeCall,
    Workspace,
    aten_input,
    misread_by_cpu_backward,
    misreads_gradients,
)
from .protocol import MOMENTS_PASSES, Fallback, KernelCall, PreparedTraining

__all__ = ["FOLDED", "LOOPS_MAX_NUMEL", "NATIVE_MAX_NUMEL", "FoldedCall", "FoldedFunction",
           "FoldedKernel", "LoopsFunction"]


# Up to this many values a call runs ATen's training kernel on the folded terms (see the
# module's docstring; measured, one thread: 32x64x4x4 float32 the faster path, 32x64x8x8 the
# slower by 1.5x).
NATIVE_MAX_NUMEL = int(os.environ.get("BATCHNORM_FOLDED_NATIVE_MAX_NUMEL", 1 << 15))
# Up to this many values, where the device has them, its one loop forward and one backward
# (MomentsPass.prepare_folded) on the calling thread.
LOOPS_MAX_NUMEL = int(os.environ.get("BATCHNORM_FOLDED_LOOPS_MAX_NUMEL", 1 << 15))


class FoldedKernel(Fallback):
    """ATen's fused kernel for renorm (with clipping) and adjustment, one feature axis, any
    device: the fallback ``fused=None`` takes for them where the device's fast path steps
    aside (small inputs), in place of the composite kernel."""

    name = "folded"
    takes = frozenset({"renorm", "adjustment"})

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        config = call.config
        if not config.renorm and config.adjustment is None:
            return "the plain mode (no renorm or adjustment: ATen's kernel itself)"
        declined = self.declined_mode(call)
        if declined is not None:
            return declined
        if values_per_feature(x, call.axes) < 2:
            return "one value per feature"  # the composite's case, as for ATen's kernel
        if traced(x):
            return "tracing (torch.compile or torch.func)"
        if config.renorm and state is not None and any(
                t is not None and t.requires_grad for t in (state.renorm_mean,
                                                            state.renorm_stddev)):
            return "renorm statistics that require grad"
        return None

    def prepare(self, x: Tensor, state: BatchNormState, call: KernelCall,
                update: PreparedUpdate | None = None) -> PreparedTraining:
        """:class:`FoldedCall` for ``x``'s signature; where the update has a direct loop (CPU,
        a state without renorm), the statistics go straight into it."""
        return FoldedCall(x, state, call, update)


class FoldedCall:
    """The folded kernel for inputs like ``x``: ``call(x) -> (y, stats, applied)`` (see
    :meth:`~batchnorm.kernels.protocol.TrainingKernel.prepare`)."""

    __slots__ = ("state", "call", "axis", "features", "count", "statistics_dtype", "copy",
                 "hook", "workspace", "moments_pass", "renorm_correction", "direct", "native",
                 "loops")

    def __init__(self, x: Tensor, state: BatchNormState, call: KernelCall,
                 update: PreparedUpdate | None = None) -> None:
        self.state, self.call = state, call
        (self.axis,) = call.axes
        self.features, self.count = x.shape[self.axis], values_per_feature(x, call.axes)
        self.statistics_dtype = statistics_dtype(x.dtype)
        # ATen's backward reads x (features along dim 1) copied where it would misread the
        # gradients, and gradients of some strides copied (see kernels.native).
        xm = x if self.axis == 1 else x.movedim(self.axis, 1)
        xm_aten = aten_input(xm, call.gamma, call.beta)
        self.copy, self.hook = xm_aten is not xm, misreads_gradients(xm_aten)
        # Half-precision inputs: float32 "running" statistics make ATen's statistics pass
        # accumulate and return float32; it moves them by momentum 0 (never read).
        self.workspace = (Workspace(self.features, self.statistics_dtype, x.device)
                          if self.statistics_dtype != x.dtype else None)
        # The device's statistics pass for small inputs, where it has one (traced: ATen's),
        # and (r, d) from the statistics and the renorm averages, decided once (on CPU, one
        # numba loop each).
        self.moments_pass = None if traced(x) else MOMENTS_PASSES.get(x.device.type)
        self.renorm_correction = (prepare_renorm_correction(state, call.config,
                                                            self.statistics_dtype)
                                  if call.config.renorm else None)
        self.direct = None if update is None else update.direct
        # Small inputs: ATen's training kernel, without an autograd Function of ours.
        # Half-precision inputs at every size: ATen's training kernel keeps up (measured,
        # 32x64x8x8 bfloat16, one thread: adjustment forward 166 us on this path, 251 on the
        # other; renorm 307 and 290).
        self.native = (NativeCall(x, call) if x.numel() <= NATIVE_MAX_NUMEL
                       or x.dtype in (torch.float16, torch.bfloat16) else None)
        # Smaller still, with renorm: the device's one loop forward and one backward, where
        # it has them. (An adjustment alone has no statistics pass before ATen's kernel to
        # save: measured, 32x64 float32, one thread, forward 97 us on the loops against 82.)
        self.loops = (None if self.moments_pass is None or x.numel() > LOOPS_MAX_NUMEL
                      or not call.config.renorm
                      else self.moments_pass.prepare_folded(x, state, call))

    def __call__(self, x: Tensor) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
        call = self.call
        adjust = None
        if call.config.adjustment is not None:
            terms = adjustment_terms(x, call)
            assert terms is not None
            adjust = self.per_feature(x, terms)
            if adjust is None:
                y, stats = train_adjusted(x, self.state, call, terms)
                return y, stats, None
        loops = self.loops
        if loops is not None and loops.fits(adjust):
            y, mean, variance = LoopsFunction.apply(x, call.gamma, call.beta, self, adjust)
            return self.updated(y, mean, variance)
        if self.native is not None:
            return self.through_native(x, adjust)
        y, mean, variance = FoldedFunction.apply(self.aten_input(x), call.gamma, call.beta,
                                                 self, adjust)
        if self.axis != 1:
            y = y.movedim(1, self.axis)
        activation = call.config.activation
        if activation is not None:
            # y is fresh: ReLU overwrites it (the backward reads neither y nor its input).
            y = activate(y, activation, inplace=activation == "relu")
        return self.updated(y, mean, variance)

    def through_native(self, x: Tensor, adjust: tuple[Tensor, Tensor] | None
                       ) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
        """A small input's call (:data:`NATIVE_MAX_NUMEL`): ATen's training kernel given the
        folded terms ``(a, b)`` as its weight and bias, differentiated by autograd (ATen's
        fused backward, then ``a`` and ``b``'s products for gamma and beta); the
        statistics the update takes come out of the kernel's call, as for the plain mode."""
        call, native = self.call, self.native
        assert native is not None  # prepared for small inputs
        r = d = None
        if call.config.renorm:  # the statistics of x itself (ATen's call copies it if need be)
            mean, variance = self.moments(x if self.axis == 1 else x.movedim(self.axis, 1))
            assert self.renorm_correction is not None  # prepared for renorm
            r, d = self.renorm_correction(mean, variance)
        a, b = output_affine(call.gamma, call.beta, r, d, adjust)
        assert a is not None and b is not None  # renorm or an adjustment: both terms
        y, mean, variance = native(x, borrow=self.direct is not None, affine=(a, b))
        return self.updated(y, mean, variance)

    def updated(self, y: Tensor, mean: Tensor, variance: Tensor
                ) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
        """The call's result from its output and statistics (either path): the statistics
        straight into the prepared update's direct loop where there is one (``applied``,
        ``stats`` None when the batch entered the averages), else returned for the caller's
        update."""
        direct = self.direct
        if direct is None:
            return y, BatchStatistics(mean.detach()[None], variance[None], self.count), None
        if direct(mean, variance):
            return y, None, True
        # Skipped: the statistics (on ATen's path the variance is a borrowed workspace) are
        # copied for the report.
        return y, BatchStatistics(mean[None], variance.clone()[None], self.count), False

    def aten_input(self, x: Tensor) -> Tensor:
        """``x`` as ATen's kernels take it: the feature axis at dim 1, copied if need be."""
        xm = x if self.axis == 1 else x.movedim(self.axis, 1)
        return xm.contiguous() if self.copy else xm

    def moments(self, xm: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's mean and biased variance over ``xm`` (features at dim 1), 1-D in the
        statistics dtype: the device's statistics pass for small inputs where it takes
        ``xm``, else ATen's."""
        device = self.moments_pass
        moments = None if device is None else device.moments(xm.detach())
        if moments is not None:
            return moments
        workspace = self.workspace
        if workspace is None:
            mean, variance = torch.batch_norm_update_stats(xm, None, None, 0.0)
        else:
            mean, variance = torch.batch_norm_update_stats(xm, workspace.mean,
                                                           workspace.variance, 0.0)
        return mean, variance

    def per_feature(self, x: Tensor, terms: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor] | None:
        """The adjustment's terms as feature vectors (their dtype: the composite's promotions),
        or None where one varies along an axis other than the feature axis, or needs a
        gradient."""
        vectors = []
        for t in terms:
            shape = (1,) * (x.ndim - t.ndim) + tuple(t.shape)
            if t.requires_grad or any(n != 1 for d, n in enumerate(shape) if d != self.axis):
                return None
            vectors.append(t.reshape(shape[self.axis]).expand(self.features))
        return vectors[0], vectors[1]

    def correction(self, mean: Tensor, variance: Tensor,
                   adjust: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """``(c, e)``: the factor on ``xhat`` and the offset before gamma and beta, per
        feature (renorm's ``(r, d)`` composed with the adjustment's terms)."""
        config = self.call.config
        r = d = None
        if config.renorm:
            assert self.renorm_correction is not None  # prepared for renorm
            r, d = self.renorm_correction(mean, variance)
        c, e = output_affine(None, None, r, d, adjust)
        assert c is not None and e is not None  # renorm or an adjustment: both terms
        return c, e

    def differentiable(self, x: Tensor, gamma: Tensor | None, beta: Tensor | None,
                       c: Tensor, e: Tensor, axis: int = 1) -> Tensor:
        """The output on ``x`` (features along ``axis``) in torch operations (what a double
        backward differentiates), ``c`` and ``e`` constants."""
        variance, mean = torch.var_mean(x.to(self.statistics_dtype),
                                        dim=reduction_axes(x.ndim, (axis,)), correction=0)
        a, b = output_affine(gamma, beta, c, e)
        return normalize(x, mean, variance, b, a, self.call.config.epsilon, axis=axis)


class LoopsFunction(torch.autograd.Function):
    """``(y, mean, variance)`` of the folded kernel on a small ``x`` through the device's
    loops (:class:`~batchnorm.kernels.protocol.FoldedLoops`), the statistics without
    gradient. The loops read the gamma and beta of the call they were prepared for, the
    tensors given here (for autograd: a plan holds while they are the layer's)."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None, o: FoldedCall,
                adjust: tuple[Tensor, Tensor] | None):
        assert o.loops is not None  # prepared
        y, mean, variance, terms = o.loops.forward(x, adjust)
        ctx.save_for_backward(x, gamma, beta, mean, variance, terms)
        ctx.o = o
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy: Tensor, *_unused):
        x, gamma, beta, mean, variance, terms = ctx.saved_tensors
        o, needs = ctx.o, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate the torch operations
            c, e = terms[1], terms[2]
            dx, dgamma, dbeta = double_backward(
                lambda x, gamma, beta: o.differentiable(x, gamma, beta, c, e, axis=o.axis),
                (x, gamma, beta), needs, dy)
            return dx, dgamma, dbeta, None, None
        dx, dgamma, dbeta = o.loops.backward(x, dy, mean, variance, terms,
                                             gradient_bits(needs, gamma, beta))
        return dx, dgamma, dbeta, None, None


class FoldedFunction(torch.autograd.Function):
    """``(y, mean, variance)`` of the folded kernel on ``xm`` (:meth:`FoldedCall.aten_input`:
    features along dim 1), the statistics without gradient."""

    @staticmethod
    def forward(ctx, xm: Tensor, gamma: Tensor | None, beta: Tensor | None, o: FoldedCall,
                adjust: tuple[Tensor, Tensor] | None):
        mean, variance = o.moments(xm)
        c, e = o.correction(mean, variance, adjust)
        a, b = output_affine(None if gamma is None else gamma.detach(),
                             None if beta is None else beta.detach(), c, e)
        assert a is not None and b is not None
        a = a.to(o.statistics_dtype)
        epsilon = o.call.config.epsilon
        # The composite's output pass (ATen's inference kernel), x's dtype rounded once.
        y = normalize_features(xm, (1,), mean, variance, b, a, epsilon)
        ctx.save_for_backward(xm, gamma, beta, a, mean, variance, c, e)
        ctx.o = o
        ctx.mark_non_differentiable(mean, variance)
        return y, mean, variance

    @staticmethod
    def backward(ctx, dy: Tensor, *_unused):
        xm, gamma, beta, a, mean, variance, c, e = ctx.saved_tensors
        o, needs = ctx.o, ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: differentiate the torch operations
            return (*double_backward(
                lambda xm, gamma, beta: o.differentiable(xm, gamma, beta, c, e),
                (xm, gamma, beta), needs, dy), None, None)
        if o.hook and misread_by_cpu_backward(dy):
            dy = dy.contiguous()
        need_gamma = gamma is not None and needs[1]
        need_beta = beta is not None and needs[2]
        epsilon = o.call.config.epsilon
        dx, s2, s1 = torch.ops.aten.native_batch_norm_backward(
            dy, xm, a, None, None, mean, torch.rsqrt(variance + epsilon), True, epsilon,
            [needs[0], need_gamma, need_gamma or need_beta])
        dgamma = (c * s2 + e * s1).to(gamma.dtype) if need_gamma else None
        dbeta = s1.to(beta.dtype) if need_beta else None
        return dx, dgamma, dbeta, None, None


FOLDED = FoldedKernel()
