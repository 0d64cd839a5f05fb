"""What the kernels' autograd Functions share: which gradients a backward computes, and the
double backward (``create_graph=True``) that differentiates their output written in torch
operations.

This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["double_backward", "gradient_bits"]


def gradient_bits(needs: Sequence[bool], gamma: Tensor | None, beta: Tensor | None) -> int:
    """The gradients a Function's backward on ``(x, gamma, beta, ...)`` computes, as the
    device loops' ``wanted`` bits: 0 dx, 1 dgamma, 2 dbeta (``needs``: its
    ``ctx.needs_input_grad``; an absent parameter gets none).

    >>> gradient_bits((True, True, False), torch.ones(2), None)
    3
    """
    return needs[0] | (gamma is not None and needs[1]) << 1 | (beta is not None and needs[2]) << 2


def double_backward(output: Callable[..., Tensor], inputs: Sequence[Tensor | None],
                    needs: Sequence[bool], dy: Tensor) -> tuple[Tensor | None, ...]:
    """A Function's backward under ``create_graph=True``: ``output(*inputs)`` (its output
    written in torch operations) differentiated by autograd for the ``inputs`` that
    ``needs`` asks for, the others (and None inputs, and inputs the output does not use)
    None, so that the result can be differentiated again."""
    wanted = [t for t, need in zip(inputs, needs, strict=True) if need and t is not None]
    with torch.enable_grad():
        y = output(*inputs)
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None
                 for t, need in zip(inputs, needs, strict=True))
