"""The BatchNorm layer's state dict: its layout version, the migration of older layouts, and
the checks that make loading all or nothing per layer.

The layout has a version (torch's mechanism: the layer's class attribute ``_version``, which
``state_dict()`` saves in ``state_dict._metadata[prefix]["version"]``): :data:`VERSION`. A
state dict of an older layout is upgraded by :func:`migrate` before it is checked; one saved
without a version (by a release before versions were recorded, or with its ``_metadata``
dropped) has version 1.

Versions:
    1. ``gamma``, ``beta`` (as present), ``moving_mean``, ``moving_variance``,
       ``num_updates``, with ``debias`` ``initial_moving_mean`` and
       ``initial_moving_variance``, with ``renorm`` ``moving_stddev``, ``renorm_mean`` and
       ``renorm_stddev``; an unbuilt lazy layer saves empty tensors.
    2. The same keys and values; the version is recorded.

This module imports only :mod:`batchnorm.torch_compat`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .torch_compat import rename_torch_state_keys

__all__ = ["MIGRATIONS", "VERSION", "CheckedStateDict", "check_load", "migrate", "save_unbuilt"]

VERSION = 2

# MIGRATIONS[v](state_dict, prefix) upgrades, in place, the keys and values under ``prefix``
# of layout v to layout v + 1. A version without an entry kept the keys and values.
MIGRATIONS: dict[int, Callable[[dict[str, Any], str], None]] = {}


def migrate(state_dict: dict[str, Any], prefix: str, version: int | None) -> str | None:
    """Upgrade a layer's entries in ``state_dict`` from layout ``version`` (None: saved
    without one, version 1) to :data:`VERSION`, in place; an error message for a version
    this release cannot read, else None."""
    version = 1 if version is None else version
    if not isinstance(version, int) or version > VERSION:
        return (f"{prefix or '(root)'}: the state dict has layout version {version!r}, saved "
                f"by a newer release of batchnorm (this one reads versions up to {VERSION}); "
                "upgrade batchnorm to load it")
    for step in range(version, VERSION):
        if step in MIGRATIONS:
            MIGRATIONS[step](state_dict, prefix)
    return None


def save_unbuilt(layer: nn.Module, destination: dict[str, Any], prefix: str,
                 keep_vars: bool) -> None:
    """Save an unbuilt lazy layer (as torch's Lazy* modules allow): its parameters have no
    value yet, and are saved as empty tensors, which :func:`check_load` recognizes."""
    for name, param in layer._parameters.items():
        if param is not None:
            destination[prefix + name] = torch.empty(0, dtype=param.dtype, device=param.device)
    for name, buffer in layer._buffers.items():
        if buffer is not None and name not in layer._non_persistent_buffers_set:
            destination[prefix + name] = buffer if keep_vars else buffer.detach()


def check_load(layer: nn.Module, state_dict: dict[str, Any], prefix: str,
               local_metadata: dict[str, Any], strict: bool, missing_keys: list[str],
               unexpected_keys: list[str], error_msgs: list[str]) -> tuple[int, ...] | None:
    """Prepare and check every key of ``layer`` in ``state_dict`` (torch's
    ``_load_from_state_dict`` arguments) before anything is copied; the feature shape to
    load, or None when nothing is to be loaded.

    A ``torch.nn`` batch norm's keys are renamed to ours and an older layout is migrated.
    Non-tensors, wrong shapes and non-floating values for floating tensors are reported
    through torch's lists, which ``load_state_dict`` raises from after visiting every
    module, and None is returned: nothing of the layer is changed (a lazy layer stays
    unbuilt). So are missing or unexpected keys where the layer itself is loaded with
    ``strict=True`` (``BatchNorm.load_state_dict`` sets ``_strict_load``). Elsewhere (a
    non-strict load; the layer inside a parent module, to which torch does not pass the
    user's flag) the keys present are loaded after the same checks, and torch reports the
    missing and unexpected ones, raising for them under ``strict=True``: the behaviour of
    torch's own layers.
    """
    renamed = rename_torch_state_keys(state_dict, prefix)  # a torch.nn checkpoint loads too
    # A torch.nn checkpoint's version is torch's: its keys, once renamed, are our version 1.
    problem = migrate(state_dict, prefix, 1 if renamed else local_metadata.get("version"))
    if problem is not None:
        error_msgs.append(problem)
        return None
    # torch passes strict=True to every module whatever the user asked, and applies the
    # user's flag only after visiting them all. Where the layer itself is loaded, its
    # load_state_dict knows the flag; inside a parent module missing and unexpected keys
    # are left to torch, which reports them (raising under strict=True) after loading the
    # keys present, as for its own layers.
    atomic = getattr(layer, "_strict_load", False)  # set by BatchNorm.load_state_dict
    key = prefix + "num_updates"
    if key not in state_dict and not atomic and layer.num_updates.is_meta:
        # As torch does for num_batches_tracked: a real counter, not a meta tensor (the key
        # is still reported missing).
        state_dict[key] = torch.zeros((), dtype=torch.int64)
        missing_keys.append(key)
    missing, unexpected, errors, shape = state_dict_problems(
        layer, state_dict, prefix, atomic, local_metadata.get("assign_to_params_buffers", False))
    if missing or unexpected or errors:
        missing_keys.extend(missing)
        unexpected_keys.extend(unexpected)
        error_msgs.extend(errors)
        if not errors:  # torch reports the keys; say that nothing was loaded
            error_msgs.append(f"{layer._get_name()} at {prefix[:-1] or '(root)'!r}: no "
                              "parameter or buffer was loaded (all or nothing)")
        return None
    if shape is None and not atomic:  # nothing is loaded, so torch reports nothing missing
        missing_keys.extend(prefix + name for name in layer.state_dict(keep_vars=True)
                            if prefix + name not in state_dict)
    return shape  # None: a state dict saved from an unbuilt lazy layer


def state_dict_problems(
    layer: nn.Module, state_dict: dict[str, Any], prefix: str, strict: bool, assign: bool
) -> tuple[list[str], list[str], list[str], tuple[int, ...] | None]:
    """``(missing, unexpected, errors, feature_shape)`` of ``layer``'s keys in
    ``state_dict``; ``feature_shape`` is None for a state dict of an unbuilt lazy layer.
    ``assign``: ``load_state_dict(assign=True)``, which may take meta tensors as they are.
    """
    own: dict[str, Tensor] = {name: t for name, t in layer._parameters.items() if t is not None}
    own.update({name: b for name, b in layer._buffers.items()
                if b is not None and name not in layer._non_persistent_buffers_set})
    missing: list[str] = []
    errors: list[str] = []
    shape: tuple[int, ...] | None
    if layer.num_features is None:
        reference = state_dict.get(prefix + "moving_mean")
        shape = tuple(reference.shape) if isinstance(reference, Tensor) else None
    else:
        shape = tuple(layer.get_buffer("moving_mean").shape)
    if shape is not None and 0 in shape:
        shape = None  # saved from an unbuilt lazy layer
    for name in own:
        key = prefix + name
        if key not in state_dict:
            if strict:
                missing.append(key)
            continue
        value = state_dict[key]
        if not isinstance(value, Tensor):
            errors.append(f"{key}: expected a tensor, got {type(value).__name__}")
            continue
        if value.layout != torch.strided:
            errors.append(f"{key}: expected a dense tensor, got a {value.layout} one; "
                          "convert it with .to_dense() before loading")
            continue
        if value.is_meta and not (assign or own[name].is_meta):
            errors.append(f"{key}: the value is a meta tensor (a shape without data), "
                          "which has nothing to copy; load a checkpoint with real values, "
                          "or pass assign=True to take the meta tensors as they are")
            continue
        if name == "num_updates":
            if value.shape != () or value.is_floating_point() or value.is_complex() \
                    or value.dtype == torch.bool:
                errors.append(f"{key}: expected an integer scalar (the update count), got "
                              f"a {value.dtype} tensor of shape {tuple(value.shape)}")
            continue
        if not value.is_floating_point():
            errors.append(f"{key}: expected a floating-point tensor, got {value.dtype}")
        expected = shape if shape is not None else (0,)
        if tuple(value.shape) != expected:
            if shape is not None and tuple(value.shape) == (0,):
                how = "the state dict was saved from a lazy layer that was never built"
            elif shape is not None:
                how = f"the feature shape is {shape}"
            elif prefix + "moving_mean" not in state_dict:
                how = "an unbuilt lazy layer takes its feature shape from moving_mean, " \
                      "which the state dict lacks"
            else:
                how = "the state dict's moving_mean is empty: it was saved from a lazy " \
                      "layer that was never built"
            errors.append(f"size mismatch for {key}: got shape {tuple(value.shape)}, "
                          f"expected {expected} ({how})")
    unexpected = []
    if strict:
        for key in state_dict:  # torch's rule for unexpected keys
            name = key[len(prefix):].split(".", 1)[0]
            if key.startswith(prefix) and name not in own and name not in layer._modules:
                unexpected.append(key)
    return missing, unexpected, errors, shape


class CheckedStateDict(nn.Module):
    """A module whose state dict is checked before anything is loaded, all or nothing
    (:func:`check_load`), migrated from older layouts, and saved while unbuilt
    (:func:`save_unbuilt`): :class:`batchnorm.BatchNorm`'s base. The subclass provides
    ``_lazy`` (whether it is unbuilt) and ``_build(feature_shape)``."""

    _lazy: bool
    _strict_load: bool

    def _build(self, feature_shape: tuple[int, ...]) -> None:
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        if self._lazy:
            save_unbuilt(self, destination, prefix, keep_vars)
        else:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``torch.nn.Module.load_state_dict``, all or nothing for this layer: with
        ``strict=True`` a missing or unexpected key loads nothing (inside a parent module
        torch does not pass its flag down: there the keys present are loaded and torch
        raises for the others, as for its own layers). Invalid values (shapes, dtypes,
        non-tensors) load nothing under either flag.

        >>> import batchnorm as bn
        >>> layer = bn.BatchNorm(2)
        >>> layer.load_state_dict(bn.BatchNorm(2).state_dict())
        <All keys matched successfully>
        """
        self._strict_load = bool(strict)  # read by checkpoint.check_load
        try:
            return super().load_state_dict(state_dict, strict, assign)
        finally:
            del self._strict_load

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """Check every key of this layer first, then copy all of them or none (the promise is
        per BatchNorm layer; see :func:`check_load`)."""
        shape = check_load(self, state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        if shape is None:  # a problem (reported), or an unbuilt lazy layer's: nothing to load
            return
        if self._lazy:
            self._build(shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
