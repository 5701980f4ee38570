"""Fused mHC layer boundaries in Triton: kernels, host wrappers, launch heuristics per target.

The PyTorch twin of every wrapper is codegen/mhc_reference.py (same signature, same math, fp32 inside);
tests/test_mhc_kernels.py checks each against it. Two launches per boundary (plain hc_post: (a) alone):

(a) `_mix_partials_kernel`, grid (token blocks, split_k): split-K over the hidden dimension. Each program
    takes `block_t` tokens and `chunks` chunks of `block_d` columns of all n streams, and writes the partial
    `x @ fn.T` and `sum(x^2)` of its slice. With `POST` it first builds its slice of the new streams
    `post[k] * out + sum_j comb[j,k] * streams[j]` (hc_post fused with the next hc_pre's partials) and
    writes them, unless the collapse does (`MhcLaunch.collapse_stores_new`; with `collapse_sums_squares`
    the collapse takes their sum(x^2) instead of this kernel). The fn matrix, the big read at small batch
    ((2+n)n x nD fp32: 1.5 MiB for Flash), is spread over every SM. On GPUs this kernel is itself launched
    as a programmatic dependent of whatever kernel precedes it (`split_k_pdl`): it starts while that kernel
    finishes, loads its fn tile (a weight) and waits before reading anything a kernel writes. It releases
    the collapse only after that wait, since the collapse reads hc_post's inputs before its own wait.
(b) `_collapse_kernel`, two programs per token block (one token on GPUs): each sums the splits and applies
    the RMS scale; one takes sigmoid, the weighted collapse `sum_j pre[j] * x[j]` over D (rounded to the
    activation dtype, as the model does) and the RMSNorm that follows it, the other, at the same time,
    2*sigmoid and the Sinkhorn iterations on the n x n matrix (for n = 4 entry by entry, in each thread's
    registers). After hc_post the collapse recomputes the new streams from the same inputs as (a) (the
    same function and rounding dtype, so the same values; the wrappers refuse an `out` that aliases an
    input or has another dtype) instead of reading (a)'s output, and may write them itself (with
    `collapse_sums_squares` the post / Sinkhorn program rebuilds them too, for their sum of squares, and
    each program writes half): on GPUs it is launched as (a)'s programmatic dependent (PDL), so it starts
    while (a) runs, loads (and writes) everything but what needs the partials, then waits, and then loads
    all the partials it needs at once (each load written after a sum would wait for the sum's barrier).
hc_head uses the same two kernels with the n head rows of fn and no post/comb: one collapse program a token
block.

bf16 is converted to fp32 right after each load (and the math stays fp32): Triton's CPU interpreter gets
bf16 arithmetic wrong, and the model's math is fp32 anyway. `x @ fn.T` is fp32-accurate: FMA ("ieee") or
tensor-core products ("tf32x3": three tf32 products, or, where the tile holds bf16 values exactly, three
exact bf16 products against fn split into three bf16 parts, `_accumulate`); one plain tf32 product would
move the mixes by ~1e-3 relative, more than the fp32 tolerance against the reference. Triton's interpreter
(tests) runs neither inline PTX nor bf16 dots correctly, so the wrappers never ask it for either
(`_on_gpu`); the GPU paths are checked against the reference by
bench/mhc_bench.py on the GPU.

Host wrappers describe each launch (`mix_partials_launch`, `collapse_launch`) and hand it to a launcher
(codegen/kernels/launcher.py): Triton's JIT by default, the artifact's ahead-of-time binaries in the runtime,
a recorder for ahead-of-time builds (`op_specs`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv4c.codegen.targets import Target, target_for_device
from dsv4c.codegen.kernels.launcher import JIT, KernelSpec, KernelLaunch, SpecRecorder

MIN_DOT = 16  # tl.dot's smallest block side


# ---- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to DTYPE and back, to nearest even. bf16 is rounded by hand: Triton's CPU interpreter
    truncates fp32 -> bf16, and with this the later `.to(bf16)` is exact everywhere (a few integer ops)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _opaque(x, OPAQUE: tl.constexpr):
    """x (fp32), unchanged. OPAQUE (GPUs): through an inline-PTX move, which Triton's layout passes treat as a
    boundary: a layout conversion that a value needs is then placed after the move, not after the load that
    produced the value (the interpreter runs no inline PTX)."""
    if OPAQUE:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x.to(tl.int32, bitcast=True)], dtype=tl.int32,
                                         is_pure=False, pack=1).to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _new_streams(out_ptr, s_ptr, post_ptr, comb_ptr, t, k, d, td_mask, tk_mask, HC: tl.constexpr, D: tl.constexpr,
                 DTYPE: tl.constexpr, OPAQUE: tl.constexpr):
    """hc_post at (token t, stream k, column d), rounded to DTYPE: post[k] * out + sum_i comb[i, k] *
    streams[i], fp32 inside. t, k, d: broadcastable index tensors (k may be a constant); td_mask / tk_mask:
    the masks of the out and streams loads (t and d's shape) and of the post and comb loads (t and k's): the
    [tokens, n, columns] tile is built from [tokens, 1, columns] and [tokens, n, 1] loads. The split-K kernel
    (a chunk's columns) and the collapse (all of D) both call this one function, so the collapse's rebuilt
    streams equal the split-K kernel's bit for bit: the sums are explicit FMAs, since the compiler's own
    contraction of multiply-adds differs between kernels and layouts (it changed the last bit of a few
    values; bench/mhc_bench.py checks the two kernels' streams on the GPU).
    For n = 4 (DeepSeek-V4) all ten loads are issued before any of the sums (only their bf16 -> fp32
    conversions sit between them), and with OPAQUE every loaded value then passes through `_opaque`.
    Triton gives each load its own coalesced layout and converts it to the tile's through shared memory,
    behind a barrier; placed right after its load, each conversion would hold back the loads after it (ten
    memory round trips, one after another, in the split-K kernel). After the opaque moves, every conversion
    comes after every load. Other n: the same sums, loaded as they are summed."""
    if HC == 4:
        c0 = tl.load(comb_ptr + t * (HC * HC) + k, mask=tk_mask, other=0.0)
        c1 = tl.load(comb_ptr + t * (HC * HC) + HC + k, mask=tk_mask, other=0.0)
        c2 = tl.load(comb_ptr + t * (HC * HC) + 2 * HC + k, mask=tk_mask, other=0.0)
        c3 = tl.load(comb_ptr + t * (HC * HC) + 3 * HC + k, mask=tk_mask, other=0.0)
        post = tl.load(post_ptr + t * HC + k, mask=tk_mask, other=0.0)
        s0 = tl.load(s_ptr + t * (HC * D) + d, mask=td_mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptr + t * (HC * D) + D + d, mask=td_mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_ptr + t * (HC * D) + 2 * D + d, mask=td_mask, other=0.0).to(tl.float32)
        s3 = tl.load(s_ptr + t * (HC * D) + 3 * D + d, mask=td_mask, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + t * D + d, mask=td_mask, other=0.0).to(tl.float32)
        mixed = _opaque(c0, OPAQUE) * _opaque(s0, OPAQUE)
        mixed = tl.fma(_opaque(c1, OPAQUE), _opaque(s1, OPAQUE), mixed)
        mixed = tl.fma(_opaque(c2, OPAQUE), _opaque(s2, OPAQUE), mixed)
        mixed = tl.fma(_opaque(c3, OPAQUE), _opaque(s3, OPAQUE), mixed)
        return _round(tl.fma(_opaque(post, OPAQUE), _opaque(out, OPAQUE), mixed), DTYPE)
    else:
        mixed = (tl.load(comb_ptr + t * (HC * HC) + k, mask=tk_mask, other=0.0) *
                 tl.load(s_ptr + t * (HC * D) + d, mask=td_mask, other=0.0).to(tl.float32))
        for i in tl.static_range(1, HC):
            s_i = tl.load(s_ptr + t * (HC * D) + i * D + d, mask=td_mask, other=0.0).to(tl.float32)
            mixed = tl.fma(tl.load(comb_ptr + t * (HC * HC) + i * HC + k, mask=tk_mask, other=0.0), s_i, mixed)
        out = tl.load(out_ptr + t * D + d, mask=td_mask, other=0.0).to(tl.float32)
        return _round(tl.fma(tl.load(post_ptr + t * HC + k, mask=tk_mask, other=0.0), out, mixed), DTYPE)


@triton.jit
def _fn_tile(fn_ptr, j, j_mask, d, m, m_mask, HC: tl.constexpr, D: tl.constexpr):
    """fn[m, k*D + d] for every stream k (j) and column d of one chunk: [HC_PAD, BLOCK_D, M_PAD]."""
    return tl.load(fn_ptr + m[None, None, :] * (HC * D) + j[:, None, None] * D + d[None, :, None],
                   mask=j_mask[:, None, None] & (d < D)[None, :, None] & m_mask[None, None, :], other=0.0)


@triton.jit
def _accumulate(acc, sq, x3, w3, BLOCK_T: tl.constexpr, HC_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                SQ: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, BF16_X: tl.constexpr):
    """acc += x @ fn.T and (SQ) sq += rowsum(x^2) over one chunk of columns of all streams: x3 [BLOCK_T,
    HC_PAD, BLOCK_D] against its `_fn_tile` w3, as one dot of depth HC_PAD*BLOCK_D. DOT=False multiplies by
    broadcasting instead (the interpreter's fp32 tl.dot is a slow numpy loop). tf32x3 with BF16_X (x holds
    bf16 values exactly: bf16 streams, or new streams rounded to bf16): fn is split into three bf16 parts
    (8 + 8 + 8 significant bits, all of fp32's 24) and x is multiplied by each exactly, smallest first, in
    three bf16 tensor-core products (half the instructions of three tf32 ones, and x needs no split)."""
    x2 = tl.reshape(x3, [BLOCK_T, HC_PAD * BLOCK_D])
    w2 = tl.reshape(w3, [HC_PAD * BLOCK_D, w3.shape[2]])
    if SQ:
        sq += tl.sum(tl.sum(x3 * x3, axis=2), axis=1)
    if DOT and PRECISION == "tf32x3" and BF16_X:
        xb = x2.to(tl.bfloat16)
        hi = w2.to(tl.bfloat16)
        rest = w2 - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        acc = tl.dot(xb, (rest - mid.to(tl.float32)).to(tl.bfloat16), acc)
        acc = tl.dot(xb, mid, acc)
        acc = tl.dot(xb, hi, acc)
    elif DOT:
        acc = tl.dot(x2, w2, acc, input_precision=PRECISION)
    else:
        acc += tl.sum(x2[:, :, None] * w2[None, :, :], axis=1)
    return acc, sq


@triton.jit
def _mix_partials_kernel(x_ptr, s_ptr, post_ptr, comb_ptr, new_ptr, fn_ptr, part_ptr, N, M,
                         D: tl.constexpr, HC: tl.constexpr, HC_PAD: tl.constexpr, M_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr,
                         SPLIT: tl.constexpr, POST: tl.constexpr, STORE_NEW: tl.constexpr, MIX: tl.constexpr,
                         SQ: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
                         WAIT: tl.constexpr, BF16_X: tl.constexpr, OPAQUE: tl.constexpr):
    """Partials of one (token block, D slice). Without POST x_ptr is streams [N, HC, D]; with POST it is the
    block output [N, D], and the slice of new streams [N, HC, D] is built from s_ptr/post_ptr/comb_ptr first
    (and written to new_ptr with STORE_NEW; otherwise the collapse writes them). Partials [N, SPLIT, M_PAD]:
    the slice's `x @ fn.T` in columns < M and, with SQ, its sum(x^2) in column M (M_PAD > M). Without SQ
    (POST only) the collapse sums the squares of the new streams it rebuilds, and here they only feed the
    dot (a second consumer makes the compiler build them in two layouts). MIX=False (plain hc_post) skips
    the partials. The fn tile is loaded first, and with POST, OPAQUE and n = 4 every load of the build is in
    flight before the first layout conversion (`_new_streams`). PDL: the collapse launch that follows may start
    (it waits for this grid's completion before reading the partials); with WAIT only once this program
    has waited, since the collapse reads hc_post's inputs before its own wait, and they may come from the
    kernel this one waits for. WAIT: this kernel is itself launched as a programmatic dependent of the
    kernel before it (whatever that is), so it may start while that kernel finishes: it waits for it before
    reading any input; with one chunk it loads its fn tile (a weight, which no kernel writes) before
    waiting. BF16_X: the tile holds bf16 values exactly (bf16 streams, or new streams rounded to bf16; see
    `_accumulate`). OPAQUE (GPUs): see `_opaque`."""
    if PDL and not WAIT:
        tl.extra.cuda.gdc_launch_dependents()
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    j = tl.arange(0, HC_PAD)
    j_mask = j < HC
    m = tl.arange(0, M_PAD)
    m_mask = m < M
    tj_mask = t_mask[:, None] & j_mask[None, :]
    acc = tl.zeros([BLOCK_T, M_PAD], dtype=tl.float32)
    sq = tl.zeros([BLOCK_T], dtype=tl.float32)
    if WAIT and CHUNKS > 1:
        tl.extra.cuda.gdc_wait()
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
    for c in range(CHUNKS):
        d = (pid_s * CHUNKS + c) * BLOCK_D + tl.arange(0, BLOCK_D)
        if MIX:  # first: a load written after the build would wait for the build's layout conversions
            w3 = _fn_tile(fn_ptr, j, j_mask, d, m, m_mask, HC, D)
        if WAIT and CHUNKS == 1:  # one chunk: the loop is straight-line code, and fn was loaded before waiting
            tl.extra.cuda.gdc_wait()
            if PDL:
                tl.extra.cuda.gdc_launch_dependents()
        d_mask = d < D
        td_mask = t_mask[:, None] & d_mask[None, :]
        x_mask = tj_mask[:, :, None] & d_mask[None, None, :]
        offsets = t[:, None, None] * (HC * D) + j[None, :, None] * D + d[None, None, :]
        if POST:
            x3 = _new_streams(x_ptr, s_ptr, post_ptr, comb_ptr, t[:, None, None], j[None, :, None], d[None, None, :],
                              td_mask[:, None, :], tj_mask[:, :, None], HC, D, new_ptr.dtype.element_ty, OPAQUE)
        else:
            x3 = tl.load(x_ptr + offsets, mask=x_mask, other=0.0).to(tl.float32)
        if STORE_NEW:
            tl.store(new_ptr + offsets, x3.to(new_ptr.dtype.element_ty), mask=x_mask)
        if MIX:
            acc, sq = _accumulate(acc, sq, x3, w3, BLOCK_T, HC_PAD, BLOCK_D, SQ, DOT, PRECISION, BF16_X)
    if MIX:
        if SQ:
            acc = tl.where(m[None, :] == M, sq[:, None], acc)
        # every column: the padding too (zeros, never read), so each row is one run of 16-byte stores
        tl.store(part_ptr + (t[:, None] * SPLIT + pid_s) * M_PAD + m[None, :], acc, mask=t_mask[:, None])


@triton.jit
def _sinkhorn(logits, mask, ITERS: tl.constexpr, eps):
    """compiler/layers.sinkhorn on padded [tokens, HC_PAD, HC_PAD] tiles; padded entries stay 0. (Any n;
    the collapse uses `_sinkhorn4` for n = 4.)"""
    x = tl.where(mask, logits, float("-inf"))
    row_max = tl.max(x, axis=2)
    e = tl.where(mask, tl.exp(x - tl.where(row_max == float("-inf"), 0.0, row_max)[:, :, None]), 0.0)
    row_sum = tl.sum(e, axis=2)  # 0 only on padded rows, kept away from 0/0
    c = tl.where(mask, e / tl.where(row_sum == 0.0, 1.0, row_sum)[:, :, None] + eps, 0.0)
    c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    for _ in range(ITERS - 1):
        c = c / (tl.sum(c, axis=2)[:, :, None] + eps)
        c = c / (tl.sum(c, axis=1)[:, None, :] + eps)
    return c


@triton.jit
def _reciprocal(x, FAST: tl.constexpr):
    """1 / x in fp32. FAST (GPUs): one `rcp.approx.ftz.f32` (at most 1 ulp off; Triton's `1.0 / x`, div.full,
    adds range checks and rescaling around it, half the Sinkhorn loop's instructions); Triton's CPU interpreter
    runs no inline PTX, so it divides."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def _softmax4(a, b, c, d, eps, FAST: tl.constexpr):
    """One row of compiler/layers.sinkhorn's start: softmax(a, b, c, d) + eps, elementwise over tokens."""
    top = tl.maximum(tl.maximum(a, b), tl.maximum(c, d))
    a, b, c, d = tl.exp(a - top), tl.exp(b - top), tl.exp(c - top), tl.exp(d - top)
    r = _reciprocal(a + b + c + d, FAST)
    return a * r + eps, b * r + eps, c * r + eps, d * r + eps


@triton.jit
def _normalise4(a, b, c, d, eps, FAST: tl.constexpr):
    """One row or column of a Sinkhorn step: each entry over (the four's sum + eps)."""
    r = _reciprocal(a + b + c + d + eps, FAST)
    return a * r, b * r, c * r, d * r


@triton.jit
def _rows4(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps,
           FAST: tl.constexpr):
    """Every row of the 4 x 4 matrix over (its sum + eps); given (and giving back) the entries in column
    order, every column."""
    c00, c01, c02, c03 = _normalise4(c00, c01, c02, c03, eps, FAST)
    c10, c11, c12, c13 = _normalise4(c10, c11, c12, c13, eps, FAST)
    c20, c21, c22, c23 = _normalise4(c20, c21, c22, c23, eps, FAST)
    c30, c31, c32, c33 = _normalise4(c30, c31, c32, c33, eps, FAST)
    return c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33


@triton.jit
def _sinkhorn4(c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33,
               ITERS: tl.constexpr, eps, FAST: tl.constexpr):
    """compiler/layers.sinkhorn for n = 4, entry by entry: every entry is a [BLOCK_T] tensor (one token a
    lane), so the 2 x ITERS normalisations are elementwise arithmetic in each thread's registers, with no
    reductions across threads (the tile form, `_sinkhorn`, pays a shuffle-and-broadcast for each). A column
    step is `_rows4` of the entries in column order."""
    c00, c01, c02, c03 = _softmax4(c00, c01, c02, c03, eps, FAST)
    c10, c11, c12, c13 = _softmax4(c10, c11, c12, c13, eps, FAST)
    c20, c21, c22, c23 = _softmax4(c20, c21, c22, c23, eps, FAST)
    c30, c31, c32, c33 = _softmax4(c30, c31, c32, c33, eps, FAST)
    c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33 = _rows4(
        c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33, eps, FAST)
    for _ in range(ITERS - 1):
        c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 = _rows4(
            c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33, eps, FAST)
        c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33 = _rows4(
            c00, c10, c20, c30, c01, c11, c21, c31, c02, c12, c22, c32, c03, c13, c23, c33, eps, FAST)
    return c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33


@triton.jit
def _entry(logits, q, k: tl.constexpr):
    """Entry k (row k // n, column k % n) of every token's flattened n x n logits [BLOCK_T, n*n]: [BLOCK_T]."""
    return tl.sum(tl.where(q[None, :] == k, logits, 0.0), axis=1)


@triton.jit
def _store_comb4(comb_ptr, t, t_mask, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32,
                 c33):
    """comb[t] = the 4 x 4 entries, row-major, for every token of the block."""
    row = comb_ptr + t * 16
    tl.store(row + 0, c00, mask=t_mask)
    tl.store(row + 1, c01, mask=t_mask)
    tl.store(row + 2, c02, mask=t_mask)
    tl.store(row + 3, c03, mask=t_mask)
    tl.store(row + 4, c10, mask=t_mask)
    tl.store(row + 5, c11, mask=t_mask)
    tl.store(row + 6, c12, mask=t_mask)
    tl.store(row + 7, c13, mask=t_mask)
    tl.store(row + 8, c20, mask=t_mask)
    tl.store(row + 9, c21, mask=t_mask)
    tl.store(row + 10, c22, mask=t_mask)
    tl.store(row + 11, c23, mask=t_mask)
    tl.store(row + 12, c30, mask=t_mask)
    tl.store(row + 13, c31, mask=t_mask)
    tl.store(row + 14, c32, mask=t_mask)
    tl.store(row + 15, c33, mask=t_mask)


@triton.jit
def _comb_columns(HC: tl.constexpr, HC_PAD: tl.constexpr):
    """(q, q_mask, cidx): comb entry q = (q // HC_PAD, q % HC_PAD) flattened, whether it is a real entry, and
    its column among the mixes."""
    q = tl.arange(0, HC_PAD * HC_PAD)
    return q, (q // HC_PAD < HC) & (q % HC_PAD < HC), 2 * HC + (q // HC_PAD) * HC + q % HC_PAD


@triton.jit
def _comb(logits, comb_ptr, t, t_mask, j, tj_mask, j_mask, ITERS: tl.constexpr, hc_eps, HC: tl.constexpr,
          HC_PAD: tl.constexpr, BLOCK_T: tl.constexpr, FAST: tl.constexpr):
    """comb = Sinkhorn(logits) of every token, stored to comb_ptr [N, n, n]; logits [BLOCK_T, HC_PAD * HC_PAD]
    (comb mixes * rs * scale[2] + base) in `_comb_columns` order."""
    q, _, _ = _comb_columns(HC, HC_PAD)
    if HC == 4:
        c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 = _sinkhorn4(
            _entry(logits, q, 0), _entry(logits, q, 1), _entry(logits, q, 2), _entry(logits, q, 3),
            _entry(logits, q, 4), _entry(logits, q, 5), _entry(logits, q, 6), _entry(logits, q, 7),
            _entry(logits, q, 8), _entry(logits, q, 9), _entry(logits, q, 10), _entry(logits, q, 11),
            _entry(logits, q, 12), _entry(logits, q, 13), _entry(logits, q, 14), _entry(logits, q, 15), ITERS,
            hc_eps, FAST)
        _store_comb4(comb_ptr, t, t_mask, c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31,
                     c32, c33)
    else:
        cmask = tj_mask[:, :, None] & j_mask[None, None, :]
        comb = _sinkhorn(tl.reshape(logits, [BLOCK_T, HC_PAD, HC_PAD]), cmask, ITERS, hc_eps)
        tl.store(comb_ptr + t[:, None, None] * (HC * HC) + j[None, :, None] * HC + j[None, None, :], comb,
                 mask=cmask)


@triton.jit
def _rms_scale(sum_sq, count, eps):
    return 1.0 / tl.sqrt_rn(sum_sq / count + eps)


@triton.jit
def _split_rms_scale(rows, ts_mask, M, count: tl.constexpr, eps):
    """The RMS scale from the split-K partials' sum(x^2) (column M of every split's row), [BLOCK_T]. Called
    after the other partials are loaded: its sum's barrier would hold back any load written after it."""
    return _rms_scale(tl.sum(tl.load(rows + M, mask=ts_mask, other=0.0), axis=1), count, eps)


@triton.jit
def _rebuilt_streams(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, t, j, tj_mask, d, td_mask, store_j,
                     HC: tl.constexpr, D: tl.constexpr, STORE_NEW: tl.constexpr, OPAQUE: tl.constexpr):
    """The collapse's view of hc_post: the new streams of the block's tokens over all of D, [BLOCK_T, HC_PAD,
    BLOCK_D] fp32, rebuilt from hc_post's inputs; with STORE_NEW the streams where store_j [HC_PAD] holds are
    written to new_ptr (before the caller waits for the partials)."""
    x = _new_streams(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, t[:, None, None], j[None, :, None], d[None, None, :],
                     td_mask[:, None, :], tj_mask[:, :, None], HC, D, new_ptr.dtype.element_ty, OPAQUE)
    if STORE_NEW:
        tl.store(new_ptr + t[:, None, None] * (HC * D) + j[None, :, None] * D + d[None, None, :],
                 x.to(new_ptr.dtype.element_ty), mask=td_mask[:, None, :] & store_j[None, :, None])
    return x


@triton.jit
def _own_rms_scale(x, count: tl.constexpr, eps):
    """The RMS scale of each token's rebuilt streams x [BLOCK_T, HC_PAD, BLOCK_D] (padding 0): 1/sqrt(sum(x^2) /
    count + eps)."""
    return _rms_scale(tl.sum(tl.sum(x * x, axis=2), axis=1), count, eps)


@triton.jit
def _collapse(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, rows, ts_mask, base_ptr, scale_ptr, norm_w_ptr,
              normed_ptr, M, t, t_mask, j, j_mask, tj_mask, rms_eps, hc_eps, D: tl.constexpr, HC: tl.constexpr,
              BLOCK_D: tl.constexpr, POST: tl.constexpr, STORE_NEW: tl.constexpr, NEW_SPLIT: tl.constexpr,
              OWN_SQ: tl.constexpr, PDL: tl.constexpr, OPAQUE: tl.constexpr):
    """normed = RMSNorm(sum_j pre[j] x[j]) * w over all of D: the collapse is rounded to the activation dtype
    and its sum of squares taken from the rounded values, as the model does. With POST the new streams are
    rebuilt before the wait; STORE_NEW: streams j < NEW_SPLIT written to new_ptr (the post / Sinkhorn
    program writes the others); OWN_SQ: the mixes' RMS scale taken from them instead of the partials."""
    d = tl.arange(0, BLOCK_D)
    td_mask = t_mask[:, None] & (d < D)[None, :]
    if POST:
        x = _rebuilt_streams(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, t, j, tj_mask, d, td_mask,
                             j < NEW_SPLIT, HC, D, STORE_NEW, OPAQUE)
        if OWN_SQ:
            rs = _own_rms_scale(x, HC * D, rms_eps)
    else:
        x = tl.load(x_ptr + t[:, None, None] * (HC * D) + j[None, :, None] * D + d[None, None, :],
                    mask=td_mask[:, None, :] & j_mask[None, :, None], other=0.0).to(tl.float32)
    w = tl.load(norm_w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    pre_scale, pre_base = tl.load(scale_ptr), tl.load(base_ptr + j, mask=j_mask)
    if PDL:
        tl.extra.cuda.gdc_wait()
    pre_parts = tl.load(rows[:, :, None] + j[None, None, :], mask=ts_mask[:, :, None] & j_mask[None, None, :],
                        other=0.0)
    if not OWN_SQ:
        rs = _split_rms_scale(rows, ts_mask, M, HC * D, rms_eps)
    pre = tl.sigmoid(tl.sum(pre_parts, axis=1) * rs[:, None] * pre_scale + pre_base[None, :])
    pre = tl.where(j_mask[None, :], pre + hc_eps, 0.0)
    a = _round(tl.sum(pre[:, :, None] * x, axis=1), normed_ptr.dtype.element_ty)
    y = _round(a * _rms_scale(tl.sum(a * a, axis=1), D, rms_eps)[:, None] * w[None, :], normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + t[:, None] * D + d[None, :], y.to(normed_ptr.dtype.element_ty), mask=td_mask)


@triton.jit
def _post_and_comb(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, rows, ts_mask, base_ptr, scale_ptr, post_ptr,
                   comb_ptr, M, t, t_mask, j, j_mask, tj_mask, rms_eps, hc_eps, D: tl.constexpr, HC: tl.constexpr,
                   HC_PAD: tl.constexpr, ITERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   STORE_NEW: tl.constexpr, NEW_SPLIT: tl.constexpr, OWN_SQ: tl.constexpr, FAST: tl.constexpr,
                   PDL: tl.constexpr, OPAQUE: tl.constexpr):
    """post = 2 sigmoid(post mixes) and comb = Sinkhorn(comb mixes) of every token of the block. OWN_SQ (with
    hc_post): the RMS scale comes from the new streams, rebuilt here too (before the wait, while the split-K
    kernel runs), and with STORE_NEW streams j >= NEW_SPLIT are written from here."""
    if OWN_SQ:
        d = tl.arange(0, BLOCK_D)
        td_mask = t_mask[:, None] & (d < D)[None, :]
        rs = _own_rms_scale(_rebuilt_streams(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, t, j, tj_mask, d, td_mask,
                                             (j >= NEW_SPLIT) & j_mask, HC, D, STORE_NEW, OPAQUE), HC * D,
                            rms_eps)
    _, q_mask, cidx = _comb_columns(HC, HC_PAD)
    post_scale, comb_scale = tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    post_base = tl.load(base_ptr + HC + j, mask=j_mask)
    comb_base = tl.load(base_ptr + cidx, mask=q_mask)
    if PDL:
        tl.extra.cuda.gdc_wait()
    # every partial is loaded before any is summed: a sum's barrier would hold back the loads after it
    post_parts = tl.load(rows[:, :, None] + HC + j[None, None, :], mask=ts_mask[:, :, None] & j_mask[None, None, :],
                         other=0.0)
    comb_parts = tl.load(rows[:, :, None] + cidx[None, None, :], mask=ts_mask[:, :, None] & q_mask[None, None, :],
                         other=0.0)
    if not OWN_SQ:
        rs = _split_rms_scale(rows, ts_mask, M, HC * D, rms_eps)
    post = 2.0 * tl.sigmoid(tl.sum(post_parts, axis=1) * rs[:, None] * post_scale + post_base[None, :])
    tl.store(post_ptr + t[:, None] * HC + j[None, :], post, mask=tj_mask)
    _comb(tl.sum(comb_parts, axis=1) * rs[:, None] * comb_scale + comb_base[None, :], comb_ptr, t, t_mask, j, tj_mask,
          j_mask, ITERS, hc_eps, HC, HC_PAD, BLOCK_T, FAST)


@triton.jit
def _collapse_kernel(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, part_ptr, base_ptr, scale_ptr, norm_w_ptr,
                     normed_ptr, post_ptr, comb_ptr, N, M, rms_eps, hc_eps, D: tl.constexpr, HC: tl.constexpr,
                     HC_PAD: tl.constexpr, M_PAD: tl.constexpr, SPLIT: tl.constexpr, SPLIT_PAD: tl.constexpr,
                     ITERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEAD: tl.constexpr,
                     POST: tl.constexpr, STORE_NEW: tl.constexpr, NEW_SPLIT: tl.constexpr, OWN_SQ: tl.constexpr,
                     FAST: tl.constexpr, PDL: tl.constexpr, OPAQUE: tl.constexpr):
    """Grid (token blocks, 2; 1 with HEAD). Each program sums the split-K partials of its BLOCK_T tokens
    itself (M: the column of sum(x^2), unless OWN_SQ). Programs (b, 0): the collapse and RMSNorm
    (`_collapse`); programs (b, 1): post and the Sinkhorn comb (`_post_and_comb`), in parallel with the
    collapse. x: the streams [N, n, D] (x_ptr), or with POST the new streams recomputed from the block output
    x_ptr [N, D] and s_ptr / post_in_ptr / comb_in_ptr exactly as the split-K kernel computed them, so
    nothing this kernel reads before its partials comes from that kernel. PDL: launched as the split-K
    kernel's dependent; the streams and weights are loaded (the new streams rebuilt, written, squared)
    before waiting for it, only the partials after. OPAQUE (GPUs; n = 4): the new streams are rebuilt with
    every load ahead of its layout conversion (`_new_streams`)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    j = tl.arange(0, HC_PAD)
    j_mask = j < HC
    tj_mask = t_mask[:, None] & j_mask[None, :]
    s = tl.arange(0, SPLIT_PAD)
    ts_mask = t_mask[:, None] & (s < SPLIT)[None, :]
    rows = part_ptr + (t[:, None] * SPLIT + s[None, :]) * M_PAD  # [BLOCK_T, SPLIT_PAD]
    if tl.program_id(1) == 0:
        _collapse(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, rows, ts_mask, base_ptr, scale_ptr, norm_w_ptr,
                  normed_ptr, M, t, t_mask, j, j_mask, tj_mask, rms_eps, hc_eps, D, HC, BLOCK_D, POST, STORE_NEW,
                  NEW_SPLIT, OWN_SQ, PDL, OPAQUE)
    elif not HEAD:  # hc_head's grid has no second program: nothing of this is compiled for it
        _post_and_comb(x_ptr, s_ptr, post_in_ptr, comb_in_ptr, new_ptr, rows, ts_mask, base_ptr, scale_ptr, post_ptr,
                       comb_ptr, M, t, t_mask, j, j_mask, tj_mask, rms_eps, hc_eps, D, HC, HC_PAD, ITERS, BLOCK_T,
                       BLOCK_D, STORE_NEW, NEW_SPLIT, OWN_SQ, FAST, PDL, OPAQUE)


# ---- launch heuristics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MhcLaunch:
    """How the two kernels are launched. Split-K kernel: grid (cdiv(N, block_t), split_k), each program
    covering `chunks` chunks of `block_d` columns (of all n streams), so split_k * chunks * block_d >= D;
    `dot`: x @ fn.T through tl.dot (GPUs; needs block_t, block_d >= 16) or broadcast multiply-and-sum;
    `precision`: the dot's fp32 mode ("ieee": FMA; "tf32x3": tensor cores, three tf32 products, or three
    bf16 products for a tile of bf16 values, `_accumulate`);
    `num_warps`, `num_stages`. Collapse kernel: `collapse_t` tokens a program over all of D (a second
    program a token block computes post and comb), `collapse_warps`. `pdl`: the collapse is
    launched as the split-K kernel's programmatic dependent (CUDA only): it starts, loads its streams and
    weights, and waits for the partials, while the split-K kernel is still running. `collapse_stores_new`
    (hc_post fused with a collapse): the collapse program, which recomputes the new streams anyway, writes
    them (before its wait, while the split-K kernel runs) and the split-K kernel only uses them.
    `collapse_sums_squares` (hc_post fused with a collapse): both collapse programs take the mixes' RMS
    scale from the new streams they rebuild (and, with `collapse_stores_new`, each writes half of them), and
    the split-K kernel feeds them to its dot only. `fast_reciprocal` (GPUs): the Sinkhorn's reciprocals are
    one `rcp.approx.ftz.f32` each, at most 1 ulp off (`_reciprocal`). `split_k_pdl` (CUDA only): the split-K
    kernel is launched as a programmatic dependent of the kernel before it, whatever that is."""

    block_t: int
    block_d: int
    chunks: int
    split_k: int
    num_warps: int
    num_stages: int
    collapse_t: int
    collapse_warps: int
    dot: bool = True
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
        if self.precision not in ("ieee", "tf32x3"):
            raise ValueError(f"MhcLaunch.precision must be 'ieee' or 'tf32x3' (tf32 is too coarse), got {self}")
        if min(self.chunks, self.split_k, self.num_warps, self.num_stages, self.collapse_warps) < 1:
            raise ValueError(f"MhcLaunch fields must be positive: {self}")

    def check(self, hidden: int) -> None:
        if self.split_k * self.chunks * self.block_d < hidden:
            raise ValueError(f"{self} covers {self.split_k * self.chunks * self.block_d} < D={hidden} columns")


def split_over(hidden: int, block_d: int, programs_wanted: int) -> tuple[int, int]:
    """(chunks, split_k): split D's chunks into about `programs_wanted` slices of equal chunk count."""
    n_chunks = triton.cdiv(hidden, block_d)
    split_k = max(1, min(n_chunks, programs_wanted))
    chunks = triton.cdiv(n_chunks, split_k)
    return chunks, triton.cdiv(n_chunks, chunks)


def collapse_warps(hidden: int, hc: int) -> int:
    """Warps of a one-token collapse program on GPUs: its n x D stream tile at 128 elements a thread, the
    most that stays in registers. Fewer warps are faster: every thread of the post / Sinkhorn program
    computes the whole Sinkhorn, and more warps queue for the reciprocal unit (hc_post_pre at Flash's
    D = 4096, T = 1, on an H100: 9.1 us at 4 warps, 10.5 at 8, 14.0 at 16). Larger D gets more warps only
    so its tile fits (8 at Pro's D = 7168, not timed)."""
    return min(16, max(4, triton.next_power_of_2(hidden) * triton.next_power_of_2(hc) // (32 * 128)))


MAX_TILE = 4096  # fp32 elements of one register tile of a 4-warp split-K program (32 a thread); more spills


def dot_launch(t: Target, tokens: int, hidden: int, hc: int, block_t: int, programs_per_sm: int = 2,
               precision: str = "tf32x3") -> MhcLaunch:
    """A tl.dot launch on `block_t`-token blocks: about `programs_per_sm` programs an SM over all token blocks,
    the column block as large as the register tiles allow (x [block_t, n, block_d] and fn [n * block_d, 32] at
    most MAX_TILE: measured on an H200, a tile twice that spills and runs 5-10x slower) while D still has a
    chunk for every program. Up to 64 tokens the collapse programs sum the squares of the new streams (hc_post
    fused with hc_pre on an H100: 11.1 against 11.75 us at T = 16, 12.9 against 13.9 at T = 64; at T = 256,
    where the collapse runs more than one wave of programs, 29.5 against 26.9)."""
    hc_pad = triton.next_power_of_2(hc)
    block_d = max(MIN_DOT, min(64, MAX_TILE // (block_t * hc_pad), MAX_TILE // (hc_pad * 32)))
    programs_per_block = max(1, programs_per_sm * t.sm_count // triton.cdiv(tokens, block_t))
    while block_d > MIN_DOT and triton.cdiv(hidden, block_d) < programs_per_block:
        block_d //= 2
    chunks, split_k = split_over(hidden, block_d, programs_per_block)
    return MhcLaunch(block_t, block_d, chunks, split_k, 4, 2, 1, collapse_warps(hidden, hc), precision=precision,
                     pdl=True, collapse_stores_new=True, collapse_sums_squares=tokens <= 64, fast_reciprocal=True,
                     split_k_pdl=True)


def mhc_launch(t: Target, tokens: int, hidden: int, hc: int = 4) -> MhcLaunch:
    """The launch of an mHC boundary of `tokens` tokens, hidden size `hidden`, `hc` streams on target `t`.

    GPUs (chosen by `bench/mhc_bench.py --sweep` and same-process A/B runs on an H100, hc_post_pre at Flash
    dimensions, BENCHMARKS.md): the collapse is launched as the split-K kernel's programmatic dependent (9.35
    against 10.5 us without at T = 8), one token a program at 4 warps (`collapse_warps`; 8 warps: 11.44
    against 11.21 us at T = 64, 7.70 against 6.30 at T = 1); from 3 tokens it writes the new streams
    (`collapse_stores_new`: 9.23 against 9.66 us at T = 16, 11.21 against 11.97 at T = 64; at T = 1 the
    split-K kernel writing them is faster, 6.30 against 7.06). The split-K kernel is launched as a
    dependent of the kernel before it and the Sinkhorn takes one-instruction reciprocals (`split_k_pdl`,
    `fast_reciprocal`). Up to 8 tokens the split-K kernel multiplies by broadcasting (a tl.dot pads to 16
    rows): one token and one 32-column chunk a program up to 2 tokens (8.2 us at T = 1 against 9.1 for 64 or
    128 columns), 2-token blocks of 64 columns for 3-8 (8.9 us at T = 8 against 9.35 for one token and 128
    columns). 9-16 tokens: tf32x3 tensor-core dots on a 16-token block, about one program an SM (10.7 us at
    T = 16 against 11.2 for two). Beyond: tf32x3 dots on 64-token blocks (wgmma on Hopper, tcgen05 on
    Blackwell), 16-column chunks, about two programs an SM (at T = 64 one chunk a program: 10.49 us against
    10.94 for two chunks on half the programs and 11.03 for 32-column chunks; at T = 256 four). From 9 to 64
    tokens the collapse programs sum the squares (`dot_launch`; at T = 64 without: 12.59 against 11.21).
    Each figure: hc_post_pre, every other field as the default, one run (the older ones with the kernels of
    their day, BENCHMARKS.md).
    tf32x3 is fp32-accurate: relative error against the fp32 reference 1e-7 to 3e-7, as FMA's. cpu
    (Triton's interpreter, tests only): few large programs (the interpreter pays per program and per call),
    but still several splits and chunks so both loops are exercised.
    """
    if not t.is_gpu:
        block_d = max(MIN_DOT, min(1024, triton.next_power_of_2(triton.cdiv(hidden, 4))))
        chunks, split_k = split_over(hidden, block_d, triton.cdiv(triton.cdiv(hidden, block_d), 2))
        block_t = min(256, triton.next_power_of_2(tokens))
        return MhcLaunch(block_t, block_d, chunks, split_k, 4, 1, block_t, 4, dot=False)
    if tokens <= 8:
        block_t, block_d = (1, 32) if tokens <= 2 else (2, 64)
        chunks, split_k = split_over(hidden, block_d, triton.cdiv(hidden, block_d))
        return MhcLaunch(block_t, block_d, chunks, split_k, 4, 2, 1, collapse_warps(hidden, hc), dot=False,
                         pdl=True, collapse_stores_new=tokens > 2, fast_reciprocal=True, split_k_pdl=True)
    if tokens <= 16:
        return dot_launch(t, tokens, hidden, hc, MIN_DOT, programs_per_sm=1)
    return dot_launch(t, tokens, hidden, hc, 64)


# ---- host wrappers -------------------------------------------------------------------------------------
def _check_streams(streams: torch.Tensor) -> tuple[int, int, int]:
    if streams.dim() != 3 or not streams.is_floating_point():
        raise ValueError(f"streams must be a float [N, n, D] tensor, got {streams.dtype} {tuple(streams.shape)}")
    return tuple(streams.shape)


def _check_mix_params(fn, base, scale, norm_weight, rows: int, hc: int, hidden: int, scales: int) -> None:
    expected = {"fn": (rows, hc * hidden), "base": (rows,), "scale": (scales,), "norm_weight": (hidden,)}
    for name, tensor in (("fn", fn), ("base", base), ("scale", scale), ("norm_weight", norm_weight)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(tensor.shape)}")
    if fn.dtype != torch.float32:
        raise ValueError(f"fn must be float32 (the model keeps mHC weights in fp32), got {fn.dtype}")


@functools.lru_cache(maxsize=None)
def _device_target(device: torch.device) -> Target:
    return target_for_device(device)


def _launch_for(streams: torch.Tensor, launch: MhcLaunch | None) -> MhcLaunch:
    n_tokens, _, hidden = streams.shape
    launch = launch or mhc_launch(_device_target(streams.device), n_tokens, hidden, streams.shape[1])
    launch.check(hidden)
    return launch


def _outputs(out, make):
    return out if out is not None else make()


def _m_pad(rows: int) -> int:
    """Columns of a token's partials: the `rows` mixes, sum(x^2), padding to a power of two (>= 16 for dots)."""
    return max(MIN_DOT, triton.next_power_of_2(rows + 1))


def mix_workspace(n_tokens: int, rows: int, launch: MhcLaunch, device) -> torch.Tensor:
    """The split-K partials `[N, split_k, M_PAD]` fp32: each split's `x @ fn.T` (`rows` columns) and its
    sum(x^2) (column `rows`; zero where the collapse sums the squares, `collapse_sums_squares`)."""
    return torch.empty((n_tokens, launch.split_k, _m_pad(rows)), dtype=torch.float32, device=device)


def _options(warps: int, stages: int, pdl: bool) -> dict:
    """Triton's launch options; launch_pdl only where set (the interpreter takes no such option)."""
    return {"num_warps": warps, "num_stages": stages, **({"launch_pdl": True} if pdl else {})}


def _on_gpu(tensor: torch.Tensor) -> bool:
    """Whether a launch over `tensor` may take the GPU-only paths: PDL (a CUDA launch attribute), inline PTX
    and bf16 tl.dot (which Triton's CPU interpreter gets wrong). cpu tensors (the interpreter) take none;
    meta (ahead-of-time builds) and cuda take them all."""
    return tensor.device.type != "cpu"


def _check_partials(partials: torch.Tensor, n_tokens: int, rows: int, launch: MhcLaunch) -> None:
    """The kernels index the partials by their own constants: the buffer must be `mix_workspace`'s shape."""
    expected = (n_tokens, launch.split_k, _m_pad(rows))
    if tuple(partials.shape) != expected or partials.dtype != torch.float32 or not partials.is_contiguous():
        raise ValueError(f"partials must be a contiguous float32 {expected} tensor (mix_workspace), got "
                         f"{partials.dtype} {tuple(partials.shape)}")


def mix_partials_launch(x, post_mix_inputs, fn, partials, launch: MhcLaunch, hc: int) -> KernelLaunch:
    """Kernel (a). x: streams [N, n, D], or with `post_mix_inputs` = (streams, post, comb, new_streams) the
    block output [N, D] (hc_post is computed on the way, and written unless the collapse writes it,
    `launch.collapse_stores_new`). fn None: hc_post alone, no partials (and no dependent collapse)."""
    n_tokens, hidden = x.shape[0], x.shape[-1]
    s, p, c, new = post_mix_inputs if post_mix_inputs is not None else (x, x, x, x)
    mix = fn is not None
    if mix:
        _check_partials(partials, n_tokens, fn.shape[0], launch)
    args = dict(x_ptr=x, s_ptr=s, post_ptr=p, comb_ptr=c, new_ptr=new, fn_ptr=fn if mix else x,
                part_ptr=partials if mix else x, N=n_tokens, M=fn.shape[0] if mix else 0)
    constexprs = dict(D=hidden, HC=hc, HC_PAD=triton.next_power_of_2(hc), M_PAD=_m_pad(fn.shape[0] if mix else 1),
                      BLOCK_T=launch.block_t, BLOCK_D=launch.block_d, CHUNKS=launch.chunks, SPLIT=launch.split_k,
                      POST=post_mix_inputs is not None,
                      STORE_NEW=post_mix_inputs is not None and not (mix and launch.collapse_stores_new), MIX=mix,
                      SQ=not (mix and post_mix_inputs is not None and launch.collapse_sums_squares), DOT=launch.dot,
                      PRECISION=launch.precision, PDL=launch.pdl and mix and _on_gpu(x),
                      WAIT=launch.split_k_pdl and _on_gpu(x),
                      BF16_X=(new if post_mix_inputs is not None else x).dtype == torch.bfloat16 and _on_gpu(x),
                      OPAQUE=_on_gpu(x))
    return KernelLaunch(_mix_partials_kernel, (triton.cdiv(n_tokens, launch.block_t), launch.split_k), args,
                        constexprs, _options(launch.num_warps, launch.num_stages, constexprs["WAIT"]))


def collapse_launch(streams, post_mix_inputs, partials, base, scale, norm_weight, normed, post, comb, rms_eps,
                    hc_eps, iters: int, launch: MhcLaunch) -> KernelLaunch:
    """Kernel (b) over `streams` [N, n, D]; with `post_mix_inputs` = (block_out, streams, post, comb, new) it
    recomputes the new streams from those instead (and writes them to `new` with
    `launch.collapse_stores_new`). post and comb None: hc_head (pre only)."""
    n_tokens, hc, hidden = streams.shape
    _check_partials(partials, n_tokens, base.shape[0], launch)
    head = post is None
    x, s, p, c, new = post_mix_inputs if post_mix_inputs is not None else (streams,) * 5
    args = dict(x_ptr=x, s_ptr=s, post_in_ptr=p, comb_in_ptr=c, new_ptr=new, part_ptr=partials, base_ptr=base,
                scale_ptr=scale, norm_w_ptr=norm_weight, normed_ptr=normed, post_ptr=normed if head else post,
                comb_ptr=normed if head else comb, N=n_tokens, M=base.shape[0], rms_eps=float(rms_eps),
                hc_eps=float(hc_eps))
    own_sq = post_mix_inputs is not None and launch.collapse_sums_squares
    constexprs = dict(D=hidden, HC=hc, HC_PAD=triton.next_power_of_2(hc), M_PAD=_m_pad(base.shape[0]),
                      SPLIT=launch.split_k, SPLIT_PAD=triton.next_power_of_2(launch.split_k), ITERS=int(iters),
                      BLOCK_T=launch.collapse_t, BLOCK_D=triton.next_power_of_2(hidden), HEAD=head,
                      POST=post_mix_inputs is not None,
                      STORE_NEW=post_mix_inputs is not None and launch.collapse_stores_new,
                      NEW_SPLIT=hc // 2 if own_sq and not head else hc, OWN_SQ=own_sq,
                      FAST=launch.fast_reciprocal and not head and _on_gpu(streams),
                      PDL=launch.pdl and _on_gpu(streams), OPAQUE=_on_gpu(streams))
    grid = (triton.cdiv(n_tokens, launch.collapse_t), 1 if head else 2)
    return KernelLaunch(_collapse_kernel, grid, args, constexprs,
                        _options(launch.collapse_warps, 1, constexprs["PDL"]))


def _check_new_streams(new: torch.Tensor, normed: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    """The collapse rebuilds the new streams from hc_post's inputs while kernel (a) builds them too, and
    either may write them: `new` may not share memory with an input, and both kernels round to one dtype
    (the streams')."""
    if new.device.type != "meta" and any(new.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                                         for x in inputs):
        raise ValueError("out: the new streams may not share memory with block_out, streams, post or comb")
    if new.dtype != inputs[1].dtype or normed.dtype != inputs[1].dtype:
        raise ValueError(f"out: new streams and normed must have the streams' dtype {inputs[1].dtype}, got "
                         f"{new.dtype} / {normed.dtype}")


def _mixes_and_collapse(x, streams, post_inputs, new, fn, base, scale, norm_weight, rms_eps, hc_eps, iters,
                        launch: MhcLaunch | None, normed, post, comb, launcher):
    """Both launches of one boundary. `post_inputs` = (streams, post, comb) with hc_post (x: block output,
    `new` the new streams, written by kernel (a) or the collapse); None otherwise (x: the streams)."""
    if post_inputs is not None:
        _check_new_streams(new, normed, (x, *post_inputs))
    lc = _launch_for(streams, launch)
    partials = mix_workspace(streams.shape[0], fn.shape[0], lc, streams.device)
    mix_in = (*post_inputs, new) if post_inputs is not None else None
    launcher(mix_partials_launch(x, mix_in, fn, partials, lc, streams.shape[1]))
    launcher(collapse_launch(streams, (x, *post_inputs, new) if post_inputs is not None else None, partials, base,
                             scale, norm_weight, normed, post, comb, rms_eps, hc_eps, iters, lc))


def _new_pre_outputs(streams: torch.Tensor):
    n_tokens, hc, hidden = streams.shape
    return (torch.empty((n_tokens, hidden), dtype=streams.dtype, device=streams.device),
            torch.empty((n_tokens, hc), dtype=torch.float32, device=streams.device),
            torch.empty((n_tokens, hc, hc), dtype=torch.float32, device=streams.device))


def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           norm_weight: torch.Tensor, rms_eps: float, hc_eps: float, iters: int, *,
           launch: MhcLaunch | None = None, out=None,
           launcher=JIT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed [N, D] in streams' dtype, post [N, n] fp32, comb [N, n, n] fp32); see mhc_reference.hc_pre.
    `out`: optional (normed, post, comb) to write into. `launcher`: codegen/kernels/launcher.py."""
    _, hc, hidden = _check_streams(streams)
    _check_mix_params(fn, base, scale, norm_weight, (2 + hc) * hc, hc, hidden, 3)
    streams = streams.contiguous()
    normed, post, comb = _outputs(out, lambda: _new_pre_outputs(streams))
    _mixes_and_collapse(streams, streams, None, None, fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, iters, launch, normed, post, comb, launcher)
    return normed, post, comb


def _post_inputs(block_out, streams, post, comb):
    n_tokens, hc, hidden = _check_streams(streams)
    if tuple(block_out.shape) != (n_tokens, hidden):
        raise ValueError(f"block_out must be [N, D] = {(n_tokens, hidden)}, got {tuple(block_out.shape)}")
    if tuple(post.shape) != (n_tokens, hc) or tuple(comb.shape) != (n_tokens, hc, hc):
        raise ValueError(f"post/comb must be [N, n] / [N, n, n], got {tuple(post.shape)} / {tuple(comb.shape)}")
    return block_out.contiguous(), streams.contiguous(), post.float().contiguous(), comb.float().contiguous()


def hc_post(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
            launch: MhcLaunch | None = None, out: torch.Tensor | None = None, launcher=JIT) -> torch.Tensor:
    """New streams [N, n, D] in streams' dtype; see mhc_reference.hc_post."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    new = _outputs(out, lambda: torch.empty_like(streams))
    launcher(mix_partials_launch(block_out, (streams, post, comb, new), None, None, _launch_for(streams, launch),
                                 streams.shape[1]))
    return new


def hc_post_pre(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                rms_eps: float, hc_eps: float, iters: int, *, launch: MhcLaunch | None = None,
                out=None, launcher=JIT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new streams, normed, post_next, comb_next); see mhc_reference.hc_post_pre.
    `out`: optional (new_streams, normed, post_next, comb_next) to write into."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    _, hc, hidden = streams.shape
    _check_mix_params(fn, base, scale, norm_weight, (2 + hc) * hc, hc, hidden, 3)
    new, normed, post_next, comb_next = _outputs(out, lambda: (torch.empty_like(streams),
                                                               *_new_pre_outputs(streams)))
    _mixes_and_collapse(block_out, streams, (streams, post, comb), new, fn.contiguous(), base.float(),
                        scale.float(), norm_weight.contiguous(), rms_eps, hc_eps, iters, launch, normed, post_next,
                        comb_next, launcher)
    return new, normed, post_next, comb_next


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            norm_weight: torch.Tensor, rms_eps: float, hc_eps: float, *, launch: MhcLaunch | None = None,
            out: torch.Tensor | None = None, launcher=JIT) -> torch.Tensor:
    """normed [N, D] in streams' dtype; see mhc_reference.hc_head."""
    n_tokens, hc, hidden = _check_streams(streams)
    _check_mix_params(fn, base, scale, norm_weight, hc, hc, hidden, 1)
    streams = streams.contiguous()
    normed = _outputs(out, lambda: torch.empty((n_tokens, hidden), dtype=streams.dtype, device=streams.device))
    _mixes_and_collapse(streams, streams, None, None, fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, 1, launch, normed, None, None, launcher)
    return normed


def hc_post_head(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                 rms_eps: float, hc_eps: float, *, launch: MhcLaunch | None = None,
                 out=None, launcher=JIT) -> tuple[torch.Tensor, torch.Tensor]:
    """(new streams, normed): the last layer's hc_post fused with hc_head; see mhc_reference.hc_post_head."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    n_tokens, hc, hidden = streams.shape
    _check_mix_params(fn, base, scale, norm_weight, hc, hc, hidden, 1)
    new, normed = _outputs(out, lambda: (torch.empty_like(streams), torch.empty(
        (n_tokens, hidden), dtype=streams.dtype, device=streams.device)))
    _mixes_and_collapse(block_out, streams, (streams, post, comb), new, fn.contiguous(), base.float(),
                        scale.float(), norm_weight.contiguous(), rms_eps, hc_eps, 1, launch, normed, None, None,
                        launcher)
    return new, normed


# ---- what a call launches, without running it ------------------------------------------------------------
OPS = {"hc_pre": hc_pre, "hc_post": hc_post, "hc_post_pre": hc_post_pre, "hc_head": hc_head}


def op_specs(op: str, tokens: int, hidden: int, hc: int, iters: int, dtype: torch.dtype,
                norm_dtype: torch.dtype, launch: MhcLaunch) -> list[KernelSpec]:
    """The kernel specialisations one call of `op` on `tokens` tokens launches with `launch`: the host
    wrapper itself runs on meta tensors (nothing is computed or compiled), so these are exactly the
    specialisations a real call launches."""
    meta = dict(device="meta")
    rows = hc if op == "hc_head" else (2 + hc) * hc
    streams = torch.empty((tokens, hc, hidden), dtype=dtype, **meta)
    mix = (torch.empty((rows, hc * hidden), dtype=torch.float32, **meta), torch.empty(rows, **meta),
           torch.empty(1 if op == "hc_head" else 3, **meta), torch.empty(hidden, dtype=norm_dtype, **meta))
    post = (torch.empty((tokens, hidden), dtype=dtype, **meta), streams, torch.empty((tokens, hc), **meta),
            torch.empty((tokens, hc, hc), **meta))
    recorder = SpecRecorder()
    args = {"hc_pre": (streams, *mix, 1e-6, 1e-6, iters), "hc_post": post,
            "hc_post_pre": (*post, *mix, 1e-6, 1e-6, iters), "hc_head": (streams, *mix, 1e-6, 1e-6)}[op]
    OPS[op](*args, launch=launch, launcher=recorder)
    return list(recorder.specs)
