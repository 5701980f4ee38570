"""Launch choices of the fused FP4 MoE kernels (codegen/kernels/moe_fp4.py), per target and layer shape.

Pure Python (no Triton import): `moe_fp4_launch` picks a frozen `MoeFp4Launch` from the target table
(codegen/targets.py) and the layer's sizes. The GEMMs compute `out^T = W @ a^T` (swap AB): `block_n` weight
rows fill the tensor cores' M side (64 a warpgroup for Hopper's wgmma, 128 for Blackwell's tcgen05) and
`block_m` selections of one expert their N side, so a decode step of one token pads to 16 rows, not 64.

Batch invariance: nothing here reads the number of tokens a step holds, so every reduction of a token's
result (the router's logits over D and their splits, each expert GEMM over its K and the down GEMM's splits,
the combine over the selections) runs in one order whatever the step's size: a token decoded alone and the
same token verified among B (1 + k) drafts get bit-equal rows, and greedy MTP equals greedy decoding. (Each
row of a `tl.dot` is a function of that row and the other operand only, so which rows share a tile does not
matter either.)
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4c.codegen.targets import Target, has_native_mxfp4

ACTIVATIONS = ("w4a8", "w4a16", "w4a4")  # the routed experts' activation format (codegen/moe_fp4.py)
PRODUCTS = ("ieee", "bf16")  # how unrounded activations multiply: fp32 FMA dots, or bf16 tensor cores
MIN_DOT = 16  # tl.dot's smallest side
K_COLUMNS = 128  # columns of K a kernel's loop step covers (codegen/kernels/moe_fp4.py K_BLOCK)
ROUTER_BLOCK_E = 64  # router rows a GPU program computes: one wgmma warpgroup's M side


@dataclass(frozen=True)
class MoeFp4Launch:
    """block_m: rows a tile multiplies: selections of one expert in the GEMMs, tokens in the router (the dots'
    N side);
    block_n: weight rows a program computes (gate/up: hidden features of w1 and of w3; down: outputs);
    split_k: slices of the hidden features the down GEMM's programs split (partials summed by the combine);
    router_block_e: experts (router rows) a router program computes;
    router_splits: slices of D the router's programs split (partial logits summed by the routing kernel);
    product: how activations that are not rounded (W4A16, plain numerics, the router) multiply; "bf16" only
    for bf16 activations (exact: the decoded weights and the activations are bf16 values);
    native_fp4: W4A4's routed products as MXFP4 x MXFP4 `tl.dot_scaled` (tcgen05 kind::mxf4 on sm_100a /
    sm_103a), instead of the exact emulation on FP8 dots;
    num_warps / num_stages: Triton's, for the GEMMs."""

    block_m: int
    block_n: int
    split_k: int
    router_block_e: int
    router_splits: int
    product: str
    native_fp4: bool
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        sides = (self.block_m, self.block_n, self.router_block_e)
        sides_ok = all(v >= MIN_DOT and v & (v - 1) == 0 for v in sides)
        if not sides_ok or min(self.split_k, self.router_splits) < 1 or self.product not in PRODUCTS \
                or self.num_warps < 1:
            raise ValueError(f"{self}: block_m / block_n / router_block_e powers of two >= {MIN_DOT}, split_k and "
                             f"router_splits >= 1, product one of {PRODUCTS}")
        if self.native_fp4 and self.block_n < 128:
            raise ValueError(f"{self}: native MXFP4 products need block_n >= 128 (tcgen05's M side)")


def moe_fp4_launch(t: Target, experts: int, top_k: int, hidden: int, intermediate: int, activations: str,
                   bf16_activations: bool) -> MoeFp4Launch:
    """The launch for a layer of `experts` routed experts (top_k a token) of width `intermediate` on `hidden`,
    chosen by the layer's shape and the target only (never the token count: see the module docstring).
    GPUs: 16-selection tiles against 64 weight rows (one wgmma warpgroup; 128 rows for native MXFP4); the
    down GEMM splits its K when a one-token step's top_k + 1 experts x D / block_n programs leave fewer than
    two an SM; the router splits D so that its programs (64 experts each) cover every SM at one token.
    cpu (Triton's interpreter, tests only): as few programs as the sizes allow (it pays per program and per
    operation, not per element): 128 weight rows, 64-row tiles, all experts in one router program; fp32."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"moe_fp4: activations {activations!r}; allowed: {', '.join(ACTIVATIONS)}")
    if not t.is_gpu:
        return MoeFp4Launch(block_m=64, block_n=128, split_k=1, router_block_e=max(MIN_DOT, _pow2_at_least(experts)),
                            router_splits=1, product="ieee", native_fp4=False, num_warps=4, num_stages=1)
    native = activations == "w4a4" and has_native_mxfp4(t)
    block_n = 128 if native else 64
    down_programs = (top_k + 1) * -(-hidden // block_n)
    blocks = max(1, intermediate // K_COLUMNS)
    split_k = 1
    while down_programs * split_k < 2 * t.sm_count and split_k * 2 <= min(4, blocks):
        split_k *= 2
    router_rows, d_blocks = -(-experts // ROUTER_BLOCK_E), max(1, hidden // K_COLUMNS)
    per_split = max(1, d_blocks * router_rows // t.sm_count)
    return MoeFp4Launch(block_m=16, block_n=block_n, split_k=split_k, router_block_e=ROUTER_BLOCK_E,
                        router_splits=-(-d_blocks // per_split), product="bf16" if bf16_activations else "ieee",
                        native_fp4=native, num_warps=4, num_stages=3)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
