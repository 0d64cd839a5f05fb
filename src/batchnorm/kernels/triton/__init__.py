"""The GPU fast path: the four passes as Triton kernels (:mod:`.kernel`, the kernel;
:mod:`.passes`, the Triton kernels, imported on first use since they import ``triton``).

>>> from batchnorm.kernels import triton
>>> triton.TRITON.name
'triton'
"""

from .kernel import TRITON, TritonKernel, TritonPasses, available

__all__ = ["TRITON", "TritonKernel", "TritonPasses", "available"]
