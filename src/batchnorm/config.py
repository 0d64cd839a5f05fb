"""The options of a batch normalization layer, validated once, frozen.

:class:`BatchNormConfig` holds every option given to :class:`batchnorm.BatchNorm`
(and, for the ones that shape the computation, to
:func:`batchnorm.functional.batch_norm`): it checks them when it is built,
brings them into one canonical form (the feature axes are always a tuple), and
cannot be changed afterwards. A changed configuration is a new, validated
object: :meth:`BatchNormConfig.replace`.

This module imports only :mod:`batchnorm.activations`, :mod:`batchnorm.initializers` and
:mod:`batchnorm.shapes`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import Tensor

from . import activations, initializers
from .initializers import Initializer, as_float, describe
from .shapes import resolve_axes

__all__ = ["GHOST_LAYOUTS", "Adjustment", "BatchNormConfig", "Clipping", "Constraint", "Options",
           "Regularizer", "check_epsilon"]

GHOST_LAYOUTS = ("strided", "consecutive")
CLIPPING_KEYS = ("rmin", "rmax", "dmax")
Adjustment = Callable[[Any], tuple[Tensor, Tensor]]
Regularizer = Callable[[Tensor], Tensor]
Constraint = Callable[[Tensor], Tensor]
Clipping = Mapping[str, float] | Iterable[tuple[str, float]]
"""``renorm_clipping`` as given: a mapping, or ``(key, value)`` pairs."""
AxisT = TypeVar("AxisT")
ClippingT = TypeVar("ClippingT")
Given = TypeVar("Given")
Read = TypeVar("Read")

if TYPE_CHECKING:
    class Converted(Generic[Given, Read]):
        """The type of a field that is given as ``Given`` and read as ``Read`` (a data
        descriptor, to type checkers: the dataclass's ``__init__`` takes what ``__set__``
        takes; an instance gives what ``__get__`` gives)."""

        def __init__(self, default: Given) -> None: ...
        def __get__(self, instance: object, owner: type | None = None) -> Read: ...
        def __set__(self, instance: object, value: Given) -> None: ...
else:
    def Converted(default):  # at run time: the field's default itself, no descriptor
        return default


def _is_number(value: Any, *, integer: bool = False) -> bool:
    kind = numbers.Integral if integer else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool)


def check_epsilon(epsilon: float, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` for an ``epsilon`` too small to count in ``dtype``.

    ``variance + epsilon`` must stay positive when the variance is 0 (a constant feature):
    ``epsilon`` must be a normal number of ``dtype`` (at least ``finfo(dtype).tiny``;
    smaller ones are subnormal, which flush-to-zero hardware turns into 0), except in
    float16, whose normal range starts at 6.1e-5, where it must only not round to 0.
    """
    info = torch.finfo(dtype)
    # float16's smallest subnormal is tiny * eps; half of it rounds to 0.
    smallest = info.tiny if info.bits > 16 or dtype == torch.bfloat16 else info.tiny * info.eps / 2
    if epsilon < smallest:
        raise ValueError(
            f"epsilon={epsilon!r} is too small for {str(dtype).removeprefix('torch.')} "
            f"statistics: below {smallest:.3g} it is 0 (or flushed to 0) in that dtype, and a "
            "feature with zero variance would be divided by zero; use a larger epsilon "
            "(TensorFlow's default 1e-3, PyTorch's 1e-5)")


def _canonical_axis(axis: int | Sequence[int]) -> tuple[int, ...]:
    try:
        if isinstance(axis, bool):  # an int to Python, not an axis
            raise TypeError(axis)
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
    except TypeError:
        raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}") from None
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(f"axis must be an int or a non-empty sequence of ints, got {axis!r}")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {axis!r} names the same axis twice")
    # Negative and non-negative entries may be mixed, as in tf_keras: (1, -1) is resolved
    # against the input's rank at the first call (resolve_axes), where naming one axis twice
    # (rank 2: 1 and -1) is the error.
    return tuple(int(a) for a in axes)


@dataclasses.dataclass(frozen=True)
class Options(Generic[AxisT, ClippingT]):
    """Every option's name, type and default, declared once (the dataclass's fields).

    :class:`BatchNormConfig` holds them validated; :class:`batchnorm.BatchNorm` shows them as
    read-only properties (declared for type checkers by ``options.LayerProperties``, a
    subclass too). Both take ``axis`` and ``renorm_clipping`` as given (an int or ints; a
    mapping or ``(key, value)`` pairs) and give them back as ``AxisT`` and ``ClippingT``: the
    config as a tuple and sorted pairs, the layer as given and as a dict.
    """

    axis: Converted[int | Sequence[int], AxisT] = Converted((1,))
    momentum: float | None = 0.99
    epsilon: float = 1e-3
    center: bool = True
    scale: bool = True
    beta_initializer: Initializer = "zeros"
    gamma_initializer: Initializer = "ones"
    moving_mean_initializer: Initializer = "zeros"
    moving_variance_initializer: Initializer = "ones"
    beta_regularizer: Regularizer | None = None
    gamma_regularizer: Regularizer | None = None
    beta_constraint: Constraint | None = None
    gamma_constraint: Constraint | None = None
    debias: bool = False
    unbiased_moving_variance: bool | None = None
    renorm: bool = False
    renorm_clipping: Converted[Clipping | None, ClippingT] = Converted(None)
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None
    ghost_layout: str = "strided"
    adjustment: Adjustment | None = None
    fused: bool | None = None
    synchronized: bool = False
    activation: str | None = None

    def __post_init__(self) -> None:
        """Nothing: a subclass checks the options and brings them into its form."""


# Not a dataclass itself: it inherits Options' constructor, fields, equality and hash (to a
# type checker, a dataclass subclass would read the Converted fields as given), is frozen
# for every attribute (Options' guard covers its fields only) and validates in __post_init__.
class BatchNormConfig(Options[tuple[int, ...], tuple[tuple[str, float], ...] | None]):
    """Every option of a batch normalization layer, validated and frozen.

    The fields are :class:`batchnorm.BatchNorm`'s keyword arguments (see its
    docstring for what each does), less the ones that are not configuration
    (``num_features``, ``process_group``, ``trainable``, ``device``, ``dtype``).
    Building one raises ``TypeError``/``ValueError`` for an invalid option or
    options that are meaningless together; a built one is always consistent.
    ``axis`` is stored as a tuple and ``renorm_clipping`` as sorted ``(key,
    value)`` pairs (:attr:`clipping` gives the bounds with their defaults). The fields are
    declared by :class:`Options`.

    >>> config = BatchNormConfig(axis=-1, momentum=0.9)
    >>> config.axis, config.momentum, config.plain
    ((-1,), 0.9, True)
    >>> config.replace(renorm=True).plain
    False
    >>> BatchNormConfig(momentum=1.5)
    Traceback (most recent call last):
    ...
    ValueError: momentum=1.5 is invalid: expected a number in [0, 1), the decay of the moving \
averages (TensorFlow's default 0.99; PyTorch's momentum=0.1 is 0.9), or None for the cumulative \
average
    """

    # Feature axes resolved per input rank (resolve_axes: ndim -> tuple[int, ...]) and the
    # configurations per variance rule (for_input, with_variance: a tuple -> BatchNormConfig);
    # not part of the configuration (not a field).
    _resolved: dict[Any, Any]

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_resolved", {})
        object.__setattr__(self, "axis", _canonical_axis(self.axis))
        for name in ("center", "scale", "debias", "unbiased_moving_variance", "renorm"):
            value = getattr(self, name)
            if not (isinstance(value, bool)
                    or (value is None and name == "unbiased_moving_variance")):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        self._check_numbers()
        object.__setattr__(self, "renorm_clipping", self._check_clipping())
        self._check_ghost_batches()
        if self.adjustment is not None and not callable(self.adjustment):
            raise TypeError(
                f"adjustment must be a callable shape -> (scale, bias), got {self.adjustment!r}")
        if self.fused is not None and not isinstance(self.fused, bool):
            raise TypeError(f"fused must be None, True or False, got {self.fused!r} "
                            f"({type(self.fused).__name__})")
        if not isinstance(self.synchronized, bool):
            raise TypeError(f"synchronized must be a bool, got {self.synchronized!r}")
        activations.check(self.activation)
        if self.fused:
            reason = self.unfused_reason()
            if reason is not None:
                raise ValueError(f"fused=True, but there is no fused kernel {reason}; "
                                 "use fused=None to pick the fastest available path")
        for name in ("beta_initializer", "gamma_initializer", "moving_mean_initializer",
                     "moving_variance_initializer"):
            initializers.check(getattr(self, name), name,
                               nonnegative=name == "moving_variance_initializer")
        for name in ("beta_regularizer", "gamma_regularizer", "beta_constraint",
                     "gamma_constraint"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {fn!r}")
        momentum = None if self.momentum is None else float(self.momentum)
        object.__setattr__(self, "momentum", momentum)
        object.__setattr__(self, "epsilon", float(self.epsilon))
        object.__setattr__(self, "renorm_momentum", float(self.renorm_momentum))

    def _check_numbers(self) -> None:
        for name in ("momentum", "renorm_momentum"):
            value = getattr(self, name)
            if name == "momentum" and value is None:
                continue  # the cumulative average
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"{name}={describe(value)} is invalid: expected a number in [0, 1), the "
                    "decay of the moving averages (TensorFlow's default 0.99; PyTorch's "
                    "momentum=0.1 is 0.9)" + (", or None for the cumulative average"
                                 if name == "momentum" else "")
                )
        epsilon = self.epsilon
        if not _is_number(epsilon) or not (epsilon > 0
                                           and math.isfinite(as_float(epsilon, "epsilon"))):
            raise ValueError(
                f"epsilon={describe(epsilon)} is invalid: expected a finite number > 0")
        # Statistics are float32 or float64 (statistics_dtype); the input's dtype is not known
        # yet, so float32's range decides here (check_epsilon checks the actual dtype per call).
        check_epsilon(epsilon, torch.float32)

    def _check_clipping(self) -> tuple[tuple[str, float], ...] | None:
        clipping: Any = self.renorm_clipping  # as given: anything, until checked here
        if clipping is None:
            return None
        if not isinstance(clipping, Mapping):
            try:
                clipping = dict(clipping)
            except (TypeError, ValueError):
                raise TypeError(
                    f"renorm_clipping must be a dict with keys among {CLIPPING_KEYS}, got "
                    f"{clipping!r}") from None
        if not self.renorm:
            raise ValueError("renorm_clipping is given but renorm=False: it would have no effect")
        unknown = set(clipping) - set(CLIPPING_KEYS)
        if unknown:
            raise ValueError(
                f"renorm_clipping has unknown key(s) {sorted(unknown, key=repr)}: expected "
                "'rmin', 'rmax', 'dmax'")
        for key, value in clipping.items():
            name = f"renorm_clipping[{key!r}]"
            if not _is_number(value) or math.isnan(as_float(value, name)) or value < 0:
                raise ValueError(f"{name}={describe(value)}: expected a number >= 0 "
                                 "(math.inf for no bound)")
        if clipping.get("rmin", 0.0) > clipping.get("rmax", math.inf):
            raise ValueError(f"renorm_clipping {dict(clipping)!r} has rmin > rmax")
        return tuple((key, float(clipping[key])) for key in CLIPPING_KEYS if key in clipping)

    def _check_ghost_batches(self) -> None:
        size = self.virtual_batch_size
        if size is not None:
            if not _is_number(size, integer=True) or size < 1:
                raise ValueError(
                    f"virtual_batch_size={size!r}: expected a positive int or None")
            if self.adjustment is not None:
                raise ValueError(
                    "adjustment cannot be combined with virtual_batch_size (as in TensorFlow): "
                    "the adjustment's shape refers to the whole batch, not to a ghost batch")
            if 0 in self.axis:
                axis = self.axis[0] if len(self.axis) == 1 else self.axis
                raise ValueError(
                    "virtual_batch_size splits axis 0, the batch axis, so axis 0 cannot be a "
                    f"feature axis (axis={axis!r})")
        if self.ghost_layout not in GHOST_LAYOUTS:
            raise ValueError(
                f"ghost_layout={self.ghost_layout!r}: expected one of {GHOST_LAYOUTS}")
        if self.ghost_layout != "strided" and size is None:
            raise ValueError(
                f"ghost_layout={self.ghost_layout!r} needs virtual_batch_size: without ghost "
                "batches there is no split")

    # ------------------------------------------------------------------ derived

    @property
    def plain(self) -> bool:
        """True for the plain mode (no renorm, ghost batches or adjustment; one feature axis),
        the one ATen's fused kernel computes."""
        return (not self.renorm and self.virtual_batch_size is None and self.adjustment is None
                and len(self.axis) == 1)

    @property
    def clipping(self) -> dict[str, float]:
        """Batch Renormalization's bounds with their defaults: ``rmin`` 0, ``rmax`` and ``dmax``
        infinite."""
        bounds = {"rmin": 0.0, "rmax": math.inf, "dmax": math.inf}
        bounds.update(self.renorm_clipping or ())
        return bounds

    def unfused_reason(self, *, masked: bool = False, synchronized: bool | None = None
                       ) -> str | None:
        """Why no fused kernel computes this configuration (``"for renorm"``, ...), or None.

        ``masked``: the call has a mask. ``synchronized``: whether statistics are synchronized
        in this call (default: the configuration's ``synchronized``).
        """
        if self.synchronized if synchronized is None else synchronized:
            return "for synchronized statistics (synchronized=True)"
        if self.renorm:
            return "for renorm"
        if self.virtual_batch_size is not None:
            return "for ghost batches (virtual_batch_size)"
        if self.adjustment is not None:
            return "for adjustment"
        if masked:
            return "for masked inputs"
        if len(self.axis) > 1:
            return "for several feature axes"
        return None

    def tf_keras_variance(self, ndim: int, dtype: torch.dtype) -> bool | None:
        """Whether tf_keras's ``BatchNormalization`` with these options feeds the
        Bessel-corrected batch variance of an input of rank ``ndim`` and ``dtype`` into
        ``moving_variance`` (None when ``axis`` does not fit that rank).

        With ``fused`` left to None (or True) tf_keras fuses, and its fused op feeds the
        unbiased variance, where it can: rank 4 with axis 1 or 3, rank 5 with axis 1 or 4,
        no renorm, ghost batches, adjustment or synchronized statistics, a float16,
        bfloat16 or float32 input (``BatchNormalizationBase.__init__``/``build``). Elsewhere,
        and with ``fused=False``, it feeds the biased one.

        >>> BatchNormConfig(axis=-1).tf_keras_variance(4, torch.float32)
        True
        >>> BatchNormConfig(axis=-1).tf_keras_variance(2, torch.float32)
        False
        """
        try:
            axes = resolve_axes(self.axis, ndim)  # not the memo: torch.compile would guard on it
        except ValueError:
            return None
        return (self.fused is not False and ndim in (4, 5) and axes in ((1,), (ndim - 1,))
                and self.unfused_reason() is None and dtype != torch.float64)

    def for_input(self, ndim: int, dtype: torch.dtype) -> BatchNormConfig:
        """This configuration with ``unbiased_moving_variance`` decided for a training input of
        rank ``ndim`` and ``dtype`` (:meth:`tf_keras_variance`): itself when it is given (or
        when ``axis`` does not fit that rank, which the call then refuses)."""
        if self.unbiased_moving_variance is not None:
            return self
        if torch.compiler.is_compiling():  # traced once; keeping it would make a new graph
            return self.with_variance(self.tf_keras_variance(ndim, dtype))
        key = ("input", ndim, dtype)
        decided = self._resolved.get(key)
        if decided is None:  # once per rank and dtype: a training call only looks it up
            decided = self._resolved.setdefault(
                key, self.with_variance(self.tf_keras_variance(ndim, dtype)))
        return decided

    def with_variance(self, unbiased: bool | None) -> BatchNormConfig:
        """This configuration with ``unbiased_moving_variance=unbiased`` (itself for None or
        its own value). Kept per value, except under torch.compile (traced once: keeping it
        would make a new graph)."""
        if unbiased is None or unbiased == self.unbiased_moving_variance:
            return self
        if torch.compiler.is_compiling():  # not validated again: dynamo traces no math.isfinite
            return self._with(unbiased_moving_variance=bool(unbiased))
        key = ("variance", unbiased)
        decided = self._resolved.get(key)
        if decided is None:
            decided = self._resolved.setdefault(key, self._with(unbiased_moving_variance=bool(
                unbiased)))
        return decided

    def _with(self, **changes: bool) -> BatchNormConfig:
        """A copy with boolean fields changed, without validating the rest again (it was)."""
        copy = object.__new__(BatchNormConfig)
        copy.__dict__.update(self.__dict__, **changes, _resolved={})
        return copy

    def resolve_axes(self, ndim: int) -> tuple[int, ...]:
        """The sorted non-negative feature axes for an input of rank ``ndim``; ``ValueError``
        for an axis out of range (or named twice at that rank)."""
        axes = self._resolved.get(ndim)
        if axes is None:
            axes = self._resolved.setdefault(ndim, resolve_axes(self.axis, ndim))
        return axes

    def replace(self, **changes: Any) -> BatchNormConfig:
        """A copy with ``changes`` applied, validated like a new configuration."""
        if "renorm_clipping" in changes and changes["renorm_clipping"] is not None:
            changes["renorm_clipping"] = dict(changes["renorm_clipping"])
        return dataclasses.replace(self, **changes)


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BatchNormConfig))
