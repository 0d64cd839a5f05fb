"""Specification of ``bn.accumulate`` and ``functional.combine_statistics``: gradient accumulation
moves the moving averages once per optimizer step, with the statistics of the concatenated
batch.

Tolerances: the statistics of a concatenation, pooled from its parts by the parallel-variance
formula, equal those computed on the concatenation in one pass up to the rounding of a few
operations: in float64 ``rtol=atol=1e-12``, far below any real difference (the one-update-per
micro-batch averages differ from them by 1e-2 and more in these tests).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import batchnorm as bn
from batchnorm import functional as F

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = {"rtol": 1e-12, "atol": 1e-12}


def close(actual, expected, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, **F64, msg=lambda m: f"{what}: {m}")


def same_buffers(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        if x.is_floating_point():
            close(x, y, name)
        else:
            assert torch.equal(x, y), f"{name}: {x} != {y}"


def data(sizes, sample=(3, 4), seed=0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 4.0], dtype=dtype).reshape(3, *[1] * (len(sample) - 1))
    return [torch.randn(n, *sample, generator=g, dtype=dtype) * scale + 3 for n in sizes]


# ------------------------------------------------------------------ combine_statistics


def stats_of(x: torch.Tensor, mask: torch.Tensor | None = None) -> F.BatchStatistics:
    """Statistics of ``x`` (N, C) in one pass, as a (1, C) BatchStatistics."""
    if mask is None:
        variance, mean = torch.var_mean(x, 0, correction=0)
        return F.BatchStatistics(mean[None], variance[None], x.shape[0])
    w = mask.to(x.dtype)
    n = w.sum(0)
    mean = (x * w).sum(0) / n.clamp_min(1)
    variance = ((x - mean).square() * w).sum(0) / n.clamp_min(1)
    return F.BatchStatistics(mean[None], variance[None], n[None])


def test_combined_statistics_are_those_of_the_concatenation_for_unequal_sizes():
    parts = [torch.randn(n, 5, dtype=torch.float64) * 3 + 7 for n in (1, 2, 13, 64)]
    pooled = stats_of(parts[0])
    for part in parts[1:]:
        pooled = F.combine_statistics(pooled, stats_of(part))
    whole = stats_of(torch.cat(parts))
    close(pooled.mean, whole.mean, "mean")
    close(pooled.variance, whole.variance, "variance")
    assert pooled.count == whole.count == 80


def test_combined_masked_statistics_weight_each_feature_by_its_count():
    parts = [torch.randn(n, 4, dtype=torch.float64) + 1 for n in (6, 9, 3)]
    masks = [torch.rand(n, 4) < 0.5 for n in (6, 9, 3)]
    masks[2][:] = False  # a part that selects nothing: its statistics (0) must not count
    masks[0][:, 0] = False
    pooled = stats_of(parts[0], masks[0])
    for part, mask in zip(parts[1:], masks[1:], strict=True):
        pooled = F.combine_statistics(pooled, stats_of(part, mask))
    whole = stats_of(torch.cat(parts), torch.cat(masks))
    close(pooled.mean, whole.mean, "mean")
    close(pooled.variance, whole.variance, "variance")
    close(pooled.count, whole.count, "count")


def test_a_side_with_no_value_contributes_nothing_even_if_not_finite():
    a = F.BatchStatistics(torch.full((1, 2), math.nan), torch.full((1, 2), math.nan),
                          torch.zeros(1, 2))
    b = F.BatchStatistics(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), 5)
    for combined in (F.combine_statistics(a, b), F.combine_statistics(b, a)):
        assert torch.equal(combined.mean, b.mean) and torch.equal(combined.variance, b.variance)
        assert torch.equal(combined.count, torch.full((1, 2), 5.0))


def test_combining_is_associative_to_rounding():
    s = [stats_of(torch.randn(n, 3, dtype=torch.float64) * k) for n, k in ((4, 1), (7, 5), (2, 9))]
    left = F.combine_statistics(F.combine_statistics(s[0], s[1]), s[2])
    right = F.combine_statistics(s[0], F.combine_statistics(s[1], s[2]))
    close(left.mean, right.mean, "mean")
    close(left.variance, right.variance, "variance")


def test_ghost_statistics_are_concatenated_groups():
    a = F.BatchStatistics(torch.zeros(2, 3), torch.ones(2, 3), 4)
    b = F.BatchStatistics(torch.ones(1, 3), torch.ones(1, 3), 4)
    combined = F.combine_statistics(a, b, ghost=True)
    assert combined.mean.shape == (3, 3) and combined.count == 4
    assert torch.equal(combined.mean[2], torch.ones(3))
    other = F.combine_statistics(a, b._replace(count=6), ghost=True)  # another spatial size
    assert torch.equal(other.count, torch.tensor([4.0, 4.0, 6.0])[:, None].expand(3, 3))


def test_statistics_that_cannot_be_combined_raise():
    a = F.BatchStatistics(torch.zeros(1, 3), torch.ones(1, 3), 4)
    with pytest.raises(ValueError, match="feature shapes"):
        F.combine_statistics(a, F.BatchStatistics(torch.zeros(1, 2), torch.ones(1, 2), 4))
    with pytest.raises(ValueError, match="ghost=True"):
        F.combine_statistics(a, F.BatchStatistics(torch.zeros(2, 3), torch.ones(2, 3), 4))


# ------------------------------------------------------------------ accumulate


def strided_groups(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` reordered so that consecutive ghost batches of ``size`` are its strided ones."""
    groups = x.shape[0] // size
    return torch.cat([x[g::groups] for g in range(groups)])


# name -> layer options, micro-batch sizes, how the micro-batches form the one big batch
MODES = {
    "plain": ({}, [5, 17, 10], None),
    "channels_last_unbiased_cumulative": (
        {"axis": -1, "num_features": 4, "unbiased_moving_variance": True, "momentum": None},
        [3, 9, 4], None),
    "renorm": ({"renorm": True, "renorm_momentum": 0.8,
                "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, [6, 2, 11], None),
    "masked": ({"unbiased_moving_variance": True}, [7, 4, 9], None),
    "ghost_consecutive": ({"virtual_batch_size": 4, "ghost_layout": "consecutive"},
                          [8, 4, 12], None),
    "ghost_strided": ({"virtual_batch_size": 4}, [8, 4, 12], strided_groups),
    "ghost_masked": ({"virtual_batch_size": 2, "ghost_layout": "consecutive"}, [4, 6, 2], None),
}


def make(options, **extra) -> bn.BatchNorm:
    options = {"momentum": 0.7, **options, **extra}
    num_features = options.pop("num_features", 3)
    return bn.BatchNorm(num_features, dtype=torch.float64, **options)


def masks_for(name: str, sizes, seed: int):
    if "masked" not in name:
        return [None] * len(sizes)
    g = torch.Generator().manual_seed(100 + seed)
    masks = [torch.rand(n, 1, 4, generator=g) < 0.6 for n in sizes]
    masks[1][:2] = False  # ghost_masked: an empty ghost batch; masked: fewer values
    return masks


@pytest.mark.parametrize("kernel", ["composite", "cpu"])
@pytest.mark.parametrize("name", sorted(MODES))
def test_one_accumulated_step_equals_one_update_with_the_concatenated_batch(name, kernel):
    options, sizes, regroup = MODES[name]
    size = options.get("virtual_batch_size")
    accumulated, big = make(options), make(
        options, **({"ghost_layout": "consecutive"} if regroup else {}))
    with bn.kernels.prefer(kernel):
        for step in range(3):
            parts, masks = data(sizes, seed=step), masks_for(name, sizes, step)
            with bn.accumulate(accumulated) as micro_batches:
                for part, mask in zip(parts, masks, strict=True):
                    accumulated(part, training=True, mask=mask)
                assert len(micro_batches) == len(parts)
                assert accumulated.num_updates.item() == step  # nothing moves in the block
            whole = [regroup(p, size) for p in parts] if regroup else parts
            mask = None if masks[0] is None else torch.cat(
                [regroup(m, size) for m in masks] if regroup else masks)
            big(torch.cat(whole), training=True, mask=mask)
            assert accumulated.num_updates.item() == step + 1
            same_buffers(accumulated, big)


def test_each_micro_batch_is_normalized_with_its_own_statistics():
    accumulated, eager = make({}), make({})
    parts = data([6, 10])
    with bn.accumulate(accumulated):
        outputs = [accumulated(p, training=True) for p in parts]
    for part, output in zip(parts, outputs, strict=True):
        assert torch.equal(output, eager(part, training=True))


def test_renorm_micro_batches_use_the_state_of_the_step_start():
    options = MODES["renorm"][0]
    accumulated, reference = make(options), make(options)
    reference(data([8], seed=9)[0], training=True)
    accumulated.load_state_dict(reference.state_dict())
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    parts = data([5, 7], seed=3)
    with bn.accumulate(accumulated):
        outputs = [accumulated(p, training=True) for p in parts]
    for part, output in zip(parts, outputs, strict=True):
        reference.load_state_dict(start)
        assert torch.equal(output, reference(part, training=True))


def test_torch_nn_drifts_on_the_loop_where_accumulate_matches_one_big_batch():
    """8 micro-batches of 32 per step, 100 steps, 16 features: torch.nn counts 800 batches and
    its running variance wanders away from that of one 256-sample batch per step; ours
    (with accumulate) equals it."""
    features, steps, micro, chunks = 16, 100, 32, 8
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.5, 4.0, features, dtype=torch.float64)
    ours, ours_big = (bn.BatchNorm(features, axis=-1, momentum=0.9, dtype=torch.float64,
                                   unbiased_moving_variance=True) for _ in range(2))
    nn_accumulated, nn_big = (torch.nn.BatchNorm1d(features, momentum=0.1,
                                                   dtype=torch.float64) for _ in range(2))
    for _ in range(steps):
        x = torch.randn(micro * chunks, features, generator=g, dtype=torch.float64) * scale + 1
        with bn.accumulate(ours):
            for part in x.split(micro):
                ours(part, training=True)
                nn_accumulated(part)
        ours_big(x, training=True)
        nn_big(x)
    same_buffers(ours, ours_big)
    assert ours.num_updates.item() == steps
    close(ours.moving_variance, nn_big.running_var, "ours and torch.nn on the big batch")
    assert nn_accumulated.num_batches_tracked.item() == chunks * steps
    drift = (nn_accumulated.running_var / nn_big.running_var - 1).abs()
    # Measured: 4.9% on average over the features, 10.5% at most (README "Training loops").
    print(f"torch.nn running_var drift: mean {drift.mean():.1%}, max {drift.max():.1%}")
    assert drift.mean() > 0.02 and drift.max() > 0.05


def test_layers_outside_the_model_update_at_once():
    inside, outside = make({}), make({})
    x = data([8])[0]
    with bn.accumulate(inside):
        outside(x, training=True)
        inside(x, training=True)
        assert outside.num_updates.item() == 1 and inside.num_updates.item() == 0
    assert inside.num_updates.item() == 1


def test_model_layers_are_found_at_any_depth():
    model = torch.nn.Sequential(torch.nn.Sequential(make({})), make({}))
    with bn.accumulate(model) as step:
        model.train()(data([8])[0])
        assert len(step) == 2
    assert all(m.num_updates.item() == 1 for m in model.modules() if isinstance(m, bn.BatchNorm))


def test_an_exception_or_discard_leaves_every_buffer_unchanged():
    layer = make({})
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(KeyError):
        with bn.accumulate(layer):
            layer(data([8])[0], training=True)
            raise KeyError("step failed")
    with bn.accumulate(layer) as step:
        layer(data([8])[0], training=True)
        assert step.discard() == 1
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_inference_calls_record_nothing_and_an_empty_block_changes_nothing():
    layer = make({})
    with bn.accumulate(layer) as step:
        layer(data([8])[0], training=False)
        assert len(step) == 0
    assert layer.num_updates.item() == 0


def test_statistics_shows_the_pooled_micro_batches():
    layer = make({})
    parts = data([4, 6])
    with bn.accumulate(layer) as step:
        for part in parts:
            layer(part, training=True)
        (stats,) = step.statistics().values()
    mean, variance = F.moments(torch.cat(parts), axes=[0, 2])
    close(stats.mean[0], mean, "mean")
    close(stats.variance[0], variance, "variance")
    assert stats.count == 40
    assert "micro_batches=0" in repr(step)


def test_a_non_finite_micro_batch_skips_the_step_with_a_warning():
    layer = make({})
    parts = data([4, 6])
    parts[1][0, 0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="not finite"):
        with bn.accumulate(layer):
            for part in parts:
                layer(part, training=True)
    assert layer.num_updates.item() == 0


def test_accumulate_takes_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with bn.accumulate([make({})]):
            pass


@pytest.mark.parametrize("model, match", [
    (lambda: torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)),
     r"no bn\.BatchNorm layer.*'1' \(BatchNorm1d\).*bn\.convert\(model\)"),
    (lambda: torch.nn.Linear(3, 3), r"no bn\.BatchNorm layer.*bn\.convert"),
])
def test_a_model_without_batchnorm_layers_warns_that_the_block_changes_nothing(model, match):
    with pytest.warns(RuntimeWarning, match=match):
        with bn.accumulate(model()):
            pass


# ------------------------------------------------------------------ nesting


def test_an_enclosing_deferred_block_holds_the_step_update():
    layer, big = make({}), make({})
    parts = data([4, 6])
    with bn.deferred_updates() as updates:
        with bn.accumulate(layer):
            for part in parts:
                layer(part, training=True)
        assert len(updates) == 1 and layer.num_updates.item() == 0
        updates.apply()
    big(torch.cat(parts), training=True)
    same_buffers(layer, big)
    with pytest.warns(RuntimeWarning, match="neither applied nor discarded"):
        with bn.deferred_updates():  # not applied: discarded
            with bn.accumulate(layer):
                layer(parts[0], training=True)
    assert layer.num_updates.item() == 1


def test_deferred_calls_applied_inside_accumulate_join_the_step():
    layer, big = make({}), make({})
    parts = data([4, 6, 5])
    with bn.accumulate(layer):
        layer(parts[0], training=True)
        with pytest.warns(RuntimeWarning, match="neither applied nor discarded"):
            with bn.deferred_updates() as updates:
                layer(parts[1], training=True)
                assert updates.apply() == 1
                layer(parts[2], training=True)  # SAM's second pass, say: left out
        assert layer.num_updates.item() == 0
    big(torch.cat(parts[:2]), training=True)
    same_buffers(layer, big)


def test_nested_accumulate_blocks_update_once_at_the_outer_end():
    layer, big = make({}), make({})
    parts = data([4, 6, 5, 3])
    with bn.accumulate(layer):
        layer(parts[0], training=True)
        with bn.accumulate(layer):
            layer(parts[1], training=True)
            layer(parts[2], training=True)
        layer(parts[3], training=True)
        assert layer.num_updates.item() == 0
    big(torch.cat(parts), training=True)
    same_buffers(layer, big)


# ------------------------------------------------------------------ torch.compile


def test_compiled_model_accumulates_like_eager_in_one_graph():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, dtype=torch.float64),
                                make({"axis": -1}))
    eager = torch.nn.Sequential(torch.nn.Linear(3, 3, dtype=torch.float64), make({"axis": -1}))
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for step in range(3):
        parts = torch.randn(24, 3, dtype=torch.float64).split(6)
        for net, call in ((model, compiled), (eager, eager)):
            with bn.accumulate(net):
                for part in parts:
                    call(part).square().sum().backward()
        assert model[1].num_updates.item() == step + 1
    same_buffers(model, eager)
    assert len(graphs) == 1  # every micro-batch of every step ran the same graph


def test_compiled_model_accumulates_with_aot_autograd():
    torch.manual_seed(0)
    model, eager = make({"axis": -1}), make({"axis": -1})
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    parts = torch.randn(20, 3, dtype=torch.float64).split([8, 12])
    for net, call in ((model, compiled), (eager, eager)):
        with bn.accumulate(net):
            for part in parts:
                call(part.requires_grad_(), training=True).square().sum().backward()
    same_buffers(model, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(parts[0], training=True)  # outside the block: updates at once
    assert model.num_updates.item() == 2
