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
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import functional as F
from ..layer import BatchNorm

__all__ = ["batchnorm_from_keras", "load_keras_batchnorms", "read_keras_batchnorms"]

_BN_CLASSES = frozenset({"BatchNormalization", "BatchNormalizationV1", "BatchNormalizationV2"})
# Keras config keys that BatchNorm does not take and that do not change the computation
# of a loaded layer (handled here rather than in BatchNorm.from_config).
_DROPPED_KEYS = ("synchronized",)
_NON_CALLABLE = ("beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint")


def _h5py():
    try:
        import h5py
    except ImportError as error:
        raise ImportError("reading Keras files needs h5py: pip install h5py "
                          "(or pip install 'batchnorm[tools]')") from error
    return h5py


def _snake_case(name: str) -> str:
    """Keras's ``naming.to_snake_case``, which names the groups of a ``.keras`` weights file."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _walk_layers(model_config: dict, prefix: str = "layers") -> Iterator[tuple[dict, str]]:
    """``(layer config entry, its .keras weights path)`` for every layer, nested models included."""
    used: dict[str, int] = {}
    for entry in (model_config.get("config") or {}).get("layers", []):
        key = _snake_case(entry["class_name"])
        used[key] = used.get(key, -1) + 1
        path = f"{prefix}/{key}" + (f"_{used[key]}" if used[key] else "")
        yield entry, path
        if isinstance(entry.get("config"), dict) and "layers" in entry["config"]:
            yield from _walk_layers(entry, f"{path}/layers")


def _weight_names(config: dict) -> list[str]:
    """The order Keras saves a BatchNormalization's variables in (trainable first)."""
    names = (["gamma"] if config.get("scale", True) else []) \
        + (["beta"] if config.get("center", True) else []) + ["moving_mean", "moving_variance"]
    if config.get("renorm", False):
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return names


def _read_keras_zip(path: Path) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    h5py = _h5py()
    with zipfile.ZipFile(path) as archive:
        model_config = json.loads(archive.read("config.json"))
        weights_file = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    found = {}
    with weights_file:
        for entry, group_path in _walk_layers(model_config):
            if entry["class_name"] not in _BN_CLASSES:
                continue
            config = entry["config"]
            names = _weight_names(config)
            group = weights_file.get(f"{group_path}/vars")
            if group is None or len(group) != len(names):
                raise ValueError(
                    f"{path}: layer {config.get('name')!r} expects {len(names)} variables "
                    f"({', '.join(names)}) at {group_path}/vars, found "
                    f"{'none' if group is None else len(group)}")
            found[config["name"]] = (config, {n: np.asarray(group[str(i)])
                                              for i, n in enumerate(names)})
    return found


def _read_legacy_h5(path: Path) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    h5py = _h5py()
    with h5py.File(path, "r") as file:
        raw = file.attrs.get("model_config")
        if raw is None:
            raise ValueError(f"{path} holds no model_config: a weights-only file has no "
                             "layer configs; save the whole model (model.save)")
        model_config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        root = file["model_weights"] if "model_weights" in file else file
        # Every weight in the file, by (layer name, variable name): nested models keep their
        # layers' weights in the submodel's group, named "<layer>/<variable>:0".
        weights: dict[tuple[str, str], np.ndarray] = {}

        def visit(_: str, obj: Any) -> None:
            if not isinstance(obj, h5py.Group) or "weight_names" not in obj.attrs:
                return
            for wname in obj.attrs["weight_names"]:
                wname = wname.decode() if isinstance(wname, bytes) else str(wname)
                parts = wname.split(":")[0].split("/")
                if len(parts) >= 2:
                    weights[(parts[-2], parts[-1])] = np.asarray(obj[wname])

        root.visititems(visit)
    found = {}
    for entry, _ in _walk_layers(model_config):
        if entry["class_name"] not in _BN_CLASSES:
            continue
        config = entry["config"]
        names = _weight_names(config)
        missing = [n for n in names if (config["name"], n) not in weights]
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)} weights for layer "
                             f"{config['name']!r}")
        found[config["name"]] = (config, {n: weights[(config["name"], n)] for n in names})
    return found


def read_keras_batchnorms(path: str | Path) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """Every Keras BatchNormalization layer in a saved model: name -> (Keras config, weights).

    ``path`` is a ``.keras`` zip or a legacy ``.h5`` file (told apart by content).
    The weights are NumPy arrays named ``gamma``, ``beta``, ``moving_mean``,
    ``moving_variance`` (and ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``
    with renorm), as stored (tf_keras keeps multi-axis ones in a broadcast shape).
    Layers come in model order.

    >>> layers = read_keras_batchnorms("model.keras")     # doctest: +SKIP
    >>> config, weights = layers["batch_normalization"]  # doctest: +SKIP
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _read_keras_zip(path)
    h5py = _h5py()
    if h5py.is_hdf5(path):
        return _read_legacy_h5(path)
    raise ValueError(f"{path} is neither a .keras zip file nor an HDF5 file")


def _feature_shape(config: dict, value: np.ndarray) -> tuple[int, ...]:
    if value.ndim <= 1:
        return tuple(value.shape)
    # tf_keras keeps the parameters of several feature axes (and of ghost batches) in a
    # shape that broadcasts against the input: keep the sizes along the feature axes.
    axis = config.get("axis", -1)
    try:
        axes = F.resolve_axes(axis if isinstance(axis, int) else tuple(axis), value.ndim)
    except ValueError:
        return tuple(s for s in value.shape if s != 1) or (1,)
    return tuple(value.shape[a] for a in axes)


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

    >>> import batchnorm as bn
    >>> layer = bn.batchnorm_from_keras({"axis": -1, "momentum": 0.9, "epsilon": 1e-3})
    >>> layer.momentum, layer.axis
    (0.9, -1)
    """
    config = dict(config)
    for key in _DROPPED_KEYS:
        if config.pop(key, False):
            warnings.warn(f"Keras {key}=True is not applied by batchnorm.BatchNorm; the layer "
                          "computes the statistics of its local batch", stacklevel=2)
    for key in _NON_CALLABLE:
        if isinstance(config.get(key), dict):
            warnings.warn(f"layer {config.get('name')!r}: the Keras {key} {config[key]} is not "
                          "carried over; pass a callable instead", stacklevel=2)
            config[key] = None
    shape = None
    if weights:
        shape = _feature_shape(config, weights["moving_mean"])
        config["num_features"] = list(shape)
    layer = BatchNorm.from_config(config)
    if weights:
        with torch.no_grad():
            for name, value in weights.items():
                target = getattr(layer, name, None)
                if target is None:
                    raise ValueError(f"layer {config.get('name')!r} has no {name} here; the "
                                     "config and the weights disagree")
                array = np.asarray(value).reshape(shape)
                target.copy_(torch.from_numpy(array).to(target.dtype))
    return layer


def load_keras_batchnorms(path: str | Path) -> dict[str, BatchNorm]:
    """Build a :class:`~batchnorm.BatchNorm` for every Keras BatchNormalization in a saved model.

    ``path``: a ``.keras`` file (Keras 3 or tf_keras) or a legacy ``.h5`` model
    file. Returns layer name -> layer, in model order, each configured as in
    Keras (``axis`` included: Keras's default is -1, channels-last) and holding
    its ``gamma``, ``beta`` and moving statistics (renorm state too). In
    inference mode each gives Keras's outputs. See :func:`batchnorm_from_keras`.

    Example:
        >>> import batchnorm as bn
        >>> layers = bn.load_keras_batchnorms("model.keras")   # doctest: +SKIP
        >>> y = layers["batch_normalization"](x, training=False)  # doctest: +SKIP
    """
    return {name: batchnorm_from_keras(config, weights)
            for name, (config, weights) in read_keras_batchnorms(path).items()}
