"""The CPU fast path: every training mode with one feature axis, at memory bandwidth.

Batch normalization is memory-bound, so the kernel is organized around the
passes over memory: the forward pass reads ``x`` once for the statistics and
once more to write ``y``; the backward pass reads ``x`` and ``dy`` once for two
sums per channel and once more to write ``dx``. Everything between the passes
(group statistics, the renorm correction, gamma and beta) is folded into one
scale and one shift per (group, channel), so each pass is a single streaming
loop (:mod:`batchnorm.kernels.cpu.loops`, numba, parallel over rows or
channels; the passes are in :mod:`batchnorm.kernels.cpu.passes`, the views in
:mod:`batchnorm.kernels.layout`).
Plain, renorm, ghost batches and masks share the same four loops; a fused
``activation`` has its own specialization of the output and backward loops.

The autograd Function that strings the passes together, and the semantics it
keeps (those of :mod:`batchnorm.kernels.composite`), are in
:mod:`batchnorm.kernels.two_pass`, shared with the Triton kernel. Statistics
accumulate in float64 from a per-channel shift, so they are at least as accurate
as the composite's float32 ``var_mean``.

:meth:`CpuKernel.unsupported` says when the kernel does not apply (another device, a
dtype other than float32/float64/bfloat16, tracing by ``torch.compile`` or a
``torch.func`` transform, adjustment, several feature axes, numba missing);
the registry in :mod:`batchnorm.kernels` then uses the native or composite kernel.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch._C import _increment_version as increment_version

from ...activations import ACTIVATIONS
from ...config import BatchNormConfig
from ...state import BatchNormState, BatchStatistics, initial_state, statistics_dtype
from ...statistics import PreparedUpdate, prepare_update, renorm_correction
from .. import two_pass
from ..layout import Layout
from ..protocol import FoldedLoops, KernelCall, TrainingKernel, Unprepared
from . import passes
from .passes import (
    DTYPES,
    IMPORT_ERROR,
    MIN_NUMEL,
    MIN_PLAIN_NUMEL,
    affine_pass,
    grad_input_pass,
    grad_sums_pass,
    mask_array,
    moments_pass,
)

__all__ = ["CPU", "IMPORT_ERROR", "MIN_NUMEL", "MIN_PLAIN_NUMEL", "NUMBA_PASSES", "CpuKernel",
           "available", "warm_up"]


def available() -> bool:
    """True when numba imported and the kernels can run."""
    return passes.loops is not None


_UPDATE_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
# The input dtypes the small inputs' statistics loop reads, as the values of their type (a
# bfloat16's bits as uint16).
_MOMENTS_SOURCES = {torch.float32: np.float32(0), torch.float64: np.float64(0),
                    torch.bfloat16: np.uint16(0)}


class CpuKernel(Unprepared):
    """Every training mode but adjustment, one feature axis, CPU tensors; numba loops. Also
    the CPU's inference pass (:class:`batchnorm.kernels.protocol.InferencePass`)."""

    name = "cpu"

    def prefers_fallback(self, x: Tensor, call: KernelCall, fallback: TrainingKernel) -> bool:
        """Whether ``fallback``, the kernel ``fused=None`` takes where this one steps aside
        (ATen's for the plain mode, the folded kernel for renorm, the ghost kernel for ghost
        batches, the masked kernel for masks, else the composite), is the faster one for
        this input.

        Small inputs: their per-call cost is lower (below ``MIN_PLAIN_NUMEL`` values for
        ATen's kernels, ``MIN_PLAIN_BFLOAT16_NUMEL`` for bfloat16, ``MIN_MASKED_NUMEL`` for
        the masked kernel, ``MIN_NUMEL`` for the composite; see the benchmark's per-call
        rows and the crossovers measured in :mod:`batchnorm.kernels.cpu.passes`; with an
        ``activation``, ATen's kernel and the activation in place below
        ``MIN_ACTIVATION_NUMEL``). Channels-last and other layouts
        whose feature axis is innermost in memory take these loops too (measured,
        64x64x56x56 channels-last, reuse allocator, against ATen's per-row kernel: float32
        forward 11.9 ms against 14.4 and forward and backward 31.8 against 36.2 on one
        thread, 8.2 against 9.0 and 24.4 against 24.3 on two; bfloat16 at 0.93-1.00 of
        its time).
        """
        if fallback.name == "composite":
            return x.numel() < MIN_NUMEL
        if fallback.name == "masked":
            return x.numel() < passes.MIN_MASKED_NUMEL
        if fallback.name == "native" and call.config.activation is not None:
            return not self.fuses_activation(x)
        # ATen's kernels: the plain mode's, and renorm's and ghost batches' on them (folded,
        # ghost; measured, float32: 32x64x8x8 the loops at 1.1-1.4x their time, 32x64x16x16
        # at 0.5-0.8x; bfloat16 about even at 32x64x32x32).
        return x.numel() < (passes.MIN_PLAIN_BFLOAT16_NUMEL if x.dtype == torch.bfloat16
                            else MIN_PLAIN_NUMEL)

    def fuses_activation(self, x: Tensor) -> bool:
        """Whether the loops' own activation pass beats ATen's kernel and the activation in
        place for an input of ``x``'s size (in training and in inference)."""
        return x.numel() >= passes.MIN_ACTIVATION_NUMEL  # read here: tests lower it

    def affine(self, x: Tensor, inv: Tensor, shift: Tensor,
               activation: str | None = None) -> Tensor | None:
        """The inference pass (:func:`batchnorm.kernels.cpu.passes.affine`), registered in
        :data:`batchnorm.kernels.protocol.INFERENCE_PASSES`."""
        return passes.affine(x, inv, shift, activation)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The mean and biased variance over every dimension of ``x`` but dim 1 (in the
        statistics dtype: float32 for bfloat16), in one numba loop on the calling thread
        (:func:`batchnorm.kernels.cpu.loops.contiguous_moments`), registered in
        :data:`batchnorm.kernels.protocol.MOMENTS_PASSES`: for a contiguous float32, float64
        or bfloat16 ``x`` of at most ``MIN_PLAIN_NUMEL`` values (above, ATen's pass on its
        threads) with at least one value per feature that autograd does not record, else
        None. (ATen's statistics pass costs 5 us a call at 32x64 and, for
        NCHW inputs with few values per plane, several times a pass over memory: 32x64x8x8
        float32, one thread.)"""
        source = _moments_source(x)
        if source is None or x.ndim < 2:
            return None
        batch, features = x.shape[0], x.shape[1]
        inner = x.numel() // (batch * features) if batch * features else 0
        if batch * inner == 0:
            return None
        dtype = statistics_dtype(x.dtype)
        mean = torch.empty(features, dtype=dtype)
        variance = torch.empty(features, dtype=dtype)
        passes.loops.contiguous_moments(x.data_ptr(), mean.data_ptr(), variance.data_ptr(),
                                        batch, features, inner, source,
                                        _UPDATE_DTYPES[dtype](0))
        return mean, variance

    def prepare_folded(self, x: Tensor, state: BatchNormState, call: KernelCall
                       ) -> FoldedLoops | None:
        """The folded kernel's call for small inputs of ``x``'s signature
        (:meth:`batchnorm.kernels.protocol.MomentsPass.prepare_folded`): one numba loop
        forward (:func:`batchnorm.kernels.cpu.loops.folded_forward`) and one backward
        (:func:`~batchnorm.kernels.cpu.loops.small_backward`), on the calling thread. For a
        contiguous float32, float64 or bfloat16 ``x`` with its feature axis at dim 1 or last,
        no activation, and gamma, beta and the renorm averages contiguous feature vectors
        of the statistics dtype; else None. (The caller bounds the size: the loops make no
        use of threads.)"""
        config = call.config
        source = _moments_source(x.detach())
        (axis,) = call.axes
        dtype = statistics_dtype(x.dtype)
        features = x.shape[axis] if x.ndim else 0
        vectors = [call.gamma, call.beta]
        if config.renorm:
            vectors += [state.renorm_mean, state.renorm_stddev]
        if (source is None or x.ndim < 2 or axis not in (1, x.ndim - 1)
                or config.activation is not None or x.numel() == 0
                or not _feature_vectors(vectors, features, dtype, x.device)
                or config.renorm and (state.renorm_mean is None or state.renorm_stddev is None)):
            return None
        kind = _UPDATE_DTYPES[dtype]
        inner = x.numel() // (x.shape[0] * features) if axis == 1 else 1
        batch = x.numel() // (features * inner)
        gamma, beta = call.gamma, call.beta
        renorm_mean, renorm_stddev = (state.renorm_mean, state.renorm_stddev) if config.renorm \
            else (None, None)
        present = (config.renorm, config.adjustment is not None, gamma is not None,
                   beta is not None)
        flags = sum(bit << i for i, bit in enumerate(present))
        clipping = config.clipping or {}
        constants = (kind(config.epsilon), kind(math.sqrt(config.epsilon)),
                     kind(clipping.get("rmin", 0.0)), kind(clipping.get("rmax", math.inf)),
                     kind(clipping.get("dmax", math.inf)), source, kind(0))
        forward_loop, shape = passes.loops.folded_forward, (batch, features, inner)

        def fits(adjust: tuple[Tensor, Tensor] | None) -> bool:
            return adjust is None or all(
                t.dtype == dtype and t.shape == (features,) and t.stride() in ((0,), (1,))
                and t.device == x.device for t in adjust)

        row = features * torch.empty((), dtype=dtype).element_size()  # bytes per term

        def forward(x: Tensor, adjust: tuple[Tensor, Tensor] | None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            y = torch.empty_like(x)
            mean, variance = torch.empty(features, dtype=dtype), torch.empty(features, dtype=dtype)
            terms = torch.empty((3, features), dtype=dtype)  # a, c, e
            m, t = mean.data_ptr(), terms.data_ptr()
            scale, bias, strides = m, m, 0
            if adjust is not None:
                scale, bias = adjust[0].data_ptr(), adjust[1].data_ptr()
                strides = adjust[0].stride(0) | adjust[1].stride(0) << 1
            forward_loop(x.data_ptr(), y.data_ptr(), m, variance.data_ptr(),
                         _address(gamma, m), _address(beta, m), scale, bias,
                         _address(renorm_mean, m), _address(renorm_stddev, m), t, t + row,
                         t + 2 * row, batch, features, inner, flags, strides, *constants)
            return y, mean, variance, terms

        def backward(x: Tensor, dy: Tensor, mean: Tensor, variance: Tensor, terms: Tensor,
                     wanted: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
            t = terms.data_ptr()
            return _small_backward(x, shape, dy, mean, variance, config.epsilon, wanted,
                                   a=t, ce=(t + row, t + 2 * row))
        return FoldedLoops(fits, forward, backward)

    def masked_forward(self, x: Tensor, shape: tuple[int, int, int], selected: Tensor,
                       gamma: Tensor | None, beta: Tensor | None, epsilon: float
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, int] | None:
        """The masked kernel's output and statistics in one numba loop on the calling thread
        (:meth:`batchnorm.kernels.protocol.MomentsPass.masked_forward`,
        :func:`batchnorm.kernels.cpu.loops.masked_forward`): ``x`` a contiguous float32,
        float64 or bfloat16 input read as ``shape``, ``(rows, features, inner)``,
        ``selected`` one contiguous byte per ``rows * inner`` position, gamma and beta
        contiguous feature vectors of the statistics dtype; else None."""
        source = _moments_source(x.detach())
        dtype = statistics_dtype(x.dtype)
        rows, features, inner = shape
        if (source is None or x.numel() != rows * features * inner
                or selected.dtype != torch.bool or not selected.is_contiguous()
                or selected.device != x.device or selected.numel() != rows * inner
                or not _feature_vectors((gamma, beta), features, dtype, x.device)):
            return None
        kind = _UPDATE_DTYPES[dtype]
        y = torch.empty_like(x, requires_grad=False)
        mean = torch.empty(features, dtype=dtype)
        variance = torch.empty(features, dtype=dtype)
        counts = torch.empty((1, features), dtype=dtype)
        m = mean.data_ptr()
        count = passes.loops.masked_forward(
            x.data_ptr(), selected.data_ptr(), y.data_ptr(), m, variance.data_ptr(),
            counts.data_ptr(), _address(gamma, m), _address(beta, m), rows, features, inner,
            (gamma is not None) | (beta is not None) << 1, kind(epsilon), source, kind(0))
        return y, mean, variance, counts, int(count)

    def masked_backward(self, x: Tensor, shape: tuple[int, int, int], dy: Tensor,
                        selected: Tensor, mean: Tensor, variance: Tensor, gamma: Tensor | None,
                        count: int, wanted: int, epsilon: float
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients of :meth:`masked_forward`'s output in one numba loop
        (:func:`batchnorm.kernels.cpu.loops.small_backward`): ``(dx, dgamma, dbeta)``, each
        None unless ``wanted`` asks for it (bit 0 dx, 1 dgamma, 2 dbeta); ``dy`` of ``x``'s
        shape, copied where it is not contiguous."""
        features = shape[1]
        if gamma is not None and (gamma.dtype != mean.dtype or not gamma.is_contiguous()):
            gamma = gamma.detach().to(mean.dtype).contiguous()  # changed since the forward
        if gamma is not None and gamma.shape != (features,):
            raise RuntimeError(f"gamma changed shape between forward and backward: "
                               f"{tuple(gamma.shape)}, expected ({features},)")
        return _small_backward(x, shape, dy, mean, variance, epsilon, wanted,
                               a=None if gamma is None else gamma.data_ptr(), mask=selected,
                               count=count)

    def debiased(self, state: BatchNormState, momentum: float,
                 fresh: bool) -> Callable[[], tuple[Tensor, Tensor]] | None:
        """The debiased moving averages inference normalizes with
        (:func:`batchnorm.statistics.inference_statistics`, the same arithmetic) as one numba
        loop, :func:`batchnorm.kernels.cpu.loops.debiased`: ``statistics() -> (mean,
        variance)``, new tensors at each call where ``fresh`` (a call autograd records keeps
        them for backward), else this thread's pair, rewritten by its next call.

        The state's tensors must keep their storage, shape and dtype while it is kept (a
        layer's :class:`batchnorm.plan.CallPlan` checks them before every call). None where
        the loop does not apply: numba missing, a renorm state or one without initial values,
        dtypes other than float32/float64 (int64 for ``num_updates``), tensors that are not
        contiguous or not on CPU.
        """
        mm, mv, m0, v0 = (state.moving_mean, state.moving_variance, state.initial_mean,
                          state.initial_variance)
        if m0 is None or v0 is None:
            return None
        tensors, updates = (mm, mv, m0, v0), state.num_updates
        kind = _UPDATE_DTYPES.get(mm.dtype)
        if (not available() or state.moving_stddev is not None or kind is None
                or any(t.dtype != mm.dtype or t.ndim != 1 or t.shape != mm.shape
                       for t in tensors)
                or updates.dtype != torch.int64
                or any(t.device.type != "cpu" or not t.is_contiguous()
                       for t in (*tensors, updates))):
            return None
        loop = passes.loops.debiased
        # Kept with their addresses: the loop must never read memory that was freed.
        kept = (*tensors, updates)
        addresses = (mm.data_ptr(), mv.data_ptr(), m0.data_ptr(), v0.data_ptr(),
                     updates.data_ptr())
        n, rate, like = mm.numel(), kind(momentum), mm
        if fresh:
            def new_statistics(kept: tuple = kept) -> tuple[Tensor, Tensor]:
                mean, variance = torch.empty_like(like), torch.empty_like(like)
                loop(*addresses, n, rate, mean.data_ptr(), variance.data_ptr())
                return mean, variance
            return new_statistics
        pairs = threading.local()

        def statistics(kept: tuple = kept) -> tuple[Tensor, Tensor]:
            pair = getattr(pairs, "pair", None)
            if pair is None:
                mean, variance = torch.empty_like(like), torch.empty_like(like)
                pair = pairs.pair = (mean, variance, mean.data_ptr(), variance.data_ptr())
            loop(*addresses, n, rate, pair[2], pair[3])
            return pair[0], pair[1]
        return statistics

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        """Why this kernel does not handle the call, or None when it does."""
        if not available():
            return f"numba is unavailable ({IMPORT_ERROR})"
        if x.device.type != "cpu":
            return f"the input is on {x.device}"
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype}"
        reason = two_pass.unsupported(x, call)
        if reason is not None:
            return reason
        if state is not None and (state.moving_mean.requires_grad
                                  or state.moving_variance.requires_grad):
            return "moving statistics that require grad"
        return None

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        """The training kernel (same results as the composite kernel's)."""
        if call.config.adjustment is not None:
            raise ValueError("the CPU kernel has no adjustment; kernels.select never routes "
                             "it here")
        return two_pass.train(x, state, call, NUMBA_PASSES)

    def prepare_update(self, state: BatchNormState, config: BatchNormConfig,
                       dtype: torch.dtype, count: int | None,
                       fallback: Callable[[BatchStatistics, Tensor | None], Tensor | bool],
                       groups: int = 1) -> PreparedUpdate | None:
        """The moving-average update of ``state`` with ``config``'s options as one numba loop,
        :func:`batchnorm.kernels.cpu.loops.lerp_if_finite` (the CPU's backend of
        :func:`batchnorm.statistics.prepare_update`, registered in
        :data:`batchnorm.statistics.UPDATE_LOOPS`), for ``groups`` groups (ghost batches) of
        ``count`` values per feature each (None: a mask's counts, per group and feature, in
        the statistics) in contiguous statistics of ``dtype``: ``apply(stats, skipped)``
        (``fallback``, torch operations, updates from any other statistics) and, without a
        mask, ``direct(mean, variance)`` (``groups * features`` values each, group after
        group), both returning whether the batch entered the averages (a ``bool``).

        The state's tensors must keep their storage, shape and dtype while the update is kept
        (a layer's :class:`batchnorm.plan.CallPlan` checks them before every call). None
        where the loop does not apply: numba missing, a state not on CPU, a renorm state with
        ghost batches or a mask, dtypes other than float32/float64 (and int64 for
        ``num_updates``), non-contiguous buffers. The cumulative average
        (``momentum=None``) steps by ``1 / (n + 1)`` as the torch operations do (float32's
        reciprocal of ``num_updates + 1``), ``n`` read from the counter's memory at each
        call.
        """
        if state.moving_stddev is not None:
            return self._prepare_renorm_update(state, config, dtype, count, fallback, groups)
        mm, mv, updates = state.moving_mean, state.moving_variance, state.num_updates
        kind, stat = _UPDATE_DTYPES.get(mm.dtype), _UPDATE_DTYPES.get(dtype)
        if (not available()
                or kind is None or stat is None or mv.dtype != mm.dtype
                or updates.dtype != torch.int64 or mm.shape != mv.shape or mm.ndim != 1
                or any(t.device.type != "cpu" or not t.is_contiguous()
                       for t in (mm, mv, updates))):
            return None
        loop = passes.loops.lerp_if_finite
        # The tensors themselves are kept with their addresses: the loop must never write
        # into memory that was freed (a state built for the call and dropped after it).
        kept = (mm, mv, updates)
        addresses = (mm.data_ptr(), mv.data_ptr(), updates.data_ptr())
        n = mm.numel()
        step = _stepper(config.momentum, kind, updates)
        masked = count is None  # a mask's counts, per group and feature, come with the stats
        unbiased = bool(config.unbiased_moving_variance)
        correction = stat(count / (count - 1) if unbiased and count is not None else 1.0)
        zero = stat(0)

        def loop_on(mean: Tensor, variance: Tensor, counts: Tensor) -> bool:
            return _written(kept, loop(*addresses, mean.data_ptr(), variance.data_ptr(),
                                       counts.data_ptr(), n, groups, masked, step(),
                                       correction, unbiased, zero))

        if groups == 1:
            one_group = passes.loops.lerp_one_group_if_finite
            weight = None if config.momentum is None else step()  # None: n changes

            def direct(mean: Tensor, variance: Tensor) -> bool:
                # The hottest update: the loop with the fewest arguments (each costs the
                # dispatch a conversion) and no frame it can do without (_written inline).
                if one_group(*addresses, mean.data_ptr(), variance.data_ptr(), n,
                             step() if weight is None else weight, correction, zero):
                    increment_version(kept)
                    return True
                return False
        else:
            def direct(mean: Tensor, variance: Tensor) -> bool:
                return loop_on(mean, variance, mean)  # no counts read

        def apply(stats: BatchStatistics, skipped: Tensor | None = None) -> Tensor | bool:
            mean, variance, counts = stats
            read = counts if isinstance(counts, Tensor) else mean  # mean: no counts read
            if masked:
                taken = (read is counts and read.dtype is dtype and read.shape == mean.shape
                         and read.is_contiguous())
            else:
                taken = counts == count
            if not (taken and mean.dtype is dtype and variance.dtype is dtype
                    and mean.shape[0] == groups and variance.shape == mean.shape
                    and mean.is_contiguous() and variance.is_contiguous()):
                return fallback(stats, skipped)
            applied = loop_on(mean, variance, read) if masked else direct(mean, variance)
            if not applied and skipped is not None:
                skipped.add_(1)
            return applied
        return PreparedUpdate(apply, None if masked else direct)


    def prepare_renorm_correction(self, state: BatchNormState, config: BatchNormConfig,
                                  dtype: torch.dtype
                                  ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """Batch Renormalization's ``(r, d)`` for ``state``'s renorm averages as one numba
        loop, :func:`batchnorm.kernels.cpu.loops.renorm_terms` (the CPU's backend of
        :func:`batchnorm.statistics.prepare_renorm_correction`, the same arithmetic as
        :func:`batchnorm.statistics.renorm_correction`): ``correction(mean, variance) -> (r,
        d)`` for 1-D statistics of ``dtype``, new tensors at each call (torch operations for
        any other statistics). None where the loop does not apply: numba missing, averages
        not on CPU, of another dtype than ``dtype`` (float32 or float64), not contiguous or
        requiring grad. The averages must keep their storage while it is kept (a layer's
        :class:`batchnorm.plan.CallPlan` checks them before every call; the closure holds the
        state)."""
        averages = (state.renorm_mean, state.renorm_stddev)
        kind = _UPDATE_DTYPES.get(dtype)
        if (not available() or kind is None
                or any(t is None or t.dtype != dtype or t.ndim != 1 or t.device.type != "cpu"
                       or not t.is_contiguous() or t.requires_grad for t in averages)
                or averages[0].shape != averages[1].shape):  # type: ignore[union-attr]
            return None
        rm, rs = averages
        assert rm is not None and rs is not None  # checked above
        n = rm.numel()
        loop = passes.loops.renorm_terms
        addresses = (rm.data_ptr(), rs.data_ptr())
        clipping = config.clipping or {}
        epsilon = config.epsilon
        constants = (n, kind(math.sqrt(epsilon)), kind(clipping.get("rmin", 0.0)),
                     kind(clipping.get("rmax", math.inf)), kind(clipping.get("dmax", math.inf)))

        def correction(mean: Tensor, variance: Tensor) -> tuple[Tensor, Tensor]:
            if not (mean.dtype is dtype and variance.dtype is dtype and mean.shape == (n,)
                    and variance.shape == (n,) and mean.is_contiguous() and mean.is_cpu):
                return renorm_correction(mean, variance, state, epsilon=epsilon,
                                         clipping=config.clipping)
            # torch's root (see the loop), then r over it.
            r, d = (variance.detach() + epsilon).sqrt_(), torch.empty(n, dtype=dtype)
            loop(mean.data_ptr(), r.data_ptr(), *addresses, d.data_ptr(), *constants)
            return r, d
        return correction

    def _prepare_renorm_update(self, state: BatchNormState, config: BatchNormConfig,
                               dtype: torch.dtype, count: int | None,
                               fallback: Callable[[BatchStatistics, Tensor | None],
                                                  Tensor | bool],
                               groups: int) -> PreparedUpdate | None:
        """:meth:`prepare_update` for a renorm state, one group of ``count`` values per
        feature: :func:`batchnorm.kernels.cpu.loops.renorm_lerp_if_finite`."""
        averages = (state.moving_mean, state.moving_stddev, state.moving_variance,
                    state.renorm_mean, state.renorm_stddev)
        updates, first = state.num_updates, state.moving_mean
        kind, stat = _UPDATE_DTYPES.get(first.dtype), _UPDATE_DTYPES.get(dtype)
        if (not available() or groups != 1 or count is None or kind is None or stat is None
                or updates.dtype != torch.int64
                or any(t is None or t.dtype != first.dtype or t.shape != first.shape
                       or t.ndim != 1 for t in averages)
                or any(t is None or t.device.type != "cpu" or not t.is_contiguous()
                       for t in (*averages, updates))):
            return None
        loop = passes.loops.renorm_lerp_if_finite
        mm, ms, mv, rm, rs = averages
        assert ms is not None and rm is not None and rs is not None  # checked above
        # Kept with their addresses: the loop must never write into memory that was freed.
        kept = (mm, ms, mv, rm, rs, updates)
        addresses = (mm.data_ptr(), ms.data_ptr(), rm.data_ptr(), rs.data_ptr(),
                     updates.data_ptr())
        derive, derived = passes.loops.renorm_variance, (ms.data_ptr(), mv.data_ptr())
        n = first.numel()
        step = _stepper(config.momentum, kind, updates)
        renorm_weight = kind(1.0 - config.renorm_momentum)
        bessel = count / (count - 1) if config.unbiased_moving_variance else None
        epsilon, floor, zero = config.epsilon, kind(config.epsilon), stat(0)

        def direct(mean: Tensor, variance: Tensor) -> bool:
            variance = variance.detach()  # no autograd record (checkpointing counts them)
            if bessel is not None:  # as statistics.pooled_statistics, then _averages
                variance = variance * bessel
            stddev = torch.sqrt(variance + epsilon)  # torch's root (see the loop)
            if not loop(*addresses, mean.data_ptr(), variance.data_ptr(), stddev.data_ptr(), n,
                        step(), renorm_weight, zero):
                return False
            derive(*derived, n, floor)  # relu(moving_stddev**2 - epsilon)
            return _written(kept, True)

        def apply(stats: BatchStatistics, skipped: Tensor | None = None) -> Tensor | bool:
            mean, variance = stats.mean, stats.variance
            if not (stats.count == count and mean.dtype is dtype and variance.dtype is dtype
                    and mean.shape == (1, n) and variance.shape == mean.shape
                    and mean.is_contiguous() and variance.is_contiguous()):
                return fallback(stats, skipped)
            applied = direct(mean, variance)
            if not applied and skipped is not None:
                skipped.add_(1)
            return applied
        # A call that activation checkpointing may run again takes the layer's full path,
        # which keeps the renorm averages before the update (recompute.remember).
        return PreparedUpdate(apply, direct)


def _address(t: Tensor | None, default: int) -> int:
    """``t``'s address, or ``default`` (a valid address the loop leaves unread) for None."""
    return default if t is None else t.data_ptr()


def _feature_vectors(tensors: Iterable[Tensor | None], features: int, dtype: torch.dtype,
                     device: torch.device) -> bool:
    """Whether each of ``tensors`` (None aside) is what the small inputs' loops read by
    address: a contiguous vector of ``features`` values of ``dtype`` on ``device``."""
    return all(t is None or (t.dtype == dtype and t.shape == (features,) and t.is_contiguous()
                             and t.device == device) for t in tensors)


def _small_backward(x: Tensor, shape: tuple[int, int, int], dy: Tensor, mean: Tensor,
                    variance: Tensor, epsilon: float, wanted: int, *, a: int | None = None,
                    ce: tuple[int, int] | None = None, mask: Tensor | None = None,
                    count: int = 0) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The folded and masked kernels' backward, :func:`batchnorm.kernels.cpu.loops.
    small_backward`, for ``x`` read as ``shape`` (``(rows, features, inner)``): ``(dx,
    dgamma, dbeta)`` as ``wanted`` asks (bit 0, 1, 2), with the addresses of the factor ``a``
    and of the terms ``ce`` (``(c, e)``) where given, and the selected positions ``mask``
    (``count`` of them) where given; ``dy`` copied where it is not contiguous."""
    if not (dy.dtype == x.dtype and dy.shape == x.shape and dy.is_contiguous()):
        dy = dy.to(x.dtype).contiguous()  # e.g. expanded (sum().backward())
    rows, features, inner = shape
    dtype = mean.dtype
    dx = torch.empty_like(x) if wanted & 1 else None
    dgamma = torch.empty(features, dtype=dtype) if wanted & 2 else None
    dbeta = torch.empty(features, dtype=dtype) if wanted & 4 else None
    m = mean.data_ptr()
    c, e = (m, m) if ce is None else ce
    flags = wanted | (a is not None) << 3 | (ce is not None) << 4 | (mask is not None) << 5
    passes.loops.small_backward(
        x.data_ptr(), dy.data_ptr(), _address(mask, m), _address(dx, m), m, variance.data_ptr(),
        m if a is None else a, c, e, _address(dgamma, m), _address(dbeta, m), rows, features,
        inner, count, flags, float(epsilon), _MOMENTS_SOURCES[x.dtype], _UPDATE_DTYPES[dtype](0))
    return dx, dgamma, dbeta


def _moments_source(x: Tensor) -> Any:
    """The value type the small inputs' statistics loops read ``x``'s memory as (a bfloat16's
    bits as uint16), or None where they do not take it: numba missing, a dtype they do not
    read, not on CPU, over ``MIN_PLAIN_NUMEL`` values (ATen's pass on its threads), not
    contiguous, or recorded by autograd."""
    source = _MOMENTS_SOURCES.get(x.dtype)
    if (source is None or not available() or x.device.type != "cpu"
            or x.numel() > MIN_PLAIN_NUMEL or not x.is_contiguous()
            or x.requires_grad and torch.is_grad_enabled()):
        return None
    return source


def _stepper(momentum: float | None, kind: type, updates: Tensor) -> Callable[[], Any]:
    """The update's weight, as ``torch.lerp`` rounds a Python weight in the averages' dtype
    ``kind``: ``1 - momentum``; for the cumulative average (``momentum=None``) float32's
    ``1 / (n + 1)``, ``n`` read from the counter's memory at each call."""
    if momentum is not None:
        weight = kind(1.0 - momentum)
        return lambda: weight
    counter, one = updates.numpy(), np.float32(1)
    return lambda: kind(one / np.float32(counter[()] + 1))


def _written(tensors: tuple[Tensor, ...], applied: bool) -> bool:
    """``applied``, after telling autograd that a loop wrote ``tensors`` through their
    addresses (as torch's own writes would) where it did."""
    if applied:
        increment_version(tensors)
    return applied


class NumbaPasses:
    """The four passes as numba loops on CPU memory (:mod:`batchnorm.kernels.cpu.passes`)."""

    def layout(self, x: Tensor, axis: int, config: BatchNormConfig) -> Layout:
        return Layout(x, axis, config.virtual_batch_size, config.ghost_layout)

    mask = staticmethod(mask_array)
    moments = staticmethod(moments_pass)

    def affine(self, x3: Tensor, layout: Layout, a: Tensor, b: Tensor, y3: Tensor,
               activation: str | None = None) -> Tensor:
        return affine_pass(x3, layout, a, b, y3, activation)

    grad_sums = staticmethod(grad_sums_pass)
    grad_input = staticmethod(grad_input_pass)


NUMBA_PASSES = NumbaPasses()


CPU = CpuKernel()


def warm_up() -> float:
    """Compile (or load from numba's on-disk cache) every loop; return the seconds it took."""
    start = time.perf_counter()
    for dtype in DTYPES:
        for shape, size in (((4, 3, 5), None), ((8, 3), None), ((4, 3, 5), 2)):
            x = torch.randn(shape).to(dtype).requires_grad_()
            state = BatchNormState(torch.zeros(3), torch.ones(3),
                                   torch.zeros((), dtype=torch.int64))
            for activation in (None, *ACTIVATIONS):
                config = BatchNormConfig(virtual_batch_size=size, activation=activation)
                for mask in (None, torch.ones(shape, dtype=torch.bool)):
                    call = KernelCall(config, (1,), torch.ones(3, requires_grad=True),
                                      torch.zeros(3, requires_grad=True), mask)
                    y, _ = CPU.train(x, state, call)
                    y.sum().backward()
        stat = statistics_dtype(dtype)  # the moving-average loop
        prepare_update(initial_state(3, dtype=stat), BatchNormConfig(), stat, 8).apply(
            BatchStatistics(torch.zeros(1, 3, dtype=stat), torch.ones(1, 3, dtype=stat), 8),
            None)
        renorm_state = initial_state(3, dtype=stat, renorm=True)
        prepare_update(renorm_state, BatchNormConfig(renorm=True), stat, 8).apply(
            BatchStatistics(torch.zeros(1, 3, dtype=stat), torch.ones(1, 3, dtype=stat), 8),
            None)  # the renorm state's loops
        correction = CPU.prepare_renorm_correction(renorm_state, BatchNormConfig(renorm=True),
                                                  stat)
        if correction is not None:  # renorm's (r, d)
            correction(torch.zeros(3, dtype=stat), torch.ones(3, dtype=stat))
        for shape in ((8, 3), (4, 3, 5)):  # the small inputs' loops: statistics, masked,
            x = torch.randn(shape).to(dtype)  # renorm's (the folded kernel's)
            CPU.moments(x)
            shape3 = (shape[0], 3, x.numel() // (3 * shape[0]))
            selected = torch.ones(shape3[0] * shape3[2], dtype=torch.bool)
            masked = CPU.masked_forward(x, shape3, selected, None, None, 1e-3)
            if masked is not None:
                CPU.masked_backward(x, shape3, x, selected, masked[1], masked[2], None,
                                    masked[4], 7, 1e-3)
            loops = CPU.prepare_folded(x, renorm_state, KernelCall(
                BatchNormConfig(renorm=True), (1,)))
            if loops is not None:
                y, mean, variance, terms = loops.forward(x, None)
                loops.backward(x, y, mean, variance, terms, 7)
        debiased = CPU.debiased(initial_state(3, dtype=stat, debias=True), 0.99, fresh=True)
        if debiased is not None:  # the debiased inference statistics' loop
            debiased()
    return time.perf_counter() - start
