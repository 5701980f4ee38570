"""Launch choices of the fused mHC kernels (codegen/kernels/mhc_kernels.py), per target and token count.

Pure Python (no Triton import): the choice is a frozen `MhcLaunch`, built with keywords only and validated on
construction, and a `LaunchChoice` picks it from the target table (codegen/targets.py) and the boundary's sizes:
`mhc_launch`, the tuned one, or `batch_invariant_launch`, the one runtime/batch_invariant.py's block asks for.
The host wrappers (codegen/kernels/mhc.py) turn it into the kernels' constexprs and launch options. The
timings behind each choice are in BENCHMARKS.md (mHC sections).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dsv4c.codegen.targets import Target, is_gpu

MIN_DOT = 16  # tl.dot's smallest block side
MAX_TILE = 4096  # fp32 elements of one register tile of a 4-warp split-K program (32 a thread); more spills
PRECISIONS = ("ieee", "tf32x3")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@dataclass(frozen=True, kw_only=True)
class MhcLaunch:
    """How the two kernels of a boundary are launched.

    Split-K kernel: grid (cdiv(N, block_t), split_k); a program covers `chunks` chunks of `block_d` columns of
        all n streams, so split_k * chunks * block_d >= D. `num_warps`, `num_stages`: Triton's options.
    dot: x @ fn.T through tl.dot (needs block_t, block_d >= MIN_DOT) or by broadcast multiply-and-sum.
    precision: the dot's fp32 mode: "ieee" (FMA) or "tf32x3" (three tensor-core products, bf16 ones for a
        tile of bf16 values; fp32-accurate either way, plain tf32 is not).
    Collapse kernel: `collapse_t` tokens a program over all of D (a second program a token block computes
        post and comb), `collapse_warps` warps.
    pdl (CUDA only): the collapse is launched as the split-K kernel's programmatic dependent; it loads its
        inputs while the split-K kernel runs and waits only for the partials.
    collapse_stores_new (hc_post fused with a collapse): the collapse, which rebuilds the new streams anyway,
        writes them; the split-K kernel only uses them.
    collapse_sums_squares (same): both collapse programs take the RMS scale from the new streams they
        rebuild (each writing half of them with collapse_stores_new); the split-K kernel only feeds its dot.
    fast_reciprocal (GPUs): the Sinkhorn's reciprocals are one `rcp.approx.ftz.f32` each (<= 1 ulp off).
    split_k_pdl (CUDA only): the split-K kernel is launched as a programmatic dependent of the kernel before
        it, whatever that is.
    """

    block_t: int
    block_d: int
    chunks: int
    split_k: int
    num_warps: int
    num_stages: int
    collapse_t: int
    collapse_warps: int
    dot: bool
    precision: str = "ieee"
    pdl: bool = False
    collapse_stores_new: bool = False
    collapse_sums_squares: bool = False
    fast_reciprocal: bool = False
    split_k_pdl: bool = False

    def __post_init__(self):
        for name in ("block_t", "block_d", "collapse_t"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"MhcLaunch.{name} must be a power of two, got {value}")
        if self.dot and min(self.block_t, self.block_d) < MIN_DOT:
            raise ValueError(f"MhcLaunch with dot needs block_t, block_d >= {MIN_DOT}: {self}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"MhcLaunch.precision must be 'ieee' or 'tf32x3' (tf32 is too coarse), got {self}")
        if min(self.chunks, self.split_k, self.num_warps, self.num_stages, self.collapse_warps) < 1:
            raise ValueError(f"MhcLaunch fields must be positive: {self}")

    def check(self, hidden: int) -> None:
        """The splits cover all `hidden` columns."""
        if self.split_k * self.chunks * self.block_d < hidden:
            raise ValueError(f"{self} covers {self.split_k * self.chunks * self.block_d} < D={hidden} columns")


def split_over(hidden: int, block_d: int, programs_wanted: int) -> tuple[int, int]:
    """(chunks, split_k): split D's chunks into about `programs_wanted` slices of equal chunk count."""
    n_chunks = cdiv(hidden, block_d)
    split_k = max(1, min(n_chunks, programs_wanted))
    chunks = cdiv(n_chunks, split_k)
    return chunks, cdiv(n_chunks, chunks)


def collapse_warps(hidden: int, hc: int) -> int:
    """Warps of a one-token collapse program on GPUs: its n x D stream tile at 128 elements a thread, the most
    that stays in registers, and no more: every thread of the post / Sinkhorn program computes the whole
    Sinkhorn, and more warps queue for the reciprocal unit."""
    return min(16, max(4, next_power_of_2(hidden) * next_power_of_2(hc) // (32 * 128)))


def dot_launch(t: Target, tokens: int, hidden: int, hc: int, block_t: int, programs_per_sm: int = 2,
               precision: str = "tf32x3") -> MhcLaunch:
    """A tl.dot launch on `block_t`-token blocks: about `programs_per_sm` programs an SM over all token blocks,
    the column block as large as the register tiles allow (x [block_t, n, block_d] and fn [n * block_d, 32]
    at most MAX_TILE) while D still has a chunk for every program. Up to 64 tokens the collapse programs sum
    the squares of the new streams (beyond, the collapse runs more than one wave and that costs more)."""
    hc_pad = next_power_of_2(hc)
    block_d = max(MIN_DOT, min(64, MAX_TILE // (block_t * hc_pad), MAX_TILE // (hc_pad * 32)))
    programs_per_block = max(1, programs_per_sm * t.sm_count // cdiv(tokens, block_t))
    while block_d > MIN_DOT and cdiv(hidden, block_d) < programs_per_block:
        block_d //= 2
    chunks, split_k = split_over(hidden, block_d, programs_per_block)
    return MhcLaunch(block_t=block_t, block_d=block_d, chunks=chunks, split_k=split_k, num_warps=4, num_stages=2,
                     collapse_t=1, collapse_warps=collapse_warps(hidden, hc), dot=True, precision=precision,
                     pdl=True, collapse_stores_new=True, collapse_sums_squares=tokens <= 64, fast_reciprocal=True,
                     split_k_pdl=True)


def broadcast_launch(tokens: int, hidden: int, hc: int) -> MhcLaunch:
    """Up to 8 tokens on GPUs: broadcast products (a tl.dot pads to 16 rows), one token and one 32-column chunk
    a program whatever the count, so a token's sums are the same program's from 1 to 8 tokens a step (a decode
    step and an MTP verification of up to 3 drafts at batch 1 or 2 agree bit for bit); from 3 tokens the collapse
    writes the new streams (bitwise the same streams, BENCHMARKS.md)."""
    block_t, block_d = 1, 32
    chunks, split_k = split_over(hidden, block_d, cdiv(hidden, block_d))
    return MhcLaunch(block_t=block_t, block_d=block_d, chunks=chunks, split_k=split_k, num_warps=4, num_stages=2,
                     collapse_t=1, collapse_warps=collapse_warps(hidden, hc), dot=False, pdl=True,
                     collapse_stores_new=tokens > 2, fast_reciprocal=True, split_k_pdl=True)


def interpreter_launch(tokens: int, hidden: int) -> MhcLaunch:
    """cpu (Triton's interpreter, tests only): few large programs, since the interpreter pays per program and
    per call, but still several splits and chunks so both loops run."""
    block_d = max(MIN_DOT, min(1024, next_power_of_2(cdiv(hidden, 4))))
    chunks, split_k = split_over(hidden, block_d, cdiv(cdiv(hidden, block_d), 2))
    block_t = min(256, next_power_of_2(tokens))
    return MhcLaunch(block_t=block_t, block_d=block_d, chunks=chunks, split_k=split_k, num_warps=4, num_stages=1,
                     collapse_t=block_t, collapse_warps=4, dot=False)


def mhc_launch(t: Target, tokens: int, hidden: int, hc: int = 4) -> MhcLaunch:
    """The launch of an mHC boundary of `tokens` tokens, hidden size `hidden` and `hc` streams on target `t`.
    GPUs (chosen by `bench/mhc_bench.py --sweep` and A/B runs of hc_post_pre at Flash dimensions on an H100):
    both kernels PDL-launched, one token a collapse program; broadcast products up to 8 tokens, tf32x3
    tensor-core dots on 16-token blocks at about one program an SM for 9-16 tokens, on 64-token blocks at
    about two beyond (wgmma on Hopper, tcgen05 on Blackwell)."""
    if not is_gpu(t):
        return interpreter_launch(tokens, hidden)
    if tokens <= 8:
        return broadcast_launch(tokens, hidden, hc)
    if tokens <= 16:
        return dot_launch(t, tokens, hidden, hc, MIN_DOT, programs_per_sm=1)
    return dot_launch(t, tokens, hidden, hc, 64)


LaunchChoice = Callable[[Target, int, int, int], MhcLaunch]  # (target, tokens, hidden, hc) -> launch: mhc_launch's


def batch_invariant_launch(t: Target, tokens: int, hidden: int, hc: int = 4) -> MhcLaunch:
    """The launch runtime/batch_invariant.py's block asks for, on any target: `broadcast_launch` for every token
    count. D's split depends on `hidden` alone, a split-K program sums one token's 32 columns of every stream and a
    collapse program one token's splits, so a token's sums are the same whatever the step holds; up to 8 tokens
    it is the tuned GPU launch, so decode and small MTP steps keep theirs. (Tensor-core dots on fixed 16-token
    blocks would also sum each row on its own, but the 1..8-token steps would then take them too, a decode
    step's one token padded to 16 rows.) `collapse_stores_new`, on from 3 tokens, moves which kernel writes the
    new streams, not a sum: both build them with one function of explicit FMAs (bitwise equal on the GPU,
    BENCHMARKS.md); `collapse_sums_squares`, which would sum the RMS scale's squares in another order, stays off.
    Cost, above 8 tokens only: each token's programs read all of fn and multiply with FMAs, where the tuned
    launch reads fn once a 16- or 64-token block on the tensor cores, so the split-K kernel's work grows with the
    token count (`bench/mhc_bench.py --invariant` times both)."""
    return broadcast_launch(tokens, hidden, hc)
