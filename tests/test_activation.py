"""The fused activation (``BatchNorm(activation="relu" | "silu")``): the option, its
semantics, and the CPU kernel's fused passes against the composite kernel.

``y = act(BN(x))``; the statistics and the moving averages are those of ``x``. The
composite kernel (and every path through ATen) applies torch's own activation after the
normalization: that is the definition. The CPU kernel writes ``act(x * a + b)`` in its
output pass and differentiates through ``act`` in its backward passes, recomputing
``z = x * a + b`` from ``x``; these tests compare it with the composite in every mode,
layout and dtype (the pattern of ``test_kernels.py``, whose helpers they reuse).

Tolerances (each path rounds differently; neither is the exact value):
- float64: 1e-9, as in ``test_kernels.py`` (summation order only).
- float32: y, dx and the statistics rtol = atol = 1e-5, as in ``test_kernels.py``.
  dgamma and dbeta are sums of ~700 float32 terms of magnitude ~1 that cancel: measured
  against float64, the composite's and the fused kernels' are each up to ~1.3e-5 off,
  so they are compared at rtol = 1e-4, atol = 5e-5.
- bfloat16 (float16 for Triton): the composite rounds the normalized output to the input's
  dtype before the activation reads it, and computes ``dz = dy * act'(y)`` in that dtype
  (each term rounded, 2**-8 relative for bfloat16) before summing; the fused passes do all
  of it in float32 and round once. So y and dx agree within two rounding steps (rtol 2**-7,
  atol 2**-6 of the largest magnitude; float16 2**-10 and 2**-9), dgamma and dbeta within
  two steps of the largest magnitude (rtol 2**-7, atol 2**-7 of it; float16 2**-10).
"""

from __future__ import annotations

import pytest
import test_kernels as cpu_tests
import torch

import batchnorm as bn
from batchnorm import activations, kernels, plan
from batchnorm.functional import BatchNormConfig, initial_state
from batchnorm.kernels import KernelCall, composite, cpu, inference, native
from batchnorm.kernels.cpu import passes as cpu_passes

ACTIVATIONS = ["relu", "silu"]
FLOAT32_SUMS = (1e-4, 5e-5)
HALF_ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}  # two rounding steps, relative

needs_numba = pytest.mark.skipif(not cpu.available(),
                                 reason=f"the CPU fast path is unavailable: {cpu.IMPORT_ERROR}")


def assert_matches(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    """Every output of one kernel against the composite's, at the module's tolerances."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        if dtype in HALF_ULP and (key in ("y", "dx", "dgamma", "dbeta")):
            scale = value.double().abs().max().item()
            ulp = HALF_ULP[dtype]
            rtol, atol = (ulp, 2 * ulp * scale) if key in ("y", "dx") else (ulp, ulp * scale)
            got, value = got.double(), value.double()
        elif value.dtype == torch.float64:
            rtol, atol = 1e-9, 1e-9
        elif key in ("dgamma", "dbeta"):
            rtol, atol = FLOAT32_SUMS
        else:
            rtol, atol = 1e-5, 1e-5
        torch.testing.assert_close(got, value, rtol=rtol, atol=atol,
                                   msg=lambda m, k=key: f"{k}: {m}")


def compare_with_composite(kernel, mode: str, layout: str, dtype: torch.dtype,
                           activation: str, device: str = "cpu") -> torch.Tensor:
    """Run ``kernel`` and the composite on the same call; assert they match; return y."""
    options, mask_kind = cpu_tests.MODES[mode]
    x, axis = cpu_tests.make_input(layout, dtype)
    if options.get("virtual_batch_size") and axis == 0:
        pytest.skip("ghost batches split axis 0")
    x = x.to(device)
    mask = cpu_tests.make_mask(mask_kind, x.cpu(), axis)
    mask = None if mask is None else mask.to(device)
    options = {**options, "activation": activation}
    reference = cpu_tests.keyword_kernel(composite.COMPOSITE)
    expected, count, _ = cpu_tests.run_kernel(reference, x, axis, dict(options), mask, dtype)
    actual, fast_count, y = cpu_tests.run_kernel(cpu_tests.keyword_kernel(kernel), x, axis,
                                                 dict(options), mask, dtype)
    if dtype != torch.float64 and options.get("virtual_batch_size") == 2:
        # Two values per ghost batch: dx is a difference of nearly equal terms (zero but for
        # epsilon), below the resolution of both sides (as in test_kernels.py).
        del actual["dx"], expected["dx"]
    assert_matches(actual, expected, dtype)
    assert fast_count == count if isinstance(count, int) else True
    return y


# ---------------------------------------------------------------- the option


def test_activation_is_validated_with_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"activation='gelu'.*\('relu', 'silu'\).*module after"):
        bn.BatchNorm(3, activation="gelu")
    with pytest.raises(TypeError, match=r"activation must be None or a name.*ReLU"):
        bn.BatchNorm(3, activation=torch.nn.ReLU)
    with pytest.raises(ValueError, match="activation='Relu'"):
        bn.functional.batch_norm(torch.randn(4, 3), initial_state(3), training=True,
                                 activation="Relu")


def test_activation_is_a_read_only_option_in_the_config_and_repr():
    layer = bn.BatchNorm(3, activation="silu")
    assert layer.activation == "silu" and layer.config.activation == "silu"
    assert "activation='silu'" in repr(layer)
    assert "activation" not in repr(bn.BatchNorm(3))
    with pytest.raises(AttributeError, match=r"reconfigure\(activation='relu'\)"):
        layer.activation = "relu"
    assert layer.reconfigure(activation="relu").activation == "relu"
    config = layer.get_config()
    assert config["activation"] == "relu"
    assert bn.BatchNorm.from_config(config).activation == "relu"
    assert bn.BatchNorm(3).get_config()["activation"] is None


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("fused", [None, False, True], ids=["fast", "composite", "aten"])
def test_layer_is_activation_of_batch_norm_in_training_and_inference(activation, fused,
                                                                      monkeypatch):
    # Every path against torch's activation of the plain layer, same statistics. The plain
    # and the activated layer take the same kernel, so y differs only by the activation's
    # rounding: rtol = atol = 1e-6 (float32 values of magnitude ~3). The activation's fast
    # path threshold is lowered to the plain one's, so that both take it.
    monkeypatch.setattr(cpu_passes, "MIN_ACTIVATION_NUMEL", cpu.MIN_PLAIN_NUMEL)
    x = torch.randn(64, 16, 24, 24) * 2 + 1  # large enough for the fast path
    plain, fused_layer = (bn.BatchNorm(16, fused=fused, activation=a) for a in (None, activation))
    with torch.no_grad():
        for layer in (plain, fused_layer):
            layer.gamma.copy_(torch.linspace(0.5, 1.5, 16))
            layer.beta.copy_(torch.linspace(-1, 1, 16))
    for training in (True, False):
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                expected = activations.apply(plain(x, training=training), activation)
                got = fused_layer(x, training=training)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused_layer.moving_mean, plain.moving_mean, rtol=0, atol=0)
    torch.testing.assert_close(fused_layer.moving_variance, plain.moving_variance, rtol=0,
                               atol=0)


# ---------------------------------------------------------------- the CPU kernel


@needs_numba
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", cpu_tests.LAYOUTS)
@pytest.mark.parametrize("mode", cpu_tests.MODES)
def test_cpu_kernel_with_activation_matches_composite(mode, layout, dtype, activation):
    y = compare_with_composite(cpu.CPU, mode, layout, dtype, activation)
    if activation == "relu":
        assert (y >= 0).all()


@needs_numba
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", cpu_tests.LAYOUTS)
@pytest.mark.parametrize("mode", ["plain", "ghost_strided", "mask_values"])
def test_cpu_kernel_with_activation_matches_composite_in_bfloat16(mode, layout, activation):
    compare_with_composite(cpu.CPU, mode, layout, torch.bfloat16, activation)


@needs_numba
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
@pytest.mark.parametrize("mode", ["plain", "ghost_strided", "mask_positions", "mask_values",
                                  "mask_ghost_empty_group", "renorm_clipped"])
def test_gradcheck_cpu_kernel_with_activation(mode, layout, activation):
    # float64 central differences (gradcheck's defaults: eps 1e-6, atol 1e-5, rtol 1e-3).
    # ReLU has a kink at 0: no z of these seeded inputs lies within 1e-4 of it (asserted),
    # so the finite differences never straddle it.
    options, mask_kind = cpu_tests.MODES[mode]
    shape, axis, fmt = {"nchw": ((8, 3, 2, 2), 1, None),
                        "channels_last": ((8, 3, 2, 2), 1, torch.channels_last),
                        "rows": ((8, 3), 1, None)}[layout]
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    if mode == "renorm_clipped":  # std 3, mean +-3: every r and d clipped (test_kernels.py)
        x = (x - x.mean((0, *range(2, x.ndim)), keepdim=True)) / x.std(
            (0, *range(2, x.ndim)), keepdim=True) * 3 + 3
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    mask = cpu_tests.make_mask(mask_kind, x, axis)
    gamma = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
    f = cpu_tests.gradcheck_function({**options, "activation": activation}, mask, axis)
    if activation == "relu":
        z = cpu_tests.gradcheck_function(dict(options), mask, axis)(x, gamma, beta)
        assert z.abs().min() > 1e-4, "an input too close to ReLU's kink for finite differences"
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), gamma, beta))


@needs_numba
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_double_backward_with_activation_matches_composite(activation):
    # create_graph differentiates the composite path: the same values (float64: 1e-9).
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    gamma = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    results = []
    for kernel in (cpu_tests.COMPOSITE_TRAIN, cpu_tests.CPU_TRAIN):
        xg = x.clone().requires_grad_()
        y, _ = kernel(xg, initial_state(3, dtype=torch.float64), (1,), gamma=gamma, beta=None,
                      epsilon=1e-3, activation=activation)
        (dx,) = torch.autograd.grad(y.sin().sum(), xg, create_graph=True)
        results.append(torch.autograd.grad(dx.square().sum(), (xg, gamma)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


@needs_numba
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_stays_nan_through_the_fused_activation(activation):
    x = torch.randn(64, 16, 8, 8)
    x[3, 2, 1, 1] = float("nan")
    outputs = []
    for kernel in (composite.COMPOSITE, cpu.CPU):
        call = KernelCall(BatchNormConfig(activation=activation), (1,))
        y, _ = kernel.train(x, initial_state(16), call)
        outputs.append(y)
        assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, 3]).any()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5, equal_nan=True)


@needs_numba
def test_the_fast_path_takes_the_activation_and_keeps_only_x(monkeypatch):
    # The fused kernel saves x (and gamma, beta) for the backward, as without an activation:
    # no pre-activation output is kept. (Threshold lowered: fused=None selects the loops for
    # this input.)
    x = torch.randn(64, 16, 8, 8, requires_grad=True)
    monkeypatch.setattr(cpu_passes, "MIN_ACTIVATION_NUMEL", x.numel())
    call = KernelCall(BatchNormConfig(activation="relu"), (1,), torch.ones(16), torch.zeros(16))
    assert plan.select(x, initial_state(16), call) is cpu.CPU
    y, _ = cpu.CPU.train(x, initial_state(16), call)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    assert len(saved) == 3 and saved[0] is x


def test_aten_path_applies_relu_in_place_without_breaking_autograd():
    # ATen's output is fresh and its backward does not read it: relu_ on it keeps the
    # gradients those of relu(batch_norm(x)) (composite: float32, rtol = atol = 1e-5).
    x = torch.randn(16, 4, 5, 5) * 2 + 1
    grads = []
    for kernel in (native.NATIVE, composite.COMPOSITE):
        xg = x.clone().requires_grad_()
        gamma = torch.linspace(0.5, 1.5, 4).requires_grad_()
        call = KernelCall(BatchNormConfig(activation="relu"), (1,), gamma, None)
        y, _ = kernel.train(xg, initial_state(4), call)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        grads.append((y.detach(), xg.grad, gamma.grad))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- inference


@needs_numba
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_inference_pass_with_activation_matches_the_elementwise_formula(dtype, fmt, activation,
                                                                        monkeypatch):
    # One numba pass act(x * inv + shift) against torch's ops on the same float32 (float64)
    # values: the activation in float32 differs from torch's by its rounding (rtol 1e-6;
    # bfloat16 outputs: one rounding step, 2**-7). The pass is taken from 2M values on; the
    # threshold is lowered to test it on a small input.
    monkeypatch.setattr(cpu_passes, "MIN_ACTIVATION_NUMEL", 1 << 16)
    x = torch.randn(64, 16, 8, 8).to(dtype).contiguous(memory_format=fmt)
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    inv = torch.rand(1, 16, 1, 1, dtype=cdtype) + 0.5
    shift = torch.randn(1, 16, 1, 1, dtype=cdtype)
    y = cpu_passes.affine(x, inv, shift, activation)
    assert y is not None and y.dtype == dtype and y.stride() == x.stride()
    expected = activations.apply(x.to(cdtype) * inv + shift, activation).to(dtype)
    torch.testing.assert_close(y, expected, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6,
                               atol=1e-6)


@needs_numba
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inference_takes_the_fused_pass_without_autograd(activation, monkeypatch):
    monkeypatch.setattr(cpu_passes, "MIN_ACTIVATION_NUMEL", 1 << 16)
    calls = []
    affine = cpu_passes.affine
    monkeypatch.setattr(cpu_passes, "affine", lambda *a: calls.append(a[3:]) or affine(*a))
    layer = bn.BatchNorm(16, activation=activation).eval()
    x = torch.randn(64, 16, 8, 8)
    with torch.no_grad():
        fused = layer(x)
    assert calls == [(activation,)]
    expected = activations.apply(layer.reconfigure(activation=None)(x), activation)
    # The same float32 coefficients through two routes (the ATen kernel, then torch's
    # activation): rtol = atol = 1e-6.
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)


@needs_numba
def test_small_inputs_take_atens_kernel_and_the_activation_in_place(monkeypatch):
    # Below MIN_ACTIVATION_NUMEL the loops' glue costs more than the activation's extra pass
    # (the measurements are in cpu.passes): training selects ATen's kernel, inference does not
    # call the fused loop.
    x = torch.randn(256, 256)
    assert x.numel() < cpu_passes.MIN_ACTIVATION_NUMEL
    call = KernelCall(BatchNormConfig(activation="relu"), (1,), None, None)
    assert plan.select(x, initial_state(256), call) is kernels.KERNELS["native"]
    calls = []
    affine = cpu_passes.affine
    monkeypatch.setattr(cpu_passes, "affine", lambda *a: calls.append(a) or affine(*a))
    with torch.no_grad():
        bn.BatchNorm(256, activation="relu").eval()(x)
    assert calls == []


def test_normalize_has_no_activation_and_infer_applies_it_to_features_on_any_axis():
    # tf.nn.batch_normalization (normalize) is unchanged; infer with axis=-1 (a movedim
    # view of ATen's output) applies the activation in place: torch's silu on the same values
    # (rtol = atol = 1e-6: its vectorized and strided loops may round differently).
    x = torch.randn(4, 5, 3)
    state = initial_state(3)._replace(moving_mean=torch.tensor([0.5, -0.5, 0.0]))
    call = KernelCall(BatchNormConfig(axis=-1, activation="silu"), (2,), None, None)
    y = inference.infer(x, state, call)
    plain = inference.infer(x, state, call._replace(config=BatchNormConfig(axis=-1)))
    torch.testing.assert_close(y, torch.nn.functional.silu(plain), rtol=1e-6, atol=1e-6)
    assert (inference.normalize(x, torch.zeros(1, 1, 3), torch.ones(1, 1, 3), None, None, 1e-3)
            < 0).any()


@needs_numba
def test_fused_none_takes_the_cpu_passes_for_large_channels_last_inputs():
    # Channels-last takes the CPU kernel from MIN_PLAIN_NUMEL values on, as NCHW does (its
    # row passes are at least as fast as ATen's per-row kernel there); with an activation
    # from MIN_ACTIVATION_NUMEL on. Below, ATen's kernel. Only the selection is made.
    x = torch.empty(64, 16, 48, 48).contiguous(memory_format=torch.channels_last)
    assert x.numel() >= max(cpu_passes.MIN_ACTIVATION_NUMEL, cpu_passes.MIN_PLAIN_NUMEL)
    small = torch.empty(8, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    assert small.numel() < min(cpu_passes.MIN_ACTIVATION_NUMEL, cpu_passes.MIN_PLAIN_NUMEL)
    for activation in (None, "relu"):
        call = KernelCall(BatchNormConfig(activation=activation), (1,))
        assert plan.select(x, initial_state(16), call) is cpu.CPU
        assert plan.select(small, initial_state(16), call) is native.NATIVE


@pytest.mark.parametrize(("activation", "options"), [("relu", {}),
                                                     ("silu", {"virtual_batch_size": 8})],
                         ids=["relu-aten", "silu-composite"])
def test_compiled_layer_with_activation_matches_eager(activation, options):
    # Traced, the fast path declines: ATen's kernel (ReLU in place on its output) or the
    # composite, and inference through ATen with the activation in place. Same float32
    # values up to the compiled graph's fusion: rtol = atol = 1e-5.
    layer = bn.BatchNorm(16, activation=activation, **options)
    x = torch.randn(64, 16, 8, 8)
    for training in (True, False):
        with torch.no_grad():
            expected = layer(x, training=training)
            compiled = torch.compile(lambda t, training=training: layer(t, training=training),
                                     fullgraph=True)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
