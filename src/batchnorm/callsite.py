"""Where a warning points: at the user's line, not at the library's.

From Python 3.12, :func:`warnings.warn` skips the frames of this package, of torch and of
:mod:`contextlib` (its ``skip_file_prefixes``), wherever the warning comes from. Before
3.12, the caller says how far up the user's line is on the path that reaches it: each
function that warns for its caller takes a ``stacklevel`` and passes ``stacklevel + 1``
on, counted as :func:`warnings.warn` counts it (1: the function's own line).

This module imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import torch

__all__ = ["FROM_FORWARD", "warn"]

_SKIPPED = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
            os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
            os.path.abspath(contextlib.__file__))

# Where the user's call is, seen from a module's forward (as warnings.warn counts): torch's
# Module.__call__ adds two frames (_wrapped_call_impl, _call_impl).
FROM_FORWARD = 4


def warn(message: str, category: type[Warning], stacklevel: int) -> None:
    """Warn ``message`` at the user's line: ``stacklevel`` counts as :func:`warnings.warn`'s
    (1: the line that calls this function, 2: its caller's, ...); from Python 3.12 the first
    frame outside the package, torch and :mod:`contextlib` is taken instead."""
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=_SKIPPED)
    else:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
