"""Specification of ``bn.deferred_updates``: record, apply in call order, discard on exit (with
a warning for updates left pending); blocks are per thread and per asyncio task, and work
under ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import asyncio
import math
import threading
import warnings

import pytest
import torch

import batchnorm as bn
from batchnorm.updates import active_recorder

# A block another thread or task leaves with its updates pending, by design of the test.
DROPPED_UPDATES = pytest.mark.filterwarnings(
    r"ignore:1 moving-statistics update\(s\) recorded in this deferred_updates\(\) block "
    "were neither applied nor discarded:RuntimeWarning")
# torch.compile's notice that deferred_updates' global forward hook fires for the wrapper too.
COMPILE_WITH_GLOBAL_HOOKS = pytest.mark.filterwarnings(
    r"ignore:Using `torch.compile\(module\)` when there are global hooks on modules:UserWarning")


def make_layer(**kwargs) -> bn.BatchNorm:
    return bn.BatchNorm(3, axis=-1, momentum=0.9, **kwargs)


def batch(seed: int, scale: float = 2.0, shift: float = 1.0) -> torch.Tensor:
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(seed)) * scale + shift


def buffers(layer: bn.BatchNorm) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in layer.named_buffers()}


def assert_same_buffers(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_untouched(layer: bn.BatchNorm) -> None:
    assert layer.num_updates.item() == 0
    assert torch.equal(layer.moving_mean, torch.zeros(3))
    assert torch.equal(layer.moving_variance, torch.ones(3))


def test_training_call_inside_block_records_and_leaves_buffers_untouched():
    layer = make_layer()
    with bn.deferred_updates() as updates:
        layer(batch(0), training=True)
        assert len(updates) == 1
        assert_untouched(layer)
        updates.discard()


def test_training_output_inside_block_equals_eager_output():
    eager, deferred = make_layer(), make_layer()
    expected = eager(batch(1), training=True)
    with bn.deferred_updates() as updates:
        assert torch.equal(deferred(batch(1), training=True), expected)
        updates.discard()


def test_apply_applies_recorded_updates_like_eager_calls():
    eager, deferred = make_layer(), make_layer()
    eager(batch(2), training=True)
    with bn.deferred_updates() as updates:
        deferred(batch(2), training=True)
        assert updates.apply() == 1
        assert len(updates) == 0
    assert_same_buffers(buffers(deferred), buffers(eager))
    assert deferred.num_updates.item() == 1


def test_two_calls_of_one_layer_equal_two_eager_calls_in_order():
    eager, deferred, reversed_order = make_layer(), make_layer(), make_layer()
    first, second = batch(3, 1.0, -2.0), batch(4, 5.0, 3.0)
    eager(first, training=True)
    eager(second, training=True)
    reversed_order(second, training=True)
    reversed_order(first, training=True)
    with bn.deferred_updates() as updates:
        deferred(first, training=True)
        deferred(second, training=True)
        assert_untouched(deferred)
        assert updates.apply() == 2
    assert_same_buffers(buffers(deferred), buffers(eager))
    assert deferred.num_updates.item() == 2
    # The order is observable: applying in the other order would give other averages.
    assert not torch.equal(deferred.moving_variance, reversed_order.moving_variance)


def test_apply_updates_every_recorded_layer():
    first, second = make_layer(), make_layer()
    model = torch.nn.Sequential(first, torch.nn.Linear(3, 3), second)
    with bn.deferred_updates() as updates:
        model.train()(batch(5))
        assert len(updates) == 2
        updates.apply()
    assert first.num_updates.item() == 1 and second.num_updates.item() == 1


def test_leaving_block_without_apply_discards_updates_with_a_warning():
    layer = make_layer()
    with pytest.warns(RuntimeWarning, match=r"2 moving-statistics update\(s\) .* neither "
                                            r"applied nor discarded.*updates\.apply\(\).*"
                                            r"updates\.discard\(\)") as caught:
        with bn.deferred_updates() as updates:
            layer(batch(6), training=True)
            layer(batch(7), training=True)
    assert len(caught) == 1
    assert caught[0].filename == __file__  # points at the user's block, not the library
    assert len(updates) == 0
    assert_untouched(layer)


def test_explicit_discard_leaves_the_block_silently():
    layer = make_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bn.deferred_updates() as updates:
            layer(batch(6), training=True)
            assert updates.discard() == 1
    assert_untouched(layer)


def test_block_with_nothing_pending_leaves_silently():
    layer = make_layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bn.deferred_updates() as updates:
            layer(batch(6), training=True)
            updates.apply()
        with bn.deferred_updates():
            layer(batch(6), training=False)
    assert layer.num_updates.item() == 1


def test_apply_after_exit_raises_runtime_error_and_changes_nothing():
    layer = make_layer()
    with bn.deferred_updates() as updates:
        layer(batch(8), training=True)
        updates.discard()
    with pytest.raises(RuntimeError, match="exited"):
        updates.apply()
    assert_untouched(layer)


def test_exception_inside_block_discards_updates_silently_and_closes_it():
    layer = make_layer()
    with pytest.raises(KeyError), warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed step's updates are dropped on purpose
        with bn.deferred_updates():
            layer(batch(9), training=True)
            raise KeyError("boom")
    assert_untouched(layer)
    assert active_recorder() is None
    layer(batch(9), training=True)
    assert layer.num_updates.item() == 1


def test_calls_after_the_block_update_eagerly():
    layer = make_layer()
    with bn.deferred_updates():
        pass
    assert active_recorder() is None
    layer(batch(10), training=True)
    assert layer.num_updates.item() == 1


def test_nested_blocks_record_in_the_innermost():
    layer = make_layer()
    with bn.deferred_updates() as outer:
        layer(batch(11), training=True)
        with bn.deferred_updates() as inner:
            layer(batch(12), training=True)
            layer(batch(13), training=True)
            assert len(inner) == 2 and len(outer) == 1
            inner.discard()
        assert len(outer) == 1
        assert_untouched(layer)
        outer.discard()


def test_nested_inner_exit_discards_only_inner_updates():
    eager, layer = make_layer(), make_layer()
    eager(batch(14), training=True)
    eager(batch(16), training=True)
    with bn.deferred_updates() as outer:
        layer(batch(14), training=True)
        with pytest.warns(RuntimeWarning, match="1 moving-statistics update"):
            with bn.deferred_updates():
                layer(batch(15), training=True)
        layer(batch(16), training=True)
        assert outer.apply() == 2
    assert_same_buffers(buffers(layer), buffers(eager))


def test_nested_inner_apply_updates_immediately():
    layer = make_layer()
    with bn.deferred_updates() as outer:
        with bn.deferred_updates() as inner:
            layer(batch(17), training=True)
            inner.apply()
        assert layer.num_updates.item() == 1
        assert len(outer) == 0


def test_inference_calls_record_nothing():
    layer = make_layer()
    with bn.deferred_updates() as updates:
        layer(batch(18), training=False)
        layer.eval()(batch(18))
        assert len(updates) == 0
        assert updates.apply() == 0
    assert_untouched(layer)


def test_frozen_layer_records_nothing():
    layer = make_layer()
    layer.trainable = False
    with bn.deferred_updates() as updates:
        layer(batch(19), training=True)
        assert len(updates) == 0
    assert_untouched(layer)


def test_second_apply_applies_only_new_records():
    layer = make_layer()
    with bn.deferred_updates() as updates:
        layer(batch(20), training=True)
        assert updates.apply() == 1
        assert updates.apply() == 0
        assert layer.num_updates.item() == 1
        layer(batch(21), training=True)
        assert updates.apply() == 1
    assert layer.num_updates.item() == 2


def test_discard_drops_pending_updates():
    layer = make_layer()
    with bn.deferred_updates() as updates:
        layer(batch(22), training=True)
        assert updates.discard() == 1
        assert updates.apply() == 0
    assert_untouched(layer)


def test_recorded_statistics_do_not_keep_the_graph():
    layer = make_layer()
    x = batch(23).requires_grad_()
    with bn.deferred_updates() as updates:
        y = layer(x, training=True)
        y.sum().backward()
        assert x.grad is not None
        updates.apply()
    assert not layer.moving_mean.requires_grad and not layer.moving_variance.requires_grad


def test_lazy_layer_builds_inside_block_but_does_not_update():
    layer = bn.BatchNorm(axis=-1, momentum=0.9)
    with bn.deferred_updates() as updates:
        layer(batch(24), training=True)
        assert layer.num_features == (3,)
        assert_untouched(layer)
        updates.apply()
    assert layer.num_updates.item() == 1


def test_non_finite_deferred_update_is_skipped_at_apply_with_warning():
    layer = make_layer()
    x = batch(25)
    x[0, 0] = math.nan
    with bn.deferred_updates() as updates:
        layer(x, training=True)
        with pytest.warns(RuntimeWarning, match="not finite"):
            updates.apply()
    assert_untouched(layer)


# ---------------------------------------------------------------- torch.nn batch norms


def torch_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))


def test_a_block_that_recorded_nothing_while_a_torch_nn_batch_norm_trained_warns():
    model = torch_model()
    with pytest.warns(RuntimeWarning, match=r"BatchNorm1d.*updated at once.*bn\.convert"):
        with bn.deferred_updates():
            model(batch(0))
    assert model[1].num_batches_tracked.item() == 1  # the update the warning tells of


@pytest.mark.parametrize("how", ["eval", "no running statistics", "converted", "mixed"])
def test_a_block_without_torch_nn_batch_norm_updates_does_not_warn_of_them(how):
    model = torch_model()
    if how == "eval":
        model.eval()
    elif how == "no running statistics":
        model[1] = torch.nn.BatchNorm1d(3, track_running_stats=False)
    elif how == "converted":
        model = bn.convert(model)
    else:  # a bn.BatchNorm records: the torch.nn layer beside it is the model's choice
        model.append(make_layer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bn.deferred_updates() as updates:
            model(batch(0))
            updates.discard()


def test_a_torch_nn_batch_norm_in_another_thread_is_not_noted_by_this_block():
    model = torch_model()
    ran = threading.Event()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with bn.deferred_updates():
            thread = threading.Thread(target=lambda: (model(batch(0)), ran.set()))
            thread.start()
            thread.join()
    assert ran.is_set()


def test_the_global_hook_is_removed_when_the_last_block_closes():
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    before = len(hooks)
    with bn.deferred_updates():
        with bn.deferred_updates():
            assert len(hooks) == before + 1  # one hook for all the open blocks
    assert len(hooks) == before


# ---------------------------------------------------------------- threads, tasks, torch.compile


@DROPPED_UPDATES
def test_a_block_in_one_thread_does_not_capture_another_threads_calls():
    layer, other = make_layer(), make_layer()
    opened, done = threading.Event(), threading.Event()
    seen = {}

    def hold_a_block():
        with bn.deferred_updates() as updates:
            layer(batch(30), training=True)
            opened.set()
            done.wait(timeout=30)
            seen["pending"] = len(updates)

    thread = threading.Thread(target=hold_a_block)
    thread.start()
    assert opened.wait(timeout=30)
    other(batch(31), training=True)  # this thread is in no block: applied at once
    assert other.num_updates.item() == 1
    assert active_recorder() is None
    done.set()
    thread.join(timeout=30)
    assert seen["pending"] == 1  # its own call only
    assert_untouched(layer)


def test_two_threads_accumulate_their_own_steps():
    layers = [make_layer(), make_layer()]
    references = [make_layer(), make_layer()]
    barrier = threading.Barrier(2, timeout=30)
    errors = []

    def train(i):
        try:
            with bn.accumulate(layers[i]):
                for step in range(3):
                    layers[i](batch(40 + 10 * i + step), training=True)
                    barrier.wait()  # interleave the two threads' calls
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=train, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    for i in range(2):
        references[i](torch.cat([batch(40 + 10 * i + step) for step in range(3)]),
                      training=True)
        assert layers[i].num_updates.item() == 1
        torch.testing.assert_close(layers[i].moving_variance, references[i].moving_variance,
                                   rtol=1e-6, atol=1e-6)  # float32, pooled vs one pass


@DROPPED_UPDATES
def test_asyncio_tasks_have_their_own_blocks():
    layer, other = make_layer(), make_layer()

    async def hold(opened: asyncio.Event, release: asyncio.Event) -> int:
        with bn.deferred_updates() as updates:
            layer(batch(50), training=True)
            opened.set()
            await release.wait()  # another task runs while this block is open
            return len(updates)

    async def main() -> int:
        opened, release = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(hold(opened, release))
        await opened.wait()
        other(batch(51), training=True)
        release.set()
        return await task

    assert asyncio.run(main()) == 1
    assert other.num_updates.item() == 1
    assert_untouched(layer)


def graph_counter():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


@COMPILE_WITH_GLOBAL_HOOKS
def test_compiled_layer_records_inside_a_block_and_updates_outside_fullgraph():
    graphs, backend = graph_counter()
    layer = make_layer()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with bn.deferred_updates() as updates:
        compiled(batch(60), training=True)
        compiled(batch(61), training=True)
        assert len(updates) == 2
        assert_untouched(layer)
        updates.apply()
    assert layer.num_updates.item() == 2
    compiled(batch(62), training=True)
    assert layer.num_updates.item() == 3
    assert len(graphs) == 2  # one inside a block (both calls), one outside


@COMPILE_WITH_GLOBAL_HOOKS
def test_a_compiled_first_call_recorded_in_a_block_feeds_the_variance_of_an_eager_call():
    # tf_keras's default rule, decided for the input inside the compiled graph (rank 4, one
    # channel axis: the Bessel-corrected variance), travels with the recorded statistics.
    x = torch.randn(4, 3, 3, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    eager, compiled_layer, biased = (
        bn.BatchNorm(5, axis=-1, momentum=0.5, unbiased_moving_variance=rule)
        for rule in (None, None, False))
    compiled = torch.compile(compiled_layer, backend="eager", fullgraph=True)
    with bn.deferred_updates() as updates:
        compiled(x, training=True)
        updates.apply()
    with bn.accumulate(torch.nn.Sequential(compiled_layer)):
        compiled(x, training=True)
    for layer in (eager, biased):
        layer(x, training=True)
        with bn.accumulate(torch.nn.Sequential(layer)):
            layer(x, training=True)
    # float32 statistics of 36 values from two kernels (ATen's eager, the composite traced):
    # an ulp or two apart; the biased variance is 1/35 (3%) away.
    torch.testing.assert_close(compiled_layer.moving_variance, eager.moving_variance,
                               rtol=1e-6, atol=0)
    assert not torch.allclose(eager.moving_variance, biased.moving_variance, rtol=1e-3)


@COMPILE_WITH_GLOBAL_HOOKS
def test_compiled_calls_of_another_thread_are_not_captured():
    # A recompile budget of its own: fullgraph=True fails at dynamo's recompile limit, which
    # counts the compilations of BatchNorm.forward by the tests run before this one.
    torch._dynamo.reset()
    graphs, backend = graph_counter()
    layer = make_layer()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    compiled(batch(70), training=True)
    opened, done = threading.Event(), threading.Event()

    def hold_a_block():
        with bn.deferred_updates():
            opened.set()
            done.wait(timeout=30)

    thread = threading.Thread(target=hold_a_block)
    thread.start()
    assert opened.wait(timeout=30)
    compiled(batch(71), training=True)
    done.set()
    thread.join(timeout=30)
    assert layer.num_updates.item() == 2


def test_a_task_started_inside_a_block_that_has_closed_updates_at_once():
    layer = make_layer()

    async def train_later(release: asyncio.Event) -> None:
        await release.wait()
        layer(batch(80), training=True)  # its context still lists the closed block

    async def main() -> None:
        release = asyncio.Event()
        with bn.deferred_updates():
            task = asyncio.create_task(train_later(release))
        release.set()
        await task

    asyncio.run(main())
    assert layer.num_updates.item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"unbiased_moving_variance": True},
                                     {"momentum": 0.2, "renorm_momentum": 0.3},
                                     {"momentum": None}],
                         ids=["tf", "unbiased", "fast-averages", "cumulative"])
def test_the_cpu_renorm_update_loop_equals_update_state_bit_for_bit(dtype, options):
    """A renorm state's update on CPU is one numba loop (the prepared update's; ``True``, a
    bool, says it ran): the same five averages and count as update_state's torch operations,
    bit for bit (the loop rounds each operation as they do, the lerps as ATen's); a batch
    whose statistics are not finite leaves all of them unchanged."""
    from batchnorm.functional import BatchNormConfig, BatchStatistics, initial_state
    from batchnorm.kernels import cpu
    from batchnorm.statistics import prepare_update, update_state

    if not cpu.available():
        pytest.skip("numba is unavailable")
    config = BatchNormConfig(renorm=True, epsilon=1e-3, **options)
    state = initial_state(5, dtype=dtype, renorm=True)
    expected = state._replace(**{f: t.clone() for f, t in state._asdict().items()
                                 if t is not None})
    update = prepare_update(state, config, dtype, 16)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        mean = torch.randn(1, 5, generator=generator, dtype=dtype) * 3
        variance = torch.rand(1, 5, generator=generator, dtype=dtype) * 4
        if step == 2:
            variance[0, 1] = math.inf
        stats = BatchStatistics(mean, variance, 16)
        assert update.apply(stats, None) is (step != 2)
        expected = update_state(expected, stats, momentum=config.momentum,
                                epsilon=config.epsilon,
                                unbiased_moving_variance=config.unbiased_moving_variance,
                                renorm_momentum=config.renorm_momentum)
        for field, value in expected._asdict().items():
            if value is not None:
                assert torch.equal(getattr(state, field), value), (step, field)
    assert int(state.num_updates) == 4
