"""The training run every engine's multi-process test makes, and its one-process reference.

Two processes each take their slice of every micro-batch; an optimizer step is ``MICRO``
micro-batches, and ``STEPS`` steps are run. A ``bn.BatchNorm`` first layer sees the inputs
themselves, so its moving statistics after the run depend on the data alone: with
synchronized statistics and one update per step they must equal those of one unsynchronized
layer called once per step on the step's concatenated global batch (``reference``).
"""

from __future__ import annotations

import torch

import batchnorm as bn

STEPS, MICRO, WORLD, PER_RANK, FEATURES = 3, 4, 2, 3, 4
# Both the engines' layers and the reference's: the biased variance feeds moving_variance
# (tf_keras's rule for a synchronized layer).
LAYER = dict(axis=-1, momentum=0.9, unbiased_moving_variance=False)
# float32: the pooled statistics of 24 values against one pass over them; float64 likewise.
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6),
             torch.float64: dict(rtol=1e-12, atol=1e-12)}


def micro_batch(step: int, micro: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The global batch of one micro-batch: ``(WORLD * PER_RANK, FEATURES)``."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    return (torch.randn(WORLD * PER_RANK, FEATURES, generator=g, dtype=torch.float64) * 2
            + torch.arange(FEATURES)).to(dtype)


def rank_batches(rank: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Rank ``rank``'s slice of every micro-batch, in training order."""
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return [micro_batch(step, micro, dtype)[part]
            for step in range(STEPS) for micro in range(MICRO)]


def reference(dtype: torch.dtype = torch.float32, round_to: torch.dtype | None = None
              ) -> dict[str, torch.Tensor]:
    """One process's state after one call per step on the step's concatenated global batch
    (its inputs first rounded to ``round_to``, as a mixed-precision engine casts them)."""
    layer = bn.BatchNorm(FEATURES, dtype=dtype, **LAYER)
    for step in range(STEPS):
        x = torch.cat([micro_batch(step, micro, dtype) for micro in range(MICRO)])
        layer(x if round_to is None else x.to(round_to), training=True)
    return layer.state_dict()


def check_against_reference(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                            dtype: torch.dtype, what: str) -> None:
    """``state``: ``STEPS`` updates, and the reference's moving statistics in ``dtype``."""
    assert state["num_updates"].item() == STEPS, what
    for name in ("moving_mean", "moving_variance"):
        assert state[name].dtype == dtype, (what, name)
        torch.testing.assert_close(state[name], expected[name], **TOLERANCE[dtype],
                                   msg=lambda m, name=name: f"{what}, {name}: {m}")
