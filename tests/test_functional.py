"""``batchnorm.functional``: moments, normalize, batch_norm, and how they compose.

``moments``/``normalize`` are checked against NumPy like ``tf.nn.moments`` and
``tf.nn.batch_normalization``; ``batch_norm`` for its ``(y, new_state)`` contract and its
purity; gradients with ``torch.autograd.gradcheck`` (float64); half-precision inputs;
``torch.compile(fullgraph=True)``; and the ``torch.func`` transforms.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.testing import assert_close

import batchnorm as bn
from batchnorm import functional as F
from batchnorm.shapes import broadcast, reduction_axes, resolve_axes
from batchnorm.statistics import update_state_

MODES = [pytest.param(True, id="training"), pytest.param(False, id="inference")]
HALF = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]


def random_state(num_features: int, dtype: torch.dtype = torch.float64) -> F.BatchNormState:
    """A state with non-trivial moving averages, 3 updates, and initial values (for debias)."""
    mean = torch.randn(num_features, dtype=dtype)
    variance = torch.rand(num_features, dtype=dtype) + 0.5
    return F.BatchNormState(mean, variance, torch.tensor(3), mean.clone() + 1, variance.clone())


def same_bits(a: F.BatchNormState, b: F.BatchNormState) -> bool:
    """Every field equal bit for bit (None where the other is None)."""
    return all((s is None and t is None) or (s is not None and t is not None
                                             and s.dtype == t.dtype and torch.equal(s, t))
               for s, t in zip(a, b, strict=True))


def clone_state(state: F.BatchNormState) -> F.BatchNormState:
    return F.BatchNormState(*(None if t is None else t.clone() for t in state))


# ---------------------------------------------------------------------------- moments


def test_moments_are_the_numpy_mean_and_biased_variance_over_the_given_axes():
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 3 + 2
    mean, variance = F.moments(x, [0, 2])
    np.testing.assert_allclose(mean.numpy(), x.numpy().mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(variance.numpy(), x.numpy().var(axis=(0, 2)), rtol=1e-12)


def test_moments_variance_is_biased_like_tf_nn_moments():
    x = torch.tensor([[-10.0], [0.0], [10.0]], dtype=torch.float64)
    _, variance = F.moments(x, [0])
    assert variance.item() == pytest.approx(200.0 / 3.0, rel=1e-15)  # not 200 / 2


def test_moments_axes_are_the_reduction_axes_not_the_feature_axes():
    x = torch.randn(4, 3, dtype=torch.float64)
    mean_over_rows, _ = F.moments(x, 0)
    mean_over_columns, _ = F.moments(x, [1])
    assert mean_over_rows.shape == (3,)
    assert mean_over_columns.shape == (4,)
    assert_close(mean_over_rows, x.mean(dim=0))
    assert_close(mean_over_columns, x.mean(dim=1))


def test_moments_accept_negative_axes():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for negative, positive in zip(F.moments(x, [-1, -3]), F.moments(x, [2, 0]), strict=True):
        assert torch.equal(negative, positive)


def test_moments_keepdims_keeps_the_reduced_axes_with_size_one():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    kept = F.moments(x, [0, 2], keepdims=True)
    dropped = F.moments(x, [0, 2])
    for k, d in zip(kept, dropped, strict=True):
        assert k.shape == (1, 3, 1)
        assert torch.equal(k.flatten(), d)


@pytest.mark.parametrize("dtype", HALF)
def test_moments_of_a_half_precision_input_are_float32(dtype):
    mean, variance = F.moments(torch.randn(8, 3).to(dtype), [0])
    assert mean.dtype == variance.dtype == torch.float32


def test_moments_of_a_float64_input_stay_float64():
    mean, variance = F.moments(torch.randn(8, 3, dtype=torch.float64), [0])
    assert mean.dtype == variance.dtype == torch.float64


# ---------------------------------------------------------------------------- normalize


def test_normalize_is_tf_nn_batch_normalization():
    x = torch.randn(2, 3, 4, dtype=torch.float64) * 4 + 1
    mean = torch.randn(1, 3, 1, dtype=torch.float64)
    variance = torch.rand(1, 3, 1, dtype=torch.float64) + 0.1
    offset = torch.randn(1, 3, 1, dtype=torch.float64)
    scale = torch.randn(1, 3, 1, dtype=torch.float64)
    y = F.normalize(x, mean, variance, offset, scale, 1e-3)
    n = {k: v.numpy() for k, v in dict(x=x, m=mean, v=variance, o=offset, s=scale).items()}
    expected = n["s"] * (n["x"] - n["m"]) / np.sqrt(n["v"] + 1e-3) + n["o"]
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_normalize_without_offset_and_scale_only_standardizes():
    x = torch.tensor([-10.0, 0.0, 10.0], dtype=torch.float64)
    y = F.normalize(x, torch.tensor(1.0, dtype=torch.float64),
                    torch.tensor(4.0, dtype=torch.float64), None, None, 0.5)
    np.testing.assert_allclose(y.numpy(), (x.numpy() - 1.0) / np.sqrt(4.5), rtol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=str)
def test_normalize_returns_the_input_dtype(dtype):
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mean, variance = torch.zeros(3, dtype=stats_dtype), torch.ones(3, dtype=stats_dtype)
    y = F.normalize(torch.randn(4, 3).to(dtype), mean, variance, None, None, 1e-3)
    assert y.dtype == dtype


@pytest.mark.parametrize("axis", [1, -1, (1, 3)], ids=str)
def test_normalize_takes_feature_shaped_statistics_with_axis(axis):
    # moments(x, axes) without keepdims returns feature-shaped statistics: axis= says where.
    x = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    axes = resolve_axes(axis, x.ndim)
    mean, variance = F.moments(x, axes=reduction_axes(x.ndim, axes))
    offset, scale = torch.randn_like(mean), torch.randn_like(mean)
    kept = F.moments(x, axes=reduction_axes(x.ndim, axes), keepdims=True)
    expected = F.normalize(x, *kept, broadcast(offset, x, axes), broadcast(scale, x, axes),
                           1e-3)
    assert_close(F.normalize(x, mean, variance, offset, scale, 1e-3, axis=axis), expected)


def test_normalize_without_axis_names_the_fix_for_reduced_statistics():
    x = torch.randn(8, 16, 4, 4)
    mean, variance = F.moments(x, axes=[0, 2, 3])  # shape (16,): does not broadcast
    with pytest.raises(ValueError, match=r"mean of shape \(16,\).*\(8, 16, 4, 4\).*axis=1.*"
                                         r"keepdims=True"):
        F.normalize(x, mean, variance, None, None, 1e-3)


def test_normalize_with_axis_rejects_statistics_of_another_shape():
    x = torch.randn(8, 16, 4, 4)
    mean, variance = F.moments(x, axes=[0, 2, 3], keepdims=True)
    with pytest.raises(ValueError, match=r"mean has shape \(1, 16, 1, 1\).*\(16,\)"):
        F.normalize(x, mean, variance, None, None, 1e-3, axis=1)


# ---------------------------------------------------------------------------- batch_norm


def test_batch_norm_returns_the_output_and_a_new_state():
    x = torch.randn(6, 3, dtype=torch.float64)
    state = random_state(3)
    result = F.batch_norm(x, state, training=True)
    assert isinstance(result, tuple) and len(result) == 2
    y, new_state = result
    assert y.shape == x.shape
    assert isinstance(new_state, F.BatchNormState)
    assert new_state.num_updates.item() == state.num_updates.item() + 1


@pytest.mark.parametrize("training", MODES)
def test_batch_norm_does_not_mutate_its_arguments(training):
    x = torch.randn(6, 3, 2, dtype=torch.float64)
    gamma, beta = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    state = random_state(3)
    before = clone_state(state), x.clone(), gamma.clone(), beta.clone()
    F.batch_norm(x, state, training=training, gamma=gamma, beta=beta, momentum=0.5, debias=True)
    assert same_bits(state, before[0])
    for now, then in zip((x, gamma, beta), before[1:], strict=True):
        assert torch.equal(now, then)


def test_batch_norm_inference_returns_the_state_values_unchanged():
    state = random_state(3)
    _, new_state = F.batch_norm(torch.randn(6, 3, dtype=torch.float64), state, training=False)
    assert same_bits(new_state, state)


def test_batch_norm_training_returns_a_state_with_new_moving_averages():
    state = random_state(3)
    _, new_state = F.batch_norm(torch.randn(6, 3, dtype=torch.float64) + 5, state,
                                training=True, momentum=0.5)
    assert not torch.equal(new_state.moving_mean, state.moving_mean)
    assert not torch.equal(new_state.moving_variance, state.moving_variance)


# ---------------------------------------------------------------------------- gradcheck

GRADCHECK_SHAPES = [pytest.param((4, 3), -1, id="4x3-axis-1"),
                    pytest.param((3, 2, 2, 2), 1, id="3x2x2x2-axis1")]


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("shape", "axis"), GRADCHECK_SHAPES)
def test_functional_batch_norm_passes_gradcheck_for_x_gamma_and_beta(shape, axis, training):
    num_features = shape[axis]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(num_features, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(num_features, dtype=torch.float64, requires_grad=True)
    state = random_state(num_features)

    def f(x, gamma, beta):
        return F.batch_norm(x, state, training=training, gamma=gamma, beta=beta, axis=axis)[0]

    assert gradcheck(f, (x, gamma, beta))


@pytest.mark.parametrize("training", MODES)
def test_layer_passes_gradcheck_for_x_gamma_and_beta(training):
    layer = bn.BatchNorm(2, dtype=torch.float64)
    with torch.no_grad():
        layer.moving_mean.copy_(torch.randn(2))
        layer.moving_variance.copy_(torch.rand(2) + 0.5)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, gamma, beta):
        return torch.func.functional_call(layer, {"gamma": gamma, "beta": beta}, (x,),
                                          {"training": training})

    assert gradcheck(f, (x, gamma, beta))


# ---------------------------------------------------------------------------- half precision

# The statistics and all the arithmetic run in float32 on the upcast input, so a half
# input's output is the float32 output on the same values, rounded once to the half type:
# off by at most half an ulp, |y| * eps / 2. With |y| up to ~3 (standardized values times
# gamma <= 1.5, plus beta) that is ~1.2e-2 for bfloat16 (eps = 2**-7) and ~1.5e-3 for
# float16 (eps = 2**-10); the tolerance eps * max|y| (~2e-2 and ~3e-3) leaves a factor 2.


def half_case(dtype: torch.dtype):
    x = (torch.randn(16, 3, 4) * 2 + 1).to(dtype)
    gamma = (torch.rand(3) + 0.5).to(dtype)
    beta = (torch.rand(3) - 0.5).to(dtype)
    return x, gamma, beta, random_state(3, torch.float32)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_output_has_the_input_dtype(dtype, training):
    x, gamma, beta, state = half_case(dtype)
    y, _ = F.batch_norm(x, state, training=training, gamma=gamma, beta=beta)
    assert y.dtype == dtype


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_input_keeps_the_state_in_float32(dtype):
    x, gamma, beta, state = half_case(dtype)
    _, new_state = F.batch_norm(x, state, training=True, gamma=gamma, beta=beta)
    assert new_state.moving_mean.dtype == torch.float32
    assert new_state.moving_variance.dtype == torch.float32


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_output_is_the_float32_output_rounded(dtype, training):
    x, gamma, beta, state = half_case(dtype)
    y, new_state = F.batch_norm(x, state, training=training, gamma=gamma, beta=beta)
    y32, state32 = F.batch_norm(x.float(), state, training=training, gamma=gamma.float(),
                                beta=beta.float())
    eps = torch.finfo(dtype).eps
    assert_close(y.float(), y32, rtol=0, atol=eps * y32.abs().max().item())
    assert_close(new_state.moving_mean, state32.moving_mean)
    assert_close(new_state.moving_variance, state32.moving_variance)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_layer_keeps_float32_buffers_and_outputs_the_input_dtype(dtype):
    layer = bn.BatchNorm(3, dtype=dtype)
    y = layer(torch.randn(8, 3, 2).to(dtype), training=True)
    assert y.dtype == dtype
    assert layer.gamma.dtype == layer.beta.dtype == dtype
    assert layer.moving_mean.dtype == layer.moving_variance.dtype == torch.float32
    assert layer.num_updates.item() == 1


# ---------------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_dynamo():
    """Start and end with an empty compilation cache, so tests do not share graphs."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def trained_layer() -> bn.BatchNorm:
    layer = bn.BatchNorm(3, momentum=0.9)
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(3) + 0.5)
        layer.beta.copy_(torch.randn(3))
        layer.moving_mean.copy_(torch.randn(3))
        layer.moving_variance.copy_(torch.rand(3) + 0.5)
    return layer


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_layer_in_training_updates_its_buffers_like_eager():
    eager = trained_layer()
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True)
    for _ in range(2):
        x = torch.randn(8, 3, 4) * 2 + 1
        assert_close(compiled(x, training=True), eager(x, training=True))
        for name, buffer in eager.named_buffers():
            assert_close(layer.get_buffer(name), buffer, msg=name)
    assert layer.num_updates.item() == 2


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_layer_in_inference_matches_eager_and_keeps_its_buffers():
    eager = trained_layer()
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(8, 3, 4) * 2 + 1
    assert_close(compiled(x, training=False), eager(x, training=False))
    for name, buffer in eager.named_buffers():
        assert torch.equal(layer.get_buffer(name), buffer), name
    assert layer.num_updates.item() == 0


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_functional_batch_norm_matches_eager():
    x = torch.randn(8, 3, 4) * 2 + 1
    gamma, beta = torch.rand(3) + 0.5, torch.randn(3)
    state = random_state(3, torch.float32)
    before = clone_state(state)
    kwargs = dict(training=True, gamma=gamma, beta=beta, axis=1, momentum=0.9)
    y, new_state = torch.compile(F.batch_norm, fullgraph=True)(x, state, **kwargs)
    y_eager, state_eager = F.batch_norm(x, state, **kwargs)
    assert_close(y, y_eager)
    for compiled_field, eager_field in zip(new_state[:3], state_eager[:3], strict=True):
        assert_close(compiled_field, eager_field)
    assert same_bits(state, before)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_layer_with_dynamic_shapes_rejects_a_one_sample_batch_like_eager():
    layer = trained_layer()
    compiled = torch.compile(layer, dynamic=True)
    for batch in (8, 5):  # a graph with a symbolic batch size, then a second size through it
        compiled(torch.randn(batch, 3), training=True)
    before = {name: b.clone() for name, b in layer.named_buffers()}
    with pytest.raises(ValueError, match="more than one value per feature"):
        compiled(torch.randn(1, 3), training=True)
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name
    compiled(torch.randn(8, 3), training=True)  # and the layer still trains
    assert layer.num_updates.item() == 3


def buffer_reading_case(options: dict) -> tuple[bn.BatchNorm, torch.Tensor, torch.Tensor]:
    """A float64 layer whose moving and renorm averages are far from the batch's statistics
    (so that renorm's r and d are not 1 and 0, and this call's update moves every average),
    an input and a dy."""
    layer = bn.BatchNorm(3, momentum=0.5, dtype=torch.float64, **options)
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(3) + 0.5)
        layer.beta.copy_(torch.randn(3))
        layer.moving_mean.copy_(torch.randn(3))
        if layer.renorm:
            layer.renorm_mean.copy_(torch.randn(3))
            layer.renorm_stddev.copy_(torch.rand(3) + 0.5)
        else:
            layer.moving_variance.copy_(torch.rand(3) + 0.5)
    x = torch.randn(8, 3, dtype=torch.float64) * 2 + 1
    return layer, x, torch.randn(8, 3, dtype=torch.float64)


# Ghost batches of 4, strided: sample n is in group n % 2. Leaving out samples 0, 2 and 4
# leaves group 0 one value, so it is normalized with the moving statistics.
ONE_VALUE_GROUP = torch.tensor([False, True, False, True, False, True, True, True])


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("options", "mask"), [
    pytest.param({"renorm": True, "renorm_momentum": 0.5}, None, id="renorm"),
    pytest.param({"renorm": True, "renorm_momentum": 0.5, "virtual_batch_size": 4,
                  "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, None,
                 id="renorm-clipped-ghost"),
    pytest.param({"virtual_batch_size": 4}, ONE_VALUE_GROUP, id="masked-one-value-group"),
])
def test_compiled_layer_normalizing_with_its_buffers_has_eager_gradients(options, mask):
    # Renorm's r and d, and a masked group's moving statistics, come from buffers that the
    # call's update overwrites: the backward must see the values the forward saw.
    eager, x, dy = buffer_reading_case(options)
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, fullgraph=True)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y = compiled(xs[0], training=True, mask=mask)
    y.backward(dy)
    y_eager = eager(xs[1], training=True, mask=mask)
    y_eager.backward(dy)
    # float64, the same operations in another order: agreement to rounding (~1e-15 seen).
    tolerance = {"rtol": 1e-12, "atol": 1e-12}
    assert_close(y, y_eager, **tolerance)
    assert_close(xs[0].grad, xs[1].grad, **tolerance)
    assert_close(layer.gamma.grad, eager.gamma.grad, **tolerance)
    assert_close(layer.beta.grad, eager.beta.grad, **tolerance)
    for name, buffer in eager.named_buffers():
        assert_close(layer.get_buffer(name), buffer, **tolerance, msg=name)

# ---------------------------------------------------------------------------- torch.func


def test_functional_call_updates_the_passed_buffers_and_not_the_modules_own():
    layer = trained_layer()
    own = {name: b.clone() for name, b in layer.named_buffers()}
    passed = {name: b.clone() for name, b in layer.named_buffers()}
    x = torch.randn(8, 3) * 2 + 1
    y = torch.func.functional_call(layer, passed, (x,), {"training": True})
    y_expected, expected = F.batch_norm(x, layer.state(), training=True, gamma=layer.gamma,
                                        beta=layer.beta, axis=1, momentum=0.9)
    assert_close(y, y_expected)
    assert_close(passed["moving_mean"], expected.moving_mean)
    assert_close(passed["moving_variance"], expected.moving_variance)
    assert passed["num_updates"].item() == 1
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, own[name]), name


def test_func_grad_of_batch_norm_equals_autograd():
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    gamma, beta = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    dy = torch.randn(6, 4, 3, dtype=torch.float64)
    state = random_state(3)

    def loss(x, gamma, beta):
        y, s = F.batch_norm(x, state, training=True, gamma=gamma, beta=beta, axis=-1)
        # The aux output must hold tensors only; the state's unused fields are None.
        return (y * dy).sum(), (s.moving_mean, s.moving_variance, s.num_updates)

    grads, new_state = torch.func.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, gamma, beta)
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    eager_loss, eager_state = loss(*leaves)
    eager_loss.backward()
    for got, leaf in zip(grads, leaves, strict=True):
        assert_close(got, leaf.grad)
    for got, expected in zip(new_state, eager_state, strict=True):
        assert_close(got, expected)


@pytest.mark.parametrize("training", MODES)
def test_vmap_of_batch_norm_equals_a_loop_over_the_leading_axis(training):
    xs = torch.randn(5, 6, 3, dtype=torch.float64) * 2 + 1
    gamma, beta = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    state = random_state(3)

    def f(x):
        y, s = F.batch_norm(x, state, training=training, gamma=gamma, beta=beta, axis=-1,
                            momentum=0.9)
        # vmap returns tensors only; the state's unused initial_* fields may be None.
        return y, s.moving_mean, s.moving_variance, s.num_updates

    batched = torch.func.vmap(f)(xs)
    looped = [torch.stack(column) for column in zip(*(f(x) for x in xs), strict=True)]
    for got, expected in zip(batched, looped, strict=True):
        assert_close(got, expected)


def test_func_grad_through_a_training_layer_with_captured_buffers_raises_and_writes_nothing():
    layer = trained_layer()
    params = dict(layer.named_parameters())
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    before = {name: b.clone() for name, b in buffers.items()}
    own = {name: b.clone() for name, b in layer.named_buffers()}

    def loss(params, x):
        return torch.func.functional_call(layer, (params, buffers), (x,),
                                          {"training": True}).sum()

    with pytest.raises(ValueError, match=r"torch\.func.*functional\.batch_norm"):
        torch.func.grad(loss)(params, torch.randn(8, 3))
    for name, buffer in buffers.items():
        assert torch.equal(buffer, before[name]), name
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, own[name]), name


@pytest.mark.parametrize("batch", [pytest.param(8, id="small"),
                                   pytest.param(2048, id="fast-path-size")])
def test_func_grad_refuses_a_training_layers_captured_buffers_whatever_the_kernel(batch):
    # x and the layer captured, nothing of them differentiated: the call (and, for 64K
    # values, the CPU fast path's plan left by an eager call) still runs under the transform.
    layer = bn.BatchNorm(32, momentum=0.9)
    x = torch.randn(batch, 32)
    layer(x, training=True)
    before = {name: b.clone() for name, b in layer.named_buffers()}
    with pytest.raises(ValueError, match="nothing was written"):
        torch.func.grad(lambda w: (layer(x, training=True) * w).sum())(torch.tensor(2.0))
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name


def ensemble(n: int) -> list[bn.BatchNorm]:
    """``n`` float64 layers with different parameters and moving averages."""
    models = []
    for _ in range(n):
        layer = bn.BatchNorm(3, momentum=0.9, dtype=torch.float64)
        with torch.no_grad():
            for t in (layer.gamma, layer.beta, layer.moving_mean):
                t.copy_(torch.randn(3))
        models.append(layer)
    return models


def test_vmap_of_a_training_layer_over_stacked_models_trains_each_like_eager():
    models = ensemble(4)
    eager = copy.deepcopy(models)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    xs = torch.randn(4, 8, 3, dtype=torch.float64) * 2 + 1

    def call(params, buffers, x):
        return torch.func.functional_call(base, (params, buffers), (x,), {"training": True})

    ys = torch.func.vmap(call)(params, buffers, xs)
    for i, layer in enumerate(eager):
        # float64, the same update with the statistics of another kernel: rounding only.
        assert_close(ys[i], layer(xs[i], training=True), rtol=1e-12, atol=1e-12)
        for name, buffer in layer.named_buffers():
            assert_close(buffers[name][i], buffer, rtol=1e-12, atol=1e-12, msg=name)
    assert buffers["num_updates"].tolist() == [1] * 4


def test_vmap_of_a_training_layer_over_inputs_sharing_its_state_raises_and_writes_nothing():
    layer = trained_layer()
    before = {name: b.clone() for name, b in layer.named_buffers()}
    with pytest.raises(ValueError, match="stack_module_state"):
        torch.func.vmap(lambda x: layer(x, training=True))(torch.randn(4, 8, 3))
    for name, buffer in layer.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_vmap_update_refused_for_one_buffer_undoes_the_buffers_written_before_it():
    layer = trained_layer()
    # The averages batched, the counts (num_updates, num_skipped) the layer's own: the
    # averages can be written, the counts cannot.
    averages = {name: getattr(layer, name).expand(4, 3).clone()
                for name in ("moving_mean", "moving_variance")}
    before = {name: b.clone() for name, b in averages.items()}

    def call(averages, x):
        return torch.func.functional_call(layer, averages, (x,), {"training": True})

    with pytest.raises(ValueError, match="nothing was written"):
        torch.func.vmap(call)(averages, torch.randn(4, 8, 3))
    for name, average in averages.items():
        assert torch.equal(average, before[name]), name
    assert layer.num_updates.item() == 0


# ---------------------------------------------------------------- in-place update

UPDATE_CASES = [
    pytest.param({}, 1, None, id="plain"),
    pytest.param({"momentum": None}, 1, None, id="cumulative"),
    pytest.param({"unbiased_moving_variance": True}, 1, None, id="unbiased"),
    pytest.param({"renorm_momentum": 0.5}, 1, None, id="renorm"),
    pytest.param({}, 3, None, id="ghost-groups"),
    pytest.param({}, 3, [[5.0], [2.0], [0.0]], id="masked-counts"),
]


@pytest.mark.parametrize(("options", "groups", "counts"), UPDATE_CASES)
def test_update_state_in_place_moves_the_state_to_what_update_state_returns(
        options, groups, counts):
    gen = torch.Generator().manual_seed(3)
    renorm = "renorm_momentum" in options
    state = F.initial_state(4, renorm=renorm, dtype=torch.float64)
    state = state._replace(moving_mean=torch.randn(4, generator=gen, dtype=torch.float64),
                           num_updates=torch.tensor(3))
    count = 8 if counts is None else torch.tensor(counts, dtype=torch.float64)
    stats = F.BatchStatistics(torch.randn(groups, 4, generator=gen, dtype=torch.float64),
                              torch.rand(groups, 4, generator=gen, dtype=torch.float64) + 0.1,
                              count)
    kwargs = {"momentum": 0.9, "epsilon": 1e-3, **options}
    expected = F.update_state(state, stats, **kwargs)
    moved = clone_state(state)
    assert update_state_(moved, stats, **kwargs) is True
    for name, value in expected._asdict().items():
        if value is not None:  # one computation of the new values, written in place: exact
            assert torch.equal(getattr(moved, name), value), name
    assert int(moved.num_updates) == 4


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["mean", "variance"])
def test_update_state_in_place_leaves_everything_unchanged_for_non_finite_statistics(bad, field):
    state = F.initial_state(3, renorm=True)
    mean, variance = torch.zeros(1, 3), torch.ones(1, 3)
    {"mean": mean, "variance": variance}[field][0, 1] = bad
    before = clone_state(state)
    assert update_state_(state, F.BatchStatistics(mean, variance, 4), momentum=0.9) is False
    assert same_bits(state, before)


def test_update_state_in_place_does_not_treat_huge_finite_statistics_as_overflow():
    state = F.initial_state(2)
    big = torch.full((1, 2), 3e38)  # a float32 sum of these would overflow
    assert update_state_(state, F.BatchStatistics(big, big, 4), momentum=0.5) is True
    assert torch.isfinite(state.moving_variance).all()


def test_batch_norm_with_a_config_decides_the_moving_variance_as_the_layer_does():
    """A config's unbiased_moving_variance=None (the layer's default) is tf_keras's rule for
    the input, in batch_norm as in the layer: the Bessel-corrected variance for a 4-D float32
    channels-first input (fused in tf_keras), the biased one for a 2-D input."""
    for shape in ((8, 3, 4, 4), (8, 3)):
        x = torch.randn(shape)
        layer = bn.BatchNorm(3)
        layer(x, training=True)
        _, new_state = F.batch_norm(x, F.initial_state(3), training=True,
                                    config=F.BatchNormConfig())
        # The same update from the same statistics, to float32 rounding (the two kernels
        # sum in different orders); the other variance would differ by 0.01 * v / (n - 1),
        # about 8e-5 for the 4-D input's 128 values per feature.
        assert torch.allclose(new_state.moving_variance, layer.moving_variance, rtol=0,
                              atol=1e-6), shape
