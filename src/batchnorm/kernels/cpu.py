"""The CPU fast path: every training mode with one feature axis, at memory bandwidth.

Batch normalization is memory-bound, so the kernel is organized around the
passes over memory: the forward pass reads ``x`` once for the statistics and
once more to write ``y``; the backward pass reads ``x`` and ``dy`` once for two
sums per channel and once more to write ``dx``. Everything between the passes
(group statistics, the renorm correction, gamma and beta) is folded into one
scale and one shift per (group, channel), so each pass is a single streaming
loop (:mod:`batchnorm.kernels.cpu_loops`, numba, parallel over rows or
channels). Plain, renorm, ghost batches and masks share the same four loops.

Semantics are those of :mod:`batchnorm.kernels.composite`, which the tests
compare against: the same statistics (biased variance, ghost batch grouping,
masked counts, the moving statistics for a group a mask leaves empty), the
same renorm correction (computed by :func:`~batchnorm.functional.renorm_correction`
itself), the same gradients (r and d without gradient). Statistics accumulate
in float64 from a per-channel shift, so they are at least as accurate as the
composite's float32 ``var_mean``. Double backward (``create_graph=True``)
recomputes through the composite path, so higher derivatives stay exact.

:func:`unsupported` says when the kernel does not apply (another device, a
dtype other than float32/float64/bfloat16, tracing by ``torch.compile`` or a
``torch.func`` transform, adjustment, several feature axes, numba missing);
the dispatcher in :mod:`batchnorm.kernels` then uses the native or composite kernel.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from functools import lru_cache

import torch
from torch import Tensor

from ..functional import (
    BatchNormState,
    BatchStatistics,
    mask_shape,
    pooled_statistics,
    renorm_correction,
    statistics_dtype,
)
from .native import traced

try:  # numba is a dependency, but a missing or broken install must not break the library
    from . import cpu_loops as loops
except Exception as error:  # pragma: no cover - depends on the environment
    loops = None
    IMPORT_ERROR: Exception | None = error
else:
    IMPORT_ERROR = None

__all__ = ["MIN_NUMEL", "MIN_PLAIN_NUMEL", "affine", "available", "prefers_fallback", "train",
           "unsupported", "warm_up"]

# Below this many elements fused=None takes the fallback (``prefers_fallback``): ATen's
# kernel for the plain mode, the composite for the others. Their per-call cost is lower
# than that of the numba launches and the glue around them, and the data is in cache
# anyway. BATCHNORM_CPU_MIN_NUMEL sets both (0: the fast path for every input).
MIN_PLAIN_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 16))
MIN_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 15))
# Passes over fewer elements run on the calling thread: waking the pool costs more than
# it saves, and on a loaded machine a parallel region waits for its slowest thread.
PARALLEL_MIN_NUMEL = int(os.environ.get("BATCHNORM_CPU_PARALLEL_MIN_NUMEL", 1 << 17))
_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def prefers_fallback(x: Tensor, axes: tuple[int, ...], *, plain: bool) -> bool:
    """Whether the kernel ``fused=None`` falls back to (ATen's for the plain mode, else the
    composite) is the faster one for this input.

    Small inputs: their per-call cost is lower (below ``MIN_PLAIN_NUMEL`` values for
    ATen's kernel, ``MIN_NUMEL`` for the composite; see the benchmark's 32x64 rows).
    Plain channels-last and other layouts whose feature axis is innermost in memory:
    ATen's vectorized per-row kernel beats these loops (which sum such rows at about 60%
    of the bandwidth limit).
    """
    if not plain:
        return x.numel() < MIN_NUMEL
    return x.numel() < MIN_PLAIN_NUMEL or (x.ndim > 1 and x.stride(axes[0]) == 1)


def available() -> bool:
    """True when numba imported and the kernels can run."""
    return loops is not None


def unsupported(x: Tensor, *, axes: tuple[int, ...], adjustment: Callable | None,
                state: BatchNormState | None = None, **_options) -> str | None:
    """Why this kernel does not handle the call, or None when it does."""
    if loops is None:
        return f"numba is unavailable ({IMPORT_ERROR})"
    if x.device.type != "cpu":
        return f"the input is on {x.device}"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype}"
    if len(axes) != 1:
        return "several feature axes"
    if adjustment is not None:
        return "adjustment"
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


# ---------------------------------------------------------------- layout


def _threads() -> int:
    import numba

    return numba.get_num_threads()


class _serial_if_small:
    """Run the enclosed loops on one thread when the pass touches few elements."""

    def __init__(self, numel: int):
        self.small = numel < PARALLEL_MIN_NUMEL

    def __enter__(self):
        if self.small:
            import numba

            self.threads = numba.get_num_threads()
            numba.set_num_threads(1)

    def __exit__(self, *exc):
        if self.small:
            import numba

            numba.set_num_threads(self.threads)


class _Layout:
    """How ``x`` is walked: its memory order, the ``(outer, C, inner)`` view, the groups."""

    def __init__(self, x: Tensor, axis: int, virtual_batch_size: int | None, ghost_layout: str):
        perm = _memory_order(x)
        if perm is None or (virtual_batch_size is not None
                            and (perm[0] != 0 or perm.index(axis) == 0)):
            perm = tuple(range(x.ndim))
            self.contiguous = False  # x must be copied to a contiguous tensor first
        else:
            self.contiguous = True
        self.perm = perm
        self.inverse = tuple(perm.index(d) for d in range(x.ndim))
        self.permuted_shape = [x.shape[d] for d in perm]
        p = perm.index(axis)
        self.outer = math.prod(self.permuted_shape[:p])
        self.channels = x.shape[axis]
        self.inner = math.prod(self.permuted_shape[p + 1:])
        self.rows, self.gid = _groups(self.outer, x.shape[0] if x.ndim else 1,
                                      virtual_batch_size, ghost_layout)
        self.groups = self.rows.shape[0]

    def view(self, t: Tensor) -> Tensor:
        """``t`` (shaped like x) as the contiguous ``(outer, C, inner)`` tensor the loops read."""
        t = t.permute(self.perm)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.view(self.outer, self.channels, self.inner)

    def unview(self, t3: Tensor) -> Tensor:
        """The inverse of :meth:`view`: x's shape, in x's memory order."""
        return t3.view(self.permuted_shape).permute(self.inverse)


def _memory_order(x: Tensor) -> tuple[int, ...] | None:
    """The permutation that makes ``x`` contiguous, or None when there is none."""
    if x.is_contiguous():
        return tuple(range(x.ndim))
    perm = tuple(sorted(range(x.ndim), key=lambda d: (-x.stride(d), -x.shape[d])))
    return perm if x.permute(perm).is_contiguous() else None


@lru_cache(maxsize=64)
def _groups(outer: int, batch: int, size: int | None, layout: str):
    """``rows`` (group -> its rows of the ``(outer, C, inner)`` view) and ``gid`` (row -> group)."""
    import numpy as np

    if size is None:
        return np.arange(outer, dtype=np.int64).reshape(1, outer), np.zeros(outer, np.int64)
    groups = batch // size
    per_sample = outer // batch
    sample = np.arange(batch, dtype=np.int64)
    if layout == "strided":  # tf_keras: sample n is in group n % groups
        members = sample.reshape(size, groups).T
    else:
        members = sample.reshape(groups, size)
    rows = (members[:, :, None] * per_sample + np.arange(per_sample)).reshape(groups, -1)
    gid = np.empty(outer, np.int64)
    gid[rows.reshape(-1)] = np.repeat(np.arange(groups, dtype=np.int64), rows.shape[1])
    return np.ascontiguousarray(rows), gid


def _blocks(work_items: int, limit: int) -> int:
    """How many blocks to cut each of ``work_items`` into so that every thread has a few."""
    want = 4 * _threads()  # 4 when serial: the blocks' partial sums are summed the same way
    return max(1, min(limit, -(-want // max(work_items, 1))))


def _run_dtype(x: Tensor) -> torch.dtype:
    """The dtype one contiguous run of values is summed in (see ``cpu_loops``)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _numpy(t: Tensor):
    """The array the loops read: bfloat16 as its uint16 bit patterns."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16) if hasattr(torch, "uint16") else t.view(torch.int16)
    return t.detach().numpy()


def _no_mask():
    import numpy as np

    return np.zeros((0, 1, 1), np.uint8)


# ---------------------------------------------------------------- the passes


def _moments(x3: Tensor, layout: _Layout, w3) -> tuple[Tensor, Tensor, Tensor]:
    """Per-(group, channel) float64 ``(k, sum(w (x - k)), sum(w (x - k)**2), sum w)``."""
    rows = layout.rows
    first = x3[torch.from_numpy(rows[:, 0]), :, 0].to(torch.float64)
    shift = torch.nan_to_num(first, nan=0.0, posinf=0.0, neginf=0.0)
    xa = _numpy(x3)
    # Sums of a float32 run are accurate when the shift is near the values summed; a masked
    # shift may be a value the mask leaves out (padding, far from the data): float64 then.
    shift = shift.to(torch.float64 if w3.shape[0] else _run_dtype(x3))  # exact: a value of x
    k = shift.numpy()
    if layout.inner == 1:
        blocks = _blocks(layout.groups, rows.shape[1])
        out = torch.zeros(3, layout.groups, blocks, layout.channels, dtype=torch.float64)
        with _serial_if_small(xa.size):
            loops.moments_rows(xa[:, :, 0], rows, k, w3[:, :, 0], blocks, out.numpy())
    else:
        cblocks = _blocks(layout.groups, layout.channels)
        blocks = _blocks(layout.groups * cblocks, rows.shape[1])
        out = torch.zeros(3, layout.groups, blocks, layout.channels, dtype=torch.float64)
        with _serial_if_small(xa.size):
            loops.moments_planes(xa, rows, k, w3, blocks, cblocks, out.numpy())
    s, q, n = out.sum(2)
    return shift.to(torch.float64), s, q, n


def _affine(x3: Tensor, layout: _Layout, a: Tensor, b: Tensor, y3: Tensor | None = None) -> Tensor:
    y3 = torch.empty_like(x3) if y3 is None else y3
    xa, ya = _numpy(x3), _numpy(y3)
    if layout.inner == 1:
        blocks = _blocks(1, layout.outer)
        with _serial_if_small(xa.size):
            loops.affine_rows(xa[:, :, 0], layout.gid, a.numpy(), b.numpy(), blocks, ya[:, :, 0])
    else:
        cblocks = _blocks(layout.outer, layout.channels)
        with _serial_if_small(xa.size):
            loops.affine_planes(xa, layout.gid, a.numpy(), b.numpy(), cblocks, ya)
    return y3


def _grad_sums(x3: Tensor, dy3: Tensor, layout: _Layout, mean: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(group, channel) float64 ``(sum dy, sum dy * (x - mean))``."""
    rows = layout.rows
    xa, da = _numpy(x3), _numpy(dy3)
    m = mean.to(_run_dtype(x3)).numpy()
    if layout.inner == 1:
        blocks = _blocks(layout.groups, rows.shape[1])
        out = torch.zeros(2, layout.groups, blocks, layout.channels, dtype=torch.float64)
        with _serial_if_small(xa.size):
            loops.grad_sums_rows(xa[:, :, 0], da[:, :, 0], rows, m, blocks, out.numpy())
    else:
        cblocks = _blocks(layout.groups, layout.channels)
        blocks = _blocks(layout.groups * cblocks, rows.shape[1])
        out = torch.zeros(2, layout.groups, blocks, layout.channels, dtype=torch.float64)
        with _serial_if_small(xa.size):
            loops.grad_sums_planes(xa, da, rows, m, blocks, cblocks, out.numpy())
    s, p = out.sum(2)
    return s, p


def _grad_input(x3, dy3, layout: _Layout, m, p, q, u, w3, dx3: Tensor) -> Tensor:
    args = [t.numpy() for t in (m, p, q, u)]
    xa, da, dxa = _numpy(x3), _numpy(dy3), _numpy(dx3)
    if layout.inner == 1:
        blocks = _blocks(1, layout.outer)
        with _serial_if_small(xa.size):
            loops.grad_input_rows(xa[:, :, 0], da[:, :, 0], layout.gid, *args, w3[:, :, 0],
                                  blocks, dxa[:, :, 0])
    else:
        cblocks = _blocks(layout.outer, layout.channels)
        with _serial_if_small(xa.size):
            loops.grad_input_planes(xa, da, layout.gid, *args, w3, cblocks, dxa)
    return dx3


def _mask_array(mask: Tensor | None, x: Tensor, axis: int, layout: _Layout):
    """The mask as a contiguous ``(outer, 1 or C, inner)`` uint8 array in x's memory order."""
    if mask is None:
        return _no_mask()
    m = mask.reshape(mask_shape(mask, x, (axis,)))
    per_channel = m.shape[axis] != 1
    shape = list(x.shape)
    if not per_channel:
        shape[axis] = 1
    m = m.expand(shape).permute(layout.perm).to(torch.uint8).contiguous()
    return m.view(layout.outer, layout.channels if per_channel else 1, layout.inner).numpy()


# ---------------------------------------------------------------- autograd


class _Options:
    """Everything but the differentiable tensors, carried from forward to backward."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor | None, beta: Tensor | None, o: _Options):
        layout = o.layout
        x3 = layout.view(x if layout.contiguous else x.contiguous())
        # The output first: allocated after the small temporaries, it would land above them
        # and fault in fresh pages on every call instead of reusing the last call's block.
        y3 = torch.empty_like(x3)
        w3 = _mask_array(o.mask, x, o.axis, layout)
        shift, s, q, n = _moments(x3, layout, w3)
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
        if masked:  # a group with no selected position is normalized with the moving statistics
            empty = n == 0
            mean = torch.where(empty, o.state.moving_mean.to(torch.float64), mean)
            variance = torch.where(empty, o.state.moving_variance.to(torch.float64), variance)

        channels = torch.ones(layout.channels, dtype=torch.float64)
        r, d = channels, None
        if o.renorm:
            r, d = renorm_correction(*pooled_statistics(stats), o.state, epsilon=o.epsilon,
                                     clipping=o.renorm_clipping)
            r, d = r.to(torch.float64), d.to(torch.float64)
        g = None if gamma is None else gamma.detach().to(torch.float64)
        scale = r if g is None else r * g  # on xhat
        offset = None if d is None else (d if g is None else d * g)
        if beta is not None:
            b64 = beta.detach().to(torch.float64)
            offset = b64 if offset is None else offset + b64
        invstd = torch.rsqrt(variance + o.epsilon)  # (groups, C)
        a = invstd * scale
        shift_out = -mean * a if offset is None else offset - mean * a
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        y3 = _affine(x3, layout, a.to(cdtype).contiguous(), shift_out.to(cdtype).contiguous(), y3)

        ctx.save_for_backward(x, gamma, beta)
        ctx.o = o
        ctx.saved = (mean, invstd, scale, r, d, n if masked else None, count, w3)
        ctx.mark_non_differentiable(*(t for t in stats if isinstance(t, Tensor)))
        return layout.unview(y3), stats.mean, stats.variance, stats.count

    @staticmethod
    def backward(ctx, dy: Tensor, *_unused):
        x, gamma, beta = ctx.saved_tensors
        o = ctx.o
        if torch.is_grad_enabled():  # create_graph: differentiate the composite path instead
            return (*_composite_grad(x, gamma, beta, dy, o, ctx.needs_input_grad), None)
        layout = o.layout
        mean, invstd, scale, r, d, n, count, w3 = ctx.saved
        x3 = layout.view(x if layout.contiguous else x.contiguous())
        dy3 = layout.view(dy.to(x.dtype))
        dx3 = torch.empty_like(x3) if ctx.needs_input_grad[0] else None
        s1, t = _grad_sums(x3, dy3, layout, mean)  # sum dy, sum dy (x - mean)
        s2 = t * invstd  # sum dy xhat
        dgamma = dbeta = None
        if gamma is not None and ctx.needs_input_grad[1]:
            dgamma = (r * s2).sum(0) if d is None else (r * s2 + d * s1).sum(0)
            dgamma = dgamma.to(gamma.dtype)
        if beta is not None and ctx.needs_input_grad[2]:
            dbeta = s1.sum(0).to(beta.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            safe = n.clamp_min(1.0) if n is not None else count
            p = invstd * scale
            u = p * s1 / safe
            q = p * invstd * s2 / safe
            cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            coeffs = [c.to(cdtype).contiguous() for c in (mean, p.expand_as(mean), q, u)]
            dx = layout.unview(_grad_input(x3, dy3, layout, *coeffs, w3, dx3))
        return dx, dgamma, dbeta, None


def _composite_grad(x, gamma, beta, dy, o: _Options, needs):
    from . import composite

    wanted = list(zip((x, gamma, beta), needs[:3], strict=True))
    inputs = [t for t, need in wanted if need and t is not None]
    y, _ = composite.train(
        x, o.state, (o.axis,), gamma=gamma, beta=beta, epsilon=o.epsilon, renorm=o.renorm,
        renorm_clipping=o.renorm_clipping, virtual_batch_size=o.virtual_batch_size,
        ghost_layout=o.ghost_layout, adjustment=None, mask=o.mask)
    grads = iter(torch.autograd.grad(y, inputs, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None
                 for t, need in zip((x, gamma, beta), needs[:3], strict=True))


def train(
    x: Tensor,
    state: BatchNormState,
    axes: tuple[int, ...],
    *,
    gamma: Tensor | None,
    beta: Tensor | None,
    epsilon: float,
    renorm: bool,
    renorm_clipping: Mapping[str, float] | None,
    virtual_batch_size: int | None,
    ghost_layout: str,
    adjustment: Callable | None,
    mask: Tensor | None,
) -> tuple[Tensor, BatchStatistics]:
    """The training kernel (same signature and results as ``composite.train``)."""
    if adjustment is not None:
        raise ValueError("the CPU kernel has no adjustment; kernels.select never routes it here")
    (axis,) = axes
    layout = _Layout(x, axis, virtual_batch_size, ghost_layout)
    if renorm or mask is not None:
        # The state enters the output (r, d; an empty group's moving statistics) and the
        # layer updates it in place after this call: keep this call's values for a double
        # backward, which recomputes the output.
        state = state._replace(**{k: v.clone() for k, v in state._asdict().items()
                                  if isinstance(v, Tensor) and v.is_floating_point()})
    options = _Options(layout=layout, axis=axis, state=state, epsilon=epsilon, renorm=renorm,
                       renorm_clipping=renorm_clipping, virtual_batch_size=virtual_batch_size,
                       ghost_layout=ghost_layout, mask=mask)
    y, mean, variance, count = _BatchNorm.apply(x, gamma, beta, options)
    return y, BatchStatistics(mean, variance, count)


def affine(x: Tensor, inv: Tensor, shift: Tensor) -> Tensor | None:
    """``x * inv + shift`` in one pass, for per-feature ``inv``/``shift`` broadcast along one
    axis of ``x`` and no gradient; None when that does not apply (the caller computes it).

    Inference is this single pass; for bfloat16 inputs it also avoids torch's float32
    intermediate (read bfloat16, write float32, read float32, write bfloat16).
    """
    if torch.compiler.is_compiling():
        return None
    if (loops is None or x.device.type != "cpu" or x.dtype not in _DTYPES
            or x.numel() < MIN_PLAIN_NUMEL or inv.shape != shift.shape or inv.ndim != x.ndim):
        return None
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if inv.dtype != cdtype or shift.dtype != cdtype:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or inv.requires_grad or shift.requires_grad):
        return None
    axes = [d for d in range(x.ndim) if inv.shape[d] != 1]
    if len(axes) != 1 or inv.shape[axes[0]] != x.shape[axes[0]] or traced(x):
        return None
    if type(x) is not torch.Tensor or x.layout != torch.strided:
        return None
    layout = _Layout(x, axes[0], None, "strided")
    if not layout.contiguous:
        return None
    features = (1, layout.channels)
    y3 = _affine(layout.view(x), layout, inv.reshape(features).contiguous(),
                 shift.reshape(features).contiguous())
    return layout.unview(y3)


def warm_up() -> float:
    """Compile (or load from numba's on-disk cache) every loop; return the seconds it took."""
    import time

    start = time.perf_counter()
    for dtype in _DTYPES:
        for shape, axis, extra in (((4, 3, 5), 1, {}), ((8, 3), 1, {}),
                                   ((4, 3, 5), 1, {"virtual_batch_size": 2})):
            x = torch.randn(shape).to(dtype).requires_grad_()
            state = BatchNormState(torch.zeros(3), torch.ones(3),
                                   torch.zeros((), dtype=torch.int64))
            for mask in (None, torch.ones(shape, dtype=torch.bool)):
                y, _ = train(x, state, (axis,), gamma=torch.ones(3, requires_grad=True),
                             beta=torch.zeros(3, requires_grad=True), epsilon=1e-3,
                             renorm=False, renorm_clipping=None, ghost_layout="strided",
                             adjustment=None, mask=mask,
                             **{"virtual_batch_size": None, **extra})
                y.sum().backward()
    return time.perf_counter() - start
