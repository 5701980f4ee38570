"""The fused mHC layer boundaries' Triton kernels (jit functions only); host wrappers in codegen/kernels/mhc.py.

This file is the kernel source an artifact stores beside its binaries and the runtime hashes
(codegen/kernel_catalog.py): it imports Triton only, so its text alone decides what the binaries compute.

Two kernels a boundary (plain hc_post: (a) alone):
(a) `_mix_partials_kernel`, grid (token blocks, split_k): split-K over the hidden dimension. Each program
    writes the partial `x @ fn.T` and sum(x^2) of its slice of all n streams; with POST it first builds its
    slice of the new streams (hc_post fused with the next hc_pre's partials). Spreading fn, the big read at
    small batch, over every SM is the point of the split.
(b) `_collapse_kernel`, two programs a token block: each sums the splits and applies the RMS scale; one
    takes the weighted collapse and the RMSNorm after it, the other post and the Sinkhorn comb. After
    hc_post it rebuilds the new streams from (a)'s inputs (the same function, so the same bits) instead of
    reading (a)'s output, so on GPUs it can start as (a)'s programmatic dependent (PDL) and do everything
    but the partials' sums while (a) runs. hc_head: (a) and (b) with the n head rows of fn, no post / comb.

bf16 is converted to fp32 right after each load and the math stays fp32: Triton's CPU interpreter gets bf16
arithmetic wrong, and the model's math is fp32. `x @ fn.T` is fp32-accurate (FMA, or tf32x3 tensor-core
products, `_accumulate`): one plain tf32 product would move the mixes beyond the fp32 tolerance. Paths the
interpreter cannot run (inline PTX, bf16 dots, PDL) sit behind constexprs the host wrappers set on GPUs only.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to DTYPE and back, to nearest even. bf16 is rounded by hand: Triton's CPU interpreter
    truncates fp32 -> bf16, and with this the later `.to(bf16)` is exact everywhere (a few integer ops). A NaN
    stays NaN (the carry would take 0x7FFFFFFF, a GPU's NaN, to -0). This file is the stored kernels' whole
    source (runtime/stored_kernels.py), so it keeps its own copy of number_formats.bf16_rounded."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
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
    the masks of the out / streams loads (t and d's shape) and of the post / comb loads (t and k's). Both
    kernels call this one function and its sums are explicit FMAs (the compiler's own contraction differs
    between kernels and layouts), so the collapse's rebuilt streams equal the split-K kernel's bit for bit.
    For n = 4 all ten loads are issued before any sum (only their bf16 -> fp32 conversions between them)
    and, with OPAQUE, pass through `_opaque`: each load's layout conversion (through shared memory, behind
    a barrier) then comes after every load instead of holding back the loads after it. Other n: the same
    sums, loaded as they are summed."""
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
