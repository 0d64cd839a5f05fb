"""Shared pytest fixtures: generic only (every test file may rely on them)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global RNG before every test, so that random inputs are reproducible."""
    torch.manual_seed(0)
