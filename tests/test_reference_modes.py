"""Every training mode of ``bn.BatchNorm`` and ``functional.batch_norm`` against the NumPy oracle.

The modes: Batch Renormalization with and without clipping, ghost batches in both
layouts (with several feature axes too), masks of every accepted shape (with an
empty ghost group too), adjustment (feature-shaped and full-rank), and their
combinations, channels-first and channels-last. For each, a few training steps
are compared with the NumPy oracle (:mod:`reference`, tests/reference.py) (output, the gradients of
``sum(y * dy)`` for x, gamma and beta, and every buffer after the step), then an
inference call. Around that: ``trainable=False``, deferred updates, debias,
bfloat16 inputs, a mask that selects nothing, and a Hypothesis sweep.

Tolerance ``rtol = atol = 1e-10`` in float64: the library and the oracle compute
the same formulas on the same float64 values and differ only in the order of the
arithmetic (summation order, ``x * inv + shift`` against ``(x - mean) * inv``),
i.e. by a few ulps (~1e-16 relative) amplified by reductions over at most a few
hundred values and by ``1 / sqrt(var + eps) <= 1 / sqrt(eps) ~ 32``: ~1e-13 at
worst for values of magnitude <= ~100. A wrong formula (a Bessel-corrected
variance, a consecutive instead of strided group, a missing ``d``) is off by
far more than 1e-10.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import reference
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm as bn
from batchnorm import functional as F

RTOL = ATOL = 1e-10
EPSILON = 1e-3
MOMENTUM = 0.9
RENORM_MOMENTUM = 0.8
CLIP = {"rmin": 0.7, "rmax": 1.5, "dmax": 0.5}
RENORM_STATE = ("moving_stddev", "renorm_mean", "renorm_stddev")
FUSED = pytest.mark.parametrize("fused", [None, False], ids=["fused=None", "fused=False"])


@dataclass(frozen=True)
class Mode:
    id: str
    shape: tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    renorm: bool = False
    clipping: dict | None = None
    vbs: int | None = None
    layout: str = "strided"
    mask: str | None = None  # "batch" (N,), "nonfeature" (non-feature axes), "full", "empty_group"
    adjustment: str | None = None  # "feature" or "full" (x-shaped)
    unbiased: bool = False

    @property
    def features(self) -> tuple[int, ...]:
        axes = (self.axis,) if isinstance(self.axis, int) else self.axis
        return tuple(sorted(a % len(self.shape) for a in axes))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.features)

    def layer_kwargs(self) -> dict:
        return dict(axis=self.axis, renorm=self.renorm, renorm_clipping=self.clipping,
                    virtual_batch_size=self.vbs, ghost_layout=self.layout,
                    unbiased_moving_variance=self.unbiased)


MODES = [
    Mode("plain", (6, 3)),
    Mode("plain_channels_first", (4, 3, 2, 2), axis=1),
    Mode("plain_channels_last", (4, 2, 2, 3)),
    Mode("plain_two_axes", (4, 3, 2, 2), axis=(1, 3)),
    Mode("renorm", (6, 3), renorm=True),
    Mode("renorm_clip", (6, 3), renorm=True, clipping=CLIP),
    Mode("renorm_channels_first", (4, 3, 2, 2), axis=1, renorm=True, clipping=CLIP),
    Mode("ghost_strided", (8, 3), vbs=4),
    Mode("ghost_consecutive", (8, 3), vbs=4, layout="consecutive"),
    Mode("ghost_channels_first", (8, 3, 2), axis=1, vbs=2),
    Mode("ghost_two_axes_strided", (8, 3, 2, 2), axis=(1, 3), vbs=4),
    Mode("ghost_two_axes_consecutive", (8, 3, 2, 2), axis=(1, 3), vbs=2, layout="consecutive"),
    Mode("ghost_unbiased", (8, 2, 3), vbs=4, unbiased=True),
    Mode("ghost_renorm", (8, 3), vbs=4, renorm=True),
    Mode("ghost_renorm_clip_consecutive", (8, 3, 2), axis=1, vbs=4, layout="consecutive",
         renorm=True, clipping=CLIP),
    Mode("mask_batch", (8, 3), mask="batch"),
    Mode("mask_nonfeature_axis1", (4, 3, 5), axis=1, mask="nonfeature"),
    Mode("mask_full", (6, 3, 4), axis=1, mask="full"),
    Mode("mask_renorm", (8, 3), mask="batch", renorm=True, clipping={"rmax": 1.2}),
    Mode("mask_full_renorm", (4, 3, 5), axis=1, mask="full", renorm=True),
    Mode("mask_ghost_empty_group_strided", (8, 3), vbs=4, mask="empty_group"),
    Mode("mask_ghost_empty_group_consecutive", (8, 3), vbs=4, layout="consecutive",
         mask="empty_group"),
    Mode("mask_ghost_full_renorm", (8, 3, 2), axis=1, vbs=4, mask="full", renorm=True),
    Mode("mask_ghost_unbiased", (8, 3, 2), axis=-1, vbs=4, mask="full", unbiased=True),
    Mode("adjust_feature", (6, 3), adjustment="feature"),
    Mode("adjust_full_channels_first", (4, 3, 2), axis=1, adjustment="full"),
    Mode("adjust_renorm", (6, 3), adjustment="feature", renorm=True, clipping=CLIP),
    Mode("adjust_full_mask_renorm", (6, 3), adjustment="full", mask="batch", renorm=True),
]
RENORM_MODES = [m for m in MODES if m.renorm]


# ---------------------------------------------------------------------------- data


class Adjustment:
    """A random ``(scale, bias)`` per call, feature-shaped or full-rank; remembers the last one."""

    def __init__(self, mode: Mode, seed: int) -> None:
        self.mode, self.rng, self.last = mode, np.random.default_rng(seed), None

    def __call__(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(shape) if self.mode.adjustment == "full" else self.mode.feature_shape
        self.last = (self.rng.uniform(0.5, 1.5, size), self.rng.uniform(-0.5, 0.5, size))
        return torch.from_numpy(self.last[0]), torch.from_numpy(self.last[1])


def group_of(mode: Mode) -> np.ndarray:
    """The ghost group of every sample, computed here independently of the oracle."""
    n = np.arange(mode.shape[0])
    groups = mode.shape[0] // mode.vbs
    return n % groups if mode.layout == "strided" else n // mode.vbs


def make_mask(mode: Mode, rng: np.random.Generator) -> np.ndarray | None:
    n = mode.shape[0]
    if mode.mask is None:
        return None
    if mode.mask == "batch":
        mask = rng.random(n) < 0.7
        mask[:2] = True
        return mask
    if mode.mask == "nonfeature":
        mask = rng.random([s for d, s in enumerate(mode.shape) if d not in mode.features]) < 0.6
        mask[0, :2] = True
        return mask
    if mode.mask == "full":
        mask = rng.random(mode.shape) < 0.7
        mask[:2] = True
        if mode.vbs:  # one feature of one ghost group is empty
            index = [group_of(mode) == 0] + [slice(None)] * (len(mode.shape) - 1)
            index[mode.features[0]] = 0
            mask[tuple(index)] = False
        return mask
    assert mode.mask == "empty_group"
    mask = rng.random(n) < 0.8
    mask[group_of(mode) == 0] = False
    mask[group_of(mode) == 1] = True
    return mask


def batch(mode: Mode, rng: np.random.Generator) -> np.ndarray:
    """Per-feature location in [-3, 3] and spread in [0.3, 3]: far from the renorm state."""
    broadcast = [s if d in mode.features else 1 for d, s in enumerate(mode.shape)]
    loc = rng.uniform(-3.0, 3.0, broadcast)
    spread = np.exp(rng.uniform(np.log(0.3), np.log(3.0), broadcast))
    return loc + spread * rng.standard_normal(mode.shape)


def initial_values(mode: Mode, rng: np.random.Generator) -> tuple[dict, dict]:
    """Random ``(params, state)``; renorm_stddev near 1, so that the correction is nontrivial."""
    shape = mode.feature_shape
    params = {"gamma": rng.uniform(-2.0, 2.0, shape), "beta": rng.uniform(-1.0, 1.0, shape)}
    state = {"moving_mean": rng.uniform(-1.0, 1.0, shape),
             "moving_variance": rng.uniform(0.5, 2.0, shape), "num_updates": np.asarray(0)}
    if mode.renorm:
        state.update(moving_stddev=np.sqrt(state["moving_variance"]),
                     renorm_mean=rng.uniform(-1.0, 1.0, shape),
                     renorm_stddev=rng.uniform(0.8, 1.2, shape))
    return params, state


def make_layer(mode: Mode, fused: bool | None, params: dict, state: dict,
               **kwargs) -> bn.BatchNorm:
    adjustment = Adjustment(mode, seed=7) if mode.adjustment else None
    layer = bn.BatchNorm(mode.feature_shape, momentum=MOMENTUM, epsilon=EPSILON,
                         renorm_momentum=RENORM_MOMENTUM, adjustment=adjustment, fused=fused,
                         dtype=kwargs.pop("dtype", torch.float64),
                         **{**mode.layer_kwargs(), **kwargs})
    with torch.no_grad():
        for name, value in {**params, **state}.items():
            getattr(layer, name).copy_(torch.as_tensor(value))
    return layer


# ---------------------------------------------------------------------------- oracle


def oracle_kwargs(mode: Mode, params: dict, state: dict, mask, adjustment, training: bool):
    kwargs = dict(axis=mode.axis, training=training, epsilon=EPSILON, **params,
                  moving_mean=state["moving_mean"], moving_variance=state["moving_variance"],
                  virtual_batch_size=mode.vbs, ghost_layout=mode.layout, mask=mask)
    if mode.renorm:
        kwargs.update(renorm_mean=state["renorm_mean"], renorm_stddev=state["renorm_stddev"],
                      renorm_clipping=mode.clipping)
    if adjustment is not None and adjustment.last is not None:
        kwargs.update(adj_scale=adjustment.last[0], adj_bias=adjustment.last[1])
    return kwargs


def oracle_step(mode: Mode, params: dict, state: dict, x, dy, mask, adjustment, training: bool):
    """``(forward, gradients, state after the step)`` from the oracle."""
    kwargs = oracle_kwargs(mode, params, state, mask, adjustment, training)
    out = reference.forward(x, **kwargs)
    grads = reference.backward(x, dy, **kwargs)
    if training:
        state = reference.update(state, out, momentum=MOMENTUM, epsilon=EPSILON,
                                 renorm_momentum=RENORM_MOMENTUM, unbiased=mode.unbiased)
    return out, grads, state


def close(actual, expected, what: str = "", rtol: float = RTOL, atol: float = ATOL) -> None:
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().to(torch.float64).numpy()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def layer_step(layer: bn.BatchNorm, x: np.ndarray, dy: np.ndarray, mask, training: bool):
    """``(y, dx)`` of one call; gamma/beta gradients are left in ``.grad``."""
    for p in (layer.gamma, layer.beta):
        p.grad = None
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt, training=training, mask=None if mask is None else torch.from_numpy(mask))
    y.backward(torch.from_numpy(dy))
    return y, xt.grad


def check_against_oracle(layer, mode, params, state, x, dy, mask, training, step=""):
    """One layer call against the oracle; returns the oracle's state after it."""
    y, dx = layer_step(layer, x, dy, mask, training)
    out, grads, state = oracle_step(mode, params, state, x, dy, mask, layer.adjustment, training)
    assert y.dtype == torch.float64
    close(y, out.y, f"{step} y")
    close(dx, grads.dx, f"{step} dx")
    if layer.gamma.requires_grad:
        close(layer.gamma.grad, grads.dgamma, f"{step} dgamma")
        close(layer.beta.grad, grads.dbeta, f"{step} dbeta")
    check_buffers(layer, state, step)
    return state


def check_buffers(layer: bn.BatchNorm, state: dict, step: str = "") -> None:
    for name, value in state.items():
        buffer = getattr(layer, name)
        if name == "num_updates":
            assert buffer.item() == int(value), f"{step} num_updates"
        else:
            assert buffer.dtype == torch.float64
            close(buffer, value, f"{step} {name}")


# ---------------------------------------------------------------------------- every mode


@FUSED
@pytest.mark.parametrize("mode", MODES, ids=[m.id for m in MODES])
def test_layer_training_steps_then_inference_match_reference(mode, fused):
    rng = np.random.default_rng(0)
    params, state = initial_values(mode, rng)
    layer = make_layer(mode, fused, params, state)
    for step in range(3):
        x, dy, mask = batch(mode, rng), rng.standard_normal(mode.shape), make_mask(mode, rng)
        state = check_against_oracle(layer, mode, params, state, x, dy, mask, True, f"step {step}")
    assert layer.num_updates.item() == 3
    x, dy = batch(mode, rng), rng.standard_normal(mode.shape)
    check_against_oracle(layer, mode, params, state, x, dy, None, False, "inference")


@FUSED
@pytest.mark.parametrize("mode", MODES, ids=[m.id for m in MODES])
def test_functional_matches_reference(mode, fused):
    rng = np.random.default_rng(1)
    params, state = initial_values(mode, rng)
    adjustment = Adjustment(mode, seed=3) if mode.adjustment else None
    fstate = F.initial_state(mode.feature_shape, renorm=mode.renorm, dtype=torch.float64)
    fstate = fstate._replace(**{k: torch.as_tensor(v) for k, v in state.items()})
    gamma, beta = (torch.tensor(params[k], requires_grad=True) for k in ("gamma", "beta"))
    for step, training in enumerate((True, True, False)):
        x, dy, mask = batch(mode, rng), rng.standard_normal(mode.shape), make_mask(mode, rng)
        xt = torch.tensor(x, requires_grad=True)
        y, fstate = F.batch_norm(
            xt, fstate, training=training, gamma=gamma, beta=beta, axis=mode.axis,
            momentum=MOMENTUM, epsilon=EPSILON, unbiased_moving_variance=mode.unbiased,
            renorm=mode.renorm, renorm_clipping=mode.clipping, renorm_momentum=RENORM_MOMENTUM,
            virtual_batch_size=mode.vbs, ghost_layout=mode.layout, adjustment=adjustment,
            fused=fused, mask=None if mask is None else torch.from_numpy(mask))
        gamma.grad = beta.grad = None
        y.backward(torch.from_numpy(dy))
        out, grads, state = oracle_step(mode, params, state, x, dy, mask, adjustment, training)
        close(y, out.y, f"step {step} y")
        close(xt.grad, grads.dx, f"step {step} dx")
        close(gamma.grad, grads.dgamma, f"step {step} dgamma")
        close(beta.grad, grads.dbeta, f"step {step} dbeta")
        for name, value in state.items():
            close(getattr(fstate, name), value, f"step {step} {name}")


@FUSED
@pytest.mark.parametrize("mode", MODES, ids=[m.id for m in MODES])
def test_frozen_layer_runs_inference_and_never_updates(mode, fused):
    rng = np.random.default_rng(2)
    params, state = initial_values(mode, rng)
    layer = make_layer(mode, fused, params, state, trainable=False)
    x, dy, mask = batch(mode, rng), rng.standard_normal(mode.shape), make_mask(mode, rng)
    y, dx = layer_step(layer, x, dy, mask, training=True)
    out, grads, _ = oracle_step(mode, params, state, x, dy, None, None, training=False)
    close(y, out.y)
    close(dx, grads.dx)
    assert layer.gamma.grad is None and layer.beta.grad is None
    check_buffers(layer, state)
    if layer.adjustment is not None:
        assert layer.adjustment.last is None  # never called in inference


# ---------------------------------------------------------------------------- renorm


@FUSED
def test_renorm_clipping_is_active_and_applied(fused):
    mode = next(m for m in MODES if m.id == "renorm_clip")
    rng = np.random.default_rng(0)
    params, state = initial_values(mode, rng)
    # Batch standard deviations 3, 0.3, 1 against renorm_stddev in [0.8, 1.2] give r above
    # rmax, below rmin, within; means 3, 0, -3 against renorm_mean in [-1, 1] give |d| > dmax.
    noise = rng.standard_normal(mode.shape)
    noise = (noise - noise.mean(0)) / noise.std(0)
    x = np.array([3.0, 0.0, -3.0]) + np.array([3.0, 0.3, 1.0]) * noise
    dy = rng.standard_normal(mode.shape)
    kwargs = oracle_kwargs(mode, params, state, None, None, True)
    clipped = reference.forward(x, **kwargs)
    free = reference.forward(x, **{**kwargs, "renorm_clipping": None})
    # The chosen data hits all three limits (see ``batch`` and ``initial_values``).
    assert (free.r > CLIP["rmax"]).any() and (free.r < CLIP["rmin"]).any()
    assert (np.abs(free.d) > CLIP["dmax"]).any()
    np.testing.assert_array_equal(clipped.r, np.clip(free.r, CLIP["rmin"], CLIP["rmax"]))
    np.testing.assert_array_equal(clipped.d, np.clip(free.d, -CLIP["dmax"], CLIP["dmax"]))
    layer = make_layer(mode, fused, params, state)
    y, _ = layer_step(layer, x, dy, None, training=True)
    close(y, clipped.y)
    assert not np.allclose(y.detach().numpy(), free.y, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("renorm", [True, False], ids=["renorm", "plain"])
def test_debias_inference_follows_the_hand_formula(renorm):
    mode = Mode("debias", (6, 3), renorm=renorm)
    rng = np.random.default_rng(4)
    params, state = initial_values(mode, rng)
    if renorm:
        state["renorm_mean"], state["renorm_stddev"] = state["moving_mean"], state["moving_stddev"]
    m0, v0 = state["moving_mean"], state["moving_variance"]
    layer = make_layer(mode, None, params, state, debias=True)
    with torch.no_grad():
        layer.initial_moving_mean.copy_(torch.from_numpy(m0))
        layer.initial_moving_variance.copy_(torch.from_numpy(v0))
    for _ in range(3):
        x, dy = batch(mode, rng), rng.standard_normal(mode.shape)
        state = check_against_oracle(layer, mode, params, state, x, dy, None, True)
    x = batch(mode, rng)
    correction = 1 - MOMENTUM ** 3
    mean = (state["moving_mean"] - MOMENTUM ** 3 * m0) / correction
    if renorm:
        stddev = (state["moving_stddev"] - MOMENTUM ** 3 * np.sqrt(v0)) / correction
        variance = np.maximum(stddev ** 2 - EPSILON, 0.0)
    else:
        variance = (state["moving_variance"] - MOMENTUM ** 3 * v0) / correction
    expected = params["gamma"] * (x - mean) / np.sqrt(variance + EPSILON) + params["beta"]
    close(layer(torch.from_numpy(x), training=False), expected)


@pytest.mark.parametrize("mode", [m for m in RENORM_MODES if m.mask],
                         ids=[m.id for m in RENORM_MODES if m.mask])
def test_deferred_updates_give_the_eager_state(mode):
    rng = np.random.default_rng(5)
    params, state = initial_values(mode, rng)
    eager = make_layer(mode, None, params, state)
    deferred = make_layer(mode, None, params, state)
    for _ in range(2):
        x, mask = torch.from_numpy(batch(mode, rng)), torch.from_numpy(make_mask(mode, rng))
        y_eager = eager(x, training=True, mask=mask)
        before = {k: b.clone() for k, b in deferred.named_buffers()}
        with bn.deferred_updates() as updates:
            y_deferred = deferred(x, training=True, mask=mask)
            for name, buffer in deferred.named_buffers():
                assert torch.equal(buffer, before[name]), name
            assert updates.apply() == 1
        assert torch.equal(y_deferred, y_eager)
        for name, buffer in eager.named_buffers():
            torch.testing.assert_close(getattr(deferred, name), buffer, rtol=0, atol=0)


# ---------------------------------------------------------------------------- ghost batches


@FUSED
@pytest.mark.parametrize("layout", ["strided", "consecutive"])
def test_ghost_groups_are_the_documented_samples(layout, fused):
    """Strided: sample n in group n % (N // vbs); consecutive: n // vbs (checked per group)."""
    mode = Mode("ghost", (8, 3), vbs=4, layout=layout)
    rng = np.random.default_rng(6)
    params, state = initial_values(mode, rng)
    x = batch(mode, rng)
    y = make_layer(mode, fused, params, state)(torch.from_numpy(x), training=True)
    expected_rows = {"strided": [[0, 2, 4, 6], [1, 3, 5, 7]],
                     "consecutive": [[0, 1, 2, 3], [4, 5, 6, 7]]}[layout]
    for rows in expected_rows:
        plain = reference.forward(x[rows], axis=-1, training=True, epsilon=EPSILON, **params)
        close(y[rows], plain.y)
    other = "consecutive" if layout == "strided" else "strided"
    y_other = make_layer(Mode("g", (8, 3), vbs=4, layout=other), fused, params, state)(
        torch.from_numpy(x), training=True)
    assert not torch.allclose(y, y_other, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------- masks


@FUSED
@pytest.mark.filterwarnings("ignore:momentum=0.0:UserWarning")  # momentum 0 is meant here
def test_mask_statistics_come_from_the_selected_samples_only(fused):
    """By hand: with momentum 0 the moving statistics become those of ``x[mask]``."""
    x = np.random.default_rng(7).standard_normal((10, 3)) * 2 + 1
    mask = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1, 0], bool)
    layer = bn.BatchNorm(3, axis=-1, momentum=0.0, fused=fused, dtype=torch.float64)
    y = layer(torch.from_numpy(x), training=True, mask=torch.from_numpy(mask))
    mean, variance = x[mask].mean(0), x[mask].var(0)
    close(layer.moving_mean, mean)
    close(layer.moving_variance, variance)
    close(y, (x - mean) / np.sqrt(variance + EPSILON))  # every row, selected or not
    full = layer(torch.from_numpy(x), training=True,
                 mask=torch.from_numpy(np.repeat(mask[:, None], 3, axis=1)))
    close(full, y.detach().numpy())


EMPTY_MASK_MODES = [Mode("mask_empty", (6, 3), mask="batch"),
                    Mode("mask_empty_renorm", (6, 3), mask="batch", renorm=True, clipping=CLIP),
                    Mode("mask_empty_ghost", (8, 3, 2), axis=1, vbs=4, mask="full", renorm=True)]


@FUSED
@pytest.mark.parametrize("mode", EMPTY_MASK_MODES, ids=[m.id for m in EMPTY_MASK_MODES])
def test_mask_selecting_nothing_leaves_the_statistics_and_warns(mode, fused):
    rng = np.random.default_rng(8)
    params, state = initial_values(mode, rng)
    layer = make_layer(mode, fused, params, state)
    x, dy = batch(mode, rng), rng.standard_normal(mode.shape)
    mask = np.zeros(mode.shape[:1] if mode.mask == "batch" else mode.shape, bool)
    with pytest.warns(RuntimeWarning, match="mask"):
        y, dx = layer_step(layer, x, dy, mask, training=True)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    check_buffers(layer, state)  # num_updates included
    out, grads, new_state = oracle_step(mode, params, state, x, dy, mask, None, True)
    assert all(np.array_equal(new_state[k], v) for k, v in state.items())
    close(y, out.y)
    close(dx, grads.dx)
    if mode.renorm:
        assert (out.r == 1).all() and (out.d == 0).all()
    # Normalized with the moving statistics: the inference output.
    close(y, reference.forward(x, **oracle_kwargs(mode, params, state, None, None, False)).y)


# ---------------------------------------------------------------------------- layouts, dtypes


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_channels_last_memory_format_matches_contiguous(renorm):
    mode = Mode("cl", (4, 3, 2, 5), axis=1, renorm=renorm)
    rng = np.random.default_rng(9)
    params, state = initial_values(mode, rng)
    x, dy = batch(mode, rng), rng.standard_normal(mode.shape)
    layer = make_layer(mode, None, params, state)
    xt = torch.from_numpy(x).to(memory_format=torch.channels_last).requires_grad_()
    y = layer(xt, training=True)
    y.backward(torch.from_numpy(dy).to(memory_format=torch.channels_last))
    out, grads, state = oracle_step(mode, params, state, x, dy, None, None, True)
    close(y, out.y)
    close(xt.grad, grads.dx)
    check_buffers(layer, state)


BF16_MODES = [m for m in MODES if m.id in (
    "renorm_clip", "ghost_renorm", "mask_ghost_full_renorm", "mask_nonfeature_axis1",
    "ghost_two_axes_consecutive", "plain_channels_first")]


@FUSED
@pytest.mark.parametrize("mode", BF16_MODES, ids=[m.id for m in BF16_MODES])
def test_bfloat16_input_matches_float32_on_the_same_values(mode, fused):
    """bf16 in, bf16 out, float32 state: the statistics are computed in float32 from the
    very values a float32 run sees, so only the final rounding of ``y`` to bf16 differs:
    at most half an ulp, ``2**-8 * |y|`` (bf16 keeps 8 significant bits), plus float32
    noise. The state is float32 either way and must agree to float32 rounding."""
    rng = np.random.default_rng(10)
    params, state = initial_values(mode, rng)
    layers = [make_layer(mode, fused, params, state, dtype=torch.float32) for _ in range(2)]
    for _ in range(2):
        x = torch.from_numpy(batch(mode, rng)).to(torch.bfloat16)
        mask = make_mask(mode, rng)
        mask = None if mask is None else torch.from_numpy(mask)
        y_half = layers[0](x, training=True, mask=mask)
        y_single = layers[1](x.float(), training=True, mask=mask)
        assert y_half.dtype == torch.bfloat16
        torch.testing.assert_close(y_half.float(), y_single.detach(), rtol=2 ** -8, atol=1e-5)
        for name, buffer in layers[1].named_buffers():
            half = getattr(layers[0], name)
            assert half.dtype == buffer.dtype
            torch.testing.assert_close(half, buffer, rtol=1e-6, atol=1e-6)
    assert layers[0].moving_mean.dtype == torch.float32


# ---------------------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("mode", [m for m in MODES if not m.renorm],
                         ids=[m.id for m in MODES if not m.renorm])
def test_reference_backward_matches_central_differences_of_its_forward(mode):
    """The oracle's hand-derived backward against its own forward (renorm is covered since
    a constant ``(r, d)`` is the adjustment ``(r * adj_scale, d * adj_scale + adj_bias)``)."""
    rng = np.random.default_rng(11)
    params, state = initial_values(mode, rng)
    x, dy, mask = batch(mode, rng), rng.standard_normal(mode.shape), make_mask(mode, rng)
    adjustment = Adjustment(mode, 0) if mode.adjustment else None
    if adjustment is not None:
        adjustment(mode.shape)
    kwargs = oracle_kwargs(mode, params, state, mask, adjustment, True)
    grads = reference.backward(x, dy, **kwargs)
    h = 1e-6

    def numeric(f, a):
        out = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            e = np.zeros_like(a)
            e[i] = h
            out[i] = (f(a + e) - f(a - e)) / (2 * h)
        return out

    def loss(**changed):
        return (reference.forward(changed.pop("x", x), **{**kwargs, **changed}).y * dy).sum()

    close(grads.dx, numeric(lambda a: loss(x=a), x), rtol=1e-6, atol=1e-6)
    close(grads.dgamma, numeric(lambda a: loss(gamma=a), params["gamma"]), rtol=1e-6, atol=1e-6)
    close(grads.dbeta, numeric(lambda a: loss(beta=a), params["beta"]), rtol=1e-6, atol=1e-6)


def test_reference_renorm_backward_is_the_adjusted_backward_with_constant_r_d():
    mode = Mode("r", (6, 3), renorm=True)
    rng = np.random.default_rng(12)
    params, state = initial_values(mode, rng)
    x, dy = batch(mode, rng), rng.standard_normal(mode.shape)
    kwargs = oracle_kwargs(mode, params, state, None, None, True)
    out = reference.forward(x, **kwargs)
    plain = {k: v for k, v in kwargs.items() if not k.startswith("renorm")}
    grads = reference.backward(x, dy, **kwargs)
    adjusted = reference.backward(x, dy, **plain, adj_scale=out.r, adj_bias=out.d)
    for a, b in zip(grads, adjusted, strict=True):
        close(a, b)


# ---------------------------------------------------------------------------- hypothesis


@st.composite
def random_modes(draw: st.DrawFn) -> Mode:
    rank = draw(st.integers(2, 4))
    ghost = draw(st.booleans())
    n = draw(st.sampled_from([4, 6, 8])) if ghost else draw(st.integers(2, 5))
    shape = [n, *draw(st.lists(st.integers(1, 3), min_size=rank - 1, max_size=rank - 1))]
    candidates = list(range(1 if ghost else 0, rank))
    features = draw(st.lists(st.sampled_from(candidates), min_size=1,
                             max_size=min(2, rank - 1), unique=True))
    axis = features[0] - rank * draw(st.booleans()) if len(features) == 1 else tuple(features)
    others = [d for d in range(rank) if d not in features]
    if not ghost and math.prod(shape[d] for d in others) < 2:
        shape[others[0]] = 2  # a variance needs two values per feature
    reduce = math.prod(shape[d] for d in others if d > 0)
    vbs = None
    if ghost:
        vbs = draw(st.sampled_from([v for v in (1, 2, n // 2, n) if n % v == 0
                                    and v * reduce >= 2] or [n]))
    renorm = draw(st.booleans())
    return Mode(
        "drawn", tuple(shape), axis, renorm=renorm,
        clipping=draw(st.sampled_from([None, CLIP, {"rmax": 1.1}])) if renorm else None,
        vbs=vbs, layout=draw(st.sampled_from(["strided", "consecutive"])) if ghost else "strided",
        mask=draw(st.sampled_from([None, "full", "batch"])),
        adjustment=None if ghost else draw(st.sampled_from([None, "feature", "full"])),
        unbiased=draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=random_modes(), seed=st.integers(0, 2**31 - 1), fused=st.sampled_from([None, False]))
def test_random_modes_match_reference(mode, seed, fused):
    rng = np.random.default_rng(seed)
    params, state = initial_values(mode, rng)
    layer = make_layer(mode, fused, params, state)
    x, dy = batch(mode, rng), rng.standard_normal(mode.shape)
    mask_shape = (mode.shape[0],) + (1,) * (len(mode.shape) - 1)  # "batch": (N, 1, ...)
    mask = None if mode.mask is None else rng.random(
        mask_shape if mode.mask == "batch" else mode.shape) < 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an unlucky mask may select nothing
        check_against_oracle(layer, mode, params, state, x, dy, mask, True)
