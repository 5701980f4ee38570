"""Launch choices of the Lightning Indexer kernels (codegen/kernels/lightning_indexer.py), per target and shape.

Pure Python (no Triton import): `indexer_launch` picks a frozen `IndexerLaunch` from the target table
(codegen/targets.py) and the call's sizes. The top-k runs one program a query row (`topk_spans` 1) for many rows
(batch 64 and up) or short rows; fewer long rows (batch 1-32 at long context) spread each row over `topk_spans`
programs (`with_parallel_topk`). Either choice selects the same entries (codegen/kernels/lightning_indexer_topk.py): the
launch may follow the batch, the result cannot. bench/indexer_bench.py times both (`1-prog`, `spans`) to set the
thresholds below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dsv4c.codegen.targets import Target

DECODES = ("mxfp", "registers")
PRODUCTS = ("bf16", "ieee")
MXFP_BLOCK = 32  # the scale block `tl.dot_scaled` reads (the OCP MX format's)
MIN_DOT = 16  # tl.dot's smallest side
ONE_PROGRAM_ROWS = 64  # from this many query rows on one program a row: one launch, many SMs (fewer long rows
# go faster over spans: BENCHMARKS.md, the indexer at batch 32)
ONE_PROGRAM_ENTRIES = 8192  # up to two chunks a row: ten chunk passes in one launch against six dependent launches
SPAN_ENTRIES = 1024  # the fewest entries a parallel top-k program covers (fewer histogram atomics a row)
CHUNK_ENTRIES = 4096  # scores a top-k program reads at a time, at most
MAX_QUERY_ROWS = 256  # query rows (tokens x padded heads) a GPU scores program multiplies at once: 64 KB of bf16
# queries at 128 dims, beside the pipelined keys and the logits, within an H100 block's shared memory (a
# prefill chunk of 32 tokens at 64 heads, 2048 rows, would ask for 544 KB)


@dataclass(frozen=True)
class IndexerLaunch:
    """block_t: tokens a scores program multiplies (their heads stacked: the dot's M side); a sequence's tokens
    are cut into blocks of block_t;
    block_e: entries a scores tile multiplies (the dot's N side);
    entries_per_split / splits: the entry range one scores program covers (whole tiles) and how many a sequence;
    decode: "registers" (codes and scales decoded by integer arithmetic, any scale block) or "mxfp"
    (`tl.dot_scaled` of bf16 queries and MXFP4 keys: Triton's own e2m1 upcast; scale blocks of 32 only; opt-in
    until measured on the GPU image's Triton, bench/indexer_bench.py times both);
    product: how "registers" multiplies: "bf16" tensor-core dots (exact: bf16 values), "ieee" fp32 dots (the CPU
    interpreter, whose bf16 arithmetic is wrong);
    scores_warps / topk_warps: Triton's num_warps of each kernel; chunk: scores a top-k program reads at a time;
    topk_spans / topk_span: how many programs select a row's top-k and the entries each covers (whole chunks):
    1 runs the one-program radix select, more the multi-program one (four histogram launches and a write)."""

    block_t: int
    block_e: int
    entries_per_split: int
    splits: int
    decode: str
    product: str
    scores_warps: int
    chunk: int
    topk_warps: int
    topk_spans: int
    topk_span: int

    def __post_init__(self) -> None:
        pow2 = all(v >= MIN_DOT and v & (v - 1) == 0 for v in (self.block_e, self.chunk)) \
            and self.block_t >= 1 and self.block_t & (self.block_t - 1) == 0
        if not pow2 or self.decode not in DECODES or self.product not in PRODUCTS or self.splits < 1 \
                or self.entries_per_split < self.block_e or self.entries_per_split % self.block_e \
                or self.topk_spans < 1 or self.topk_span < self.chunk or self.topk_span % self.chunk:
            raise ValueError(f"{self}: block_t a power of two, block_e and chunk powers of two >= {MIN_DOT}, whole "
                             f"tiles a split, whole chunks a top-k span, decode in {DECODES}, product in {PRODUCTS}")


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (max(n, 1) - 1).bit_length()


def _fit(n: int) -> int:
    """The smallest power of two >= max(n, MIN_DOT): a dot side or a block of n elements."""
    return max(MIN_DOT, next_power_of_2(n))


def with_one_program_topk(launch: IndexerLaunch, entries: int) -> IndexerLaunch:
    """`launch` with the one-program top-k: a program a row, reading it in chunks of up to CHUNK_ENTRIES."""
    chunk = min(CHUNK_ENTRIES, _fit(entries))
    return replace(launch, chunk=chunk, topk_spans=1, topk_span=chunk * -(-max(entries, 1) // chunk))


def with_parallel_topk(launch: IndexerLaunch, t: Target, rows: int, entries: int) -> IndexerLaunch:
    """`launch` with the multi-program top-k: each of `rows` rows cut into spans of whole chunks, about two
    programs an SM over all rows, none on fewer than SPAN_ENTRIES entries (at least one a row)."""
    spans = max(1, min((2 * t.sm_count) // max(rows, 1), -(-entries // SPAN_ENTRIES)))
    per_span = -(-max(entries, 1) // spans)
    chunk = min(CHUNK_ENTRIES, _fit(per_span))
    span = chunk * -(-per_span // chunk)
    return replace(launch, chunk=chunk, topk_spans=-(-max(entries, 1) // span), topk_span=span)


def indexer_launch(t: Target, batch: int, steps: int, heads: int, entries: int, block: int) -> IndexerLaunch:
    """GPUs: the T tokens in blocks of up to MAX_QUERY_ROWS query rows (block_t tokens of H heads, padded), tiles
    of 64 entries, enough entry ranges for two programs an SM over all (sequence, token block) pairs, 8 warps once
    a block's rows pass 64; top-k with 8 warps, one program a row below ONE_PROGRAM_ENTRIES entries or from
    ONE_PROGRAM_ROWS rows on, else spread over programs (`with_parallel_topk`). cpu (Triton's interpreter, tests
    only): one range a sequence, big tiles (it pays per operation, not per element), fp32 products, one top-k
    program a row."""
    decode = "registers"
    if not t.is_gpu:
        block_e = min(256, _fit(entries))
        tiles = -(-max(entries, 1) // block_e)
        launch = IndexerLaunch(block_t=next_power_of_2(steps), block_e=block_e, entries_per_split=tiles * block_e,
                               splits=1, decode=decode,
                               product="ieee", scores_warps=4, chunk=MIN_DOT, topk_warps=4, topk_spans=1,
                               topk_span=MIN_DOT)
        return with_one_program_topk(launch, entries)
    block_e = 64
    tiles = -(-max(entries, 1) // block_e)
    block_t = min(next_power_of_2(steps), max(1, MAX_QUERY_ROWS // _fit(heads)))
    sequences = batch * -(-steps // block_t)  # (sequence, token block) pairs, each split over the entries
    per_split = -(-tiles // max(1, min(tiles, (2 * t.sm_count) // sequences))) * block_e
    rows = block_t * _fit(heads)  # the kernel's BLOCK_T * BLOCK_H
    launch = IndexerLaunch(block_t=block_t, block_e=block_e, entries_per_split=per_split,
                           splits=-(-max(entries, 1) // per_split), decode=decode, product="bf16",
                           scores_warps=4 if rows <= 64 else 8, chunk=MIN_DOT, topk_warps=8, topk_spans=1,
                           topk_span=MIN_DOT)
    if batch * steps >= ONE_PROGRAM_ROWS or entries <= ONE_PROGRAM_ENTRIES:
        return with_one_program_topk(launch, entries)
    return with_parallel_topk(launch, t, batch * steps, entries)
