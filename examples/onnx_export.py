"""Export to ONNX and run it with onnxruntime: a model with ``bn.BatchNorm`` layers, in
inference mode, through torch's exporter (``torch.onnx.export(..., dynamo=True)``, built on
``torch.export``), with a dynamic batch size.

A small CNN trains for a few steps (so its moving averages are not the initial 0 and 1),
is exported in eval mode (inference normalizes with the moving averages, whatever the
training mode: here Batch Renormalization), and onnxruntime runs the file on batches of
other sizes than the one exported with. The script prints the largest difference
between onnxruntime's outputs and PyTorch's.

Run it from the repository root, with the ``onnx`` extra (onnx, onnxscript,
onnxruntime)::

    pip install -e ".[onnx]"
    python examples/onnx_export.py
"""

import tempfile
from pathlib import Path

import onnxruntime
import torch
from torch import nn

import batchnorm as bn

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, bias=False), bn.BatchNorm(8, renorm=True), nn.ReLU(),
    nn.Flatten(), nn.Linear(8 * 6 * 6, 4), bn.BatchNorm(4, axis=-1),
)
model.train()
with torch.no_grad():
    for _ in range(10):
        model(torch.randn(16, 3, 8, 8) * 2 + 1)
model.eval()

x = torch.randn(4, 3, 8, 8)
program = torch.onnx.export(model, (x,), dynamo=True, verbose=False,
                            dynamic_shapes=({0: torch.export.Dim("batch")},))
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "model.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
print("exported; ONNX operators:", ", ".join(node.op_type for node in program.model.graph))

input_name = session.get_inputs()[0].name
for size in (1, 4, 13):  # other batch sizes than the one exported with
    x = torch.randn(size, 3, 8, 8) * 2 + 1
    (onnx_output,) = session.run(None, {input_name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    difference = (torch.from_numpy(onnx_output) - expected).abs().max().item()
    # float32 on both sides; the two runtimes order the arithmetic differently.
    print(f"batch of {size}: max |onnxruntime - PyTorch| = {difference:.3g} "
          f"(outputs up to {expected.abs().max().item():.3g})")
