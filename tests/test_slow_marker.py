"""The ``slow`` marker's list (tests/conftest.py) names tests and fixtures that exist, so that
``python -m pytest -m "not slow"`` keeps leaving out what it is meant to."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import SLOW_FIXTURES, SLOW_TESTS

TESTS = Path(__file__).resolve().parent


def functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("file", sorted(SLOW_TESTS))
def test_every_slow_test_named_exists(file):
    names = SLOW_TESTS[file]
    assert (TESTS / file).is_file()
    if names is not None:
        assert names <= functions(TESTS / file), names - functions(TESTS / file)


def test_every_slow_fixture_named_exists_in_some_test_file():
    defined = set().union(*(functions(path) for path in TESTS.glob("test_*.py")))
    assert SLOW_FIXTURES <= defined


def test_the_marker_is_registered(pytestconfig):
    assert any(line.startswith("slow:") for line in pytestconfig.getini("markers"))
