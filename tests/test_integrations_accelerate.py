"""Specification of the accelerate integration (``batchnorm.integrations.accelerate``):
``AccumulateStatistics`` beside ``accelerator.accumulate(model)``.

The recipe of ``docs/scaling-out.md``, run as written by two gloo processes (started by the
test as ``accelerate launch --cpu`` would) with ``gradient_accumulation_steps=4``, must leave every
rank with one update per optimizer step and the moving statistics of one process's run on
the concatenated global batch (``integration_steps``: 1e-12 in float64).
"""

from __future__ import annotations

import os
import re
import traceback
from pathlib import Path

import pytest
import torch

import batchnorm as bn

accelerate = pytest.importorskip("accelerate")

from integration_steps import (  # noqa: E402
    FEATURES,
    LAYER,
    MICRO,
    PER_RANK,
    STEPS,
    WORLD,
    check_against_reference,
    micro_batch,
    reference,
)
from test_distributed import end_worker, free_port, spawn_workers  # noqa: E402

from batchnorm.integrations.accelerate import AccumulateStatistics  # noqa: E402

DOCS = Path(__file__).parents[1] / "docs" / "scaling-out.md"


def recipe() -> str:
    """The accelerate recipe of the docs: the first Python block after its marker."""
    text = DOCS.read_text().split("<!-- accelerate-recipe -->", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      ACCELERATE_USE_CPU="true")  # what `accelerate launch --cpu` sets
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(bn.BatchNorm(FEATURES, **LAYER),
                                    torch.nn.Linear(FEATURES, 1)).double()
        # Every global micro-batch in order: accelerate deals batches of PER_RANK samples to
        # the ranks in turn, so rank r gets slice r of each global micro-batch.
        inputs = torch.cat([micro_batch(step, micro, torch.float64)
                            for step in range(STEPS) for micro in range(MICRO)])
        dataset = torch.utils.data.TensorDataset(inputs, torch.zeros(len(inputs), 1,
                                                                     dtype=torch.float64))
        scope = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     dataloader=torch.utils.data.DataLoader(dataset, batch_size=PER_RANK),
                     loss_fn=torch.nn.functional.mse_loss)
        exec(recipe(), scope)
        result = {"state": scope["model"].module[0].state_dict(),
                  "processes": scope["accelerator"].num_processes}
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    end_worker(group_usable=torch.distributed.is_initialized())


@pytest.mark.slow
def test_docs_recipe_on_two_processes_updates_once_per_step_with_global_statistics(tmp_path):
    results, problem = spawn_workers(_worker, (free_port(), str(tmp_path)), WORLD, tmp_path, 120)
    expected = reference(torch.float64)
    for rank, result in enumerate(results):
        assert result and "error" not in result, result.get("error", problem)
        assert result["processes"] == WORLD
        check_against_reference(result["state"], expected, torch.float64, f"rank {rank}")


@pytest.fixture
def accelerator():
    """A one-process Accelerator accumulating 2 micro-batches (accelerate's state is
    process-wide: reset after the test)."""
    yield accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def test_a_step_updates_once_with_its_pooled_micro_batches(accelerator):
    model = torch.nn.Sequential(bn.BatchNorm(FEATURES, **LAYER))
    expected = bn.BatchNorm(FEATURES, **LAYER)
    statistics = AccumulateStatistics(accelerator, model)
    batches = [micro_batch(0, micro) for micro in range(4)]
    for x in batches:
        with accelerator.accumulate(model), statistics:
            model(x)
    for step in range(2):  # the definition: one call on each step's concatenated batch
        expected(torch.cat(batches[2 * step:2 * step + 2]), training=True)
    assert model[0].num_updates.item() == 2
    for name in ("moving_mean", "moving_variance"):  # float32, pooled against one pass: 1e-6
        torch.testing.assert_close(model[0].state_dict()[name], expected.state_dict()[name],
                                   rtol=1e-6, atol=1e-6)


def test_a_micro_batch_that_raises_drops_its_step(accelerator):
    model = torch.nn.Sequential(bn.BatchNorm(FEATURES, **LAYER))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    statistics = AccumulateStatistics(accelerator, model)
    with accelerator.accumulate(model), statistics:
        model(micro_batch(0, 0))
    with pytest.raises(RuntimeError, match="a failed micro-batch"):
        with accelerator.accumulate(model), statistics:
            model(micro_batch(0, 1))
            raise RuntimeError("a failed micro-batch")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_needs_an_accelerator():
    with pytest.raises(TypeError, match="accelerate.Accelerator, got Module"):
        AccumulateStatistics(torch.nn.Module(), torch.nn.Module())
