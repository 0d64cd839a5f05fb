"""Shared pytest fixtures: generic only (every test file may rely on them)."""

import os

import pytest
import torch

# Without a GPU, Triton's kernels are tested in its interpreter on CPU tensors. Triton reads
# this when its kernels are defined, so it is set here, before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Seed torch's global RNG before every test, so that random inputs are reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors: on a busy 2-core machine torch's own
    threads only contend with each other (measured: 30 s against 3.5 s for three tool test
    files). Use it per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
