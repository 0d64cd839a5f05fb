"""A plain-NumPy oracle for batch normalization: forward, hand-derived backward, state update.

Independent of torch and of the rest of :mod:`batchnorm`; the tests compare
against it. Everything is computed in float64, every training mode included.

**Groups.** Training statistics are taken per group of samples and per feature.
Without ghost batches there is one group. With ``virtual_batch_size=V`` a batch
of ``N`` samples forms ``G = N // V`` groups: sample ``n`` is in group ``n % G``
for ``ghost_layout="strided"`` (tf_keras reshapes ``(N, ...)`` to ``(V, G, ...)``)
and in group ``n // V`` for ``"consecutive"``.

**Masks.** With weights ``w`` (the boolean ``mask`` broadcast to ``x``; all ones
without a mask), per group and feature ``n = sum(w)``, ``mean = sum(w x) / n``,
``var = sum(w (x - mean)**2) / n`` (biased). Every position, selected or not, is
normalized with its group's statistics, ``xhat = (x - mean) * inv`` with
``inv = 1 / sqrt(var + epsilon)``; a group with ``n < 2`` (no variance) is normalized
with the moving statistics instead. Masked-out values are left out (selected, not
multiplied by 0: a NaN there does not reach the statistics).

**Pooled statistics** ``mu_b``/``var_b`` (what the moving averages and renorm
see): the equal-weight average over the groups with ``n >= 2`` of the group means and
biased variances; NaN where no group has two values.

**Output.** ``y = gamma * (adj_scale * (r * xhat + d) + adj_bias) + beta``, where
the adjustment (arrays broadcasting against ``x`` by NumPy's rules, as in TensorFlow, or
else shaped like ``gamma``) defaults to
``(1, 0)`` and Batch Renormalization (when ``renorm_mean``/``renorm_stddev`` are
given) uses, with ``s = max(renorm_stddev, sqrt(epsilon))``,
``r = clip(sqrt(var_b + epsilon) / s, rmin, rmax)`` and
``d = clip((mu_b - renorm_mean) / s, -dmax, dmax)`` (``r = 1, d = 0`` where the
pooled statistics are NaN); otherwise ``r = 1, d = 0``. Inference normalizes
with ``moving_mean``/``moving_variance`` and applies neither renorm nor the adjustment.

**Backward** of ``sum(y * dy)``, with ``r`` and ``d`` constants (no gradient, as
in tf_keras). With ``dxhat = dy * gamma * adj_scale * r``, per group and feature,
sums over *all* positions ``i`` of the group (masked-out ones too, since they are
normalized with the group's statistics):

- ``dx_j = inv * dxhat_j - w_j * inv / n * sum(dxhat_i)
  - w_j * inv * xhat_j / n * sum(dxhat_i * xhat_i)``;
  without a mask this is ``inv / N * (N * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))``;
- constant statistics (inference, groups with ``n < 2``): ``dx = dxhat * inv``;
- ``dgamma = sum(dy * (adj_scale * (r * xhat + d) + adj_bias))``, ``dbeta = sum(dy)``.

**State update** (:func:`update`): ``moving -= (moving - value) * (1 - momentum)``
for ``moving_mean`` (value ``mu_b``) and ``moving_variance`` (``var_b``). With
renorm, ``moving_stddev`` moves toward ``sqrt(var_b + epsilon)`` with
``momentum``, ``moving_variance = relu(moving_stddev**2 - epsilon)``, and
``renorm_mean``/``renorm_stddev`` move toward ``mu_b``/``sqrt(var_b + epsilon)``
with ``renorm_momentum``. ``unbiased`` multiplies every group variance by
``n / (n - 1)`` before pooling. Non-finite pooled statistics leave the state
unchanged, ``num_updates`` included; otherwise ``num_updates`` grows by one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Forward", "Gradients", "backward", "forward", "moving_average",
           "tf_keras_unbiased", "update"]


class Forward(NamedTuple):
    y: np.ndarray
    mean: np.ndarray  # feature-shaped: pooled batch mean (training) or moving mean (inference)
    variance: np.ndarray  # likewise, the biased variance
    # Training only, shaped (groups, *features): per-group statistics (NaN for empty groups)
    # and counts n; and the feature-shaped renorm correction (None without renorm).
    group_mean: np.ndarray | None = None
    group_variance: np.ndarray | None = None
    count: np.ndarray | None = None
    r: np.ndarray | None = None
    d: np.ndarray | None = None


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


def _group(a: np.ndarray, size: int | None, layout: str) -> np.ndarray:
    """``(N, ...) -> (G, M, ...)``: a leading group axis (``G = 1`` without ghost batches)."""
    if size is None:
        return a[None]
    groups = a.shape[0] // size
    if layout == "strided":
        return a.reshape(size, groups, *a.shape[1:]).swapaxes(0, 1)
    return a.reshape(groups, size, *a.shape[1:])


def _ungroup(a: np.ndarray, size: int | None, layout: str) -> np.ndarray:
    if size is None:
        return a[0]
    if layout == "strided":
        a = a.swapaxes(0, 1)
    return a.reshape(-1, *a.shape[2:])


class _Pass(NamedTuple):
    """Grouped intermediate values shared by :func:`forward` and :func:`backward`."""

    out: Forward
    xhat: np.ndarray  # grouped shape (G, M, ...) like every array here
    inv: np.ndarray
    w: np.ndarray
    n: np.ndarray
    constant: np.ndarray  # True where the statistics do not depend on x
    scale: np.ndarray  # S = gamma * adj_scale * r: dxhat = dy * S
    z: np.ndarray  # adj_scale * (r * xhat + d) + adj_bias: dgamma = sum(dy * z)
    features: tuple[int, ...]  # feature axes of the grouped view


def _pass(
    x, *, axis, training, gamma, beta, moving_mean, moving_variance, epsilon,
    virtual_batch_size=None, ghost_layout="strided", mask=None, renorm_mean=None,
    renorm_stddev=None, renorm_clipping=None, adj_scale=None, adj_bias=None,
) -> _Pass:
    x = np.asarray(x, np.float64)
    features, _ = _axes(axis, x.ndim)
    size = virtual_batch_size if training else None

    def grouped(t):  # a feature-shaped array, broadcastable against the grouped view
        return None if t is None else _expand(t, x, features)[None]

    def full(t, default):  # a feature-shaped or x-shaped array, grouped
        if t is None:
            return np.float64(default)
        t = np.asarray(t, np.float64)
        try:
            numpy_rule = np.broadcast_shapes(t.shape, x.shape) == x.shape
        except ValueError:
            numpy_rule = False
        t = t if numpy_rule else _expand(t, x, features)
        return _group(np.broadcast_to(t, x.shape), size, ghost_layout)

    v = _group(x, size, ghost_layout)
    vf = tuple(a + 1 for a in features)
    reduce = tuple(a for a in range(1, v.ndim) if a not in vf)
    if mask is None:
        w = np.ones_like(v)
    else:
        m = np.asarray(mask, bool)
        if m.ndim == x.ndim - len(features):  # shaped like the non-feature axes
            m = np.expand_dims(m, features)
        w = _group(np.broadcast_to(m, x.shape).astype(np.float64), size, ghost_layout)
    mm, mv = grouped(moving_mean), grouped(moving_variance)
    r = d = None
    if training:
        n = w.sum(axis=reduce, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            selected = w > 0
            group_mean = np.where(selected, v, 0.0).sum(axis=reduce, keepdims=True) / n
            group_var = np.where(selected, (v - group_mean) ** 2, 0.0).sum(
                axis=reduce, keepdims=True) / n
        few = n < 2  # no variance: normalized with the moving statistics
        constant = np.broadcast_to(few, v.shape)
        mean = group_mean if mm is None else np.where(few, mm, group_mean)
        var = group_var if mv is None else np.where(few, mv, group_var)
        squeeze = [s for a, s in enumerate(n.shape) if a not in reduce]
        stats = [t.reshape(squeeze) for t in (group_mean, group_var, n)]
        mu_b, var_b = _pool(*stats)
        if renorm_mean is not None:
            r, d = _renorm(mu_b, var_b, renorm_mean, renorm_stddev, epsilon, renorm_clipping)
    else:
        n, constant, mean, var, stats = None, np.ones(v.shape, bool), mm, mv, [None] * 3
        mu_b, var_b = (np.asarray(t, np.float64) for t in (moving_mean, moving_variance))
    inv = 1.0 / np.sqrt(var + epsilon)
    xhat = (v - mean) * inv
    rr = 1.0 if r is None else grouped(r)
    dd = 0.0 if d is None else grouped(d)
    adjusted = training and (adj_scale is not None or adj_bias is not None)
    a_scale = full(adj_scale, 1.0) if adjusted else np.float64(1.0)
    a_bias = full(adj_bias, 0.0) if adjusted else np.float64(0.0)
    z = a_scale * (rr * xhat + dd) + a_bias
    g = 1.0 if gamma is None else grouped(gamma)
    y = g * z + (0.0 if beta is None else grouped(beta))
    out = Forward(_ungroup(y, size, ghost_layout), mu_b, var_b, *stats, r, d)
    return _Pass(out, xhat, inv, w, n, constant, g * a_scale * rr, z, vf)


def _pool(mean: np.ndarray, variance: np.ndarray, count: np.ndarray):
    """Equal-weight average over the groups with two values or more (axis 0); NaN where there
    are none."""
    valid = count > 1
    groups = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.where(valid, mean, 0.0).sum(axis=0) / groups,
                np.where(valid, variance, 0.0).sum(axis=0) / groups)


def _renorm(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping):
    clipping = clipping or {}
    s = np.maximum(np.asarray(renorm_stddev, np.float64), np.sqrt(epsilon))
    r = np.clip(np.sqrt(variance + epsilon) / s, clipping.get("rmin", 0.0),
                clipping.get("rmax", np.inf))
    dmax = clipping.get("dmax", np.inf)
    d = np.clip((mean - np.asarray(renorm_mean, np.float64)) / s, -dmax, dmax)
    return np.where(np.isfinite(r), r, 1.0), np.where(np.isfinite(d), d, 0.0)


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
    virtual_batch_size: int | None = None,
    ghost_layout: str = "strided",
    mask: np.ndarray | None = None,
    renorm_mean: np.ndarray | None = None,
    renorm_stddev: np.ndarray | None = None,
    renorm_clipping: Mapping[str, float] | None = None,
    adj_scale: np.ndarray | None = None,
    adj_bias: np.ndarray | None = None,
) -> Forward:
    """Batch normalization of ``x`` with feature ``axis``; batch statistics when ``training``.

    Renorm is on when ``renorm_mean``/``renorm_stddev`` are given. The moving
    statistics are needed in inference, and in training where a mask leaves a group empty.
    """
    return _pass(x, axis=axis, training=training, gamma=gamma, beta=beta,
                 moving_mean=moving_mean, moving_variance=moving_variance, epsilon=epsilon,
                 virtual_batch_size=virtual_batch_size, ghost_layout=ghost_layout, mask=mask,
                 renorm_mean=renorm_mean, renorm_stddev=renorm_stddev,
                 renorm_clipping=renorm_clipping, adj_scale=adj_scale, adj_bias=adj_bias).out


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
    **modes,
) -> Gradients:
    """Gradients of ``sum(forward(x, ...).y * dy)`` w.r.t. ``x``, ``gamma`` and ``beta``.

    ``modes`` are :func:`forward`'s other keyword arguments (ghost batches, mask,
    renorm, adjustment). ``dgamma``/``dbeta`` are None when ``gamma``/``beta`` are.
    """
    p = _pass(x, axis=axis, training=training, gamma=gamma, beta=beta, moving_mean=moving_mean,
              moving_variance=moving_variance, epsilon=epsilon, **modes)
    size = modes.get("virtual_batch_size") if training else None
    layout = modes.get("ghost_layout", "strided")
    g = _group(np.asarray(dy, np.float64), size, layout)
    sum_all = tuple(a for a in range(g.ndim) if a not in p.features)
    dgamma = (g * p.z).sum(axis=sum_all) if gamma is not None else None
    dbeta = g.sum(axis=sum_all) if beta is not None else None
    dxhat = g * p.scale
    dx = dxhat * p.inv  # constant statistics
    if training:
        reduce = tuple(a for a in sum_all if a != 0)
        with np.errstate(invalid="ignore", divide="ignore"):  # n = 0: replaced below
            k = p.w * p.inv / p.n
            batch = (dx - k * dxhat.sum(axis=reduce, keepdims=True)
                     - k * p.xhat * (dxhat * p.xhat).sum(axis=reduce, keepdims=True))
        dx = np.where(p.constant, dx, batch)
    return Gradients(_ungroup(np.broadcast_to(dx, g.shape), size, layout), dgamma, dbeta)


def tf_keras_unbiased(
    ndim: int,
    axis: int | Sequence[int],
    *,
    fused: bool | None = None,
    renorm: bool = False,
    virtual_batch_size: int | None = None,
    adjustment: bool = False,
    synchronized: bool = False,
    dtype: np.dtype | type = np.float32,
) -> bool:
    """Whether tf_keras's ``BatchNormalization`` with these arguments feeds the unbiased batch
    variance of a rank-``ndim`` input into ``moving_variance`` (:func:`update`'s ``unbiased``).

    tf_keras 2.21 (``BatchNormalizationBase``): ``fused=None`` becomes False in ``__init__``
    with ``synchronized``, ``renorm``, several axes or one outside (-4, -3, -1, 1, 3, 4),
    ``virtual_batch_size``, ``adjustment`` or a float64 compute dtype; ``build`` then fuses
    rank 4 (axis 1 or 3 after ``validate_axis``) and rank 5 (axis 1 or 4; other axes turn
    fused off). Its fused op (``tf.compat.v1.nn.fused_batch_norm``) returns the Bessel-corrected
    batch variance, which enters the moving average; the unfused path the biased one.
    """
    axes = [axis] if isinstance(axis, int) else list(axis)
    if fused is False or synchronized or renorm or virtual_batch_size is not None \
            or adjustment or np.dtype(dtype) == np.float64:
        return False
    if len(axes) != 1 or axes[0] not in (-4, -3, -1, 1, 3, 4) or ndim not in (4, 5):
        return False
    return axes[0] % ndim in (1, ndim - 1)


def update(
    state: Mapping[str, np.ndarray],
    stats: Forward,
    *,
    momentum: float,
    epsilon: float = 1e-3,
    renorm_momentum: float = 0.99,
    unbiased: bool = False,
) -> dict[str, np.ndarray]:
    """The state after one training batch with ``stats`` (a training :func:`forward`'s result).

    ``state`` holds ``moving_mean``, ``moving_variance``, ``num_updates`` and,
    with renorm, ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``; a new
    dict is returned, with other keys copied unchanged.
    """
    new = {k: np.asarray(v, np.float64) for k, v in state.items()}
    new["num_updates"] = np.asarray(state["num_updates"])
    variance = stats.group_variance
    if unbiased:
        with np.errstate(invalid="ignore", divide="ignore"):
            variance = variance * stats.count / (stats.count - 1)
    mean, variance = _pool(stats.group_mean, variance, stats.count)
    if not (np.isfinite(mean).all() and np.isfinite(variance).all()):
        return new

    def ema(name: str, value: np.ndarray, decay: float) -> np.ndarray:
        return new[name] - (new[name] - value) * (1.0 - decay)

    new["moving_mean"] = ema("moving_mean", mean, momentum)
    if "moving_stddev" in new:
        stddev = np.sqrt(variance + epsilon)
        new["moving_stddev"] = ema("moving_stddev", stddev, momentum)
        new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - epsilon, 0.0)
        new["renorm_mean"] = ema("renorm_mean", mean, renorm_momentum)
        new["renorm_stddev"] = ema("renorm_stddev", stddev, renorm_momentum)
    else:
        new["moving_variance"] = ema("moving_variance", variance, momentum)
    new["num_updates"] = new["num_updates"] + 1
    return new


def moving_average(
    moving: np.ndarray, statistic: np.ndarray, momentum: float
) -> np.ndarray:
    """One update of a moving average: ``momentum * moving + (1 - momentum) * statistic``."""
    return momentum * np.asarray(moving, np.float64) + (1 - momentum) * np.asarray(
        statistic, np.float64)
