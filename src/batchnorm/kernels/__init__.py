"""Training-mode kernels: the same semantics, chosen by ``fused``.

A kernel takes ``(x, state, axes, **options)`` and returns ``(y, stats)``, the
normalized output and the :class:`~batchnorm.functional.BatchStatistics` of the
batch; inference is one elementwise pass and needs no kernel of its own.

- ``composite``: plain torch operations; every mode (renorm, ghost batches,
  adjustment, masks, several feature axes).
- ``native``: ATen's fused batch-norm kernel; the plain mode with one feature axis.

``fused=None`` takes the fastest kernel that supports the configuration,
``fused=True`` demands a fused one, ``fused=False`` forces ``composite``.
A GPU kernel (Triton, say) plugs in here: add a module with the same call
signature and let :func:`select` return it for the devices and
configurations it supports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from . import composite, native

__all__ = ["select", "unfused_reason"]


def unfused_reason(
    *,
    axis: int | Sequence[int] | tuple[int, ...],
    renorm: bool,
    virtual_batch_size: int | None,
    adjustment: Callable | None,
    mask: Tensor | None = None,
) -> str | None:
    """Why no fused kernel handles this configuration, or None when one does."""
    if renorm:
        return "for renorm"
    if virtual_batch_size is not None:
        return "for ghost batches (virtual_batch_size)"
    if adjustment is not None:
        return "for adjustment"
    if mask is not None:
        return "for masked inputs"
    if not isinstance(axis, int) and len(tuple(axis)) > 1:
        return "for several feature axes"
    return None


def select(fused: bool | None, *, axes: tuple[int, ...], renorm: bool,
           virtual_batch_size: int | None, adjustment: Callable | None,
           mask: Tensor | None) -> Callable:
    """The training kernel for this configuration; ``ValueError`` when ``fused=True`` has none."""
    if fused is False:
        return composite.train
    reason = unfused_reason(axis=axes, renorm=renorm, virtual_batch_size=virtual_batch_size,
                            adjustment=adjustment, mask=mask)
    if reason is None:
        return native.train
    if fused:
        raise ValueError(f"fused=True, but there is no fused kernel {reason}; "
                         "use fused=None to pick the fastest available path")
    return composite.train
