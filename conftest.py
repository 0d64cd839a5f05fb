"""Collection for the whole repository (tests/ has its own conftest.py): the package's
doctests of an engine integration need that engine, an optional extra; without it the
module (which raises ImportError naming the extra) is not collected."""

from importlib.util import find_spec

_ENGINES = {"lightning": ("pytorch_lightning", "lightning"), "accelerate": ("accelerate",)}

collect_ignore = [f"src/batchnorm/integrations/{module}.py"
                  for module, packages in _ENGINES.items()
                  if not any(find_spec(package) for package in packages)]
