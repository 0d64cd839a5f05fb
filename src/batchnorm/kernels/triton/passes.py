"""The four memory passes of :mod:`batchnorm.kernels.cpu` as Triton kernels, GPU first.

Same contract as the numba loops (:mod:`batchnorm.kernels.cpu.loops`): the input is
a contiguous ``(outer, C, inner)`` tensor in memory order, rows are assigned to
groups (ghost batches) by ``rows`` (group -> its rows) and ``gid`` (row -> group),
and a mask ``w3`` is uint8 ``(outer, 1 or C, inner)`` (per position or per value).
Pass 1 (:func:`moments`) and pass 3 (:func:`grad_sums`) reduce per (group,
channel); pass 2 (:func:`affine`) writes ``y`` and pass 4 (:func:`grad_input`)
writes ``dx``, each a single elementwise pass with per-(group, channel)
coefficients.

Tiling. Every program works on 3-D tiles of ``BR`` rows x ``BC`` channels x
``BI`` inner positions (``TILE`` values, half that for float64, so that a thread
holds the same registers) laid out in memory order, so a warp's loads are
coalesced and, where a run or row starts 16-aligned, vectorized (16-byte loads):

- "planes" (``inner > 1``, NCHW): ``BI`` spans the contiguous run of a
  (row, channel), up to ``TILE``; a small ``inner`` (7x7, 2x2) leaves room for
  several channels and rows in one tile instead of idle lanes.
- "rows" (``inner == 1``, channels-last or ``(N, C)``): ``BI = 1`` and ``BC``
  spans up to ``MAX_BC`` contiguous channels; the rest of the tile is rows.

A per-position mask is loaded once per (row, position) and broadcast over the
tile's channels. Triton compiles a variant per value of the ``BR``/``BC``/``BI``
constants and turns integer arguments equal to 1 (``inner`` for rows, a single
tile or block) into constants, so each layout gets straight-line code.

The elementwise passes launch one program per tile (row tile x channel tile x
inner tile, in memory order); a tile's coefficients ``a[gid[o], c]`` are a small
cached gather, and there is no per-element integer division. The reductions
launch one program per (group, block, channel tile): a block is a contiguous
range of the group's row tiles (and, for runs longer than a tile, of its inner
tiles), so that about ``PROGRAMS`` programs fill the GPU (an H200 has 132 SMs)
while each partial covers at least ``MIN_VALUES`` values per channel (the partials
stay small next to the input). A program keeps tile-shaped accumulators in the
run dtype (float32 for float32/bfloat16/float16 inputs, float64 for float64) of
the values shifted by ``k`` (so the one-pass ``sum (x - k)**2`` does not cancel),
each lane summing a few values, sums them once at the end and writes float64
partials ``(sums, groups, blocks, C)``, which one small torch ``.sum`` reduces.
No atomics: results are deterministic.

A fused activation (``activation=`` of the layer) is the constant ``ACTIVATION`` of
the output and backward kernels (0: none, the code without it; see
:data:`ACTIVATION_CODES`): the output pass writes ``act(z)``, ``z = x * a + b``, and
the backward kernels recompute ``z`` from ``x`` and the output pass's coefficients
``(a, b)`` and use ``dz = dy * act'(z)`` in place of ``dy``.

:func:`available` says whether the kernels can run here. Triton decides when a
kernel is defined: with ``TRITON_INTERPRET=1`` in the environment when this module
is first imported, the kernels run in Triton's interpreter (CPU tensors; slow, for
tests), otherwise they are compiled for the GPU (CUDA tensors). Compiled kernels
round bfloat16 outputs to nearest even, as torch does; the interpreter (Triton
3.9) truncates them (at most one bfloat16 ulp lower in magnitude).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the environment
    triton = None
    IMPORT_ERROR: str | None = f"triton is not installed ({error})"
except Exception as error:  # pragma: no cover - a broken install must not break the library
    triton = None
    IMPORT_ERROR = f"triton failed to import ({type(error).__name__}: {error})"
else:
    IMPORT_ERROR = None

__all__ = ["affine", "available", "grad_input", "grad_sums", "moments"]

TILE = 2048  # values per tile: 16 per thread at 4 warps (half that for float64)
MAX_BC = 256  # channels per tile in the rows layout, so that wide rows spread over programs
PROGRAMS = 1024  # reduction programs to aim for (about 8 per SM of an H200)
MIN_VALUES = 128  # values per channel each reduction program covers at least

INTERPRETED = False
ACTIVATION_CODES = {None: 0, "relu": 1, "silu": 2}
"""The ``ACTIVATION`` constant of the kernels for each activation name."""

if triton is not None:

    @triton.jit
    def _span(pid, ctiles, iblocks, rblocks, rtiles, itiles):
        """Reduction program ``pid``: (group, block, channel tile, row tiles, inner tiles)."""
        ct = pid % ctiles
        t = pid // ctiles
        ib = t % iblocks
        t = t // iblocks
        rb = (t % rblocks).to(tl.int64)
        g = t // rblocks
        ib = ib.to(tl.int64)
        return (g, rb * iblocks + ib, ct,
                rb * rtiles // rblocks, (rb + 1) * rtiles // rblocks,
                ib * itiles // iblocks, (ib + 1) * itiles // iblocks)

    @triton.jit
    def _sums_kernel(x_ptr, dy_ptr, rows_ptr, k_ptr, a_ptr, b_ptr, w_ptr, part_ptr, groups,
                     per_group, C, inner, ctiles, rtiles, itiles, rblocks, iblocks,
                     GRAD: tl.constexpr, MASKED: tl.constexpr, PER_CHANNEL: tl.constexpr,
                     ACTIVATION: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr):
        """The reductions: ``sum u`` and ``sum u v`` per (group, channel), ``v = x - k``.

        Pass 1 (``GRAD`` False): ``u = v``, the values ``x - k`` a mask ``w`` selects (all
        without ``MASKED``), and with ``MASKED`` also ``sum w``. Pass 3 (``GRAD``): ``u = dy``
        (``dy * act'(z)`` with an ``ACTIVATION``, ``z = x * a + b``), ``k`` the mean.
        """
        g, blk, ct, r_lo, r_hi, i_lo, i_hi = _span(tl.program_id(0), ctiles, iblocks, rblocks,
                                                   rtiles, itiles)
        c = ct * BC + tl.arange(0, BC)
        cm = c < C
        k = tl.load(k_ptr + g * C + c, mask=cm, other=0)[None, :, None]
        if ACTIVATION != 0:  # the output pass's coefficients, to recompute z = x * a + b
            a = tl.load(a_ptr + g * C + c, mask=cm, other=0)[None, :, None]
            b = tl.load(b_ptr + g * C + c, mask=cm, other=0)[None, :, None]
        s = tl.zeros([BR, BC, BI], dtype=k_ptr.dtype.element_ty)
        q = tl.zeros([BR, BC, BI], dtype=k_ptr.dtype.element_ty)
        n = tl.zeros([BR, BC, BI], dtype=k_ptr.dtype.element_ty)
        for rt in range(r_lo, r_hi):
            j = rt * BR + tl.arange(0, BR)
            jm = j < per_group
            o = tl.load(rows_ptr + g * per_group + j, mask=jm, other=0)[:, None, None]
            for it in range(i_lo, i_hi):
                i = (it * BI + tl.arange(0, BI))[None, None, :]
                pm = jm[:, None, None] & (i < inner)
                m = pm & cm[None, :, None]
                off = (o * C + c[None, :, None]) * inner + i
                x = tl.load(x_ptr + off, mask=m, other=0).to(s.dtype)
                if GRAD:
                    u = tl.load(dy_ptr + off, mask=m, other=0).to(s.dtype)  # 0 outside
                    if ACTIVATION != 0:  # dz = dy * act'(z): 0 outside too (z = 0 there)
                        u = _activation_grad(u, (x * a + b).to(s.dtype), ACTIVATION)
                    v = x - k
                elif MASKED:  # as cpu.loops: w selects, it does not multiply (NaN * 0 is NaN)
                    if PER_CHANNEL:
                        w = tl.load(w_ptr + off, mask=m, other=0).to(s.dtype)
                    else:  # one load per (row, position), broadcast over the channels
                        w = tl.load(w_ptr + o * inner + i, mask=pm, other=0).to(s.dtype)
                    v = tl.where(w != 0, x - k, 0.0)  # x = k = 0 outside the tile's range
                    u = v
                    n += w
                else:
                    v = tl.where(m, x - k, 0.0)
                    u = v
                s += u
                q += u * v
        stride = groups * rblocks * iblocks * C
        p = part_ptr + (g * rblocks * iblocks + blk) * C + c
        tl.store(p, tl.sum(tl.sum(s, 2), 0).to(tl.float64), mask=cm)
        tl.store(p + stride, tl.sum(tl.sum(q, 2), 0).to(tl.float64), mask=cm)
        if MASKED:
            tl.store(p + 2 * stride, tl.sum(tl.sum(n, 2), 0).to(tl.float64), mask=cm)

    @triton.jit
    def _activate(z, ACTIVATION: tl.constexpr):
        """``act(z)`` (``z`` itself for ``ACTIVATION == 0``)."""
        if ACTIVATION == 1:  # a select, not a maximum: NaN stays NaN, as in torch.relu
            z = tl.where(z < 0, 0.0, z).to(z.dtype)
        elif ACTIVATION == 2:
            z = z * tl.sigmoid(z)
        return z

    @triton.jit
    def _activation_grad(d, z, ACTIVATION: tl.constexpr):
        """``d * act'(z)`` (``d`` itself for ``ACTIVATION == 0``)."""
        if ACTIVATION == 1:  # a select, as torch's threshold_backward
            d = tl.where(z > 0, d, 0.0).to(d.dtype)
        elif ACTIVATION == 2:
            s = tl.sigmoid(z)
            d = d * (s * (1.0 + z * (1.0 - s)))
        return d

    @triton.jit
    def _tile(pid, gid_ptr, outer, C, inner, ctiles, itiles, BR: tl.constexpr,
              BC: tl.constexpr, BI: tl.constexpr):
        """Elementwise program ``pid``: its rows, positions, the index of their (group,
        channel) coefficients and its bound, the values' offsets and bound (3-D)."""
        it = pid % itiles
        t = pid // itiles
        ct = t % ctiles
        rt = t // ctiles
        o = rt.to(tl.int64) * BR + tl.arange(0, BR)
        c = ct * BC + tl.arange(0, BC)
        i = (it * BI + tl.arange(0, BI))[None, None, :]
        cm = (o < outer)[:, None] & (c < C)[None, :]  # (BR, BC): the coefficients' bound
        off = (o[:, None, None] * C + c[None, :, None]) * inner + i
        coef = tl.load(gid_ptr + o, mask=o < outer, other=0)[:, None] * C + c[None, :]
        return o, i, coef, cm, off, cm[:, :, None] & (i < inner)

    @triton.jit
    def _coefficient(ptr, coef, cm):
        """The ``(groups, C)`` coefficients at ``ptr`` of a tile's rows and channels."""
        return tl.load(ptr + coef, mask=cm, other=0)[:, :, None]

    @triton.jit
    def _affine_kernel(x_ptr, gid_ptr, a_ptr, b_ptr, y_ptr, outer, C, inner, ctiles, itiles,
                       ACTIVATION: tl.constexpr,
                       BR: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr):
        o, i, coef, cm, off, m = _tile(tl.program_id(0), gid_ptr, outer, C, inner, ctiles,
                                       itiles, BR, BC, BI)
        x = tl.load(x_ptr + off, mask=m, other=0).to(a_ptr.dtype.element_ty)
        z = x * _coefficient(a_ptr, coef, cm) + _coefficient(b_ptr, coef, cm)
        tl.store(y_ptr + off, _activate(z, ACTIVATION).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _grad_input_kernel(x_ptr, dy_ptr, gid_ptr, m_ptr, p_ptr, q_ptr, u_ptr, a_ptr, b_ptr,
                           w_ptr, dx_ptr, outer, C, inner, ctiles, itiles,
                           MASKED: tl.constexpr, PER_CHANNEL: tl.constexpr,
                           ACTIVATION: tl.constexpr,
                           BR: tl.constexpr, BC: tl.constexpr, BI: tl.constexpr):
        o, i, coef, cm, off, m = _tile(tl.program_id(0), gid_ptr, outer, C, inner, ctiles,
                                       itiles, BR, BC, BI)
        mean = _coefficient(m_ptr, coef, cm)
        p = _coefficient(p_ptr, coef, cm)
        q = _coefficient(q_ptr, coef, cm)
        u = _coefficient(u_ptr, coef, cm)
        x = tl.load(x_ptr + off, mask=m, other=0).to(p.dtype)
        d = tl.load(dy_ptr + off, mask=m, other=0).to(p.dtype)
        if ACTIVATION != 0:  # dz = dy * act'(z), z = x * a + b recomputed
            d = _activation_grad(d, x * _coefficient(a_ptr, coef, cm)
                                 + _coefficient(b_ptr, coef, cm), ACTIVATION)
        r = q * (x - mean) + u
        if MASKED:
            if PER_CHANNEL:
                w = tl.load(w_ptr + off, mask=m, other=0)
            else:
                pm = (o < outer)[:, None, None] & (i < inner)
                w = tl.load(w_ptr + o[:, None, None] * inner + i, mask=pm, other=0)
            r = tl.where(w != 0, r, 0.0)  # selected, not multiplied: NaN * 0 is NaN
        tl.store(dx_ptr + off, (p * d - r).to(dx_ptr.dtype.element_ty), mask=m)

    from triton.runtime.interpreter import InterpretedFunction

    INTERPRETED = isinstance(_affine_kernel, InterpretedFunction)


def available() -> str | None:
    """None when the kernels can run here; else the reason they cannot."""
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if INTERPRETED or torch.cuda.is_available():
        return None
    return ("no CUDA device, and TRITON_INTERPRET=1 was not set when "
            "batchnorm.kernels.triton.passes was imported")


# ---------------------------------------------------------------- tiling


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(rows: int, channels: int, inner: int, x: Tensor) -> tuple[int, int, int]:
    """``(BR, BC, BI)``: a tile of about ``TILE`` values, contiguous along its last axes."""
    tile = TILE // 2 if x.dtype == torch.float64 else TILE  # the same registers per thread
    bi = min(_pow2(inner), tile)
    bc = min(_pow2(channels), MAX_BC, max(tile // bi, 1))
    br = min(_pow2(rows), max(tile // (bi * bc), 1))
    return br, bc, bi


def _reduction_grid(x3: Tensor, groups: int, per_group: int) -> dict:
    """The tiles and blocks of a reduction over each group's rows (see the module docstring)."""
    channels, inner = x3.shape[1:]
    br, bc, bi = _tiles(per_group, channels, inner, x3)
    ctiles, rtiles, itiles = _cdiv(channels, bc), _cdiv(per_group, br), _cdiv(inner, bi)
    want = _cdiv(PROGRAMS, groups * ctiles)  # blocks per (group, channel tile)
    min_tiles = _cdiv(_cdiv(MIN_VALUES, inner), br)  # row tiles per block at least
    rblocks = max(1, min(want, rtiles // min_tiles))
    iblocks = min(itiles, _cdiv(want, rblocks))
    return {"ctiles": ctiles, "rtiles": rtiles, "itiles": itiles, "rblocks": rblocks,
            "iblocks": iblocks, "BR": br, "BC": bc, "BI": bi}


def _elementwise_grid(x3: Tensor) -> tuple[int, dict]:
    outer, channels, inner = x3.shape
    br, bc, bi = _tiles(outer, channels, inner, x3)
    ctiles, itiles = _cdiv(channels, bc), _cdiv(inner, bi)
    return _cdiv(outer, br) * ctiles * itiles, {"ctiles": ctiles, "itiles": itiles,
                                                "BR": br, "BC": bc, "BI": bi}


def _run_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check(x3: Tensor, *tensors: Tensor | None) -> None:
    if x3.dim() != 3:
        raise ValueError(f"x3 must be (outer, C, inner), got shape {tuple(x3.shape)}")
    if not INTERPRETED and x3.device.type != "cuda":
        raise ValueError(f"compiled Triton kernels need CUDA tensors, got {x3.device} "
                         "(set TRITON_INTERPRET=1 before importing to run on the CPU)")
    for t in (x3, *tensors):
        if t is not None and (t.device != x3.device or not t.is_contiguous()):
            raise ValueError(f"every tensor must be contiguous and on {x3.device}")


def _mask_flags(w3: Tensor | None, x3: Tensor) -> tuple[bool, bool]:
    if w3 is None:
        return False, False
    outer, channels, inner = x3.shape
    if w3.shape not in ((outer, 1, inner), (outer, channels, inner)):
        raise ValueError(f"w3 must be (outer, 1 or C, inner), got {tuple(w3.shape)}")
    return True, w3.shape[1] != 1


def _device(x3: Tensor):
    """Launch on x3's GPU (Triton launches on the current device)."""
    return torch.cuda.device(x3.device) if x3.is_cuda else contextlib.nullcontext()


def _activation_code(activation: str | None) -> int:
    code = ACTIVATION_CODES.get(activation)
    if code is None:
        raise ValueError(f"activation={activation!r}: expected one of "
                         f"{sorted(k for k in ACTIVATION_CODES if k)} or None")
    return code


def _activation_args(activation, like: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(ACTIVATION, a, b)`` for a backward kernel (``like`` stands in for the unused
    coefficients without an activation)."""
    if activation is None:
        return 0, like, like
    name, a, b = activation
    if a.shape != b.shape or not (a.is_contiguous() and b.is_contiguous()) \
            or a.device != like.device:
        raise ValueError(f"the activation's coefficients must be contiguous (groups, C) "
                         f"tensors on {like.device}, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _activation_code(name), a, b


# ---------------------------------------------------------------- the passes


def _sums(x3: Tensor, dy3: Tensor, rows: Tensor, k: Tensor, a: Tensor, b: Tensor, w3: Tensor,
          count: int, **flags: bool | int) -> Tensor:
    """float64 ``(count, groups, C)``: the sums of ``_sums_kernel`` (``flags``: its
    ``GRAD``, ``MASKED``, ``PER_CHANNEL`` and ``ACTIVATION``), its blocks' partials added."""
    outer, channels, inner = x3.shape
    groups, per_group = rows.shape
    grid = _reduction_grid(x3, groups, per_group)
    blocks = grid["rblocks"] * grid["iblocks"]
    part = torch.empty(count, groups, blocks, channels, dtype=torch.float64, device=x3.device)
    with _device(x3):
        _sums_kernel[(groups * blocks * grid["ctiles"],)](
            x3, dy3, rows, k, a, b, w3, part, groups, per_group, channels, inner, **flags,
            **grid)
    return part.sum(2)



def moments(x3: Tensor, rows: Tensor, shift: Tensor, w3: Tensor | None) -> Tensor:
    """float64 ``(3, groups, C)``: ``sum w (x - k)``, ``sum (w (x - k))**2`` and ``sum w``
    per (group, channel), with ``w = 1`` when ``w3`` is None (then the third row is the
    count of values). ``shift`` (``k``, ``(groups, C)``) sets the dtype the sums run in:
    the run dtype (float64 for float64 inputs, else float32), or float64 (for masked
    inputs, whose shift may be a value the mask leaves out, far from the data).
    """
    _check(x3, rows, shift, w3)
    masked, per_channel = _mask_flags(w3, x3)
    if shift.dtype not in (_run_dtype(x3), torch.float64):
        raise TypeError(f"shift must be {_run_dtype(x3)} or float64 for {x3.dtype} inputs, got "
                        f"{shift.dtype}")
    outer, channels, inner = x3.shape
    groups, per_group = rows.shape
    if x3.numel() == 0 or rows.numel() == 0:
        sums = torch.zeros(3, groups, channels, dtype=torch.float64, device=x3.device)
        sums[2] = 0.0 if masked else per_group * inner
        return sums
    sums = _sums(x3, x3, rows, shift, shift, shift, x3 if w3 is None else w3, 3 if masked else 2,
                 GRAD=False, MASKED=masked, PER_CHANNEL=per_channel, ACTIVATION=0)
    if masked:
        return sums
    return torch.cat([sums, torch.full((1, groups, channels), float(per_group * inner),
                                       dtype=torch.float64, device=x3.device)])


def affine(x3: Tensor, gid: Tensor, a: Tensor, b: Tensor, out: Tensor,
           activation: str | None = None) -> Tensor:
    """``out[o, c, i] = x3[o, c, i] * a[g, c] + b[g, c]`` with ``g = gid[o]``, computed in
    the coefficients' dtype (``act`` of it with an ``activation``) and rounded to ``out``'s;
    returns ``out``."""
    _check(x3, gid, a, b, out)
    code = _activation_code(activation)
    outer, channels, inner = x3.shape
    if x3.numel():
        programs, grid = _elementwise_grid(x3)
        with _device(x3):
            _affine_kernel[(programs,)](x3, gid, a, b, out, outer, channels, inner,
                                        ACTIVATION=code, **grid)
    return out


def grad_sums(x3: Tensor, dy3: Tensor, rows: Tensor, mean: Tensor, activation=None) -> Tensor:
    """float64 ``(2, groups, C)``: ``sum dy`` and ``sum dy (x - mean)`` per (group, channel)
    (``mean`` is rounded to the run dtype first, as in the CPU kernel). With ``activation``,
    ``(name, a, b)``, the sums of ``dz = dy * act'(x * a + b)`` instead of ``dy``
    (``a``/``b``: the output pass's ``(groups, C)`` coefficients)."""
    _check(x3, dy3, rows, mean)
    code, a, b = _activation_args(activation, mean)
    outer, channels, inner = x3.shape
    groups, per_group = rows.shape
    mean = mean.to(_run_dtype(x3)).contiguous()
    if x3.numel() == 0 or rows.numel() == 0:
        return torch.zeros(2, groups, channels, dtype=torch.float64, device=x3.device)
    return _sums(x3, dy3, rows, mean, a, b, x3, 2, GRAD=True, MASKED=False, PER_CHANNEL=False,
                 ACTIVATION=code)


def grad_input(x3: Tensor, dy3: Tensor, gid: Tensor, m: Tensor, p: Tensor, q: Tensor,
               u: Tensor, w3: Tensor | None, out: Tensor, activation=None) -> Tensor:
    """``out = p dy - w (q (x - m) + u)`` with per-(group, channel) coefficients (computed
    in their dtype, rounded to ``out``'s) and ``w = 1`` when ``w3`` is None; returns ``out``.
    With ``activation`` (``(name, a, b)``, as in :func:`grad_sums`) ``dy * act'(x * a + b)``
    replaces ``dy``."""
    _check(x3, dy3, gid, m, p, q, u, w3, out)
    code, a, b = _activation_args(activation, p)
    masked, per_channel = _mask_flags(w3, x3)
    outer, channels, inner = x3.shape
    if x3.numel():
        programs, grid = _elementwise_grid(x3)
        with _device(x3):
            _grad_input_kernel[(programs,)](
                x3, dy3, gid, m, p, q, u, a, b, w3 if masked else x3, out, outer, channels,
                inner, MASKED=masked, PER_CHANNEL=per_channel, ACTIVATION=code, **grid)
    return out
