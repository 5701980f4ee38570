"""The Lightning Indexer's exact top-k in Triton: the second launch of codegen/kernels/lightning_indexer.py.

`select_topk(scores [..., E], k, launch)`: of each row, the first k entries by (score descending, entry ascending),
written in ascending entry order, valid where the score is above -inf: masked entries (-inf) come last, lowest
entry first, only where fewer than k scores are finite. A radix select: the scores map to int32 keys whose signed
order is the scores' order (-0.0 counted as +0.0); four passes, one 8-bit digit each (most significant first), find
the digit of the k-th largest key T among the keys that match the digits found so far, and so `ties`, how many keys
equal to T are taken; a write pass takes every key above T and the `ties` lowest-index keys equal to it. The result
is a function of the row's values alone (integer counts, no float sums, no dependence on which program or atomic
came first), so it is the same whatever the launch, the batch or the tokens in the step (runtime/batch_invariant.py).

Two launches of that one algorithm; codegen/kernels/lightning_indexer_launch.py picks one per shape:
- one program a row (`_topk_kernel`, grid (rows,)): the four passes and the write, each a loop over the whole row
  in chunks. Many rows (batch 32 and up) keep the GPU busy this way, in one launch.
- several programs a row (grid (rows, spans), a program a span of whole chunks), for a few long rows: at batch 1
  and 64K-1M context (16K-256K entries) one program would read its row five times on one SM while the rest idle.
  `_radix_pass_kernel` runs once a digit: each program re-derives the digits found so far from the row's summed
  histograms of the earlier passes (`hist`, [rows, 4, 256], zeroed by the host), histograms the digit of its span's
  matching keys and adds them into the row's histogram of this digit with atomics (integer sums: exact in any order).
  The last digit's pass also stores, per span, how many of its keys lie at or above each of that digit's 257 bin
  boundaries (`bounds`). `_topk_write_kernel` then derives T and `ties` from the four histograms and, from the
  `bounds` of the spans before its own at T's bin, how many keys above T and equal to T precede its span: it writes
  from that slot on and takes ties while the running count of equal keys stays within `ties`, so the spans together
  write exactly the ids, in the same slots, that one program writes. A CUDA graph holds it as six nodes: the
  histograms' memset and five launches, each reading the row once over all its spans; the host reads nothing back.
Not chosen: fusing the first histogram into the scores kernel (one launch fewer, but each scores program would
build a histogram per token row and the histogram would have to be zeroed before the scores: left for when the
launches are measured); a top-k per scores split merged afterwards (splits * k candidates: 32K at 64 splits for
k = 512, more than the 16K entries of a 64K context, and the merge is a top-k of its own).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.lightning_indexer_launch import IndexerLaunch, next_power_of_2
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options

DIGITS = tl.constexpr(4)  # 8-bit digits of a 32-bit key
BINS = tl.constexpr(256)  # one histogram bin a digit value, the largest digit first
BOUNDS = tl.constexpr(257)  # a span's counts of keys at or above each of the last digit's bin boundaries


@triton.jit
def _ordered(score):
    """int32 whose signed order is the scores' order (-0.0 counted as +0.0)."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _digit(key, SHIFT: tl.constexpr):
    """The 8-bit digit at SHIFT of the key read as unsigned (its sign bit flipped)."""
    if SHIFT == 24:
        return ((key >> 24) & 255) ^ 128
    return (key >> SHIFT) & 255


@triton.jit
def _with_digit(prefix, chosen, SHIFT: tl.constexpr):
    """The prefix with the digit of histogram bin `chosen` (largest digit first) at SHIFT."""
    digit = 255 - chosen
    if SHIFT == 24:
        digit = digit ^ 128
    return prefix | (digit << SHIFT)


@triton.jit
def _pick(hist, remaining):
    """(bin, above): the bin of the remaining-th largest key of a histogram (largest digit first) and how many keys
    lie in the bins before it."""
    bins = tl.arange(0, BINS)
    chosen = tl.min(tl.where(tl.cumsum(hist, 0) >= remaining, bins, BINS))
    return chosen, tl.sum(tl.where(bins < chosen, hist, 0))


@triton.jit
def _span_histogram(row_ptr, first, last, prefix, SHIFT: tl.constexpr, CHUNK: tl.constexpr,
                    COUNT_ABOVE: tl.constexpr):
    """Over entries [first, last) of a row: the histogram of the digit at SHIFT among the keys whose digits above
    SHIFT are the prefix's and, with COUNT_ABOVE (SHIFT < 24), how many keys there have larger digits above SHIFT."""
    hist = tl.zeros([BINS], tl.int32)
    above = 0
    for base in range(first, last, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        inside = offs < last
        key = _ordered(tl.load(row_ptr + offs, mask=inside, other=float("-inf")))
        match = inside
        if SHIFT < 24:
            match = match & ((key >> (SHIFT + 8)) == (prefix >> (SHIFT + 8)))
        if COUNT_ABOVE:
            above += tl.sum((inside & ((key >> (SHIFT + 8)) > (prefix >> (SHIFT + 8)))).to(tl.int32))
        hist += tl.histogram(255 - _digit(key, SHIFT), BINS, mask=match)
    return hist, above


@triton.jit
def _write_span(row_ptr, ids_ptr, valid_ptr, first, last, threshold, ties, taken, tied, CHUNK: tl.constexpr):
    """From slot `taken` on, in ascending entry order: the entries of [first, last) whose key is above the
    threshold, and those equal to it while at most `ties` equal keys (`tied` of them before `first`) are taken."""
    for base in range(first, last, CHUNK):
        offs = base + tl.arange(0, CHUNK)
        inside = offs < last
        score = tl.load(row_ptr + offs, mask=inside, other=float("-inf"))
        key = _ordered(score)
        equal = (inside & (key == threshold)).to(tl.int32)
        take = ((inside & (key > threshold)) | ((equal != 0) & (tied + tl.cumsum(equal, 0) <= ties))).to(tl.int32)
        slot = taken + tl.cumsum(take, 0) - 1
        tl.store(ids_ptr + slot, offs.to(tl.int64), mask=take != 0)
        tl.store(valid_ptr + slot, (score > float("-inf")).to(tl.uint8), mask=take != 0)
        taken += tl.sum(take)
        tied += tl.sum(equal)


@triton.jit
def _topk_kernel(scores_ptr, ids_ptr, valid_ptr, E, K, CHUNK: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + row * E
    threshold, ties = 0, K
    for d in tl.static_range(DIGITS):
        hist, _ = _span_histogram(row_ptr, 0, E, threshold, 24 - 8 * d, CHUNK, False)
        chosen, above = _pick(hist, ties)
        threshold = _with_digit(threshold, chosen, 24 - 8 * d)
        ties -= above
    none = tl.full([], 0, tl.int32)  # nothing taken before the row's first entry
    _write_span(row_ptr, ids_ptr + row * K, valid_ptr + row * K, 0, E, threshold, ties, none, none, CHUNK)


@triton.jit
def _found_digits(hist_ptr, K, DONE: tl.constexpr):
    """(prefix, remaining, chosen) after a row's first DONE digits, from its summed histograms of those passes: the
    key prefix, how many keys matching it are still to take, and the last digit's histogram bin."""
    prefix, remaining, chosen = 0, K, 0
    for d in tl.static_range(DONE):
        chosen, above = _pick(tl.load(hist_ptr + d * BINS + tl.arange(0, BINS)), remaining)
        prefix = _with_digit(prefix, chosen, 24 - 8 * d)
        remaining -= above
    return prefix, remaining, chosen


@triton.jit
def _radix_pass_kernel(scores_ptr, hist_ptr, bounds_ptr, E, K, span_entries, SHIFT: tl.constexpr,
                       CHUNK: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    row, span = tl.program_id(0).to(tl.int64), tl.program_id(1)
    first = span * span_entries
    row_hist = hist_ptr + row * (DIGITS * BINS)
    prefix, _, _ = _found_digits(row_hist, K, (24 - SHIFT) // 8)
    hist, above = _span_histogram(scores_ptr + row * E, first, tl.minimum(first + span_entries, E), prefix, SHIFT,
                                  CHUNK, SHIFT == 0)
    bins = tl.arange(0, BINS)
    tl.atomic_add(row_hist + (24 - SHIFT) // 8 * BINS + bins, hist, mask=hist != 0, sem="relaxed")
    if SHIFT == 0:
        counts = bounds_ptr + (row * tl.num_programs(1) + span) * BOUNDS
        tl.store(counts, above)
        tl.store(counts + 1 + bins, above + tl.cumsum(hist, 0))


@triton.jit
def _topk_write_kernel(scores_ptr, hist_ptr, bounds_ptr, ids_ptr, valid_ptr, E, K, span_entries,
                       SPANS: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    after_predecessor(PDL)
    row, span = tl.program_id(0).to(tl.int64), tl.program_id(1)
    threshold, ties, chosen = _found_digits(hist_ptr + row * (DIGITS * BINS), K, DIGITS)
    earlier = tl.arange(0, SPANS)
    counts = bounds_ptr + (row * tl.num_programs(1) + earlier) * BOUNDS + chosen
    above = tl.sum(tl.load(counts, mask=earlier < span, other=0))  # keys above T in the spans before this one
    equal = tl.sum(tl.load(counts + 1, mask=earlier < span, other=0)) - above  # and equal to T
    first = span * span_entries
    _write_span(scores_ptr + row * E, ids_ptr + row * K, valid_ptr + row * K, first,
                tl.minimum(first + span_entries, E), threshold, ties, above + tl.minimum(equal, ties), equal, CHUNK)


def _select_in_spans(rows: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, k: int,
                     launch: IndexerLaunch) -> None:
    """The multi-program select of rows [n, E] into ids and valid (uint8) [n, k] (module docstring)."""
    n, entries = rows.shape
    spans, pdl = launch.topk_spans, rows.is_cuda
    if spans * launch.topk_span < entries:
        raise ValueError(f"select_topk: {spans} spans of {launch.topk_span} entries do not cover {entries}")
    hist = torch.zeros((n, DIGITS.value, BINS.value), dtype=torch.int32, device=rows.device)
    bounds = torch.empty((n, spans, BOUNDS.value), dtype=torch.int32, device=rows.device)
    for shift in (24, 16, 8, 0):
        _radix_pass_kernel[(n, spans)](rows, hist, bounds, entries, k, launch.topk_span, SHIFT=shift,
                                       CHUNK=launch.chunk, PDL=pdl, num_warps=launch.topk_warps,
                                       **launch_options(pdl))
    _topk_write_kernel[(n, spans)](rows, hist, bounds, ids, valid, entries, k, launch.topk_span,
                                   SPANS=next_power_of_2(spans), CHUNK=launch.chunk, PDL=pdl,
                                   num_warps=launch.topk_warps, **launch_options(pdl))


def select_topk(scores: torch.Tensor, k: int, launch: IndexerLaunch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64, valid bool) `[..., k]` of fp32 scores `[..., E]` (k <= E): the first k entries by (score
    descending, entry ascending), listed in ascending entry order; valid where the score is above -inf. One program
    a row where `launch.topk_spans` is 1, else `topk_spans` programs a row."""
    rows = scores.flatten(0, -2).contiguous()
    ids = torch.empty((rows.shape[0], k), dtype=torch.int64, device=scores.device)
    valid = torch.empty((rows.shape[0], k), dtype=torch.bool, device=scores.device)
    if k and rows.shape[0] and launch.topk_spans > 1:
        _select_in_spans(rows, ids, valid.view(torch.uint8), k, launch)
    elif k and rows.shape[0]:
        _topk_kernel[(rows.shape[0],)](rows, ids, valid.view(torch.uint8), rows.shape[1], k, CHUNK=launch.chunk,
                                       PDL=rows.is_cuda, num_warps=launch.topk_warps, **launch_options(rows.is_cuda))
    return ids.view(*scores.shape[:-1], k), valid.view(*scores.shape[:-1], k)
