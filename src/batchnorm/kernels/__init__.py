"""Training-mode kernels: the same semantics, chosen by ``fused``.

A kernel takes ``(x, state, axes, **options)`` and returns ``(y, stats)``, the
normalized output and the :class:`~batchnorm.functional.BatchStatistics` of the
batch; inference is one elementwise pass and needs no kernel of its own.

- ``composite``: plain torch operations; every mode (renorm, ghost batches,
  adjustment, masks, several feature axes).
- ``native``: ATen's fused batch-norm kernel; the plain mode with one feature axis.

- ``synchronized`` (used by ``composite``): the moments of the global batch across
  the processes of a ``torch.distributed`` group; a synchronized call always runs
  ``composite``, whose local moments it replaces.

- ``cpu``: numba loops at memory bandwidth for CPU tensors; every mode but
  adjustment, with one feature axis (:mod:`batchnorm.kernels.cpu`).

``fused=None`` takes the fastest kernel that supports the configuration:
the device's fast path from :data:`FAST_PATHS` when it accepts the call
(checked per call: device, dtype, tracing), else ``native`` or ``composite``.
``fused=True`` demands ATen's fused kernel, ``fused=False`` forces ``composite``.

A GPU kernel (Triton, say) plugs in beside the CPU one: a module with the
kernel call signature ``train(x, state, axes, **options)``, a function
``unsupported(x, *, axes, state, **options) -> str | None`` saying why it
declines a call, and ``prefers_fallback(x, axes, *, plain) -> bool`` saying when
the fallback is faster (ATen's kernel for the plain mode, else the composite),
registered under its device type:
``FAST_PATHS["cuda"] = triton_kernel``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from types import ModuleType

from torch import Tensor

from . import composite, cpu, native

__all__ = ["FAST_PATHS", "fast_path", "require_fused", "select", "unfused_reason"]

# Device type -> fast kernel module (``train`` and ``unsupported``), tried first by fused=None.
FAST_PATHS: dict[str, ModuleType] = {"cpu": cpu} if cpu.available() else {}


def fast_path(x: Tensor, fallback: Callable, **options) -> Callable:
    """The kernel ``fused=None`` runs for this call: the device's fast path, or ``fallback``."""
    kernel = FAST_PATHS.get(x.device.type)
    if kernel is None or kernel.prefers_fallback(x, options["axes"],
                                                 plain=fallback is native.train):
        return fallback  # e.g. tiny batches: the fallback's lower per-call cost wins
    return fallback if kernel.unsupported(x, **options) is not None else kernel.train


def _dispatch(fallback: Callable, x: Tensor, state, axes, **options):
    kernel = fast_path(x, fallback, state=state, axes=axes, **options)
    return kernel(x, state, axes, **options)


def unfused_reason(
    *,
    axis: int | Sequence[int] | tuple[int, ...],
    renorm: bool,
    virtual_batch_size: int | None,
    adjustment: Callable | None,
    mask: Tensor | None = None,
    synchronized: bool = False,
) -> str | None:
    """Why no fused kernel handles this configuration, or None when one does."""
    if synchronized:
        return "for synchronized statistics (synchronized=True)"
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


def require_fused(**configuration) -> None:
    """``ValueError`` when no fused kernel handles the configuration (``fused=True``)."""
    reason = unfused_reason(**configuration)
    if reason is not None:
        raise ValueError(f"fused=True, but there is no fused kernel {reason}; "
                         "use fused=None to pick the fastest available path")


def select(fused: bool | None, *, axes: tuple[int, ...], renorm: bool,
           virtual_batch_size: int | None, adjustment: Callable | None,
           mask: Tensor | None, synchronized: bool = False) -> Callable:
    """The training kernel for this configuration; ``ValueError`` when ``fused=True`` has none.

    ``synchronized``: the statistics are global (a process group is active), which only
    ``composite`` computes.
    """
    configuration = {"axis": axes, "renorm": renorm, "virtual_batch_size": virtual_batch_size,
                     "adjustment": adjustment, "mask": mask, "synchronized": synchronized}
    if fused is False or synchronized and not fused:
        return composite.train
    if fused:
        require_fused(**configuration)
    reason = unfused_reason(**configuration)
    fallback = native.train if reason is None else composite.train
    if fused is None and FAST_PATHS:
        return partial(_dispatch, fallback)
    return fallback
