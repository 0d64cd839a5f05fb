"""Call plans (batchnorm/plan.py): a layer's checks and kernel choice are paid once per input
signature, and a plan is used only while everything its checks saw is unchanged.

The reference for every comparison is the full path: the same layer's calls inside a
``kernels.prefer("native")`` block, which never uses or leaves a plan and picks the same
kernel for these small inputs (ATen's in the plain mode, the composite in the others).
Outputs, gradients and buffers are compared bit for bit: the plan runs the same kernel, and
its moving-average loop computes ``moving + w * (value - moving)`` with a fused multiply-add
as ATen's vectorized ``lerp`` does.
"""

from __future__ import annotations

import copy
import io
import math
import threading
import warnings

import pytest
import torch
from plan_checks import assert_same_state, checked_once, count_prepares, twin_layers
from torch import nn

import batchnorm as bn
from batchnorm import kernels, plan

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "plain": {},
    "unbiased": {"unbiased_moving_variance": True},
    "momentum-0.5": {"momentum": 0.5},
    "cumulative": {"momentum": None},
    "debias": {"debias": True},
    "renorm": {"renorm": True},
    "ghost": {"virtual_batch_size": 4},
    "relu": {"activation": "relu"},
    "no-affine": {"center": False, "scale": False},
    "composite": {"fused": False},
}


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _full_path(layer: bn.BatchNorm, *args, **kwargs) -> torch.Tensor:
    with kernels.prefer("native"):
        return layer(*args, **kwargs)


def test_the_checks_run_once_per_signature(monkeypatch):
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    calls = checked_once(monkeypatch, lambda: layer(x, training=True))
    layer(x, training=False)
    assert calls[0] == 2
    layer(torch.randn(4, 6), training=True)  # a smaller last batch: a signature of its own
    assert calls[0] == 3
    for _ in range(2):
        layer(x, training=True)
        layer(x, training=False)
    assert calls[0] == 3
    with torch.no_grad():  # grad mode is part of the signature (inference clones otherwise)
        layer(x, training=False)
    assert calls[0] == 4


@pytest.mark.parametrize("name", CONFIGS)
def test_planned_calls_equal_the_full_path_bit_for_bit(name):
    planned, full = twin_layers(**CONFIGS[name])
    for step in range(4):
        x = torch.randn(8, 6) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = planned(xa, training=True), _full_path(full, xb, training=True)
        assert torch.equal(ya, yb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert torch.equal(xa.grad, xb.grad)
        for pa, pb in zip(planned.parameters(), full.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad)
        assert_same_state(planned, full)
        assert torch.equal(planned(x, training=False), _full_path(full, x, training=False))
    assert int(planned.num_updates) == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_equal_the_full_path(dtype):
    planned, full = twin_layers()
    planned.to(torch.float64 if dtype == torch.float64 else torch.float32)
    full.to(torch.float64 if dtype == torch.float64 else torch.float32)
    for _ in range(3):
        x = torch.randn(8, 6).to(dtype)
        assert torch.equal(planned(x, training=True), _full_path(full, x, training=True))
        assert_same_state(planned, full)


def test_the_cpu_kernels_planned_update_equals_the_full_path():
    """A large input takes the numba passes; the plan moves the averages with its loop, the
    full path (prefer("cpu")) with torch's operations."""
    planned, full = twin_layers(unbiased_moving_variance=True)
    for _ in range(3):
        x = torch.randn(64, 6, 32, 48)
        assert x.numel() >= kernels.cpu.MIN_PLAIN_NUMEL
        with kernels.prefer("cpu"):
            expected = full(x, training=True)
        assert torch.equal(planned(x, training=True), expected)
        assert_same_state(planned, full)


def test_a_float32_input_into_a_float64_layer_equals_the_full_path():
    planned, full = twin_layers(dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(8, 6)
        assert torch.equal(planned(x, training=True), _full_path(full, x, training=True))
        assert_same_state(planned, full)


def test_channels_last_and_another_axis_equal_the_full_path():
    planned, full = twin_layers(axis=-1)
    x = torch.randn(4, 3, 5, 6)
    for _ in range(2):
        assert torch.equal(planned(x, training=True), _full_path(full, x, training=True))
    assert_same_state(planned, full)
    planned, full = twin_layers()
    x = torch.randn(4, 6, 3, 5).to(memory_format=torch.channels_last)
    for _ in range(2):
        assert torch.equal(planned(x, training=True), _full_path(full, x, training=True))
    assert_same_state(planned, full)


def test_a_shared_layer_called_twice_before_backward():
    """Both calls' graphs keep ATen's running-statistics arguments (the plan's per-thread
    workspace): the second call must not invalidate the first call's backward."""
    planned, full = twin_layers()
    xs = [torch.randn(8, 6, requires_grad=True) for _ in range(2)]
    (planned(xs[0], training=True) * 2 + planned(xs[1], training=True)).sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in xs]
    (_full_path(full, ref[0], training=True) * 2
     + _full_path(full, ref[1], training=True)).sum().backward()
    for x, r in zip(xs, ref, strict=True):
        assert torch.equal(x.grad, r.grad)
    assert_same_state(planned, full)


# ---------------------------------------------------------------- a plan is used only while current


def test_a_replaced_parameter_of_the_wrong_size_raises_as_on_the_first_call():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=True)
    layer.gamma = nn.Parameter(torch.ones(5))
    before = _state(layer)
    with pytest.raises(ValueError, match="gamma"):
        layer(x, training=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_parameter_resized_through_data_raises_as_on_the_first_call():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=True)
    layer(x, training=False)
    layer.beta.data = layer.beta.data[:3]  # same storage, another shape
    for training in (True, False):
        with pytest.raises(ValueError, match="beta"):
            layer(x, training=training)


def test_a_parameter_swapped_through_data_is_the_one_used():
    planned, full = twin_layers()
    x = torch.randn(8, 6)
    planned(x, training=True)
    full(x, training=True)
    for layer in (planned, full):
        layer.gamma.data = torch.full((6,), 3.0)
    assert torch.equal(planned(x, training=True), _full_path(full, x, training=True))
    assert torch.equal(planned(x, training=False), _full_path(full, x, training=False))


def test_a_replaced_buffer_receives_the_update():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6) + 5
    layer(x, training=True)
    old = layer.moving_mean
    layer.moving_mean = torch.zeros(6)
    layer(x, training=True)
    assert layer.moving_mean is not old
    assert torch.allclose(layer.moving_mean, 0.01 * x.mean(0), rtol=1e-5)


def test_freezing_gamma_in_inference_with_grad_enabled():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=False).sum().backward()
    assert layer.gamma.grad is not None
    layer.gamma.grad = None
    layer.gamma.requires_grad_(False)
    y = layer(x, training=False)
    y.sum().backward()
    assert layer.gamma.grad is None and layer.beta.grad is not None


def test_reconfigure_takes_effect_at_the_next_call():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6) + 4
    layer(x, training=True)
    before = layer.moving_mean.clone()
    layer.reconfigure(momentum=0.5)
    layer(x, training=True)
    expected = before + 0.5 * (x.mean(0) - before)
    assert torch.allclose(layer.moving_mean, expected, rtol=1e-6)


def test_moving_the_layer_drops_its_plans_and_works_in_the_new_dtype():
    layer = bn.BatchNorm(6)
    layer(torch.randn(8, 6), training=True)
    layer.double()
    y = layer(torch.randn(8, 6, dtype=torch.float64), training=True)
    assert y.dtype == torch.float64 and layer.moving_mean.dtype == torch.float64
    assert int(layer.num_updates) == 2


def test_functional_call_uses_the_given_tensors():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=False)
    given = {"gamma": torch.full((6,), 2.0), "beta": torch.full((6,), 1.0)}
    y = torch.func.functional_call(layer, given, (x,), {"training": False})
    expected = layer(x, training=False) * 2 + 1
    assert torch.allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_load_state_dict_values_are_used():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=False)
    other = bn.BatchNorm(6)
    with torch.no_grad():
        other.moving_mean.fill_(3.0)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x, training=False), other(x, training=False))


def test_every_input_error_is_still_raised_after_a_plan_exists():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=True)
    layer(x, training=False)
    with pytest.raises(ValueError, match="value per feature|one value"):
        layer(torch.randn(1, 6), training=True)
    with pytest.raises(TypeError):
        layer(torch.ones(8, 6, dtype=torch.int64), training=True)
    with pytest.raises(ValueError):
        layer(torch.randn(8, 5), training=False)
    with pytest.raises(TypeError):
        layer(x, training="yes")


def test_a_prefer_block_has_plans_of_its_own(monkeypatch):
    """The kernel a prefer block forces is part of a plan's signature: inside the block the
    forced kernel runs, after it the plan of the kernel chosen without it."""
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6)
    layer(x, training=True)
    used = []
    composite = kernels.KERNELS["composite"]
    original = type(composite).train
    monkeypatch.setattr(type(composite), "train",
                        lambda self, *a, **k: used.append(1) or original(self, *a, **k))
    with kernels.prefer("composite"):
        layer(x, training=True)
        layer(x, training=True)
    assert used == [1, 1]
    layer(x, training=True)
    assert used == [1, 1]


def test_deferred_updates_record_calls_of_a_planned_layer():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6) + 3
    layer(x, training=True)
    before = layer.moving_mean.clone()
    with bn.deferred_updates() as updates:
        layer(x, training=True)
        assert torch.equal(layer.moving_mean, before)
        updates.apply()
    assert not torch.equal(layer.moving_mean, before)


# ---------------------------------------------------------------- the prepared update


def test_a_non_finite_batch_is_skipped_loudly_and_the_next_one_counts():
    planned, full = twin_layers()
    x = torch.randn(8, 6)
    planned(x, training=True)
    full(x, training=True)
    before = _state(planned)
    bad = x.clone()
    bad[0, 2] = math.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        planned(bad, training=True)
    assert int(planned.num_skipped) == 1
    for key, value in planned.state_dict().items():
        assert torch.equal(value, before[key]), key
    planned(x * 2, training=True)  # the workspace the skipped call left is not reused as is
    _full_path(full, x * 2, training=True)
    assert_same_state(planned, full)


def test_a_variance_that_overflows_is_named():
    layer = bn.BatchNorm(2)
    layer(torch.randn(4, 2), training=True)
    with pytest.warns(RuntimeWarning, match="overflowed"):
        layer(torch.tensor([[3e38, 0.0], [-3e38, 0.0], [3e38, 1.0], [-3e38, 1.0]]),
              training=True)
    assert int(layer.num_skipped) == 1


def test_threads_calling_one_layer_get_their_own_batch_statistics():
    layer = bn.BatchNorm(6)
    layer(torch.randn(8, 6), training=True)
    errors = []

    def work(seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(200):
            x = torch.randn(8, 6, generator=generator) * (seed + 1)
            y = layer(x, training=True)
            expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3)
            if not torch.allclose(y, expected, rtol=1e-4, atol=1e-4):
                errors.append(seed)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_inference_mode_and_no_grad_calls_share_a_plan():
    """Both disable grad (one signature): the workspace a call under inference_mode creates
    must still be writable by a later no_grad or grad-mode call, and the other way round."""
    x = torch.randn(8, 6)
    for first, second in ((torch.inference_mode, torch.no_grad),
                          (torch.no_grad, torch.inference_mode)):
        planned, full = twin_layers()
        for mode in (first, second, first):
            with mode():
                y = planned(x, training=True)
            assert torch.equal(y, _full_path(full, x, training=True))
        planned(x, training=True)
        _full_path(full, x, training=True)
        assert_same_state(planned, full)


# ---------------------------------------------------------------- copies


def test_copies_and_pickles_start_without_plans_and_update_their_own_buffers():
    layer = bn.BatchNorm(6)
    x = torch.randn(8, 6) + 2
    layer(x, training=True)
    layer(x, training=False)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.load(buffer, weights_only=False)
    for other in (copy.deepcopy(layer), loaded):
        before = layer.moving_mean.clone()
        other(x, training=True)
        assert torch.equal(layer.moving_mean, before)
        assert not torch.equal(other.moving_mean, before)


def test_a_layer_keeps_a_bounded_number_of_plans(monkeypatch):
    calls = count_prepares(monkeypatch)
    layer = bn.BatchNorm(6)
    shapes = [(n, 6) for n in range(2, 3 + plan.MAX_PLANS)]  # one more than it keeps
    for shape in shapes:
        layer(torch.randn(shape), training=True)
    assert len(layer._plans) <= plan.MAX_PLANS
    layer(torch.randn(shapes[-1]), training=True)  # the newest is kept
    assert calls[0] == len(shapes)


def test_the_prepared_update_keeps_the_tensors_it_writes_alive():
    """The numba loop writes through raw addresses: the update must own its tensors, or a
    state built for one call and dropped would leave it writing into freed memory."""
    import gc
    import weakref

    from batchnorm.functional import BatchNormConfig, BatchStatistics, initial_state
    from batchnorm.statistics import prepare_update

    state = initial_state(3)
    refs = [weakref.ref(t) for t in state[:3]]
    update = prepare_update(state, BatchNormConfig(momentum=0.5), torch.float32, 8)
    del state
    gc.collect()
    assert all(ref() is not None for ref in refs)
    # True, not tensor(True): the CPU's numba loop ran (the torch operations return a tensor)
    assert update.apply(BatchStatistics(torch.full((1, 3), 2.0), torch.full((1, 3), 4.0), 8),
                        None) is True
    mean, variance, count = (ref() for ref in refs)
    assert torch.equal(mean, torch.full((3,), 1.0)) and torch.equal(variance, torch.full((3,), 2.5))
    assert int(count) == 1


def test_a_parametrized_gamma_is_read_on_every_call():
    """torch.nn.utils.parametrize moves gamma out of the layer's parameters and computes it
    on each access: no plan may keep a computed gamma."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, gamma):
            return 2 * gamma

    layer = bn.BatchNorm(4)
    x = torch.randn(8, 4)
    for training in (True, False):
        layer(x, training=training)
    parametrize.register_parametrization(layer, "gamma", Double())
    for training in (True, False):
        with torch.no_grad():
            layer.parametrizations.gamma.original.fill_(1.5)
        first = layer(x, training=training)
        with torch.no_grad():
            layer.parametrizations.gamma.original.fill_(4.5)
        torch.testing.assert_close(layer(x, training=training), first * 3, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("memory", ["contiguous", "misread", "axis=-1"])
def test_inference_recorded_by_autograd_runs_atens_kernel_directly(monkeypatch, memory):
    """A frozen layer during fine-tuning (inference, grad enabled) takes the prepared call:
    no per-call dispatch through normalize_features, the same output and gradients as
    torch.nn's eval-mode layer (bit for bit: the same ATen kernel on the same values), and a
    buffer written before backward changes no gradient (the prepared call hands ATen copies).
    "misread": strides ATen's CPU backward misreads (aten_input's example), copied once;
    "axis=-1": features last, moved to dimension 1 by a view (torch.nn gets the same view)."""
    from batchnorm.kernels import inference

    axis = -1 if memory == "axis=-1" else 1
    layer = bn.BatchNorm(16, axis=axis, epsilon=1e-5)
    ref = nn.BatchNorm2d(16, momentum=None).eval()
    with torch.no_grad():
        for t in (layer.moving_mean, layer.gamma, layer.beta):
            t.normal_()
        layer.moving_variance.uniform_(0.5, 2.0)
        for mine, theirs in ((layer.moving_mean, ref.running_mean), (layer.gamma, ref.weight),
                             (layer.moving_variance, ref.running_var), (layer.beta, ref.bias)):
            theirs.copy_(mine)
    base = {"misread": torch.randn(8, 4, 16).transpose(1, 2).unsqueeze(-1),
            "contiguous": torch.randn(8, 16, 4, 1),
            "axis=-1": torch.randn(8, 4, 1, 16)}[memory]
    layer(base.clone().requires_grad_(), training=False)  # leaves the plan
    monkeypatch.setattr(inference, "normalize_features", None)  # the full path's dispatch
    x, x_ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    y = layer(x, training=False)
    y_ref = ref(x_ref.movedim(axis, 1)).movedim(1, axis)
    with torch.no_grad():
        layer.moving_variance.mul_(4.0)  # e.g. an EMA's write before backward
    grad = torch.randn_like(y_ref)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(layer.gamma.grad, ref.weight.grad)
    assert torch.equal(layer.beta.grad, ref.bias.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("updates", [0, 3])
def test_debiased_inference_runs_the_devices_loop(monkeypatch, dtype, grad, updates):
    """Debiased inference (debias=True) takes the prepared call on CPU: the debiased averages
    from the CPU kernel's loop, then ATen's kernel, bit for bit what inference_statistics'
    torch operations and ATen's kernel give (the loop does their arithmetic, operation by
    operation), before any update and after some; with autograd recording too, where the
    statistics are new tensors at each call (a buffer written before backward changes no
    gradient)."""
    from batchnorm.kernels import cpu, inference
    from batchnorm.statistics import inference_statistics

    if not cpu.available():
        pytest.skip("numba is unavailable")
    layer = bn.BatchNorm(8, debias=True, momentum=0.9, epsilon=1e-5).to(dtype)
    for _ in range(updates):
        layer(torch.randn(16, 8, dtype=dtype) * 3 + 2, training=True)
    x = torch.randn(16, 8, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        layer(x, training=False)  # leaves the plan
        monkeypatch.setattr(inference, "normalize_features", None)  # the full path's dispatch
        y = layer(x, training=False)
        state = layer.state()
        mean, variance = inference_statistics(state, momentum=0.9, epsilon=1e-5, debias=True)
        expected = torch.batch_norm(x, layer.gamma, layer.beta, mean.detach(),
                                    variance.detach(), False, 0.0, 1e-5, False)
    assert torch.equal(y, expected)
    if grad:
        with torch.no_grad():
            layer.moving_mean.add_(1.0)
        y.sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        torch.batch_norm(x_ref, layer.gamma.detach(), None, mean.detach(), variance.detach(),
                         False, 0.0, 1e-5, False).sum().backward()
        assert torch.equal(x.grad, x_ref.grad)
