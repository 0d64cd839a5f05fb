"""Where a warning points: at the user's line, not at the library's.

This module imports nothing from the package.
"""

from __future__ import annotations

import sys
from types import FrameType

__all__ = ["user_stacklevel"]


def user_stacklevel() -> int:
    """The stacklevel of the first frame outside this package and torch: the user's call."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("batchnorm.") or name == "torch" or name.startswith("torch.")
                or name.startswith("contextlib")):
            return level
        frame, level = frame.f_back, level + 1
    return 1
