"""Specification of training loops under ``DistributedDataParallel``: two forward passes before one
backward (GAN-style), with ``broadcast_buffers`` on (DDP's default) and off, with local and
synchronized layers, and a frozen layer (inference with gradients) in the same model; and
gradient accumulation with synchronized statistics.

Two gloo processes on 127.0.0.1, spawned once (about 10-20 s, mostly importing torch). Each
rank records its moving statistics after every step; the tests compare them with what the
README ("Training loops") says each combination gives, recomputed here in one process.
Tolerance ``rtol=atol=1e-10`` in float64: the same updates, computed in other processes from
statistics combined across processes (parallel-variance formula) or pooled over
micro-batches, instead of one pass over the concatenated batch.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import end_worker, free_port, spawn_workers
from torch import nn

import batchnorm as bn

TOL = {"rtol": 1e-10, "atol": 1e-10}
STEPS = 2
FEATURES = 4
WORLD = 2
SIZES = {"first": [5, 3], "second": [4, 6]}  # per rank, of the two forward passes of a step
MICRO = [[3, 5], [2, 6]]  # per rank, the micro-batches of an accumulated step
COMBINATIONS = [(layers, broadcast) for layers in ("local", "synchronized")
                for broadcast in (True, False)]


def _layer(*, synchronized: bool = False) -> bn.BatchNorm:
    return bn.BatchNorm(FEATURES, axis=-1, momentum=0.5, synchronized=synchronized,
                        dtype=torch.float64)


def _model(synchronized: bool) -> nn.Sequential:
    torch.manual_seed(0)
    frozen = bn.BatchNorm(FEATURES, axis=-1, trainable=False, dtype=torch.float64)
    return nn.Sequential(_layer(synchronized=synchronized),
                         nn.Linear(FEATURES, FEATURES, dtype=torch.float64), frozen)


def _batch(step: int, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's whole batch (every rank's part) of one forward pass, and its output gradient."""
    g = torch.Generator().manual_seed(10 * step + len(which))
    total = sum(SIZES[which])
    x = torch.randn(total, FEATURES, generator=g, dtype=torch.float64) * 2 + 1
    return x, torch.randn(total, FEATURES, generator=g, dtype=torch.float64)


def _part(t: torch.Tensor, which: str, rank: int) -> torch.Tensor:
    return t.split(SIZES[which])[rank]


def _micro(step: int) -> list[list[torch.Tensor]]:
    """Per rank, the micro-batches of an accumulated step."""
    g = torch.Generator().manual_seed(100 + step)
    return [[torch.randn(n, FEATURES, generator=g, dtype=torch.float64) * 3 - 1 for n in sizes]
            for sizes in MICRO]


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's buffers (its moving statistics)."""
    return {k: v.clone() for k, v in layer.named_buffers()}


# ---------------------------------------------------------------- the spawned processes


def _two_forwards(rank: int, layers: str, broadcast: bool) -> dict:
    model = _model(layers == "synchronized")
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record: dict = {"states": [], "grads": []}
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = 0
        for which in ("first", "second"):
            x, dy = _batch(step, which)
            loss = loss + (ddp(_part(x, which, rank)) * _part(dy, which, rank)).sum()
        loss.backward()
        record["grads"].append(model[1].weight.grad.clone())
        optimizer.step()
        record["states"].append(_state(model[0]))
    record["frozen"] = _state(model[2])
    return record


def _accumulated(rank: int) -> dict:
    layer = _layer(synchronized=True)
    states = []
    for step in range(STEPS):
        with bn.accumulate(layer):
            for part in _micro(step)[rank]:
                layer(part.requires_grad_(), training=True).square().sum().backward()
        states.append(_state(layer))
    return {"states": states}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    results: dict = {}
    for layers, broadcast in COMBINATIONS:
        try:
            results[layers, broadcast] = _two_forwards(rank, layers, broadcast)
        except Exception:
            results[layers, broadcast] = {"error": traceback.format_exc()}
    try:
        results["accumulate"] = _accumulated(rank)
    except Exception:
        results["accumulate"] = {"error": traceback.format_exc()}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    end_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_loops")
    results, problem = spawn_workers(_worker, (free_port(), str(out)), WORLD, out, 120)
    for rank, result in enumerate(results):
        if not result:
            pytest.fail(f"rank {rank} of the DDP processes saved no results: {problem}")
    return results


def _results(ranks, key) -> list[dict]:
    found = [r[key] for r in ranks]
    for rank, result in enumerate(found):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
    return found


def _check(state: dict, expected: dict, what: str) -> None:
    for key, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(state[key], value, **TOL,
                                       msg=lambda m, k=key: f"{what}, {k}: {m}")
        else:
            assert torch.equal(state[key], value), f"{what}, {key}: {state[key]} != {value}"


# ---------------------------------------------------------------- what each combination gives


def _local_trajectories() -> list[list[dict]]:
    """Per rank, per step, the state of a layer trained on that rank's parts only, and rank 0's
    state after the first forward pass of each step."""
    out = []
    for rank in range(WORLD):
        layer, states = _layer(), []
        for step in range(STEPS):
            for which in ("first", "second"):
                layer(_part(_batch(step, which)[0], which, rank), training=True)
                if which == "first":
                    states.append({"after_first": _state(layer)})
            states[-1]["end"] = _state(layer)
        out.append(states)
    return out


@pytest.mark.parametrize(("layers", "broadcast"), COMBINATIONS)
def test_two_forwards_before_backward_run_without_error(ranks, layers, broadcast):
    records = _results(ranks, (layers, broadcast))
    for step in range(STEPS):  # DDP averaged the gradients: every rank has the same
        torch.testing.assert_close(records[0]["grads"][step], records[1]["grads"][step], **TOL)
    for rank, record in enumerate(records):  # the frozen layer never moves
        _check(record["frozen"], _state(_model(False)[2]), f"frozen layer of rank {rank}")


@pytest.mark.parametrize("broadcast", [True, False])
def test_synchronized_layers_hold_the_global_batch_statistics_on_every_rank(ranks, broadcast):
    reference = _layer()
    for step in range(STEPS):
        for which in ("first", "second"):
            reference(_batch(step, which)[0], training=True)
        for rank, record in enumerate(_results(ranks, ("synchronized", broadcast))):
            _check(record["states"][step], _state(reference), f"rank {rank}, step {step}")


def test_local_layers_without_broadcast_follow_their_own_rank(ranks):
    local = _local_trajectories()
    for rank, record in enumerate(_results(ranks, ("local", False))):
        for step in range(STEPS):
            _check(record["states"][step], local[rank][step]["end"], f"rank {rank}, step {step}")


def test_local_layers_with_broadcast_take_rank_0_before_each_forward(ranks):
    """DDP copies rank 0's buffers to every rank before each forward pass: rank 0 follows its
    own batches; another rank ends a step with rank 0's state after the first forward pass,
    updated with its own second part (what it computed from its first part is overwritten)."""
    local = _local_trajectories()
    records = _results(ranks, ("local", True))
    for step in range(STEPS):
        _check(records[0]["states"][step], local[0][step]["end"], f"rank 0, step {step}")
        expected = _layer()
        expected.load_state_dict(local[0][step]["after_first"], strict=False)
        expected(_part(_batch(step, "second")[0], "second", 1), training=True)
        _check(records[1]["states"][step], _state(expected), f"rank 1, step {step}")


def test_accumulated_synchronized_step_equals_one_update_with_every_micro_batch(ranks):
    reference = _layer()
    for step in range(STEPS):
        reference(torch.cat([m for parts in _micro(step) for m in parts]), training=True)
        for rank, record in enumerate(_results(ranks, "accumulate")):
            _check(record["states"][step], _state(reference), f"rank {rank}, step {step}")
            assert record["states"][step]["num_updates"].item() == step + 1
