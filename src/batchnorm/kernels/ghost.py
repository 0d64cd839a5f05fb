"""Ghost batches on ATen's fused batch-norm kernel: each (ghost batch, feature) pair is one of
its channels.

tf_keras splits a batch of ``N`` samples into ``G = N // virtual_batch_size`` ghost batches
(sample ``n`` in group ``n % G``; ``ghost_layout="consecutive"``: ``n // virtual_batch_size``)
and normalizes each with its own statistics. Viewed as ``(virtual_batch_size, G * C, ...)``,
the batch is a plain batch of ``G * C`` channels, channel ``g * C + c`` holding feature ``c``
of group ``g``: ATen's kernel computes every group's statistics and the output in its two
passes, with ``gamma`` and ``beta`` repeated ``G`` times, and its backward is the ghost
batches' backward. For a contiguous input in the strided layout that view costs nothing;
otherwise the input is copied into it and the output back (cheap at the sizes this kernel
is chosen for: :func:`batchnorm.plan.select` gives larger inputs to the device's fast path).

The statistics are the composite kernel's, per group and feature (a ``(G, C)``
:class:`~batchnorm.state.BatchStatistics`, ``virtual_batch_size`` times the other axes'
values per group); a prepared call hands them, group after group, straight to the update's
direct loop where the device has one (CPU), which pools them as
:func:`batchnorm.statistics.pooled_statistics` does.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ..activations import apply as activate
from ..shapes import values_per_feature
from ..state import BatchNormState, BatchStatistics, statistics_dtype
from ..statistics import PreparedUpdate, traced
from .native import Workspace, aten_input, gradient_read_right, misreads_gradients, updating
from .protocol import Fallback, KernelCall, PreparedTraining

__all__ = ["GHOST", "GhostCall", "GhostKernel"]


class GhostKernel(Fallback):
    """Ghost batches without renorm or a mask, one feature axis, any device: ATen's
    ``native_batch_norm`` on the ``(virtual_batch_size, groups * C, ...)`` view."""

    name = "ghost"
    takes = frozenset({"ghost"})

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        if call.config.virtual_batch_size is None:
            return "no ghost batches (ATen's kernel computes the plain mode itself)"
        declined = self.declined_mode(call)
        if declined is not None:
            return declined
        if traced(x):
            return "tracing (torch.compile or torch.func)"
        return None

    def prepare(self, x: Tensor, state: BatchNormState, call: KernelCall,
                update: PreparedUpdate | None = None) -> PreparedTraining:
        """:class:`GhostCall` for ``x``'s signature; where the update has a direct loop (CPU),
        the groups' statistics go straight into it (see
        :meth:`~batchnorm.kernels.protocol.TrainingKernel.prepare`)."""
        ghost = GhostCall(x, call)
        return updating(ghost.train, partial(ghost, borrow=True),
                        None if update is None else update.direct,
                        # Skipped: the statistics leave the workspace, for the report.
                        lambda mean, variance: ghost.statistics(mean, variance.clone()))


class GhostCall:
    """ATen's kernel for ghost batches of inputs like ``x``: ``call(x) -> (y, mean,
    variance)``, each group's mean and biased variance of each feature (``groups * C``
    values, group after group, contiguous, in :func:`statistics_dtype` of the input), decided
    once for the input's shape, strides, dtype and device."""

    __slots__ = ("axis", "size", "groups", "strided", "features", "dtype", "gamma", "beta",
                 "identity", "epsilon", "activation", "count", "momentum", "grouped_shape",
                 "workspace", "copy", "hook", "restore")

    def __init__(self, x: Tensor, call: KernelCall) -> None:
        config = call.config
        (self.axis,) = call.axes
        size = config.virtual_batch_size
        assert size is not None  # the kernel takes ghost batches only (unsupported)
        self.size: int = size
        self.groups = x.shape[0] // size
        self.strided = config.ghost_layout == "strided"
        self.features = x.shape[self.axis]
        self.dtype = statistics_dtype(x.dtype)
        self.gamma, self.beta = call.gamma, call.beta
        channels = self.groups * self.features
        # ATen keeps its statistics in the parameters' dtype: float32 ones and zeros make it
        # accumulate half-precision inputs in float32 (as NativeKernel's parameters do).
        self.identity = None
        if x.dtype in (torch.float16, torch.bfloat16) and (self.gamma is None
                                                           or self.beta is None):
            self.identity = (torch.ones(channels, device=x.device),
                             torch.zeros(channels, device=x.device))
        self.epsilon = config.epsilon
        self.activation = config.activation
        self.count = values_per_feature(x, call.axes) // self.groups
        self.momentum = (self.count - 1) / self.count
        rest = [n for d, n in enumerate(x.shape) if d not in (0, self.axis)]
        self.grouped_shape = (self.size, channels, *rest)
        self.workspace: Workspace | None = None  # for borrowing calls (see __call__)
        grouped = self._grouped(x)
        aten = aten_input(grouped, self.gamma, self.beta)
        self.copy = aten is not grouped
        self.hook = misreads_gradients(aten)
        # The output is copied into x's memory order where ungrouping ATen's does not give it.
        self.restore = False
        y = torch.native_batch_norm(
            torch.empty_strided(aten.shape, aten.stride(), dtype=aten.dtype, device="meta"),
            None, None, None, None, True, 0.0, 1.0)[0]
        self.restore = (self._ungrouped(y, x).stride()
                        != torch.empty_like(x, device="meta").stride())

    def _grouped(self, x: Tensor) -> Tensor:
        """``x`` as ``(virtual_batch_size, groups * C, ...)``, channel ``g * C + c`` holding
        feature ``c`` of group ``g`` (a view where the strides allow)."""
        xm = x if self.axis == 1 else x.movedim(self.axis, 1)
        if self.strided:  # sample b * groups + g: (N, C, ...) read as (size, groups * C, ...)
            return xm.reshape(self.grouped_shape)
        # sample g * size + b
        xm = xm.reshape(self.groups, self.size, self.features, *self.grouped_shape[2:])
        return xm.transpose(0, 1).reshape(self.grouped_shape)

    def _ungrouped(self, y: Tensor, x: Tensor) -> Tensor:
        """The inverse of :meth:`_grouped`, in ``x``'s memory order."""
        rest = self.grouped_shape[2:]
        if not self.strided:
            y = y.reshape(self.size, self.groups, self.features, *rest).transpose(0, 1)
        y = y.reshape(x.shape[0], self.features, *rest)
        y = y if self.axis == 1 else y.movedim(1, self.axis)
        return torch.empty_like(x).copy_(y) if self.restore else y

    def _repeated(self, t: Tensor | None, index: int) -> Tensor | None:
        if t is None:
            return None if self.identity is None else self.identity[index]
        t = torch.cat((t,) * self.groups)  # about 3 us, where repeat() takes 12
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def __call__(self, x: Tensor, borrow: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(y, mean, variance)``. With ``borrow`` the variance is this thread's workspace,
        valid until the next borrowing call on the thread (as
        :class:`~batchnorm.kernels.native.NativeCall`'s); else a fresh tensor."""
        xg = self._grouped(x)
        if self.copy:
            xg = xg.contiguous()
        gamma, beta = self._repeated(self.gamma, 0), self._repeated(self.beta, 1)
        # From zeros with momentum (n - 1) / n, ATen's "running" variance is the biased
        # variance of each channel (see native.NativeCall); its running mean goes unread.
        if borrow:
            workspace = self.workspace
            if workspace is None:
                workspace = self.workspace = Workspace(self.grouped_shape[1], self.dtype,
                                                        x.device)
            workspace.zeros.zero_()
            unused, variance = workspace.mean, workspace.variance
        else:
            unused, variance = torch.zeros(2, self.grouped_shape[1], dtype=self.dtype,
                                           device=x.device).unbind()
        y, mean, _ = torch.native_batch_norm(xg, gamma, beta, unused, variance, True,
                                             self.momentum, self.epsilon)
        if self.hook:
            y = gradient_read_right(y)
        if self.activation is not None:  # y is fresh: ReLU in place (its backward reads y)
            y = activate(y, self.activation, inplace=self.activation == "relu")
        return self._ungrouped(y, x), mean, variance

    def statistics(self, mean: Tensor, variance: Tensor) -> BatchStatistics:
        """:meth:`__call__`'s statistics as a ``(groups, C)`` :class:`BatchStatistics`."""
        shape = (self.groups, self.features)
        return BatchStatistics(mean.detach().view(shape), variance.view(shape), self.count)

    def train(self, x: Tensor) -> tuple[Tensor, BatchStatistics]:
        """:meth:`GhostKernel.train`'s result: ``(y, stats)``."""
        y, mean, variance = self(x)
        return y, self.statistics(mean, variance)


GHOST = GhostKernel()
