"""The numba loops behind :mod:`batchnorm.kernels.cpu`: four memory passes, two layouts.

Every input is viewed as ``(outer, C, inner)`` in memory order. ``inner > 1``
("planes", NCHW): each (row, channel) is a contiguous run of ``inner`` values.
``inner == 1`` ("rows", channels-last): each row is ``C`` contiguous values.
Rows are assigned to groups (ghost batches) by ``rows`` (group -> its rows)
and ``gid`` (row -> its group); the plain mode is one group.

Pass 1 (statistics) and pass 3 (gradient sums) accumulate per (group, block,
channel) partials in float64 from a per-(group, channel) shift, so that the
one-pass ``sum((x - k)**2)`` does not cancel; the blocks are summed by the
caller. Pass 2 writes ``y = x * a + b`` and pass 4 ``dx = p * dy - w * (q * (x - m) + u)``
with per-(group, channel) coefficients. A mask ``w`` selects (``if w``), it never
multiplies: a NaN or 1e30 at a masked-out position (padding) must not reach the sums.

``FASTMATH`` allows reassociation (so the reductions vectorize) and
contraction (fused multiply-add), nothing else: NaN and Inf still propagate,
which the moving-average update relies on to detect a bad batch.

bfloat16 arrays arrive as ``uint16`` bit patterns: :func:`load` widens them
to float32 exactly, :func:`store` rounds to nearest even, as torch does.

Each pass is one function for every mode and activation: an activation tag argument
(:class:`Identity` for none) picks the activation's code at compile time. Each is compiled
in two flavors (:class:`Loop`), serial and parallel, only for the signatures a program calls.
"""

from __future__ import annotations

from types import FunctionType
from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core.dispatcher import Dispatcher
from numba.core.extending import intrinsic, overload

FASTMATH = frozenset({"reassoc", "contract"})
FLUSH = 64  # rows summed in the run dtype before they are added to the float64 partials
_FASTMATH: set[str] = set(FASTMATH)


@intrinsic
def _bits_to_float32(typingctx, bits):
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _float32_to_bits(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def select(typingctx, condition, a, b):
    """``a if condition else b`` as one LLVM ``select``: no branch, so it vectorizes, and it
    keeps NaN where a product by 0 or 1 would not (``NaN * 0`` is NaN)."""
    if not isinstance(condition, types.Boolean) or a != b:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(*args)

    return a(condition, a, b), codegen


def load(v):
    """The value of one element as a float (bfloat16 bits widened to float32)."""


@overload(load, inline="always")
def _load(v):
    if v == types.uint16:
        return lambda v: _bits_to_float32(np.uint32(v) << np.uint32(16))
    return lambda v: v


def store(out, i, v):
    """``out[i] = v`` in ``out``'s dtype (bfloat16 bits: rounded to nearest even)."""


@overload(store, inline="always")
def _store(out, i, v):
    if out.dtype == types.uint16:
        def impl(out, i, v):
            bits = _float32_to_bits(np.float32(v))
            if v != v:  # a quiet NaN that keeps the sign
                out[i] = np.uint16((bits >> np.uint32(16)) | np.uint32(0x40))
            else:
                rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
                out[i] = np.uint16(rounded >> np.uint32(16))
        return impl
    dtype = out.dtype

    def impl(out, i, v):
        out[i] = dtype(v)
    return impl


def as_type(v, like):
    """``v`` converted to ``like``'s type (rounded to nearest, as ``Tensor.to``)."""


@overload(as_type, inline="always")
def _as_type(v, like):
    kind = like

    def impl(v, like):
        return kind(v)
    return impl


@njit(inline="always", cache=True)
def zero_like(v):
    """A zero of ``v``'s type (``v * 0`` would widen float32 to float64)."""
    return as_type(0, v)


@njit(inline="always", cache=True)
def one_like(v):
    """A one of ``v``'s type (``1 + v`` would widen float32 to float64)."""
    return as_type(1, v)


# ---------------------------------------------------------------- one loop, two flavors


class Loop(NamedTuple):
    """One loop compiled two ways from the same function: ``parallel`` splits its ``prange``
    over numba's threads; ``serial`` runs it as a plain ``range`` on the calling thread, with
    no thread pool to wake, and compiles in about a quarter of the time. The passes run the
    serial flavor for few values (:func:`batchnorm.kernels.cpu.passes.run`), so a program
    (or a test run) on small inputs never compiles a parallel one."""

    serial: Dispatcher
    parallel: Dispatcher


def loop(function) -> Loop:
    """``function`` as a :class:`Loop`. Each flavor compiles lazily, once per signature, and is
    cached on disk; the serial flavor is compiled from a copy named ``<name>_serial``, since
    numba's cache tells functions apart by name and line, not by their options."""
    serial = FunctionType(function.__code__, function.__globals__, function.__name__,
                          function.__defaults__, function.__closure__)
    serial.__qualname__ = f"{function.__qualname__}_serial"
    return Loop(njit(parallel=False, cache=True, fastmath=_FASTMATH, nogil=True)(serial),
                njit(parallel=True, cache=True, fastmath=_FASTMATH, nogil=True)(function))


# ---------------------------------------------------------------- activations
#
# Every output and backward loop takes an activation tag, an instance of one of the empty
# NamedTuple classes below: its type picks the code at compile time (one specialization per
# activation, no branch in the loops). The output pass writes ``act(z)`` with
# ``z = x * a + b``; the backward passes recompute ``z`` from ``x`` (it is not stored) and use
# ``dz = dy * act'(z)``. ``Identity`` is the plain layer: ``act(z) = z`` and ``dz = dy``, so
# its specialization never reads ``a`` and ``b`` (the compiler drops ``z``).


class Identity(NamedTuple):
    """Tag: no activation."""


class Relu(NamedTuple):
    """Tag: ``max(z, 0)``."""


class Silu(NamedTuple):
    """Tag: ``z * sigmoid(z)``."""


ACTIVATIONS = {None: Identity(), "relu": Relu(), "silu": Silu()}
"""The tag of each activation name (:data:`batchnorm.activations.ACTIVATIONS`), and of None."""


@njit(inline="always", fastmath=set(FASTMATH), cache=True)
def exp32(v):
    """``exp(v)`` for float32, within 2 ulp, in operations that vectorize (numba's ``exp`` is a
    call per value without Intel's SVML): ``2**n * p(r)`` with ``v = n log 2 + r``,
    ``|r| <= log(2) / 2``, ``p`` the minimax polynomial of Cephes' ``expf``. ``v`` is clamped
    to ``[-87, 88]`` (where ``2**n`` is a normal float32); NaN gives a finite value, so a
    caller keeps NaN by using ``v`` itself too (``silu``: ``z / (1 + exp(-z))``)."""
    v = v if v > np.float32(-87.0) else np.float32(-87.0)
    v = v if v < np.float32(88.0) else np.float32(88.0)
    n = np.floor(v * np.float32(1.4426950408889634) + np.float32(0.5))
    r = v - n * np.float32(0.693359375)
    r = r + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _bits_to_float32((np.int32(n) + np.int32(127)) << np.int32(23))


def sigmoid(z):
    """``1 / (1 + exp(-z))`` in ``z``'s precision."""


@overload(sigmoid, inline="always")
def _sigmoid(z):
    if z == types.float32:
        return lambda z: np.float32(1.0) / (np.float32(1.0) + exp32(-z))
    return lambda z: 1.0 / (1.0 + np.exp(-z))


def activate(z, kind):
    """``act(z)`` for the activation tag ``kind``."""


@overload(activate, inline="always")
def _activate(z, kind):
    cls = getattr(kind, "instance_class", None)
    if cls is Identity:
        return lambda z, kind: z
    if cls is Relu:  # a select, not max(): NaN stays NaN, as in torch.relu
        return lambda z, kind: select(z < 0, zero_like(z), z)
    if cls is Silu:
        return lambda z, kind: z * sigmoid(z)
    return None


def activation_grad(dy, z, kind):
    """``dy * act'(z)`` for the activation tag ``kind``."""


@overload(activation_grad, inline="always")
def _activation_grad(dy, z, kind):
    cls = getattr(kind, "instance_class", None)
    if cls is Identity:
        return lambda dy, z, kind: dy
    if cls is Relu:  # a select, as torch's threshold_backward: 0 where z <= 0 (or NaN)
        return lambda dy, z, kind: select(z > 0, dy, zero_like(dy))
    if cls is Silu:
        def impl(dy, z, kind):
            s = sigmoid(z)
            one = one_like(s)
            return dy * (s * (one + z * (one - s)))
        return impl
    return None


@njit(inline="always", fastmath=set(FASTMATH), cache=True)
def grad_terms(x, dy, k, a, b, kind):
    """One value's terms of the gradient sums: ``(dz, dz * (x - k))``, ``dz = dy * act'(x * a
    + b)`` (``x`` and ``dy`` as stored)."""
    v = load(x)
    d = activation_grad(load(dy), v * a + b, kind)
    return d, d * (v - k)


# ---------------------------------------------------------------- pass 1: statistics


@loop
def moments_planes(x, w, rows, shift, blocks, cblocks, out):
    """``out[:, g, b, c] = (sum w(x-k), sum w(x-k)**2, sum w)`` over block b of group g's rows.

    Each run of ``inner`` values is summed in ``shift``'s dtype (float32 for float32 and
    bfloat16 inputs: twice the vector width, and exact enough for a few thousand shifted
    values), then added to the float64 partials.
    """
    groups, per_group = rows.shape
    channels, inner = x.shape[1], x.shape[2]
    masked = w.shape[0] > 0
    per_channel = w.shape[1] > 1
    for t in prange(groups * blocks * cblocks):
        g = t // (blocks * cblocks)
        b = (t // cblocks) % blocks
        cb = t % cblocks
        first = cb * channels // cblocks
        n = 0.0
        for j in range(b * per_group // blocks, (b + 1) * per_group // blocks):
            o = rows[g, j]
            for c in range(first, (cb + 1) * channels // cblocks):
                k = shift[g, c]
                xr = x[o, c]
                s = zero_like(k)
                q = zero_like(k)
                if masked:
                    wr = w[o, c] if per_channel else w[o, 0]
                    if per_channel or c == first:  # a per-position mask counts once per row
                        selected = 0
                        for i in range(inner):
                            selected += wr[i]  # 0 or 1
                        n = np.float64(selected)
                    out[2, g, b, c] += n
                    for i in range(inner):
                        # selected, not multiplied by the mask (NaN * 0 is NaN), without a
                        # branch: the loop vectorizes
                        v = select(wr[i] != 0, load(xr[i]) - k, zero_like(k))
                        s += v
                        q += v * v
                else:
                    for i in range(inner):
                        v = load(xr[i]) - k
                        s += v
                        q += v * v
                out[0, g, b, c] += s
                out[1, g, b, c] += q


@njit(inline="always", fastmath=set(FASTMATH), cache=True)
def _add_selected(s, q, k, c, x0, x1, x2, x3, m0, m1, m2, m3):
    """Add channel ``c`` of four rows to the running sums, each value where its mask bit
    (``m0`` ... ``m3``) is set: selected, never multiplied by the mask (NaN * 0 is NaN)."""
    zero = zero_like(k[c])
    v0 = select(m0, load(x0[c]) - k[c], zero)
    v1 = select(m1, load(x1[c]) - k[c], zero)
    v2 = select(m2, load(x2[c]) - k[c], zero)
    v3 = select(m3, load(x3[c]) - k[c], zero)
    s[c] += (v0 + v1) + (v2 + v3)
    q[c] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)


@loop
def moments_rows(x, w, rows, shift, blocks, out):
    """``moments_planes`` for ``inner == 1``: ``x`` is ``(outer, C)``, ``w`` ``(outer, 1 or C)``.

    Four rows are combined per channel before they touch the running sums (one per
    channel, in memory), and rows are summed in ``shift``'s dtype, ``FLUSH`` at a time,
    then added to the float64 partials.
    """
    groups, per_group = rows.shape
    channels = x.shape[1]
    masked = w.shape[0] > 0
    per_channel = w.shape[1] > 1
    for t in prange(groups * blocks):
        g = t // blocks
        b = t % blocks
        k = shift[g]
        s = np.zeros(channels, shift.dtype)
        q = np.zeros(channels, shift.dtype)
        n = np.zeros(channels, shift.dtype)
        start = b * per_group // blocks
        stop = (b + 1) * per_group // blocks
        counted = 0
        j = start
        while j < stop:
            if masked and j + 4 <= stop:  # as the unmasked rows below, each value selected
                x0, w0 = x[rows[g, j]], w[rows[g, j]]
                x1, w1 = x[rows[g, j + 1]], w[rows[g, j + 1]]
                x2, w2 = x[rows[g, j + 2]], w[rows[g, j + 2]]
                x3, w3 = x[rows[g, j + 3]], w[rows[g, j + 3]]
                if per_channel:
                    for c in range(channels):
                        _add_selected(s, q, k, c, x0, x1, x2, x3,
                                      w0[c] != 0, w1[c] != 0, w2[c] != 0, w3[c] != 0)
                        n[c] += (np.float32(w0[c] != 0) + np.float32(w1[c] != 0)) + (
                            np.float32(w2[c] != 0) + np.float32(w3[c] != 0))
                else:  # one test per row, out of the channel loop (it vectorizes); counted once
                    m0, m1, m2, m3 = w0[0] != 0, w1[0] != 0, w2[0] != 0, w3[0] != 0
                    for c in range(channels):
                        _add_selected(s, q, k, c, x0, x1, x2, x3, m0, m1, m2, m3)
                    counted += (int(m0) + int(m1)) + (int(m2) + int(m3))
                j += 4
            elif masked:
                o = rows[g, j]
                xr = x[o]
                wr = w[o]
                for c in range(channels):
                    # selected, not multiplied by the mask (NaN * 0 is NaN), without a branch
                    chosen = (wr[c] if per_channel else wr[0]) != 0
                    v = select(chosen, load(xr[c]) - k[c], zero_like(k[c]))
                    s[c] += v
                    q[c] += v * v
                    n[c] += select(chosen, one_like(k[c]), zero_like(k[c]))
                j += 1
            elif j + 4 <= stop:
                x0 = x[rows[g, j]]
                x1 = x[rows[g, j + 1]]
                x2 = x[rows[g, j + 2]]
                x3 = x[rows[g, j + 3]]
                for c in range(channels):
                    v0 = load(x0[c]) - k[c]
                    v1 = load(x1[c]) - k[c]
                    v2 = load(x2[c]) - k[c]
                    v3 = load(x3[c]) - k[c]
                    s[c] += (v0 + v1) + (v2 + v3)
                    q[c] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
                j += 4
            else:
                xr = x[rows[g, j]]
                for c in range(channels):
                    v = load(xr[c]) - k[c]
                    s[c] += v
                    q[c] += v * v
                j += 1
            if (j - start) % FLUSH < 4 or j == stop:
                for c in range(channels):
                    out[0, g, b, c] += s[c]
                    out[1, g, b, c] += q[c]
                    out[2, g, b, c] += n[c] + counted  # counted: the rows a per-row mask took
                    s[c] = 0
                    q[c] = 0
                    n[c] = 0
                counted = 0


# ---------------------------------------------------------------- pass 2: output


@loop
def affine_planes(x, gid, a, b, kind, cblocks, y):
    """``y[o, c] = act(x[o, c] * a[g, c] + b[g, c])`` with ``g = gid[o]``."""
    outer, channels, inner = x.shape
    for t in prange(outer * cblocks):
        o = t // cblocks
        cb = t % cblocks
        g = gid[o]
        for c in range(cb * channels // cblocks, (cb + 1) * channels // cblocks):
            ac = a[g, c]
            bc = b[g, c]
            xr = x[o, c]
            yr = y[o, c]
            for i in range(inner):
                store(yr, i, activate(load(xr[i]) * ac + bc, kind))


@loop
def affine_rows(x, gid, a, b, kind, blocks, y):
    """``affine_planes`` for ``inner == 1``."""
    outer, channels = x.shape
    for t in prange(blocks):
        for o in range(t * outer // blocks, (t + 1) * outer // blocks):
            g = gid[o]
            ar = a[g]
            br = b[g]
            xr = x[o]
            yr = y[o]
            for c in range(channels):
                store(yr, c, activate(load(xr[c]) * ar[c] + br[c], kind))


# ---------------------------------------------------------------- pass 3: gradient sums


@loop
def grad_sums_planes(x, dy, rows, mean, a, b, kind, blocks, cblocks, out):
    """``out[:, g, j, c] = (sum dz, sum dz * (x - mean))`` over block j of group g's rows,
    ``dz = dy * act'(x * a + b)`` (each run summed in ``mean``'s dtype, as in
    ``moments_planes``)."""
    groups, per_group = rows.shape
    channels, inner = x.shape[1], x.shape[2]
    for t in prange(groups * blocks * cblocks):
        g = t // (blocks * cblocks)
        block = (t // cblocks) % blocks
        cb = t % cblocks
        for j in range(block * per_group // blocks, (block + 1) * per_group // blocks):
            o = rows[g, j]
            for c in range(cb * channels // cblocks, (cb + 1) * channels // cblocks):
                k = mean[g, c]
                ac = a[g, c]
                bc = b[g, c]
                xr = x[o, c]
                dr = dy[o, c]
                s = zero_like(k)
                p = zero_like(k)
                for i in range(inner):
                    d, dv = grad_terms(xr[i], dr[i], k, ac, bc, kind)
                    s += d
                    p += dv
                out[0, g, block, c] += s
                out[1, g, block, c] += p


@loop
def grad_sums_rows(x, dy, rows, mean, a, b, kind, blocks, out):
    """``grad_sums_planes`` for ``inner == 1`` (four rows combined, as in ``moments_rows``)."""
    groups, per_group = rows.shape
    channels = x.shape[1]
    for t in prange(groups * blocks):
        g = t // blocks
        block = t % blocks
        k = mean[g]
        ar = a[g]
        br = b[g]
        s = np.zeros(channels, mean.dtype)
        p = np.zeros(channels, mean.dtype)
        start = block * per_group // blocks
        stop = (block + 1) * per_group // blocks
        j = start
        while j < stop:
            if j + 4 <= stop:
                o0, o1, o2, o3 = rows[g, j], rows[g, j + 1], rows[g, j + 2], rows[g, j + 3]
                x0, x1, x2, x3 = x[o0], x[o1], x[o2], x[o3]
                d0, d1, d2, d3 = dy[o0], dy[o1], dy[o2], dy[o3]
                for c in range(channels):
                    e0, f0 = grad_terms(x0[c], d0[c], k[c], ar[c], br[c], kind)
                    e1, f1 = grad_terms(x1[c], d1[c], k[c], ar[c], br[c], kind)
                    e2, f2 = grad_terms(x2[c], d2[c], k[c], ar[c], br[c], kind)
                    e3, f3 = grad_terms(x3[c], d3[c], k[c], ar[c], br[c], kind)
                    s[c] += (e0 + e1) + (e2 + e3)
                    p[c] += (f0 + f1) + (f2 + f3)
                j += 4
            else:
                o = rows[g, j]
                for c in range(channels):
                    e, f = grad_terms(x[o, c], dy[o, c], k[c], ar[c], br[c], kind)
                    s[c] += e
                    p[c] += f
                j += 1
            if (j - start) % FLUSH < 4 or j == stop:
                for c in range(channels):
                    out[0, g, block, c] += s[c]
                    out[1, g, block, c] += p[c]
                    s[c] = 0
                    p[c] = 0


# ---------------------------------------------------------------- pass 4: input gradient


@loop
def grad_input_planes(x, dy, w, gid, m, p, q, u, a, b, kind, cblocks, dx):
    """``dx = p * dz - (q * (x - m) + u)`` with per-(group, channel) coefficients and
    ``dz = dy * act'(x * a + b)``; where ``w`` is 0, ``p * dz`` (``w`` selects which, it does
    not multiply)."""
    outer, channels, inner = x.shape
    masked = w.shape[0] > 0
    per_channel = w.shape[1] > 1
    for t in prange(outer * cblocks):
        o = t // cblocks
        cb = t % cblocks
        g = gid[o]
        for c in range(cb * channels // cblocks, (cb + 1) * channels // cblocks):
            mc = m[g, c]
            pc = p[g, c]
            qc = q[g, c]
            uc = u[g, c]
            ac = a[g, c]
            bc = b[g, c]
            xr = x[o, c]
            dr = dy[o, c]
            dxr = dx[o, c]
            if masked:
                wr = w[o, c] if per_channel else w[o, 0]
                for i in range(inner):
                    v = load(xr[i])
                    d = pc * activation_grad(load(dr[i]), v * ac + bc, kind)
                    store(dxr, i, select(wr[i] != 0, d - (qc * (v - mc) + uc), d))
            else:
                for i in range(inner):
                    v = load(xr[i])
                    d = pc * activation_grad(load(dr[i]), v * ac + bc, kind)
                    store(dxr, i, d - (qc * (v - mc) + uc))


@loop
def grad_input_rows(x, dy, w, gid, m, p, q, u, a, b, kind, blocks, dx):
    """``grad_input_planes`` for ``inner == 1``. The mask's test sits outside the row loops:
    inside them, the serial flavor's channel loop did not vectorize (2x the time)."""
    outer, channels = x.shape
    masked = w.shape[0] > 0
    per_channel = w.shape[1] > 1
    for t in prange(blocks):
        start = t * outer // blocks
        stop = (t + 1) * outer // blocks
        if masked:
            for o in range(start, stop):
                g = gid[o]
                mr, pr, qr, ur, ar, br = m[g], p[g], q[g], u[g], a[g], b[g]
                xr, dr, dxr, wr = x[o], dy[o], dx[o], w[o]
                for c in range(channels):
                    v = load(xr[c])
                    d = pr[c] * activation_grad(load(dr[c]), v * ar[c] + br[c], kind)
                    selected = wr[c] if per_channel else wr[0]
                    store(dxr, c, select(selected != 0, d - (qr[c] * (v - mr[c]) + ur[c]), d))
        else:
            for o in range(start, stop):
                g = gid[o]
                mr, pr, qr, ur, ar, br = m[g], p[g], q[g], u[g], a[g], b[g]
                xr, dr, dxr = x[o], dy[o], dx[o]
                for c in range(channels):
                    v = load(xr[c])
                    d = pr[c] * activation_grad(load(dr[c]), v * ar[c] + br[c], kind)
                    store(dxr, c, d - (qr[c] * (v - mr[c]) + ur[c]))


# ---------------------------------------------------------------- the moving-average update


@intrinsic
def _pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to values of ``like``'s type."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Number):
        return None
    pointer = types.CPointer(like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(cache=True, nogil=True)  # no fastmath: every product and sum rounded as torch's are
def _pooled(values, counts, i, n, groups, correction, masked, unbiased):
    """The mean over the groups of ``values[g * n + i]``, summed in order: each multiplied by
    ``correction`` first; ``masked``, over the groups whose ``counts`` exceed 1, each
    multiplied by ``count / (count - 1)`` first where ``unbiased`` (NaN where none does)."""
    total = zero_like(values[i])
    selected = 0
    for g in range(groups):
        j = g * n + i
        if not masked:
            total += values[j] * correction
        elif counts[j] > 1:
            c = counts[j]
            total += values[j] * (c / (c - one_like(c))) if unbiased else values[j]
            selected += 1
    if not masked:
        return total / as_type(groups, total)
    return total / as_type(selected, total) if selected else as_type(np.nan, total)


@njit(cache=True, nogil=True, fastmath={"contract"})
def _lerp_one_group_if_finite(mm, mv, m, v, count, n, weight, correction):
    """:func:`lerp_if_finite` for one group (no ghost batches, no mask): the same arithmetic,
    with the statistics read directly (what pooling one group gives), in loops that
    vectorize."""
    finite = True
    for i in range(n):  # no early exit: the loop vectorizes
        finite &= np.isfinite(as_type(m[i], weight)) & np.isfinite(
            as_type(v[i] * correction, weight))
    if not finite:
        return False
    small = abs(weight) < 0.5
    coefficient = weight if small else weight - one_like(weight)
    for i in range(n):
        value = as_type(m[i], weight)
        mm[i] = coefficient * (value - mm[i]) + (mm[i] if small else value)
        value = as_type(v[i] * correction, weight)
        mv[i] = coefficient * (value - mv[i]) + (mv[i] if small else value)
    carray(_pointer(count, np.int64(0)), 1)[0] += 1
    return True


@njit(cache=True, nogil=True, fastmath={"contract"})
def lerp_one_group_if_finite(moving_mean, moving_variance, count, mean, variance, n, weight,
                             correction, stat):
    """:func:`lerp_if_finite` for one group without a mask (the plain mode's every call),
    with fewer arguments to convert per call: the same addresses and arithmetic."""
    return _lerp_one_group_if_finite(carray(_pointer(moving_mean, weight), n),
                                     carray(_pointer(moving_variance, weight), n),
                                     carray(_pointer(mean, stat), n),
                                     carray(_pointer(variance, stat), n), count, n, weight,
                                     correction)


@njit(cache=True, nogil=True, fastmath={"contract"})
def lerp_if_finite(moving_mean, moving_variance, count, mean, variance, counts, n, groups,
                   masked, weight, correction, unbiased, stat):
    """Move two moving averages toward one batch's statistics, in place, if every value is
    finite in the averages' dtype; return whether they moved.

    The arguments are addresses of contiguous memory (the caller checks sizes and dtypes):
    ``moving_mean``/``moving_variance`` hold ``n`` values of ``weight``'s type, ``mean``/
    ``variance`` (and ``counts`` where ``masked``) ``groups * n`` values of ``stat``'s type
    (group after group: ghost batches), ``count`` one int64, incremented when the averages
    move. The batch's statistics are pooled as
    :func:`batchnorm.statistics.pooled_statistics` pools them: the groups' mean, each
    ``variance`` multiplied by ``correction`` first (Bessel's, or 1), in its own dtype; with
    per-position counts (``masked``: a mask's), the mean over the groups with more than one
    value, each variance multiplied by its own Bessel's correction where ``unbiased``. The
    update is ``torch.lerp``'s, as ATen vectorizes it: a fused multiply-add,
    ``moving + weight * (value - moving)`` for a weight under 0.5 (TensorFlow's update),
    ``value + (weight - 1) * (value - moving)`` from 0.5 on.
    """
    mm = carray(_pointer(moving_mean, weight), n)
    mv = carray(_pointer(moving_variance, weight), n)
    m = carray(_pointer(mean, stat), groups * n)
    v = carray(_pointer(variance, stat), groups * n)
    if groups == 1 and not masked:  # one group: vectorized loops, no pooling to call
        return _lerp_one_group_if_finite(mm, mv, m, v, count, n, weight, correction)
    c = carray(_pointer(counts, stat), groups * n)
    one = one_like(stat)
    finite = True
    for i in range(n):  # no early exit
        finite &= np.isfinite(as_type(_pooled(m, c, i, n, groups, one, masked, False), weight)) \
            & np.isfinite(as_type(_pooled(v, c, i, n, groups, correction, masked, unbiased),
                                  weight))
    if not finite:
        return False
    small = abs(weight) < 0.5
    coefficient = weight if small else weight - one_like(weight)
    for i in range(n):
        value = as_type(_pooled(m, c, i, n, groups, one, masked, False), weight)
        mm[i] = coefficient * (value - mm[i]) + (mm[i] if small else value)
        value = as_type(_pooled(v, c, i, n, groups, correction, masked, unbiased), weight)
        mv[i] = coefficient * (value - mv[i]) + (mv[i] if small else value)
    carray(_pointer(count, np.int64(0)), 1)[0] += 1
    return True


@njit(cache=True, nogil=True)  # no fastmath: the product and the difference rounded apart
def renorm_variance(moving_stddev, moving_variance, n, epsilon):
    """``moving_variance = relu(moving_stddev**2 - epsilon)``, as
    :func:`batchnorm.statistics._renorm_variance` rounds it. A loop of its own: called from
    a loop compiled with ``contract`` (:func:`renorm_lerp_if_finite`), this arithmetic would
    be fused into one rounding. Addresses of ``n`` contiguous values of ``epsilon``'s
    type."""
    ms = carray(_pointer(moving_stddev, epsilon), n)
    mv = carray(_pointer(moving_variance, epsilon), n)
    for i in range(n):
        value = ms[i] * ms[i] - epsilon
        mv[i] = zero_like(value) if value < 0 else value  # NaN stays NaN, as relu's


@njit(cache=True, nogil=True, fastmath={"contract"})
def renorm_lerp_if_finite(moving_mean, moving_stddev, renorm_mean, renorm_stddev, count,
                          mean, variance, stddev, n, weight, renorm_weight, stat):
    """A renorm state's averages moved toward one batch (:func:`batchnorm.statistics.
    update_state`'s arithmetic), in place, if the batch's mean and variance are finite in the
    averages' dtype; return whether they moved.

    ``moving_mean`` and ``moving_stddev`` move with ``weight``, ``renorm_mean`` and
    ``renorm_stddev`` with ``renorm_weight`` (``torch.lerp``'s arithmetic, as
    :func:`lerp_if_finite`), toward the batch's ``mean`` and ``stddev``; the caller then
    derives ``moving_variance`` (:func:`renorm_variance`). The caller computes ``stddev``
    (``sqrt(variance + epsilon)``) in torch operations: torch's float32 square root is not
    always the correctly rounded one a compiled loop computes. Addresses of contiguous
    memory (the caller checks sizes and dtypes): the averages ``n`` values of ``weight``'s
    type, ``mean``/``variance`` (the corrected variance whose finiteness decides)/``stddev``
    ``n`` values of ``stat``'s type (one group), ``count`` one int64, incremented when the
    averages move.
    """
    mm = carray(_pointer(moving_mean, weight), n)
    ms = carray(_pointer(moving_stddev, weight), n)
    rm = carray(_pointer(renorm_mean, weight), n)
    rs = carray(_pointer(renorm_stddev, weight), n)
    m = carray(_pointer(mean, stat), n)
    v = carray(_pointer(variance, stat), n)
    s = carray(_pointer(stddev, stat), n)
    finite = True
    for i in range(n):  # no early exit
        finite &= np.isfinite(as_type(m[i], weight)) & np.isfinite(as_type(v[i], weight))
    if not finite:
        return False
    small, renorm_small = abs(weight) < 0.5, abs(renorm_weight) < 0.5
    coefficient = weight if small else weight - one_like(weight)
    renorm_coefficient = renorm_weight if renorm_small else renorm_weight - one_like(weight)
    for i in range(n):
        value, deviation = as_type(m[i], weight), as_type(s[i], weight)
        mm[i] = coefficient * (value - mm[i]) + (mm[i] if small else value)
        rm[i] = renorm_coefficient * (value - rm[i]) + (rm[i] if renorm_small else value)
        ms[i] = coefficient * (deviation - ms[i]) + (ms[i] if small else deviation)
        rs[i] = (renorm_coefficient * (deviation - rs[i])
                 + (rs[i] if renorm_small else deviation))
    carray(_pointer(count, np.int64(0)), 1)[0] += 1
    return True


@njit(cache=True, nogil=True)  # no fastmath: each operation rounded as torch's
def renorm_terms(mean, root, renorm_mean, renorm_stddev, d, n, floor, rmin, rmax, dmax):
    """Batch Renormalization's ``(r, d)``, ``r`` written over ``root`` and ``d`` to ``d``
    (:func:`batchnorm.statistics.renorm_correction`'s arithmetic, operation by operation):
    with ``s = max(renorm_stddev, floor)``, ``r = root / s`` clamped to ``[rmin, rmax]`` and
    ``d = (mean - renorm_mean) / s`` to ``[-dmax, dmax]``, each 1 and 0 where not finite.
    ``root`` is ``sqrt(variance + epsilon)``, computed by the caller in torch operations (see
    :func:`renorm_lerp_if_finite`). Addresses of ``n`` contiguous values of ``floor``'s
    type."""
    m = carray(_pointer(mean, floor), n)
    r = carray(_pointer(root, floor), n)
    rm = carray(_pointer(renorm_mean, floor), n)
    rs = carray(_pointer(renorm_stddev, floor), n)
    out_d = carray(_pointer(d, floor), n)
    one, zero = one_like(floor), zero_like(floor)
    for i in range(n):
        s = floor if rs[i] < floor else rs[i]  # NaN stays NaN, as clamp_min's
        ri = r[i] / s
        ri = rmin if ri < rmin else ri
        ri = rmax if ri > rmax else ri
        r[i] = ri if np.isfinite(ri) else one
        di = (m[i] - rm[i]) / s
        di = -dmax if di < -dmax else di
        di = dmax if di > dmax else di
        out_d[i] = di if np.isfinite(di) else zero


# ---------------------------------------------------------------- small inputs' moments


@njit(inline="always", cache=True)
def _not_below_zero(v):
    """``v``, or 0 where it is negative (rounding); NaN stays NaN."""
    return zero_like(v) if v < 0 else v


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def contiguous_moments(x, mean, variance, batch, features, inner, source, like):
    """The mean and biased variance of each feature of a contiguous ``(batch, features,
    inner)`` input of ``source``'s type (bfloat16 as ``uint16`` bits), written to ``mean``
    and ``variance`` in ``like``'s type: sums in float64 of the values shifted by each
    feature's first value, on the calling thread (the statistics of an input small enough
    that a pass over it costs less than a thread pool's start). Under 64 values per plane
    each sample's ``(features, inner)`` block is summed elementwise into per-position sums
    (vectorized along memory), reduced per feature at the end; above, plane by plane.
    Addresses of contiguous memory (the caller checks sizes and dtypes), ``batch * inner``
    at least 1."""
    xs = carray(_pointer(x, source), batch * features * inner)
    out_mean = carray(_pointer(mean, like), features)
    out_variance = carray(_pointer(variance, like), features)
    count = np.float64(batch * inner)
    if inner < 64:  # few values per plane: each sample's (features, inner) block at once
        width = features * inner
        shift = np.empty(width, np.float64)
        s = np.zeros(width, np.float64)
        q = np.zeros(width, np.float64)
        for i in range(width):  # each feature's first value, at each of its positions
            shift[i] = np.float64(load(xs[(i // inner) * inner]))
        for b in range(batch):
            row = b * width
            for i in range(width):
                d = np.float64(load(xs[row + i])) - shift[i]
                s[i] += d
                q[i] += d * d
        for c in range(features):
            s1 = np.float64(0.0)
            q1 = np.float64(0.0)
            for j in range(c * inner, (c + 1) * inner):
                s1 += s[j]
                q1 += q[j]
            mu = s1 / count
            out_mean[c] = as_type(shift[c * inner] + mu, like)
            out_variance[c] = as_type(_not_below_zero(q1 / count - mu * mu), like)
        return
    for c in range(features):
        k = np.float64(load(xs[c * inner]))
        s1 = np.float64(0.0)
        q1 = np.float64(0.0)
        for b in range(batch):
            start = (b * features + c) * inner
            for j in range(inner):
                d = np.float64(load(xs[start + j])) - k
                s1 += d
                q1 += d * d
        mu = s1 / count
        out_mean[c] = as_type(k + mu, like)
        out_variance[c] = as_type(_not_below_zero(q1 / count - mu * mu), like)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def masked_contiguous_moments(x, mask, mean, variance, batch, features, inner, source, like):
    """:func:`contiguous_moments` of the values a mask selects: ``mask`` holds ``batch *
    inner`` bytes (nonzero: selected), one per position of a feature, the same for every
    feature; return how many it selects. Two passes (the mean, then the squares about it),
    values chosen with a select, never multiplied by the mask: a NaN or Inf at a position it
    leaves out reaches neither statistic. Nothing is written where it selects fewer than
    two values (the caller normalizes with other statistics then)."""
    xs = carray(_pointer(x, source), batch * features * inner)
    ms = carray(_pointer(mask, np.uint8(0)), batch * inner)
    out_mean = carray(_pointer(mean, like), features)
    out_variance = carray(_pointer(variance, like), features)
    n = 0
    for i in range(batch * inner):
        n += ms[i] != 0
    if n < 2:
        return n
    count = np.float64(n)
    zero = np.float64(0.0)
    if inner == 1:  # (batch, features): a row selected or not, the features side by side
        s = np.zeros(features, np.float64)
        q = np.zeros(features, np.float64)
        for b in range(batch):
            if ms[b] != 0:
                row = b * features
                for c in range(features):
                    s[c] += np.float64(load(xs[row + c]))
        for c in range(features):
            s[c] /= count
        for b in range(batch):
            if ms[b] != 0:
                row = b * features
                for c in range(features):
                    d = np.float64(load(xs[row + c])) - s[c]
                    q[c] += d * d
        for c in range(features):
            out_mean[c] = as_type(s[c], like)
            out_variance[c] = as_type(q[c] / count, like)
        return n
    for c in range(features):
        s1 = zero
        for b in range(batch):
            start, at = (b * features + c) * inner, b * inner
            for j in range(inner):
                s1 += select(ms[at + j] != 0, np.float64(load(xs[start + j])), zero)
        mu = s1 / count
        q1 = zero
        for b in range(batch):
            start, at = (b * features + c) * inner, b * inner
            for j in range(inner):
                d = select(ms[at + j] != 0, np.float64(load(xs[start + j])) - mu, zero)
                q1 += d * d
        out_mean[c] = as_type(mu, like)
        out_variance[c] = as_type(q1 / count, like)
    return n


# ---------------------------------------------------------------- debiased inference statistics


@njit(cache=True, nogil=True)
def debiased(moving_mean, moving_variance, initial_mean, initial_variance, count, n, momentum,
             mean, variance):
    """The debiased moving averages inference normalizes with, written to ``mean`` and
    ``variance``: ``(moving - momentum**t * initial) / (1 - momentum**t)`` after ``t > 0``
    updates, the averages themselves before any (:func:`batchnorm.statistics.
    inference_statistics`' arithmetic, operation by operation, in ``momentum``'s type).

    The arguments are addresses of contiguous memory (the caller checks sizes and dtypes):
    ``n`` values of ``momentum``'s type each, ``count`` one int64.
    """
    t = carray(_pointer(count, np.int64(0)), 1)[0]
    mm = carray(_pointer(moving_mean, momentum), n)
    mv = carray(_pointer(moving_variance, momentum), n)
    out_mean = carray(_pointer(mean, momentum), n)
    out_variance = carray(_pointer(variance, momentum), n)
    if t <= 0:
        for i in range(n):
            out_mean[i] = mm[i]
            out_variance[i] = mv[i]
        return
    m0 = carray(_pointer(initial_mean, momentum), n)
    v0 = carray(_pointer(initial_variance, momentum), n)
    decay = momentum ** as_type(t, momentum)
    denominator = one_like(momentum) - decay
    for i in range(n):
        out_mean[i] = (mm[i] - decay * m0[i]) / denominator
        out_variance[i] = (mv[i] - decay * v0[i]) / denominator


# ---------------------------------------------------------------- small inputs' whole calls


@njit(inline="always", fastmath=_FASTMATH, cache=True)
def _write_affine(xs, ys, inv, shift, batch, features, inner):
    """``ys = xs * inv + shift`` per feature of a ``(batch, features, inner)`` layout,
    rounded once to ``ys``' type; rows of features side by side where ``inner`` is 1."""
    if inner == 1:
        for b in range(batch):
            row = b * features
            for f in range(features):
                store(ys, row + f, load(xs[row + f]) * inv[f] + shift[f])
        return
    for b in range(batch):
        for f in range(features):
            start = (b * features + f) * inner
            i, sh = inv[f], shift[f]
            for j in range(start, start + inner):
                store(ys, j, load(xs[j]) * i + sh)


@njit(inline="always", fastmath=_FASTMATH, cache=True)
def _grad_sums(xs, dys, m, batch, features, inner, s1, s2):
    """``s1 += sum(dy)`` and ``s2 += sum(dy * (x - mean))`` per feature of a ``(batch,
    features, inner)`` layout, in float64."""
    if inner == 1:
        for b in range(batch):
            row = b * features
            for f in range(features):
                g = np.float64(load(dys[row + f]))
                s1[f] += g
                s2[f] += g * (np.float64(load(xs[row + f])) - np.float64(m[f]))
        return
    for b in range(batch):  # each plane summed in the statistics' type, planes in float64
        for f in range(features):
            start = (b * features + f) * inner
            mf = m[f]
            t1 = zero_like(mf)
            t2 = zero_like(mf)
            for j in range(start, start + inner):
                g = load(dys[j])
                t1 += g
                t2 += g * (load(xs[j]) - mf)
            s1[f] += np.float64(t1)
            s2[f] += np.float64(t2)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def folded_forward(x, y, mean, variance, gamma, beta, adj_scale, adj_bias, renorm_mean,
                   renorm_stddev, a, c, e, batch, features, inner, flags, adj_strides,
                   epsilon, floor, rmin, rmax, dmax, source, like):
    """The folded kernel's training output for a small contiguous ``(batch, features,
    inner)`` input of ``source``'s type (bfloat16 as ``uint16`` bits), in one call on the
    calling thread: the batch's mean and biased variance (:func:`contiguous_moments`), the
    factor ``c`` and offset ``e`` on ``xhat`` (Batch Renormalization's ``(r, d)`` from the
    renorm averages and ``floor = sqrt(epsilon)``, clipped, the identity where not finite;
    composed with the adjustment's terms in :func:`batchnorm.statistics.output_affine`'s
    order), ``a = c * gamma`` and ``y = x * inv + shift`` with ``inv = invstd * a``,
    ``shift = e * gamma + beta - mean * inv``, rounded once to ``y``'s type. ``flags``: bit 0
    renorm, 1 an adjustment, 2 gamma, 3 beta (absent terms' addresses are not read);
    ``adj_strides``: bit 0 the scale's, bit 1 the bias's stride (0: a value broadcast, 1: a
    vector). Addresses of contiguous memory; statistics, terms, parameters and the
    constants of ``like``'s type."""
    contiguous_moments(x, mean, variance, batch, features, inner, source, like)
    xs = carray(_pointer(x, source), batch * features * inner)
    ys = carray(_pointer(y, source), batch * features * inner)
    m = carray(_pointer(mean, like), features)
    v = carray(_pointer(variance, like), features)
    out_a = carray(_pointer(a, like), features)
    out_c = carray(_pointer(c, like), features)
    out_e = carray(_pointer(e, like), features)
    renorm, adjusted = flags & 1, flags & 2
    scaled, shifted = flags & 4, flags & 8
    one, zero = one_like(like), zero_like(like)
    inv = np.empty_like(m)
    shift = np.empty_like(m)
    for f in range(features):
        root = np.sqrt(v[f] + epsilon)
        scale, offset = one, zero
        if renorm:
            rm = carray(_pointer(renorm_mean, like), features)
            rs = carray(_pointer(renorm_stddev, like), features)
            s = floor if rs[f] < floor else rs[f]
            r = root / s
            r = rmin if r < rmin else r
            r = rmax if r > rmax else r
            scale = r if np.isfinite(r) else one
            d = (m[f] - rm[f]) / s
            d = -dmax if d < -dmax else d
            d = dmax if d > dmax else d
            offset = d if np.isfinite(d) else zero
        if adjusted:
            adj_s = carray(_pointer(adj_scale, like), features)[f * (adj_strides & 1)]
            adj_b = carray(_pointer(adj_bias, like), features)[f * (adj_strides >> 1)]
            if renorm:
                scale, offset = scale * adj_s, offset * adj_s + adj_b
            else:
                scale, offset = adj_s, adj_b
        out_c[f], out_e[f] = scale, offset
        if scaled:
            g = carray(_pointer(gamma, like), features)[f]
            scale, offset = scale * g, offset * g
        if shifted:
            offset = offset + carray(_pointer(beta, like), features)[f]
        out_a[f] = scale
        i = one / root * scale  # affine_terms: invstd * scale, then offset - mean * inv
        inv[f] = i
        shift[f] = offset - m[f] * i
    _write_affine(xs, ys, inv, shift, batch, features, inner)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def small_backward(x, dy, mask, dx, mean, variance, a, c, e, dgamma, dbeta, batch, features,
                   inner, count, flags, epsilon, source, like):
    """The gradients of :func:`folded_forward`'s and :func:`masked_forward`'s outputs, in one
    call on the calling thread: ``dgamma = c * sum(dy * xhat) + e * sum(dy)``, ``dbeta =
    sum(dy)`` (sums over every position, float64) and ``dx = a * invstd * (dy - [selected] /
    count * (sum(dy) + xhat * sum(dy * xhat)))`` (ATen's training backward where every
    position is selected; the statistics depend on the selected ones only, the correction
    chosen with a select, never multiplied by the mask), ``a``, ``c`` and ``e`` constants.
    ``flags``: bit 0 dx, 1 dgamma, 2 dbeta (the others' addresses are not written), 3 ``a``
    given (else 1), 4 ``c`` and ``e`` given (else 1 and 0), 5 ``mask`` given (one byte per
    ``batch * inner`` position, ``count`` the selected positions; else every position and
    ``count`` unread). ``x``, ``dy`` and ``dx`` contiguous ``(batch, features, inner)`` of
    ``source``'s type; the rest of ``like``'s type (``epsilon`` a float)."""
    size = batch * features * inner
    xs = carray(_pointer(x, source), size)
    dys = carray(_pointer(dy, source), size)
    masked = flags & 32
    ms = carray(_pointer(mask, np.uint8(0)), batch * inner if masked else 0)
    m = carray(_pointer(mean, like), features)
    v = carray(_pointer(variance, like), features)
    s1 = np.zeros(features, np.float64)
    s2 = np.zeros(features, np.float64)
    _grad_sums(xs, dys, m, batch, features, inner, s1, s2)
    invstd = np.empty(features, np.float64)
    for f in range(features):
        invstd[f] = 1.0 / np.sqrt(np.float64(v[f]) + epsilon)
    if flags & 2:
        out_dgamma = carray(_pointer(dgamma, like), features)
        cs = carray(_pointer(c, like), features)
        es = carray(_pointer(e, like), features)
        for f in range(features):
            g = s2[f] * invstd[f]
            if flags & 16:
                g = cs[f] * g + es[f] * s1[f]
            out_dgamma[f] = as_type(g, like)
    if flags & 4:
        out_dbeta = carray(_pointer(dbeta, like), features)
        for f in range(features):
            out_dbeta[f] = as_type(s1[f], like)
    if not flags & 1:
        return
    # dx = dy * k + [selected] * (x * u + t): k = invstd * a, p = sum(dy * (x - mean)) *
    # invstd**2 / n, q = sum(dy) / n, u = -p * k, t = (mean * p - q) * k; the terms in
    # float64, the pass in the statistics' type.
    n = np.float64(count) if masked else np.float64(batch * inner)
    w = carray(_pointer(a, like), features)
    k = np.empty_like(m)
    u = np.empty_like(m)
    t = np.empty_like(m)
    for f in range(features):
        kf = invstd[f] * np.float64(w[f]) if flags & 8 else invstd[f]
        pf = s2[f] * invstd[f] * invstd[f] / n
        k[f], u[f], t[f] = kf, -pf * kf, (np.float64(m[f]) * pf - s1[f] / n) * kf
    dxs = carray(_pointer(dx, source), size)
    zero = zero_like(m[0])
    if inner == 1:
        for b in range(batch):
            row, selected = b * features, not masked or ms[b] != 0
            for f in range(features):
                j = row + f
                term = select(selected, load(xs[j]) * u[f] + t[f], zero)
                store(dxs, j, load(dys[j]) * k[f] + term)
        return
    for b in range(batch):
        for f in range(features):
            start, at = (b * features + f) * inner, b * inner
            kf, uf, tf = k[f], u[f], t[f]
            for j in range(inner):
                selected = not masked or ms[at + j] != 0
                term = select(selected, load(xs[start + j]) * uf + tf, zero)
                store(dxs, start + j, load(dys[start + j]) * kf + term)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def masked_forward(x, mask, y, mean, variance, counts, gamma, beta, batch, features, inner,
                   flags, epsilon, source, like):
    """The masked kernel's training output for a small contiguous ``(batch, features,
    inner)`` input in one call on the calling thread: the selected positions' statistics
    (:func:`masked_contiguous_moments`, whose count it returns and writes to each of the
    ``features`` values of ``counts``), then, where they are two or more,
    ``y = x * inv + shift`` at every position with ``inv = gamma * invstd`` and
    ``shift = beta - mean * inv``, rounded once to ``y``'s type (nothing is written under
    two). ``flags``: bit 0 gamma, 1 beta (absent ones' addresses are not read); statistics,
    parameters and ``epsilon`` of ``like``'s type."""
    n = masked_contiguous_moments(x, mask, mean, variance, batch, features, inner, source,
                                  like)
    out_counts = carray(_pointer(counts, like), features)
    for f in range(features):
        out_counts[f] = as_type(n, like)
    if n < 2:
        return n
    xs = carray(_pointer(x, source), batch * features * inner)
    ys = carray(_pointer(y, source), batch * features * inner)
    m = carray(_pointer(mean, like), features)
    v = carray(_pointer(variance, like), features)
    one = one_like(like)
    inv = np.empty_like(m)
    shift = np.empty_like(m)
    for f in range(features):
        i = one / np.sqrt(v[f] + epsilon)
        if flags & 1:
            i = i * carray(_pointer(gamma, like), features)[f]
        offset = carray(_pointer(beta, like), features)[f] if flags & 2 else zero_like(like)
        inv[f] = i
        shift[f] = offset - m[f] * i
    _write_affine(xs, ys, inv, shift, batch, features, inner)
    return n
