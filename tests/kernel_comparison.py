"""Shared by the kernel tests that compare a kernel with the composite one
(``test_kernels.py``, ``test_folded_kernel.py``): the inputs' layouts and the comparison,
with the tolerances those files' docstrings justify.

- float64: 1e-9 (both sides in float64, a few ulps of sums of ~100 values apart);
- float32: rtol = atol = 1e-5, the conformance bound;
- bfloat16, for the ``loose`` keys: one bfloat16 rounding step (2**-8 relative) and 2**-7
  of the largest magnitude for values that cancel to near zero.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-5)}

# id: (shape, axis, memory format or None)
LAYOUTS = {
    "nchw": ((8, 5, 6, 7), 1, None),
    "channels_last": ((8, 5, 6, 7), 1, torch.channels_last),
    "rows": ((16, 5), -1, None),
    "nlc": ((8, 9, 5), -1, None),
    "transposed": ((8, 5, 6, 7), 1, "transposed"),
}


def make_input(layout: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, int]:
    """The input of ``layout`` (values ~ N(2, 9)) and its feature axis, non-negative."""
    shape, axis, fmt = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)
    if fmt == "transposed":  # a view whose memory order is no permutation of a dense layout
        x = x.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :, 1:]
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    return x, axis % x.ndim


def assert_matches(actual: dict, expected: dict, dtype: torch.dtype,
                   loose: Collection[str]) -> None:
    """Every tensor of ``actual`` equals ``expected``'s of the same key in dtype and shape, and
    in value within the tolerances above (the ``loose`` keys' bfloat16 one for a bfloat16
    input)."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        got = actual[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        if dtype == torch.bfloat16 and key in loose:
            scale = value.double().abs().max().item()
            torch.testing.assert_close(got.double(), value.double(), rtol=2**-8,
                                       atol=2**-7 * scale, msg=lambda m, k=key: f"{k}: {m}")
        else:
            rtol, atol = TOLERANCE.get(value.dtype, (1e-5, 1e-5))
            torch.testing.assert_close(got, value, rtol=rtol, atol=atol,
                                       msg=lambda m, k=key: f"{k}: {m}")
