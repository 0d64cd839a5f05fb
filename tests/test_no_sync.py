"""A training call never reads a tensor back to the host.

On an accelerator each read-back (``bool(t)``, ``float(t)``, ``int(t)``, ``t.item()``,
``t.tolist()``, ``t.__index__()``) waits for the device, and breaks CUDA graph capture.
These tests count them during a training forward and backward, in every mode and on
every kernel; the CPU fast path's NumPy views (its loops read CPU memory directly, no
device involved) are not tensor read-backs and are not counted.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import batchnorm as bn
from batchnorm import kernels

READ_BACKS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")

MODES = {
    "plain": {},
    "renorm": {"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}},
    "ghost": {"virtual_batch_size": 4},
    "masked": {},
    "cumulative": {"momentum": None},
    "debias_unbiased": {"debias": True, "unbiased_moving_variance": True},
    "adjustment": {"adjustment": lambda shape: (torch.tensor(1.5), torch.tensor(0.5))},
    "several_axes": {"axis": (1, 2)},
}


@contextlib.contextmanager
def count_read_backs():
    """Count every host read-back of a tensor inside the block; yields the list of names."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_a_read_back() -> None:
    with count_read_backs() as calls:
        bool(torch.tensor(True))
        torch.tensor(1.0).item()
    assert calls == ["__bool__", "item"]


@pytest.mark.parametrize("kernel", ["fused=None", "fused=False", "cpu", "native"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(8, 6, 5, 5), (256, 6)], ids=["nchw", "rows"])
def test_a_training_step_reads_nothing_back(mode: str, kernel: str, shape) -> None:
    options = dict(MODES[mode])
    if mode == "several_axes" and len(shape) == 2:
        shape = (256, 6, 2)  # features along axes 1 and 2, rows of 6 x 2
    if kernel == "native" and (mode in ("renorm", "ghost", "masked", "adjustment",
                                        "several_axes")):
        pytest.skip("ATen's kernel computes the plain mode only")
    layer = bn.BatchNorm(**options, fused={"fused=False": False, "native": True}.get(kernel))
    x = torch.randn(shape, requires_grad=True)
    # A mask over the non-feature axes (the feature axis, 1, left out).
    mask = torch.rand(shape[:1] + shape[2:]) > 0.3 if mode == "masked" else None
    layer(x.detach(), training=True, mask=mask)  # builds the lazy layer: not under test
    prefer = kernels.prefer("cpu") if kernel == "cpu" else contextlib.nullcontext()
    with prefer, count_read_backs() as calls:
        for _ in range(2):
            layer(x, training=True, mask=mask).square().sum().backward()
    assert calls == []
    assert layer.num_updates.item() == 3 and layer.num_skipped.item() == 0


def test_a_skipped_batch_reads_nothing_back_on_the_hot_path_and_is_still_reported() -> None:
    layer = bn.BatchNorm(3)
    x = torch.randn(8, 3)
    x[0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="not finite"), count_read_backs() as calls:
        layer(x, training=True)
    # Only the reason of the skip, worked out after it was seen, reads values back.
    assert layer.num_skipped.item() == 1 and layer.num_updates.item() == 0
    assert layer.check_health() == 1
    assert all(name in ("__bool__",) for name in calls)


def test_check_health_counts_skips_under_compile() -> None:
    layer = bn.BatchNorm(3)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(8, 3)
    compiled(x, training=True)
    x[0, 0] = math.inf
    compiled(x, training=True)
    assert layer.num_updates.item() == 1
    assert layer.check_health() == 1  # compiled calls count skips; they warn only here
