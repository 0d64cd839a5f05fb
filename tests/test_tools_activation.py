"""bn.convert(fuse_activation=True), bn.to_torch and bn.fold with fused activations.

Checked against the torch.nn model itself, as in ``test_tools_convert.py`` (whose models
and side-by-side training these reuse): outputs, gradients and statistics within
rtol = atol = 1e-5 in float32 (these small batches run ATen's kernel, followed by the
activation in place where fused: the same values as torch.nn's layer and module, up to
the moving-average rounding that file explains). Folded models are compared in eval mode
at ``test_tools_fold.py``'s tolerance (rtol 1e-4, atol 1e-5: the affine map applied to
the weights instead of the outputs).
"""

from __future__ import annotations

import copy

import pytest
import test_tools_convert as convert_tests
import torch
import torch.fx
from torch import nn

import batchnorm as bn

TOL = convert_tests.TOL
FOLD_TOL = {"rtol": 1e-4, "atol": 1e-5}

pytestmark = pytest.mark.usefixtures("one_thread")


class SharedReluBlock(nn.Module):
    """torchvision's BasicBlock: one ``self.relu`` module called twice, once after bn1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(x + self.bn2(self.conv2(out)))


class FunctionalSilu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU())

    def forward(self, x):
        return self.head(nn.functional.silu(self.bn(self.conv(x))))


class Untraceable(nn.Module):
    """fx cannot trace the data-dependent branch; its Sequential is searched instead."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.body(x)
        return y if y.sum() > 0 else -y


def activations_of(model: nn.Module) -> list[str | None]:
    return [m.activation for m in model.modules() if isinstance(m, bn.BatchNorm)]


def check_equivalent(original: nn.Module, fused: nn.Module, steps: int = 2) -> None:
    """Side-by-side SGD steps, then eval outputs (rtol = atol = 1e-5)."""
    convert_tests.train_side_by_side(original, fused, steps=steps)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fused.eval()(x), original.eval()(x), **TOL)


# ---------------------------------------------------------------- convert


def test_convert_fuses_a_sequential_relu_module_and_keeps_the_classes():
    original = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    assert type(fused) is nn.Sequential and isinstance(fused[2], nn.Identity)
    assert fused[1].activation == "relu"
    check_equivalent(original, fused)


def test_convert_without_fuse_activation_fuses_nothing():
    model = bn.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    assert model[1].activation is None and isinstance(model[2], nn.ReLU)


def test_convert_fuses_functional_calls_in_the_block_that_makes_them():
    # resnet(): a Sequential with a ReLU module after its first batch norm, and Blocks calling
    # torch.relu after bn1 (fused) and after the residual add (bn2: another consumer, kept).
    original = convert_tests.resnet()
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    assert type(fused) is nn.Sequential  # only the Blocks' forwards are rewritten
    for block in (fused[3], fused[4]):
        assert isinstance(block, torch.fx.GraphModule) and type(block).__name__ == "Block"
        assert block.bn1.activation == "relu" and block.bn2.activation is None
        assert block.code.count("torch.relu(") == 1  # the call after the add
    assert activations_of(fused) == ["relu", "relu", None, "relu", None, None, None]
    plain = bn.convert(copy.deepcopy(original))
    assert list(fused.state_dict()) == list(plain.state_dict())
    check_equivalent(original, fused)
    torch.testing.assert_close(convert_tests.our_statistics(fused),
                               convert_tests.torch_statistics(original), **TOL)


def test_convert_fuses_the_first_call_of_a_shared_relu_module():
    original = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SharedReluBlock(8))
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    block = fused[1]
    assert isinstance(block, torch.fx.GraphModule) and isinstance(block.relu, nn.ReLU)
    assert block.bn1.activation == "relu" and block.bn2.activation is None
    check_equivalent(original, fused)


def test_convert_fuses_silu_calls_and_modules():
    original = FunctionalSilu()
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    assert activations_of(fused) == ["silu", "silu"]
    # The functional call after bn is in the model's own forward: the model is rewritten
    # (a GraphModule, whose containers are plain modules); the SiLU module became Identity.
    assert isinstance(fused, torch.fx.GraphModule) and type(fused).__name__ == "FunctionalSilu"
    assert isinstance(fused.get_submodule("head.2"), nn.Identity)
    check_equivalent(original, fused)


class Call(nn.Module):
    """A batch norm followed by one form of activation call."""

    def __init__(self, form) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.form = form

    def forward(self, x):
        return self.form(self.bn(x)) * 2


CALLS = {"torch.relu": torch.relu, "torch.relu_": torch.relu_,
         "F.relu(inplace)": lambda y: nn.functional.relu(y, inplace=True),
         "x.relu()": lambda y: y.relu(), "x.relu_()": lambda y: y.relu_(),
         "F.silu": nn.functional.silu}


@pytest.mark.parametrize("form", CALLS)
def test_convert_fuses_every_call_form(form):
    original = Call(CALLS[form])
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    assert fused.bn.activation == ("silu" if "silu" in form else "relu")
    assert "relu" not in fused.code and "silu" not in fused.code
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(fused(x), original(x), **TOL)


def test_convert_fuses_in_the_sequentials_of_an_untraceable_model():
    original = Untraceable()
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    assert type(fused) is Untraceable and isinstance(fused.body[2], nn.Identity)
    assert fused.body[1].activation == "relu"
    check_equivalent(original, fused)


def test_convert_fuses_layers_that_are_already_ours():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm(8), nn.SiLU())
    assert bn.convert(model, fuse_activation=True)[1].activation == "silu"


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(x)
        return torch.relu(y) + y


class Subclassed(nn.ReLU):
    pass


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(self.bn(x)))


@pytest.mark.parametrize("case", ["two_users", "subclass", "hooked", "called_twice",
                                  "unconverted", "shared_batch_norm"])
def test_convert_leaves_pairs_whose_fusion_would_change_the_model(case):
    norm = nn.BatchNorm2d(3)
    if case == "two_users":
        model = TwoUsers()
    elif case == "subclass":
        model = nn.Sequential(norm, Subclassed())
    elif case == "hooked":
        model = nn.Sequential(norm, nn.ReLU())
        model[1].register_forward_hook(lambda *a: None)
    elif case == "called_twice":
        model = CalledTwice()
    elif case == "unconverted":
        model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU())
    else:  # one layer under two names, each followed by a ReLU: fusing one would fuse both
        model = nn.Sequential(norm, nn.ReLU(), nn.Conv2d(3, 3, 1), norm)
    expected = copy.deepcopy(model).eval()
    with pytest.warns(UserWarning) if case == "unconverted" else _nothing():
        converted = bn.convert(model, strict=case != "unconverted", fuse_activation=True)
    assert all(a is None for a in activations_of(converted))
    assert not any(isinstance(m, nn.Identity) for m in converted.modules())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(converted.eval()(x), expected(x), **TOL)


class OptionalShortcut(nn.Module):
    """timm's DLA block: a shared ReLU, and a residual that defaults to the input when the
    caller passes none (``shortcut=None``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x, shortcut=None):
        if shortcut is None:
            shortcut = x
        return self.relu(self.relu(self.bn(self.conv(x))) + shortcut)


class CallsWithoutShortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = OptionalShortcut()

    def forward(self, x):
        return self.block(x)


def test_convert_leaves_pairs_in_a_block_whose_forward_has_a_default_argument():
    # Traced on its own, the block would see a Proxy for `shortcut`, never None: its
    # GraphModule would add None when called without it. Left unfused, the model still runs.
    model = CallsWithoutShortcut()
    expected = copy.deepcopy(model).eval()
    converted = bn.convert(model, fuse_activation=True)
    assert activations_of(converted) == [None]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(converted.eval()(x), expected(x), **TOL)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- to_torch


def test_to_torch_puts_a_fused_module_back_where_it_was():
    original = convert_tests.resnet()
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    back, not_converted = bn.to_torch(fused)
    assert not_converted == []
    assert [repr(m) for m in back[:3]] == [repr(m) for m in original[:3]]
    # A fused function call has no module to go back to: the layer becomes BN + activation.
    assert repr(back[3].bn1) == repr(nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()))
    assert not any(isinstance(m, bn.BatchNorm) for m in back.modules())
    check_equivalent(original, back)


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_to_torch_gives_a_layer_with_activation_as_batch_norm_and_module(activation):
    layer = bn.BatchNorm(8, momentum=0.9, unbiased_moving_variance=True, activation=activation)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), layer)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        layer(model[0](x), training=True)  # non-trivial statistics
    expected = copy.deepcopy(model).eval()(x)
    back, not_converted = bn.to_torch(model, x)
    assert not_converted == []
    module = {"relu": nn.ReLU, "silu": nn.SiLU}[activation]
    assert isinstance(back[1], nn.Sequential) and type(back[1][1]) is module
    assert isinstance(back[1][0], nn.BatchNorm2d) and back[1][0].weight is layer.gamma
    torch.testing.assert_close(back.eval()(x), expected, **TOL)


# ---------------------------------------------------------------- fold


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_fold_keeps_the_activation_of_a_fused_layer(activation):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm(8, activation=activation))
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(8, 3, 8, 8) * 2 + 1)
        model[1].beta.uniform_(-1, 1)
    folded, pairs, left = bn.fold(model)
    assert pairs == [("1", "0")] and left == []
    assert type(folded[1]) is {"relu": nn.ReLU, "silu": nn.SiLU}[activation]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), **FOLD_TOL)


def test_fold_after_fusing_a_resnet_matches_the_torch_model():
    original = convert_tests.resnet()
    convert_tests.train_side_by_side(original, copy.deepcopy(original), steps=2)
    fused = bn.convert(copy.deepcopy(original), fuse_activation=True)
    folded, pairs, _ = bn.fold(fused)
    assert ("1", "0") in pairs and ("3.bn1", "3.conv1") in pairs
    assert isinstance(folded[1], nn.ReLU) and isinstance(folded[3].bn1, nn.ReLU)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original.eval()(x), **FOLD_TOL)
