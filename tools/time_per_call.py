"""Per-call time of an ordinary ``bn.BatchNorm`` call, before and after a change.

Run (from the repository root)::

    python tools/time_per_call.py OLD_SRC NEW_SRC [--rounds 5] [--pairs 200] [--calls 50]

``OLD_SRC``/``NEW_SRC`` are ``src`` directories (e.g. ``git archive <commit> src | tar -x -C
/tmp/old``). Each round is a fresh process with one torch thread that imports both versions
(in alternating order from round to round) and times three calls on a 32x64 float32 input
(axis 1, 64 features): a training forward pass without autograd, a training forward and
backward pass, and an inference forward pass without autograd. It alternates the two versions
``--pairs`` times, ``--calls`` calls each, in CPU time of the thread (``time.thread_time``:
waiting for a core that other jobs hold is not counted), and keeps the median time of each
side and the median of the per-pair ratios: the two sides of a pair run a few milliseconds
apart, so a shared machine's slow drifts cancel in the ratio. The table gives the medians
over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)

def load(src):
    for name in [n for n in sys.modules if n == "batchnorm" or n.startswith("batchnorm.")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    import batchnorm
    sys.path.pop(0)
    assert batchnorm.__file__.startswith(src), batchnorm.__file__
    return batchnorm

old_src, new_src, pairs, calls, new_first = sys.argv[1:6]
pairs, calls = int(pairs), int(calls)
order = [("new", new_src), ("old", old_src)] if new_first == "1" else [
    ("old", old_src), ("new", new_src)]
x = torch.randn(32, 64)
xg = x.clone().requires_grad_()
dy = torch.randn(32, 64)
layers = {}
for side, src in order:
    # Each version's calls run once before the other is imported: whatever a version
    # imports lazily on its first call comes from its own src.
    layer = layers[side] = load(src).BatchNorm(64)
    with torch.no_grad():
        layer(x, training=True)
        layer(x, training=False)
    layer(xg, training=True).backward(dy)

def forward(layer):
    with torch.no_grad():
        layer(x, training=True)

def forward_backward(layer):
    layer(xg, training=True).backward(dy)

def inference(layer):
    with torch.no_grad():
        layer(x, training=False)

out = {}
for name, fn in (("forward", forward), ("forward+backward", forward_backward),
                 ("inference", inference)):
    for layer in layers.values():
        for _ in range(200):
            fn(layer)
    times = {side: [] for side in layers}
    for _ in range(pairs):
        for side, layer in layers.items():
            start = time.thread_time()
            for _ in range(calls):
                fn(layer)
            times[side].append((time.thread_time() - start) / calls * 1e6)
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    out[name] = {"old": statistics.median(times["old"]), "new": statistics.median(times["new"]),
                 "ratio": statistics.median(ratios)}
print(json.dumps(out))
"""


def measure(old: str, new: str, pairs: int, calls: int, new_first: bool) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, old, new, str(pairs), str(calls), str(int(new_first))],
        check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    rounds = [measure(args.old, args.new, args.pairs, args.calls, new_first=i % 2 == 1)
              for i in range(args.rounds)]
    print("| call (32x64 float32, 1 thread) | before µs | after µs | after / before "
          "(median of pairs) | per round |")
    print("|---|---:|---:|---:|---|")
    for name in rounds[0]:
        old = statistics.median(r[name]["old"] for r in rounds)
        new = statistics.median(r[name]["new"] for r in rounds)
        ratios = [r[name]["ratio"] for r in rounds]
        shown = " ".join(f"{100 * (q - 1):+.1f}%" for q in ratios)
        print(f"| {name} | {old:.1f} | {new:.1f} | {100 * (statistics.median(ratios) - 1):+.1f}% "
              f"| {shown} |")


if __name__ == "__main__":
    main()
