"""The CPU fast path: numba loops at memory bandwidth (:mod:`.kernel`, the kernel and its
moving-average update; :mod:`.passes`, the four passes and the inference pass; :mod:`.loops`,
the numba loops themselves).

>>> from batchnorm.kernels import cpu
>>> cpu.CPU.name
'cpu'
"""

from .kernel import (
    CPU,
    IMPORT_ERROR,
    MIN_NUMEL,
    MIN_PLAIN_NUMEL,
    CpuKernel,
    available,
    warm_up,
)

__all__ = ["CPU", "IMPORT_ERROR", "MIN_NUMEL", "MIN_PLAIN_NUMEL", "CpuKernel", "available",
           "warm_up"]
