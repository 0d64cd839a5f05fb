"""Synchronized batch statistics across processes, on ``torch.distributed``.

When a model trains data-parallel, each process sees a slice of the batch; with
``BatchNorm(..., synchronized=True)`` (or :func:`convert_sync`), training-mode
statistics are those of the global batch, the union of every process's slice
in the group, with exact gradients:

- forward: each process computes ``(count, mean, M2)`` per feature of its slice
  (two-pass, in the statistics' dtype), and one packed ``all_gather`` lets every
  process combine them with the parallel-variance formula into the same global
  mean and variance; the moving averages are updated with them, so they stay
  identical across processes;
- backward: one packed ``all_reduce`` sums the gradients of the global mean and
  variance over processes, so each input receives the gradient of the sum of
  every process's loss (what ``DistributedDataParallel``'s gradient averaging
  expects, as with ``torch.nn.SyncBatchNorm``).

Any backend works (gloo on CPU, nccl on GPU), with renorm (``r`` and ``d`` from
the global statistics), masks (the count is the masked count), uneven slices
and processes with zero samples (they still take part in both collectives).

Local statistics are used in inference, with ghost batches (each process forms
and normalizes its own ghost batches, and its moving averages follow its own
groups: synchronizing them would make them larger, defeating their purpose),
and when ``torch.distributed`` is not initialized (a warning, once).

Every process of the group must call a synchronized layer in training mode the
same number of times, in the same order, and run backward through it if any
does. If a process dies or stops calling, the others raise a ``RuntimeError``
once the group's timeout expires instead of waiting forever: set it with
``torch.distributed.init_process_group(backend, timeout=timedelta(minutes=5))``
or ``torch.distributed.new_group(ranks, timeout=...)`` (gloo honours it for
every collective; nccl's watchdog aborts the process after it, see
``TORCH_NCCL_ASYNC_ERROR_HANDLING``).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .kernels.synchronized import global_moments
from .layer import BatchNorm

__all__ = ["convert_sync", "global_moments"]


def convert_sync(module: nn.Module, process_group: Any = None, *,
                 enabled: bool = True) -> nn.Module:
    """Turn synchronized statistics on (or, ``enabled=False``, off) for every BatchNorm in
    ``module``, in place; return ``module``.

    ``process_group`` (None: the default group) is the group synchronized over.
    A layer built with ``fused=True`` cannot be synchronized, and ``torch.nn`` batch
    norms are not changed by this function (``bn.convert(model)`` them first): either
    raises a ``ValueError`` naming the layers before any layer changes (for
    ``enabled=False``, only a ``torch.nn.SyncBatchNorm``, which would stay synchronized).
    A model without any batch norm is returned unchanged with a warning.

    >>> import torch, batchnorm as bn
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), bn.BatchNorm(8))
    >>> model = bn.convert_sync(model)      # then wrap it in DistributedDataParallel
    >>> model[1]
    BatchNorm(8, axis=1, momentum=0.99, epsilon=0.001, synchronized=True)
    >>> model = bn.convert_sync(model, enabled=False)
    >>> model[1].synchronized
    False
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    layers = [(name, m) for name, m in module.named_modules() if isinstance(m, BatchNorm)]
    theirs = [(name or type(module).__name__, m) for name, m in module.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if enabled and theirs:
        raise ValueError(
            f"convert_sync: layer(s) {[name for name, _ in theirs]} are torch.nn batch norms, "
            "which convert_sync does not change; convert them first: "
            "model = bn.convert_sync(bn.convert(model)) (or keep torch's layers and use "
            "torch.nn.SyncBatchNorm.convert_sync_batchnorm)")
    synced = [name for name, m in theirs if isinstance(m, nn.SyncBatchNorm)]
    if not enabled and synced:
        raise ValueError(
            f"convert_sync(enabled=False): layer(s) {synced} are torch.nn.SyncBatchNorm, which "
            "convert_sync does not change and would stay synchronized; convert them first: "
            "bn.convert_sync(bn.convert(model), enabled=False)")
    if not layers and not theirs:
        warnings.warn(f"convert_sync: {type(module).__name__} contains no batch norm layer; "
                      "nothing was changed", UserWarning, stacklevel=2)
    if enabled:
        fused = [name or type(module).__name__ for name, m in layers if m.fused]
        if fused:
            raise ValueError(
                f"convert_sync: layer(s) {fused} have fused=True, which has no synchronized "
                "kernel; build them with fused=None")
    for _, layer in layers:
        layer.reconfigure(synchronized=enabled, process_group=process_group if enabled else None)
    return module
