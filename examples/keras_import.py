"""Keras import: a Keras model's BatchNormalization layers, weights and moving statistics
included, as ``bn.BatchNorm`` layers that give Keras's inference outputs.

What a user moving a model from Keras does: save it (``model.save("model.keras")``, or
the legacy ``.h5``) and load its batch norms with ``bn.load_keras_batchnorms``, which
reads the file without TensorFlow or Keras. Here Keras 3, on its torch backend (no
TensorFlow needed), first trains a small model for a few epochs (so the moving
statistics are not the initial 0 and 1) and saves it in a temporary folder; each loaded
layer is then compared with the Keras layer on the same input, in inference mode, and
the script prints the largest difference.

Run it from the repository root, with the ``examples`` extra (Keras 3)::

    pip install -e ".[examples]"
    python examples/keras_import.py
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import batchnorm as bn  # noqa: E402

keras.utils.set_random_seed(0)
inputs = keras.Input((8, 8, 3))  # Keras is channels-last
h = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
h = keras.layers.BatchNormalization(momentum=0.9, name="bn_conv")(h)
h = keras.layers.ReLU()(h)
h = keras.layers.GlobalAveragePooling2D()(h)
h = keras.layers.Dense(16)(h)
h = keras.layers.BatchNormalization(renorm=True, name="bn_dense")(h)
outputs = keras.layers.Dense(4)(h)
model = keras.Model(inputs, outputs)

rng = np.random.default_rng(0)
x = (rng.normal(size=(128, 8, 8, 3)) * 2 + 1).astype("float32")
y = rng.integers(0, 4, size=128)
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, batch_size=16, epochs=3, verbose=0)

with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "model.keras"
    model.save(path)
    layers = bn.load_keras_batchnorms(path)  # {Keras layer name: bn.BatchNorm}

for name, layer in layers.items():
    keras_layer = model.get_layer(name)
    layer_input = keras.Model(model.input, keras_layer.input)(x)  # what reaches the layer
    expected = keras.ops.convert_to_numpy(keras_layer(layer_input, training=False))
    ours = layer(torch.as_tensor(keras.ops.convert_to_numpy(layer_input)), training=False)
    difference = np.abs(ours.detach().numpy() - expected).max()
    # float32 on both sides; the two libraries order the arithmetic differently.
    print(f"{name}: {layer}; max |bn - Keras| = {difference:.3g} "
          f"(outputs up to {np.abs(expected).max():.3g})")
