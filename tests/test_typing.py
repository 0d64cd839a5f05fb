"""The package's type information, as users' type checkers see it.

The package ships ``py.typed``, so mypy reads the installed package's annotations instead of
treating it as untyped (everything ``Any``, and ``import batchnorm`` itself an error under
``--strict``). A user's script that builds a layer, trains a step and uses the functional
API, ``bn.convert`` and a tool passes ``mypy --strict``; a type error in such a script is
reported, so that check can fail.

mypy runs the way a user runs it: in a folder of its own, without the repository's
configuration, against the package installed in this environment. Its cache is pytest's
(``.pytest_cache``), so that only the first run analyzes torch (about 30 s to 2 min on two
cores; a few seconds after that).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import batchnorm as bn
from batchnorm import config as config_module
from batchnorm import options as options_module
from batchnorm.torch_compat import TorchAlias

# A user's training script, using the public API with its types spelled out: every
# annotation is checked against what the package declares.
USER_SCRIPT = '''
import torch
from torch import Tensor, nn

import batchnorm as bn
from batchnorm import functional as F

model = nn.Sequential(nn.Conv2d(3, 8, 3), bn.BatchNorm(8, momentum=0.9), nn.ReLU())
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(4, 3, 8, 8)
with bn.deferred_updates() as updates:
    loss: Tensor = model(x).square().mean()
    torch.autograd.backward(loss)  # torch leaves Tensor.backward unannotated
    optimizer.step()
    updates.apply()

layer = bn.BatchNorm(8, axis=-1, epsilon=1e-5)
y: Tensor = layer(torch.randn(16, 8), training=True)
moving_mean: Tensor = layer.moving_mean
momentum: float | None = layer.config.momentum
decay: float | None = layer.momentum  # an option, read as the layer's property

state: F.BatchNormState = F.initial_state(8)
y, state = F.batch_norm(torch.randn(16, 8), state, training=True, axis=-1, momentum=0.9)
config = F.BatchNormConfig(axis=-1, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0})
renorm_state = F.initial_state(8, renorm=True)
y, stats = F.forward(torch.randn(16, 8), renorm_state, config, training=True)
if stats is not None:
    renorm_state = F.update_state(renorm_state, stats, momentum=config.momentum,
                                  epsilon=config.epsilon)

converted: nn.Module = bn.convert(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)))
back, not_converted = bn.to_torch(converted, torch.randn(2, 4))
reasons: list[tuple[str, str]] = not_converted
findings: list[bn.Finding] = bn.diagnose(model, x, verbose=False)
folded: bn.FoldResult = bn.fold(model, x)
pairs: list[tuple[str, str]] = folded.folded
report: bn.RecalibrationReport = bn.recalibrate(model, [x])
'''

# The same kind of script with one type error: a layer is not a tensor.
WRONG_SCRIPT = '''
from torch import Tensor

import batchnorm as bn

y: Tensor = bn.BatchNorm(8)
'''


def test_the_installed_package_is_marked_as_typed():
    assert resources.files("batchnorm").joinpath("py.typed").is_file()


def declared_functions() -> list[ast.FunctionDef]:
    """The functions of ``options.LayerProperties``'s source as type checkers see it (the
    class with a base; the one defined at run time is empty), where the layer's properties
    are declared."""
    tree = ast.parse(Path(options_module.__file__).read_text())
    (declaring,) = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                    and node.name == "LayerProperties" and node.bases]
    return [node for node in ast.walk(declaring) if isinstance(node, ast.FunctionDef)]


def declared_properties() -> dict[str, ast.FunctionDef]:
    """The properties ``options.LayerProperties`` declares, by name."""
    return {node.name: node for node in declared_functions()
            if any(ast.unparse(d) == "property" for d in node.decorator_list)}


def torch_aliases() -> dict[str, str]:
    """torch.nn's aliases the layer has (``TorchAlias.install``), with the attribute each reads."""
    return {name: value.target for name, value in vars(bn.BatchNorm).items()
            if isinstance(value, TorchAlias)}


def test_every_torch_alias_of_the_layer_is_declared_for_type_checkers():
    # The options' properties and torch.nn's aliases are installed at run time (options.install,
    # TorchAlias.install), which type checkers do not see: without a declaration, mypy types
    # layer.weight as `Tensor | Module` (nn.Module.__getattr__). The options are declared by
    # their fields (LayerProperties is a subclass of config.Options for type checkers, which
    # test_the_layer_s_options_and_aliases_have_their_types_for_type_checkers checks); each
    # alias is declared, read-only (no setter), in that base class of the layer.
    aliases = torch_aliases()
    assert aliases, "TorchAlias.install installed no alias on the layer"
    declared = declared_properties()
    assert sorted(declared) == sorted(aliases)
    assert sorted(node.name for node in declared_functions()) == sorted(declared)  # no setter
    assert issubclass(bn.BatchNorm, options_module.LayerProperties)


def options_script() -> str:
    """A script revealing, to mypy, each option's type on a layer and on a config, each torch
    alias's and its target's type on a layer, and assigning an option of each."""
    lines = ["import batchnorm as bn", "from batchnorm import functional as F",
             "layer = bn.BatchNorm(8)", "config = F.BatchNormConfig()"]
    lines += [f"reveal_type({owner}.{name})" for name in config_module.CONFIG_FIELDS
              for owner in ("layer", "config")]
    lines += [f"reveal_type(layer.{name})" for pair in torch_aliases().items() for name in pair]
    lines += ["layer.momentum = 0.5", "config.momentum = 0.5"]
    return "".join(line + "\n" for line in lines)


@pytest.fixture(scope="module")
def mypy_output(pytestconfig, tmp_path_factory) -> dict[str, str]:
    """``mypy --strict``'s report on each script, by script name (one run for both)."""
    pytest.importorskip("mypy", reason="mypy is not installed (extra 'dev')")
    cache = getattr(pytestconfig, "cache", None)  # None with -p no:cacheprovider
    cache_dir = cache.mkdir("mypy") if cache is not None else tmp_path_factory.mktemp("mypy")
    folder = tmp_path_factory.mktemp("user")
    scripts = {"user_script.py": USER_SCRIPT, "wrong_script.py": WRONG_SCRIPT,
               "options_script.py": options_script()}
    for name, text in scripts.items():
        (folder / name).write_text(text)
    # --config-file "": no configuration file, wherever the folder is.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "", "--cache-dir",
         str(cache_dir), "--no-error-summary", "--show-error-codes", *scripts],
        cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr  # 2: mypy itself failed
    return {name: "".join(line + "\n" for line in done.stdout.splitlines()
                          if Path(line.split(":", 1)[0]).name == name)
            for name in scripts}


def test_a_user_script_passes_mypy_strict(mypy_output):
    assert mypy_output["user_script.py"] == ""


def test_a_type_error_in_a_user_script_is_reported(mypy_output):
    report = mypy_output["wrong_script.py"]
    assert report.startswith("wrong_script.py:6: error: "), report  # y: Tensor = a layer
    assert "[assignment]" in report, report


def test_the_layer_s_options_and_aliases_have_their_types_for_type_checkers(mypy_output):
    # An option reads as the config's field, but axis as given (an int or a tuple) and
    # renorm_clipping as a dict (the config keeps a tuple and (key, value) pairs); an alias
    # as what it reads; both read-only.
    report = mypy_output["options_script.py"]
    revealed = re.findall(r'Revealed type is "(.*)"', report)
    options = len(config_module.CONFIG_FIELDS)
    as_given = {"axis": "int | tuple[int, ...]", "renorm_clipping": "dict[str, float] | None"}
    for name, on_layer, on_config in zip(config_module.CONFIG_FIELDS, revealed[0:2 * options:2],
                                         revealed[1:2 * options:2], strict=True):
        assert on_layer == as_given.get(name, on_config), name
    aliases = revealed[2 * options:]
    assert len(aliases) == 2 * len(torch_aliases())
    assert aliases[0::2] == aliases[1::2]
    assert len(re.findall(r'Property "momentum" .* is read-only', report)) == 2, report
