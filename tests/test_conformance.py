"""Conformance with tf_keras ``BatchNormalization(fused=False)``.

The fixtures in ``tests/fixtures/golden/`` were written by ``tools/make_golden.py``
with tensorflow-cpu 2.21.0 and tf-keras 2.21.0. Each drives one layer through a
sequence of training and inference calls; after every call we compare the output,
the gradients of ``sum(y * dy)`` with respect to x, gamma and beta, and every
moving statistic.

Tolerance: rtol=1e-5, atol=1e-5 in float32. Both sides compute in float32 but
reduce in a different order (TensorFlow's two-pass mean of squared deviations
against torch's var_mean), which moves results by a few ulps of values of
magnitude ~10; atol covers gradients that are near zero after the mean is
subtracted, where a relative bound is meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import batchnorm as bn

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
RTOL = ATOL = 1e-5
# Keys of the fixture configs that belong to later training modes; a fixture
# using any of them is exercised by the tests of those modes.
EXTENDED = ("renorm", "virtual_batch_size", "adjustment")


def load(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = dict(np.load(path))
    return json.loads(str(data.pop("config"))), data


def is_plain(config: dict) -> bool:
    return not any(config.get(key) for key in EXTENDED)


FIXTURES = sorted(GOLDEN.glob("*.npz"))
PLAIN = [p for p in FIXTURES if is_plain(load(p)[0])]


def build_layer(config: dict, data: dict[str, np.ndarray]) -> bn.BatchNorm:
    axis = config["axis"]
    layer = bn.BatchNorm(
        data["moving_mean0"].shape,
        axis=tuple(axis) if isinstance(axis, list) else axis,
        momentum=config["momentum"],
        epsilon=config["epsilon"],
        center=config["center"],
        scale=config["scale"],
    )
    with torch.no_grad():
        layer.moving_mean.copy_(torch.from_numpy(data["moving_mean0"]))
        layer.moving_variance.copy_(torch.from_numpy(data["moving_variance0"]))
        if layer.gamma is not None:
            layer.gamma.copy_(torch.from_numpy(data["gamma0"]))
        if layer.beta is not None:
            layer.beta.copy_(torch.from_numpy(data["beta0"]))
    return layer


def check_step(layer: bn.BatchNorm, data: dict[str, np.ndarray], i: int) -> None:
    x = torch.from_numpy(data[f"x_{i}"]).requires_grad_()
    training = bool(data[f"training_{i}"])
    for param in (layer.gamma, layer.beta):
        if param is not None:
            param.grad = None
    for _ in range(int(data.get(f"repeat_{i}", 1)) - 1):
        layer(x.detach(), training=training)
    y = layer(x, training=training)
    y.backward(torch.from_numpy(data[f"dy_{i}"]))

    def close(actual: torch.Tensor, key: str) -> None:
        torch.testing.assert_close(
            actual.detach(), torch.from_numpy(data[key]), rtol=RTOL, atol=ATOL,
            msg=lambda m: f"step {i} ({'training' if training else 'inference'}), {key}: {m}",
        )

    close(y, f"y_{i}")
    close(x.grad, f"dx_{i}")
    if layer.gamma is not None:
        close(layer.gamma.grad, f"dgamma_{i}")
    if layer.beta is not None:
        close(layer.beta.grad, f"dbeta_{i}")
    close(layer.moving_mean, f"moving_mean_{i}")
    close(layer.moving_variance, f"moving_variance_{i}")


@pytest.mark.parametrize("path", PLAIN, ids=[p.stem for p in PLAIN])
def test_matches_tf_keras(path: Path) -> None:
    config, data = load(path)
    layer = build_layer(config, data)
    for i in range(int(data["num_steps"])):
        check_step(layer, data, i)


def test_fixtures_cover_the_foundation_configurations() -> None:
    configs = [load(p)[0] for p in PLAIN]
    assert len(PLAIN) >= 15
    assert {json.dumps(c["axis"]) for c in configs} >= {"-1", "0", "1", "[1, 3]"}
    assert {c["momentum"] for c in configs} >= {0.99, 0.9, 0.5}
    assert {c["epsilon"] for c in configs} >= {1e-3, 1e-5, 0.1}
    assert {(c["center"], c["scale"]) for c in configs} == {
        (True, True), (False, True), (True, False), (False, False)}
