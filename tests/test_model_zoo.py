"""Real networks of timm and torchvision through the tools: convert, state dicts, fold,
fused activations, ``torch.export`` and a training step.

Random weights only (``pretrained=False``/``weights=None``: nothing is downloaded), small
inputs, the batch norms given statistics and affine values other than their defaults
(one training call, then random gamma and beta), and checked against the torch model:

- float64 (conversion, state dicts, fold, fusion, export): within rtol = atol = 1e-9.
  Both models compute the same normalization, ATen's kernel against batchnorm's (float64
  sums either way, associated differently): a few float64 ulps per layer (1e-16
  relative), which tens of layers and the backward pass grow (measured on torchvision's
  resnet18: outputs 1e-14, gradients 3e-13, moving statistics 4e-15 apart); 1e-9 leaves
  room and still catches any real difference (a wrong epsilon or momentum moves the
  outputs by 1e-6 or more).
- float32 (a training step with the models' own in-place ReLUs and ``+=``): the
  parameters after one SGD step within rtol = atol = 1e-4, float32 rounding through
  tens of layers (measured on resnet18: 7e-7).

Slow (a few seconds per model and check on 2 cores): marked ``zoo`` and ``slow``, run only
when asked for (``python -m pytest -m zoo``, as ``.ci/run`` does after installing the
``zoo`` extra). Without timm or torchvision the file is skipped.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision_import import import_torchvision

import batchnorm as bn
from batchnorm.tools._model import is_torch_batch_norm

torchvision = import_torchvision()
timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[zoo]')")
from timm.layers import freeze_batch_norm_2d  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402

pytestmark = [pytest.mark.zoo,  # run on request (tests/conftest.py's ON_REQUEST)
              pytest.mark.usefixtures("one_thread")]  # slow: tests/conftest.py's SLOW_TESTS

TOL64 = {"rtol": 1e-9, "atol": 1e-9}
TOL32 = {"rtol": 1e-4, "atol": 1e-4}
SMALL = (2, 3, 32, 32)  # two samples: training mode needs more than one value per channel


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def _vision(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


# What fold says of a batch norm whose input is no Conv or Linear output.
LEFT = "Conv, ConvTranspose or Linear layer"
# name -> (builder, input shape, batch norms fold leaves: {reason fragment: how many}).
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], dict[str, int]]] = {
    "tv_resnet18": (_vision("resnet18"), SMALL, {}),
    "tv_mobilenet_v2": (_vision("mobilenet_v2", width_mult=0.5), SMALL, {}),
    "tv_mobilenet_v3_small": (_vision("mobilenet_v3_small"), SMALL, {}),
    "tv_efficientnet_b0": (_vision("efficientnet_b0"), SMALL, {}),
    "tv_regnet_x_400mf": (_vision("regnet_x_400mf"), SMALL, {}),
    "tv_densenet121": (_vision("densenet121"), SMALL, {LEFT: 62}),  # pre-activation: after
                                                                   # a concatenation
    "tv_shufflenet_v2_x0_5": (_vision("shufflenet_v2_x0_5"), SMALL, {}),
    "tv_googlenet": (_vision("googlenet", aux_logits=False, init_weights=True), SMALL, {}),
    "tv_r3d_18": (_vision("r3d_18"), (2, 3, 4, 16, 16), {}),
    # A detection backbone: torchvision's FrozenBatchNorm2d throughout.
    "tv_fpn_resnet18_frozen": (
        lambda: resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                    trainable_layers=5), SMALL, {}),
    "timm_resnet18": (_timm("resnet18"), SMALL, {}),
    "timm_efficientnet_b0": (_timm("efficientnet_b0"), SMALL, {}),
    "timm_mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), SMALL, {}),
    "timm_regnetx_002": (_timm("regnetx_002"), SMALL, {}),
    "timm_dla34": (_timm("dla34"), SMALL, {}),
    "timm_repvgg_a0": (_timm("repvgg_a0"), SMALL, {LEFT: 17}),  # identity branches: after
                                                               # the previous block's ReLU
    "timm_mobilevit_xxs": (_timm("mobilevit_xxs"), (2, 3, 64, 64), {}),
    "timm_densenet121": (_timm("densenet121"), SMALL, {LEFT: 62}),
    "timm_lcnet_050": (_timm("lcnet_050"), SMALL, {}),
    "timm_ghostnet_050": (_timm("ghostnet_050"), SMALL, {}),
    # timm's frozen norm-act layers (FrozenBatchNormAct2d) throughout.
    "timm_regnetx_002_frozen": (lambda: freeze_batch_norm_2d(_timm("regnetx_002")()),
                                SMALL, {}),
}


ALL = list(MODELS)


@functools.cache
def _settled(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The torch model in float64 (eval mode) with non-default statistics and affine
    values, and an input for it; built once, each test deep-copies it."""
    build, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        model.train()(x)
        for m in model.modules():
            if is_torch_batch_norm(m) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval(), x


def model_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    model, x = _settled(name)
    return copy.deepcopy(model), x


def output(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    """The model's output in train or eval mode, as one tensor (the detection backbone
    gives a dict of feature maps); dropout masks drawn from the same seed."""
    torch.manual_seed(1)
    return output_of(model.train(train)(x))


def output_of(y: torch.Tensor | dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in y.values()]) if isinstance(y, dict) else y


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", ALL)
def test_converted_model_trains_and_infers_as_the_torch_model(name):
    model, x = model_and_input(name)
    converted = bn.convert(copy.deepcopy(model))
    assert not any(is_torch_batch_norm(m) for m in converted.modules())
    for m in (model, converted):
        output(m, x, train=True).square().sum().backward()
    torch.testing.assert_close(output(converted, x, False), output(model, x, False), **TOL64)
    for ours, theirs in zip(trainable(converted), trainable(model), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL64)
    ours = [m for m in converted.modules() if isinstance(m, bn.BatchNorm)]
    theirs = [m for m in model.modules() if is_torch_batch_norm(m)]
    for layer, torch_layer in zip(ours, theirs, strict=True):
        torch.testing.assert_close(layer.moving_mean, torch_layer.running_mean, **TOL64)
        torch.testing.assert_close(layer.moving_variance, torch_layer.running_var, **TOL64)


@pytest.mark.parametrize("name", ALL)
def test_torch_state_dict_loads_into_the_converted_model_and_comes_back(name):
    model, x = model_and_input(name)
    torch.manual_seed(2)
    converted = bn.convert(MODELS[name][0]().double())  # other weights, until loaded
    converted.load_state_dict(model.state_dict())
    torch.testing.assert_close(output(converted, x, False), output(model, x, False), **TOL64)
    back, not_converted = bn.to_torch(converted)
    assert not_converted == []
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    expected = model.state_dict()
    assert list(back.state_dict()) == list(expected)
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_fold_keeps_eval_outputs_and_accounts_for_every_batch_norm(name):
    model, x = model_and_input(name)
    converted = bn.convert(copy.deepcopy(model))
    result = bn.fold(converted, x)
    torch.testing.assert_close(output(result.model, x, False), output(model, x, False),
                               **TOL64)
    names = [n for n, m in converted.named_modules() if isinstance(m, bn.BatchNorm)]
    assert sorted(n for n, _ in result.folded + result.not_folded) == sorted(names)
    left: dict[str, int] = {}
    for _, reason in result.not_folded:
        fragment = next((f for f in MODELS[name][2] if f in reason), reason)
        left[fragment] = left.get(fragment, 0) + 1
    assert left == MODELS[name][2]


@pytest.mark.parametrize("name", ALL)
def test_fused_activations_keep_outputs(name):
    model, x = model_and_input(name)
    fused = bn.convert(copy.deepcopy(model), fuse_activation=True)
    for train in (False, True):
        torch.testing.assert_close(output(fused, x, train), output(model, x, train), **TOL64)


@pytest.mark.parametrize("name", ALL)
def test_converted_model_exports(name):
    model, x = model_and_input(name)
    converted = bn.convert(copy.deepcopy(model)).eval()
    exported = torch.export.export(converted, (x,)).module()  # eval mode, as exported
    torch.testing.assert_close(output_of(exported(x)), output(model, x, False), **TOL64)


@pytest.mark.parametrize("name", ALL)
def test_training_step_with_in_place_activations_matches_torch(name):
    # The models' own ReLU(inplace=True) and `out += identity` write into the outputs of
    # the converted layers; autograd would raise if one of them were saved for backward.
    model, x = model_and_input(name)
    model, x = model.float(), x.float()
    converted = bn.convert(copy.deepcopy(model))
    for m in (model, converted):
        optimizer = torch.optim.SGD(trainable(m), lr=0.1)
        output(m, x, train=True).square().mean().backward()
        optimizer.step()
    for ours, theirs in zip(trainable(converted), trainable(model), strict=True):
        torch.testing.assert_close(ours, theirs, **TOL32)
