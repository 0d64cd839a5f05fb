"""Set-up for the whole repository, before tests/conftest.py: Triton's interpreter without a
GPU; torchvision importable beside a CPU torch (tests/torchvision_import.py); and the
package's doctests of a module built on an optional extra (an engine integration, the Keras
front end), which need that extra: without it the module (which raises ImportError naming
the extra) is not collected."""

import importlib.util
import os
from importlib.util import find_spec
from pathlib import Path

import torch

# Without a GPU, Triton's kernels are tested in its interpreter on CPU tensors. Triton reads
# this when it is first imported and when its kernels are defined, so it is set here, first
# (before torchvision, imported below, can import Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
