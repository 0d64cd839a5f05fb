"""Benchmark: synchronized statistics across 1, 2 and 4 processes on this machine.

``python -m batchnorm.apps.bench_distributed`` spawns each number of processes on
127.0.0.1 with the gloo backend; every process trains one ``BatchNorm`` layer
(forward and backward) on its own batch of a fixed size (weak scaling), once
with local statistics and once synchronized, on the same composite kernel
(synchronization always runs it; without it, ``fused=None`` may pick a faster
one, which the library's main benchmark measures). It prints the environment and a
markdown table: median time per step for both, the time spent inside the two
collectives (timed around the ``torch.distributed`` calls, waiting for the
slowest process included) and its share of the synchronized step.

Each process runs one thread, so every row does the same work per process;
the processes share this machine's cores, so the numbers show the cost of
synchronizing on one host, not the speed of a cluster's interconnect.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["end_worker", "main", "measure", "table"]

_COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_reduce")


def _timed_collectives(clock: list[float]) -> None:
    """Wrap this process's torch.distributed collectives so that ``clock[0]`` sums their time."""
    for name in _COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - start

        setattr(dist, name, timed)


def _worker(rank: int, world: int, port: int, shape: tuple[int, ...], steps: int,
            warmup: int, queue) -> None:
    from .. import BatchNorm

    torch.set_num_threads(1)  # the same work per process in every row
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    clock = [0.0]
    _timed_collectives(clock)
    torch.manual_seed(rank)
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    # The same (composite) kernel both ways, steps interleaved so that both see the
    # same load: the difference is the synchronization.
    layers = {sync: BatchNorm(shape[1], synchronized=sync, fused=False) for sync in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    comm: list[float] = []
    for step in range(warmup + steps):
        for synchronized, layer in layers.items():
            dist.barrier()  # start together; not timed
            clock[0] = 0.0
            start = time.perf_counter()
            layer(x, training=True).backward(dy)
            if step >= warmup:
                times[synchronized].append(time.perf_counter() - start)
                if synchronized:
                    comm.append(clock[0])
    result = {False: (statistics.median(times[False]), 0.0),
              True: (statistics.median(times[True]), statistics.median(comm))}
    if rank == 0:
        queue.put(result)  # a SimpleQueue writes to its pipe before put returns
    end_worker()


def end_worker(*, group_usable: bool = True) -> NoReturn:
    """End a spawned worker, once its results are saved, without the interpreter's teardown.

    A gloo process can abort at interpreter exit after a clean run ("terminate called
    without an active exception": a thread of the process group still running while static
    destructors run; 1 to 2 runs in 25 of a bare two-process script), which its parent
    would take for a failure. With a usable group the processes first wait for each other
    (none tears down while another still talks to it) and destroy it; then what was printed
    is flushed and ``os._exit(0)`` ends the process with no destructor run (0 runs in 25).
    The multi-process tests end their workers with it too.
    """
    if group_usable:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(processes: Sequence[int] = (1, 2, 4), *, batch: int = 32, features: int = 64,
            size: int = 16, steps: int = 20, warmup: int = 3) -> list[dict]:
    """Time a training step of one BatchNorm on ``(batch, features, size, size)`` per process.

    Returns one row per number of processes: ``processes``, ``local_ms`` and
    ``synchronized_ms`` (median step time of rank 0), ``communication_ms``
    (median time inside the collectives), ``communication_share``.

    >>> rows = measure((1, 2), steps=5)  # doctest: +SKIP
    >>> print(table(rows))               # doctest: +SKIP
    """
    context = mp.get_context("spawn")
    rows = []
    for world in processes:
        queue = context.SimpleQueue()
        mp.start_processes(_worker, nprocs=world, start_method="spawn", join=True,
                           args=(world, _free_port(), (batch, features, size, size), steps,
                                 warmup, queue))
        result = queue.get()
        (local, _), (synced, comm) = result[False], result[True]
        rows.append({"processes": world, "batch": (batch, features, size, size),
                     "local_ms": local * 1e3, "synchronized_ms": synced * 1e3,
                     "communication_ms": comm * 1e3, "communication_share": comm / synced})
    return rows


def table(rows: Sequence[dict]) -> str:
    """The rows of :func:`measure` as a markdown table: per step, in ms, with local and with
    synchronized statistics, and inside the collectives (communicating); share:
    communicating over synchronized."""
    lines = ["| processes | batch per process | local ms | synchronized ms | communicating ms "
             "| share |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {'x'.join(map(str, r['batch']))} | {r['local_ms']:.2f} | "
            f"{r['synchronized_ms']:.2f} | {r['communication_ms']:.2f} | "
            f"{100 * r['communication_share']:.0f}% |")
    return "\n".join(lines)


def environment() -> str:
    return (f"torch {torch.__version__}, Python {platform.python_version()}, "
            f"{platform.platform()}, {os.cpu_count()} CPU cores, backend gloo on 127.0.0.1, "
            "one thread per process; step = forward + backward of one BatchNorm, median")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchnorm.apps.bench_distributed",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32, help="samples per process")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--size", type=int, default=16, help="height and width")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    rows = measure(args.processes, batch=args.batch, features=args.features, size=args.size,
                   steps=args.steps)
    print(environment())
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
