"""Conformance with tf_keras ``BatchNormalization``, on every kernel.

The fixtures in ``tests/fixtures/golden/`` were written by ``tools/make_golden.py``
with tensorflow-cpu 2.21.0 and tf-keras 2.21.0. Each drives one layer through a
sequence of training and inference calls; after every call we compare the output,
the gradients of ``sum(y * dy)`` with respect to x, gamma and beta, and every
moving statistic (renorm's moving_stddev, renorm_mean and renorm_stddev
included). Most fixtures were written with ``fused=False`` (the biased batch variance
enters ``moving_variance``), the ``fused_default_*`` ones with tf_keras's default
``fused=None``, which fuses rank 4 and 5 inputs with one feature axis and then feeds the
Bessel-corrected variance: a layer with our default ``unbiased_moving_variance=None``
must do the same. The fixtures cover plain batch normalization over ranks 2-5, axes
0, 1, -1 and [1, 3], momentums, epsilons and center/scale; renorm with and
without clipping and with several renorm momentums; ghost batches of 2 and 4
(with renorm too) including inference at batch size 1; and adjustment.

Tolerance: rtol=1e-5, atol=1e-5 in float32. Both sides compute in float32 but
reduce in a different order (TensorFlow's two-pass mean of squared deviations
against torch's var_mean), which moves results by a few ulps of values of
magnitude ~10; atol covers gradients that are near zero after the mean is
subtracted, where a relative bound is meaningless.

Where that bound fails, a value still conforms if it is at least as close to
the exact result (the composite path replayed in float64 beside the layer)
as TensorFlow's own float32 value is. This is for ill-conditioned values only:
with ghost batches of two samples the input gradient is a difference of
nearly equal terms of magnitude ``|dy| / sigma``, so TensorFlow's rounding
alone exceeds 1e-5 there, and a kernel that computes in a different order
(the CPU fast path, whose float64 accumulation lands on the exact value)
cannot also reproduce TensorFlow's rounding error.

Kernels: ``fused=None`` (the fast path where it applies, ATen's kernel for
small plain batches), ``fused=False`` (composite), and ``cpu`` (fused=None with
the CPU fast path forced for every fixture, small plain batches included).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import reference
import torch

import batchnorm as bn
from batchnorm import kernels
from batchnorm.config import BatchNormConfig
from batchnorm.kernels import cpu

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
RTOL = ATOL = 1e-5
RENORM_STATE = ("moving_stddev", "renorm_mean", "renorm_stddev")


def load(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = dict(np.load(path))
    return json.loads(str(data.pop("config"))), data


FIXTURES = sorted(GOLDEN.glob("*.npz"))


class StepAdjustment:
    """The fixture's adjustment: a fixed (scale, bias) per step, applied in training only."""

    def __init__(self, data: dict[str, np.ndarray]) -> None:
        self.data, self.step, self.calls = data, 0, 0

    def __call__(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return (torch.from_numpy(self.data[f"adjust_scale_{self.step}"]),
                torch.from_numpy(self.data[f"adjust_bias_{self.step}"]))


def build_layer(config: dict, data: dict[str, np.ndarray], fused: bool | None,
                explicit_variance: bool = False) -> bn.BatchNorm:
    """The fixture's layer, computing with our ``fused`` kernel choice. tf_keras's ``fused=False``
    is ``unbiased_moving_variance=False``; with its default the layer keeps our default (None),
    or with ``explicit_variance`` (and with our ``fused=False``, which as tf_keras's would
    mean the biased variance) gets the oracle's rule for the fixture spelled out, as the
    float64 shadow layer needs (the rule picks the biased variance in float64)."""
    axis = config["axis"]
    unbiased = None
    if config.get("fused", False) is False:
        unbiased = False
    elif explicit_variance or fused is False:
        unbiased = reference.tf_keras_unbiased(
            data["x_0"].ndim, axis, fused=config["fused"], renorm=config.get("renorm", False),
            virtual_batch_size=config.get("virtual_batch_size"),
            adjustment=bool(config.get("adjustment")))
    layer = bn.BatchNorm(
        data["moving_mean0"].shape,
        axis=tuple(axis) if isinstance(axis, list) else axis,
        momentum=config["momentum"],
        epsilon=config["epsilon"],
        center=config["center"],
        scale=config["scale"],
        renorm=config.get("renorm", False),
        renorm_clipping=config.get("renorm_clipping"),
        renorm_momentum=config.get("renorm_momentum", 0.99),
        virtual_batch_size=config.get("virtual_batch_size"),
        adjustment=StepAdjustment(data) if config.get("adjustment") else None,
        fused=fused,
        unbiased_moving_variance=unbiased,
    )
    with torch.no_grad():
        for name in ("moving_mean", "moving_variance", "gamma", "beta", *RENORM_STATE):
            if getattr(layer, name, None) is not None:
                getattr(layer, name).copy_(torch.from_numpy(data[f"{name}0"]))
    return layer


def run_step(layer: bn.BatchNorm, data: dict[str, np.ndarray], i: int,
             dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One fixture step through ``layer``; every compared value, by fixture key."""
    x = torch.from_numpy(data[f"x_{i}"]).to(dtype).requires_grad_()
    training = bool(data[f"training_{i}"])
    for param in (layer.gamma, layer.beta):
        if param is not None:
            param.grad = None
    for _ in range(int(data.get(f"repeat_{i}", 1)) - 1):
        layer(x.detach(), training=training)
    y = layer(x, training=training)
    y.backward(torch.from_numpy(data[f"dy_{i}"]).to(dtype))
    values = {f"y_{i}": y, f"dx_{i}": x.grad}
    if layer.gamma is not None:
        values[f"dgamma_{i}"] = layer.gamma.grad
    if layer.beta is not None:
        values[f"dbeta_{i}"] = layer.beta.grad
    for name in ("moving_mean", "moving_variance", *(RENORM_STATE if layer.renorm else ())):
        values[f"{name}_{i}"] = getattr(layer, name)
    return {key: value.detach().clone() for key, value in values.items()}


def check_step(layer: bn.BatchNorm, data: dict[str, np.ndarray], i: int,
               exact: bn.BatchNorm) -> None:
    """Compare one step with the fixture; ``exact`` is the float64 composite shadow layer."""
    actual = run_step(layer, data, i)
    reference = run_step(exact, data, i, torch.float64)
    training = bool(data[f"training_{i}"])
    for key, value in actual.items():
        expected = torch.from_numpy(data[key])
        message = f"step {i} ({'training' if training else 'inference'}), {key}"
        within = (value - expected).abs() <= ATOL + RTOL * expected.abs()
        # Ill-conditioned values: at least as close to the exact result as TensorFlow is.
        as_good = ((value.double() - reference[key]).abs()
                   <= (expected.double() - reference[key]).abs() + ATOL / 10)
        if not bool((within | as_good).all()):
            torch.testing.assert_close(value, expected, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, message=message: f"{message}: {m}")


@pytest.mark.parametrize("kernel", ["fused=None", "fused=False", "cpu"])
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_matches_tf_keras(path: Path, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config, data = load(path)
    if kernel == "cpu":
        if not cpu.available():
            pytest.skip(f"the CPU fast path is unavailable: {cpu.IMPORT_ERROR}")
        calls = []
        train = cpu.CPU.train
        monkeypatch.setattr(cpu.CPU, "train", lambda *a, **k: calls.append(1) or train(*a, **k))
    layer = build_layer(config, data, False if kernel == "fused=False" else None)
    exact = build_layer(config, data, False, explicit_variance=True).double()
    with kernels.prefer("cpu") if kernel == "cpu" else contextlib.nullcontext():
        for i in range(int(data["num_steps"])):
            if layer.adjustment is not None:
                layer.adjustment.step = exact.adjustment.step = i
            check_step(layer, data, i, exact)
    if kernel == "cpu":  # the fast path ran, unless it has no kernel for the configuration
        assert calls or config.get("adjustment") or isinstance(config["axis"], list)
    if layer.adjustment is not None:  # called once per training step, never in inference
        assert layer.adjustment.calls == sum(
            bool(data[f"training_{i}"]) for i in range(int(data["num_steps"])))


def test_fixtures_cover_every_configuration() -> None:
    configs = [load(p)[0] for p in FIXTURES]
    assert len(FIXTURES) >= 30
    assert {json.dumps(c["axis"]) for c in configs} >= {"-1", "0", "1", "[1, 3]"}
    assert {c["momentum"] for c in configs} >= {0.99, 0.9, 0.5}
    assert {c["epsilon"] for c in configs} >= {1e-3, 1e-5, 0.1}
    assert {(c["center"], c["scale"]) for c in configs} == {
        (True, True), (False, True), (True, False), (False, False)}
    assert any(c["renorm"] and c["renorm_clipping"] for c in configs)
    assert any(c["renorm"] and not c["renorm_clipping"] for c in configs)
    assert {c["virtual_batch_size"] for c in configs} >= {None, 2, 4}
    assert any(c["virtual_batch_size"] and c["renorm"] for c in configs)
    assert any(c["adjustment"] for c in configs)
    assert {c.get("fused", False) for c in configs} == {False, None}


def test_ghost_fixtures_include_inference_at_batch_size_one() -> None:
    ghost = [load(p)[1] for p in FIXTURES if load(p)[0]["virtual_batch_size"]]
    assert ghost and all(
        any(d[f"x_{i}"].shape[0] == 1 and not d[f"training_{i}"] for i in range(d["num_steps"]))
        for d in ghost)


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_the_layer_and_the_oracle_agree_on_when_tf_keras_fuses(ndim: int) -> None:
    # Two writings of tf_keras's rule (the config's and the oracle's), over every axis of
    # the rank, both signs, the options that turn fusing off, and the dtypes.
    options = [{}, {"fused": False}, {"fused": True}, {"renorm": True},
               {"virtual_batch_size": 2}, {"synchronized": True}]
    for axis in [*range(1, ndim), *range(-ndim, 0), [1, ndim - 1]]:
        if axis == [1, ndim - 1] and ndim == 2:
            continue
        for option in options:
            try:
                config = BatchNormConfig(axis=axis, **option)
            except ValueError:  # fused=True where tf_keras raises too (several axes, ...)
                continue
            for dtype, np_dtype in [(torch.float32, np.float32), (torch.float64, np.float64),
                                    (torch.float16, np.float16)]:
                want = reference.tf_keras_unbiased(ndim, axis, dtype=np_dtype, **option)
                got = config.for_input(ndim, dtype).unbiased_moving_variance
                assert got == want, (axis, option, dtype)


def test_deferred_updates_feed_the_variance_the_call_would() -> None:
    # A recorded call's statistics are applied later, without the input: with the rule
    # decided for that call's input (rank 4, one channel axis: the Bessel-corrected variance).
    x = torch.randn(4, 3, 3, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    now, later = bn.BatchNorm(5, axis=-1, momentum=0.5), bn.BatchNorm(5, axis=-1, momentum=0.5)
    now(x, training=True)
    with bn.deferred_updates() as updates:
        later(x, training=True)
        updates.apply()
    expected = 0.5 + 0.5 * x.double().var(dim=(0, 1, 2), unbiased=True)  # the derivation
    # float32 statistics of 36 values per feature: a few float32 ulps.
    torch.testing.assert_close(now.moving_variance.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(later.moving_variance.double(), expected, rtol=1e-6, atol=0)
