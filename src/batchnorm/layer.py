"""The BatchNorm layer: TensorFlow's batch normalization as a ``torch.nn.Module``."""

from __future__ import annotations

import numbers
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from . import functional as F
from . import initializers
from .functional import Adjustment, BatchNormState, BatchStatistics
from .initializers import Initializer
from .updates import active_recorder

__all__ = ["BatchNorm", "apply_constraints", "regularization_loss"]

Regularizer = Callable[[Tensor], Tensor]
# BatchNormState fields and the buffers that hold them.
_BUFFER = {
    "moving_mean": "moving_mean", "moving_variance": "moving_variance",
    "num_updates": "num_updates", "initial_mean": "initial_moving_mean",
    "initial_variance": "initial_moving_variance", "moving_stddev": "moving_stddev",
    "renorm_mean": "renorm_mean", "renorm_stddev": "renorm_stddev",
}
Constraint = Callable[[Tensor], Tensor]


def _normalize_axis(axis: int | Sequence[int]) -> int | tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) and not isinstance(axis, bool) else axis
    try:
        axes = tuple(axes)
    except TypeError:
        raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}") from None
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(f"axis must be an int or a non-empty sequence of ints, got {axis!r}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {axis!r} names the same axis twice")
    if len({a >= 0 for a in axes}) == 2:
        # (1, -1) may or may not be the same axis depending on the input's rank.
        raise ValueError(
            f"axis {axis!r} mixes negative and non-negative axes; use one convention"
        )
    return axes[0] if isinstance(axis, int) else axes


def _normalize_num_features(
    num_features: int | Sequence[int] | None, axis: int | tuple[int, ...]
) -> tuple[int, ...] | None:
    if num_features is None:
        return None
    shape = (num_features,) if isinstance(num_features, numbers.Integral) else num_features
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(
            f"num_features must be an int, a tuple of ints or None, got {num_features!r}"
        ) from None
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
               for s in shape):
        raise ValueError(f"num_features must hold positive ints, got {num_features!r}")
    n_axes = 1 if isinstance(axis, int) else len(axis)
    if len(shape) != n_axes:
        raise ValueError(
            f"num_features {num_features!r} gives {len(shape)} size(s) but axis {axis!r} "
            f"names {n_axes} feature axis/axes"
        )
    return tuple(int(s) for s in shape)


class BatchNorm(nn.Module):
    r"""Batch normalization with TensorFlow's semantics, names and defaults.

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    **Training** (``training=True``, or ``None`` after ``model.train()``):
    :math:`\mu, \sigma^2` are the batch's mean and biased variance over every
    axis except the feature ``axis``; the moving averages are updated,
    ``moving = momentum * moving + (1 - momentum) * batch_statistic``
    (recorded instead of applied inside :func:`batchnorm.deferred_updates`).

    **Inference** (``training=False``, or ``None`` after ``model.eval()``):
    :math:`\mu, \sigma^2` are ``moving_mean`` and ``moving_variance``. This is
    what a model is evaluated with: call it with the right mode.

    **Frozen** (``layer.trainable = False``, Keras semantics): the layer always
    runs in inference mode, never updates its moving statistics, and ``gamma``/
    ``beta`` stop requiring grad; setting it back to True restores all three.
    This is what fine-tuning a pretrained model wants.

    Args:
        num_features: size of the feature axis (a tuple for several axes), or
            None to infer it at the first call.
        axis: feature axis or axes; ``1`` is PyTorch's ``(N, C, ...)``, ``-1``
            TensorFlow's channels-last.
        momentum: decay of the moving averages, in [0, 1) (PyTorch's
            ``momentum=0.1`` is ``0.9`` here), or None for the cumulative
            average of every batch so far (PyTorch's ``momentum=None``).
        epsilon: added to the variance, > 0.
        center, scale: learn ``beta`` / ``gamma``; when False the parameter is None.
        beta_initializer, gamma_initializer, moving_mean_initializer,
            moving_variance_initializer: a name (``"zeros"``, ``"ones"``),
            a number, or a callable ``shape -> tensor``.
        beta_regularizer, gamma_regularizer: callables ``param -> scalar``
            summed by :func:`regularization_loss`.
        beta_constraint, gamma_constraint: callables ``param -> projected param``
            applied by :func:`apply_constraints`.
        debias: at inference, correct the moving averages for their initial
            value (``(m_t - momentum**t * m_0) / (1 - momentum**t)``).
        unbiased_moving_variance: feed the Bessel-corrected batch variance into
            ``moving_variance`` (PyTorch and the original paper) instead of the
            biased one (TensorFlow and Keras). Normalization always uses the biased one.
        synchronized: in training, take the statistics of the global batch across the
            processes of ``process_group`` (``torch.distributed``, any backend), with
            exact gradients; see :mod:`batchnorm.distributed`. Inference, ghost
            batches (formed and normalized within each process) and an uninitialized
            ``torch.distributed`` (warned once) use local statistics.
        process_group: the group to synchronize over; None is the default group. Not
            part of :meth:`get_config` (a group cannot be serialized).
        trainable: False freezes the layer (see above).

    Example:
        >>> import torch, batchnorm as bn
        >>> layer = bn.BatchNorm(1, axis=-1)
        >>> x = torch.tensor([[-10.0], [0.0], [10.0]])
        >>> layer(x, training=False).flatten()   # before training: not normalized
        tensor([-9.9950,  0.0000,  9.9950], grad_fn=<ViewBackward0>)
        >>> layer(x, training=True).flatten()
        tensor([-1.2247,  0.0000,  1.2247], grad_fn=<ViewBackward0>)
        >>> layer.moving_mean, layer.moving_variance
        (tensor([0.]), tensor([1.6567]))
    """

    gamma: nn.Parameter | None
    beta: nn.Parameter | None
    moving_mean: Tensor
    moving_variance: Tensor
    num_updates: Tensor

    def __init__(
        self,
        num_features: int | Sequence[int] | None = None,
        *,
        axis: int | Sequence[int] = 1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Initializer = "zeros",
        gamma_initializer: Initializer = "ones",
        moving_mean_initializer: Initializer = "zeros",
        moving_variance_initializer: Initializer = "ones",
        beta_regularizer: Regularizer | None = None,
        gamma_regularizer: Regularizer | None = None,
        beta_constraint: Constraint | None = None,
        gamma_constraint: Constraint | None = None,
        debias: bool = False,
        unbiased_moving_variance: bool = False,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        virtual_batch_size: int | None = None,
        ghost_layout: str = "strided",
        adjustment: Adjustment | None = None,
        fused: bool | None = None,
        synchronized: bool = False,
        process_group: Any = None,
        trainable: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.axis = _normalize_axis(axis)
        for name, flag in (("center", center), ("scale", scale), ("debias", debias),
                           ("unbiased_moving_variance", unbiased_moving_variance),
                           ("renorm", renorm), ("trainable", trainable)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        F.check_options(momentum=momentum, epsilon=epsilon, renorm=renorm,
                        renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
                        virtual_batch_size=virtual_batch_size, ghost_layout=ghost_layout,
                        adjustment=adjustment, fused=fused, axis=self.axis,
                        synchronized=synchronized)
        for name, init in (("beta_initializer", beta_initializer),
                           ("gamma_initializer", gamma_initializer),
                           ("moving_mean_initializer", moving_mean_initializer),
                           ("moving_variance_initializer", moving_variance_initializer)):
            initializers.check(init, name)
        for name, fn in (("beta_regularizer", beta_regularizer),
                         ("gamma_regularizer", gamma_regularizer),
                         ("beta_constraint", beta_constraint),
                         ("gamma_constraint", gamma_constraint)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {fn!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")

        self.momentum = None if momentum is None else float(momentum)
        self.epsilon = float(epsilon)
        self.renorm = renorm
        self.renorm_clipping = dict(renorm_clipping) if renorm_clipping is not None else None
        self.renorm_momentum = float(renorm_momentum)
        self.virtual_batch_size = virtual_batch_size
        self.ghost_layout = ghost_layout
        self.adjustment = adjustment
        self.fused = fused
        self.synchronized = synchronized
        self.process_group = process_group
        self.center = center
        self.scale = scale
        self.debias = debias
        self.unbiased_moving_variance = unbiased_moving_variance
        self.beta_initializer = beta_initializer
        self.gamma_initializer = gamma_initializer
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer
        self.beta_regularizer = beta_regularizer
        self.gamma_regularizer = gamma_regularizer
        self.beta_constraint = beta_constraint
        self.gamma_constraint = gamma_constraint
        self._trainable = trainable

        feature_shape = _normalize_num_features(num_features, self.axis)
        param_kw = {"device": device, "dtype": dtype}
        stat_kw = {"device": device, "dtype": F.statistics_dtype(dtype or torch.float32)}
        lazy = feature_shape is None
        self._lazy = lazy

        def parameter(enabled: bool) -> nn.Parameter | None:
            if not enabled:
                return None
            if lazy:
                return UninitializedParameter(requires_grad=trainable, **param_kw)
            return nn.Parameter(torch.empty(feature_shape, **param_kw), requires_grad=trainable)

        def buffer() -> Tensor:
            # A lazy layer's buffers are empty placeholders until _build replaces them.
            return torch.empty(0 if lazy else feature_shape, **stat_kw)

        self.gamma = parameter(scale)
        self.beta = parameter(center)
        self.register_buffer("moving_mean", buffer())
        self.register_buffer("moving_variance", buffer())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64, device=device))
        if debias:
            # The values the averages started from, which the correction subtracts.
            self.register_buffer("initial_moving_mean", buffer())
            self.register_buffer("initial_moving_variance", buffer())
        if renorm:
            # tf_keras keeps the moving standard deviation (moving_variance is derived from
            # it) and separate renorm averages that move with renorm_momentum.
            self.register_buffer("moving_stddev", buffer())
            self.register_buffer("renorm_mean", buffer())
            self.register_buffer("renorm_stddev", buffer())
        if not lazy:
            self.reset_parameters()

    # ------------------------------------------------------------------ state

    @property
    def num_features(self) -> tuple[int, ...] | None:
        """Sizes of the feature axes, or None before a lazy layer's first call."""
        if self._lazy:
            return None
        return tuple(self.moving_mean.shape)

    def _initial_values(self, shape: tuple[int, ...]) -> dict[str, Tensor]:
        """Every parameter's and buffer's initial value for features of ``shape``, by name."""
        kw = {"dtype": self.moving_mean.dtype, "device": self.moving_mean.device}
        mean = initializers.initial_value(
            self.moving_mean_initializer, shape, name="moving_mean_initializer", **kw)
        variance = initializers.initial_value(
            self.moving_variance_initializer, shape, name="moving_variance_initializer", **kw)
        values = {"moving_mean": mean, "moving_variance": variance}
        if self.debias:
            values.update(initial_moving_mean=mean, initial_moving_variance=variance)
        if self.renorm:
            values.update(moving_stddev=variance.sqrt(), renorm_mean=mean,
                          renorm_stddev=variance.sqrt())
        for name, init in (("gamma", self.gamma_initializer), ("beta", self.beta_initializer)):
            param = getattr(self, name)
            if param is not None:
                values[name] = initializers.initial_value(
                    init, shape, dtype=param.dtype, device=param.device, name=f"{name}_initializer")
        return values

    def reset_moving_statistics(self) -> None:
        """Reset the moving averages to their initializers and the update count to 0."""
        values = self._initial_values(tuple(self.moving_mean.shape))
        with torch.no_grad():
            for name, value in values.items():
                if name not in ("gamma", "beta"):
                    getattr(self, name).copy_(value)
            self.num_updates.zero_()

    def reset_parameters(self) -> None:
        """Re-initialize ``gamma``, ``beta`` and the moving statistics from the initializers."""
        values = self._initial_values(tuple(self.moving_mean.shape))
        with torch.no_grad():
            for name, value in values.items():
                getattr(self, name).copy_(value)
            self.num_updates.zero_()

    def _build(self, feature_shape: tuple[int, ...]) -> None:
        """Materialize a lazy layer's parameters and buffers for ``feature_shape``.

        Every initial value is computed before anything changes, so a failing
        initializer leaves the layer lazy.
        """
        values = self._initial_values(feature_shape)
        with torch.no_grad():
            for name, value in values.items():
                tensor = getattr(self, name)
                if isinstance(tensor, UninitializedParameter):
                    tensor.materialize(feature_shape)
                    tensor.copy_(value)
                else:
                    setattr(self, name, value.clone())
        self._lazy = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.num_features is None and prefix + "moving_mean" in state_dict:
            self._build(tuple(state_dict[prefix + "moving_mean"].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def state(self) -> BatchNormState:
        """The layer's moving statistics as a :class:`~batchnorm.functional.BatchNormState`."""
        return BatchNormState(
            self.moving_mean, self.moving_variance, self.num_updates,
            self.initial_moving_mean if self.debias else None,
            self.initial_moving_variance if self.debias else None,
            self.moving_stddev if self.renorm else None,
            self.renorm_mean if self.renorm else None,
            self.renorm_stddev if self.renorm else None,
        )

    def _options(self) -> dict[str, Any]:
        """The keyword options the functional core takes, from this layer's configuration."""
        return {
            "axis": self.axis, "momentum": self.momentum, "epsilon": self.epsilon,
            "debias": self.debias, "renorm": self.renorm, "renorm_clipping": self.renorm_clipping,
            "virtual_batch_size": self.virtual_batch_size, "ghost_layout": self.ghost_layout,
            "adjustment": self.adjustment, "fused": self.fused,
            "synchronized": self.synchronized, "process_group": self.process_group,
        }

    # ------------------------------------------------------------------ trainable

    @property
    def trainable(self) -> bool:
        """False freezes the layer: inference mode always, no updates, no gamma/beta gradients."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"trainable must be a bool, got {value!r}")
        self._trainable = value
        for param in (self.gamma, self.beta):
            if param is not None:
                param.requires_grad_(value)

    # ------------------------------------------------------------------ forward

    def _resolve_training(self, training: bool | None) -> bool:
        if training is not None and not isinstance(training, bool):
            raise TypeError(f"training must be True, False or None, got {training!r}")
        if not self._trainable:
            return False
        return self.training if training is None else training

    def forward(
        self, x: Tensor, training: bool | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Normalize ``x``.

        ``training=None`` follows ``train()``/``eval()``; ``True``/``False``
        overrides it for this call. A frozen layer (``trainable=False``) always
        runs in inference mode. ``mask``, a boolean tensor broadcastable over
        the non-feature axes, selects the positions the batch statistics come
        from (in training); every position is normalized.
        """
        training = self._resolve_training(training)
        if self.num_features is None:
            group = F.synchronization_group(self.synchronized, training, self.process_group)
            axes = F.check_input(x, self.axis, None, training=training,
                                 virtual_batch_size=self.virtual_batch_size, mask=mask,
                                 synchronized=group is not None)
            self._build(tuple(x.shape[a] for a in axes))
        state = self.state()
        y, stats = F._forward(
            x, state, training=training, gamma=self.gamma, beta=self.beta,
            mask=mask, **self._options(),
        )
        if stats is not None:
            recorder = active_recorder()
            if recorder is None:
                self._apply_statistics(stats, state)
            else:
                recorder.record(self, stats)
        return y

    def _apply_statistics(self, stats: BatchStatistics,
                          state: BatchNormState | None = None) -> None:
        """Fold one batch's statistics into the moving averages, in place; warn if skipped.

        ``state``: this layer's :meth:`state`, when the caller has it at hand.
        """
        state = self.state() if state is None else state
        options = {"momentum": self.momentum, "epsilon": self.epsilon,
                   "unbiased_moving_variance": self.unbiased_moving_variance,
                   "renorm_momentum": self.renorm_momentum}
        if torch.compiler.is_compiling():
            # Traced: no read-back of finiteness; the functional update selects instead.
            with torch.no_grad():
                new = F.update_state(state, stats, **options)
                for name, value in new._asdict().items():
                    if value is not None and value is not getattr(state, name):
                        getattr(self, _BUFFER[name]).copy_(value)
        elif not F.update_state_(state, stats, **options):
            warnings.warn(
                f"{self._get_name()}: {self._skip_reason(stats)}; the moving averages were "
                "left unchanged for this batch", RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )

    def _skip_reason(self, stats: BatchStatistics) -> str:
        """Why a batch's statistics could not enter the moving averages."""
        if stats.mean.shape[0] == 0:
            return "the batch is empty (no ghost batch in this process)"
        if not isinstance(stats.count, int):
            count = stats.count.expand_as(stats.mean)
            if not bool((count > 0).any(0).all()):
                return "the mask selects no position for some feature"
            if self.unbiased_moving_variance and bool((count == 1).any()):
                return ("the mask selects a single value in some group, whose unbiased variance "
                        "is undefined")
        return "the batch statistics are not finite (NaN or Inf in the input)"

    # ------------------------------------------------------------------ config

    def extra_repr(self) -> str:
        shape = self.num_features
        parts = [
            "num_features=None" if shape is None else str(shape[0] if len(shape) == 1 else shape),
            f"axis={self.axis}",
            f"momentum={self.momentum}",
            f"epsilon={self.epsilon}",
        ]
        for name in ("center", "scale"):
            if not getattr(self, name):
                parts.append(f"{name}=False")
        for name in ("debias", "unbiased_moving_variance", "renorm"):
            if getattr(self, name):
                parts.append(f"{name}=True")
        if self.renorm_clipping is not None:
            parts.append(f"renorm_clipping={self.renorm_clipping}")
        if self.renorm and self.renorm_momentum != 0.99:
            parts.append(f"renorm_momentum={self.renorm_momentum}")
        if self.virtual_batch_size is not None:
            parts.append(f"virtual_batch_size={self.virtual_batch_size}")
            if self.ghost_layout != "strided":
                parts.append(f"ghost_layout={self.ghost_layout!r}")
        if self.adjustment is not None:
            parts.append(f"adjustment={getattr(self.adjustment, '__name__', self.adjustment)}")
        if self.fused is not None:
            parts.append(f"fused={self.fused}")
        if self.synchronized:
            parts.append("synchronized=True")
        if not self._trainable:
            parts.append("trainable=False")
        return ", ".join(parts)

    def get_config(self) -> dict[str, Any]:
        """The layer's configuration with Keras's key names (plus ours); see :meth:`from_config`.

        Names and numbers are serialized in Keras's ``{"class_name", "config"}``
        form; callables are kept as they are (such a config is not JSON).
        """
        axis = self.axis if isinstance(self.axis, int) else list(self.axis)
        num_features = self.num_features
        return {
            "trainable": self._trainable,
            "axis": axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer),
            "beta_regularizer": self.beta_regularizer,
            "gamma_regularizer": self.gamma_regularizer,
            "beta_constraint": self.beta_constraint,
            "gamma_constraint": self.gamma_constraint,
            "num_features": list(num_features) if num_features is not None else None,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
            "virtual_batch_size": self.virtual_batch_size,
            "adjustment": self.adjustment,
            "fused": self.fused,
            "synchronized": self.synchronized,
            "ghost_layout": self.ghost_layout,
            "debias": self.debias,
            "unbiased_moving_variance": self.unbiased_moving_variance,
        }

    # Keras layer bookkeeping that has no effect on the computation here.
    _KERAS_ONLY_KEYS = frozenset({"name", "dtype"})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BatchNorm:
        """Build a layer from :meth:`get_config`'s output or a Keras BatchNormalization config.

        >>> import batchnorm as bn
        >>> layer = bn.BatchNorm(4, momentum=0.9)
        >>> bn.BatchNorm.from_config(layer.get_config())
        BatchNorm(4, axis=1, momentum=0.9, epsilon=0.001)
        """
        kwargs = {k: v for k, v in config.items() if k not in cls._KERAS_ONLY_KEYS}
        num_features = kwargs.pop("num_features", None)
        if isinstance(num_features, list):
            num_features = tuple(num_features)
        if isinstance(kwargs.get("axis"), list):
            kwargs["axis"] = tuple(kwargs["axis"])
        if num_features is not None and isinstance(num_features, tuple) \
                and isinstance(kwargs.get("axis", 1), int) and len(num_features) == 1:
            num_features = num_features[0]
        try:
            return cls(num_features, **kwargs)
        except TypeError as error:
            raise ValueError(f"cannot build a BatchNorm from config {config!r}: {error}") from None


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside this package and torch: the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("batchnorm.") or name == "torch" or name.startswith("torch.")
                or name.startswith("contextlib")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _layers(module: nn.Module):
    return (m for m in module.modules() if isinstance(m, BatchNorm))


def regularization_loss(module: nn.Module) -> Tensor:
    """Sum of every BatchNorm's ``gamma_regularizer(gamma) + beta_regularizer(beta)`` in ``module``.

    Add it to the loss:

    >>> import torch, batchnorm as bn
    >>> l2 = lambda g: 0.01 * g.square().sum()
    >>> model = torch.nn.Sequential(bn.BatchNorm(3, gamma_regularizer=l2))
    >>> bn.regularization_loss(model)
    tensor(0.0300, grad_fn=<AddBackward0>)
    """
    total = torch.zeros(())
    for layer in _layers(module):
        for param, regularizer in ((layer.gamma, layer.gamma_regularizer),
                                   (layer.beta, layer.beta_regularizer)):
            if param is not None and regularizer is not None:
                total = total.to(param.device) + regularizer(param)
    return total


def apply_constraints(module: nn.Module) -> None:
    """Project every BatchNorm's ``gamma``/``beta`` through its constraint, in place.

    Run it after every optimizer step:

        optimizer.step(); bn.apply_constraints(model)
    """
    with torch.no_grad():
        for layer in _layers(module):
            for name, constraint in (("gamma", layer.gamma_constraint),
                                     ("beta", layer.beta_constraint)):
                param = getattr(layer, name)
                if param is None or constraint is None:
                    continue
                projected = torch.as_tensor(constraint(param))
                if projected.shape != param.shape:
                    raise ValueError(
                        f"{name}_constraint returned shape {tuple(projected.shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(projected)
