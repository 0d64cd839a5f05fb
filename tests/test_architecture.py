"""The package's shape: imports run one way (no cycle, counting imports inside functions),
no module imports another module's private names, and the core never imports the tools or
the applications (see docs/architecture.md)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "batchnorm"
ROOT = "batchnorm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(imported package module, names taken from it, line)`` for every import statement in
    module ``name``, at any depth (functions included), resolved to the package's modules."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from .kernels import cpu` imports a module
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                else:
                    found.append((source, [alias.name], node.lineno))
    return [(m, names, line) for m, names, line in found if m in MODULES]


def edges(name: str) -> set[str]:
    """The package modules importing ``name`` runs: each one imported, and the packages above
    it (their ``__init__`` runs first), except the root and those that contain ``name``."""
    out = set()
    for target, _, _ in imports(name):
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            step = ".".join(parts[:i])
            if step != name and not name.startswith(step + "."):
                out.add(step)
    return out


def test_the_package_has_the_modules_this_test_reads() -> None:
    assert {"batchnorm.layer", "batchnorm.functional", "batchnorm.config", "batchnorm.state",
            "batchnorm.kernels", "batchnorm.kernels.cpu", "batchnorm.kernels.cpu.kernel",
            "batchnorm.kernels.triton", "batchnorm.kernels.layout", "batchnorm.tools.convert",
            "batchnorm.apps.bench"} <= set(MODULES)


def test_no_import_cycle() -> None:
    graph = {name: edges(name) for name in MODULES if name != ROOT}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_is_imported_from_another_module(name: str) -> None:
    private = [(source, n, line) for source, names, line in imports(name) for n in names
               if n.startswith("_") and source != name]
    assert not private, f"{name} imports private names: {private}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n != ROOT
                                        and not n.startswith(("batchnorm.tools",
                                                              "batchnorm.apps",
                                                              "batchnorm.__main__"))))
def test_the_core_imports_neither_tools_nor_apps(name: str) -> None:
    upward = [(target, line) for target, _, line in imports(name)
              if target.startswith(("batchnorm.tools", "batchnorm.apps"))]
    assert not upward, f"core module {name} imports {upward}"


DEVICE_PACKAGES = ("batchnorm.kernels.cpu", "batchnorm.kernels.triton")


def device_code(target: str) -> str | None:
    """The device package ``target`` belongs to, or None for code every device shares. A name
    prefix: a module beside the package named for its device (``kernels.cpu_passes``) counts
    as that device's code too."""
    return next((p for p in DEVICE_PACKAGES if target.startswith(p)), None)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if device_code(n)))
def test_a_device_package_imports_no_other_devices_code(name: str) -> None:
    # The memory layout both four-pass kernels walk is kernels.layout, shared code.
    other = [(target, line) for target, _, line in imports(name)
             if device_code(target) not in (None, device_code(name))]
    assert not other, f"{name} imports another device's code: {other}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("batchnorm.")
                                        and not device_code(n) and n != "batchnorm.kernels"))
def test_only_the_registry_and_the_plans_import_a_device_package(name: str) -> None:
    # The inference path reaches a device's loop through kernels.protocol.INFERENCE_PASSES,
    # training through kernels.FAST_PATHS, the moving-average update through
    # statistics.UPDATE_LOOPS; outside the registry only the applications name a device.
    allowed = {n for n in MODULES if n.startswith("batchnorm.apps")}
    direct = [(target, line) for target, _, line in imports(name) if device_code(target)]
    assert name in allowed or not direct, f"{name} imports device code: {direct}"


def test_the_checks_see_a_cycle_and_a_private_import(tmp_path: Path, monkeypatch) -> None:
    # The checks above must be able to fail: a made-up pair of modules that import each other,
    # one of them a private name.
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from .fake_b import _helper\n")
    b.write_text("def f():\n    from . import fake_a\n")
    monkeypatch.setitem(MODULES, "batchnorm.fake_a", a)
    monkeypatch.setitem(MODULES, "batchnorm.fake_b", b)
    assert imports("batchnorm.fake_a") == [("batchnorm.fake_b", ["_helper"], 1)]
    with pytest.raises(AssertionError, match="private"):
        test_no_private_name_is_imported_from_another_module("batchnorm.fake_a")
    a.write_text("from . import fake_b\n")
    b.write_text("def f():\n    from . import fake_a\n")
    assert edges("batchnorm.fake_a") == {"batchnorm.fake_b"}
    assert edges("batchnorm.fake_b") == {"batchnorm.fake_a"}
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle()


def modules_entered(call) -> list[str]:
    """The package's modules whose code ``call()`` runs, in the order first entered."""
    entered: list[str] = []

    def profile(frame, event, arg) -> None:
        name = frame.f_globals.get("__name__", "")
        if event == "call" and name.startswith("batchnorm") and name not in entered:
            entered.append(name)
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return entered


def test_a_training_call_enters_few_modules() -> None:
    # One call path: the layer, its plan (the checks and the kernel choice), the kernel and
    # the update. A first call of a layer (the checks, the kernel choice, the update
    # prepared) at most 10 modules; a planned call at most 6 (measured: 10 and 6).
    import torch

    import batchnorm as bn
    layer = bn.BatchNorm(64)
    x = torch.randn(32, 64)
    first = modules_entered(lambda: layer(x, training=True))
    planned = modules_entered(lambda: layer(x, training=True))
    assert len(first) <= 10, first
    assert len(planned) <= 6, planned
    assert int(layer.num_updates) == 2  # both calls did update


def test_the_layer_module_stays_small_and_nothing_reads_frames() -> None:
    """The layer's module holds the layer only (torch.nn compatibility, state-dict checks and
    the regularization helpers live in modules of their own): at most 600 lines. No module
    reads the interpreter's frames (``sys._getframe``) to learn its caller's arguments."""
    assert len((PACKAGE / "layer.py").read_text().splitlines()) <= 600
    for name, path in MODULES.items():
        assert "_getframe" not in path.read_text(), name
