"""What the benchmarks share: timing contenders in rotating rounds, summarizing repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["rounds", "spread"]


def rounds(fns: dict[str, Callable[[], object]], calls: dict[str, int], repeats: int,
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
