"""A batch-invariant matmul in Triton: `out[g] = a[g] @ b[g]` whose every output element is summed in an order
that depends on (N, K, dtype, target) only (codegen/kernels/batch_invariant_launch.py), never on how many rows
`a` has or how many groups the call holds. The PyTorch twin is `torch.bmm` (runtime/batch_invariant.py uses
this kernel for `aten::mm`, `bmm` and `addmm` on CUDA inside its block).

A program computes `out^T` for `block_cols` columns of b and `block_rows` rows of a (swap AB) over one slice of
K, or over all slices one after the other with fold_splits; per `block_k` block it loads both tiles at their
strides and accumulates one `tl.dot` into the slice's fp32 accumulator (three for "bf16x3": fp32 rows of `a`
times a bf16 `b`, the rows split exactly into bf16 parts). Slices are added in order from zero, by the folding
program itself or by the FP8 GEMM's split sum over the fp32 partials (codegen/kernels/fp8_gemm.py), so both
ways give the same bits. Tiles are numbered row tiles first: the row tiles of one column tile run side by side
and share its columns of b (a weight) through L2, so a product of more than one row tile streams b from
memory about once, not once a row tile. M and G appear only in masks and the grid, and are not
specialised on (`do_not_specialize`): the compiled kernel is the same one for every batch size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.batch_invariant_launch import MatmulLaunch, matmul_launch
from dsv4c.codegen.kernels.fp8_gemm import SUM_BLOCK, _split_sum_kernel
from dsv4c.codegen.kernels.number_formats import bf16_rounded
from dsv4c.codegen.targets import target_for_device

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MIXED = (torch.float32, torch.bfloat16)  # (a, b) dtypes of fp32 rows times a bf16 weight: "ieee" or "bf16x3" products


@triton.jit
def _slice_sum(a_row, b_col, row_mask, col_mask, K, sak, sbk, first, last, BLOCK_K: tl.constexpr,
               BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, PRODUCT: tl.constexpr,
               NUM_STAGES: tl.constexpr):
    """fp32 [BLOCK_COLS, BLOCK_ROWS]: the K blocks [first, last) of b^T @ a^T, one tl.dot a block, in order."""
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_COLS, BLOCK_ROWS], dtype=tl.float32)
    for kb in tl.range(first, last, num_stages=NUM_STAGES):
        k = kb * BLOCK_K + kk
        k_mask = k < K
        a = tl.load(a_row + k[None, :] * sak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_col + k[:, None] * sbk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if PRODUCT == "native":
            acc = tl.dot(tl.trans(b), tl.trans(a), acc)
        elif PRODUCT == "bf16x3":
            acc = _bf16x3_dot(tl.trans(b), tl.trans(a), acc)
        else:
            acc = tl.dot(tl.trans(b.to(tl.float32)), tl.trans(a.to(tl.float32)), acc, input_precision="ieee")
    return acc


@triton.jit
def _bf16x3_dot(b, a, acc):
    """acc + b @ a for a bf16 b and an fp32 a, on bf16 tensor cores: a = hi + mid + lo exactly (three bf16 parts
    of 8 significant bits cover fp32's 24, for |a| in [2^-100, 2^127]), so every part's products are exact and
    summed in fp32, the smallest first."""
    hi = a.to(tl.bfloat16)
    rest = a - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    acc = tl.dot(b, (rest - mid.to(tl.float32)).to(tl.bfloat16), acc)
    acc = tl.dot(b, mid, acc)
    return tl.dot(b, hi, acc)


@triton.jit(do_not_specialize=["M", "G"])
def _matmul_kernel(a_ptr, b_ptr, out_ptr, M, N, K, G, sag, sam, sak, sbg, sbk, sbn, SPLITS,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCKS_PER_SPLIT: tl.constexpr, PRODUCT: tl.constexpr, SPLIT_OUT: tl.constexpr,
                   FOLD: tl.constexpr, NUM_STAGES: tl.constexpr):
    """Program (tile, g * slices + slice): out[g] rows x columns of tile = column tile * row tiles + row tile.
    SPLIT_OUT: out is the fp32 partials [SPLITS, G, M, N], this slice's written; FOLD: all SPLITS slices added
    here in order; otherwise the one slice is the output, in out's dtype."""
    row_tiles = tl.cdiv(M, BLOCK_ROWS)
    pid_r, pid_c, pid_z = tl.program_id(0) % row_tiles, tl.program_id(0) // row_tiles, tl.program_id(1)
    if SPLIT_OUT:
        g, split = pid_z // SPLITS, pid_z % SPLITS
    else:
        g, split = pid_z, 0
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask, col_mask = rows < M, cols < N
    a_row = a_ptr + g.to(tl.int64) * sag + rows.to(tl.int64)[:, None] * sam
    b_col = b_ptr + g.to(tl.int64) * sbg + cols.to(tl.int64)[None, :] * sbn
    k_blocks = tl.cdiv(K, BLOCK_K)
    if FOLD:
        acc = tl.zeros([BLOCK_COLS, BLOCK_ROWS], dtype=tl.float32)
        for s in range(0, SPLITS):
            first = s * BLOCKS_PER_SPLIT
            acc += _slice_sum(a_row, b_col, row_mask, col_mask, K, sak, sbk, first,
                              tl.minimum(first + BLOCKS_PER_SPLIT, k_blocks), BLOCK_K, BLOCK_ROWS, BLOCK_COLS,
                              PRODUCT, NUM_STAGES)
    else:
        first = split * BLOCKS_PER_SPLIT
        acc = _slice_sum(a_row, b_col, row_mask, col_mask, K, sak, sbk, first,
                         tl.minimum(first + BLOCKS_PER_SPLIT, k_blocks), BLOCK_K, BLOCK_ROWS, BLOCK_COLS, PRODUCT,
                         NUM_STAGES)
    mask = col_mask[:, None] & row_mask[None, :]
    offsets = (g.to(tl.int64) * M + rows[None, :]) * N + cols[:, None]
    if SPLIT_OUT:
        tl.store(out_ptr + split.to(tl.int64) * G * M * N + offsets, acc, mask=mask)
    else:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            acc = bf16_rounded(acc)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def invariant_bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None, *,
                  launch: MatmulLaunch | None = None) -> torch.Tensor:
    """`a [G, M, K] @ b [G, K, N]` -> a new contiguous [G, M, N] in `out_dtype` (default a's), any strides;
    a and b of one dtype among DTYPES, or fp32 a and bf16 b (MIXED: b is never widened in memory; products "ieee"
    or "bf16x3", "bf16x3" for these only). `launch`: default `matmul_launch` for a's device and dtype."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"invariant_bmm: a [G, M, K] and b [G, K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if (a.dtype, b.dtype) != MIXED and (a.dtype != b.dtype or a.dtype not in DTYPES):
        raise ValueError(f"invariant_bmm: operands of one dtype among {DTYPES}, or {MIXED}, got {a.dtype} and "
                         f"{b.dtype}")
    (groups, m, k), n = a.shape, b.shape[2]
    out = torch.empty((groups, m, n), dtype=out_dtype or a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    launch = launch or matmul_launch(target_for_device(a.device), m, n, k, groups, a.dtype)
    launch.check(k)
    mixed = (a.dtype, b.dtype) == MIXED
    if launch.product == "bf16x3" and not mixed or launch.product == "native" and mixed:
        raise ValueError(f"invariant_bmm: product {launch.product!r} does not take {a.dtype} times {b.dtype}")
    fold = launch.fold_splits and launch.split_k > 1
    split_out = launch.split_k > 1 and not fold
    target = torch.empty((launch.split_k, groups, m, n), dtype=torch.float32, device=a.device) if split_out else out
    grid = (triton.cdiv(n, launch.block_cols) * triton.cdiv(m, launch.block_rows),
            groups * (launch.split_k if split_out else 1))
    _matmul_kernel[grid](a, b, target, m, n, k, groups, *a.stride(), *b.stride(), launch.split_k,
                         BLOCK_ROWS=launch.block_rows, BLOCK_COLS=launch.block_cols, BLOCK_K=launch.block_k,
                         BLOCKS_PER_SPLIT=launch.blocks_per_split, PRODUCT=launch.product, SPLIT_OUT=split_out,
                         FOLD=fold, NUM_STAGES=launch.num_stages, num_warps=launch.num_warps)
    if split_out:
        _split_sum_kernel[(triton.cdiv(out.numel(), SUM_BLOCK),)](target, out, out.numel(), SPLITS=launch.split_k,
                                                                  BLOCK=SUM_BLOCK, PDL=False)
    return out
