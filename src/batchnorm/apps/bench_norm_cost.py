"""Normalization's own cost inside a model, for ``python -m batchnorm bench --norm-cost``.

The models of :mod:`batchnorm.apps.bench_end_to_end`: a CIFAR-style ResNet-18 at half
width (32 to 256 channels, 20 batch norms; batch 32, 3x32x32) and the MLP (three
Linear-BatchNorm1d-ReLU at 256 features; batches 32 and 256), in a training step (forward,
cross-entropy, backward, SGD with momentum). Contenders, all built from the same weights:
``torch.nn`` (the model as built), ``ours`` (``bn.convert``) and ``fused``
(``bn.convert(model, fuse_activation=True)``: each batch norm whose output goes only to a
ReLU computes it, ``activation="relu"``, and the ReLU module becomes ``nn.Identity``).

Per-layer timers. A *unit* is a batch norm, with the ReLU that ``fuse_activation`` fuses
into it where there is one (the module called right after it that the fused model holds as
``nn.Identity``; ResNet-18: 9 of its 20 batch norms, the MLP: all 3). Every contender gets
the same timers on the same modules (:class:`LayerTimers`): ``time.perf_counter`` in a
forward pre-hook of the batch norm and in forward hooks of the batch norm and of the unit's
activation; for backward, gradient hooks on the batch norm's input (``Tensor.register_hook``:
called when the gradient of the input is complete, as the batch norm's backward ends) and on
the outputs of the batch norm and of the activation (called as their backward begins).
So a hook fires at each edge, the same hooks in every contender, and the
hooks' own overhead (a Python call and a clock read each, and in forward the registration
of the gradient hooks) is in every contender's sums alike: it pulls their ratios toward 1.
The rows give, per contender, the timers' whole overhead per step: the timed model's step
minus its untimed copy's, round by round. The norm layers' time is the sum over the layers
of the batch norm alone; the unit's time adds the activation (torch.nn's ReLU, the fused
model's Identity).

Rows per model and batch: ``norm`` (ours against torch.nn's batch norms) and
``norm+ReLU fused`` (the fused model's units against torch.nn's batch norm plus ReLU), each
forward, backward and both, summed over the layers and averaged over a sample's steps;
``whole step`` and ``whole step fused`` (ours and fused against torch.nn) on copies of the
models without timers. The six (three timed, three whole) run in rounds, in an order that rotates
(:func:`batchnorm.apps.measure.rounds`): ratios are medians (min-max) of the ratios within a
round. Targets (:data:`TARGETS`): ours at most 0.6x torch.nn's normalization cost on the
ResNet, 1.0x on the MLP; the whole step at most 1.0x (no slower).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import bench_end_to_end as e2e
from .measure import (
    calibrate,
    contended,
    flag_notes,
    markdown,
    number,
    paired,
    ratio_text,
    rounds,
    spread,
    spread_flag,
    wrap,
)

CONFIGS = (("resnet18", 32), ("mlp", 32), ("mlp", 256))
BUILD = {"resnet18": {"width": 32}, "mlp": {}}  # half-width ResNet-18
TARGETS = {"resnet18": 0.6, "mlp": 1.0}
STEP_TARGET = 1.0
TORCH, OURS, FUSED = "torch.nn", "ours", "fused"
PARTS = ("forward", "backward", "forward+backward")


def units(reference: nn.Module, fused: nn.Module, x: torch.Tensor) -> list[tuple[str, str | None]]:
    """The (batch norm, fused activation or None) module names of ``reference``: the
    activation is the module called right after the batch norm (one forward of ``x``, in
    eval mode: no statistic moves) that is a ReLU in ``reference`` and an ``nn.Identity``
    in ``fused`` (``bn.convert(reference, fuse_activation=True)``)."""
    modules, fused_modules = dict(reference.named_modules()), dict(fused.named_modules())
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
               for name, m in modules.items() if not list(m.children())]
    training = reference.training
    try:
        with torch.no_grad():
            reference.eval()(x)
    finally:
        reference.train(training)
        for handle in handles:
            handle.remove()
    out = []
    for name, following in zip(order, [*order[1:], None], strict=True):
        if isinstance(modules[name], nn.modules.batchnorm._BatchNorm):
            fused_with = (following if following is not None
                          and isinstance(modules[following], nn.ReLU)
                          and isinstance(fused_modules.get(following), nn.Identity) else None)
            out.append((name, fused_with))
    return out


class LayerTimers:
    """Timers on a model's units (:func:`units`; the same names in every contender): per
    training step, the seconds spent in the batch norms alone (``norm``) and in the units
    (``unit``: with the activation), forward and backward, summed over the units."""

    def __init__(self, model: nn.Module, model_units: Sequence[tuple[str, str | None]]):
        self.totals = {f"{what} {part}": 0.0 for what in ("norm", "unit")
                       for part in ("forward", "backward")}
        self.handles = []
        for norm_name, act_name in model_units:
            norm = model.get_submodule(norm_name)
            act = model.get_submodule(act_name) if act_name else None
            self.handles += self._hook(norm, act)

    def _hook(self, norm: nn.Module, act: nn.Module | None) -> list:
        clock, totals = time.perf_counter, self.totals
        marks: dict[str, float] = {}

        def add(key: str, since: str, now: float) -> None:
            totals[key] += now - marks[since]

        def input_done(_grad):  # the batch norm's backward ends
            now = clock()
            add("norm backward", "norm backward", now)
            # The unit's backward begins with its activation's, or with the batch norm's
            # where the activation hands its input on unchanged (an Identity: one tensor,
            # whose hooks run in the order registered, the batch norm's first).
            totals["unit backward"] += now - min(marks["unit backward"], marks["norm backward"])

        def norm_output_grad(_grad):
            marks["norm backward"] = clock()
            if act is None:
                marks["unit backward"] = marks["norm backward"]

        def act_output_grad(_grad):
            marks["unit backward"] = clock()

        def norm_pre(_module, args):
            if args[0].requires_grad:
                args[0].register_hook(input_done)
            marks["forward"] = clock()

        def norm_post(_module, _args, output):
            now = clock()
            add("norm forward", "forward", now)
            if act is None:
                add("unit forward", "forward", now)
            if output.requires_grad:
                output.register_hook(norm_output_grad)

        def act_post(_module, _args, output):
            add("unit forward", "forward", clock())
            if output.requires_grad:
                output.register_hook(act_output_grad)

        handles = [norm.register_forward_pre_hook(norm_pre), norm.register_forward_hook(norm_post)]
        if act is not None:
            handles.append(act.register_forward_hook(act_post))
        return handles

    def take(self) -> dict[str, float]:
        """The totals since the last take, and reset them."""
        out = dict(self.totals)
        for key in self.totals:
            self.totals[key] = 0.0
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(configs: Sequence[tuple[str, int]] = CONFIGS, *, repeats: int = 7,
            budget: float = 0.3, warmup: int = 2, spread_limit: float = 1.5,
            probe: Callable[[], dict] | None = None,
            flag_probe: Callable[[dict], str | None] | None = None,
            progress: bool = False) -> list[dict]:
    """Rows for every (model, batch) of ``configs`` (see the module's docstring): per row,
    ``samples_ms`` of ours and torch.nn, ours over torch.nn (:func:`~.measure.paired`) with
    its target, and flags. ``probe`` (optional) runs before the rounds of a model and after
    each round; the worst is its rows' ``contention``, which ``flag_probe`` turns into a
    flag (or None)."""
    rows: list[dict] = []
    for model_name, batch in configs:
        probes: list[dict] = [] if probe is None else [probe()]
        layer_ms, step_ms, overhead_ms = _time_model(model_name, batch, repeats, budget, warmup,
                                                     _appending(probe, probes))
        target = TARGETS[model_name]
        new = [_row(model_name, batch, part, phase, ours_ms[phase], torch_ms[phase], target,
                    spread_limit)
               for part, ours_ms, torch_ms in (
                   ("norm", layer_ms[OURS]["norm"], layer_ms[TORCH]["norm"]),
                   ("norm+ReLU fused", layer_ms[FUSED]["unit"], layer_ms[TORCH]["unit"]))
               for phase in PARTS]
        new += [_row(model_name, batch, part, "training step", step_ms[name], step_ms[TORCH],
                     STEP_TARGET, spread_limit)
                for part, name in (("whole step", OURS), ("whole step fused", FUSED))]
        for row in new:
            row["timer_overhead_ms"] = {name: spread(v) for name, v in overhead_ms.items()}
        if probes:
            contended(new, probes, flag_probe)
        for row in new if progress else []:
            print(f"  [norm cost] {model_name} batch {batch} {row['part']} {row['phase']}: "
                  f"ours/torch.nn {row['ratio']['median']:.2f}x", file=sys.stderr)
        rows += new
    return rows


def _time_model(model_name: str, batch: int, repeats: int, budget: float, warmup: int,
                after_round: Callable[[], object] | None):
    """One model's timings: per contender, the timed models' layer sums
    (:func:`_per_sample`), the untimed copies' whole steps (ms samples), and the timers'
    overhead: the timed model's step minus the untimed copy's, round by round (ms)."""
    models = e2e.contenders(model_name, **BUILD[model_name])
    if e2e.FUSED not in models:
        raise RuntimeError("bn.convert takes no fuse_activation: nothing to time fused")
    named = {TORCH: models[e2e.TORCH], OURS: models[e2e.OURS], FUSED: models[e2e.FUSED]}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(e2e.input_shape(model_name, batch), generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    model_units = units(named[TORCH], named[FUSED], x)
    whole = {name: copy.deepcopy(model) for name, model in named.items()}
    timers = {name: LayerTimers(model, model_units) for name, model in named.items()}
    steps = e2e.step_fns(named, x, y, "training step")
    logs: dict[str, list[dict[str, float]]] = {name: [] for name in named}

    def timed(name: str) -> Callable[[], None]:
        def run() -> None:
            steps[name]()
            logs[name].append(timers[name].take())
        return run

    fns: dict[str, Callable[[], None]] = {f"{name} layers": timed(name) for name in named}
    fns.update(e2e.step_fns(whole, x, y, "training step"))
    calls = calibrate(fns, budget, warmup)
    for log in logs.values():
        log.clear()  # the calibration's steps
    try:
        samples = rounds(fns, calls, repeats, after_round)
    finally:
        for timer in timers.values():
            timer.remove()
    return ({name: _per_sample(logs[name], calls[f"{name} layers"]) for name in named},
            {name: [1e3 * s for s in samples[name]] for name in named},
            {name: [1e3 * (a - b) for a, b in zip(samples[f"{name} layers"], samples[name],
                                                  strict=True)] for name in named})


def _per_sample(log: list[dict[str, float]], calls: int) -> dict[str, dict[str, list[float]]]:
    """Each sample's mean per step (ms), from the timers' totals of its ``calls`` steps:
    {"norm" or "unit": {part: samples}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for what in ("norm", "unit"):
        per_step = {part: [1e3 * t[f"{what} {part}"] for t in log]
                    for part in ("forward", "backward")}
        per_step["forward+backward"] = [f + b for f, b in zip(per_step["forward"],
                                                              per_step["backward"], strict=True)]
        out[what] = {part: [statistics.fmean(v[i:i + calls]) for i in range(0, len(v), calls)]
                     for part, v in per_step.items()}
    return out


def _row(model: str, batch: int, part: str, phase: str, ours: list[float], theirs: list[float],
         target: float, spread_limit: float) -> dict:
    samples = {OURS: ours, TORCH: theirs}
    return {"model": model, "batch": batch, "part": part, "phase": phase, "samples_ms": samples,
            **paired(ours, theirs, target),
            "flags": [f for f in [spread_flag(samples, spread_limit)] if f]}


def _ms(samples: Sequence[float]) -> str:
    return number(statistics.median(samples))


def narrow_table(rows: Sequence[dict]) -> list[str]:
    """The rows in 100 columns, a table per model and batch: torch.nn's and ours' median time
    (ms per step, summed over the layers for the norm rows), ours over torch.nn (median
    (min-max) of the ratio within each round), the target with ``yes`` where the median
    meets it (``no`` elsewhere), ``[n]`` for a flagged row, its flags under the table; then
    the timers' overhead per step of each contender."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    lines: list[str] = []
    for (model, batch), sel in groups.items():
        marks, notes = flag_notes([(f"{r['part']} {r['phase']}", r["flags"]) for r in sel])
        cells = [[r["part"], r["phase"], _ms(r["samples_ms"][TORCH]), _ms(r["samples_ms"][OURS]),
                  ratio_text(r["ratio"]), f"{r['target']:.1f}x {'yes' if r['met'] else 'no'}",
                  mark] for r, mark in zip(sel, marks, strict=True)]
        lines += ["", f"### {model}, batch {batch}", "", *markdown(
            ["part", "phase", "torch.nn ms", "ours ms", "ours / torch.nn", "target met",
             "flags"], cells, "llrrrll")]
        lines += ["", *notes] if notes else []
        overhead = sel[0].get("timer_overhead_ms")
        if overhead:
            each = ", ".join(f"{name} {number(v['median'])} ({number(v['min'])} to "
                             f"{number(v['max'])})" for name, v in overhead.items())
            lines += ["", *wrap("Timers' overhead per step (the timed model's step minus the "
                                f"untimed copy's, median (min-max) of the rounds, ms): {each}.")]
    return lines


def _appending(probe: Callable[[], dict] | None, probes: list[dict]
               ) -> Callable[[], None] | None:
    """A callable that appends ``probe()`` to ``probes``, or None without a probe."""
    if probe is None:
        return None
    return lambda: probes.append(probe())
