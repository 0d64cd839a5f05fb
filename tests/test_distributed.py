"""Specification of synchronized statistics (``BatchNorm(synchronized=True)``, ``convert_sync``).

Two and three gloo processes on 127.0.0.1 each normalize a slice of a batch;
their outputs, input/gamma/beta gradients and moving statistics must equal
those of one unsynchronized layer on the concatenated batch: within
``rtol=atol=1e-10`` in float64 and ``1e-5`` in float32. Spawning is slow (each
process imports torch), so one spawn per world size runs every scenario and
saves its results; the tests below compare them. The failure cases (a process
that stops calling the layer, one that dies) run last in those spawns, on a
group with a 2-second timeout.
"""

from __future__ import annotations

import socket
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm as bn
from batchnorm.apps.bench_distributed import end_worker
from batchnorm.kernels import synchronized as sync_kernel

TOLERANCE = {torch.float64: {"rtol": 1e-10, "atol": 1e-10},
             torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
FAILURE_TIMEOUT = 2.0  # seconds, the short-timeout group of the failure cases
STEPS = 2

def _adjustment(shape):
    """A fixed per-feature scale and shift (channels-last, 4 features)."""
    return (torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=torch.float64),
            torch.tensor([0.1, -0.1, 0.0, 0.2], dtype=torch.float64))


# name -> layer options, per-sample shape, dtype, mask, per-rank batch sizes by world size.
SCENARIOS = {
    "plain_float64": dict(layer={}, sample=(4, 3, 2), dtype=torch.float64,
                          sizes={2: [3, 5], 3: [3, 1, 4]}),
    "plain_float32": dict(layer={}, sample=(4, 3, 2), dtype=torch.float32,
                          sizes={2: [4, 4], 3: [2, 3, 3]}),
    "zero_sample_rank": dict(layer={}, sample=(4, 3, 2), dtype=torch.float64,
                             sizes={2: [0, 5], 3: [4, 0, 3]}),
    "one_sample_ranks": dict(layer={"unbiased_moving_variance": True}, sample=(3,),
                             dtype=torch.float64, sizes={2: [1, 1], 3: [1, 1, 1]}),
    "mask": dict(layer={"unbiased_moving_variance": True}, sample=(4, 6), dtype=torch.float64,
                 mask=True, sizes={2: [3, 2], 3: [3, 1, 0]}),
    "renorm": dict(layer={"renorm": True, "momentum": 0.5, "renorm_momentum": 0.5,
                          "renorm_clipping": {"rmin": 0.8, "rmax": 1.25, "dmax": 0.3}},
                   sample=(4, 3, 2), dtype=torch.float64, sizes={2: [3, 5], 3: [3, 1, 4]}),
    "channels_last_cumulative_adjusted": dict(
        layer={"axis": -1, "momentum": None, "adjustment": _adjustment}, sample=(5, 4),
        dtype=torch.float64, sizes={2: [2, 3], 3: [2, 3, 1]}),
    "several_axes": dict(layer={"num_features": (4, 2), "axis": (1, 3)}, sample=(4, 3, 2),
                         dtype=torch.float64, sizes={2: [3, 2], 3: [1, 2, 3]}),
    "ghost_within_rank": dict(layer={"virtual_batch_size": 2, "ghost_layout": "consecutive"},
                              sample=(4, 3), dtype=torch.float64,
                              sizes={2: [2, 4], 3: [2, 0, 4]}),
}


# ---------------------------------------------------------------- shared by parent and children


def _layer(spec, *, synchronized: bool, process_group=None) -> bn.BatchNorm:
    options = dict(spec["layer"])
    # tf_keras never fuses a synchronized layer (the biased variance feeds moving_variance):
    # the unsynchronized reference is given the same rule.
    options.setdefault("unbiased_moving_variance", False)
    num_features = options.pop("num_features", spec["sample"][0] if "axis" not in options
                               else spec["sample"][-1])
    return bn.BatchNorm(num_features, synchronized=synchronized, process_group=process_group,
                        dtype=spec["dtype"], **options)


def _data(name: str, spec, total: int, step: int):
    """The full batch of one step: input, upstream gradient, mask (or None)."""
    seed = sum(map(ord, name)) * 100 + step
    g = torch.Generator().manual_seed(seed)
    shape = (total, *spec["sample"])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = None
    if spec.get("mask"):
        mask = torch.rand((total, spec["sample"][-1]), generator=g) < 0.6
    return x.to(spec["dtype"]), dy.to(spec["dtype"]), mask


def _slices(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def _run(layer: bn.BatchNorm, name: str, spec, total: int, part: slice) -> dict:
    """Train ``layer`` for STEPS steps on ``part`` of each full batch; record everything."""
    record: dict = {"steps": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty ghost batch leaves the averages unchanged
        for step in range(STEPS):
            x, dy, mask = _data(name, spec, total, step)
            x = x[part].clone().requires_grad_()
            layer.zero_grad()
            y = layer(x, training=True, mask=None if mask is None else mask[part])
            (y * dy[part]).sum().backward()
            record["steps"].append({"y": y.detach(), "dx": x.grad, "dgamma": layer.gamma.grad,
                                    "dbeta": layer.beta.grad})
    record["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    return record


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), bn.BatchNorm(4), nn.ReLU(),
        nn.Conv2d(4, 2, 1), bn.BatchNorm(2, renorm=True, momentum=0.5), nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    ).double()


def _ddp_data(sizes, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    total = sum(sizes)
    return (torch.randn(total, 3, 4, 4, generator=g, dtype=torch.float64),
            torch.randn(total, 3, generator=g, dtype=torch.float64))


DDP_SIZES = {2: [2, 5], 3: [3, 1, 4]}


# ---------------------------------------------------------------- the spawned processes


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    results: dict = {}

    def attempt(key, fn):
        try:
            results[key] = fn()
        except Exception:
            results[key] = {"error": traceback.format_exc()}

    for name, spec in SCENARIOS.items():
        sizes = spec["sizes"][world]
        layer = _layer(spec, synchronized=True)
        attempt(name, lambda layer=layer, spec=spec, sizes=sizes, name=name: _run(
            layer, name, spec, sum(sizes), _slices(sizes)[rank]))

    def ddp_training():
        sizes = DDP_SIZES[world]
        model = nn.parallel.DistributedDataParallel(bn.convert_sync(_model()))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            x, dy = _ddp_data(sizes, step)
            part = _slices(sizes)[rank]
            optimizer.zero_grad()
            (model(x[part]) * dy[part]).sum().backward()
            optimizer.step()
        return {k: v.clone() for k, v in model.module.state_dict().items()}

    attempt("ddp", ddp_training)

    # A subgroup: ranks 0 and the last synchronize among themselves only.
    members = [0, world - 1]
    subgroup = dist.new_group(members)
    if rank in members:
        spec = SCENARIOS["plain_float64"]
        sizes = [spec["sizes"][world][r] for r in members]
        layer = _layer(spec, synchronized=True, process_group=subgroup)
        attempt("subgroup", lambda: _run(layer, "plain_float64", spec, sum(sizes),
                                         _slices(sizes)[members.index(rank)]))

    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()  # the short group connects within its timeout: arrive together
    short = dist.new_group(list(range(world)), timeout=timedelta(seconds=FAILURE_TIMEOUT))
    if world == 2:
        _stops_calling(rank, short, out)
    else:
        _dies(rank, short, out)
    end_worker(group_usable=False)  # a rank failed on purpose: no barrier, no teardown


def _fail_to_synchronize(group) -> dict:
    layer = bn.BatchNorm(3, synchronized=True, process_group=group)
    start = time.monotonic()
    try:
        layer(torch.randn(4, 3), training=True)
    except RuntimeError as error:
        return {"raised": str(error), "seconds": time.monotonic() - start}
    return {"raised": None, "seconds": time.monotonic() - start}


def _stops_calling(rank: int, group, out: Path) -> None:
    """Rank 1 stays alive but never calls the layer; rank 0 must not wait forever."""
    if rank == 0:
        layer = bn.BatchNorm(3, synchronized=True, process_group=group)
        start = time.monotonic()
        layer(torch.randn(4, 3), training=False)  # inference is local: no collective
        inference_seconds = time.monotonic() - start
        result = _fail_to_synchronize(group)
        result["inference_seconds"] = inference_seconds
        torch.save(result, out / "failure0.pt")
    else:
        deadline = time.monotonic() + 60
        while not (out / "failure0.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def _dies(rank: int, group, out: Path) -> None:
    """The last rank exits before calling the layer; the others must raise."""
    if rank == dist.get_world_size() - 1:
        end_worker(group_usable=False)
    torch.save(_fail_to_synchronize(group), out / f"failure{rank}.pt")


# ---------------------------------------------------------------- the parent


def free_port() -> int:
    """A TCP port free on this host now, for a process group's rendezvous (the other
    multi-process test files use it too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(worker, args: tuple, nprocs: int, out: Path, limit: float
                  ) -> tuple[list[dict], str | None]:
    """Run ``worker(rank, *args)`` in ``nprocs`` spawned processes for at most ``limit``
    seconds; return each rank's saved results (``out / f"rank{rank}.pt"``, ``{}`` when a
    rank saved none) and what went wrong with the processes (None when nothing did: every
    one exited with code 0 in time). The results decide: a test fails on a missing or failed
    result, naming the problem, not on an exit code alone."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + limit
    problem = None
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                problem = f"the {nprocs} processes did not finish within {limit} s"
                break
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as error:
        problem = str(error)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results = [torch.load(out / f"rank{r}.pt") if (out / f"rank{r}.pt").exists() else {}
               for r in range(nprocs)]
    return results, problem


def _spawn(world: int, out: Path, limit: float = 240.0) -> list[dict]:
    results, problem = spawn_workers(_worker, (world, free_port(), str(out)), world, out,
                                     limit)
    for rank, result in enumerate(results):
        if not result:
            pytest.fail(f"rank {rank} of {world} saved no results: {problem}")
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> dict[int, tuple[list[dict], Path]]:
    runs = {}
    for world in (2, 3):
        out = tmp_path_factory.mktemp(f"world{world}")
        runs[world] = (_spawn(world, out), out)
    return runs


def _reference(name: str, sizes) -> dict:
    spec = SCENARIOS[name]
    return _run(_layer(spec, synchronized=False), name, spec, sum(sizes), slice(None))


def _check(value, expected, dtype, what: str) -> None:
    torch.testing.assert_close(value, expected, **TOLERANCE[dtype], msg=lambda m: f"{what}: {m}")


def _results(spawned, world: int, key: str, ranks=None) -> list[dict]:
    results = [r[key] for i, r in enumerate(spawned[world][0]) if ranks is None or i in ranks]
    for result in results:
        assert "error" not in result, result.get("error")
    return results


def _check_equal_to_concatenated(records, reference, dtype, *, check_state: bool = True):
    for step, expected in enumerate(reference["steps"]):
        steps = [r["steps"][step] for r in records]
        _check(torch.cat([s["y"] for s in steps]), expected["y"], dtype, f"output, step {step}")
        _check(torch.cat([s["dx"] for s in steps]), expected["dx"], dtype,
               f"input gradient, step {step}")
        # Each process holds the gradient of its own outputs; DDP sums (averages) them.
        for key in ("dgamma", "dbeta"):
            _check(sum(s[key] for s in steps), expected[key], dtype, f"{key}, step {step}")
    if check_state:
        for rank, record in enumerate(records):
            for key, value in reference["state"].items():
                _check(record["state"][key], value, dtype, f"{key} of rank {rank}")


WORLDS = pytest.mark.parametrize("world", [2, 3])


@WORLDS
@pytest.mark.parametrize("name", ["plain_float64", "plain_float32", "renorm",
                                  "channels_last_cumulative_adjusted", "several_axes"])
def test_synchronized_equals_single_process_on_the_concatenated_batch(spawned, world, name):
    sizes = SCENARIOS[name]["sizes"][world]
    _check_equal_to_concatenated(_results(spawned, world, name), _reference(name, sizes),
                                 SCENARIOS[name]["dtype"])


@WORLDS
def test_a_rank_with_zero_samples_takes_part_and_gets_the_global_statistics(spawned, world):
    sizes = SCENARIOS["zero_sample_rank"]["sizes"][world]
    records = _results(spawned, world, "zero_sample_rank")
    assert records[sizes.index(0)]["steps"][0]["y"].shape[0] == 0
    _check_equal_to_concatenated(records, _reference("zero_sample_rank", sizes), torch.float64)


@WORLDS
def test_one_sample_per_rank_is_enough_when_the_global_batch_has_more(spawned, world):
    sizes = SCENARIOS["one_sample_ranks"]["sizes"][world]
    _check_equal_to_concatenated(_results(spawned, world, "one_sample_ranks"),
                                 _reference("one_sample_ranks", sizes), torch.float64)


@WORLDS
def test_masked_statistics_use_the_global_masked_count(spawned, world):
    sizes = SCENARIOS["mask"]["sizes"][world]
    _check_equal_to_concatenated(_results(spawned, world, "mask"), _reference("mask", sizes),
                                 torch.float64)


@WORLDS
def test_ghost_batches_stay_within_each_rank(spawned, world):
    name = "ghost_within_rank"
    spec, sizes = SCENARIOS[name], SCENARIOS[name]["sizes"][world]
    records = _results(spawned, world, name)
    # Consecutive ghost batches within each rank are those of the concatenated batch...
    _check_equal_to_concatenated(records, _reference(name, sizes), torch.float64,
                                 check_state=False)
    # ...and each rank's moving averages follow its own ghost batches only.
    for rank, (record, part) in enumerate(zip(records, _slices(sizes), strict=True)):
        local = _layer(spec, synchronized=False)
        if sizes[rank]:
            local = _run(local, name, spec, sum(sizes), part)["state"]
        else:
            local = local.state_dict()
        for key, value in local.items():
            _check(record["state"][key], value, torch.float64, f"{key} of rank {rank}")


def test_process_group_restricts_synchronization_to_its_members(spawned):
    sizes = SCENARIOS["plain_float64"]["sizes"][3]
    members = [sizes[0], sizes[2]]
    _check_equal_to_concatenated(_results(spawned, 3, "subgroup", ranks=(0, 2)),
                                 _reference("plain_float64", members), torch.float64)


@WORLDS
def test_distributed_data_parallel_step_equals_single_process_training(spawned, world):
    sizes = DDP_SIZES[world]
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        x, dy = _ddp_data(sizes, step)
        optimizer.zero_grad()
        # DDP averages the processes' gradients: the loss of one process is the mean.
        ((model(x) * dy).sum() / world).backward()
        optimizer.step()
    for rank, state in enumerate(_results(spawned, world, "ddp")):
        for key, value in model.state_dict().items():
            _check(state[key], value, torch.float64, f"{key} of rank {rank}")


def test_a_rank_that_stops_calling_makes_the_others_raise_within_the_timeout(spawned):
    result = torch.load(spawned[2][1] / "failure0.pt")
    assert result["inference_seconds"] < FAILURE_TIMEOUT / 2  # inference: no collective
    assert result["raised"] is not None, "the layer returned although a rank never called it"
    assert "synchroniz" in result["raised"] and "timeout" in result["raised"]
    assert result["seconds"] < FAILURE_TIMEOUT + 10


def test_a_dead_rank_makes_the_others_raise_within_the_timeout(spawned):
    for rank in (0, 1):
        result = torch.load(spawned[3][1] / f"failure{rank}.pt")
        assert result["raised"] is not None, f"rank {rank} returned although a rank died"
        assert result["seconds"] < FAILURE_TIMEOUT + 10


# ---------------------------------------------------------------- one process


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(sync_kernel, "_warned_uninitialized", False)


def test_uninitialized_process_group_falls_back_to_local_statistics_and_warns_once(
        fresh_warning):
    assert not dist.is_initialized()
    x = torch.randn(8, 3)
    synchronized, local = bn.BatchNorm(3, synchronized=True), bn.BatchNorm(3)
    with pytest.warns(RuntimeWarning, match="not initialized"):
        y = synchronized(x, training=True)
    torch.testing.assert_close(y, local(x, training=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synchronized(x, training=True)


def test_uninitialized_fallback_keeps_the_local_batch_size_check(fresh_warning):
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="more than one value"):
        bn.BatchNorm(3, synchronized=True)(torch.randn(1, 3), training=True)


def test_inference_with_synchronized_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn.BatchNorm(3, synchronized=True)(torch.randn(2, 3), training=False)


def test_fused_true_cannot_be_synchronized():
    with pytest.raises(ValueError, match="synchronized"):
        bn.BatchNorm(3, fused=True, synchronized=True)


def test_synchronized_must_be_a_bool():
    with pytest.raises(TypeError, match="synchronized"):
        bn.BatchNorm(3, synchronized=1)


def test_convert_sync_turns_synchronization_on_and_off():
    model = nn.Sequential(bn.BatchNorm(3), nn.Sequential(nn.Linear(3, 3), bn.BatchNorm(3)))
    layers = [m for m in model.modules() if isinstance(m, bn.BatchNorm)]
    group = object()
    assert bn.convert_sync(model, group) is model
    assert all(m.synchronized and m.process_group is group for m in layers)
    bn.convert_sync(model, enabled=False)
    assert not any(m.synchronized or m.process_group is not None for m in layers)


def test_convert_sync_rejects_fused_layers_before_changing_any():
    model = nn.Sequential(bn.BatchNorm(3), bn.BatchNorm(3, fused=True))
    with pytest.raises(ValueError, match=r"\['1'\].*fused=True"):
        bn.convert_sync(model)
    assert not model[0].synchronized


def test_config_includes_synchronized_but_not_the_process_group():
    layer = bn.BatchNorm(3, synchronized=True, process_group=object())
    config = layer.get_config()
    assert config["synchronized"] is True and "process_group" not in config
    rebuilt = bn.BatchNorm.from_config(config)
    assert rebuilt.synchronized and rebuilt.process_group is None
    assert "synchronized=True" in repr(layer)
    assert "synchronized" not in repr(bn.BatchNorm(3))
