"""The CPU fast path: every training mode with one feature axis, at memory bandwidth.

Batch normalization is memory-bound, so the kernel is organized around the
passes over memory: the forward pass reads ``x`` once for the statistics and
once more to write ``y``; the backward pass reads ``x`` and ``dy`` once for two
sums per channel and once more to write ``dx``. Everything between the passes
(group statistics, the renorm correction, gamma and beta) is folded into one
scale and one shift per (group, channel), so each pass is a single streaming
loop (:mod:`batchnorm.kernels.cpu_loops`, numba, parallel over rows or
channels; the views and passes are in :mod:`batchnorm.kernels.cpu_layout`).
Plain, renorm, ghost batches and masks share the same four loops.

Semantics are those of :mod:`batchnorm.kernels.composite`, which the tests
compare against: the same statistics (biased variance, ghost batch grouping,
masked counts, the moving statistics for a group a mask leaves empty), the
same renorm correction (computed by :func:`~batchnorm.statistics.renorm_correction`
itself), the same gradients (r and d without gradient). Statistics accumulate
in float64 from a per-channel shift, so they are at least as accurate as the
composite's float32 ``var_mean``. Double backward (``create_graph=True``)
recomputes through the composite path, so higher derivatives stay exact.

:meth:`CpuKernel.unsupported` says when the kernel does not apply (another device, a
dtype other than float32/float64/bfloat16, tracing by ``torch.compile`` or a
``torch.func`` transform, adjustment, several feature axes, numba missing);
the registry in :mod:`batchnorm.kernels` then uses the native or composite kernel.
"""


from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import BatchNormConfig
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import affine_terms, output_affine, pooled_statistics, renorm_correction
from . import composite, cpu_layout
from .cpu_layout import (
    DTYPES,
    IMPORT_ERROR,
    MIN_NUMEL,
    MIN_PLAIN_NUMEL,
    Layout,
    affine_pass,
    grad_input_pass,
    grad_sums_pass,
    mask_array,
    moments_pass,
)
from .protocol import KernelCall, traced

__all__ = ["CPU", "IMPORT_ERROR", "MIN_NUMEL", "MIN_PLAIN_NUMEL", "CpuKernel", "available",
           "warm_up"]


def available() -> bool:
    """True when numba imported and the kernels can run."""
    return cpu_layout.loops is not None


class CpuKernel:
    """Every training mode but adjustment, one feature axis, CPU tensors; numba loops."""

    name = "cpu"

    def prefers_fallback(self, x: Tensor, call: KernelCall) -> bool:
        """Whether the kernel ``fused=None`` falls back to (ATen's for the plain mode, else the
        composite) is the faster one for this input.

        Small inputs: their per-call cost is lower (below ``MIN_PLAIN_NUMEL`` values for
        ATen's kernel, ``MIN_NUMEL`` for the composite; see the benchmark's 32x64 rows).
        Plain channels-last and other layouts whose feature axis is innermost in memory:
        ATen's vectorized per-row kernel beats these loops (which sum such rows at about 60%
        of the bandwidth limit).
        """
        if call.mask is not None or call.process_group is not None or not call.config.plain:
            return x.numel() < MIN_NUMEL
        return x.numel() < MIN_PLAIN_NUMEL or (x.ndim > 1 and x.stride(call.axes[0]) == 1)

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        """Why this kernel does not handle the call, or None when it does."""
        if not available():
            return f"numba is unavailable ({IMPORT_ERROR})"
        if x.device.type != "cpu":
            return f"the input is on {x.device}"
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype}"
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
        if state is not None and (state.moving_mean.requires_grad
                                  or state.moving_variance.requires_grad):
            return "moving statistics that require grad"
        return None

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        """The training kernel (same results as the composite kernel's)."""
        config = call.config
        if config.adjustment is not None:
            raise ValueError("the CPU kernel has no adjustment; kernels.select never routes "
                             "it here")
        (axis,) = call.axes
        layout = Layout(x, axis, config.virtual_batch_size, config.ghost_layout)
        if config.renorm or call.mask is not None:
            # The state enters the output (r, d; an empty group's moving statistics) and the
            # layer updates it in place after this call: keep this call's values for a double
            # backward, which recomputes the output.
            state = state._replace(**{k: v.clone() for k, v in state._asdict().items()
                                      if isinstance(v, Tensor) and v.is_floating_point()})
        context = _Context(layout, axis, state, config, call.mask)
        y, mean, variance, count = _BatchNormFunction.apply(x, call.gamma, call.beta, context)
        return y, BatchStatistics(mean, variance, count)


@dataclass
class _Context:
    """Everything but the differentiable tensors, carried from forward to backward."""

    layout: Layout
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
    mask: object  # the mask array the loops read (empty without a mask)


class _BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None, o: _Context):
        layout, config = o.layout, o.config
        x3 = layout.view(x if layout.contiguous else x.contiguous())
        # The output first: allocated after the small temporaries, it would land above them
        # and fault in fresh pages on every call instead of reusing the last call's block.
        y3 = torch.empty_like(x3)
        w3 = mask_array(o.mask, x, o.axis, layout)
        shift, s, q, n = moments_pass(x3, layout, w3)
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
        if masked:  # a group with fewer than two selected values is normalized with the moving
            empty = n < 2  # statistics (composite: it has no variance)
            mean = torch.where(empty, o.state.moving_mean.to(torch.float64), mean)
            variance = torch.where(empty, o.state.moving_variance.to(torch.float64), variance)

        r = torch.ones(layout.channels, dtype=torch.float64)
        d = None
        if config.renorm:
            r, d = renorm_correction(*pooled_statistics(stats), o.state, epsilon=config.epsilon,
                                     clipping=config.clipping)
            r, d = r.to(torch.float64), d.to(torch.float64)
        g = None if gamma is None else gamma.detach().to(torch.float64)
        b = None if beta is None else beta.detach().to(torch.float64)
        scale, offset = output_affine(g, b, r, d)
        invstd = torch.rsqrt(variance + config.epsilon)  # (groups, C)
        a, shift_out = affine_terms(mean, invstd, scale, offset)
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y3 = affine_pass(x3, layout, a.to(cdtype).contiguous(),
                         shift_out.to(cdtype).contiguous(), y3)

        ctx.save_for_backward(x, gamma, beta)
        ctx.context = o
        ctx.saved = _Saved(mean, invstd, scale, r, d, n if masked else None, count, w3)
        ctx.mark_non_differentiable(*(t for t in stats if isinstance(t, Tensor)))
        return layout.unview(y3), stats.mean, stats.variance, stats.count

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
        s1, t = grad_sums_pass(x3, dy3, layout, saved.mean)  # sum dy, sum dy (x - mean)
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
            n = saved.selected
            safe = n.clamp_min(1.0) if n is not None else saved.count
            p = saved.invstd * saved.scale
            u = p * s1 / safe
            q = p * saved.invstd * s2 / safe
            cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            coeffs = [c.to(cdtype).contiguous()
                      for c in (saved.mean, p.expand_as(saved.mean), q, u)]
            dx = layout.unview(grad_input_pass(x3, dy3, layout, *coeffs, saved.mask, dx3))
        return dx, dgamma, dbeta, None


def _composite_grad(x, gamma, beta, dy, o: _Context, needs):
    wanted = list(zip((x, gamma, beta), needs[:3], strict=True))
    inputs = [t for t, need in wanted if need and t is not None]
    call = KernelCall(o.config, (o.axis,), gamma, beta, o.mask)
    y, _ = composite.COMPOSITE.train(x, o.state, call)
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None
                 for t, need in zip((x, gamma, beta), needs[:3], strict=True))


CPU = CpuKernel()


def warm_up() -> float:
    """Compile (or load from numba's on-disk cache) every loop; return the seconds it took."""
    start = time.perf_counter()
    for dtype in DTYPES:
        for shape, size in (((4, 3, 5), None), ((8, 3), None), ((4, 3, 5), 2)):
            x = torch.randn(shape).to(dtype).requires_grad_()
            state = BatchNormState(torch.zeros(3), torch.ones(3),
                                   torch.zeros((), dtype=torch.int64))
            config = BatchNormConfig(virtual_batch_size=size)
            for mask in (None, torch.ones(shape, dtype=torch.bool)):
                call = KernelCall(config, (1,), torch.ones(3, requires_grad=True),
                                  torch.zeros(3, requires_grad=True), mask)
                y, _ = CPU.train(x, state, call)
                y.sum().backward()
    return time.perf_counter() - start
