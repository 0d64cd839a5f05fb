"""The Triton kernel's fused activation (``activation="relu" | "silu"``) against the composite
kernel: output, statistics and gradients in every mode and layout (the pattern of
``test_triton_kernel.py``; tolerances and their reasons in ``test_activation.py``, whose
comparison these reuse).

Without a GPU they run in Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); without either they skip with the reason.
"""

from __future__ import annotations

import pytest
import test_activation
import test_kernels as cpu_tests
import test_triton_kernel
import torch

from batchnorm import kernels
from batchnorm.kernels.triton import TRITON

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(test_triton_kernel.REASON is not None,
                                 reason=str(test_triton_kernel.REASON))]

DEVICE = test_triton_kernel.DEVICE
LAYOUTS = test_triton_kernel.LAYOUTS


@pytest.mark.parametrize("activation", test_activation.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", list(cpu_tests.MODES))
def test_triton_kernel_with_activation_matches_composite(mode, layout, dtype, activation):
    y = test_activation.compare_with_composite(TRITON, mode, layout, dtype, activation, DEVICE)
    if activation == "relu":
        assert (y >= 0).all()


@pytest.mark.parametrize("activation", test_activation.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["nchw", "rows"])
@pytest.mark.parametrize("mode", ["plain", "mask_values"])
def test_triton_kernel_with_activation_matches_composite_in_half_precision(mode, layout, dtype,
                                                                           activation):
    test_activation.compare_with_composite(TRITON, mode, layout, dtype, activation, DEVICE)


@pytest.mark.parametrize("activation", test_activation.ACTIVATIONS)
def test_triton_fused_activation_through_the_layer_trains_like_composite(activation):
    import batchnorm as bn

    x = torch.randn(16, 6, 4, 4, device=DEVICE) * 2 + 1
    layers = [bn.BatchNorm(6, fused=f, renorm=True, activation=activation).to(DEVICE)
              for f in (None, False)]
    with kernels.prefer("triton"):
        for layer in layers:  # fused=False: the composite, whatever is preferred
            for _ in range(2):
                layer(x, training=True).square().sum().backward()
    # float32 statistics summed in different orders: 1e-5; gamma's gradient sums ~250 terms
    # per feature: 1e-4, as in test_triton_kernel.py.
    for name, value in layers[1].state_dict().items():
        torch.testing.assert_close(layers[0].state_dict()[name], value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers[0].gamma.grad, layers[1].gamma.grad, rtol=1e-4, atol=1e-4)


def test_triton_passes_name_the_activation_they_do_not_know():
    from batchnorm.kernels import triton_passes

    x3 = torch.randn(2, 3, 4, device=DEVICE)
    coefficients = torch.ones(1, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"activation='gelu': expected one of \['relu', 'silu'\]"):
        triton_passes.affine(x3, torch.zeros(2, dtype=torch.int64, device=DEVICE), coefficients,
                             coefficients, torch.empty_like(x3), "gelu")
