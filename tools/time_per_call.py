"""Per-call time of an ordinary ``bn.BatchNorm`` call, before and after a change.

Run (from the repository root)::

    python tools/time_per_call.py OLD_SRC NEW_SRC [--rounds 5] [--calls 3000]

``OLD_SRC``/``NEW_SRC`` are ``src`` directories (e.g. ``git archive <commit> src | tar -x -C
/tmp/old``). Each round starts one fresh process per side, alternating which goes first, with
one torch thread; each process times three calls on a 32x64 float32 input (axis 1, 64
features): a training forward pass without autograd, a training forward and backward pass,
and an inference forward pass without autograd, each as the best of 5 repeats of ``--calls``
calls (the least disturbed by other jobs). The table gives the median over the rounds, in
microseconds per call, and the change.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(1)
import batchnorm as bn
assert bn.__file__.startswith(sys.argv[1]), bn.__file__
calls = int(sys.argv[2])
layer = bn.BatchNorm(64)
x = torch.randn(32, 64)
xg = x.clone().requires_grad_()
dy = torch.randn(32, 64)

def forward():
    with torch.no_grad():
        layer(x, training=True)

def forward_backward():
    layer(xg, training=True).backward(dy)

def inference():
    with torch.no_grad():
        layer(x, training=False)

out = {}
for name, fn in (("forward", forward), ("forward+backward", forward_backward),
                 ("inference", inference)):
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    out[name] = best * 1e6
print(json.dumps(out))
"""


def measure(src: str, calls: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", CHILD, src, str(calls)], check=True,
                            capture_output=True, text=True, env={"PYTHONPATH": src,
                                                                 "PATH": "/usr/bin:/bin"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for i in range(args.rounds):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for side in order:
            runs[side].append(measure(getattr(args, side), args.calls))
    print("| call (32x64 float32, 1 thread) | before µs | after µs | change |")
    print("|---|---:|---:|---:|")
    for name in runs["old"][0]:
        old = statistics.median(r[name] for r in runs["old"])
        new = statistics.median(r[name] for r in runs["new"])
        print(f"| {name} | {old:.1f} | {new:.1f} | {100 * (new / old - 1):+.1f}% |")


if __name__ == "__main__":
    main()
