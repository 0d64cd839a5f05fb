"""Masked calls keep a plan: the checks read only the mask's metadata (shape, strides, dtype,
device), which is part of the plan's signature; its values are given to the kernel on every
call and never kept.

The reference for every comparison is the full path: the same layer's call with its plans
dropped first, which runs every check and the same kernel and update, so outputs, gradients
and buffers are compared bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from plan_checks import assert_same_state, checked_once, twin_layers

import batchnorm as bn

pytestmark = pytest.mark.usefixtures("one_thread")


def _full_path(layer: bn.BatchNorm, *args, **kwargs) -> torch.Tensor:
    layer._plans.clear()
    return layer(*args, **kwargs)


def test_a_masked_call_is_checked_once_per_signature(monkeypatch):
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    calls = checked_once(monkeypatch, lambda: layer(x, training=True, mask=torch.rand(8) < 0.7))
    layer(x, training=True, mask=torch.rand(8, 6) < 0.7)  # another mask shape: another plan
    layer(x, training=True)  # no mask: a plan of its own
    assert calls[0] == 3


@pytest.mark.parametrize("options", [{}, {"virtual_batch_size": 4}, {"renorm": True}],
                         ids=["plain", "ghost", "renorm"])
def test_a_mask_changing_between_calls_gives_each_calls_result(options):
    planned, full = twin_layers(**options)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(8, 6, generator=generator) * (step + 1) + step
        mask = torch.rand(8, 6, generator=generator) < 0.6
        mask[:4] = True  # at least two values of every feature in each ghost batch
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = planned(xa, training=True, mask=mask), _full_path(full, xb, training=True,
                                                                  mask=mask)
        assert torch.equal(ya, yb)
        dy = torch.randn(8, 6, generator=generator)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.equal(xa.grad, xb.grad)
        for pa, pb in zip(planned.parameters(), full.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad)
        assert_same_state(planned, full)
    assert len(planned._plans) == 1


def test_a_stale_mask_is_never_reused():
    layer, fresh = twin_layers()
    x = torch.randn(8, 6)
    first = torch.zeros(8, dtype=torch.bool)
    first[:4] = True
    second = ~first  # the same metadata, the other half of the batch
    layer(x, training=True, mask=first)
    with torch.no_grad():  # the same state before the second call
        for name, buffer in layer.named_buffers():
            fresh.get_buffer(name).copy_(buffer)
    y = layer(x, training=True, mask=second)
    expected = _full_path(fresh, x, training=True, mask=second)
    assert torch.equal(y, expected)
    assert_same_state(layer, fresh)
    # and not what the first mask gives: its statistics come from other samples
    assert not torch.equal(y, _full_path(copy.deepcopy(fresh), x, training=True, mask=first))


def test_a_masked_and_an_unmasked_call_keep_plans_apart():
    layer, full = twin_layers()
    x = torch.randn(8, 6)
    mask = torch.rand(8) < 0.5
    mask[:2] = True
    layer(x, training=True, mask=mask)
    _full_path(full, x, training=True, mask=mask)
    assert torch.equal(layer(x, training=True), _full_path(full, x, training=True))
    assert_same_state(layer, full)


@pytest.mark.parametrize(("mask", "error", "match"), [
    (torch.ones(8, dtype=torch.int64), TypeError, "mask must be a boolean tensor"),
    (torch.ones(5, dtype=torch.bool), ValueError, "does not broadcast"),
    ([True] * 8, TypeError, "mask must be a boolean tensor"),
    (torch.ones(8, dtype=torch.bool, device="meta"), ValueError, "mask is on meta"),
], ids=["int64", "shape", "list", "device"])
def test_an_invalid_mask_raises_after_a_masked_plan_exists(mask, error, match):
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=True, mask=torch.rand(8) < 0.7)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer(x, training=True, mask=mask)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key



@pytest.mark.parametrize("options", [{}, {"unbiased_moving_variance": True},
                                     {"virtual_batch_size": 4},
                                     {"virtual_batch_size": 4, "unbiased_moving_variance": True}],
                         ids=["biased", "unbiased", "ghost", "ghost_unbiased"])
def test_the_masked_update_equals_the_pure_update_bit_for_bit(options):
    """The CPU's update loop pools a mask's groups as pooled_statistics does (groups with more
    than one value, each Bessel-corrected by its own count): the same averages as
    functional.update_state's torch operations; a feature with no such group skips the
    batch."""
    layer = bn.BatchNorm(6, **options)
    state = copy.deepcopy(layer).state()
    config = layer.config.for_input(2, torch.float32)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(8, 6, generator=generator)
        mask = torch.rand(8, 6, generator=generator) < 0.6
        mask[:4] = True  # two values of every feature in each ghost batch, at least
        skipped = step % 2 == 1
        mask[:, 0] = not skipped  # a feature with no value: the batch is skipped
        if skipped:
            with pytest.warns(RuntimeWarning, match="selects no position"):
                layer(x, training=True, mask=mask)
        else:
            layer(x, training=True, mask=mask)
        with torch.no_grad():
            _, stats = bn.functional.forward(x, state, config, training=True, mask=mask)
        state = bn.functional.update_state(
            state, stats, momentum=config.momentum, epsilon=config.epsilon,
            unbiased_moving_variance=config.unbiased_moving_variance)
        assert torch.equal(layer.moving_mean, state.moving_mean)
        assert torch.equal(layer.moving_variance, state.moving_variance)
        assert torch.equal(layer.num_updates, state.num_updates)
    assert int(layer.num_updates) == 2
