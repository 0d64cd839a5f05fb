"""Generate the fixtures of the Keras 3 layer's tests in ``tests/fixtures/keras3_layer/``.

Run (from the repository root), with the Python of a venv holding tensorflow-cpu==2.21.0
and tf-keras==2.21.0 (TensorFlow is not a dependency of batchnorm)::

    TF_USE_LEGACY_KERAS=1 /path/to/tf-venv/bin/python tools/make_keras3_layer_fixtures.py

``tests/test_keras_layer.py`` runs them through ``batchnorm.keras.BatchNormalization``
(the fixtures of ``tests/fixtures/golden/``, written by ``tools/make_golden.py``, cover
plain batch normalization, renorm, ghost batches and adjustment; these add what needs a
model or a mask). Every file is deterministic (fixed seeds).

``mask_rank3.npz``, ``mask_rank4_renorm.npz``: one ``tf_keras.layers.BatchNormalization``
driven through training and inference calls with a boolean ``mask`` (Keras's masking: the
input's shape without the feature axis), in the golden format (see ``make_golden.py``) plus
``mask_i``.

``nested.npz`` + ``nested.h5``: a functional model holding a nested Sequential
(Conv2D -> BN(momentum 0.9) -> ReLU), then BN(renorm, clipping, renorm_momentum 0.9),
then a nested functional model (BN(virtual_batch_size 2) -> GlobalAveragePooling2D ->
Dense(3)); ``weights_i`` are ``model.get_weights()`` (tf_keras's order), ``nested.h5`` the
same weights as ``model.save_weights`` writes them. Keys: ``x``, ``weights_*``, ``y_train``
(one training call), ``after_*`` (``get_weights()`` after it), ``y_infer`` (an inference
call after it).

``fit.npz``: a small CNN (Conv2D(8, 3) -> BN -> ReLU -> Conv2D(8, 3, strides 2) ->
BN(momentum 0.9) -> ReLU -> GlobalAveragePooling2D -> Dense(4)) trained with ``model.fit``
(SGD, learning rate 0.05, sparse categorical cross-entropy from logits, batch 16,
``shuffle=False``, 3 epochs on 64 samples). Keys: ``x``, ``labels``, ``initial_*`` and
``final_*`` (``get_weights()`` before and after), ``predict`` (``model.predict(x)``
after).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "keras3_layer"
layers = tf_keras.layers


def mask_fixture(name: str, shape: tuple, seed: int, **options) -> dict:
    """One layer through training and inference calls with a mask, in the golden format."""
    rng = np.random.default_rng(seed)
    layer = layers.BatchNormalization(axis=-1, fused=False, **options)
    layer.build(shape)
    features = (shape[-1],)
    state = ["moving_mean", "moving_variance"]
    if options.get("renorm"):
        state += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    config = {"axis": -1, "momentum": 0.99, "epsilon": 1e-3, "center": True, "scale": True,
              "renorm": False, "renorm_clipping": None, "renorm_momentum": 0.99,
              "virtual_batch_size": None, "adjustment": False, "fused": False, **options}
    arrays = {"config": np.array(json.dumps(config))}
    layer.gamma.assign(rng.uniform(0.5, 2.0, features) * rng.choice([-1.0, 1.0], features))
    layer.beta.assign(rng.normal(0.0, 1.0, features))
    layer.moving_mean.assign(rng.normal(0.0, 2.0, features))
    layer.moving_variance.assign(rng.uniform(0.5, 4.0, features))
    if options.get("renorm"):
        for name_ in ("moving_stddev", "renorm_stddev"):
            getattr(layer, name_).assign(np.sqrt(layer.moving_variance.numpy()))
        layer.renorm_mean.assign(layer.moving_mean.numpy())
    for k in ("gamma", "beta", *state):
        arrays[f"{k}0"] = getattr(layer, k).numpy().astype(np.float32)
    for i, training in enumerate((True, True, False, True, False)):
        x = (rng.uniform(1.0, 4.0) * rng.standard_normal(shape)
             + rng.uniform(-3.0, 3.0)).astype(np.float32)
        mask = rng.random(shape[:-1]) < 0.7
        dy = rng.standard_normal(shape).astype(np.float32)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt, training=training, mask=tf.constant(mask))
            loss = tf.reduce_sum(y * dy)
        dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
        arrays.update({f"x_{i}": x, f"mask_{i}": mask, f"training_{i}": np.array(training),
                       f"dy_{i}": dy, f"y_{i}": y.numpy(), f"dx_{i}": dx.numpy(),
                       f"dgamma_{i}": dgamma.numpy(), f"dbeta_{i}": dbeta.numpy()})
        for k in state:
            arrays[f"{k}_{i}"] = getattr(layer, k).numpy().astype(np.float32)
    arrays["num_steps"] = np.array(5, dtype=np.int64)
    return arrays


def nested_model() -> tf_keras.Model:
    inner = tf_keras.Sequential([layers.Conv2D(6, 3, padding="same"),
                                 layers.BatchNormalization(momentum=0.9), layers.ReLU()],
                                name="inner")
    head_input = tf_keras.Input((8, 8, 6))
    head = layers.BatchNormalization(virtual_batch_size=2)(head_input)
    head = layers.Dense(3)(layers.GlobalAveragePooling2D()(head))
    head = tf_keras.Model(head_input, head, name="head")
    inputs = tf_keras.Input((8, 8, 3))
    x = inner(inputs)
    x = layers.BatchNormalization(renorm=True, renorm_momentum=0.9,
                                  renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3})(x)
    return tf_keras.Model(inputs, head(x))


def nested_fixture() -> dict:
    tf.keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    model = nested_model()
    # Every BN variable away from its initial value (and from the others), so that a
    # wrong order shows; renorm's stddevs consistent with the variance, as tf_keras's are.
    for layer in model.submodules:
        if isinstance(layer, layers.BatchNormalization):
            for variable in layer.weights:
                variable.assign(rng.uniform(0.5, 2.0, variable.shape))
            if layer.renorm:
                stddev = np.sqrt(layer.moving_variance.numpy())
                layer.moving_stddev.assign(stddev)
                layer.renorm_stddev.assign(stddev * rng.uniform(0.9, 1.1, stddev.shape))
    model.save_weights(OUT_DIR / "nested.h5")
    x = (2 * rng.standard_normal((8, 8, 8, 3)) + 1).astype(np.float32)
    arrays = {"x": x, **{f"weights_{i}": w for i, w in enumerate(model.get_weights())}}
    arrays["y_train"] = model(x, training=True).numpy()
    arrays.update({f"after_{i}": w for i, w in enumerate(model.get_weights())})
    arrays["y_infer"] = model(x, training=False).numpy()
    return arrays


def fit_fixture() -> dict:
    tf.keras.utils.set_random_seed(4)
    rng = np.random.default_rng(4)
    model = tf_keras.Sequential([
        tf_keras.Input((12, 12, 3)), layers.Conv2D(8, 3), layers.BatchNormalization(),
        layers.ReLU(), layers.Conv2D(8, 3, strides=2), layers.BatchNormalization(momentum=0.9),
        layers.ReLU(), layers.GlobalAveragePooling2D(), layers.Dense(4)])
    x = (rng.standard_normal((64, 12, 12, 3)) + 0.5).astype(np.float32)
    labels = rng.integers(0, 4, 64)
    arrays = {"x": x, "labels": labels,
              **{f"initial_{i}": w for i, w in enumerate(model.get_weights())}}
    model.compile(optimizer=tf_keras.optimizers.SGD(0.05),
                  loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, labels, batch_size=16, epochs=3, shuffle=False, verbose=0)
    arrays.update({f"final_{i}": w for i, w in enumerate(model.get_weights())})
    arrays["predict"] = model.predict(x, verbose=0)
    return arrays


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    files = {
        "mask_rank3": mask_fixture("mask_rank3", (6, 5, 4), seed=1),
        "mask_rank4_renorm": mask_fixture(
            "mask_rank4_renorm", (4, 3, 5, 3), seed=2, renorm=True,
            renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}, renorm_momentum=0.9),
        "nested": nested_fixture(),
        "fit": fit_fixture(),
    }
    for name, arrays in files.items():
        np.savez(OUT_DIR / f"{name}.npz", **arrays)
        print(f"wrote {name}.npz ({len(arrays)} arrays)")


if __name__ == "__main__":
    main()
