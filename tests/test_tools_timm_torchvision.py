"""bn.convert, bn.to_torch and bn.fold on the batch-norm layers of timm and torchvision.

timm's ``BatchNormAct2d`` and ``SyncBatchNormAct`` (a torch.nn batch norm followed by
their ``drop`` and ``act`` modules), its ``FrozenBatchNormAct2d`` and torchvision's
``FrozenBatchNorm2d`` (fixed statistics and affine buffers). Checked against the layers
themselves in float64, within rtol = atol = 1e-10: both compute the same per-channel
normalization, associated differently (ATen's kernel or ``x * scale + shift`` against
batchnorm's), which differs by a few float64 ulps (about 1e-16 relative), far inside it.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn
from torchvision_import import import_torchvision

import batchnorm as bn

# The module (bn.tools.convert is the function).
convert_module = importlib.import_module("batchnorm.tools.convert")

TOL = {"rtol": 1e-10, "atol": 1e-10}

torchvision = import_torchvision()
norm_act = pytest.importorskip("timm.layers.norm_act", reason="timm is not installed (extra 'zoo')")

pytestmark = pytest.mark.usefixtures("one_thread")


def settled(layer: nn.Module) -> nn.Module:
    """``layer`` in float64 with statistics and affine values other than their defaults."""
    layer = layer.double()
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(layer, name).uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return layer


def run(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    return model.train(train)(x.clone())


@pytest.mark.parametrize("cls", ["BatchNormAct2d", "SyncBatchNormAct"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU])
def test_convert_fuses_the_relu_or_silu_of_a_timm_batch_norm_act(cls, act):
    timm_layer = settled(getattr(norm_act, cls)(4, act_layer=act) if cls == "BatchNormAct2d"
                         else norm_act.convert_sync_batchnorm(
                             norm_act.BatchNormAct2d(4, act_layer=act)))
    expected = copy.deepcopy(timm_layer)
    layer = bn.convert(timm_layer)
    assert type(layer) is bn.BatchNorm and layer.activation == act.__name__.lower()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for train in (True, False):
        torch.testing.assert_close(run(layer, x, train), run(expected, x, train), **TOL)
    torch.testing.assert_close(layer.moving_variance, expected.running_var, **TOL)
    back, not_converted = bn.to_torch(layer)
    assert type(back) is getattr(norm_act, cls) and type(back.act) is act
    assert not_converted == []
    torch.testing.assert_close(run(back, x, False), run(expected, x, False), **TOL)


def test_convert_keeps_an_activation_it_cannot_fuse_and_the_drop_layer_as_modules():
    timm_layer = settled(norm_act.BatchNormAct2d(4, act_layer=nn.Hardswish,
                                                 drop_layer=lambda: nn.Dropout(0.5)))
    expected = copy.deepcopy(timm_layer)
    converted = bn.convert(nn.Sequential(timm_layer))
    block = converted[0]
    assert type(block) is convert_module.BatchNormAct and type(block.bn) is bn.BatchNorm
    assert (type(block.drop), type(block.act)) == (nn.Dropout, nn.Hardswish)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(run(block, x, False), run(expected, x, False), **TOL)
    torch.manual_seed(1)
    trained = run(block, x, True)
    torch.manual_seed(1)  # the same dropout mask
    torch.testing.assert_close(trained, run(expected, x, True), **TOL)
    back, _ = bn.to_torch(converted)
    assert type(back[0]) is norm_act.BatchNormAct2d
    assert (back[0].drop, back[0].act) == (block.drop, block.act)


def test_converted_timm_layers_load_the_timm_state_dict():
    # GELU: kept as a module in a BatchNormAct; ReLU: fused into the layer.
    timm_model = nn.Sequential(settled(norm_act.BatchNormAct2d(4, act_layer=nn.GELU)),
                               settled(norm_act.BatchNormAct2d(4)))
    converted = bn.convert(nn.Sequential(norm_act.BatchNormAct2d(4, act_layer=nn.GELU),
                                         norm_act.BatchNormAct2d(4))).double()
    converted.load_state_dict(timm_model.state_dict())
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(run(converted, x, False), run(timm_model, x, False), **TOL)


@pytest.mark.parametrize("frozen", ["torchvision", "timm"])
def test_convert_makes_frozen_layers_frozen_batch_norms_and_to_torch_gives_them_back(frozen):
    cls = (torchvision.ops.misc.FrozenBatchNorm2d if frozen == "torchvision"
           else norm_act.FrozenBatchNormAct2d)
    original = settled(cls(4))
    expected = copy.deepcopy(original)
    layer = bn.convert(original)
    assert type(layer) is bn.BatchNorm and not layer.trainable
    assert layer.activation == (None if frozen == "torchvision" else "relu")
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for train in (True, False):  # frozen: the moving statistics in training mode too
        torch.testing.assert_close(run(layer, x, train), run(expected, x, False), **TOL)
    assert int(layer.num_updates) == 0
    back, not_converted = bn.to_torch(layer)
    assert type(back) is cls and not_converted == []
    torch.testing.assert_close(run(back, x, False), run(expected, x, False), **TOL)


@pytest.mark.parametrize("frozen", ["torchvision", "timm"])
def test_fold_folds_frozen_layers(frozen):
    cls = (torchvision.ops.misc.FrozenBatchNorm2d if frozen == "torchvision"
           else norm_act.FrozenBatchNormAct2d)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), settled(cls(4))).double()
    for converted in (False, True):
        if converted:
            model = bn.convert(model)
        result = bn.fold(model)
        assert (result.folded, result.not_folded) == ([("1", "0")], [])
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(result.model(x), model.eval()(x), **TOL)


def test_fold_keeps_the_drop_and_activation_of_a_timm_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), settled(norm_act.BatchNormAct2d(
        4, act_layer=nn.Hardswish, drop_layer=lambda: nn.Dropout(0.5)))).double()
    result = bn.fold(model)
    assert result.folded == [("1", "0")]
    assert [type(m) for m in result.model[1]] == [nn.Dropout, nn.Hardswish]
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(result.model(x), model.eval()(x), **TOL)


@pytest.mark.parametrize("frozen", ["torchvision", "timm"])
def test_converted_frozen_layer_loads_the_frozen_layers_state_dict(frozen):
    # Frozen state dicts have no num_batches_tracked: neither has the converted layer's.
    cls = (torchvision.ops.misc.FrozenBatchNorm2d if frozen == "torchvision"
           else norm_act.FrozenBatchNormAct2d)
    original = settled(cls(4))
    layer = bn.convert(cls(4).double())
    layer.load_state_dict(original.state_dict())
    assert list(layer.state_dict()) == ["gamma", "beta", "moving_mean", "moving_variance"]
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(run(layer, x, False), run(original, x, False), **TOL)
