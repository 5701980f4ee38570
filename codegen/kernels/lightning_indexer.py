"""The Lightning Indexer over packed FP4 keys in Triton; the PyTorch twin is codegen/lightning_indexer.py.

Two launches, nothing read back by the host (so a call can be captured in a CUDA graph), their tile sizes and
grids chosen by codegen/kernels/lightning_indexer_launch.py:
(1) `_scores_kernel`, grid (B, splits, token blocks): each sequence's entries are cut into `splits` ranges so
    that one long sequence still fills the GPU, its T tokens into blocks of `block_t` (all of a decode or MTP
    step's; a prefill chunk's in several). Per tile of `block_e` entries a program reads the packed rows once (64
    code bytes and 4 e8m0 scales a 128-dim key) and multiplies them with the query rows of its tokens at once,
    their H heads stacked as the dot's M side (a row's product depends on that row and the keys only): logits
    [block_t * H, block_e], then relu, times head_w, summed over heads, -inf where the entry is not visible
    yet: scores [B, T, E] in fp32. The keys are decoded in registers (decode "registers": codes and scales to fp32
    values by integer arithmetic, any scale block) or by `tl.dot_scaled` (decode "mxfp": bf16 queries times MXFP4
    keys, Triton's own e2m1 upcast). Every product is exact: queries and decoded keys are bf16 values (the op's
    contract), so only the fp32 summation order differs from the reference. (Scale byte 0 decodes to 0 in
    registers, not 2^-127: kv_pack never writes it, and the pool's unwritten rows, which hold it, have zero codes.)
(2) `select_topk` (codegen/kernels/lightning_indexer_topk.py): an exact radix select per query row, in one
    program a row or, for a few long rows, in several programs a row: the first k entries ordered by (score
    descending, entry ascending), masked entries (-inf, valid False) last, written in ascending entry order: the
    reference's set wherever its k-th and k+1-th scores differ by more than the summation order's rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.lightning_indexer_launch import MIN_DOT, MXFP_BLOCK, IndexerLaunch, indexer_launch
from dsv4c.codegen.kernels.lightning_indexer_topk import select_topk
from dsv4c.codegen.kernels.number_formats import e2m1_value, pow2
from dsv4c.codegen.kernels.pdl import after_predecessor, launch_options
from dsv4c.codegen.targets import target_for_device


# ---- scores ---------------------------------------------------------------------------------------------
@triton.jit
def _decoded_keys(cache_ptr, row, ok, D: tl.constexpr, QBLOCK: tl.constexpr):
    """Keys [n, D] in fp32 of the packed rows at byte offsets `row` (zeros where not `ok`): byte j holds dims 2j
    (low nibble) and 2j + 1; the e8m0 scale of dim i is byte D / 2 + i / QBLOCK."""
    pairs = tl.arange(0, D // 2)
    packed = tl.load(cache_ptr + row[:, None] + pairs[None, :], mask=ok[:, None], other=0).to(tl.int32)
    sbyte = tl.load(cache_ptr + row[:, None] + D // 2 + (2 * pairs[None, :]) // QBLOCK, mask=ok[:, None],
                    other=127).to(tl.int32)
    scale = pow2(sbyte - 127)
    return tl.interleave(e2m1_value(packed & 15) * scale, e2m1_value(packed >> 4) * scale)


@triton.jit
def _logits(q, cache_ptr, row, ok, D: tl.constexpr, QBLOCK: tl.constexpr, DECODE: tl.constexpr,
            PRODUCT: tl.constexpr):
    """q [M, D] (bf16, or fp32 for "ieee") times the keys of the packed rows at `row`: [M, n] fp32."""
    # if / else, no early return: Triton 3.6 also type-checks the code after a constexpr branch that returned
    if DECODE == "mxfp":
        codes = tl.load(cache_ptr + row[:, None] + tl.arange(0, D // 2)[None, :], mask=ok[:, None], other=0)
        scales = tl.load(cache_ptr + row[:, None] + D // 2 + tl.arange(0, D // QBLOCK)[None, :], mask=ok[:, None],
                         other=127)
        logits = tl.dot_scaled(q, None, "bf16", tl.trans(codes), scales, "e2m1")
    elif PRODUCT == "bf16":
        logits = tl.dot(q, tl.trans(_decoded_keys(cache_ptr, row, ok, D, QBLOCK).to(tl.bfloat16)))
    else:
        logits = tl.dot(q, tl.trans(_decoded_keys(cache_ptr, row, ok, D, QBLOCK)), input_precision="ieee")
    return logits


@triton.jit
def _scores_kernel(q_ptr, w_ptr, cache_ptr, start_ptr, scores_ptr, T, H, E, entries_per_split,
                   sq_b, sq_t, sq_h, sw_b, sw_t, sc_b, sc_e,
                   RATIO: tl.constexpr, D: tl.constexpr, QBLOCK: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, DECODE: tl.constexpr, PRODUCT: tl.constexpr,
                   PDL: tl.constexpr):
    after_predecessor(PDL)
    b, split = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64: b times the cache stride passes 2^31
    first_t = tl.program_id(2) * BLOCK_T
    rows = tl.arange(0, BLOCK_T * BLOCK_H)  # query row r: token first_t + r // BLOCK_H, head r % BLOCK_H
    t, h = first_t + rows // BLOCK_H, rows % BLOCK_H
    row_ok = (t < T) & (h < H)
    q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + tl.arange(0, D)[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    if DECODE == "mxfp" or PRODUCT == "bf16":
        q = q.to(tl.bfloat16)  # exact: the op's queries are bf16 values
    w = tl.load(w_ptr + b * sw_b + t * sw_t + h, mask=row_ok, other=0.0)
    tokens = first_t + tl.arange(0, BLOCK_T)
    visible = (tl.load(start_ptr + b) + tokens + 1) // RATIO  # entries complete for each token
    out = scores_ptr + (b * T + tokens[:, None]).to(tl.int64) * E
    first = split * entries_per_split
    last = tl.minimum(first + entries_per_split, E)
    for base in range(first, last, BLOCK_E):
        e = base + tl.arange(0, BLOCK_E)
        ok = e < last
        logits = _logits(q, cache_ptr, b * sc_b + e.to(tl.int64) * sc_e, ok, D, QBLOCK, DECODE, PRODUCT)
        weighted = tl.reshape(tl.maximum(logits, 0.0) * w[:, None], [BLOCK_T, BLOCK_H, BLOCK_E])
        score = tl.where(e[None, :] < visible[:, None], tl.sum(weighted, axis=1), float("-inf"))
        tl.store(out + e[None, :], score, mask=(tokens[:, None] < T) & ok[None, :])


# ---- host wrappers --------------------------------------------------------------------------------------
def indexer_scores(q: torch.Tensor, head_w: torch.Tensor, cache: torch.Tensor, start: torch.Tensor, ratio: int,
                   block: int, launch: IndexerLaunch) -> torch.Tensor:
    """fp32 [B, T, E]: codegen/lightning_indexer.py's `scores` (up to fp32 summation order)."""
    if launch.decode == "mxfp" and block != MXFP_BLOCK:
        raise ValueError(f"lightning_indexer kernel: decode 'mxfp' reads scale blocks of {MXFP_BLOCK}, got {block}")
    batch, steps, heads, dim = q.shape
    q, head_w, cache = q.contiguous(), head_w.float().contiguous(), cache.contiguous()
    out = torch.empty((batch, steps, cache.shape[1]), dtype=torch.float32, device=q.device)
    _scores_kernel[(batch, launch.splits, triton.cdiv(steps, launch.block_t))](
        q, head_w, cache, start.contiguous(), out, steps, heads, cache.shape[1], launch.entries_per_split,
        q.stride(0), q.stride(1), q.stride(2), head_w.stride(0), head_w.stride(1), cache.stride(0), cache.stride(1),
        RATIO=ratio, D=dim, QBLOCK=block, BLOCK_T=launch.block_t,
        BLOCK_H=max(MIN_DOT, triton.next_power_of_2(heads)), BLOCK_E=launch.block_e, DECODE=launch.decode,
        PRODUCT=launch.product, PDL=q.is_cuda, num_warps=launch.scores_warps, **launch_options(q.is_cuda))
    return out


def lightning_indexer(q: torch.Tensor, head_w: torch.Tensor, cache: torch.Tensor, start: torch.Tensor, ratio: int,
                      topk: int, block: int, launch: IndexerLaunch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """codegen/lightning_indexer.py's op on packed rows: (ids, valid), ids in ascending entry order."""
    batch, steps, heads, _ = q.shape
    entries = cache.shape[1]
    if launch is None:
        launch = indexer_launch(target_for_device(q.device), batch, steps, heads, entries, block)
    k = min(topk, entries)
    if k == 0:  # an empty cache, or topk 0: nothing to score
        return select_topk(torch.empty((batch, steps, 0), dtype=torch.float32, device=q.device), 0, launch)
    return select_topk(indexer_scores(q, head_w, cache, start, ratio, block, launch), k, launch)
