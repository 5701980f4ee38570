"""Launch choices of the batch-invariant matmul and reductions (codegen/kernels/batch_invariant_matmul.py and
batch_invariant_reduce.py), which replace cuBLAS and PyTorch's reductions on CUDA inside
runtime/batch_invariant.py's block.

Pure Python (no Triton import). Everything that orders the terms of one output's sum is chosen from sizes
that do not grow with the step's tokens or sequences: for a product `[G, M, K] @ [G, K, N]`, the tiles and the
K split from (N, K, dtype, target); for a reduction of length L, the tiles from (L, inner size). M and G (and
the reduction's outer size) only set the grid and whether the K splits fold into one program (the same
additions in the same order), so a row gets the same bits whichever rows share its call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from dsv4c.codegen.targets import Target, is_gpu

MIN_DOT = 16  # tl.dot's smallest side
PRODUCTS = ("native", "ieee", "bf16x3")
MAX_REDUCE_TILE = 4096  # elements of a reduction program's fp32 tile: 32 a thread at 4 warps


def _pow2_at_least(size: int, floor: int = 1) -> int:
    return max(floor, 1 << (max(1, size) - 1).bit_length())


@dataclass(frozen=True, kw_only=True)
class MatmulLaunch:
    """How `out[g] = a[g] @ b[g]` is launched (swap AB: b's columns fill the MMA's M side, a's rows its N side).

    block_rows: rows of `a` a program (the MMA's N side; rows past M masked).
    block_cols: columns of `b` (output columns) a program. block_k: K elements a step of the K loop.
    split_k, blocks_per_split: K's `block_k` blocks in `split_k` slices of `blocks_per_split` (none empty);
        each slice is summed into a fresh fp32 accumulator, and the slices are added in order, from zero.
    fold_splits: one program adds its tile's slices itself; otherwise a program a slice writes fp32 partials
        and the FP8 GEMM's split sum adds them (the same additions: the same bits).
    product: "native" (bf16/fp16 operands on the tensor cores, fp32 sums) or "ieee" (operands widened to fp32,
        fp32 FMA products: fp32 matmuls on GPUs, and every dtype on Triton's CPU interpreter, which gets bf16
        wrong; a bf16 or fp16 product is exact in fp32 either way) or "bf16x3" (fp32 rows times a bf16 matrix:
        each row split exactly into three bf16 parts on the tensor cores, every part's products exact, fp32 sums).
    """

    block_rows: int
    block_cols: int
    block_k: int
    split_k: int
    blocks_per_split: int
    product: str
    fold_splits: bool = False
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_rows", "block_cols", "block_k"):
            value = getattr(self, name)
            if value < MIN_DOT or value & (value - 1):
                raise ValueError(f"MatmulLaunch.{name} must be a power of two >= {MIN_DOT}: {self}")
        if self.product not in PRODUCTS:
            raise ValueError(f"MatmulLaunch.product must be one of {PRODUCTS}: {self}")
        if min(self.split_k, self.blocks_per_split, self.num_warps, self.num_stages) < 1:
            raise ValueError(f"MatmulLaunch fields must be positive: {self}")

    def check(self, k: int) -> None:
        """The slices cover K's blocks, none of them empty."""
        blocks = -(-k // self.block_k)
        if not (self.split_k - 1) * self.blocks_per_split < blocks <= self.split_k * self.blocks_per_split:
            raise ValueError(f"{self}: {self.split_k} slices of {self.blocks_per_split} blocks do not partition "
                             f"K={k}'s {blocks} blocks of {self.block_k}")


def k_slices(blocks: int, wanted: int) -> tuple[int, int]:
    """(slices, blocks a slice): `blocks` in about `wanted` equal slices, none empty."""
    per_slice = -(-blocks // max(1, min(blocks, wanted)))
    return -(-blocks // per_slice), per_slice


def matmul_launch(t: Target, m: int, n: int, k: int, groups: int, dtype: torch.dtype) -> MatmulLaunch:
    """The launch of `[groups, m, k] @ [groups, k, n]` in `dtype` on `t`: 16 rows x 64 columns x 64 K a step
    (a Hopper warpgroup's wgmma M side over 16 rows: a decode step pads to 16 rows, not 64), K split until one
    row of tiles of one group has about two programs an SM (GPUs; two slices wherever K has two blocks on the
    interpreter, so the split sum runs in tests). The split depends on (n, k, t) only; m and groups decide
    only the fold: once the tiles alone give every SM a program."""
    block_rows, block_cols, block_k = MIN_DOT, 64, 64
    col_tiles = -(-n // block_cols)
    product = "native" if is_gpu(t) and dtype in (torch.bfloat16, torch.float16) else "ieee"
    wanted = -(-2 * t.sm_count // col_tiles) if is_gpu(t) else 2
    split_k, per_slice = k_slices(-(-k // block_k), wanted)
    tiles = col_tiles * -(-m // block_rows) * groups
    return MatmulLaunch(block_rows=block_rows, block_cols=block_cols, block_k=block_k, split_k=split_k,
                        blocks_per_split=per_slice, product=product,
                        fold_splits=is_gpu(t) and split_k > 1 and tiles >= t.sm_count,
                        num_stages=3 if is_gpu(t) else 1)


def bf16_weight_launch(t: Target, m: int, n: int, k: int, x_dtype: torch.dtype) -> MatmulLaunch:
    """The launch of `x [m, k] @ w.T` for a bf16 weight w [n, k] read as it is (codegen/bf16_linear.py):
    `matmul_launch`'s tiles and K split for bf16; on GPUs an fp32 x goes to the tensor cores as exact bf16
    parts ("bf16x3") instead of widening the weight for FMAs."""
    launch = matmul_launch(t, m, n, k, 1, torch.bfloat16)
    if x_dtype == torch.float32 and launch.product == "native":
        return replace(launch, product="bf16x3")
    return launch


@dataclass(frozen=True, kw_only=True)
class ReduceLaunch:
    """How a reduction over the middle axis of `[outer, L, inner]` is launched: a program takes `block_cols`
    outputs (consecutive (outer, inner) pairs: rows of a last-axis reduction) and walks L in steps of
    `block_l`, adding each step into an fp32 `[block_l, block_cols]` tile, then sums the tile over its first
    axis: an output's order is fixed by (L, block_l, block_cols), never by `outer`."""

    block_l: int
    block_cols: int
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_l", "block_cols"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ReduceLaunch.{name} must be a power of two: {self}")
        if self.block_l * self.block_cols > MAX_REDUCE_TILE or self.num_warps < 1:
            raise ValueError(f"ReduceLaunch: at most {MAX_REDUCE_TILE} elements a tile, positive warps: {self}")


def reduce_launch(length: int, inner: int) -> ReduceLaunch:
    """Up to 1024 elements of L a step; as many outputs a program as fill a 4096-element tile, at most the
    inner size's power of two where there is one (a program stays within few outer rows)."""
    block_l = min(1024, _pow2_at_least(length))
    cols = MAX_REDUCE_TILE // block_l
    return ReduceLaunch(block_l=block_l, block_cols=cols if inner == 1 else min(cols, _pow2_at_least(inner)))
