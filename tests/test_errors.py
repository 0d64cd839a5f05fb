"""Bad input gets a clear error and changes nothing; non-finite batches are skipped."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch.nn.parameter import is_lazy

import batchnorm as bn


def trained_layer(num_features=3, **kwargs) -> bn.BatchNorm:
    """A built layer (axis -1 or 1) whose state differs from its initial values (one update)."""
    kwargs.setdefault("axis", -1)
    layer = bn.BatchNorm(num_features, momentum=0.9, **kwargs)
    x = torch.randn(6, num_features, generator=torch.Generator().manual_seed(0)) * 2 + 1
    layer(x, training=True)
    return layer


def snapshot(layer: bn.BatchNorm) -> dict[str, torch.Tensor]:
    state = {name: p.detach().clone() for name, p in layer.named_parameters()}
    state.update({name: b.clone() for name, b in layer.named_buffers()})
    state["requires_grad"] = torch.tensor(
        [p.requires_grad for p in layer.parameters()], dtype=torch.bool)
    return state


def assert_unchanged(layer: bn.BatchNorm, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(layer)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), f"{name} changed"


def assert_still_lazy(layer: bn.BatchNorm) -> None:
    assert layer.num_features is None
    for param in (layer.gamma, layer.beta):
        assert param is None or is_lazy(param)
    for buffer in (layer.moving_mean, layer.moving_variance):
        assert buffer.numel() == 0  # placeholders until the layer is built
    assert layer.num_updates.item() == 0


# ---------------------------------------------------------------- input dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("training", [True, False])
def test_non_floating_input_raises_type_error_and_changes_nothing(dtype, training):
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3).to(dtype), training=training)
    assert_unchanged(layer, before)


def test_non_floating_input_does_not_materialize_a_lazy_layer():
    layer = bn.BatchNorm(axis=-1)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 3, dtype=torch.int64), training=True)
    assert_still_lazy(layer)


def test_non_tensor_input_raises_type_error():
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(TypeError):
        layer([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], training=True)
    assert_unchanged(layer, before)


# ---------------------------------------------------------------- feature size


@pytest.mark.parametrize("training", [True, False])
def test_feature_size_mismatch_names_expected_and_actual_shapes(training):
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(5, 4), training=training)
    message = str(info.value)
    assert "(3,)" in message and "(4,)" in message and "(5, 4)" in message
    assert "expected" in message
    assert_unchanged(layer, before)


def test_feature_size_mismatch_on_multi_axis_layer():
    layer = bn.BatchNorm((3, 2), axis=(1, 2))
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        layer(torch.randn(4, 3, 5), training=True)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("shape, axis", [((3, 0, 5), 1), ((4, 0), -1), ((2, 3, 0), (1, 2))])
@pytest.mark.parametrize("training", [True, False])
def test_a_zero_size_feature_axis_leaves_a_lazy_layer_unbuilt_with_a_value_error(
        shape, axis, training):
    layer = bn.BatchNorm(axis=axis)
    with pytest.raises(ValueError, match=re.escape(f"input of shape {shape}") + ".* size 0"):
        layer(torch.randn(shape), training=training)
    assert_still_lazy(layer)
    features = tuple(max(size, 2) for size in shape)  # the same layer builds from real features
    layer(torch.randn(features), training=training)
    axes = axis if isinstance(axis, tuple) else (axis,)
    assert layer.num_features == tuple(features[a] for a in axes)


# ---------------------------------------------------------------- single value per feature


@pytest.mark.parametrize("shape, axis", [((1, 3), -1), ((1, 3), 1), ((1, 3, 1, 1), 1)])
def test_training_with_one_value_per_feature_raises_value_error(shape, axis):
    layer = trained_layer(3, axis=axis)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="more than one value per feature"):
        layer(torch.randn(*shape), training=True)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("shape, axis", [((1, 3), -1), ((1, 3), 1)])
def test_training_with_one_value_per_feature_does_not_materialize_a_lazy_layer(shape, axis):
    layer = bn.BatchNorm(axis=axis)
    with pytest.raises(ValueError, match="variance"):
        layer(torch.randn(*shape), training=True)
    assert_still_lazy(layer)


def test_inference_with_one_value_per_feature_is_allowed():
    layer = trained_layer()
    before = snapshot(layer)
    assert layer(torch.randn(1, 3), training=False).shape == (1, 3)
    assert_unchanged(layer, before)


# ---------------------------------------------------------------- axis at call time


@pytest.mark.parametrize("axis", [2, 3, -3])
@pytest.mark.parametrize("training", [True, False])
def test_axis_out_of_range_for_input_rank_raises_at_call(axis, training):
    layer = bn.BatchNorm(3, axis=axis)
    layer.moving_mean.fill_(0.25)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="out of range"):
        layer(torch.randn(4, 3), training=training)
    assert_unchanged(layer, before)


def test_axis_out_of_range_does_not_materialize_a_lazy_layer():
    layer = bn.BatchNorm(axis=4)
    with pytest.raises(ValueError, match="out of range"):
        layer(torch.randn(4, 3, 2), training=True)
    assert_still_lazy(layer)


# ---------------------------------------------------------------- invalid construction


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_momentum_outside_unit_interval_is_rejected(momentum):
    with pytest.raises(ValueError, match="momentum"):
        bn.BatchNorm(3, momentum=momentum)


@pytest.mark.parametrize("epsilon", [0.0, -1e-3, math.nan])
def test_non_positive_or_nan_epsilon_is_rejected(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        bn.BatchNorm(3, epsilon=epsilon)


@pytest.mark.parametrize("axis", [(1, 1), (-1, -1), [2, 3, 2]])
def test_duplicate_axes_are_rejected(axis):
    with pytest.raises(ValueError, match="twice"):
        bn.BatchNorm(axis=axis)


# Mixed negative and non-negative axes are valid (as in tf_keras): test_bad_input.py.


@pytest.mark.parametrize("num_features, axis", [((3, 4), 1), (3, (1, 2)), ((3, 4, 5), (1, 2))])
def test_num_features_length_must_match_axis_count(num_features, axis):
    with pytest.raises(ValueError, match="num_features"):
        bn.BatchNorm(num_features, axis=axis)


@pytest.mark.parametrize("axis", [1.5, "1", None, True, (1, 2.0), ()])
def test_non_int_axis_is_rejected(axis):
    with pytest.raises((ValueError, TypeError), match="axis"):
        bn.BatchNorm(axis=axis)


@pytest.mark.parametrize("num_features", [0, -3, (3, 0), 2.5])
def test_non_positive_or_non_int_num_features_is_rejected(num_features):
    axis = (1, 2) if isinstance(num_features, tuple) else 1
    with pytest.raises((ValueError, TypeError), match="num_features"):
        bn.BatchNorm(num_features, axis=axis)


@pytest.mark.parametrize("name", ["gamma_initializer", "beta_initializer",
                                  "moving_mean_initializer", "moving_variance_initializer"])
@pytest.mark.parametrize("bad", ["he_normal", {"class_name": "RandomNormal", "config": {}},
                                 math.inf])
def test_unsupported_initializers_are_rejected_at_construction(name, bad):
    with pytest.raises(ValueError):
        bn.BatchNorm(3, **{name: bad})


def test_non_callable_regularizer_is_rejected_at_construction():
    with pytest.raises(TypeError, match="gamma_regularizer"):
        bn.BatchNorm(3, gamma_regularizer=0.01)


def test_from_config_with_unknown_key_raises_value_error():
    config = bn.BatchNorm(3).get_config()
    config["not_an_option"] = True
    with pytest.raises(ValueError, match="not_an_option"):
        bn.BatchNorm.from_config(config)


HUGE = 10**400  # an int beyond float's range: float(HUGE) raises OverflowError


@pytest.mark.parametrize("options, name", [
    ({"epsilon": HUGE}, "epsilon"),
    ({"epsilon": -10**5000}, "epsilon"),  # beyond the 4300 digits Python prints
    ({"momentum": HUGE}, "momentum"),
    ({"renorm": True, "renorm_momentum": -HUGE}, "renorm_momentum"),
    ({"renorm": True, "renorm_clipping": {"rmax": HUGE}}, "renorm_clipping['rmax']"),
    ({"renorm": True, "renorm_clipping": {"dmax": 10**5000}}, "renorm_clipping['dmax']"),
    ({"gamma_initializer": HUGE}, "gamma_initializer"),
    ({"moving_variance_initializer": {"class_name": "Constant", "config": {"value": HUGE}}},
     "moving_variance_initializer"),
])
def test_an_int_too_large_for_a_float_is_a_value_error_naming_the_option(options, name):
    with pytest.raises(ValueError, match=re.escape(name) + "=-?<an int of about 10\\*\\*"):
        bn.BatchNorm(4, **options)


@pytest.mark.parametrize("num_features", [HUGE, 2**62, (2**31, 2**31)],
                         ids=["10**400", "2**62", "2**31x2**31"])
def test_num_features_too_large_to_allocate_is_a_value_error_naming_it(num_features):
    axis = (1, 2) if isinstance(num_features, tuple) else 1
    with pytest.raises(ValueError, match=r"num_features=.+ is too large"):
        bn.BatchNorm(num_features, axis=axis)


@pytest.mark.parametrize("name, value, dtype", [
    ("gamma_initializer", 1e300, None),
    ("beta_initializer", -1e39, None),
    ("moving_mean_initializer", 1e300, None),  # float32 statistics
    ("gamma_initializer", 1e5, torch.float16),  # float16's largest is 65504
])
@pytest.mark.parametrize("lazy", [False, True])
def test_a_constant_initializer_beyond_the_dtype_is_refused_and_a_lazy_layer_stays_lazy(
        name, value, dtype, lazy):
    expected = "float32" if dtype is None or name.startswith("moving") else "float16"
    match = f"{name}={value!r} does not fit the {expected}"
    if not lazy:
        with pytest.raises(ValueError, match=re.escape(match)):
            bn.BatchNorm(4, dtype=dtype, **{name: value})
        return
    layer = bn.BatchNorm(axis=-1, dtype=dtype, **{name: value})
    with pytest.raises(ValueError, match=re.escape(match)):
        layer(torch.randn(3, 4, dtype=dtype), training=False)
    assert_still_lazy(layer)


def test_a_constant_initializer_that_fits_a_float64_layer_is_kept_exactly():
    layer = bn.BatchNorm(4, gamma_initializer=1e300, dtype=torch.float64)
    assert torch.equal(layer.gamma.detach(), torch.full((4,), 1e300, dtype=torch.float64))


def test_a_callable_initializer_returning_no_numbers_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="gamma_initializer returned NoneType"):
        bn.BatchNorm(4, gamma_initializer=lambda shape: None)


@pytest.mark.parametrize("inner", [3, [0.5], "0.5"])
def test_a_keras_initializer_whose_config_is_not_a_dict_is_a_value_error(inner):
    init = {"class_name": "Constant", "config": inner}
    with pytest.raises(ValueError, match="gamma_initializer: the Keras initializer"):
        bn.BatchNorm(4, gamma_initializer=init)


def test_renorm_clipping_with_keys_of_several_types_names_the_unknown_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['x', 1\]"):
        bn.BatchNorm(4, renorm=True, renorm_clipping={1: 2.0, "x": 3.0})


@pytest.mark.parametrize("config", [[("axis", 1)], None, "axis=1"])
def test_from_config_of_something_other_than_a_dict_is_a_type_error_naming_it(config):
    with pytest.raises(TypeError, match=f"from_config expects a dict.*got {type(config).__name__}"):
        bn.BatchNorm.from_config(config)


# ---------------------------------------------------------------- other raising calls


@pytest.mark.parametrize("training", ["yes", 1, 0.0])
def test_non_bool_training_argument_raises_type_error(training):
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(TypeError, match="training"):
        layer(torch.randn(4, 3), training=training)
    assert_unchanged(layer, before)


def test_non_bool_trainable_raises_type_error_and_changes_nothing():
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(TypeError, match="trainable"):
        layer.trainable = 0
    assert layer.trainable is True
    assert_unchanged(layer, before)


def test_constraint_returning_wrong_shape_raises_and_leaves_gamma_unchanged():
    layer = trained_layer(gamma_constraint=lambda g: g.sum())
    before = snapshot(layer)
    with pytest.raises(ValueError, match="gamma_constraint"):
        bn.apply_constraints(layer)
    assert_unchanged(layer, before)


def test_lazy_layer_with_wrong_shape_initializer_stays_lazy():
    layer = bn.BatchNorm(axis=-1, gamma_initializer=lambda shape: torch.ones(5))
    with pytest.raises(ValueError, match="gamma_initializer"):
        layer(torch.randn(4, 3), training=True)
    assert_still_lazy(layer)
    with pytest.raises(ValueError, match="gamma_initializer"):
        layer(torch.randn(4, 3), training=True)


# ---------------------------------------------------------------- non-finite batches


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_batch_leaves_moving_statistics_unchanged(bad):
    layer = trained_layer()
    before = snapshot(layer)
    x = torch.randn(6, 3)
    x[2, 1] = bad
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = layer(x, training=True)
    assert y.shape == x.shape
    assert layer.num_skipped.item() == 1  # the health counter records the skip
    layer.num_skipped.zero_()
    assert_unchanged(layer, before)
    assert layer.num_updates.item() == 1


@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"virtual_batch_size": 3}],
                         ids=["plain", "renorm", "ghost"])
def test_a_skipped_batch_is_reported_at_the_user_s_line(options):
    layer = bn.BatchNorm(3, axis=-1, **options)
    x = torch.randn(6, 3)
    x[2, 1] = math.nan
    for call in ("first", "planned", "masked"):  # the planned call: the second of a signature
        with pytest.warns(RuntimeWarning, match="not finite") as caught:
            if call == "masked":
                layer(x, training=True, mask=torch.ones(6, dtype=torch.bool))
            else:
                layer(x, training=True)
        assert [w.filename for w in caught] == [__file__], call
    _, stats = bn.functional.forward(x, layer.state(), layer.config, training=True)
    assert stats is not None
    with pytest.warns(RuntimeWarning, match="not finite") as caught:
        layer.update_statistics(stats)
    assert [w.filename for w in caught] == [__file__]


def test_non_finite_batch_still_produces_finite_output_for_finite_features():
    layer = trained_layer()
    x = torch.randn(6, 3)
    x[0, 1] = math.nan
    with pytest.warns(RuntimeWarning):
        y = layer(x, training=True)
    assert torch.isfinite(y[:, [0, 2]]).all()


def test_non_finite_batch_on_a_lazy_layer_builds_it_without_updating():
    layer = bn.BatchNorm(axis=-1, moving_mean_initializer=0.5)
    x = torch.randn(6, 3)
    x[0, 0] = math.inf
    with pytest.warns(RuntimeWarning):
        layer(x, training=True)
    assert layer.num_updates.item() == 0
    assert torch.equal(layer.moving_mean, torch.full((3,), 0.5))
    assert torch.equal(layer.moving_variance, torch.ones(3))


def test_finite_batch_after_a_non_finite_one_updates_again():
    layer = trained_layer()
    x = torch.randn(6, 3)
    x[0, 0] = math.nan
    with pytest.warns(RuntimeWarning):
        layer(x, training=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(torch.randn(6, 3), training=True)
    assert layer.num_updates.item() == 2
    assert torch.isfinite(layer.moving_mean).all() and torch.isfinite(layer.moving_variance).all()


def test_non_finite_input_in_inference_does_not_warn():
    layer = trained_layer()
    before = snapshot(layer)
    x = torch.randn(6, 3)
    x[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(x, training=False)
    assert math.isnan(y[0, 0].item()) and torch.isfinite(y[1:]).all()
    assert_unchanged(layer, before)
