"""Launch choices of the Lightning Indexer kernels (codegen/kernels/lightning_indexer.py), per target and shape.

Pure Python (no Triton import): `indexer_launch` picks a frozen `IndexerLaunch` from the target table
(codegen/targets.py) and the call's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4c.codegen.targets import Target

DECODES = ("mxfp", "registers")
PRODUCTS = ("bf16", "ieee")
MXFP_BLOCK = 32  # the scale block `tl.dot_scaled` reads (the OCP MX format's)
MIN_DOT = 16  # tl.dot's smallest side


@dataclass(frozen=True)
class IndexerLaunch:
    """block_e: entries a scores tile multiplies (the dot's N side);
    entries_per_split / splits: the entry range one scores program covers (whole tiles) and how many a sequence;
    decode: "registers" (codes and scales decoded by integer arithmetic, any scale block) or "mxfp"
    (`tl.dot_scaled` of bf16 queries and MXFP4 keys: Triton's own e2m1 upcast; scale blocks of 32 only; opt-in
    until measured on the GPU image's Triton, bench/indexer_bench.py times both);
    product: how "registers" multiplies: "bf16" tensor-core dots (exact: bf16 values), "ieee" fp32 dots (the CPU
    interpreter, whose bf16 arithmetic is wrong);
    scores_warps / topk_warps: Triton's num_warps of each kernel; chunk: scores the top-k program reads at a time."""

    block_e: int
    entries_per_split: int
    splits: int
    decode: str
    product: str
    scores_warps: int
    chunk: int
    topk_warps: int

    def __post_init__(self) -> None:
        pow2 = all(v >= MIN_DOT and v & (v - 1) == 0 for v in (self.block_e, self.chunk))
        if not pow2 or self.decode not in DECODES or self.product not in PRODUCTS or self.splits < 1 \
                or self.entries_per_split < self.block_e or self.entries_per_split % self.block_e:
            raise ValueError(f"{self}: block_e and chunk powers of two >= {MIN_DOT}, whole tiles a split, decode "
                             f"in {DECODES}, product in {PRODUCTS}")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _fit(n: int) -> int:
    """The smallest power of two >= max(n, MIN_DOT): a dot side or a block of n elements."""
    return max(MIN_DOT, next_power_of_2(n))


def indexer_launch(t: Target, batch: int, steps: int, heads: int, entries: int, block: int) -> IndexerLaunch:
    """GPUs: tiles of 64 entries, enough ranges for two programs an SM, 8 warps once the query rows (T * H, padded)
    pass 64; top-k over 4096 scores at a time with 8 warps. cpu (Triton's interpreter, tests only): one range a
    sequence, big tiles (it pays per operation, not per element), fp32 products."""
    decode = "registers"
    chunk = min(4096, _fit(entries))
    if not t.is_gpu:
        block_e = min(256, _fit(entries))
        tiles = -(-max(entries, 1) // block_e)
        return IndexerLaunch(block_e=block_e, entries_per_split=tiles * block_e, splits=1, decode=decode,
                             product="ieee", scores_warps=4, chunk=chunk, topk_warps=4)
    block_e = 64
    tiles = -(-max(entries, 1) // block_e)
    per_split = -(-tiles // max(1, min(tiles, (2 * t.sm_count) // batch))) * block_e
    rows = next_power_of_2(steps) * _fit(heads)  # the kernel's BLOCK_T * BLOCK_H
    return IndexerLaunch(block_e=block_e, entries_per_split=per_split, splits=-(-max(entries, 1) // per_split),
                         decode=decode, product="bf16", scores_warps=4 if rows <= 64 else 8, chunk=chunk,
                         topk_warps=8)
