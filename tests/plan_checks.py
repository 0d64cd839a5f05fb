"""Shared by the tests of call plans (``test_plan.py``, ``test_masked_calls.py``): two equal
layers to compare, a count of the full path's checks (and the check that a repeated call
runs them once), and the bit-for-bit comparison of two layers' state."""

from __future__ import annotations

import copy

import pytest
import torch

import batchnorm as bn
from batchnorm import plan


def count_prepares(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``[n]``: how many times :func:`batchnorm.plan.prepare` (every check of a call) ran from
    here on, updated as it runs."""
    calls = [0]
    original = plan.prepare

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(plan, "prepare", counting)
    return calls


def checked_once(monkeypatch: pytest.MonkeyPatch, call) -> list[int]:
    """Run ``call()`` three times and assert that the full path's checks ran once; return
    the counter (:func:`count_prepares`) for the calls that follow."""
    calls = count_prepares(monkeypatch)
    for _ in range(3):
        call()
    assert calls[0] == 1
    return calls


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The two modules' state dicts hold the same keys and bit-identical tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def twin_layers(**options) -> tuple[bn.BatchNorm, bn.BatchNorm]:
    """Two equal ``BatchNorm(6, **options)`` layers, gamma and beta drawn in [0.5, 1.5]."""
    torch.manual_seed(1)
    layer = bn.BatchNorm(6, **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    return layer, copy.deepcopy(layer)
