"""The scripts in ``examples/`` run as their docstrings say to run them (a subprocess, from
the repository root) and print what they claim: a folded model, accumulated updates, an
imported Keras layer, an ONNX export and synchronized processes each give the outputs or
statistics of what they stand in for, within float32 rounding.

Each run takes 5 to 25 s on the shared 2-core machine (torch's imports, then Keras's, the
exporter, two processes): they are ``slow``. The Keras and ONNX examples need the
``examples`` extra and are skipped without it.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Seconds one example may take: each runs in seconds, but a loaded 2-core machine has
# stretched a 5 s run past 40 s (numba loading its cache, torch's imports); 300 s means a hang.
TIMEOUT = 300
# float32 on both sides of every comparison, the arithmetic ordered differently: a few
# units in the last place of outputs of magnitude about 1, so 1e-5 relative to the largest
# output (the examples print 1e-7 to 5e-7).
FLOAT32 = 1e-5
TESTED = {"fold_for_deployment.py", "gradient_accumulation.py", "keras_import.py",
          "onnx_export.py", "distributed_cpu.py"}

NUMBER = r"([-+0-9.e]+|nan|inf)"


def run(*command: str | Path) -> str:
    """Run ``command`` from the repository root, one thread per process (the examples' tensors
    are small); return its standard output, failing with its standard error when it fails.
    The command's whole process group is killed after :data:`TIMEOUT` (torchrun's workers
    too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    process = subprocess.Popen([str(part) for part in command], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command} ran past {TIMEOUT} s; its output:\n{stdout}\n{stderr[-3000:]}")
    assert process.returncode == 0, f"{command} exited {process.returncode}:\n{stderr[-3000:]}"
    return stdout


def example(name: str) -> str:
    return run(sys.executable, EXAMPLES / name)


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip a test when one of ``modules`` is not installed (looked up, not imported: Keras
    picks its backend when imported)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {missing}: pip install -e "
                                                    '".[examples]"')


def differences(output: str, label: str) -> list[tuple[float, float]]:
    """Every ``<label> = difference (outputs up to largest)`` the output prints."""
    found = re.findall(rf"{re.escape(label)} = {NUMBER} \(outputs up to {NUMBER}\)", output)
    return [(float(d), float(largest)) for d, largest in found]


def test_every_example_is_tested_here():
    assert {path.name for path in EXAMPLES.glob("*.py")} == TESTED


@pytest.mark.parametrize("name", sorted(TESTED))
def test_every_example_says_what_it_shows_and_how_to_run_it(name):
    docstring = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
    assert docstring and len(docstring.split("\n\n")[0]) > 40, "says what it shows"
    assert re.search(rf"^    (python|torchrun .*) examples/{name}$", docstring, re.MULTILINE)


@pytest.mark.slow
def test_folding_removes_every_batch_norm_and_keeps_the_outputs():
    output = example("fold_for_deployment.py")
    assert "batch norms: 3 before, 0 after folding" in output
    [(difference, largest)] = differences(output, "max |folded - original|")
    assert difference <= FLOAT32 * max(largest, 1.0)


@pytest.mark.slow
def test_accumulation_updates_once_as_one_call_on_the_whole_batch_would():
    output = example("gradient_accumulation.py")
    pattern = (r"(\S+): (\d+) update\(s\) for 1 step; moving mean max \|difference\| "
               rf"{NUMBER}, moving variance max relative difference {NUMBER}")
    results = {name: (int(n), float(mean), float(variance))
               for name, n, mean, variance in re.findall(pattern, output)}
    updates, mean, variance = results["bn.accumulate"]
    # The moving averages are of magnitude 1 (inputs scaled by 2): FLOAT32 absolute for the
    # mean, relative for the variance.
    assert updates == 1 and mean <= FLOAT32 and variance <= FLOAT32
    # torch.nn on the same loop: an update per micro-batch, and averages far from the
    # whole batch's (the example's point): 100 times the rounding at least.
    updates, mean, variance = results["torch.nn"]
    assert updates == 4 and max(mean, variance) > 100 * FLOAT32


@pytest.mark.slow
@needs("keras")
def test_keras_layers_loaded_from_a_saved_model_give_keras_outputs():
    output = example("keras_import.py")
    found = differences(output, "max |bn - Keras|")
    assert len(found) == 2, output  # the model's two BatchNormalization layers
    for difference, largest in found:
        assert difference <= FLOAT32 * max(largest, 1.0)


@pytest.mark.slow
@needs("onnx", "onnxscript", "onnxruntime")
def test_onnxruntime_runs_the_export_with_the_pytorch_outputs_at_every_batch_size():
    output = example("onnx_export.py")
    found = differences(output, "max |onnxruntime - PyTorch|")
    assert len(found) == 3, output  # batches of 1, 4 and 13
    for difference, largest in found:
        assert difference <= FLOAT32 * max(largest, 1.0)


@pytest.mark.slow
def test_synchronized_processes_train_as_one_process_on_the_whole_batch():
    # torchrun as the docstring says, from this interpreter's environment; --standalone: a
    # free port, not the default 29500 another job may hold.
    output = run(sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", EXAMPLES / "distributed_cpu.py")
    match = re.search(rf"2 processes, 5 steps: .* to {NUMBER} \(max \|difference\|\)", output)
    assert match, output
    # Weights below 1, moving variances about 1: FLOAT32 absolute.
    assert float(match[1]) <= FLOAT32
