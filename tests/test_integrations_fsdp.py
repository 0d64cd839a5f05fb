"""Specification of ``bn.BatchNorm`` inside FSDP2 (``torch.distributed.fsdp.fully_shard``)
units with a bfloat16 ``MixedPrecisionPolicy``: no integration is needed, and none may be.

Two gloo processes on a CPU mesh train a model whose synchronized ``bn.BatchNorm`` layers
live in ``fully_shard`` units (parameters in bfloat16, gradients reduced in float32), three
optimizer steps of four micro-batches inside ``bn.accumulate``. Every rank must end with
three updates and float32 moving statistics; the first layer's, which see the inputs as
FSDP2 casts them, must equal one unsharded process's run on the concatenated global batch
rounded to bfloat16 (1e-6: float32 statistics of the same bfloat16 values).
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import batchnorm as bn

fsdp = pytest.importorskip("torch.distributed.fsdp")

from integration_steps import (  # noqa: E402
    FEATURES,
    LAYER,
    MICRO,
    STEPS,
    WORLD,
    check_against_reference,
    rank_batches,
    reference,
)
from test_distributed import end_worker, free_port, spawn_workers  # noqa: E402

HIDDEN = 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        bn.BatchNorm(FEATURES, synchronized=True, **LAYER),
        torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN),
                            bn.BatchNorm(HIDDEN, synchronized=True, **LAYER)),
        torch.nn.Linear(HIDDEN, 1))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (WORLD,))
        policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                           reduce_dtype=torch.float32)
        model = _model()
        for unit in (model[0], model[1], model):  # batch norms in units of their own and not
            fsdp.fully_shard(unit, mesh=mesh, mp_policy=policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batches = rank_batches(rank)
        for step in range(STEPS):
            with bn.accumulate(model):
                for micro in range(MICRO):
                    model.set_requires_gradient_sync(micro == MICRO - 1)
                    model(batches[step * MICRO + micro]).float().square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        result = {"first": model[0].state_dict(), "inner": model[1][1].state_dict()}
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    end_worker()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    results, problem = spawn_workers(_worker, (free_port(), str(out)), WORLD, out, 120)
    for result in results:
        assert result and "error" not in result, result.get("error", problem)
    return results


@pytest.mark.slow
def test_layers_in_bfloat16_units_match_the_unsharded_run_on_rounded_inputs(sharded):
    expected = reference(torch.float32, round_to=torch.bfloat16)
    for rank, result in enumerate(sharded):
        check_against_reference(result["first"], expected, torch.float32, f"rank {rank}")


@pytest.mark.slow
def test_layers_after_bfloat16_layers_keep_float32_statistics_equal_on_every_rank(sharded):
    first, second = (result["inner"] for result in sharded)
    for name in ("moving_mean", "moving_variance"):
        assert first[name].dtype == torch.float32, name
        assert torch.equal(first[name], second[name]), name  # synchronized: the same values
    assert first["num_updates"].item() == second["num_updates"].item() == STEPS
