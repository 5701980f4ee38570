"""The batch-invariant replacements of aten's CUDA products and reductions (codegen/kernels/batch_invariant_*.py,
through runtime/batch_invariant_cuda.py by runtime/batch_invariant.py), run under TRITON_INTERPRET=1 on CPU
tensors.

- The matmul: rows of calls with M in {1, 2, 3, 4, 8, 64, 72} (and at other offsets, and one group of two
  alone) equal the same rows of the whole call bit for bit, with the launch `matmul_launch` picks for each call
  on an H100-like target of 8 SMs (so the calls cross the fold) with the interpreter's fp32 products; the
  weight is a transposed view, as the graph's `x @ w.T`.
- The reductions: sum, mean, softmax and log-softmax over the last dim and over a middle dim, and a sum over
  two dims that are not adjacent; the outputs of 1 and 2 leading rows equal the same outputs of 5, bit for bit;
  one row long enough for the loop over L (3000 > 1024).
- The aten adapters (`cuda_mm`, `cuda_sum`, ...), called directly on CPU tensors: aten's semantics (addmm's
  alpha and beta, keepdim, dtype, half_to_float) and PyTorch's own kernels for what the Triton kernels do not
  take (integer sums, sums over every dim) exactly.
- `batch_invariant()` puts these kernels in aten's CUDA dispatch table, and takes them out after the block.
- The kernels build for sm_90a without a GPU (a child without the interpreter): bf16 products on wgmma.

Tolerances against fp64: fp32 results relative norm error 1e-6 (fp32 sums of a few hundred terms; seen
1e-7 to 3e-7); bf16 results 2^-8 (one rounding to bf16, at most 2^-9 relative a value). NaN never passes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from child_pool import child_pool, run_in
from dsv4c.codegen.kernels.batch_invariant_launch import matmul_launch
from dsv4c.codegen.targets import target
from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.batch_invariant_cuda import cuda_kernels

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
SMALL_GPU = dataclasses.replace(target("h100"), sm_count=8)  # few SMs: small shapes cross the fold
ROWS = (1, 2, 3, 4, 8, 64, 72)
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8}


def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def child(interpreter_pool):
    return run_in(interpreter_pool)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    return not got.isnan().any() and _rel(got, want) <= TOLERANCE[dtype]


# ---- the matmul ------------------------------------------------------------------------------------------------
def _bmm_calls(a, b, calls):
    """{label: invariant_bmm of groups g0:g1, rows r0:r1 of a} for calls {label: (g0, g1, r0, r1, launch)}."""
    from dsv4c.codegen.kernels.batch_invariant_matmul import invariant_bmm

    return {label: invariant_bmm(a[g0:g1, r0:r1], b[g0:g1], launch=launch)
            for label, (g0, g1, r0, r1, launch) in calls.items()}


def _launch(m, n, k, groups, dtype):
    return dataclasses.replace(matmul_launch(SMALL_GPU, m, n, k, groups, dtype), product="ieee")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rows_do_not_depend_on_m(child, dtype):
    gen = torch.Generator().manual_seed(4)
    rows, k, n = max(ROWS), 200, 70
    a = torch.randn(2, rows, k, generator=gen).to(dtype)
    b = torch.randn(2, n, k, generator=gen).to(dtype).transpose(1, 2)  # the graph's weight.T
    spans = [(0, m) for m in ROWS] + [(7, 1), (40, 17)]
    calls = {f"rows {r}..{r + m - 1}": (0, 2, r, r + m, _launch(m, n, k, 2, dtype)) for r, m in spans}
    calls["group 1 alone"] = (1, 2, 0, rows, _launch(rows, n, k, 1, dtype))
    launches = [call[-1] for call in calls.values()]
    assert {la.fold_splits for la in launches} == {False, True}, "the calls must cross the fold"
    assert len({(la.split_k, la.blocks_per_split) for la in launches}) == 1 and launches[0].split_k > 1
    got = child(_bmm_calls, a, b, calls)
    whole = got[f"rows 0..{rows - 1}"]
    assert whole.dtype == dtype and _close(whole, a.double() @ b.double(), dtype)
    for label, (g0, g1, r0, r1, _) in calls.items():
        assert torch.equal(got[label], whole[g0:g1, r0:r1]), f"{label}: differs from the same rows of the whole"


# ---- the reductions --------------------------------------------------------------------------------------------
def _reduce_calls(x, calls):
    """{label: the kernel's result on leading rows :rows of x} for calls {label: (kind, dims, rows, out dtype)}."""
    from dsv4c.codegen.kernels.batch_invariant_reduce import invariant_softmax, invariant_sum

    out = {}
    for label, (kind, dims, rows, dtype) in calls.items():
        part = x[:rows]
        if kind in ("sum", "mean"):
            out[label] = invariant_sum(part, dims, False, dtype, mean=kind == "mean")
        else:
            out[label] = invariant_softmax(part, dims[0], kind == "log_softmax", dtype)
    return out


def _reference(kind: str, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    x = x.double()
    if kind in ("sum", "mean"):
        return getattr(x, kind)(dims)
    return getattr(x, kind)(dims[0])


REDUCTIONS = [(kind, dims) for kind in ("sum", "mean", "softmax", "log_softmax") for dims in ((-1,), (2,))]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reductions_rows_do_not_depend_on_the_row_count(child, dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 3, 24, 40, generator=gen) * 3).to(dtype)
    long_rows = torch.randn(5, 3000, generator=gen).to(dtype)
    calls = {(kind, dims, rows): (kind, dims, rows, dtype) for kind, dims in REDUCTIONS for rows in (1, 2, 5)}
    calls.update({("sum", (1, 3), rows): ("sum", (1, 3), rows, dtype) for rows in (1, 5)})
    got = child(_reduce_calls, x, calls)
    got.update(child(_reduce_calls, long_rows, {("long", (-1,), rows): ("sum", (-1,), rows, dtype) for rows in (1, 5)}))
    for (kind, dims, rows), value in got.items():
        source, op = (long_rows, "sum") if kind == "long" else (x, kind)
        whole = got[(kind, dims, 5)]
        assert whole.dtype == dtype and _close(whole, _reference(op, source, dims), dtype), (kind, dims)
        assert torch.equal(value, whole[:rows]), f"{kind} over {dims}: {rows} rows differ from the same rows of 5"


# ---- the aten adapters -----------------------------------------------------------------------------------------
def _adapters(x, w, bias, ints, h):
    """Each adapter of runtime/batch_invariant_cuda.py on CPU tensors (x [6, 40] bf16, w [40, 24] bf16, bias [24],
    ints int64, h [2, 3, 8, 16] fp32), next to the PyTorch result it stands for."""
    from dsv4c.runtime import batch_invariant_cuda as bi

    nan_bias = torch.full_like(bias, float("nan"))
    return {
        "mm": (bi.cuda_mm(x, w), x @ w),
        "bmm": (bi.cuda_bmm(h[0], h[1].transpose(-1, -2)), torch.bmm(h[0], h[1].transpose(-1, -2))),
        "addmm": (bi.cuda_addmm(bias, x, w, beta=0.5, alpha=2.0), torch.addmm(bias, x, w, beta=0.5, alpha=2.0)),
        "addmm beta 0": (bi.cuda_addmm(nan_bias, x, w, beta=0), torch.addmm(nan_bias, x, w, beta=0)),
        "sum keepdim": (bi.cuda_sum(h, [2], True), h.sum(2, keepdim=True)),
        "sum to fp32": (bi.cuda_sum(x, [-1], dtype=torch.float32), x.sum(-1, dtype=torch.float32)),
        "sum of ints": (bi.cuda_sum(ints, [-1]), ints.sum(-1)),
        "sum of all": (bi.cuda_sum(h, None), h.sum()),
        "mean": (bi.cuda_mean(h, [-1, -2], True), h.mean((-1, -2), keepdim=True)),
        "softmax": (bi.cuda_kernels()["_softmax"](h, 2, False), torch.softmax(h, 2)),
        "softmax to fp32": (bi.cuda_kernels()["_softmax"](x, -1, True), torch.softmax(x.float(), -1)),
        "log_softmax": (bi.cuda_kernels()["_log_softmax"](h, -1, False), torch.log_softmax(h, -1)),
    }


@needs_triton
def test_cuda_adapters_keep_aten_semantics(child):
    gen = torch.Generator().manual_seed(6)
    x, w = torch.randn(6, 40, generator=gen).bfloat16(), torch.randn(40, 24, generator=gen).bfloat16()
    bias, h = torch.randn(24, generator=gen).bfloat16(), torch.randn(2, 3, 8, 16, generator=gen)
    ints = torch.randint(-9, 9, (4, 7), generator=gen)
    for name, (got, want) in child(_adapters, x, w, bias, ints, h).items():
        assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, got.dtype, want.dtype)
        if name in ("sum of ints", "sum of all"):  # PyTorch's own kernels, through their out overloads
            assert torch.equal(got, want), name
        else:
            assert _close(got, want, got.dtype), (name, _rel(got, want))


# ---- the registration ------------------------------------------------------------------------------------------
def _cuda_kernel_of(op: str) -> str:
    return next(line for line in torch._C._dispatch_dump_table(f"aten::{op}").splitlines() if line.startswith("CUDA:"))


@needs_triton
def test_block_puts_the_kernels_in_the_cuda_dispatch_table():
    names = sorted(cuda_kernels())
    assert names == ["_log_softmax", "_softmax", "addmm", "bmm", "mean.dim", "mm", "sum.dim_IntList"]
    before = {name: _cuda_kernel_of(name) for name in names}
    with batch_invariant():
        inside = {name: _cuda_kernel_of(name) for name in names}
    assert all("runtime/batch_invariant.py" in line for line in inside.values()), inside
    assert {name: _cuda_kernel_of(name) for name in names} == before


# ---- ahead of time, for the H100 (compiler process) ------------------------------------------------------------
def _ptx(kernel: str, types: dict[str, str], constexprs: dict) -> str:
    """The sm_90a PTX of one kernel of the batch-invariant modules (pointers marked 16-byte aligned)."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import batch_invariant_matmul, batch_invariant_reduce
    from dsv4c.codegen.targets import triton_gpu_target

    fn = getattr(batch_invariant_matmul, kernel, None) or getattr(batch_invariant_reduce, kernel)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in types}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=triton_gpu_target(target("h100")),
                          options=dict(num_warps=4)).asm["ptx"]


@needs_triton
def test_kernels_build_for_the_h100():
    matmul = dict(BLOCK_ROWS=16, BLOCK_COLS=64, BLOCK_K=64, BLOCKS_PER_SPLIT=2, SPLIT_OUT=False, FOLD=True,
                  NUM_STAGES=3)
    bf16 = dict(a_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16")
    with child_pool(_start_compiler) as pool:
        native = pool.submit(_ptx, "_matmul_kernel", bf16, dict(matmul, PRODUCT="native")).result()
        fp32 = pool.submit(_ptx, "_matmul_kernel", dict(a_ptr="*fp32", b_ptr="*fp32", out_ptr="*fp32"),
                           dict(matmul, PRODUCT="ieee", SPLIT_OUT=True, FOLD=False)).result()
        sums = pool.submit(_ptx, "_sum_kernel", dict(x_ptr="*fp32", out_ptr="*bf16"),
                           dict(L=4096, INNER=1, MEAN=True, BLOCK_L=1024, BLOCK_COLS=4)).result()
        softmax = pool.submit(_ptx, "_softmax_kernel", dict(x_ptr="*fp32", out_ptr="*fp32"),
                              dict(L=16, INNER=512, LOG=True, BLOCK_L=16, BLOCK_COLS=256)).result()
    for ptx in (native, fp32, sums, softmax):
        assert ".target sm_90a" in ptx
    assert "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16" in native
    assert "wgmma" not in fp32 and "mma.sync" not in fp32  # fp32 products on FMAs, no TF32
