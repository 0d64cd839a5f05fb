"""Specification of ``batchnorm.BatchNorm``: state, modes, trainable, initializers,
regularizers, constraints, debias, config/state round trips and the seed article's numbers."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import batchnorm as bn

SEED_X = torch.tensor([[-10.0], [0.0], [10.0]])
PROBE = torch.tensor([[-10.0]])


def tf_default_layer(**kwargs) -> bn.BatchNorm:
    """TensorFlow's defaults (momentum 0.99, epsilon 1e-3), channels-last."""
    return bn.BatchNorm(1, axis=-1, **kwargs)


def manual_stats(x: torch.Tensor, reduce_dims) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.double()
    mean = x64.mean(dim=reduce_dims)
    var = x64.var(dim=reduce_dims, correction=0)
    return mean, var


# ---------------------------------------------------------------- state and shapes


def test_state_dict_keys_are_gamma_beta_and_moving_statistics():
    layer = bn.BatchNorm(3)
    assert set(layer.state_dict()) == {
        "gamma", "beta", "moving_mean", "moving_variance", "num_updates"}


def test_debias_adds_initial_moving_statistics_to_state_dict():
    layer = bn.BatchNorm(3, debias=True)
    assert set(layer.state_dict()) == {
        "gamma", "beta", "moving_mean", "moving_variance", "num_updates",
        "initial_moving_mean", "initial_moving_variance"}


def test_gamma_and_beta_are_parameters_and_statistics_are_buffers():
    layer = bn.BatchNorm(3)
    assert {name for name, _ in layer.named_parameters()} == {"gamma", "beta"}
    # num_skipped, the health counter of skipped batches, is a buffer (it follows .to())
    # but not state: it is not in the state dict.
    assert {name for name, _ in layer.named_buffers()} == {
        "moving_mean", "moving_variance", "num_updates", "num_skipped"}
    assert layer.num_updates.dtype == torch.int64 and layer.num_updates.item() == 0
    assert "num_skipped" not in layer.state_dict()


@pytest.mark.parametrize("center, scale", [(False, True), (True, False), (False, False)])
def test_center_and_scale_false_make_beta_and_gamma_none(center, scale):
    layer = bn.BatchNorm(3, center=center, scale=scale)
    assert (layer.beta is None) == (not center)
    assert (layer.gamma is None) == (not scale)
    expected = {"moving_mean", "moving_variance", "num_updates"}
    expected |= {"beta"} if center else set()
    expected |= {"gamma"} if scale else set()
    assert set(layer.state_dict()) == expected


def test_center_and_scale_false_output_is_plain_normalization():
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * 3 + 2
    layer = bn.BatchNorm(3, axis=-1, center=False, scale=False,
                         beta_initializer=5.0, gamma_initializer=7.0)
    y = layer(x, training=True)
    mean, var = manual_stats(x, [0])
    expected = (x.double() - mean) / torch.sqrt(var + 1e-3)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_num_features_int_gives_one_feature_axis():
    assert bn.BatchNorm(3).num_features == (3,)
    assert bn.BatchNorm(3).moving_mean.shape == (3,)


def test_num_features_tuple_with_axis_sequence():
    layer = bn.BatchNorm((3, 5), axis=(1, 2))
    assert layer.num_features == (3, 5)
    assert layer.gamma.shape == (3, 5)
    assert layer(torch.randn(4, 3, 5, 2), training=True).shape == (4, 3, 5, 2)


def test_lazy_layer_infers_num_features_at_first_call():
    layer = bn.BatchNorm(axis=-1)
    assert layer.num_features is None
    assert is_lazy(layer.gamma) and layer.moving_mean.numel() == 0
    layer(torch.randn(4, 2, 7), training=True)
    assert layer.num_features == (7,)
    assert layer.gamma.shape == (7,) and layer.moving_variance.shape == (7,)
    assert layer.num_updates.item() == 1


def test_lazy_layer_is_initialized_from_its_initializers():
    layer = bn.BatchNorm(axis=1, gamma_initializer=2.0, beta_initializer=-1.0,
                         moving_mean_initializer=0.5, moving_variance_initializer=3.0)
    layer(torch.randn(2, 4), training=False)
    assert torch.equal(layer.gamma.detach(), torch.full((4,), 2.0))
    assert torch.equal(layer.beta.detach(), torch.full((4,), -1.0))
    assert torch.equal(layer.moving_mean, torch.full((4,), 0.5))
    assert torch.equal(layer.moving_variance, torch.full((4,), 3.0))


def test_negative_axis_equals_its_positive_counterpart():
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(1))
    neg, pos = bn.BatchNorm(6, axis=-1), bn.BatchNorm(6, axis=3)
    assert torch.equal(neg(x, training=True), pos(x, training=True))
    assert torch.equal(neg.moving_variance, pos.moving_variance)


def test_negative_axis_sequence_equals_its_positive_counterpart():
    x = torch.randn(4, 3, 5, 2, generator=torch.Generator().manual_seed(19))
    neg, pos = bn.BatchNorm((3, 2), axis=(-3, -1)), bn.BatchNorm((3, 2), axis=(1, 3))
    assert torch.equal(neg(x, training=True), pos(x, training=True))
    assert torch.equal(neg.moving_mean, pos.moving_mean)


def test_multiple_feature_axes_reduce_over_the_others():
    x = torch.randn(4, 3, 5, 2, generator=torch.Generator().manual_seed(2)) * 2 + 1
    layer = bn.BatchNorm((3, 2), axis=(1, 3), momentum=0.5)
    y = layer(x, training=True)
    mean, var = manual_stats(x, [0, 2])
    expected = (x.double() - mean[None, :, None, :]) / torch.sqrt(var[None, :, None, :] + 1e-3)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.moving_mean.double(), 0.5 * mean, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- training and inference


def test_training_normalizes_with_batch_mean_and_biased_variance():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 4, generator=g) * 3 + 5
    layer = bn.BatchNorm(4, axis=-1, gamma_initializer=lambda s: torch.arange(1.0, 5.0),
                         beta_initializer=0.25)
    y = layer(x, training=True)
    mean, var = manual_stats(x, [0])
    expected = torch.arange(1.0, 5.0).double() * (x.double() - mean) / torch.sqrt(var + 1e-3) + 0.25
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_training_updates_moving_averages_with_biased_variance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 4, generator=g) * 3 + 5
    layer = bn.BatchNorm(4, axis=-1, momentum=0.9)
    layer(x, training=True)
    mean, var = manual_stats(x, [0])
    torch.testing.assert_close(layer.moving_mean.double(), 0.9 * 0.0 + 0.1 * mean)
    torch.testing.assert_close(layer.moving_variance.double(), 0.9 * 1.0 + 0.1 * var)
    assert layer.num_updates.item() == 1


def test_unbiased_moving_variance_only_changes_the_moving_average():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g) * 2
    biased = bn.BatchNorm(4, axis=-1, momentum=0.9)
    unbiased = bn.BatchNorm(4, axis=-1, momentum=0.9, unbiased_moving_variance=True)
    y_biased, y_unbiased = biased(x, training=True), unbiased(x, training=True)
    assert torch.equal(y_biased, y_unbiased)
    _, var = manual_stats(x, [0])
    torch.testing.assert_close(unbiased.moving_variance.double(), 0.9 + 0.1 * var * 6 / 5)
    torch.testing.assert_close(biased.moving_variance.double(), 0.9 + 0.1 * var)


def test_momentum_zero_replaces_moving_averages_with_batch_statistics():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning, match="momentum=0.0 is TensorFlow's"):  # meant here
        layer = bn.BatchNorm(3, axis=-1, momentum=0.0)
    layer(x, training=True)
    mean, var = manual_stats(x, [0])
    torch.testing.assert_close(layer.moving_mean.double(), mean)
    torch.testing.assert_close(layer.moving_variance.double(), var)


def test_inference_normalizes_with_moving_statistics():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(7))
    layer = bn.BatchNorm(2, axis=-1, moving_mean_initializer=1.5, moving_variance_initializer=4.0)
    y = layer(x, training=False)
    torch.testing.assert_close(y, (x - 1.5) / torch.sqrt(torch.tensor(4.0 + 1e-3)))
    assert layer.num_updates.item() == 0
    assert torch.equal(layer.moving_mean, torch.full((2,), 1.5))


def test_training_none_follows_train_mode():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(8)) * 4
    layer = bn.BatchNorm(3, axis=-1).train()
    expected = bn.BatchNorm(3, axis=-1)(x, training=True)
    assert torch.equal(layer(x), expected)
    assert layer.num_updates.item() == 1


def test_training_none_follows_eval_mode():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(9)) * 4
    layer = bn.BatchNorm(3, axis=-1).eval()
    expected = bn.BatchNorm(3, axis=-1)(x, training=False)
    assert torch.equal(layer(x), expected)
    assert layer.num_updates.item() == 0


def test_training_true_overrides_eval_mode():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(10)) * 4
    layer = bn.BatchNorm(3, axis=-1).eval()
    assert torch.equal(layer(x, training=True), bn.BatchNorm(3, axis=-1)(x, training=True))
    assert layer.num_updates.item() == 1
    assert not layer.training


def test_training_false_overrides_train_mode():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(11)) * 4
    layer = bn.BatchNorm(3, axis=-1).train()
    assert torch.equal(layer(x, training=False), bn.BatchNorm(3, axis=-1)(x, training=False))
    assert layer.num_updates.item() == 0


def test_gradients_flow_to_input_gamma_and_beta():
    x = torch.randn(8, 3, requires_grad=True)
    layer = bn.BatchNorm(3, axis=-1)
    (layer(x, training=True) * torch.arange(3.0)).sum().backward()
    assert x.grad is not None and layer.gamma.grad is not None and layer.beta.grad is not None
    torch.testing.assert_close(layer.beta.grad, torch.arange(3.0) * 8)


# ---------------------------------------------------------------- the seed article's numbers


@pytest.mark.parametrize("lazy", [False, True], ids=["built", "lazy"])
def test_seed_inference_before_training(lazy):
    layer = bn.BatchNorm(axis=-1) if lazy else tf_default_layer()
    y = layer(SEED_X, training=False).flatten()
    torch.testing.assert_close(y, torch.tensor([-9.995004, 0.0, 9.995004]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lazy", [False, True], ids=["built", "lazy"])
def test_seed_training_output(lazy):
    layer = bn.BatchNorm(axis=-1) if lazy else tf_default_layer()
    y = layer(SEED_X, training=True).flatten()
    torch.testing.assert_close(y, torch.tensor([-1.2247357, 0.0, 1.2247357]), rtol=1e-5, atol=1e-6)


def test_seed_inference_after_one_training_step():
    layer = tf_default_layer()
    layer(SEED_X, training=True)
    torch.testing.assert_close(layer(PROBE, training=False).item(), -7.766966, rtol=1e-5, atol=0)


def test_seed_inference_after_1001_training_steps():
    layer = tf_default_layer()
    for _ in range(1001):
        layer(SEED_X, training=True)
    assert layer.num_updates.item() == 1001
    torch.testing.assert_close(layer(PROBE, training=False).item(), -1.224762, rtol=1e-5, atol=0)


def test_seed_debias_inference_after_one_step_equals_batch_normalization():
    layer = tf_default_layer(debias=True)
    layer(SEED_X, training=True)
    torch.testing.assert_close(layer(PROBE, training=False).item(), -1.2247357, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- trainable


def test_frozen_layer_runs_inference_even_with_training_true():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(12)) * 5 + 1
    layer = bn.BatchNorm(3, axis=-1)
    layer.trainable = False
    assert torch.equal(layer(x, training=True), layer(x, training=False))
    assert torch.equal(layer(x), layer(x, training=False))


def test_frozen_layer_does_not_update_moving_statistics():
    layer = bn.BatchNorm(3, axis=-1)
    layer.trainable = False
    layer(torch.randn(8, 3) * 5 + 1, training=True)
    assert layer.num_updates.item() == 0
    assert torch.equal(layer.moving_mean, torch.zeros(3))
    assert torch.equal(layer.moving_variance, torch.ones(3))


def test_frozen_layer_gamma_and_beta_do_not_require_grad():
    layer = bn.BatchNorm(3)
    layer.trainable = False
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad


def test_trainable_constructor_argument_freezes_lazy_layer():
    layer = bn.BatchNorm(axis=-1, trainable=False)
    layer(torch.randn(8, 3), training=True)
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    assert layer.num_updates.item() == 0


def test_unfreezing_restores_training_updates_and_gradients():
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(13)) * 5 + 1
    layer = bn.BatchNorm(3, axis=-1)
    layer.trainable = False
    layer.trainable = True
    assert layer.trainable
    assert layer.gamma.requires_grad and layer.beta.requires_grad
    assert torch.equal(layer(x, training=True), bn.BatchNorm(3, axis=-1)(x, training=True))
    assert layer.num_updates.item() == 1


# ---------------------------------------------------------------- initializers


@pytest.mark.parametrize("name, value", [("zeros", 0.0), ("ones", 1.0)])
def test_named_initializers(name, value):
    layer = bn.BatchNorm(3, gamma_initializer=name, beta_initializer=name,
                         moving_mean_initializer=name, moving_variance_initializer=name)
    for tensor in (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance):
        assert torch.equal(tensor.detach(), torch.full((3,), value))


def test_number_initializer_fills_every_element():
    layer = bn.BatchNorm(3, gamma_initializer=2.5, moving_variance_initializer=4)
    assert torch.equal(layer.gamma.detach(), torch.full((3,), 2.5))
    assert torch.equal(layer.moving_variance, torch.full((3,), 4.0))


def test_callable_initializer_receives_the_feature_shape():
    shapes = []

    def init(shape):
        shapes.append(tuple(shape))
        return torch.arange(float(shape[0] * shape[1])).reshape(shape)

    layer = bn.BatchNorm((2, 3), axis=(1, 2), gamma_initializer=init)
    assert shapes == [(2, 3)]
    assert torch.equal(layer.gamma.detach(), torch.arange(6.0).reshape(2, 3))


def test_callable_initializer_with_wrong_shape_raises_value_error():
    with pytest.raises(ValueError, match="shape"):
        bn.BatchNorm(3, beta_initializer=lambda shape: torch.zeros(4))


def test_keras_constant_dict_initializer():
    layer = bn.BatchNorm(3, moving_mean_initializer={"class_name": "Constant",
                                                     "config": {"value": 0.75}})
    assert torch.equal(layer.moving_mean, torch.full((3,), 0.75))


@pytest.mark.parametrize("lazy", [False, True], ids=["built", "lazy"])
def test_unknown_initializer_name_raises_at_construction(lazy):
    with pytest.raises(ValueError, match="glorot"):
        bn.BatchNorm(None if lazy else 3, gamma_initializer="glorot_uniform")


def test_reset_parameters_restores_initial_values():
    layer = bn.BatchNorm(3, axis=-1, gamma_initializer=2.0, moving_mean_initializer=0.5)
    layer(torch.randn(8, 3) + 3, training=True)
    with torch.no_grad():
        layer.gamma.add_(1.0)
    layer.reset_parameters()
    assert torch.equal(layer.gamma.detach(), torch.full((3,), 2.0))
    assert torch.equal(layer.moving_mean, torch.full((3,), 0.5))
    assert layer.num_updates.item() == 0


# ---------------------------------------------------------------- regularizers and constraints


def l2(scale):
    return lambda p: scale * p.square().sum()


def test_regularization_loss_sums_over_every_batchnorm_in_the_tree():
    inner = bn.BatchNorm(3, gamma_regularizer=l2(0.1), gamma_initializer=2.0)
    outer = bn.BatchNorm(2, beta_regularizer=l2(0.5), beta_initializer=1.0)
    plain = bn.BatchNorm(4)
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(inner, plain), outer)
    loss = bn.regularization_loss(model)
    torch.testing.assert_close(loss, torch.tensor(0.1 * 3 * 4.0 + 0.5 * 2 * 1.0))


def test_regularization_loss_is_differentiable_wrt_gamma_and_beta():
    layer = bn.BatchNorm(3, gamma_regularizer=l2(0.1), beta_regularizer=l2(0.2),
                         gamma_initializer=2.0, beta_initializer=-1.0)
    bn.regularization_loss(nn.Sequential(layer)).backward()
    torch.testing.assert_close(layer.gamma.grad, torch.full((3,), 0.2 * 2.0))
    torch.testing.assert_close(layer.beta.grad, torch.full((3,), 0.4 * -1.0))


def test_regularization_loss_is_zero_without_regularizers():
    assert bn.regularization_loss(nn.Sequential(bn.BatchNorm(3))).item() == 0.0


def test_apply_constraints_projects_gamma_in_place():
    layer = bn.BatchNorm(3, gamma_constraint=lambda g: g.clamp(min=0.5))
    model = nn.Sequential(nn.Sequential(layer))
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([0.1, 1.0, -2.0]))
    gamma_before = layer.gamma
    bn.apply_constraints(model)
    assert layer.gamma is gamma_before
    assert torch.equal(layer.gamma.detach(), torch.tensor([0.5, 1.0, 0.5]))


def test_apply_constraints_projects_beta_and_leaves_unconstrained_alone():
    layer = bn.BatchNorm(2, beta_constraint=lambda b: b.clamp(-1.0, 1.0), gamma_initializer=3.0,
                         beta_initializer=lambda s: torch.tensor([-5.0, 0.5]))
    bn.apply_constraints(layer)
    assert torch.equal(layer.beta.detach(), torch.tensor([-1.0, 0.5]))
    assert torch.equal(layer.gamma.detach(), torch.full((2,), 3.0))


# ---------------------------------------------------------------- debias


def _run_debias(steps: int, momentum: float):
    """Train a debias layer ``steps`` times; return it, the batches and a probe input."""
    g = torch.Generator().manual_seed(100 + steps)
    layer = bn.BatchNorm(3, axis=-1, momentum=momentum, debias=True,
                         moving_mean_initializer=0.5, moving_variance_initializer=2.0,
                         gamma_initializer=1.5, beta_initializer=-0.25)
    batches = [torch.randn(16, 3, generator=g) * (1 + i % 3) + (i % 5 - 2) for i in range(steps)]
    for x in batches:
        layer(x, training=True)
    return layer, batches, torch.randn(4, 3, generator=g) * 2


def _hand_debiased(batches, momentum, m0, v0):
    mean = torch.full((3,), m0, dtype=torch.float64)
    var = torch.full((3,), v0, dtype=torch.float64)
    for x in batches:
        bm, bv = manual_stats(x, [0])
        mean = momentum * mean + (1 - momentum) * bm
        var = momentum * var + (1 - momentum) * bv
    t = len(batches)
    decay = momentum ** t
    return (mean - decay * m0) / (1 - decay), (var - decay * v0) / (1 - decay)


@pytest.mark.parametrize("steps", [1, 3, 50])
@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_debias_inference_matches_hand_computation(steps, momentum):
    layer, batches, probe = _run_debias(steps, momentum)
    assert layer.num_updates.item() == steps
    mean, var = _hand_debiased(batches, momentum, 0.5, 2.0)
    expected = 1.5 * (probe.double() - mean) / torch.sqrt(var + 1e-3) - 0.25
    torch.testing.assert_close(layer(probe, training=False).double(), expected,
                               rtol=1e-4, atol=1e-4)


def test_debias_keeps_the_raw_moving_averages_in_the_buffers():
    layer, batches, _ = _run_debias(3, 0.9)
    mean = torch.full((3,), 0.5, dtype=torch.float64)
    for x in batches:
        mean = 0.9 * mean + 0.1 * manual_stats(x, [0])[0]
    torch.testing.assert_close(layer.moving_mean.double(), mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.initial_moving_mean, torch.full((3,), 0.5))
    assert torch.equal(layer.initial_moving_variance, torch.full((3,), 2.0))


def test_debias_before_any_update_uses_raw_moving_values():
    layer = bn.BatchNorm(3, axis=-1, debias=True, moving_mean_initializer=0.5,
                         moving_variance_initializer=2.0)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(14))
    y = layer(x, training=False)
    torch.testing.assert_close(y, (x - 0.5) / torch.sqrt(torch.tensor(2.0 + 1e-3)))


def test_debias_with_constant_batches_recovers_the_batch_statistics():
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(15)) * 3 + 2
    layer = bn.BatchNorm(3, axis=-1, momentum=0.9, debias=True,
                         moving_mean_initializer=-4.0, moving_variance_initializer=9.0)
    for _ in range(5):
        y_train = layer(x, training=True)
    torch.testing.assert_close(layer(x, training=False), y_train, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- repr and config


def test_extra_repr_shows_configuration():
    text = repr(bn.BatchNorm(3, axis=-1, momentum=0.9, epsilon=1e-5, center=False,
                             debias=True, trainable=False))
    for part in ("BatchNorm(3", "axis=-1", "momentum=0.9", "epsilon=1e-05", "center=False",
                 "debias=True", "trainable=False"):
        assert part in text
    assert "num_features=None" in repr(bn.BatchNorm())


KERAS_KEYS = {
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
    "moving_mean_initializer", "moving_variance_initializer", "beta_regularizer",
    "gamma_regularizer", "beta_constraint", "gamma_constraint", "trainable",
}


def test_get_config_uses_keras_key_names():
    config = bn.BatchNorm(3, axis=-1, momentum=0.9).get_config()
    assert KERAS_KEYS <= set(config)
    assert config["axis"] == -1 and config["momentum"] == 0.9 and config["epsilon"] == 1e-3
    assert config["gamma_initializer"] == {"class_name": "Ones", "config": {}}


def test_get_config_from_config_round_trip():
    reg = l2(0.1)
    layer = bn.BatchNorm((3, 2), axis=(1, 3), momentum=0.9, epsilon=1e-4, center=False,
                         gamma_initializer=0.5, moving_variance_initializer="zeros",
                         gamma_regularizer=reg, debias=True, unbiased_moving_variance=True,
                         trainable=False)
    config = layer.get_config()
    clone = bn.BatchNorm.from_config(config)
    assert clone.get_config() == config
    assert clone.num_features == (3, 2) and clone.axis == (1, 3)
    assert clone.gamma_regularizer is reg
    assert torch.equal(clone.gamma.detach(), torch.full((3, 2), 0.5))


def test_config_json_round_trip():
    layer = bn.BatchNorm(4, axis=-1, momentum=0.95, gamma_initializer=2.0,
                         moving_mean_initializer="ones")
    config = json.loads(json.dumps(layer.get_config()))
    clone = bn.BatchNorm.from_config(config)
    assert clone.get_config() == layer.get_config()
    x = torch.randn(5, 4)
    assert torch.equal(clone(x, training=False), layer(x, training=False))


def test_config_json_round_trip_with_axis_sequence():
    layer = bn.BatchNorm((3, 2), axis=(1, 2))
    clone = bn.BatchNorm.from_config(json.loads(json.dumps(layer.get_config())))
    assert clone.axis == (1, 2) and clone.num_features == (3, 2)


def test_from_config_accepts_keras_config_with_name_and_dtype():
    keras_config = {
        "name": "batch_normalization", "dtype": "float32", "trainable": True, "axis": -1,
        "momentum": 0.9, "epsilon": 1e-5, "center": True, "scale": False,
        "beta_initializer": {"class_name": "Zeros", "config": {}},
        "gamma_initializer": {"class_name": "Ones", "config": {}},
        "moving_mean_initializer": {"class_name": "Zeros", "config": {}},
        "moving_variance_initializer": {"class_name": "Constant", "config": {"value": 2.0}},
        "beta_regularizer": None, "gamma_regularizer": None,
        "beta_constraint": None, "gamma_constraint": None,
    }
    layer = bn.BatchNorm.from_config(keras_config)
    assert layer.axis == -1 and layer.momentum == 0.9 and layer.epsilon == 1e-5
    assert layer.gamma is None and layer.num_features is None
    layer(torch.randn(4, 3), training=False)
    assert torch.equal(layer.moving_variance, torch.full((3,), 2.0))


# ---------------------------------------------------------------- state round trips and copies


def _trained_layer(**kwargs) -> bn.BatchNorm:
    """A layer with random gamma/beta and three updates (picklable: no lambdas)."""
    g = torch.Generator().manual_seed(16)
    layer = bn.BatchNorm(3, axis=-1, momentum=0.9, **kwargs)
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(3, generator=g) + 0.5)
        layer.beta.copy_(torch.randn(3, generator=g))
    for _ in range(3):
        layer(torch.randn(8, 3, generator=g) * 2 + 1, training=True)
    return layer


@pytest.mark.parametrize("debias", [False, True])
@pytest.mark.parametrize("lazy_target", [False, True], ids=["built", "lazy"])
def test_state_dict_round_trip_gives_identical_outputs(debias, lazy_target):
    source = _trained_layer(debias=debias)
    target = bn.BatchNorm(None if lazy_target else 3, axis=-1, momentum=0.9, debias=debias)
    target.load_state_dict(source.state_dict())
    assert target.num_features == (3,)
    assert target.num_updates.item() == 3
    x = torch.randn(6, 3)
    assert torch.equal(target(x, training=False), source(x, training=False))
    assert torch.equal(target(x, training=True), source(x, training=True))
    assert torch.equal(target.moving_variance, source.moving_variance)


def test_torch_save_and_load_of_a_model():
    model = nn.Sequential(nn.Linear(3, 3), _trained_layer())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(5, 3)
    model.eval()
    loaded.eval()
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[1].num_updates, model[1].num_updates)


def test_torch_save_and_load_of_a_state_dict_with_weights_only():
    source = _trained_layer(debias=True)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = bn.BatchNorm(3, axis=-1, momentum=0.9, debias=True)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(5, 3)
    assert torch.equal(target(x, training=False), source(x, training=False))


def test_deepcopy_of_a_built_layer_is_independent():
    layer = _trained_layer()
    clone = copy.deepcopy(layer)
    x = torch.randn(5, 3)
    assert torch.equal(clone(x, training=False), layer(x, training=False))
    clone(x * 3, training=True)
    assert clone.num_updates.item() == 4 and layer.num_updates.item() == 3
    assert not torch.equal(clone.moving_mean, layer.moving_mean)


def test_deepcopy_of_a_lazy_layer_builds_independently():
    layer = bn.BatchNorm(axis=-1)
    clone = copy.deepcopy(layer)
    clone(torch.randn(4, 5), training=True)
    assert clone.num_features == (5,)
    assert layer.num_features is None
    layer(torch.randn(4, 2), training=True)
    assert layer.num_features == (2,)


# ---------------------------------------------------------------- dtypes and models


def test_bfloat16_input_with_float32_layer():
    x = (torch.randn(16, 3, generator=torch.Generator().manual_seed(17)) * 2 + 1)
    layer = bn.BatchNorm(3, axis=-1)
    y = layer(x.bfloat16(), training=True)
    assert y.dtype == torch.bfloat16
    assert layer.moving_mean.dtype == torch.float32
    assert layer.moving_variance.dtype == torch.float32
    assert layer.gamma.dtype == torch.float32
    torch.testing.assert_close(y.float(), bn.BatchNorm(3, axis=-1)(x.bfloat16().float(),
                                                                   training=True),
                               rtol=2e-2, atol=2e-2)
    assert layer(x.bfloat16(), training=False).dtype == torch.bfloat16


def test_conv_batchnorm_relu_sequential_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn.BatchNorm(4, axis=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    x = torch.randn(8, 3, 6, 6)
    target = torch.randn(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gamma_before = model[1].gamma.detach().clone()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(losses[i + 1] < losses[i] for i in range(len(losses) - 1)), losses
    assert not torch.equal(model[1].gamma.detach(), gamma_before)
    assert model[1].num_updates.item() == 5
    model.eval()
    assert model(x).shape == (8, 1)
    assert model[1].num_updates.item() == 5


def test_axis1_training_output_matches_torch_batchnorm2d():
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(18)) * 3 + 1
    ours = bn.BatchNorm(4, axis=1, momentum=0.9, epsilon=1e-5)
    theirs = nn.BatchNorm2d(4, eps=1e-5, momentum=0.1)
    torch.testing.assert_close(ours(x, training=True), theirs.train()(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.moving_mean, theirs.running_mean)
