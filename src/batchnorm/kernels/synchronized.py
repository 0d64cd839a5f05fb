"""Moments of the global batch across the processes of a ``torch.distributed`` group.

The composite kernel computes each process's moments and, when synchronized,
replaces them by those of the union of every process's values with
:func:`global_moments`: one packed ``all_gather`` of ``(count, mean, M2)`` per
feature in the forward pass (after a fixed-size header, below), one packed
``all_reduce`` of the gradients of the global mean and variance in the backward
pass. Any backend works (gloo, nccl).

The combination is the parallel-variance formula (Chan, Golub and LeVeque),
numerically stable in the statistics' dtype, with no ``E[x^2] - E[x]^2``::

    N = sum n_i,   mean = sum n_i m_i / N,   M2 = sum M2_i + sum n_i (m_i - mean)^2

Its gradient, for the global statistics' summed upstream gradients ``G_mean`` and
``G_var`` (summed over processes: every process's loss depends on them)::

    dL/dm_i  = (G_mean + 2 G_var (m_i - mean)) n_i / N
    dL/dM2_i = G_var / N

from which autograd continues into each process's input through ``m_i`` and
``M2_i``: ``dL/dx = (G_mean + 2 G_var (x - mean)) / N`` per selected value,
which is the gradient of the sum of every process's loss.

Before the statistics, the processes check that they agree on what they are
about to exchange: one ``all_gather`` of a fixed-size header, 16 int64 per
process (128 bytes), whatever the number of features: a protocol version, the
statistics' shape, dtype and device type, whether the count is per feature (a
mask) or one number, and the caller's ``mode``; and, where the count is one
number (no mask), the process's count itself, which every process adds up: a
global batch of one value per feature has no variance, and every process raises
the ``ValueError`` a single process raises for it (with a mask the count is a
tensor on the device, and a feature with fewer than two selected values is
normalized with the moving statistics and left out of the update, as in one
process). It is sent first, and is the
same size on every process, so it cannot itself mismatch; the packed
statistics, whose size depends on the features and dtype, are only exchanged
once every process has seen that every header equals its own. Otherwise every
process raises the same ``ValueError``, naming each process's values, and
nothing was combined: a layer's moving averages stay as they were, and the
group stays usable (every process has completed the same collectives).

Its cost, per synchronized forward call (none in backward, none with a group of
one process):

- one extra collective of ``16 * 8 * world_size`` bytes, latency-bound;
- tensors on the CPU, or a group with a CPU backend (gloo, or
  ``init_process_group("cpu:gloo,cuda:nccl")``, which is what
  ``init_process_group()`` without a backend creates when CUDA is available):
  the header travels on the CPU, so there is no device synchronization;
- a group with no CPU backend (``init_process_group("nccl")``): the header
  travels on the statistics' device and is read back, one small
  device-to-host copy, which waits for the work queued before it on the
  stream (one host synchronization per synchronized layer per forward pass).

The check is not skipped after a first agreement: a process cannot know,
without reading the others' headers, that they still agree (a rank that calls
the layers in another order sends another layer's statistics), and a cache
that let some processes skip the header while others sent it would itself
desynchronize the collectives.
"""

from __future__ import annotations

import warnings
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from ..statistics import merge_moments

__all__ = ["global_moments", "resolve_group"]

_warned_uninitialized = False


def resolve_group(process_group=None):
    """The group to synchronize over, or None (local statistics) when torch.distributed is not
    initialized; that case warns once per process."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD if process_group is None else process_group
    global _warned_uninitialized
    if not _warned_uninitialized:
        _warned_uninitialized = True
        warnings.warn(
            "BatchNorm(synchronized=True): torch.distributed is not initialized, so batch "
            "statistics are those of this process only; call "
            "torch.distributed.init_process_group() first to synchronize them (warned once)",
            RuntimeWarning, stacklevel=4)
    return None


def _collective(op, *args, group) -> None:
    try:
        op(*args, group=group)
    except RuntimeError as error:
        size = dist.get_world_size(group)
        raise RuntimeError(
            f"BatchNorm(synchronized=True): synchronizing statistics across the {size} "
            "processes of the group failed. A process may have died, or stopped calling this "
            "layer (every process must call it, in training mode, in the same order, and run "
            "backward through it; one that runs it with synchronized=False or with ghost "
            "batches, whose statistics are local, takes no part). The wait is bounded by the "
            "group's timeout: "
            "init_process_group(timeout=...) or new_group(timeout=...). Cause: "
            f"{error}") from error


# ---------------------------------------------------------------- the agreement header

PROTOCOL_VERSION = 2  # 2: the count slot (version 1 sent a sixth dimension there)
_MAGIC = int.from_bytes(b"bnsync", "big") << 16  # the top bits of slot 0; the version below
# 16 int64: 128 bytes, never the size of the packed statistics (a multiple of 3 values of 2,
# 4 or 8 bytes), so that a process that reached the statistics' collective while another
# sends its header cannot have its bytes silently taken for statistics.
_SLOTS = 16
_SHOWN_DIMS = 5  # dimensions of the statistics' shape sent in full; the rest by hash
_MODE_BYTES = 16  # bytes of the mode shown in messages; the whole mode is compared by hash
_DTYPES = ("float64", "float32", "float16", "bfloat16")
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "privateuseone", "meta")
# slots
_VERSION, _DTYPE, _DEVICE, _PER_FEATURE, _NDIM, _NUMEL, _SHAPE_HASH, _MODE_HASH = range(8)
_MODE_TEXT = 8  # and 9
_COUNT = 10  # this process's values per feature, -1 for per-feature counts: may differ
_DIMS = 11  # to 15


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _code(name: str, table: tuple) -> int:
    """A small code for a name of ``table``; otherwise a hash, above every small code."""
    return table.index(name) + 1 if name in table else (1 << 32) + _crc(name)


def _name(code: int, table: tuple) -> str:
    return table[code - 1] if 0 < code <= len(table) else f"unknown ({code})"


def _header(mean: Tensor, count: int | Tensor, mode: str) -> list[int]:
    """What this process is about to exchange, as ``_SLOTS`` integers."""
    per_feature = isinstance(count, Tensor)
    shape = tuple(mean.shape)
    text = mode.encode()[:_MODE_BYTES].ljust(_MODE_BYTES, b"\0")
    dims = [*shape[:_SHOWN_DIMS], *[-1] * (_SHOWN_DIMS - min(len(shape), _SHOWN_DIMS))]
    return [
        _MAGIC | PROTOCOL_VERSION,
        _code(str(mean.dtype).removeprefix("torch."), _DTYPES),
        _code(mean.device.type, _DEVICE_TYPES),
        int(per_feature),
        len(shape),
        mean.numel(),
        _crc(repr(shape)),
        _crc(mode),
        int.from_bytes(text[:8], "big", signed=True),
        int.from_bytes(text[8:], "big", signed=True),
        -1 if per_feature else int(count),
        *dims,
    ]


_FIELDS = {  # what a difference in these slots means, for the message
    "protocol": (_VERSION,),
    "feature shape": (_NDIM, _NUMEL, _SHAPE_HASH, *range(_DIMS, _SLOTS)),
    "dtype": (_DTYPE,),
    "device type": (_DEVICE,),
    "mask": (_PER_FEATURE,),
    "mode": (_MODE_HASH, _MODE_TEXT, _MODE_TEXT + 1),
}


def _describe(row: list[int]) -> str:
    """One process's header in words."""
    if row[_VERSION] >> 16 != _MAGIC >> 16:
        return ("no batchnorm synchronization header (it is running another collective: "
                "calls in another order, or another program)")
    if row[_VERSION] != _MAGIC | PROTOCOL_VERSION:
        return f"batchnorm synchronization protocol version {row[_VERSION] & 0xFFFF}"
    ndim, numel = row[_NDIM], row[_NUMEL]
    if ndim <= _SHOWN_DIMS:
        shape = repr(tuple(row[_DIMS:_DIMS + ndim]))
    else:
        shape = f"{ndim} dimensions (hash {row[_SHAPE_HASH]:#x})"
    text = b"".join(v.to_bytes(8, "big", signed=True) for v in row[_MODE_TEXT:_MODE_TEXT + 2])
    mode = text.rstrip(b"\0").decode(errors="replace")
    described = (
        f"{numel} feature{'s' if numel != 1 else ''} (statistics of shape {shape}) in "
        f"{_name(row[_DTYPE], _DTYPES)} on "
        f"{_name(row[_DEVICE], _DEVICE_TYPES)}, "
        + ("with a mask (per-feature counts)" if row[_PER_FEATURE] else "without a mask"))
    return described + (f", mode {mode!r}" if mode or row[_MODE_HASH] != _crc("") else "")


def _global_rank(group, rank: int) -> int:
    try:
        return dist.get_global_rank(group, rank)
    except (RuntimeError, ValueError, AttributeError):
        return rank


def _mismatch(rows: list[list[int]], group) -> ValueError:
    differ = [field for field, slots in _FIELDS.items()
              if any(row[i] != rows[0][i] for row in rows for i in slots)]
    if "protocol" in differ:  # the other slots of another protocol mean nothing here
        differ = ["protocol"]
    by_description: dict[str, list[int]] = {}
    for rank, row in enumerate(rows):
        by_description.setdefault(_describe(row), []).append(_global_rank(group, rank))
    parts = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} "
             f"ha{'ve' if len(ranks) > 1 else 's'} {description}"
             for description, ranks in by_description.items()]
    return ValueError(
        "BatchNorm(synchronized=True): the processes of the group disagree on the statistics "
        f"they synchronize ({', '.join(differ)} differ{'s' if len(differ) == 1 else ''}): "
        f"{'; '.join(parts)}. Every process must call each synchronized layer, in the same "
        "order, with inputs of the same feature shape and dtype on the same device type, and "
        "with a mask on every process or on none (pass an all-True mask where nothing is "
        "masked). Nothing was exchanged: the moving statistics are unchanged on every "
        "process, and the group can be used again.")


def _header_device(device: torch.device, group) -> torch.device:
    """The CPU when the group can take CPU tensors (no device synchronization), else
    ``device``."""
    if device.type != "cpu":
        try:
            if torch.device("cpu") not in group._device_types:
                return device
        except (AttributeError, RuntimeError):
            return device
    return torch.device("cpu")


def _check_agreement(mean: Tensor, count: int | Tensor, mode: str, group) -> list[int]:
    """Raise a ValueError on every process unless every process sends the same header; return
    each process's count (-1 for per-feature counts)."""
    header = _header(mean, count, mode)
    sent = torch.tensor(header, dtype=torch.int64, device=_header_device(mean.device, group))
    rows = _all_gather(sent, group).tolist()  # on a device: the one host synchronization
    if any(row[:_COUNT] + row[_COUNT + 1:] != header[:_COUNT] + header[_COUNT + 1:]
           for row in rows):
        raise _mismatch(rows, group)
    return [row[_COUNT] for row in rows]


def _check_global_count(counts: list[int], shape: tuple[int, ...], group) -> None:
    """Raise the single-process ``ValueError`` on every process when the processes' values per
    feature (one number each, the same list on every process) add up to exactly one."""
    if sum(counts) != 1:  # none (an empty global batch passes, as in one process) or enough
        return
    ranks = ", ".join(f"rank {_global_rank(group, rank)}: {count}"
                      for rank, count in enumerate(counts))
    raise ValueError(
        "training-mode batch normalization needs more than one value per feature to compute "
        f"a variance, got 1 value per feature in the global batch of the {len(counts)} "
        f"process(es) of the group (statistics of shape {shape}; values per feature by "
        f"process: {ranks}). Normalizing it would map every value to beta (TensorFlow "
        "silently returns zeros here). Use a larger batch, or training=False. Nothing was "
        "exchanged but the counts: the moving statistics are unchanged on every process.")


# ---------------------------------------------------------------- the statistics


def _all_gather(packed: Tensor, group) -> Tensor:
    """Every process's ``packed``, stacked along a new leading axis: one collective."""
    size = dist.get_world_size(group)
    out = packed.new_empty((size * packed.shape[0], *packed.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _collective(gather, out, packed, group=group)
    return out.view(size, *packed.shape)


class _GlobalMoments(torch.autograd.Function):
    """(local mean, local M2) -> (global mean, global variance); counts carry no gradient."""

    @staticmethod
    def forward(ctx, mean: Tensor, m2: Tensor, count: Tensor, group):
        counts, means, m2s = _all_gather(torch.stack([count, mean, m2]), group).unbind(1)
        total, global_mean, global_m2 = merge_moments(counts, means, m2s)
        safe = total.clamp_min(1)  # no process has a value: 0, not NaN
        ctx.save_for_backward(mean, count, global_mean, safe)
        ctx.group = group
        ctx.mark_non_differentiable(total)
        return global_mean, global_m2 / safe, total

    @staticmethod
    def backward(ctx, grad_mean: Tensor, grad_variance: Tensor, _grad_count):
        mean, count, global_mean, safe = ctx.saved_tensors
        summed = torch.stack([grad_mean, grad_variance]).contiguous()
        _collective(dist.all_reduce, summed, group=ctx.group)
        g_mean, g_variance = summed.unbind(0)
        grad_local_mean = (g_mean + 2 * g_variance * (mean - global_mean)) * (count / safe)
        return grad_local_mean, g_variance / safe, None, None


def global_moments(
    mean: Tensor, variance: Tensor, count: int | Tensor, group, *, mode: str = ""
) -> tuple[Tensor, Tensor, Tensor]:
    """The mean, biased variance and count of every process's values together.

    Each process passes the moments of its own values (``count`` an int or a
    tensor broadcastable to ``mean``; with 0 values, mean and variance may be
    NaN) and receives the same global ones, differentiable with respect to its
    own ``mean`` and ``variance``. Every process of ``group`` must call it, and
    run backward through it if any does.

    Every process must pass statistics of the same shape, dtype and device type,
    the count in the same form (a tensor, as a mask gives, or a number) and the
    same ``mode`` (any string describing the caller's configuration, e.g.
    ``"renorm"``): otherwise every process raises a ``ValueError`` naming each
    process's values, before any statistics are exchanged.

    Example (under ``torchrun --nproc_per_node=2``, process ``r`` holding ``x_r``)::

        variance, mean = torch.var_mean(x_r, dim=0, correction=0)
        mean, variance, count = global_moments(mean, variance, len(x_r), dist.group.WORLD)
        # the moments of torch.cat([x_0, x_1])
    """
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {mode!r}")
    if dist.get_world_size(group) > 1:
        counts = _check_agreement(mean, count, mode, group)
    else:
        counts = [-1 if isinstance(count, Tensor) else int(count)]
    if -1 not in counts:
        _check_global_count(counts, tuple(mean.shape), group)
    count = torch.as_tensor(count, dtype=mean.dtype, device=mean.device).expand_as(mean)
    empty = count == 0
    mean = torch.where(empty, 0.0, mean)
    m2 = torch.where(empty, 0.0, variance * count)
    return _GlobalMoments.apply(mean.contiguous(), m2.contiguous(), count.contiguous(), group)
