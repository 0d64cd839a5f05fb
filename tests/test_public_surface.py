"""The public surface is small enough to hold in one's head: the ``__all__`` of
``batchnorm``, ``batchnorm.functional`` and ``batchnorm.tools`` name at most 35 things
together, the API reference (``docs/reference/``) documents each, and the packages show
nothing else (internals are imported from the modules that define them)."""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

import batchnorm
import batchnorm.functional
import batchnorm.kernels
import batchnorm.tools

NAMESPACES = [batchnorm, batchnorm.functional, batchnorm.tools]
PUBLIC = sorted({name for namespace in NAMESPACES for name in namespace.__all__})
REFERENCE = Path(__file__).parents[1] / "docs" / "reference"
# Documented beyond the three namespaces: the kernel registry the pages use.
KERNEL_NAMES = ["prefer", "KERNELS"]

# Names the namespaces exported before the surface was cut, and the modules defining them.
INTERNALS = {
    "batchnorm.shapes": ["broadcast", "check_input", "mask_shape", "reduction_axes",
                         "resolve_axes", "values_per_feature"],
    "batchnorm.statistics": ["inference_statistics", "pooled_statistics", "renorm_correction",
                             "skip_reason", "update_state_"],
    "batchnorm.plan": ["synchronization_group"],
    "batchnorm.state": ["statistics_dtype"],
    "batchnorm.config": ["GHOST_LAYOUTS", "Adjustment"],
    "batchnorm.tools.keras_io": ["batchnorm_from_keras", "read_keras_batchnorms"],
    "batchnorm.tools.recalibrate": ["LayerRecalibration"],
}


def test_the_three_namespaces_export_at_most_35_names_together():
    assert len(PUBLIC) <= 35, f"{len(PUBLIC)} public names: {PUBLIC}"


def resolve(path: str) -> object:
    """What a dotted path names as mkdocstrings reads it: a module before a package's
    attribute of the same name (``batchnorm.tools.fold`` is the module; the function is
    ``batchnorm.tools.fold.fold``)."""
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        parent, _, name = path.rpartition(".")
        return getattr(resolve(parent), name)


def rendered_objects() -> list[object]:
    """What the API reference pages render: mkdocstrings' ``::: dotted.path`` lines."""
    paths = [match for page in sorted(REFERENCE.glob("*.md"))
             for match in re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M)]
    return [resolve(path) for path in paths]


@pytest.mark.parametrize(("namespace", "name"),
                         [(ns, n) for ns in NAMESPACES for n in ns.__all__]
                         + [(batchnorm.kernels, n) for n in KERNEL_NAMES],
                         ids=lambda v: getattr(v, "__name__", v))
def test_every_public_name_is_rendered_in_the_api_reference(namespace, name):
    # Once, under any namespace that exports it (bn.convert is batchnorm.tools.convert).
    assert any(obj is getattr(namespace, name) for obj in rendered_objects()), \
        f"{namespace.__name__}.{name} is public but no page of docs/reference/ renders it"


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
                         + INTERNALS["batchnorm.plan"] + INTERNALS["batchnorm.config"]
                         + INTERNALS["batchnorm.state"])
def test_functional_still_finds_what_it_exported_before_without_listing_it(name):
    defining = next(m for m, names in INTERNALS.items() if name in names)
    assert getattr(batchnorm.functional, name) is getattr(importlib.import_module(defining), name)
    assert name not in dir(batchnorm.functional)


def test_functional_raises_attribute_error_for_a_name_it_never_had():
    with pytest.raises(AttributeError, match="no_such_name"):
        batchnorm.functional.no_such_name  # noqa: B018
