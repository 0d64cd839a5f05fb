"""Bad input and edge cases: each test names a behaviour that was once a defect.
Parameters and state are validated against the input; ``training`` is a bool; empty
batches; non-finite padding at masked-out positions; masks selecting a single value; huge
finite inputs; numeric limits at construction; mixed parameter/input dtypes; atomic
``load_state_dict``; an unbuilt lazy layer's ``state_dict`` and meta loads; ``adjustment``
broadcast as TensorFlow broadcasts it; axis lists mixing signs; and a property test of the
contract for bad input: a typed error naming the offending value, and every parameter and
buffer bit-identical afterwards.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parameter import is_lazy

import batchnorm as bn
from batchnorm import functional as F
from batchnorm import kernels

pytestmark = pytest.mark.usefixtures("one_thread")
# momentum=0.0 (the averages become the batch statistics) is what the tests marked with it
# check; the notice that it reads as PyTorch's momentum is not.
MOMENTUM_ZERO = pytest.mark.filterwarnings(
    "ignore:momentum=0.0 is TensorFlow's momentum here:UserWarning")

# Every training kernel, forced: prefer() for the three kernels, and fused=True (ATen's) and
# fused=False (the composite) as options.
KERNEL_CHOICES = [("composite", None), ("native", None), ("cpu", None), (None, True),
                  (None, False)]
KERNEL_IDS = ["prefer-composite", "prefer-native", "prefer-cpu", "fused-true", "fused-false"]


@contextmanager
def kernel(name: str | None):
    with kernels.prefer(name) if name is not None else nullcontext():
        yield


@contextmanager
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (copies; uninitialized parameters by their type)."""
    state: dict = {}
    for name, p in module.named_parameters():
        state[name] = "lazy" if is_lazy(p) else p.detach().clone()
    for name, b in module.named_buffers():
        if name.rpartition(".")[2] == "num_skipped":
            continue  # the health counter of skipped batches: counting a skip is its job
        state[name] = b.clone()
    return state


def assert_bit_identical(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after.keys() == before.keys()
    for name, value in before.items():
        if isinstance(value, str):
            assert after[name] == value, name
            continue
        assert after[name].dtype == value.dtype, name
        assert after[name].shape == value.shape, name
        assert after[name].device == value.device, name
        if value.is_meta:  # no values
            continue
        # Bit-identical: compare the bytes (NaN included), not the values.
        assert torch.equal(after[name].view(-1).view(torch.uint8),
                           value.view(-1).view(torch.uint8)), f"{name} changed"


def trained(num_features=4, **kwargs) -> bn.BatchNorm:
    """A built layer whose statistics differ from their initial values."""
    kwargs.setdefault("axis", -1)
    layer = bn.BatchNorm(num_features, momentum=0.9, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 1.5, generator=g)
        layer.beta.uniform_(-0.5, 0.5, generator=g)
    shape = (8, num_features) if layer.axis in (-1, 1) else None
    layer(torch.randn(shape, generator=g) * 2 + 1, training=True)
    return layer


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("prefer, fused", KERNEL_CHOICES, ids=KERNEL_IDS)
@pytest.mark.parametrize("bad", ["gamma_size", "beta_size", "gamma_int", "state_size",
                                 "state_int", "num_updates_float"])
def test_functional_api_validates_gamma_beta_and_state_before_any_kernel(prefer, fused, bad):
    x = torch.randn(8, 4)
    state = F.initial_state(4)
    gamma, beta = torch.ones(4), torch.zeros(4)
    if bad == "gamma_size":
        gamma, expected, error = torch.ones(2), "gamma", ValueError
    elif bad == "beta_size":
        beta, expected, error = torch.zeros(7), "beta", ValueError
    elif bad == "gamma_int":
        gamma, expected, error = torch.ones(4, dtype=torch.int64), "gamma", TypeError
    elif bad == "state_size":
        state = state._replace(moving_variance=torch.ones(3))
        expected, error = "state.moving_variance", ValueError
    elif bad == "state_int":
        state = state._replace(moving_mean=torch.zeros(4, dtype=torch.int32))
        expected, error = "state.moving_mean", TypeError
    else:
        state = state._replace(num_updates=torch.tensor(0.0))
        expected, error = "num_updates", TypeError
    saved = [None if t is None else t.clone() for t in (*state, gamma, beta)]
    with kernel(prefer), pytest.raises(error, match=expected):
        # fused=True used to read past the end of a 2-element gamma and return garbage.
        F.batch_norm(x, state, training=True, axis=-1, gamma=gamma, beta=beta, fused=fused)
    for old, new in zip(saved, (*state, gamma, beta), strict=True):
        assert old is None or torch.equal(old, new)


@pytest.mark.parametrize("training", [True, False])
def test_a_wrongly_sized_replacement_parameter_is_refused_naming_it(training):
    layer = trained()
    layer.gamma = nn.Parameter(torch.ones(2))
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"gamma has shape \(2,\).*feature shape \(4,\)"):
        layer(torch.randn(8, 4), training=training)
    assert_bit_identical(layer, before)


def test_gamma_on_another_device_is_refused_before_any_kernel():
    layer = trained()
    layer.beta = nn.Parameter(torch.zeros(4, device="meta"))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="beta is on meta but the input is on cpu"):
        layer(torch.randn(8, 4), training=True)
    assert_bit_identical(layer, before)


# ---------------------------------------------------------------- training is a bool


@pytest.mark.parametrize("training", ["False", "True", 0, 1, None, np.bool_(True)])
def test_functional_training_flag_must_be_a_bool(training):
    state = F.initial_state(4)
    with pytest.raises(TypeError, match="training must be True or False"):
        F.batch_norm(torch.randn(8, 4), state, training=training, axis=-1)
    assert int(state.num_updates) == 0  # "False" used to run a training step


# ---------------------------------------------------------------- empty batches


@pytest.mark.parametrize("prefer, fused", KERNEL_CHOICES, ids=KERNEL_IDS)
@pytest.mark.parametrize("shape, axis, extra", [
    ((0, 4), -1, {}),
    ((0, 4, 5), 1, {}),
    ((0, 5, 4), -1, {"virtual_batch_size": 2}),
    ((0, 4), -1, {"renorm": True}),
    ((0, 4, 5), 1, {"mask": True}),
], ids=["rank2", "rank3-axis1", "ghost", "renorm", "mask"])
def test_an_empty_batch_returns_an_empty_output_zero_gradients_and_no_update(
        prefer, fused, shape, axis, extra):
    extra = dict(extra)
    mask = torch.zeros(shape[0], shape[-1], dtype=torch.bool) if extra.pop("mask", False) \
        else None
    if fused and (extra or mask is not None):
        pytest.skip("fused=True has no kernel for renorm, ghost batches or masks")
    layer = trained(4, axis=axis, fused=fused, **extra) if axis == -1 else None
    if layer is None:
        layer = bn.BatchNorm(4, axis=1, momentum=0.9, fused=fused, **extra)
        layer(torch.randn(6, 4, 5) + 1, training=True)
    before = snapshot(layer)
    x = torch.randn(shape, requires_grad=True)
    with kernel(prefer), no_warnings():  # skipped silently: no warning for an empty batch
        y = layer(x, training=True, mask=mask)
        y.sum().backward()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert x.grad is not None and x.grad.shape == x.shape
    # Zero gradients (not None): an empty sum is exactly 0.
    assert torch.equal(layer.gamma.grad, torch.zeros(4))
    assert torch.equal(layer.beta.grad, torch.zeros(4))
    layer.gamma.grad = layer.beta.grad = None
    assert_bit_identical(layer, before)  # num_updates included


def test_an_empty_batch_leaves_the_functional_state_unchanged_and_builds_a_lazy_layer():
    state = F.initial_state(3)
    y, new_state = F.batch_norm(torch.randn(0, 3), state, training=True, axis=-1)
    assert y.shape == (0, 3)
    for old, new in zip(state, new_state, strict=True):
        assert old is None or torch.equal(old, new)
    lazy = bn.BatchNorm(axis=-1)
    with no_warnings():
        lazy(torch.randn(0, 3), training=True)
    assert lazy.num_features == (3,) and int(lazy.num_updates) == 0


# ---------------------------------------------------------------- masked-out padding


def padded_batch(pad: float, at_first_row: bool):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, 6, generator=g) * 2 + 5
    mask = torch.rand(12, 6, generator=g) > 0.4
    mask[1:3] = True  # every feature has values
    if at_first_row:
        mask[0] = False  # the CPU kernel's shift used to be this row's (padding) value
    x.permute(0, 2, 1)[~mask] = pad
    return x, mask


@pytest.mark.parametrize("prefer", ["composite", "cpu", "masked"])
@MOMENTUM_ZERO
@pytest.mark.parametrize("pad", [math.nan, math.inf, -math.inf, 1e30, -3e38])
@pytest.mark.parametrize("at_first_row", [True, False])
def test_non_finite_or_huge_padding_at_masked_out_positions_changes_nothing_selected(
        prefer, pad, at_first_row):
    x, mask = padded_batch(pad, at_first_row)
    selected = x.permute(0, 2, 1)[mask].double()  # (values, features)
    results = []
    for value in (pad, 0.0):
        xp = x.clone()
        xp.permute(0, 2, 1)[~mask] = value
        layer = bn.BatchNorm(4, axis=1, momentum=0.0)  # momentum 0: the batch statistics
        with kernels.prefer(prefer), no_warnings():
            y = layer(xp, training=True, mask=mask)
        out = y.permute(0, 2, 1)[mask]
        assert torch.isfinite(out).all()
        results.append((out, layer.moving_mean.clone(), layer.moving_variance.clone()))
    # The statistics are the selected values' (float32 statistics of float32 values:
    # rtol 1e-5 covers their rounding; the variance of values ~5 +- 2 is ~4).
    torch.testing.assert_close(results[0][1].double(), selected.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][2].double(), selected.var(0, unbiased=False),
                               rtol=1e-5, atol=1e-5)
    # ... and the padding value does not matter at all: same values summed in the same order.
    for padded, zeros in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(padded, zeros, rtol=0, atol=0)


@pytest.mark.parametrize("prefer", ["composite", "cpu", "masked"])
def test_huge_finite_padding_gives_finite_gradients_at_selected_positions(prefer):
    x, mask = padded_batch(1e30, at_first_row=True)
    x.requires_grad_()
    layer = bn.BatchNorm(4, axis=1)
    with kernels.prefer(prefer):
        y = layer(x, training=True, mask=mask)
    (y.permute(0, 2, 1)[mask] ** 2).sum().backward()
    assert torch.isfinite(x.grad.permute(0, 2, 1)[mask]).all()
    assert torch.isfinite(layer.gamma.grad).all() and torch.isfinite(layer.beta.grad).all()


def test_recalibrate_ignores_nan_padding_at_masked_out_positions():
    x, mask = padded_batch(math.nan, at_first_row=True)
    layer = bn.BatchNorm(4, axis=1)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = layer

        def forward(self, inputs):
            return self.bn(inputs[0], mask=inputs[1])

    with no_warnings():
        bn.recalibrate(Masked(), [((x, mask),)], progress=False)  # the input is (x, mask)
    selected = x.permute(0, 2, 1)[mask].double()
    # float64 accumulation, stored in float32: rtol 1e-6.
    torch.testing.assert_close(layer.moving_mean.double(), selected.mean(0), rtol=1e-6,
                               atol=1e-6)
    torch.testing.assert_close(layer.moving_variance.double(), selected.var(0, unbiased=False),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- degenerate masks


@pytest.mark.parametrize("prefer", ["composite", "cpu"])
def test_a_mask_selecting_one_value_normalizes_with_the_moving_statistics_and_skips_loudly(
        prefer):
    layer = trained()
    before = snapshot(layer)
    x = torch.randn(8, 4) * 3
    mask = torch.zeros(8, 4, dtype=torch.bool)
    mask[:, 1:] = True
    mask[5, 0] = True  # feature 0: one selected value, no variance
    with kernels.prefer(prefer), pytest.warns(RuntimeWarning, match="single value"):
        y = layer(x, training=True, mask=mask)
    assert_bit_identical(layer, before)  # the moving variance is not pulled toward 0
    expected = layer(x, training=False)[:, 0]  # feature 0: the moving statistics
    # Same formula in float32 on both paths: rtol 1e-6.
    torch.testing.assert_close(y[:, 0], expected, rtol=1e-6, atol=1e-6)
    assert y[:, 0].abs().max() < 100  # not scaled by 1 / sqrt(epsilon) ~ 31.6 per unit


@MOMENTUM_ZERO
@pytest.mark.parametrize("prefer", ["composite", "cpu"])
def test_a_ghost_batch_with_one_selected_value_is_left_out_silently(prefer):
    x = torch.randn(8, 3, 5) + 2
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[0::2] = False
    mask[0, 0] = True  # strided ghost batches of 4: group 0 is samples 0, 2, 4, 6
    layer = bn.BatchNorm(3, axis=1, momentum=0.0, virtual_batch_size=4)
    with kernels.prefer(prefer), no_warnings():
        layer(x, training=True, mask=mask)
    others = x[1::2].permute(0, 2, 1).reshape(-1, 3).double()  # group 1: samples 1, 3, 5, 7
    # The pooled statistics are group 1's alone (float32 statistics: rtol 1e-5).
    torch.testing.assert_close(layer.moving_mean.double(), others.mean(0), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(layer.moving_variance.double(),
                               others.var(0, unbiased=False), rtol=1e-5, atol=1e-5)


def test_recalibrate_keeps_the_statistics_of_a_feature_no_mask_selects():
    layer = trained(3, axis=1)
    old_mean, old_variance = layer.moving_mean.clone(), layer.moving_variance.clone()
    x = torch.randn(16, 3, 4)
    mask = torch.ones(16, 3, 4, dtype=torch.bool)
    mask[:, 2] = False  # feature 2 is never selected

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = layer

        def forward(self, inputs):
            return self.bn(inputs, mask=mask)

    report = bn.recalibrate(Masked(), [x], progress=False)
    assert torch.equal(layer.moving_mean[2], old_mean[2])  # not 0
    assert torch.equal(layer.moving_variance[2], old_variance[2])  # not 0
    assert report["bn"].kept == [(2,)]
    assert "feature(s) 2 had fewer than two selected values" in str(report)
    # float64 accumulation stored in float32: rtol 1e-6.
    torch.testing.assert_close(layer.moving_mean[:2].double(),
                               x[:, :2].double().mean((0, 2)), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- huge finite inputs


@pytest.mark.parametrize("prefer", ["composite", "native", "cpu"])
def test_a_float32_variance_overflow_is_named_as_such_not_as_nan_in_the_input(prefer):
    layer = trained()
    before = snapshot(layer)
    x = torch.randn(64, 4) * 1e30  # finite float32 values; their variance ~1e60 is not
    with kernels.prefer(prefer), pytest.warns(RuntimeWarning) as record:
        layer(x, training=True)
    message = str(record[0].message)
    assert "variance overflowed float32" in message and "NaN or Inf" not in message
    assert_bit_identical(layer, before)


@pytest.mark.parametrize("prefer", ["composite", "native", "cpu"])
@pytest.mark.parametrize("renorm", [False, True])
def test_a_float64_variance_that_does_not_fit_float32_buffers_skips_instead_of_writing_inf(
        prefer, renorm):
    layer = trained(renorm=renorm)
    before = snapshot(layer)
    x = torch.randn(64, 4, dtype=torch.float64) * 1e30
    with kernels.prefer(prefer), pytest.warns(RuntimeWarning,
                                              match="overflowed float32, the moving averages"):
        y = layer(x, training=True)
    assert_bit_identical(layer, before)  # moving_variance used to become inf
    if not renorm:  # the output itself is right: float64 statistics (rtol 1e-6: float32 gamma)
        x64 = x.double()
        expected = (x64 - x64.mean(0)) / torch.sqrt(x64.var(0, unbiased=False) + 1e-3)
        expected = expected * layer.gamma.double() + layer.beta.double()
        torch.testing.assert_close(y, expected.detach(), rtol=1e-6, atol=1e-6)


@MOMENTUM_ZERO
def test_a_float64_layer_keeps_a_variance_of_1e60():
    layer = bn.BatchNorm(4, axis=-1, momentum=0.0, dtype=torch.float64)
    x = torch.randn(64, 4, dtype=torch.float64) * 1e30
    with no_warnings():
        layer(x, training=True)
    # Float64 all along: rtol 1e-12.
    torch.testing.assert_close(layer.moving_variance, x.var(0, unbiased=False), rtol=1e-12,
                               atol=0)


# ---------------------------------------------------------------- numeric limits


@pytest.mark.parametrize("epsilon", [1e-300, 1e-40, 1e-45])
def test_an_epsilon_that_is_zero_in_float32_is_refused_at_construction(epsilon):
    with pytest.raises(ValueError, match=f"epsilon={epsilon!r} is too small for float32"):
        bn.BatchNorm(3, epsilon=epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        F.batch_norm(torch.randn(4, 3), F.initial_state(3), training=True, axis=-1,
                     epsilon=epsilon)


def test_an_epsilon_that_is_zero_in_a_float16_state_is_refused_at_the_call():
    layer = bn.BatchNorm(3, axis=-1, epsilon=1e-8).half()  # float16 buffers: 1e-8 rounds to 0
    before = snapshot(layer)
    with pytest.raises(ValueError, match="epsilon=1e-08 is too small for float16"):
        layer(torch.randn(4, 3).half(), training=False)
    assert_bit_identical(layer, before)


@pytest.mark.parametrize("init, match", [
    (-1.0, "moving_variance_initializer=-1.0"),
    (math.inf, "moving_variance_initializer=inf"),
    ({"class_name": "Constant", "config": {"value": -0.5}}, "moving_variance_initializer=-0.5"),
])
def test_a_negative_or_infinite_constant_variance_initializer_is_refused(init, match):
    with pytest.raises(ValueError, match=match):
        bn.BatchNorm(3, moving_variance_initializer=init)


@pytest.mark.parametrize("values, match", [
    ([1.0, -2.0, 1.0], r"returned -2\.0 at index \(1,\)"),
    ([1.0, 1.0, math.nan], r"returned nan at index \(2,\)"),
    ([1e300, 1.0, 1.0], r"returned inf at index \(0,\)"),  # does not fit float32
])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_callable_variance_initializer_with_bad_values_is_refused(values, match, lazy):
    def init(shape):
        return torch.tensor(values, dtype=torch.float64)

    if not lazy:
        with pytest.raises(ValueError, match="moving_variance_initializer " + match):
            bn.BatchNorm(3, moving_variance_initializer=init)
        return
    layer = bn.BatchNorm(axis=-1, moving_variance_initializer=init)
    with pytest.raises(ValueError, match="moving_variance_initializer " + match):
        layer(torch.randn(4, 3), training=True)
    assert layer.num_features is None  # still lazy


@pytest.mark.parametrize("fused", [1, 0, 1.0, "True", np.bool_(True)])
def test_fused_must_be_a_bool_or_none(fused):
    with pytest.raises(TypeError, match=f"fused must be None, True or False, got {fused!r}"):
        bn.BatchNorm(3, fused=fused)


@pytest.mark.parametrize("dtype", ["float32", np.float32, 32])
def test_dtype_must_be_a_torch_dtype(dtype):
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        bn.BatchNorm(3, dtype=dtype)


# ---------------------------------------------------------------- mixed dtypes


@pytest.mark.parametrize("prefer, fused", KERNEL_CHOICES, ids=KERNEL_IDS)
@pytest.mark.parametrize("layer_dtype, input_dtype", [
    (torch.float64, torch.float32), (torch.float32, torch.float64),
    (torch.float64, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("rows", [8, 40_000], ids=["small", "large"])
def test_mixed_parameter_and_input_dtypes_are_cast_on_every_kernel(
        prefer, fused, layer_dtype, input_dtype, rows):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(rows, 4, generator=g) * 2 + 1).to(input_dtype)
    mixed = bn.BatchNorm(4, axis=-1, momentum=0.5, fused=fused, dtype=layer_dtype)
    with torch.no_grad():
        mixed.gamma.uniform_(0.5, 1.5, generator=g)
        mixed.beta.uniform_(-0.5, 0.5, generator=g)
    same = bn.BatchNorm(4, axis=-1, momentum=0.5, fused=fused, dtype=input_dtype)
    same.load_state_dict(mixed.state_dict())  # the same values, in the input's dtype
    with kernel(prefer):
        y = mixed(x, training=True)
        y_same = same(x, training=True)
        assert y.dtype == input_dtype
        y.float().sum().backward()
        assert mixed.gamma.grad.dtype == layer_dtype
        inference = mixed(x, training=False)
        assert inference.dtype == input_dtype
    # The same computation but for the parameters' rounding to the other dtype: float16
    # gamma/beta and bfloat16 inputs carry ~3 significant digits (atol 2e-2), float32 ~7
    # (the output is O(1): atol 1e-5).
    low = torch.float16 in (layer_dtype, input_dtype) or input_dtype == torch.bfloat16
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if low else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.float(), y_same.float(), **tolerance)
    torch.testing.assert_close(mixed.moving_mean.double(), same.moving_mean.double(),
                               **tolerance)


# ---------------------------------------------------------------- atomic loads


@pytest.mark.parametrize("problem", ["missing", "shape", "dtype", "not_a_tensor",
                                     "unexpected"])
def test_a_failing_load_state_dict_changes_nothing(problem):
    layer = trained()
    before = snapshot(layer)
    source = {k: v + 1 if v.is_floating_point() else v + 5
              for k, v in trained().state_dict().items()}
    key = "moving_variance"
    if problem == "missing":
        del source[key]
    elif problem == "shape":
        source[key] = torch.ones(5)
    elif problem == "dtype":
        source[key] = torch.ones(4, dtype=torch.int64)
    elif problem == "not_a_tensor":
        source[key] = [1.0, 1.0, 1.0, 1.0]
    else:
        key = "moving_varience"
        source[key] = torch.ones(4)
    with pytest.raises(RuntimeError, match=key):
        layer.load_state_dict(source)
    # gamma, beta and moving_mean come before moving_variance: they used to be overwritten.
    assert_bit_identical(layer, before)


@pytest.mark.parametrize("key", ["moving_mean", "num_updates"])
@pytest.mark.parametrize("kind, match", [("meta", "meta tensor"), ("sparse", "dense tensor")])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_meta_or_sparse_value_is_refused_before_anything_is_loaded(key, kind, match, lazy):
    layer = bn.BatchNorm(axis=-1) if lazy else trained()
    before = snapshot(layer)
    source = {k: v + 1 if v.is_floating_point() else v + 5
              for k, v in trained().state_dict().items()}
    source[key] = source[key].to("meta") if kind == "meta" else source[key].to_sparse()
    with pytest.raises(RuntimeError, match=f"{key}: .*{match}"):
        layer.load_state_dict(source)
    # gamma and beta come before moving_mean, moving_variance before num_updates: all kept.
    assert_bit_identical(layer, before)


def test_meta_values_load_into_a_meta_layer_and_with_assign():
    source = {k: v.to("meta") for k, v in trained().state_dict().items()}
    with torch.device("meta"):
        meta_layer = bn.BatchNorm(4, axis=-1)
    meta_layer.load_state_dict(source)
    real_layer = bn.BatchNorm(4, axis=-1)
    real_layer.load_state_dict(source, assign=True)
    assert all(t.is_meta for t in [*meta_layer.state_dict().values(),
                                   *real_layer.state_dict().values()])


def test_a_failing_load_leaves_a_lazy_layer_unbuilt_and_a_valid_one_builds_it():
    source = trained().state_dict()
    broken = dict(source)
    del broken["beta"]
    layer = bn.BatchNorm(axis=-1)
    with pytest.raises(RuntimeError, match="beta"):
        layer.load_state_dict(broken)
    assert layer.num_features is None and is_lazy(layer.gamma)
    layer.load_state_dict(source)
    assert layer.num_features == (4,) and torch.equal(layer.gamma, source["gamma"])


def test_inside_a_model_the_failing_batch_norm_is_untouched_and_non_strict_loads_the_rest():
    model = nn.Sequential(nn.Linear(4, 4), trained())
    before = snapshot(model[1])
    source = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    source["1.moving_mean"] = torch.ones(3)
    with pytest.raises(RuntimeError, match="1.moving_mean"):
        model.load_state_dict(source)
    assert_bit_identical(model[1], before)
    # strict=False asks for a partial load: the keys present are loaded.
    partial = {k: v for k, v in source.items() if k in ("1.gamma", "1.beta")}
    model.load_state_dict(partial, strict=False)
    assert torch.equal(model[1].gamma, partial["1.gamma"])
    assert torch.equal(model[1].moving_mean, before["moving_mean"])


# ---------------------------------------------------------------- lazy and meta


def test_an_unbuilt_lazy_layer_has_a_state_dict_that_saves_and_loads():
    model = nn.Sequential(nn.Linear(3, 4), bn.BatchNorm(axis=-1))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # used to raise: uninitialized parameter
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["1.gamma"].shape == (0,) and saved["1.moving_mean"].shape == (0,)
    fresh = nn.Sequential(nn.Linear(3, 4), bn.BatchNorm(axis=-1))
    fresh.load_state_dict(saved)
    assert fresh[1].num_features is None  # still unbuilt: nothing to load
    fresh.train()(torch.randn(8, 3))  # ... and it builds at its first call
    assert fresh[1].num_features == (4,)
    built = trained()
    before = snapshot(built)
    with pytest.raises(RuntimeError, match="lazy layer that was never built"):
        built.load_state_dict({k.removeprefix("1."): v for k, v in saved.items()
                               if k.startswith("1.")})
    assert_bit_identical(built, before)


@pytest.mark.parametrize("lazy", [False, True])
def test_loading_with_assign_from_the_meta_device_makes_num_updates_real(lazy):
    source = trained().state_dict()
    del source["num_updates"]  # e.g. converted from another framework
    with torch.device("meta"):
        layer = bn.BatchNorm(None if lazy else 4, axis=-1)
    layer.load_state_dict(source, strict=False, assign=True)
    assert not layer.num_updates.is_meta  # as torch does for num_batches_tracked
    assert int(layer.num_updates) == 0
    assert all(not t.is_meta for t in layer.state_dict().values())


# ---------------------------------------------------------------- adjustment


def test_adjustment_results_broadcast_by_numpy_rules_like_tensorflow():
    scale = torch.tensor([0.5, 2.0, 1.5])
    bias = torch.tensor([0.1, -0.2, 0.3])
    x = torch.randn(4, 3, 5, 6)
    outputs = []
    for shape in ((3, 1, 1), (1, 3, 1, 1), (3,)):  # TensorFlow's (C, 1, 1); the feature shape
        layer = bn.BatchNorm(3, axis=1, adjustment=lambda s, shape=shape: (
            scale.reshape(shape), bias.reshape(shape)))
        outputs.append(layer(x, training=True))  # (3, 1, 1) used to raise
    # Identical terms, identical operations: exact.
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)


def test_a_feature_shaped_adjustment_that_numpy_aligns_elsewhere_follows_tensorflow():
    # axis=1 of (N, C, L) with L == C: TensorFlow aligns a (C,) result with the last axis.
    scale = torch.tensor([0.5, 2.0, 1.5])
    x = torch.randn(4, 3, 3)
    layer = bn.BatchNorm(3, axis=1, adjustment=lambda s: (scale, torch.zeros(())))
    tf_like = bn.BatchNorm(3, axis=1, adjustment=lambda s: (scale.reshape(1, 1, 3),
                                                             torch.zeros(())))
    torch.testing.assert_close(layer(x, training=True), tf_like(x, training=True), rtol=0,
                               atol=0)


def test_an_adjustment_that_does_not_broadcast_is_refused_with_the_shape_to_return():
    layer = bn.BatchNorm(3, axis=1, adjustment=lambda s: (torch.ones(2, 1), torch.zeros(())))
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"scale of shape \(2, 1\).*e\.g\. shape \(1, 3, 1\)"):
        layer(torch.randn(4, 3, 5), training=True)
    assert_bit_identical(layer, before)


# ---------------------------------------------------------------- mixed-sign axes


def test_an_axis_list_mixing_signs_is_resolved_at_the_first_call():
    layer = bn.BatchNorm(axis=[1, -1])  # used to be refused at construction
    reference = bn.BatchNorm(axis=(1, 2))
    x = torch.randn(6, 3, 4)
    # Same axes, same operations: exact.
    torch.testing.assert_close(layer(x, training=True), reference(x, training=True), rtol=0,
                               atol=0)
    assert layer.num_features == (3, 4) and layer.get_config()["axis"] == [1, -1]
    assert bn.BatchNorm.from_config(layer.get_config()).axis == (1, -1)


def test_an_axis_list_naming_one_axis_twice_at_the_input_rank_is_the_error():
    layer = bn.BatchNorm(axis=[1, -1])
    with pytest.raises(ValueError, match=r"axis \(1, -1\) names the same axis twice for an "
                                         "input of rank 2"):
        layer(torch.randn(6, 3), training=True)
    assert layer.num_features is None


# ---------------------------------------------------------------- the contract, by property

# Each builder draws one bad call: (call(layer, state), exception type, text the message must
# contain to name the offending value). The layer is built with 4 features on axis -1.
X = torch.randn(8, 4)
NON_FLOATING = [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool,
                torch.complex64]
OWN_KEYS = ["gamma", "beta", "moving_mean", "moving_variance", "num_updates"]


def _sizes(exclude: int):
    return st.integers(1, 9).filter(lambda n: n != exclude)


def _bad_input(data):
    kind = data.draw(st.sampled_from(["features", "dtype", "type", "one value", "rank"]))
    training = data.draw(st.booleans())
    if kind == "features":
        x = torch.randn(data.draw(st.integers(2, 6)), data.draw(_sizes(4)))
        return lambda layer, state: layer(x, training=training), ValueError, str(tuple(x.shape))
    if kind == "dtype":
        dtype = data.draw(st.sampled_from(NON_FLOATING))
        x = torch.ones(8, 4).to(dtype)
        return lambda layer, state: layer(x, training=training), TypeError, str(dtype)
    if kind == "type":
        value = data.draw(st.sampled_from([[[1.0] * 4] * 8, 3.0, np.ones((8, 4)), None]))
        return (lambda layer, state: layer(value, training=training), TypeError,
                type(value).__name__)
    if kind == "one value":
        x = torch.randn(1, 4) if data.draw(st.booleans()) else torch.randn(1, 1, 4)
        return lambda layer, state: layer(x, training=True), ValueError, str(tuple(x.shape))
    x = torch.randn(8)  # rank 1: axis -1 is the batch axis; fine, but 8 features, not 4
    return lambda layer, state: layer(x, training=training), ValueError, "(8,)"


def _bad_training(data):
    value = data.draw(st.sampled_from(["False", "True", 0, 1, 1.0, np.bool_(False), "no"]))
    if data.draw(st.booleans()):
        return lambda layer, state: layer(X, training=value), TypeError, repr(value)
    return (lambda layer, state: F.batch_norm(X, state, training=value, axis=-1), TypeError,
            repr(value))


def _bad_mask(data):
    if data.draw(st.booleans()):
        dtype = data.draw(st.sampled_from([torch.float32, torch.int64, torch.uint8]))
        mask = torch.ones(8).to(dtype)
        return (lambda layer, state: layer(X, training=True, mask=mask), TypeError,
                str(dtype))
    shape = data.draw(st.sampled_from([(3,), (7,), (8, 5), (2, 8, 4), (4, 3)]))
    mask = torch.ones(shape, dtype=torch.bool)
    return (lambda layer, state: layer(X, training=True, mask=mask), ValueError,
            str(tuple(shape)))


def _bad_tensor(data):
    name = data.draw(st.sampled_from(["gamma", "beta", "state.moving_mean",
                                      "state.moving_variance"]))
    if data.draw(st.booleans()):
        bad, error = torch.ones(data.draw(_sizes(4))), ValueError
    else:
        bad, error = torch.ones(4, dtype=data.draw(st.sampled_from(NON_FLOATING))), TypeError
    training = data.draw(st.booleans())

    def call(layer, state):
        if name.startswith("state."):
            state = state._replace(**{name[6:]: bad})
            return F.batch_norm(X, state, training=training, axis=-1)
        return F.batch_norm(X, state, training=training, axis=-1, **{name: bad})
    return call, error, name


def _bad_option(data):
    name = data.draw(st.sampled_from(["momentum", "epsilon", "fused", "virtual_batch_size",
                                      "renorm_momentum", "axis"]))
    value = data.draw({
        "momentum": st.one_of(st.floats(1.0, 1e6), st.floats(-1e6, -1e-6)),
        "renorm_momentum": st.floats(1.0, 10.0),
        "epsilon": st.one_of(st.floats(0.0, 1e-39), st.floats(-1.0, 0.0)),
        "fused": st.sampled_from([1, 0, 1.0, "yes"]),
        "virtual_batch_size": st.sampled_from([3, 5, 7, 0, -2]),
        "axis": st.sampled_from([2, -3, 5]),
    }[name])
    error = TypeError if name == "fused" else ValueError
    named = {"fused": f"fused must be None, True or False, got {value!r}",
             "axis": f"axis {value}"}.get(name, f"{name}={value!r}")
    # A positive virtual_batch_size is a valid option, refused at the call (8 % 3 != 0).
    valid_option = name == "axis" or (name == "virtual_batch_size" and value > 0)
    if data.draw(st.booleans()) and not valid_option:
        return lambda layer, state: layer.reconfigure(**{name: value}), error, named
    return (lambda layer, state: F.batch_norm(X, state, training=True,
                                              **{"axis": -1, name: value}), error, named)


def _bad_state_dict(data):
    key = data.draw(st.sampled_from(OWN_KEYS))
    how = data.draw(st.sampled_from(["delete", "size", "dtype", "list", "extra", "meta",
                                     "sparse"]))
    size = data.draw(_sizes(4))

    def mutate(source):
        if how == "delete":
            del source[key]
        elif how == "size":
            source[key] = torch.ones(size) if key != "num_updates" else torch.ones(size)
        elif how == "dtype":
            source[key] = torch.ones(4, dtype=torch.bool) if key != "num_updates" \
                else torch.tensor(1.5)
        elif how == "list":
            source[key] = [1.0] * 4
        elif how == "meta":
            source[key] = source[key].to("meta")
        elif how == "sparse":
            source[key] = source[key].to_sparse()
        else:
            source[key + "_extra"] = torch.ones(4)
        return source

    def call(layer, state):
        source = {k: v + 1 if v.is_floating_point() else v + 3
                  for k, v in layer.state_dict().items()}
        layer.load_state_dict(mutate(source))
    return call, RuntimeError, key


BUILDERS = [_bad_input, _bad_training, _bad_mask, _bad_tensor, _bad_option, _bad_state_dict]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(),
       builder=st.sampled_from(BUILDERS),
       options=st.fixed_dictionaries({
           "renorm": st.booleans(), "debias": st.booleans(),
           "unbiased_moving_variance": st.booleans(),
           "fused": st.sampled_from([None, False])}),
       prefer=st.sampled_from([None, "composite", "native", "cpu"]))
def test_bad_input_gets_a_typed_error_naming_it_and_changes_nothing(data, builder, options,
                                                                   prefer):
    call, error, named = builder(data)
    layer = trained(**options)
    state = F.initial_state(4)
    state_before = [None if t is None else t.clone() for t in state]
    before = snapshot(layer)
    config_before = layer.config
    # Load errors are torch's RuntimeError (load_state_dict raises them after visiting every
    # module); everything else is a TypeError or a ValueError.
    with kernel(prefer), pytest.raises(error) as raised:
        call(layer, state)
    assert named in str(raised.value), (builder.__name__, named, str(raised.value))
    assert_bit_identical(layer, before)
    assert layer.config is config_before
    for old, new in zip(state_before, state, strict=True):
        assert old is None or torch.equal(old, new)
