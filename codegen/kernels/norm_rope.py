"""RMSNorm and RoPE in Triton: one row kernel behind three ops; the PyTorch twins (and the ops' contracts) are
codegen/rms_norm.py (`dsv4c::rms_norm`) and codegen/rope.py (`dsv4c::rope`, `dsv4c::rms_norm_rope`).

One program a row of x viewed as `[N, D]`. It loads the row into fp32 registers; with NORM it scales it by
`1 / sqrt(mean(x^2) + eps)` (IEEE division and square root), multiplies by the weight, and rounds to the output
dtype, as model/layers.py `rms_norm` casts; it stores the row (without ROPE) or its first D - R columns. With ROPE
it reloads the last R columns as their even and odd halves (same cache lines; recomputing the norm of those
columns from the same scale), takes the angles `position * inv_freq` in fp32 for the R/2 pairs only, and stores
each rotated pair rounded to the output dtype. Row r reads position `positions[r // rep]` (the host folds the
broadcast over trailing leading dims, the heads of a query, into `rep`).

Roundings to bf16 are integer arithmetic on the fp32 bits (nearest, ties to even), identical under the
interpreter (whose own bf16 casts truncate) and on a GPU; the stores then cast exact values.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.norm_rope_launch import RowLaunch, row_launch
from dsv4c.codegen.kernels.number_formats import bf16_rounded_if
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options


@triton.jit
def _normed(x, scale, w_ptr, cols, mask, WEIGHT: tl.constexpr, BF16: tl.constexpr):
    """`x * scale * weight[cols]` in fp32, rounded to the output dtype (model/layers.py rms_norm's order)."""
    x = x * scale
    if WEIGHT:
        x = x * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return bf16_rounded_if(x, BF16)


@triton.jit
def _rows_kernel(x_ptr, w_ptr, pos_ptr, inv_ptr, out_ptr, x_stride, rep, eps,
                 WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr,
                 NORM: tl.constexpr, WEIGHT: tl.constexpr, ROPE: tl.constexpr, INVERSE: tl.constexpr,
                 BF16: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    out_row = out_ptr + row * WIDTH
    cols = tl.arange(0, WIDTH_P2)
    inside = cols < WIDTH
    x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
    scale = 1.0
    if NORM:
        mean = tl.math.div_rn(tl.sum(x * x, axis=0), WIDTH * 1.0)
        scale = tl.math.div_rn(1.0, tl.math.sqrt_rn(mean + eps))
        x = _normed(x, scale, w_ptr, cols, inside, WEIGHT, BF16)
    tl.store(out_row + cols, x.to(out_ptr.dtype.element_ty), mask=inside & (cols < WIDTH - 2 * HALF))
    if ROPE:
        pairs = tl.arange(0, HALF_P2)
        ok = pairs < HALF
        even_cols = WIDTH - 2 * HALF + 2 * pairs
        even = tl.load(x_row + even_cols, mask=ok, other=0.0).to(tl.float32)
        odd = tl.load(x_row + even_cols + 1, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            even = _normed(even, scale, w_ptr, even_cols, ok, WEIGHT, BF16)
            odd = _normed(odd, scale, w_ptr, even_cols + 1, ok, WEIGHT, BF16)
        angle = tl.load(pos_ptr + row // rep).to(tl.float32) * tl.load(inv_ptr + pairs, mask=ok, other=0.0)
        cos, sin = tl.cos(angle), tl.sin(angle)
        if INVERSE:
            sin = -sin
        out_dtype = out_ptr.dtype.element_ty
        tl.store(out_row + even_cols, bf16_rounded_if(even * cos - odd * sin, BF16).to(out_dtype), mask=ok)
        tl.store(out_row + even_cols + 1, bf16_rounded_if(even * sin + odd * cos, BF16).to(out_dtype), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as `[N, D]` rows with unit column stride (a view where x allows one)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def row_positions(positions: torch.Tensor, lead: tuple[int, ...]) -> tuple[torch.Tensor, int]:
    """(flat positions P, rep): row r of `[prod(lead), D]` sits at P[r // rep]. The trailing leading dims that
    positions broadcasts over (stride 0 once expanded) fold into rep; the rest is flattened (a view where it can)."""
    full = positions.expand(lead)
    keep = len(lead)
    while keep and full.stride(keep - 1) == 0:
        keep -= 1
    head = full[(...,) + (0,) * (len(lead) - keep)]
    return head.reshape(-1), math.prod(lead[keep:])


def _launch_rows(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, positions: Optional[torch.Tensor],
                 inv_freq: Optional[torch.Tensor], inverse: bool, norm: bool, launch: Optional[RowLaunch],
                 out: Optional[torch.Tensor]) -> torch.Tensor:
    """The kernel over every row of x (shapes and dtypes checked by the ops), written into `out` (a contiguous
    tensor like x) or a new one."""
    width = x.shape[-1]
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"norm_rope kernel: out {tuple(out.shape)} {out.dtype} must be a contiguous "
                         f"{tuple(x.shape)} {x.dtype}")
    rows = _rows(x)
    half = 0 if inv_freq is None else inv_freq.numel()
    if half:
        flat_positions, rep = row_positions(positions, tuple(x.shape[:-1]))
        inv_freq = inv_freq.contiguous()
    else:
        flat_positions, rep, inv_freq = rows, 1, rows  # unread: ROPE is off
    has_weight = weight is not None
    weight = weight.contiguous() if has_weight else rows  # unread without WEIGHT
    width_p2 = triton.next_power_of_2(width)
    launch = launch or row_launch(width_p2)
    _rows_kernel[(rows.shape[0],)](
        rows, weight, flat_positions, inv_freq, out, rows.stride(0), rep, eps,
        WIDTH=width, WIDTH_P2=width_p2, HALF=half, HALF_P2=triton.next_power_of_2(max(half, 1)), NORM=norm,
        WEIGHT=has_weight, ROPE=half > 0, INVERSE=inverse, BF16=x.dtype == torch.bfloat16, PDL=x.is_cuda,
        num_warps=launch.num_warps, **launch_options(x.is_cuda))
    return out


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, launch: Optional[RowLaunch] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codegen/rms_norm.py's op on CUDA tensors."""
    return _launch_rows(x, weight, eps, None, None, False, True, launch, out)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool,
         launch: Optional[RowLaunch] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codegen/rope.py's `rope` on CUDA tensors."""
    return _launch_rows(x, None, 0.0, positions, inv_freq, inverse, False, launch, out)


def rms_norm_rope(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, positions: torch.Tensor,
                  inv_freq: torch.Tensor, inverse: bool, launch: Optional[RowLaunch] = None,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """codegen/rope.py's `rms_norm_rope` on CUDA tensors."""
    return _launch_rows(x, weight, eps, positions, inv_freq, inverse, True, launch, out)
