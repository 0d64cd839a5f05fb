"""The help is enough to use the API: ``help(bn.BatchNorm)`` documents every argument,
``batchnorm.functional`` lists only its API, the command line names itself."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest

import batchnorm as bn
import batchnorm.functional
from batchnorm.apps import cli


def documented_arguments(doc: str) -> set[str]:
    """The names an ``Args:`` section documents (``name:`` or ``a, b, c:`` entries)."""
    section = doc.split("Args:", 1)[1]
    section = re.split(r"\n\s*\n(?=\S|\s{4}\S)", section, maxsplit=1)[0]
    names = set()
    for entry in re.findall(r"^ {8}(\S[^:\n]*(?:\n {12}[^:\n]*)?):", section, flags=re.M):
        names |= {n.strip() for n in entry.replace("\n", " ").split(",")}
    return names


def test_help_shows_the_constructor_s_signature():
    parameters = list(inspect.signature(bn.BatchNorm).parameters)  # what help() prints
    assert parameters[:3] == ["num_features", "axis", "momentum"]
    assert parameters == [p for p in inspect.signature(bn.BatchNorm.__init__).parameters
                          if p != "self"]


def test_help_of_batchnorm_documents_every_constructor_argument():
    parameters = [p for p in inspect.signature(bn.BatchNorm).parameters if p != "torch_style"]
    missing = [p for p in parameters if p not in documented_arguments(bn.BatchNorm.__doc__)]
    assert missing == [], f"not documented in BatchNorm's Args: {missing}"


def test_help_of_batchnorm_names_the_renorm_clipping_keys_and_ghost_layouts():
    doc = bn.BatchNorm.__doc__
    for key in ('"rmin"', '"rmax"', '"dmax"', '"strided"', '"consecutive"'):
        assert key in doc, key


def test_help_of_batchnorm_names_the_torch_aliases():
    doc = bn.BatchNorm.__doc__
    for alias in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked", "eps"):
        assert f"``{alias}``" in doc, alias


def test_functional_lists_only_its_api():
    public = [name for name in dir(batchnorm.functional) if not name.startswith("_")]
    extra = sorted(set(public) - set(batchnorm.functional.__all__))
    assert extra == [], f"public names of batchnorm.functional outside __all__: {extra}"
    assert set(batchnorm.functional.__all__) <= set(public)


@pytest.mark.parametrize(("argv0", "program"), [
    ("/home/user/venv/bin/batchnorm", "batchnorm"),
    ("/work/src/batchnorm/__main__.py", "python -m batchnorm"),
    ("", "python -m batchnorm"),
])
def test_cli_usage_line_names_how_it_was_invoked(monkeypatch, capsys, argv0, program):
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {program} [-h] command")


def test_python_m_batchnorm_help_names_python_m_batchnorm():
    result = subprocess.run([sys.executable, "-m", "batchnorm", "--help"], capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.startswith("usage: python -m batchnorm [-h] command")
    for command in ("demo", "walkthrough", "bench"):
        assert command in result.stdout
