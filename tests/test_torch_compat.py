"""Code written for ``torch.nn``'s batch norms works on ``bn.BatchNorm``, or says what to change.

torch's attribute names are read-only aliases; a ``torch.nn`` checkpoint loads into a
converted model; ``convert_sync`` refuses torch layers instead of doing nothing; torch's
constructor arguments and momentum raise or warn, naming ours.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm as bn

ALIASES = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean",
           "running_var": "moving_variance", "num_batches_tracked": "num_updates",
           "eps": "epsilon"}


def trained_torch_model() -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5))
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(16, 3, 4, 4) * 2 + 1)
        model[1].weight.uniform_(0.5, 1.5)
        model[5].bias.uniform_(-1, 1)
    return model.eval()


# ---------------------------------------------------------------------------- aliases


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_torch_name_reads_the_same_object(alias):
    layer = bn.BatchNorm(4)
    assert getattr(layer, alias) is getattr(layer, ALIASES[alias])


def test_aliases_follow_a_lazy_layer_s_build_and_scale_false():
    layer = bn.BatchNorm(axis=-1, scale=False)
    layer(torch.randn(8, 3), training=True)
    assert layer.running_mean is layer.moving_mean and layer.running_mean.shape == (3,)
    assert layer.weight is None and layer.bias is layer.beta


def test_aliases_add_no_parameters_buffers_or_state_dict_keys():
    layer = bn.BatchNorm(4)
    assert [name for name, _ in layer.named_parameters()] == ["gamma", "beta"]
    assert [name for name, _ in layer.named_buffers()] == [
        "moving_mean", "moving_variance", "num_updates", "num_skipped"]  # health counter
    assert list(layer.state_dict()) == [
        "gamma", "beta", "moving_mean", "moving_variance", "num_updates"]
    assert len(list(nn.Sequential(layer).parameters())) == 2


def test_torch_init_loop_works_in_place():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNorm(4))
    for module in model.modules():  # the usual torch init loop, written for nn.BatchNorm2d
        if hasattr(module, "running_mean"):
            nn.init.constant_(module.weight, 0.5)
            nn.init.zeros_(module.bias)
    assert torch.equal(model[1].gamma, torch.full((4,), 0.5))


def test_no_weight_decay_filter_by_module_attribute_finds_gamma_and_beta():
    model = nn.Sequential(nn.Linear(3, 4), bn.BatchNorm(4))
    no_decay = {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    no_decay |= {id(m.weight) for m in model.modules() if hasattr(m, "running_mean")}
    assert no_decay == {id(model[0].bias), id(model[1].beta), id(model[1].gamma)}


def test_logging_a_torch_layer_s_attributes():
    layer = bn.BatchNorm(4, epsilon=1e-5)
    line = f"eps={layer.eps} mean={layer.running_mean.mean():.1f} n={layer.num_batches_tracked}"
    assert line == "eps=1e-05 mean=0.0 n=0"


@pytest.mark.parametrize("alias", ["weight", "running_mean", "eps", "num_batches_tracked"])
def test_assigning_an_alias_raises_and_changes_nothing(alias):
    layer = bn.BatchNorm(4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    value = nn.Parameter(torch.zeros(4)) if alias == "weight" else torch.zeros(4)
    with pytest.raises(AttributeError, match=f"{alias} is a read-only alias of {ALIASES[alias]}"):
        setattr(layer, alias, value)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert [name for name, _ in layer.named_parameters()] == ["gamma", "beta"]


def test_the_alias_error_names_the_attribute_to_change():
    with pytest.raises(AttributeError, match=r"running_var is a read-only alias of "
                                             r"moving_variance.*layer\.moving_variance"):
        bn.BatchNorm(4).running_var = torch.ones(4)


# ---------------------------------------------------------------------------- checkpoints


def test_torch_checkpoint_loads_into_a_converted_model():
    source = trained_torch_model()
    checkpoint = source.state_dict()
    model = bn.convert(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                                     nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
                                     nn.BatchNorm1d(5)))
    result = model.load_state_dict(checkpoint)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model[1].moving_variance, source[1].running_var)
    assert torch.equal(model[5].beta, source[5].bias)
    assert model[1].num_updates.item() == 3
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(model.eval()(x), source(x), rtol=1e-5, atol=1e-6)
    assert list(model.state_dict())[:5] == ["0.weight", "1.gamma", "1.beta", "1.moving_mean",
                                            "1.moving_variance"]  # still TensorFlow's keys


def test_loading_then_converting_gives_the_same_model():
    source = trained_torch_model()
    first = bn.convert(trained_torch_model())
    first.load_state_dict(source.state_dict())
    second = trained_torch_model()
    second.load_state_dict(source.state_dict())
    second = bn.convert(second)
    x = torch.randn(6, 3, 4, 4)
    assert torch.equal(first.eval()(x), second.eval()(x))


def test_torch_checkpoint_builds_a_lazy_layer():
    torch_layer = nn.BatchNorm1d(3)
    torch_layer.train()(torch.randn(8, 3))
    layer = bn.BatchNorm()
    layer.load_state_dict(torch_layer.state_dict())
    assert layer.num_features == (3,)
    assert torch.equal(layer.moving_mean, torch_layer.running_mean)


def test_strict_loading_reports_missing_keys_of_an_affine_false_checkpoint():
    checkpoint = nn.BatchNorm1d(3, affine=False).state_dict()
    layer = bn.BatchNorm(3)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"gamma", "beta"'):
        layer.load_state_dict(checkpoint)
    result = layer.load_state_dict(checkpoint, strict=False)
    assert result.missing_keys == ["gamma", "beta"] and result.unexpected_keys == []


def test_strict_loading_reports_unexpected_keys_and_duplicates_by_their_torch_name():
    checkpoint = {**bn.BatchNorm(3).state_dict(), "weight": torch.zeros(3), "extra": torch.ones(1)}
    layer = bn.BatchNorm(3)
    result = layer.load_state_dict(checkpoint, strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == ["extra", "weight"]
    assert torch.equal(layer.gamma, torch.ones(3))  # ours wins over the torch duplicate


def test_loading_does_not_change_the_caller_s_checkpoint():
    checkpoint = nn.BatchNorm1d(3).state_dict()
    keys = list(checkpoint)
    bn.BatchNorm(3).load_state_dict(checkpoint)
    assert list(checkpoint) == keys


# ---------------------------------------------------------------------------- convert_sync


def test_convert_sync_refuses_torch_batch_norms_naming_them_and_the_fix():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), bn.BatchNorm(4))
    with pytest.raises(ValueError, match=r"\['1'\] are torch.nn batch norms.*bn\.convert"):
        bn.convert_sync(model)
    assert not model[2].synchronized  # nothing changed


def test_convert_sync_after_convert_synchronizes_every_layer():
    model = bn.convert_sync(bn.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    assert isinstance(model[1], bn.BatchNorm) and model[1].synchronized


def test_convert_sync_disabling_refuses_torch_sync_batch_norm():
    model = nn.Sequential(nn.SyncBatchNorm(4), bn.BatchNorm(4, synchronized=True))
    with pytest.raises(ValueError, match=r"\['0'\] are torch.nn.SyncBatchNorm.*stay synchronized"):
        bn.convert_sync(model, enabled=False)
    assert model[1].synchronized


def test_convert_sync_without_any_batch_norm_warns():
    with pytest.warns(UserWarning, match="contains no batch norm layer; nothing was changed"):
        bn.convert_sync(nn.Sequential(nn.Linear(3, 3)))


# ---------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(("argument", "says"), [
    ({"eps": 1e-5}, r"eps=: pass epsilon="),
    ({"affine": False}, r"affine=: pass center= and scale="),
    ({"track_running_stats": False}, r"track_running_stats=:.*training=True"),
    ({"bias": False}, r"bias=: pass center="),
    ({"momentun": 0.9}, r"'momentun'; did you mean momentum=\?"),
    ({"zzz": 1}, r"'zzz'; the arguments are \['num_features', 'axis'"),
])
def test_torch_constructor_arguments_raise_type_error_naming_ours(argument, says):
    with pytest.raises(TypeError, match=says):
        bn.BatchNorm(4, **argument)


def test_torch_positional_options_raise_type_error_naming_the_keywords():
    with pytest.raises(TypeError, match=r"BatchNorm\(64, 1e-05, 0.1\): only num_features is "
                                        r"positional.*epsilon=eps, momentum=1 - m"):
        bn.BatchNorm(64, 1e-5, 0.1)


def test_a_subclass_with_its_own_positional_arguments_is_not_refused():
    class Scaled(bn.BatchNorm):
        def __init__(self, features: int, factor: float) -> None:
            super().__init__(features)
            self.factor = factor

    assert Scaled(4, 2.0).factor == 2.0


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.49])
def test_small_momentum_warns_that_it_is_tensorflow_s_decay(momentum):
    with pytest.warns(UserWarning, match=rf"momentum={momentum} is TensorFlow's momentum.*"
                                         rf"PyTorch's momentum={momentum} is momentum="):
        bn.BatchNorm(4, momentum=momentum)


@pytest.mark.parametrize("momentum", [0.5, 0.9, 0.99, None])
def test_usual_momentum_does_not_warn(momentum):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.BatchNorm(4, momentum=momentum)


def test_reconfigure_to_a_small_momentum_warns():
    layer = bn.BatchNorm(4)
    with pytest.warns(UserWarning, match="momentum=0.1 is TensorFlow's"):
        layer.reconfigure(momentum=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer.reconfigure(epsilon=1e-4)  # momentum unchanged: no second warning


def test_converting_a_torch_layer_with_a_large_torch_momentum_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = bn.convert(nn.BatchNorm1d(3, momentum=0.7))
    assert layer.momentum == pytest.approx(0.3)
