"""End-to-end rows of ``python -m batchnorm bench``: what batch normalization adds to a
training step and to an evaluation pass of whole models.

Models: a CIFAR-style ResNet-18 (3x3 stem, four stages of two basic blocks, 64 to 512
channels, 32x32 inputs, 10 classes; defined here, torchvision is not needed) at batch
32, and an MLP (Linear-BatchNorm-ReLU three times at 256 features, then Linear to 10
classes) at batches of 32 and 256. Each is timed as

- ``torch.nn``: built with ``torch.nn.BatchNorm2d``/``BatchNorm1d``;
- ``batchnorm``: the same model (a deep copy) after ``bn.convert``;
- ``no norm``: the same model with every batch norm replaced by ``nn.Identity``;
- ``batchnorm fused activation``: ``bn.convert(model, fuse_activation=True)``, only
  when ``bn.convert`` accepts that argument (checked at run time).

Phases: a training step (forward, cross-entropy, backward, SGD with momentum) in
training mode, and an evaluation pass (eval mode, ``torch.no_grad``). The
contenders run side by side in one process: within each repeat every contender is
timed once, in an order that rotates from repeat to repeat, so that a change of
load hits them all. Reported per contender: median, minimum and maximum over the
repeats. The cost of batch normalization is the paired difference, repeat by
repeat, between a contender and ``no norm`` (median and range); the cost ratio is
that of the medians of the costs; the step ratio (whole step, ours over torch.nn) is
taken repeat by repeat, median and range.

``--load`` measures the rows a second time while another process keeps every
core busy (torch matrix products on as many threads as there are cores, ended
after a bounded time and killed when the rows are done), to show how far the
ratios move on a shared machine.
"""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

import batchnorm as bn

from .measure import (
    calibrate,
    compare,
    contended,
    flag_notes,
    markdown,
    number,
    rounds,
    spread,
    spread_flag,
)

TORCH = "torch.nn"
OURS = "batchnorm"
NONE = "no norm"
FUSED = "batchnorm fused activation"
NORMALIZED = (TORCH, OURS, FUSED)  # the contenders whose batch-norm cost is reported
PHASES = ("training step", "evaluation")
# (model, batch) of the end-to-end rows
CONFIGS = (("resnet18", 32), ("mlp", 32), ("mlp", 256))


# ---------------------------------------------------------------- the models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(classes: int = 10, width: int = 64) -> nn.Module:
    """The CIFAR-style ResNet-18: 11.2M parameters, 20 BatchNorm2d layers; its stages have
    ``width`` (64), 2, 4 and 8 times ``width`` channels (``width=32``: half width)."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def mlp(features: int = 256, depth: int = 3, classes: int = 10) -> nn.Module:
    """(Linear-BatchNorm1d-ReLU) x ``depth``, then Linear; inputs of ``features`` values."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(features, features, bias=False), nn.BatchNorm1d(features),
                   nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(features, classes))


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18, "mlp": mlp}


def input_shape(model: str, batch: int) -> tuple[int, ...]:
    return (batch, 3, 32, 32) if model == "resnet18" else (batch, 256)


def without_norm(model: nn.Module) -> nn.Module:
    """A deep copy with every torch.nn batch norm replaced by ``nn.Identity``."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, nn.Identity())
    return model


def fused_supported() -> bool:
    """Whether ``bn.convert`` takes ``fuse_activation`` (a later version adds it)."""
    try:
        return "fuse_activation" in inspect.signature(bn.convert).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin or odd callable
        return False


def contenders(model_name: str, **options) -> dict[str, nn.Module]:
    """The same model (same weights) as each contender; ``options`` go to its builder."""
    torch.manual_seed(0)
    reference = MODELS[model_name](**options)
    models = {TORCH: reference, OURS: bn.convert(copy.deepcopy(reference)),
              NONE: without_norm(reference)}
    if fused_supported():
        models[FUSED] = bn.convert(copy.deepcopy(reference), fuse_activation=True)
    return models


# ---------------------------------------------------------------- timing


def step_fns(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
              phase: str) -> dict[str, Callable[[], None]]:
    fns: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        if phase == "training step":
            model.train()
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

            def step(model: nn.Module = model,
                     optimizer: torch.optim.Optimizer = optimizer) -> None:
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
            fns[name] = step
        else:
            def inference(model: nn.Module = model) -> None:
                model.eval()
                with torch.no_grad():
                    model(x)
            fns[name] = inference
    return fns


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, budget: float,
                warmup: int = 2, after_round: Callable[[], None] | None = None,
                ) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, contenders in an order
    that rotates every repeat; sample ``r`` of every contender comes from the same round.

    Each sample runs the function enough times to last about ``budget`` seconds (at least
    once), as measured on the last of ``warmup`` (at least 1) untimed rounds.
    ``after_round`` runs after each round, untimed (e.g. a thread-contention probe).
    """
    return rounds(fns, calibrate(fns, budget, warmup), repeats, after_round)


def summarize(samples_ms: dict[str, list[float]]) -> dict:
    """Medians, ranges, paired batch-norm costs and their ratio for one row's samples."""

    row: dict = {"ms": {k: spread(v) for k, v in samples_ms.items()}, "cost_ms": {}}
    base = samples_ms[NONE]
    for name in NORMALIZED:
        if name in samples_ms:
            row["cost_ms"][name] = spread([a - b for a, b in zip(samples_ms[name], base,
                                                                   strict=True)])
    costs = row["cost_ms"]
    row["cost_ratio"] = {name: costs[name]["median"] / costs[TORCH]["median"]
                         if costs[TORCH]["median"] > 0 else float("nan")
                         for name in costs if name != TORCH}
    # Whole-step ratios, repeat by repeat (the contenders of a repeat ran back to back).
    row["step_ratio"] = {name: spread([a / b for a, b in zip(samples_ms[name], samples_ms[TORCH],
                                                               strict=True)])
                         for name in costs if name != TORCH}
    return row


def flags(row: dict, limit: float) -> list[str]:
    """Why a row's ratios should not be trusted (empty: nothing found)."""
    out = []
    wide = spread_flag(row["samples_ms"], limit)
    if wide:
        out.append(wide)
    noisy = [name for name, c in row["cost_ms"].items() if c["min"] <= 0]
    if noisy:
        out.append(f"BN cost within the noise: {', '.join(noisy)} (a repeat at or below no norm)")
    for name, s in row["ms"].items():
        if name != NONE and s["median"] < row["ms"][NONE]["median"] / limit:
            out.append(f"faster than no norm: {name} (cannot be)")
    return out


def measure(configs: Sequence[tuple[str, int]] = CONFIGS, phases: Sequence[str] = PHASES, *,
            repeats: int = 7, budget: float = 0.3, warmup: int = 2, load: str = "none",
            spread_limit: float = 1.5, progress: Callable[[str], None] | None = None,
            probe: Callable[[], dict] | None = None,
            flag_probe: Callable[[dict], str | None] | None = None) -> list[dict]:
    """Time every (model, batch) of ``configs`` in every phase; one row each.

    ``load`` only labels the rows ("none", or a description of the competing load
    that the caller runs around this call). ``probe`` (optional) runs before each row
    and after each of its rounds and returns a dict with a ``slowdown``; the row keeps
    the worst as ``contention``, and ``flag_probe`` turns it into a flag (or None).
    """
    rows = []
    for model_name, batch in configs:
        models = contenders(model_name)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(input_shape(model_name, batch), generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        for phase in phases:
            probes: list[dict] = [probe()] if probe else []
            after_round = (lambda probes=probes: probes.append(probe())) if probe else None
            samples = interleaved(step_fns(models, x, y, phase), repeats, budget, warmup,
                                  after_round=after_round)
            samples_ms = {k: [s * 1e3 for s in v] for k, v in samples.items()}
            row = {"model": model_name, "batch": batch, "phase": phase, "load": load,
                   "repeats": repeats, "samples_ms": samples_ms, **summarize(samples_ms)}
            row["flags"] = flags(row, spread_limit)
            if probes:
                contended([row], probes, flag_probe)
            rows.append(row)
            if progress:
                progress(f"  [end-to-end, load {load}] {model_name} batch {batch} {phase}: "
                         + ", ".join(f"{k} {v['median']:.2f} ms" for k, v in row["ms"].items()))
    return rows


# ---------------------------------------------------------------- competing load

_BUSY = """
import sys, time, torch
torch.set_num_threads({threads})
a = torch.randn(384, 384)
deadline = time.monotonic() + {seconds}
print("busy", flush=True)
while time.monotonic() < deadline:
    for _ in range(20):
        a = torch.tanh(a @ a) * 0.5
"""


@contextmanager
def busy(seconds: float, threads: int | None = None) -> Iterator[str]:
    """Another process keeping ``threads`` cores (default: all) busy with matrix products
    for at most ``seconds``; killed on exit. Yields a description of the load."""
    threads = threads or os.cpu_count() or 1
    proc = subprocess.Popen([sys.executable, "-c", _BUSY.format(threads=threads,
                                                                seconds=float(seconds))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    try:
        proc.stdout.readline()  # started (torch imported) before the timing begins
        yield f"1 process, {threads} busy threads"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# ---------------------------------------------------------------- the table


def _ms(s: dict) -> str:
    return f"{number(s['median'])} ({number(s['min'])}-{number(s['max'])})"


def table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table; the fused column only when a row has it."""
    fused = any(FUSED in r["ms"] for r in rows)
    timed = [TORCH, OURS, *([FUSED] if fused else []), NONE]
    costs = [TORCH, OURS, *([FUSED] if fused else [])]
    head = (["model", "batch", "phase", "load"] + [f"{n} ms" for n in timed]
            + [f"BN cost {'ours' if n == OURS else n} ms" for n in costs]
            + ["ours/torch.nn cost ratio"] + (["fused/torch.nn cost ratio"] if fused else [])
            + ["ours/torch.nn step", "flags"])
    lines = ["| " + " | ".join(head) + " |",
             "|---|---:|---|---|" + "---:|" * (len(head) - 5) + "---|"]
    for r in rows:
        cells = [r["model"], str(r["batch"]), r["phase"], r["load"]]
        cells += [_ms(r["ms"][n]) if n in r["ms"] else "-" for n in timed]
        cells += [_ms(r["cost_ms"][n]) if n in r["cost_ms"] else "-" for n in costs]
        for n in (OURS, *([FUSED] if fused else [])):
            ratio = r["cost_ratio"].get(n)
            cells.append("-" if ratio is None or ratio != ratio else f"{ratio:.2f}x")
        step = r["step_ratio"][OURS]
        cells.append(f"{step['median']:.2f}x ({step['min']:.2f}-{step['max']:.2f})")
        cells.append("; ".join(r["flags"]) or "ok")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(s: dict) -> str:
    return f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"


def narrow_table(rows: Sequence[dict]) -> list[str]:
    """The rows in 100 columns, two tables per load: the step ratios (ours over torch.nn,
    median (min-max) within each repeat) with the verdict (:func:`~.measure.compare`) and
    ``[n]`` for a flagged row, its flags listed under the table; then the medians of
    torch.nn's step and of each contender's batch-norm cost, in ms."""
    fused = any(FUSED in r["ms"] for r in rows)
    lines: list[str] = []
    loads = list(dict.fromkeys(r["load"] for r in rows))
    for load in loads:
        sel = [r for r in rows if r["load"] == load]
        if len(loads) > 1:
            lines += ["", f"### Load: {load}"]
        marks, notes = flag_notes([(f"{r['model']} batch {r['batch']} {r['phase']}", r["flags"])
                                   for r in sel])
        lines += ["", *markdown(
            ["model", "batch", "phase", "ours / torch.nn", "verdict",
             *(["fused / torch.nn"] if fused else []), "flags"],
            [[r["model"], str(r["batch"]), r["phase"], _ratio(r["step_ratio"][OURS]),
              compare(r["step_ratio"][OURS]),
              *([_ratio(r["step_ratio"][FUSED]) if FUSED in r["step_ratio"] else "-"]
                if fused else []), mark] for r, mark in zip(sel, marks, strict=True)],
            "lrlrl" + "r" * fused + "l")]
        lines += ["", *notes] if notes else []
        costs = [n for n in NORMALIZED if n != FUSED or fused]
        lines += ["", *markdown(
            ["model", "batch", "phase", "torch.nn ms",
             *(f"BN cost {'ours' if n == OURS else 'fused' if n == FUSED else n}" for n in costs)],
            [[r["model"], str(r["batch"]), r["phase"], number(r["ms"][TORCH]["median"]),
              *(number(r["cost_ms"][n]["median"]) if n in r["cost_ms"] else "-"
                for n in costs)]
             for r in sel], "lrl" + "r" * (1 + len(costs)))]
    return lines

