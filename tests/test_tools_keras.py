"""Keras interop: BatchNormalization layers read from saved Keras models, without TensorFlow.

The fixtures in ``tests/fixtures/keras/`` were written by ``tools/make_keras_fixtures.py``
with tf_keras 2.21 and Keras 3.15: one tiny model per flavour saved as ``.keras`` and
legacy ``.h5``, and for every BatchNormalization layer its input, its inference
output, its config and its variables as Keras reported them.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import batchnorm as bn
from batchnorm.tools import keras_io

pytest.importorskip("h5py")

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
RTOL = ATOL = 1e-5
FILES = {  # saved model -> the npz with Keras's own numbers for it
    "tf_keras.keras": "tf_keras_expected.npz",
    "tf_keras.h5": "tf_keras_expected.npz",
    "keras3.keras": "keras3_expected.npz",
    "keras3.h5": "keras3_expected.npz",
}
# Keras config keys that carry no computation (or, for Keras 3's synchronized, none here).
BOOKKEEPING = {"name", "dtype", "synchronized"}


def expected(filename: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / FILES[filename]))


def cases() -> list[tuple[str, str]]:
    return [(f, str(name)) for f in FILES for name in expected(f)["names"]]


@pytest.mark.parametrize(("filename", "name"), cases())
def test_inference_output_matches_keras(filename: str, name: str) -> None:
    data = expected(filename)
    layer = bn.load_keras_batchnorms(FIXTURES / filename)[name]
    y = layer(torch.from_numpy(data[f"{name}__input"]), training=False)
    np.testing.assert_allclose(y.detach().numpy(), data[f"{name}__output"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("filename", FILES)
def test_every_variable_is_loaded_in_feature_shape(filename: str) -> None:
    data = expected(filename)
    for name, layer in bn.load_keras_batchnorms(FIXTURES / filename).items():
        variables = [k.split("__")[1] for k in data if k.startswith(f"{name}__")
                     and k.split("__")[1] not in ("input", "output", "config")]
        assert variables, name
        for var in variables:
            want = data[f"{name}__{var}"].reshape(layer.num_features)
            np.testing.assert_array_equal(getattr(layer, var).detach().numpy(), want,
                                          err_msg=f"{name}.{var}")


@pytest.mark.parametrize("filename", FILES)
def test_layers_come_in_model_order(filename: str) -> None:
    names = list(bn.load_keras_batchnorms(FIXTURES / filename))
    assert names == [str(n) for n in expected(filename)["names"]]


def test_broadcast_shaped_multi_axis_parameters_get_the_feature_shape() -> None:
    _, weights = keras_io.read_keras_batchnorms(FIXTURES / "tf_keras.h5")["bn_multi"]
    assert weights["gamma"].shape == (1, 3, 1, 4)  # as tf_keras stores them
    layer = bn.load_keras_batchnorms(FIXTURES / "tf_keras.h5")["bn_multi"]
    assert layer.num_features == (3, 4)
    assert layer.axis == (1, 3)


@pytest.mark.parametrize("filename", FILES)
def test_configuration_is_carried_over(filename: str) -> None:
    layers = bn.load_keras_batchnorms(FIXTURES / filename)
    data = expected(filename)
    for name, layer in layers.items():
        config = json.loads(str(data[f"{name}__config"]))
        assert layer.momentum == config["momentum"]
        assert layer.epsilon == config["epsilon"]
        assert (layer.center, layer.scale) == (config["center"], config["scale"])
        assert layer.renorm == config.get("renorm", False)
        axis = config["axis"]
        assert layer.axis == (tuple(axis) if isinstance(axis, list) else axis)


def test_keras3_keeps_its_default_axis_minus_one() -> None:
    layer = bn.load_keras_batchnorms(FIXTURES / "keras3.keras")["bn_dense"]
    assert layer.axis == -1


@pytest.mark.parametrize("filename", ["tf_keras.keras", "keras3.keras"])
def test_get_config_round_trips_keras_keys(filename: str) -> None:
    data = expected(filename)
    for name in data["names"]:
        config = json.loads(str(data[f"{name}__config"]))
        round_trip = keras_io.batchnorm_from_keras(config).get_config()
        for key in config.keys() - BOOKKEEPING:
            assert round_trip[key] == config[key], (name, key)


def test_tf_keras_config_goes_through_from_config_directly() -> None:
    data = expected("tf_keras.keras")
    config = json.loads(str(data["bn_renorm__config"]))
    round_trip = bn.BatchNorm.from_config(config).get_config()
    assert {k: round_trip[k] for k in config.keys() - BOOKKEEPING} == \
        {k: config[k] for k in config.keys() - BOOKKEEPING}


def test_synchronized_true_warns() -> None:
    with pytest.warns(UserWarning, match="synchronized"):
        layer = keras_io.batchnorm_from_keras({"axis": -1, "synchronized": True})
    assert layer.axis == -1


def test_keras_regularizer_dict_is_dropped_with_a_warning() -> None:
    config = {"axis": -1, "gamma_regularizer": {"class_name": "L2", "config": {"l2": 0.01}}}
    with pytest.warns(UserWarning, match="gamma_regularizer"):
        layer = keras_io.batchnorm_from_keras(config)
    assert layer.gamma_regularizer is None


def test_nested_model_in_a_keras_zip(tmp_path: Path) -> None:
    import h5py

    inner = {"class_name": "BatchNormalization",
             "config": {"name": "inner_bn", "axis": -1, "momentum": 0.9, "epsilon": 1e-3,
                        "center": True, "scale": False}}
    config = {"class_name": "Sequential", "config": {"name": "outer", "layers": [
        {"class_name": "Dense", "config": {"name": "dense"}},
        {"class_name": "Sequential", "config": {"name": "block", "layers": [inner]}},
    ]}}
    weights = tmp_path / "model.weights.h5"
    with h5py.File(weights, "w") as f:
        group = f.create_group("layers/sequential/layers/batch_normalization/vars")
        for i, value in enumerate(([0.5, -0.5], [1.0, 2.0], [3.0, 4.0])):  # beta, mean, var
            group.create_dataset(str(i), data=np.array(value, dtype=np.float32))
    path = tmp_path / "nested.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps(config))
        archive.write(weights, "model.weights.h5")
    layer = bn.load_keras_batchnorms(path)["inner_bn"]
    assert layer.beta.tolist() == [0.5, -0.5]
    assert layer.moving_variance.tolist() == [3.0, 4.0]


def test_a_file_that_is_not_a_keras_model_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="neither"):
        bn.load_keras_batchnorms(path)
