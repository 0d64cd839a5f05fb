"""``batchnorm.keras.BatchNormalization``: tf_keras's layer for Keras 3 on the torch backend.

Conformance: the tf_keras fixtures of ``tests/fixtures/golden/`` (``tools/make_golden.py``)
and ``tests/fixtures/keras3_layer/`` (``tools/make_keras3_layer_fixtures.py``: masks, a
nested model and its ``.h5`` weights, ``model.fit`` of a small CNN), both written with
tensorflow-cpu 2.21.0 and tf-keras 2.21.0, run through the Keras 3 layer with the
tolerance of ``tests/test_conformance.py`` (rtol=atol=1e-5 in float32, with its fallback for
ill-conditioned values: at least as close to the float64 result as TensorFlow's own).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported
keras = pytest.importorskip("keras", minversion="3")
if keras.backend.backend() != "torch":
    pytest.skip(f"Keras runs the {keras.backend.backend()!r} backend, these tests need torch",
                allow_module_level=True)

import numpy as np  # noqa: E402
import test_conformance as golden  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_distributed import free_port, spawn_workers  # noqa: E402

from batchnorm.apps.bench_distributed import end_worker  # noqa: E402
from batchnorm.keras import BatchNormalization  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "keras3_layer"
MASKED = sorted(FIXTURES.glob("mask_*.npz"))
RTOL = ATOL = golden.RTOL  # the conformance tests' float32 tolerance (see their docstring)
pytestmark = [
    # Keras's own internals on NumPy 2 (its variables' and tensors' __array__), every call.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),  # small tensors (see conftest.one_thread)
]


# ---------------------------------------------------------------- conformance


def fixture_layer(config: dict, data: dict[str, np.ndarray]) -> BatchNormalization:
    """The fixture's layer as a Keras 3 layer, holding the fixture's initial values."""
    layer = BatchNormalization(
        axis=config["axis"], momentum=config["momentum"], epsilon=config["epsilon"],
        center=config["center"], scale=config["scale"], renorm=config.get("renorm", False),
        renorm_clipping=config.get("renorm_clipping"),
        renorm_momentum=config.get("renorm_momentum", 0.99),
        virtual_batch_size=config.get("virtual_batch_size"),
        adjustment=golden.StepAdjustment(data) if config.get("adjustment") else None,
        fused=config.get("fused", False))
    layer.build(data["x_0"].shape)
    for variable in layer.weights:
        variable.assign(data[f"{variable.name}0"].reshape(variable.shape))
    return layer


def keras_step(layer: BatchNormalization, data: dict[str, np.ndarray],
               i: int) -> dict[str, torch.Tensor]:
    """One fixture step through the Keras layer; every compared value, by fixture key."""
    x = torch.from_numpy(data[f"x_{i}"]).requires_grad_()
    training = bool(data[f"training_{i}"])
    mask = torch.from_numpy(data[f"mask_{i}"]) if f"mask_{i}" in data else None
    params = {name: v for name in ("gamma", "beta") if (v := getattr(layer, name)) is not None}
    for variable in params.values():
        variable.value.grad = None
    for _ in range(int(data.get(f"repeat_{i}", 1)) - 1):
        layer(x.detach(), training=training, mask=mask)
    y = layer(x, training=training, mask=mask)
    y.backward(torch.from_numpy(data[f"dy_{i}"]))
    shape = data["moving_mean0"].shape
    values = {f"y_{i}": y, f"dx_{i}": x.grad,
              **{f"d{name}_{i}": v.value.grad.reshape(shape) for name, v in params.items()}}
    for variable in layer.non_trainable_weights:
        values[f"{variable.name}_{i}"] = variable.value.reshape(shape)
    return {key: value.detach().clone() for key, value in values.items()}


def check_close(values: dict[str, torch.Tensor], data: dict[str, np.ndarray], what: str,
                exact: dict[str, torch.Tensor] | None = None) -> None:
    """Every value within RTOL/ATOL of the fixture's, or (given ``exact``, the float64
    result) at least as close to the exact value as TensorFlow's own."""
    for key, value in values.items():
        expected = torch.from_numpy(np.asarray(data[key], dtype=np.float32))
        within = (value - expected).abs() <= ATOL + RTOL * expected.abs()
        if exact is not None:
            within |= ((value.double() - exact[key]).abs()
                       <= (expected.double() - exact[key]).abs() + ATOL / 10)
        if not bool(within.all()):
            torch.testing.assert_close(value, expected, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, key=key: f"{what}, {key}: {m}")


@pytest.mark.parametrize("path", golden.FIXTURES, ids=[p.stem for p in golden.FIXTURES])
def test_matches_tf_keras_on_the_conformance_fixtures(path: Path) -> None:
    config, data = golden.load(path)
    layer = fixture_layer(config, data)
    exact = golden.build_layer(config, data, False, explicit_variance=True).double()
    for i in range(int(data["num_steps"])):
        if layer.config.adjustment is not None:
            layer.config.adjustment.step = exact.adjustment.step = i
        check_close(keras_step(layer, data, i), data, f"{path.stem} step {i}",
                    golden.run_step(exact, data, i, torch.float64))


@pytest.mark.parametrize("path", MASKED, ids=[p.stem for p in MASKED])
def test_masked_statistics_match_tf_keras(path: Path) -> None:
    # Well-conditioned (5 and more unmasked values per feature): the plain bound holds.
    config, data = golden.load(path)
    layer = fixture_layer(config, data)
    for i in range(int(data["num_steps"])):
        check_close(keras_step(layer, data, i), data, f"{path.stem} step {i}")


def test_keras_masking_selects_the_statistics() -> None:
    # A Masking layer's mask reaches the layer: time steps of zeros leave the statistics.
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0)) + 2
    x[:, 4:] = 0.0
    masked = keras.Sequential([keras.Input((6, 3)), keras.layers.Masking(0.0),
                               BatchNormalization(momentum=0.5)])
    masked(x, training=True)
    explicit = BatchNormalization(momentum=0.5)
    explicit(x, training=True, mask=torch.arange(6).expand(4, 6) < 4)
    for a, b in zip(masked.layers[-1].get_weights(), explicit.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the same computation: bit for bit
    expected = 0.5 * x[:, :4].double().mean(dim=(0, 1))  # 0.5 * 0 + 0.5 * unmasked mean
    # float32 statistics of 16 values: a few float32 ulps.
    torch.testing.assert_close(explicit.moving_mean.value.double(), expected, rtol=1e-6,
                               atol=1e-7)


def nested_model() -> keras.Model:
    """The fixture's nested tf_keras model, in Keras 3 with the layer (see the script)."""
    layers = keras.layers
    inner = keras.Sequential([layers.Conv2D(6, 3, padding="same"),
                              BatchNormalization(momentum=0.9), layers.ReLU()], name="inner")
    head_input = keras.Input((8, 8, 6))
    head = BatchNormalization(virtual_batch_size=2)(head_input)
    head = layers.Dense(3)(layers.GlobalAveragePooling2D()(head))
    head = keras.Model(head_input, head, name="head")
    inputs = keras.Input((8, 8, 3))
    x = BatchNormalization(renorm=True, renorm_momentum=0.9,
                           renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3})(
        inner(inputs))
    return keras.Model(inputs, head(x))


def listed(data: dict[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    return [data[f"{prefix}_{i}"] for i in range(sum(k.startswith(prefix) for k in data))]


def test_a_nested_model_takes_tf_keras_weights_and_matches_it() -> None:
    data = dict(np.load(FIXTURES / "nested.npz"))
    model = nested_model()
    model.set_weights(listed(data, "weights"))
    x = torch.from_numpy(data["x"])
    # Convolutions and a dense layer before and after the layers: their float32 rounding
    # differs between TensorFlow and torch by a few ulps of values ~10; the conformance bound.
    check_close({"y_train": model(x, training=True)}, data, "training")
    check_close({f"after_{i}": torch.from_numpy(w) for i, w in enumerate(model.get_weights())},
                data, "the weights after a training call")
    check_close({"y_infer": model(x, training=False)}, data, "inference")


def test_tf_keras_h5_weights_load_into_the_keras3_model() -> None:
    data = dict(np.load(FIXTURES / "nested.npz"))
    model = nested_model()
    model.load_weights(FIXTURES / "nested.h5")
    for got, want in zip(model.get_weights(), listed(data, "weights"), strict=True):
        np.testing.assert_array_equal(got, want)  # loading copies: bit for bit


def fit_model() -> keras.Model:
    layers = keras.layers
    return keras.Sequential([
        keras.Input((12, 12, 3)), layers.Conv2D(8, 3), BatchNormalization(), layers.ReLU(),
        layers.Conv2D(8, 3, strides=2), BatchNormalization(momentum=0.9), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(4)])


def test_model_fit_gives_tf_keras_moving_statistics() -> None:
    data = dict(np.load(FIXTURES / "fit.npz"))
    model = fit_model()
    model.set_weights(listed(data, "initial"))
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data["x"], data["labels"], batch_size=16, epochs=3, shuffle=False, verbose=0)
    # The conformance bound: 12 SGD steps carry each step's float32 rounding differences
    # (TensorFlow's and torch's convolutions reduce in other orders) into the next; they stay
    # a few ulps (measured: 2.4e-7 at most, on weights and moving statistics of magnitude ~1).
    for i, (got, want) in enumerate(zip(model.get_weights(), listed(data, "final"),
                                        strict=True)):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"weight {i}")
    np.testing.assert_allclose(model.predict(data["x"], verbose=0), data["predict"],
                               rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- Keras's conventions


def test_a_non_finite_batch_is_left_out_of_the_averages_with_a_warning() -> None:
    layer = BatchNormalization()
    x = torch.randn(8, 4)
    layer(x, training=True)
    before = [v.numpy().copy() for v in layer.non_trainable_weights]
    bad = x.clone()
    bad[0, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite .* moving averages were left unchanged"):
        layer(bad, training=True)
    for old, variable in zip(before, layer.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(variable.numpy(), old)


def test_trainable_false_means_inference_and_no_update() -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)) * 3 + 1
    layer = BatchNormalization(trainable=False)
    frozen = layer(x, training=True)
    torch.testing.assert_close(frozen, layer(x, training=False), rtol=0, atol=0)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3, np.float32))


def test_fit_trains_and_predict_infers() -> None:
    x = np.random.default_rng(2).normal(3.0, 2.0, (16, 4)).astype(np.float32)
    model = keras.Sequential([keras.Input((4,)), BatchNormalization(momentum=0.0)])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    before = model.predict(x, verbose=0)
    np.testing.assert_array_equal(before, model.layers[0](torch.from_numpy(x)).detach())
    model.fit(x, np.zeros_like(x), batch_size=16, epochs=1, verbose=0)
    # momentum 0: the moving mean is the one batch's mean (float32 over 16 values).
    np.testing.assert_allclose(model.layers[0].moving_mean.numpy(), x.mean(axis=0),
                               rtol=1e-6, atol=1e-6)


def test_gamma_regularizer_adds_keras_losses() -> None:
    layer = BatchNormalization(gamma_regularizer=keras.regularizers.L2(0.1),
                               gamma_initializer=keras.initializers.Constant(3.0))
    layer.build((None, 2))
    assert len(layer.losses) == 1
    # L2(0.1) of gamma = [3, 3]: 0.1 * (9 + 9), float32.
    torch.testing.assert_close(layer.losses[0], torch.tensor(0.1 * 18.0), rtol=1e-6, atol=0)


def test_debias_corrects_the_moving_averages_at_inference() -> None:
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3)) * 2 + 5
    layer = BatchNormalization(momentum=0.9, debias=True, center=False, scale=False)
    layer(x, training=True)
    # One update from (0, 1): the debiased averages are the batch's own statistics.
    mean, variance = x.double().mean(0), x.double().var(0, unbiased=False)
    expected = (x.double() - mean) / torch.sqrt(variance + 1e-3)
    # float32 statistics and output: rtol 1e-5.
    torch.testing.assert_close(layer(x, training=False).double(), expected, rtol=1e-5,
                               atol=1e-5)


def test_a_call_that_raises_changes_no_variable() -> None:
    layer = BatchNormalization(virtual_batch_size=4, renorm=True)
    layer(torch.randn(8, 3) * 2 + 1, training=True)
    before = layer.get_weights()
    with pytest.raises(ValueError, match="virtual_batch_size"):
        layer(torch.randn(6, 3), training=True)  # 4 does not divide a batch of 6
    for got, want in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_mixed_precision_keeps_float32_statistics() -> None:
    x = (torch.randn(16, 4, generator=torch.Generator().manual_seed(6)) * 3 + 1).half()
    mixed = BatchNormalization(dtype="mixed_float16")
    y = mixed(x, training=True)
    single = BatchNormalization()
    expected = single(x.float(), training=True)  # the same values, in float32 throughout
    assert y.dtype == torch.float16 and mixed.moving_mean.value.dtype == torch.float32
    # Statistics in float32 from the same float16 values: float32 ulps (rtol 1e-6).
    for got, want in zip(mixed.get_weights(), single.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # The output rounded to float16 once: half a float16 ulp (rtol 1e-3).
    torch.testing.assert_close(y.float(), expected.detach(), rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- serialization


def test_get_config_round_trips() -> None:
    layer = BatchNormalization(axis=[1, 3], momentum=0.9, renorm=True,
                               renorm_clipping={"rmax": 2.0}, virtual_batch_size=4,
                               fused=False, synchronized=True, debias=True,
                               gamma_regularizer="l2", beta_constraint="non_neg", name="bn")
    config = layer.get_config()
    assert BatchNormalization.from_config(config).get_config() == config


def test_adjustment_is_not_serialized() -> None:
    layer = BatchNormalization(adjustment=lambda shape: (1.0, 0.0))
    with pytest.raises(ValueError, match="adjustment"):
        layer.get_config()


def test_a_model_saves_to_keras_and_loads_with_equal_outputs(tmp_path: Path) -> None:
    inputs = keras.Input((6, 6, 4))
    x = BatchNormalization(virtual_batch_size=2, momentum=0.5)(inputs)
    x = BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5},
                           gamma_regularizer="l2")(x)
    model = keras.Model(inputs, BatchNormalization(axis=[1, 3], debias=True)(x))
    x = torch.randn(8, 6, 6, 4, generator=torch.Generator().manual_seed(4)) * 2 + 1
    model(x, training=True)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    for got, want in zip(loaded.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    for training in (False, True):  # the same computation on the same weights: bit for bit
        torch.testing.assert_close(loaded(x, training=training), model(x, training=training),
                                   rtol=0, atol=0)


# ---------------------------------------------------------------- backends and imports


def test_another_backend_raises_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(ValueError, match="'jax' backend.*KERAS_BACKEND=torch"):
        BatchNormalization()


def test_a_backend_that_fails_to_import_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keras installed, but not its backend's packages (jax, scipy for numpy, tensorflow).
    error = ModuleNotFoundError("No module named 'jax'", name="jax")
    monkeypatch.delitem(sys.modules, "batchnorm.keras")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    real_import = __import__

    def fail(name, *args, **kwargs):
        if name == "keras":
            raise error
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr("builtins.__import__", fail)
    with pytest.raises(ImportError, match="KERAS_BACKEND='jax'.*'jax'.*KERAS_BACKEND=torch"):
        importlib.import_module("batchnorm.keras")


def test_without_keras_the_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "keras", None)  # import keras raises ImportError
    monkeypatch.delitem(sys.modules, "batchnorm.keras")
    with pytest.raises(ImportError, match=r"batchnorm\[keras\]"):
        importlib.import_module("batchnorm.keras")


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
def test_importing_batchnorm_does_not_import_keras() -> None:
    code = "import sys, batchnorm, batchnorm.functional; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- synchronized


def _synchronized_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    x = global_batch()
    layer = BatchNormalization(synchronized=True, momentum=0.5)
    part = x.chunk(world)[rank].clone().requires_grad_()
    y = layer(part, training=True)
    y.backward(torch.ones_like(y).cumsum(0))
    torch.save({"y": y.detach(), "dx": part.grad,
                "weights": [torch.from_numpy(w) for w in layer.get_weights()]},
               Path(out_dir) / f"rank{rank}.pt")
    end_worker()


def global_batch() -> torch.Tensor:
    return torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(5)) * 2 + 1


@pytest.mark.slow
def test_synchronized_statistics_are_the_global_batch_statistics(tmp_path: Path) -> None:
    results, problem = spawn_workers(_synchronized_worker, (2, free_port(), str(tmp_path)), 2,
                                     tmp_path, 120.0)
    assert all(results), f"a process saved no results: {problem}"
    x = global_batch().requires_grad_()
    single = BatchNormalization(momentum=0.5)
    y = single(x, training=True)
    y.backward(torch.cat([torch.ones_like(y[:4]).cumsum(0)] * 2))
    # float32, one all-reduce of sums against one reduction: rtol 1e-5 (a few ulps).
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y.detach(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), x.grad, rtol=1e-5,
                               atol=1e-5)
    for result in results:
        for got, want in zip(result["weights"], single.get_weights(), strict=True):
            torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the benchmark


@pytest.mark.slow  # two small CNNs compiled and stepped: seconds
def test_the_benchmark_times_both_layers_in_each_row() -> None:
    from batchnorm.apps import bench_keras
    rows = bench_keras.measure(repeats=2, batch=4, size=8)
    assert [r["row"] for r in rows] == ["layer fwd+bwd 4x8x8x64", "small CNN fit step, batch 64"]
    for row in rows:
        for name in ("batchnorm", "keras"):
            assert 0 < row[name]["min"] <= row[name]["median"] <= row[name]["max"]
        assert row["speedup"] > 0
    assert len(bench_keras.table(rows).splitlines()) == 2 + len(rows)
