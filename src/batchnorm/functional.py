"""Pure functional batch normalization.

    y = gamma * (x - mean) / sqrt(variance + epsilon) + beta

In training mode ``mean`` and ``variance`` are the statistics of the batch (the
biased variance, as TensorFlow computes it); in inference mode they are the
moving averages kept in a :class:`BatchNormState`. Nothing here mutates its
arguments: :func:`batch_norm` returns the output together with the new state,
so the functions compose with ``torch.func`` (``grad``, ``vmap``,
``functional_call``) and ``torch.compile(fullgraph=True)``.

Statistics are computed in float32 for half-precision inputs (float64 for
float64 inputs); the output has the input's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BatchNormState",
    "BatchStatistics",
    "batch_norm",
    "initial_state",
    "moments",
    "normalize",
    "resolve_axes",
    "update_state",
]


class BatchNormState(NamedTuple):
    """The non-trainable state of a batch normalization layer.

    ``moving_mean`` and ``moving_variance`` are feature-shaped; ``num_updates``
    is an int64 scalar counting the moving-average updates applied so far.
    ``initial_mean``/``initial_variance`` hold the values the moving averages
    started from; they are needed only for ``debias=True`` and may be None.
    """

    moving_mean: Tensor
    moving_variance: Tensor
    num_updates: Tensor
    initial_mean: Tensor | None = None
    initial_variance: Tensor | None = None


class BatchStatistics(NamedTuple):
    """Per-feature statistics of one batch: mean, biased variance, values per feature."""

    mean: Tensor
    variance: Tensor
    count: int


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        raise ValueError(f"axis {tuple(axes)} names the same axis twice for an input of rank {ndim}")
    return tuple(sorted(resolved))


def _broadcast(t: Tensor | None, x: Tensor, axes: tuple[int, ...]) -> Tensor | None:
    """Reshape a feature-shaped tensor so that it broadcasts against ``x``."""
    if t is None:
        return None
    return t.reshape([x.shape[d] if d in axes else 1 for d in range(x.ndim)])


def _reduction_axes(ndim: int, axes: tuple[int, ...]) -> list[int]:
    return [d for d in range(ndim) if d not in axes]


def check_input(
    x: Tensor,
    axis: int | Sequence[int],
    feature_shape: Sequence[int] | None,
    *,
    training: bool = False,
) -> tuple[int, ...]:
    """Validate an input against the layer's configuration; return its feature axes.

    ``TypeError`` for a non-floating dtype; ``ValueError`` for an axis out of
    range, feature sizes that differ from ``feature_shape``, or (in training) a
    single value per feature, whose variance does not exist.
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
    if training and _count(x, axes) < 2:
        raise ValueError(
            f"training-mode batch normalization needs more than one value per feature to "
            f"compute a variance, got an input of shape {tuple(x.shape)} with feature axis "
            f"{axes}: {_count(x, axes)} value per feature. Normalizing it would map every value "
            "to beta (TensorFlow silently returns zeros here). Use a larger batch, or "
            "training=False."
        )
    return axes


def _count(x: Tensor, axes: tuple[int, ...]) -> int:
    """Values per feature: the product of the sizes of the reduced axes."""
    count = 1
    for d in _reduction_axes(x.ndim, axes):
        count *= x.shape[d]
    return count


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
    """``scale * (x - mean) / sqrt(variance + epsilon) + offset``, like ``tf.nn.batch_normalization``.

    ``mean``, ``variance``, ``offset`` and ``scale`` broadcast against ``x``;
    ``offset``/``scale`` may be None. Computed as ``x * inv + (offset - mean * inv)``
    with ``inv = scale * rsqrt(variance + epsilon)``, the way TensorFlow does,
    in the statistics' precision; the result has ``x``'s dtype.

    >>> normalize(torch.tensor([-10.0, 0.0, 10.0]), torch.tensor(0.0), torch.tensor(66.6667),
    ...           None, None, 1e-3)
    tensor([-1.2247,  0.0000,  1.2247])
    """
    inv = torch.rsqrt(variance + epsilon)
    if scale is not None:
        inv = inv * scale.to(inv.dtype)
    shift = -mean * inv
    if offset is not None:
        shift = shift + offset.to(inv.dtype)
    return (x * inv + shift).to(x.dtype)


def batch_statistics(x: Tensor, axes: tuple[int, ...]) -> BatchStatistics:
    """Feature-shaped mean and biased variance of ``x``, reducing over every axis not in ``axes``."""
    mean, variance = moments(x, _reduction_axes(x.ndim, axes))
    return BatchStatistics(mean, variance, _count(x, axes))


def inference_statistics(
    state: BatchNormState, *, momentum: float, debias: bool = False
) -> tuple[Tensor, Tensor]:
    """The mean and variance inference normalizes with.

    With ``debias=True`` the moving averages are corrected for the value they
    started from, ``(m_t - momentum**t * m_0) / (1 - momentum**t)``, so that a
    model evaluated after few updates is not pulled toward the initializers.
    """
    mean, variance = state.moving_mean, state.moving_variance
    if not debias:
        return mean, variance
    if state.initial_mean is None or state.initial_variance is None:
        raise ValueError("debias=True needs a state with initial_mean and initial_variance")
    t = state.num_updates.to(mean.dtype)
    decay = torch.pow(torch.as_tensor(momentum, dtype=mean.dtype, device=mean.device), t)
    updated = state.num_updates > 0
    denominator = torch.where(updated, 1 - decay, torch.ones_like(decay))

    def correct(m: Tensor, m0: Tensor) -> Tensor:
        return torch.where(updated, (m - decay * m0) / denominator, m)

    return correct(mean, state.initial_mean), correct(variance, state.initial_variance)


def update_state(
    state: BatchNormState,
    stats: BatchStatistics,
    *,
    momentum: float,
    unbiased_moving_variance: bool = False,
) -> BatchNormState:
    """Fold one batch's statistics into the moving averages.

    ``moving -= (moving - statistic) * (1 - momentum)``, the update TensorFlow
    applies. With ``unbiased_moving_variance`` the variance entering the average
    is Bessel-corrected (``* n / (n - 1)``), as in PyTorch. A batch whose
    statistics are not all finite leaves the state unchanged (``num_updates``
    included), so that one bad batch cannot poison the averages.
    """
    mean = stats.mean.detach()
    variance = stats.variance.detach()
    if unbiased_moving_variance:
        variance = variance * (stats.count / (stats.count - 1))
    finite = torch.isfinite(mean).all() & torch.isfinite(variance).all()
    decay = 1.0 - momentum

    def ema(moving: Tensor, value: Tensor) -> Tensor:
        updated = moving - (moving - value.to(moving.dtype)) * decay
        return torch.where(finite, updated, moving)

    return state._replace(
        moving_mean=ema(state.moving_mean, mean),
        moving_variance=ema(state.moving_variance, variance),
        num_updates=state.num_updates + finite.to(state.num_updates.dtype),
    )


def _forward(
    x: Tensor,
    state: BatchNormState,
    *,
    training: bool,
    gamma: Tensor | None,
    beta: Tensor | None,
    axis: int | Sequence[int],
    momentum: float,
    epsilon: float,
    debias: bool,
) -> tuple[Tensor, BatchStatistics | None]:
    """Normalize ``x``; return the output and, in training, the batch statistics."""
    axes = check_input(x, axis, tuple(state.moving_mean.shape), training=training)
    if training:
        stats = batch_statistics(x, axes)
        mean, variance = stats.mean, stats.variance
    else:
        stats = None
        mean, variance = inference_statistics(state, momentum=momentum, debias=debias)
    y = normalize(
        x,
        _broadcast(mean, x, axes),
        _broadcast(variance, x, axes),
        _broadcast(beta, x, axes),
        _broadcast(gamma, x, axes),
        epsilon,
    )
    return y, stats


def batch_norm(
    x: Tensor,
    state: BatchNormState,
    *,
    training: bool,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    axis: int | Sequence[int] = 1,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    unbiased_moving_variance: bool = False,
    debias: bool = False,
) -> tuple[Tensor, BatchNormState]:
    """Batch-normalize ``x``; return ``(y, new_state)`` without mutating anything.

    ``axis`` names the feature axes (statistics reduce over all others).
    In training the batch statistics normalize ``x`` and are folded into the
    moving averages of the returned state; in inference the state's moving
    averages normalize ``x`` and the state is returned unchanged.

    >>> state = initial_state(1)
    >>> x = torch.tensor([[-10.0], [0.0], [10.0]])
    >>> y, state = batch_norm(x, state, training=True, axis=-1)
    >>> y.flatten()
    tensor([-1.2247,  0.0000,  1.2247])
    >>> state.moving_mean, state.moving_variance
    (tensor([0.]), tensor([1.6567]))
    """
    y, stats = _forward(
        x, state, training=training, gamma=gamma, beta=beta, axis=axis,
        momentum=momentum, epsilon=epsilon, debias=debias,
    )
    if stats is None:
        return y, state
    new_state = update_state(
        state, stats, momentum=momentum, unbiased_moving_variance=unbiased_moving_variance
    )
    return y, new_state


def initial_state(
    num_features: int | Sequence[int],
    *,
    moving_mean: float = 0.0,
    moving_variance: float = 1.0,
    debias: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> BatchNormState:
    """A fresh state for features of the given size(s), moving averages filled with constants.

    >>> initial_state(3)
    BatchNormState(moving_mean=tensor([0., 0., 0.]), moving_variance=tensor([1., 1., 1.]), \
num_updates=tensor(0), initial_mean=None, initial_variance=None)
    """
    shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
    mean = torch.full(shape, moving_mean, dtype=dtype, device=device)
    variance = torch.full(shape, moving_variance, dtype=dtype, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    if debias:
        return BatchNormState(mean, variance, count, mean.clone(), variance.clone())
    return BatchNormState(mean, variance, count)
