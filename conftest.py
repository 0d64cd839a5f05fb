"""Collection for the whole repository (tests/ has its own conftest.py): the package's
doctests of a module built on an optional extra (an engine integration, the Keras front end)
need that extra; without it the module (which raises ImportError naming the extra) is not
collected."""

import importlib.util
from importlib.util import find_spec
from pathlib import Path

# module -> the packages of its extra (any one of them)
_EXTRAS = {"src/batchnorm/integrations/lightning.py": ("pytorch_lightning", "lightning"),
           "src/batchnorm/integrations/accelerate.py": ("accelerate",),
           "src/batchnorm/keras.py": ("keras",)}

collect_ignore = [module for module, packages in _EXTRAS.items()
                  if not any(find_spec(package) for package in packages)]


def _load_torchvision() -> None:
    """Import torchvision where it is installed, through tests/torchvision_import.py (which
    defines the operator schemas a CPU torch from another index lacks), before PyTorch
    Lightning imports it on its own."""
    spec = importlib.util.spec_from_file_location(
        "torchvision_import", Path(__file__).parent / "tests" / "torchvision_import.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.importable_torchvision()


_load_torchvision()
