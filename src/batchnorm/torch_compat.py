"""``torch.nn`` habits in the BatchNorm layer: torch's names read ours, torch's constructor
arguments raise a ``TypeError`` naming ours, and a ``torch.nn`` batch norm's state dict keys
map to ours.

This module imports only :mod:`batchnorm.callsite`.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, NoReturn

from . import callsite

__all__ = ["TORCH_STATE_KEYS", "TorchAlias", "refuse_scripting", "reject_positional_options",
           "reject_unknown_arguments", "rename_torch_state_keys", "warn_small_momentum"]

# torch.nn.BatchNorm*d's constructor arguments that are named otherwise here: what to pass.
_TORCH_ARGUMENTS = {
    "eps": "pass epsilon= (the same number; TensorFlow's default is 1e-3, torch's 1e-5)",
    "affine": "pass center= and scale= (affine=False is center=False, scale=False)",
    "bias": "pass center= (bias=False is center=False: no beta)",
    "track_running_stats": (
        "there is no such option: the layer always keeps moving averages, and "
        "track_running_stats=False (batch statistics in eval mode too) is a call with "
        "training=True"),
}

# torch.nn batch norm's state dict keys and ours.
TORCH_STATE_KEYS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
                    "running_var": "moving_variance", "num_batches_tracked": "num_updates"}
# torch.nn batch norm's attribute names and ours: its state dict keys, and eps.
_TORCH_ALIASES = {**TORCH_STATE_KEYS, "eps": "epsilon"}


def reject_positional_options(args: tuple) -> None:
    """A ``TypeError`` for options passed by position, as ``torch.nn.BatchNorm2d(64, 1e-5,
    0.1)`` does: only ``num_features`` is positional here."""
    if len(args) > 1:
        shown = ", ".join(map(repr, args))
        raise TypeError(
            f"BatchNorm({shown}): only num_features is positional; the options are "
            "keyword-only, with TensorFlow's names and meanings: "
            "torch.nn.BatchNorm2d(64, eps, m) is bn.BatchNorm(64, epsilon=eps, "
            "momentum=1 - m)")


def refuse_scripting() -> NoReturn:
    """The ``RuntimeError`` ``torch.jit.script`` meets (its ``__prepare_scriptable__``):
    what to deploy with instead."""
    raise RuntimeError(
        "bn.BatchNorm cannot be compiled by torch.jit.script (its Python forward picks a "
        "kernel per call). To deploy, export the model in inference mode with "
        "torch.export.export(model.eval(), (x,)) (or torch.onnx.export(..., dynamo=True)); "
        "torch.jit.trace(model.eval(), x) also works; or bn.to_torch(model) for torch.nn "
        "layers where they can represent the layer")


def reject_unknown_arguments(names: Sequence[str], known: Sequence[str]) -> None:
    """A ``TypeError`` for constructor keywords ``names`` that are not among ``known``,
    naming what to pass (ours for torch's, the closest known name otherwise)."""
    name = sorted(names)[0]
    if name in _TORCH_ARGUMENTS:
        raise TypeError(f"BatchNorm got torch.nn's argument {name}=: {_TORCH_ARGUMENTS[name]}")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]}=?" if close else f"; the arguments are {list(known)}"
    raise TypeError(f"BatchNorm got an unexpected keyword argument {name!r}{hint}")


def warn_small_momentum(momentum: float | None) -> None:
    """Warn for a ``momentum`` that reads as PyTorch's (below 0.5): here it is the decay."""
    if momentum is None or momentum >= 0.5:
        return
    callsite.warn(
        f"momentum={momentum} is TensorFlow's momentum here, the decay of the moving averages "
        f"(moving = {momentum} * moving + {1 - momentum:.4g} * batch): each batch replaces "
        f"{1 - momentum:.0%} of them. PyTorch's momentum={momentum} is "
        f"momentum={1 - momentum:.4g} here; if a decay of {momentum} is what you mean, "
        "silence this with warnings.filterwarnings('ignore', message='momentum=')",
        UserWarning, 3)  # __init__'s or reconfigure's caller


class TorchAlias:
    """``torch.nn``'s name for one of the layer's attributes (``weight`` for ``gamma``, ...):
    reads it, the object itself, so in-place initialization works; assigning raises."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        return getattr(layer, self.target)

    def __set__(self, layer: Any, value: Any) -> None:
        raise AttributeError(
            f"BatchNorm.{self.name} is a read-only alias of {self.target} (torch.nn's name, "
            f"for code written for torch.nn layers); assign or modify layer.{self.target}")

    @staticmethod
    def install(layer_class: type) -> None:
        """Give ``layer_class`` torch.nn's names of its attributes, as read-only aliases."""
        for name, target in _TORCH_ALIASES.items():
            alias = TorchAlias(target)
            alias.__set_name__(layer_class, name)
            setattr(layer_class, name, alias)

    @staticmethod
    def refuse(owner: type, name: str, value: Any) -> None:
        """Raise the alias's ``AttributeError`` where ``name`` is one of ``owner``'s aliases
        (``nn.Module.register_parameter`` would register a second parameter)."""
        alias = owner.__dict__.get(name) if name in TORCH_STATE_KEYS else None
        if isinstance(alias, TorchAlias):
            alias.__set__(None, value)


def rename_torch_state_keys(state_dict: dict[str, Any], prefix: str) -> bool:
    """Rename a ``torch.nn`` batch norm's state dict keys under ``prefix`` to ours, in place,
    where ours is absent (a checkpoint with both keeps the torch key, reported unexpected);
    whether any was renamed."""
    renamed = False
    for theirs, ours in TORCH_STATE_KEYS.items():
        if prefix + theirs in state_dict and prefix + ours not in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
            renamed = True
    return renamed
