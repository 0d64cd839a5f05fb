"""``python -m batchnorm.apps.bench_gpu``: batch normalization on a CUDA device, against the
HBM bandwidth limit, torch.nn (cuDNN) and ``torch.compile``.

Every figure is a median of ``--repeats`` samples (each the mean of a burst of calls
timed with CUDA events) with its min and max; contenders are timed in turn within
each repeat. The limit is the time the bytes a phase must move take at the device's
copy bandwidth, measured in the same run with ``dst.copy_(src)`` on a tensor of the
same size: forward 3 tensor-sized passes (read x twice, write y), forward+backward 8,
inference 2. Contenders:

- ``ours``: :class:`batchnorm.BatchNorm` with ``fused=None`` (cuDNN through ATen for the
  plain mode, the Triton kernel for renorm, ghost batches and masks);
- ``ours/triton``: the Triton kernel forced (``kernels.prefer("triton")``), plain mode;
- ``torch.nn``: ``BatchNorm1d/2d`` (cuDNN); renorm and masks have no torch equivalent,
  so the plain layer stands in, marked ``*``; ghost batches are ATen's kernel on the
  batch reshaped to ``(N / size, size * C, ...)``... not equivalent either, so the plain
  layer stands in there too;
- ``compiled``: ``torch.compile`` of the torch.nn layer (plain mode only).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

import batchnorm as bn
from batchnorm import kernels

SHAPES = ((64, 64, 56, 56), (256, 256, 14, 14), (65536, 256))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODES: dict[str, dict[str, Any]] = {"plain": {}, "renorm": {"renorm": True},
                                     "ghost": {"virtual_batch_size": 8}, "masked": {}}
PASSES = {"forward": 3, "forward+backward": 8, "inference": 2}


def _time(fn, repeats: int, burst: int) -> list[float]:
    """Milliseconds per call: ``repeats`` samples, each the mean over ``burst`` calls."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(burst):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / burst)
    return samples


def _call(layer: nn.Module, x: torch.Tensor, phase: str, mask, dy, ours: bool):
    def run():
        if phase == "inference":
            with torch.no_grad():
                layer.eval()
                layer(x) if not ours else layer(x, training=False)
            return
        layer.train()
        y = layer(x, training=True, mask=mask) if ours else layer(x)
        if phase == "forward+backward":
            y.backward(dy)
    return run


def measure(shape, dtype: torch.dtype, mode: str, phase: str, repeats: int,
            burst: int) -> dict:
    x = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=phase != "inference")
    dy = torch.randn_like(x)
    channels = shape[1]
    mask = None
    if mode == "masked":
        mask = torch.rand((shape[0], *shape[2:]), device="cuda") > 0.2
    torch_layer = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(channels).cuda()
    ours = bn.BatchNorm(channels, **MODES[mode]).cuda()
    contenders: dict[str, tuple[Callable[[], None],
                                Callable[[], contextlib.AbstractContextManager[object]]]] = {
        "ours": (_call(ours, x, phase, mask, dy, True), contextlib.nullcontext),
        "torch.nn": (_call(torch_layer, x, phase, None, dy, False), contextlib.nullcontext)}
    if mode == "plain":
        contenders["ours/triton"] = (_call(bn.BatchNorm(channels).cuda(), x, phase, None, dy,
                                           True), lambda: kernels.prefer("triton"))
        compiled = cast(nn.Module, torch.compile(torch_layer))  # an OptimizedModule
        contenders["compiled"] = (_call(compiled, x, phase, None, dy, False),
                                  contextlib.nullcontext)
    src = torch.empty_like(x, requires_grad=False)
    dst = torch.empty_like(src)
    results: dict[str, list[float]] = {name: [] for name in contenders}
    results["copy"] = []
    for _ in range(repeats):  # interleaved: drift hits every contender alike
        for name, (fn, context) in contenders.items():
            with context():
                results[name] += _time(fn, 1, burst)
        results["copy"] += _time(lambda: dst.copy_(src), 1, burst)
    row: dict[str, Any] = {"shape": "x".join(map(str, shape)),
                           "dtype": str(dtype).removeprefix("torch."), "mode": mode,
                           "phase": phase}
    for name, samples in results.items():
        row[name] = (min(samples), statistics.median(samples), max(samples))
    row["limit_ms"] = row["copy"][1] * PASSES[phase] / 2
    return row


def table(rows: list[dict]) -> str:
    def cell(row: dict, name: str) -> str:
        if name not in row:
            return "-"
        lo, mid, hi = row[name]
        star = "*" if name == "torch.nn" and row["mode"] in ("renorm", "masked", "ghost") else ""
        return f"{mid:.3f}{star} ({lo:.3f}-{hi:.3f})"

    lines = ["| shape | dtype | mode | phase | ours ms | ours/triton ms | torch.nn ms | "
             "compiled ms | limit ms | ours % limit | torch.nn / ours |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours = row["ours"][1]
        lines.append(
            f"| {row['shape']} | {row['dtype']} | {row['mode']} | {row['phase']} | "
            f"{cell(row, 'ours')} | {cell(row, 'ours/triton')} | {cell(row, 'torch.nn')} | "
            f"{cell(row, 'compiled')} | {row['limit_ms']:.3f} | "
            f"{100 * row['limit_ms'] / ours:.0f}% | {row['torch.nn'][1] / ours:.2f}x |")
    lines.append("")
    lines.append("Medians of interleaved samples (min-max in brackets); `*`: the plain torch.nn "
                 "layer stands in (torch has no such mode). Limit: the phase's tensor-sized "
                 "passes at the measured device-copy bandwidth.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchnorm.apps.bench_gpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--burst", type=int, default=20, help="calls per sample")
    parser.add_argument("--quick", action="store_true", help="the first shape only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark has nothing to measure")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"caching allocator, TF32 {torch.backends.cudnn.allow_tf32}")
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        for dtype in DTYPES.values():
            for mode in MODES:
                for phase in PASSES:
                    rows.append(measure(shape, dtype, mode, phase, args.repeats, args.burst))
                    print(f"  {rows[-1]['shape']} {rows[-1]['dtype']} {mode} {phase}: "
                          f"ours {rows[-1]['ours'][1]:.3f} ms", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
