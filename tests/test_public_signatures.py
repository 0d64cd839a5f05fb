"""The public entry points keep their signatures: what ``help()``, ``inspect.signature``
and an IDE show of :class:`batchnorm.BatchNorm`, :func:`batchnorm.functional.batch_norm` and
:class:`batchnorm.keras.BatchNormalization` is what the release showed (the fixture
``fixtures/signatures/release_signatures.json``), and each option keyword they take is an
option of :class:`batchnorm.config.Options`, the one place the options are declared."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import pytest

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.config import CONFIG_FIELDS, BatchNormConfig

RELEASED = json.loads(
    (Path(__file__).parent / "fixtures" / "signatures" / "release_signatures.json").read_text())
OPTIONS = set(CONFIG_FIELDS)


def find(path: str) -> Any:
    module, _, name = path.rpartition(".")
    if module == "batchnorm.keras":  # batchnorm.keras chooses Keras's torch backend first
        pytest.importorskip("batchnorm.keras", reason="Keras 3 is not installed (extra 'keras')")
    return getattr(importlib.import_module(module), name)


def record(obj: Any) -> list[list[str | None]]:
    """``obj``'s signature as the fixture holds it: ``[name, kind, repr(default),
    annotation]`` a parameter (None for no default or annotation)."""
    return [[p.name, p.kind.name, None if p.default is p.empty else repr(p.default),
             None if p.annotation is p.empty else str(p.annotation)]
            for p in inspect.signature(obj).parameters.values()]


@pytest.mark.parametrize("path", sorted(RELEASED))
def test_a_public_signature_is_the_released_one(path):
    assert record(find(path)) == RELEASED[path]


def keyword_defaults(function: Any) -> dict[str, Any]:
    return {p.name: p.default for p in inspect.signature(function).parameters.values()
            if p.kind is p.KEYWORD_ONLY or p.default is not p.empty}


def test_the_layer_takes_every_option_with_its_default():
    # The layer's keywords beyond the options are not configuration (BatchNormConfig's
    # docstring names them); its defaults are the options' defaults.
    defaults = keyword_defaults(bn.BatchNorm.__init__)
    options = {name: value for name, value in defaults.items() if name in OPTIONS}
    assert set(options) == OPTIONS
    assert BatchNormConfig(**options) == BatchNormConfig()


def test_batch_norm_takes_only_options_as_option_keywords():
    not_options = {"training", "gamma", "beta", "mask", "process_group", "config"}
    keywords = set(keyword_defaults(F.batch_norm)) - not_options
    assert keywords <= OPTIONS, sorted(keywords - OPTIONS)


def test_the_keras_layer_takes_only_options_as_option_keywords():
    layer_class = find("batchnorm.keras.BatchNormalization")
    keywords = set(keyword_defaults(layer_class.__init__)) - {"process_group"}
    assert keywords <= OPTIONS, sorted(keywords - OPTIONS)
