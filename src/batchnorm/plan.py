"""A call's checks and kernel choice (:func:`prepare`), and the layer's cache of them
(:class:`CallPlan`).

Before it computes anything, a call checks its input against the options, the
parameters and the state, resolves the feature axes and picks a kernel
(:func:`prepare`). None of that depends on the values in the tensors, only on
their metadata. :class:`batchnorm.BatchNorm` keeps what a call concluded in a
:class:`CallPlan`, under the call's :func:`signature` (the training flag, grad
mode, the input's shape, strides, dtype, device and ``requires_grad``); a later
call with the same signature runs the plan directly while the parameters and
buffers the checks saw are still the layer's, with the same storage, shape,
dtype and ``requires_grad`` (:meth:`CallPlan.current`). Any other call (a new
shape, a replaced or resized parameter, ``reconfigure``, activation
checkpointing's recomputation, a :class:`~batchnorm.DeferredUpdates` block,
``torch.compile`` tracing, ...) takes the full path, which raises every error
it raises, and may leave a new plan. A mask's metadata (shape, strides, dtype,
device) is part of the signature, its values never part of a plan: the checks read
none of them, and a masked plan runs its kernel with each call's mask.

A plan holds what the kernel prepared for the signature
(:meth:`~batchnorm.kernels.protocol.TrainingKernel.prepare`, or the prepared inference
pass) and, in training, the moving-average update prepared for it
(:func:`batchnorm.statistics.prepare_update`: on CPU one numba loop checks the statistics
and moves both averages). The full path runs the same functions, prepared for one call, so
the two cannot drift apart. Neither names a kernel or a device.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .config import BatchNormConfig, check_epsilon
from .kernels import FALLBACKS, FAST_PATHS, PREFERRED
from .kernels.composite import COMPOSITE
from .kernels.inference import infer, prepare_inference
from .kernels.native import NATIVE
from .kernels.protocol import KernelCall, TrainingKernel
from .kernels.synchronized import resolve_group
from .shapes import check_features, check_input, values_per_feature
from .state import BatchNormState, BatchStatistics, state_fields, statistics_dtype
from .statistics import PreparedUpdate, prepare_update

__all__ = ["MAX_PLANS", "CallPlan", "PlannedRun", "Prepared", "Signature", "fingerprint", "prepare",
           "prepare_run", "run", "select", "signature", "synchronization_group"]

# Signatures a layer keeps plans for (a training and an inference shape, a smaller last
# batch, ...); beyond that the layer starts over.
MAX_PLANS = 8


class Prepared(NamedTuple):
    """What :func:`prepare` concluded: the kernel's arguments and the kernel (None: the
    inference pass, for inference or an empty training batch)."""

    call: KernelCall
    kernel: TrainingKernel | None


def prepare(x: Tensor, state: BatchNormState, config: BatchNormConfig, *, training: bool,
            gamma: Tensor | None, beta: Tensor | None, mask: Tensor | None,
            process_group: Any) -> Prepared:
    """Check one call (every check :func:`batchnorm.functional.forward` documents) and pick
    its kernel; nothing is computed and nothing changes."""
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r} "
                        f"({type(training).__name__})")
    if not isinstance(state, BatchNormState):
        raise TypeError(f"state must be a BatchNormState (see initial_state), got "
                        f"{type(state).__name__}")
    group = synchronization_group(config.synchronized, training, process_group)
    axes = check_input(x, config.axis, _feature_shape(state.moving_mean), training=training,
                       virtual_batch_size=config.virtual_batch_size, mask=mask,
                       synchronized=group is not None,
                       feature_source="the shape of state.moving_mean, a layer's moving_mean")
    _check_tensors(x, axes, state, config, gamma, beta)
    if config.virtual_batch_size is not None:
        group = None  # ghost batches stay within each process: synchronized they would grow
    call = KernelCall(config, axes, gamma, beta, mask, group)
    if not training or (group is None and values_per_feature(x, axes) == 0):
        # An empty batch (a detection model's batch without boxes): an empty output whose
        # gradients are zeros, and no statistics, so no update (as PyTorch and tf_keras).
        return Prepared(call, None)
    return Prepared(call, select(x, state, call))


def select(x: Tensor, state: BatchNormState, call: KernelCall) -> TrainingKernel:
    """The kernel that computes this training call, from the registry
    (:mod:`batchnorm.kernels`): ``fused=False`` (or synchronized statistics) the composite;
    ``fused=True`` ATen's kernel; ``fused=None`` the kernel a
    :func:`~batchnorm.kernels.prefer` block forces, else the device's fast path when it
    takes the call and does not prefer the fallback, else the first of
    :data:`~batchnorm.kernels.FALLBACKS` that takes it (ATen's kernel for the plain mode, the
    folded kernel for renorm and adjustment, the ghost kernel for ghost batches, the
    composite for the others).

    Raises ``ValueError`` when ``fused=True`` and ATen's kernel cannot compute it
    (a mask, or synchronized statistics, known only per call).
    """
    fused = call.config.fused
    if fused:
        reason = NATIVE.unsupported(x, state, call)
        if reason is not None:
            raise ValueError(f"fused=True, but there is no fused kernel for {reason}; "
                             "use fused=None to pick the fastest available path")
        return NATIVE
    if fused is False or call.process_group is not None:
        return COMPOSITE
    if PREFERRED and PREFERRED[-1].unsupported(x, state, call) is None:
        return PREFERRED[-1]
    fallback = next(k for k in FALLBACKS if k.unsupported(x, state, call) is None)
    fast = FAST_PATHS.get(x.device.type)
    if (fast is None or fast.prefers_fallback(x, call, fallback)
            or fast.unsupported(x, state, call)):
        return fallback
    return fast


def synchronization_group(synchronized: bool, training: bool, process_group: Any = None
                          ) -> Any:
    """The ``torch.distributed`` group whose global batch gives the statistics, or None for
    local statistics: inference, ``synchronized=False``, or torch.distributed not
    initialized (which warns once)."""
    if not (synchronized and training):
        return None
    return resolve_group(process_group)


def run(x: Tensor, state: BatchNormState,
        prepared: Prepared) -> tuple[Tensor, BatchStatistics | None]:
    """Compute a prepared call: ``(y, stats)``, ``stats`` None without a training kernel."""
    call, kernel = prepared
    if kernel is None:
        return infer(x, state, call), None
    return kernel.train(x, state, call)


_COUNT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})
# "state.moving_mean", ... for every field but num_updates (the third), checked apart.
_STATE_NAMES = tuple(f"state.{f}" for f in BatchNormState._fields if f != "num_updates")
assert BatchNormState._fields[2] == "num_updates"


def _feature_shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _check_tensors(x: Tensor, axes: tuple[int, ...], state: BatchNormState,
                   config: BatchNormConfig, gamma: Tensor | None, beta: Tensor | None) -> None:
    """gamma, beta and the state against the input, before any kernel runs (metadata only)."""
    if config.renorm and (state.moving_stddev is None or state.renorm_mean is None
                          or state.renorm_stddev is None):
        missing = [f for f in state_fields(debias=False, renorm=True) if getattr(state, f) is None]
        raise ValueError(f"renorm=True needs a renorm state ({missing} are None): "
                         "initial_state(..., renorm=True)")
    check_features(x, axes, (("gamma", gamma), ("beta", beta),
                             *zip(_STATE_NAMES, state[:2] + state[3:], strict=True)))
    count = state.num_updates
    if not isinstance(count, Tensor) or count.dtype not in _COUNT_DTYPES or count.ndim:
        shown = (f"a {count.dtype} tensor of shape {tuple(count.shape)}"
                 if isinstance(count, Tensor) else type(count).__name__)
        raise TypeError(f"state.num_updates must be an integer scalar tensor (the update "
                        f"count, int64), got {shown}")
    if count.device != x.device:
        raise ValueError(f"state.num_updates is on {count.device} but the input is on "
                         f"{x.device}: move the state with .to(x.device)")
    if state.moving_mean.dtype == torch.float16:  # float32/64 are checked at construction
        check_epsilon(config.epsilon, torch.float16)


# ---------------------------------------------------------------- the layer's cache


# A call's signature (see signature): the training flag, grad mode, requires_grad, dtype,
# device, shape, strides and the kernel a prefer block forces; for a masked call, then the
# mask's shape, strides, dtype and device.
Signature = tuple[Any, ...]


def signature(x: Tensor, training: bool, mask: Tensor | None = None) -> Signature | None:
    """The key of a call's plan: what its checks and kernel choice depend on besides the
    layer (the training flag, grad mode, the input's shape, strides, dtype, device and
    ``requires_grad``, the kernel a :func:`batchnorm.kernels.prefer` block forces, and a
    ``mask``'s shape, strides, dtype and device: its values never enter the checks); None
    where a call on ``x`` may neither use nor leave a plan: a tensor subclass (``x`` or
    ``mask``), or tracing by ``torch.compile``, ``torch.jit.trace`` or inside a
    ``torch.func`` transform (which see the full path, as they always did), even one that
    captured ``x`` unwrapped: the plan's update writes the buffers' memory, where the
    transform must see (and may refuse) each write."""
    if (type(x) is not Tensor or torch.compiler.is_dynamo_compiling()
            or torch._C._get_tracing_state()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return None
    key = (training, torch.is_grad_enabled(), x.requires_grad, x.dtype, x.device, x.shape,
           x.stride(), PREFERRED[-1] if PREFERRED else None)
    if mask is None:
        return key
    if type(mask) is not Tensor:
        return None  # not a tensor: the full path raises; a subclass: as for x
    return (*key, mask.shape, mask.stride(), mask.dtype, mask.device)


def fingerprint(tensors: Sequence[Tensor | None]) -> list:
    """Storage, shape, dtype and ``requires_grad`` of each tensor (None for None): what a
    plan's checks saw of the layer's parameters and buffers, besides their identity."""
    return [None if t is None else (t.data_ptr(), t.shape, t.dtype, t.requires_grad)
            for t in tensors]


# A plan's run: ``run(x) -> (y, stats, applied)`` (a kernel's prepared call,
# batchnorm.kernels.protocol.PreparedTraining), or ``run(x, mask)`` for a masked signature.
PlannedRun = Callable[..., tuple[Tensor, BatchStatistics | None, Tensor | bool | None]]


class CallPlan:
    """One input signature's call of one layer, checked once: ``run(x) -> (y, stats,
    applied)`` (``run(x, mask)`` for a masked signature; :func:`prepare_run`), and in
    training the moving-average ``update``
    (:func:`batchnorm.statistics.prepare_update`, which the kernel may apply itself) with the
    ``state`` and the ``call_config`` (the layer's, decided for the input) it was prepared
    for.

    It remembers the configuration object, and the parameters and buffers (by the layer's
    names) the checks saw with their :func:`fingerprint`.
    """

    __slots__ = ("config", "parameters", "buffers", "tensors", "fingerprint", "run", "update",
                 "state", "call_config")

    def __init__(self, config: BatchNormConfig, parameters: tuple[str, ...],
                 buffers: tuple[str, ...], tensors: tuple[Tensor | None, ...], x: Tensor,
                 state: BatchNormState, prepared: Prepared) -> None:
        self.config, self.state, self.call_config = config, state, prepared.call.config
        self.update = None
        if prepared.kernel is not None:
            count, groups = _groups(x, prepared.call)
            self.update = prepare_update(state, prepared.call.config,
                                         statistics_dtype(x.dtype), count, groups=groups)
        self.run = prepare_run(x, state, prepared, self.update)
        self.parameters, self.buffers, self.tensors = parameters, buffers, tensors
        self.fingerprint = fingerprint(tensors)

    def current(self, config: BatchNormConfig, parameters: dict[str, Any],
                buffers: dict[str, Any]) -> bool:
        """Whether a layer with this configuration object, parameters and buffers (its
        ``_parameters``/``_buffers``) still has the tensors this plan's checks saw, unchanged
        in storage, shape, dtype and ``requires_grad``."""
        if config is not self.config:
            return False
        now = [*map(parameters.get, self.parameters), *map(buffers.get, self.buffers)]
        return all(map(operator.is_, now, self.tensors)) and fingerprint(now) == self.fingerprint


def _groups(x: Tensor, call: KernelCall) -> tuple[int | None, int]:
    """The count of each group's statistics in a training call (values per ghost batch and
    feature, or per feature; None for a mask's, per position) and the number of groups."""
    count = None if call.mask is not None else values_per_feature(x, call.axes)
    size = call.config.virtual_batch_size
    if size is None:
        return count, 1
    groups = x.shape[0] // size
    return (None if count is None else count // groups), groups


def prepare_run(x: Tensor, state: BatchNormState, prepared: Prepared,
                update: PreparedUpdate | None = None) -> PlannedRun:
    """:func:`run` for inputs of ``x``'s signature, decided once: the training kernel's
    prepared call with the prepared ``update`` (:meth:`~batchnorm.kernels.protocol.
    TrainingKernel.prepare`: ``run(x) -> (y, stats, applied)``), or the prepared inference
    pass (``(y, None, None)``). With a mask, ``run(x, mask)``: :func:`run` with that call's
    mask (the update left to the caller), nothing prepared from the mask it was made with."""
    call, kernel = prepared
    if call.mask is not None:
        def masked(x: Tensor, mask: Tensor
                   ) -> tuple[Tensor, BatchStatistics | None, Tensor | bool | None]:
            y, stats = run(x, state, Prepared(call._replace(mask=mask), kernel))
            return y, stats, None
        return masked
    if kernel is not None:
        return kernel.prepare(x, state, call, update)
    infer = prepare_inference(x, state, call)
    return lambda x: (infer(x), None, None)
