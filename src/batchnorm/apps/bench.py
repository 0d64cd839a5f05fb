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

Writes ``bench.json`` (every raw timing) and ``bench.png`` (ours, native and
compiled as a percentage of the limit) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
VIRTUAL_BATCH_SIZE = 8


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
    mask = None
    options = {}
    if case.mode == "renorm":
        options = {"renorm": True, "renorm_clipping": {"rmin": 1 / 3, "rmax": 3, "dmax": 5}}
    elif case.mode == "ghost":
        options = {"virtual_batch_size": VIRTUAL_BATCH_SIZE}
    elif case.mode == "masked":
        mask_shape = [s for d, s in enumerate(case.shape) if d != 1]
        mask = torch.rand(mask_shape, generator=gen) < 0.7
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

    def ours_train(t):
        return ours(t, training=True, mask=mask)

    def ours_infer(t):
        return ours(t, training=False)

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

    xg = x.detach().clone().requires_grad_()
    params = [p for p in (*ours.parameters(), *plain.parameters(), *plain_eval.parameters())]
    out = torch.empty_like(x)

    def forward(fn):
        return lambda: fn(x)

    def forward_backward(fn):
        def run():
            xg.grad = None
            for p in params:
                p.grad = None
            fn(xg).backward(dy)
        return run

    def inference(fn):
        def run():
            with torch.no_grad():
                fn(x)
        return run

    phases = {
        "forward": {k: forward(f) for k, f in train_fns.items()},
        "forward+backward": {k: forward_backward(f) for k, f in train_fns.items()},
        "inference": {k: inference(f) for k, f in infer_fns.items()},
    }
    for fns in phases.values():
        fns["copy"] = lambda: out.copy_(x)
    return phases, notes, compile_seconds, x.numel() * x.element_size()


def _time(fns: dict, repeats: int, budget: float) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` samples, contenders alternated."""
    # Warm up, alternating as below: numba loads its cache, and the heap reaches the extent
    # every contender's allocations need (until then, fresh pages fault in at some calls).
    for _ in range(3):
        for fn in fns.values():
            start = time.perf_counter()
            while time.perf_counter() - start < budget / 2:
                fn()
    calls = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first = time.perf_counter() - start
        calls[name] = max(1, min(200, int(budget / max(first, 1e-7))))
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return samples


def run_child(args) -> dict:

    results = []
    copies: dict[int, list[float]] = {}
    for case in cases(args.shapes, args.layouts, args.dtypes, args.modes):
        compile_ = args.compile == "all" or (args.compile == "plain" and case.mode == "plain")
        phases, notes, compile_seconds, nbytes = _contenders(case, compile_)
        for phase in args.phases:
            samples = _time(phases[phase], args.repeats, args.budget)
            copies.setdefault(nbytes, []).extend(samples.pop("copy"))
            row = {"case": asdict(case), "label": case.label, "phase": phase,
                   "allocator": args.allocator, "nbytes": nbytes,
                   "bytes": PASSES[phase] * nbytes, "notes": notes,
                   "samples_ms": {k: [s * 1e3 for s in v] for k, v in samples.items()}}
            for name, s in samples.items():
                row[f"{name}_ms"] = _median_ms(s)
            if compile_seconds:
                row["compile_s"] = compile_seconds["infer" if phase == "inference" else "train"]
            results.append(row)
            print(f"  [{args.allocator}] {case.label:40s} {phase:17s} ours {row['ours_ms']:9.3f} ms"
                  f"  native {row['native_ms']:9.3f} ms", file=sys.stderr)
    # The copy was timed beside every contender of every case; its median over all the
    # cases that move tensors of one size gives that size's bandwidth.
    for row in results:
        copy = _median_ms(copies[row["nbytes"]])
        bandwidth = 2 * row["nbytes"] / (copy / 1e3)  # bytes/s: one read + one write
        row.update(copy_ms=copy, bandwidth_gbs=bandwidth / 1e9,
                   limit_ms=row["bytes"] / bandwidth * 1e3)
    return {"environment": environment(), "results": results}


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpu": _cpu_model(), "cores": os.cpu_count(),
           "allocator_env": {k: os.environ.get(k) for k in ALLOCATORS["reuse"]}}
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
    import gc

    import torch

    import batchnorm as bn

    torch.manual_seed(0)
    channels, blocks = 32, 20

    def norm():
        if contender == "torch.nn.BatchNorm2d":
            return torch.nn.BatchNorm2d(channels)
        return bn.BatchNorm(channels, fused=False if contender == "ours (composite)" else None)

    model = torch.nn.Sequential(*[
        torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                            norm(), torch.nn.ReLU()) for _ in range(blocks)])
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


def table(results: list[dict]) -> str:
    lines = ["| allocator | case | phase | ours ms | native ms | compiled ms | tf_keras ms | "
             "limit ms | ours % of limit | native / ours | compiled / ours |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        native = _fmt(r.get("native_ms")) + ("*" if r["notes"] else "")
        ratio = r["native_ms"] / r["ours_ms"]
        compiled = r.get("compiled_ms")
        compiled_ratio = "-" if compiled is None else f"{compiled / r['ours_ms']:.2f}x"
        lines.append(
            f"| {r['allocator']} | {r['label']} | {r['phase']} | {_fmt(r['ours_ms'])} | {native} | "
            f"{_fmt(compiled)} | {_fmt(r.get('tf_keras_ms'))} | {_fmt(r['limit_ms'])} | "
            f"{100 * r['limit_ms'] / r['ours_ms']:.0f}% | {ratio:.2f}x | {compiled_ratio} |")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    allocators = sorted({r["allocator"] for r in results}, reverse=True)
    rows = [r for r in results if math.prod(r["case"]["shape"]) >= 1 << 20] or results
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(len(PHASES), len(allocators), squeeze=False,
                             figsize=(7 * len(allocators), 2 + 0.25 * len(labels) * len(PHASES)))
    for j, allocator in enumerate(allocators):
        for i, phase in enumerate(PHASES):
            ax = axes[i][j]
            sel = {r["label"]: r for r in rows
                   if r["allocator"] == allocator and r["phase"] == phase}
            names = [n for n in ("ours", "native", "compiled", "tf_keras")
                     if any(r.get(f"{n}_ms") for r in sel.values())]
            height = 0.8 / max(len(names), 1)
            for k, name in enumerate(names):
                ys = [n + k * height for n in range(len(labels))]
                vals = [100 * sel[lb]["limit_ms"] / sel[lb][f"{name}_ms"]
                        if lb in sel and sel[lb].get(f"{name}_ms") else 0 for lb in labels]
                ax.barh(ys, vals, height=height, label=name)
            ax.axvline(100, color="black", linewidth=0.8)
            ax.set_yticks([n + 0.4 - height / 2 for n in range(len(labels))], labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{phase}, allocator: {allocator}", fontsize=9)
            ax.set_xlabel("% of the memory-bandwidth limit (higher is faster)", fontsize=8)
            if names:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args) -> int:
    if args.quick:
        args.shapes = args.shapes or [SHAPES[0], SHAPES[-1]]
        args.layouts = args.layouts or ["nchw"]
        args.dtypes = args.dtypes or ["float32"]
        args.repeats = args.repeats or 5
        args.budget = args.budget or 0.03
    args.shapes = args.shapes or list(SHAPES)
    args.layouts = args.layouts or ["nchw", "nhwc"]
    args.dtypes = args.dtypes or list(DTYPES)
    args.repeats = args.repeats or 11
    args.budget = args.budget or 0.1
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    child_argv = ["--child", "--repeats", str(args.repeats), "--budget", str(args.budget),
                  "--compile", args.compile,
                  "--shapes", *[",".join(map(str, s)) for s in args.shapes],
                  "--layouts", *args.layouts, "--dtypes", *args.dtypes, "--modes", *args.modes,
                  "--phases", *args.phases]
    tf_python = _tf_python(args) if args.tf else None
    report = {"allocators": {}, "results": []}
    for allocator in args.allocators:
        setting = ALLOCATORS[allocator] or "glibc defaults"
        print(f"allocator {allocator}: {setting}", file=sys.stderr)
        child = _child([*child_argv, "--allocator", allocator], ALLOCATORS[allocator])
        report["allocators"][allocator] = child["environment"]
        rows = child["results"]
        if tf_python:
            try:
                tf = _child([*child_argv[1:], "--allocator", allocator], ALLOCATORS[allocator],
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
    report["memory"] = [_child(["--memory-child", name], MEMORY_ALLOCATOR)
                        for name in ("torch.nn.BatchNorm2d", "ours", "ours (composite)")]
    report["first_call"] = {"numba cache as found": _child(["--first-call-child"], {})}
    if args.cold:
        with tempfile.TemporaryDirectory() as cache:
            report["first_call"]["empty numba cache"] = _child(
                ["--first-call-child"], {"NUMBA_CACHE_DIR": cache})
    if args.distributed:
        from . import bench_distributed

        report["distributed"] = {
            "environment": bench_distributed.environment(),
            "rows": bench_distributed.measure([1, 2] if args.quick else [1, 2, 4])}

    (out_dir / "bench.json").write_text(json.dumps(report, indent=1))
    drew = chart(report["results"], out_dir / "bench.png")
    print(render(report, args, tf_python, drew, out_dir))
    return 0


def bench_distributed_table(rows: list[dict]) -> str:
    from .bench_distributed import table as distributed_table

    return distributed_table(rows)


def render(report: dict, args, tf_python: str | None, drew: bool, out_dir: Path) -> str:
    lines = ["# batchnorm benchmark" + (" (quick)" if args.quick else ""), "", "## Environment", ""]
    for allocator, env in report["allocators"].items():
        lines.append(f"- `{allocator}` allocator process: torch {env['torch']} "
                     f"({env['torch_threads']} threads), numba {env.get('numba')} "
                     f"({env.get('numba_threads')} threads, {env.get('numba_threading_layer')} "
                     f"layer), python {env['python']}, {env['cpu']} ({env['cores']} cores), "
                     f"malloc env {env['allocator_env']}")
    if tf_python:
        tf_env = report.get("tf_environment")
        lines.append(f"- tf_keras: {tf_env['tensorflow'] if tf_env else report.get('tf_error')} "
                     f"(`{tf_python}`)")
    else:
        lines.append("- tf_keras: no TensorFlow interpreter (give one with --tf-python)")
    lines += ["", "Medians of "
              f"{args.repeats} alternated repeats. limit = bytes moved / copy bandwidth "
              "(3, 8, 2 tensor-sized passes for forward, forward+backward, inference). "
              "`*`: plain batch norm stands in (PyTorch has no such mode). "
              "allocator `reuse`: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set high "
              "(freed heap reused); `default`: glibc defaults.", "", table(report["results"]), "",
              "## Peak memory, one training step through 20 Conv-BatchNorm-ReLU blocks",
              "(16x32x32x32 float32 activations, 2 MiB each; peak resident set above the one "
              "before the step, with glibc's mmap threshold fixed at 64 KiB so that it "
              "follows the live tensors)", "", "| contender | peak MiB |", "|---|---:|"]
    for m in report["memory"]:
        lines.append(f"| {m['contender']} | {m['peak_mib']:.1f} |")
    lines += ["", "## First call (a fresh process's first 64x64x28x28 training step)", ""]
    for name, fc in report["first_call"].items():
        lines.append(f"- {name}: first training step {fc['first_step_s']:.2f} s")
    compiles = [r["compile_s"] for r in report["results"] if "compile_s" in r]
    if compiles:
        lines.append(f"- torch.compile of the native contender: {min(compiles):.1f}-"
                     f"{max(compiles):.1f} s per graph")
    if "distributed" in report:
        lines += ["", "## Synchronized statistics across processes",
                  f"({report['distributed']['environment']}; communicating = time inside the "
                  "collectives, waiting for the slowest process included)", "",
                  bench_distributed_table(report["distributed"]["rows"])]
    lines += ["", f"Wrote {out_dir / 'bench.json'}"
              + (f" and {out_dir / 'bench.png'}" if drew else " (no PNG: matplotlib missing)")]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def shape(text: str) -> tuple[int, ...]:
        return tuple(int(s) for s in text.replace("x", ",").split(",") if s)

    parser.add_argument("--quick", action="store_true",
                        help="64x64x56x56 and 32x64, NCHW, float32, 5 repeats (about a minute)")
    parser.add_argument("--shapes", nargs="+", type=shape, help="e.g. 64,64,56,56 65536,256")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "nhwc"])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS),
                        default=["default", "reuse"])
    parser.add_argument("--repeats", type=int, help="samples per contender (11; quick: 5)")
    parser.add_argument("--budget", type=float, help="seconds per sample (0.1; quick: 0.03)")
    parser.add_argument("--compile", choices=["all", "plain", "none"], default="plain",
                        help="which modes get a torch.compile column (default: plain)")
    parser.add_argument("--tf", action=argparse.BooleanOptionalAction, default=True,
                        help="time tf_keras when a TensorFlow interpreter is found")
    parser.add_argument("--tf-python", help="a python with tensorflow and tf_keras "
                        "(default: $BATCHNORM_TF_PYTHON, or this one if it has tensorflow)")
    parser.add_argument("--cold", action="store_true",
                        help="also time the first call with an empty numba cache (compiles)")
    parser.add_argument("--out", default="bench-results", help="folder for bench.json/bench.png")
    parser.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=True,
                        help="also time synchronized statistics with 1, 2 and 4 gloo processes "
                        "(quick: 1 and 2)")
    # Internal: the child processes.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--allocator", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--first-call-child", action="store_true", help=argparse.SUPPRESS)


def main(args) -> int:
    if args.memory_child or args.first_call_child or args.child:
        if args.memory_child:
            result = memory_child(args.memory_child)
        elif args.first_call_child:
            result = first_call_child()
        else:
            result = run_child(args)
        Path(args.json_out).write_text(json.dumps(result))
        return 0
    return run(args)
