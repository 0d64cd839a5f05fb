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
import test_triton_passes
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
    from batchnorm.kernels.triton import passes as triton_passes

    x3 = torch.randn(2, 3, 4, device=DEVICE)
    coefficients = torch.ones(1, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"activation='gelu': expected one of \['relu', 'silu'\]"):
        triton_passes.affine(x3, torch.zeros(2, dtype=torch.int64, device=DEVICE), coefficients,
                             coefficients, torch.empty_like(x3), "gelu")


# Compiles (for an H200, sm_90, without needing a GPU: Triton's NVIDIA backend only) every
# variant the activation adds: the output and both backward kernels for ReLU and SiLU, in
# float32, bfloat16 and float64, planes and rows, masked or not. The interpreter accepts code
# the GPU compiler rejects (mixed types in a branch, float64 transcendental functions); this
# is test_triton_passes.py's compile check, with the kernels launched with an activation.
COMPILE_SCRIPT = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batchnorm.kernels.triton import passes as tp

TYPES = {torch.float32: 'fp32', torch.float64: 'fp64', torch.bfloat16: 'bf16',
         torch.int64: 'i64', torch.uint8: 'u8'}
launches = []
for name in ('_affine_kernel', '_sums_kernel', '_grad_input_kernel'):
    kernel = getattr(tp, name)
    record = (lambda kernel: lambda *a, **kw: launches.append((kernel, a, kw)))(kernel)
    setattr(tp, name, type('Recorder', (), {'__getitem__': lambda self, grid, r=record: r})())
tp.INTERPRETED = True  # let CPU tensors past the device check: nothing is launched
for activation in ('relu', 'silu'):
    for shape, dtype, mask in [((2, 4, 3136), torch.bfloat16, None),
                               ((4, 8, 49), torch.float32, 1),
                               ((64, 3, 1), torch.float64, 3)]:
        x3 = torch.zeros(shape, dtype=dtype)
        rows, gid = torch.arange(shape[0]).reshape(2, -1), torch.arange(shape[0]) % 2
        cdtype = torch.float64 if dtype == torch.float64 else torch.float32
        k = torch.zeros(2, shape[1], dtype=cdtype)
        w3 = None if mask is None else torch.ones(shape[0], mask, shape[2], dtype=torch.uint8)
        tp.affine(x3, gid, k, k, x3, activation)
        tp.grad_sums(x3, x3, rows, k, (activation, k, k))
        tp.grad_input(x3, x3, gid, k, k, k, k, w3, x3, (activation, k, k))
assert len(launches) == 18
for kernel, args, kwargs in launches:
    assert kwargs['ACTIVATION'] in (1, 2)
    names = kernel.arg_names
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for name, arg in {**dict(zip(names, args)), **kwargs}.items():
        if isinstance(arg, torch.Tensor):
            signature[name] = '*' + TYPES[arg.dtype]
            attrs[(names.index(name),)] = [['tt.divisibility', 16]]
        elif name in constexprs or arg == 1:
            signature[name], constants[(names.index(name),)] = 'constexpr', arg
        else:
            signature[name] = 'i32'
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget('cuda', 90, 32))
    assert compiled.asm['cubin'], kernel.__name__
print('compiled', len(launches))
"""


def test_triton_activation_kernels_compile_for_h200():
    assert "compiled 18" in test_triton_passes.compile_for_h200(COMPILE_SCRIPT, timeout=600)
