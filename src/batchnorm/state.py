"""The state of a batch normalization layer and one batch's statistics: their one layout.

:class:`BatchNormState` is what a layer keeps between calls (its buffers);
:class:`BatchStatistics` is what one training call measures. Their field names,
the buffer each field is stored in (:data:`BUFFER_NAMES`) and their initial
values (:func:`initial_state`) are written here and nowhere else.

This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["BUFFER_NAMES", "BatchNormState", "BatchStatistics", "initial_state", "state_fields",
           "statistics_dtype"]


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
    # A field named like tuple.count, which it hides (on purpose: the statistics' name).
    count: int | Tensor  # type: ignore[assignment]


# BatchNormState field -> the name of the layer buffer (and state_dict key) that holds it.
BUFFER_NAMES: dict[str, str] = {
    "moving_mean": "moving_mean", "moving_variance": "moving_variance",
    "num_updates": "num_updates", "initial_mean": "initial_moving_mean",
    "initial_variance": "initial_moving_variance", "moving_stddev": "moving_stddev",
    "renorm_mean": "renorm_mean", "renorm_stddev": "renorm_stddev",
}


def state_fields(*, debias: bool, renorm: bool) -> tuple[str, ...]:
    """The :class:`BatchNormState` fields a state with these options holds (the others are None).

    >>> state_fields(debias=False, renorm=True)
    ('moving_mean', 'moving_variance', 'num_updates', 'moving_stddev', 'renorm_mean', \
'renorm_stddev')
    """
    fields = ["moving_mean", "moving_variance", "num_updates"]
    if debias:
        fields += ["initial_mean", "initial_variance"]
    if renorm:
        fields += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return tuple(fields)


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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

    Args:
        num_features: the feature size, or sizes for several feature axes.
        moving_mean, moving_variance: the averages' initial values (numbers, or tensors
            that broadcast to the feature shape).
        debias: keep the initial values, which ``debias=True`` inference needs.
        renorm: add the renorm averages, started where tf_keras starts them:
            ``renorm_mean = moving_mean`` and
            ``moving_stddev = renorm_stddev = sqrt(moving_variance)``.
        dtype, device: of the averages (``num_updates`` is int64).

    Returns:
        A :class:`BatchNormState`.

    Raises:
        RuntimeError: initial values that do not broadcast to the feature shape.

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
