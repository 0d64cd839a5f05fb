"""bn.fold: batch normalization folded into the preceding Conv/ConvTranspose/Linear.

Checked against the unfolded model in eval mode. Tolerance, float32:
rtol=1e-4, atol=1e-5. Folding applies the per-channel affine map to the
weights instead of to the outputs, so every output is a differently associated
sum of products (and the folded weights are rounded once more); the error
grows with the fan-in, staying far inside these bounds for the layers here.
"""

import pytest
import torch
from torch import nn

import batchnorm as bn

TOL = {"rtol": 1e-4, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")


def settle(model: nn.Module, *shape: int, steps: int = 3) -> nn.Module:
    """Give the batch norms non-trivial statistics and affine parameters."""
    with torch.no_grad():
        for _ in range(steps):
            model.train()(torch.randn(*shape) * 2 + 1)
        for m in model.modules():
            for name in ("gamma", "beta", "weight", "bias"):
                param = getattr(m, name, None)
                if param is not None and isinstance(m, (bn.BatchNorm, nn.BatchNorm1d,
                                                        nn.BatchNorm2d, nn.BatchNorm3d)):
                    param.uniform_(0.5, 1.5)
    return model


def assert_folded_matches(model: nn.Module, x: torch.Tensor, result: bn.FoldResult) -> None:
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), **TOL)


class Block(nn.Module):
    """A ResNet basic block with a projection shortcut: residual add, branches."""

    def __init__(self, cin: int, cout: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), norm(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = bn.BatchNorm(8, momentum=0.5)
        self.layer1 = Block(8, 8, lambda c: bn.BatchNorm(c, momentum=0.5, debias=True))
        self.layer2 = Block(8, 16, lambda c: nn.BatchNorm2d(c, momentum=0.5))
        self.fc = nn.Linear(16, 10)
        self.fc_bn = nn.BatchNorm1d(10)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc_bn(self.fc(x.mean((2, 3))))


def test_fold_resnet_folds_every_batch_norm_and_keeps_eval_outputs():
    model = settle(ResNet(), 8, 3, 8, 8)
    result = bn.fold(model)
    assert result.not_folded == []
    assert ("layer2.shortcut.1", "layer2.shortcut.0") in result.folded
    assert len(result.folded) == 8
    assert not any(isinstance(m, (bn.BatchNorm, nn.BatchNorm2d, nn.BatchNorm1d))
                   for m in result.model.modules())
    assert_folded_matches(model, torch.randn(2, 3, 8, 8), result)


def test_fold_returns_an_eval_copy_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNorm(4)).train()
    result = bn.fold(model)
    assert isinstance(model[1], bn.BatchNorm) and model.training
    assert isinstance(result.model[1], nn.Identity) and not result.model.training
    assert result.model[0].weight is not model[0].weight


def test_fold_sequential_creates_the_missing_bias():
    model = settle(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bn.BatchNorm(4), nn.ReLU()),
                   6, 3, 5, 5)
    result = bn.fold(model)
    assert result.folded == [("1", "0")] and result.model[0].bias is not None
    assert_folded_matches(model, torch.randn(2, 3, 5, 5), result)


@pytest.mark.parametrize(("producer", "shape"), [
    (nn.Conv1d(4, 6, 3, groups=2), (5, 4, 9)),
    (nn.Conv2d(4, 6, 3, groups=2, bias=False), (5, 4, 6, 6)),
    (nn.Conv3d(2, 3, 2), (4, 2, 4, 4, 4)),
    (nn.ConvTranspose1d(4, 6, 3, groups=2), (5, 4, 7)),
    (nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, bias=False), (5, 6, 4, 4)),
    (nn.ConvTranspose3d(2, 3, 2, groups=1), (4, 2, 3, 3, 3)),
], ids=["Conv1d-groups", "Conv2d-groups-nobias", "Conv3d", "ConvTranspose1d-groups",
        "ConvTranspose2d-groups-nobias", "ConvTranspose3d"])
def test_fold_convolutions_with_groups_and_transposed_layouts(producer, shape):
    channels = producer.out_channels
    model = nn.Sequential(producer, bn.BatchNorm(channels, momentum=0.5))
    settle(model, *shape)
    result = bn.fold(model)
    assert result.folded == [("1", "0")]
    assert_folded_matches(model, torch.randn(*shape), result)


def test_fold_linear_with_channels_last_batch_norm_on_3d_input():
    model = settle(nn.Sequential(nn.Linear(5, 6), bn.BatchNorm(6, axis=-1, momentum=0.5)),
                   4, 7, 5)
    result = bn.fold(model)
    assert result.folded == [("1", "0")]
    assert_folded_matches(model, torch.randn(3, 7, 5), result)


def test_fold_linear_with_batchnorm1d_on_2d_input():
    model = settle(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), 8, 5)
    result = bn.fold(model)
    assert result.folded == [("1", "0")]
    assert_folded_matches(model, torch.randn(3, 5), result)


@pytest.mark.parametrize("layer", [
    lambda: bn.BatchNorm(4, momentum=0.9, debias=True),
    lambda: bn.BatchNorm(4, momentum=0.5, renorm=True, renorm_clipping={"rmax": 2.0}),
    lambda: bn.BatchNorm(4, momentum=None, center=False, scale=False),
    lambda: nn.BatchNorm2d(4, momentum=0.3, eps=0.1, bias=False),
], ids=["debias", "renorm", "cumulative-no-affine", "torch-no-bias"])
def test_fold_uses_the_statistics_inference_uses(layer):
    model = settle(nn.Sequential(nn.Conv2d(3, 4, 3), layer()), 6, 3, 5, 5, steps=2)
    result = bn.fold(model)
    assert result.folded == [("1", "0")]
    assert_folded_matches(model, torch.randn(2, 3, 5, 5), result)


def test_fold_lists_a_batch_norm_after_an_activation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), bn.BatchNorm(4))
    result = bn.fold(model)
    assert result.folded == []
    assert result.not_folded == [("2", "its input comes from '1' (ReLU), not from a Conv, "
                                       "ConvTranspose or Linear layer")]
    assert isinstance(result.model[2], bn.BatchNorm)


class TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = bn.BatchNorm(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_leaves_a_conv_whose_output_has_another_consumer():
    model = settle(TwoConsumers(), 4, 3, 5, 5)
    result = bn.fold(model)
    assert [name for name, _ in result.not_folded] == ["bn"]
    assert "also used elsewhere" in result.not_folded[0][1]
    assert_folded_matches(model, torch.randn(2, 3, 5, 5), result)


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so fold falls back to Sequentials."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), bn.BatchNorm(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = bn.BatchNorm(4)

    def forward(self, x):
        x = self.features(x)
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_fold_falls_back_to_sequentials_in_an_untraceable_model():
    model = settle(Untraceable(), 4, 3, 5, 5)
    result = bn.fold(model)
    assert result.folded == [("features.1", "features.0")]
    assert [name for name, _ in result.not_folded] == ["bn"]
    assert "cannot be traced by torch.fx" in result.not_folded[0][1]
    assert_folded_matches(model, torch.randn(2, 3, 5, 5) + 1, result)


def test_fold_checks_ranks_with_example_input():
    # Linear on (N, L, 6) with L == 6: axis 1 is L, not the Linear's feature axis.
    model = settle(nn.Sequential(nn.Linear(4, 6), bn.BatchNorm(6, axis=1)), 5, 6, 4)
    result = bn.fold(model, torch.randn(2, 6, 4))
    assert [name for name, _ in result.not_folded] == ["1"]
    assert "not the channel axis" in result.not_folded[0][1]
    assert_folded_matches(model, torch.randn(2, 6, 4), result)


class Conv3DSimple(nn.Conv3d):
    """torchvision's video ResNet convolution: a Conv3d subclass that computes as Conv3d."""


class StandardizedConv(nn.Conv2d):
    """timm's StdConv2d: a Conv2d subclass whose forward standardizes its weight first."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def test_fold_folds_into_a_convolution_subclass_that_computes_as_its_base():
    model = settle(nn.Sequential(Conv3DSimple(3, 4, 3), nn.BatchNorm3d(4)), 2, 3, 4, 6, 6)
    result = bn.fold(model)
    assert (result.folded, result.not_folded) == ([("1", "0")], [])
    assert_folded_matches(model, torch.randn(2, 3, 4, 6, 6), result)


def test_fold_leaves_a_convolution_subclass_with_its_own_forward_and_says_so():
    model = settle(nn.Sequential(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4)), 2, 3, 6, 6)
    result = bn.fold(model)
    assert result.folded == []
    [(name, reason)] = result.not_folded
    assert name == "1" and "'0' (StandardizedConv), a subclass" in reason
    assert "own forward" in reason


class RepVggBlock(nn.Module):
    """timm's RepVGG block: a batch norm on the block input (a ReLU's output), which the
    convolution branch reads too."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.identity = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = self.act(x)
        return self.identity(x) + self.conv(x)


def test_fold_names_the_layer_a_batch_norm_follows_when_it_is_not_a_convolution():
    result = bn.fold(RepVggBlock())
    assert result.not_folded == [("identity", "its input comes from 'act' (ReLU), not from "
                                              "a Conv, ConvTranspose or Linear layer")]


def test_fold_leaves_a_batch_norm_without_running_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    result = bn.fold(model)
    assert [name for name, _ in result.not_folded] == ["1"]
    assert "track_running_stats=False" in result.not_folded[0][1]
