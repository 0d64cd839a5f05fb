"""Every training kernel against the NumPy oracle on random calls (a differential test).

Hypothesis draws a call: the shape (rank 2 to 4, small), the feature axis (first or last),
the memory layout (contiguous; dense in a random order of the dimensions, which covers
channels-last and the strides of size-1 dimensions; a non-contiguous strided view), the
dtype, the mode (plain, renorm with and without clipping, ghost batches in both layouts),
a mask (none; per position; per value, with channels that select 0, 1 or 2 values),
``center``/``scale`` on and off, the activation, and an in-place op on the output before
the loss (``y += 1`` or ``y.relu_()``; after ``activation="relu"`` the composite and ATen's
kernel return the output of ``torch.relu``, which its backward reads and torch lets no
in-place op change, so there ``y = y + 1``). Each kernel (:data:`batchnorm.kernels.KERNELS`,
forced with :func:`batchnorm.kernels.prefer`) computes the call through
:func:`batchnorm.functional.batch_norm`; its output, the gradients of ``sum(y * dy)`` for
x, gamma and beta, and the updated state (every moving statistic and ``num_updates``) are
compared with the NumPy oracle (tests/reference.py). A kernel that declines the call (its
``unsupported``) is skipped for that example, the reason recorded as a Hypothesis event
(``--hypothesis-show-statistics``). The oracle has no activation and no in-place op: those
are applied to its output by torch in float64 and differentiated by autograd, and the
oracle's backward takes the resulting gradient: the oracle gives every gradient compared,
so none is compared with the composite kernel instead.

The oracle runs in float64 on the values the kernel sees (the input, ``dy``, the
parameters and the state rounded to their dtypes). Tolerances, as ``|actual - expected|
<= tol * scale`` (``torch.testing.assert_close`` with ``rtol = atol = tol``), where
``scale`` is ``1 +`` the magnitude of the terms a value is a sum or difference of (the
largest ``|y|`` for the output and the state; for ``dx`` the largest
``|gamma r inv dy|``, times 3 for the two mean terms it subtracts; for ``dgamma`` and
``dbeta`` 3 ``|dy|`` summed over a feature's values):

- float64: ``1e-9``. The same formulas on the same float64 values, in another order
  (summation order, one-pass shifted sums, ``x * a + b``): a few ulps amplified by sums
  of at most a few hundred values.
- float32: ``1e-4``. float32 rounding (1.2e-7) of values up to ``1 / sqrt(epsilon) ~ 32``
  times the input's spread, accumulated over the same sums.
- bfloat16 and float16 (statistics in float32): 4 units in the last place of the output
  dtype (bfloat16 ``2**-6``, float16 ``2**-8``): the output, ``dy`` and ``dx`` are rounded
  to it once or twice on both sides. No ReLU is drawn for them: a value within rounding of
  the kink would take the other side of it on one side of the comparison (for float32 the
  examples with a normalized value within 1e-3 of the kink are left out, by ``assume``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import reference
import torch
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st

from batchnorm import functional as F
from batchnorm import kernels
from batchnorm.config import BatchNormConfig
from batchnorm.kernels.triton import available as triton_available
from batchnorm.plan import prepare
from batchnorm.state import statistics_dtype

EPSILON = 1e-3
MOMENTUM = 0.9
RENORM_MOMENTUM = 0.8
CLIPPING = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.4}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2**-6,
             torch.float16: 2**-8}
HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Call:
    """One drawn training call; ``seed`` gives its values (NumPy)."""

    shape: tuple[int, ...]
    axis: int  # the feature axis, non-negative
    order: tuple[int, ...] | None  # dense in this order of the dimensions (None: NCHW)
    sliced: int | None  # a view taking every other index of this dimension
    dtype: torch.dtype
    renorm: str | None  # None, "plain" or "clipped"
    virtual_batch_size: int | None
    ghost_layout: str
    mask: str | None  # None, "positions" (the non-feature axes) or "values" (x's shape)
    selected: tuple[int | None, ...]  # "values": per feature, the count (None: random)
    center: bool
    scale: bool
    activation: str | None
    in_place: str  # "add" (y += 1), "relu" (y.relu_()) or "none" (y = y + 1)
    seed: int

    @property
    def features(self) -> int:
        return self.shape[self.axis]


@st.composite
def calls(draw) -> Call:
    rank = draw(st.integers(2, 4))
    n = draw(st.sampled_from([2, 4, 6, 8]))
    shape = (n, *draw(st.lists(st.integers(1, 4), min_size=rank - 1, max_size=rank - 1)))
    axis = draw(st.sampled_from([1, rank - 1]))
    features = shape[axis]
    layout = draw(st.sampled_from(["contiguous", "order", "sliced"]))
    order = tuple(draw(st.permutations(range(rank)))) if layout == "order" else None
    sliced = draw(st.integers(0, rank - 1)) if layout == "sliced" else None
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32, torch.bfloat16,
                                  torch.float16]))
    renorm = draw(st.sampled_from([None, None, None, None, "plain", "clipped"]))
    sizes = [v for v in range(2, n) if n % v == 0]
    virtual_batch_size = draw(st.sampled_from([None, None, *sizes])) if sizes else None
    mask = draw(st.sampled_from([None, None, None, None, "positions", "values"]))
    selected = tuple(draw(st.lists(st.sampled_from([0, 1, 2, None, None]), min_size=features,
                                   max_size=features))) if mask == "values" else ()
    relu = dtype not in HALF  # ReLU's kink: see the module docstring
    activation = draw(st.sampled_from([None, None, "silu", *(["relu"] if relu else [])]))
    # After activation="relu" the composite and ATen's kernel return torch.relu's output,
    # which its backward reads: torch refuses any in-place op on it (as on torch.relu(y)), so
    # there y + 1 is out of place; the four-pass kernels allow either.
    in_place = draw(st.sampled_from(["none"] if activation == "relu"
                                    else ["add", "relu"] if relu else ["add"]))
    values_per_feature = math.prod(shape) // features
    if values_per_feature < 2:  # training needs two values per feature
        shape = (2 * n, *shape[1:])
    return Call(shape, axis, order, sliced, dtype, renorm, virtual_batch_size,
                draw(st.sampled_from(["strided", "consecutive"])) if virtual_batch_size
                else "strided", mask, selected,
                draw(st.booleans()), draw(st.booleans()), activation, in_place,
                draw(st.integers(0, 2**32 - 1)))


# ---------------------------------------------------------------------------- values


def make_mask(call: Call, rng: np.random.Generator) -> np.ndarray | None:
    if call.mask is None:
        return None
    if call.mask == "positions":
        return rng.random([s for d, s in enumerate(call.shape) if d != call.axis]) < 0.7
    mask = rng.random(call.shape) < 0.7
    for c, count in enumerate(call.selected):
        if count is not None:  # `count` values of feature c, at random positions
            channel = np.moveaxis(mask, call.axis, 0)[c]
            flat = np.zeros(channel.size, bool)
            flat[rng.permutation(channel.size)[:count]] = True
            channel[...] = flat.reshape(channel.shape)
    return mask


def layout(values: np.ndarray, call: Call) -> torch.Tensor:
    """``values`` in ``call.dtype`` with the call's strides."""
    t = torch.from_numpy(values).to(call.dtype)
    if call.order is not None:
        dense = t.permute(call.order).contiguous()
        return dense.permute([call.order.index(d) for d in range(t.ndim)])
    if call.sliced is not None:
        wide = torch.zeros([s * (2 if d == call.sliced else 1) for d, s in enumerate(t.shape)],
                           dtype=call.dtype)
        view = wide.narrow(call.sliced, 0, 2 * t.shape[call.sliced])
        view = view[(slice(None),) * call.sliced + (slice(None, None, 2),)]
        view.copy_(t)
        return view
    return t.contiguous()


def exact(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).numpy()


class Values:
    """A call's inputs, parameters and state, as the kernels get them."""

    def __init__(self, call: Call) -> None:
        rng = np.random.default_rng(call.seed)
        c = call.features
        broadcast = [c if d == call.axis else 1 for d in range(len(call.shape))]
        loc = rng.uniform(-3.0, 3.0, broadcast)
        spread = np.exp(rng.uniform(np.log(0.3), np.log(3.0), broadcast))
        self.x = layout(loc + spread * rng.standard_normal(call.shape), call)
        self.dy = torch.from_numpy(rng.standard_normal(call.shape)).to(call.dtype)
        mask = make_mask(call, rng)
        self.mask = None if mask is None else torch.from_numpy(mask)
        sdtype = statistics_dtype(call.dtype)
        self.gamma = torch.from_numpy(rng.uniform(-2.0, 2.0, c)).to(sdtype) if call.scale \
            else None
        self.beta = torch.from_numpy(rng.uniform(-1.0, 1.0, c)).to(sdtype) if call.center \
            else None
        state = F.initial_state(c, renorm=call.renorm is not None, dtype=sdtype)
        variance = torch.from_numpy(rng.uniform(0.5, 2.0, c)).to(sdtype)
        fields = {"moving_mean": torch.from_numpy(rng.uniform(-1.0, 1.0, c)).to(sdtype),
                  "moving_variance": variance}
        if call.renorm is not None:
            fields.update(moving_stddev=variance.sqrt(),
                          renorm_mean=torch.from_numpy(rng.uniform(-1.0, 1.0, c)).to(sdtype),
                          renorm_stddev=torch.from_numpy(rng.uniform(0.8, 1.2, c)).to(sdtype))
        self.state = state._replace(**fields)
        self.config = BatchNormConfig(
            axis=call.axis, momentum=MOMENTUM, epsilon=EPSILON, center=call.center,
            scale=call.scale, renorm=call.renorm is not None,
            renorm_clipping=CLIPPING if call.renorm == "clipped" else None,
            renorm_momentum=RENORM_MOMENTUM, virtual_batch_size=call.virtual_batch_size,
            ghost_layout=call.ghost_layout, activation=call.activation)


def post(z: torch.Tensor, call: Call) -> torch.Tensor:
    """What follows the normalization: the activation, then the in-place op."""
    if call.activation == "relu":
        z = torch.relu(z)
    elif call.activation == "silu":
        z = torch.nn.functional.silu(z)
    return z.relu() if call.in_place == "relu" else z + 1


# ---------------------------------------------------------------------------- both sides


class Result(NamedTuple):
    """y after the in-place op, the gradients, and the state after the call (an update the
    batch's statistics leave out changes nothing, ``num_updates`` included), in float64."""

    y: np.ndarray
    dx: np.ndarray
    dgamma: np.ndarray | None
    dbeta: np.ndarray | None
    state: dict[str, np.ndarray]


def oracle(call: Call, v: Values) -> tuple[Result, dict]:
    """The oracle's result, and the scales of the comparison (see the module docstring)."""
    kwargs = dict(axis=call.axis, training=True, gamma=exact(v.gamma), beta=exact(v.beta),
                  moving_mean=exact(v.state.moving_mean),
                  moving_variance=exact(v.state.moving_variance), epsilon=EPSILON,
                  virtual_batch_size=call.virtual_batch_size, ghost_layout=call.ghost_layout,
                  mask=None if v.mask is None else v.mask.numpy())
    if call.renorm is not None:
        kwargs.update(renorm_mean=exact(v.state.renorm_mean),
                      renorm_stddev=exact(v.state.renorm_stddev),
                      renorm_clipping=CLIPPING if call.renorm == "clipped" else None)
    x = exact(v.x)
    forward = reference.forward(x, **kwargs)
    if (call.activation == "relu" or call.in_place == "relu") and call.dtype != torch.float64:
        assume(np.abs(forward.y).min() > 1e-3)  # ReLU's kink: see the module docstring
    z = torch.from_numpy(forward.y).requires_grad_()
    y = post(z, call)
    (dz,) = torch.autograd.grad(y, z, torch.from_numpy(exact(v.dy)))
    grads = reference.backward(x, dz.numpy(), **kwargs)
    state = {name: exact(t) for name, t in v.state._asdict().items() if t is not None}
    # The variance fed to moving_variance: the config leaves it to tf_keras's rule for the
    # input (the Bessel-corrected one where tf_keras fuses), as the layer and batch_norm do.
    unbiased = bool(v.config.for_input(v.x.ndim, call.dtype).unbiased_moving_variance)
    new = reference.update(state, forward, momentum=MOMENTUM, epsilon=EPSILON,
                           renorm_momentum=RENORM_MOMENTUM, unbiased=unbiased)

    # Scales: the largest |gamma r inv dy| (dx is it less two mean terms), |dy| per feature.
    r = 1.0 if forward.r is None else np.abs(forward.r).max()
    variances = [exact(v.state.moving_variance).min()]
    if forward.count is not None and (forward.count >= 2).any():
        variances.append(forward.group_variance[forward.count >= 2].min())
    inv = 1.0 / math.sqrt(max(min(variances), 0.0) + EPSILON)
    gamma = 1.0 if v.gamma is None else float(v.gamma.abs().max())
    dy = float(dz.abs().max())
    values = x.size // call.features
    scales = {"y": 1.0 + float(y.detach().abs().max()), "dx": 1.0 + 3 * gamma * r * inv * dy,
              "dgamma": 1.0 + 3 * values * dy, "dbeta": 1.0 + 3 * values * dy}
    return Result(exact(y), grads.dx, grads.dgamma, grads.dbeta, new), scales


def run(name: str, call: Call, v: Values) -> Result | None:
    """The call through kernel ``name`` (None where it declines it)."""
    x = v.x.detach().requires_grad_()  # the drawn strides (clone would make a view dense)
    gamma = None if v.gamma is None else v.gamma.clone().requires_grad_()
    beta = None if v.beta is None else v.beta.clone().requires_grad_()
    state = v.state._replace(**{k: t.clone() for k, t in v.state._asdict().items()
                                if t is not None})
    kernel = kernels.KERNELS[name]
    with kernels.prefer(name):
        prepared = prepare(x, state, v.config, training=True, gamma=gamma, beta=beta,
                           mask=v.mask, process_group=None)
        if prepared.kernel is not kernel:
            reason = kernel.unsupported(x, state, prepared.call)
            assert reason is not None, f"{name} takes the call, but {prepared.kernel.name} ran"
            event(f"{name} declines: {reason}")
            return None
        y, new = F.batch_norm(x, state, training=True, gamma=gamma, beta=beta, mask=v.mask,
                              config=v.config)
    if call.in_place == "relu":
        y.relu_()
    elif call.in_place == "add":
        y += 1
    else:
        y = y + 1
    (y * v.dy).sum().backward()
    state = {k: exact(t) for k, t in new._asdict().items() if t is not None}
    return Result(exact(y), exact(x.grad), exact(None if gamma is None else gamma.grad),
                  exact(None if beta is None else beta.grad), state)


def check(names: tuple[str, ...], call: Call) -> None:
    note(repr(call))
    v = Values(call)
    expected, scales = oracle(call, v)
    tol = TOLERANCE[call.dtype]
    for name in names:
        actual = run(name, call, v)
        if actual is None:
            continue
        event(f"{name} ran")

        for what in ("y", "dx", "dgamma", "dbeta"):
            close(getattr(actual, what), getattr(expected, what), f"{name}: {what}", tol,
                  scales[what])
        assert actual.state.keys() == expected.state.keys()
        for key, value in expected.state.items():
            close(actual.state[key], value, f"{name}: {key}", tol,
                  1.0 + float(np.abs(value).max(initial=0)))


def close(actual, expected, what: str, tol: float, scale: float) -> None:
    """``|actual - expected| <= tol * (scale + |expected|)`` (both None, or arrays)."""
    assert (actual is None) == (expected is None), what
    if expected is not None:
        torch.testing.assert_close(torch.tensor(np.asarray(actual, np.float64)),
                                   torch.tensor(np.asarray(expected, np.float64)),
                                   rtol=tol, atol=tol * scale, equal_nan=True,
                                   msg=lambda m: f"{what}: {m}")


SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
# A plain call ATen's kernel takes, channels-last through a size-1 dimension's stride (which
# ATen's CPU backward misreads), and a masked call with a channel of one selected value.
PLAIN = Call((8, 3, 2, 1), 1, (0, 3, 2, 1), None, torch.float64, None, None, "strided", None,
             (), True, True, None, "add", 1)
FEW = Call((8, 3), 1, None, None, torch.float64, None, 4, "strided", "values", (1, 2, None),
           True, True, "silu", "relu", 2)


@SETTINGS
@example(call=PLAIN)
@example(call=FEW)
@given(call=calls())
def test_kernels_match_the_oracle(call: Call) -> None:
    check(("composite", "native", "cpu"), call)


TRITON_REASON = triton_available()


@pytest.mark.triton
@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
@settings(SETTINGS, max_examples=10)
@example(call=FEW)
@given(call=calls())
def test_triton_kernel_matches_the_oracle(call: Call) -> None:
    check(("triton",), call)
