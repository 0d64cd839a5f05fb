"""Per-call rows of ``python -m batchnorm bench --per-call``: what one call costs in every
mode at small sizes, against ``torch.nn``'s plain module.

At 32x64 and 32x64x8x8 (batch 32, 64 features), float32 and bfloat16, each mode of
:data:`MODES` (options: :func:`batchnorm.apps.bench_modes.mode_options`; ``channels-last``
only in 4-D) is timed in three phases: a training forward pass, a training forward and
backward pass, and an inference pass (under ``torch.no_grad``). The reference is
``torch.nn.BatchNorm1d``/``BatchNorm2d`` in its plain mode on the same input (the same
shape and memory layout: channels-last for ``channels-last``, and for ``axis=-1`` in 4-D
the NCHW view of the features-last input, the same memory). Both are timed back to back
in every repeat (the order alternates; :func:`batchnorm.apps.measure.alternated`), so a row's
ratio, ours' time over torch.nn's, is a median (min-max) of ratios within a repeat; the
``extra us`` column is ours' time minus torch.nn's, likewise. A row meets its
:data:`TARGETS` (1.3 forward, 1.2 forward+backward, 1.1 inference) when its median ratio
is at most the target. The rows run in their own process, on one thread unless
``--threads`` says otherwise.
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections.abc import Callable, Sequence

from . import measure as timing
from .bench_modes import mode_options, phase_fns

SHAPES = ((32, 64), (32, 64, 8, 8))
DTYPES = ("float32", "bfloat16")
MODES = ("plain", "renorm", "ghost", "masked", "adjustment", "debias", "momentum=None",
         "unbiased", "relu", "channels-last", "axis=-1")
PHASES = ("forward", "forward+backward", "inference")
TARGETS = {"forward": 1.3, "forward+backward": 1.2, "inference": 1.1}
OURS, TORCH = "ours", "torch.nn"


def modes_for(shape: Sequence[int], modes: Sequence[str] = MODES) -> list[str]:
    """The modes of ``modes`` that apply to ``shape`` (channels-last: 4-D only)."""
    return [m for m in modes if m != "channels-last" or len(shape) == 4]


def contenders(shape: Sequence[int], dtype: str, mode: str) -> dict[str, dict[str, Callable]]:
    """Per phase, ours (in ``mode``) and torch.nn's plain module: {phase: {name: fn}}."""
    import torch

    import batchnorm as bn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tuple(shape), generator=gen).to(getattr(torch, dtype))
    dy = torch.randn(tuple(shape), generator=gen).to(x.dtype)
    options, mask = mode_options(mode, shape, gen)
    if mode == "channels-last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    # axis=-1: ours sees the features last (N, ..., C); torch.nn the same memory as N, C, ...
    inputs = {}
    if mode == "axis=-1":
        x, dy = (t.movedim(1, -1).contiguous() for t in (x, dy))
        inputs[TORCH] = (x.movedim(-1, 1), dy.movedim(-1, 1))
    ours = bn.BatchNorm(shape[1], **{"axis": 1, **options})
    plain = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(
        shape[1], eps=1e-3, momentum=0.01)
    ours_eval, plain_eval = copy.deepcopy(ours).eval(), copy.deepcopy(plain).eval()

    def ours_train(t):
        return ours(t) if mask is None else ours(t, mask=mask)

    params = [*ours.parameters(), *plain.parameters()]
    return phase_fns(x, dy, {OURS: ours_train, TORCH: plain}, {OURS: ours_eval, TORCH: plain_eval},
                     params, inputs)


def measure(shapes: Sequence[Sequence[int]] = SHAPES, dtypes: Sequence[str] = DTYPES,
            modes: Sequence[str] = MODES, phases: Sequence[str] = PHASES, *,
            repeats: int = 7, budget: float = 0.02, spread_limit: float = 1.5,
            probe: Callable[[], dict] | None = None,
            flag_probe: Callable[[dict], str | None] | None = None,
            progress: bool = False) -> list[dict]:
    """One row per shape, dtype, mode (:func:`modes_for`) and phase: ours' and torch.nn's
    repeats (ms), ours over torch.nn (:func:`~.measure.paired`), its target and flags.
    ``probe`` (optional) runs before and after each row; the worst of the two is the row's
    ``contention``, which ``flag_probe`` turns into a flag (or None)."""
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for mode in modes_for(shape, modes):
                fns = contenders(shape, dtype, mode)
                for phase in phases:
                    before = probe() if probe else None
                    samples = timing.alternated(fns[phase], repeats, budget)
                    ms = {name: [s * 1e3 for s in v] for name, v in samples.items()}
                    row = {"shape": list(shape), "dtype": dtype, "mode": mode, "phase": phase,
                           "samples_ms": ms, **timing.paired(ms[OURS], ms[TORCH], TARGETS[phase])}
                    row["flags"] = [f for f in [timing.spread_flag(ms, spread_limit)] if f]
                    if probe and before is not None:
                        timing.contended([row], [before, probe()], flag_probe)
                    rows.append(row)
                    if progress:
                        print(f"  [per call] {'x'.join(map(str, shape))} {dtype} {mode} {phase}: "
                              f"ours/torch.nn {row['ratio']['median']:.2f}x", file=sys.stderr)
    return rows


def _us(samples_ms: Sequence[float]) -> str:
    return timing.number(1e3 * statistics.median(samples_ms))


def summary(rows: Sequence[dict]) -> str:
    """How many rows meet their target, phase by phase."""
    parts = []
    for phase in dict.fromkeys(r["phase"] for r in rows):
        sel = [r for r in rows if r["phase"] == phase]
        parts.append(f"{phase} {sum(r['met'] for r in sel)}/{len(sel)} "
                     f"(target {TARGETS[phase]:g}x)")
    return "Targets met: " + ", ".join(parts) + "."


def narrow_table(rows: Sequence[dict]) -> list[str]:
    """The rows in 100 columns, a table per shape and dtype: ours' and torch.nn's median
    time per call (us), ours over torch.nn (median (min-max) of the ratio within each
    repeat), ours' extra time (median of the paired differences, us), the target with ``yes``
    where the median meets it (``no`` elsewhere), and ``[n]`` for a flagged row, its flags
    under the table."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault(("x".join(map(str, r["shape"])), r["dtype"]), []).append(r)
    lines: list[str] = []
    for (shape, dtype), sel in groups.items():
        marks, notes = timing.flag_notes([(f"{r['mode']} {r['phase']}", r["flags"]) for r in sel])
        cells = []
        for r, mark in zip(sel, marks, strict=True):
            cells.append([
                r["mode"], r["phase"], _us(r["samples_ms"][OURS]), _us(r["samples_ms"][TORCH]),
                timing.ratio_text(r["ratio"]),
                ("+" if r["difference"]["median"] > 0 else "")
                + timing.number(1e3 * r["difference"]["median"]),
                f"{r['target']:.1f}x {'yes' if r['met'] else 'no'}", mark])
        lines += ["", f"### {shape} {dtype}", "", *timing.markdown(
            ["mode", "phase", "ours us", "torch.nn us", "ours / torch.nn", "extra us", "target met",
             "flags"], cells, "llrrrrll")]
        lines += ["", *notes] if notes else []
    return lines
