"""The masked kernel (``batchnorm.kernels.masked``: a masked statistics loop, ATen's inference
kernel and ATen's backward corrected for the mask) against the composite kernel, which
defines every mode: outputs, statistics, input, gamma and beta gradients within the
tolerances of ``kernel_comparison`` (float64 1e-9, float32 1e-5, bfloat16 one rounding
step), for masks per sample, per position and per row, with the features at dim 1 and
last; the calls it hands to the composite; and when ``fused=None`` takes it. (Padding at the
positions a mask leaves out, NaN, Inf or huge: ``test_bad_input.py``, for this kernel too.)
"""

from __future__ import annotations

import pytest
import torch
from kernel_comparison import assert_matches
from torch.autograd import gradcheck

import batchnorm as bn
from batchnorm import kernels, plan
from batchnorm.functional import BatchNormConfig, initial_state
from batchnorm.kernels import KernelCall, composite, cpu, masked

pytestmark = pytest.mark.skipif(not cpu.available(), reason="numba is unavailable")

EPSILON = 1e-3
LOOSE = ("y", "dx", "dgamma", "dbeta")
# id: (input shape, feature axis, mask shape)
CASES = {
    "rows": ((16, 5), 1, (16,)),
    "nchw-per-sample": ((8, 5, 6, 7), 1, (8, 1, 1)),
    "nchw-per-position": ((8, 5, 6, 7), 1, (8, 6, 7)),
    "ncl-per-position": ((6, 5, 9), 1, (6, 1, 9)),
    "nlc-padding": ((8, 9, 5), 2, (8, 9)),
}


def make_case(case: str, dtype: torch.dtype, seed: int = 0):
    shape, axis, mask_shape = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    mask = torch.rand(mask_shape, generator=g) < 0.7
    mask.view(-1)[:2] = True  # at least two selected positions
    return x, axis, mask


def run_kernel(kernel, x, axis, mask, dtype, activation=None):
    """y, statistics and gradients of sum(y * dy) through ``kernel.train``."""
    channels = x.shape[axis]
    g = torch.Generator().manual_seed(5)
    gamma = (torch.rand(channels, generator=g) + 0.5).requires_grad_()
    beta = torch.randn(channels, generator=g).requires_grad_()
    xg = x.detach().clone().requires_grad_()
    call = KernelCall(BatchNormConfig(axis=axis, epsilon=EPSILON, activation=activation),
                      (axis,), gamma, beta, mask)
    state = initial_state(channels)
    assert kernel.unsupported(x, state, call) is None
    y, stats = kernel.train(xg, state, call)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(dy)
    return {"y": y, "mean": stats.mean, "variance": stats.variance, "count": stats.count,
            "dx": xg.grad, "dgamma": gamma.grad, "dbeta": beta.grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_masked_kernel_matches_composite(case, dtype):
    x, axis, mask = make_case(case, dtype)
    expected = run_kernel(composite.COMPOSITE, x, axis, mask, dtype)
    actual = run_kernel(masked.MASKED, x, axis, mask, dtype)
    assert_matches(actual, expected, dtype, LOOSE)


def test_a_fused_activation_matches_composite():
    x, axis, mask = make_case("nchw-per-position", torch.float64)
    expected = run_kernel(composite.COMPOSITE, x, axis, mask, torch.float64, "relu")
    actual = run_kernel(masked.MASKED, x, axis, mask, torch.float64, "relu")
    assert_matches(actual, expected, torch.float64, LOOSE)


def test_gradcheck_masked_kernel():
    x, axis, mask = make_case("ncl-per-position", torch.float64)
    gamma = torch.rand(5, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    state = initial_state(5, dtype=torch.float64)

    def f(x, gamma, beta):
        call = KernelCall(BatchNormConfig(epsilon=EPSILON), (axis,), gamma, beta, mask)
        return masked.MASKED.train(x, state, call)[0]

    assert gradcheck(f, (x.requires_grad_(), gamma, beta))


def test_double_backward_matches_composite():
    """create_graph=True differentiates the composite's torch operations: the gradient of the
    input gradient's norm equals the composite's."""
    grads = []
    for kernel in (masked.MASKED, composite.COMPOSITE):
        x, axis, mask = make_case("nchw-per-sample", torch.float64)
        x.requires_grad_()
        gamma = torch.linspace(0.5, 1.5, 5, dtype=torch.float64, requires_grad=True)
        call = KernelCall(BatchNormConfig(epsilon=EPSILON), (axis,), gamma, None, mask)
        y, _ = kernel.train(x, initial_state(5, dtype=torch.float64), call)
        (dx,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        dx.square().sum().backward()
        grads.append((x.grad, gamma.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_a_mask_selecting_fewer_than_two_positions_is_the_composites_call():
    """Under two selected positions the batch is normalized with the moving statistics (the
    composite's rule): the masked kernel hands the call over, and the results are the
    composite's."""
    x, axis, mask = make_case("rows", torch.float64)
    mask = torch.zeros_like(mask)
    mask[3] = True
    expected = run_kernel(composite.COMPOSITE, x, axis, mask, torch.float64)
    actual = run_kernel(masked.MASKED, x, axis, mask, torch.float64)
    assert_matches(actual, expected, torch.float64, LOOSE)


def select_for(x, mask, axis=1, **options):
    layer = bn.BatchNorm(x.shape[axis], axis=axis, **options)
    prepared = plan.prepare(x, layer.state(), layer._config, training=True, gamma=layer.gamma,
                            beta=layer.beta, mask=mask, process_group=None)
    return prepared.kernel


def test_small_masked_calls_take_the_masked_kernel():
    per_sample = torch.ones(32, dtype=torch.bool)
    assert select_for(torch.randn(32, 64), per_sample) is masked.MASKED
    assert select_for(torch.randn(32, 64, 4, 4), per_sample[:, None, None]) is masked.MASKED
    assert select_for(torch.randn(8, 10, 64), torch.ones(8, 10, dtype=torch.bool),
                      axis=-1) is masked.MASKED
    assert select_for(torch.randn(32, 64, 8, 8), per_sample[:, None, None]) is masked.MASKED
    # Above MIN_MASKED_NUMEL the CPU loops; what the kernel cannot take, the composite.
    assert select_for(torch.randn(32, 64, 16, 16), per_sample[:, None, None]) is cpu.CPU
    channels_last = torch.randn(32, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    assert select_for(channels_last, per_sample[:, None, None]) is composite.COMPOSITE
    assert select_for(torch.randn(32, 64), per_sample, renorm=True) is composite.COMPOSITE
    assert select_for(torch.randn(32, 64), per_sample,
                      virtual_batch_size=8) is composite.COMPOSITE
    assert masked.MASKED.unsupported(torch.randn(32, 64), initial_state(64), KernelCall(
        BatchNormConfig(), (1,))) is not None  # unmasked: ATen's kernel


@pytest.mark.parametrize(("shape", "axis", "mask"), [
    ((8, 16, 4), 1, torch.rand(4) < 0.7),  # fewer dimensions: aligned on the last axis
    ((8, 16, 4), 1, torch.tensor(True)),  # a scalar
    ((6, 5, 16), -1, torch.ones(1, dtype=torch.bool)),
])
def test_masks_of_fewer_dimensions_than_the_input_match_the_composite(shape, axis, mask):
    """A mask that broadcasts with fewer dimensions than the input (NumPy's rule, aligned on
    the last axis) takes the masked kernel, with the composite's results."""
    mask.view(-1)[:1] = True
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    results = []
    for fused in (None, False):
        x = x0.clone().requires_grad_()
        layer = bn.BatchNorm(shape[axis], axis=axis, fused=fused).double()
        y = layer(x, training=True, mask=mask)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
         ).sum().backward()
        results.append((y.detach(), x.grad, layer.gamma.grad, layer.moving_mean,
                        layer.moving_variance))
    layer_x = x0.clone()
    call = KernelCall(BatchNormConfig(axis=axis), (axis % len(shape),), None, None, mask)
    assert plan.select(layer_x, initial_state(shape[axis], dtype=torch.float64),
                       call) is masked.MASKED
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_an_upstream_gradient_aten_misreads_gives_the_gradients_of_its_copy():
    """x NCHW-contiguous with a size-1 dimension and an upstream gradient dense in
    channels-last order only (strides ATen's CPU backward misreads, see kernels.native):
    the masked kernel's gradients equal those of the gradient's contiguous copy."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(8, 16, 4, 1, generator=g, dtype=torch.float64)
    mask = torch.rand(8, 1, 4, 1, generator=g) > 0.3
    w = torch.randn(8, 4, 16, generator=g, dtype=torch.float64).transpose(1, 2).unsqueeze(-1)
    assert w.stride() == (64, 1, 16, 1)
    grads = []
    for weight in (w, w.contiguous()):
        x = x0.clone().requires_grad_()
        layer = bn.BatchNorm(16).double()
        with kernels.prefer("masked"):
            y = layer(x, training=True, mask=mask)
        (y * weight).sum().backward()
        grads.append((x.grad, layer.gamma.grad, layer.beta.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_the_cpu_loops_take_masks_of_fewer_dimensions_than_the_input():
    """The same masks on the CPU loops (``shapes.mask_shape`` gives every consumer the
    input's rank): the composite's results."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 16, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(4, generator=g) < 0.7
    mask[0] = True
    outputs = []
    for kernel in ("cpu", "composite"):
        with kernels.prefer(kernel):
            outputs.append(bn.BatchNorm(16).double()(x, training=True, mask=mask))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)


def test_gamma_cast_between_forward_and_backward_gives_the_composites_gradients():
    """The backward reads gamma as it is then (a model cast between forward and backward):
    converted to the statistics' dtype, never read as memory of another type (float32
    1e-5, the composite's rounding)."""
    grads = []
    for kernel in ("composite", "masked"):
        layer = bn.BatchNorm(6)
        with torch.no_grad():
            layer.gamma.copy_(torch.linspace(0.5, 2.0, 6))
        x = (torch.randn(8, 6, 5, generator=torch.Generator().manual_seed(0)) * 2
             ).requires_grad_()
        mask = torch.rand(8, 1, 5, generator=torch.Generator().manual_seed(1)) < 0.6
        with kernels.prefer(kernel):
            y = layer(x, mask=mask)
        layer.gamma.data = layer.gamma.data.double()
        y.sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
