"""Specification: writing a layer's buffers between forward and backward (a second training
call, DDP's ``broadcast_buffers``, an EMA of the statistics, ``load_state_dict``) neither breaks
backward nor changes the gradients, in every mode and kernel, in training and in inference.

Gradients are compared with ``torch.equal``: with and without the write, backward runs the
same operations on the same saved values, so they agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import batchnorm as bn

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = {
    "plain": {},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}},
    "ghost": {"virtual_batch_size": 4},
    "masked": {},
    "debias": {"debias": True},
    "renorm_debias_ghost": {"renorm": True, "debias": True, "virtual_batch_size": 4},
}
# kernel -> (layer option, kernels.prefer); "native" is the default path, which takes ATen's
# kernel in the plain mode and the composite in the others.
KERNELS = {"composite": ({"fused": False}, "composite"), "cpu": ({}, "cpu"),
           "native": ({}, "native")}


def write_every_buffer(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        for buffer in layer.buffers():
            buffer.add_(1)  # moving averages, renorm averages, initial values, num_updates


def gradients(mode: str, kernel: str, training: bool, write: bool) -> list[torch.Tensor]:
    option, preferred = KERNELS[kernel]
    layer = bn.BatchNorm(3, momentum=0.9, **MODES[mode], **option)
    g = torch.Generator().manual_seed(0)
    # moving statistics that are not 0 and 1
    layer(torch.randn(16, 3, 5, generator=g) + 2, training=True)
    xs = [torch.randn(16, 3, 5, generator=g).requires_grad_() for _ in range(2)]
    dys = [torch.randn(16, 3, 5, generator=g) for _ in range(2)]
    mask = (torch.rand(16, 1, 5, generator=g) < 0.6) if mode == "masked" else None
    with bn.kernels.prefer(preferred):
        ys = [layer(x, training=training, mask=mask if training else None) for x in xs]
    if write:
        write_every_buffer(layer)
    sum((y * dy).sum() for y, dy in zip(ys, dys, strict=True)).backward()
    return [*(x.grad for x in xs), layer.gamma.grad, layer.beta.grad]


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_writing_every_buffer_before_backward_changes_no_gradient(mode, kernel, training):
    written = gradients(mode, kernel, training, write=True)
    expected = gradients(mode, kernel, training, write=False)
    for i, (got, want) in enumerate(zip(written, expected, strict=True)):
        assert torch.equal(got, want), f"gradient {i}"


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_torch_nn_fails_where_ours_does_not(training):
    ours, theirs = bn.BatchNorm(3), torch.nn.BatchNorm1d(3)
    for layer in (ours, theirs):
        layer.train(training)
        xs = [torch.randn(8, 3, requires_grad=True) for _ in range(2)]
        ys = [layer(x) for x in xs]
        write_every_buffer(layer)
        loss = ys[0].square().sum() + ys[1].sum()
        if layer is theirs:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        else:
            loss.backward()
            assert all(x.grad is not None for x in xs)


def test_frozen_layers_under_an_ema_of_the_statistics():
    """Fine-tuning with frozen layers (inference with gradients) while an EMA copy is loaded
    into the model between the forward passes and backward."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), bn.BatchNorm(3, axis=-1))
    model(torch.randn(8, 3) * 3)  # moving statistics that are not 0 and 1
    model[1].trainable = False
    ema = {k: v + 0.5 for k, v in model.named_buffers() if v.is_floating_point()}
    x = torch.randn(8, 3)
    loss = model(x).square().sum()
    expected = torch.autograd.grad(loss, model[0].weight, retain_graph=True)[0]
    model.load_state_dict(ema, strict=False)
    (got,) = torch.autograd.grad(loss, model[0].weight)
    assert torch.equal(got, expected)


def test_inference_without_autograd_normalizes_with_the_buffers_themselves():
    """The copy is made only when autograd records: the plain inference call is unchanged."""
    layer = bn.BatchNorm(3).eval()
    x = torch.randn(4, 3)
    with torch.no_grad():
        before = layer(x)
    with torch.inference_mode():
        assert torch.equal(layer(x), before)
    assert torch.equal(layer(x.requires_grad_()).detach(), before)
