"""Renorm and adjustment on ATen's kernel (``kernels.folded``) against the composite kernel.

The composite kernel is the specification (checked against tf_keras and the NumPy oracle),
so every output of the folded kernel is compared with it: y, the batch statistics, the
gradients of x, gamma and beta, and the moving statistics a layer reaches after several
steps, for renorm (clipping inactive and active), adjustments that are per feature, and
both together, in every layout ATen's kernel takes (NCHW, channels-last, ``axis=-1``, a
view with no dense layout) and dtype.

Tolerances (those of ``tests/test_kernels.py``, for the same reasons):
- float64: 1e-9. Both sides compute in float64 and differ in summation order (ATen's
  reductions against ``var_mean``), a few ulps of sums of ~100 values.
- float32: rtol = atol = 1e-5, the conformance bound: the outputs differ by float32
  rounding of values of magnitude ~10 (ATen's statistics pass against ``var_mean``).
- bfloat16: both sides compute ``x * inv + shift`` in float32 and round it to bfloat16
  once (8 significant bits): one rounding step apart is 2**-8 relative; atol is 2**-7 of
  the largest magnitude for gradients that cancel to near zero. The statistics are float32
  (ATen accumulates in float32 for bfloat16 inputs); dgamma and dbeta, float32 on both
  sides, are ATen's backward's sums over the bfloat16 gradient (its own rounding, measured
  ~2**-12 relative) against the composite's float32 sums: compared at the same bound.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from kernel_comparison import LAYOUTS, assert_matches, make_input
from torch.autograd import gradcheck

import batchnorm as bn
from batchnorm import kernels, plan
from batchnorm.functional import BatchNormConfig, initial_state
from batchnorm.kernels import KernelCall, composite, folded
from batchnorm.statistics import renorm_correction

EPSILON = 1e-3
CLIP = {"rmin": 0.9, "rmax": 1.1, "dmax": 0.3}
# Compared at the bfloat16 tolerance for a bfloat16 input (see kernel_comparison).
LOOSE = ("y", "dx", "dgamma", "dbeta")



@pytest.fixture(autouse=True, params=["loops", "native", "function"])
def folded_path(request, monkeypatch):
    """Every test here runs on each of the folded kernel's paths: the device's loops (inputs
    up to LOOPS_MAX_NUMEL values where the device has them: every CPU input here in the
    layouts they take, by default), ATen's training kernel on the folded terms (up to
    NATIVE_MAX_NUMEL values; forced by a loops threshold of 0) and the statistics pass with
    ATen's inference kernel in an autograd Function (above both; forced by thresholds of
    0)."""
    if request.param != "loops":
        monkeypatch.setattr(folded, "LOOPS_MAX_NUMEL", 0)
    if request.param == "function":
        monkeypatch.setattr(folded, "NATIVE_MAX_NUMEL", 0)
    return request.param


def feature_adjustment(axis: int):
    """An adjustment whose terms vary along the feature axis only (shaped to broadcast as
    TensorFlow broadcasts them), deterministic so that both kernels draw the same."""
    def adjustment(shape):
        c = shape[axis]
        broadcast = [c if d == axis % len(shape) else 1 for d in range(len(shape))]
        broadcast = broadcast[axis % len(shape):]  # aligned on the last axis
        scale = torch.linspace(0.5, 1.5, c).reshape(broadcast)
        return scale, torch.tensor(0.25)
    return adjustment


MODES = {
    "renorm": lambda axis: {"renorm": True},
    "renorm_clipped": lambda axis: {"renorm": True, "renorm_clipping": CLIP},
    "adjustment": lambda axis: {"adjustment": feature_adjustment(axis)},
    "renorm_adjustment": lambda axis: {"renorm": True, "renorm_clipping": CLIP,
                                       "adjustment": feature_adjustment(axis)},
    "renorm_relu": lambda axis: {"renorm": True, "activation": "relu"},
}


def renorm_state(channels: int, dtype: torch.dtype = torch.float32):
    """A renorm state far enough from the batches above (std ~3, mean ~2) for ``r`` and
    ``d`` to be real corrections, clipped by ``CLIP``."""
    g = torch.Generator().manual_seed(3)
    return initial_state(channels, renorm=True, dtype=dtype)._replace(
        moving_mean=torch.randn(channels, generator=g).to(dtype),
        renorm_mean=(torch.randn(channels, generator=g) * 0.5).to(dtype),
        renorm_stddev=(torch.rand(channels, generator=g) + 2.5).to(dtype))


def run_kernel(kernel, x, axis, options, dtype):
    """y, statistics and gradients of sum(y * dy) through ``kernel.train``."""
    channels = x.shape[axis]
    g = torch.Generator().manual_seed(5)
    gamma = (torch.rand(channels, generator=g) + 0.5).requires_grad_()
    beta = torch.randn(channels, generator=g).requires_grad_()
    xg = x.detach().clone().requires_grad_()
    call = KernelCall(BatchNormConfig(axis=axis, epsilon=EPSILON, **options), (axis,),
                      gamma, beta)
    assert kernel.unsupported(x, renorm_state(channels), call) is None
    y, stats = kernel.train(xg, renorm_state(channels), call)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(dy)
    return {"y": y, "mean": stats.mean, "variance": stats.variance, "dx": xg.grad,
            "dgamma": gamma.grad, "dbeta": beta.grad}, stats.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_folded_kernel_matches_composite(mode, layout, dtype):
    if mode == "renorm_relu" and dtype == torch.bfloat16:
        pytest.skip("ReLU's kink: a bfloat16 value one rounding step from 0 on either side "
                    "flips its gradient; float32 and float64 compare the fused activation")
    x, axis = make_input(layout, dtype)
    options = MODES[mode](axis)
    expected, count = run_kernel(composite.COMPOSITE, x, axis, options, dtype)
    actual, folded_count = run_kernel(folded.FOLDED, x, axis, options, dtype)
    assert_matches(actual, expected, dtype, LOOSE)
    assert folded_count == count


def test_bfloat16_input_gets_float32_statistics():
    x, axis = make_input("nchw", torch.bfloat16)
    actual, _ = run_kernel(folded.FOLDED, x, axis, {"renorm": True}, torch.bfloat16)
    assert actual["mean"].dtype == actual["variance"].dtype == torch.float32
    assert actual["y"].dtype == actual["dx"].dtype == torch.bfloat16


def test_clipping_is_active_in_the_clipped_cases():
    """The ``renorm_clipped`` cases above compare outputs where r and d sit at their bounds
    (for some features) and inside them (for others); d at its bound."""
    for layout in LAYOUTS:
        x, axis = make_input(layout, torch.float32)
        reduce = [d for d in range(x.ndim) if d != axis]
        variance, mean = torch.var_mean(x, dim=reduce, correction=0)
        state = renorm_state(x.shape[axis])
        free = renorm_correction(mean, variance, state, epsilon=EPSILON, clipping=None)
        r, d = renorm_correction(mean, variance, state, epsilon=EPSILON, clipping=CLIP)
        at_bound = (r == CLIP["rmin"]) | (r == CLIP["rmax"])
        assert at_bound.any() and (~at_bound).any(), layout
        assert (d.abs() == CLIP["dmax"]).any() and not torch.equal(free[1], d), layout


# ---------------------------------------------------------------- gradients


def gradcheck_function(options, axis):
    def f(x, gamma, beta):
        call = KernelCall(BatchNormConfig(axis=axis, epsilon=EPSILON, **options), (axis,),
                          gamma, beta)
        y, _ = folded.FOLDED.train(x, renorm_state(x.shape[axis], torch.float64), call)
        return y
    return f


def clipped_data(shape, axis):
    """float64 x whose every feature has std 6 and mean +-4, against renorm_stddev in
    [2.5, 3.5) and renorm_mean of magnitude ~0.5 (:func:`renorm_state`): r above 1.7 and
    |d| above 1, clipped (``CLIP``) for every feature by a margin no gradcheck perturbation
    closes, so that they are locally constant."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    reduce = [d for d in range(len(shape)) if d != axis]
    noise = (noise - noise.mean(reduce, keepdim=True)) / noise.std(reduce, keepdim=True,
                                                                    correction=0)
    sign = torch.where(torch.arange(shape[axis]) % 2 == 1, -1.0, 1.0).double()
    broadcast = [shape[axis] if d == axis else 1 for d in range(len(shape))]
    return 6.0 * noise + 4.0 * sign.reshape(broadcast)


@pytest.mark.parametrize("mode", ["renorm_clipped", "adjustment", "renorm_adjustment"])
@pytest.mark.parametrize("layout", ["nchw", "nlc"])
def test_gradcheck_folded_kernel(mode, layout):
    """float64 gradcheck of x, gamma and beta. With renorm, r and d carry no gradient (as in
    tf_keras), so gradcheck applies only where clipping holds them constant (see
    tests/test_gradcheck.py): every feature's r and d are clipped here."""
    shape, axis, _ = LAYOUTS[layout]
    shape = (4, 3, 2) if layout == "nlc" else (2, 3, 2, 2)
    axis = axis % len(shape)
    x = clipped_data(shape, axis)
    options = MODES[mode](axis)
    if options.get("renorm"):
        reduce = [d for d in range(x.ndim) if d != axis]
        variance, mean = torch.var_mean(x, dim=reduce, correction=0)
        free_r, free_d = renorm_correction(mean, variance,
                                           renorm_state(shape[axis], torch.float64),
                                           epsilon=EPSILON, clipping=None)
        assert (free_r > 1.1 * CLIP["rmax"]).all() and (free_d.abs() > 1.1 * CLIP["dmax"]).all()
    g = torch.Generator().manual_seed(2)
    gamma = (torch.rand(shape[axis], generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(shape[axis], generator=g, dtype=torch.float64).requires_grad_()
    assert gradcheck(gradcheck_function(options, axis), (x.requires_grad_(), gamma, beta))


@pytest.mark.parametrize("mode", ["renorm", "adjustment"])
def test_double_backward_matches_composite(mode):
    """create_graph=True differentiates the output written in torch operations: the
    composite's second derivatives (float64: 1e-9)."""
    x, axis = make_input("nlc", torch.float64)
    options = MODES[mode](axis)
    gamma = torch.linspace(0.5, 2.0, x.shape[axis], dtype=torch.float64, requires_grad=True)
    results = []
    for kernel in (composite.COMPOSITE, folded.FOLDED):
        xg = x.clone().requires_grad_()
        call = KernelCall(BatchNormConfig(axis=axis, epsilon=EPSILON, **options), (axis,),
                          gamma, None)
        y, _ = kernel.train(xg, renorm_state(x.shape[axis], torch.float64), call)
        (dx,) = torch.autograd.grad(y.sin().sum(), xg, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (xg, gamma)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- the layer and dispatch


def select_for(x, axis=1, **options):
    call = KernelCall(BatchNormConfig(axis=axis, **options), (axis % x.ndim,))
    return plan.select(x, initial_state(x.shape[axis], renorm=True), call)


def test_small_renorm_and_adjustment_calls_take_the_folded_kernel():
    feature = feature_adjustment(1)
    for x in (torch.randn(32, 64), torch.randn(4, 64, 2, 2), torch.randn(32, 64).bfloat16()):
        assert select_for(x, renorm=True) is folded.FOLDED
        assert select_for(x, adjustment=feature) is folded.FOLDED
        assert select_for(x, renorm=True, adjustment=feature) is folded.FOLDED
    channels_last = torch.randn(4, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    assert select_for(channels_last, renorm=True) is folded.FOLDED
    assert select_for(torch.randn(4, 2, 64), axis=-1, renorm=True) is folded.FOLDED
    # What ATen's kernel cannot take stays with the composite.
    assert select_for(torch.randn(32, 64), renorm=True, virtual_batch_size=8) \
        is composite.COMPOSITE
    assert select_for(torch.randn(1, 64), renorm=True) is composite.COMPOSITE
    assert select_for(torch.randn(32, 64), renorm=True, fused=False) is composite.COMPOSITE
    assert folded.FOLDED.unsupported(torch.randn(32, 64), initial_state(64), KernelCall(
        BatchNormConfig(), (1,))) is not None  # the plain mode is ATen's kernel itself


def counting_forward(monkeypatch) -> list:
    """A list that grows by one at each call the folded kernel computes itself (on any
    path), not at calls it hands to the composite."""
    calls: list = []
    forward, native = folded.FoldedFunction.forward, folded.FoldedCall.through_native
    loops = folded.LoopsFunction.forward
    monkeypatch.setattr(folded.FoldedFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or forward(*a)))
    monkeypatch.setattr(folded.LoopsFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or loops(*a)))
    monkeypatch.setattr(folded.FoldedCall, "through_native",
                        lambda *a: calls.append(1) or native(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["renorm_clipped", "adjustment", "renorm_adjustment"])
def test_layer_moving_statistics_equal_the_composites_after_several_steps(mode, dtype,
                                                                         monkeypatch):
    """Five training steps (forward, backward, update) of a 32x64 layer through the layer's
    plan: the folded kernel runs each, and every buffer and gradient equals the composite's
    within float32 rounding (1e-5; the statistics are float32 for bfloat16 inputs too; a
    bfloat16 output and input gradient are compared at one of its rounding steps, 2**-8)."""
    calls = counting_forward(monkeypatch)
    g = torch.Generator().manual_seed(0)
    xs = [(torch.randn(32, 64, generator=g) * 3 + 2).to(dtype) for _ in range(5)]
    results = []
    for kernel in ("composite", None):
        layer = bn.BatchNorm(64, **MODES[mode](1))
        with torch.no_grad():
            layer.gamma.copy_(torch.linspace(0.5, 2.0, 64))
            if layer.renorm:
                layer.renorm_stddev.fill_(2.0)
        grads = []
        for x in xs:
            xg = x.clone().requires_grad_()
            if kernel is None:
                y = layer(xg, training=True)
            else:
                with kernels.prefer(kernel):
                    y = layer(xg, training=True)
            (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            grads.append((y.detach(), xg.grad))
        results.append((dict(layer.named_buffers()), grads, layer.gamma.grad))
    assert len(calls) == len(xs)  # the folded kernel ran every call of the second layer
    (buffers, grads, dgamma), (buffers_f, grads_f, dgamma_f) = results
    for name, value in buffers.items():
        torch.testing.assert_close(buffers_f[name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(dgamma_f, dgamma, rtol=1e-5, atol=1e-4)
    for (y, dx), (y_f, dx_f) in zip(grads, grads_f, strict=True):
        rtol = 2**-8 if dtype == torch.bfloat16 else 1e-5
        for got, want in ((y_f, y), (dx_f, dx)):
            torch.testing.assert_close(got.double(), want.double(), rtol=rtol,
                                       atol=rtol * want.double().abs().max().item())


def test_adjustment_that_varies_off_the_feature_axis_runs_the_composite_once(monkeypatch):
    """Terms per sample (not foldable) leave the call to the composite with the same draw:
    the adjustment is called once per call, and the output is the composite's (float32
    1e-5)."""
    calls = counting_forward(monkeypatch)
    draws = []

    def per_sample(shape):
        draws.append(shape)
        return torch.linspace(0.5, 1.5, shape[0])[:, None], torch.zeros(())

    x = torch.randn(32, 64)
    ys = []
    for kernel in ("composite", None):
        layer = bn.BatchNorm(64, adjustment=per_sample)
        if kernel is None:
            ys.append(layer(x, training=True))
        else:
            with kernels.prefer(kernel):
                ys.append(layer(x, training=True))
    assert not calls and len(draws) == 2
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-5, atol=1e-5)


def test_adjustment_terms_that_require_grad_get_their_gradient():
    """Terms that need a gradient take the composite, which differentiates them."""
    scale = torch.tensor(1.5, requires_grad=True)
    layer = bn.BatchNorm(64, adjustment=lambda shape: (scale, torch.zeros(())))
    layer(torch.randn(32, 64) * 2, training=True).square().sum().backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_the_folded_kernels_constants_match_the_composites_rule():
    """r and d as the composite computes them, from the state before the update: the kernel's
    (c, e) for renorm alone equal renorm_correction's (r, d) (float32, 1e-6: ATen's
    statistics against var_mean's)."""
    x = torch.randn(32, 64) * 3 + 1
    state = renorm_state(64)
    call = KernelCall(BatchNormConfig(renorm=True, renorm_clipping=CLIP), (1,))
    prepared = folded.FoldedCall(x, state, call)
    mean, variance = prepared.moments(x)
    c, e = prepared.correction(mean, variance, None)
    variance_ref, mean_ref = torch.var_mean(x, dim=0, correction=0)
    r, d = renorm_correction(mean_ref, variance_ref, state, epsilon=EPSILON, clipping=CLIP)
    torch.testing.assert_close(c, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e, d, rtol=1e-6, atol=1e-6)
    assert ((c == CLIP["rmin"]) | (c == CLIP["rmax"])).any()  # clipping active


@pytest.mark.parametrize("mode", ["renorm", "adjustment"])
def test_gradients_of_an_upstream_gradient_aten_misreads_equal_those_of_its_copy(mode):
    """x NCHW-contiguous with a size-1 dimension, the upstream gradient dense in channels-last
    order only (strides ATen's CPU backward misreads, see kernels.native): the gradients
    equal those of its contiguous copy. Both float64, the same values summed in another
    order: 1e-9. Two calls each, the second through the layer's plan."""
    x = torch.randn(8, 16, 4, 1, dtype=torch.float64)
    dy = torch.randn(8, 4, 16, dtype=torch.float64).transpose(1, 2).unsqueeze(-1)
    grads = []
    for dyi in (dy, dy.contiguous()):
        layer = bn.BatchNorm(16, dtype=torch.float64, **MODES[mode](1))
        for _ in range(2):
            xg = x.clone().requires_grad_()
            layer.zero_grad()
            (layer(xg, training=True) * dyi).sum().backward()
            grads.append((xg.grad, layer.gamma.grad, layer.beta.grad))
    assert select_for(x, **MODES[mode](1)) is folded.FOLDED
    for actual, expected in zip(grads[:2], grads[2:], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clipping", [None, CLIP, {"rmax": 2.0}, {"dmax": 0.0}],
                         ids=["unclipped", "clipped", "rmax-only", "dmax-zero"])
def test_the_prepared_renorm_correction_equals_renorm_correction_bit_for_bit(dtype, clipping):
    """The renorm correction prepared for a state (on CPU one numba loop) gives
    renorm_correction's (r, d) bit for bit, the non-finite cases included: a NaN or infinite
    statistic, a NaN or zero renorm_stddev (floored at sqrt(epsilon)), an infinite mean; the
    averages are read at each call."""
    from batchnorm.statistics import prepare_renorm_correction

    g = torch.Generator().manual_seed(3)
    n = 12
    state = renorm_state(n)._replace(
        renorm_mean=torch.randn(n, generator=g, dtype=dtype),
        renorm_stddev=torch.rand(n, generator=g, dtype=dtype) * 3)
    state.renorm_stddev[0] = 0.0
    state.renorm_stddev[1] = math.nan
    config = BatchNormConfig(renorm=True, renorm_clipping=clipping, epsilon=1e-3)
    correction = prepare_renorm_correction(state, config, dtype)
    for _ in range(3):
        mean = torch.randn(n, generator=g, dtype=dtype) * 4
        variance = torch.rand(n, generator=g, dtype=dtype) * 9
        mean[2], variance[3], mean[4], variance[5] = math.nan, math.inf, -math.inf, math.nan
        r, d = correction(mean, variance)
        r_ref, d_ref = renorm_correction(mean, variance, state, epsilon=config.epsilon,
                                         clipping=config.clipping)
        assert r.dtype == r_ref.dtype and d.dtype == d_ref.dtype
        assert torch.equal(r, r_ref) and torch.equal(d, d_ref), (r - r_ref, d - d_ref)
        state.renorm_mean.add_(0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("shape", [(32, 64), (8, 5, 7), (4, 3, 6, 5), (1, 3, 2), (4, 3, 8, 9)])
def test_the_cpu_statistics_pass_for_small_inputs_equals_var_mean(shape, dtype):
    """The CPU's statistics pass for small inputs (one numba loop: float64 sums of shifted
    values) gives var_mean's biased variance and mean of the float32 (float64) values over
    every dimension but dim 1, in the statistics dtype, within float32 rounding (1e-6
    relative; float64: 1e-12); a NaN stays NaN; inputs it does not take get None."""
    from batchnorm.kernels import cpu

    if not cpu.available():
        pytest.skip("numba is unavailable")
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 100).to(dtype)
    mean, variance = cpu.CPU.moments(x)
    wide = x.double()
    dims = [0, *range(2, x.ndim)]
    variance_ref, mean_ref = torch.var_mean(wide, dim=dims, correction=0)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == stat and variance.dtype == stat and mean.shape == (shape[1],)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean.double(), mean_ref, rtol=tolerance, atol=0)
    torch.testing.assert_close(variance.double(), variance_ref, rtol=tolerance, atol=1e-12)
    x.view(-1)[1 if x.ndim > 2 else x.shape[1]] = math.nan  # a value of feature 0
    mean, variance = cpu.CPU.moments(x)
    assert mean[0].isnan() and variance[0].isnan() and not mean[1:].isnan().any()
    assert cpu.CPU.moments(x[:, ::2]) is None  # not contiguous
    assert cpu.CPU.moments(x.half()) is None
    assert cpu.CPU.moments(x.requires_grad_()) is None  # autograd would record it
    big = torch.zeros(8, 2, cpu.MIN_PLAIN_NUMEL // 16 + 1)  # above: ATen's pass, threaded
    assert cpu.CPU.moments(big) is None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_small_contiguous_inputs_take_the_cpus_loops(layout, folded_path, monkeypatch):
    """On CPU (numba present), a small contiguous input with its features at dim 1 or last
    takes the one-loop path (LoopsFunction); other layouts and a fused activation take
    ATen's training kernel. An upstream gradient that is not contiguous (``y.sum()``'s,
    expanded) gives the composite's gradients (float32 1e-5)."""
    from batchnorm.kernels import cpu

    if folded_path != "loops" or not cpu.available():
        pytest.skip("the loops path, with numba")
    calls = []
    forward = folded.LoopsFunction.forward
    monkeypatch.setattr(folded.LoopsFunction, "forward",
                        staticmethod(lambda *a: calls.append(1) or forward(*a)))
    x, axis = make_input(layout, torch.float32)
    grads = []
    for kernel, options in (("composite", {}), (None, {}), (None, {"activation": "relu"})):
        layer = bn.BatchNorm(x.shape[axis], axis=axis, renorm=True, renorm_clipping=CLIP,
                             **options)
        layer.renorm_stddev.fill_(2.0)
        xg = x.clone().requires_grad_()
        with kernels.prefer(kernel) if kernel else contextlib.nullcontext():
            layer(xg).sum().backward()
        if not options:
            grads.append((xg.grad, layer.gamma.grad, layer.beta.grad))
    takes = layout in ("nchw", "rows", "nlc")
    assert len(calls) == (1 if takes else 0)
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
