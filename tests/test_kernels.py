"""The CPU fast path (``kernels.cpu``) against the composite kernel, and its dispatch.

The composite path is the specification (it is the one checked against tf_keras
and the NumPy oracle at tight tolerances), so every output of the fast path is
compared with it: y, the batch statistics (mean, variance, count), and the
gradients of x, gamma and beta, for every mode it takes (plain, renorm with and
without clipping, ghost batches in both layouts, masks per position and per
value, a ghost batch a mask leaves empty), every layout (NCHW, channels-last,
channels-last 2-D/3-D, axis 0, a non-contiguous input) and dtype.

Tolerances:
- float64: 1e-9. Both sides compute in float64; they differ in summation order
  (and the fast path's one-pass shifted sums), a few ulps of sums of ~100 values.
- float32: rtol = atol = 1e-5, the conformance bound. The fast path accumulates
  in float64, so its statistics are closer to the exact ones than the
  composite's float32 ``var_mean``; the outputs differ by float32 rounding of
  values of magnitude ~10.
- bfloat16: both sides compute in float32 and round the result to bfloat16
  (8 significant bits): one rounding step apart is 2**-8 relative; atol is
  2**-7 of the largest magnitude for gradients that cancel to near zero.

The existing gradcheck and NumPy-reference tests are also replayed here with the
fast path forced for every input (``prefers_fallback`` always False), so that they hold on
both paths: ``tests/test_conformance.py`` does the same for the tf_keras fixtures.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from kernel_comparison import LAYOUTS, assert_matches, make_input

import batchnorm as bn
from batchnorm import kernels, plan
from batchnorm.functional import BatchNormConfig, initial_state
from batchnorm.kernels import KernelCall, composite, cpu, folded, ghost, inference, native
from batchnorm.kernels.cpu import loops as cpu_loops
from batchnorm.kernels.cpu import passes as cpu_passes
from batchnorm.kernels.protocol import INFERENCE_PASSES

# Compared at the bfloat16 tolerance for a bfloat16 input (see kernel_comparison).
LOOSE = ("y", "dx")


def keyword_kernel(kernel):
    """``kernel.train`` as a function of the options as keywords (the form these tests use)."""
    def train(x, state, axes, *, gamma, beta, mask=None, **options):
        call = KernelCall(BatchNormConfig(axis=axes, **options), axes, gamma, beta, mask)
        return kernel.train(x, state, call)
    return train


COMPOSITE_TRAIN = keyword_kernel(composite.COMPOSITE)
CPU_TRAIN = keyword_kernel(cpu.CPU)
NATIVE_TRAIN = keyword_kernel(native.NATIVE)

pytestmark = pytest.mark.skipif(not cpu.available(),
                                reason=f"the CPU fast path is unavailable: {cpu.IMPORT_ERROR}")

MODES = {
    "plain": ({}, None),
    "renorm": ({"renorm": True}, None),
    "renorm_clipped": ({"renorm": True, "renorm_clipping": {"rmin": 0.8, "rmax": 1.2,
                                                            "dmax": 0.3}}, None),
    "ghost_strided": ({"virtual_batch_size": 4}, None),
    "ghost_consecutive": ({"virtual_batch_size": 4, "ghost_layout": "consecutive"}, None),
    "ghost_renorm": ({"virtual_batch_size": 2, "renorm": True}, None),
    "mask_positions": ({}, "positions"),
    "mask_values": ({}, "values"),
    "mask_ghost_empty_group": ({"virtual_batch_size": 4}, "empty_group"),
    "mask_few_values": ({}, "few_values"),
    "mask_ghost_few_values": ({"virtual_batch_size": 4}, "few_values"),
    "no_gamma_beta": ({"center": False, "scale": False}, None),
}


def make_mask(kind: str | None, x: torch.Tensor, axis: int) -> torch.Tensor | None:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(7)
    if kind == "values":
        return torch.rand(x.shape, generator=g) < 0.6
    if kind == "few_values":  # channel c < 3 selects its first c values (none or one: no
        mask = torch.rand(x.shape, generator=g) < 0.6  # variance, the moving statistics)
        for c in range(3):
            channel = mask.select(axis, c)
            channel.zero_()
            channel[torch.unravel_index(torch.arange(c), channel.shape)] = True
        return mask
    shape = [s for d, s in enumerate(x.shape) if d != axis]
    mask = torch.rand(shape, generator=g) < 0.6
    if kind == "empty_group":  # strided groups: samples n and n + 2 (batch 8, size 4)
        mask[0::2] = False
    return mask


def run_kernel(kernel, x, axis, options, mask, dtype):
    """y, statistics and gradients of sum(y * dy) through ``kernel`` (a kernel ``train``)."""
    channels = x.shape[axis]
    g = torch.Generator().manual_seed(3)
    state = initial_state(channels, renorm=True)._replace(
        moving_mean=torch.randn(channels, generator=g),
        renorm_mean=torch.randn(channels, generator=g) * 0.5,
        renorm_stddev=torch.rand(channels, generator=g) + 2.5)
    center, scale = options.pop("center", True), options.pop("scale", True)
    gamma = (torch.rand(channels, generator=g) + 0.5).requires_grad_() if scale else None
    beta = torch.randn(channels, generator=g).requires_grad_() if center else None
    xg = x.detach().clone().requires_grad_()
    kwargs = {"renorm": False, "renorm_clipping": None, "virtual_batch_size": None,
              "ghost_layout": "strided", **options}
    y, stats = kernel(xg, state, (axis,), gamma=gamma, beta=beta, epsilon=1e-3,
                      adjustment=None, mask=mask, **kwargs)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    y.backward(dy)
    out = {"y": y, "mean": stats.mean, "variance": stats.variance, "dx": xg.grad}
    if not isinstance(stats.count, int):
        out["count"] = stats.count
    if gamma is not None:
        out.update(dgamma=gamma.grad, dbeta=beta.grad)
    return out, stats.count, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_cpu_kernel_matches_composite(mode, layout, dtype):
    options, mask_kind = MODES[mode]
    x, axis = make_input(layout, dtype)
    if options.get("virtual_batch_size") and axis == 0:
        pytest.skip("ghost batches split axis 0")
    mask = make_mask(mask_kind, x, axis)
    expected, count, _ = run_kernel(COMPOSITE_TRAIN, x, axis, dict(options), mask, dtype)
    actual, fast_count, y = run_kernel(CPU_TRAIN, x, axis, dict(options), mask, dtype)
    if dtype == torch.bfloat16 and options.get("virtual_batch_size") == 2:
        # Two values per ghost batch: dx is a difference of nearly equal terms (zero but for
        # epsilon), below bfloat16's resolution on both sides; float32/float64 compare it.
        del actual["dx"], expected["dx"]
    assert_matches(actual, expected, dtype, LOOSE)
    assert fast_count == count if isinstance(count, int) else True
    assert y.stride() == x.stride() or LAYOUTS[layout][2] == "transposed"


@pytest.mark.parametrize("mode", ["plain", "mask_positions", "mask_values"])
def test_cpu_kernel_takes_axis_zero(mode):
    options, mask_kind = MODES[mode]
    x = torch.randn(5, 12, 3, dtype=torch.float64)
    mask = make_mask(mask_kind, x, 0)
    expected, _, _ = run_kernel(COMPOSITE_TRAIN, x, 0, dict(options), mask, torch.float64)
    actual, _, _ = run_kernel(CPU_TRAIN, x, 0, dict(options), mask, torch.float64)
    assert_matches(actual, expected, torch.float64, LOOSE)


def test_statistics_are_stable_far_from_zero():
    # One-pass sums of squares cancel catastrophically for mean >> std; the shift does not.
    x = torch.randn(64, 3, 100, dtype=torch.float64) * 1e-3 + 1e4
    y, stats = CPU_TRAIN(x.float(), initial_state(3), (1,), gamma=None, beta=None,
                         epsilon=1e-12, renorm=False, renorm_clipping=None,
                         virtual_batch_size=None, ghost_layout="strided", adjustment=None,
                         mask=None)
    exact = x.float().double().var(dim=(0, 2), unbiased=False)
    torch.testing.assert_close(stats.variance[0].double(), exact, rtol=1e-3, atol=0)


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_native_kernel_variance_is_exact_even_far_below_epsilon(fmt, traced, monkeypatch):
    # Eager, ATen writes the biased variance itself; traced (torch.func, compile) it is
    # recovered from 1 / sqrt(var + eps), which loses digits when var << eps.
    from batchnorm.kernels import native

    monkeypatch.setattr(native, "traced", lambda x: traced)
    x = (torch.randn(16, 3, 5, 5, dtype=torch.float64) * 1e-3).float()
    x = x.contiguous(memory_format=fmt)
    _, stats = NATIVE_TRAIN(x, initial_state(3), (1,), gamma=None, beta=None, epsilon=1e-3)
    exact = x.double().var(dim=(0, 2, 3), unbiased=False)
    rtol = 1e-2 if traced else 1e-5  # float32 statistics: 1e-5 covers the summation order
    torch.testing.assert_close(stats.variance[0].double(), exact, rtol=rtol, atol=0)
    torch.testing.assert_close(stats.mean[0].double(), x.double().mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- gradients


def gradcheck_function(options, mask, axis):
    state = initial_state(3, renorm=True, dtype=torch.float64)

    def f(x, gamma, beta):
        y, _ = CPU_TRAIN(x, state, (axis,), gamma=gamma, beta=beta, epsilon=1e-3,
                         adjustment=None, mask=mask, **{"renorm": False, "renorm_clipping": None,
                                                        "virtual_batch_size": None,
                                                        "ghost_layout": "strided", **options})
        return y
    return f


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("mode", ["plain", "ghost_strided", "ghost_consecutive", "mask_positions",
                                  "mask_values", "mask_ghost_empty_group", "mask_few_values",
                                  "mask_ghost_few_values", "renorm_clipped"])
def test_gradcheck_cpu_kernel(mode, layout):
    options, mask_kind = MODES[mode]
    shape, axis, fmt = {"nchw": ((8, 3, 2, 2), 1, None),
                        "channels_last": ((8, 3, 2, 2), 1, torch.channels_last),
                        "rows": ((8, 3), 1, None)}[layout]
    x = torch.randn(shape, dtype=torch.float64)
    if mode == "renorm_clipped":  # std 3, mean +-3: every r and d clipped, by a wide margin
        x = (x - x.mean((0, *range(2, x.ndim)), keepdim=True)) / x.std(
            (0, *range(2, x.ndim)), keepdim=True) * 3 + 3
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    mask = make_mask(mask_kind, x, axis)
    gamma = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gradcheck_function(dict(options), mask, axis),
                                    (x.requires_grad_(), gamma, beta))


@pytest.mark.parametrize("mode", ["plain", "ghost_strided", "mask_positions"])
def test_double_backward_matches_composite(mode):
    options, mask_kind = MODES[mode]
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    mask = make_mask(mask_kind, x, 1)
    gamma = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    results = []
    for kernel in (COMPOSITE_TRAIN, CPU_TRAIN):
        xg = x.clone().requires_grad_()
        y, _ = kernel(xg, initial_state(3, dtype=torch.float64), (1,), gamma=gamma, beta=None,
                      epsilon=1e-3, adjustment=None, mask=mask,
                      **{"renorm": False, "renorm_clipping": None, "virtual_batch_size": None,
                         "ghost_layout": "strided", **options})
        (dx,) = torch.autograd.grad(y.sin().sum(), xg, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (xg, gamma)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@pytest.fixture
def fast_path_everywhere(monkeypatch):
    """fused=None takes the CPU fast path for every input; returns the list of its calls."""
    calls = []
    train = cpu.CPU.train
    monkeypatch.setattr(cpu.CPU, "train", lambda *a, **k: calls.append(1) or train(*a, **k))
    with kernels.prefer("cpu"):
        yield calls


def _existing(name: str):
    return pytest.importorskip(name)  # tests/ is on sys.path (pytest's rootdir conftest)


@pytest.mark.parametrize("case", _existing("test_gradcheck").CASES)
def test_existing_gradcheck_cases_on_the_fast_path(case, fast_path_everywhere):
    module = _existing("test_gradcheck")
    shape, axis, options, mask, training = module.CASES[case]
    if options.get("fused") is False:
        pytest.skip("the composite path by construction")
    module.test_gradcheck(module.CASES[case])
    if training and "adjustment" not in options and options.get("trainable", True):
        assert fast_path_everywhere


@pytest.mark.parametrize("mode", _existing("test_reference_modes").MODES,
                         ids=[m.id for m in _existing("test_reference_modes").MODES])
def test_existing_reference_modes_on_the_fast_path(mode, fast_path_everywhere):
    module = _existing("test_reference_modes")
    module.test_functional_matches_reference(mode, None)
    module.test_layer_training_steps_then_inference_match_reference(mode, None)
    if mode.adjustment is None and isinstance(mode.axis, int):
        assert fast_path_everywhere


# ---------------------------------------------------------------- dispatch


def select_for(x, mask=None, **options):
    call = KernelCall(BatchNormConfig(axis=1, **options), (1,), mask=mask)
    return plan.select(x, initial_state(x.shape[1]), call)


def test_fused_none_takes_the_fast_path_for_large_cpu_batches():
    x = torch.randn(64, 16, 32, 16)
    assert x.numel() >= cpu.MIN_PLAIN_NUMEL
    assert select_for(x) is cpu.CPU
    assert select_for(x, renorm=True) is cpu.CPU
    large = torch.randn(64, 16, 64, 64, dtype=torch.bfloat16)
    assert large.numel() >= cpu_passes.MIN_PLAIN_BFLOAT16_NUMEL > x.numel()
    assert select_for(large) is cpu.CPU
    assert select_for(x.bfloat16()) is not cpu.CPU  # ATen's kernel: as fast up to that size


def test_fused_none_falls_back_where_the_fast_path_does_not_apply():
    small = torch.randn(32, 64)
    assert select_for(small) is native.NATIVE  # ATen's per-call cost is lower
    channels_last = torch.randn(64, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    assert select_for(channels_last) is native.NATIVE  # ATen's row kernel is faster
    large_channels_last = torch.randn(64, 16, 32, 16).contiguous(
        memory_format=torch.channels_last)
    assert select_for(large_channels_last, virtual_batch_size=8) is cpu.CPU
    # so are the ghost kernel's (ghost batches on ATen's kernel) and the folded kernel's
    # (renorm on ATen's kernel), below the plain mode's threshold; the composite's (masks,
    # ghost batches with renorm) below MIN_NUMEL
    for mode, kernel in (({"virtual_batch_size": 8}, ghost.GHOST),
                         ({"renorm": True}, folded.FOLDED)):
        assert select_for(small, **mode) is kernel
        assert select_for(channels_last, **mode) is kernel
        assert select_for(torch.randn(8192, 64), **mode) is cpu.CPU
    both = {"virtual_batch_size": 8, "renorm": True}
    assert select_for(small, **both) is composite.COMPOSITE
    assert select_for(torch.randn(512, 64), **both) is cpu.CPU
    assert select_for(torch.randn(64, 16, 8, 8, dtype=torch.float16)) is native.NATIVE
    assert select_for(torch.randn(64, 16, 8, 8), adjustment=lambda s: (1.0, 0.0)) \
        is folded.FOLDED
    assert cpu.CPU.unsupported(torch.randn(4, 3), initial_state((4, 3)), KernelCall(
        BatchNormConfig(axis=(0, 1)), (0, 1))) is not None
    assert select_for(small, fused=False) is composite.COMPOSITE
    assert select_for(small, fused=True) is native.NATIVE


def test_layer_on_the_fast_path_updates_the_moving_statistics_like_composite():
    x = torch.randn(64, 16, 8, 8) * 2 + 1
    layers = [bn.BatchNorm(16, fused=f, renorm=True, virtual_batch_size=8) for f in (None, False)]
    for layer in layers:
        for _ in range(3):
            layer(x, training=True).sum().backward()
    for name, value in layers[1].state_dict().items():
        torch.testing.assert_close(layers[0].state_dict()[name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layers[0].gamma.grad, layers[1].gamma.grad, rtol=1e-4, atol=1e-3)


def test_a_non_finite_batch_leaves_the_statistics_unchanged_on_the_fast_path():
    layer = bn.BatchNorm(16)
    x = torch.randn(64, 16, 8, 8)
    x[3, 2, 1, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = layer(x, training=True)
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, 3]).any()
    assert layer.num_updates.item() == 0


def test_fast_path_is_deterministic():
    x = torch.randn(64, 16, 8, 8, requires_grad=True)
    layer = bn.BatchNorm(16, virtual_batch_size=8)
    outs = []
    for _ in range(2):
        x.grad = None
        y = layer(x, training=True)
        y.backward(torch.ones_like(y))
        outs.append((y.detach().clone(), x.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_compile_and_torch_func_fall_back_from_the_fast_path():
    x = torch.randn(64, 16, 8, 8)
    layer = bn.BatchNorm(16, virtual_batch_size=8)
    expected = layer(x, training=True)
    compiled = torch.compile(lambda t: layer(t, training=True), fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    state = layer.state()

    def loss(gamma, t):
        y, _ = bn.functional.batch_norm(t, state, training=True, gamma=gamma,
                                        virtual_batch_size=8)
        return y.square().sum()

    gamma = torch.rand(16) + 0.5
    expected_grad = torch.func.grad(loss)(gamma, x.double().float())
    gamma_ = gamma.clone().requires_grad_()
    loss(gamma_, x).backward()  # eager: the fast path
    torch.testing.assert_close(expected_grad, gamma_.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_inference_pass_matches_the_elementwise_formula(dtype, fmt):
    x = torch.randn(64, 16, 8, 8).to(dtype).contiguous(memory_format=fmt)
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv = torch.rand(1, 16, 1, 1, dtype=cdtype) + 0.5
    shift = torch.randn(1, 16, 1, 1, dtype=cdtype)
    y = cpu_passes.affine(x, inv, shift)
    assert y is not None and y.dtype == dtype and y.stride() == x.stride()
    torch.testing.assert_close(y, (x.to(cdtype) * inv + shift).to(dtype),
                               rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert cpu_passes.affine(x.requires_grad_(), inv, shift) is None  # autograd: torch's ops


class RecordingInferencePass:
    """An inference pass that records its calls and returns 7 everywhere."""

    def __init__(self):
        self.calls = []

    def affine(self, x, inv, shift, activation=None):
        self.calls.append(activation)
        return torch.full_like(x, 7.0)

    def fuses_activation(self, x):
        return True


@pytest.mark.parametrize("activation", [None, "relu"])
def test_inference_runs_the_pass_registered_for_the_inputs_device(activation, monkeypatch):
    # kernels.inference imports no device's code: the loop it runs is the one registered in
    # INFERENCE_PASSES under x's device type. Broadcast statistics over two axes (no ATen
    # kernel) and a fused activation are the two calls that take it. The fake's output is
    # returned as it is (7 exactly).
    fake = RecordingInferencePass()
    monkeypatch.setitem(INFERENCE_PASSES, "cpu", fake)
    x = torch.randn(4, 3)
    with torch.no_grad():
        if activation is None:
            y = inference.normalize(x, torch.zeros(4, 3), torch.ones(4, 3), None, None, 1e-3)
        else:
            call = KernelCall(BatchNormConfig(activation=activation), (1,))
            y = inference.infer(x, initial_state(3), call)
    assert fake.calls == [activation]
    assert torch.equal(y, torch.full_like(x, 7.0))


def test_the_cpu_kernel_is_the_cpus_inference_pass():
    assert INFERENCE_PASSES["cpu"] is cpu.CPU


def test_bfloat16_rounds_to_nearest_even_like_torch():
    # Ties to even (up and down), just below a tie, the largest finite, NaN, -Inf, a subnormal.
    bits = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x7F7FFFFF, 0x7FC00001, 0xFF800000,
                     0x00010000], dtype=np.uint32)
    values = torch.from_numpy(bits.view(np.float32).copy()).reshape(1, 7)
    x = torch.ones(16384, 7, dtype=torch.bfloat16)
    y = cpu_passes.affine(x, torch.zeros(1, 7), values)  # y = 0 * x + value, rounded
    assert y is not None
    expected = values.to(torch.bfloat16).expand_as(y)
    nan = torch.isnan(expected)  # NaN payloads differ between torch's own conversion paths
    assert torch.equal(torch.isnan(y), nan)
    assert torch.equal(y.view(torch.int16)[~nan], expected.view(torch.int16)[~nan])


def test_warm_up_compiles_or_loads_every_loop():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numba's cache must not warn (e.g. unwritable dir)
        assert cpu.warm_up() >= 0


@pytest.mark.parametrize("layout", ["nchw", "rows"])
def test_masked_statistics_stay_accurate_when_the_padding_is_far_from_the_data(layout):
    # Padding 0 around data of mean 1000 and std 0.1: a shift taken from the padding would
    # make float32 sums of squares cancel; the masked path accumulates in float64.
    x = torch.randn(16, 3, 50, dtype=torch.float64) * 0.1 + 1000
    x[:, :, 25:] = 0
    mask = torch.zeros(16, 50, dtype=torch.bool)
    mask[:, :25] = True
    x32 = x.float() if layout == "nchw" else x.float().permute(0, 2, 1).reshape(-1, 3)
    mask = mask if layout == "nchw" else mask.reshape(-1)
    _, stats = CPU_TRAIN(x32, initial_state(3), (1,), gamma=None, beta=None, epsilon=1e-3,
                         renorm=False, renorm_clipping=None, virtual_batch_size=None,
                         ghost_layout="strided", adjustment=None, mask=mask)
    exact = x.float().double()[:, :, :25].var(dim=(0, 2), unbiased=False)
    torch.testing.assert_close(stats.variance[0].double(), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("kernel", ["cpu", "native", "composite"])
@pytest.mark.parametrize("memory_format", [None, torch.channels_last])
def test_training_output_can_be_modified_in_place(kernel, memory_format):
    """``nn.ReLU(inplace=True)`` and ``out += identity`` (every ResNet) after a training call
    on an input large enough for the four-pass kernel: the output is no view a Function made,
    and the gradients equal those of the out-of-place ops."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 32, 32, dtype=torch.float64)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    grads = []
    for in_place in (True, False):
        xi = x.clone().requires_grad_()
        layer = bn.BatchNorm(16, dtype=torch.float64)
        with kernels.prefer(kernel):
            y = layer(xi, training=True)
        if in_place:
            y += xi
            y.relu_()
        else:
            y = (y + xi).relu()
        (y * torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).cos()).sum().backward()
        grads.append((xi.grad, layer.gamma.grad, layer.beta.grad))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---------------------------------------------------------------- ATen's kernel and strides


def _aten_gradients(x, training, dy):
    """Gradients of ``sum(y * dy)`` (x, gamma, beta) through ATen's own batch-norm kernel."""
    x = x.detach().requires_grad_()
    channels = x.shape[1]
    gamma = torch.linspace(0.5, 2.0, channels, dtype=x.dtype).requires_grad_()
    beta = torch.zeros(channels, dtype=x.dtype, requires_grad=True)
    y = torch.batch_norm(x, gamma, beta, torch.zeros(channels, dtype=x.dtype),
                         torch.ones(channels, dtype=x.dtype), training, 0.1, 1e-3, False)
    y.backward(dy)
    return x.grad, gamma.grad, beta.grad


def _every_layout(sizes):
    """``torch.randn(sizes)`` dense in each order of its dimensions (every permutation)."""
    for order in itertools.permutations(range(len(sizes))):
        dense = torch.randn([sizes[d] for d in order], dtype=torch.float64)
        yield dense.permute([order.index(d) for d in range(len(sizes))])


@pytest.mark.parametrize("sizes", [(2, 3, 1, 2), (2, 3, 2, 1), (1, 3, 2, 1), (2, 3, 1, 2, 1)])
def test_misread_by_cpu_backward_names_exactly_the_strides_aten_gets_wrong(sizes):
    # ATen's gradients for x, against those for x.contiguous() (float64, the same sums in
    # another order: 1e-9), with an NCHW-contiguous gradient, in training and inference.
    for x in _every_layout(sizes):
        dy = torch.randn(x.shape, dtype=torch.float64)
        wrong = any(not torch.allclose(a, b, rtol=1e-9, atol=1e-9)
                    for training in (True, False)
                    for a, b in zip(_aten_gradients(x, training, dy),
                                    _aten_gradients(x.contiguous(), training, dy), strict=True))
        assert native.misread_by_cpu_backward(x) == wrong, (x.shape, x.stride())


def _size_one_channels_last():
    """``(8, 16, 4, 1)`` with strides ``(64, 1, 16, 1)``: channels-last through its size-1
    dimension only, which ATen's CPU backward misreads."""
    x = torch.randn(8, 4, 16, dtype=torch.float64).transpose(1, 2).unsqueeze(-1)
    assert x.stride() == (64, 1, 16, 1) and native.misread_by_cpu_backward(x)
    return x


@pytest.mark.parametrize("fused", [True, None], ids=["native", "fused_none"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_gradients_of_size_one_channels_last_input_equal_those_of_its_contiguous_copy(
        training, fused):
    # Both sides float64, the same values summed in another order: 1e-9. Two calls each, the
    # second through the layer's plan for the signature.
    x = _size_one_channels_last()
    dy = torch.randn(x.shape, dtype=torch.float64)
    grads = []
    for xi in (x, x.contiguous()):
        layer = bn.BatchNorm(16, fused=fused, dtype=torch.float64)
        for _ in range(2):
            xg = xi.detach().requires_grad_()
            layer.zero_grad()
            layer(xg, training=training).backward(dy)
        grads.append((xg.grad, layer.gamma.grad, layer.beta.grad))
    for actual, expected in zip(*grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_only_the_misread_strides_are_copied_for_aten():
    misread = _size_one_channels_last()
    gamma = torch.ones(16, dtype=torch.float64, requires_grad=True)
    assert native.aten_input(misread, None, None) is misread  # no gradient: no backward
    assert native.aten_input(misread, gamma, None).is_contiguous()  # dgamma reads x and dy
    assert native.aten_input(misread.requires_grad_(), None, None).is_contiguous()
    with torch.no_grad():
        assert native.aten_input(misread, gamma, None) is misread
    for x in (torch.randn(8, 16, 4, 3).contiguous(memory_format=torch.channels_last),
              torch.randn(8, 16, 4, 1).contiguous(memory_format=torch.channels_last),
              torch.randn(8, 16, 4, 1, 3).contiguous(memory_format=torch.channels_last_3d),
              torch.randn(8, 16, 4, 1).transpose(2, 3),
              torch.randn(8, 16, 4, 1)):
        x.requires_grad_()
        assert not native.misread_by_cpu_backward(x), x.stride()
        assert native.aten_input(x, gamma, None) is x, x.stride()


@pytest.mark.parametrize("sizes", [(2, 3, 1, 2), (2, 3, 2, 1), (1, 3, 2, 1)])
def test_misreads_gradients_names_exactly_the_gradients_aten_gets_wrong(sizes):
    # ATen's gradients for dy, against those for dy.contiguous() (float64, the same sums in
    # another order: 1e-9), for every input ATen is handed (none that aten_input copies) and
    # every upstream gradient's strides, in training and inference.
    for x in _every_layout(sizes):
        if native.misread_by_cpu_backward(x):
            continue  # aten_input hands ATen a contiguous copy of these
        for dy in _every_layout(sizes):
            wrong = any(not torch.allclose(a, b, rtol=1e-9, atol=1e-9)
                        for training in (True, False)
                        for a, b in zip(_aten_gradients(x, training, dy),
                                        _aten_gradients(x, training, dy.contiguous()),
                                        strict=True))
            expected = native.misreads_gradients(x) and native.misread_by_cpu_backward(dy)
            assert wrong == expected, (x.stride(), dy.stride())


@pytest.mark.parametrize("fused", [True, None], ids=["native", "fused_none"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_gradients_of_size_one_channels_last_upstream_gradient_equal_those_of_its_copy(
        training, fused):
    # x NCHW-contiguous, the upstream gradient in the strides ATen misreads. Both sides
    # float64, the same values summed in another order: 1e-9. Two calls each, the second
    # through the layer's plan for the signature.
    x = torch.randn(8, 16, 4, 1, dtype=torch.float64)
    dy = _size_one_channels_last()
    grads = []
    for dyi in (dy, dy.contiguous()):
        layer = bn.BatchNorm(16, fused=fused, dtype=torch.float64)
        for _ in range(2):
            xg = x.clone().requires_grad_()
            layer.zero_grad()
            (layer(xg, training=training) * dyi).sum().backward()
            grads.append((xg.grad, layer.gamma.grad, layer.beta.grad))
    for actual, expected in zip(grads[:2], grads[2:], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


def test_traced_gradients_of_size_one_channels_last_upstream_gradient_equal_those_of_its_copy():
    # NativeKernel.train's own path (inside torch.func.grad). float64, another order: 1e-9.
    x = torch.randn(8, 16, 4, 1, dtype=torch.float64)
    dy = _size_one_channels_last()
    state = initial_state(16, dtype=torch.float64)

    def loss(x, dy):
        y, _ = bn.functional.batch_norm(x, state, training=True, fused=True)
        return (y * dy).sum()
    torch.testing.assert_close(torch.func.grad(loss)(x, dy),
                               torch.func.grad(loss)(x, dy.contiguous()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_only_shapes_with_a_size_one_dimension_hook_the_gradient_of_atens_output(training):
    # The hook is decided once per signature: other shapes keep ATen's output untouched.
    for shape, hooked in (((8, 16, 4, 1), True), ((32, 64, 8, 8), False), ((32, 64), False)):
        layer = bn.BatchNorm(shape[1], fused=True)
        for _ in range(2):  # the first call, then the layer's plan
            y = layer(torch.randn(shape, requires_grad=True), training=training)
            assert y.grad_fn.name() == "NativeBatchNormBackward0"  # ATen's output itself
            assert bool(y._backward_hooks) == hooked, shape



@pytest.mark.parametrize("layout", ["nchw", "rows"])
def test_passes_over_few_values_run_only_serial_loops(layout, monkeypatch):
    # A small input (most programs' first calls, most tests) runs on the calling thread: a
    # parallel loop compiles about four times slower and wakes a thread pool for nothing.
    called = set()

    def recorded(name, loop):
        def serial(*args):
            called.add((name, "serial"))
            return loop.serial(*args)

        def parallel(*args):
            called.add((name, "parallel"))
            return loop.parallel(*args)
        return cpu_loops.Loop(serial, parallel)

    for name, loop in list(vars(cpu_loops).items()):
        if isinstance(loop, cpu_loops.Loop):
            monkeypatch.setattr(cpu_loops, name, recorded(name, loop))
    x, axis = make_input(layout, torch.float32)
    assert x.numel() < cpu_passes.PARALLEL_MIN_NUMEL
    for options in ({}, {"activation": "relu"}):
        run_kernel(CPU_TRAIN, x, axis, options, make_mask("values", x, axis), torch.float32)
    suffix = "rows" if layout == "rows" else "planes"
    assert called == {(f"{name}_{suffix}", "serial")
                      for name in ("moments", "affine", "grad_sums", "grad_input")}


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_parallel_loops_give_the_serial_loops_results(layout, monkeypatch):
    # The same function compiled twice: the same blocks, each summed by the same code, so the
    # same bits (compared exactly) whichever flavor ran.
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread: no parallel loop runs")
    monkeypatch.setattr(cpu_passes, "threads", lambda: 2)  # the same blocks in both runs
    x, axis = make_input(layout, torch.float32)
    results = []
    for smallest in (x.numel() + 1, 0):  # serial, then parallel
        monkeypatch.setattr(cpu_passes, "PARALLEL_MIN_NUMEL", smallest)
        results.append([run_kernel(CPU_TRAIN, x, axis, dict(options), make_mask(mask, x, axis),
                                   torch.float32)[0]
                        for options, mask in (({}, "values"), ({"activation": "relu"}, None))])
    for serial, parallel in zip(*results, strict=True):
        for key, value in serial.items():
            assert torch.equal(parallel[key], value), key
