"""Deployment: a model with ``bn.BatchNorm`` layers exports in inference mode.

``torch.export`` (static and dynamic batch size) and, where the ``onnx`` packages are
installed, ONNX through torch's exporter give the eager outputs; ``torch.jit.trace``
works; ``torch.jit.script`` refuses at once, pointing to ``torch.export`` (torch 2.13
deprecates both ``torch.jit`` entry points in favour of ``torch.export``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import batchnorm as bn

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "plain": {},
    "renorm+debias": {"renorm": True, "debias": True, "renorm_clipping": {"rmax": 3.0}},
    "ghost+cumulative": {"virtual_batch_size": 4, "momentum": None},
}


def trained(model: nn.Module) -> nn.Module:
    """``model`` after a few training steps (moving averages away from 0/1), in eval mode."""
    with torch.no_grad():
        for _ in range(3):
            model.train()(torch.randn(16, 3, 8, 8) * 3 + 1)
    return model.eval()


def conv_model(**options) -> nn.Module:
    return trained(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), bn.BatchNorm(8, **options),
                                 nn.ReLU(), bn.BatchNorm((8, 6), axis=(1, 2))))


@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_torch_export_in_inference_mode_gives_the_eager_outputs(options):
    model = conv_model(**options)
    x = torch.randn(4, 3, 8, 8)
    exported = torch.export.export(model, (x,)).module()
    other = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(exported(other), model(other), rtol=0, atol=0)


def test_torch_export_with_a_dynamic_batch_size():
    model = trained(nn.Sequential(bn.BatchNorm(8, axis=-1)))  # the last axis, like Keras
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(4, 3, 8, 8),),
                                  dynamic_shapes=({0: batch},))
    for size in (1, 9):
        x = torch.randn(size, 3, 8, 8)
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


def test_exported_inference_leaves_the_moving_averages_alone():
    model = conv_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.export.export(model, (torch.randn(4, 3, 8, 8),)).module()(torch.randn(4, 3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_onnx_export_gives_the_eager_outputs(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch's exporter (dynamo=True) needs it
    onnxruntime = pytest.importorskip("onnxruntime")
    model = conv_model(**CONFIGS["renorm+debias"])
    x = torch.randn(4, 3, 8, 8)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notices
        torch.onnx.export(model, (x,), dynamo=True).save(str(path))
    session = onnxruntime.InferenceSession(str(path))
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), model(x).detach())


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torch_jit_trace_in_inference_mode_gives_the_eager_outputs():
    model = conv_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks are constant
        # check_trace=False: the check re-traces and compares graphs node by node, and the
        # second trace reuses per-rank values cached by the first (the same ops, numbered
        # differently); the outputs are compared below, at the traced and another size.
        traced = torch.jit.trace(model, torch.randn(4, 3, 8, 8), check_trace=False)
    for size in (4, 9):
        x = torch.randn(size, 3, 8, 8)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
def test_torch_jit_script_refuses_at_once_pointing_to_torch_export():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(bn.BatchNorm(4)))
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch\.jit\.script.*"
                                           r"torch\.export\.export\(model\.eval\(\), \(x,\)\)"):
        torch.jit.script(model)
