"""Generate the Keras interop fixtures in ``tests/fixtures/keras/``.

Run (from the repository root) exactly as::

    TF_USE_LEGACY_KERAS=1 /work/tfenv/bin/python tools/make_keras_fixtures.py

(the venv: ``python3.11 -m venv /work/tfenv && /work/tfenv/bin/pip install
tensorflow-cpu==2.21.0 tf-keras==2.21.0``; TensorFlow 2.21 pulls in Keras 3,
importable as ``keras``, next to the legacy ``tf_keras``).

One tiny model per Keras flavour, on a ``(N, 4, 4, 3)`` channels-last input::

    Dense(6) -> BatchNormalization(momentum=0.9)                      "bn_dense"
    Conv2D(4, 2) -> BatchNormalization(axis=-1, center=False)         "bn_conv"
    ReLU -> BatchNormalization(renorm=True, renorm_clipping=...,
                               momentum=0.8, renorm_momentum=0.9)     "bn_renorm"
    ReLU -> BatchNormalization(axis=[1, 3])  (tf_keras only)           "bn_multi"

Each model is called 30 times in training mode on shifted, scaled random
batches (so the moving statistics are far from their 0/1 initial values; no
optimizer, so nothing else is saved), then gets random gamma/beta. Files:

    tf_keras.keras, tf_keras.h5       tf_keras 2.21: the zip format and the legacy HDF5 format
    keras3.keras, keras3.h5           Keras 3: the same two formats
    tf_keras_expected.npz, keras3_expected.npz
        x                     the fixed model input (float32)
        <bn name>__input      the input of that BatchNormalization layer for x
        <bn name>__output     its output in inference mode (training=False)
        <bn name>__config     0-d str: the layer's Keras get_config() as JSON
        <bn name>__<var>      the layer's variables as Keras reports them (gamma, beta,
                              moving_mean, moving_variance, moving_stddev, renorm_mean,
                              renorm_stddev; those that exist), in their stored shape
        names                 the BatchNormalization layer names, in model order

Total size stays well under 200 KB.
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


def _plain(obj):
    """tf_keras wraps dicts and lists in trackable wrappers that json cannot encode."""
    return dict(obj) if hasattr(obj, "items") else list(obj)


def bn_layers(model, k):
    return [layer for layer in model.layers
            if isinstance(layer, k.layers.BatchNormalization)]


def make(k, prefix: str, *, multi_axis: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tf.random.set_seed(seed)
    k.utils.set_random_seed(seed)
    model = build(k, multi_axis=multi_axis)
    for _ in range(30):
        scale = rng.uniform(1.0, 3.0, size=(1, 1, 1, 3))
        shift = rng.uniform(-2.0, 2.0, size=(1, 1, 1, 3))
        batch = (rng.standard_normal((8, 4, 4, 3)) * scale + shift + 1.0).astype(np.float32)
        model(batch, training=True)
    for layer in bn_layers(model, k):
        weights = layer.get_weights()
        names = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
        for i, name in enumerate(names):
            if name in ("gamma", "beta"):
                weights[i] = rng.uniform(-1.5, 1.5, size=weights[i].shape).astype(np.float32)
        layer.set_weights(weights)

    x = (rng.standard_normal((3, 4, 4, 3)) * 2.0 + 1.0).astype(np.float32)
    arrays = {"x": x}
    names = []
    for layer in bn_layers(model, k):
        probe = k.Model(model.inputs, [layer.input, layer.output])
        layer_in, layer_out = probe(x, training=False)
        arrays[f"{layer.name}__input"] = np.asarray(layer_in, dtype=np.float32)
        arrays[f"{layer.name}__output"] = np.asarray(layer_out, dtype=np.float32)
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

    make(tf_keras, "tf_keras", multi_axis=True, seed=0)
    make(keras, "keras3", multi_axis=False, seed=1)
    total = sum(p.stat().st_size for p in OUT_DIR.iterdir())
    print(f"wrote {sorted(p.name for p in OUT_DIR.iterdir())} ({total / 1024:.0f} KB) "
          f"with tensorflow {tf.__version__}, tf_keras {tf_keras.__version__}, "
          f"keras {keras.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
