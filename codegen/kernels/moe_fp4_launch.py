"""Launch choices of the fused FP4 MoE kernels (codegen/kernels/moe_fp4.py), per target and shape.

Pure Python (no Triton import): `moe_fp4_launch` picks a frozen `MoeFp4Launch` from the target table
(codegen/targets.py) and the layer's sizes. The GEMMs compute `out^T = W @ a^T` (swap AB): `block_n` weight
rows fill the tensor cores' M side (64 a warpgroup for Hopper's wgmma, 128 for Blackwell's tcgen05) and
`block_m` selections of one expert their N side, so a decode step of one token pads to 16 rows, not 64.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4c.codegen.targets import Target, has_native_mxfp4

ACTIVATIONS = ("w4a8", "w4a16", "w4a4")  # the routed experts' activation format (codegen/moe_fp4.py)
PRODUCTS = ("ieee", "bf16")  # how unrounded activations multiply: fp32 FMA dots, or bf16 tensor cores
MIN_DOT = 16  # tl.dot's smallest side


@dataclass(frozen=True)
class MoeFp4Launch:
    """block_m: selections of one expert a program multiplies (the dot's N side);
    block_n: weight rows a program computes (gate/up: hidden features of w1 and of w3; down: outputs);
    split_k: slices of the hidden features the down GEMM's programs split (partials summed by the combine);
    product: how activations that are not rounded (W4A16, or plain numerics) multiply; "bf16" only for bf16
    activations (exact: the decoded weights and the activations are bf16 values);
    native_fp4: W4A4's routed products as MXFP4 x MXFP4 `tl.dot_scaled` (tcgen05 kind::mxf4 on sm_100a /
    sm_103a), instead of the exact emulation on FP8 dots;
    num_warps / num_stages: Triton's, for the GEMMs."""

    block_m: int
    block_n: int
    split_k: int
    product: str
    native_fp4: bool
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        sides_ok = all(v >= MIN_DOT and v & (v - 1) == 0 for v in (self.block_m, self.block_n))
        if not sides_ok or self.split_k < 1 or self.product not in PRODUCTS or self.num_warps < 1:
            raise ValueError(f"{self}: block_m / block_n powers of two >= {MIN_DOT}, split_k >= 1, "
                             f"product one of {PRODUCTS}")
        if self.native_fp4 and self.block_n < 128:
            raise ValueError(f"{self}: native MXFP4 products need block_n >= 128 (tcgen05's M side)")


def moe_fp4_launch(t: Target, tokens: int, top_k: int, hidden: int, intermediate: int, activations: str,
                   bf16_activations: bool) -> MoeFp4Launch:
    """GPUs: 16-selection tiles against 64 weight rows (one wgmma warpgroup; 128 rows for native MXFP4), so a
    decode step's k + 1 experts x I / 64 gate/up programs and D / 64 down programs spread over every SM; the
    down GEMM splits its K when even that leaves fewer than two programs an SM. cpu (Triton's interpreter,
    tests only): as few programs as the sizes allow (it pays per program and per operation, not per element):
    128 weight rows, tiles of up to 64 selections; fp32 products."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"moe_fp4: activations {activations!r}; allowed: {', '.join(ACTIVATIONS)}")
    native = activations == "w4a4" and has_native_mxfp4(t)
    block_n = 128 if native else 64
    if not t.is_gpu:
        return MoeFp4Launch(block_m=min(64, max(MIN_DOT, 1 << (tokens - 1).bit_length())), block_n=128, split_k=1,
                            product="ieee", native_fp4=False, num_warps=4, num_stages=1)
    experts = min(tokens * top_k, 256) + 1
    down_programs = experts * -(-hidden // block_n)
    blocks = max(1, intermediate // 128)
    split_k = 1
    while down_programs * split_k < 2 * t.sm_count and split_k * 2 <= min(4, blocks):
        split_k *= 2
    return MoeFp4Launch(block_m=16, block_n=block_n, split_k=split_k,
                        product="bf16" if bf16_activations else "ieee", native_fp4=native, num_warps=4,
                        num_stages=3)
