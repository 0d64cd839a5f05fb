"""The BatchNorm layer's options, derived from :class:`~batchnorm.config.BatchNormConfig`'s
fields: each field is a read-only property of the layer (:class:`Option`), an entry of
``get_config()`` (:func:`to_config`) and, where it differs from its default, of ``repr()``
(:func:`describe`). A new option is a new field of :class:`~batchnorm.config.Options` (and
the code that uses it); the layer's ``__init__`` names it once more, as a keyword argument.

:class:`LayerProperties`, a base of the layer, declares those properties (as a subclass of
``Options``) and ``torch.nn``'s aliases of its attributes
(:class:`batchnorm.torch_compat.TorchAlias`) for type checkers, which do not see what is
installed at run time.

Also the checks of ``num_features`` (:func:`feature_shape`) and the reading of a Keras or
``get_config()`` dict (:func:`from_config_arguments`).

This module imports only :mod:`batchnorm.config` and :mod:`batchnorm.initializers`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import initializers
from .config import Options
from .initializers import describe as describe_number

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = ["OPTIONS", "STRUCTURAL", "LayerProperties", "Option", "check_changes", "describe",
           "feature_shape", "from_config_arguments", "install", "to_config"]

OPTIONS = dataclasses.fields(Options)
# Options that decide which parameters and buffers exist: a layer cannot change them.
STRUCTURAL = frozenset({"axis", "center", "scale", "debias", "renorm"})
# repr() always shows these; it shows no initializer, regularizer or constraint (by the type
# of the option), and an option listed in _SHOWN_WITH only when the option it names is set.
_ALWAYS_SHOWN = ("axis", "momentum", "epsilon")
_NOT_SHOWN = frozenset({"Initializer", "Regularizer | None", "Constraint | None"})
_SHOWN_WITH = {"renorm_momentum": "renorm", "ghost_layout": "virtual_batch_size"}
# Keras layer bookkeeping that has no effect on the computation here.
_KERAS_ONLY_KEYS = frozenset({"name", "dtype"})


class Option:
    """A configuration option of the layer: read from its frozen :class:`BatchNormConfig`;
    assigning it raises, pointing to ``BatchNorm.reconfigure``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        value = getattr(layer.config, self.name)
        if self.name == "axis":  # as given: an int, or a tuple
            return value[0] if layer._axis_is_int else value
        if self.name == "renorm_clipping":
            return None if value is None else dict(value)
        return value

    def __set__(self, layer: Any, value: Any) -> None:
        how = ("build a new layer: it decides which parameters and buffers exist"
               if self.name in STRUCTURAL else
               f"use layer.reconfigure({self.name}={value!r}), which validates it")
        raise AttributeError(
            f"BatchNorm.{self.name} cannot be assigned after construction (the options are "
            f"validated together once); {how}")


if TYPE_CHECKING:
    class LayerProperties(Options[int | tuple[int, ...], dict[str, float] | None]):
        """The layer's read-only properties that are installed at run time (:func:`install`,
        ``TorchAlias.install``), as type checkers should see them: each option as
        :class:`~batchnorm.config.Options` declares it (``axis`` as given, an int or a tuple;
        ``renorm_clipping`` as a dict), and torch.nn's aliases."""

        # torch.nn's names (batchnorm.torch_compat): gamma, beta, the moving statistics,
        # num_updates and epsilon.
        @property
        def weight(self) -> nn.Parameter | None: ...
        @property
        def bias(self) -> nn.Parameter | None: ...
        @property
        def running_mean(self) -> Tensor: ...
        @property
        def running_var(self) -> Tensor: ...
        @property
        def num_batches_tracked(self) -> Tensor: ...
        @property
        def eps(self) -> float: ...
else:
    class LayerProperties:
        """A base of the layer, empty at run time: for type checkers, its options' and torch.nn
        aliases' properties (tests/test_typing.py checks what mypy sees)."""


def install(layer_class: type) -> None:
    """Give ``layer_class`` a read-only property for each option."""
    for field in OPTIONS:
        option = Option()
        option.__set_name__(layer_class, field.name)
        setattr(layer_class, field.name, option)


def check_changes(changes: Mapping[str, Any]) -> None:
    """Raise for ``reconfigure``'s changes that are not options (``process_group`` is one
    here) or that decide the parameters and buffers."""
    structural = sorted(set(changes) & STRUCTURAL)
    if structural:
        raise ValueError(
            f"reconfigure cannot change {structural}: they decide which parameters and "
            "buffers the layer has; build a new layer, e.g. "
            "BatchNorm.from_config({**layer.get_config(), ...})")
    unknown = sorted(set(changes) - {field.name for field in OPTIONS} - {"process_group"})
    if unknown:
        raise TypeError(f"reconfigure got unknown option(s) {unknown}")


def describe(layer: Any) -> list[str]:
    """``name=value`` for the options ``repr(layer)`` shows: those always shown, then the
    ones that decide the parameters and buffers, then the others, where not the default."""
    parts = []
    for field in sorted(OPTIONS, key=lambda f: (f.name not in _ALWAYS_SHOWN,
                                                f.name not in STRUCTURAL)):
        value = getattr(layer, field.name)
        if field.name in _ALWAYS_SHOWN:
            parts.append(f"{field.name}={value}")
            continue
        if field.type in _NOT_SHOWN or value == field.default:
            continue
        if field.name in _SHOWN_WITH and getattr(layer, _SHOWN_WITH[field.name]) in (None,
                                                                                     False):
            continue
        shown = repr(value) if isinstance(value, str) else getattr(value, "__name__", value)
        parts.append(f"{field.name}={shown}")
    return parts


def to_config(layer: Any) -> dict[str, Any]:
    """Every option of ``layer`` as ``get_config()`` gives it: initializers in Keras's
    ``{"class_name", "config"}`` form, several axes as a list."""
    config = {}
    for field in OPTIONS:
        value = getattr(layer, field.name)
        if field.type == "Initializer":
            value = initializers.serialize(value)
        config[field.name] = list(value) if isinstance(value, tuple) else value
    return config


def from_config_arguments(config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(num_features, keyword arguments)`` of the layer described by ``config``
    (``get_config()``'s output, or a Keras layer's config: JSON's lists become tuples)."""
    if not isinstance(config, Mapping):
        raise TypeError(
            f"from_config expects a dict of options (BatchNorm.get_config()'s output or a "
            f"Keras layer's config), got {type(config).__name__}: {config!r:.200}")
    kwargs = {k: v for k, v in config.items() if k not in _KERAS_ONLY_KEYS}
    num_features = kwargs.pop("num_features", None)
    if isinstance(num_features, list):
        num_features = tuple(num_features)
    if isinstance(kwargs.get("axis"), list):
        kwargs["axis"] = tuple(kwargs["axis"])
    if num_features is not None and isinstance(num_features, tuple) \
            and isinstance(kwargs.get("axis", 1), int) and len(num_features) == 1:
        num_features = num_features[0]
    return num_features, kwargs


def feature_shape(
    num_features: int | Sequence[int] | None, axis: tuple[int, ...]
) -> tuple[int, ...] | None:
    """``num_features`` checked against the feature axes ``axis``, as a tuple (None: lazy)."""
    if num_features is None:
        return None
    # int too, for the type checker (to it, an int is no numbers.Integral).
    shape = (num_features,) if isinstance(num_features, (int, numbers.Integral)) else num_features
    try:
        shape = tuple(shape)
    except TypeError:
        raise TypeError(
            f"num_features must be an int, a tuple of ints or None, got {num_features!r}"
        ) from None
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
               for s in shape):
        raise ValueError(f"num_features must hold positive ints, got {num_features!r}")
    if math.prod(shape) * 8 >= 2**63:  # float64 statistics must be addressable
        raise ValueError(f"num_features={describe_number(num_features)} is too large: "
                         f"{describe_number(math.prod(shape))} features cannot be allocated")
    if len(shape) != len(axis):
        shown = axis[0] if len(axis) == 1 else axis
        raise ValueError(
            f"num_features {num_features!r} gives {len(shape)} size(s) but axis {shown!r} "
            f"names {len(axis)} feature axis/axes"
        )
    return tuple(int(s) for s in shape)
