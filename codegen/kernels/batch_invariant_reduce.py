"""Batch-invariant reductions in Triton: sum / mean over any dims and softmax / log-softmax over one dim, each
output summed in an order fixed by the reduced length and the size after it (codegen/kernels/
batch_invariant_launch.py), never by how many rows the tensor has. PyTorch twins: `torch.sum`, `torch.mean`,
`torch.softmax`, `torch.log_softmax` (runtime/batch_invariant.py uses these kernels for `aten::sum.dim_IntList`,
`mean.dim`, `_softmax` and `_log_softmax` on CUDA inside its block).

The input is viewed as a contiguous `[outer, L, inner]` (reduced dims that are not adjacent are moved to the
end first, a copy); a program takes `block_cols` outputs, adds L's steps of `block_l` elements into an fp32
tile and sums the tile's columns (`tl.sum`, whose tree the tile's layout fixes). Sums are fp32 for bf16, fp16
and fp32 inputs, rounded once to the output dtype; softmax takes the row's max (exact in any order), then the
sum of exp(x - max), then writes exp(x - max) / sum (log: x - max - log(sum)). `outer` appears only in masks
and the grid and is not specialised on; an input not 16-byte aligned is copied to an aligned one, since the
alignment Triton specialises on decides how many elements a thread adds before the tree.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.batch_invariant_launch import ReduceLaunch, reduce_launch
from dsv4c.codegen.kernels.number_formats import bf16_rounded

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALIGNMENT = 16  # bytes: the pointer divisibility Triton's JIT specialises on


@triton.jit
def _tile(x_ptr, base, cols_mask, l0, L: tl.constexpr, INNER: tl.constexpr, BLOCK_L: tl.constexpr, other):
    """The fp32 [BLOCK_L, cols] elements l0 .. l0 + BLOCK_L of the tile's outputs (`other` where masked)."""
    lane = l0 + tl.arange(0, BLOCK_L)
    mask = (lane < L)[:, None] & cols_mask[None, :]
    return tl.load(x_ptr + base[None, :] + lane.to(tl.int64)[:, None] * INNER, mask=mask, other=other).to(tl.float32)


@triton.jit
def _columns(OUTER, L: tl.constexpr, INNER: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's outputs: their offsets into [outer, L, inner] at l = 0, their flat index and mask."""
    c = tl.program_id(0).to(tl.int64) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return (c // INNER) * (L * INNER) + c % INNER, c, c < OUTER * INNER


@triton.jit
def _stored(value, out_ptr, offsets, mask):
    if out_ptr.dtype.element_ty == tl.bfloat16:
        value = bf16_rounded(value)
    tl.store(out_ptr + offsets, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["OUTER"])
def _sum_kernel(x_ptr, out_ptr, OUTER, L: tl.constexpr, INNER: tl.constexpr, MEAN: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """out[o, i] = sum over l of x[o, l, i] (MEAN: divided by L)."""
    base, c, cols_mask = _columns(OUTER, L, INNER, BLOCK_COLS)
    acc = tl.zeros([BLOCK_L, BLOCK_COLS], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        acc += _tile(x_ptr, base, cols_mask, l0, L, INNER, BLOCK_L, 0.0)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / L
    _stored(total, out_ptr, c, cols_mask)


@triton.jit(do_not_specialize=["OUTER"])
def _softmax_kernel(x_ptr, out_ptr, OUTER, L: tl.constexpr, INNER: tl.constexpr, LOG: tl.constexpr,
                    BLOCK_L: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """out[o, :, i] = softmax (LOG: log_softmax) of x[o, :, i]."""
    base, c, cols_mask = _columns(OUTER, L, INNER, BLOCK_COLS)
    peak = tl.full([BLOCK_L, BLOCK_COLS], float("-inf"), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        peak = tl.maximum(peak, _tile(x_ptr, base, cols_mask, l0, L, INNER, BLOCK_L, float("-inf")))
    peak = tl.max(peak, axis=0)
    peak = tl.where(peak > float("-inf"), peak, 0.0)  # a row of -inf: exp gives 0 / 0, NaN, as PyTorch's softmax
    acc = tl.zeros([BLOCK_L, BLOCK_COLS], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        acc += tl.exp(_tile(x_ptr, base, cols_mask, l0, L, INNER, BLOCK_L, float("-inf")) - peak[None, :])
    total = tl.sum(acc, axis=0)
    for l0 in range(0, L, BLOCK_L):
        lane = l0 + tl.arange(0, BLOCK_L)
        shifted = _tile(x_ptr, base, cols_mask, l0, L, INNER, BLOCK_L, 0.0) - peak[None, :]
        if LOG:
            value = shifted - tl.log(total)[None, :]
        else:
            value = tl.exp(shifted) / total[None, :]
        _stored(value, out_ptr, base[None, :] + lane.to(tl.int64)[:, None] * INNER,
                (lane < L)[:, None] & cols_mask[None, :])


def _as_outer_length_inner(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, int, int, int]:
    """(x as a contiguous 16-byte aligned tensor whose reduced dims are adjacent, outer, L, inner)."""
    dims = tuple(sorted(d % x.dim() for d in dims))
    if dims != tuple(range(dims[0], dims[-1] + 1)):
        x = x.movedim(dims, tuple(range(x.dim() - len(dims), x.dim())))
        dims = tuple(range(x.dim() - len(dims), x.dim()))
    x = x.contiguous()
    if x.data_ptr() % ALIGNMENT:
        x = x.clone()
    outer, inner = math.prod(x.shape[:dims[0]]), math.prod(x.shape[dims[-1] + 1:])
    return x, outer, math.prod(x.shape[dims[0]:dims[-1] + 1]), inner


def _check(x: torch.Tensor, out_dtype: torch.dtype) -> None:
    if x.dtype not in DTYPES or out_dtype not in DTYPES:
        raise ValueError(f"batch-invariant reductions take and give {DTYPES}, got {x.dtype} -> {out_dtype}")


def invariant_sum(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool, out_dtype: torch.dtype,
                  mean: bool = False, *, launch: ReduceLaunch | None = None) -> torch.Tensor:
    """`torch.sum(x, dims, keepdim)` (`mean`: `torch.mean`) in `out_dtype`, summed in fp32; `dims` non-empty."""
    _check(x, out_dtype)
    if not dims:
        raise ValueError("invariant_sum: at least one dim to reduce")
    reduced = {d % x.dim() for d in dims}
    shape = [1 if d in reduced else size for d, size in enumerate(x.shape) if keepdim or d not in reduced]
    flat, outer, length, inner = _as_outer_length_inner(x, dims)
    out = torch.empty(shape, dtype=out_dtype, device=x.device)
    if out.numel() == 0 or length == 0:
        return out.fill_(float("nan") if mean else 0.0)
    launch = launch or reduce_launch(length, inner)
    _sum_kernel[(triton.cdiv(outer * inner, launch.block_cols),)](
        flat, out, outer, L=length, INNER=inner, MEAN=mean, BLOCK_L=launch.block_l, BLOCK_COLS=launch.block_cols,
        num_warps=launch.num_warps)
    return out


def invariant_softmax(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype, *,
                      launch: ReduceLaunch | None = None) -> torch.Tensor:
    """`torch.softmax(x, dim)` (`log`: `torch.log_softmax`) in `out_dtype`, computed in fp32."""
    _check(x, out_dtype)
    flat, outer, length, inner = _as_outer_length_inner(x, (dim,))
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    launch = launch or reduce_launch(length, inner)
    _softmax_kernel[(triton.cdiv(outer * inner, launch.block_cols),)](
        flat, out, outer, L=length, INNER=inner, LOG=log, BLOCK_L=launch.block_l, BLOCK_COLS=launch.block_cols,
        num_warps=launch.num_warps)
    return out
