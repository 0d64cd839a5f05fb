"""A plain-NumPy oracle for batch normalization: forward and hand-derived backward.

Independent of torch and of :mod:`batchnorm.functional`; the tests compare
against it. Everything is computed in float64.

With ``xhat = (x - mean) / sqrt(variance + epsilon)`` and ``y = gamma * xhat + beta``,
reducing over the ``N`` values of each feature:

- ``dbeta = sum(dy)``, ``dgamma = sum(dy * xhat)``;
- inference (constant statistics): ``dx = dy * gamma / sqrt(variance + epsilon)``;
- training (batch statistics depend on ``x``):
  ``dx = gamma / sqrt(variance + epsilon) / N * (N * dy - sum(dy) - xhat * sum(dy * xhat))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Forward", "Gradients", "backward", "forward", "moving_average"]


class Forward(NamedTuple):
    y: np.ndarray
    mean: np.ndarray  # feature-shaped statistics used to normalize
    variance: np.ndarray


class Gradients(NamedTuple):
    dx: np.ndarray
    dgamma: np.ndarray | None
    dbeta: np.ndarray | None


def _axes(axis: int | Sequence[int], ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    features = tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    return features, tuple(d for d in range(ndim) if d not in features)


def _expand(t: np.ndarray | None, x: np.ndarray, features: tuple[int, ...]):
    if t is None:
        return None
    return np.asarray(t, np.float64).reshape(
        [x.shape[d] if d in features else 1 for d in range(x.ndim)])


def forward(
    x: np.ndarray,
    *,
    axis: int | Sequence[int],
    training: bool,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    moving_mean: np.ndarray | None = None,
    moving_variance: np.ndarray | None = None,
    epsilon: float = 1e-3,
) -> Forward:
    """Batch normalization of ``x`` with feature ``axis``; batch statistics when ``training``."""
    x = np.asarray(x, np.float64)
    features, reduce = _axes(axis, x.ndim)
    if training:
        mean = x.mean(axis=reduce)
        variance = ((x - _expand(mean, x, features)) ** 2).mean(axis=reduce)
    else:
        mean = np.asarray(moving_mean, np.float64)
        variance = np.asarray(moving_variance, np.float64)
    xhat = (x - _expand(mean, x, features)) / np.sqrt(_expand(variance, x, features) + epsilon)
    y = xhat
    if gamma is not None:
        y = y * _expand(gamma, x, features)
    if beta is not None:
        y = y + _expand(beta, x, features)
    return Forward(y, mean, variance)


def backward(
    x: np.ndarray,
    dy: np.ndarray,
    *,
    axis: int | Sequence[int],
    training: bool,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    moving_mean: np.ndarray | None = None,
    moving_variance: np.ndarray | None = None,
    epsilon: float = 1e-3,
) -> Gradients:
    """Gradients of ``sum(forward(x).y * dy)`` with respect to ``x``, ``gamma`` and ``beta``."""
    x = np.asarray(x, np.float64)
    dy = np.asarray(dy, np.float64)
    features, reduce = _axes(axis, x.ndim)
    stats = forward(x, axis=axis, training=training, moving_mean=moving_mean,
                    moving_variance=moving_variance, epsilon=epsilon)
    inv = 1.0 / np.sqrt(_expand(stats.variance, x, features) + epsilon)
    xhat = (x - _expand(stats.mean, x, features)) * inv
    g = _expand(gamma, x, features) if gamma is not None else 1.0
    dgamma = (dy * xhat).sum(axis=reduce) if gamma is not None else None
    dbeta = dy.sum(axis=reduce) if beta is not None else None
    if training:
        n = x.size // int(np.prod([x.shape[d] for d in features]))
        sum_dy = dy.sum(axis=reduce, keepdims=True)
        sum_dy_xhat = (dy * xhat).sum(axis=reduce, keepdims=True)
        dx = g * inv / n * (n * dy - sum_dy - xhat * sum_dy_xhat)
    else:
        dx = dy * g * inv
    return Gradients(dx, dgamma, dbeta)


def moving_average(
    moving: np.ndarray, statistic: np.ndarray, momentum: float
) -> np.ndarray:
    """One update of a moving average: ``momentum * moving + (1 - momentum) * statistic``."""
    return momentum * np.asarray(moving, np.float64) + (1 - momentum) * np.asarray(
        statistic, np.float64)
