"""The CPU kernels' output pass against copy speed: the ways of writing it, side by side.

Run (from the repository root)::

    python tools/measure_output_pass.py [--repeats 15] [--threads 1 2]

One process times, on the same tensors, each way of computing one elementwise pass of the
kernels, and ``Tensor.copy_`` of the same tensor (the bandwidth limit: a read and a write),
in rounds: every alternative once per round, in an order that reverses from round to round
(paired alternation), so that a shared machine's slow drifts reach all of them alike. Each
figure is the median over rounds of ``copy time / its time`` in the same round (1.00: copy
speed), with the 10th to 90th percentile of those per-round fractions, and its median time.

Passes (64x64x56x56; float32 NCHW, float32 channels-last, bfloat16 NCHW):

- ``y = x * a + b`` per channel; ``relu(x * a + b)``; the backward's input gradient
  ``dx = p * dy - (q * (x - m) + u)`` (reads two tensors: its limit is 1.5 copies, so its
  fraction of copy speed is at most 0.67).

Alternatives:

- ``(a) numba, the kernel's loop``: ``kernels.cpu.passes.affine_pass`` and
  ``grad_input_pass`` on a preallocated output.
- ``(b) ATen, out=``: ``torch.addcmul(b, x, a, out=y)`` on broadcast views (ReLU: then
  ``y.relu_()``, a second pass; input gradient: ``addcmul(c, x, -q, out=dx)`` then
  ``dx.addcmul_(dy, p)``, with ``c = q * m - u``).
- ``(c) numba, flat``: a loop of this tool over the ``N * C`` contiguous planes as one
  flat range (one block per thread), every fastmath flag, the per-channel constants
  hoisted, the inner loop over the plane; ``(c) numba, non-temporal``: the same, each
  plane computed into a 4 KiB buffer (in L1) and stored from there by aligned
  non-temporal vector stores, which do not read the destination's cache lines first (an
  ordinary store does: three streams where a copy moves two). Planes only: not run for
  channels-last; x86 only (``sfence``).
- ``(d) tiled``: the forward's statistics and output passes fused per cache-sized tile,
  against the same code in two passes. Only ghost batches allow it (each group's statistics
  are its own; the plain mode's span the whole batch, so its output pass cannot start
  before the statistics pass ends): groups of 2 samples (1.6 MB in float32), one thread.
  Both are small numba loops of this tool (float32 NCHW), compared with each other; their
  fraction of copy speed is at most 0.67 for two passes (3 transfers), 1.0 tiled.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from batchnorm.kernels.cpu import loops, passes
from batchnorm.kernels.layout import Layout

SHAPE = (64, 64, 56, 56)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))]


@intrinsic
def _stream(typingctx, out, i, buffer, j):
    """``out[i:i + 8] = buffer[j:j + 8]``: one vector load, one non-temporal vector store
    (``&out[i]`` aligned to 8 values)."""
    def codegen(context, builder, signature, args):
        out_type, _, buffer_type, _ = signature.args
        vector = ir.VectorType(context.get_value_type(out_type.dtype), 8)
        size = out_type.dtype.bitwidth // 8

        def address(array_type, array, index):
            array = context.make_array(array_type)(context, builder, array)
            pointer = cgutils.get_item_pointer(context, builder, array_type, array, [index])
            return builder.bitcast(pointer, vector.as_pointer())

        value = builder.load(address(buffer_type, args[2], args[3]), align=size)
        store = builder.store(value, address(out_type, args[0], args[1]), align=8 * size)
        store.set_metadata("nontemporal", builder.module.add_metadata(
            [ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(out, i, buffer, j), codegen


@intrinsic
def _sfence(typingctx):
    def codegen(context, builder, signature, args):
        builder.call(builder.module.declare_intrinsic(
            "llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), [])), [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(fastmath=True, nogil=True, cache=True)
def _plane(op, xr, dr, a, b, q, out):
    """One plane's values into ``out``: ``x * a + b`` (op 0), its ReLU (1), the input
    gradient ``a * dy - (q * x + b)`` (2: the kernel's, its constants folded)."""
    if op == 0:
        for i in range(out.size):
            loops.store(out, i, loops.load(xr[i]) * a + b)
    elif op == 1:
        for i in range(out.size):
            z = loops.load(xr[i]) * a + b
            loops.store(out, i, max(z, np.float32(0)))
    else:
        for i in range(out.size):
            loops.store(out, i, a * loops.load(dr[i]) - (q * loops.load(xr[i]) + b))


@njit(fastmath=True, nogil=True, parallel=True)  # not cached: it calls intrinsics
def simd_pass(x, dy, a, b, q, op, streamed, y):
    """(c): ``_plane`` over the ``N * C`` planes of ``x`` (``(N, C, inner)``) into ``y``."""
    channels, inner = x.shape[1], x.shape[2]
    planes = x.shape[0] * channels
    xf = x.reshape(planes, inner)
    df = dy.reshape(planes, inner)
    yf = y.reshape(planes, inner)
    threads = numba.get_num_threads()
    for t in numba.prange(threads):
        buffer = np.empty(1024, y.dtype)
        for p in range(t * planes // threads, (t + 1) * planes // threads):
            c = p % channels
            yr = yf[p]
            # without streaming, the whole plane as one part stored directly
            head = min(inner, (32 - yr.ctypes.data % 32) % 32 // yr.itemsize) if streamed else 0
            _plane(op, xf[p, :head], df[p, :head], a[c], b[c], q[c], yr[:head])
            start = head
            while streamed and inner - start >= 8:
                stop = start + min(buffer.size, (inner - start) - (inner - start) % 8)
                _plane(op, xf[p, start:stop], df[p, start:stop], a[c], b[c], q[c],
                       buffer[:stop - start])
                for i in range(0, stop - start, 8):
                    _stream(yr, start + i, buffer, i)
                start = stop
            _plane(op, xf[p, start:], df[p, start:], a[c], b[c], q[c], yr[start:])
        if streamed:
            _sfence()


def cases(x: torch.Tensor) -> dict:
    """``{pass: {alternative: call}}`` for ``x``, each call writing a preallocated output."""
    channels = x.shape[1]
    layout = Layout(x, 1, None, "strided")
    x3 = layout.view(x)
    y = torch.empty_like(x)
    y3 = layout.view(y)
    dy = torch.randn_like(x)
    dy3 = layout.view(dy)
    features = (1, channels)
    a, b, m, p, q, u = (torch.rand(features) + 0.5 for _ in range(6))
    view = (1, channels, 1, 1)
    c = (q * m - u).view(view)
    no_mask = passes.no_mask()

    def aten_relu():
        torch.addcmul(b.view(view), x, a.view(view), out=y)
        y.relu_()

    def aten_grad_input():
        torch.addcmul(c, x, -q.view(view), out=y)
        y.addcmul_(dy, p.view(view))

    arrays = [passes.as_numpy(t) for t in (x3, dy3, y3)]

    def simd(op, streamed, a, b, q):
        a, b, q = (t.reshape(-1).numpy() for t in (a, b, q))
        return lambda: simd_pass(arrays[0], arrays[1], a, b, q, op, streamed, arrays[2])

    out = {}
    for op, (name, activation) in enumerate((("x * a + b", None), ("relu(x * a + b)", "relu"))):
        def step(activation=activation):
            passes.affine_pass(x3, layout, a, b, y3, activation)
        out[name] = {"(a) numba, the kernel's loop": step,
                     "(b) ATen, out=": (aten_relu if activation else
                                        lambda: torch.addcmul(b.view(view), x, a.view(view),
                                                              out=y))}
        if layout.inner > 1:
            out[name]["(c) numba, flat"] = simd(op, False, a, b, q)
            out[name]["(c) numba, non-temporal"] = simd(op, True, a, b, q)

    def grad_input():
        passes.grad_input_pass(x3, dy3, layout, m, p, q, u, no_mask, y3)
    out["input gradient"] = {"(a) numba, the kernel's loop": grad_input,
                             "(b) ATen, out=": aten_grad_input}
    if layout.inner > 1:
        out["input gradient"]["(c) numba, flat"] = simd(2, False, p, u - q * m, q)
        out["input gradient"]["(c) numba, non-temporal"] = simd(2, True, p, u - q * m, q)
    return out, y


@njit(fastmath=set(loops.FASTMATH), nogil=True, cache=True)
def _group_coefficients(x, first, stop, a, b):
    """``a``, ``b`` per channel such that ``x * a + b`` normalizes rows ``first:stop`` (float32
    runs summed from a shift, float64 totals; epsilon 1e-3)."""
    channels, inner = x.shape[1], x.shape[2]
    for c in range(channels):
        k = x[first, c, 0]
        s = 0.0
        sq = 0.0
        for o in range(first, stop):
            xr = x[o, c]
            rs = np.float32(0)
            rq = np.float32(0)
            for i in range(inner):
                v = xr[i] - k
                rs += v
                rq += v * v
            s += rs
            sq += rq
        n = (stop - first) * inner
        mean = s / n
        a[c] = 1 / np.sqrt(sq / n - mean * mean + 1e-3)
        b[c] = -(mean + k) * a[c]


@njit(fastmath=set(loops.FASTMATH), nogil=True, cache=True)
def _group_output(x, first, stop, a, b, y):
    for o in range(first, stop):
        for c in range(x.shape[1]):
            xr = x[o, c]
            yr = y[o, c]
            ac = a[c]
            bc = b[c]
            for i in range(x.shape[2]):
                yr[i] = xr[i] * ac + bc


@njit(fastmath=set(loops.FASTMATH), nogil=True, cache=True)
def _ghost_two_pass(x, y, per_group):
    """Every group's statistics, then every group's output (two reads of ``x``)."""
    groups = x.shape[0] // per_group
    a = np.empty((groups, x.shape[1]), np.float32)
    b = np.empty_like(a)
    for g in range(groups):
        _group_coefficients(x, g * per_group, (g + 1) * per_group, a[g], b[g])
    for g in range(groups):
        _group_output(x, g * per_group, (g + 1) * per_group, a[g], b[g], y)


@njit(fastmath=set(loops.FASTMATH), nogil=True, cache=True)
def _ghost_tiled(x, y, per_group):
    """Each group's statistics, then its output while the group is in cache."""
    a = np.empty(x.shape[1], np.float32)
    b = np.empty_like(a)
    for first in range(0, x.shape[0], per_group):
        _group_coefficients(x, first, first + per_group, a, b)
        _group_output(x, first, first + per_group, a, b, y)


def tiled_cases(x: torch.Tensor) -> dict:
    """(d): the forward of ghost groups of 2 samples, two passes against tiled."""
    x3 = x.reshape(x.shape[0], x.shape[1], -1).numpy()
    y3 = np.empty_like(x3)
    return {"(d) two passes": lambda: _ghost_two_pass(x3, y3, 2),
            "(d) tiled per group": lambda: _ghost_tiled(x3, y3, 2)}


def measure(alternatives: dict, source: torch.Tensor, copy_into: torch.Tensor,
            repeats: int) -> dict:
    """``{alternative: (fractions of copy speed, times)}`` over ``repeats`` rounds."""
    calls = {"copy": lambda: copy_into.copy_(source), **alternatives}
    for call in calls.values():  # compiled (or loaded from numba's cache), caches warm
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: ([copy / t for copy, t in zip(times["copy"], times[name], strict=True)],
                   times[name]) for name in calls}


def report(title: str, results: dict) -> None:
    for name, (fractions, times) in results.items():
        print(f"| {title} | {name} | {1e3 * statistics.median(times):.2f} "
              f"| {statistics.median(fractions):.2f} "
              f"| {percentile(fractions, 0.1):.2f}..{percentile(fractions, 0.9):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="rounds per case")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--no-tiled", action="store_true", help="skip (d)")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = torch.randn(SHAPE)
    inputs = {"float32 NCHW": base,
              "float32 channels-last": base.to(memory_format=torch.channels_last),
              "bfloat16 NCHW": base.to(torch.bfloat16)}
    print(f"{'x'.join(map(str, SHAPE))}; figures: copy time / time, median of {args.repeats} "
          "rounds (p10..p90); torch " + torch.__version__ + ", numba " + numba.__version__)
    for threads in args.threads:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        print(f"\n{threads} thread(s), load average at the start "
              f"{os.getloadavg()[0]:.2f}\n")
        print("| input, pass | alternative | ms | of copy speed | p10..p90 |")
        print("|---|---|---:|---:|---|")
        for label, x in inputs.items():
            table, y = cases(x)
            for pass_name, alternatives in table.items():
                report(f"{label}, {pass_name}",
                       measure(alternatives, x, torch.empty_like(x), args.repeats))
            del table, y
        if not args.no_tiled and threads == 1:
            report("float32 NCHW, forward of ghost groups of 2",
                   measure(tiled_cases(base), base, torch.empty_like(base), args.repeats))
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
