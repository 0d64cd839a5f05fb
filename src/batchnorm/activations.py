"""The activations a batch normalization can apply to its output (``activation=``).

``bn.BatchNorm(..., activation="relu")`` computes ``y = act(BN(x))`` in training
and inference (the statistics are those of ``x``, as without an activation). The
fast kernels apply the activation inside their output pass and recompute its
derivative from ``x`` in the backward passes, so normalization plus activation
costs the memory passes of the normalization alone; every other path (the
composite kernel, ATen's kernel, inference through ATen) applies it after the
normalization with :func:`apply`, which is the definition the fast kernels are
tested against.

======== ============================ ======================================
name     ``act(z)``                    ``act'(z)``
======== ============================ ======================================
``relu`` ``max(z, 0)`` (NaN stays NaN) ``1`` where ``z > 0``, else ``0``
``silu`` ``z * sigmoid(z)``            ``s (1 + z (1 - s))``, ``s = sigmoid(z)``
======== ============================ ======================================

The set is small on purpose: each activation is a specialization of every fused
pass (numba loops, Triton kernels). A new one is a name here, a case in
:func:`apply` and :func:`module`, and one in each pass (``cpu.loops.activate`` /
``activation_grad``, ``triton.passes._activate`` / ``_activation_grad``).

This module imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "apply", "check", "module"]

ACTIVATIONS: tuple[str, ...] = ("relu", "silu")
"""The activations ``activation=`` takes."""

_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}


def check(activation: Any) -> None:
    """Raise ``ValueError``/``TypeError`` for anything but None or a name in :data:`ACTIVATIONS`.

    >>> check("relu")
    >>> check("gelu")
    Traceback (most recent call last):
    ...
    ValueError: activation='gelu' is not fused here: expected None or one of ('relu', 'silu'); \
apply other activations as a module after the layer
    """
    if activation is None:
        return
    if not isinstance(activation, str):
        raise TypeError(f"activation must be None or a name among {ACTIVATIONS}, got "
                        f"{activation!r} ({type(activation).__name__}); pass the name, e.g. "
                        "activation='relu'")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not fused here: expected None or one of "
                         f"{ACTIVATIONS}; apply other activations as a module after the layer")


def apply(y: Tensor, activation: str | None, *, inplace: bool = False) -> Tensor:
    """``act(y)`` by torch's own operations (``y`` itself when ``activation`` is None).

    ``inplace=True`` overwrites ``y`` (only for a fresh tensor nothing else reads:
    autograd keeps what the backward needs either way).

    >>> apply(torch.tensor([-1.0, 2.0]), "relu")
    tensor([0., 2.])
    """
    if activation is None:
        return y
    if activation == "relu":
        return y.relu_() if inplace else torch.relu(y)
    if activation == "silu":
        return nn.functional.silu(y, inplace=inplace)
    check(activation)
    raise AssertionError(f"activation {activation!r} is checked but has no implementation")


def module(activation: str) -> nn.Module:
    """The ``torch.nn`` module computing ``activation`` (``nn.ReLU()``, ``nn.SiLU()``).

    >>> module("silu")
    SiLU()
    """
    check(activation)
    if activation is None:
        raise ValueError("activation=None has no module: nothing is applied")
    return _MODULES[activation]()
