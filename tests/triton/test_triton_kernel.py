"""The Triton training kernel (``kernels.triton``) against the composite kernel, every mode,
layout and dtype: output, statistics and gradients.

On a machine without a GPU these run in Triton's interpreter on CPU tensors, which needs
``TRITON_INTERPRET=1`` in the environment before pytest starts (``.ci/run`` does so);
with a GPU they run on CUDA tensors. Without either, they skip with the reason.

Tolerances: the composite computes in the input's dtype with float32 statistics
(float64 for float64); the Triton passes accumulate float32 per block and float64
across blocks, so float32 results agree to 1e-5 (the order of summation), float64 to
1e-9. Half-precision outputs are rounded once by each path from float32 values that
agree to 1e-5: they may differ by one unit in the last place, so y and dx compare at
2 ulps relative to the largest value (bfloat16 2**-7, float16 2**-10).
"""

from __future__ import annotations

import pytest
import test_kernels as cpu_tests
import torch

from batchnorm import kernels
from batchnorm.kernels import composite
from batchnorm.kernels.triton import TRITON, available

REASON = None
try:
    REASON = available()
except Exception as error:  # pragma: no cover - a broken triton install
    REASON = f"triton failed: {error}"

pytestmark = [pytest.mark.triton, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ["nchw", "channels_last", "rows", "nlc"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
HALF_ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def assert_matches(actual: dict, expected: dict, dtype: torch.dtype) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        if dtype in HALF_ULP and key in ("y", "dx"):
            scale = value.double().abs().max().item()
            torch.testing.assert_close(got.double(), value.double(), rtol=2 * HALF_ULP[dtype],
                                       atol=2 * HALF_ULP[dtype] * scale,
                                       msg=lambda m, k=key: f"{k}: {m}")
        else:
            rtol, atol = (1e-9, 1e-9) if value.dtype == torch.float64 else (1e-5, 1e-5)
            if dtype in HALF_ULP and key in ("dgamma", "dbeta"):
                rtol, atol = 1e-3, 1e-3  # sums of half-precision dy: rounding of each term
            torch.testing.assert_close(got, value, rtol=rtol, atol=atol,
                                       msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", list(cpu_tests.MODES))
def test_triton_kernel_matches_composite(mode: str, layout: str, dtype: torch.dtype) -> None:
    options, mask_kind = cpu_tests.MODES[mode]
    x, axis = cpu_tests.make_input(layout, dtype)
    x = x.to(DEVICE)
    mask = cpu_tests.make_mask(mask_kind, x.cpu(), axis)
    mask = None if mask is None else mask.to(DEVICE)
    triton = cpu_tests.keyword_kernel(TRITON)
    reference = cpu_tests.keyword_kernel(composite.COMPOSITE)
    expected, count, _ = cpu_tests.run_kernel(reference, x, axis, dict(options), mask, dtype)
    actual, fast_count, y = cpu_tests.run_kernel(triton, x, axis, dict(options), mask, dtype)
    if dtype in HALF_ULP and options.get("virtual_batch_size") == 2:
        # Two values per ghost batch: dx is a difference of nearly equal terms (zero but for
        # epsilon), below half precision's resolution on both sides (as for the CPU kernel).
        del actual["dx"], expected["dx"]
    assert_matches(actual, expected, dtype)
    assert fast_count == count if isinstance(count, int) else True
    assert y.stride() == x.stride()


def test_triton_kernel_is_the_registered_cuda_fast_path() -> None:
    assert kernels.FAST_PATHS["cuda"] is TRITON and kernels.KERNELS["triton"] is TRITON


@pytest.mark.parametrize("mode", ["renorm", "ghost_strided", "mask_positions"])
def test_triton_kernel_through_the_layer_updates_like_composite(mode: str) -> None:
    import batchnorm as bn

    options, mask_kind = cpu_tests.MODES[mode]
    x = torch.randn(16, 6, 4, 4, device=DEVICE) * 2 + 1
    mask = cpu_tests.make_mask(mask_kind, x.cpu(), 1)
    mask = None if mask is None else mask.to(DEVICE)
    # One variance rule for both (left to None, it would follow tf_keras's, which differs
    # between fused=None and fused=False on this rank-4 input).
    layers = [bn.BatchNorm(6, fused=f, unbiased_moving_variance=False, **options).to(DEVICE)
              for f in (None, False)]
    with kernels.prefer("triton"):
        for layer in layers:  # fused=False: the composite, whatever is preferred
            for _ in range(2):
                layer(x, training=True, mask=mask).square().sum().backward()
    # float32 statistics summed in different orders: 1e-5.
    for name, value in layers[1].state_dict().items():
        torch.testing.assert_close(layers[0].state_dict()[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers[0].gamma.grad, layers[1].gamma.grad, rtol=1e-4, atol=1e-4)
