"""``python -m batchnorm bench``: speed against the memory-bandwidth limit, and peak memory.

Batch normalization is memory-bound, so every timing is set against the time
the bytes it must move take at this machine's copy bandwidth, measured in the
same run: a training forward pass reads the input twice and writes the output
once (3 tensor-sized passes), forward+backward adds two reads of the input and
of the output gradient and one write of the input gradient (8 in all),
inference reads once and writes once (2). The bandwidth is that of
``dst.copy_(src)`` on a tensor of the same size (one read, one write).

Contenders, timed in turn within each repeat (the order rotates), medians
quoted: ``ours`` (:class:`batchnorm.BatchNorm`, ``fused=None``), ``native``
(``torch.nn.BatchNorm*d``; ghost batches as ATen's kernel on the reshaped
batch; renorm and masks have no PyTorch equivalent, so the plain layer stands
in, marked ``*``), ``compiled`` (the same under ``torch.compile``), ``tf_keras``
(``BatchNormalization`` in a ``tf.function``, run by a TensorFlow interpreter
given with ``--tf-python``, in its own process).

On CPU, large allocations can cost more than the kernel (glibc returns big
blocks to the system and faults them in again on every call), so each setting
runs in a child process: ``default`` (glibc as it is) and ``reuse``
(``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set high, so freed
blocks are reused; these must be set before the process starts).

Every figure comes with its spread: the minimum, median and maximum of its
repeats (for a ratio, of the ratios within each repeat, where the contenders ran
back to back). A row is flagged, and the output says so at its top, when

- a contender's (or the reference copy's) repeats spread wider than
  ``SPREAD_LIMIT`` (max/min > 1.5: the machine was busy, a median can be off by
  that much and the ratios with it);
- an ordering cannot be true: a contender's forward+backward faster than its
  forward alone (same case, same allocator), or a contender faster than the
  bandwidth limit by more than ``LIMIT_MARGIN`` (1.5x: either the timing or the
  copy that sets the limit is wrong);
- thread contention was seen while it ran: torch's threads more than
  ``CONTENTION_LIMIT`` (1.5x) slower than one thread on a parallel elementwise op,
  probed before and after every layer row and after every round of an end-to-end
  row (other jobs hold the cores, and every parallel region waits for a
  descheduled thread: figures inflate throughout, by up to a scheduler tick per
  call, with spreads that may stay narrow).

The output opens with a verdict, three lines: where ours is faster than torch.nn,
slower, and equal within the spread, phase by phase, and whether the machine was too
noisy to tell (:data:`VERDICT_RULE`, :func:`verdict`). It then says when the load
average was over half the core count before the run. ``--threads N`` runs every
measuring process on N torch and numba threads (``--threads 1``: no contention between
them, the steadiest figures on a shared machine); the environment section prints the
allocator and thread settings of every process.

The end-to-end rows (:mod:`batchnorm.apps.bench_end_to_end`; ``--no-end-to-end``
leaves them out) time a training step and an evaluation pass of a CIFAR-style
ResNet-18 and of an MLP with ``torch.nn`` batch norm, after ``bn.convert``, and
without batch norm, side by side; ``--load`` measures them again beside a process
that keeps every core busy.

The per-call rows (:mod:`batchnorm.apps.bench_per_call`; ``--no-per-call`` leaves them
out) time one call in every mode at 32x64 and 32x64x8x8, float32 and bfloat16, against
torch.nn's plain module, with the targets per phase marked; the norm-cost rows
(:mod:`batchnorm.apps.bench_norm_cost`; ``--no-norm-cost``) sum per-layer timers over the
batch norms of a half-width ResNet-18 and the MLP training step, ours (and fused with the
ReLU) against torch.nn, beside the whole step. Both run in a process of their own, on one
thread unless ``--threads`` says otherwise. ``--no-layers`` leaves the layer rows out.

The output fits 100 columns: a narrow table per allocator and case, a flagged row's
reasons under it; ``--wide`` prints each section as one table with every column.
Writes ``bench.json`` (every raw timing) and ``bench.png`` (ours, native and
compiled as a percentage of the limit) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bench_modes import VIRTUAL_BATCH_SIZE, mode_options, phase_fns
from .bench_per_call import MODES as PER_CALL_MODES
from .measure import WIDTH, alternated, compare, flag_notes, markdown, spread, spread_flag, wrap

ALLOCATORS = {
    "default": {},
    "reuse": {"MALLOC_MMAP_THRESHOLD_": str(1 << 40), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
}
# For the memory measurement: every allocation over 64 KiB is its own mapping, returned to
# the system when freed (a fixed threshold also stops glibc from raising it), so the
# resident set follows the live tensors and its peak is theirs.
MEMORY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_TRIM_THRESHOLD_": str(1 << 16)}
PHASES = ("forward", "forward+backward", "inference")
PASSES = {"forward": 3, "forward+backward": 8, "inference": 2}  # tensor-sized passes over memory
MODES = ("plain", "renorm", "ghost", "masked")
SHAPES = ((64, 64, 56, 56), (256, 256, 14, 14), (65536, 256), (32, 64))
DTYPES = ("float32", "bfloat16")
# A figure whose repeats spread wider than this (max / min) is flagged as untrustworthy: on a
# quiet machine they stay within a few percent, on a shared one a busy spell stretches some.
SPREAD_LIMIT = 1.5
# A contender faster than the bandwidth limit by more than this factor is flagged: no kernel
# moves its bytes faster than a copy does, so the timing or the copy is off.
LIMIT_MARGIN = 1.5
# Shapes under this many values are left out of the chart: their time is per-call overhead,
# not memory traffic, so a percentage of the bandwidth limit means nothing (see the table).
CHART_MIN_NUMEL = 1 << 20
CONTENDERS = ("ours", "native", "compiled", "tf_keras")
# torch's threads slower than one thread by this factor on a parallel elementwise op: other
# jobs hold the cores and every parallel region waits for a descheduled thread. Figures are
# then inflated throughout (small ops by up to a scheduler tick per call) with spreads that
# can stay narrow, so the spread check alone does not catch it.
CONTENTION_LIMIT = 1.5
PROBE_REPEATS = 5  # calls per thread count of the contention probe run between measurements
# The verdict calls the machine too noisy to tell when more than this share of the rows have
# a figure whose repeats spread wider than SPREAD_LIMIT: then the spreads, not the code,
# decide most of the faster/slower/equal calls.
NOISY_SHARE = 0.25
VERDICT_RULE = (
    "The output starts with a three-line verdict: where ours is faster than torch.nn "
    "(eager), slower, and equal within the spread, phase by phase ('forward 2/4': 2 of the 4 "
    "forward rows), and whether the machine was too noisy to tell. Ours is faster in a row "
    "where its time over torch.nn's stayed under 1 in every repeat (the two ran back to "
    "back), slower where it stayed over 1, equal otherwise; rows where torch.nn has no "
    "equivalent (renorm, masked) and end-to-end rows under --load are left out. A row is "
    "noisy when a contender's (or the reference copy's) repeats spread wider than "
    f"{SPREAD_LIMIT:g}x (max/min); the machine was too noisy to tell when over "
    f"{NOISY_SHARE:.0%} of the rows are noisy.")


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    layout: str  # "nchw" (contiguous) or "nhwc" (channels-last memory); 2-D: "nc"
    dtype: str
    mode: str

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} {self.layout} {self.dtype} {self.mode}"


def cases(shapes, layouts, dtypes, modes) -> list[Case]:
    out = []
    for shape in shapes:
        for layout in (layouts if len(shape) == 4 else ("nc",)):
            for dtype in dtypes:
                for mode in modes:
                    out.append(Case(tuple(shape), layout, dtype, mode))
    return out


# ---------------------------------------------------------------- the torch child


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _paired_ratios(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Spread of ``numerator[r] / denominator[r]``: each repeat's contenders ran back to back."""
    return spread([a / b for a, b in zip(numerator, denominator, strict=True) if b > 0])


def flag_rows(results: list[dict], spread_limit: float = SPREAD_LIMIT,
              limit_margin: float = LIMIT_MARGIN, contention: dict | None = None) -> list[dict]:
    """Set every row's ``flags``: why its figures cannot be trusted (empty: nothing found).

    A row needs ``samples_ms`` (contender -> repeats, ms), ``limit_ms``, ``allocator``,
    ``label`` and ``phase``; ``<contender>_ms`` medians are computed when missing.
    ``contention``: allocator -> the :func:`thread_contention` check of its process, for
    rows without a ``contention`` check of their own.
    """
    for r in results:
        r["flags"] = []
        check = r.get("contention") or (contention or {}).get(r["allocator"])
        if check and contention_flag(check):
            r["flags"].append(contention_flag(check))
        for name, samples in r["samples_ms"].items():
            r.setdefault(f"{name}_ms", statistics.median(samples))
        wide = spread_flag(r["samples_ms"], spread_limit)
        if wide:
            r["flags"].append(wide)
        for name in CONTENDERS:
            t = r.get(f"{name}_ms")
            if t and r.get("limit_ms") and t * limit_margin < r["limit_ms"]:
                r["flags"].append(f"faster than the bandwidth limit: {name} at "
                                  f"{100 * r['limit_ms'] / t:.0f}% (cannot be)")
    by_key = {(r["allocator"], r["label"], r["phase"]): r for r in results}
    for (allocator, label, phase), fb in by_key.items():
        fw = by_key.get((allocator, label, "forward"))
        if phase != "forward+backward" or fw is None:
            continue
        for name in CONTENDERS:
            both_ms, forward_ms = fb.get(f"{name}_ms"), fw.get(f"{name}_ms")
            if both_ms and forward_ms and both_ms < forward_ms:
                text = f"forward+backward faster than forward: {name} (cannot be)"
                fb["flags"].append(text)
                fw["flags"].append(text)
    return results


def trust_summary(results: list[dict], others: Sequence[dict] = (),
                  load_average: float | None = None, cores: int | None = None,
                  threads: int | None = None) -> list[str]:
    """Lines for the top of the output: which rows are flagged, and why.

    ``results``: the layer rows; ``others``: the other parts' rows (end-to-end, per-call,
    norm cost), each with its ``flags``. ``threads``: the ``--threads`` the rows were
    measured with (None: torch's default); the advice to rerun names only what would change
    something.
    """
    flagged = [r for r in results if r.get("flags")]
    e2e_flagged = [r for r in others if r.get("flags")]
    total = len(results) + len(others)
    busy = []
    if load_average is not None and cores and load_average > 0.5 * cores:
        busy = [f"The machine was busy before the benchmark started: load average "
                f"{load_average:.1f} on {cores} cores (other jobs compete for the cores).", ""]
    if not flagged and not e2e_flagged:
        return busy + [f"No row flagged ({total} rows): every figure's repeats within "
                       f"{SPREAD_LIMIT:g}x (max/min), no forward+backward faster than its "
                       "forward, nothing faster than the bandwidth limit, no thread "
                       "contention."]
    rerun = "rerun on a quieter machine" + (
        "" if threads == 1 else " (or with `--threads 1`, which thread contention cannot stall)")
    lines = busy + [f"**WARNING: {len(flagged) + len(e2e_flagged)} of {total} rows flagged "
                    f"(column `flags`): do not trust their figures; {rerun} before quoting "
                    "them.**", ""]
    reasons: dict[str, int] = {}
    for r in [*flagged, *e2e_flagged]:
        for kind in dict.fromkeys(f.split(":")[0] for f in r["flags"]):
            reasons[kind] = reasons.get(kind, 0) + 1
    lines += [f"- {reason}: {count} row{'s' if count > 1 else ''}"
              for reason, count in reasons.items()]
    return lines


def ours_over_torch(row: dict) -> dict[str, float] | None:
    """The spread of ours' time over torch.nn's in a layer or end-to-end row, repeat by
    repeat; None where torch.nn has no equivalent (a stand-in, ``*``, ran instead)."""
    if "step_ratio" in row:  # an end-to-end row: ours (bn.convert) over torch.nn already
        from .bench_end_to_end import OURS

        return row["step_ratio"][OURS]
    if row["notes"]:
        return None
    theirs = row.get("ratios", {}).get("native")  # torch.nn's time over ours
    if theirs is None:  # no paired repeats: the ratio of the medians
        theirs = dict.fromkeys(("min", "median", "max"), row["native_ms"] / row["ours_ms"])
    return {"min": 1 / theirs["max"], "median": 1 / theirs["median"], "max": 1 / theirs["min"]}


def noisy(row: dict, spread_limit: float = SPREAD_LIMIT) -> bool:
    """Whether a contender's (or the reference copy's) repeats spread wider than the limit."""
    return spread_flag(row["samples_ms"], spread_limit) is not None


def verdict(results: list[dict], end_to_end: Sequence[dict] = ()) -> list[str]:
    """The three lines that open the output: where ours is faster than torch.nn, slower,
    equal within the spread, and whether the machine was too noisy to tell
    (:data:`VERDICT_RULE`). Each names, per phase, how many of its rows are so. End-to-end
    rows measured beside a competing load on purpose (``--load``) are left out."""
    rows = [*results, *(r for r in end_to_end if r["load"] == "none")]
    ratios = [(r["phase"], ours_over_torch(r)) for r in rows]
    compared = [(phase, compare(ratio)) for phase, ratio in ratios if ratio is not None]
    phases = list(dict.fromkeys(phase for phase, _ in compared))
    noisy_rows = sum(noisy(r) for r in rows)
    noise = f"noisy: {noisy_rows} of {len(rows)} rows, " + (
        "too noisy to tell" if noisy_rows > NOISY_SHARE * len(rows) else "quiet enough to tell")
    lines = []
    for label, outcome in (("faster than torch.nn", "faster"), ("slower than torch.nn", "slower"),
                           ("equal within the spread", "equal")):
        counts = {p: sum(1 for q, o in compared if q == p and o == outcome) for p in phases}
        total = sum(counts.values())
        where = ", ".join(f"{p} {k}/{sum(1 for q, _ in compared if q == p)}"
                          for p, k in counts.items() if k) or "no row"
        tail = f"; {noise}" if outcome == "equal" else ""
        line = f"{label}: {where}{tail}"
        if len(line) > WIDTH:  # too many phases to name: the count alone
            line = f"{label}: {total} of {len(compared)} rows{tail}"
        lines.append(line)
    return lines


def _contenders(case: Case, compile_: bool):
    """Per phase, the callables to time: {phase: {name: fn}}, plus notes."""
    import torch
    import torch.nn.functional as TF

    import batchnorm as bn

    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=gen).to(dtype)
    if case.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    channels = case.shape[1]
    dy = torch.randn(case.shape, generator=gen).to(dtype)
    if case.layout == "nhwc":
        dy = dy.contiguous(memory_format=torch.channels_last)
    options, mask = mode_options(case.mode, case.shape, gen)
    ours = bn.BatchNorm(channels, axis=1, **options)
    plain = (torch.nn.BatchNorm2d if len(case.shape) == 4 else torch.nn.BatchNorm1d)(
        channels, eps=1e-3, momentum=0.01)
    notes = []

    if case.mode == "ghost":
        groups = case.shape[0] // VIRTUAL_BATCH_SIZE

        def native_train(t):  # tf_keras's strided split: (vbs, groups * C, -1)
            view = t.reshape(VIRTUAL_BATCH_SIZE, groups * channels, -1)
            y = TF.batch_norm(view, None, None, plain.weight.repeat(groups),
                              plain.bias.repeat(groups), True, 0.0, 1e-3)
            return y.reshape(t.shape)
    else:
        def native_train(t):
            return plain(t)
        if case.mode in ("renorm", "masked"):
            notes.append("native*: plain batch norm (PyTorch has no such mode)")

    # Modules called as users call them, ours as the native ones: train() and eval() copies,
    # no keyword but the mask (a keyword costs about 1 us in nn.Module.__call__).
    ours_eval = copy.deepcopy(ours).eval()

    def ours_train(t):
        return ours(t) if mask is None else ours(t, mask=mask)

    def ours_infer(t):
        return ours_eval(t)

    plain_eval = copy.deepcopy(plain).eval()  # a module against our module, as in training

    def native_infer(t):
        return plain_eval(t)

    train_fns = {"ours": ours_train, "native": native_train}
    infer_fns = {"ours": ours_infer, "native": native_infer}
    compile_seconds = {}
    if compile_:
        torch._dynamo.reset()  # every case is a new graph, not a recompilation of the last
        for name, fns in (("train", train_fns), ("infer", infer_fns)):
            compiled = torch.compile(fns["native"], dynamic=False)
            fns["compiled"] = compiled
            start = time.perf_counter()
            if name == "train":
                xg = x.detach().clone().requires_grad_()
                compiled(xg).backward(dy)
            else:
                with torch.no_grad():
                    compiled(x)
            compile_seconds[name] = time.perf_counter() - start

    params = [p for p in (*ours.parameters(), *plain.parameters(), *plain_eval.parameters())]
    out = torch.empty_like(x)
    phases = phase_fns(x, dy, train_fns, infer_fns, params)
    for timed in phases.values():
        timed["copy"] = lambda: out.copy_(x)
    return phases, notes, compile_seconds, x.numel() * x.element_size()


def set_threads(threads: int | None) -> None:
    """``threads`` torch (intra-op) and numba threads in this process (None: leave them)."""
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        import numba
    except ImportError:
        return
    # numba.config sets its attributes at import (from the environment): no stub has them.
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]


def thread_contention(repeats: int = 40) -> dict:
    """How much slower torch's threads make a parallel elementwise op than one thread does.

    A multiply of 1M float32 values (4 MiB each way), median of ``repeats`` calls, with
    the process's thread count and with one thread. On a quiet machine two threads take
    about half to the same time; when other jobs hold the cores they take several times
    longer, as each parallel region waits for a thread the scheduler has set aside.
    """
    import torch

    threads = torch.get_num_threads()
    a = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(a)

    def median_ms() -> float:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mul(a, 1.0001, out=out)
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    median_ms()  # warm up
    parallel = median_ms()
    torch.set_num_threads(1)
    try:
        serial = median_ms()
    finally:
        torch.set_num_threads(threads)
    return {"threads": threads, "parallel_ms": parallel, "serial_ms": serial,
            "slowdown": parallel / serial}


def _worst(*checks: dict) -> dict:
    return max(checks, key=lambda c: c["slowdown"])


def contention_flag(check: dict) -> str | None:
    """The flag for rows measured while ``check`` (of :func:`thread_contention`) held."""
    if check["threads"] > 1 and check["slowdown"] > CONTENTION_LIMIT:
        return (f"thread contention: {check['threads']} threads {check['slowdown']:.1f}x "
                "slower than 1 on a parallel op")
    return None


def run_child(args) -> dict:
    set_threads(args.threads)
    env = environment()
    at_start = thread_contention()
    results = []
    copies: dict[int, list[float]] = {}
    for case in cases(args.shapes, args.layouts, args.dtypes, args.modes):
        compile_ = args.compile == "all" or (args.compile == "plain" and case.mode == "plain")
        phases, notes, compile_seconds, nbytes = _contenders(case, compile_)
        for phase in args.phases:
            before = thread_contention(PROBE_REPEATS)
            samples = alternated(phases[phase], args.repeats, args.budget)
            check = _worst(before, thread_contention(PROBE_REPEATS))
            copies.setdefault(nbytes, []).extend(samples["copy"])
            row = {"case": asdict(case), "label": case.label, "phase": phase,
                   "allocator": args.allocator, "nbytes": nbytes,
                   "bytes": PASSES[phase] * nbytes, "notes": notes, "contention": check,
                   "samples_ms": {k: [s * 1e3 for s in v] for k, v in samples.items()}}
            for name, s in samples.items():
                if name != "copy":
                    row[f"{name}_ms"] = _median_ms(s)
            ours = row["samples_ms"]["ours"]
            row["ratios"] = {name: _paired_ratios(row["samples_ms"][name], ours)
                             for name in ("native", "compiled") if name in samples}
            if compile_seconds:
                row["compile_s"] = compile_seconds["infer" if phase == "inference" else "train"]
            results.append(row)
            print(f"  [{args.allocator}] {case.label:40s} {phase:17s} ours {row['ours_ms']:9.3f} ms"
                  f"  native {row['native_ms']:9.3f} ms", file=sys.stderr)
    # The copy was timed beside every contender of every case; its median over all the
    # cases that move tensors of one size gives that size's bandwidth.
    for row in results:
        pooled = copies[row["nbytes"]]
        copy = _median_ms(pooled)
        bandwidth = 2 * row["nbytes"] / (copy / 1e3)  # bytes/s: one read + one write
        passes = row["bytes"] / row["nbytes"] / 2  # the limit is this many copies
        row.update(copy_ms=copy, bandwidth_gbs=bandwidth / 1e9,
                   limit_ms=row["bytes"] / bandwidth * 1e3,
                   limit_spread_ms={k: passes * v * 1e3 for k, v in spread(pooled).items()})
    env["contention"] = _worst(at_start, *(r["contention"] for r in results),
                               thread_contention())
    return {"environment": env, "results": results}


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_PROC_BIND",
              "KMP_AFFINITY", "THP_MEM_ALLOC_ENABLE")


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "torch_interop_threads": torch.get_num_interop_threads(),
           "cpu": _cpu_model(), "cores": os.cpu_count(),
           "allocator_env": {k: os.environ.get(k) for k in ALLOCATORS["reuse"]},
           "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
           "load_average": _load_average()}
    try:
        import numba

        from ..kernels import cpu
        env.update(numba=numba.__version__, numba_threads=numba.get_num_threads(),
                   fast_path=cpu.available())
        if cpu.available():
            cpu.warm_up()
            env["numba_threading_layer"] = numba.threading_layer()
    except ImportError as error:
        env["numba"] = f"unavailable: {error}"
    return env


def _load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- memory and first call


def memory_child(contender: str) -> dict:
    """Peak resident memory of one training step through 20 Conv-BatchNorm-ReLU blocks."""
    import torch

    import batchnorm as bn

    def norm_act(channels: int) -> torch.nn.Module:
        if contender == "ours (activation=relu)":
            return bn.BatchNorm(channels, activation="relu")
        norm: torch.nn.Module
        if contender == "torch.nn.BatchNorm2d":
            norm = torch.nn.BatchNorm2d(channels)
        else:
            norm = bn.BatchNorm(channels, fused=False if contender == "ours (composite)" else None)
        return torch.nn.Sequential(norm, torch.nn.ReLU())

    return peak_memory(contender, norm_act)


def peak_memory(contender: str, norm_act: Callable[[int], Any]) -> dict:
    """Peak resident memory of one training step (forward, backward) through 20
    Conv-``norm_act(channels)`` blocks of 16x32x32x32 float32 activations, above the
    resident set before it (run it in a process where every large allocation is its own
    mapping, :data:`MEMORY_ALLOCATOR`, so that the resident set follows the live tensors)."""
    import gc

    import torch

    torch.manual_seed(0)
    channels, blocks = 32, 20
    model = torch.nn.Sequential(*[
        torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                            norm_act(channels)) for _ in range(blocks)])
    x = torch.randn(16, channels, 32, 32)

    def step():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    step()  # compile/load kernels, allocate gradients
    model.zero_grad(set_to_none=True)
    gc.collect()
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step()
    peak = _status_kb("VmHWM")
    return {"contender": contender, "peak_mib": (peak - base) / 1024,
            "activation_mib": x.numel() * 4 * blocks / 2**20}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def first_call_child() -> dict:
    """Seconds from nothing to one finished training step (import, numba cache or compile)."""
    start = time.perf_counter()
    import torch

    import batchnorm as bn

    imported = time.perf_counter()
    layer = bn.BatchNorm(64)
    x = torch.randn(64, 64, 28, 28, requires_grad=True)
    layer(x).sum().backward()
    done = time.perf_counter()
    from ..kernels import cpu

    return {"import_s": imported - start, "first_step_s": done - imported,
            "fast_path": cpu.available()}


# ---------------------------------------------------------------- the parent


def _child(argv: list[str], env_extra: dict[str, str], *, python: str | None = None,
           script: list[str] | None = None, timeout: float = 3600) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATORS["reuse"]}
    env.update(env_extra)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        command = [python or sys.executable, *(script or ["-m", "batchnorm", "bench"]),
                   *argv, "--json-out", str(out)]
        proc = subprocess.run(command, env=env, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"benchmark child failed ({proc.returncode}): {' '.join(command)}")
        return json.loads(out.read_text())


def _tf_python(args) -> str | None:
    if args.tf_python:
        return args.tf_python
    if os.environ.get("BATCHNORM_TF_PYTHON"):
        return os.environ["BATCHNORM_TF_PYTHON"]
    import importlib.util

    return sys.executable if importlib.util.find_spec("tensorflow") else None


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _cell(r: dict, name: str) -> str:
    """``median (min-max)`` of a contender's repeats, or ``-``."""
    samples = r.get("samples_ms", {}).get(name)
    if not samples:
        return _fmt(r.get(f"{name}_ms"))
    s = spread(samples)
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}-{_fmt(s['max'])})"


def _ratio_cell(r: dict, name: str) -> str:
    """``median (min-max)`` of the contender's time over ours, repeat by repeat."""
    if r.get(f"{name}_ms") is None:
        return "-"
    s = r.get("ratios", {}).get(name)
    if s is None:  # no paired repeats: the ratio of the medians
        return f"{r[f'{name}_ms'] / r['ours_ms']:.2f}x"
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def table(results: list[dict]) -> str:
    """The rows as markdown: every time and ratio as ``median (min-max)`` of its repeats."""
    lines = ["| allocator | case | phase | ours ms | native ms | compiled ms | tf_keras ms | "
             "limit ms | ours % of limit | native / ours | compiled / ours | flags |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        native = _cell(r, "native") + ("*" if r["notes"] else "")
        limit = r.get("limit_spread_ms")
        limit_cell = _fmt(r["limit_ms"]) + (
            f" ({_fmt(limit['min'])}-{_fmt(limit['max'])})" if limit else "")
        flags = "; ".join(r.get("flags", [])) or "ok"
        lines.append(
            f"| {r['allocator']} | {r['label']} | {r['phase']} | {_cell(r, 'ours')} | {native} | "
            f"{_cell(r, 'compiled')} | {_cell(r, 'tf_keras')} | {limit_cell} | "
            f"{100 * r['limit_ms'] / r['ours_ms']:.0f}% | {_ratio_cell(r, 'native')} | "
            f"{_ratio_cell(r, 'compiled')} | {flags} |")
    return "\n".join(lines)


def narrow_table(results: list[dict]) -> list[str]:
    """The rows in :data:`WIDTH` columns, a table per allocator and case (shape, layout,
    dtype): ours' median time, torch.nn's time over ours (median (min-max) within each
    repeat), the verdict (:func:`compare`; ``-`` where a stand-in ran), ours as a % of the
    bandwidth limit, and ``[n]`` for a flagged row, its flags listed under the table;
    torch.compile's and tf_keras's ratios in a second table where they ran."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["allocator"], r["label"].rsplit(" ", 1)[0]), []).append(r)
    lines = []
    for (allocator, case), rows in groups.items():
        marks, notes = flag_notes([(f"{r['label'].rsplit(' ', 1)[1]} {r['phase']}",
                                    r.get("flags", [])) for r in rows])
        cells = []
        for r, mark in zip(rows, marks, strict=True):
            ratio = ours_over_torch(r)
            cells.append([r["label"].rsplit(" ", 1)[1], r["phase"], _fmt(r["ours_ms"]),
                          _ratio_cell(r, "native") + ("*" if r["notes"] else ""),
                          compare(ratio) if ratio else "-",
                          f"{100 * r['limit_ms'] / r['ours_ms']:.0f}%", mark])
        lines += ["", f"### `{allocator}` allocator, {case}", "", *markdown(
            ["mode", "phase", "ours ms", "torch.nn / ours", "verdict", "ours % of limit",
             "flags"], cells, "llrrlrl")]
        lines += ["", *notes] if notes else []
        others = [n for n in ("compiled", "tf_keras") if any(r.get(f"{n}_ms") for r in rows)]
        if others:
            lines += ["", *markdown(
                ["mode", "phase", *(f"{n} / ours" for n in others)],
                [[r["label"].rsplit(" ", 1)[1], r["phase"], *(_ratio_cell(r, n) for n in others)]
                 for r in rows], "ll" + "r" * len(others))]
    return lines


def chart(results: list[dict], path: Path, repeats: int | None = None) -> bool:
    """Bars: each contender's median as a % of the bandwidth limit, whiskers: its range.

    Stand-in contenders (``*`` in the table) are hatched, flagged rows marked ``!``, and
    the shapes too small for a bandwidth figure are named as left out.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    allocators = sorted({r["allocator"] for r in results}, reverse=True)
    big = [r for r in results if math.prod(r["case"]["shape"]) >= CHART_MIN_NUMEL]
    rows = big or results
    left_out = sorted({"x".join(map(str, r["case"]["shape"])) for r in results if r not in rows},
                      key=len)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    flagged = {(r["allocator"], r["label"], r["phase"]) for r in rows if r.get("flags")}
    stand_in = {r["label"] for r in rows if r["notes"]}
    colors = dict(zip(CONTENDERS, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                      strict=False))
    names = [n for n in CONTENDERS if any(r.get(f"{n}_ms") for r in rows)]
    height = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(len(PHASES), len(allocators), squeeze=False,
                             figsize=(7.5 * len(allocators),
                                      2.4 + 0.22 * len(labels) * len(names) * len(PHASES)))
    for j, allocator in enumerate(allocators):
        for i, phase in enumerate(PHASES):
            ax = axes[i][j]
            sel = {r["label"]: r for r in rows
                   if r["allocator"] == allocator and r["phase"] == phase}
            for k, name in enumerate(names):
                for n, lb in enumerate(labels):
                    r = sel.get(lb)
                    if not r or not r.get(f"{name}_ms"):
                        continue
                    value = 100 * r["limit_ms"] / r[f"{name}_ms"]
                    samples = r.get("samples_ms", {}).get(name) or [r[f"{name}_ms"]]
                    low = 100 * r["limit_ms"] / max(samples)
                    high = 100 * r["limit_ms"] / min(samples)
                    hatch = "///" if name == "native" and lb in stand_in else None
                    ax.barh(n + k * height, value, height=height, color=colors[name],
                            hatch=hatch, edgecolor="white" if hatch else None, linewidth=0,
                            xerr=[[value - low], [high - value]], ecolor="0.3",
                            error_kw={"elinewidth": 0.8, "capsize": 1.5})
            ax.axvline(100, color="black", linewidth=0.8)
            ticks = [("! " if (allocator, lb, phase) in flagged else "") + lb
                     + (" (native*)" if lb in stand_in else "") for lb in labels]
            ax.set_yticks([n + (len(names) - 1) * height / 2 for n in range(len(labels))],
                          ticks, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{phase}, allocator: {allocator}", fontsize=9)
            ax.set_xlabel("% of the memory-bandwidth limit (higher is faster; 100: the limit)",
                          fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
    over = f" of {repeats} repeats" if repeats else ""
    handles = [Patch(color=colors[n], label=n) for n in names]
    if stand_in:
        handles.append(Patch(facecolor=colors["native"], hatch="///", edgecolor="white",
                             label="native*: plain batch norm stands in (no PyTorch equivalent)"))
    notes = []
    if flagged:
        notes.append("! flagged row: its figures are not to be trusted (see the table's flags)")
    if left_out:
        notes.append(f"left out: {', '.join(left_out)} (per-call overhead, not memory traffic; "
                     "see the table)")
    inch = 1 / fig.get_figheight()
    # Title and legend above the panels, notes below them: laid out around the axes.
    fig.tight_layout(rect=(0, (0.1 + 0.17 * len(notes)) * inch, 1, 1 - 0.95 * inch))
    fig.suptitle("Batch normalization on CPU: speed as a % of the memory-bandwidth limit\n"
                 f"bars: median, whiskers: min-max{over}", fontsize=11, y=1 - 0.08 * inch,
                 va="top")
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.52 * inch),
               ncol=len(handles), fontsize=8, frameon=False)
    if notes:
        fig.text(0.5, 0.08 * inch, "\n".join(notes), ha="center", va="bottom", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


QUICK_END_TO_END = {"repeats": 3, "budget": 0.1, "warmup": 1}
FULL_END_TO_END = {"repeats": 11, "budget": 0.3, "warmup": 2}


def end_to_end_child(args) -> dict:
    """The end-to-end rows, quiet, then (``--load``) beside a process keeping every core busy."""
    from . import bench_end_to_end as e2e

    set_threads(args.threads)
    env = environment()
    settings: dict[str, Any] = dict(QUICK_END_TO_END if args.quick else FULL_END_TO_END)
    settings["repeats"] = args.end_to_end_repeats or settings["repeats"]

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    def measured(load: str = "none") -> list[dict]:
        return e2e.measure(repeats=settings["repeats"], budget=settings["budget"],
                           warmup=settings["warmup"], load=load, progress=log,
                           probe=lambda: thread_contention(PROBE_REPEATS),
                           flag_probe=contention_flag)

    start = time.perf_counter()
    rows = measured()
    quiet = time.perf_counter() - start
    env["contention"] = _worst(*(row["contention"] for row in rows))
    if args.load:
        # Bounded: three times as long as the quiet rows took, a minute more; killed at the end.
        with e2e.busy(3 * quiet + 60) as load:
            rows += measured(load)
    return {"environment": env, "rows": rows, "fused": e2e.fused_supported(),
            "settings": settings}


def per_call_child(args) -> dict:
    """The per-call rows (:mod:`batchnorm.apps.bench_per_call`), on ``args.threads``."""
    from . import bench_per_call

    set_threads(args.threads)
    env = environment()
    rows = bench_per_call.measure(modes=args.per_call_modes, repeats=args.repeats,
                                  budget=args.budget, spread_limit=SPREAD_LIMIT,
                                  probe=lambda: thread_contention(PROBE_REPEATS),
                                  flag_probe=contention_flag, progress=True)
    env["contention"] = _worst(*(row["contention"] for row in rows))
    return {"environment": env, "rows": rows,
            "settings": {"repeats": args.repeats, "budget": args.budget}}


def norm_cost_child(args) -> dict:
    """The rows of normalization's cost inside the models
    (:mod:`batchnorm.apps.bench_norm_cost`), on ``args.threads``."""
    from . import bench_norm_cost

    set_threads(args.threads)
    env = environment()
    settings: dict[str, Any] = dict(QUICK_END_TO_END if args.quick else FULL_END_TO_END)
    settings["repeats"] = args.end_to_end_repeats or settings["repeats"]
    configs = [c for c in bench_norm_cost.CONFIGS if c[0] in args.norm_cost_models]
    rows = bench_norm_cost.measure(configs, **settings, spread_limit=SPREAD_LIMIT,
                                   probe=lambda: thread_contention(PROBE_REPEATS),
                                   flag_probe=contention_flag, progress=True)
    env["contention"] = _worst(*(row["contention"] for row in rows))
    return {"environment": env, "rows": rows, "settings": settings}


def run(args) -> int:
    began = time.perf_counter()
    if args.quick:
        args.shapes = args.shapes or [SHAPES[0], SHAPES[-1]]
        args.layouts = args.layouts or ["nchw"]
        args.dtypes = args.dtypes or ["float32"]
        args.allocators = args.allocators or ["reuse"]
        args.compile = args.compile or "none"
        args.repeats = args.repeats or 5
        args.budget = args.budget or 0.02
    args.shapes = args.shapes or list(SHAPES)
    args.layouts = args.layouts or ["nchw", "nhwc"]
    args.dtypes = args.dtypes or list(DTYPES)
    args.allocators = args.allocators or ["default", "reuse"]
    args.compile = args.compile or "plain"
    # Peak memory, first call and synchronized statistics take a process each (or several):
    # on in the full run, off in the quick one unless asked for.
    args.memory = not args.quick if args.memory is None else args.memory
    args.distributed = not args.quick if args.distributed is None else args.distributed
    args.keras = ((not args.quick and importlib.util.find_spec("keras") is not None)
                  if args.keras is None else args.keras)
    args.repeats = args.repeats or 11
    args.budget = args.budget or 0.1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    child_argv = ["--child", *threads, "--repeats", str(args.repeats),
                  "--budget", str(args.budget), "--compile", args.compile,
                  "--shapes", *[",".join(map(str, s)) for s in args.shapes],
                  "--layouts", *args.layouts, "--dtypes", *args.dtypes, "--modes", *args.modes,
                  "--phases", *args.phases]
    tf_python = _tf_python(args) if args.tf else None
    report = {"allocators": {}, "results": [], "seconds": {}, "load_average": load_average,
              "cores": os.cpu_count(), "threads": args.threads}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        report["seconds"][name] = now - since
        return now

    since = began
    for allocator in args.allocators if args.layers else []:
        setting = ALLOCATORS[allocator] or "glibc defaults"
        print(f"allocator {allocator}: {setting}", file=sys.stderr)
        child = _child([*child_argv, "--allocator", allocator], ALLOCATORS[allocator])
        report["allocators"][allocator] = child["environment"]
        rows = child["results"]
        if tf_python:
            try:
                tf = _child([*child_argv[1 + len(threads):], "--allocator", allocator],
                            ALLOCATORS[allocator],
                            python=tf_python, script=[str(Path(__file__).with_name("bench_tf.py"))])
                report.setdefault("tf_environment", tf["environment"])
                by_key = {(r["label"], r["phase"]): r for r in tf["results"]}
                for r in rows:
                    t = by_key.get((r["label"], r["phase"]))
                    if t and t.get("tf_keras_ms"):
                        r["tf_keras_ms"] = t["tf_keras_ms"]
                        r["samples_ms"]["tf_keras"] = t["samples_ms"]
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                report["tf_error"] = str(error)
        report["results"].extend(rows)
        since = lap(f"layers, {allocator} allocator", since)
    flag_rows(report["results"], contention={
        name: env["contention"] for name, env in report["allocators"].items()})
    if args.end_to_end:
        allocator = "reuse" if "reuse" in args.allocators else args.allocators[0]
        e2e_argv = ["--end-to-end-child", *threads, *(["--quick"] if args.quick else []),
                    *(["--load"] if args.load else []),
                    *(["--end-to-end-repeats", str(args.end_to_end_repeats)]
                      if args.end_to_end_repeats else [])]
        report["end_to_end"] = {"allocator": allocator,
                                **_child(e2e_argv, ALLOCATORS[allocator])}
        since = lap("end-to-end" + (", quiet and under load" if args.load else ""), since)
    # The per-call and in-model rows: on one thread unless --threads says otherwise.
    own_allocator = "reuse" if "reuse" in args.allocators else args.allocators[0]
    single = ["--threads", str(args.threads or 1)]
    if args.per_call:
        argv = ["--per-call-child", *single, "--repeats", str(args.repeats), "--budget",
                str(args.budget), "--per-call-modes", *args.per_call_modes]
        report["per_call"] = {"allocator": own_allocator,
                              **_child(argv, ALLOCATORS[own_allocator])}
        since = lap("per call", since)
    if args.norm_cost:
        argv = ["--norm-cost-child", *single, *(["--quick"] if args.quick else []),
                "--norm-cost-models", *args.norm_cost_models,
                *(["--end-to-end-repeats", str(args.end_to_end_repeats)]
                  if args.end_to_end_repeats else [])]
        report["norm_cost"] = {"allocator": own_allocator,
                               **_child(argv, ALLOCATORS[own_allocator])}
        since = lap("norm cost in models", since)
    if args.memory:
        report["memory"] = [_child(["--memory-child", name], MEMORY_ALLOCATOR)
                            for name in ("torch.nn.BatchNorm2d", "ours", "ours (composite)",
                                         "ours (activation=relu)")]
        report["first_call"] = {"numba cache as found": _child(["--first-call-child"], {})}
        if args.cold:
            with tempfile.TemporaryDirectory() as cache:
                report["first_call"]["empty numba cache"] = _child(
                    ["--first-call-child"], {"NUMBA_CACHE_DIR": cache})
        since = lap("memory and first call", since)
    if args.distributed:
        from . import bench_distributed

        report["distributed"] = {
            "environment": bench_distributed.environment(),
            "rows": bench_distributed.measure([1, 2] if args.quick else [1, 2, 4])}
        since = lap("synchronized statistics", since)
    if args.keras:
        from . import bench_keras

        report["keras"] = {"rows": bench_keras.measure(repeats=3 if args.quick else 7)}
        since = lap("Keras 3 layer", since)

    drew = bool(report["results"]) and chart(report["results"], out_dir / "bench.png",
                                             args.repeats)
    report["seconds"]["total"] = time.perf_counter() - began
    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    print(render(report, args, tf_python, drew, out_dir))
    return 0


def bench_distributed_table(rows: list[dict]) -> str:
    from .bench_distributed import table as distributed_table

    return distributed_table(rows)


def _settings(env: dict) -> str:
    """The allocator and thread settings of one benchmark process, in words."""
    malloc = {k: v for k, v in env["allocator_env"].items() if v is not None}
    threads = (f"torch {env['torch_threads']} intra-op / {env.get('torch_interop_threads')} "
               f"inter-op threads, numba {env.get('numba_threads')} threads "
               f"({env.get('numba_threading_layer')} layer)")
    extra = f", {env['thread_env']}" if env.get("thread_env") else ""
    check = env.get("contention")
    if not check:
        contention = ""
    elif check["threads"] == 1:
        contention = "; one thread: no contention between torch's threads"
    else:
        contention = (f"; worst thread check: {check['threads']} threads "
                      f"{check['parallel_ms']:.2f} ms vs 1 thread {check['serial_ms']:.2f} ms "
                      f"on a 1M-value multiply ({check['slowdown']:.2f}x)")
    return (f"malloc {malloc or 'glibc defaults'}; {threads}{extra}; load average at start "
            f"{env.get('load_average', '?')}{contention}")


def _layers_section(results: list[dict], args) -> list[str]:
    """The layer rows' explanation and table (``args.wide``: one full table)."""
    flags = (f"flags: repeats spread over {SPREAD_LIMIT:g}x (max/min), forward+backward faster "
             f"than forward, faster than the limit by over {LIMIT_MARGIN:g}x, or thread "
             "contention while the row ran.")
    limit = ("limit = bytes moved / copy bandwidth (3, 8, 2 tensor-sized passes for forward, "
             "forward+backward, inference)")
    stand_in = "`*`: plain batch norm stands in (PyTorch has no such mode)"
    if args.wide:
        return [*wrap(f"Every time: median (min-max) of {args.repeats} alternated repeats, in "
                      "ms; ratios: median (min-max) of the ratio within each repeat. "
                      f"{limit}, its range from the copy's. {stand_in}. allocator `reuse`: "
                      "MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set high (freed heap "
                      f"reused); `default`: glibc defaults. {flags}"), "", table(results)]
    return [*wrap(f"Per allocator (`reuse`: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set "
                  "high, freed heap reused; `default`: glibc defaults) and case: ours' median "
                  f"time of {args.repeats} alternated repeats, in ms; torch.nn's time over ours, "
                  "median (min-max) of the ratio within each repeat; the verdict from it; ours "
                  f"as a % of the bandwidth limit ({limit}). {stand_in}. {flags} `--wide`: "
                  "every contender's time with its spread, the limit and the flags, one table."),
            *narrow_table(results)]


def render(report: dict, args, tf_python: str | None, drew: bool, out_dir: Path) -> str:
    """The output: the verdict, the trust summary, the environment and every table, in
    :data:`WIDTH` columns (``args.wide``: the full tables, one line per row)."""
    e2e = report.get("end_to_end")
    e2e_rows = e2e["rows"] if e2e else []
    lines = [*verdict(report["results"], e2e_rows), "",
             "# batchnorm benchmark" + (" (quick)" if args.quick else ""), ""]

    def paragraph(text: str) -> None:
        lines.extend(wrap(text))

    parts = [*e2e_rows, *(row for name in ("per_call", "norm_cost") if name in report
                          for row in report[name]["rows"])]
    for line in trust_summary(report["results"], parts, report.get("load_average"),
                              report.get("cores"), report.get("threads")):
        lines.extend(wrap(line, "  " if line.startswith("- ") else "") if line else [""])
    lines += ["", "## Environment", ""]
    items = [f"`{allocator}` allocator process: torch {env['torch']}, numba {env.get('numba')}, "
             f"python {env['python']}, {env['cpu']} ({env['cores']} cores); {_settings(env)}"
             for allocator, env in report["allocators"].items()]
    if e2e:
        items.append(f"end-to-end process (`{e2e['allocator']}` allocator): "
                     f"{_settings(e2e['environment'])}")
    if tf_python:
        tf_env = report.get("tf_environment")
        items.append(f"tf_keras: {tf_env['tensorflow'] if tf_env else report.get('tf_error')} "
                     f"(`{tf_python}`)")
    else:
        items.append("tf_keras: no TensorFlow interpreter (give one with --tf-python)")
    for item in items:
        lines += wrap(f"- {item}", "  ")
    if report["results"]:
        lines += ["", "## Layers", "", *_layers_section(report["results"], args)]
    if e2e:
        from . import bench_end_to_end

        fused = ("`batchnorm fused activation` (`bn.convert(model, fuse_activation=True)`) "
                 "included" if e2e["fused"] else "no `batchnorm fused activation` column: "
                 "this `bn.convert` takes no `fuse_activation`")
        lines += ["", "## End to end: what batch normalization adds to a step", ""]
        paragraph(f"CIFAR-style ResNet-18 (batch 32, 3x32x32, 10 classes) and an MLP "
                  f"(Linear-BN-ReLU x3 at 256 features, then Linear; batches 32 and 256): "
                  f"`torch.nn` batch norm, the same model after `bn.convert` (`batchnorm`, "
                  f"ours), and without batch norm (`no norm`); training step = forward, "
                  f"backward, SGD step; evaluation = eval-mode forward under no_grad. Median "
                  f"(min-max) of {e2e['settings']['repeats']} interleaved repeats, ms. BN cost "
                  f"= the paired difference with `no norm`, repeat by repeat; the cost ratio is "
                  f"that of their medians; the step ratio (whole step, ours over torch.nn) is "
                  f"median (min-max) of the ratios within each repeat, and the verdict comes "
                  f"from it. {fused}.")
        lines += (["", bench_end_to_end.table(e2e["rows"])] if args.wide
                  else bench_end_to_end.narrow_table(e2e["rows"]))
    if "per_call" in report:
        from . import bench_per_call

        part = report["per_call"]
        lines += ["", "## Per call: every mode against torch.nn's plain module", ""]
        paragraph(f"Time per call of ours in each mode and of torch.nn's plain "
                  f"BatchNorm1d/2d on the same input (same memory layout), timed back to "
                  f"back, {part['settings']['repeats']} alternated repeats: medians in us; "
                  "ours over torch.nn, median (min-max) of the ratio within each repeat; extra "
                  "us: ours minus torch.nn, median of the paired differences; met: the median "
                  "ratio at most the target. Modes: renorm with clipping, ghost batches of "
                  f"{VIRTUAL_BATCH_SIZE}, masked (7 in 10 positions), a per-feature adjustment, "
                  "debias, momentum=None, unbiased moving variance, activation='relu', "
                  "channels-last input, features last (axis=-1). Process "
                  f"(`{part['allocator']}` allocator): {_settings(part['environment'])}.")
        lines += ["", *wrap(bench_per_call.summary(part["rows"])),
                  *bench_per_call.narrow_table(part["rows"])]
    if "norm_cost" in report:
        from . import bench_norm_cost

        part = report["norm_cost"]
        lines += ["", "## Normalization's own cost inside a model", ""]
        paragraph("A training step of a half-width CIFAR ResNet-18 (batch 32) and of the MLP "
                  "(3x256; batches 32, 256): per-layer timers (forward hooks, gradient hooks; "
                  "the same on every contender) summed over the batch norms (`norm`: "
                  "ours, bn.convert, against torch.nn) and over each batch norm with the ReLU "
                  "that fuse_activation fuses (`norm+ReLU fused`: bn.convert(model, "
                  "fuse_activation=True) against torch.nn's batch norm and ReLU), ms per step; "
                  "`whole step`, `whole step fused`: copies without timers. Medians of "
                  f"{part['settings']['repeats']} rotating rounds; ratios: median (min-max) "
                  "within each round; met: the median ratio at most the target. Process "
                  f"(`{part['allocator']}` allocator): {_settings(part['environment'])}.")
        lines += bench_norm_cost.narrow_table(part["rows"])
    if "memory" in report:
        lines += ["", "## Peak memory, one training step through 20 Conv-BatchNorm-ReLU blocks",
                  ""]
        paragraph("16x32x32x32 float32 activations, 2 MiB each; peak resident set above the "
                  "one before the step, with glibc's mmap threshold fixed at 64 KiB so that it "
                  "follows the live tensors.")
        lines += ["", "| contender | peak MiB |", "|---|---:|"]
        for m in report["memory"]:
            lines.append(f"| {m['contender']} | {m['peak_mib']:.1f} |")
        lines += ["", "## First call (a fresh process's first 64x64x28x28 training step)", ""]
        for name, fc in report["first_call"].items():
            lines.append(f"- {name}: first training step {fc['first_step_s']:.2f} s")
    compiles = [r["compile_s"] for r in report["results"] if "compile_s" in r]
    if compiles:
        lines.append(f"\ntorch.compile of the native contender: {min(compiles):.1f}-"
                     f"{max(compiles):.1f} s per graph")
    if "distributed" in report:
        lines += ["", "## Synchronized statistics across processes", ""]
        paragraph(f"{report['distributed']['environment']}; ms per step; communicating = time "
                  "inside the collectives, waiting for the slowest process included; share = "
                  "communicating / synchronized.")
        lines += ["", bench_distributed_table(report["distributed"]["rows"])]
    if "keras" in report:
        from .bench_keras import table as keras_table

        lines += ["", "## Keras 3 on the torch backend", ""]
        paragraph("batchnorm.keras.BatchNormalization against keras.layers.BatchNormalization "
                  "in the same process, channels-last: seconds per call, median (min-max) of "
                  "the rounds; speedup = the median per-round ratio (> 1: ours is faster).")
        lines += ["", keras_table(report["keras"]["rows"])]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    lines.append("")
    paragraph(f"Took {timing}.")
    paragraph(f"Wrote {out_dir / 'bench.json'}"
              + (f" and {out_dir / 'bench.png'}" if drew else " (no PNG: matplotlib missing)"))
    return "\n".join(lines)


# The sections a run can leave out (--no-NAME): their default (None: on, and off with
# --quick) and help.
SECTIONS: dict[str, tuple[bool | None, str]] = {
    "tf": (True, "time tf_keras when a TensorFlow interpreter is found"),
    "distributed": (None, "also time synchronized statistics with 1, 2 and 4 gloo processes "
        "(default: on; quick: off, or 1 and 2 processes when asked for)"),
    "keras": (None, "also time batchnorm.keras.BatchNormalization against Keras 3's "
        "own layer on the torch backend (default: on where Keras is installed; "
        "quick: off)"),
    "memory": (None, "also measure peak memory and the first call, in fresh processes "
        "(default: on; quick: off)"),
    "end-to-end": (True, "time a training step and an evaluation pass of a CIFAR ResNet-18 "
        "and an MLP with torch.nn batch norm, with bn.convert and without batch "
        "norm (default: on; quick: 3 repeats)"),
    "layers": (True, "time the layers against the bandwidth limit (default: on; "
        "--no-layers leaves those rows out, e.g. with --per-call)"),
    "per-call": (True, "per-call rows: every mode at 32x64 and 32x64x8x8, float32 and "
        "bfloat16, ours over torch.nn's plain module against the targets "
        "(1.3 forward, 1.2 forward+backward, 1.1 inference), on one thread "
        "unless --threads says otherwise, with --repeats and --budget "
        "(default: on, quick too)"),
    "norm-cost": (True, "normalization's own cost inside a half-width ResNet-18 and an "
        "MLP training step: per-layer timers summed over the layers, ours "
        "(and fused with the ReLU) over torch.nn's, and the whole step, on "
        "one thread unless --threads says otherwise (default: on; quick: 3 "
        "repeats)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def shape(text: str) -> tuple[int, ...]:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s)

    parser.add_argument("--quick", action="store_true",
                        help="64x64x56x56 and 32x64, NCHW, float32, reuse allocator, 5 repeats, "
                        "no torch.compile; end-to-end rows with 3 repeats; no memory, "
                        "first-call or distributed parts (6 min 36 s on a 2-core machine "
                        "shared with other jobs, load average 5.4 at the start: measured "
                        "2026-12-07 with `time python -m batchnorm bench --quick`; its "
                        "'Took' line: end-to-end 340 s, total 389 s; before the per-call and "
                        "norm-cost rows, which add 61 s and 48 s at a load average of 7.1: "
                        "measured 2026-12-07 with `python -m batchnorm bench --quick "
                        "--no-layers --no-end-to-end --no-tf`)")
    parser.add_argument("--shapes", nargs="+", type=shape, help="e.g. 64,64,56,56 65536,256")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "nhwc"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS),
                        help="default: both (quick: reuse)")
    parser.add_argument("--repeats", type=int, help="samples per contender (11; quick: 5)")
    parser.add_argument("--budget", type=float, help="seconds per sample (0.1; quick: 0.02)")
    parser.add_argument("--compile", choices=["all", "plain", "none"],
                        help="which modes get a torch.compile column (default: plain; quick: "
                        "none: compiling took 57 s for the training graph, 7 s for the "
                        "inference one, on a 2-core machine shared with other jobs, load "
                        "average 6.9 at the start: measured 2026-12-07 with `python -m "
                        "batchnorm bench --shapes 64,64,56,56 --layouts nchw --dtypes float32 "
                        "--modes plain --allocators reuse --no-end-to-end --no-memory "
                        "--no-distributed --no-tf --repeats 3`, its 'torch.compile' line)")
    for name, (default, text) in SECTIONS.items():
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                            default=default, help=text)
    parser.add_argument("--tf-python", help="a python with tensorflow and tf_keras "
                        "(default: $BATCHNORM_TF_PYTHON, or this one if it has tensorflow)")
    parser.add_argument("--cold", action="store_true",
                        help="also time the first call with an empty numba cache (compiles)")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json/bench.png")
    parser.add_argument("--wide", action="store_true",
                        help=f"print each section as one table with every column (lines over "
                        f"{WIDTH} columns): every contender's time with its spread, the "
                        "bandwidth limit, the flags in full")
    parser.add_argument("--end-to-end-repeats", type=int,
                        help="repeats of each end-to-end contender (11; quick: 3)")
    parser.add_argument("--threads", type=int,
                        help="torch and numba threads in every measuring process (default: "
                        "theirs, one per core); 1 keeps thread contention on a shared machine "
                        "out of the figures")
    parser.add_argument("--load", action="store_true",
                        help="measure the end-to-end rows a second time beside a process that "
                        "keeps every core busy (bounded in time, killed at the end)")
    parser.add_argument("--per-call-modes", nargs="+", choices=list(PER_CALL_MODES),
                        default=list(PER_CALL_MODES), help="the modes of the per-call rows")
    parser.add_argument("--norm-cost-models", nargs="+", choices=["resnet18", "mlp"],
                        default=["resnet18", "mlp"], help="the models of the --norm-cost rows")
    # Internal: the child processes.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--first-call-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--end-to-end-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--per-call-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--norm-cost-child", action="store_true", help=argparse.SUPPRESS)


def main(args) -> int:
    children = {"memory_child": lambda: memory_child(args.memory_child),
                "first_call_child": first_call_child,
                "end_to_end_child": lambda: end_to_end_child(args),
                "per_call_child": lambda: per_call_child(args),
                "norm_cost_child": lambda: norm_cost_child(args),
                "child": lambda: run_child(args)}
    child = next((fn for name, fn in children.items() if getattr(args, name)), None)
    if child is not None:
        result = child()
        Path(args.json_out).write_text(json.dumps(result))
        return 0
    return run(args)
