"""Inference: one elementwise pass, ``y = x * inv + shift`` per feature, for every caller.

:func:`normalize` is ``tf.nn.batch_normalization`` (statistics that broadcast
against ``x``); :func:`infer` normalizes with a state's moving averages (the
layer's and :func:`batchnorm.functional.batch_norm`'s inference mode); the
composite training kernel's output pass is :func:`normalize` too. All of them
end in :func:`normalize_features`, which picks the pass:

- ATen's batch-norm inference kernel, when the statistics are per feature along
  one axis, in the input's statistics dtype, and carry no gradient (it computes
  ``alpha = scale / sqrt(variance + eps)``, ``beta = offset - mean * alpha``,
  ``y = x * alpha + beta``: TensorFlow's order);
- else on CPU without autograd the numba loop (:func:`batchnorm.kernels.cpu_layout.affine`);
- else ``addcmul``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..shapes import broadcast
from ..state import BatchNormState, statistics_dtype
from ..statistics import affine_terms, inference_statistics
from . import cpu_layout
from .protocol import KernelCall

__all__ = ["infer", "normalize", "normalize_features"]


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
    in the statistics' precision; the result has ``x``'s dtype, in one pass
    over ``x`` (see the module's docstring for which).

    Args:
        x: the input.
        mean, variance: statistics that broadcast against ``x`` (e.g. from
            ``moments(x, axes, keepdims=True)``).
        offset, scale: ``beta`` and ``gamma``, broadcasting likewise, or None.
        epsilon: added to the variance.

    Returns:
        The normalized tensor, ``x``'s dtype and shape.

    Raises:
        RuntimeError: statistics that do not broadcast against ``x`` (torch's message).

    >>> normalize(torch.tensor([-10.0, 0.0, 10.0]), torch.tensor(0.0), torch.tensor(66.6667),
    ...           None, None, 1e-3)
    tensor([-1.2247,  0.0000,  1.2247])
    """
    axis = _feature_axis(x, mean, variance, offset, scale)
    if axis is not None:
        flat = [None if t is None else t.reshape(-1) for t in (mean, variance, offset, scale)]
        return normalize_features(x, (axis,), *flat, epsilon)
    return _affine(x, mean, variance, offset, scale, epsilon)


def infer(x: Tensor, state: BatchNormState, call: KernelCall) -> Tensor:
    """Normalize ``x`` with ``state``'s moving averages (debiased if the configuration says so)."""
    config = call.config
    mean, variance = inference_statistics(state, momentum=config.momentum,
                                          epsilon=config.epsilon, debias=config.debias)
    if torch.is_grad_enabled() and mean is state.moving_mean and _differentiable(x, call):
        # ATen's kernel keeps the statistics it is given for backward: give it copies, so
        # that writing the buffers before backward (DDP's broadcast_buffers, an EMA, a
        # second training call) cannot fail or change the gradient.
        mean, variance = mean.clone(), variance.clone()
    return normalize_features(x, call.axes, mean, variance, call.beta, call.gamma,
                              config.epsilon)


def _differentiable(x: Tensor, call: KernelCall) -> bool:
    return x.requires_grad or any(t is not None and t.requires_grad
                                  for t in (call.gamma, call.beta))


def normalize_features(x: Tensor, axes: tuple[int, ...], mean: Tensor, variance: Tensor,
                       offset: Tensor | None, scale: Tensor | None, epsilon: float) -> Tensor:
    """:func:`normalize` with feature-shaped statistics (the sizes of ``x`` along ``axes``)."""
    if len(axes) == 1:
        y = _aten(x, axes[0], mean, variance, offset, scale, epsilon)
        if y is not None:
            return y
    return _affine(x, *(broadcast(t, x, axes) for t in (mean, variance, offset, scale)),
                   epsilon)


def _feature_axis(x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None,
                  scale: Tensor | None) -> int | None:
    """The one axis broadcast statistics vary along, when they are per feature of ``x``
    along it (every other size 1), else None."""
    if x.ndim < 2 or mean.ndim != x.ndim or variance.shape != mean.shape:
        return None
    axes = [d for d in range(x.ndim) if mean.shape[d] != 1]
    if len(axes) != 1 or any(t is not None and t.shape != mean.shape for t in (offset, scale)):
        return None
    return axes[0] if mean.shape[axes[0]] == x.shape[axes[0]] else None


def _affine(x: Tensor, mean: Tensor, variance: Tensor, offset: Tensor | None,
            scale: Tensor | None, epsilon: float) -> Tensor:
    """Broadcast statistics: the CPU loop, else ``addcmul``."""
    inv, shift = affine_terms(mean, torch.rsqrt(variance + epsilon), scale, offset)
    y = cpu_layout.affine(x, inv, shift)
    if y is None:
        y = torch.addcmul(shift, x, inv)
    return y.to(x.dtype)


def _aten(x: Tensor, axis: int, mean: Tensor, variance: Tensor, offset: Tensor | None,
          scale: Tensor | None, epsilon: float) -> Tensor | None:
    """1-D per-feature statistics along ``axis`` by ATen's inference kernel, or None where it
    does not apply (statistics that need a gradient, or not in the input's statistics dtype)."""
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
