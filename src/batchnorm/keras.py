"""tf_keras's ``BatchNormalization`` for Keras 3 on the torch backend.

Keras 3 dropped parts of tf_keras's batch normalization (``virtual_batch_size``,
``adjustment``, ``fused``, and ``synchronized`` outside TensorFlow).
:class:`BatchNormalization` takes every argument of tf_keras's layer and computes through
:mod:`batchnorm.functional` (this library's kernels), with Keras variables in tf_keras's
order and shapes, so ``layer.set_weights(tf_keras_layer.get_weights())`` works::

    from batchnorm.keras import BatchNormalization   # sets KERAS_BACKEND=torch if unset
    import keras

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(16, 3),
                              BatchNormalization(virtual_batch_size=8), keras.layers.ReLU()])

Keras is an optional dependency (``pip install "batchnorm[keras]"``): importing
:mod:`batchnorm` never imports it, and this module raises ``ImportError`` without it.
Importing this module sets ``KERAS_BACKEND=torch`` where the variable is unset, before it
imports Keras (which reads it once); with another backend the layer raises at construction.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# The layer computes with PyTorch: Keras's torch backend, unless one was chosen (Keras reads
# the variable when it is first imported; another backend makes the layer raise).
os.environ.setdefault("KERAS_BACKEND", "torch")

try:
    import keras
except ImportError as error:
    if error.name != "keras":  # Keras is there, but not its backend's packages
        raise ImportError(
            f"batchnorm.keras: Keras failed to import with KERAS_BACKEND="
            f"{os.environ['KERAS_BACKEND']!r} ({error}); this layer needs "
            "KERAS_BACKEND=torch") from error
    raise ImportError(
        "batchnorm.keras needs Keras 3 (with the torch backend): install it with "
        "pip install 'batchnorm[keras]'") from error

import torch

from . import functional as F
from .config import Adjustment, BatchNormConfig
from .health import warn_skipped
from .shapes import resolve_axes
from .state import BatchNormState
from .statistics import traced

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover - keras 2 installed
    raise ImportError(f"batchnorm.keras needs Keras 3, but keras {keras.__version__} is "
                      "installed: pip install 'batchnorm[keras]'")

__all__ = ["BatchNormalization"]

# The non-trainable variables after gamma and beta, in tf_keras's order (then ours).
_RENORM_STATE = ("moving_stddev", "renorm_mean", "renorm_stddev")
_DEBIAS_STATE = ("initial_mean", "initial_variance")


@keras.saving.register_keras_serializable(package="batchnorm")
class BatchNormalization(keras.layers.Layer):
    r"""tf_keras's ``BatchNormalization`` as a Keras 3 layer (torch backend).

    .. math:: y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    **Training** (``training=True``: ``model.fit``, or ``layer(x, training=True)``):
    :math:`\mu, \sigma^2` are the batch's mean and biased variance over every axis but
    ``axis``, and the moving averages move toward them,
    ``moving = momentum * moving + (1 - momentum) * batch_statistic``.
    **Inference** (``training=False`` or None: ``model.predict``, ``model.evaluate``): the
    moving averages normalize. **Frozen** (``trainable=False``): inference mode always and
    no update, as in Keras (fine-tuning).

    Args:
        axis, momentum, epsilon, center, scale: as in tf_keras (``axis`` an int or a list
            of ints; default -1, channels-last).
        beta_initializer, gamma_initializer, moving_mean_initializer,
            moving_variance_initializer, beta_regularizer, gamma_regularizer,
            beta_constraint, gamma_constraint: Keras initializers, regularizers and
            constraints (names, objects or configs), handled by Keras as for its own layers.
        renorm, renorm_clipping, renorm_momentum: Batch Renormalization, as in tf_keras
            (``renorm_clipping`` a dict with optional ``"rmax"``, ``"rmin"``, ``"dmax"``).
        fused: as in tf_keras: None picks the fastest kernel (and, as tf_keras, feeds the
            Bessel-corrected batch variance to ``moving_variance`` where tf_keras would fuse),
            True demands a fused kernel (``ValueError`` where tf_keras has none), False the
            composite one with the biased variance.
        virtual_batch_size: ghost batches of this many samples, as in tf_keras.
        adjustment: in training, a callable ``input shape -> (scale, bias)`` applied to the
            normalized value, as in tf_keras (not serialized: ``get_config`` raises).
        synchronized: in training, the statistics of the global batch across the processes
            of ``torch.distributed`` (any backend: gloo, nccl).
        debias: (this library's) at inference, correct the moving averages for their
            initial value; adds the variables ``initial_mean`` and ``initial_variance``
            after tf_keras's.
        process_group: the ``torch.distributed`` group ``synchronized=True`` reduces over
            (None: the default group); not part of the config.
        **kwargs: Keras's layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Masks come through Keras's masking (``mask=`` of ``call``, or a ``Masking``/
    ``Embedding(mask_zero=True)`` before the layer): the training statistics are those
    of the unmasked positions; every position is normalized.

    Variables, in tf_keras's order and shapes: ``gamma``, ``beta`` (trainable, where
    ``scale``/``center``), ``moving_mean``, ``moving_variance`` (then renorm's
    ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``).

    Example:
        >>> import torch
        >>> from batchnorm.keras import BatchNormalization
        >>> layer = BatchNormalization(momentum=0.9)
        >>> x = torch.tensor([[-10.0], [0.0], [10.0]])
        >>> layer(x, training=True).flatten()
        tensor([-1.2247,  0.0000,  1.2247], grad_fn=<ViewBackward0>)
        >>> [w.tolist() for w in layer.get_weights()]
        [[1.0], [0.0], [0.0], [7.566667079925537]]
    """

    def __init__(
        self,
        axis: int | list[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        virtual_batch_size: int | None = None,
        adjustment: Adjustment | None = None,
        synchronized: bool = False,
        debias: bool = False,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        backend = keras.backend.backend()
        if backend != "torch":
            raise ValueError(
                f"batchnorm.keras.BatchNormalization computes with PyTorch and needs Keras's "
                f"torch backend, but Keras runs the {backend!r} backend: set "
                "KERAS_BACKEND=torch before keras is first imported, or use "
                "keras.layers.BatchNormalization on this backend")
        super().__init__(**kwargs)
        self.config = BatchNormConfig(
            axis=axis if isinstance(axis, int) else tuple(axis), momentum=momentum,
            epsilon=epsilon, center=center, scale=scale, debias=debias, renorm=renorm,
            renorm_clipping=renorm_clipping, renorm_momentum=renorm_momentum,
            virtual_batch_size=virtual_batch_size, adjustment=adjustment, fused=fused,
            synchronized=synchronized)
        self.axis = axis if isinstance(axis, int) else list(axis)
        self.renorm_clipping = dict(renorm_clipping) if renorm_clipping is not None else None
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.process_group = process_group
        self.supports_masking = True
        self.gamma = self.beta = None

    # ------------------------------------------------------------------ variables

    def build(self, input_shape: tuple) -> None:
        config = self.config
        rank = len(input_shape)
        axes = resolve_axes(config.axis, rank)
        if any(input_shape[a] is None for a in axes):
            raise ValueError(f"BatchNormalization needs the size of its feature axis "
                             f"(axis={self.axis!r}), but the input's shape is "
                             f"{tuple(input_shape)}: give that size in keras.Input")
        self._feature_shape = tuple(input_shape[a] for a in axes)
        # tf_keras's variable shapes: the feature size for one axis, else the input's rank
        # with 1 outside the feature axes, and a size-1 axis after the batch's for ghost
        # batches (its get_weights() load as they are).
        if len(axes) == 1 and config.virtual_batch_size is None:
            shape = self._feature_shape
        else:
            shape = tuple(input_shape[a] if a in axes else 1 for a in range(rank))
            if config.virtual_batch_size is not None:
                shape = (shape[0], 1, *shape[1:])

        def add(name: str, initializer: Any, trainable: bool, dtype: Any = None,
                **options: Any) -> keras.Variable:
            return self.add_weight(name=name, shape=shape, initializer=initializer,
                                   trainable=trainable, autocast=False, dtype=dtype, **options)

        if config.scale:
            self.gamma = add("gamma", self.gamma_initializer, True,
                             regularizer=self.gamma_regularizer, constraint=self.gamma_constraint)
        if config.center:
            self.beta = add("beta", self.beta_initializer, True,
                            regularizer=self.beta_regularizer, constraint=self.beta_constraint)
        self.moving_mean = add("moving_mean", self.moving_mean_initializer, False)
        self.moving_variance = add("moving_variance", self.moving_variance_initializer, False)
        def copy(variable: keras.Variable, fn: Any = None) -> Any:
            """An initializer giving a copy of the variable's value (Keras keeps the tensor
            an initializer returns: a view would share the variable's memory)."""
            return lambda shape, dtype: (fn or torch.clone)(variable.value.detach())

        if config.renorm:  # tf_keras's: stddev from the initial variance, renorm from the mean
            self.moving_stddev = add("moving_stddev", copy(self.moving_variance, torch.sqrt),
                                     False)
            self.renorm_mean = add("renorm_mean", copy(self.moving_mean), False)
            self.renorm_stddev = add("renorm_stddev", copy(self.moving_variance, torch.sqrt),
                                     False)
        if config.debias:  # the averages' initial values, and the update count
            self.initial_mean = add("initial_mean", copy(self.moving_mean), False)
            self.initial_variance = add("initial_variance", copy(self.moving_variance), False)
            self.num_updates = self.add_weight(name="num_updates", shape=(), dtype="int64",
                                               initializer="zeros", trainable=False)
        else:  # counted for momentum=None's cumulative average only: not a weight
            self.num_updates = None
            self._count = torch.zeros((), dtype=torch.int64,
                                      device=self.moving_mean.value.device)

    def _variables(self) -> dict[str, keras.Variable]:
        """The state's variables by :class:`BatchNormState` field (not num_updates)."""
        names = ("moving_mean", "moving_variance",
                 *(_DEBIAS_STATE if self.config.debias else ()),
                 *(_RENORM_STATE if self.config.renorm else ()))
        return {name: getattr(self, name) for name in names}

    def _state(self) -> BatchNormState:
        """The moving statistics as a feature-shaped :class:`BatchNormState` (views)."""
        count = self.num_updates.value if self.num_updates is not None else self._count
        return BatchNormState(num_updates=count, **{
            name: variable.value.view(self._feature_shape)
            for name, variable in self._variables().items()})

    # ------------------------------------------------------------------ call

    def call(self, inputs: torch.Tensor, training: bool | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        if training is not None and not isinstance(training, bool):
            raise TypeError(f"training must be True, False or None, got {training!r}")
        training = bool(training) and self.trainable
        config, state = self.config, self._state()
        if training:
            config = config.for_input(inputs.ndim, inputs.dtype)
        gamma, beta = (None if v is None else v.value.view(self._feature_shape)
                       for v in (self.gamma, self.beta))
        y, stats = F.forward(inputs, state, config, training=training, gamma=gamma, beta=beta,
                             mask=None if mask is None else mask.bool(),
                             process_group=self.process_group)
        if stats is not None:
            self._update(state, stats, config)
        return y

    def _update(self, state: BatchNormState, stats: Any, config: BatchNormConfig) -> None:
        """Fold the batch's statistics into the variables with Keras's ``assign`` (what a
        ``StatelessScope`` records too); a batch whose statistics are not finite leaves
        them unchanged (:func:`batchnorm.functional.update_state`), with a
        ``RuntimeWarning`` saying why where that is known without waiting for a device (CPU
        tensors, not traced)."""
        new = F.update_state(state, stats, momentum=config.momentum, epsilon=config.epsilon,
                             unbiased_moving_variance=bool(config.unbiased_moving_variance),
                             renorm_momentum=config.renorm_momentum)
        count = new.num_updates
        if (count.device.type == "cpu" and not traced(count)
                and bool((count == state.num_updates).numpy())):  # CPU memory: no device
            warn_skipped(f"BatchNormalization {self.name!r}", [stats],
                         unbiased=bool(config.unbiased_moving_variance),
                         dtype=state.moving_mean.dtype, stacklevel=4)
        for name, variable in self._variables().items():
            if name not in _DEBIAS_STATE:
                variable.assign(getattr(new, name).view(variable.shape))
        if self.num_updates is not None:
            self.num_updates.assign(new.num_updates)
        else:
            with torch.no_grad():
                self._count.copy_(new.num_updates)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    # ------------------------------------------------------------------ config

    def get_config(self) -> dict[str, Any]:
        if self.config.adjustment is not None:
            raise ValueError("BatchNormalization: a layer with adjustment= cannot be "
                             "serialized (a callable has no config); build it in code and "
                             "save its weights with model.save_weights instead")
        config = self.config
        return {
            **super().get_config(),
            "axis": self.axis, "momentum": config.momentum, "epsilon": config.epsilon,
            "center": config.center, "scale": config.scale,
            "beta_initializer": keras.initializers.serialize(self.beta_initializer),
            "gamma_initializer": keras.initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": keras.initializers.serialize(
                self.moving_mean_initializer),
            "moving_variance_initializer": keras.initializers.serialize(
                self.moving_variance_initializer),
            "beta_regularizer": keras.regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": keras.regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": keras.constraints.serialize(self.beta_constraint),
            "gamma_constraint": keras.constraints.serialize(self.gamma_constraint),
            "renorm": config.renorm, "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": config.renorm_momentum, "fused": config.fused,
            "virtual_batch_size": config.virtual_batch_size,
            "synchronized": config.synchronized, "debias": config.debias,
        }
