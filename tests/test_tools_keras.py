"""Keras interop: BatchNormalization layers read from saved Keras models, without TensorFlow.

The fixtures in ``tests/fixtures/keras/`` were written by ``tools/make_keras_fixtures.py``
with tf_keras 2.21 and Keras 3.15: one tiny model per flavour saved as ``.keras`` and
legacy ``.h5``, and for every BatchNormalization layer its input, its inference
output, its config and its variables as Keras reported them.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import reference
import torch

import batchnorm as bn
from batchnorm.tools import keras_io

pytest.importorskip("h5py")

FIXTURES = Path(__file__).parent / "fixtures" / "keras"
RTOL = ATOL = 1e-5  # float32 on both sides, reductions in another order
# A mixed_float16 layer computes in float16 on both sides: a few ulps of float16 (2**-10
# relative) on outputs of magnitude ~1-5.
HALF_RTOL = HALF_ATOL = 5e-3
FILES = {  # saved model -> the npz with Keras's own numbers for it
    "tf_keras.keras": "tf_keras_expected.npz",
    "tf_keras.h5": "tf_keras_expected.npz",
    "keras3.keras": "keras3_expected.npz",
    "keras3.h5": "keras3_expected.npz",
    # Sequential models whose first layer is a BatchNormalization(input_shape=...): a
    # channels-first layer, tf_keras's ghost batches and None clipping bounds, a nested
    # model, a mixed_float16 policy.
    "tf_keras_seq.keras": "tf_keras_seq_expected.npz",
    "tf_keras_seq.h5": "tf_keras_seq_expected.npz",
    "keras3_seq.keras": "keras3_seq_expected.npz",
    "keras3_seq.h5": "keras3_seq_expected.npz",
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
    x, want = data[f"{name}__input"], data[f"{name}__output"]
    y = layer(torch.from_numpy(x), training=False).detach().numpy()
    assert y.dtype == want.dtype
    tolerance = HALF_RTOL if want.dtype == np.float16 else RTOL
    np.testing.assert_allclose(y.astype(np.float32), want.astype(np.float32), rtol=tolerance,
                               atol=HALF_ATOL if want.dtype == np.float16 else ATOL)


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
    assert layer.axis == (1, -1)  # [1, 3] of a rank-4 input: its last axis is -1


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
        assert layer.virtual_batch_size == config.get("virtual_batch_size")


@pytest.mark.parametrize("filename", FILES)
def test_loaded_axes_are_the_input_axes_keras_normalized(filename: str) -> None:
    data = expected(filename)
    for name, layer in bn.load_keras_batchnorms(FIXTURES / filename).items():
        config = json.loads(str(data[f"{name}__config"]))
        ndim = data[f"{name}__input"].ndim
        axis = config["axis"]
        saved = axis if isinstance(axis, list) else [axis]
        if config.get("virtual_batch_size"):  # tf_keras saves them shifted by one
            saved = [a - 1 for a in saved]
        saved = sorted(a % ndim for a in saved)
        assert list(layer.config.resolve_axes(ndim)) == saved, name


@pytest.mark.parametrize("filename", FILES)
def test_loaded_layers_take_a_batch_of_feature_vectors(filename: str) -> None:
    # README's example: (batch, *num_features), whatever rank the Keras input had.
    for name, layer in bn.load_keras_batchnorms(FIXTURES / filename).items():
        y = layer(torch.randn(8, *layer.num_features), training=False)
        assert y.shape == (8, *layer.num_features), name


def test_keras3_keeps_its_default_axis_minus_one() -> None:
    layer = bn.load_keras_batchnorms(FIXTURES / "keras3.keras")["bn_dense"]
    assert layer.axis == -1


@pytest.mark.parametrize("filename", ["tf_keras.keras", "keras3.keras"])
def test_get_config_round_trips_keras_keys(filename: str) -> None:
    data = expected(filename)
    for name in data["names"]:
        config = json.loads(str(data[f"{name}__config"]))
        round_trip = keras_io.batchnorm_from_keras(config).get_config()
        # axis: a built layer's [3] comes back as -1 (test_loaded_axes_are_...)
        for key in config.keys() - BOOKKEEPING - {"axis"}:
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


# ------------------------------------------------- weights are checked before anything is built

CONFIG = {"name": "bn", "axis": -1, "momentum": 0.9, "epsilon": 1e-3}
WEIGHTS = {"gamma": np.ones(4, "f4"), "beta": np.zeros(4, "f4"),
           "moving_mean": np.zeros(4, "f4"), "moving_variance": np.ones(4, "f4")}
BAD = {  # id -> (variable, value, what the message says)
    "2x2 gamma reshaped into 4 features": ("gamma", np.ones((2, 2), "f4"), "shape"),
    "all 2x2 with axis -1": (None, np.ones((2, 2), "f4"), "shape"),
    "fewer features": ("beta", np.zeros(3, "f4"), "features"),
    "complex truncated": ("gamma", np.ones(4, "c8"), "dtype"),
    "integers": ("moving_mean", np.zeros(4, "i8"), "dtype"),
    "bool": ("gamma", np.ones(4, bool), "dtype"),
    "nan": ("moving_mean", np.array([0, np.nan, 0, 0], "f4"), "finite"),
    "inf": ("gamma", np.array([np.inf, 1, 1, 1], "f4"), "finite"),
    "float16 inf": ("beta", np.array([np.inf, 0, 0, 0], "f2"), "finite"),
    "beyond float32": ("moving_variance", np.array([1e39, 1, 1, 1]), "finite"),
    "negative variance": ("moving_variance", np.array([1, -2, 1, 1], "f4"), ">= 0"),
    "not a variable": ("kernel", np.ones(4, "f4"), "kernel"),
}


@pytest.mark.parametrize("case", BAD)
def test_batchnorm_from_keras_refuses_bad_weights(case: str) -> None:
    variable, value, match = BAD[case]
    weights = dict.fromkeys(WEIGHTS, value) if variable is None else {**WEIGHTS, variable: value}
    with pytest.raises(ValueError, match=match) as info:
        keras_io.batchnorm_from_keras(CONFIG, weights)
    assert "'bn'" in str(info.value)
    assert (variable or "gamma") in str(info.value)


def test_renorm_variables_must_be_non_negative_standard_deviations() -> None:
    config = {**CONFIG, "renorm": True}
    weights = {**WEIGHTS, "moving_stddev": np.ones(4, "f4"), "renorm_mean": np.zeros(4, "f4"),
               "renorm_stddev": np.array([1, 1, -1, 1], "f4")}
    with pytest.raises(ValueError, match="renorm_stddev"):
        keras_io.batchnorm_from_keras(config, weights)


def test_good_weights_in_every_float_dtype_and_byte_order_load() -> None:
    for dtype in ("<f2", ">f4", "<f8"):
        weights = {k: v.astype(dtype) for k, v in WEIGHTS.items()}
        weights["moving_mean"] = np.arange(4).astype(dtype)
        layer = keras_io.batchnorm_from_keras(CONFIG, weights)
        assert layer.moving_mean.tolist() == [0, 1, 2, 3]


def test_bad_weights_are_refused_before_building_or_warning(monkeypatch) -> None:
    built = []
    from_config = bn.BatchNorm.from_config.__func__
    monkeypatch.setattr(bn.BatchNorm, "from_config", classmethod(
        lambda cls, config: built.append(config) or from_config(cls, config)))
    config = {**CONFIG, "synchronized": True}  # would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="finite"):
            keras_io.batchnorm_from_keras(config, {**WEIGHTS, "gamma": np.full(4, np.nan)})
    assert built == []


def test_a_refused_config_warns_nothing() -> None:
    config = {**CONFIG, "synchronized": True, "momentum": 2.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="momentum"):
            keras_io.batchnorm_from_keras(config)


def test_warnings_point_at_the_caller() -> None:
    with pytest.warns(UserWarning, match="synchronized") as record:
        keras_io.batchnorm_from_keras({**CONFIG, "synchronized": True})
    assert record[0].filename == __file__


def test_a_config_batchnorm_cannot_take_is_a_value_error_naming_the_key() -> None:
    with pytest.raises(ValueError, match="renorm_clipping"):
        keras_io.batchnorm_from_keras({**CONFIG, "renorm": True, "renorm_clipping": []})
    with pytest.raises(ValueError, match="momentum"):
        keras_io.batchnorm_from_keras({**CONFIG, "momentum": 2.0})


# ------------------------------------------------ what tf_keras saves that the loader maps

@pytest.mark.parametrize("filename", ["tf_keras_seq.keras", "tf_keras_seq.h5"])
def test_none_clipping_bounds_are_no_bounds(filename: str) -> None:
    config = json.loads(str(expected(filename)["bn_clip_none__config"]))
    assert config["renorm_clipping"] == {"rmax": None, "rmin": 0.5, "dmax": None}
    layer = bn.load_keras_batchnorms(FIXTURES / filename)["bn_clip_none"]
    assert layer.renorm_clipping == {"rmin": 0.5}
    assert layer.config.clipping == {"rmin": 0.5, "rmax": float("inf"), "dmax": float("inf")}


@pytest.mark.parametrize("filename", ["tf_keras_seq.keras", "tf_keras_seq.h5"])
def test_a_ghost_batch_layer_gets_its_input_axis_and_feature_shaped_variables(
        filename: str) -> None:
    _, weights = keras_io.read_keras_batchnorms(FIXTURES / filename)["bn_ghost"]
    assert weights["gamma"].shape == (1, 1, 1, 1, 3)  # as tf_keras stores them
    layer = bn.load_keras_batchnorms(FIXTURES / filename)["bn_ghost"]
    assert (layer.virtual_batch_size, layer.num_features, layer.axis) == (2, (3,), -1)


@pytest.mark.parametrize("filename", ["tf_keras_seq.keras", "tf_keras_seq.h5"])
def test_a_first_layer_given_input_shape_loads(filename: str) -> None:
    config = json.loads(str(expected(filename)["bn_first__config"]))
    assert config["batch_input_shape"] == [None, 3, 4, 4]
    layer = bn.load_keras_batchnorms(FIXTURES / filename)["bn_first"]
    assert (layer.axis, layer.num_features) == (1, (3,))


@pytest.mark.parametrize("filename", ["tf_keras.keras", "tf_keras.h5", "tf_keras_seq.keras"])
def test_tf_keras_layers_feed_the_variance_tf_keras_would(filename: str) -> None:
    # tf_keras saves no `fused`: its default, which fuses rank-4 inputs with one axis (the
    # Bessel-corrected variance) and nothing else; the layer decides per input likewise.
    for name, layer in bn.load_keras_batchnorms(FIXTURES / filename).items():
        assert layer.unbiased_moving_variance is None, name
        ndim = expected(filename)[f"{name}__input"].ndim
        want = reference.tf_keras_unbiased(ndim, layer.axis, renorm=layer.renorm,
                                           virtual_batch_size=layer.virtual_batch_size)
        assert layer.config.for_input(ndim, torch.float32).unbiased_moving_variance == want


@pytest.mark.parametrize("filename", ["keras3.keras", "keras3.h5", "keras3_seq.keras"])
def test_keras3_layers_feed_the_biased_variance(filename: str) -> None:
    for name, layer in bn.load_keras_batchnorms(FIXTURES / filename).items():
        assert layer.unbiased_moving_variance is False, name  # Keras 3 never fuses
