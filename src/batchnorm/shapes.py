"""Axes and shapes: feature axes resolved against an input, broadcasting, masks, input checks.

This module imports nothing from the package.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, overload

import torch
from torch import Tensor

__all__ = ["broadcast", "check_features", "check_input", "lazy_feature_shape", "mask_shape",
           "reduction_axes", "resolve_axes", "values_per_feature"]


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
        # A plain int (specialized when traced): torch.compile(dynamic=True) may trace an int
        # option as a SymInt, for which `d in axes` came out False, so reduction_axes kept
        # the feature axis and a one-sample batch passed as C values per feature.
        resolved.append(operator.index(a) % ndim)
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"axis {tuple(axes)} names the same axis twice for an input of rank {ndim}")
    return tuple(sorted(resolved))


@overload
def broadcast(t: Tensor, x: Tensor, axes: tuple[int, ...]) -> Tensor: ...
@overload
def broadcast(t: None, x: Tensor, axes: tuple[int, ...]) -> None: ...
@overload
def broadcast(t: Tensor | None, x: Tensor, axes: tuple[int, ...]) -> Tensor | None: ...
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
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but the input is on {x.device}: move it "
                         "with mask.to(x.device)")
    try:
        # The mask must broadcast to the input's shape, not to a larger one.
        fits = torch.broadcast_shapes(mask_shape(mask, x, axes), x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast over the input's non-feature "
            f"axes: input shape {tuple(x.shape)}, feature axis {axes}"
        )


def check_features(x: Tensor, axes: tuple[int, ...],
                   tensors: Sequence[tuple[str, Tensor | None]]) -> None:
    """Check that each named tensor (None: absent) fits the input ``x``: a floating-point
    tensor of the feature shape (``x``'s sizes along ``axes``) on ``x``'s device; its dtype may
    differ from ``x``'s (it is cast). Metadata only: nothing is read from the device.

    ``TypeError`` for a non-tensor or a non-floating dtype, ``ValueError`` for another shape
    or device; the message names the tensor.
    """
    shape = x.shape
    features = tuple(shape[a] for a in axes)
    device = x.device
    for name, t in tensors:  # per call: the fast path is four cheap tests per tensor
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}; "
                            "convert it first, e.g. .float()")
        if t.shape != features:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, but the input of shape {tuple(shape)} "
                f"has feature shape {features} (axis {axes}): {name} must have exactly that "
                "shape")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}: move "
                             "it with .to(x.device)")


def mask_shape(mask: Tensor, x: Tensor, axes: tuple[int, ...]) -> list[int]:
    """The mask's shape with size-1 feature axes inserted when it covers only the other axes,
    then size-1 axes in front up to ``x``'s rank (broadcasting aligns it on the last axis), so
    that its axis ``d`` is ``x``'s axis ``d``.

    >>> mask_shape(torch.ones(8, 5, dtype=torch.bool), torch.ones(8, 3, 5), (1,))
    [8, 1, 5]
    >>> mask_shape(torch.ones(5, dtype=torch.bool), torch.ones(8, 3, 5), (1,))
    [1, 1, 5]
    """
    shape = list(mask.shape)
    if mask.ndim == x.ndim - len(axes):
        for a in axes:
            shape.insert(a, 1)
    return [1] * (x.ndim - len(shape)) + shape


def check_input(
    x: Tensor,
    axis: int | Sequence[int],
    feature_shape: Sequence[int] | None,
    *,
    training: bool = False,
    virtual_batch_size: int | None = None,
    mask: Tensor | None = None,
    synchronized: bool = False,
    feature_source: str | None = None,
) -> tuple[int, ...]:
    """Validate an input against the layer's configuration; return its feature axes.

    ``feature_source`` says, in the message, where ``feature_shape`` comes from.

    ``TypeError`` for a non-floating dtype or a non-boolean mask; ``ValueError``
    for an axis out of range, feature sizes that differ from ``feature_shape``,
    a batch that ``virtual_batch_size`` does not divide, a mask that does not
    broadcast (or is on another device), or (in training) a single value per feature,
    whose variance does not exist. An empty batch (no value per feature) passes.
    ``synchronized`` (statistics across processes) accepts any local batch size, 0
    included: the statistics are those of every process's batch; ghost batches, formed
    within the process, are still checked.
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
            + (f" ({feature_source})" if feature_source else "")
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
    if count == 0:  # an empty batch: no statistics, an empty output (see functional.forward)
        return axes
    if synchronized and virtual_batch_size is None:
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


def lazy_feature_shape(x: Tensor, axis: int | Sequence[int], **checks: Any) -> tuple[int, ...]:
    """The feature shape a lazy layer takes from its first input ``x`` (checked as
    :func:`check_input` checks it, with ``checks``); a feature axis of size 0 is refused,
    naming ``axis`` as the user gave it.

    >>> lazy_feature_shape(torch.zeros(8, 3, 4), 1)
    (3,)
    """
    feature_shape = tuple(x.shape[a] for a in check_input(x, axis, None, **checks))
    if 0 in feature_shape:
        raise ValueError(
            f"a lazy BatchNorm takes its number of features from its first input, but the "
            f"input of shape {tuple(x.shape)} has a feature axis (axis={axis!r}) of size 0: "
            "a layer cannot have 0 features; call it first with an input that has features, "
            "or give num_features")
    return feature_shape
