"""The CPU fast path's numba loops before and after a change, timed in the same processes.

Run (from the repository root)::

    git archive <before> src | tar -x -C /tmp/before      # the version to compare against
    python tools/compare_loops.py /tmp/before/src src [--rounds 3] [--pairs 5]

Each round is a fresh process with one torch thread (and one numba thread) that imports both
versions (the first to run alternating from round to round), compiles their loops (numba
caches them beside each ``src``), and times every case below on the same tensors: a call of
one version, then the same call of the other, ``--pairs`` times (each side ``--calls`` calls
of the small cases), in wall-clock time. A pair's two sides run a fraction of a second
apart, so a shared machine's slow drifts cancel in their ratio. The table gives, per case,
the median over rounds of each side's median time, the median of all pairs' ratios and
their spread (the 10th to 90th percentile of the per-pair ratios).

Cases: ``kernels.prefer("cpu")`` training forward and backward, and the inference pass, on
64x64x56x56 float32 (NCHW, and NCHW in channels-last memory), without and with a fused ReLU;
the per-call cost on 32x64 (``BATCHNORM_CPU_MIN_NUMEL=0``: the loops, not the fallback).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(1)

def import_from(src):
    for name in [n for n in sys.modules if n.split(".")[0] == "batchnorm"]:
        del sys.modules[name]
    sys.path.insert(0, src)
    import batchnorm, batchnorm.kernels
    sys.path.pop(0)
    assert batchnorm.__file__.startswith(src), (batchnorm.__file__, src)
    return batchnorm

def train(bn, x, dy, activation):
    layer = bn.BatchNorm(x.shape[1], activation=activation)
    def call():
        with bn.kernels.prefer("cpu"):
            layer(x, training=True).backward(dy)
    return call

def infer(bn, x, dy, activation):
    layer = bn.BatchNorm(x.shape[1], activation=activation)
    def call():
        with torch.no_grad():
            layer(x, training=False)
    return call

before, after, pairs, calls, after_first = sys.argv[1:6]
big = torch.randn(64, 64, 56, 56)
cases = {}
for memory, x in (("NCHW", big), ("channels-last", big.to(memory_format=torch.channels_last))):
    for activation in (None, "relu"):
        for step, make in (("train fwd+bwd", train), ("inference", infer)):
            name = f"{step} 64x64x56x56 {memory}" + (" relu" if activation else "")
            cases[name] = (make, x, activation, 1)
small = torch.randn(32, 64)
cases["train fwd+bwd 32x64 (per call)"] = (train, small, None, int(calls))
cases["inference 32x64 (per call)"] = (infer, small, None, int(calls))
inputs = {name: (x.clone().requires_grad_(make is train), torch.randn_like(x))
          for name, (make, x, _, _) in cases.items()}

order = [("after", after), ("before", before)]
order = order if after_first == "1" else order[::-1]
fns = {}
for side, src in order:
    bn = import_from(src)
    for name, (make, _, activation, _) in cases.items():
        fns[name, side] = make(bn, *inputs[name], activation)
        # Compiled (or loaded) now, while this version is the one imported: numba's cache
        # index names the loops' module, which the other version replaces in sys.modules.
        for _ in range(2):
            fns[name, side]()

out = {}
for name, (_, _, _, repeat) in cases.items():
    times = {side: [] for side, _ in order}
    for _ in range(int(pairs)):
        for side in times:
            fn = fns[name, side]
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[side].append((time.perf_counter() - start) / repeat * 1e3)
    out[name] = times
print(json.dumps(out))
"""


def measure(before: str, after: str, pairs: int, calls: int, after_first: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
           "BATCHNORM_CPU_MIN_NUMEL": "0"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, before, after, str(pairs), str(calls),
         str(int(after_first))], capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the src directory of the version to compare against")
    parser.add_argument("after", help="the src directory of the changed version")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200, help="calls per timing, small cases")
    args = parser.parse_args()
    before, after = (os.path.abspath(p) for p in (args.before, args.after))
    rounds = [measure(before, after, args.pairs, args.calls, after_first=i % 2 == 1)
              for i in range(args.rounds)]
    print(f"{args.rounds} rounds x {args.pairs} pairs, float32, 1 thread; ms per call")
    print("| case | before ms | after ms | after / before (median) | p10..p90 of pairs |")
    print("|---|---:|---:|---:|---|")
    for name in rounds[0]:
        side = {s: statistics.median(statistics.median(r[name][s]) for r in rounds)
                for s in ("before", "after")}
        ratios = [a / b for r in rounds
                  for a, b in zip(r[name]["after"], r[name]["before"], strict=True)]
        low, mid, high = (100 * (q - 1) for q in (percentile(ratios, 0.1),
                                                  statistics.median(ratios),
                                                  percentile(ratios, 0.9)))
        print(f"| {name} | {side['before']:.3f} | {side['after']:.3f} | {mid:+.1f}% "
              f"| {low:+.1f}%..{high:+.1f}% |")


if __name__ == "__main__":
    main()
