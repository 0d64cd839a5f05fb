"""What the benchmarks share: timing contenders in rotating rounds, summarizing repeats,
comparing contenders, and markdown tables that fit the terminal."""

from __future__ import annotations

import statistics
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["WIDTH", "alternated", "calibrate", "compare", "contended", "flag_notes", "markdown",
           "number",
           "paired", "ratio_text", "rounds", "spread", "spread_flag", "wrap"]

WIDTH = 100  # columns of the benchmark's output (its --wide tables aside)


def rounds(fns: Mapping[str, Callable[[], object]], calls: dict[str, int], repeats: int,
           after_round: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` rounds, each timing ``calls[name]``
    calls of every function, in an order that rotates every round (sample ``r`` of every
    contender comes from the same round); ``after_round`` runs after each, untimed.

    >>> samples = rounds({"a": lambda: None, "b": lambda: None}, {"a": 3, "b": 1}, 2)
    >>> [len(v) for v in samples.values()]
    [2, 2]
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
        if after_round:
            after_round()
    return samples


def spread(values: list[float]) -> dict[str, float]:
    """The minimum, median and maximum of some repeats.

    >>> spread([3.0, 1.0, 2.0])
    {'min': 1.0, 'median': 2.0, 'max': 3.0}
    """
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def spread_flag(samples: Mapping[str, Sequence[float]], limit: float) -> str | None:
    """The flag for contenders whose repeats (``samples``: name -> repeats) spread wider than
    ``limit`` (max / min), or None where none does.

    >>> spread_flag({"ours": [2.0, 2.1, 3.2], "torch.nn": [1.0, 1.1, 1.2]}, 1.5)
    'spread over 1.5x: ours (up to 1.6x)'
    """
    wide = {name: max(v) / min(v) for name, v in samples.items()
            if v and min(v) > 0 and max(v) > limit * min(v)}
    if not wide:
        return None
    return f"spread over {limit:g}x: {', '.join(wide)} (up to {max(wide.values()):.1f}x)"


def contended(rows: Sequence[dict], probes: Sequence[dict],
              flag_probe: Callable[[dict], str | None] | None) -> None:
    """Note on each of ``rows`` the worst of ``probes`` (the largest ``slowdown``) as its
    ``contention``, and ``flag_probe``'s flag for it (if any) first among its ``flags``."""
    worst = max(probes, key=lambda c: c["slowdown"])
    flag = flag_probe(worst) if flag_probe else None
    for row in rows:
        row["contention"] = worst
        row["flags"][:0] = [flag] if flag else []


def paired(ours: Sequence[float], theirs: Sequence[float], target: float | None = None) -> dict:
    """Ours against another contender whose repeats ran back to back with ours' (repeat ``r``
    of both in the same round): the spread of ours' time over theirs, repeat by repeat, and
    of the difference; with a ``target`` (the most ours over theirs may be), whether the
    median ratio meets it.

    >>> row = paired([1.2, 1.1, 1.5], [1.0, 1.0, 1.0], target=1.2)
    >>> row["ratio"]["median"], row["met"]
    (1.2, True)
    """
    row: dict = {"ratio": spread([a / b for a, b in zip(ours, theirs, strict=True)]),
                 "difference": spread([a - b for a, b in zip(ours, theirs, strict=True)])}
    if target is not None:
        row.update(target=target, met=row["ratio"]["median"] <= target)
    return row


def ratio_text(ratio: Mapping[str, float]) -> str:
    """A ratio's spread as ``median (min-max)``, two decimals under 10, fewer above.

    >>> ratio_text({"min": 0.95, "median": 1.234, "max": 12.5})
    '1.23x (0.95-12.5)'
    """
    def number(v: float) -> str:
        return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"

    return f"{number(ratio['median'])}x ({number(ratio['min'])}-{number(ratio['max'])})"


def calibrate(fns: Mapping[str, Callable[[], object]], budget: float, warmup: int = 2,
              most: int = 1000) -> dict[str, int]:
    """How many calls of each function make a sample of about ``budget`` seconds (at least 1,
    at most ``most``), as timed on the last of ``warmup`` (at least 1) untimed rounds that
    call each function once."""
    calls = {}
    for _ in range(max(1, warmup)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            calls[name] = max(1, min(most, round(budget / max(time.perf_counter() - start,
                                                              1e-7))))
    return calls


def alternated(fns: Mapping[str, Callable[[], object]], repeats: int, budget: float,
               ) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` samples, contenders alternated."""
    # Warm up, alternating as below: numba loads its cache, and the heap reaches the extent
    # every contender's allocations need (until then, fresh pages fault in at some calls).
    for _ in range(3):
        for fn in fns.values():
            start = time.perf_counter()
            while time.perf_counter() - start < budget / 2:
                fn()
    return rounds(fns, calibrate(fns, budget, warmup=1, most=200), repeats)


def number(v: float) -> str:
    """A time for a table: three decimals under 1, two under 100, none above.

    >>> number(0.12345), number(12.345), number(1234.5)
    ('0.123', '12.35', '1234')
    """
    return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def compare(ratio: dict[str, float]) -> str:
    """``faster``, ``slower`` or ``equal``: ours against another contender, from the spread
    (min, median, max) of ours' time over theirs within each repeat (the two ran back to
    back): faster when every repeat says so, slower likewise, equal within the spread
    otherwise.

    >>> compare({"min": 0.8, "median": 0.9, "max": 1.05})
    'equal'
    """
    if ratio["max"] < 1:
        return "faster"
    if ratio["min"] > 1:
        return "slower"
    return "equal"


def wrap(text: str, indent: str = "") -> list[str]:
    """``text`` as lines of at most :data:`WIDTH` columns (a word longer than that, such as a
    long path, stays whole), every line after the first indented by ``indent``."""
    return textwrap.wrap(text, WIDTH, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def markdown(head: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """A markdown table: ``align`` has one letter per column, ``l`` (left) or ``r`` (right)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(head) + " |", rule,
            *("| " + " | ".join(cells) + " |" for cells in rows)]


def flag_notes(flags: Sequence[tuple[str, Sequence[str]]]) -> tuple[list[str], list[str]]:
    """Each row's flags as a mark for a narrow table (``ok``, or ``[n]``) and the notes that
    spell them out, one wrapped list item per flagged row: ``flags`` holds, per row, its
    name for the note and its flags."""
    marks, notes, flagged = [], [], 0
    for name, reasons in flags:
        if not reasons:
            marks.append("ok")
            continue
        flagged += 1
        marks.append(f"[{flagged}]")
        notes += wrap(f"- [{flagged}] {name}: {'; '.join(reasons)}", "  ")
    return marks, notes
