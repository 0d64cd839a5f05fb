"""The public surface is small enough to hold in one's head: the ``__all__`` of
``batchnorm``, ``batchnorm.functional`` and ``batchnorm.tools`` name at most 35 things
together, the README documents each, and the packages show nothing else (internals are
imported from the modules that define them)."""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

import batchnorm
import batchnorm.functional
import batchnorm.tools

NAMESPACES = [batchnorm, batchnorm.functional, batchnorm.tools]
PUBLIC = sorted({name for namespace in NAMESPACES for name in namespace.__all__})
README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")

# Names the namespaces exported before the surface was cut, and the modules defining them.
INTERNALS = {
    "batchnorm.shapes": ["broadcast", "check_input", "mask_shape", "reduction_axes",
                         "resolve_axes", "values_per_feature"],
    "batchnorm.statistics": ["inference_statistics", "pooled_statistics", "renorm_correction",
                             "skip_reason", "update_state_"],
    "batchnorm.plan": ["synchronization_group"],
    "batchnorm.config": ["GHOST_LAYOUTS", "Adjustment"],
    "batchnorm.tools.keras_io": ["batchnorm_from_keras", "read_keras_batchnorms"],
    "batchnorm.tools.recalibrate": ["LayerRecalibration"],
}


def test_the_three_namespaces_export_at_most_35_names_together():
    assert len(PUBLIC) <= 35, f"{len(PUBLIC)} public names: {PUBLIC}"


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_documented_in_the_readme(name):
    # In backticks, alone or qualified (`functional.batch_norm`, `tools.Record`).
    assert re.search(rf"`(?:[\w.]+\.)?{re.escape(name)}`", README), \
        f"{name} is public but the README's API table does not name it"


@pytest.mark.parametrize("namespace", NAMESPACES, ids=lambda m: m.__name__)
def test_a_namespace_shows_only_its_api_and_submodules(namespace):
    shown = [name for name in dir(namespace) if not name.startswith("_")]
    helpers = sorted(name for name in shown if name not in namespace.__all__
                     and not isinstance(getattr(namespace, name), types.ModuleType))
    assert helpers == [], f"{namespace.__name__} shows internals outside __all__: {helpers}"


@pytest.mark.parametrize("namespace", NAMESPACES, ids=lambda m: m.__name__)
def test_every_name_in_all_exists(namespace):
    missing = [name for name in namespace.__all__ if not hasattr(namespace, name)]
    assert missing == []


@pytest.mark.parametrize(("module", "name"),
                         [(m, n) for m, names in INTERNALS.items() for n in names])
def test_an_internal_is_importable_from_its_module_and_not_public(module, name):
    assert hasattr(importlib.import_module(module), name)
    assert name not in PUBLIC


@pytest.mark.parametrize("name", INTERNALS["batchnorm.shapes"] + INTERNALS["batchnorm.statistics"]
                         + INTERNALS["batchnorm.plan"] + INTERNALS["batchnorm.config"])
def test_functional_still_finds_what_it_exported_before_without_listing_it(name):
    defining = next(m for m, names in INTERNALS.items() if name in names)
    assert getattr(batchnorm.functional, name) is getattr(importlib.import_module(defining), name)
    assert name not in dir(batchnorm.functional)


def test_functional_raises_attribute_error_for_a_name_it_never_had():
    with pytest.raises(AttributeError, match="no_such_name"):
        batchnorm.functional.no_such_name  # noqa: B018
