"""The layer's state dict: its layout version and the migration of older layouts, checkpoints
saved by an earlier release, and strict and non-strict loading through a parent module."""

from __future__ import annotations

import copy
import pathlib
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import batchnorm as bn
from batchnorm import checkpoint

RELEASE = pathlib.Path(__file__).parent / "fixtures" / "checkpoint" / "release_state_dicts.pt"


def saved_by_release() -> dict:
    """State dicts of ``tools/make_checkpoint_fixture.py``, saved before the layout had a
    version (nn.Module's default version 1 in their metadata)."""
    return torch.load(RELEASE, weights_only=True)


def trained(**kwargs) -> bn.BatchNorm:
    """A layer whose parameters and statistics differ from their initial values."""
    layer = bn.BatchNorm(3, momentum=0.9, **kwargs)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 1.5, generator=generator)
    layer(torch.randn(8, 3, generator=generator) * 2 + 1, training=True)
    return layer


def values(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_equal_values(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key  # copies of the same numbers: bit-identical


# ---------------------------------------------------------------- layout version


def test_the_state_dict_records_the_layout_version():
    model = nn.Sequential(nn.Linear(3, 3), bn.BatchNorm(3))
    assert model.state_dict()._metadata["1"]["version"] == checkpoint.VERSION == 2


@pytest.mark.parametrize("version", [None, 1])
def test_an_older_layout_is_migrated_before_loading(version, monkeypatch):
    upgraded = []

    def upgrade(state_dict, prefix):  # a layout change would rename or convert keys here
        upgraded.append(prefix)
        state_dict[prefix + "moving_mean"] = state_dict[prefix + "moving_mean"] + 1

    monkeypatch.setitem(checkpoint.MIGRATIONS, 1, upgrade)
    source = trained().state_dict()
    model = nn.Sequential(bn.BatchNorm(3))
    state_dict = OrderedDict((f"0.{k}", v) for k, v in source.items())
    if version is not None:
        state_dict._metadata = {"0": {"version": version}}
    model.load_state_dict(state_dict)
    assert upgraded == ["0."]
    assert torch.equal(model[0].moving_mean, source["moving_mean"] + 1)  # exact: x + 1 both


def test_the_current_layout_is_not_migrated(monkeypatch):
    monkeypatch.setitem(checkpoint.MIGRATIONS, 1, lambda state_dict, prefix: pytest.fail())
    source = nn.Sequential(trained()).state_dict()
    model = nn.Sequential(bn.BatchNorm(3))
    model.load_state_dict(source)
    assert_equal_values(model, source)


def test_a_newer_layout_raises_naming_the_version_and_changes_nothing():
    source = nn.Sequential(trained()).state_dict()
    source._metadata["0"]["version"] = checkpoint.VERSION + 1
    model = nn.Sequential(bn.BatchNorm(3))
    before = values(model)
    with pytest.raises(RuntimeError, match=f"layout version {checkpoint.VERSION + 1}.*"
                                           "upgrade batchnorm"):
        model.load_state_dict(source)
    assert_equal_values(model, before)


def test_a_torch_nn_checkpoint_is_not_read_as_a_newer_layout():
    torch_layer = nn.BatchNorm1d(3)
    torch_layer.running_mean.fill_(0.5)
    source = nn.Sequential(torch_layer).state_dict()  # torch's _BatchNorm saves version 2
    source._metadata["0"]["version"] = checkpoint.VERSION + 1
    model = nn.Sequential(bn.BatchNorm(3))
    model.load_state_dict(source)
    assert torch.equal(model[0].moving_mean, torch_layer.running_mean)


# ---------------------------------------------------------------- checkpoints of a release


@pytest.mark.parametrize("name", ["default", "renorm", "debias", "no_center_no_scale", "lazy"])
@pytest.mark.parametrize("metadata", [True, False])
def test_a_release_checkpoint_loads_unchanged_and_gives_the_release_outputs(name, metadata):
    saved = saved_by_release()["layers"][name]
    state_dict = saved["state_dict"] if metadata else dict(saved["state_dict"])  # no version
    kwargs = dict(saved["kwargs"])
    layer = bn.BatchNorm(kwargs.pop("num_features"), momentum=0.9, **kwargs)
    layer.load_state_dict(state_dict)
    assert_equal_values(layer, saved["state_dict"])
    # The release's inference output for the same input: float32 arithmetic in the same order
    # on a CPU; 1e-6 allows for another machine's vector width in the kernels.
    torch.testing.assert_close(layer(saved["x"], training=False), saved["y"],
                               rtol=1e-6, atol=1e-6)


def test_a_release_checkpoint_of_an_unbuilt_lazy_layer_leaves_it_unbuilt():
    saved = saved_by_release()["layers"]["lazy_unbuilt"]
    layer = bn.BatchNorm(None, momentum=0.9)
    layer.load_state_dict(saved["state_dict"])
    assert layer.num_features is None and is_lazy(layer.gamma)


def test_a_release_checkpoint_of_a_model_loads_into_its_layers():
    saved = saved_by_release()["model"]
    model = nn.Sequential(bn.BatchNorm(3, momentum=0.9), bn.BatchNorm(3, momentum=0.9,
                          renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0}))
    model.load_state_dict(saved)
    assert_equal_values(model, saved)


# ---------------------------------------------------------------- strict and non-strict


@pytest.mark.parametrize("lazy", [False, True])
def test_strict_loading_of_the_layer_itself_loads_nothing_if_a_key_is_missing(lazy):
    source = trained().state_dict()
    del source["moving_variance"]
    layer = bn.BatchNorm(None if lazy else 3)
    before = copy.deepcopy(layer)
    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\).*"moving_variance".*all or '
                                           "nothing"):
        layer.load_state_dict(source)
    if lazy:
        assert layer.num_features is None and is_lazy(layer.gamma)
    else:
        assert_equal_values(layer, values(before))


def test_strict_loading_through_a_parent_reports_a_missing_key_as_torch_does():
    """torch passes strict=True to each module whatever the user asked, and raises for
    missing keys after loading the keys present, for its own layers as for this one."""
    source = nn.Sequential(nn.Linear(3, 3), trained()).state_dict()
    del source["1.moving_variance"]
    model = nn.Sequential(nn.Linear(3, 3), bn.BatchNorm(3))
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"1.moving_variance"'):
        model.load_state_dict(source)
    assert torch.equal(model[1].moving_mean, source["1.moving_mean"])
    assert torch.equal(model[1].moving_variance, torch.ones(3))  # its initial value, kept


def test_non_strict_loading_through_a_parent_loads_the_keys_present():
    layer = trained()
    source = {f"1.{k}": v for k, v in layer.state_dict().items() if k != "moving_variance"}
    model = nn.Sequential(nn.Linear(3, 3), bn.BatchNorm(3))
    result = model.load_state_dict(source, strict=False)
    assert result.missing_keys == ["0.weight", "0.bias", "1.moving_variance"]
    assert torch.equal(model[1].moving_mean, layer.moving_mean)
    assert torch.equal(model[1].moving_variance, torch.ones(3))  # its initial value, kept


def test_non_strict_loading_of_the_layer_itself_loads_the_keys_present():
    layer = trained()
    source = {k: v for k, v in layer.state_dict().items() if k != "moving_variance"}
    fresh = bn.BatchNorm(3)
    result = fresh.load_state_dict(source, strict=False)
    assert result.missing_keys == ["moving_variance"]
    assert torch.equal(fresh.moving_mean, layer.moving_mean)
    assert torch.equal(fresh.moving_variance, torch.ones(3))  # its initial value, kept


def test_non_strict_loading_through_a_parent_still_loads_nothing_of_a_layer_with_a_bad_value():
    source = nn.Sequential(nn.Linear(3, 3), trained()).state_dict()
    source["1.moving_mean"] = torch.zeros(4)
    model = nn.Sequential(nn.Linear(3, 3), bn.BatchNorm(3))
    before = values(model[1])
    with pytest.raises(RuntimeError, match="size mismatch for 1.moving_mean"):
        model.load_state_dict(source, strict=False)
    assert_equal_values(model[1], before)
