"""Property tests: ``bn.BatchNorm`` and ``functional.batch_norm`` against the NumPy oracle.

Hypothesis draws the input rank (2 to 5), the shape (every dimension 1 to 5, at least
2 values per feature in training), one to three feature axes given in either sign
convention and in any order, ``center``/``scale`` on and off, random ``gamma``/``beta``,
random moving statistics, ``momentum``, ``epsilon`` and ``unbiased_moving_variance``.
The forward output, the gradients ``dx``/``dgamma``/``dbeta`` for an upstream
gradient ``dy`` (``y.backward(dy)``), the batch statistics and the moving-average
update are compared with the NumPy oracle (:mod:`reference`, tests/reference.py) (float64 NumPy).

Tolerances:

- float64: ``rtol=1e-10, atol=1e-10``. A float64 computation against a float64 oracle
  on the very same values: the two differ only in summation order and in the order
  of the arithmetic, i.e. by a few ulps (~1e-15 relative) amplified by reductions of
  at most a few hundred elements.
- float32: ``rtol=1e-4, atol=1e-5``. The inputs are rounded to float32 first and the
  oracle runs on those rounded values, so what remains is float32 rounding
  (eps ~ 1.2e-7) on values of magnitude ~10 (``x * inv`` and ``shift`` of ~20
  cancel), accumulated over reductions of up to a few hundred elements.

Both tolerances compare ``|actual - expected| <= atol * scale + rtol * |expected|``, with
``scale = 1`` for the output and the statistics and, for the gradients, ``1 +`` the size
of the terms they are sums or differences of (:func:`gradient_scales`): ``dx`` in
training cancels almost to zero for a batch of 2, ``dgamma``/``dbeta`` sum up to a few
hundred products. A wrong formula (say a Bessel-corrected variance in the normalization,
off by ``N / (N - 1)``) is still off by far more than ``1e-5`` of those terms.

Feature-shaped tensors (``gamma``, ``beta``, the moving statistics) follow the feature
axes in ascending order, whatever order ``axis`` names them in (the oracle does the same).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pytest
import reference
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import functional as F

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    # The autouse torch seed fixture is irrelevant here: every value comes from a
    # NumPy generator seeded by Hypothesis.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

PRECISIONS = [
    pytest.param(torch.float64, 1e-10, 1e-10, id="float64"),
    pytest.param(torch.float32, 1e-4, 1e-5, id="float32"),
]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


@dataclass(frozen=True)
class Case:
    """One drawn configuration; arrays are float64 and are rounded to the tested dtype later."""

    x: np.ndarray
    dy: np.ndarray
    axis: int | tuple[int, ...]  # as passed to the API
    feature_axes: tuple[int, ...]  # non-negative, ascending
    feature_shape: tuple[int, ...]
    gamma: np.ndarray | None
    beta: np.ndarray | None
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    momentum: float
    epsilon: float
    unbiased: bool

    @property
    def reduction_axes(self) -> tuple[int, ...]:
        return tuple(d for d in range(self.x.ndim) if d not in self.feature_axes)

    @property
    def count(self) -> int:
        return math.prod(self.x.shape[d] for d in self.reduction_axes)


@st.composite
def cases(draw: st.DrawFn, *, training: bool) -> Case:
    rank = draw(st.integers(2, 5))
    shape = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
    n_features = draw(st.integers(1, min(3, rank - 1)))
    drawn = draw(st.lists(st.integers(0, rank - 1), min_size=n_features,
                          max_size=n_features, unique=True))
    features = tuple(sorted(drawn))
    reduce = [d for d in range(rank) if d not in features]
    if training and math.prod(shape[d] for d in reduce) < 2:
        shape[reduce[0]] = 2  # a variance needs two values per feature
    negative = draw(st.booleans())
    given_axes = tuple(a - rank if negative else a for a in drawn)
    as_int = len(given_axes) == 1 and draw(st.booleans())
    axis = given_axes[0] if as_int else given_axes

    center = draw(st.booleans())
    scale = draw(st.booleans())
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.99]))
    epsilon = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    unbiased = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    feature_shape = tuple(shape[d] for d in features)
    broadcast = [shape[d] if d in features else 1 for d in range(rank)]
    # Every feature gets its own location (|loc| <= 10) and spread (0.5 to 5). The noise
    # is standardized over the batch so that a feature's batch standard deviation is its
    # spread: a batch of 2 or 3 normal draws can otherwise be nearly constant, and
    # float32 then loses most digits to ``x - mean`` (an ill-conditioned input, not an
    # error of the implementation).
    loc = rng.uniform(-10.0, 10.0, broadcast)
    spread = np.exp(rng.uniform(np.log(0.5), np.log(5.0), broadcast))
    noise = rng.standard_normal(shape)
    if math.prod(shape[d] for d in reduce) >= 2:
        noise = noise - noise.mean(axis=tuple(reduce), keepdims=True)
        noise = noise / noise.std(axis=tuple(reduce), keepdims=True)
    x = loc + spread * noise
    return Case(
        x=x,
        dy=rng.standard_normal(shape),
        axis=axis,
        feature_axes=features,
        feature_shape=feature_shape,
        gamma=rng.uniform(-2.0, 2.0, feature_shape) if scale else None,
        beta=rng.uniform(-3.0, 3.0, feature_shape) if center else None,
        moving_mean=rng.uniform(-10.0, 10.0, feature_shape),
        moving_variance=np.exp(rng.uniform(np.log(0.25), np.log(25.0), feature_shape)),
        momentum=momentum,
        epsilon=epsilon,
        unbiased=unbiased,
    )


def training_and_inference_cases() -> st.SearchStrategy[tuple[bool, Case]]:
    return st.booleans().flatmap(lambda t: st.tuples(st.just(t), cases(training=t)))


# ---------------------------------------------------------------------------- helpers


def tensor(a: np.ndarray | None, dtype: torch.dtype, *, grad: bool = False) -> torch.Tensor | None:
    if a is None:
        return None
    return torch.tensor(a, dtype=dtype, requires_grad=grad)


def exact(t: torch.Tensor | None) -> np.ndarray | None:
    """The float64 values of ``t``: what the oracle must be fed so that it sees the same input."""
    return None if t is None else t.detach().to(torch.float64).numpy()


def assert_matches(actual: torch.Tensor | None, expected: np.ndarray | None,
                   rtol: float, atol: float, scale: np.ndarray | float = 1.0) -> None:
    """``|actual - expected| <= atol * scale + rtol * |expected|`` elementwise.

    ``scale`` is the magnitude of the terms ``expected`` is computed from (see
    :func:`gradient_scales`); rounding errors are relative to those, not to a result
    that cancels to nearly zero.
    """
    if expected is None:
        assert actual is None
        return
    assert actual is not None
    assert tuple(actual.shape) == expected.shape
    a = exact(actual)
    bound = atol * np.broadcast_to(scale, expected.shape) + rtol * np.abs(expected)
    bad = ~(np.abs(a - expected) <= bound)  # NaN counts as bad
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.size} elements differ by more than atol * scale + "
        f"rtol * |expected| (atol={atol}, rtol={rtol}); first at {np.argwhere(bad)[0]}: "
        f"actual {a[bad][0]!r}, expected {expected[bad][0]!r}, bound {bound[bad][0]!r}"
    )


class Scales(NamedTuple):
    dx: np.ndarray
    dgamma: np.ndarray
    dbeta: np.ndarray


def gradient_scales(case: Case, x: np.ndarray, dy: np.ndarray, training: bool,
                    kwargs: dict) -> Scales:
    """``1 +`` the magnitude of the terms each gradient is a sum or difference of.

    Training: ``dx = gamma * inv * (dy - mean(dy) - xhat * mean(dy * xhat))`` cancels
    almost completely for a batch of 2 (``xhat = +-1``), so its error is relative to
    ``|gamma * inv| * (|dy| + mean|dy| + |xhat| * mean|dy * xhat|)``. ``dgamma`` and
    ``dbeta`` are sums over the batch: their errors are relative to ``sum|dy * xhat|``
    and ``sum|dy|``. The reference's mean/variance give ``inv`` and ``xhat``.
    """
    reduce = case.reduction_axes

    def expand(t: np.ndarray) -> np.ndarray:
        return np.asarray(t).reshape(
            [x.shape[d] if d in case.feature_axes else 1 for d in range(x.ndim)])

    stats = reference.forward(x, **kwargs)
    inv = 1.0 / np.sqrt(expand(stats.variance) + case.epsilon)
    xhat = (x - expand(stats.mean)) * inv
    g_inv = np.abs(inv * (expand(kwargs["gamma"]) if kwargs["gamma"] is not None else 1.0))
    if training:
        terms = (np.abs(dy) + np.abs(dy).mean(axis=reduce, keepdims=True)
                 + np.abs(xhat) * np.abs(dy * xhat).mean(axis=reduce, keepdims=True))
    else:
        terms = np.abs(dy)
    return Scales(dx=1.0 + g_inv * terms,
                  dgamma=1.0 + np.abs(dy * xhat).sum(axis=reduce),
                  dbeta=1.0 + np.abs(dy).sum(axis=reduce))


def expected_moving_statistics(case: Case, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The moving averages after one training step, from the oracle's batch statistics."""
    x = exact(torch.tensor(case.x, dtype=dtype))
    stats = reference.forward(x, axis=case.axis, training=True)
    variance = stats.variance * (case.count / (case.count - 1)) if case.unbiased \
        else stats.variance
    mean0 = exact(torch.tensor(case.moving_mean, dtype=dtype))
    variance0 = exact(torch.tensor(case.moving_variance, dtype=dtype))
    return (reference.moving_average(mean0, stats.mean, case.momentum),
            reference.moving_average(variance0, variance, case.momentum))


def oracle_kwargs(case: Case, dtype: torch.dtype, training: bool) -> dict:
    def rounded(a: np.ndarray | None) -> np.ndarray | None:
        return exact(tensor(a, dtype))

    return dict(axis=case.axis, training=training, gamma=rounded(case.gamma),
                beta=rounded(case.beta), moving_mean=rounded(case.moving_mean),
                moving_variance=rounded(case.moving_variance), epsilon=case.epsilon)


class Functional:
    """One call of ``functional.batch_norm`` on a case's values in ``dtype``."""

    def __init__(self, case: Case, dtype: torch.dtype, training: bool) -> None:
        self.x = tensor(case.x, dtype, grad=True)
        self.gamma = tensor(case.gamma, dtype, grad=True)
        self.beta = tensor(case.beta, dtype, grad=True)
        self.state = F.BatchNormState(
            tensor(case.moving_mean, dtype), tensor(case.moving_variance, dtype),
            torch.tensor(0, dtype=torch.int64))
        self.y, self.new_state = F.batch_norm(
            self.x, self.state, training=training, gamma=self.gamma, beta=self.beta,
            axis=case.axis, momentum=case.momentum, epsilon=case.epsilon,
            unbiased_moving_variance=case.unbiased)


def make_layer(case: Case, dtype: torch.dtype) -> bn.BatchNorm:
    with warnings.catch_warnings():  # momentum 0.0 is drawn on purpose: no PyTorch habit
        warnings.filterwarnings("ignore", message="momentum=", category=UserWarning)
        layer = bn.BatchNorm(
            case.feature_shape, axis=case.axis, momentum=case.momentum, epsilon=case.epsilon,
            center=case.beta is not None, scale=case.gamma is not None,
            unbiased_moving_variance=case.unbiased, dtype=dtype)
    with torch.no_grad():
        if layer.gamma is not None:
            layer.gamma.copy_(tensor(case.gamma, dtype))
        if layer.beta is not None:
            layer.beta.copy_(tensor(case.beta, dtype))
        layer.moving_mean.copy_(tensor(case.moving_mean, dtype))
        layer.moving_variance.copy_(tensor(case.moving_variance, dtype))
    return layer


# ---------------------------------------------------------------------------- functional


@pytest.mark.parametrize(("dtype", "rtol", "atol"), PRECISIONS)
@SETTINGS
@given(data=training_and_inference_cases())
def test_functional_forward_matches_reference(data, dtype, rtol, atol):
    training, case = data
    run = Functional(case, dtype, training)
    expected = reference.forward(exact(run.x), **oracle_kwargs(case, dtype, training))
    assert run.y.dtype == dtype
    assert_matches(run.y, expected.y, rtol, atol)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), PRECISIONS)
@SETTINGS
@given(data=training_and_inference_cases())
def test_functional_gradients_match_reference(data, dtype, rtol, atol):
    training, case = data
    run = Functional(case, dtype, training)
    dy = tensor(case.dy, dtype)
    run.y.backward(dy)
    kwargs = oracle_kwargs(case, dtype, training)
    expected = reference.backward(exact(run.x), exact(dy), **kwargs)
    scale = gradient_scales(case, exact(run.x), exact(dy), training, kwargs)
    assert_matches(run.x.grad, expected.dx, rtol, atol, scale.dx)
    assert_matches(None if run.gamma is None else run.gamma.grad, expected.dgamma,
                   rtol, atol, scale.dgamma)
    assert_matches(None if run.beta is None else run.beta.grad, expected.dbeta,
                   rtol, atol, scale.dbeta)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), PRECISIONS)
@SETTINGS
@given(case=cases(training=True))
def test_moments_over_the_non_feature_axes_are_the_reference_batch_statistics(
        case, dtype, rtol, atol):
    x = tensor(case.x, dtype)
    negative = [d - x.ndim for d in case.reduction_axes]
    mean, variance = F.moments(x, negative)
    expected = reference.forward(exact(x), axis=case.axis, training=True)
    assert_matches(mean, expected.mean, rtol, atol)
    assert_matches(variance, expected.variance, rtol, atol)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), PRECISIONS)
@SETTINGS
@given(case=cases(training=True))
def test_functional_training_folds_the_batch_statistics_into_the_moving_averages(
        case, dtype, rtol, atol):
    new_state = Functional(case, dtype, training=True).new_state
    expected_mean, expected_variance = expected_moving_statistics(case, dtype)
    assert new_state.moving_mean.dtype == dtype
    assert_matches(new_state.moving_mean, expected_mean, rtol, atol)
    assert_matches(new_state.moving_variance, expected_variance, rtol, atol)
    assert new_state.num_updates.item() == 1


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=cases(training=False))
def test_functional_inference_returns_the_state_unchanged(case, dtype):
    run = Functional(case, dtype, training=False)
    for before, after in zip(run.state[:3], run.new_state[:3], strict=True):
        assert torch.equal(before, after)
    assert torch.equal(run.new_state.moving_mean, tensor(case.moving_mean, dtype))
    assert torch.equal(run.new_state.moving_variance, tensor(case.moving_variance, dtype))


# ---------------------------------------------------------------------------- layer


@pytest.mark.parametrize(("dtype", "rtol", "atol"), PRECISIONS)
@SETTINGS
@given(data=training_and_inference_cases())
def test_layer_forward_matches_reference(data, dtype, rtol, atol):
    training, case = data
    layer = make_layer(case, dtype)
    x = tensor(case.x, dtype)
    y = layer(x, training=training)
    expected = reference.forward(exact(x), **oracle_kwargs(case, dtype, training))
    assert y.dtype == dtype
    assert_matches(y, expected.y, rtol, atol)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), PRECISIONS)
@SETTINGS
@given(data=training_and_inference_cases())
def test_layer_gradients_match_reference(data, dtype, rtol, atol):
    training, case = data
    layer = make_layer(case, dtype)
    x = tensor(case.x, dtype, grad=True)
    dy = tensor(case.dy, dtype)
    layer(x, training=training).backward(dy)
    kwargs = oracle_kwargs(case, dtype, training)
    expected = reference.backward(exact(x), exact(dy), **kwargs)
    scale = gradient_scales(case, exact(x), exact(dy), training, kwargs)
    assert_matches(x.grad, expected.dx, rtol, atol, scale.dx)
    assert_matches(None if layer.gamma is None else layer.gamma.grad, expected.dgamma,
                   rtol, atol, scale.dgamma)
    assert_matches(None if layer.beta is None else layer.beta.grad, expected.dbeta,
                   rtol, atol, scale.dbeta)


@pytest.mark.parametrize(("dtype", "rtol", "atol"), PRECISIONS)
@SETTINGS
@given(case=cases(training=True))
def test_layer_training_updates_its_buffers_with_the_moving_average(case, dtype, rtol, atol):
    layer = make_layer(case, dtype)
    layer(tensor(case.x, dtype), training=True)
    expected_mean, expected_variance = expected_moving_statistics(case, dtype)
    assert layer.moving_mean.dtype == dtype
    assert_matches(layer.moving_mean, expected_mean, rtol, atol)
    assert_matches(layer.moving_variance, expected_variance, rtol, atol)
    assert layer.num_updates.item() == 1


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(case=cases(training=False))
def test_layer_inference_leaves_its_buffers_unchanged(case, dtype):
    layer = make_layer(case, dtype)
    before = {name: b.clone() for name, b in layer.named_buffers()}
    layer(tensor(case.x, dtype), training=False)
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert layer.num_updates.item() == 0
