"""``torch.autograd.gradcheck`` of ``bn.BatchNorm`` (float64; x, gamma, beta) in every mode.

gradcheck compares autograd's Jacobian with central differences of the forward
pass. Each evaluation runs inside ``deferred_updates()`` (whose recorded updates
are discarded), so the moving statistics, and with them renorm's reference
point, stay fixed across gradcheck's many evaluations.

Renorm: ``r`` and ``d`` are computed from the batch statistics but carry no
gradient (tf_keras stops it). Central differences perturb ``x``, which moves the
batch statistics and hence an unclipped ``r``/``d``: there the numerical Jacobian
contains terms the analytical one rightly leaves out, and gradcheck must fail
(asserted below). Where clipping is active for every feature, with a margin far
larger than gradcheck's perturbation, ``r`` and ``d`` are locally constant and
gradcheck applies. The unclipped case is checked instead against the oracle's
hand-derived backward (:func:`reference.backward` (tests/reference.py)), which treats
``r``/``d`` as constants, at ``rtol = atol = 1e-10`` (see test_reference_modes.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference
import torch
from torch.autograd import gradcheck

import batchnorm as bn

EPSILON = 1e-3
CLIP = {"rmin": 0.5, "rmax": 1.5, "dmax": 0.5}


def data(shape: tuple[int, ...], axis: int, seed: int, loc: float = 0.0, spread: float = 1.0):
    """float64 x whose features have batch mean ``loc * (1, -1, 1, ...)`` and std ``spread``."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape)
    reduce = tuple(d for d in range(len(shape)) if d != axis % len(shape))
    noise = (noise - noise.mean(reduce, keepdims=True)) / noise.std(reduce, keepdims=True)
    sign = np.where(np.arange(shape[axis]) % 2, -1.0, 1.0)
    broadcast = [shape[axis] if d == axis % len(shape) else 1 for d in range(len(shape))]
    return torch.from_numpy(loc * sign.reshape(broadcast) + spread * noise)


def make_layer(shape, axis, **kwargs) -> bn.BatchNorm:
    """A float64 layer with random gamma (signs mixed), beta and moving statistics."""
    layer = bn.BatchNorm(shape[axis], axis=axis, epsilon=EPSILON, dtype=torch.float64, **kwargs)
    rng = np.random.default_rng(1)
    c = shape[axis]
    values = {"gamma": rng.uniform(0.5, 2.0, c) * np.where(np.arange(c) % 2, -1, 1),
              "beta": rng.uniform(-1, 1, c), "moving_mean": rng.uniform(-1, 1, c),
              "moving_variance": rng.uniform(0.5, 2.0, c)}
    if layer.renorm:  # renorm_stddev 1, renorm_mean 0: r ~ spread, d ~ loc
        values.update(moving_stddev=np.sqrt(values["moving_variance"]),
                      renorm_mean=np.zeros(c), renorm_stddev=np.ones(c))
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(torch.from_numpy(value))
    return layer


def as_function(layer: bn.BatchNorm, training: bool, mask: torch.Tensor | None):
    def f(x, gamma, beta):
        with bn.deferred_updates() as updates:  # discarded: the state never moves
            y = torch.func.functional_call(
                layer, {"gamma": gamma, "beta": beta}, (x,), {"training": training, "mask": mask})
            updates.discard()
        return y
    return f


def inputs(layer: bn.BatchNorm, x: torch.Tensor):
    return (x.clone().requires_grad_(), layer.gamma.detach().clone().requires_grad_(),
            layer.beta.detach().clone().requires_grad_())


def adjustment_full(shape):
    g = torch.Generator().manual_seed(2)
    return (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5,
            torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)


def adjustment_feature(shape):
    return (torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64),
            torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))


M4 = torch.tensor([True, False, True, True])
CASES = {
    # id: (shape, axis, layer options, mask, training)
    "plain_fused_none": ((4, 3), -1, {"fused": None}, None, True),
    "plain_fused_false": ((4, 3), -1, {"fused": False}, None, True),
    "plain_rank3_fused_none": ((4, 3, 2), 1, {"fused": None}, None, True),
    "plain_rank3_fused_false": ((4, 3, 2), 1, {"fused": False}, None, True),
    "ghost_strided": ((4, 3, 2), 1, {"virtual_batch_size": 2}, None, True),
    "ghost_consecutive": ((4, 3, 2), 1,
                          {"virtual_batch_size": 2, "ghost_layout": "consecutive"}, None, True),
    "mask_batch": ((4, 3), -1, {}, M4, True),
    "mask_nonfeature": ((4, 3, 2), 1, {}, torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]]).bool(),
                        True),
    "mask_full": ((4, 3, 2), 1, {}, torch.arange(24).reshape(4, 3, 2) % 3 != 1, True),
    # Strided groups {0, 2} and {1, 3}: the mask empties group 0 (moving statistics).
    "mask_ghost_empty_group": ((4, 3), -1, {"virtual_batch_size": 2},
                               torch.tensor([False, True, False, True]), True),
    "adjustment_feature": ((4, 3), -1, {"adjustment": adjustment_feature}, None, True),
    "adjustment_full": ((4, 3, 2), 1, {"adjustment": adjustment_full}, None, True),
    "inference": ((4, 3, 2), 1, {}, None, False),
    "inference_renorm_ghost": ((4, 3), -1, {"renorm": True, "virtual_batch_size": 2}, None,
                               False),
    "frozen": ((4, 3), -1, {"trainable": False}, M4, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradcheck(case):
    shape, axis, options, mask, training = case
    layer = make_layer(shape, axis, **options)
    x = data(shape, axis, seed=0, loc=1.0, spread=2.0)
    args = inputs(layer, x)
    if not layer.trainable:  # gradcheck needs gamma/beta to require grad; frozen ones do not
        args = (args[0],)
        gamma, beta = layer.gamma.detach(), layer.beta.detach()
        f = as_function(layer, training, mask)
        assert gradcheck(lambda x: f(x, gamma, beta), args)
        return
    assert gradcheck(as_function(layer, training, mask), args)


# ---------------------------------------------------------------------------- renorm

# Every feature's batch std is 3 (r = 3 > rmax) or 0.2 (r = 0.2 < rmin), and its mean
# +-3 (|d| = 3 > dmax), against renorm_stddev = 1 and renorm_mean = 0: every r and d is
# clipped, by a margin no 1e-6 perturbation can close.
CLIPPED = {
    "renorm_rmax": ((4, 3), -1, {}, None, 3.0),
    "renorm_rmin_rank3": ((4, 3, 2), 1, {}, None, 0.2),
    "renorm_ghost_strided": ((4, 3, 2), 1, {"virtual_batch_size": 2}, None, 3.0),
    "renorm_ghost_consecutive": ((4, 3, 2), 1,
                                 {"virtual_batch_size": 2, "ghost_layout": "consecutive"},
                                 None, 3.0),
    "renorm_mask": ((6, 3), -1, {}, torch.tensor([1, 1, 1, 1, 1, 0]).bool(), 3.0),
    "renorm_adjustment": ((4, 3), -1, {"adjustment": adjustment_feature}, None, 3.0),
}


def oracle_kwargs(layer: bn.BatchNorm, x: torch.Tensor, mask, clipping, adjustment=None):
    kwargs = dict(axis=layer.axis, training=True, epsilon=EPSILON,
                  gamma=layer.gamma.detach().numpy(), beta=layer.beta.detach().numpy(),
                  moving_mean=layer.moving_mean.numpy(),
                  moving_variance=layer.moving_variance.numpy(),
                  renorm_mean=layer.renorm_mean.numpy(),
                  renorm_stddev=layer.renorm_stddev.numpy(), renorm_clipping=clipping,
                  virtual_batch_size=layer.virtual_batch_size, ghost_layout=layer.ghost_layout,
                  mask=None if mask is None else mask.numpy())
    if adjustment is not None:
        kwargs.update(adj_scale=adjustment[0].numpy(), adj_bias=adjustment[1].numpy())
    return kwargs


@pytest.mark.parametrize("case", CLIPPED.values(), ids=CLIPPED.keys())
def test_gradcheck_renorm_with_active_clipping(case):
    shape, axis, options, mask, spread = case
    layer = make_layer(shape, axis, renorm=True, renorm_clipping=CLIP, **options)
    x = data(shape, axis, seed=0, loc=3.0, spread=spread)
    # Every correction sits at a clipping limit, 10% or more beyond it unclipped.
    free = reference.forward(x.numpy(), **oracle_kwargs(layer, x, mask, None))
    assert ((free.r > 1.1 * CLIP["rmax"]) | (free.r < CLIP["rmin"] / 1.1)).all()
    assert (np.abs(free.d) > 1.1 * CLIP["dmax"]).all()
    assert gradcheck(as_function(layer, True, mask), inputs(layer, x))


@pytest.mark.parametrize("options", [{}, {"virtual_batch_size": 2},
                                     {"adjustment": adjustment_feature}],
                         ids=["renorm", "renorm_ghost", "renorm_adjustment"])
def test_renorm_without_clipping_matches_hand_derived_backward(options):
    """r and d move with x here, so gradcheck must fail; the oracle (r, d constant) holds."""
    shape, axis = (4, 3, 2), 1
    layer = make_layer(shape, axis, renorm=True, **options)
    x = data(shape, axis, seed=3, loc=0.4, spread=1.3)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]]).bool()
    f = as_function(layer, True, mask)
    x_, gamma, beta = inputs(layer, x)
    y = f(x_, gamma, beta)
    dy = torch.from_numpy(np.random.default_rng(4).standard_normal(shape))
    y.backward(dy)
    adjustment = adjustment_feature(shape) if "adjustment" in options else None
    kwargs = oracle_kwargs(layer, x, mask, None, adjustment)
    expected = reference.backward(x.numpy(), dy.numpy(), **kwargs)
    out = reference.forward(x.numpy(), **kwargs)
    assert not np.allclose(out.r, 1.0) and not np.allclose(out.d, 0.0)  # a real correction
    for actual, wanted in ((y, out.y), (x_.grad, expected.dx), (gamma.grad, expected.dgamma),
                           (beta.grad, expected.dbeta)):
        np.testing.assert_allclose(actual.detach().numpy(), wanted, rtol=1e-10, atol=1e-10)
    assert not gradcheck(f, inputs(layer, x), raise_exception=False)
