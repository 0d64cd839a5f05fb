"""``python -m batchnorm.apps.gpu_check``: everything that needs a CUDA device, in one command.

1. the GPU test suite (``tests/test_gpu.py``: no host synchronization in a training
   step, CUDA-graph capture, ``torch.compile(mode="reduce-overhead")``, NCCL, a converted
   ResNet against torch.nn) and the Triton kernels' tests on CUDA tensors
   (``-m "gpu or triton"``);
2. the GPU benchmark table (:mod:`batchnorm.apps.bench_gpu`).

Run from a checkout (the tests live in ``tests/``); ``--quick`` shortens the benchmark.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from . import bench_gpu


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tests = Path(__file__).resolve().parents[3] / "tests"
    status = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "gpu or triton",
                              "-p", "no:cacheprovider", str(tests)])
    bench_status = bench_gpu.main(argv)
    return status or bench_status


if __name__ == "__main__":
    sys.exit(main())
