"""Pure functional batch normalization.

    y = gamma * (x - mean) / sqrt(variance + epsilon) + beta

In training mode ``mean`` and ``variance`` are the statistics of the batch (the
biased variance, as TensorFlow computes it); in inference mode they are the
moving averages kept in a :class:`BatchNormState`. Nothing here mutates its
arguments (except :func:`apply_update`, the in-place update, which says so):
:func:`batch_norm` returns the output together with the new state, so the
functions compose with ``torch.func`` (``grad``, ``vmap``, ``functional_call``) and
``torch.compile(fullgraph=True)``.

Two levels:

- :func:`batch_norm` ``(x, state, *, training, **options) -> (y, new_state)``,
  the options as keywords (or a :class:`BatchNormConfig`);
- :func:`forward` ``(x, state, config, ...) -> (y, stats)`` and the update
  (:func:`update_state`, or in place :func:`apply_update`, which reports why it
  skipped a batch): the seam :class:`batchnorm.BatchNorm` is built on;
  :func:`combine_statistics` folds several batches' statistics into those of their
  concatenation (gradient accumulation: one update per optimizer step).

The training modes of TensorFlow live here too: Batch Renormalization
(``renorm``), ghost batches (``virtual_batch_size``), ``adjustment``, and
masks. Training-mode arithmetic is done by a kernel from
:mod:`batchnorm.kernels`, chosen by ``fused``. Statistics are computed in
float32 for half-precision inputs (float64 for float64 inputs); the output has
the input's dtype.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Mapping as _Mapping
from collections.abc import Sequence as _Sequence
from typing import Any as _Any

from torch import Tensor as _Tensor

from . import config as _config
from . import plan as _plan
from . import shapes as _shapes
from . import state as _state
from . import statistics as _statistics
from .config import BatchNormConfig
from .kernels.inference import normalize
from .state import BatchNormState, BatchStatistics, initial_state
from .statistics import apply_update, combine_statistics, moments, update_state

del annotations  # the __future__ feature object: dir() lists the API only (see __all__)

__all__ = [
    "BatchNormConfig",
    "BatchNormState",
    "BatchStatistics",
    "apply_update",
    "batch_norm",
    "combine_statistics",
    "forward",
    "initial_state",
    "moments",
    "normalize",
    "update_state",
]

# Names this module listed before its public surface was cut to the API above: internals,
# defined (and imported by the package) in the modules named here. ``F.check_input`` and
# ``from batchnorm.functional import check_input`` still find them, through ``__getattr__``
# (looked up only when a name is not in the module, so nothing above pays for it); ``dir()``
# does not list them.
_MOVED = {
    **dict.fromkeys(("GHOST_LAYOUTS", "Adjustment"), _config),
    **dict.fromkeys(("broadcast", "check_input", "mask_shape", "reduction_axes",
                     "resolve_axes", "values_per_feature"), _shapes),
    "synchronization_group": _plan,
    "statistics_dtype": _state,
    **dict.fromkeys(("inference_statistics", "pooled_statistics", "renorm_correction",
                     "skip_reason", "update_state_"), _statistics),
}


def __getattr__(name: str) -> _Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_MOVED[name], name)


def forward(
    x: _Tensor,
    state: BatchNormState,
    config: BatchNormConfig,
    *,
    training: bool,
    gamma: _Tensor | None = None,
    beta: _Tensor | None = None,
    mask: _Tensor | None = None,
    process_group: _Any = None,
) -> tuple[_Tensor, BatchStatistics | None]:
    """Normalize ``x``; return the output and, in training, the batch's statistics.

    The state is only read: fold the statistics into it with :func:`update_state`
    (pure) or :func:`apply_update` (in place), or keep them for later.

    Args:
        x: the input, floating point, with the feature axes ``config.axis``.
        state: the moving statistics, feature-shaped (a renorm state for ``renorm=True``).
        config: the options.
        training: True for the batch's statistics, False for the state's averages.
        gamma, beta: feature-shaped scale and offset, or None.
        mask: a boolean tensor broadcastable over the non-feature axes, selecting the
            positions the training statistics come from; every position is normalized.
        process_group: with ``config.synchronized``, the ``torch.distributed`` group whose
            global batch gives the statistics (None: the default group).

    Returns:
        ``(y, stats)``: ``y`` in ``x``'s dtype and shape; ``stats`` a
        :class:`BatchStatistics` in training, else None. An empty batch in training (no
        value per feature, e.g. shape ``(0, C)``) has no statistics: ``stats`` is None and
        ``y`` is empty (its gradients are zeros), unless the statistics are synchronized,
        where the process still takes part with its zero values.

    ``gamma``, ``beta`` and the state's tensors may have another floating dtype than ``x``
    (a float64 layer called with float32): they are cast, on every kernel; the output has
    ``x``'s dtype and the statistics :func:`batchnorm.state.statistics_dtype` of it.

    Raises:
        TypeError: a non-tensor or non-floating input, a non-boolean mask, ``training`` that
            is not a bool, a state that is not a :class:`BatchNormState`, ``gamma``/``beta``/
            state tensors that are not floating-point tensors (``num_updates``: an integer
            scalar).
        ValueError: an axis out of range, feature sizes that differ from the state's, a
            batch that ``virtual_batch_size`` does not divide, one value per feature in
            training, a mask that does not broadcast, ``fused=True`` with a mask; ``gamma``,
            ``beta``, a state tensor or the mask not of the input's feature shape or not on
            its device; a renorm configuration without a renorm state; an ``epsilon`` that is
            0 in a float16 state's dtype. Every check is made before anything is computed.

    >>> import torch
    >>> config = BatchNormConfig(axis=-1)
    >>> y, stats = forward(torch.tensor([[-1.0], [1.0]]), initial_state(1), config,
    ...                    training=True)
    >>> y.flatten(), stats.mean, stats.variance
    (tensor([-0.9995,  0.9995]), tensor([[0.]]), tensor([[1.]]))
    """
    prepared = _plan.prepare(x, state, config, training=training, gamma=gamma, beta=beta,
                             mask=mask, process_group=process_group)
    return _plan.run(x, state, prepared)


def batch_norm(
    x: _Tensor,
    state: BatchNormState,
    *,
    training: bool,
    gamma: _Tensor | None = None,
    beta: _Tensor | None = None,
    axis: int | _Sequence[int] = 1,
    momentum: float | None = 0.99,
    epsilon: float = 1e-3,
    unbiased_moving_variance: bool = False,
    debias: bool = False,
    renorm: bool = False,
    renorm_clipping: _Mapping[str, float] | None = None,
    renorm_momentum: float = 0.99,
    virtual_batch_size: int | None = None,
    ghost_layout: str = "strided",
    adjustment: _config.Adjustment | None = None,
    fused: bool | None = None,
    mask: _Tensor | None = None,
    synchronized: bool = False,
    process_group: _Any = None,
    config: BatchNormConfig | None = None,
    activation: str | None = None,
) -> tuple[_Tensor, BatchNormState]:
    """Batch-normalize ``x``; return ``(y, new_state)`` without mutating anything.

    In training the batch statistics normalize ``x`` and are folded into the
    moving averages of the returned state; in inference the state's moving
    averages normalize ``x`` and the state is returned unchanged.

    Args:
        x: the input, floating point.
        state: from :func:`initial_state` (``renorm=True`` for a renorm state).
        training: True for the batch's statistics (and an update), False for the state's.
        gamma, beta: feature-shaped scale and offset, or None.
        axis, momentum, epsilon, unbiased_moving_variance, debias, renorm, renorm_clipping:
            the options of :class:`batchnorm.BatchNorm`, validated as a
            :class:`BatchNormConfig`.
        renorm_momentum, virtual_batch_size, ghost_layout, adjustment, fused, synchronized:
            likewise.
        activation: likewise (``activation="relu"``: ``y`` is ``relu`` of the normalized
            output, fused into the kernels' passes).
        mask: a boolean tensor selecting the positions the training statistics come from.
        process_group: the group ``synchronized=True`` takes the global batch over.
        config: the options as one :class:`BatchNormConfig` instead of keywords (then no
            option keyword may be given). Its ``unbiased_moving_variance=None`` (the
            default) is decided for the input as the layer decides it (tf_keras's rule, see
            :meth:`BatchNormConfig.for_input`).

    Returns:
        ``(y, new_state)``.

    Raises:
        TypeError: an option of the wrong type, ``config`` given with option keywords.
        ValueError: an invalid option or combination, a non-renorm state with
            ``renorm=True``, and the input errors of :func:`forward`.

    >>> import torch
    >>> state = initial_state(1)
    >>> x = torch.tensor([[-10.0], [0.0], [10.0]])
    >>> y, state = batch_norm(x, state, training=True, axis=-1)
    >>> y.flatten()
    tensor([-1.2247,  0.0000,  1.2247])
    >>> state.moving_mean, state.moving_variance
    (tensor([0.]), tensor([1.6567]))
    >>> batch_norm(x, state, training=True, axis=-1, activation="relu")[0].flatten()
    tensor([0.0000, 0.0000, 1.2247])
    """
    # The options by name, of the types BatchNormConfig's keywords take.
    options: dict[str, _Any] = {
        "axis": axis, "momentum": momentum, "epsilon": epsilon,
        "unbiased_moving_variance": unbiased_moving_variance, "debias": debias,
        "renorm": renorm, "renorm_clipping": renorm_clipping, "renorm_momentum": renorm_momentum,
        "virtual_batch_size": virtual_batch_size, "ghost_layout": ghost_layout,
        "adjustment": adjustment, "fused": fused, "synchronized": synchronized,
        "activation": activation}
    if config is None:
        config = BatchNormConfig(**options)
    else:
        given = [k for k, v in options.items() if v != _DEFAULTS[k]]
        if given:
            raise TypeError(f"batch_norm: pass the options either as config= or as keywords, "
                            f"not both (got config and {given})")
        if not isinstance(config, BatchNormConfig):
            raise TypeError(f"config must be a BatchNormConfig, got {type(config).__name__}")
    y, stats = forward(x, state, config, training=training, gamma=gamma, beta=beta, mask=mask,
                       process_group=process_group)
    if stats is None:
        return y, state
    new_state = update_state(
        state, stats, momentum=config.momentum, epsilon=config.epsilon,
        unbiased_moving_variance=bool(config.for_input(x.ndim, x.dtype).unbiased_moving_variance),
        renorm_momentum=config.renorm_momentum,
    )
    return y, new_state


_DEFAULTS = {name: parameter.default
             for name, parameter in _inspect.signature(batch_norm).parameters.items()
             if name not in ("x", "state", "training", "gamma", "beta", "mask", "process_group",
                             "config")}
