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
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Initializer = str | float | Callable[[tuple[int, ...]], Tensor] | dict

_NAMED = {"zeros": 0.0, "ones": 1.0}
_KERAS_CLASS = {"zeros": "Zeros", "ones": "Ones"}


def check(init: Any, name: str) -> None:
    """Raise ``ValueError``/``TypeError`` now for an initializer that could never work."""
    if isinstance(init, dict):
        _from_keras(init, name)
    elif isinstance(init, str):
        if init.lower() not in _NAMED:
            raise ValueError(
                f"{name}={init!r} is not a known initializer: expected one of "
                f"{sorted(_NAMED)}, a number, or a callable shape -> tensor"
            )
    elif isinstance(init, numbers.Real) and not isinstance(init, bool):
        if not math.isfinite(init):
            raise ValueError(f"{name}={init!r}: a constant initializer must be finite")
    elif not callable(init):
        raise TypeError(
            f"{name} must be a name, a number or a callable shape -> tensor, "
            f"got {type(init).__name__}"
        )


def _from_keras(config: dict, name: str) -> float:
    cls = config.get("class_name")
    inner = config.get("config") or {}
    if cls in ("Zeros", "zeros"):
        return 0.0
    if cls in ("Ones", "ones"):
        return 1.0
    if cls == "Constant" and isinstance(inner.get("value"), numbers.Real):
        return float(inner["value"])
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
) -> Tensor:
    """Evaluate ``init`` for a tensor of ``shape``."""
    if isinstance(init, dict):
        init = _from_keras(init, name)
    if isinstance(init, str):
        init = _NAMED[init.lower()]
    if isinstance(init, numbers.Real):
        return torch.full(shape, float(init), dtype=dtype, device=device)
    value = torch.as_tensor(init(shape))
    if tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} returned a tensor of shape {tuple(value.shape)}, expected {tuple(shape)}"
        )
    return value.to(dtype=dtype, device=device)


def serialize(init: Initializer) -> Any:
    """Keras's config form for names and numbers; callables are returned as they are."""
    if isinstance(init, str):
        return {"class_name": _KERAS_CLASS[init.lower()], "config": {}}
    if isinstance(init, numbers.Real):
        return {"class_name": "Constant", "config": {"value": float(init)}}
    return init
