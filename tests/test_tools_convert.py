"""bn.convert and bn.to_torch: torch.nn batch normalization to bn.BatchNorm and back.

Checked against torch.nn itself: the converted model and the original are run
side by side (same inputs, same SGD steps) and must agree, in float32, within
rtol=atol=1e-5 on outputs, gradients and statistics. On small batches both run
ATen's kernel, and outputs and gradients agree exactly; the moving averages are
updated with a differently associated formula (``m - (m - s) * (1 - d)``
against ``(1 - k) m + k s``) and the variance is recovered from the kernel's
inverse standard deviation, so they agree to a few ulps (measured: 2.4e-7
relative after 3 steps), as do eval outputs (9e-8). The bound leaves room for
batchnorm's own CPU kernel (float64 accumulation, used on large batches or with
BATCHNORM_CPU_MIN_NUMEL=0), whose rounding differs from ATen's by a few ulps
that the stacked layers amplify (measured: 2.4e-6 absolute at the output).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import batchnorm as bn

TOL = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn, residual add, relu."""

    def __init__(self, channels: int, norm=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def resnet() -> nn.Module:
    """A small ResNet-style model with torch.nn batch norms of several configurations."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, eps=1e-3, momentum=0.3),
        nn.ReLU(),
        Block(8),
        Block(8, norm=lambda c: nn.BatchNorm2d(c, momentum=None)),  # cumulative average
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6, affine=False),
        nn.Linear(6, 4),
        nn.BatchNorm1d(4, bias=False),
    )


def torch_statistics(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def our_statistics(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, bn.BatchNorm)
            for t in (m.moving_mean, m.moving_variance, m.num_updates)]


def train_side_by_side(a: nn.Module, b: nn.Module, steps: int = 3) -> None:
    """SGD steps on both models with the same data, asserting equal outputs and gradients."""
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    a.train()
    b.train()
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8) * 2 + 0.5
        ya, yb = a(x), b(x)
        torch.testing.assert_close(yb, ya, **TOL)
        for opt, y in ((opt_a, ya), (opt_b, yb)):
            opt.zero_grad()
            y.square().mean().backward()
        grads_a = [p.grad for p in a.parameters()]
        grads_b = [p.grad for p in b.parameters()]
        torch.testing.assert_close(grads_b, grads_a, **TOL)
        opt_a.step()
        opt_b.step()


# ---------------------------------------------------------------------------- convert


def test_convert_replaces_every_torch_batchnorm():
    model = bn.convert(resnet())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(isinstance(m, bn.BatchNorm) for m in model.modules()) == 7


def test_converted_model_trains_like_the_torch_model():
    original = resnet()
    converted = bn.convert(copy.deepcopy(original))
    train_side_by_side(original, converted)
    torch.testing.assert_close(our_statistics(converted), torch_statistics(original), **TOL)


def test_converted_model_evaluates_like_the_torch_model():
    original = resnet()
    converted = bn.convert(copy.deepcopy(original))
    train_side_by_side(original, converted, steps=2)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(converted.eval()(x), original.eval()(x), **TOL)


@pytest.mark.parametrize(("torch_layer", "expected"), [
    (nn.BatchNorm2d(4), {"momentum": 0.9, "epsilon": 1e-5, "center": True, "scale": True}),
    (nn.BatchNorm2d(4, momentum=0.01, eps=1e-3), {"momentum": 0.99, "epsilon": 1e-3}),
    (nn.BatchNorm2d(4, momentum=None), {"momentum": None}),
    (nn.BatchNorm2d(4, affine=False), {"center": False, "scale": False}),
    (nn.BatchNorm2d(4, bias=False), {"center": False, "scale": True}),
], ids=["defaults", "momentum-eps", "cumulative", "no-affine", "no-bias"])
def test_convert_maps_the_options(torch_layer, expected):
    layer = bn.convert(torch_layer)
    config = layer.get_config()
    assert {key: config[key] for key in expected} == expected
    assert layer.unbiased_moving_variance and layer.axis == 1


def test_convert_carries_the_statistics_and_update_count():
    torch_layer = nn.BatchNorm2d(4, momentum=None).train()
    for _ in range(2):
        torch_layer(torch.randn(5, 4, 3, 3) + 1)
    layer = bn.convert(copy.deepcopy(torch_layer))
    assert int(layer.num_updates) == 2
    x = torch.randn(5, 4, 3, 3) * 3
    torch_layer(x)
    layer(x)  # the cumulative average continues from batch 3, not from batch 1
    torch.testing.assert_close([layer.moving_mean, layer.moving_variance],
                               [torch_layer.running_mean, torch_layer.running_var], **TOL)


def test_convert_keeps_the_parameter_objects():
    torch_layer = nn.BatchNorm1d(3)
    weight, bias = torch_layer.weight, torch_layer.bias
    layer = bn.convert(torch_layer)
    assert layer.gamma is weight and layer.beta is bias


def test_convert_keeps_mode_device_and_dtype():
    model = nn.Sequential(nn.BatchNorm1d(3, dtype=torch.float64).eval(), nn.BatchNorm1d(3))
    model = bn.convert(model)
    assert (model[0].training, model[1].training) == (False, True)
    assert model[0].gamma.dtype == model[0].moving_mean.dtype == torch.float64
    assert model[0].moving_mean.device == model[0].gamma.device


def test_convert_replaces_a_shared_layer_everywhere_by_one_layer():
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model = bn.convert(model)
    assert isinstance(model[0], bn.BatchNorm) and model[0] is model[2]


def test_convert_uninitialized_lazy_layer_gives_a_lazy_batchnorm():
    torch_layer = nn.LazyBatchNorm2d(eps=1e-4)
    layer = bn.convert(nn.LazyBatchNorm2d(eps=1e-4))
    assert layer.num_features is None
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(layer(x), torch_layer(x), **TOL)
    torch.testing.assert_close(layer.moving_variance, torch_layer.running_var, **TOL)


def test_convert_sync_batchnorm_outside_a_distributed_run():
    torch_layer = nn.SyncBatchNorm(4, momentum=0.2)
    layer = bn.convert(copy.deepcopy(torch_layer))
    x = torch.randn(6, 4, 3)
    torch.testing.assert_close(layer(x), torch_layer(x), **TOL)
    torch.testing.assert_close(layer.moving_variance, torch_layer.running_var, **TOL)


def test_convert_refuses_track_running_stats_false_and_changes_nothing():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1': track_running_stats=False"):
        bn.convert(model)
    assert isinstance(model[0], nn.BatchNorm1d)


def test_convert_non_strict_leaves_unconvertible_layers_and_warns():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match=r"'1': track_running_stats=False"):
        model = bn.convert(model, strict=False)
    assert isinstance(model[0], bn.BatchNorm) and isinstance(model[1], nn.BatchNorm1d)


def test_convert_refuses_momentum_zero():
    with pytest.raises(ValueError, match="momentum=0"):
        bn.convert(nn.BatchNorm1d(3, momentum=0.0))


# ---------------------------------------------------------------------------- to_torch


def test_round_trip_gives_the_torch_classes_and_options_back():
    original = resnet()
    back, not_converted = bn.to_torch(bn.convert(copy.deepcopy(original)))
    assert not_converted == []
    assert [repr(m) for m in back.modules()] == [repr(m) for m in original.modules()]


def test_round_trip_model_trains_and_evaluates_like_the_original():
    original = resnet()
    back, _ = bn.to_torch(bn.convert(copy.deepcopy(original)))
    train_side_by_side(original, back)
    torch.testing.assert_close(torch_statistics(back), torch_statistics(original), **TOL)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(back.eval()(x), original.eval()(x), **TOL)


def native_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        bn.BatchNorm(8, momentum=0.8, unbiased_moving_variance=True),
        nn.ReLU(),
        Block(8, norm=lambda c: bn.BatchNorm(c, momentum=None, unbiased_moving_variance=True)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
        bn.BatchNorm(4, axis=-1, unbiased_moving_variance=True),  # axis 1 on a 2-D input
    )


def test_to_torch_with_example_input_matches_the_native_model():
    model = native_model()
    converted, not_converted = bn.to_torch(copy.deepcopy(model), torch.randn(2, 3, 8, 8))
    assert not_converted == []
    assert [type(m).__name__ for m in converted.modules() if "BatchNorm" in type(m).__name__] \
        == ["BatchNorm2d"] * 3 + ["BatchNorm1d"]
    train_side_by_side(model, converted)
    torch.testing.assert_close(torch_statistics(converted), our_statistics(model), **TOL)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x), **TOL)


def test_to_torch_example_run_changes_no_statistics():
    model = native_model().train()
    before = copy.deepcopy(our_statistics(model))
    converted, _ = bn.to_torch(model, torch.randn(2, 3, 8, 8))
    after = torch_statistics(converted)
    assert len(after) == len(before) and all(map(torch.equal, after, before))
    assert all(m.training for m in converted.modules())


def test_to_torch_without_input_rank_reports_it():
    layer = bn.BatchNorm(3, unbiased_moving_variance=True)
    model, not_converted = bn.to_torch(nn.Sequential(layer))
    assert model[0] is layer
    assert [name for name, _ in not_converted] == ["0"]
    assert "input rank is unknown" in not_converted[0][1]


@pytest.mark.parametrize(("options", "reason"), [
    ({}, "unbiased_moving_variance=False"),
    ({"renorm": True}, "renorm=True"),
    ({"virtual_batch_size": 2}, "virtual_batch_size"),
    ({"adjustment": lambda shape: (1.0, 0.0)}, "adjustment"),
    ({"debias": True}, "debias=True"),
    ({"axis": -1}, "axis=-1"),
    ({"axis": (1, 2), "num_features": (3, 3)}, "one feature axis"),
    ({"scale": False}, "center=True with scale=False"),
    ({"trainable": False}, "trainable=False"),
    ({"gamma_regularizer": lambda g: g.sum()}, "gamma_regularizer"),
    ({"dtype": torch.float16}, "statistics in torch.float32"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_to_torch_lists_layers_torch_cannot_represent(options, reason):
    options = {"num_features": 3, "unbiased_moving_variance": "unbiased" not in reason,
               **options}
    layer = bn.BatchNorm(options.pop("num_features"), **options)
    model, not_converted = bn.to_torch(nn.Sequential(layer), torch.randn(4, 3, 3, 3))
    assert model[0] is layer
    assert len(not_converted) == 1 and not_converted[0][0] == "0"
    assert reason in not_converted[0][1]


def test_to_torch_keeps_the_parameter_objects_and_mode():
    layer = bn.BatchNorm(3, unbiased_moving_variance=True).eval()
    torch_layer, _ = bn.to_torch(layer, torch.randn(2, 3))
    assert isinstance(torch_layer, nn.BatchNorm1d) and not torch_layer.training
    assert torch_layer.weight is layer.gamma and torch_layer.bias is layer.beta


def test_to_torch_unbuilt_lazy_layer_from_convert_stays_lazy():
    layer = bn.convert(nn.LazyBatchNorm3d())
    torch_layer, not_converted = bn.to_torch(layer)
    assert not_converted == [] and isinstance(torch_layer, nn.LazyBatchNorm3d)


def test_conversions_do_not_warn_on_a_plain_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.to_torch(bn.convert(resnet()))


class MyBatchNorm(nn.BatchNorm2d):
    """A subclass: it may compute something else, so convert refuses it."""


def test_convert_refusal_names_each_reason_once_with_the_first_layers():
    model = nn.Sequential(*[MyBatchNorm(2) for _ in range(5)], nn.BatchNorm2d(2, eps=0))
    with pytest.raises(ValueError) as raised:
        bn.convert(model)
    message = str(raised.value)
    assert message.count("MyBatchNorm subclasses a torch.nn batch normalization") == 1
    assert "'0', '1', '2' and 2 more: MyBatchNorm subclasses" in message
    assert "'5': eps=0" in message
