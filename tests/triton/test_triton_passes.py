"""The Triton passes (``kernels.triton.passes``) against a float64 torch reference and,
where numba is available, the numba loops of the CPU kernel (``kernels.cpu``).

Running: ``TRITON_INTERPRET=1 python -m pytest -m triton`` (or ``-k triton``) on a CPU
machine; on a GPU machine without the variable the kernels are compiled and only the
``cuda`` cases run. The variable must come from the command line: Triton reads it
when a kernel is defined (when ``triton.passes`` is first imported) and again when
it lazily imports its own modules later, so setting it here would have to leave it
set for the whole pytest session (every other test module included), and unsetting
it after the import breaks the interpreter. Without it and without a GPU, every
test here is skipped with the reason ``available()`` gives.

Cases: the "planes" layout (``inner > 1``, NCHW) and the "rows" layout (``inner == 1``,
channels-last with several rows per sample), each also with tiny tiles (``TILE`` 128)
so that programs loop over several row and inner tiles, channels span several tiles
and the reductions split each group into several blocks; one group and ghost batches
of 2 samples (strided, as tf_keras); no mask, a per-position and a per-channel mask
(group 0 masked out entirely for ghost batches); float32, float64, bfloat16, float16; CPU tensors
(interpreter) and CUDA tensors when there is a GPU. The numba cross-checks call the
CPU kernel's pass helpers (``layout.group_rows``, ``cpu.passes.moments_pass``, ``affine_pass``,
``grad_sums_pass``, ``grad_input_pass``, ``no_mask``) with a stand-in for
``layout.Layout``. Without a GPU, ``test_triton_kernels_compile_for_h200`` still
compiles every kernel variant for sm_90 (Triton's NVIDIA backend needs no device) and
checks that aligned loads are vectorized.

Tolerances (``eps`` is the spacing of 1.0: 2**-23 for float32, 2**-52 for float64):
- Sums (moments, grad_sums): accumulated in float32 (float64 for float64 inputs) in
  tile lanes of a few values each, then a tree over <= 2048 lanes, then float64. Error
  <= (values per lane + 11) * eps/2 * sum|terms|, well under rtol = 1e-5 (float64:
  1e-12) of sum|terms|; a typical term is >= 1e-3 of it here. The masked
  counts are sums of 0/1 (exact): compared exactly. Against the numba loops (which
  also sum float32 runs): the same rtol, doubled.
- Elementwise outputs (affine, grad_input): computed in float32 (float64 for float64
  inputs) from the same coefficients as the float64 reference. affine: two roundings,
  <= eps * (|x a| + |b|); grad_input: five roundings, <= 3 eps * (|p dy| + |q (x - m)|
  + |u|). bfloat16 and float16 outputs are that float32 result rounded to nearest: add
  half an ulp of the output dtype (at the larger of the two values compared), which
  truncation instead of rounding would exceed. Exception: Triton's interpreter (3.9)
  truncates float32 -> bfloat16 (compiled kernels round to nearest even), so bfloat16
  outputs get one ulp under the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from batchnorm.kernels import cpu
from batchnorm.kernels.cpu import passes as cpu_passes
from batchnorm.kernels.layout import group_rows
from batchnorm.kernels.triton import passes as tp

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(tp.available() is not None, reason=f"Triton: {tp.available()}"),
]

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not tp.INTERPRETED, reason="compiled Triton kernels take CUDA tensors")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device")),
]
# id: (batch, rows per sample, channels, inner, tuning of triton.passes). The tiny tiles
# make programs loop over several row and inner tiles and split groups into several blocks
# (over rows in "rows_tiny_tiles", over inner positions in "planes_tiny_tiles", one group).
LAYOUTS = {
    "planes": (8, 1, 5, 37, {}),
    "planes_tiny_tiles": (4, 1, 2, 200, {"TILE": 128, "PROGRAMS": 4, "MIN_VALUES": 1000}),
    "rows": (8, 3, 37, 1, {}),
    "rows_tiny_tiles": (8, 4, 70, 1, {"TILE": 128, "MAX_BC": 32, "PROGRAMS": 8,
                                      "MIN_VALUES": 8}),
}
GROUPS = {"one_group": None, "ghost": 2}  # virtual batch size 2: batch / 2 strided groups
MASKS = [None, "position", "channel"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(layout, groups, dtype, device, monkeypatch, mask=None):
    batch, per_sample, channels, inner, tuning = LAYOUTS[layout]
    for name, value in tuning.items():
        monkeypatch.setattr(tp, name, value)
    outer = batch * per_sample
    rows, gid = group_rows(outer, batch, GROUPS[groups], "strided")
    rows, gid = torch.from_numpy(rows), torch.from_numpy(gid)
    x3 = (torch.randn(outer, channels, inner) * 2 + 3).to(dtype)
    w3 = None
    if mask is not None:
        w3 = (torch.rand(outer, channels if mask == "channel" else 1, inner) < 0.7)
        w3 = w3.to(torch.uint8)
        if rows.shape[0] > 1:
            w3[rows[0]] = 0  # a group the mask leaves empty
    case = SimpleNamespace(x3=x3, rows=rows, gid=gid, w3=w3, groups=rows.shape[0],
                           channels=channels, inner=inner, outer=outer)
    case.on = lambda t: None if t is None else t.to(device)
    return case


def numba_layout(case):
    """What ``cpu_passes.moments_pass`` & co. read of ``layout.Layout``."""
    return SimpleNamespace(rows=case.rows.numpy(), gid=case.gid.numpy(), groups=case.groups,
                           outer=case.outer, channels=case.channels, inner=case.inner)


def numba_mask(case):
    return cpu_passes.no_mask() if case.w3 is None else case.w3.numpy()


def with_numba(dtype):
    return cpu.available() and dtype in (torch.float32, torch.bfloat16)


def assert_close(got, want, tol, what):
    got, want = got.cpu().double(), want.cpu().double()
    bad = ~((got - want).abs() <= tol)  # NaN fails too
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} values off, worst "
                           f"{(got - want).abs().max().item():.3g} against tolerance "
                           f"{tol.min().item() if torch.is_tensor(tol) else tol:.3g}")


def ulp(v, dtype):
    """The spacing of ``dtype`` at ``|v|`` (float64 tensor)."""
    info = torch.finfo(dtype)
    exponent = torch.frexp(v.abs().double())[1]
    return (torch.ldexp(torch.ones_like(v, dtype=torch.float64), exponent - 1) * info.eps
            ).clamp_min(info.tiny * info.eps)


def output_slack(got, ref, dtype):
    """Half an ulp of a half-precision output dtype (0 for float32/float64 outputs); one ulp
    for bfloat16 under the interpreter, which truncates instead of rounding."""
    if dtype not in (torch.bfloat16, torch.float16):
        return 0.0
    ulps = 1.0 if tp.INTERPRETED and dtype == torch.bfloat16 else 0.5
    return ulps * ulp(torch.maximum(got.cpu().double().abs(), ref.abs()), dtype)


def by_group(t3, rows):
    """``(outer, C', inner)`` -> ``(groups, per_group, C', inner)`` float64."""
    return t3.double()[rows]


# ---------------------------------------------------------------- pass 1: moments


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_moments(layout, groups, mask, dtype, device, monkeypatch):
    case = make_case(layout, groups, dtype, device, monkeypatch, mask)
    run = compute_dtype(dtype)
    shift = case.x3[case.rows[:, 0], :, 0].to(run)  # as cpu_passes.moments_pass: a value
    if case.w3 is not None:  # of x, or 0 where the mask leaves that value out
        shift = torch.where(case.w3[case.rows[:, 0], :, 0].bool(), shift, 0.0)
    got = tp.moments(case.on(case.x3), case.on(case.rows), case.on(shift), case.on(case.w3))
    assert got.dtype == torch.float64 and got.shape == (3, case.groups, case.channels)

    v = by_group(case.x3, case.rows) - shift.double()[:, None, :, None]
    if case.w3 is None:
        w = torch.ones_like(v)
    else:
        w = by_group(case.w3, case.rows).expand_as(v)
        v = torch.where(w != 0, v, 0.0)  # selected, as the kernels do
    # Tolerance: float32 (float64) accumulation, rtol relative to sum|terms| (docstring).
    assert_close(got[0], v.sum((1, 3)), RTOL[run] * v.abs().sum((1, 3)), "sum w(x-k)")
    assert_close(got[1], v.square().sum((1, 3)), RTOL[run] * v.square().sum((1, 3)),
                 "sum (w(x-k))**2")
    assert torch.equal(got[2].cpu(), w.sum((1, 3))), "sum w"  # sums of 0/1: exact
    if case.w3 is not None and case.groups > 1:
        assert (got[:, 0] == 0).all()  # the group the mask leaves empty

    if with_numba(dtype):  # the CPU kernel's numba loops, from the same shift
        k, s, q, n = cpu_passes.moments_pass(case.x3, numba_layout(case), numba_mask(case))
        assert torch.equal(k, shift.double())
        tol = 2 * RTOL[run]  # both accumulate float32 runs (docstring)
        assert_close(got[0], s, tol * v.abs().sum((1, 3)), "numba sum w(x-k)")
        assert_close(got[1], q, tol * v.square().sum((1, 3)), "numba sum (w(x-k))**2")
        if case.w3 is not None:  # the loops count only masked values (cpu.py counts the rest)
            assert torch.equal(got[2].cpu(), n), "numba sum w"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_triton_moments_propagate_nan(mask, device, monkeypatch):
    """A selected NaN poisons its own (group, channel) sums and nothing else (as the numba
    loops: the moving-average update detects a bad batch by it); a NaN the mask leaves out
    (padding) reaches no sum."""
    case = make_case("planes", "ghost", torch.float32, device, monkeypatch, mask)
    case.x3[1, 2, 5] = float("nan")  # row 1 is in group 1 of 4 (strided)
    if case.w3 is not None:
        case.w3[1, :, 5] = 0
    shift = case.x3[case.rows[:, 0], :, 0].contiguous()
    got = tp.moments(case.on(case.x3), case.on(case.rows), case.on(shift), case.on(case.w3))
    nan = torch.zeros(case.groups, case.channels, dtype=torch.bool)
    nan[1, 2] = case.w3 is None  # masked out: padding, which the sums never see
    assert torch.equal(got[0].isnan().cpu(), nan) and torch.equal(got[1].isnan().cpu(), nan)
    assert not got[2].isnan().any()


# ---------------------------------------------------------------- pass 2: affine


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_affine(layout, groups, dtype, device, monkeypatch):
    case = make_case(layout, groups, dtype, device, monkeypatch)
    cdtype = compute_dtype(dtype)
    a = torch.randn(case.groups, case.channels, dtype=cdtype)
    b = torch.randn(case.groups, case.channels, dtype=cdtype)
    out = case.on(torch.full_like(case.x3, float("nan")))  # every value must be written
    got = tp.affine(case.on(case.x3), case.on(case.gid), case.on(a), case.on(b), out)
    assert got is out

    xa = case.x3.double() * a.double()[case.gid][:, :, None]
    bb = b.double()[case.gid][:, :, None].expand_as(xa)
    ref = xa + bb
    # Tolerance: two roundings in the compute dtype (+ rounding to a half output dtype).
    tol = EPS[cdtype] * (xa.abs() + bb.abs()) + output_slack(got, ref, dtype)
    assert_close(got, ref, tol, "affine")
    if with_numba(dtype):
        y = cpu_passes.affine_pass(case.x3, numba_layout(case), a, b)
        assert_close(got, y, 2 * tol, "numba affine")  # each within tol of the reference


# ---------------------------------------------------------------- pass 3: gradient sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_grad_sums(layout, groups, dtype, device, monkeypatch):
    case = make_case(layout, groups, dtype, device, monkeypatch)
    run = compute_dtype(dtype)
    dy3 = torch.randn_like(case.x3, dtype=torch.float32).to(dtype)
    mean = 3 + 0.1 * torch.randn(case.groups, case.channels, dtype=torch.float64)
    got = tp.grad_sums(case.on(case.x3), case.on(dy3), case.on(case.rows), case.on(mean))
    assert got.dtype == torch.float64 and got.shape == (2, case.groups, case.channels)

    d = by_group(dy3, case.rows)
    t = d * (by_group(case.x3, case.rows) - mean.to(run).double()[:, None, :, None])
    # Tolerance: float32 (float64) accumulation, rtol relative to sum|terms| (docstring).
    assert_close(got[0], d.sum((1, 3)), RTOL[run] * d.abs().sum((1, 3)), "sum dy")
    assert_close(got[1], t.sum((1, 3)), RTOL[run] * t.abs().sum((1, 3)), "sum dy(x-mean)")
    if with_numba(dtype):
        s, p = cpu_passes.grad_sums_pass(case.x3, dy3, numba_layout(case), mean)
        assert_close(got[0], s, 2 * RTOL[run] * d.abs().sum((1, 3)), "numba sum dy")
        assert_close(got[1], p, 2 * RTOL[run] * t.abs().sum((1, 3)), "numba sum dy(x-mean)")


# ---------------------------------------------------------------- pass 4: input gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", MASKS, ids=str)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_grad_input(layout, groups, mask, dtype, device, monkeypatch):
    case = make_case(layout, groups, dtype, device, monkeypatch, mask)
    cdtype = compute_dtype(dtype)
    dy3 = torch.randn_like(case.x3, dtype=torch.float32).to(dtype)
    shape = (case.groups, case.channels)
    m = 3 + 0.1 * torch.randn(shape, dtype=cdtype)
    p, q, u = (torch.randn(shape, dtype=cdtype) for _ in range(3))
    out = case.on(torch.full_like(case.x3, float("nan")))  # every value must be written
    got = tp.grad_input(case.on(case.x3), case.on(dy3), case.on(case.gid),
                        *(case.on(c) for c in (m, p, q, u)), case.on(case.w3), out)
    assert got is out

    gid = case.gid
    pd = p.double()[gid][:, :, None] * dy3.double()
    qx = q.double()[gid][:, :, None] * (case.x3.double() - m.double()[gid][:, :, None])
    uu = u.double()[gid][:, :, None].expand_as(qx)
    w = 1.0 if case.w3 is None else case.w3.double()
    ref = pd - w * (qx + uu)
    # Tolerance: five roundings in the compute dtype (+ rounding to a half output dtype).
    tol = 3 * EPS[cdtype] * (pd.abs() + qx.abs() + uu.abs()) + output_slack(got, ref, dtype)
    assert_close(got, ref, tol, "grad_input")
    if with_numba(dtype):
        dx = cpu_passes.grad_input_pass(case.x3, dy3, numba_layout(case), m, p, q, u,
                                        numba_mask(case), torch.empty_like(case.x3))
        assert_close(got, dx, 2 * tol, "numba grad_input")


# ---------------------------------------------------------------- the rest


@pytest.mark.parametrize("device", DEVICES)
def test_triton_rejects_bad_inputs(device, monkeypatch):
    case = make_case("rows", "one_group", torch.float32, device, monkeypatch)
    x3, rows = case.on(case.x3), case.on(case.rows)
    shift = case.on(torch.zeros(case.groups, case.channels, dtype=torch.float64))
    with pytest.raises(TypeError, match="shift must be torch.float32 or float64"):
        tp.moments(x3, rows, shift.half(), None)  # a float16 shift for float32 inputs
    with pytest.raises(ValueError, match="contiguous"):
        tp.moments(x3.transpose(0, 1).contiguous().transpose(0, 1), rows, shift.float(), None)
    with pytest.raises(ValueError, match="w3 must be"):
        tp.moments(x3, rows, shift.float(), case.on(torch.ones(2, 1, 1, dtype=torch.uint8)))


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values == ("cuda",)])
def test_triton_sums_are_deterministic(device):
    """No atomics: the reductions give the same bits every time (only meaningful on a GPU,
    where the interpreter's sequential programs cannot tell)."""
    x3 = torch.randn(64, 16, 300, device=device)
    rows = torch.arange(64, device=device).reshape(1, 64)
    shift = x3[0, :, 0].reshape(1, 16).contiguous()
    first = tp.moments(x3, rows, shift, None)
    dy3 = torch.randn_like(x3)
    sums = tp.grad_sums(x3, dy3, rows, shift)
    for _ in range(3):
        assert torch.equal(tp.moments(x3, rows, shift, None), first)
        assert torch.equal(tp.grad_sums(x3, dy3, rows, shift), sums)


# Compiles every kernel variant the wrappers launch for these inputs (recorded instead of
# launched) for an H200 (sm_90), with the specialization a launch gets (ints equal to 1
# become constants; pointers and ints divisible by 16 are marked so). The interpreter
# accepts code the GPU compiler rejects (mismatched types in branches, say); this does not
# need a GPU, only Triton's NVIDIA backend. In a subprocess: the kernels of this process
# were defined for the interpreter. Where the runs (planes) or rows are 16-aligned, the
# loads of x and dy (half precision: the only 2-byte values) must be vectorized.
COMPILE_SCRIPT = """
import re
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from batchnorm.kernels.triton import passes as tp

TYPES = {torch.float32: 'fp32', torch.float64: 'fp64', torch.bfloat16: 'bf16',
         torch.float16: 'fp16', torch.int64: 'i64', torch.uint8: 'u8'}
launches = []
for name in ('_sums_kernel', '_affine_kernel', '_grad_input_kernel'):
    kernel = getattr(tp, name)
    record = (lambda kernel: lambda *a, **kw: launches.append((kernel, a, kw)))(kernel)
    setattr(tp, name, type('Recorder', (), {'__getitem__': lambda self, grid, r=record: r})())
tp.INTERPRETED = True  # let CPU tensors past the device check: nothing is launched
aligned = []  # launches whose runs (planes) or rows are 16-aligned: loads of x must vectorize
for shape, dtype, mask in [((2, 4, 3136), torch.bfloat16, None),
                           ((4, 8, 49), torch.float32, 1),
                           ((64, 256, 1), torch.float16, 256),
                           ((64, 3, 1), torch.float64, 1)]:
    aligned += [shape[2] % 16 == 0 or shape[1] % 16 == 0] * 4
    x3 = torch.zeros(shape, dtype=dtype)
    rows, gid = torch.arange(shape[0]).reshape(2, -1), torch.arange(shape[0]) % 2
    k = torch.zeros(2, shape[1], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w3 = None if mask is None else torch.ones(shape[0], mask, shape[2], dtype=torch.uint8)
    tp.moments(x3, rows, k, w3)
    tp.affine(x3, gid, k, k, x3)
    tp.grad_sums(x3, x3, rows, k)
    tp.grad_input(x3, x3, gid, k, k, k, k, w3, x3)
assert len(launches) == 16
for (kernel, args, kwargs), vectorized in zip(launches, aligned):
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
            if arg % 16 == 0:
                attrs[(names.index(name),)] = [['tt.divisibility', 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget('cuda', 90, 32))
    assert compiled.asm['cubin'], kernel.__name__
    if vectorized:  # no 2-byte load: x and dy (bfloat16, float16) are read in vectors
        ops = re.findall(r'ld[.]global[.a-z0-9]*', compiled.asm['ptx'])
        assert not [op for op in ops if op.endswith('16') and '.v' not in op], kernel.__name__
print('compiled', len(launches))
"""


def compile_for_h200(script: str, timeout: float) -> str:
    """Run ``script`` (it compiles Triton kernels for an H200) in a fresh process without
    Triton's interpreter; skip where Triton has no NVIDIA backend; return its output."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("Triton's NVIDIA backend is not installed")
    import batchnorm

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(batchnorm.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default of Triton 3.9 (silences its warning)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_triton_kernels_compile_for_h200():
    assert "compiled 16" in compile_for_h200(COMPILE_SCRIPT, timeout=300)
