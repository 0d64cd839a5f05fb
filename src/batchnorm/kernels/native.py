"""The plain training mode on ATen's fused batch-norm kernel (one pass for the statistics,
one for the output, and a fused backward); an ``activation`` is one more pass after it
(ReLU in place: ATen's backward does not read its output, so nothing more is kept)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import values_per_feature
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import PreparedUpdate, traced
from .protocol import KernelCall, PreparedTraining, TrainingKernel, unprepared

__all__ = ["NATIVE", "NativeCall", "NativeKernel", "Workspace", "aten_input",
           "gradient_read_right", "misread_by_cpu_backward", "misreads_gradients", "updating"]


class NativeKernel:
    """ATen's ``native_batch_norm``: the plain mode with one feature axis, any device."""

    name = "native"

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        reason = call.config.unfused_reason(masked=call.mask is not None,
                                            synchronized=call.process_group is not None)
        return None if reason is None else reason.removeprefix("for ")

    def prefers_fallback(self, x: Tensor, call: KernelCall, fallback: TrainingKernel) -> bool:
        return False

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        prepared = self.prepared(x, call)
        if prepared is not None:
            return prepared.train(x)
        # traced: torch.func transforms cannot write into the unbatched running statistics
        (axis,) = call.axes
        xm = aten_input(x if axis == 1 else x.movedim(axis, 1), call.gamma, call.beta)
        gamma, beta = _parameters(x, axis, call.gamma, call.beta)
        y, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(
            xm, gamma, beta, True, 0.0, call.config.epsilon)
        if misreads_gradients(xm):
            y = gradient_read_right(y)
        # The kernel keeps 1 / sqrt(var + eps); the biased variance is recovered from it.
        variance = invstd.detach().pow(-2).sub_(call.config.epsilon).clamp_min_(0.0)
        y = _activated(y, call.config.activation)
        y = y if axis == 1 else y.movedim(1, axis)
        return y, BatchStatistics(mean.detach()[None], variance[None],
                                  values_per_feature(x, call.axes))

    def prepare(self, x: Tensor, state: BatchNormState, call: KernelCall,
                update: PreparedUpdate | None = None) -> PreparedTraining:
        """:class:`NativeCall` for ``x``'s signature; where the update has a direct loop (CPU),
        ATen's statistics go from this thread's workspace straight into it (see
        :meth:`TrainingKernel.prepare`)."""
        native = self.prepared(x, call)
        if native is None:
            return unprepared(self, state, call)
        return updating(native.train, partial(native, borrow=True),  # no Python frame
                        None if update is None else update.direct,
                        # Skipped: the statistics leave the workspace, for the report.
                        lambda mean, variance: BatchStatistics(mean[None],
                                                               variance.clone()[None],
                                                               native.count))

    def prepared(self, x: Tensor, call: KernelCall) -> NativeCall | None:
        """The kernel for inputs of ``x``'s shape, dtype and device, decided once; None when
        ``x`` is traced or has one value per feature (no unbiased variance to move)."""
        if values_per_feature(x, call.axes) < 2 or traced(x):
            return None
        return NativeCall(x, call)


class NativeCall:
    """ATen's kernel for inputs like ``x``: ``call(x) -> (y, mean, variance)``, the batch's
    mean and biased variance 1-D, contiguous, in :func:`statistics_dtype` of the input.

    ATen moves "running" statistics it is given by momentum * (batch statistic, the
    unbiased variance) + (1 - momentum) * running. From zeros with momentum (n - 1) / n
    that is the biased variance, written by the kernel itself, exact even far below
    ``epsilon`` (recovering it from ``1 / sqrt(var + eps)`` would not be).
    """

    __slots__ = ("axis", "gamma", "beta", "cast", "epsilon", "activation", "features",
                 "statistics_dtype", "count", "momentum", "device", "workspace", "copy",
                 "hook")

    def __init__(self, x: Tensor, call: KernelCall) -> None:
        (self.axis,) = call.axes
        xm = x if self.axis == 1 else x.movedim(self.axis, 1)
        # Inputs of these strides (and grad mode, requires_grad) need a contiguous copy.
        xm_aten = aten_input(xm, call.gamma, call.beta)
        self.copy = xm_aten is not xm
        # Shapes with a size-1 dimension may have upstream gradients ATen misreads: a hook.
        self.hook = misreads_gradients(xm_aten)
        self.features = x.shape[self.axis]
        self.statistics_dtype = statistics_dtype(x.dtype)
        self.gamma, self.beta = call.gamma, call.beta
        self.cast = any(t is not None and t.dtype != self.statistics_dtype
                        for t in (call.gamma, call.beta))
        if not self.cast:
            self.gamma, self.beta = _parameters(x, self.axis, call.gamma, call.beta)
        self.epsilon = call.config.epsilon
        self.activation = call.config.activation
        self.count = values_per_feature(x, call.axes)
        self.momentum = (self.count - 1) / self.count
        self.device = x.device
        self.workspace: Workspace | None = None

    def __call__(self, x: Tensor, borrow: bool = False,
                 affine: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, variance)``. With ``borrow`` the variance is this thread's workspace,
        valid until the next borrowing call on the thread (read it, or copy it, at once);
        else a fresh tensor. ``affine``: the weight and bias for this call in place of the
        call's gamma and beta (the folded kernel's terms)."""
        axis = self.axis
        # ATen normalizes along dim 1; moving another axis there is a view (channels-last
        # layouts keep their fast path).
        xm = x if axis == 1 else x.movedim(axis, 1)
        if self.copy:
            xm = xm.contiguous()
        if affine is None:
            gamma, beta = self.gamma, self.beta
            if self.cast:
                gamma, beta = _parameters(x, axis, gamma, beta)
        else:
            gamma, beta = _parameters(x, axis, *affine)
        if borrow:
            workspace = self.workspace
            if workspace is None:
                workspace = self.workspace = Workspace(self.features, self.statistics_dtype,
                                                        self.device)
            workspace.zeros.zero_()
            unused, variance = workspace.mean, workspace.variance
        else:
            unused, variance = torch.zeros(2, self.features, dtype=self.statistics_dtype,
                                           device=self.device).unbind()
        # torch.native_batch_norm, not torch.ops.aten's overload packet: the public binding
        # costs about 2 us less per call.
        y, mean, _ = torch.native_batch_norm(xm, gamma, beta, unused, variance, True,
                                             self.momentum, self.epsilon)
        if self.hook:
            y = gradient_read_right(y)
        y = _activated(y, self.activation)
        return (y if axis == 1 else y.movedim(1, axis)), mean, variance

    def train(self, x: Tensor) -> tuple[Tensor, BatchStatistics]:
        """:meth:`NativeKernel.train`'s result: ``(y, stats)``, the statistics fresh."""
        y, mean, variance = self(x)
        return y, BatchStatistics(mean.detach()[None], variance[None], self.count)


class Workspace(threading.local):
    """The running statistics ATen's kernel writes into, kept per thread (concurrent calls
    must not share them) and zeroed before each use through ``zeros``, a view that shares
    their memory but not their version counter: autograd saved the earlier call's views
    (ATen's backward takes them, and reads them only in inference mode), and a version bump
    would fail that call's backward."""

    def __init__(self, features: int, dtype: torch.dtype, device: torch.device) -> None:
        # A normal tensor even when first used under torch.inference_mode(): an inference
        # tensor could not be zeroed by a later call outside it.
        with torch.inference_mode(False):
            running = torch.zeros(2, features, dtype=dtype, device=device)
        self.mean, self.variance = running.unbind()
        self.zeros = running.data


def aten_input(x: Tensor, gamma: Tensor | None, beta: Tensor | None) -> Tensor:
    """``x`` (features along dim 1) as ATen's batch-norm kernels should be given it: itself,
    or a contiguous copy where their backward would run and misread its gradients
    (:func:`misread_by_cpu_backward`).

    >>> x = torch.randn(8, 4, 16).transpose(1, 2).unsqueeze(-1).requires_grad_()
    >>> aten_input(x, None, None).stride(), aten_input(x.detach(), None, None).stride()
    ((64, 4, 1, 1), (64, 1, 16, 1))
    """
    if (misread_by_cpu_backward(x) and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (x, gamma, beta))):
        return x.contiguous()
    return x


def misread_by_cpu_backward(x: Tensor) -> bool:
    """Whether ATen's CPU batch-norm backward (training and inference) computes wrong input,
    gamma and beta gradients for an input of ``x``'s strides, features along dim 1.

    That is a 4-D (5-D) ``x`` dense in channels-last order but not in NCHW order, which
    ``suggest_memory_format`` still calls contiguous because of the strides of its size-1
    dimensions: ``torch.randn(8, 4, 16).transpose(1, 2).unsqueeze(-1)``, shape
    ``(8, 16, 4, 1)``, strides ``(64, 1, 16, 1)``. The backward then takes its pointer path
    for an NCHW-contiguous gradient (the formats it suggests agree) but reads the input as
    channels-last and the gradient as if it were laid out the same. Channels-last inputs
    whose strides say so (``x.contiguous(memory_format=torch.channels_last)``, size-1
    dimensions or not) are read right.

    >>> misread_by_cpu_backward(torch.randn(8, 4, 16).transpose(1, 2).unsqueeze(-1))
    True
    >>> misread_by_cpu_backward(torch.randn(8, 16, 4, 1).contiguous(
    ...     memory_format=torch.channels_last))
    False
    """
    if x.device.type != "cpu" or x.ndim not in (4, 5) or x.is_contiguous():
        return False
    channels_last = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    return x.is_contiguous(memory_format=channels_last) and not _channels_last_strides(x)


def misreads_gradients(x: Tensor) -> bool:
    """Whether ATen's CPU batch-norm backward, given ``x`` (features along dim 1, as
    :func:`aten_input` gives it), misreads upstream gradients of some strides: the input is
    read in NCHW order, and a gradient that :func:`misread_by_cpu_backward` names (dense in
    channels-last order only, yet called NCHW) is read as if it were NCHW-contiguous. Such
    gradients need a size-1 dimension, so shapes without one never get a hook
    (:func:`gradient_read_right`): decide it once per input signature.

    >>> misreads_gradients(torch.randn(8, 16, 4, 1)), misreads_gradients(torch.randn(8, 16, 4, 2))
    (True, False)
    """
    return (x.ndim in (4, 5) and 1 in x.shape and x.device.type == "cpu"
            and x.is_contiguous())


def gradient_read_right(y: Tensor) -> Tensor:
    """``y``, the output of ATen's batch-norm kernel on an input that
    :func:`misreads_gradients`, with a hook that hands ATen's backward a contiguous copy of
    an upstream gradient it would misread (others pass unchanged); ``y`` as it is where
    autograd does not record it.

    >>> x = torch.randn(8, 16, 4, 1, requires_grad=True)
    >>> y = gradient_read_right(torch.batch_norm(x, None, None, None, None, True, 0.1, 1e-3,
    ...                                          False))
    >>> w = torch.randn(8, 4, 16).transpose(1, 2).unsqueeze(-1)  # strides (64, 1, 16, 1)
    >>> (y * w).sum().backward()  # ATen's backward reads w.contiguous()
    """
    if y.requires_grad:
        y.register_hook(_contiguous_if_misread)
    return y


def _contiguous_if_misread(dy: Tensor) -> Tensor | None:
    return dy.contiguous() if misread_by_cpu_backward(dy) else None


def _channels_last_strides(x: Tensor) -> bool:
    """c10's ``is_channels_last_strides_2d``/``_3d``, on which ``suggest_memory_format``
    decides: the strides grow from C over the spatial dimensions (innermost first) to N,
    ambiguous cases (size-1 dimensions with equal strides) counted as NCHW."""
    shape, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, *range(x.ndim - 1, 1, -1), 0):
        if shape[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * (shape[d] if shape[d] > 1 else 1)
    return True


def _parameters(x: Tensor, axis: int, gamma: Tensor | None,
                beta: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """gamma and beta as ATen's kernel takes them: in the input's statistics dtype (ATen
    refuses mixed float32/float64, "mixed dtype (CPU)"), and present for half-precision
    inputs (ATen keeps its statistics in the parameters' dtype: float32 parameters make it
    accumulate and return float32 statistics)."""
    dtype = statistics_dtype(x.dtype)
    if x.dtype in (torch.float16, torch.bfloat16):
        features = x.shape[axis]
        if gamma is None:
            gamma = torch.ones(features, device=x.device)
        if beta is None:
            beta = torch.zeros(features, device=x.device)
    if gamma is not None and gamma.dtype != dtype:
        gamma = gamma.to(dtype)
    if beta is not None and beta.dtype != dtype:
        beta = beta.to(dtype)
    return gamma, beta


def _activated(y: Tensor, activation: str | None) -> Tensor:
    """y is fresh: ReLU overwrites it (its backward reads y)."""
    return y if activation is None else activate(y, activation, inplace=activation == "relu")


NATIVE = NativeKernel()


def updating(train: Callable[[Tensor], tuple[Tensor, BatchStatistics]],
             compute: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]],
             direct: Callable[[Tensor, Tensor], bool] | None,
             statistics: Callable[[Tensor, Tensor], BatchStatistics]) -> PreparedTraining:
    """A kernel's prepared call (:meth:`~batchnorm.kernels.protocol.TrainingKernel.prepare`)
    from its parts (ATen's kernels', here: on a training call's path): without a
    ``direct`` update (:class:`batchnorm.statistics.PreparedUpdate`), ``train(x) -> (y,
    stats)``, the update left to the caller; with one, ``compute(x) -> (y, mean, variance)``
    whose statistics go straight into it, and ``statistics(mean, variance)`` the report of a
    batch it skipped."""
    if direct is None:
        def run(x: Tensor) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
            y, stats = train(x)
            return y, stats, None
        return run

    def run_and_update(x: Tensor) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
        y, mean, variance = compute(x)
        if direct(mean, variance):
            return y, None, True
        return y, statistics(mean, variance), False
    return run_and_update
