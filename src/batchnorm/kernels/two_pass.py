"""The autograd Function of the kernels built from four memory passes (CPU, Triton).

Batch normalization is memory-bound, so a fast kernel is organized around the
passes over memory: the forward pass reads ``x`` once for the statistics and once
more to write ``y``; the backward pass reads ``x`` and ``dy`` once for two sums per
channel and once more to write ``dx``. Everything between the passes (group
statistics, the renorm correction, gamma and beta) is folded into one scale and one
shift per (group, channel), in float64, so each pass is a single streaming loop.

A :class:`Passes` object supplies the four passes for one device (the numba loops of
:mod:`batchnorm.kernels.cpu`, the Triton kernels of :mod:`batchnorm.kernels.triton`);
:func:`train` strings them together. Semantics are those of
:mod:`batchnorm.kernels.composite`, which the tests compare against: the same
statistics (biased variance, ghost batch grouping, masked counts, the moving
statistics for a group a mask leaves empty), the same renorm correction, the same
gradients (r and d without gradient). Double backward (``create_graph=True``)
recomputes through the composite path, so higher derivatives stay exact.

An ``activation`` (``config.activation``) costs no pass of its own: the output pass
writes ``act(z)``, ``z = x * a + b``, and the backward passes take
``dz = dy * act'(z)`` with ``z`` recomputed from ``x`` (one multiply-add per value)
instead of reading a stored ``z``: what is saved for the backward stays ``x`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ..config import BatchNormConfig
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import (
    affine_terms,
    normalizing_statistics,
    output_affine,
    pooled_statistics,
    renorm_correction,
    traced,
)
from .composite import COMPOSITE
from .gradients import double_backward
from .protocol import KernelCall

__all__ = ["Context", "FusedActivation", "Passes", "TwoPassFunction", "train"]


class FusedActivation(NamedTuple):
    """The activation the backward passes differentiate through: its name and the output
    pass's coefficients ``(a, b)`` (``z = x * a + b`` per (group, channel), in the passes'
    compute dtype), from which they recompute ``z``."""

    name: str
    a: Tensor
    b: Tensor


class Passes(Protocol):
    """The four passes over an input viewed as a contiguous ``(outer, C, inner)`` tensor
    (see :class:`batchnorm.kernels.layout.Layout`), per (group, channel)."""

    def layout(self, x: Tensor, axis: int, config: BatchNormConfig) -> Any:
        """How ``x`` is walked: ``view``/``unview``, ``contiguous``, ``channels``,
        ``inner``, ``rows`` (group -> its rows)."""
        ...

    def mask(self, mask: Tensor | None, x: Tensor, axis: int, layout: Any) -> Any:
        """The mask in the form the passes read (``(outer, 1 or C, inner)``)."""
        ...

    def moments(self, x3: Tensor, layout: Any, w3: Any) -> tuple[Tensor, ...]:
        """float64 ``(shift, sum w (x - shift), sum w (x - shift)**2, sum w)``."""
        ...

    def affine(self, x3: Tensor, layout: Any, a: Tensor, b: Tensor, y3: Tensor,
               activation: str | None = None) -> Tensor:
        """``y3 = act(x3 * a + b)`` per (group, channel) (no ``act`` for None); returns
        ``y3``."""
        ...

    def grad_sums(self, x3: Tensor, dy3: Tensor, layout: Any, mean: Tensor,
                  activation: FusedActivation | None = None) -> tuple[Tensor, Tensor]:
        """float64 ``(sum dz, sum dz * (x - mean))``, ``dz = dy`` (or ``dy * act'(z)``)."""
        ...

    def grad_input(self, x3: Tensor, dy3: Tensor, layout: Any, m: Tensor, p: Tensor,
                   q: Tensor, u: Tensor, w3: Any, dx3: Tensor,
                   activation: FusedActivation | None = None) -> Tensor:
        """``dx3 = p * dz - w * (q * (x - m) + u)``, ``dz`` as in :meth:`grad_sums`;
        returns ``dx3``."""
        ...


def unsupported(x: Tensor, call: KernelCall) -> str | None:
    """Why no four-pass kernel (CPU or Triton) computes this call, whatever the device, or
    None: several feature axes, adjustment, synchronized statistics, an empty input, a
    tensor subclass, a non-strided layout, or tracing."""
    if len(call.axes) != 1:
        return "several feature axes"
    if call.config.adjustment is not None:
        return "adjustment"
    if call.process_group is not None:
        return "synchronized statistics"
    if x.numel() == 0:
        return "an empty input"
    if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter:
        return f"a tensor subclass ({type(x).__name__})"
    if x.layout != torch.strided:
        return f"layout {x.layout}"
    if traced(x):
        return "tracing (torch.compile or torch.func)"
    return None


def train(x: Tensor, state: BatchNormState, call: KernelCall,
          passes: Passes) -> tuple[Tensor, BatchStatistics]:
    """A training call computed by ``passes`` (the results of the composite kernel)."""
    config = call.config
    (axis,) = call.axes
    layout = passes.layout(x, axis, config)
    if config.renorm or call.mask is not None:
        # The state enters the output (r, d; an empty group's moving statistics) and the
        # layer updates it in place after this call: keep this call's values for a double
        # backward, which recomputes the output.
        state = state._replace(**{k: v.clone() for k, v in state._asdict().items()
                                  if isinstance(v, Tensor) and v.is_floating_point()})
    context = Context(passes, layout, axis, state, config, call.mask)
    y, mean, variance, count = TwoPassFunction.apply(x, call.gamma, call.beta, context)
    return y, BatchStatistics(mean, variance, count)


@dataclass
class Context:
    """Everything but the differentiable tensors, carried from forward to backward."""

    passes: Passes
    layout: Any
    axis: int
    state: BatchNormState
    config: BatchNormConfig
    mask: Tensor | None


@dataclass
class _Saved:
    """What the forward pass keeps for the backward pass, per (group, channel) in float64."""

    mean: Tensor  # the mean each group was normalized with
    invstd: Tensor  # 1 / sqrt(variance + epsilon)
    scale: Tensor  # the factor on xhat: r * gamma
    r: Tensor  # renorm's r (ones without renorm)
    d: Tensor | None  # renorm's d
    selected: Tensor | None  # masked: the selected count per (group, channel)
    count: Tensor | int  # the values behind each statistic
    mask: Any  # the mask as the passes read it
    activation: FusedActivation | None = None  # the output's activation, if any


class TwoPassFunction(torch.autograd.Function):
    """The forward and backward of every mode from the four passes of a :class:`Passes`."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None, o: Context):
        layout, config = o.layout, o.config
        x3 = layout.view(x if layout.contiguous else x.contiguous())
        # The output first: allocated after the small temporaries, it would land above them
        # and fault in fresh pages on every call instead of reusing the last call's block.
        # It is returned as allocated (not as a view of ``y3``): autograd refuses in-place
        # changes (``relu_``, ``+=``) to a view a Function made itself.
        y = layout.empty(x)
        y3 = layout.view(y)
        passes = o.passes
        w3 = passes.mask(o.mask, x, o.axis, layout)
        shift, s, q, n = passes.moments(x3, layout, w3)
        masked = o.mask is not None
        count = n if masked else layout.rows.shape[1] * layout.inner
        safe = n.clamp_min(1.0) if masked else count
        mean = shift + s / safe
        variance = (q / safe - (s / safe).square()).clamp_min(0.0)
        if masked:  # composite: an empty group has statistics 0 (and is left out when pooled)
            mean = torch.where(n > 0, mean, 0.0)
        sdtype = statistics_dtype(x.dtype)
        stats = BatchStatistics(mean.to(sdtype), variance.to(sdtype),
                                count.to(sdtype) if masked else count)
        if masked:
            mean, variance = normalizing_statistics(
                mean, variance, n, o.state.moving_mean.to(torch.float64),
                o.state.moving_variance.to(torch.float64))

        r = torch.ones(layout.channels, dtype=torch.float64, device=x.device)
        d = None
        if config.renorm:
            r, d = renorm_correction(*pooled_statistics(stats), o.state, epsilon=config.epsilon,
                                     clipping=config.clipping)
            r, d = r.to(torch.float64), d.to(torch.float64)
        g = None if gamma is None else gamma.detach().to(torch.float64)
        b = None if beta is None else beta.detach().to(torch.float64)
        scale, offset = output_affine(g, b, r, d)
        assert scale is not None  # r is a tensor, so the scale is one (at least r)
        invstd = torch.rsqrt(variance + config.epsilon)  # (groups, C)
        a, shift_out = affine_terms(mean, invstd, scale, offset)
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        a, shift_out = a.to(cdtype).contiguous(), shift_out.to(cdtype).contiguous()
        passes.affine(x3, layout, a, shift_out, y3, config.activation)
        activation = (None if config.activation is None
                      else FusedActivation(config.activation, a, shift_out))

        ctx.save_for_backward(x, gamma, beta)
        ctx.context = o
        ctx.saved = _Saved(mean, invstd, scale, r, d, n if masked else None, count, w3,
                           activation)
        ctx.mark_non_differentiable(*(t for t in stats if isinstance(t, Tensor)))
        return y, stats.mean, stats.variance, stats.count

    @staticmethod
    def backward(ctx, dy: Tensor, *_unused):
        x, gamma, beta = ctx.saved_tensors
        o = ctx.context
        if torch.is_grad_enabled():  # create_graph: differentiate the composite path instead
            return (*_composite_grad(x, gamma, beta, dy, o, ctx.needs_input_grad), None)
        layout, saved = o.layout, ctx.saved
        x3 = layout.view(x if layout.contiguous else x.contiguous())
        dy3 = layout.view(dy.to(x.dtype))
        dx3 = torch.empty_like(x3) if ctx.needs_input_grad[0] else None
        activation = saved.activation
        if activation is None:
            s1, t = o.passes.grad_sums(x3, dy3, layout, saved.mean)  # sum dy, sum dy (x - mean)
        else:  # the same sums of dz = dy * act'(x * a + b)
            s1, t = o.passes.grad_sums(x3, dy3, layout, saved.mean, activation)
        s2 = t * saved.invstd  # sum dy xhat
        r, d = saved.r, saved.d
        dgamma = dbeta = None
        if gamma is not None and ctx.needs_input_grad[1]:
            dgamma = (r * s2).sum(0) if d is None else (r * s2 + d * s1).sum(0)
            dgamma = dgamma.to(gamma.dtype)
        if beta is not None and ctx.needs_input_grad[2]:
            dbeta = s1.sum(0).to(beta.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            # 1 / count behind each group's statistics; 0 for a group a mask leaves fewer than
            # two values, normalized with the moving statistics: constants, so no term from
            # the batch statistics reaches its gradient (dx = p * dy there).
            n = saved.selected
            per_value = (1.0 / saved.count if n is None
                         else torch.where(n < 2, 0.0, n.clamp_min(1.0).reciprocal()))
            p = saved.invstd * saved.scale
            u = p * s1 * per_value
            q = p * saved.invstd * s2 * per_value
            cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            coeffs = [c.to(cdtype).contiguous()
                      for c in (saved.mean, p.expand_as(saved.mean), q, u)]
            if activation is None:
                dx3 = o.passes.grad_input(x3, dy3, layout, *coeffs, saved.mask, dx3)
            else:
                dx3 = o.passes.grad_input(x3, dy3, layout, *coeffs, saved.mask, dx3, activation)
            dx = layout.unview(dx3)
        return dx, dgamma, dbeta, None


def _composite_grad(x, gamma, beta, dy, o: Context, needs):
    return double_backward(
        lambda x, gamma, beta: COMPOSITE.train(
            x, o.state, KernelCall(o.config, (o.axis,), gamma, beta, o.mask))[0],
        (x, gamma, beta), needs[:3], dy)
