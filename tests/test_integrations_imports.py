"""The engine integrations are optional: ``batchnorm.integrations`` imports no engine, and a
module whose engine is missing raises ``ImportError`` naming the extra to install."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# integration module -> the packages its engine may come as, the extra that installs it
ENGINES = {"lightning": (("pytorch_lightning", "lightning"), "lightning"),
           "accelerate": (("accelerate",), "accelerate")}


@pytest.mark.parametrize("module", ENGINES)
def test_a_missing_engine_raises_import_error_naming_the_extra(monkeypatch, module):
    packages, extra = ENGINES[module]
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)  # import of it raises ImportError
    monkeypatch.delitem(sys.modules, f"batchnorm.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf'pip install "batchnorm\[{extra}\]"'):
        importlib.import_module(f"batchnorm.integrations.{module}")


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s
def test_importing_the_package_imports_no_engine():
    engines = [p for packages, _ in ENGINES.values() for p in packages]
    code = ("import sys, batchnorm, batchnorm.integrations; "
            f"print([m for m in {engines!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"
