"""The GPU fast path: every training mode with one feature axis, as Triton kernels.

The four memory passes of :mod:`batchnorm.kernels.triton.passes` (statistics,
output, gradient sums, input gradient) strung together by the autograd Function
the CPU kernel uses (:mod:`batchnorm.kernels.two_pass`): two passes over memory
forward and two backward, in every mode (plain, renorm, ghost batches, masks),
NCHW or channels-last, float32, bfloat16, float16 and float64 inputs, statistics
in float32 or wider.

Registered as the ``cuda`` fast path: with ``fused=None`` it takes renorm, ghost
and masked calls, which would otherwise run as chains of small torch kernels. The
plain mode keeps cuDNN (through ATen's kernel) unless forced with
``kernels.prefer("triton")``: which is faster there is a measurement the
benchmark's GPU table makes, not an assumption.

``triton`` is optional (``pip install 'batchnorm[gpu]'``) and imported only when
a call could use it. With ``TRITON_INTERPRET=1`` set before the first import,
Triton's interpreter runs the kernels on CPU tensors: that is how the tests check
them on a machine without a GPU (slow: small shapes only).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ...config import BatchNormConfig
from ...state import BatchNormState, BatchStatistics
from .. import two_pass
from ..layout import Layout, mask_tensor
from ..protocol import KernelCall, TrainingKernel, Unprepared

__all__ = ["TRITON", "TritonKernel", "TritonPasses", "available"]

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Below this many elements fused=None keeps the fallback: a launch costs more than the data.
MIN_NUMEL = int(os.environ.get("BATCHNORM_TRITON_MIN_NUMEL", 1 << 14))


@lru_cache(maxsize=1)
def _passes_module():
    """:mod:`batchnorm.kernels.triton.passes`, imported on first use (it imports triton)."""
    from . import passes

    return passes


def available() -> str | None:
    """None when the Triton kernels can run here; else why not."""
    return _passes_module().available()


def _interpreted() -> bool:
    return bool(_passes_module().INTERPRETED)


_INDEX_CACHE: dict[tuple[int, torch.device], tuple[np.ndarray, Tensor]] = {}


def _on_device(index: np.ndarray, device: torch.device) -> Tensor:
    """A layout's row index (``rows`` or ``gid``, cached per layout by ``group_rows``) on
    ``device``, copied there once."""
    key = (id(index), device)
    hit = _INDEX_CACHE.get(key)
    if hit is None or hit[0] is not index:
        if len(_INDEX_CACHE) > 128:
            _INDEX_CACHE.clear()
        hit = _INDEX_CACHE[key] = (index, torch.from_numpy(index).to(device))
    return hit[1]


class TritonPasses:
    """The four passes as Triton kernels on the input's device."""

    def layout(self, x: Tensor, axis: int, config: BatchNormConfig) -> Layout:
        return Layout(x, axis, config.virtual_batch_size, config.ghost_layout)

    def mask(self, mask: Tensor | None, x: Tensor, axis: int, layout: Layout) -> Tensor | None:
        return mask_tensor(mask, x, axis, layout)

    def moments(self, x3: Tensor, layout: Layout, w3: Tensor | None) -> tuple[Tensor, ...]:
        rows = _on_device(layout.rows, x3.device)
        # Each (group, channel) is summed from a value of its own: sums of a float32 run
        # are accurate when the shift is near the values summed.
        first = x3[rows[:, 0], :, 0].to(torch.float64)
        if w3 is not None:  # as on the CPU: a masked-out value (padding) is no shift; 0 there
            first = torch.where(w3[rows[:, 0], :, 0].bool(), first, 0.0)
        shift = torch.nan_to_num(first, nan=0.0, posinf=0.0, neginf=0.0)
        # A masked shift may be a value the mask leaves out (padding, far from the data):
        # those sums run in float64, as on the CPU.
        run = torch.float64 if x3.dtype == torch.float64 or w3 is not None else torch.float32
        s, q, n = _passes_module().moments(x3, rows, shift.to(run).contiguous(), w3).unbind(0)
        return shift, s, q, n

    def affine(self, x3: Tensor, layout: Layout, a: Tensor, b: Tensor, y3: Tensor,
               activation: str | None = None) -> Tensor:
        return _passes_module().affine(x3, _on_device(layout.gid, x3.device), a, b, y3,
                                       activation)

    def grad_sums(self, x3: Tensor, dy3: Tensor, layout: Layout, mean: Tensor,
                  activation=None) -> tuple[Tensor, Tensor]:
        run = torch.float64 if x3.dtype == torch.float64 else torch.float32
        sums = _passes_module().grad_sums(x3, dy3.contiguous(), _on_device(layout.rows, x3.device),
                                          mean.to(run).contiguous(), activation)
        return sums[0], sums[1]

    def grad_input(self, x3: Tensor, dy3: Tensor, layout: Layout, m: Tensor, p: Tensor,
                   q: Tensor, u: Tensor, w3: Tensor | None, dx3: Tensor,
                   activation=None) -> Tensor:
        return _passes_module().grad_input(x3, dy3.contiguous(),
                                           _on_device(layout.gid, x3.device),
                                           m, p, q, u, w3, dx3, activation)


TRITON_PASSES = TritonPasses()


class TritonKernel(Unprepared):
    """Every training mode but adjustment, one feature axis; Triton on CUDA tensors (or on
    CPU tensors under Triton's interpreter)."""

    name = "triton"

    def prefers_fallback(self, x: Tensor, call: KernelCall, fallback: TrainingKernel) -> bool:
        """The plain mode keeps ATen's kernel (cuDNN); tiny inputs keep the fallback."""
        return fallback.name == "native" or x.numel() < MIN_NUMEL

    def unsupported(self, x: Tensor, state: BatchNormState, call: KernelCall) -> str | None:
        """Why this kernel does not handle the call, or None when it does."""
        if x.device.type not in ("cuda", "cpu"):
            return f"the input is on {x.device}"
        reason = available()
        if reason is not None:
            return reason
        if (x.device.type == "cpu") != _interpreted():
            return (f"the input is on {x.device}, and Triton "
                    + ("interprets (TRITON_INTERPRET=1)" if _interpreted() else "compiles")
                    + " its kernels for the other device")
        if x.dtype not in DTYPES:
            return f"dtype {x.dtype}"
        return two_pass.unsupported(x, call)

    def train(self, x: Tensor, state: BatchNormState,
              call: KernelCall) -> tuple[Tensor, BatchStatistics]:
        return two_pass.train(x, state, call, TRITON_PASSES)


TRITON = TritonKernel()
