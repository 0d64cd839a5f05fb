"""Keras's per-parameter regularizers and constraints of the BatchNorm layers in a model:
:func:`regularization_loss` sums the penalties, :func:`apply_constraints` projects
``gamma``/``beta``.

A layer is recognized by its :class:`~batchnorm.config.BatchNormConfig` (``layer.config``),
which holds the regularizers and constraints: this module imports only
:mod:`batchnorm.config`, and :mod:`batchnorm.layer` re-exports both functions.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .config import BatchNormConfig

__all__ = ["apply_constraints", "regularization_loss"]


def _layers(module: nn.Module) -> Iterator[tuple[nn.Module, BatchNormConfig]]:
    """``(layer, its config)`` for every BatchNorm in ``module``."""
    for m in module.modules():
        config = getattr(m, "config", None)
        if isinstance(config, BatchNormConfig):
            yield m, config


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
    for layer, config in _layers(module):
        for name, regularizer in (("gamma", config.gamma_regularizer),
                                  ("beta", config.beta_regularizer)):
            param: Tensor | None = getattr(layer, name)
            if param is not None and regularizer is not None:
                total = total.to(param.device) + regularizer(param)
    return total


def apply_constraints(module: nn.Module) -> None:
    """Project every BatchNorm's ``gamma``/``beta`` through its constraint, in place.

    Run it after every optimizer step:

        optimizer.step(); bn.apply_constraints(model)
    """
    with torch.no_grad():
        for layer, config in _layers(module):
            for name, constraint in (("gamma", config.gamma_constraint),
                                     ("beta", config.beta_constraint)):
                param: Tensor | None = getattr(layer, name)
                if param is None or constraint is None:
                    continue
                projected = torch.as_tensor(constraint(param))
                if projected.shape != param.shape:
                    raise ValueError(
                        f"{name}_constraint returned shape {tuple(projected.shape)}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(projected)
