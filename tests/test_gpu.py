"""The GPU suite: what only a CUDA device can show. Skipped without one.

- a training step never synchronizes with the host (``torch.cuda.set_sync_debug_mode``
  raises on any synchronizing call), in every mode;
- a whole training step is captured in a CUDA graph and replayed;
- ``torch.compile(mode="reduce-overhead")`` (CUDA graphs under the compiler) trains;
- synchronized statistics over NCCL with one process equal local statistics;
- ``bn.convert`` of a ResNet-style model trains for a few steps like torch.nn on the GPU.

Run it with ``python -m batchnorm.apps.gpu_check`` (the suite, then the GPU benchmark).
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
from torch import nn

import batchnorm as bn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

MODES = {"plain": {}, "renorm": {"renorm": True}, "ghost": {"virtual_batch_size": 8},
         "masked": {}, "cumulative": {"momentum": None}}


def make(mode: str, channels: int = 32) -> tuple[bn.BatchNorm, torch.Tensor, torch.Tensor | None]:
    layer = bn.BatchNorm(channels, **MODES[mode]).cuda()
    x = torch.randn(64, channels, 16, 16, device="cuda", requires_grad=True)
    mask = (torch.rand(64, 16, 16, device="cuda") > 0.3) if mode == "masked" else None
    return layer, x, mask


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_never_synchronizes(mode: str, dtype: torch.dtype) -> None:
    layer, x, mask = make(mode)
    x = x.detach().to(dtype).requires_grad_()
    layer(x, training=True, mask=mask).float().sum().backward()  # first call: build, compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            layer(x, training=True, mask=mask).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert layer.num_updates.item() == 4 and layer.check_health() == 0


@pytest.mark.parametrize("mode", ["plain", "renorm", "masked"])
def test_a_training_step_is_captured_in_a_cuda_graph(mode: str) -> None:
    layer, x, mask = make(mode)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    static_x = x.detach().clone()

    def step():
        opt.zero_grad(set_to_none=False)
        layer(static_x, training=True, mask=mask).square().mean().backward()
        opt.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph, as CUDA graphs require
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    before = layer.num_updates.item()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert layer.num_updates.item() == before + 5
    assert torch.isfinite(layer.moving_mean).all()


def test_compile_reduce_overhead_trains() -> None:
    layer, x, _ = make("plain")
    compiled = torch.compile(layer, mode="reduce-overhead")
    for _ in range(4):
        compiled(x.detach(), training=True)
    torch.cuda.synchronize()
    assert layer.num_updates.item() == 4


def test_synchronized_statistics_over_nccl_with_one_process() -> None:
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        x = torch.randn(32, 16, 8, 8, device="cuda")
        synced = bn.BatchNorm(16, synchronized=True).cuda()
        # tf_keras does not fuse a synchronized layer: the biased variance on both sides.
        local = bn.BatchNorm(16, unbiased_moving_variance=False).cuda()
        # One process: the global batch is the local one (float32, summation order: 1e-5).
        torch.testing.assert_close(synced(x, training=True), local(x, training=True),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(synced.moving_variance, local.moving_variance,
                                   rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def small_resnet() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())
    return nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_converted_resnet_trains_like_torch_nn() -> None:
    torch.manual_seed(0)
    reference = small_resnet().cuda()
    converted = bn.convert(copy.deepcopy(reference))  # in place: convert a copy
    x = torch.randn(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    losses = []
    for model in (reference, converted):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run = []
        for _ in range(5):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    # Same model, same data, same steps: float32 with cuDNN vs our kernels differ in
    # summation order only, which 5 SGD steps amplify to at most ~1e-3 relative.
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=2e-3,
                               atol=2e-3)
