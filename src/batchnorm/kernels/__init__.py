"""Training-mode kernels: the same semantics, chosen per call.

A kernel is an object of the :class:`~batchnorm.kernels.protocol.TrainingKernel`
protocol: ``kernel.train(x, state, call) -> (y, stats)``, with ``call`` a
:class:`~batchnorm.kernels.protocol.KernelCall` (the configuration, the resolved
axes, ``gamma``, ``beta``, the mask, the process group). Inference is one
elementwise pass and needs no kernel of its own (:mod:`batchnorm.kernels.inference`);
a device whose fast path has an inference loop registers it in
:data:`~batchnorm.kernels.protocol.INFERENCE_PASSES`.

- ``composite``: plain torch operations; every mode (renorm, ghost batches,
  adjustment, masks, several feature axes, synchronized statistics).
- ``native``: ATen's fused batch-norm kernel; the plain mode with one feature axis.
- ``folded``: ATen's fused kernel for renorm and adjustment, their per-feature terms folded
  into its affine terms (:mod:`batchnorm.kernels.folded`); one feature axis.
- ``ghost``: ATen's fused kernel for ghost batches (one feature axis, no renorm or mask),
  each (ghost batch, feature) pair one of its channels (:mod:`batchnorm.kernels.ghost`).
- ``masked``: masks at a small call's cost: one loop forward and one backward on the
  device (:mod:`batchnorm.kernels.masked`); one
  feature axis, at dim 1 or last of a contiguous input, no renorm, ghost batches or
  adjustment.
- ``cpu``: numba loops at memory bandwidth for CPU tensors; every mode but
  adjustment, with one feature axis (:mod:`batchnorm.kernels.cpu`); also the CPU's
  inference pass.
- ``triton``: the same four passes as Triton kernels for CUDA tensors
  (:mod:`batchnorm.kernels.triton`); the ``cuda`` fast path for renorm, ghost
  batches and masks.

:func:`batchnorm.plan.select` picks one, beside the checks of the call:
``fused=False`` (or synchronized statistics) the composite; ``fused=True`` ATen's kernel,
or a ``ValueError`` where it has none; ``fused=None`` the device's fast path from
:data:`FAST_PATHS` when it takes the call and does not prefer the fallback (small
inputs), else the first of :data:`FALLBACKS` that takes the call: ATen's kernel for the
plain mode, the folded kernel for renorm and adjustment, the ghost kernel for ghost
batches, the masked kernel for masks, the composite for the others.

:func:`prefer` forces a kernel for a block of code (tests, comparisons)::

    with kernels.prefer("cpu"):      # the CPU loops wherever they support the call
        y = layer(x)

A new kernel plugs in the same way: an object implementing the protocol, in
:data:`KERNELS`, and under its device type in :data:`FAST_PATHS` (and in
:data:`~batchnorm.kernels.protocol.INFERENCE_PASSES` if it has an inference pass). The
memory layout the four-pass kernels share is :mod:`batchnorm.kernels.layout`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..statistics import UPDATE_LOOPS
from .composite import COMPOSITE
from .cpu import CPU, available
from .folded import FOLDED
from .ghost import GHOST
from .masked import MASKED
from .native import NATIVE
from .protocol import INFERENCE_PASSES, MOMENTS_PASSES, KernelCall, TrainingKernel
from .triton import TRITON

__all__ = ["FALLBACKS", "FAST_PATHS", "KERNELS", "PREFERRED", "KernelCall", "TrainingKernel",
           "prefer"]

# Every kernel by name, for prefer().
KERNELS: dict[str, TrainingKernel] = {"composite": COMPOSITE, "native": NATIVE,
                                      "folded": FOLDED, "ghost": GHOST, "masked": MASKED,
                                      "cpu": CPU, "triton": TRITON}
# What fused=None takes where the device's fast path steps aside: the first that takes the
# call (the composite takes every call).
FALLBACKS: tuple[TrainingKernel, ...] = (NATIVE, FOLDED, GHOST, MASKED, COMPOSITE)
# Device type -> the fast kernel fused=None tries first (the Triton kernel declines calls
# itself where triton is not installed).
FAST_PATHS: dict[str, TrainingKernel] = {"cuda": TRITON, **({"cpu": CPU} if available() else {})}
# Device type -> its inference pass (kernels.inference reads it), its statistics pass for small
# inputs (kernels.folded) and its moving-average update loop (statistics.prepare_update reads
# it): the CPU kernel's loops.
INFERENCE_PASSES.update({"cpu": CPU} if available() else {})
MOMENTS_PASSES.update({"cpu": CPU} if available() else {})
UPDATE_LOOPS.update({"cpu": CPU} if available() else {})
# The kernels forced by prefer() blocks, innermost last. A list (not a ContextVar) so that
# torch.compile reads it without a graph break.
PREFERRED: list[TrainingKernel] = []


@contextmanager
def prefer(name: str) -> Iterator[TrainingKernel]:
    """Within the block, training calls with ``fused=None`` use kernel ``name`` wherever it
    supports the call, whatever the size of the input (``fused=True`` still means ATen's
    kernel, ``fused=False`` and synchronized statistics the composite).

    ``name`` is one of :data:`KERNELS`; a ``ValueError`` lists them otherwise.

    >>> import torch, batchnorm as bn
    >>> with bn.kernels.prefer("composite"):
    ...     y = bn.BatchNorm(3)(torch.randn(4, 3), training=True)
    """
    kernel = KERNELS.get(name)
    if kernel is None:
        raise ValueError(f"no kernel named {name!r}: expected one of {sorted(KERNELS)}")
    PREFERRED.append(kernel)
    try:
        yield kernel
    finally:
        PREFERRED.remove(kernel)
