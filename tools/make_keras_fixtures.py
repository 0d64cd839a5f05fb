"""Generate the Keras interop fixtures in ``tests/fixtures/keras/``.

Run (from the repository root), with the Python of a venv holding tensorflow-cpu==2.21.0
and tf-keras==2.21.0 (TensorFlow 2.21 pulls in Keras 3, importable as ``keras``, next to
the legacy ``tf_keras``)::

    TF_USE_LEGACY_KERAS=1 /path/to/tf-venv/bin/python tools/make_keras_fixtures.py

One tiny model per Keras flavour, on a ``(N, 4, 4, 3)`` channels-last input::

    Dense(6) -> BatchNormalization(momentum=0.9)                      "bn_dense"
    Conv2D(4, 2) -> BatchNormalization(axis=-1, center=False)         "bn_conv"
    ReLU -> BatchNormalization(renorm=True, renorm_clipping=...,
                               momentum=0.8, renorm_momentum=0.9)     "bn_renorm"
    ReLU -> BatchNormalization(axis=[1, 3])  (tf_keras only)           "bn_multi"

And one Sequential model per flavour whose first layer is a BatchNormalization given
``input_shape`` (files ``tf_keras_seq.*``, ``keras3_seq.*``), on a ``(N, 3, 4, 4)``
channels-first input::

    BatchNormalization(axis=1, input_shape=(3, 4, 4))                 "bn_first"
    Permute((2, 3, 1))  (to channels-last)
    BatchNormalization(virtual_batch_size=2)  (tf_keras only)         "bn_ghost"
    BatchNormalization(renorm=True, renorm_clipping={"rmax": None,
                       "rmin": 0.5, "dmax": None})  (tf_keras only)    "bn_clip_none"
    Sequential([BatchNormalization()])  (a nested model)               "bn_nested"
    BatchNormalization(dtype="mixed_float16")  (a mixed precision policy:
                       float16 computation, float32 variables)        "bn_mixed"

For the nested layer, the npz's input and output are those of the nested model (which
holds only it); for the mixed precision one they are float16.

Each model is called 30 times in training mode on shifted, scaled random
batches (so the moving statistics are far from their 0/1 initial values; no
optimizer, so nothing else is saved), then gets random gamma/beta. Files:

    tf_keras.keras, tf_keras.h5       tf_keras 2.21: the zip format and the legacy HDF5 format
    keras3.keras, keras3.h5           Keras 3: the same two formats
    tf_keras_seq.*, keras3_seq.*      the Sequential models, likewise
    tf_keras_expected.npz, keras3_expected.npz
        x                     the fixed model input (float32)
        <bn name>__input      the input of that BatchNormalization layer for x
        <bn name>__output     its output in inference mode (training=False)
        <bn name>__config     0-d str: the layer's Keras get_config() as JSON
        <bn name>__<var>      the layer's variables as Keras reports them (gamma, beta,
                              moving_mean, moving_variance, moving_stddev, renorm_mean,
                              renorm_stddev; those that exist), in their stored shape
        names                 the BatchNormalization layer names, in model order

Total size stays well under 400 KB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "keras"
CLIP = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}


def build(k, *, multi_axis: bool):
    """The fixture model for the Keras module ``k`` (tf_keras or keras)."""
    L = k.layers
    inp = k.Input((4, 4, 3), name="x")
    x = L.Dense(6, name="dense")(inp)
    x = L.BatchNormalization(momentum=0.9, name="bn_dense")(x)
    x = L.Conv2D(4, 2, name="conv")(x)
    x = L.BatchNormalization(axis=-1, center=False, name="bn_conv")(x)
    x = L.Activation("relu", name="relu")(x)  # inputs with mean > 0, variance < 1 from here
    x = L.BatchNormalization(renorm=True, renorm_clipping=CLIP, renorm_momentum=0.9,
                             momentum=0.8, name="bn_renorm")(x)
    x = L.Activation("relu", name="relu_1")(x)
    if multi_axis:
        x = L.BatchNormalization(axis=[1, 3], name="bn_multi")(x)
    return k.Model(inp, x, name="tiny")


def build_seq(k, *, tf_only: bool):
    """The Sequential fixture model (see the module docstring)."""
    L = k.layers
    layers = [L.BatchNormalization(axis=1, input_shape=(3, 4, 4), name="bn_first"),
              L.Permute((2, 3, 1), name="to_channels_last")]
    if tf_only:
        layers += [L.BatchNormalization(virtual_batch_size=2, name="bn_ghost"),
                   L.BatchNormalization(renorm=True, name="bn_clip_none", renorm_clipping={
                       "rmax": None, "rmin": 0.5, "dmax": None})]
    layers += [k.Sequential([L.BatchNormalization(name="bn_nested")], name="block"),
               L.BatchNormalization(dtype="mixed_float16", name="bn_mixed")]
    return k.Sequential(layers, name="seq")


def _plain(obj):
    """tf_keras wraps dicts and lists in trackable wrappers that json cannot encode."""
    return dict(obj) if hasattr(obj, "items") else list(obj)


def bn_layers(model, k):
    """``(BatchNormalization, the top-level layer holding it)`` in model order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, k.layers.BatchNormalization):
            found.append((layer, layer))
        elif isinstance(layer, k.Model):
            found += [(inner, layer) for inner, _ in bn_layers(layer, k)]
    return found


def make(k, prefix: str, model, *, seed: int, channels_first: bool = False) -> None:
    rng = np.random.default_rng(seed)
    tf.random.set_seed(seed)
    k.utils.set_random_seed(seed)
    stats_shape = (1, 3, 1, 1) if channels_first else (1, 1, 1, 3)
    for _ in range(30):
        scale = rng.uniform(1.0, 3.0, size=stats_shape)
        shift = rng.uniform(-2.0, 2.0, size=stats_shape)
        batch = (rng.standard_normal((8, *model.input_shape[1:])) * scale + shift + 1.0
                 ).astype(np.float32)
        model(batch, training=True)
    for layer, _ in bn_layers(model, k):
        weights = layer.get_weights()
        names = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
        for i, name in enumerate(names):
            if name in ("gamma", "beta"):
                weights[i] = rng.uniform(-1.5, 1.5, size=weights[i].shape).astype(np.float32)
        layer.set_weights(weights)

    x = (rng.standard_normal((4, *model.input_shape[1:])) * 2.0 + 1.0).astype(np.float32)
    arrays = {"x": x}
    names = []
    # A Sequential model's top-level layers' inputs and outputs, called one after the other.
    chain, h = {}, tf.constant(x)
    for top in model.layers if channels_first else ():
        chain[top.name] = (h, top(h, training=False))
        h = chain[top.name][1]
    for layer, host in bn_layers(model, k):
        if channels_first:  # a Sequential model: the chain gives every layer's input
            layer_in, layer_out = chain[host.name]
        else:
            probe = k.Model(model.inputs, [host.input, host.output])
            layer_in, layer_out = probe(x, training=False)
        dtype = np.float16 if layer.compute_dtype == "float16" else np.float32
        arrays[f"{layer.name}__input"] = np.asarray(layer_in).astype(dtype)
        arrays[f"{layer.name}__output"] = np.asarray(layer_out).astype(dtype)
        for weight in layer.weights:
            var = weight.name.split("/")[-1].split(":")[0]
            arrays[f"{layer.name}__{var}"] = np.asarray(weight.numpy(), dtype=np.float32)
        arrays[f"{layer.name}__config"] = np.array(json.dumps(layer.get_config(), default=_plain))
        names.append(layer.name)
    arrays["names"] = np.array(names)

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for suffix in (".keras", ".h5"):
        path = OUT_DIR / f"{prefix}{suffix}"
        path.unlink(missing_ok=True)
        model.save(path)
    np.savez_compressed(OUT_DIR / f"{prefix}_expected.npz", **arrays)


def main() -> None:
    import keras
    import tf_keras

    make(tf_keras, "tf_keras", build(tf_keras, multi_axis=True), seed=0)
    make(keras, "keras3", build(keras, multi_axis=False), seed=1)
    make(tf_keras, "tf_keras_seq", build_seq(tf_keras, tf_only=True), seed=2,
         channels_first=True)
    make(keras, "keras3_seq", build_seq(keras, tf_only=False), seed=3, channels_first=True)
    total = sum(p.stat().st_size for p in OUT_DIR.iterdir())
    print(f"wrote {sorted(p.name for p in OUT_DIR.iterdir())} ({total / 1024:.0f} KB) "
          f"with tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}, "
          f"keras {keras.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
