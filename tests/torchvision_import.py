"""torchvision for the tests, importable beside a CPU torch whose operators it cannot load.

torchvision's compiled operators (``torchvision::nms``, ...) are built for one torch; where
they do not load (a CPU torch from another index than torchvision's wheel), ``import
torchvision`` fails in ``torchvision/_meta_registrations.py``, which registers fake
(meta) implementations of ``nms`` and ``qnms`` on operators that then do not exist. The
models never call these operators: :func:`import_torchvision` defines their schemas (what
``_meta_registrations.py`` registers fakes for) when the first import fails that way, and
imports again. A test workaround only: the package itself never imports torchvision.
"""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
import torch

# The operators _meta_registrations.py registers fakes for with register_fake (the others
# it registers only when the compiled library loaded), with torchvision's own schemas.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: the schemas live as long as it


def import_torchvision() -> ModuleType:
    """``torchvision``, imported (defining the missing operator schemas where needed), or
    the test skipped when it is not installed."""
    torchvision = importable_torchvision()
    if torchvision is None:
        pytest.skip("torchvision is not installed (pip install -e '.[zoo]')")
    return torchvision


def importable_torchvision() -> ModuleType | None:
    """``torchvision``, imported (defining the missing operator schemas where needed), or
    None when it is not installed. Run before anything that imports torchvision itself
    (PyTorch Lightning does, when it is installed)."""
    global _library
    try:
        import torchvision
    except ModuleNotFoundError:
        return None
    except RuntimeError as error:
        if "torchvision::" not in str(error) or _library is not None:
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # the half-imported package
        _library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS.values():
            _library.define(schema)
        import torchvision
    return torchvision
