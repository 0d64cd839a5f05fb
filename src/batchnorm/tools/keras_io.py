"""Read Keras BatchNormalization layers (config and weights) from saved models, without TensorFlow.

Two file formats, from Keras 3 or tf_keras (Keras 2):

- ``.keras``: a zip holding ``config.json`` (the model's architecture) and
  ``model.weights.h5``, where a layer's weights are ``layers/<key>/vars/0, 1, ...``
  with ``<key>`` the snake-cased class name numbered in model order
  (``batch_normalization``, ``batch_normalization_1``, ...), nested models
  under their own ``layers/<key>/layers/...``;
- legacy HDF5 ``.h5`` (``model.save("m.h5")``): ``model_config`` as a JSON
  attribute and ``model_weights/<layer>/`` groups whose ``weight_names``
  attribute names each dataset (``bn/gamma:0``, ``bn/moving_mean:0``, ...).

Both need ``h5py`` (``pip install h5py``, or ``batchnorm[tools]``).

Untrusted files: the loader reads nothing but the file it is given (no HDF5
external storage, external link or virtual dataset is followed), checks every
size before allocating (:data:`MAX_CONFIG_BYTES`, :data:`MAX_CONFIG_DEPTH`,
:data:`MAX_INFLATION`, :data:`MAX_WEIGHT_BYTES`), writes nothing and unpickles
nothing, and refuses a bad file with a ``ValueError`` naming it. What it cannot
guard against in-process is the HDF5 C library itself, which can loop forever or
crash on a damaged or crafted HDF5 structure: load files you do not trust with
``load_keras_batchnorms(path, isolated=True)``, which reads them in a separate
process with a time and memory limit.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import reprlib
import stat
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import callsite
from ..layer import BatchNorm
from ..shapes import resolve_axes

__all__ = ["batchnorm_from_keras", "load_keras_batchnorms", "read_keras_batchnorms"]

MAX_CONFIG_BYTES = 16 * 2**20
"""The largest model config read (``config.json``, or an ``.h5``'s ``model_config``):
a Keras config takes a few KiB per layer, and parsing JSON takes up to ~20x its size."""
MAX_CONFIG_DEPTH = 100
"""The deepest JSON nesting accepted in a config (Keras's own nest ~4 levels per model)."""
MAX_INFLATION = 100
"""A ``.keras`` member may inflate to at most this many times the zip file's size: Keras
stores its members uncompressed, a zip bomb inflates thousands of times."""
MAX_WEIGHT_BYTES = 256 * 2**20
"""The most BatchNormalization weights read from one file, all layers together (declared
sizes, checked before reading; a ResNet-50 has 0.4 MiB of them)."""

_BN_CLASSES = frozenset({"BatchNormalization", "BatchNormalizationV1", "BatchNormalizationV2"})
# Keras config keys that BatchNorm does not take and that do not change the computation
# of a loaded layer (handled here rather than in BatchNorm.from_config).
_DROPPED_KEYS = ("synchronized",)
# What tf_keras saves for the first layer of a model built with input_shape=...: the input's
# shape, which only tells the input's rank here.
_SHAPE_KEYS = ("batch_input_shape", "batch_shape")
_NON_CALLABLE = ("beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint")
_NON_NEGATIVE = ("moving_variance", "moving_stddev", "renorm_stddev")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_MAX_SOFT_LINKS = 16  # HDF5's own limit on soft links followed in one lookup
_HINT = "expected what Keras's model.save writes (is the file damaged or edited?)"
_ERRORS = ("raise", "warn")
# What reading a damaged zip or HDF5 file raises (h5py: OSError, KeyError, RuntimeError,
# TypeError for types NumPy lacks; zipfile: BadZipFile, EOFError, zlib.error,
# NotImplementedError for unknown compression, RuntimeError for encryption).
_READ_ERRORS = (OSError, KeyError, RuntimeError, TypeError, EOFError, NotImplementedError,
                zipfile.BadZipFile, zlib.error)
# A Keras config (or layer entry) as JSON gives it.
_Config = dict[str, Any]
# Every BatchNormalization read: name -> (layer entry, config, weights).
_Layers = dict[str, tuple[_Config, _Config, dict[str, np.ndarray]]]
# locate(layer entry, .keras group path, variable names) -> the layer's h5py datasets by name.
_Locate = Callable[[_Config, str, list[str]], dict[str, Any]]


def _h5py() -> Any:  # the h5py module (untyped)
    try:
        import h5py
    except ImportError as error:
        raise ImportError("reading Keras files needs h5py: pip install h5py "
                          "(or pip install 'batchnorm[tools]')") from error
    return h5py


@contextmanager
def _unreadable(where: str, expected: str) -> Iterator[None]:
    """Turn the errors of reading damaged data into a ValueError naming it."""
    try:
        yield
    except PermissionError:
        raise  # not a malformed file
    except _READ_ERRORS as error:
        raise ValueError(f"{where}: cannot read it ({type(error).__name__}: {error}); "
                         f"expected {expected}: {_HINT}") from error


def _snake_case(name: str) -> str:
    """Keras's ``naming.to_snake_case``, which names the groups of a ``.keras`` weights file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


# ------------------------------------------------------------------------------ config

def _nesting(value: Any) -> int:
    """How deeply JSON lists and objects nest in ``value`` (counted without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1)
                         for child in (value.values() if isinstance(value, dict) else value))
    return deepest


def _parse_config(raw: bytes | str, where: str) -> _Config:
    """A model config from JSON text, refused when too big, too deep or not an object."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{where}: {len(raw)} bytes of config, more than MAX_CONFIG_BYTES="
                         f"{MAX_CONFIG_BYTES}; expected a Keras model config")
    try:
        config = json.loads(raw)
        too_deep = _nesting(config) > MAX_CONFIG_DEPTH
    except RecursionError:  # deeper than the parser's recursion limit
        too_deep = True
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{where}: not valid JSON ({error}); expected the model config "
                         f"Keras writes: {_HINT}") from None
    if too_deep:
        raise ValueError(f"{where}: the config is nested deeper than MAX_CONFIG_DEPTH="
                         f"{MAX_CONFIG_DEPTH} levels; expected a Keras model config")
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the config is a JSON {type(config).__name__}, expected a "
                         "JSON object (a Keras model config)")
    return config


def _walk_layers(model_config: _Config, where: str,
                 prefix: str = "layers") -> Iterator[tuple[_Config, str]]:
    """``(layer config entry, its .keras weights path)`` for every layer, nested models included."""
    inner = model_config.get("config")
    layers = inner.get("layers", []) if isinstance(inner, dict) else []
    if not isinstance(layers, list):
        raise ValueError(f"{where}: 'layers' is {reprlib.repr(layers)}, expected a list of "
                         "layer configs")
    used: dict[str, int] = {}
    for entry in layers:
        if not (isinstance(entry, dict) and isinstance(entry.get("class_name"), str)):
            raise ValueError(f"{where}: layer entry {reprlib.repr(entry)} has no class_name; "
                             "expected {'class_name': ..., 'config': {...}}")
        key = _snake_case(entry["class_name"])
        used[key] = used.get(key, -1) + 1
        path = f"{prefix}/{key}" + (f"_{used[key]}" if used[key] else "")
        yield entry, path
        if isinstance(entry.get("config"), dict) and "layers" in entry["config"]:
            yield from _walk_layers(entry, where, f"{path}/layers")


def _bn_config(entry: _Config, where: str) -> _Config:
    config = entry.get("config")
    if not (isinstance(config, dict) and isinstance(config.get("name"), str)):
        raise ValueError(f"{where}: a BatchNormalization's config is {reprlib.repr(config)}; "
                         "expected a dict with a 'name' string")
    return config


def _axis(config: _Config, where: str) -> int | tuple[int, ...]:
    axis = config.get("axis", -1)  # Keras's default
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    if not axes or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(f"{where}: axis {reprlib.repr(axis)}, expected an int or a non-empty "
                         "list of ints")
    return axis if isinstance(axis, int) else tuple(axis)


def _ghost_shaped(config: _Config, shapes: Any) -> bool:
    """Whether these are a built tf_keras ghost-batch layer's variables: shaped like its input
    with a 1 inserted at index 1, its saved ``axis`` shifted by one to match."""
    return config.get("virtual_batch_size") is not None and any(len(s) > 1 for s in shapes)


def _input_axis(config: _Config, shapes: Any, where: str) -> int | tuple[int, ...]:
    """The layer's feature axes in its input (the saved ``axis``, shifted back for a built
    ghost-batch layer)."""
    axis = _axis(config, where)
    if not _ghost_shaped(config, shapes):
        return axis
    axes = (axis,) if isinstance(axis, int) else axis
    if not all(a >= 2 for a in axes):
        raise ValueError(f"{where}: axis {axis} with virtual_batch_size and variables of shape "
                         f"{next(tuple(s) for s in shapes if len(s) > 1)}: expected the axes "
                         "tf_keras saves for a built ghost-batch layer (shifted by one, >= 2); "
                         f"{_HINT}")
    return tuple(a - 1 for a in axes)


def _input_rank(config: _Config, entry: _Config, shapes: Any) -> int | None:
    """The rank of the layer's input, where the file tells it: the shape it was built for
    (``build_config``, or the ``input_shape`` of a model's first layer), or variables
    shaped like the input (several axes, ghost batches)."""
    build = entry.get("build_config")
    for shape in [build.get("input_shape") if isinstance(build, dict) else None,
                  *(config.get(key) for key in _SHAPE_KEYS)]:
        if isinstance(shape, list) and shape:
            return len(shape)
    ranks = {len(s) for s in shapes if len(s) > 1}
    if len(ranks) == 1:
        return ranks.pop() - _ghost_shaped(config, shapes)
    return None


def _portable_axis(axis: int | tuple[int, ...], rank: int | None) -> int | tuple[int, ...]:
    """``axis`` for the inputs a user passes: tf_keras saves a built layer's axes as
    non-negative indices of its input (``[3]`` after a ``Conv2D``); the last one becomes -1,
    which names the channels of a channels-last input of every rank (and the features of a
    ``(batch, features)`` one). When the file does not tell the rank, a lone axis past 1
    is taken as the last (Keras's channels-last layout); axis 1 stays 1 (channels-first)."""
    axes = (axis,) if isinstance(axis, int) else axis
    if rank is None:
        last = axes[0] if len(axes) == 1 and axes[0] >= 2 else None
    else:
        last = rank - 1
    portable = tuple(-1 if a == last else a for a in axes)
    return portable[0] if len(portable) == 1 else portable


def _weight_names(config: _Config, where: str) -> list[str]:
    """The order Keras saves a BatchNormalization's variables in (trainable first)."""
    flags = {key: config.get(key, default)
             for key, default in (("center", True), ("scale", True), ("renorm", False))}
    for key, flag in flags.items():
        if not isinstance(flag, bool):
            raise ValueError(f"{where}: {key}={reprlib.repr(flag)}, expected true or false")
    names = (["gamma"] if flags["scale"] else []) + (["beta"] if flags["center"] else []) \
        + ["moving_mean", "moving_variance"]
    if flags["renorm"]:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return names


def _input_features(entry: _Config, axis: int | tuple[int, ...], where: str
                    ) -> tuple[int, ...] | None:
    """The feature sizes of the input the layer was built for (``build_config``, or the
    ``input_shape`` a model's first layer was given), if known."""
    build = entry.get("build_config")
    shape = build.get("input_shape") if isinstance(build, dict) else None
    config = entry.get("config", {})
    for key in _SHAPE_KEYS:
        shape = config.get(key) if shape is None else shape
    if not (isinstance(shape, list) and all(
            s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in shape)):
        return None  # no build_config, or one of another form: the weights alone decide
    try:
        sizes = tuple(shape[a] for a in resolve_axes(axis, len(shape)))
    except ValueError as error:
        raise ValueError(f"{where}: axis {axis} does not fit the layer's input_shape {shape} "
                         f"({error}); {_HINT}") from None
    return None if None in sizes else sizes


# ----------------------------------------------------------------------------- weights

def _feature_shape(axis: int | tuple[int, ...], shape: tuple[int, ...], what: str
                   ) -> tuple[int, ...]:
    """The feature sizes of a variable stored in ``shape``: a 1-D variable of a one-axis layer
    is its own; tf_keras keeps multi-axis (and ghost-batch) ones in a shape that broadcasts
    against the input, with 1 on every other axis."""
    n_axes = 1 if isinstance(axis, int) else len(axis)
    try:
        axes = tuple(range(len(shape))) if len(shape) == 1 else resolve_axes(axis, len(shape))
    except ValueError:
        axes = ()
    features = tuple(shape[a] for a in axes)
    if len(features) != n_axes or 0 in features or any(
            size != 1 for d, size in enumerate(shape) if d not in axes):
        raise ValueError(f"{what} has shape {tuple(shape)}, which does not fit axis {axis}: "
                         "expected (features,), or with several axes a shape with 1 on every "
                         f"non-feature axis; {_HINT}")
    return features


def _check_variables(where: str, config: _Config,
                     declared: dict[str, tuple[tuple[int, ...], np.dtype]],
                     expected: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Check a layer's variables from their names, dtypes and shapes alone (before reading
    them) and return its feature shape: every name is one of the layer's variables, every
    dtype a real float, every shape holds the same features (``expected``'s when known)."""
    names = _weight_names(config, where)
    unknown = sorted(set(declared) - set(names))
    if unknown:
        raise ValueError(f"{where}: no variable {', '.join(unknown)} in this layer; its config "
                         f"gives {', '.join(names)}")
    axis, features = _axis(config, where), expected
    for name, (shape, dtype) in declared.items():
        if dtype.kind != "f" or dtype.itemsize > 8:
            raise ValueError(f"{where}: {name} has dtype {dtype}, expected float16, float32 or "
                             f"float64 (Keras saves floats); {_HINT}")
        found = _feature_shape(axis, shape, f"{where}: {name}")
        if features is not None and found != features:
            source = "the layer's input_shape" if expected else "its other variables"
            raise ValueError(f"{where}: {name} has shape {tuple(shape)}, i.e. features {found}, "
                             f"but {source} give features {features}; {_HINT}")
        features = found
    if features is None:  # no variable (every layer has its moving statistics)
        raise ValueError(f"{where}: no variables given; its config gives {', '.join(names)}")
    return features


def _check_numbers(config: Any, where: str, key: str = "") -> None:
    """Refuse a number in a layer's config outside float32's range (the layer computes in
    float32 at least): JSON's ``1e400`` parses as inf, ``NaN`` and ``Infinity`` are accepted
    by Python's parser, and ``1e300`` overflows float32."""
    items = config.items() if isinstance(config, dict) else \
        enumerate(config) if isinstance(config, list) else ()
    for name, value in items:
        path = f"{key}[{name!r}]" if key else str(name)
        if isinstance(value, float) and not abs(value) <= _FLOAT32_MAX:
            raise ValueError(f"{where}: {path}={value!r}, expected a finite number within "
                             f"float32's range (|x| <= {_FLOAT32_MAX:.4g}); {_HINT}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            raise ValueError(f"{where}: {path}={reprlib.repr(value)}, expected an integer of "
                             f"at most 2**53; {_HINT}")
        _check_numbers(value, where, path)


def _check_values(where: str, weights: dict[str, np.ndarray]) -> None:
    """Refuse values a layer cannot compute with: non-finite (in float32, the layer's
    precision), and negative variances or standard deviations."""
    for name, value in weights.items():
        finite = np.abs(value.astype(np.float64)) <= _FLOAT32_MAX  # False for NaN, inf
        if not finite.all():
            raise ValueError(f"{where}: {name} holds {value[~finite].flat[0]}, expected finite "
                             f"values within float32's range; {_HINT}")
        if name in _NON_NEGATIVE and (value < 0).any():
            raise ValueError(f"{where}: {name} holds {value.min()}, expected values >= 0 (a "
                             f"variance or standard deviation); {_HINT}")


# -------------------------------------------------------------------------------- files

def _node(start: Any, path: str, where: str) -> Any:
    """The HDF5 object at ``path`` from group ``start``, or None when there is none.

    Follows hard links, and soft links (resolved here, within the file); refuses every
    other link (external links to other files, user-defined ones), so that a lookup never
    leaves the file.
    """
    h5py = _h5py()
    node, parts, followed = start, path.split("/"), 0
    if path.startswith("/"):
        node = start.file
    while parts:
        name = parts.pop(0)
        if name in ("", "."):
            continue
        if not isinstance(node, h5py.Group):
            raise ValueError(f"{where}: {node.name} is not a group, so {path!r} cannot be in it")
        links, key = node.id.links, name.encode()
        if not links.exists(key):
            return None
        kind = links.get_info(key).type
        if kind == h5py.h5l.TYPE_SOFT:
            followed += 1
            if followed > _MAX_SOFT_LINKS:
                raise ValueError(f"{where}: {path!r} follows more than {_MAX_SOFT_LINKS} soft "
                                 "links (a loop?); expected a Keras weights file")
            target = links.get_val(key).decode(errors="replace")
            node = node.file if target.startswith("/") else node
            parts[:0] = target.split("/")
        elif kind == h5py.h5l.TYPE_HARD:
            node = node[name]
        else:
            target = b":".join(links.get_val(key)).decode(errors="replace") \
                if kind == h5py.h5l.TYPE_EXTERNAL else f"user-defined link type {kind}"
            raise ValueError(f"{where}: {node.name.rstrip('/')}/{name} is a link to {target}, "
                             "outside this file: refused; a Keras file keeps its weights "
                             f"inside itself: {_HINT}")
    return node


def _dataset(start: Any, path: str, where: str) -> Any:
    """The dataset at ``path`` (see :func:`_node`), refused unless its data is in this file."""
    h5py = _h5py()
    dataset = _node(start, path, where)
    full = f"{start.name.rstrip('/')}/{path}"
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"{where}: {'no' if dataset is None else 'a group, not a'} dataset "
                         f"at {full}; expected a Keras weights file: {_HINT}")
    if dataset.shape is None:
        raise ValueError(f"{where}: {full} is an empty HDF5 dataset, expected an array; {_HINT}")
    if dataset.external:
        raise ValueError(f"{where}: {full} is stored outside this file (HDF5 external "
                         f"storage in {', '.join(str(e[0]) for e in dataset.external)}): "
                         f"refused; {_HINT}")
    if dataset.is_virtual:
        raise ValueError(f"{where}: {full} is a virtual dataset, whose data lies outside this "
                         f"file: refused; {_HINT}")
    return dataset


def _attribute(obj: Any, name: str, where: str) -> Any:
    """An HDF5 attribute's value (None when absent), its declared size bounded first."""
    if name not in obj.attrs:
        return None
    declared = obj.attrs.get_id(name)
    if math.prod(declared.shape or ()) * declared.dtype.itemsize > MAX_CONFIG_BYTES:
        raise ValueError(f"{where}: attribute {name!r} of {obj.name} declares more than "
                         f"MAX_CONFIG_BYTES={MAX_CONFIG_BYTES} bytes; expected a Keras file")
    return obj.attrs[name]


def _check_errors(errors: str) -> None:
    if errors not in _ERRORS:
        raise ValueError(f"errors={errors!r}: expected 'raise' (refuse the file for one bad "
                         "layer) or 'warn' (leave bad layers out, with a warning naming each)")


@contextmanager
def _per_layer(errors: str, skipped: list[str]) -> Iterator[None]:
    """One layer's reading or building: with ``errors="warn"`` a ValueError leaves that
    layer out (``skipped`` gets the reason, warned about later); otherwise it says how to
    load the other layers."""
    try:
        yield
    except ValueError as error:
        if errors == "warn":
            skipped.append(f"{error}; this layer was left out")
        else:
            raise ValueError(f"{error} (errors='warn' loads the file's other layers without "
                             "this one)") from error


def _warn_skipped(skipped: list[str]) -> None:
    for reason in skipped:
        callsite.warn(reason, UserWarning, 3)  # the public reader's caller


def _read_layers(where: str, model_config: _Config, locate: _Locate, errors: str,
                 skipped: list[str]) -> _Layers:
    """Every BatchNormalization's layer entry, config and weights; ``locate(entry, .keras
    group path, variable names)`` gives its datasets. Shapes, dtypes and sizes are checked
    before any value is read, and the values before returning. A layer refused is left out
    with ``errors="warn"`` (its reason in ``skipped``)."""
    found: _Layers = {}
    budget = MAX_WEIGHT_BYTES
    for entry, group_path in _walk_layers(model_config, where):
        if entry["class_name"] not in _BN_CLASSES:
            continue
        config = _bn_config(entry, where)
        layer = f"{where}, layer {config['name']!r}"
        with _per_layer(errors, skipped):
            if config["name"] in found:
                raise ValueError(f"{layer}: two BatchNormalization layers have this name; "
                                 "expected unique names: rename one in Keras and re-save")
            _check_numbers(config, layer)
            datasets = locate(entry, group_path, _weight_names(config, layer))
            shapes = [d.shape for d in datasets.values()]
            expected = _input_features(entry, _input_axis(config, shapes, layer), layer)
            _check_variables(layer, config, {n: (d.shape, d.dtype) for n, d in datasets.items()},
                             expected)
            size = sum(d.size * d.dtype.itemsize for d in datasets.values())
            if budget - size < 0:
                raise ValueError(f"{layer}: the BatchNormalization weights declared so far take "
                                 f"more than MAX_WEIGHT_BYTES={MAX_WEIGHT_BYTES} bytes; not read")
            budget -= size
            weights = {name: np.asarray(dataset[()]) for name, dataset in datasets.items()}
            _check_values(layer, weights)
            found[config["name"]] = (entry, config, weights)
    return found


def _read_member(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """A zip member's bytes, refused when it declares or inflates to more than ``limit``."""
    where = f"{path} ({name})"
    too_big = (f"{where}: inflates to more than {limit} bytes (a zip bomb?): not read; "
               f"expected at most MAX_CONFIG_BYTES={MAX_CONFIG_BYTES} for config.json and "
               f"MAX_INFLATION={MAX_INFLATION} times the zip's size for any member")
    with _unreadable(where, "a .keras zip written by Keras"):
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise ValueError(f"{where}: no such member; expected a .keras zip holding "
                             f"config.json and model.weights.h5: {_HINT}") from None
        if info.file_size > limit:
            raise ValueError(too_big)
        with archive.open(info) as member:
            data = member.read(limit + 1)  # zipfile inflates in chunks; the header may lie
    if len(data) > limit:
        raise ValueError(too_big)
    return data


def _read_keras_zip(path: Path, size: int, errors: str, skipped: list[str]) -> _Layers:
    h5py = _h5py()
    with _unreadable(str(path), "a .keras zip written by Keras"), zipfile.ZipFile(path) as zf:
        raw_config = _read_member(zf, "config.json", min(MAX_CONFIG_BYTES, MAX_INFLATION * size),
                                  path)
        raw_weights = _read_member(zf, "model.weights.h5", MAX_INFLATION * size, path)
    model_config = _parse_config(raw_config, f"{path} (config.json)")
    where = f"{path} (model.weights.h5)"
    with _unreadable(where, "an HDF5 file"), h5py.File(io.BytesIO(raw_weights), "r") as file:

        def locate(entry: _Config, group_path: str, names: list[str]) -> dict[str, Any]:
            group = _node(file, f"{group_path}/vars", where)
            count = len(group) if isinstance(group, h5py.Group) else "none"
            if count != len(names):
                raise ValueError(
                    f"{where}: layer {entry['config']['name']!r} expects {len(names)} variables "
                    f"({', '.join(names)}) at {group_path}/vars, found {count}: {_HINT}")
            return {n: _dataset(group, str(i), where) for i, n in enumerate(names)}

        return _read_layers(where, model_config, locate, errors, skipped)


def _read_legacy_h5(path: Path, errors: str, skipped: list[str]) -> _Layers:
    h5py = _h5py()
    where = str(path)
    with _unreadable(where, "a Keras .h5 model file"), h5py.File(path, "r") as file:
        raw = _attribute(file, "model_config", where)
        if raw is None:
            raise ValueError(f"{path} holds no model_config: a weights-only file has no "
                             "layer configs; save the whole model (model.save)")
        if not isinstance(raw, (bytes, str)):
            raise ValueError(f"{where}: the model_config attribute is {reprlib.repr(raw)}, "
                             "expected a JSON string")
        model_config = _parse_config(raw, f"{path} (model_config attribute)")
        root = _node(file, "model_weights", where)
        # Where every weight is, by (layer name, variable name): nested models keep their
        # layers' weights in the submodel's group, named "<layer>/<variable>:0". Only the
        # BatchNormalization ones are read.
        index: dict[tuple[str, str], tuple[Any, str]] = {}

        def visit(_: str, obj: Any) -> None:  # visititems follows hard links only
            names = _attribute(obj, "weight_names", where) \
                if isinstance(obj, h5py.Group) else None
            if names is None:
                return
            if not (isinstance(names, np.ndarray) and names.ndim == 1):
                raise ValueError(f"{where}: weight_names of {obj.name} is "
                                 f"{reprlib.repr(names)}, expected a list of names")
            for wname in names:
                if not isinstance(wname, (bytes, str)):
                    raise ValueError(f"{where}: weight_names of {obj.name} holds "
                                     f"{reprlib.repr(wname)}, expected names")
                wname = wname.decode(errors="replace") if isinstance(wname, bytes) else wname
                parts = wname.split(":")[0].split("/")
                if len(parts) >= 2:
                    index[(parts[-2], parts[-1])] = (obj, wname)

        (file if root is None else root).visititems(visit)

        def locate(entry: _Config, _: str, names: list[str]) -> dict[str, Any]:
            layer = entry["config"]["name"]
            missing = [n for n in names if (layer, n) not in index]
            if missing:
                raise ValueError(f"{path}: no {', '.join(missing)} weights for layer "
                                 f"{layer!r}: {_HINT}")
            return {n: _dataset(*index[(layer, n)], where) for n in names}

        return _read_layers(where, model_config, locate, errors, skipped)


def _file_size(path: Path) -> int:
    """The size of the regular file at ``path``; FileNotFoundError, IsADirectoryError or
    ValueError (a pipe, a device...) otherwise, before anything opens it."""
    expected = "expected a saved Keras model file, .keras or .h5"
    try:
        mode = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no such file: {expected}", str(path)) from None
    if stat.S_ISDIR(mode.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"a directory: {expected} (a SavedModel "
                                "directory cannot be read)", str(path))
    if not stat.S_ISREG(mode.st_mode):
        raise ValueError(f"{path} is not a regular file; {expected}")
    return mode.st_size


# ------------------------------------------------------------------------------ public

def _read_file(path: Path, errors: str, skipped: list[str]) -> _Layers:
    """Every readable BatchNormalization: name -> (layer entry, config, weights)."""
    size = _file_size(path)
    if zipfile.is_zipfile(path):
        return _read_keras_zip(path, size, errors, skipped)
    h5py = _h5py()
    if h5py.is_hdf5(path):
        return _read_legacy_h5(path, errors, skipped)
    raise ValueError(f"{path} is neither a .keras zip file nor an HDF5 file; expected a model "
                     "saved by Keras (model.save)")


def read_keras_batchnorms(path: str | Path, *, errors: str = "raise"
                          ) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """Every Keras BatchNormalization layer in a saved model: name -> (Keras config, weights).

    ``path`` is a ``.keras`` zip or a legacy ``.h5`` file (told apart by content).
    The weights are NumPy arrays named ``gamma``, ``beta``, ``moving_mean``,
    ``moving_variance`` (and ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``
    with renorm), as stored (tf_keras keeps multi-axis ones in a broadcast shape).
    Layers come in model order.

    Only what the file holds is read, and only BatchNormalization weights: nothing
    is written, nothing unpickled, zip member names are never used as paths. Raises
    ``FileNotFoundError`` for a missing path, ``IsADirectoryError`` for a directory,
    and ``ValueError`` (naming the file, the member and what was expected) for
    anything else it refuses: a file neither zip nor HDF5, a damaged one, a zip
    member over :data:`MAX_CONFIG_BYTES` (``config.json``) or inflating more than
    :data:`MAX_INFLATION` times the zip's size, a config that is not JSON, nests
    deeper than :data:`MAX_CONFIG_DEPTH` or lacks what Keras writes, a weight stored
    or linked outside the file (HDF5 external storage, external links, virtual
    datasets), one that is not a real float, whose shape does not give the layer's
    features (all variables alike, and the ``build_config`` input's when there is one),
    BatchNormalization weights over :data:`MAX_WEIGHT_BYTES` in all (declared sizes,
    checked before reading), non-finite values, or a negative variance; a number in a
    layer's config outside float32's range. A refusal that concerns one layer names it:
    with ``errors="warn"`` that layer is left out, with a ``UserWarning`` saying why, and
    the others are read.

    >>> layers = read_keras_batchnorms("model.keras")     # doctest: +SKIP
    >>> config, weights = layers["batch_normalization"]  # doctest: +SKIP
    """
    _check_errors(errors)
    skipped: list[str] = []
    found = _read_file(Path(path), errors, skipped)
    _warn_skipped(skipped)
    return {name: (config, weights) for name, (_, config, weights) in found.items()}


def _build(config: dict[str, Any], weights: dict[str, np.ndarray] | None,
           where: str, entry: _Config | None = None) -> BatchNorm:
    """:func:`batchnorm_from_keras`, with ``where`` (the file, the layer) in its errors and
    the layer's ``entry`` in the model config (its ``build_config``) when read from a file.
    Everything is checked before the layer is built, and warnings come only on success."""
    config = dict(config)
    where = f"{where}, layer {config.get('name')!r}" if "name" in config else where
    _check_numbers(config, where)
    shape = None
    weights = {name: np.asarray(value) for name, value in (weights or {}).items()}
    shapes = [v.shape for v in weights.values()]
    if weights:
        shape = _check_variables(where, config, {n: (v.shape, v.dtype)
                                                 for n, v in weights.items()})
        _check_values(where, weights)
        config["num_features"] = list(shape)
    config["axis"] = _portable_axis(_input_axis(config, shapes, where),
                                    _input_rank(config, entry or {}, shapes))
    for key in _SHAPE_KEYS:
        config.pop(key, None)
    if isinstance(config.get("renorm_clipping"), dict):  # tf_keras: None is no bound
        config["renorm_clipping"] = {k: v for k, v in config["renorm_clipping"].items()
                                     if v is not None}
    if "synchronized" in config:  # Keras 3, which never fuses: the biased variance
        config.setdefault("unbiased_moving_variance", False)
    notes = []
    for key in _DROPPED_KEYS:
        if config.pop(key, False):
            notes.append(f"{where}: Keras {key}=True is not applied by batchnorm.BatchNorm; "
                         "the layer computes the statistics of its local batch")
    for key in _NON_CALLABLE:
        if isinstance(config.get(key), dict):
            notes.append(f"{where}: the Keras {key} {config[key]} is not carried over; pass a "
                         "callable instead")
            config[key] = None
    for key, value in config.items():  # what BatchNorm reads as dicts, it expects to be dicts
        inner = value.get("config") if key.endswith("_initializer") and isinstance(value, dict) \
            else None
        if (key == "renorm_clipping" and not isinstance(value, (dict, type(None)))) \
                or not isinstance(inner, (dict, type(None))):
            raise ValueError(f"{where}: {key}={reprlib.repr(value)}, expected a dict there as "
                             f"Keras saves it; {_HINT}")
    try:
        with warnings.catch_warnings():  # Keras's momentum is ours: no PyTorch habit here
            warnings.filterwarnings("ignore", message="momentum=", category=UserWarning)
            layer = BatchNorm.from_config(config)
    except (AttributeError, TypeError, ValueError, OverflowError, RuntimeError) as error:
        # Every refusal of a Keras config is a ValueError here, whatever BatchNorm raises.
        raise ValueError(f"{where}: cannot build a BatchNorm from this Keras config: {error}; "
                         "expected the config Keras saves for a BatchNormalization") from None
    if weights:
        with torch.no_grad():
            for name, value in weights.items():
                target = getattr(layer, name)
                target.copy_(torch.from_numpy(value.astype(np.float64).reshape(shape)))
    for note in notes:
        callsite.warn(note, UserWarning, 3)  # the public reader's caller
    return layer


def batchnorm_from_keras(
    config: dict[str, Any], weights: dict[str, np.ndarray] | None = None
) -> BatchNorm:
    """A :class:`~batchnorm.BatchNorm` from a Keras BatchNormalization config (and weights).

    The config goes through :meth:`BatchNorm.from_config` (Keras's keys: ``axis``,
    ``momentum``, ``epsilon``, ``center``, ``scale``, initializers, ``renorm``...;
    ``name`` and ``dtype`` are Keras bookkeeping), so ``get_config()`` gives
    Keras's keys back. Keras 3's ``synchronized`` is dropped (with a warning when
    True: cross-replica statistics are not applied), as are regularizers and
    constraints given as Keras config dicts (with a warning: they only matter
    for training, and are not callables here). ``weights`` (see
    :func:`read_keras_batchnorms`) are reshaped to the feature shape and copied
    in. Keras keeps no update count: ``num_updates`` stays 0.

    Raises ``ValueError`` (naming the layer and the variable) for a config
    BatchNorm cannot take, and, before building anything, for weights that are
    not the layer's variables, not real floats, not all of one feature shape
    (a ``(2, 2)`` array is not 4 features), not finite in float32, or a negative
    variance or standard deviation.

    >>> from batchnorm.tools.keras_io import batchnorm_from_keras
    >>> layer = batchnorm_from_keras({"axis": -1, "momentum": 0.9, "epsilon": 1e-3})
    >>> layer.momentum, layer.axis
    (0.9, -1)
    """
    return _build(config, weights, "batchnorm_from_keras")


def _read_isolated(path: Path, errors: str, skipped: list[str], timeout: float,
                   max_memory: int) -> _Layers:
    """:func:`_read_file` in a child process limited to ``timeout`` seconds and ``max_memory``
    bytes of address space: a hang or a crash of the HDF5 C library is a ValueError here.
    The child hands back JSON and a NumPy ``.npz`` (read without pickle)."""
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
            and 0 < timeout < math.inf):
        raise ValueError(f"timeout={timeout!r}: expected a positive number of seconds")
    if not (isinstance(max_memory, int) and not isinstance(max_memory, bool)
            and max_memory > 0):
        raise ValueError(f"max_memory={max_memory!r}: expected a positive number of bytes")
    _file_size(path)  # FileNotFoundError, IsADirectoryError... before starting anything

    def limit() -> None:  # in the child, before it runs Python
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", __name__, str(path.resolve()), errors, out]
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, preexec_fn=limit, env=env, check=False)
        except subprocess.TimeoutExpired:
            raise ValueError(f"{path}: reading it took more than timeout={timeout} seconds "
                             "(a damaged or crafted HDF5 structure can make the HDF5 library "
                             "loop forever): refused") from None
        result = Path(out)
        if done.returncode == _CHILD_REFUSED:
            raise ValueError((result / "error.txt").read_text(encoding="utf-8"))
        if done.returncode != 0:
            how = f"signal {-done.returncode}" if done.returncode < 0 \
                else f"exit status {done.returncode}"
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise ValueError(f"{path}: the process reading it ended with {how} "
                             f"({tail[0][:200]}; max_memory={max_memory} bytes): a crash of the "
                             "HDF5 library on a damaged file, or more memory needed; refused")
        layers = json.loads((result / "layers.json").read_text(encoding="utf-8"))
        with np.load(result / "weights.npz", allow_pickle=False) as arrays:
            found = {name: (entry, config, {v: arrays[f"{i}/{v}"] for v in variables})
                     for i, (name, entry, config, variables) in enumerate(layers["layers"])}
    skipped.extend(layers["skipped"])
    return found


_CHILD_REFUSED = 3  # the child's exit status for a file it refused (error.txt says why)


def _child(path: str, errors: str, out: str) -> int:
    """The child process of :func:`_read_isolated`: read ``path``, write what it found."""
    skipped: list[str] = []
    try:
        found = _read_file(Path(path), errors, skipped)
    except ValueError as error:
        Path(out, "error.txt").write_text(str(error), encoding="utf-8")
        return _CHILD_REFUSED
    layers = [(name, entry, config, list(weights))
              for name, (entry, config, weights) in found.items()]
    arrays = {f"{i}/{v}": value for i, (_, _, weights) in enumerate(found.values())
              for v, value in weights.items()}
    # The names are "<layer index>/<variable>", never savez's own keyword allow_pickle.
    np.savez(Path(out, "weights.npz"), **arrays)  # type: ignore[arg-type]
    Path(out, "layers.json").write_text(json.dumps({"layers": layers, "skipped": skipped}),
                                        encoding="utf-8")
    return 0


def load_keras_batchnorms(path: str | Path, *, errors: str = "raise", isolated: bool = False,
                          timeout: float = 120.0, max_memory: int = 4 * 2**30
                          ) -> dict[str, BatchNorm]:
    """Build a :class:`~batchnorm.BatchNorm` for every Keras BatchNormalization in a saved model.

    ``path``: a ``.keras`` file (Keras 3 or tf_keras) or a legacy ``.h5`` model
    file. Returns layer name -> layer, in model order, each configured as in
    Keras and holding its ``gamma``, ``beta`` and moving statistics (renorm state
    too). In inference mode each gives Keras's outputs.

    The public entry point of Keras import. Its two steps stay importable from
    :mod:`batchnorm.tools.keras_io` for other uses: :func:`read_keras_batchnorms` (a file
    to each layer's Keras config and NumPy weights, nothing built) and
    :func:`batchnorm_from_keras` (one layer from a Keras config dict, and weights by name,
    already in memory rather than in a file).

    ``axis``: tf_keras saves a built layer's axes as non-negative indices of its input
    (``[3]`` after a ``Conv2D``); the input's last axis comes back as -1, so that the
    layer takes a channels-last input of any rank, ``(batch, features)`` included. A
    ghost-batch layer (``virtual_batch_size``), which tf_keras saves with its axes
    shifted by one and variables of shape ``(1, 1, ..., C)``, comes back with the
    axes of its input and ``(C,)`` variables. The variance fed to ``moving_variance``
    in training follows the file: a tf_keras layer gets tf_keras's rule for its ``fused``
    (``unbiased_moving_variance=None``, see :class:`~batchnorm.BatchNorm`), a Keras 3
    layer the biased variance (Keras 3 never fuses).

    Refuses what :func:`read_keras_batchnorms` and :func:`batchnorm_from_keras`
    refuse, with the same errors; every layer's weights are checked before any
    layer is built. ``errors="warn"`` leaves a layer that cannot be read or built out
    (with a ``UserWarning`` naming it and saying why) and returns the others.

    ``isolated=True`` reads the file in a separate Python process limited to ``timeout``
    seconds and ``max_memory`` bytes of address space (POSIX): the HDF5 C library can
    loop forever or crash on a damaged or crafted file, which then is a ``ValueError``
    naming the file. Use it for files you do not trust (it costs the start of a
    process, a few seconds).

    Examples:
        >>> import batchnorm as bn
        >>> layers = bn.load_keras_batchnorms("model.keras")   # doctest: +SKIP
        >>> y = layers["batch_normalization"](x, training=False)  # doctest: +SKIP
        >>> layers = bn.load_keras_batchnorms("upload.h5", isolated=True,  # doctest: +SKIP
        ...                                   timeout=30, errors="warn")
    """
    _check_errors(errors)
    path = Path(path)
    skipped: list[str] = []
    found = _read_isolated(path, errors, skipped, timeout, max_memory) if isolated \
        else _read_file(path, errors, skipped)
    layers = {}
    for name, (entry, config, weights) in found.items():
        with _per_layer(errors, skipped):
            layers[name] = _build(config, weights, str(path), entry)
    _warn_skipped(skipped)
    return layers


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:]))
