"""Launch choices of the block-scaled FP8 GEMM (codegen/kernels/fp8_gemm.py), per (M, N, K, target).

Pure Python (no Triton import): the choice is a frozen `Fp8GemmLaunch`, validated on construction, and
`fp8_gemm_launch` picks it from the shape and the target table (codegen/targets.py). The kernel computes
`out^T = W @ x^T` ("swap AB"): the weight rows fill the tensor cores' M side (64 a warpgroup on Hopper) and
the few activation rows their N side, so a decode step of one token pads to 16 rows, not 64.

Batch invariance (runtime/batch_invariant.py): a row's result never depends on M, the rows beside it. What
orders a row's sums is chosen from (N, K, target) only: the K split (`split_k`, `blocks_per_split`) is the one
that gives the weight tiles of a single activation tile about two programs an SM, whatever M. M only picks the
activation tile (`block_m`, the MMA's N side: each output's 128-column block is the same chain of k-steps
whatever the tile's width, which bench/batch_invariance_check.py checks on the GPU; Triton's CPU interpreter,
whose dot is numpy's matmul, does not promise it), whether the splits run as programs of their own or folded
into one (`fold_splits`: the same additions in the same order), and where the activations are rounded
(`prequantise`: the same codes and scales either way).
Cost: the split programs write and read fp32 partials (split_k x M x N x 4 bytes each way) until the tiles
alone fill the GPU (at least one program an SM) and the splits fold. At decode's few rows that is a few KiB;
at 64-128 rows on the small-N shapes (wq_a, wkv: 16-32 splits) it is 1-4 times the weight's bytes, in L2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4c.codegen.fp8_operands import QUANT_BLOCK
from dsv4c.codegen.targets import Target, is_gpu

MIN_DOT = 16  # tl.dot's smallest side
PREQUANTISE_ABOVE = 32  # activation rows (rounded up to a power of two) above which x is rounded by its own kernel
PRODUCTS = ("fp8", "ieee", "bf16x1", "bf16x3")


@dataclass(frozen=True)
class Fp8GemmLaunch:
    """How one call is launched. Grid (cdiv(N, block_n), cdiv(M, block_m), split_k, or 1 with fold_splits);
    program (n, m, s) takes `block_n` weight rows, `block_m` activation rows and K blocks [s * blocks_per_split,
    (s + 1) * blocks_per_split) of 128 columns (with fold_splits: every split, one after the other).

    block_m: activation rows of a program (power of two, >= 16: the dot's N side; rows past M are masked).
    block_n: weight rows of a program (power of two, >= 16; each row takes its 128-row block's scale).
    split_k, blocks_per_split: K split over `split_k` programs writing fp32 partials that a second kernel
        sums in split order (deterministic); split_k == 1 writes the output directly. No split is empty:
        (split_k - 1) * blocks_per_split < cdiv(K, 128) <= split_k * blocks_per_split.
    fold_splits (split_k > 1): one program a tile sums each split into a fresh accumulator and adds them in
        split order itself, exactly the split sum's additions: the same result bit for bit, without partials.
    product: how a 128-column block's products are summed before its scales apply, in an fp32 accumulator:
        "fp8"    e4m3 x e4m3 tl.dot (FP8 tensor cores on Hopper/Blackwell; the act_quant path);
        "ieee"   both operands widened to fp32, FMA dot (plain numerics on Triton's CPU interpreter);
        "bf16x1" bf16 x and the weight widened to bf16 (exact), one tensor-core dot (plain, bf16 x);
        "bf16x3" fp32 x split into three bf16 parts (exact) against the widened weight: three dots whose
                 products are exact (plain, fp32 x).
    prequantise (act_quant, "fp8" products): x is rounded once by a kernel of its own that writes its e4m3
        codes and scales, which the GEMM's programs read; otherwise every program rounds the x tile of each K
        block itself (n tiles programs round the same tile). Either way the same codes and scales, the same
        products: the same result bit for bit.
    num_warps, num_stages: Triton's options. pdl (CUDA only): each kernel after the first (the GEMM after the
        rounding kernel, the split sum after the GEMM) is launched as the one before's programmatic dependent,
        so its launch overlaps the other's run; it waits for it before reading what it wrote.
    """

    block_m: int
    block_n: int
    split_k: int
    blocks_per_split: int
    product: str
    num_warps: int = 4
    num_stages: int = 3
    pdl: bool = False
    fold_splits: bool = False
    prequantise: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < MIN_DOT or value & (value - 1):
                raise ValueError(f"Fp8GemmLaunch.{name} must be a power of two >= {MIN_DOT}: {self}")
        if self.product not in PRODUCTS:
            raise ValueError(f"Fp8GemmLaunch.product must be one of {PRODUCTS}: {self}")
        if self.prequantise and self.product != "fp8":
            raise ValueError(f"Fp8GemmLaunch.prequantise rounds activations for fp8 products only: {self}")
        if min(self.split_k, self.blocks_per_split, self.num_warps, self.num_stages) < 1:
            raise ValueError(f"Fp8GemmLaunch fields must be positive: {self}")

    def check(self, k: int) -> None:
        """The splits cover K's blocks, none of them empty."""
        blocks = -(-k // QUANT_BLOCK)
        if not (self.split_k - 1) * self.blocks_per_split < blocks <= self.split_k * self.blocks_per_split:
            raise ValueError(f"{self}: {self.split_k} splits of {self.blocks_per_split} blocks do not partition "
                             f"K={k}'s {blocks} blocks of {QUANT_BLOCK}")


def product_for(t: Target, act_quant: bool, x_dtype: torch.dtype) -> str:
    """FP8 dots with act_quant (exact on the interpreter too); plain numerics: exact bf16 products on GPUs
    (one part for bf16 x, three for fp32 x), fp32 FMA dots on the interpreter (it gets bf16 wrong)."""
    if act_quant:
        return "fp8"
    if not is_gpu(t):
        return "ieee"
    return "bf16x1" if x_dtype == torch.bfloat16 else "bf16x3"


def split_blocks(k: int, splits_wanted: int) -> tuple[int, int]:
    """(split_k, blocks_per_split): K's 128-column blocks in about `splits_wanted` equal slices, none empty."""
    blocks = -(-k // QUANT_BLOCK)
    per_split = -(-blocks // max(1, min(blocks, splits_wanted)))
    return -(-blocks // per_split), per_split


def _pow2_at_least(size: int) -> int:
    """The smallest power of two >= size and >= MIN_DOT."""
    return max(MIN_DOT, 1 << (max(1, size) - 1).bit_length())


def _block_m(m: int, prequantise: bool) -> int:
    """The activation tile: M's rows rounded up to a power of two, at most 64 (128 with prequantised codes, whose
    K loop holds no rounding: the tile's width costs registers, not instructions)."""
    return min(128 if prequantise else 64, _pow2_at_least(m))


def _in_group(block_n: int, group_rows: int | None) -> int:
    """block_n, or the largest power of two below it that divides group_rows (its lowest set bit)."""
    return block_n if group_rows is None else min(block_n, group_rows & -group_rows)


def fp8_gemm_launch(t: Target, m: int, n: int, k: int, act_quant: bool = True,
                    x_dtype: torch.dtype = torch.bfloat16, group_rows: int | None = None) -> Fp8GemmLaunch:
    """The launch of an `[m, k] x [n, k]^T` FP8 linear on target `t`; its K split depends on (n, k, t) only
    (module docstring: batch invariance). `group_rows`: a grouped GEMM's weight rows a group (n = G *
    group_rows), which block_n must divide so that no weight tile spans two groups; None for one group.

    GPUs (decode: memory bound, the weight read is the cost, so every SM must keep enough weight bytes in
    flight and issue few enough instructions a weight byte; `bench/fp8_gemm_sass.py` reads both off the build):
    64 weight rows a program (one Hopper warpgroup's wgmma M side), 4 warps, 4 pipeline stages (3 weight tiles
    of 8 KiB ahead of the MMA a program, several programs an SM); K is split until one tile row's grid has
    about two programs an SM, so every SM streams weight tiles, and no split is empty; the splits fold once
    the tiles alone give every SM a program. Up to 32 rows each program rounds its x tiles itself (no extra
    kernel); beyond, the rounding's instructions grow with the tile's rows while the weight bytes do not, so x
    is rounded once by a kernel of its own (`prequantise`, PDL-chained to the GEMM) and up to 128 rows share a
    weight tile.
    cpu (Triton's interpreter, tests only): few programs (the interpreter pays per program and per
    operation, not per element), up to 1024 weight rows each, and two splits wherever K has two blocks, so
    the split sum runs in tests; the same prequantise rule as the GPUs, so both roundings run in tests.
    """
    product = product_for(t, act_quant, x_dtype)
    prequantise = act_quant and _pow2_at_least(m) > PREQUANTISE_ABOVE
    block_m = _block_m(m, prequantise)
    if not is_gpu(t):
        split_k, per_split = split_blocks(k, 2)
        return Fp8GemmLaunch(block_m, _in_group(min(1024, _pow2_at_least(n)), group_rows), split_k, per_split,
                             product, num_stages=1, prequantise=prequantise)
    block_n = _in_group(64, group_rows)
    weight_tiles = -(-n // block_n)
    split_k, per_split = split_blocks(k, -(-2 * t.sm_count // weight_tiles))
    fold = split_k > 1 and weight_tiles * -(-m // block_m) >= t.sm_count
    return Fp8GemmLaunch(block_m, block_n, split_k, per_split, product, num_warps=4, num_stages=4,
                         pdl=(split_k > 1 and not fold) or prequantise, fold_splits=fold, prequantise=prequantise)
