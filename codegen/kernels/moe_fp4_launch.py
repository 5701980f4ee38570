"""Launch choices of the fused FP4 MoE kernels (codegen/kernels/moe_fp4.py), per target and layer shape.

Pure Python (no Triton import): `moe_fp4_launch` picks a frozen `MoeFp4Launch` from the target table
(codegen/targets.py) and the layer's sizes. The GEMMs compute `out^T = W @ a^T` (swap AB): the weight rows of a
program (128 in the gate/up GEMM, DOWN_ROWS = 256 in the down GEMM) fill the tensor cores' M side (two wgmma
warpgroups on Hopper, tcgen05 tiles of 128 on Blackwell) and `block_m` selections of one expert their N side,
so a decode step of one token pads to 16 rows, not 64.

Bytes in flight. A one-token step is memory-bound: its programs must keep enough weight bytes in flight to
cover the memory latency (Little's law: about 3.35 TB/s x 1 us / 132 SMs = 25 KB an SM on an H100). A GEMM
program streams 17 KB of MXFP4 codes and scales a 128-column step (w1 and w3 of 128 rows; w2 of 256 rows),
and `num_stages` = 4 keeps three steps ahead in flight: about 50 KB a program, one program an SM (its
registers). The shared expert's FP8 rows are twice an MXFP4 row's bytes, so a program over the same rows would
stream twice a routed program's bytes and finish last; `shared_split` = 2 gives its rows of each program to two
programs (64 gate/up rows, 128 down rows each), each streaming about what a routed program streams. A one-token
step then has (top_k + shared_split) x I / 128 gate/up programs and (top_k + shared_split) x D / 256 down
programs, 128 each for Flash, one wave on an H100's 132 SMs; an expert no token chose costs no program.
bench/moe_sass.py measures all this on the sm_90a build.

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
DOWN_ROWS = 256  # weight rows a down program computes: one weight a step, so twice the gate/up program's rows
ROUTER_BLOCK_E = 64  # router rows a GPU program computes: one wgmma warpgroup's M side
SHARED_SPLITS = (1, 2)  # programs the shared expert's rows of one GEMM program may be split over


@dataclass(frozen=True)
class MoeFp4Launch:
    """block_m: rows a tile multiplies: selections of one expert in the GEMMs, tokens in the router (the dots'
    N side);
    block_n: weight rows a gate/up program computes: 128, one rounding block of the hidden features (the program
    rounds its own block of the down GEMM's operand); a down program computes DOWN_ROWS;
    split_k: slices of the hidden features the down GEMM's programs split (partials summed by the combine);
    router_block_e: experts (router rows) a router program computes;
    router_splits: slices of D the router's programs split (partial logits summed by the routing kernel);
    product: how activations that are not rounded (W4A16, plain numerics, the router) multiply; "bf16" only
    for bf16 activations (exact: the decoded weights and the activations are bf16 values);
    native_fp4: W4A4's routed products as MXFP4 x MXFP4 `tl.dot_scaled` (tcgen05 kind::mxf4 on sm_100a /
    sm_103a), instead of the exact emulation on FP8 dots;
    shared_split: programs (1 or 2) that share the shared expert's rows of one gate/up (block_n) or down
    (DOWN_ROWS) program, each a 1 / shared_split slice of them: its FP8 rows are twice an MXFP4 row's bytes, so
    2 makes its programs stream what a routed program streams. With 2 a gate/up program holds half a rounding
    block of the down GEMM's operand, so the shared rows are written unrounded and the down GEMM rounds them
    on load, the same way: the same values, scales and products as 1, and bit-equal results wherever a dot's
    sum order for a row does not depend on its M side (the GPUs' MMAs; not numpy's fp32 BLAS, which the
    interpreter runs unrounded fp32 dots on);
    num_warps / num_stages: Triton's, for the GEMMs;
    pdl: each kernel of the layer (router, routing, prepare, gate/up, down, combine) launched as its predecessor's
    programmatic dependent (codegen/kernels/pdl.py), so six launches' latencies overlap the kernels before them
    (CUDA devices only; the same computations, so the same bits)."""

    block_m: int
    block_n: int
    split_k: int
    router_block_e: int
    router_splits: int
    product: str
    native_fp4: bool
    shared_split: int
    num_warps: int
    num_stages: int
    pdl: bool = False

    def __post_init__(self) -> None:
        sides = (self.block_m, self.router_block_e)
        sides_ok = all(v >= MIN_DOT and v & (v - 1) == 0 for v in sides)
        if not sides_ok or self.block_n != K_COLUMNS or min(self.split_k, self.router_splits) < 1 \
                or self.product not in PRODUCTS or self.shared_split not in SHARED_SPLITS or self.num_warps < 1:
            raise ValueError(f"{self}: block_m / router_block_e powers of two >= {MIN_DOT}, block_n {K_COLUMNS}, "
                             f"split_k and router_splits >= 1, product one of {PRODUCTS}, shared_split one of "
                             f"{SHARED_SPLITS}")


def moe_fp4_launch(t: Target, experts: int, top_k: int, hidden: int, intermediate: int, activations: str,
                   bf16_activations: bool) -> MoeFp4Launch:
    """The launch for a layer of `experts` routed experts (top_k a token) of width `intermediate` on `hidden`,
    chosen by the layer's shape and the target only (never the token count: see the module docstring).
    GPUs: 16-selection tiles against 128 weight rows (DOWN_ROWS in the down GEMM), the shared expert's split
    over two programs, eight warps (two wgmma warpgroups), four stages, programmatic dependent launches; the
    down GEMM splits its K while twice a one-token step's programs ((top_k + 2) x D / DOWN_ROWS) still fit one
    an SM (a program holds most of an SM's registers, so a split past that is a second wave); the router splits
    D so that its programs (64 experts each) cover every SM at one token.
    cpu (Triton's interpreter, tests only): as few programs as the sizes allow (it pays per program and per
    operation, not per element): 64-row tiles, the shared expert unsplit, all experts in one router program;
    fp32."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"moe_fp4: activations {activations!r}; allowed: {', '.join(ACTIVATIONS)}")
    if not t.is_gpu:
        return MoeFp4Launch(block_m=64, block_n=K_COLUMNS, split_k=1,
                            router_block_e=max(MIN_DOT, _pow2_at_least(experts)), router_splits=1, product="ieee",
                            native_fp4=False, shared_split=1, num_warps=4, num_stages=1)
    shared_split = 2
    down_programs = (top_k + shared_split) * -(-hidden // DOWN_ROWS)
    blocks = max(1, intermediate // K_COLUMNS)
    split_k = 1
    while 2 * down_programs * split_k <= t.sm_count and split_k * 2 <= min(4, blocks):
        split_k *= 2
    router_rows, d_blocks = -(-experts // ROUTER_BLOCK_E), max(1, hidden // K_COLUMNS)
    per_split = max(1, d_blocks * router_rows // t.sm_count)
    return MoeFp4Launch(block_m=16, block_n=K_COLUMNS, split_k=split_k, router_block_e=ROUTER_BLOCK_E,
                        router_splits=-(-d_blocks // per_split), product="bf16" if bf16_activations else "ieee",
                        native_fp4=activations == "w4a4" and has_native_mxfp4(t), shared_split=shared_split,
                        num_warps=8, num_stages=4, pdl=True)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
