"""What a kernel is: the :class:`TrainingKernel` protocol and the :class:`KernelCall` it
receives; a device's single inference pass (:class:`InferencePass`, registered in
:data:`INFERENCE_PASSES`) and statistics pass for small inputs (:class:`MomentsPass`, in
:data:`MOMENTS_PASSES`).

A training kernel normalizes a batch with its own statistics and returns them:
``kernel.train(x, state, call) -> (y, stats)``. Every kernel computes the same
thing (the composite kernel is the definition; the tests compare the others to
it); they differ in which calls they can take (:meth:`TrainingKernel.unsupported`)
and in speed (:meth:`TrainingKernel.prefers_fallback`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast, runtime_checkable

from torch import Tensor

from ..config import BatchNormConfig
from ..state import BatchNormState, BatchStatistics
from ..statistics import PreparedUpdate

__all__ = ["INFERENCE_PASSES", "MODES", "MOMENTS_PASSES", "Fallback", "FoldedLoops",
           "InferencePass", "KernelCall", "MomentsPass", "PreparedTraining", "TrainingKernel",
           "Unprepared", "unprepared"]


class KernelCall(NamedTuple):
    """The per-call values a kernel needs besides the input and the state.

    ``axes`` are the resolved (sorted, non-negative) feature axes of this input;
    ``process_group`` is the ``torch.distributed`` group the statistics are
    synchronized over, or None for local statistics.
    """

    config: BatchNormConfig
    axes: tuple[int, ...]
    gamma: Tensor | None = None
    beta: Tensor | None = None
    mask: Tensor | None = None
    process_group: Any = None


# A prepared training call: ``run(x) -> (y, stats, applied)`` (see TrainingKernel.prepare).
PreparedTraining = Callable[[Tensor],
                            tuple[Tensor, "BatchStatistics | None", "Tensor | bool | None"]]


@runtime_checkable
class TrainingKernel(Protocol):
    """A training-mode kernel. Implementations: ``composite`` (every mode), ``native`` (ATen's
    fused kernel, the plain mode), ``cpu`` (numba loops; every mode but adjustment)."""

    name: str

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        """Normalize ``x`` with its batch statistics; return ``(y, stats)``."""
        ...

    def prepare(self, x: Tensor, state: BatchNormState, call: KernelCall,
                update: PreparedUpdate | None = None) -> PreparedTraining:
        """:meth:`train` for inputs of ``x``'s signature (shape, strides, dtype, device,
        ``requires_grad``, grad mode) with ``state``'s and ``call``'s tensors, with what does
        not depend on the values decided once (the layer's per-signature plan keeps it):
        ``run(x) -> (y, stats, applied)``.

        ``update`` is the moving-average update prepared for the call
        (:func:`batchnorm.statistics.prepare_update`). A kernel that can apply it more
        cheaply itself (ATen's kernel on CPU hands its statistics straight to the update's
        loop) returns what it returned as ``applied``, and ``stats`` None when the batch
        entered the averages; otherwise ``applied`` is None and the caller applies the
        update to ``stats``. :func:`unprepared` is the form that decides nothing."""
        ...

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        """Why this kernel cannot compute the call (``"several feature axes"``, ...), or None."""
        ...

    def prefers_fallback(self, x: Tensor, call: KernelCall, fallback: TrainingKernel) -> bool:
        """For a fast path: whether ``fallback``, the kernel that computes the call where the
        fast path steps aside (the first of :data:`batchnorm.kernels.FALLBACKS` that takes
        it), is faster for this call, e.g. a small input."""
        ...


class InferencePass(Protocol):
    """A device's inference loop: ``y = act(x * inv + shift)`` in one pass over memory, for
    per-feature ``inv``/``shift`` (the CPU kernel's numba loop). :mod:`batchnorm.kernels.inference`
    finds it in :data:`INFERENCE_PASSES` under the input's device type."""

    def affine(self, x: Tensor, inv: Tensor, shift: Tensor,
               activation: str | None = None) -> Tensor | None:
        """``x * inv + shift`` (``act(x * inv + shift)`` with an ``activation``), ``inv`` and
        ``shift`` broadcast along one axis of ``x``; None where the pass does not apply (no
        gradient, layouts, dtypes, sizes: the caller computes it then)."""
        ...

    def fuses_activation(self, x: Tensor) -> bool:
        """Whether for an input of ``x``'s size this pass with the activation is the faster
        (else ATen's kernel and the activation in place on its output)."""
        ...

    def debiased(self, state: BatchNormState, momentum: float,
                 fresh: bool) -> Callable[[], tuple[Tensor, Tensor]] | None:
        """``statistics() -> (mean, variance)``: the debiased moving averages of ``state``
        (:func:`batchnorm.statistics.inference_statistics`) computed on the device, decided
        once for the state's tensors; new tensors at each call where ``fresh``. None where
        the device's loop does not apply to this state."""
        ...


class MomentsPass(Protocol):
    """A device's statistics pass for small inputs: the batch's mean and biased variance in
    one call (the CPU kernel's numba loop), where a library's kernel costs more per call.
    :mod:`batchnorm.kernels.folded` finds it in :data:`MOMENTS_PASSES` under the input's
    device type."""

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The mean and biased variance over every dimension of ``x`` but dim 1 (the
        features), 1-D in the statistics dtype (float32 for half-precision inputs), new
        tensors; None where the pass does not apply (layouts, dtypes, sizes, gradients: the
        caller computes them then)."""
        ...

    def masked_forward(self, x: Tensor, shape: tuple[int, int, int], selected: Tensor,
                       gamma: Tensor | None, beta: Tensor | None, epsilon: float
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, int] | None:
        """The masked kernel's training output of a contiguous input read as ``shape``,
        ``(rows, features, inner)`` (:mod:`batchnorm.kernels.masked`): ``(y, mean,
        variance, counts, count)``, the statistics (1-D, the statistics dtype) of the values
        ``selected`` selects (a contiguous boolean tensor of ``rows * inner`` values, one
        per position of a feature, the same for every feature), how many each has (a
        ``(1, features)`` tensor and an int); ``y`` is written only where the count is 2 or
        more. None where the pass does not apply."""
        ...

    def masked_backward(self, x: Tensor, shape: tuple[int, int, int], dy: Tensor,
                        selected: Tensor, mean: Tensor, variance: Tensor, gamma: Tensor | None,
                        count: int, wanted: int, epsilon: float
                        ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The gradients of :meth:`masked_forward`'s output: ``(dx, dgamma, dbeta)``, each
        None unless ``wanted`` asks for it (bit 0 dx, 1 dgamma, 2 dbeta)."""
        ...

    def prepare_folded(self, x: Tensor, state: BatchNormState, call: KernelCall
                       ) -> FoldedLoops | None:
        """The folded kernel's whole training call (:mod:`batchnorm.kernels.folded`) for
        small inputs of ``x``'s signature, with ``state``'s renorm averages and ``call``'s
        gamma and beta: one loop forward and one backward, what depends on the signature
        decided once; None where it does not apply (layouts, dtypes, an activation)."""
        ...


class FoldedLoops(NamedTuple):
    """A device's folded call for small inputs (:meth:`MomentsPass.prepare_folded`).

    ``fits(adjust)``: whether ``forward`` takes the adjustment's per-feature terms (their
    dtype and strides). ``forward(x, adjust) -> (y, mean, variance, terms)``: the output,
    the batch's mean and biased variance, and ``terms``' rows ``a = c * gamma``, the factor
    ``c`` and the offset ``e`` on ``xhat`` (renorm's ``(r, d)`` composed with the
    adjustment's terms). ``backward(x, dy, mean, variance, terms, wanted) -> (dx, dgamma,
    dbeta)``, each None unless ``wanted`` asks for it (bit 0 dx, 1 dgamma, 2 dbeta), ``c``
    and ``e`` constants.
    """

    fits: Callable[[tuple[Tensor, Tensor] | None], bool]
    forward: Callable[[Tensor, tuple[Tensor, Tensor] | None],
                      tuple[Tensor, Tensor, Tensor, Tensor]]
    backward: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int],
                       tuple[Tensor | None, Tensor | None, Tensor | None]]


# Device type -> its statistics pass for small inputs. Filled by batchnorm.kernels beside
# FAST_PATHS (from the same kernels).
MOMENTS_PASSES: dict[str, MomentsPass] = {}


# Device type -> its inference pass. Filled by batchnorm.kernels beside FAST_PATHS (from the
# same kernels); held here so that the inference module, which the kernels import, reaches
# a device's loop without importing it.
INFERENCE_PASSES: dict[str, InferencePass] = {}


class Unprepared:
    """For a kernel that decides nothing ahead of a call: :meth:`TrainingKernel.prepare` as
    :func:`unprepared`."""

    def prepare(self, x: Tensor, state: BatchNormState, call: KernelCall,
                update: PreparedUpdate | None = None) -> PreparedTraining:
        return unprepared(cast(TrainingKernel, self), state, call)


def unprepared(kernel: TrainingKernel, state: BatchNormState,
               call: KernelCall) -> PreparedTraining:
    """:meth:`TrainingKernel.prepare`'s result for a kernel that decides nothing ahead:
    ``run(x) = (*kernel.train(x, state, call), None)``, the update left to the caller."""
    def run(x: Tensor) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
        y, stats = kernel.train(x, state, call)
        return y, stats, None
    return run


# The modes a fallback kernel may decline, in the order it names them: mode -> (how the
# reason reads, whether a call is in that mode).
MODES: dict[str, tuple[str, Callable[[KernelCall], bool]]] = {
    "synchronized": ("synchronized statistics", lambda call: call.process_group is not None),
    "ghost": ("ghost batches (virtual_batch_size)",
              lambda call: call.config.virtual_batch_size is not None),
    "renorm": ("renorm", lambda call: call.config.renorm),
    "adjustment": ("an adjustment", lambda call: call.config.adjustment is not None),
    "mask": ("a mask", lambda call: call.mask is not None),
    "several axes": ("several feature axes", lambda call: len(call.axes) != 1),
}


class Fallback:
    """For a fallback kernel (:data:`batchnorm.kernels.FALLBACKS`) that decides its call
    ahead (:meth:`TrainingKernel.prepare`): it never prefers another, and
    :meth:`TrainingKernel.train` is its prepared call without an update.

    ``takes`` names the :data:`MODES` it computes; :meth:`declined_mode` says the first
    other mode a call is in.
    """

    takes: frozenset[str] = frozenset()

    def declined_mode(self, call: KernelCall) -> str | None:
        """The reason for :meth:`TrainingKernel.unsupported` when ``call`` is in a mode
        this kernel does not take, else None."""
        return next((reason for mode, (reason, applies) in MODES.items()
                     if mode not in self.takes and applies(call)), None)

    def prefers_fallback(self, x: Tensor, call: KernelCall, fallback: TrainingKernel) -> bool:
        return False

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        y, stats, _ = cast(TrainingKernel, self).prepare(x, state, call)(x)
        assert stats is not None  # no update given: the statistics are returned
        return y, stats
