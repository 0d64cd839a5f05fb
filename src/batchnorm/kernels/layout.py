"""How an input is walked in memory, shared by the CPU and the Triton passes.

Every input of the four-pass kernels is viewed as a contiguous ``(outer, C, inner)``
tensor in its memory order (:class:`Layout`); ghost batches assign its rows to groups
(:func:`group_rows`); a mask is laid out the same way (:func:`mask_tensor`). The passes
themselves are per device: :mod:`batchnorm.kernels.cpu.passes` (numba) and
:mod:`batchnorm.kernels.triton.passes`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from ..shapes import mask_shape

__all__ = ["Layout", "group_rows", "mask_tensor", "memory_order"]


class Layout:
    """How ``x`` is walked: its memory order, the ``(outer, C, inner)`` view, the groups."""

    def __init__(self, x: Tensor, axis: int, virtual_batch_size: int | None, ghost_layout: str):
        perm = memory_order(x)
        if perm is None or (virtual_batch_size is not None
                            and (perm[0] != 0 or perm.index(axis) == 0)):
            perm = tuple(range(x.ndim))
            self.contiguous = False  # x must be copied to a contiguous tensor first
        else:
            self.contiguous = True
        self.perm = perm
        self.inverse = tuple(perm.index(d) for d in range(x.ndim))
        self.permuted_shape = [x.shape[d] for d in perm]
        p = perm.index(axis)
        self.outer = math.prod(self.permuted_shape[:p])
        self.channels = x.shape[axis]
        self.inner = math.prod(self.permuted_shape[p + 1:])
        self.rows, self.gid = group_rows(self.outer, x.shape[0] if x.ndim else 1,
                                      virtual_batch_size, ghost_layout)
        self.groups = self.rows.shape[0]

    def view(self, t: Tensor) -> Tensor:
        """``t`` (shaped like x) as the contiguous ``(outer, C, inner)`` tensor the loops read."""
        t = t.permute(self.perm)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.view(self.outer, self.channels, self.inner)

    def empty(self, x: Tensor) -> Tensor:
        """A new tensor shaped like ``x`` in this layout's memory order: not a view, so an
        autograd Function can return it and callers may modify it in place."""
        return torch.empty_permuted(x.shape, self.perm, dtype=x.dtype, device=x.device)

    def unview(self, t3: Tensor) -> Tensor:
        """The inverse of :meth:`view`: x's shape, in x's memory order."""
        return t3.view(self.permuted_shape).permute(self.inverse)


def memory_order(x: Tensor) -> tuple[int, ...] | None:
    """The permutation that makes ``x`` contiguous, or None when there is none."""
    if x.is_contiguous():
        return tuple(range(x.ndim))
    strides = x.stride()  # x.stride(d) in a lambda types as the tuple overload
    perm = tuple(sorted(range(x.ndim), key=lambda d: (-strides[d], -x.shape[d])))
    return perm if x.permute(perm).is_contiguous() else None


@lru_cache(maxsize=64)
def group_rows(outer: int, batch: int, size: int | None, layout: str):
    """``rows`` (group -> its rows of the ``(outer, C, inner)`` view) and ``gid`` (row -> group)."""
    import numpy as np

    if size is None:
        return np.arange(outer, dtype=np.int64).reshape(1, outer), np.zeros(outer, np.int64)
    groups = batch // size
    per_sample = outer // batch
    sample = np.arange(batch, dtype=np.int64)
    if layout == "strided":  # tf_keras: sample n is in group n % groups
        members = sample.reshape(size, groups).T
    else:
        members = sample.reshape(groups, size)
    rows = (members[:, :, None] * per_sample + np.arange(per_sample)).reshape(groups, -1)
    gid = np.empty(outer, np.int64)
    gid[rows.reshape(-1)] = np.repeat(np.arange(groups, dtype=np.int64), rows.shape[1])
    return np.ascontiguousarray(rows), gid


def mask_tensor(mask: Tensor | None, x: Tensor, axis: int, layout: Layout) -> Tensor | None:
    """The mask as a contiguous ``(outer, 1 or C, inner)`` uint8 tensor in x's memory order
    (1 where a position counts), on the mask's device; None without a mask."""
    if mask is None:
        return None
    m = mask.reshape(mask_shape(mask, x, (axis,)))
    per_channel = m.shape[axis] != 1
    shape = list(x.shape)
    if not per_channel:
        shape[axis] = 1
    m = m.expand(shape).permute(layout.perm).to(torch.uint8).contiguous()
    return m.view(layout.outer, layout.channels if per_channel else 1, layout.inner)
