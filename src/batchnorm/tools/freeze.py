"""Freeze batch normalization for fine-tuning: fixed statistics whatever the mode says.

A frozen :class:`~batchnorm.BatchNorm` (``trainable=False``, Keras semantics)
normalizes with its moving averages and never updates them, even after
``model.train()`` or with ``training=True``; that is torchvision's
``FrozenBatchNorm2d``, and what fine-tuning a pretrained model with small
batches wants. :func:`freeze` does it to every layer of a model,
:func:`unfreeze` undoes it.
"""

from __future__ import annotations

from torch import nn

from ._model import batch_norm_layers, is_frozen_batch_norm

__all__ = ["freeze", "unfreeze"]


def freeze(model: nn.Module, *, affine_trainable: bool = False) -> list[str]:
    """Freeze every :class:`~batchnorm.BatchNorm` in ``model``; return their qualified names.

    From now on each layer runs in inference mode with fixed statistics,
    whatever ``train()``/``eval()`` or ``training=`` say (it sets
    ``layer.trainable = False``): ``y = gamma * (x - moving_mean) /
    sqrt(moving_variance + epsilon) + beta``, with ``debias`` applied if the
    layer has it. ``gamma`` and ``beta`` stop requiring grad, unless
    ``affine_trainable=True``: then they keep learning while the statistics
    stay fixed. The name of ``model`` itself, if it is a layer, is ``""``.

    ``torch.nn`` batch normalization layers are not frozen: freezing them with
    ``eval()`` is undone by the next ``model.train()``, the very pitfall this
    avoids. If ``model`` has any, ``TypeError`` names them before anything
    changes; convert them first, ``bn.freeze(bn.convert(model))``, which keeps
    the numbers.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), bn.BatchNorm(8))
        >>> bn.freeze(model)
        ['1']
        >>> model.train()[1](torch.randn(2, 8, 4, 4)).shape  # moving averages, no update
        torch.Size([2, 8, 4, 4])
        >>> int(model[1].num_updates), model[1].gamma.requires_grad
        (0, False)
    """
    torch_layers = [name or "(the model)"  # the frozen ones of torchvision and timm stay so
                    for name, m in batch_norm_layers(model, ours=False, torch_nn=True).items()
                    if not is_frozen_batch_norm(m)]
    if torch_layers:
        raise TypeError(
            f"freeze works on bn.BatchNorm layers, and {torch_layers} are torch.nn batch "
            "normalization layers, which eval() freezes only until the next train(); convert "
            "them first: bn.freeze(bn.convert(model)) (the numbers do not change)")
    layers = batch_norm_layers(model)
    for layer in layers.values():
        layer.trainable = False
        if affine_trainable:
            for param in (layer.gamma, layer.beta):
                if param is not None:
                    param.requires_grad_(True)
    return list(layers)


def unfreeze(model: nn.Module) -> list[str]:
    """Make every frozen :class:`~batchnorm.BatchNorm` in ``model`` trainable again; return names.

    Undoes :func:`freeze` (and ``layer.trainable = False`` set by hand): the
    layers follow ``train()``/``eval()`` and ``training=`` again, and ``gamma``/
    ``beta`` require grad again.

    Examples:
        >>> import torch, batchnorm as bn
        >>> model = torch.nn.Sequential(bn.BatchNorm(8))
        >>> bn.freeze(model), bn.unfreeze(model), model[0].trainable
        (['0'], ['0'], True)
    """
    names = []
    for name, layer in batch_norm_layers(model).items():
        if not layer.trainable:
            layer.trainable = True
            names.append(name)
    return names
