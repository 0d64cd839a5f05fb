"""Ghost batches on ATen's kernel (``kernels.ghost``): the small-input path of
``virtual_batch_size``, against the composite kernel (the specification, checked against
tf_keras and the NumPy oracle elsewhere), and its moving-average update.

Tolerances:
- float64: 1e-9. Both sides compute in float64 and differ in summation order only (ATen's
  per-channel sums against ``var_mean``), a few ulps of sums of ~100 values.
- float32: rtol = atol = 1e-5, the conformance bound: the same two summation orders in
  float32, outputs of magnitude ~10.
- bfloat16: both sides keep their statistics in float32 (compared at the float32 bound)
  and round the output to bfloat16: one rounding step apart is 2**-8 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm as bn
from batchnorm import kernels, plan
from batchnorm.functional import BatchNormConfig, initial_state
from batchnorm.kernels import KernelCall
from batchnorm.kernels.composite import COMPOSITE
from batchnorm.kernels.ghost import GHOST

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}

# name -> (shape, axis, memory format, options)
CASES = {
    "rows": ((32, 6), 1, None, {}),
    "rows_consecutive": ((32, 6), 1, None, {"ghost_layout": "consecutive"}),
    "nchw": ((16, 3, 4, 5), 1, None, {}),
    "nchw_consecutive": ((16, 3, 4, 5), 1, None, {"ghost_layout": "consecutive"}),
    "channels_last": ((16, 3, 4, 5), 1, torch.channels_last, {}),
    "axis_last": ((16, 4, 5, 3), -1, None, {}),
    "sequence": ((16, 3, 7), 1, None, {}),
    "relu": ((16, 3, 4, 5), 1, None, {"activation": "relu"}),
    "silu": ((32, 6), 1, None, {"activation": "silu"}),
    "no_affine": ((32, 6), 1, None, {"center": False, "scale": False}),
    "unbiased": ((32, 6), 1, None, {"unbiased_moving_variance": True}),
}


def _input(shape, fmt, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _call(shape, axis, options, dtype=torch.float64, size=4):
    config = BatchNormConfig(axis=axis, virtual_batch_size=size, **options)
    features = shape[axis]
    affine = {"scale": True, "center": True, **options}
    gamma = (torch.linspace(0.5, 1.5, features, dtype=dtype).requires_grad_()
             if affine["scale"] else None)
    beta = (torch.linspace(-0.3, 0.3, features, dtype=dtype).requires_grad_()
            if affine["center"] else None)
    return KernelCall(config, (axis % len(shape),), gamma, beta)


def test_small_ghost_inputs_take_the_ghost_kernel():
    x = torch.randn(32, 64)
    call = KernelCall(BatchNormConfig(axis=1, virtual_batch_size=8), (1,), None, None)
    assert plan.select(x, initial_state(64), call) is GHOST


def test_ghost_batches_with_renorm_or_a_mask_keep_the_composite():
    x = torch.randn(32, 6)
    state = initial_state(6, renorm=True)
    renorm = KernelCall(BatchNormConfig(virtual_batch_size=8, renorm=True), (1,), None, None)
    masked = KernelCall(BatchNormConfig(virtual_batch_size=8), (1,), None, None,
                        torch.ones(32, dtype=torch.bool))
    assert plan.select(x, state, renorm) is COMPOSITE
    assert plan.select(x, state, masked) is COMPOSITE


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_output_statistics_and_gradients_match_the_composite(name, dtype):
    shape, axis, fmt, options = CASES[name]
    call = _call(shape, axis, options, dtype)
    tolerance = TOLERANCE[dtype]
    results = []
    for kernel in (COMPOSITE, GHOST):
        x = _input(shape, fmt, dtype).requires_grad_()
        y, stats = kernel.train(x, initial_state(shape[axis], dtype=dtype), call)
        y.backward(_input(shape, fmt, dtype, seed=1))
        grads = [t.grad.clone() for t in (x, call.gamma, call.beta) if t is not None]
        for t in (call.gamma, call.beta):
            if t is not None:
                t.grad = None
        results.append((y, stats, grads))
    (y, stats, grads), (y_ghost, stats_ghost, grads_ghost) = results
    torch.testing.assert_close(y_ghost, y, rtol=tolerance, atol=tolerance)
    assert y_ghost.stride() == y.stride()  # the input's memory order
    assert stats_ghost.count == stats.count
    for ours, theirs in zip(stats_ghost[:2], stats[:2], strict=True):
        assert ours.shape == theirs.shape  # (groups, features)
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    for ours, theirs in zip(grads_ghost, grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", ["rows", "nchw_consecutive", "unbiased"])
def test_moving_statistics_after_several_steps_equal_the_composites(name):
    shape, axis, fmt, options = CASES[name]
    ours = bn.BatchNorm(shape[axis], axis=axis, virtual_batch_size=4, **options)
    reference = copy.deepcopy(ours)
    for step in range(5):
        x = _input(shape, fmt, torch.float32, seed=step) * (step + 1)
        ours(x, training=True)  # planned from the second call on: the update's loop
        with kernels.prefer("composite"):
            reference(x, training=True)
    assert int(ours.num_updates) == int(reference.num_updates) == 5
    for name in ("moving_mean", "moving_variance"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name),
                                   rtol=1e-5, atol=1e-5)


# Small shapes: gradcheck differentiates numerically, one forward per input value.
GRADCHECK_CASES = {
    "rows": ((8, 3), 1, None, {}),
    "nchw_consecutive": ((8, 3, 2, 2), 1, None, {"ghost_layout": "consecutive"}),
    "channels_last": ((8, 3, 2, 2), 1, torch.channels_last, {}),
    "axis_last": ((8, 2, 2, 3), -1, None, {}),
    "relu": ((8, 3, 2, 2), 1, None, {"activation": "relu"}),
}


@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck_in_float64(name):
    shape, axis, fmt, options = GRADCHECK_CASES[name]
    call = _call(shape, axis, options)

    def normalized(x, gamma, beta):
        return GHOST.train(x, initial_state(shape[axis], dtype=torch.float64),
                           call._replace(gamma=gamma, beta=beta))[0]

    x = _input(shape, fmt).requires_grad_()
    assert torch.autograd.gradcheck(normalized, (x, call.gamma, call.beta))


def test_bfloat16_input_keeps_float32_statistics():
    shape, axis, fmt, options = CASES["nchw"]
    x = _input(shape, fmt, torch.bfloat16)
    for affine in (True, False):
        call = _call(shape, axis, {} if affine else {"center": False, "scale": False},
                     torch.float32)
        y, stats = GHOST.train(x, initial_state(3), call)
        y_ref, stats_ref = COMPOSITE.train(x, initial_state(3), call)
        assert y.dtype == torch.bfloat16
        assert stats.mean.dtype == stats.variance.dtype == torch.float32
        torch.testing.assert_close(stats.mean, stats_ref.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.variance, stats_ref.variance, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2**-8, atol=2**-8)


def test_uneven_and_too_small_ghost_batches_raise_after_a_plan_exists():
    layer = bn.BatchNorm(6, virtual_batch_size=4)
    layer(torch.randn(8, 6), training=True)  # a plan for (8, 6)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide the batch "
                                         "size 6"):
        layer(torch.randn(6, 6), training=True)
    with pytest.raises(ValueError, match="1 value per feature and ghost batch"):
        bn.BatchNorm(6, virtual_batch_size=1)(torch.randn(4, 6), training=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_skipped_ghost_batch_is_reported_and_leaves_the_averages():
    layer = bn.BatchNorm(6, virtual_batch_size=4)
    layer(torch.randn(8, 6), training=True)  # planned from here on
    mean, variance = layer.moving_mean.clone(), layer.moving_variance.clone()
    x = torch.randn(8, 6)
    x[5, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="not finite"):
        layer(x, training=True)
    assert torch.equal(layer.moving_mean, mean)
    assert torch.equal(layer.moving_variance, variance)
    assert int(layer.num_updates) == 1 and int(layer.num_skipped) == 1
