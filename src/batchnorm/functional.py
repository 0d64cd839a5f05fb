"""Pure functional batch normalization.

    y = gamma * (x - mean) / sqrt(variance + epsilon) + beta

In training mode ``mean`` and ``variance`` are the statistics of the batch (the
biased variance, as TensorFlow computes it); in inference mode they are the
moving averages kept in a :class:`BatchNormState`. Nothing here mutates its
arguments: :func:`batch_norm` returns the output together with the new state,
so the functions compose with ``torch.func`` (``grad``, ``vmap``,
``functional_call``) and ``torch.compile(fullgraph=True)``.

The training modes of TensorFlow live here too: Batch Renormalization
(``renorm``), ghost batches (``virtual_batch_size``), ``adjustment``, and
masks. Training-mode arithmetic is done by a kernel from
:mod:`batchnorm.kernels`, chosen by ``fused``.

Statistics are computed in float32 for half-precision inputs (float64 for
float64 inputs); the output has the input's dtype.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GHOST_LAYOUTS",
    "BatchNormState",
    "BatchStatistics",
    "batch_norm",
    "check_options",
    "initial_state",
    "moments",
    "normalize",
    "pooled_statistics",
    "resolve_axes",
    "update_state",
    "update_state_",
]

GHOST_LAYOUTS = ("strided", "consecutive")
Adjustment = Callable[[torch.Size], tuple[Tensor, Tensor]]


class BatchNormState(NamedTuple):
    """The non-trainable state of a batch normalization layer.

    ``moving_mean`` and ``moving_variance`` are feature-shaped; ``num_updates``
    is an int64 scalar counting the moving-average updates applied so far.
    ``initial_mean``/``initial_variance`` hold the values the moving averages
    started from; they are needed only for ``debias=True``. ``moving_stddev``,
    ``renorm_mean`` and ``renorm_stddev`` exist only with ``renorm=True``: as in
    tf_keras, the moving standard deviation is the average that is kept, and
    ``moving_variance = relu(moving_stddev**2 - epsilon)`` is derived from it.
    """

    moving_mean: Tensor
    moving_variance: Tensor
    num_updates: Tensor
    initial_mean: Tensor | None = None
    initial_variance: Tensor | None = None
    moving_stddev: Tensor | None = None
    renorm_mean: Tensor | None = None
    renorm_stddev: Tensor | None = None


class BatchStatistics(NamedTuple):
    """One batch's statistics, per group of samples and feature.

    ``mean`` and ``variance`` (biased) have shape ``(groups, *features)``:
    one group, or one per ghost batch. ``count`` is the number of values behind
    each entry: an int, or with a mask a tensor broadcastable to that shape.
    """

    mean: Tensor
    variance: Tensor
    count: int | Tensor


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_number(value, *, integer: bool = False) -> bool:
    kind = numbers.Integral if integer else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool)


def check_options(
    *,
    momentum: float | None = 0.99,
    epsilon: float = 1e-3,
    renorm: bool = False,
    renorm_clipping: Mapping[str, float] | None = None,
    renorm_momentum: float = 0.99,
    virtual_batch_size: int | None = None,
    ghost_layout: str = "strided",
    adjustment: Adjustment | None = None,
    fused: bool | None = None,
    axis: int | Sequence[int] = 1,
    synchronized: bool = False,
) -> None:
    """Raise ``ValueError``/``TypeError`` for options that are invalid or meaningless together."""
    for name, value in (("momentum", momentum), ("renorm_momentum", renorm_momentum)):
        if name == "momentum" and value is None:
            continue  # the cumulative average
        if not _is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"{name}={value!r} is invalid: expected a number in [0, 1), the decay of the "
                "moving averages (TensorFlow's default 0.99; PyTorch's momentum=0.1 is 0.9)"
                + (", or None for the cumulative average" if name == "momentum" else "")
            )
    if not _is_number(epsilon) or not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon={epsilon!r} is invalid: expected a finite number > 0")
    if renorm_clipping is not None:
        if not renorm:
            raise ValueError("renorm_clipping is given but renorm=False: it would have no effect")
        unknown = set(renorm_clipping) - {"rmin", "rmax", "dmax"}
        if unknown:
            raise ValueError(
                f"renorm_clipping has unknown key(s) {sorted(unknown)}: expected 'rmin', "
                "'rmax', 'dmax'")
        for key, value in renorm_clipping.items():
            if not _is_number(value) or math.isnan(value) or value < 0:
                raise ValueError(f"renorm_clipping[{key!r}]={value!r}: expected a number >= 0")
        if renorm_clipping.get("rmin", 0.0) > renorm_clipping.get("rmax", math.inf):
            raise ValueError(f"renorm_clipping {dict(renorm_clipping)!r} has rmin > rmax")
    if virtual_batch_size is not None:
        if not _is_number(virtual_batch_size, integer=True) or virtual_batch_size < 1:
            raise ValueError(
                f"virtual_batch_size={virtual_batch_size!r}: expected a positive int or None")
        if adjustment is not None:
            raise ValueError(
                "adjustment cannot be combined with virtual_batch_size (as in TensorFlow): "
                "the adjustment's shape refers to the whole batch, not to a ghost batch")
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if 0 in axes:
            raise ValueError(
                "virtual_batch_size splits axis 0, the batch axis, so axis 0 cannot be a "
                f"feature axis (axis={axis!r})")
    if ghost_layout not in GHOST_LAYOUTS:
        raise ValueError(f"ghost_layout={ghost_layout!r}: expected one of {GHOST_LAYOUTS}")
    if ghost_layout != "strided" and virtual_batch_size is None:
        raise ValueError(
            f"ghost_layout={ghost_layout!r} needs virtual_batch_size: without ghost batches "
            "there is no split")
    if adjustment is not None and not callable(adjustment):
        raise TypeError(f"adjustment must be a callable shape -> (scale, bias), got {adjustment!r}")
    if fused not in (None, True, False):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")
    if not isinstance(synchronized, bool):
        raise TypeError(f"synchronized must be a bool, got {synchronized!r}")
    if fused:
        from .kernels import require_fused

        require_fused(axis=axis, renorm=renorm, virtual_batch_size=virtual_batch_size,
                      adjustment=adjustment, synchronized=synchronized)


def resolve_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Normalize ``axis`` (an int or ints, negative allowed) for a rank-``ndim`` input.

    Returns the sorted non-negative feature axes. Raises ``ValueError`` for an
    axis out of range or an axis given twice.

    >>> resolve_axes(-1, 4)
    (3,)
    >>> resolve_axes([3, 1], 4)
    (1, 3)
    """
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    resolved = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for an input of rank {ndim}: "
                f"expected a value in [{-ndim}, {ndim - 1}]"
            )
        resolved.append(a % ndim)
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"axis {tuple(axes)} names the same axis twice for an input of rank {ndim}")
    return tuple(sorted(resolved))


def broadcast(t: Tensor | None, x: Tensor, axes: tuple[int, ...]) -> Tensor | None:
    """Reshape a tensor with the feature axes' sizes (in order) to broadcast against ``x``."""
    if t is None:
        return None
    return t.reshape([x.shape[d] if d in axes else 1 for d in range(x.ndim)])


def reduction_axes(ndim: int, axes: tuple[int, ...]) -> list[int]:
    """The axes statistics reduce over: every axis that is not a feature axis."""
    return [d for d in range(ndim) if d not in axes]


def values_per_feature(x: Tensor, axes: tuple[int, ...]) -> int:
    """Values per feature: the product of the sizes of the reduced axes."""
    return math.prod([x.shape[d] for d in reduction_axes(x.ndim, axes)])


def _check_mask(mask: Tensor, x: Tensor, axes: tuple[int, ...]) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a boolean tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    try:
        torch.broadcast_shapes(mask_shape(mask, x, axes), x.shape)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast over the input's non-feature "
            f"axes: input shape {tuple(x.shape)}, feature axis {axes}"
        ) from None


def mask_shape(mask: Tensor, x: Tensor, axes: tuple[int, ...]) -> list[int]:
    """The mask's shape with size-1 feature axes inserted when it covers only the other axes."""
    if mask.ndim == x.ndim - len(axes):
        shape = list(mask.shape)
        for a in axes:
            shape.insert(a, 1)
        return shape
    return list(mask.shape)


def check_input(
    x: Tensor,
    axis: int | Sequence[int],
    feature_shape: Sequence[int] | None,
    *,
    training: bool = False,
    virtual_batch_size: int | None = None,
    mask: Tensor | None = None,
    synchronized: bool = False,
) -> tuple[int, ...]:
    """Validate an input against the layer's configuration; return its feature axes.

    ``TypeError`` for a non-floating dtype or a non-boolean mask; ``ValueError``
    for an axis out of range, feature sizes that differ from ``feature_shape``,
    a batch that ``virtual_batch_size`` does not divide, a mask that does not
    broadcast, or (in training) a single value per feature, whose variance
    does not exist. ``synchronized`` (statistics across processes) accepts
    any local batch size, 0 included: the statistics are those of every
    process's batch; ghost batches, formed within the process, are still checked.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"batch normalization needs a floating-point input, got dtype {x.dtype}; "
            "convert it first, e.g. x.float()"
        )
    axes = resolve_axes(axis, x.ndim)
    actual = tuple(x.shape[a] for a in axes)
    if feature_shape is not None and actual != tuple(feature_shape):
        raise ValueError(
            f"input of shape {tuple(x.shape)} has feature size(s) {actual} along axis {axes}, "
            f"expected {tuple(feature_shape)}"
        )
    if mask is not None:
        _check_mask(mask, x, axes)
    if not training:
        return axes
    count = values_per_feature(x, axes)
    if virtual_batch_size is not None:
        if 0 in axes:
            raise ValueError(
                f"virtual_batch_size splits axis 0, which is a feature axis here (axis {axes})")
        if x.shape[0] % virtual_batch_size:
            raise ValueError(
                f"virtual_batch_size={virtual_batch_size} does not divide the batch size "
                f"{x.shape[0]} (input shape {tuple(x.shape)})")
    if synchronized and (virtual_batch_size is None or x.shape[0] == 0):
        return axes
    if virtual_batch_size is not None:
        count = count // x.shape[0] * virtual_batch_size if x.shape[0] else 0
    if count < 2:
        raise ValueError(
            f"training-mode batch normalization needs more than one value per feature to "
            f"compute a variance, got an input of shape {tuple(x.shape)} with feature axis "
            f"{axes}: {count} value per feature"
            + (" and ghost batch" if virtual_batch_size is not None else "")
            + ". Normalizing it would map every value to beta (TensorFlow silently returns "
            "zeros here). Use a larger batch, or training=False."
        )
    return axes


def moments(
    x: Tensor, axes: int | Sequence[int], keepdims: bool = False
) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of ``x`` over ``axes``, like ``tf.nn.moments``.

    ``axes`` are the axes to reduce (not the feature axes). The results are
    float32 for half-precision inputs.

    >>> x = torch.tensor([[-10.0], [0.0], [10.0]])
    >>> mean, variance = moments(x, axes=[0])
    >>> mean, variance
    (tensor([0.]), tensor([66.6667]))
    """
    dims = resolve_axes(axes, x.ndim)
    variance, mean = torch.var_mean(
        x.to(statistics_dtype(x.dtype)), dim=dims, correction=0, keepdim=keepdims
    )
    return mean, variance


def normalize(
    x: Tensor,
    mean: Tensor,
    variance: Tensor,
    offset: Tensor | None,
    scale: Tensor | None,
    epsilon: float,
) -> Tensor:
    """``scale * (x - mean) / sqrt(variance + epsilon) + offset``, as ``tf.nn.batch_normalization``.

    ``mean``, ``variance``, ``offset`` and ``scale`` broadcast against ``x``;
    ``offset``/``scale`` may be None. Computed as ``x * inv + (offset - mean * inv)``
    with ``inv = scale * rsqrt(variance + epsilon)``, the way TensorFlow does,
    in the statistics' precision; the result has ``x``'s dtype. One pass over
    ``x``: ATen's inference kernel when the statistics are per feature along
    one axis and carry no gradient (it computes the same ``x * inv + shift``),
    else on CPU without autograd the fast path's loop
    (:func:`batchnorm.kernels.cpu.affine`), else ``addcmul``.

    >>> normalize(torch.tensor([-10.0, 0.0, 10.0]), torch.tensor(0.0), torch.tensor(66.6667),
    ...           None, None, 1e-3)
    tensor([-1.2247,  0.0000,  1.2247])
    """
    y = _aten_inference(x, mean, variance, offset, scale, epsilon)
    return _affine_normalize(x, mean, variance, offset, scale, epsilon) if y is None else y


def _affine_normalize(x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None,
                      scale: Tensor | None, epsilon: float) -> Tensor:
    """``normalize`` without ATen's kernel: the CPU loop, else ``addcmul``."""
    inv = torch.rsqrt(variance + epsilon)
    if scale is not None:
        inv = inv * scale.to(inv.dtype)
    shift = -mean * inv
    if offset is not None:
        shift = shift + offset.to(inv.dtype)
    from .kernels import cpu

    y = cpu.affine(x, inv, shift)
    if y is None:
        y = torch.addcmul(shift, x, inv)
    return y.to(x.dtype)


def _aten_inference(x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None,
                    scale: Tensor | None, epsilon: float) -> Tensor | None:
    """``normalize`` by ATen's batch-norm inference kernel, or None where it does not apply:
    statistics that vary along more than one axis, or need a gradient (it has none for them).
    """
    if x.ndim < 2 or mean.ndim != x.ndim or variance.shape != mean.shape:
        return None
    axes = [d for d in range(x.ndim) if mean.shape[d] != 1]
    if len(axes) != 1 or any(t is not None and t.shape != mean.shape for t in (offset, scale)):
        return None
    (axis,) = axes
    if mean.shape[axis] != x.shape[axis]:
        return None
    flat = [None if t is None else t.reshape(-1) for t in (mean, variance, offset, scale)]
    return _feature_inference(x, axis, *flat, epsilon)


def _feature_inference(x: Tensor, axis: int, mean: Tensor, variance: Tensor,
                       offset: Tensor | None, scale: Tensor | None,
                       epsilon: float) -> Tensor | None:
    """``normalize`` with 1-D per-feature statistics along ``axis`` by ATen's inference
    kernel, or None where it does not apply (statistics that need a gradient, or not in
    the input's statistics dtype).

    It computes ``alpha = scale / sqrt(variance + eps)``, ``beta = offset - mean * alpha``,
    ``y = x * alpha + beta``: TensorFlow's order.
    """
    dtype = mean.dtype
    if variance.dtype != dtype or dtype != statistics_dtype(x.dtype) or x.ndim < 2:
        return None
    if torch.is_grad_enabled() and (mean.requires_grad or variance.requires_grad):
        return None
    if scale is not None and scale.dtype != dtype:
        scale = scale.to(dtype)
    if offset is not None and offset.dtype != dtype:
        offset = offset.to(dtype)
    xm = x if axis == 1 else x.movedim(axis, 1)
    y = torch.batch_norm(xm, scale, offset, mean, variance, False, 0.0, epsilon,
                         torch.backends.cudnn.enabled)
    return y if axis == 1 else y.movedim(1, axis)


def pooled_statistics(
    stats: BatchStatistics, *, unbiased: bool = False
) -> tuple[Tensor, Tensor]:
    """Feature-shaped mean and variance of a batch: the average over its groups.

    Ghost batches contribute with equal weight, as in tf_keras (the mean of the
    group variances, not the variance of the whole batch). With a mask, groups
    with no selected value are left out; if none is left the result is NaN.
    With ``unbiased`` each group's variance is Bessel-corrected first.
    """
    mean, variance, count = stats
    if unbiased:
        variance = variance * (count / (count - 1))
    if isinstance(count, int):
        if mean.shape[0] == 1:
            return mean[0], variance[0]
        return mean.mean(0), variance.mean(0)
    valid = (torch.as_tensor(count) > 0).expand_as(mean)
    groups = valid.sum(0)
    return (torch.where(valid, mean, 0).sum(0) / groups,
            torch.where(valid, variance, 0).sum(0) / groups)


def renorm_correction(
    mean: Tensor,
    variance: Tensor,
    state: BatchNormState,
    *,
    epsilon: float,
    clipping: Mapping[str, float] | None,
) -> tuple[Tensor, Tensor]:
    """Batch Renormalization's ``(r, d)`` for feature-shaped batch statistics, without gradient.

    ``r = sqrt(variance + eps) / s`` and ``d = (mean - renorm_mean) / s`` with
    ``s = max(renorm_stddev, sqrt(eps))``, clipped to ``[rmin, rmax]`` and
    ``[-dmax, dmax]`` (missing keys: 0, inf, inf). Where the statistics are not
    finite (an empty mask) the correction is the identity.
    """
    clipping = clipping or {}
    stddev = torch.sqrt(variance.detach() + epsilon)
    s = torch.clamp_min(state.renorm_stddev, math.sqrt(epsilon))
    r = (stddev / s).clamp(clipping.get("rmin", 0.0), clipping.get("rmax", math.inf))
    dmax = clipping.get("dmax", math.inf)
    d = ((mean.detach() - state.renorm_mean) / s).clamp(-dmax, dmax)
    return torch.where(torch.isfinite(r), r, 1.0), torch.where(torch.isfinite(d), d, 0.0)


def inference_statistics(
    state: BatchNormState, *, momentum: float | None, epsilon: float = 1e-3,
    debias: bool = False,
) -> tuple[Tensor, Tensor]:
    """The mean and variance inference normalizes with.

    With ``debias=True`` the moving averages are corrected for the value they
    started from, ``(m_t - momentum**t * m_0) / (1 - momentum**t)``, so that a
    model evaluated after few updates is not pulled toward the initializers.
    With renorm the correction applies to the moving standard deviation, from
    which the variance is derived.
    """
    mean, variance = state.moving_mean, state.moving_variance
    if not debias or momentum is None:  # a cumulative average has no initial bias
        return mean, variance
    if state.initial_mean is None or state.initial_variance is None:
        raise ValueError("debias=True needs a state with initial_mean and initial_variance")
    t = state.num_updates.to(mean.dtype)
    decay = torch.pow(torch.as_tensor(momentum, dtype=mean.dtype, device=mean.device), t)
    updated = state.num_updates > 0
    denominator = torch.where(updated, 1 - decay, torch.ones_like(decay))

    def correct(m: Tensor, m0: Tensor) -> Tensor:
        return torch.where(updated, (m - decay * m0) / denominator, m)

    if state.moving_stddev is not None:
        stddev = correct(state.moving_stddev, torch.sqrt(state.initial_variance))
        variance = torch.where(updated, torch.relu(stddev * stddev - epsilon), variance)
    else:
        variance = correct(variance, state.initial_variance)
    return correct(mean, state.initial_mean), variance


def _averages(
    state: BatchNormState, mean: Tensor, variance: Tensor, *, momentum: float | None,
    epsilon: float, renorm_momentum: float,
) -> list[tuple[str, Tensor, float | None]]:
    """``(field, value, momentum)`` for each moving average one batch moves.

    A renorm state keeps ``moving_stddev`` (from which ``moving_variance`` is derived,
    see :func:`_renorm_variance`) and moves ``renorm_mean``/``renorm_stddev`` with
    ``renorm_momentum``.
    """
    if state.moving_stddev is None:
        return [("moving_mean", mean, momentum), ("moving_variance", variance, momentum)]
    stddev = torch.sqrt(variance + epsilon)
    return [("moving_mean", mean, momentum), ("moving_stddev", stddev, momentum),
            ("renorm_mean", mean, renorm_momentum), ("renorm_stddev", stddev, renorm_momentum)]


def _renorm_variance(moving_stddev: Tensor, epsilon: float) -> Tensor:
    """tf_keras's ``moving_variance`` under renorm: ``relu(moving_stddev**2 - epsilon)``."""
    return torch.relu(moving_stddev * moving_stddev - epsilon)


def update_state(
    state: BatchNormState,
    stats: BatchStatistics,
    *,
    momentum: float | None,
    epsilon: float = 1e-3,
    unbiased_moving_variance: bool = False,
    renorm_momentum: float = 0.99,
) -> BatchNormState:
    """Fold one batch's statistics into the moving averages; return the new state.

    ``moving -= (moving - statistic) * (1 - momentum)``, the update TensorFlow
    applies, with the statistics of :func:`pooled_statistics`. ``momentum=None``
    keeps the cumulative average of all batches instead (``1 - momentum`` is
    ``1 / (num_updates + 1)``), PyTorch's ``momentum=None``. With
    ``unbiased_moving_variance`` the variance entering the average is
    Bessel-corrected (``* n / (n - 1)``), as in PyTorch. A renorm state (one
    with ``moving_stddev``) also moves ``renorm_mean``/``renorm_stddev`` with
    ``renorm_momentum`` and derives ``moving_variance`` from ``moving_stddev``,
    as tf_keras does. A batch whose statistics are not all finite leaves the
    state unchanged (``num_updates`` included), so that one bad batch cannot
    poison the averages. Nothing is mutated and nothing waits for the device
    (:func:`update_state_` is the in-place form).
    """
    stats = stats._replace(mean=stats.mean.detach(), variance=stats.variance.detach())
    mean, variance = pooled_statistics(stats, unbiased=unbiased_moving_variance)
    finite = torch.isfinite(mean).all() & torch.isfinite(variance).all()
    new = {"num_updates": state.num_updates + finite.to(state.num_updates.dtype)}
    averages = _averages(state, mean, variance, momentum=momentum, epsilon=epsilon,
                         renorm_momentum=renorm_momentum)
    for name, value, decay in averages:
        moving = getattr(state, name)
        step = 1.0 / (state.num_updates + 1) if decay is None else 1.0 - decay
        updated = moving - (moving - value.to(moving.dtype)) * step
        new[name] = torch.where(finite, updated, moving)
    if state.moving_stddev is not None:
        new["moving_variance"] = torch.where(
            finite, _renorm_variance(new["moving_stddev"], epsilon), state.moving_variance)
    return state._replace(**new)


def update_state_(
    state: BatchNormState,
    stats: BatchStatistics,
    *,
    momentum: float | None,
    epsilon: float = 1e-3,
    unbiased_moving_variance: bool = False,
    renorm_momentum: float = 0.99,
) -> bool:
    """:func:`update_state` in place: move the state's tensors; return whether it moved.

    The same averages in fewer operations (the layer's per-call path). It reads
    back whether the statistics are finite, which waits for the device; a batch
    that is not leaves everything unchanged and returns False.

    >>> state = initial_state(1)
    >>> stats = BatchStatistics(torch.tensor([[2.0]]), torch.tensor([[4.0]]), 8)
    >>> update_state_(state, stats, momentum=0.9)
    True
    >>> state.moving_mean, state.moving_variance, state.num_updates
    (tensor([0.2000]), tensor([1.3000]), tensor(1))
    """
    with torch.no_grad():
        mean, variance = pooled_statistics(stats, unbiased=unbiased_moving_variance)
        if not _all_finite(mean, variance):
            return False
        averages = _averages(state, mean, variance, momentum=momentum, epsilon=epsilon,
                             renorm_momentum=renorm_momentum)
        for decay in {d for *_, d in averages}:
            pairs = [(getattr(state, name), value) for name, value, d in averages if d == decay]
            step = 1.0 / (int(state.num_updates) + 1) if decay is None else 1.0 - decay
            # lerp computes moving + step * (value - moving): TensorFlow's update.
            values = [v if v.dtype == m.dtype else v.to(m.dtype) for m, v in pairs]
            torch._foreach_lerp_([m for m, _ in pairs], values, step)
        if state.moving_stddev is not None:
            state.moving_variance.copy_(_renorm_variance(state.moving_stddev, epsilon))
        state.num_updates.add_(1)
    return True


def _all_finite(*tensors: Tensor) -> bool:
    """Whether every value is finite (one read-back; the largest magnitude of each tensor
    cannot overflow, unlike a sum)."""
    norms = torch._foreach_norm([t for t in tensors if t.numel()], math.inf)
    return math.isfinite(sum(map(float, norms)))


def synchronization_group(synchronized: bool, training: bool, process_group=None):
    """The ``torch.distributed`` group whose global batch gives the statistics, or None for
    local statistics: inference, ``synchronized=False``, or torch.distributed not
    initialized (which warns once)."""
    if not (synchronized and training):
        return None
    from .kernels.synchronized import resolve_group

    return resolve_group(process_group)


def _forward(
    x: Tensor,
    state: BatchNormState,
    *,
    training: bool,
    gamma: Tensor | None,
    beta: Tensor | None,
    axis: int | Sequence[int],
    momentum: float | None,
    epsilon: float,
    debias: bool = False,
    renorm: bool = False,
    renorm_clipping: Mapping[str, float] | None = None,
    virtual_batch_size: int | None = None,
    ghost_layout: str = "strided",
    adjustment: Adjustment | None = None,
    fused: bool | None = None,
    mask: Tensor | None = None,
    synchronized: bool = False,
    process_group=None,
) -> tuple[Tensor, BatchStatistics | None]:
    """Normalize ``x``; return the output and, in training, the batch statistics."""
    from . import kernels

    group = synchronization_group(synchronized, training, process_group)
    axes = check_input(x, axis, tuple(state.moving_mean.shape), training=training,
                       virtual_batch_size=virtual_batch_size, mask=mask,
                       synchronized=group is not None)
    if virtual_batch_size is not None:
        group = None  # ghost batches stay within each process: synchronized they would grow
    if not training:
        mean, variance = inference_statistics(state, momentum=momentum, epsilon=epsilon,
                                              debias=debias)
        y = None  # one feature axis: the state's 1-D tensors go to ATen's kernel as they are
        if len(axes) == 1:
            y = _feature_inference(x, axes[0], mean, variance, beta, gamma, epsilon)
        if y is None:
            y = _affine_normalize(x, broadcast(mean, x, axes), broadcast(variance, x, axes),
                                  broadcast(beta, x, axes), broadcast(gamma, x, axes), epsilon)
        return y, None
    kernel = kernels.select(fused, axes=axes, renorm=renorm,
                            virtual_batch_size=virtual_batch_size, adjustment=adjustment,
                            mask=mask, synchronized=group is not None)
    sync = {} if group is None else {"process_group": group}
    return kernel(
        x, state, axes, gamma=gamma, beta=beta, epsilon=epsilon, renorm=renorm,
        renorm_clipping=renorm_clipping, virtual_batch_size=virtual_batch_size,
        ghost_layout=ghost_layout, adjustment=adjustment, mask=mask, **sync,
    )


def batch_norm(
    x: Tensor,
    state: BatchNormState,
    *,
    training: bool,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    axis: int | Sequence[int] = 1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-3,
    unbiased_moving_variance: bool = False,
    debias: bool = False,
    renorm: bool = False,
    renorm_clipping: Mapping[str, float] | None = None,
    renorm_momentum: float = 0.99,
    virtual_batch_size: int | None = None,
    ghost_layout: str = "strided",
    adjustment: Adjustment | None = None,
    fused: bool | None = None,
    mask: Tensor | None = None,
    synchronized: bool = False,
    process_group=None,
) -> tuple[Tensor, BatchNormState]:
    """Batch-normalize ``x``; return ``(y, new_state)`` without mutating anything.

    ``axis`` names the feature axes (statistics reduce over all others).
    In training the batch statistics normalize ``x`` and are folded into the
    moving averages of the returned state; in inference the state's moving
    averages normalize ``x`` and the state is returned unchanged. The options
    are those of :class:`batchnorm.BatchNorm`; a renorm state comes from
    ``initial_state(..., renorm=True)``. ``synchronized=True`` takes the
    training statistics of the global batch across the processes of
    ``process_group`` (see :mod:`batchnorm.distributed`).

    >>> state = initial_state(1)
    >>> x = torch.tensor([[-10.0], [0.0], [10.0]])
    >>> y, state = batch_norm(x, state, training=True, axis=-1)
    >>> y.flatten()
    tensor([-1.2247,  0.0000,  1.2247])
    >>> state.moving_mean, state.moving_variance
    (tensor([0.]), tensor([1.6567]))
    """
    check_options(momentum=momentum, epsilon=epsilon, renorm=renorm,
                  renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
                  virtual_batch_size=virtual_batch_size, ghost_layout=ghost_layout,
                  adjustment=adjustment, fused=fused, axis=axis, synchronized=synchronized)
    if renorm and state.moving_stddev is None:
        raise ValueError("renorm=True needs a renorm state: initial_state(..., renorm=True)")
    y, stats = _forward(
        x, state, training=training, gamma=gamma, beta=beta, axis=axis, momentum=momentum,
        epsilon=epsilon, debias=debias, renorm=renorm, renorm_clipping=renorm_clipping,
        virtual_batch_size=virtual_batch_size, ghost_layout=ghost_layout,
        adjustment=adjustment, fused=fused, mask=mask, synchronized=synchronized,
        process_group=process_group,
    )
    if stats is None:
        return y, state
    new_state = update_state(
        state, stats, momentum=momentum, epsilon=epsilon,
        unbiased_moving_variance=unbiased_moving_variance, renorm_momentum=renorm_momentum,
    )
    return y, new_state


def initial_state(
    num_features: int | Sequence[int],
    *,
    moving_mean: float | Tensor = 0.0,
    moving_variance: float | Tensor = 1.0,
    debias: bool = False,
    renorm: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> BatchNormState:
    """A fresh state for features of the given size(s).

    With ``renorm`` the renorm averages start where tf_keras starts them:
    ``renorm_mean = moving_mean`` and ``moving_stddev = renorm_stddev = sqrt(moving_variance)``.

    >>> initial_state(3)
    BatchNormState(moving_mean=tensor([0., 0., 0.]), moving_variance=tensor([1., 1., 1.]), \
num_updates=tensor(0), initial_mean=None, initial_variance=None, moving_stddev=None, \
renorm_mean=None, renorm_stddev=None)
    """
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    mean = torch.zeros(shape, dtype=dtype, device=device) + torch.as_tensor(moving_mean)
    variance = torch.zeros(shape, dtype=dtype, device=device) + torch.as_tensor(moving_variance)
    state = BatchNormState(mean, variance, torch.zeros((), dtype=torch.int64, device=device))
    if debias:
        state = state._replace(initial_mean=mean.clone(), initial_variance=variance.clone())
    if renorm:
        stddev = torch.sqrt(variance)
        state = state._replace(moving_stddev=stddev, renorm_mean=mean.clone(),
                               renorm_stddev=stddev.clone())
    return state
