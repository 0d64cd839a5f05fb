"""Specification of ``torch.compile`` across the layer's modes: in every mode (plain, renorm,
ghost batches, masked, adjustment, debias, fused activation) and both call modes (training,
inference), a compiled layer (one graph: ``fullgraph=True``) has eager's outputs, input and
parameter gradients and buffers, with ``dynamic=True`` and a batch size that changes from
call to call; on a CUDA device also under ``mode="reduce-overhead"`` (CUDA graphs).

One compiled module holds a layer per mode (its compilations take ~2 min on 2 cores), so one
run of eager and compiled copies serves every test. Tolerance: float32 rounding, 1e-5
(compiled code fuses and reorders the same float32 operations).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm as bn

pytestmark = pytest.mark.slow  # torch.compile's compilations: ~1 min together

FEATURES, LENGTH = 3, 5
BATCHES = (8, 12, 16)  # changing sizes, each a multiple of the ghost batch size
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _adjustment(shape):
    """The README's form: a feature-shaped scale and shift (fixed here, to compare runs)."""
    return torch.tensor([0.9, 1.0, 1.1]), torch.tensor([0.1, -0.1, 0.2])


MODES = {
    "plain": dict(),
    # Clipping that the first batches (std ~2, mean ~1 against the initial 1 and 0) do not
    # reach: r and d then depend on the renorm averages this call's update overwrites.
    "renorm": dict(renorm=True, renorm_momentum=0.5,
                   renorm_clipping={"rmin": 0.2, "rmax": 5.0, "dmax": 5.0}),
    "ghost": dict(virtual_batch_size=4),
    "masked": dict(),
    "adjustment": dict(adjustment=_adjustment),
    "debias": dict(debias=True),
    "activation": dict(activation="silu"),
}


class Modes(nn.Module):
    """A layer per mode, each normalizing its own input (the masked one with the mask)."""

    def __init__(self) -> None:
        super().__init__()
        # The variance rule left to the default (None): decided for each call's input, inside
        # the compiled graph.
        self.layers = nn.ModuleDict({name: bn.BatchNorm(FEATURES, momentum=0.5, **options)
                                     for name, options in MODES.items()})
        with torch.no_grad():
            for layer in self.layers.values():
                layer.gamma.uniform_(0.5, 1.5)
                layer.beta.uniform_(-0.5, 0.5)

    def forward(self, xs: dict, mask, training: bool) -> dict:
        return {name: layer(xs[name], training=training, mask=mask if name == "masked" else None)
                for name, layer in self.layers.items()}


def _run(model: nn.Module, layers: nn.ModuleDict, device: str = "cpu") -> list[dict]:
    """Training calls at each batch size, then inference calls, each with a backward: per
    call and mode, the output, the input and parameter gradients and the buffers after it."""
    records = []
    for training in (True, False):
        for n in BATCHES:
            g = torch.Generator().manual_seed(n)
            x = torch.randn(n, FEATURES, LENGTH, generator=g) * 2 + 1
            mask = torch.rand(n, LENGTH, generator=g) < 0.7
            dy = torch.randn(n, FEATURES, LENGTH, generator=g)
            x, mask, dy = x.to(device), mask.to(device), dy.to(device)
            xs = {name: x.clone().requires_grad_() for name in MODES}
            layers.zero_grad(set_to_none=True)
            outputs = model(xs, mask, training)
            sum((y * dy).sum() for y in outputs.values()).backward()
            records.append({name: {"y": outputs[name].detach(), "dx": xs[name].grad,
                                   "dgamma": layers[name].gamma.grad,
                                   "dbeta": layers[name].beta.grad,
                                   **{k: v.clone() for k, v in layers[name].named_buffers()}}
                            for name in MODES})
    return records


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], list[dict]]:
    """(eager, compiled) records of the same model from the same start."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Modes()
    compiled = copy.deepcopy(eager)
    try:
        return _run(eager, eager.layers), _run(
            torch.compile(compiled, dynamic=True, fullgraph=True), compiled.layers)
    finally:
        torch._dynamo.reset()


def _check(eager: list[dict], compiled: list[dict], mode: str) -> None:
    for call, (expected, got) in enumerate(zip(eager, compiled, strict=True)):
        what = f"{mode}, {'training' if call < len(BATCHES) else 'inference'} call {call}"
        for key, value in expected[mode].items():
            if value is None:
                assert got[mode][key] is None, (what, key)
                continue
            torch.testing.assert_close(got[mode][key], value, **TOLERANCE,
                                       msg=lambda m, at=f"{what}, {key}": f"{at}: {m}")
    assert compiled[-1][mode]["num_updates"].item() == len(BATCHES)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_layer_matches_eager_in_training_and_inference(runs, mode):
    _check(*runs, mode)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_compiled_layers_match_eager_on_cuda():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Modes().cuda()
    compiled = copy.deepcopy(eager)
    try:
        expected = _run(eager, eager.layers, "cuda")
        got = _run(torch.compile(compiled, mode="reduce-overhead", dynamic=True),
                   compiled.layers, "cuda")
    finally:
        torch._dynamo.reset()
    for mode in MODES:
        _check(expected, got, mode)
