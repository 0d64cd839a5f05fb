"""The statistics of batch normalization, written once: moments, the pooling of ghost-batch
and masked statistics, Batch Renormalization's correction, the statistics inference
normalizes with, the coefficients of the output pass, and the moving-average update.

Kernels compute a batch's :class:`~batchnorm.state.BatchStatistics`; everything they
do with them beyond that (and everything the update does) is here.

This module imports only :mod:`batchnorm.state`, :mod:`batchnorm.shapes` and
:mod:`batchnorm.config`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .config import BatchNormConfig
from .shapes import resolve_axes
from .state import BatchNormState, BatchStatistics, statistics_dtype

__all__ = ["UPDATE_LOOPS", "PreparedUpdate", "UpdateLoop", "affine_terms", "apply_update",
           "combine_statistics", "inference_statistics", "kept_for_backward", "masked_moments",
           "merge_moments", "moments", "normalizing_statistics", "output_affine",
           "pooled_statistics", "prepare_renorm_correction", "prepare_update", "renorm_correction",
           "skip_reason", "traced", "update_state", "update_state_"]


def moments(
    x: Tensor, axes: int | Sequence[int], keepdims: bool = False
) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of ``x`` over ``axes``, like ``tf.nn.moments``.

    Args:
        x: a floating-point tensor.
        axes: the axes to reduce (not the feature axes), negative allowed.
        keepdims: keep the reduced axes with size 1, so that the results broadcast
            against ``x`` (what :func:`~batchnorm.functional.normalize` takes).

    Returns:
        ``(mean, variance)``, float32 for half-precision inputs.

    Raises:
        ValueError: an axis out of range, or named twice.

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


def masked_moments(x: Tensor, selected: Tensor,
                   dims: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and biased variance over ``dims`` (kept, with size 1) of the values of
    ``x`` that ``selected`` (a boolean tensor of ``x``'s shape) selects; a set with no value
    has count 0, mean 0 and variance 0.

    Selected with ``torch.where``, never multiplied by 0: a NaN, Inf or 1e30 at a masked-out
    position (padding) reaches neither the statistics (NaN * 0 is NaN, 1e30**2 is inf) nor
    their gradient (where's gradient is 0 there, without multiplying); dividing by at least 1
    keeps an empty set finite.

    >>> x = torch.tensor([[1.0, 3.0, float("nan")]])
    >>> masked_moments(x, torch.tensor([[True, True, False]]), (1,))
    (tensor([[2.]]), tensor([[2.]]), tensor([[1.]]))
    """
    dims = tuple(dims)  # torch's sum takes a tuple or a list of dims, not any sequence
    count = selected.sum(dim=dims, keepdim=True, dtype=x.dtype)
    safe = count.clamp_min(1)
    mean = torch.where(selected, x, 0).sum(dim=dims, keepdim=True) / safe
    centered = torch.where(selected, x - mean, 0)
    return count, mean, centered.square().sum(dim=dims, keepdim=True) / safe


def merge_moments(count: Tensor, mean: Tensor, m2: Tensor,
                  dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and sum of squared deviations (``M2``; the biased variance is
    ``M2 / count``) of the union of the sets given along ``dim``, from each set's: the
    parallel-variance formula (Chan, Golub and LeVeque), exact for any sizes.
    ``mean = sum(n_k m_k) / N`` and ``M2 = sum(M2_k) + sum(n_k (m_k - mean)**2)``. A set with
    no value contributes nothing, whatever its statistics; the union of empty sets has
    count 0, mean 0 and M2 0.

    >>> merge_moments(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 3.0]),
    ...               torch.tensor([2.0, 0.0]))                      # [-1, 1] and [3]
    (tensor(3.), tensor(1.), tensor(8.))
    """
    empty = count == 0
    mean, m2 = torch.where(empty, 0.0, mean), torch.where(empty, 0.0, m2)
    total = count.sum(dim)
    merged = (count * mean).sum(dim) / total.clamp_min(1)
    spread = (count * (mean - merged.unsqueeze(dim)).square()).sum(dim)
    return total, merged, m2.sum(dim) + spread


def normalizing_statistics(mean: Tensor, variance: Tensor, count: Tensor,
                           moving_mean: Tensor, moving_variance: Tensor) -> tuple[Tensor, Tensor]:
    """The statistics each group is normalized with: its own, or the moving ones where it has
    fewer than two values (a mask that selects one value or none: no variance). Such a group
    is also left out of the pooled statistics (:func:`pooled_statistics`).

    >>> normalizing_statistics(torch.tensor([2.0, 5.0]), torch.tensor([1.0, 0.0]),
    ...                        torch.tensor([4.0, 1.0]), torch.zeros(2), torch.ones(2))
    (tensor([2., 0.]), tensor([1., 1.]))
    """
    empty = count < 2
    return torch.where(empty, moving_mean, mean), torch.where(empty, moving_variance, variance)


def pooled_statistics(
    stats: BatchStatistics, *, unbiased: bool = False
) -> tuple[Tensor, Tensor]:
    """Feature-shaped mean and variance of a batch: the average over its groups.

    Ghost batches contribute with equal weight, as in tf_keras (the mean of the
    group variances, not the variance of the whole batch). With a mask, groups
    with fewer than two selected values (no variance) are left out; if none is left
    the result is NaN. With ``unbiased`` each group's variance is Bessel-corrected first.
    """
    mean, variance, count = stats
    if unbiased:
        variance = variance * (count / (count - 1))
    if isinstance(count, int):
        if mean.shape[0] == 1:
            return mean[0], variance[0]
        return mean.mean(0), variance.mean(0)
    valid = (torch.as_tensor(count) > 1).expand_as(mean)
    groups = valid.sum(0)
    return (torch.where(valid, mean, 0).sum(0) / groups,
            torch.where(valid, variance, 0).sum(0) / groups)


def combine_statistics(
    a: BatchStatistics, b: BatchStatistics, *, ghost: bool = False
) -> BatchStatistics:
    """The statistics of two batches together, as if they had been one batch (a pure fold).

    Without ghost batches each group of ``a`` is merged with the same group of ``b``
    (one group each: the whole batch) by the parallel-variance formula
    (:func:`merge_moments`), which is exact for any two sizes, and for masked counts (a
    tensor: per group and feature; a side with no value contributes nothing, whatever its
    mean). With ``ghost=True`` the groups are
    concatenated instead: the ghost batches of both batches together, which
    :func:`pooled_statistics` then averages with equal weight, as it does within a batch.

    Folding a sequence of micro-batches' statistics with it gives the statistics of their
    concatenation (to float rounding): one moving-average update with them is the update of
    the concatenated batch (:func:`batchnorm.accumulate`).

    Args:
        a, b: statistics of the same features (from training calls of the same layer, or
            :func:`~batchnorm.functional.forward`).
        ghost: concatenate the groups (ghost batches) instead of merging them.

    Returns:
        A :class:`BatchStatistics` (its count an int when both counts are ints that add up
        or, with ``ghost``, are equal; a tensor otherwise).

    Raises:
        ValueError: statistics whose shapes cannot be combined.

    >>> a = BatchStatistics(torch.tensor([[0.0]]), torch.tensor([[1.0]]), 2)  # [-1, 1]
    >>> b = BatchStatistics(torch.tensor([[3.0]]), torch.tensor([[0.0]]), 1)  # [3]
    >>> combine_statistics(a, b)                                         # [-1, 1, 3]
    BatchStatistics(mean=tensor([[1.]]), variance=tensor([[2.6667]]), count=3)
    >>> combine_statistics(a, b, ghost=True).mean.flatten()
    tensor([0., 3.])
    """
    if a.mean.shape[1:] != b.mean.shape[1:]:
        raise ValueError(f"cannot combine statistics of feature shapes {tuple(a.mean.shape[1:])} "
                         f"and {tuple(b.mean.shape[1:])}")
    if ghost:
        if isinstance(a.count, int) and isinstance(b.count, int) and a.count == b.count:
            count: int | Tensor = a.count
        else:
            count = torch.cat([_count_tensor(s) for s in (a, b)])
        return BatchStatistics(torch.cat([a.mean, b.mean]), torch.cat([a.variance, b.variance]),
                               count)
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge statistics of {a.mean.shape[0]} and {b.mean.shape[0]} "
                         "groups group by group; ghost batches are combined with ghost=True")
    count = torch.stack([_count_tensor(a), _count_tensor(b)])
    total, mean, m2 = merge_moments(count, torch.stack([a.mean, b.mean]),
                                    torch.stack([a.variance, b.variance]) * count)
    variance = m2 / total.clamp_min(1)
    if isinstance(a.count, int) and isinstance(b.count, int):
        return BatchStatistics(mean, variance, a.count + b.count)
    return BatchStatistics(mean, variance, total)


def _count_tensor(stats: BatchStatistics) -> Tensor:
    """The count of every entry of ``stats``, as a tensor of the statistics' shape and dtype."""
    count = torch.as_tensor(stats.count, dtype=stats.mean.dtype, device=stats.mean.device)
    return count.expand_as(stats.mean)


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
    finite (an empty mask) the correction is the identity. The backward uses these values
    (from the renorm averages before the call's update), compiled too.
    """
    # plan.prepare refuses a renorm call whose state lacks them (the type allows None).
    assert state.renorm_mean is not None and state.renorm_stddev is not None
    clipping = clipping or {}
    s = torch.clamp_min(state.renorm_stddev, math.sqrt(epsilon))
    # In place only on the fresh quotients (under vmap the state alone may be batched);
    # NaN and +-Inf give the identity.
    r = torch.div((variance.detach() + epsilon).sqrt_(), s).clamp_(
        clipping.get("rmin", 0.0), clipping.get("rmax", math.inf)).nan_to_num_(1.0, 1.0, 1.0)
    dmax = clipping.get("dmax", math.inf)
    d = torch.div(mean.detach() - state.renorm_mean, s).clamp_(-dmax, dmax).nan_to_num_(
        0.0, 0.0, 0.0)
    r, d = kept_for_backward(r, d)
    return r, d


def kept_for_backward(*tensors: Tensor) -> tuple[Tensor, ...]:
    """``tensors`` (of one shape and dtype), with the values they have now also in the
    backward: for values read from the buffers before this call's update overwrites them.

    Eager autograd saves what it needs. torch.compile's partitioners instead recompute cheap
    (pointwise) values in the backward from the graph's inputs, and the buffers among those
    inputs have been updated in place by then. A stack is not recomputed (not in their
    allowlist): while compiling the tensors pass through one, which is saved.

    >>> r, d = kept_for_backward(torch.ones(2), torch.zeros(2))
    >>> r, d
    (tensor([1., 1.]), tensor([0., 0.]))
    """
    if not torch.compiler.is_compiling():
        return tensors
    return torch.stack(tensors).unbind(0)


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

    Args:
        state: the current state (not modified).
        stats: the batch's statistics, from :func:`~batchnorm.functional.forward`.
        momentum, epsilon, unbiased_moving_variance, renorm_momentum: the options of
            :class:`~batchnorm.BatchNorm`.

    Returns:
        The new :class:`~batchnorm.functional.BatchNormState`.

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
    return state._replace(**_moved(state, stats, momentum=momentum, epsilon=epsilon,
                                   unbiased=unbiased_moving_variance,
                                   renorm_momentum=renorm_momentum)[1])


def _moved(state: BatchNormState, stats: BatchStatistics, *, momentum: float | None,
           epsilon: float, unbiased: bool, renorm_momentum: float
           ) -> tuple[Tensor, dict[str, Tensor]]:
    """Whether the batch enters the averages (a 0-d bool on the device), and the new value
    of each of ``state``'s tensors one update moves (``num_updates`` included), all computed
    out of place: nothing is written, so that the caller can write all of them or none.

    TensorFlow's ``moving -= (moving - value) * (1 - momentum)`` in ``torch.lerp``'s
    arithmetic (the numba update's too). A skipped batch moves each average toward itself:
    ``lerp(m, m, w) == m`` exactly.
    """
    with torch.no_grad():
        mean, variance = pooled_statistics(stats, unbiased=unbiased)
        finite = _finite_as_stored(state, mean, variance)
        new = {}
        for name, value, decay in _averages(state, mean, variance, momentum=momentum,
                                            epsilon=epsilon, renorm_momentum=renorm_momentum):
            moving = getattr(state, name)
            # The cumulative average (momentum=None) steps by 1 / (n + 1), on the device.
            step = (1.0 - decay if decay is not None
                    else (state.num_updates + 1).reciprocal().to(moving.dtype))
            new[name] = torch.lerp(moving, torch.where(finite, value.to(moving.dtype), moving),
                                   step)
        if state.moving_stddev is not None:
            new["moving_variance"] = torch.where(
                finite, _renorm_variance(new["moving_stddev"], epsilon), state.moving_variance)
        new["num_updates"] = state.num_updates + finite.to(state.num_updates.dtype)
    return finite, new


def update_state_(state: BatchNormState, stats: BatchStatistics, **options: Any) -> bool:
    """:func:`update_state` in place (the same keyword options): move the state's tensors;
    return whether it moved.

    The same averages in fewer operations. It reads back whether the statistics
    are finite, which waits for the device (:func:`apply_update` is the same
    update without that read-back); a batch that is not leaves everything
    unchanged and returns False.

    >>> state = BatchNormState(torch.zeros(1), torch.ones(1), torch.tensor(0))
    >>> stats = BatchStatistics(torch.tensor([[2.0]]), torch.tensor([[4.0]]), 8)
    >>> update_state_(state, stats, momentum=0.9)
    True
    >>> state.moving_mean, state.moving_variance, state.num_updates
    (tensor([0.2000]), tensor([1.3000]), tensor(1))
    """
    return bool(apply_update(state, stats, BatchNormConfig(**options)))


def _finite_as_stored(state: BatchNormState, mean: Tensor, variance: Tensor) -> Tensor:
    """0-d bool on the device: whether every statistic is finite in the dtype of the buffers
    it moves (a float64 variance of 1e60 is inf in float32 buffers). The largest magnitude
    is finite iff every value is (NaN propagates through it; a sum could overflow): two
    small kernels where ``isfinite().all()`` launches five."""
    dtype = state.moving_mean.dtype
    values = torch.cat([mean.reshape(-1), variance.reshape(-1)]).to(dtype)
    if not values.numel():
        return torch.ones((), dtype=torch.bool, device=values.device)
    return torch.linalg.vector_norm(values, math.inf) < math.inf




def skip_reason(stats: BatchStatistics, *, unbiased: bool = False,
                dtype: torch.dtype | None = None) -> str:
    """Why a batch's statistics could not enter the moving averages (after a skipped update:
    this reads values back from the device). ``dtype``: the moving averages' dtype."""
    if stats.mean.shape[0] == 0:
        return "the batch is empty (no ghost batch in this process)"
    if not isinstance(stats.count, int):
        count = stats.count.expand_as(stats.mean)
        if not bool((count > 0).any(0).all()):
            return "the mask selects no position for some feature"
        if not bool((count > 1).any(0).all()):
            return ("the mask selects a single value for some feature (in every group), which "
                    "has no variance; such a group is normalized with the moving statistics")
    mean, variance = pooled_statistics(stats, unbiased=unbiased)
    if bool(torch.isfinite(mean).all()):
        name = str(variance.dtype).removeprefix("torch.")
        if not bool(torch.isfinite(variance).all()):
            return (f"the batch variance overflowed {name}, the statistics dtype (largest "
                    f"{torch.finfo(variance.dtype).max:.3g}): the input's values are finite but "
                    "too far from their mean; scale the input down, or normalize it in float64")
        for what, t in (("mean", mean), ("variance", variance)):
            if dtype is not None and dtype != t.dtype and not bool(
                    torch.isfinite(t.to(dtype)).all()):
                return (f"the batch {what} (up to {float(t.abs().max()):.3g}) overflowed "
                        f"{str(dtype).removeprefix('torch.')}, the moving averages' dtype "
                        f"(largest {torch.finfo(dtype).max:.3g}); keep the layer's statistics "
                        "in a wider dtype, e.g. layer.double()")
    return "the batch statistics are not finite (NaN or Inf in the input)"


def apply_update(state: BatchNormState, stats: BatchStatistics,
                 config: BatchNormConfig, *, skipped: Tensor | None = None) -> Tensor | bool:
    """Fold one batch's statistics into ``state``'s tensors, in place, with ``config``'s
    options; return whether the batch entered the averages (False for statistics that are
    not all finite, which leave every tensor unchanged, ``num_updates`` included): a 0-d
    boolean tensor on the state's device, or a ``bool`` where a device's update loop ran
    on the host's memory (CPU tensors; nothing to wait for).

    Nothing is read back from the device: the choice is a select on the device, so the
    call never waits for it (and can be captured in a CUDA graph). :func:`skip_reason` says
    why a batch was skipped; ``skipped``, an integer scalar tensor (a layer's
    ``num_skipped``), counts it, written with the averages.

    All or nothing: every new value is computed before the first is written, and a write
    refused inside a ``torch.func`` transform (``grad`` of a captured buffer, ``vmap`` of an
    unbatched one) undoes the writes made before it and raises ``ValueError``.

    It is :func:`prepare_update`'s update, prepared for this one call.

    >>> state = BatchNormState(torch.zeros(1), torch.ones(1), torch.tensor(0))
    >>> stats = BatchStatistics(torch.tensor([[2.0]]), torch.tensor([[4.0]]), 8)
    >>> bool(apply_update(state, stats, BatchNormConfig(momentum=0.9)))
    True
    >>> state.moving_mean, state.moving_variance, state.num_updates
    (tensor([0.2000]), tensor([1.3000]), tensor(1))
    >>> skipped = torch.tensor(0)
    >>> bool(apply_update(state, stats._replace(mean=torch.tensor([[math.nan]])),
    ...                   BatchNormConfig(), skipped=skipped))
    False
    >>> state.num_updates, skipped
    (tensor(1), tensor(1))
    """
    update = prepare_update(state, config, stats.mean.dtype,
                            stats.count if isinstance(stats.count, int) else None,
                            groups=stats.mean.shape[0], loop=not traced(stats.mean))
    return update.apply(stats, skipped)


class PreparedUpdate(NamedTuple):
    """A moving-average update prepared once (:func:`prepare_update`).

    ``apply(stats, skipped) -> applied``, as :func:`apply_update` documents; ``direct``,
    where a device's loop runs on the host's memory (CPU), the same update from 1-D
    contiguous statistics of the prepared dtype and groups (group after group) without
    building a :class:`BatchStatistics`: ``direct(mean, variance) -> applied`` (a ``bool``),
    else None.
    """

    apply: Callable[[BatchStatistics, Tensor | None], Tensor | bool]
    direct: Callable[[Tensor, Tensor], bool] | None = None


class UpdateLoop(Protocol):
    """A device's moving-average update in one loop over the host's memory (the CPU
    kernel's numba loop), registered in :data:`UPDATE_LOOPS` under its device type."""

    def prepare_update(self, state: BatchNormState, config: BatchNormConfig,
                       dtype: torch.dtype, count: int | None,
                       fallback: Callable[[BatchStatistics, Tensor | None], Tensor | bool],
                       groups: int = 1) -> PreparedUpdate | None:
        """The update (see :func:`prepare_update`) of ``groups`` groups of ``count`` values
        per feature each (None: a mask's counts, in the statistics) in contiguous statistics
        of ``dtype``, calling ``fallback`` for any other statistics; None where the loop does
        not apply to this state and configuration."""
        ...

    def prepare_renorm_correction(self, state: BatchNormState, config: BatchNormConfig,
                                  dtype: torch.dtype
                                  ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """:func:`renorm_correction` for ``state``'s renorm averages and 1-D statistics of
        ``dtype`` (see :func:`prepare_renorm_correction`); None where the loop does not
        apply."""
        ...


# Device type -> its update loop. Filled by batchnorm.kernels (from the CPU kernel); held
# here so that the one update reaches a device's loop without importing the kernels.
UPDATE_LOOPS: dict[str, UpdateLoop] = {}

def prepare_update(state: BatchNormState, config: BatchNormConfig, dtype: torch.dtype,
                   count: int | None, *, groups: int = 1, loop: bool = True) -> PreparedUpdate:
    """The moving-average update of ``state`` with ``config``'s options, decided once for
    statistics of ``dtype`` in ``groups`` groups (ghost batches) of ``count`` values per
    feature each (None: per-position counts, a mask): a :class:`PreparedUpdate`,
    ``update.apply(stats, skipped) -> applied`` as :func:`apply_update` documents.

    The one update, with two backends: where the state's device registered a loop
    (:data:`UPDATE_LOOPS`) and it takes the call (``groups`` groups of ``count`` values or
    of a mask's counts, contiguous statistics of ``dtype``, a plain state with a decay), the
    loop; else torch operations. Both round as ``torch.lerp`` does, so they agree bit for bit
    for one group; the loop sums several groups in order, where torch's reduction may order
    the sum otherwise (the pooled statistics then agree to float rounding). ``loop=False``
    (traced calls: ``torch.compile``, ``torch.func``) always takes torch operations, which
    a tracer sees.
    """
    def tensors(stats: BatchStatistics, skipped: Tensor | None = None) -> Tensor:
        finite, new = _moved(state, stats, momentum=config.momentum, epsilon=config.epsilon,
                             unbiased=bool(config.unbiased_moving_variance),
                             renorm_momentum=config.renorm_momentum)
        writes = [(getattr(state, name), value) for name, value in new.items()]
        if skipped is not None:
            writes.append((skipped, skipped + (~finite).to(skipped.dtype)))
        with torch.no_grad():
            _write_all(writes)
        return finite

    device_loop = UPDATE_LOOPS.get(state.moving_mean.device.type) if loop else None
    if device_loop is None:
        return PreparedUpdate(tensors)
    return (device_loop.prepare_update(state, config, dtype, count, tensors, groups)
            or PreparedUpdate(tensors))


def prepare_renorm_correction(state: BatchNormState, config: BatchNormConfig,
                              dtype: torch.dtype
                              ) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """:func:`renorm_correction` with ``config``'s epsilon and clipping for ``state``'s renorm
    averages, decided once for 1-D statistics of ``dtype``: ``correction(mean, variance) ->
    (r, d)``. Where the state's device registered a loop (:data:`UPDATE_LOOPS`) that takes
    the state, one loop (the same arithmetic, operation by operation), else torch
    operations. Not for traced calls (a tracer must see torch operations)."""
    device_loop = UPDATE_LOOPS.get(state.moving_mean.device.type)
    correction = (None if device_loop is None
                  else device_loop.prepare_renorm_correction(state, config, dtype))
    if correction is not None:
        return correction
    return lambda mean, variance: renorm_correction(mean, variance, state,
                                                    epsilon=config.epsilon,
                                                    clipping=config.clipping)


def traced(t: Tensor) -> bool:
    """Whether ``t`` is seen by a tracer: ``torch.compile``, or a ``torch.func`` transform
    (``vmap``, ``grad``) that wraps it or is running. A tracer must see every operation as a
    torch operation (no loop over the host's memory, no read-back)."""
    return (torch.compiler.is_compiling()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._functorch.is_functorch_wrapped_tensor(t))


def _write_all(writes: list[tuple[Tensor, Tensor]]) -> None:
    """Copy each value into its tensor: all of them, or (raising) none.

    Outside ``torch.func``, one multi-tensor copy (a layer's buffers are made alike: a write
    that fails fails on the first). Inside a transform each tensor may be refused on its own
    (one captured or unbatched, the others not), so the old values are kept until every
    write is made, and put back if one is refused.
    """
    if torch._C._functorch.peek_interpreter_stack() is None:
        torch._foreach_copy_([t for t, _ in writes], [v for _, v in writes])  # one launch
        return
    saved = [target.clone() for target, _ in writes]
    written = 0
    try:
        for target, value in writes:
            target.copy_(value)
            written += 1
    except RuntimeError as error:
        for (target, _), old in zip(writes[:written], saved, strict=False):
            target.copy_(old)
        refusal = str(error).splitlines()[0]
        raise ValueError(
            "batch normalization cannot write its moving averages inside this torch.func "
            f"transform ({refusal}); nothing was written. A training call updates the state "
            "in place, which torch.func allows only for a state batched like the input: "
            "torch.func.vmap over a stack of models' parameters and buffers (model "
            "ensembling: torch.func.stack_module_state(models), in_dims=0 for all of them "
            "and the input). For a state shared by every vmapped input, or a state captured "
            "by torch.func.grad/vjp/jvp, use batchnorm.functional.batch_norm, which returns "
            "the new state instead of writing it (return it as grad's has_aux output), or "
            "call the layer with training=False."
        ) from error


def output_affine(
    gamma: Tensor | None,
    beta: Tensor | None,
    r: Tensor | None = None,
    d: Tensor | None = None,
    adjustment: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """The ``(scale, offset)`` applied to the normalized input: ``y = scale * xhat + offset``.

    Composes, in tf_keras's order, Batch Renormalization's ``(r, d)``, the
    ``adjustment``'s ``(scale, bias)`` and ``gamma``/``beta``:
    ``y = gamma * (adj_scale * (r * xhat + d) + adj_bias) + beta``. Absent terms are
    None (and so is a result that would be the identity). Arguments broadcast.

    >>> output_affine(torch.tensor(2.0), torch.tensor(1.0), r=torch.tensor(3.0),
    ...               d=torch.tensor(0.5))
    (tensor(6.), tensor(2.))
    """
    scale, offset = r, d
    if adjustment is not None:
        adj_scale, adj_bias = adjustment
        scale = adj_scale if scale is None else scale * adj_scale
        offset = adj_bias if offset is None else offset * adj_scale + adj_bias
    if gamma is not None:
        scale = gamma if scale is None else scale * gamma
        offset = None if offset is None else offset * gamma
    if beta is not None:
        offset = beta if offset is None else offset + beta
    return scale, offset


def affine_terms(mean: Tensor, invstd: Tensor, scale: Tensor | None,
                 offset: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(inv, shift)`` with ``scale * (x - mean) * invstd + offset == x * inv + shift``:
    ``inv = scale * invstd``, ``shift = offset - mean * inv``, TensorFlow's order, in
    ``invstd``'s dtype.

    >>> affine_terms(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(2.0), None)
    (tensor(1.), tensor(-1.))
    """
    inv = invstd if scale is None else invstd * scale.to(invstd.dtype)
    shift = -mean * inv
    if offset is not None:
        shift = shift + offset.to(invstd.dtype)
    return inv, shift
