"""bn.freeze and bn.unfreeze: fixed statistics whatever the mode (FrozenBatchNorm2d semantics).

Checked against the FrozenBatchNorm2d formula written out here
(``x * w * rsqrt(rv + eps) + (b - rm * w * rsqrt(rv + eps))``; torchvision is
not a dependency) and against the same layers' eval-mode output.
"""

import copy

import pytest
import torch
from torch import nn

import batchnorm as bn

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_model() -> nn.Module:
    """Conv-BN-ReLU-Conv-BN with moving statistics away from their initial values."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), bn.BatchNorm(4, momentum=0.5), nn.ReLU(),
        nn.Conv2d(4, 4, 1), bn.BatchNorm(4, momentum=0.5, epsilon=0.1),
    )
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, 3, 6, 6) * 2 + 1)
        for layer in (model[1], model[4]):
            layer.gamma.uniform_(0.5, 1.5)
            layer.beta.uniform_(-1, 1)
    return model


def statistics(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, bn.BatchNorm)
            for t in (m.moving_mean, m.moving_variance, m.num_updates)]


def test_freeze_returns_the_frozen_layer_names():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(bn.BatchNorm(3)), bn.BatchNorm(3))
    assert bn.freeze(model) == ["1.0", "2"]


def test_frozen_model_in_train_mode_computes_its_eval_output():
    model = trained_model()
    x = torch.randn(2, 3, 6, 6)
    expected = model.eval()(x)
    bn.freeze(model)
    torch.testing.assert_close(model.train()(x), expected, rtol=0, atol=0)


def test_frozen_layer_ignores_training_true():
    model = trained_model()
    x = torch.randn(4, 4, 5, 5)
    expected = model[1](x, training=False)
    bn.freeze(model)
    torch.testing.assert_close(model[1](x, training=True), expected, rtol=0, atol=0)


def test_frozen_model_never_updates_its_statistics():
    model = trained_model()
    before = statistics(model)
    bn.freeze(model)
    model.train()(torch.randn(8, 3, 6, 6) + 5)
    assert all(map(torch.equal, statistics(model), before))


def test_frozen_layer_matches_the_frozen_batchnorm2d_formula():
    model = trained_model()
    bn.freeze(model)
    layer, x = model[4], torch.randn(2, 4, 3, 3)
    scale = layer.gamma * torch.rsqrt(layer.moving_variance + layer.epsilon)
    shift = layer.beta - layer.moving_mean * scale
    expected = x * scale[:, None, None] + shift[:, None, None]
    torch.testing.assert_close(layer.train()(x), expected, rtol=1e-6, atol=1e-6)


def test_freeze_stops_gradients_for_gamma_and_beta():
    model = trained_model()
    bn.freeze(model)
    model.train()(torch.randn(2, 3, 6, 6)).sum().backward()
    layers = (model[1], model[4])
    assert all(p.grad is None and not p.requires_grad for m in layers for p in (m.gamma, m.beta))
    assert model[0].weight.grad is not None  # the rest of the model still learns


def test_freeze_with_affine_trainable_keeps_gamma_and_beta_learning():
    model = trained_model()
    before = statistics(model)
    bn.freeze(model, affine_trainable=True)
    model.train()(torch.randn(2, 3, 6, 6)).sum().backward()
    assert all(p.grad is not None for m in (model[1], model[4]) for p in (m.gamma, m.beta))
    assert all(map(torch.equal, statistics(model), before))


def test_freeze_refuses_torch_batchnorm_and_changes_nothing():
    model = nn.Sequential(bn.BatchNorm(3), nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match=r"\['1'\].*bn\.convert"):
        bn.freeze(model)
    assert model[0].trainable


def test_freeze_after_convert_works_on_a_torch_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert bn.freeze(bn.convert(model)) == ["1"]


def test_unfreeze_restores_training_behaviour():
    model = trained_model()
    reference = copy.deepcopy(model)
    bn.freeze(model)
    assert bn.unfreeze(model) == ["1", "4"]
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(model.train()(x), reference.train()(x), rtol=0, atol=0)
    assert all(map(torch.equal, statistics(model), statistics(reference)))
    assert all(p.requires_grad for p in model.parameters())


def test_unfreeze_lists_only_layers_that_were_frozen():
    model = nn.Sequential(bn.BatchNorm(3), bn.BatchNorm(3, trainable=False))
    assert bn.unfreeze(model) == ["1"]
