"""Initializers: a name, a number, or a callable, and their Keras serialization.

An initializer is one of
- a name: ``"zeros"`` or ``"ones"`` (Keras's class names ``"Zeros"``/``"Ones"`` too);
- a number: every element gets that value (Keras's ``Constant``);
- a callable ``f(shape) -> Tensor`` returning a tensor of exactly ``shape``;
- a Keras config dict, ``{"class_name": "Constant", "config": {"value": 0.5}}``.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, SupportsFloat

import torch
from torch import Tensor

Initializer = str | float | Callable[[tuple[int, ...]], Tensor] | dict[str, Any]

_NAMED = {"zeros": 0.0, "ones": 1.0}
_KERAS_CLASS = {"zeros": "Zeros", "ones": "Ones"}


def describe(value: Any) -> str:
    """``repr(value)``, but an int too long to show (Python refuses to print one of more
    than 4300 digits) by its magnitude."""
    if isinstance(value, numbers.Integral) and abs(int(value)).bit_length() > 256:
        digits = int(abs(int(value)).bit_length() * math.log10(2))
        return f"{'-' if value < 0 else ''}<an int of about 10**{digits}>"
    return repr(value)


def as_float(value: SupportsFloat, name: str) -> float:
    """``float(value)``; ``ValueError`` naming ``name`` for a number no float holds (an int
    such as ``10**400``, for which ``float()`` raises ``OverflowError``)."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"{name}={describe(value)} is too large for a float (at most "
            f"{sys.float_info.max:.4g}): expected a finite number") from None


def check(init: Any, name: str, *, nonnegative: bool = False) -> None:
    """Raise ``ValueError``/``TypeError`` now for an initializer that could never work
    (``nonnegative``: a variance's, for which a negative constant is invalid too)."""
    if isinstance(init, dict):
        _check_constant(_from_keras(init, name), name, nonnegative)
    elif isinstance(init, str):
        if init.lower() not in _NAMED:
            raise ValueError(
                f"{name}={init!r} is not a known initializer: expected one of "
                f"{sorted(_NAMED)}, a number, or a callable shape -> tensor"
            )
    elif isinstance(init, numbers.Real) and not isinstance(init, bool):
        _check_constant(init, name, nonnegative)
    elif not callable(init):
        raise TypeError(
            f"{name} must be a name, a number or a callable shape -> tensor, "
            f"got {type(init).__name__}"
        )


def _check_constant(value: float | numbers.Real, name: str, nonnegative: bool) -> None:
    if not math.isfinite(as_float(value, name)):
        raise ValueError(f"{name}={value!r}: a constant initializer must be finite")
    if nonnegative and value < 0:
        raise ValueError(f"{name}={value!r}: a variance cannot be negative; expected a "
                         "constant >= 0 (usually 1, \"ones\")")


def _from_keras(config: dict[str, Any], name: str) -> float:
    cls = config.get("class_name")
    inner = config.get("config") or {}
    if cls in ("Zeros", "zeros"):
        return 0.0
    if cls in ("Ones", "ones"):
        return 1.0
    value = inner.get("value") if isinstance(inner, dict) else None
    if cls == "Constant" and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return as_float(value, name)
    raise ValueError(
        f"{name}: the Keras initializer {config!r} is not supported; "
        "expected Zeros, Ones or Constant with a scalar value"
    )


def initial_value(
    init: Initializer,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device: torch.device | str | None,
    name: str,
    nonnegative: bool = False,
) -> Tensor:
    """Evaluate ``init`` for a tensor of ``shape``; ``ValueError`` for a callable's result of
    another shape, or with non-finite values (negative ones too with ``nonnegative``)."""
    if isinstance(init, dict):
        init = _from_keras(init, name)
    if isinstance(init, str):
        init = _NAMED[init.lower()]
    # float too, for the type checker (to it, a float is no numbers.Real): then what is left
    # is the callable.
    if isinstance(init, (float, numbers.Real)):
        number = as_float(init, name)
        largest = torch.finfo(dtype).max
        if abs(number) > largest:
            raise ValueError(
                f"{name}={describe(init)} does not fit the {str(dtype).removeprefix('torch.')} "
                f"{'statistics' if name.startswith('moving') else 'parameters'} (largest "
                f"{largest:.4g}): it would be inf; use a smaller constant or a wider dtype=")
        return torch.full(shape, number, dtype=dtype, device=device)
    result = init(shape)
    try:
        value = torch.as_tensor(result)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise TypeError(
            f"{name} returned {type(result).__name__}, which is not a tensor of numbers "
            f"({error}); expected a tensor of shape {tuple(shape)}") from None
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} returned a tensor of shape {tuple(value.shape)}, expected {tuple(shape)}"
        )
    value = value.to(dtype=dtype, device=device)
    _check_values(value, name, nonnegative=nonnegative)
    return value


def _check_values(value: Tensor, name: str, *, nonnegative: bool) -> None:
    """A callable initializer's values: finite (and >= 0 for a variance). Run once, when a
    layer is built or reset (it reads the values back); meta tensors have none to check."""
    if value.device.type == "meta" or not value.numel():
        return
    if not value.is_floating_point():
        return
    bad = ~torch.isfinite(value)
    if nonnegative:
        bad |= value < 0
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} returned {value[index].item()!r} at index {index} (dtype "
            f"{str(value.dtype).removeprefix('torch.')}): expected finite values"
            + (" >= 0 (a variance)" if nonnegative else "")
            + "; a value that does not fit the dtype becomes inf")


def serialize(init: Initializer) -> Any:
    """Keras's config form for names and numbers; callables are returned as they are."""
    if isinstance(init, str):
        return {"class_name": _KERAS_CLASS[init.lower()], "config": {}}
    if isinstance(init, numbers.Real):
        return {"class_name": "Constant", "config": {"value": float(init)}}
    return init
