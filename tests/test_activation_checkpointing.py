"""Specification of activation checkpointing (``torch.utils.checkpoint``): the recomputation in
backward never updates the moving averages a second time, and normalizes exactly as the
original forward did (renorm's r and d, an empty masked ghost batch: the state before the
original call's update).

Each test trains the same float64 model with and without checkpointing and compares moving
statistics and gradients. Tolerance ``rtol=atol=1e-12``: the recomputed forward is the same
computation on the same values, but ``use_reentrant=True`` runs backward through the
segment separately and sums a parameter's gradient contributions in another order (gamma
reaches the renorm output twice), a difference of a few ulps that the optimizer then
carries into the next steps' statistics; the bugs these tests catch are differences of 1e-3
and more (shown by turning the fix off).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import batchnorm as bn
from batchnorm import recompute

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*use_reentrant.*")]

TOL = {"rtol": 1e-12, "atol": 1e-12}
STEPS = 3
FEATURES = 6

MODES = {
    "plain": {},
    "renorm": {"renorm": True, "renorm_momentum": 0.5,
               "renorm_clipping": {"rmin": 0.8, "rmax": 1.25, "dmax": 0.2}},
    "ghost_masked_empty_group": {"virtual_batch_size": 4, "ghost_layout": "consecutive"},
    "renorm_ghost_masked": {"renorm": True, "renorm_momentum": 0.5, "virtual_batch_size": 4,
                            "ghost_layout": "consecutive"},
}


def model_for(mode: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, FEATURES, dtype=torch.float64),
        bn.BatchNorm(FEATURES, axis=-1, momentum=0.5, dtype=torch.float64, **MODES[mode]),
        torch.nn.Tanh(), torch.nn.Linear(FEATURES, 1, dtype=torch.float64))


def batches(mode: str):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(16, 4, generator=g, dtype=torch.float64) * 2 + 1
        mask = None
        if "masked" in mode:
            mask = torch.rand(16, 1, generator=g) < 0.7
            mask[4:8] = False  # the second ghost batch selects nothing
        yield x.requires_grad_(), mask


def train(mode: str, use_reentrant: bool | None, kernel: str = "composite"):
    """Per step: the gradients; at the end: the state. ``use_reentrant=None``: no checkpoint."""
    model = model_for(mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    with bn.kernels.prefer(kernel):
        for x, mask in batches(mode):

            def segment(x, mask=mask):
                return model[3](model[2](model[1](model[0](x), mask=mask)))

            y = segment(x) if use_reentrant is None else checkpoint(
                segment, x, use_reentrant=use_reentrant)
            optimizer.zero_grad()
            y.square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
    return grads, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_training(result, expected) -> None:
    (grads, state), (expected_grads, expected_state) = result, expected
    for step, (got, want) in enumerate(zip(grads, expected_grads, strict=True)):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, s=step, i=i:
                                       f"gradient {i}, step {s}: {m}")
    for key, value in expected_state.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(state[key], value), f"{key}: {state[key]} != {value}"


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_torch_nn_counts_two_batches_per_checkpointed_step(use_reentrant):
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm1d(3)
    for _ in range(STEPS):
        x = torch.randn(8, 3, requires_grad=True)
        checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()
    assert layer.num_batches_tracked.item() == 2 * STEPS  # torch.nn: twice per step


@pytest.mark.parametrize("kernel", ["composite", "cpu"])
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_checkpointed_training_equals_training_without_checkpoint(mode, use_reentrant, kernel):
    expected = train(mode, None, kernel)
    result = train(mode, use_reentrant, kernel)
    assert result[1]["1.num_updates"].item() == STEPS  # one update per step, not two
    assert_same_training(result, expected)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_without_the_fix_the_recomputation_would_update_twice_and_renormalize_wrongly(
        use_reentrant, monkeypatch):
    """The comparison above is sensitive: without the recomputation's detection the averages
    move twice per step, and without the original state renorm's gradients differ."""
    expected = train("renorm", None)
    monkeypatch.setattr(recompute, "original_state", lambda layer, stats, state: state)
    grads, _ = train("renorm", use_reentrant)
    assert max((g - w).abs().max() for g, w in zip(grads[-1], expected[0][-1],
                                                    strict=True)) > 1e-3
    monkeypatch.setattr(recompute, "in_backward", lambda: False)
    _, state = train("renorm", use_reentrant)
    assert state["1.num_updates"].item() == 2 * STEPS


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_recomputation_inside_accumulate_records_each_micro_batch_once(use_reentrant):
    layer = bn.BatchNorm(3, axis=-1, renorm=True, dtype=torch.float64)
    parts = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (5, 7)]
    with bn.accumulate(layer) as step:
        for part in parts:
            checkpoint(layer, part, use_reentrant=use_reentrant).square().sum().backward()
        assert len(step) == 2
    assert layer.num_updates.item() == 1


def test_recomputation_after_the_accumulate_block_uses_the_state_of_its_step():
    """Micro-batches whose backward runs after the block (one loss summed over them) are
    recomputed after the step's update: they still normalize with the state of the step."""
    options = {"axis": -1, "renorm": True, "renorm_momentum": 0.5, "dtype": torch.float64}
    plain, checkpointed = bn.BatchNorm(3, **options), bn.BatchNorm(3, **options)
    parts = [torch.randn(n, 3, dtype=torch.float64) * 3 + 2 for n in (5, 7)]
    losses = {}
    for name, layer in (("plain", plain), ("checkpointed", checkpointed)):
        inputs = [p.clone().requires_grad_() for p in parts]
        with bn.accumulate(layer):
            outputs = [layer(x) if name == "plain" else checkpoint(layer, x, use_reentrant=False)
                       for x in inputs]
        sum(y.square().sum() for y in outputs).backward()
        losses[name] = [x.grad for x in inputs]
    for got, want in zip(losses["checkpointed"], losses["plain"], strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_a_recomputation_is_a_forward_inside_backward_with_gradients_enabled():
    assert not recompute.in_backward()
    seen = []

    def hook(grad):
        seen.append(recompute.in_backward())  # backward runs without gradients
        with torch.enable_grad():  # as both checkpoint implementations recompute
            seen.append(recompute.in_backward())

    y = torch.randn(3, requires_grad=True) * 2
    y.register_hook(hook)
    y.sum().backward()
    assert seen == [False, True]


def test_compiled_checkpoint_recomputes_without_a_second_update():
    """torch.compile traces the checkpoint and recomputes inside the compiled backward, which
    holds no update: one update per step."""
    torch.manual_seed(0)
    model = model_for("renorm")
    compiled = torch.compile(lambda x: checkpoint(model, x, use_reentrant=False),
                             backend="aot_eager")
    for step in range(2):
        compiled(torch.randn(16, 4, dtype=torch.float64, requires_grad=True)).sum().backward()
        assert model[1].num_updates.item() == step + 1


RENORM_CLIPPED = {"axis": -1, "renorm": True, "renorm_momentum": 0.5, "dtype": torch.float64,
                  "renorm_clipping": {"rmax": 1.25, "dmax": 0.2}}


def two_calls(seed: int, checkpointed: tuple[int, ...], use_reentrant: bool, after=None):
    """Two training calls of one renorm layer on two batches and one backward through both,
    the calls whose index is in ``checkpointed`` under ``checkpoint``; ``after(layer, i)``
    runs after call ``i``. Returns the layer and the gradients of both inputs, gamma and
    beta."""
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(8, 3, generator=g, dtype=torch.float64) * s + s).requires_grad_()
          for s in (1, 3)]
    layer = bn.BatchNorm(3, **RENORM_CLIPPED)
    ys = []
    for i, x in enumerate(xs):
        ys.append(checkpoint(layer, x, use_reentrant=use_reentrant) if i in checkpointed
                  else layer(x))
        if after is not None:
            after(layer, i)
    (ys[0].square().sum() + (ys[1] * 3).sin().sum()).backward()
    return layer, [*(x.grad for x in xs), layer.gamma.grad, layer.beta.grad]


def assert_same_gradients(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_layer_called_twice_before_backward_recomputes_each_call_with_its_own_state(
        use_reentrant):
    """A GAN's discriminator on real and on fake data, one backward: two updates happened
    before the recomputations, each of which must find the state of its own call."""
    plain, want = two_calls(2, (), use_reentrant)
    checkpointed, got = two_calls(2, (0, 1), use_reentrant)
    assert plain.num_updates.item() == 2 and checkpointed.num_updates.item() == 2
    assert_same_gradients(got, want)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_only_calls_that_may_be_recomputed_keep_the_state_they_read(use_reentrant):
    """A call that keeps its own activations keeps nothing for a recomputation (nothing runs it
    again); a checkpointed call of the same layer after it keeps its state and recomputes with
    it, so the gradients equal those of two plain calls."""
    def kept(checkpointed):
        def after(layer, i):  # only the checkpointed second call keeps the state it read
            assert (recompute._KEPT.get(layer) is not None) == (i == 1 and checkpointed)
        return after
    _, want = two_calls(3, (), use_reentrant, kept(False))
    _, got = two_calls(3, (1,), use_reentrant, kept(True))
    assert_same_gradients(got, want)


def test_a_training_call_without_gradients_or_under_saved_tensor_hooks_may_be_recomputed():
    assert not recompute.may_recompute()
    with torch.no_grad():
        assert recompute.may_recompute()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert recompute.may_recompute()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_a_checkpointed_call_whose_update_a_deferred_block_applies_keeps_its_state(
        use_reentrant):
    """Inside :func:`bn.deferred_updates`, the update of a checkpointed renorm call is applied
    later, outside the checkpoint: the state it read is still kept, so the recomputation in
    backward normalizes as the call did (gradients equal to the unchecked call's)."""
    torch.manual_seed(0)
    base = bn.BatchNorm(6, renorm=True, momentum=0.5, renorm_momentum=0.5,
                        dtype=torch.float64)
    x = torch.randn(16, 6, dtype=torch.float64) * 3 + 2
    w = torch.randn(16, 6, dtype=torch.float64)
    grads = []
    for checkpointed in (False, True):
        layer, xg = copy.deepcopy(base), x.clone().requires_grad_()
        with bn.deferred_updates() as updates:
            y = checkpoint(layer, xg, use_reentrant=use_reentrant) if checkpointed else layer(xg)
            updates.apply()  # the update before backward
        (y * w).sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], **TOL)
