"""Fused mHC layer boundaries in Triton: kernels, host wrappers, launch heuristics per target.

The PyTorch twin of every wrapper is codegen/mhc_reference.py (same signature, same math, fp32 inside);
tests/test_mhc_kernels.py checks each against it. Two launches per boundary:

(a) `_mix_partials_kernel`, grid (token blocks, split_k): split-K over the hidden dimension. Each program
    takes `block_t` tokens and `chunks` chunks of `block_d` columns of all n streams, and writes the partial
    `x @ fn.T` and `sum(x^2)` of its slice. With `POST` it first builds its slice of the new streams
    `post[k] * out + sum_j comb[j,k] * streams[j]` and writes them (hc_post fused with the next hc_pre's
    partials: the new streams are written once and read once more, by (b)). The fn matrix, the big read at
    small batch ((2+n)n x nD fp32: 1.5 MiB for Flash), is spread over every SM.
(b) `_collapse_kernel`, one program per token: sums the splits, applies the RMS scale, sigmoid / 2*sigmoid,
    the Sinkhorn iterations on the n x n matrix in registers, the weighted collapse `sum_j pre[j] * x[j]`
    over D (rounded to the activation dtype, as the model does) and the RMSNorm that follows it.
hc_head uses the same two kernels with the n head rows of fn and no post/comb.

bf16 is converted to fp32 right after each load (and the math stays fp32): Triton's CPU interpreter gets
bf16 arithmetic wrong, and the model's math is fp32 anyway. `x @ fn.T` is fp32-accurate: FMA ("ieee") or
three tf32 tensor-core products ("tf32x3"); one plain tf32 product would move the mixes by ~1e-3 relative,
more than the fp32 tolerance against the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..targets import Target, target_for_device, triton_gpu_target

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
def _accumulate(acc, sq, x3, fn_ptr, j, j_mask, d, d_mask, m, m_mask, HC: tl.constexpr, D: tl.constexpr,
                BLOCK_T: tl.constexpr, HC_PAD: tl.constexpr, BLOCK_D: tl.constexpr, DOT: tl.constexpr,
                PRECISION: tl.constexpr):
    """acc += x @ fn.T and sq += rowsum(x^2) over one chunk of columns d of all streams: x3 [BLOCK_T, HC_PAD,
    BLOCK_D] against fn[:, k*D + d], as one dot of depth HC_PAD*BLOCK_D. DOT=False multiplies by
    broadcasting instead (the interpreter's fp32 tl.dot is a slow numpy loop)."""
    w3 = tl.load(fn_ptr + m[None, None, :] * (HC * D) + j[:, None, None] * D + d[None, :, None],
                 mask=j_mask[:, None, None] & d_mask[None, :, None] & m_mask[None, None, :], other=0.0)
    x2 = tl.reshape(x3, [BLOCK_T, HC_PAD * BLOCK_D])
    w2 = tl.reshape(w3, [HC_PAD * BLOCK_D, w3.shape[2]])
    if DOT:
        acc = tl.dot(x2, w2, acc, input_precision=PRECISION)
    else:
        acc += tl.sum(x2[:, :, None] * w2[None, :, :], axis=1)
    sq += tl.sum(x2 * x2, axis=1)
    return acc, sq


@triton.jit
def _mix_partials_kernel(x_ptr, s_ptr, post_ptr, comb_ptr, new_ptr, fn_ptr, part_mix_ptr, part_sq_ptr, N, M,
                         D: tl.constexpr, HC: tl.constexpr, HC_PAD: tl.constexpr, M_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, CHUNKS: tl.constexpr,
                         SPLIT: tl.constexpr, POST: tl.constexpr, MIX: tl.constexpr, DOT: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Partials of one (token block, D slice). Without POST x_ptr is streams [N, HC, D]; with POST it is the
    block output [N, D], and the slice of new streams [N, HC, D] is built from s_ptr/post_ptr/comb_ptr first.
    MIX=False (plain hc_post) skips the partials. Every load of a chunk is independent of the others, so
    they are all in flight at once."""
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
    if POST:
        post = tl.load(post_ptr + t[:, None] * HC + j[None, :], mask=tj_mask, other=0.0)
    for c in range(CHUNKS):
        d = (pid_s * CHUNKS + c) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_mask = d < D
        td_mask = t_mask[:, None] & d_mask[None, :]
        x_mask = tj_mask[:, :, None] & d_mask[None, None, :]
        offsets = t[:, None, None] * (HC * D) + j[None, :, None] * D + d[None, None, :]
        if POST:
            out = tl.load(x_ptr + t[:, None] * D + d[None, :], mask=td_mask, other=0.0).to(tl.float32)
            mixed = tl.zeros([BLOCK_T, HC_PAD, BLOCK_D], dtype=tl.float32)
            for i in tl.static_range(HC):  # new[k] = post[k] * out + sum_i comb[i, k] * streams[i]
                s_i = tl.load(s_ptr + t[:, None] * (HC * D) + i * D + d[None, :], mask=td_mask,
                              other=0.0).to(tl.float32)
                c_i = tl.load(comb_ptr + t[:, None] * (HC * HC) + i * HC + j[None, :], mask=tj_mask, other=0.0)
                mixed += c_i[:, :, None] * s_i[:, None, :]
            x3 = _round(post[:, :, None] * out[:, None, :] + mixed, new_ptr.dtype.element_ty)
            tl.store(new_ptr + offsets, x3.to(new_ptr.dtype.element_ty), mask=x_mask)
        else:
            x3 = tl.load(x_ptr + offsets, mask=x_mask, other=0.0).to(tl.float32)
        if MIX:
            acc, sq = _accumulate(acc, sq, x3, fn_ptr, j, j_mask, d, d_mask, m, m_mask, HC, D, BLOCK_T, HC_PAD,
                                  BLOCK_D, DOT, PRECISION)
    if MIX:
        tl.store(part_mix_ptr + (t[:, None] * SPLIT + pid_s) * M_PAD + m[None, :], acc, mask=t_mask[:, None])
        tl.store(part_sq_ptr + t * SPLIT + pid_s, sq, mask=t_mask)


@triton.jit
def _sinkhorn(logits, mask, ITERS: tl.constexpr, eps):
    """compiler/layers.sinkhorn on padded [tokens, HC_PAD, HC_PAD] tiles; padded entries stay 0."""
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
def _collapse_kernel(streams_ptr, part_mix_ptr, part_sq_ptr, base_ptr, scale_ptr, norm_w_ptr, normed_ptr,
                     post_ptr, comb_ptr, N, rms_eps, hc_eps, D: tl.constexpr, HC: tl.constexpr,
                     HC_PAD: tl.constexpr, M_PAD: tl.constexpr, SPLIT: tl.constexpr, SPLIT_PAD: tl.constexpr,
                     ITERS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HEAD: tl.constexpr):
    """BLOCK_T tokens (1 on GPUs): mixes from the partials, pre (and post, comb unless HEAD), then
    RMSNorm(sum_j pre[j] x[j]) with the norm weight."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < N
    s = tl.arange(0, SPLIT_PAD)
    ts_mask = t_mask[:, None] & (s < SPLIT)[None, :]
    j = tl.arange(0, HC_PAD)
    j_mask = j < HC
    d = tl.arange(0, BLOCK_D)
    td_mask = t_mask[:, None] & (d < D)[None, :]
    # The streams and the norm weight first: their loads then overlap the mixes and the Sinkhorn.
    x = tl.load(streams_ptr + t[:, None, None] * (HC * D) + j[None, :, None] * D + d[None, None, :],
                mask=td_mask[:, None, :] & j_mask[None, :, None], other=0.0).to(tl.float32)
    w = tl.load(norm_w_ptr + d, mask=d < D, other=0.0).to(tl.float32)
    rows = part_mix_ptr + (t[:, None] * SPLIT + s[None, :]) * M_PAD  # [BLOCK_T, SPLIT_PAD]
    sq = tl.sum(tl.load(part_sq_ptr + t[:, None] * SPLIT + s[None, :], mask=ts_mask, other=0.0), axis=1)
    rs = 1.0 / tl.sqrt_rn(sq / (HC * D) + rms_eps)
    tj_mask = t_mask[:, None] & j_mask[None, :]
    mix_mask = ts_mask[:, :, None] & j_mask[None, None, :]
    pre_mix = tl.sum(tl.load(rows[:, :, None] + j[None, None, :], mask=mix_mask, other=0.0), axis=1)
    pre = tl.sigmoid(pre_mix * rs[:, None] * tl.load(scale_ptr) + tl.load(base_ptr + j, mask=j_mask)[None, :])
    pre = tl.where(j_mask[None, :], pre + hc_eps, 0.0)
    if not HEAD:
        post_mix = tl.sum(tl.load(rows[:, :, None] + HC + j[None, None, :], mask=mix_mask, other=0.0), axis=1)
        post = 2.0 * tl.sigmoid(post_mix * rs[:, None] * tl.load(scale_ptr + 1) +
                                tl.load(base_ptr + HC + j, mask=j_mask)[None, :])
        tl.store(post_ptr + t[:, None] * HC + j[None, :], post, mask=tj_mask)
        q = tl.arange(0, HC_PAD * HC_PAD)  # comb entry (q // HC_PAD, q % HC_PAD), flattened for the loads
        q_mask = (q // HC_PAD < HC) & (q % HC_PAD < HC)
        cidx = 2 * HC + (q // HC_PAD) * HC + q % HC_PAD
        comb_mix = tl.sum(tl.load(rows[:, :, None] + cidx[None, None, :],
                                  mask=ts_mask[:, :, None] & q_mask[None, None, :], other=0.0), axis=1)
        logits = comb_mix * rs[:, None] * tl.load(scale_ptr + 2) + tl.load(base_ptr + cidx, mask=q_mask)[None, :]
        cmask = tj_mask[:, :, None] & j_mask[None, None, :]
        comb = _sinkhorn(tl.reshape(logits, [BLOCK_T, HC_PAD, HC_PAD]), cmask, ITERS, hc_eps)
        tl.store(comb_ptr + t[:, None, None] * (HC * HC) + j[None, :, None] * HC + j[None, None, :], comb,
                 mask=cmask)
    a = _round(tl.sum(pre[:, :, None] * x, axis=1), normed_ptr.dtype.element_ty)
    r = 1.0 / tl.sqrt_rn(tl.sum(a * a, axis=1) / D + rms_eps)
    y = _round(a * r[:, None] * w[None, :], normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + t[:, None] * D + d[None, :], y.to(normed_ptr.dtype.element_ty), mask=td_mask)


# ---- launch heuristics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class MhcLaunch:
    """How the two kernels are launched. Split-K kernel: grid (cdiv(N, block_t), split_k), each program
    covering `chunks` chunks of `block_d` columns (of all n streams), so split_k * chunks * block_d >= D;
    `dot`: x @ fn.T through tl.dot (GPUs; needs block_t, block_d >= 16) or broadcast multiply-and-sum;
    `precision`: the dot's fp32 mode ("ieee": FMA; "tf32x3": tensor cores, three tf32 products);
    `num_warps`, `num_stages`. Collapse kernel: `collapse_t` tokens a program (1 on GPUs: one token's
    n x D block already fills the registers), `collapse_warps`."""

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


def collapse_warps(hidden: int) -> int:
    """Warps of the collapse kernel, which holds one token's n x next_pow2(D) stream block in registers."""
    return 4 if hidden <= 4096 else 8 if hidden <= 8192 else 16


MAX_TILE = 4096  # fp32 elements of one register tile of a 4-warp split-K program (32 a thread); more spills


def mhc_launch(t: Target, tokens: int, hidden: int, hc: int = 4) -> MhcLaunch:
    """The launch of an mHC boundary of `tokens` tokens, hidden size `hidden`, `hc` streams on target `t`.

    GPUs: about two split-K programs per SM, so the fn read (the whole cost at small batch) is spread over
    the chip. Up to 8 tokens: blocks of 1-4 tokens multiplied by broadcasting (a tl.dot pads to 16 rows).
    Beyond: tl.dot on 16-token blocks up to 16 tokens, 64 beyond (fewer fn re-reads), the column block as
    large as the register tiles allow (x [block_t, n, block_d] and fn [n * block_d, 32] at most MAX_TILE:
    measured on an H200, a tile twice that spills and runs 5-10x slower), with tf32x3 tensor-core products
    (H200, hc_post_pre: 18.6 against 27.0 us for FMA at T=64, 37.9 against 70.8 at T=256; relative error
    against the fp32 reference 1e-7 to 3e-7, as FMA's). cpu (Triton's interpreter, tests only): few
    large programs (the interpreter pays per program and per call), but still several splits and chunks so
    both loops are exercised.
    """
    if not t.is_gpu:
        block_d = max(MIN_DOT, min(1024, triton.next_power_of_2(triton.cdiv(hidden, 4))))
        chunks, split_k = split_over(hidden, block_d, triton.cdiv(triton.cdiv(hidden, block_d), 2))
        block_t = min(256, triton.next_power_of_2(tokens))
        return MhcLaunch(block_t, block_d, chunks, split_k, 4, 1, block_t, 4, dot=False)
    if tokens <= 8:  # broadcast multiply-and-sum, no 16-row dot padding: 10.7 us against 16.9 at T=1 (H200)
        block_t = min(4, triton.next_power_of_2(tokens))
        chunks, split_k = split_over(hidden, 32, 2 * t.sm_count)
        return MhcLaunch(block_t, 32, chunks, split_k, 4, 2, 1, collapse_warps(hidden), dot=False)
    block_t = MIN_DOT if tokens <= 16 else 64
    hc_pad = triton.next_power_of_2(hc)
    block_d = max(MIN_DOT, min(64, MAX_TILE // (block_t * hc_pad), MAX_TILE // (hc_pad * 32)))
    programs_per_block = max(1, 2 * t.sm_count // triton.cdiv(tokens, block_t))
    while block_d > MIN_DOT and triton.cdiv(hidden, block_d) < programs_per_block:
        block_d //= 2
    chunks, split_k = split_over(hidden, block_d, programs_per_block)
    return MhcLaunch(block_t, block_d, chunks, split_k, 4, 2, 1, collapse_warps(hidden), precision="tf32x3")


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


def mix_workspace(n_tokens: int, rows: int, launch: MhcLaunch, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K partials: x @ fn.T `[N, split_k, M_PAD]` and sum(x^2) `[N, split_k]`, fp32."""
    m_pad = max(MIN_DOT, triton.next_power_of_2(rows))
    return (torch.empty((n_tokens, launch.split_k, m_pad), dtype=torch.float32, device=device),
            torch.empty((n_tokens, launch.split_k), dtype=torch.float32, device=device))


def launch_mix_partials(x, post_mix_inputs, fn, part_mix, part_sq, launch: MhcLaunch, hc: int) -> None:
    """Kernel (a). x: streams [N, n, D], or with `post_mix_inputs` = (streams, post, comb, new_streams) the
    block output [N, D] (hc_post is computed and written on the way). fn None: hc_post alone, no partials."""
    n_tokens, hidden = x.shape[0], x.shape[-1]
    s, p, c, new = post_mix_inputs if post_mix_inputs is not None else (x, x, x, x)
    mix = fn is not None
    grid = (triton.cdiv(n_tokens, launch.block_t), launch.split_k)
    _mix_partials_kernel[grid](
        x, s, p, c, new, fn if mix else x, part_mix if mix else x, part_sq if mix else x, n_tokens,
        fn.shape[0] if mix else 0, D=hidden, HC=hc, HC_PAD=triton.next_power_of_2(hc),
        M_PAD=part_mix.shape[-1] if mix else MIN_DOT, BLOCK_T=launch.block_t, BLOCK_D=launch.block_d,
        CHUNKS=launch.chunks, SPLIT=launch.split_k, POST=post_mix_inputs is not None, MIX=mix, DOT=launch.dot,
        PRECISION=launch.precision,
        num_warps=launch.num_warps, num_stages=launch.num_stages)


def launch_collapse(streams, part_mix, part_sq, base, scale, norm_weight, normed, post, comb, rms_eps, hc_eps,
                    iters: int, launch: MhcLaunch) -> None:
    """Kernel (b). post and comb None: hc_head (pre only)."""
    n_tokens, hc, hidden = streams.shape
    head = post is None
    _collapse_kernel[(triton.cdiv(n_tokens, launch.collapse_t),)](
        streams, part_mix, part_sq, base, scale, norm_weight, normed, normed if head else post,
        normed if head else comb, n_tokens, float(rms_eps), float(hc_eps), D=hidden, HC=hc,
        HC_PAD=triton.next_power_of_2(hc), M_PAD=part_mix.shape[-1], SPLIT=launch.split_k,
        SPLIT_PAD=triton.next_power_of_2(launch.split_k), ITERS=int(iters), BLOCK_T=launch.collapse_t,
        BLOCK_D=triton.next_power_of_2(hidden), HEAD=head, num_warps=launch.collapse_warps)


def _mixes_and_collapse(x, streams_for_collapse, post_mix_inputs, fn, base, scale, norm_weight, rms_eps,
                        hc_eps, iters, launch: MhcLaunch | None, normed, post, comb):
    """Both launches of one boundary; `post_mix_inputs` = (streams, post, comb, new_streams) with hc_post."""
    n_tokens, hc, _ = streams_for_collapse.shape
    lc = _launch_for(streams_for_collapse, launch)
    part_mix, part_sq = mix_workspace(n_tokens, fn.shape[0], lc, streams_for_collapse.device)
    launch_mix_partials(x, post_mix_inputs, fn, part_mix, part_sq, lc, hc)
    launch_collapse(streams_for_collapse, part_mix, part_sq, base, scale, norm_weight, normed, post, comb,
                    rms_eps, hc_eps, iters, lc)


def _new_pre_outputs(streams: torch.Tensor):
    n_tokens, hc, hidden = streams.shape
    return (torch.empty((n_tokens, hidden), dtype=streams.dtype, device=streams.device),
            torch.empty((n_tokens, hc), dtype=torch.float32, device=streams.device),
            torch.empty((n_tokens, hc, hc), dtype=torch.float32, device=streams.device))


def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           norm_weight: torch.Tensor, rms_eps: float, hc_eps: float, iters: int, *,
           launch: MhcLaunch | None = None, out=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normed [N, D] in streams' dtype, post [N, n] fp32, comb [N, n, n] fp32); see mhc_reference.hc_pre.
    `out`: optional (normed, post, comb) to write into."""
    _, hc, hidden = _check_streams(streams)
    _check_mix_params(fn, base, scale, norm_weight, (2 + hc) * hc, hc, hidden, 3)
    streams = streams.contiguous()
    normed, post, comb = _outputs(out, lambda: _new_pre_outputs(streams))
    _mixes_and_collapse(streams, streams, None, fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, iters, launch, normed, post, comb)
    return normed, post, comb


def _post_inputs(block_out, streams, post, comb):
    n_tokens, hc, hidden = _check_streams(streams)
    if tuple(block_out.shape) != (n_tokens, hidden):
        raise ValueError(f"block_out must be [N, D] = {(n_tokens, hidden)}, got {tuple(block_out.shape)}")
    if tuple(post.shape) != (n_tokens, hc) or tuple(comb.shape) != (n_tokens, hc, hc):
        raise ValueError(f"post/comb must be [N, n] / [N, n, n], got {tuple(post.shape)} / {tuple(comb.shape)}")
    return block_out.contiguous(), streams.contiguous(), post.float().contiguous(), comb.float().contiguous()


def hc_post(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
            launch: MhcLaunch | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """New streams [N, n, D] in streams' dtype; see mhc_reference.hc_post."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    new = _outputs(out, lambda: torch.empty_like(streams))
    launch_mix_partials(block_out, (streams, post, comb, new), None, None, None, _launch_for(streams, launch),
                        streams.shape[1])
    return new


def hc_post_pre(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                rms_eps: float, hc_eps: float, iters: int, *, launch: MhcLaunch | None = None,
                out=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new streams, normed, post_next, comb_next); see mhc_reference.hc_post_pre.
    `out`: optional (new_streams, normed, post_next, comb_next) to write into."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    _, hc, hidden = streams.shape
    _check_mix_params(fn, base, scale, norm_weight, (2 + hc) * hc, hc, hidden, 3)
    new, normed, post_next, comb_next = _outputs(out, lambda: (torch.empty_like(streams),
                                                               *_new_pre_outputs(streams)))
    _mixes_and_collapse(block_out, new, (streams, post, comb, new), fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, iters, launch, normed, post_next, comb_next)
    return new, normed, post_next, comb_next


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            norm_weight: torch.Tensor, rms_eps: float, hc_eps: float, *, launch: MhcLaunch | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """normed [N, D] in streams' dtype; see mhc_reference.hc_head."""
    n_tokens, hc, hidden = _check_streams(streams)
    _check_mix_params(fn, base, scale, norm_weight, hc, hc, hidden, 1)
    streams = streams.contiguous()
    normed = _outputs(out, lambda: torch.empty((n_tokens, hidden), dtype=streams.dtype, device=streams.device))
    _mixes_and_collapse(streams, streams, None, fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, 1, launch, normed, None, None)
    return normed


def hc_post_head(block_out: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
                 rms_eps: float, hc_eps: float, *, launch: MhcLaunch | None = None,
                 out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new streams, normed): the last layer's hc_post fused with hc_head; see mhc_reference.hc_post_head."""
    block_out, streams, post, comb = _post_inputs(block_out, streams, post, comb)
    n_tokens, hc, hidden = streams.shape
    _check_mix_params(fn, base, scale, norm_weight, hc, hc, hidden, 1)
    new, normed = _outputs(out, lambda: (torch.empty_like(streams), torch.empty(
        (n_tokens, hidden), dtype=streams.dtype, device=streams.device)))
    _mixes_and_collapse(block_out, new, (streams, post, comb, new), fn.contiguous(), base.float(), scale.float(),
                        norm_weight.contiguous(), rms_eps, hc_eps, 1, launch, normed, None, None)
    return new, normed


# ---- compile-only inspection ---------------------------------------------------------------------------
def compile_mix_partials(t: Target, tokens: int, hidden: int, hc: int = 4, post: bool = False,
                         dtype: str = "bf16"):
    """Triton's CompiledKernel of the split-K kernel with `t`'s launch, built for `t` on any machine, with no
    GPU (sm_100a / sm_103a: built, never run here); `.asm["ptx"]` shows the products chosen (FMA, wgmma,
    tcgen05.mma)."""
    from triton.compiler import ASTSource

    launch = mhc_launch(t, tokens, hidden, hc)
    pointers = dict(x_ptr=dtype, s_ptr=dtype, post_ptr="fp32", comb_ptr="fp32", new_ptr=dtype, fn_ptr="fp32",
                    part_mix_ptr="fp32", part_sq_ptr="fp32")
    constants = dict(D=hidden, HC=hc, HC_PAD=triton.next_power_of_2(hc),
                     M_PAD=max(MIN_DOT, triton.next_power_of_2((2 + hc) * hc)), BLOCK_T=launch.block_t,
                     BLOCK_D=launch.block_d, CHUNKS=launch.chunks, SPLIT=launch.split_k, POST=post, MIX=True,
                     DOT=launch.dot, PRECISION=launch.precision)
    signature = {**{k: "*" + v for k, v in pointers.items()}, "N": "i32", "M": "i32",
                 **{k: "constexpr" for k in constants}}
    return triton.compile(ASTSource(_mix_partials_kernel, signature, constants), target=triton_gpu_target(t),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
