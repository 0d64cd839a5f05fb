"""What the benchmarks share: timing contenders in rotating rounds, summarizing repeats,
comparing contenders, and markdown tables that fit the terminal."""

from __future__ import annotations

import statistics
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["WIDTH", "compare", "flag_notes", "markdown", "rounds", "spread", "wrap"]

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
