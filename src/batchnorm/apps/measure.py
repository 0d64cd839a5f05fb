"""What the benchmarks share: summarizing repeated timings."""

from __future__ import annotations

import statistics

__all__ = ["spread"]


def spread(values: list[float]) -> dict[str, float]:
    """The minimum, median and maximum of some repeats.

    >>> spread([3.0, 1.0, 2.0])
    {'min': 1.0, 'median': 2.0, 'max': 3.0}
    """
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
