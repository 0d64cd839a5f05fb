"""The CPU fast path's four passes over memory, and its single inference pass.

Every input is viewed as a contiguous ``(outer, C, inner)`` tensor in its memory
order (:class:`batchnorm.kernels.layout.Layout`); ghost batches assign its rows to
groups. The passes (statistics, output, gradient sums, input gradient) hand these
views to the numba loops of :mod:`batchnorm.kernels.cpu.loops` and sum their
per-block partials; :func:`affine` is the inference pass. The autograd Function that
strings the passes together is in :mod:`batchnorm.kernels.two_pass`; the kernel in
:mod:`batchnorm.kernels.cpu.kernel`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ...statistics import traced
from ..layout import Layout, mask_tensor

try:  # numba is a dependency, but a missing or broken install must not break the library
    from . import loops
except Exception as error:  # pragma: no cover - depends on the environment
    loops = None  # type: ignore[assignment]  # the kernel reports IMPORT_ERROR instead
    IMPORT_ERROR: Exception | None = error
else:
    IMPORT_ERROR = None

__all__ = ["DTYPES", "IMPORT_ERROR", "MIN_ACTIVATION_NUMEL", "MIN_AFFINE_NUMEL",
           "MIN_MASKED_NUMEL", "MIN_NUMEL", "MIN_PLAIN_BFLOAT16_NUMEL", "MIN_PLAIN_NUMEL",
           "affine", "affine_pass", "grad_input_pass", "grad_sums_pass", "mask_array",
           "moments_pass"]

# Below this many elements fused=None takes the fallback (``prefers_fallback``): ATen's
# kernel for the plain mode, the composite for the others. Their per-call cost is lower
# than that of the numba launches and the glue around them, and the data is in cache
# anyway. BATCHNORM_CPU_MIN_NUMEL sets all six (0: the fast path for every input).
# The plain mode's crossover, measured (float32 NCHW, training forward and forward+backward,
# the loops' time over ATen's, paired medians; 1 thread in thread CPU time, 2 in wall time):
# 32x256x4x4 (131K) 1.9/1.7 and 2.0/1.9; 32x128x8x8 (262K) 1.07/1.30 and 1.27/1.60;
# 32x64x16x16 (524K) 0.73/0.79 and 0.87/1.11; 32x32x32x32 (1M) 0.57/0.76 and 0.66/0.95.
MIN_PLAIN_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 19))
# bfloat16 in the plain mode: ATen's kernel keeps up with the loops longer (1 thread:
# 32x64x8x8 4.3/2.7, 32x64x32x32 (2M) 1.15/0.95, 64x64x56x56 (12.8M) 0.88/1.03).
MIN_PLAIN_BFLOAT16_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 22))
MIN_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 15))
# Masks: below this the masked kernel (batchnorm.kernels.masked: one loop forward and one
# backward on the calling thread; measured, one thread, reuse allocator, forward /
# forward+backward, its time over these loops': float32 32x64x8x8 0.51/0.59, 32x64x8x16
# 0.73/0.81, 32x64x16x16 1.00/1.08, 4096x64 0.35/0.49, 8192x64 0.43/0.57; bfloat16
# 32x64x8x16 0.81/0.91, 32x64x16x16 1.18/1.27).
MIN_MASKED_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 18))
# The inference pass (affine) without an activation: below this, torch's operations.
MIN_AFFINE_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 16))
# With a fused activation the fallback is ATen's kernel (or its inference kernel) and the
# activation in place: one more pass, but ATen's glue is cheaper than the loops' below about
# 2M values (measured, 2 threads: (256, 256) ReLU forward+backward 0.74 ms against 1.01,
# inference 0.03 against 0.16; (32, 64, 32, 32): 8.9 against 8.1, 0.36 against 0.54).
MIN_ACTIVATION_NUMEL = int(os.environ.get("BATCHNORM_CPU_MIN_NUMEL", 1 << 21))
# Passes over fewer elements run on the calling thread: waking the pool costs more than
# it saves, and on a loaded machine a parallel region waits for its slowest thread.
PARALLEL_MIN_NUMEL = int(os.environ.get("BATCHNORM_CPU_PARALLEL_MIN_NUMEL", 1 << 17))
DTYPES = (torch.float32, torch.float64, torch.bfloat16)



def threads() -> int:
    """The threads a large pass runs on: torch's intra-op thread count
    (``torch.set_num_threads``, ``OMP_NUM_THREADS``), up to the threads numba started. One
    setting sizes both pools, so that a user who gives torch one thread does not get two
    from numba beside it."""
    import numba

    threads: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import
    return min(torch.get_num_threads(), threads)


def run(loop, numel: int, *args) -> None:
    """Call ``loop`` (a :class:`batchnorm.kernels.cpu.loops.Loop`) on ``args``: its serial
    flavor on the calling thread when the pass touches fewer than ``PARALLEL_MIN_NUMEL``
    values or :func:`threads` is 1; else its parallel flavor on :func:`threads` threads,
    numba's setting (per calling thread) restored after."""
    want = 1 if numel < PARALLEL_MIN_NUMEL else threads()
    if want == 1:
        loop.serial(*args)
        return
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(want)
    try:
        loop.parallel(*args)
    finally:
        numba.set_num_threads(before)


def blocks_per_item(work_items: int, limit: int) -> int:
    """How many blocks to cut each of ``work_items`` into so that every thread has a few."""
    want = 4 * threads()  # 4 when serial: the blocks' partial sums are summed the same way
    return max(1, min(limit, -(-want // max(work_items, 1))))


def run_dtype(x: Tensor) -> torch.dtype:
    """The dtype one contiguous run of values is summed in (see :mod:`.loops`)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def as_numpy(t: Tensor):
    """The array the loops read: bfloat16 as its uint16 bit patterns."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16) if hasattr(torch, "uint16") else t.view(torch.int16)
    return t.detach().numpy()


def no_mask():
    import numpy as np

    return np.zeros((0, 1, 1), np.uint8)


# ---------------------------------------------------------------- the passes


def _views(layout: Layout, arrays) -> list:
    """The ``(outer, C, inner)`` arrays as a loop over ``layout`` takes them: ``(outer, C)``
    when ``inner == 1``."""
    return [a[:, :, 0] for a in arrays] if layout.inner == 1 else list(arrays)


def _loop(name: str, layout: Layout):
    """The loop ``name`` for ``layout``: ``<name>_rows`` when ``inner == 1``, else
    ``<name>_planes``."""
    return getattr(loops, f"{name}_rows" if layout.inner == 1 else f"{name}_planes")


def _block_sums(name: str, layout: Layout, count: int, arrays, *args) -> Tensor:
    """``count`` float64 sums per (group, channel), from a statistics loop: ``name(*arrays,
    rows, *args, blocks[, cblocks], out)`` adds per-block partials into ``out``."""
    rows = layout.rows
    splits: tuple[int, ...]
    if layout.inner == 1:
        splits = (blocks_per_item(layout.groups, rows.shape[1]),)
    else:
        cblocks = blocks_per_item(layout.groups, layout.channels)
        splits = (blocks_per_item(layout.groups * cblocks, rows.shape[1]), cblocks)
    out = torch.zeros(count, layout.groups, splits[0], layout.channels, dtype=torch.float64)
    run(_loop(name, layout), arrays[0].size, *_views(layout, arrays), rows, *args, *splits,
        out.numpy())
    return out.sum(2)


def _elementwise(name: str, layout: Layout, arrays, args, out) -> None:
    """An elementwise loop: ``name(*arrays, gid, *args, blocks, out)`` writes ``out``."""
    if layout.inner == 1:
        blocks = blocks_per_item(1, layout.outer)
    else:
        blocks = blocks_per_item(layout.outer, layout.channels)
    run(_loop(name, layout), out.size, *_views(layout, arrays), layout.gid, *args, blocks,
        *_views(layout, [out]))


def _activation(activation, like) -> tuple:
    """The loops' ``(a, b, kind)`` for ``activation`` (``(name, a, b)``, or None: the identity,
    whose loops never read ``a`` and ``b``, ``like`` stands in for them)."""
    if activation is None:
        return like, like, loops.ACTIVATIONS[None]
    name, a, b = activation
    return a.numpy(), b.numpy(), loops.ACTIVATIONS[name]


def moments_pass(x3: Tensor, layout: Layout, w3: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-(group, channel) float64 ``(k, sum(w (x - k)), sum(w (x - k)**2), sum w)``."""
    rows = layout.rows
    first = x3[torch.from_numpy(rows[:, 0]), :, 0].to(torch.float64)
    if w3.shape[0]:
        # A value the mask leaves out (padding: NaN, 1e30) must not be the shift: far from the
        # data, it would cancel every digit of the float64 sums. 0 there instead.
        selected = torch.from_numpy(w3[rows[:, 0], :, 0]).bool()
        first = torch.where(selected, first, 0.0)
    shift = torch.nan_to_num(first, nan=0.0, posinf=0.0, neginf=0.0)
    # Sums of a float32 run are accurate when the shift is near the values summed; a masked
    # shift may be 0 (above), far from the data: float64 then.
    shift = shift.to(torch.float64 if w3.shape[0] else run_dtype(x3))  # exact: a value of x
    s, q, n = _block_sums("moments", layout, 3, (as_numpy(x3), w3), shift.numpy())
    return shift.to(torch.float64), s, q, n


def affine_pass(x3: Tensor, layout: Layout, a: Tensor, b: Tensor,
                y3: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``y3 = act(x3 * a + b)`` per (group, channel) (``act`` the identity for None)."""
    y3 = torch.empty_like(x3) if y3 is None else y3
    args = (a.numpy(), b.numpy(), loops.ACTIVATIONS[activation])
    _elementwise("affine", layout, (as_numpy(x3),), args, as_numpy(y3))
    return y3


def grad_sums_pass(x3: Tensor, dy3: Tensor, layout: Layout, mean: Tensor,
                   activation=None) -> tuple[Tensor, Tensor]:
    """Per-(group, channel) float64 ``(sum dy, sum dy * (x - mean))``; with ``activation``
    (``(name, a, b)``: the output pass's activation and coefficients) of
    ``dy * act'(x * a + b)`` instead of ``dy``."""
    m = mean.to(run_dtype(x3)).numpy()
    s, p = _block_sums("grad_sums", layout, 2, (as_numpy(x3), as_numpy(dy3)), m,
                       *_activation(activation, m))
    return s, p


def grad_input_pass(x3, dy3, layout: Layout, m, p, q, u, w3, dx3: Tensor,
                    activation=None) -> Tensor:
    """``dx3 = p * dy - w * (q * (x - m) + u)``; with ``activation`` (``(name, a, b)``) of
    ``dy * act'(x * a + b)`` instead of ``dy``."""
    args = [t.numpy() for t in (m, p, q, u)]
    args += _activation(activation, args[0])
    _elementwise("grad_input", layout, (as_numpy(x3), as_numpy(dy3), w3), args, as_numpy(dx3))
    return dx3


def mask_array(mask: Tensor | None, x: Tensor, axis: int, layout: Layout):
    """:func:`mask_tensor` as the array the loops read (an empty one without a mask)."""
    m = mask_tensor(mask, x, axis, layout)
    return no_mask() if m is None else m.numpy()


def affine(x: Tensor, inv: Tensor, shift: Tensor, activation: str | None = None
           ) -> Tensor | None:
    """``x * inv + shift`` (``act(x * inv + shift)`` with an ``activation``) in one pass, for
    per-feature ``inv``/``shift`` broadcast along one axis of ``x`` and no gradient; None when
    that does not apply (the caller computes it).

    Inference is this single pass; for bfloat16 inputs it also avoids torch's float32
    intermediate (read bfloat16, write float32, read float32, write bfloat16).
    """
    if torch.compiler.is_compiling():
        return None
    smallest = MIN_AFFINE_NUMEL if activation is None else MIN_ACTIVATION_NUMEL
    if (loops is None or x.device.type != "cpu" or x.dtype not in DTYPES
            or x.numel() < smallest or inv.shape != shift.shape or inv.ndim != x.ndim):
        return None
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if inv.dtype != cdtype or shift.dtype != cdtype:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or inv.requires_grad or shift.requires_grad):
        return None
    axes = [d for d in range(x.ndim) if inv.shape[d] != 1]
    if len(axes) != 1 or inv.shape[axes[0]] != x.shape[axes[0]] or traced(x):
        return None
    if type(x) is not torch.Tensor or x.layout != torch.strided:
        return None
    layout = Layout(x, axes[0], None, "strided")
    if not layout.contiguous:
        return None
    features = (1, layout.channels)
    y3 = affine_pass(layout.view(x), layout, inv.reshape(features).contiguous(),
                     shift.reshape(features).contiguous(), activation=activation)
    return layout.unview(y3)
