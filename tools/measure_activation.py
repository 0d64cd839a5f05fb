"""Measure the fused activation (``bn.BatchNorm(activation=...)``) against BN + activation.

    python tools/measure_activation.py speed    # 64x64x56x56 float32 NCHW training step
    python tools/measure_activation.py memory   # peak RSS of 20 Conv-BN-act blocks

``speed``: training forward, forward+backward and inference (``eval()``, no autograd) of
one batch norm + activation, for
torch.nn (BatchNorm2d + nn.ReLU), ours followed by a separate nn.ReLU, and ours with
``activation=`` (the same for SiLU). Contenders are interleaved (one call of each in
turn), 5 timed rounds after 2 warm-up rounds, median reported, at 1 and 2 torch threads
(numba's threads follow), in a child process per allocator setting (``reuse``: glibc's
mmap/trim thresholds set high so freed blocks are reused; ``default``: glibc as it is).

``memory``: ``batchnorm.apps.bench.peak_memory``, in a child per contender with every
allocation over 64 KiB its own mapping, so the resident set follows the live tensors;
peak RSS (VmHWM) of one training step above the RSS before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from batchnorm.apps.bench import ALLOCATORS, MEMORY_ALLOCATOR, peak_memory

SPEED_CONTENDERS = ("torch.nn BN + {act}", "ours BN + nn.{Act}", "ours activation={act!r}")
MEMORY_CONTENDERS = ("torch.nn BN + ReLU", "torch.nn BN + ReLU(inplace)", "ours BN + nn.ReLU",
                     "ours activation='relu'", "ours fused=False activation='relu'",
                     "torch.nn BN + SiLU", "ours BN + nn.SiLU", "ours activation='silu'")


def _module(contender: str, channels: int):
    import torch

    import batchnorm as bn

    act = "silu" if "silu" in contender.lower() else "relu"
    module = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU}[act]
    inplace = "inplace" in contender
    if contender.startswith("torch.nn"):
        return torch.nn.Sequential(torch.nn.BatchNorm2d(channels), module(inplace=inplace))
    if "activation=" in contender:
        fused = False if "fused=False" in contender else None
        return bn.BatchNorm(channels, activation=act, fused=fused)
    return torch.nn.Sequential(bn.BatchNorm(channels), module())


def speed_child(allocator: str) -> list[dict]:
    import torch

    import batchnorm as bn  # noqa: F401 - numba's cache loads on the first call

    shape = (64, 64, 56, 56)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for act, Act in (("relu", "ReLU"), ("silu", "SiLU")):
            names = [c.format(act=act, Act=Act) for c in SPEED_CONTENDERS]
            modules = {n: _module(n, shape[1]).train() for n in names}
            x = torch.randn(shape).requires_grad_()
            dy = torch.randn(shape)
            for phase in ("forward", "forward+backward", "inference"):
                times = {n: [] for n in names}
                for round_ in range(7):
                    for name, module in modules.items():
                        x.grad = None
                        module.train(phase != "inference")
                        start = time.perf_counter()
                        with torch.set_grad_enabled(phase != "inference"):
                            y = module(x)
                        if phase == "forward+backward":
                            y.backward(dy)
                        elapsed = time.perf_counter() - start
                        del y
                        if round_ >= 2:
                            times[name].append(elapsed)
                for name, values in times.items():
                    rows.append({"allocator": allocator, "threads": threads, "phase": phase,
                                 "contender": name, "median_ms": 1e3 * statistics.median(values),
                                 "min_ms": 1e3 * min(values)})
    return rows


def memory_child(contender: str) -> dict:
    return peak_memory(contender, lambda channels: _module(contender, channels))


def _child(args: list[str], env: dict) -> object:
    out = subprocess.run([sys.executable, __file__, *args], env={**os.environ, **env},
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["speed", "memory"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = speed_child(args.child) if args.what == "speed" else memory_child(args.child)
        print(json.dumps(result))
        return
    if args.what == "speed":
        print("| allocator | threads | phase | contender | median ms | min ms |")
        print("|---|---:|---|---|---:|---:|")
        for allocator, env in ALLOCATORS.items():
            for row in _child(["speed", "--child", allocator], env):
                print(f"| {row['allocator']} | {row['threads']} | {row['phase']} | "
                      f"{row['contender']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} |")
    else:
        print("| contender | peak MiB (20 blocks, 16x32x32x32 float32) |")
        print("|---|---:|")
        for contender in MEMORY_CONTENDERS:
            row = _child(["memory", "--child", contender], MEMORY_ALLOCATOR)
            print(f"| {row['contender']} | {row['peak_mib']:.1f} |")


if __name__ == "__main__":
    main()
