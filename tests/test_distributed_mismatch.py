"""Synchronized processes that disagree on what they synchronize.

Two gloo processes call a synchronized layer with different feature counts, with
different dtypes whose packed statistics have the same byte count (6 float32
features against 3 float64: gloo would exchange them and each process would read
the other's bytes as its own dtype), or with a mask on one process only. Every
process must raise a ``ValueError`` naming each process's values, at once (well
within the group's timeout), with its layer's parameters and buffers
bit-identical; the group must stay usable, so a matching call afterwards gives
the statistics of the concatenated batch. A global batch of one value per feature (one
sample on one process, none on the other) raises the single-process ``ValueError`` on
every process, in the same way. One spawn runs every case in order and
saves each process's results after each case; the tests below read them.
"""

from __future__ import annotations

import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import end_worker, free_port, spawn_workers

import batchnorm as bn
from batchnorm.kernels.synchronized import global_moments

TIMEOUT = 5.0  # seconds, the group's timeout: a mismatch must be reported well before it
SPAWN_LIMIT = 90.0  # seconds for both processes, start-up included

# name -> per rank: (layer features, dtype, input shape, mask?)
CASES = {
    "feature_count": [(6, torch.float32, (4, 6), False), (3, torch.float32, (5, 3), False)],
    "dtype_equal_bytes": [(6, torch.float32, (4, 6), False), (3, torch.float64, (5, 3), False)],
    "mask_on_one_rank": [(4, torch.float64, (3, 4, 6), True), (4, torch.float64, (2, 4, 6), False)],
}
MATCH = [(4, torch.float64, (3, 4, 6), False), (4, torch.float64, (2, 4, 6), False)]
# A global batch of one value per feature: one sample on rank 0, none on rank 1.
ONE_VALUE = [(4, torch.float64, (1, 4), False), (4, torch.float64, (0, 4), False)]
# What each case's message must name, besides "rank 0" and "rank 1".
EXPECTED = {
    "feature_count": ["feature shape differs", "6 features (statistics of shape (1, 6))",
                      "3 features (statistics of shape (1, 3))", "float32"],
    "dtype_equal_bytes": ["feature shape, dtype differ", "6 features", "in float32",
                          "3 features", "in float64"],
    "mask_on_one_rank": ["mask differs", "with a mask", "without a mask", "all-True mask"],
    "mode": ["mode differs", "mode 'renorm'"],
}


def _data(case: tuple, seed: int):
    features, dtype, shape, masked = case
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5).to(dtype)
    mask = None
    if masked:
        mask = torch.rand((shape[0], shape[-1]), generator=g) < 0.6
    return x, mask


def _layer(case: tuple) -> bn.BatchNorm:
    return bn.BatchNorm(case[0], dtype=case[1], synchronized=True)


# ---------------------------------------------------------------- the spawned processes


def _train_step(case: tuple, rank: int) -> dict:
    """One training step of a fresh layer; the exception it raised, if any, and its state."""
    layer = _layer(case)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x, mask = _data(case, seed=rank)
    x.requires_grad_()
    start = time.monotonic()
    record: dict = {"error": None}
    try:
        layer(x, training=True, mask=mask).square().sum().backward()
    except Exception as error:
        record["error"] = (type(error).__name__, str(error))
    record["seconds"] = time.monotonic() - start
    after = layer.state_dict()
    record["changed"] = sorted(k for k, v in before.items() if not torch.equal(v, after[k]))
    record["state"] = {k: v.clone() for k, v in after.items()}
    return record


def _mode_mismatch(rank: int) -> dict:
    """global_moments called directly, with a different mode on rank 0."""
    mean, variance = torch.zeros(1, 4), torch.ones(1, 4)
    start = time.monotonic()
    try:
        global_moments(mean, variance, 3, dist.group.WORLD, mode="renorm" if rank == 0 else "")
        error = None
    except Exception as raised:
        error = (type(raised).__name__, str(raised))
    return {"error": error, "seconds": time.monotonic() - start, "changed": []}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=TIMEOUT))
    # The first masked call imports torch._refs (torch.broadcast_shapes, about 1 s): pay it
    # here, so that the timings below are those of the synchronization.
    bn.BatchNorm(4)(torch.randn(3, 4, 6), training=True, mask=torch.ones(3, 6, dtype=torch.bool))
    results: dict = {}
    steps = [(name, lambda cases=cases: _train_step(cases[rank], rank))
             for name, cases in CASES.items()]
    steps += [("mode", lambda: _mode_mismatch(rank)),
              ("one_value", lambda: _train_step(ONE_VALUE[rank], rank)),
              ("match", lambda: _train_step(MATCH[rank], rank))]
    for name, step in steps:
        try:
            results[name] = step()
        except Exception:
            results[name] = {"crashed": traceback.format_exc()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")  # what a crash leaves behind
    end_worker()


# ---------------------------------------------------------------- the parent


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("mismatch")
    results, problem = spawn_workers(_worker, (free_port(), str(out)), 2, out, SPAWN_LIMIT)
    for result in results:
        result["problem"] = problem
    return results


def _case(spawned, name: str) -> list[dict]:
    records = []
    for rank, results in enumerate(spawned):
        assert name in results, (
            f"rank {rank} left no result for {name!r}: {results['problem']}")
        assert "crashed" not in results[name], results[name]["crashed"]
        records.append(results[name])
    return records


@pytest.mark.parametrize("name", [*CASES, "mode"])
def test_every_rank_raises_naming_the_mismatch_with_its_state_unchanged(spawned, name):
    for rank, record in enumerate(_case(spawned, name)):
        assert record["error"] is not None, f"rank {rank} returned from a mismatched call"
        kind, message = record["error"]
        assert kind == "ValueError", f"rank {rank}: {kind}: {message}"
        for expected in ["rank 0 has", "rank 1 has", *EXPECTED[name]]:
            assert expected in message, f"rank {rank}: {expected!r} not in {message!r}"
        assert record["seconds"] < TIMEOUT / 2, f"rank {rank} took {record['seconds']:.1f} s"
        assert record["changed"] == [], f"rank {rank} changed {record['changed']}"


def test_both_ranks_report_the_same_message(spawned):
    for name in [*CASES, "mode"]:
        first, second = (record["error"] for record in _case(spawned, name))
        assert first == second


@pytest.mark.filterwarnings(  # the one-process reference call: no process group there
    r"ignore:BatchNorm\(synchronized=True\). torch.distributed is not initialized:RuntimeWarning")
def test_a_global_batch_of_one_value_per_feature_raises_on_every_rank_as_in_one_process(
        spawned):
    with pytest.raises(ValueError) as single:  # what one process raises for that batch
        _layer(ONE_VALUE[0])(_data(ONE_VALUE[0], seed=0)[0], training=True)
    records = _case(spawned, "one_value")
    for rank, record in enumerate(records):
        assert record["error"] is not None, f"rank {rank} returned from a one-value batch"
        kind, message = record["error"]
        assert kind == type(single.value).__name__, f"rank {rank}: {kind}: {message}"
        assert str(single.value).split(",")[0] in message  # "... more than one value ..."
        assert "rank 0: 1, rank 1: 0" in message
        assert record["seconds"] < TIMEOUT / 2, f"rank {rank} took {record['seconds']:.1f} s"
        assert record["changed"] == [], f"rank {rank} changed {record['changed']}"
    assert records[0]["error"] == records[1]["error"]


def test_a_matching_call_after_the_mismatches_synchronizes(spawned):
    records = _case(spawned, "match")
    for rank, record in enumerate(records):
        assert record["error"] is None, f"rank {rank}: {record['error']}"
        assert "moving_mean" in record["changed"] and "moving_variance" in record["changed"]
    # The statistics are those of the concatenated batch, identical on both ranks.
    reference = bn.BatchNorm(MATCH[0][0], dtype=MATCH[0][1])
    x = torch.cat([_data(case, seed=rank)[0] for rank, case in enumerate(MATCH)])
    reference(x, training=True)
    for rank, record in enumerate(records):
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(record["state"][key], value, rtol=1e-10, atol=1e-10,
                                       msg=lambda m, key=key, rank=rank: f"{key}, rank {rank}: {m}")


# ---------------------------------------------------------------- one process


def test_one_process_group_with_one_value_per_feature_raises_before_any_collective(
        monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    with pytest.raises(ValueError, match="more than one value per feature.*rank 0: 1"):
        global_moments(torch.zeros(1, 3), torch.zeros(1, 3), 1, None)


def test_mode_must_be_a_string():
    with pytest.raises(TypeError, match="mode must be a str"):
        global_moments(torch.zeros(1, 3), torch.ones(1, 3), 2, None, mode=1)


def test_the_message_names_a_process_of_another_protocol_and_long_shapes():
    from batchnorm.kernels import synchronized as sync_kernel

    ours = sync_kernel._header(torch.zeros(1, 2, 1, 1, 1, 1, 1), 3, "")
    other_version = [ours[0] + 1, *ours[1:]]
    not_a_header = [0] * len(ours)
    message = str(sync_kernel._mismatch([ours, other_version, not_a_header], None))
    assert "(protocol differs)" in message
    assert "rank 0 has 2 features (statistics of shape 7 dimensions (hash 0x" in message
    assert f"rank 1 has batchnorm synchronization protocol version {ours[0] % 65536 + 1}" in message
    assert "rank 2 has no batchnorm synchronization header" in message
