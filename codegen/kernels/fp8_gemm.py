"""Block-scaled FP8 GEMM in Triton: `out = x @ W^T` for an e4m3 weight `[N, K]` with e8m0 scales per 128x128
block, read in its packed form; the PyTorch twin is codegen/fp8_linear.py's reference (model/quant.py).

One program computes `out^T` for `block_n` weight rows and `block_m` activation rows over a slice of K
(swap AB: the weight fills the tensor cores' M side, see codegen/kernels/fp8_gemm_launch.py). Per 128-column
K block it loads the weight tile (e4m3, never dequantised in memory) and the activation tile, sums the
block's products into a fresh fp32 tile and adds that, times both power-of-two scales, to an fp32
accumulator: DeepGEMM's promotion, since Hopper's FP8 MMA sums with less than fp32 precision inside an
instruction sequence. Scaling by powers of two is exact, so the result is the reference's sum of exact
products in another order (and, for "fp8" products on Hopper, the tensor cores' in-block summation).

Activation quantisation (act_quant) rounds each x row per 128 columns exactly as `quant.fake_quant_fp8(x, 128)`
does (amax over the block's elements present, floored at 1e-4; the scale 2^ceil(log2(amax / 448)), taken
exactly from amax's bits; q = clamp(x / s, +-448) rounded to e4m3 to nearest even: `_quantise_block`). A K block
is exactly one quantisation block, so no program needs another's result. Where it runs (`prequantise`):
  in the GEMM (up to 32 rows): each program rounds the x tile of each K block in registers, from L2; no
    extra kernel, at a cost in the K loop that grows with the tile's rows (every n tile rounds the same tile);
  in a kernel of its own (more rows): `_act_quant_kernel` writes x's e4m3 codes and fp32 scales once, the GEMM,
    launched as its programmatic dependent, reads the codes into shared memory as they are (half the bytes of
    bf16 x, and a K loop of copies, MMAs and the scale multiply only).
On GPUs the fp32 -> e4m3 conversion is the hardware's (cvt.rn.satfinite: nearest even, saturating: the clamp
and the rounding in one instruction); under Triton's CPU interpreter, whose conversion rounds wrongly, the kernel
rounds by hand (`e4m3_grid`) and converts exactly (its e4m3 dots are exact: fp16 operands, fp32 sums).

The K loop's instructions a weight byte decide whether a decode GEMM keeps up with the memory
(bench/fp8_gemm_sass.py counts them on the sm_90a build): masks that cannot mask anything are dropped (K a
multiple of 128, N of the tile), and a weight tile of at most 128 rows lies in one scale block, so its scale is
one byte a K block.

The "fp8" products follow DeepSeek's own kernels (DeepSeek-V3's reference inference `fp8_gemm` adds
`tl.dot` of e4m3 tiles times both scales per 128-column block the same way); the model's reference
(codegen/fp8_linear.py) sums the same exact products in fp32.

Groups (`fp8_grouped_linear`, codegen/fp8_grouped_linear.py): x [M, G, K] and a weight [G*N, K] whose rows
[g*N, (g+1)*N) multiply group g, in one launch over the whole weight. block_n divides N, so each weight tile lies
in one group and reads that group's x rows (an offset of g times x's group stride); the K loop is the one-group
loop. One group (fp8_linear) compiles without the offset (GROUPED off): the same code as before groups existed.

split_k > 1: each split writes its fp32 partial `[split_k, M, N]` and `_split_sum_kernel` adds them in split
order and casts (deterministic: the result does not depend on which split finishes first); with fold_splits
one program sums every split into a fresh accumulator and adds them in the same order, from the same zero, so
both give the same bits (codegen/kernels/fp8_gemm_launch.py: batch invariance).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4c.codegen.fp8_operands import QUANT_BLOCK, check_grouped_operands, check_operands
from dsv4c.codegen.kernels.fp8_gemm_launch import Fp8GemmLaunch, fp8_gemm_launch
from dsv4c.codegen.kernels.launcher import JIT, KernelLaunch
from dsv4c.codegen.kernels.number_formats import bf16_rounded, e4m3_grid, e8m0_byte, e8m0_pair, e8m0_values
from dsv4c.codegen.targets import target_for_device
from dsv4c.model import quant

FP8_MAX = tl.constexpr(quant.FP8_MAX)
FP8_AMAX_FLOOR = tl.constexpr(quant.FP8_AMAX_FLOOR)
SUM_BLOCK = 1024  # outputs a split-sum program adds
QUANT_ROWS = 16  # activation rows an act-quant program rounds (one 128-column block of each)


# ---- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _quantise_block(x, NATIVE_E4M3: tl.constexpr):
    """x [rows, 128] fp32 (zeros past K) -> (q: e4m3 [rows, 128], s: [rows] power-of-two scales), as
    quant.fake_quant_fp8 rounds one 128 block: s = 2^ceil(log2(r)) of r = amax / 448 (the reference takes it
    from the bits of the correctly rounded fp32 quotient), q = clamp(x / s, +-448) (x / s = x * 2^-e exactly)
    rounded to e4m3, ties to even. amax inf or NaN gives a non-finite s (and output), as the reference.
    The exponent comes from amax's bits, without a division: for amax = f * 2^E (f in [1, 2)) and 448 = 1.75 * 2^8,
    amax / 448 <= 2^e exactly when e >= E - 8 + (f > 1.75); the rounded quotient has the same ceil(log2)
    (no fp32 amax lies within half an ulp above 448 * 2^e, where the quotient would round down to 2^e), and
    amax >= 1e-4 keeps the quotient normal.
    NATIVE_E4M3: the backend converts fp32 -> e4m3 itself (NVIDIA GPUs: cvt.rn.satfinite, to nearest even,
    saturating at +-448, NaN kept: the clamp and the rounding in one instruction a pair); otherwise (Triton's
    CPU interpreter, whose conversion rounds wrongly) the kernel clamps and rounds by hand (`e4m3_grid`) and
    the conversion is exact."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), FP8_AMAX_FLOOR)
    scale, inverse = e8m0_pair(e8m0_byte(amax, 448.0))
    if NATIVE_E4M3:
        return (x * inverse[:, None]).to(tl.float8e4nv), scale
    q = tl.clamp(x * inverse[:, None], -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    return e4m3_grid(q).to(tl.float8e4nv), scale


@triton.jit
def _block_product(w, x, PRODUCT: tl.constexpr):
    """sum over one 128-column block of w[n, k] * x[m, k] -> [BLOCK_N, BLOCK_M] fp32 (swap AB). w: e4m3
    tile; x: e4m3 tile ("fp8") or fp32 values. See Fp8GemmLaunch.product."""
    if PRODUCT == "fp8":
        return tl.dot(w, tl.trans(x))
    elif PRODUCT == "ieee":
        return tl.dot(w.to(tl.float32), tl.trans(x), input_precision="ieee")
    elif PRODUCT == "bf16x1":
        return tl.dot(w.to(tl.bfloat16), tl.trans(x.to(tl.bfloat16)))
    else:
        wb = w.to(tl.bfloat16)
        hi = x.to(tl.bfloat16)
        rest = x - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        part = tl.dot(wb, tl.trans((rest - mid.to(tl.float32)).to(tl.bfloat16)))
        part = tl.dot(wb, tl.trans(mid), part)
        return tl.dot(wb, tl.trans(hi), part)


@triton.jit
def _weight_scale(ws_row, ws_tile, kb, n_mask, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr):
    """The e8m0 scales of K block kb for the tile's weight rows, as fp32: [BLOCK_N], or one scalar where the
    tile lies in one 128-row scale block (BLOCK_N <= 128: tiles start at multiples of BLOCK_N, which divides 128)."""
    if BLOCK_N <= 128:
        return e8m0_values(tl.load(ws_tile + kb))
    elif EVEN_N:
        return e8m0_values(tl.load(ws_row + kb))
    else:
        return e8m0_values(tl.load(ws_row + kb, mask=n_mask, other=127))


@triton.jit
def _split_product(w_row, x_row, xs_row, ws_row, ws_tile, n_mask, m_mask, K, first, last, ACT_QUANT: tl.constexpr,
                   X_CODES: tl.constexpr, PRODUCT: tl.constexpr, NATIVE_E4M3: tl.constexpr, EVEN_K: tl.constexpr,
                   EVEN_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The fp32 [BLOCK_N, BLOCK_M] sum of the 128-column K blocks [first, last), in block order. X_CODES: x holds
    e4m3 codes (`_act_quant_kernel`'s), their fp32 scales at xs_row + kb, multiplied as they are; otherwise x's
    values are read and, with ACT_QUANT, rounded here. EVEN_K (K a multiple of 128) and EVEN_N (N a multiple of
    BLOCK_N) drop the masks that cannot mask anything: the weight tile's copies are then unpredicated."""
    c = tl.arange(0, 128)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for kb in tl.range(first, last, num_stages=NUM_STAGES):
        k = kb * 128 + c
        if X_CODES:
            x_scale = tl.load(xs_row + kb, mask=m_mask, other=1.0)
        if EVEN_K:
            x = tl.load(x_row + k[None, :], mask=m_mask[:, None], other=0.0)
            if EVEN_N:
                w = tl.load(w_row + k[None, :])
            else:
                w = tl.load(w_row + k[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k_mask = k < K
            x = tl.load(x_row + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_row + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        w_scale = _weight_scale(ws_row, ws_tile, kb, n_mask, BLOCK_N, EVEN_N)
        if BLOCK_N > 128:
            w_scale = w_scale[:, None]
        if X_CODES:
            acc += _block_product(w, x, PRODUCT) * (w_scale * x_scale[None, :])
        elif ACT_QUANT:
            q, x_scale = _quantise_block(x.to(tl.float32), NATIVE_E4M3)
            acc += _block_product(w, q, PRODUCT) * (w_scale * x_scale[None, :])
        else:
            acc += _block_product(w, x.to(tl.float32), PRODUCT) * w_scale
    return acc


@triton.jit
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, stride_xm, stride_xg, GROUP_N, K_BLOCKS,
                     SPLITS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
                     ACT_QUANT: tl.constexpr, X_CODES: tl.constexpr, PRODUCT: tl.constexpr, SPLIT_OUT: tl.constexpr,
                     FOLD: tl.constexpr, PDL: tl.constexpr, PDL_WAIT: tl.constexpr, NUM_STAGES: tl.constexpr,
                     NATIVE_E4M3: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, GROUPED: tl.constexpr):
    """Program (n, m, s): out[m rows, n rows] over K blocks of split s. x [M, K] (row stride stride_xm),
    w [N, K] e4m3, ws [cdiv(N, 128), K_BLOCKS] e8m0 bytes (each weight row takes its 128-row block's scale).
    GROUPED: x is [M, G, K] (strides stride_xm, stride_xg) and weight rows [g * GROUP_N, (g + 1) * GROUP_N)
    multiply group g: the n tile's group is g = pid_n * BLOCK_N // GROUP_N (BLOCK_N divides GROUP_N, so a tile
    lies in one group), its x rows start g * stride_xg further, its x codes' scales (X_CODES) are row m * G + g
    of xs [M * G, K_BLOCKS]; otherwise (one group) stride_xg and GROUP_N are unused.
    SPLIT_OUT: out is the fp32 partials [SPLITS, M, N], this split's slice written; FOLD: this program adds
    all SPLITS splits, in order, as `_split_sum_kernel` does; otherwise out [M, N] in its dtype. PDL: the
    split sum may launch now (it waits for this grid before reading). X_CODES: x [M, K] holds e4m3 codes and
    xs [M, K_BLOCKS] their fp32 scales (`_act_quant_kernel`'s), which PDL_WAIT waits for (this grid was
    launched as that kernel's programmatic dependent); otherwise xs is unused. NATIVE_E4M3, EVEN_K, EVEN_N: see
    `_quantise_block` and `_split_product`."""
    if PDL_WAIT:
        tl.extra.cuda.gdc_wait()
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = n < N
    m_mask = m < M
    w_row = w_ptr + n.to(tl.int64)[:, None] * K
    x_row = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    xs_row = xs_ptr + m * K_BLOCKS
    if GROUPED:
        group = pid_n * BLOCK_N // GROUP_N
        x_row += group.to(tl.int64) * stride_xg
        xs_row = xs_ptr + (m * (N // GROUP_N) + group) * K_BLOCKS
    ws_row = ws_ptr + (n // 128) * K_BLOCKS
    ws_tile = ws_ptr + (pid_n * BLOCK_N // 128) * K_BLOCKS
    if FOLD:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for s in range(0, SPLITS):
            first = s * BLOCKS_PER_SPLIT
            acc += _split_product(w_row, x_row, xs_row, ws_row, ws_tile, n_mask, m_mask, K, first,
                                  tl.minimum(first + BLOCKS_PER_SPLIT, K_BLOCKS), ACT_QUANT, X_CODES, PRODUCT,
                                  NATIVE_E4M3, EVEN_K, EVEN_N, BLOCK_N, BLOCK_M, NUM_STAGES)
    else:
        first = pid_s * BLOCKS_PER_SPLIT
        acc = _split_product(w_row, x_row, xs_row, ws_row, ws_tile, n_mask, m_mask, K, first,
                             tl.minimum(first + BLOCKS_PER_SPLIT, K_BLOCKS), ACT_QUANT, X_CODES, PRODUCT, NATIVE_E4M3,
                             EVEN_K, EVEN_N, BLOCK_N, BLOCK_M, NUM_STAGES)
    if SPLIT_OUT:
        out = out_ptr + pid_s.to(tl.int64) * M * N + m[None, :] * N + n[:, None]
        tl.store(out, acc, mask=n_mask[:, None] & m_mask[None, :])
    else:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            acc = bf16_rounded(acc)
        tl.store(out_ptr + m[None, :] * N + n[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, K_BLOCKS, ROWS: tl.constexpr, NATIVE_E4M3: tl.constexpr,
                      PDL: tl.constexpr):
    """Program (r, kb): rows [r * ROWS, (r + 1) * ROWS) of x [M, K] (row stride stride_xm), K block kb, rounded
    as `_quantise_block` does: e4m3 codes to q [M, K], fp32 scales to s [M, K_BLOCKS]. PDL: the GEMM may launch
    now (it waits for this grid before reading q and s)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    kb = tl.program_id(1)
    k = kb * 128 + tl.arange(0, 128)
    row_mask = rows < M
    mask = row_mask[:, None] & (k < K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
    q, s = _quantise_block(x.to(tl.float32), NATIVE_E4M3)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * K + k[None, :], q, mask=mask)
    tl.store(s_ptr + rows * K_BLOCKS + kb, s, mask=row_mask)


@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, MN, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[i] = 0 + part[0, i] + part[1, i] + ... in that order (fp32; a folding GEMM program adds the same
    way), cast to out's dtype. PDL: launched as the GEMM's programmatic dependent: waits for it before reading."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(0, SPLITS):
        acc += tl.load(part_ptr + s * MN + i, mask=mask, other=0.0)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        acc = bf16_rounded(acc)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- host wrapper --------------------------------------------------------------------------------------
def _on_gpu(tensor: torch.Tensor) -> bool:
    """PDL is a CUDA launch attribute: cuda and meta (ahead-of-time builds) take it, the CPU interpreter not."""
    return tensor.device.type != "cpu"


def _folds(launch: Fp8GemmLaunch) -> bool:
    """Whether one program adds the splits (a single split has nothing to fold: its sum is written as is)."""
    return launch.fold_splits and launch.split_k > 1


def act_quant_launch(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, launch: Fp8GemmLaunch) -> KernelLaunch:
    """The rounding kernel's launch (`launch.prequantise`): x [M, K] -> codes [M, K] e4m3, scales [M, K_BLOCKS]."""
    (m, k), pdl = x.shape, launch.pdl and _on_gpu(x)
    return KernelLaunch(_act_quant_kernel, (triton.cdiv(m, QUANT_ROWS), scales.shape[1]),
                        dict(x_ptr=x, q_ptr=codes, s_ptr=scales, M=m, K=k, stride_xm=x.stride(0),
                             K_BLOCKS=scales.shape[1]),
                        dict(ROWS=QUANT_ROWS, NATIVE_E4M3=_on_gpu(x), PDL=pdl), dict(num_warps=4))


def gemm_launch(x, weight, scale, out, act_quant: bool, launch: Fp8GemmLaunch,
                x_scales: torch.Tensor | None = None) -> KernelLaunch:
    """The GEMM kernel's launch: x [M, K], or [M, G, K] for G groups (group g times weight rows
    [g * N/G, (g + 1) * N/G); launch.block_n divides N/G); `out` is the output [M, N], or the fp32 partials
    [split_k, M, N]. With `x_scales`, x holds `act_quant_launch`'s e4m3 codes and x_scales their scales."""
    m, k, n = x.shape[0], x.shape[-1], weight.shape[0]
    groups = x.shape[1] if x.dim() == 3 else 1
    fold = _folds(launch)
    split_out = launch.split_k > 1 and not fold
    codes = x_scales is not None
    pdl_wait = codes and launch.pdl and _on_gpu(x)
    args = dict(x_ptr=x, xs_ptr=x_scales if codes else x, w_ptr=weight, ws_ptr=scale.view(torch.uint8), out_ptr=out,
                M=m, N=n, K=k, stride_xm=x.stride(0), stride_xg=x.stride(1) if groups > 1 else 0,
                GROUP_N=n // groups, K_BLOCKS=scale.shape[1], SPLITS=launch.split_k)
    constexprs = dict(BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCKS_PER_SPLIT=launch.blocks_per_split,
                      ACT_QUANT=act_quant, X_CODES=codes, PRODUCT=launch.product, SPLIT_OUT=split_out, FOLD=fold,
                      PDL=split_out and launch.pdl and _on_gpu(x), PDL_WAIT=pdl_wait, NUM_STAGES=launch.num_stages,
                      NATIVE_E4M3=_on_gpu(x), EVEN_K=k % QUANT_BLOCK == 0, EVEN_N=n % launch.block_n == 0,
                      GROUPED=groups > 1)
    grid = (triton.cdiv(n, launch.block_n), triton.cdiv(m, launch.block_m), 1 if fold else launch.split_k)
    return KernelLaunch(_fp8_gemm_kernel, grid, args, constexprs,
                        dict(num_warps=launch.num_warps, **({"launch_pdl": True} if pdl_wait else {})))


def split_sum_launch(partials: torch.Tensor, out: torch.Tensor, launch: Fp8GemmLaunch) -> KernelLaunch:
    pdl = launch.pdl and _on_gpu(out)
    constexprs = dict(SPLITS=launch.split_k, BLOCK=SUM_BLOCK, PDL=pdl)
    return KernelLaunch(_split_sum_kernel, (triton.cdiv(out.numel(), SUM_BLOCK),),
                        dict(part_ptr=partials, out_ptr=out, MN=out.numel()), constexprs,
                        dict(num_warps=4, **({"launch_pdl": True} if pdl else {})))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
               out_dtype: torch.dtype, *, launch: Fp8GemmLaunch | None = None, out: torch.Tensor | None = None,
               launcher=JIT) -> torch.Tensor:
    """`x [M, K] @ dequant(weight [N, K], scale)^T` -> [M, N] in out_dtype; see codegen/fp8_linear.py for the
    contract. `launch`: default `fp8_gemm_launch` for x's device; `out`: optional [M, N] output to write
    (contiguous); `launcher`: codegen/kernels/launcher.py (Triton's JIT by default)."""
    check_operands(x, weight, scale, out_dtype)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    return _gemm(x, weight, scale, act_quant, out_dtype, launch, out, launcher)


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool,
                       out_dtype: torch.dtype, *, launch: Fp8GemmLaunch | None = None,
                       out: torch.Tensor | None = None, launcher=JIT) -> torch.Tensor:
    """`x [M, G, K]`, group g times weight rows [g*N, (g+1)*N) -> [M, G*N] in out_dtype, in one GEMM launch
    (see codegen/fp8_grouped_linear.py for the contract). One group is `fp8_linear` of x[:, 0], launch for
    launch. `launch`: default `fp8_gemm_launch` for (M, G*N, K) with weight tiles inside a group (its block_n
    must divide N); `out`, `launcher`: as fp8_linear's."""
    group_n = check_grouped_operands(x, weight, scale, out_dtype)
    if x.dim() != 3:
        raise ValueError(f"fp8_grouped_linear: x must be [M, G, K], got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return fp8_linear(x[:, 0], weight, scale, act_quant, out_dtype, launch=launch, out=out, launcher=launcher)
    (m, _, k), n = x.shape, weight.shape[0]
    launch = launch or fp8_gemm_launch(target_for_device(x.device), m, n, k, act_quant, x.dtype, group_rows=group_n)
    if group_n % launch.block_n:
        raise ValueError(f"{launch}: block_n must divide the {group_n} weight rows of a group")
    return _gemm(x, weight, scale, act_quant, out_dtype, launch, out, launcher)


def _gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, act_quant: bool, out_dtype: torch.dtype,
          launch: Fp8GemmLaunch | None, out: torch.Tensor | None, launcher) -> torch.Tensor:
    """The launches of x [M, K] or [M, G, K] (checked operands) times the weight, into out [M, N]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    m, k, n = x.shape[0], x.shape[-1], weight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} {(m, n)} tensor, got {out.dtype} {tuple(out.shape)}")
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    launch = launch or fp8_gemm_launch(target_for_device(x.device), m, n, k, act_quant, x.dtype)
    launch.check(k)
    if (launch.product == "fp8") != act_quant:
        raise ValueError(f"{launch}: act_quant={act_quant} needs {'fp8' if act_quant else 'non-fp8'} products")
    scale, x_scales = scale.contiguous(), None
    if launch.prequantise:
        rows = x.reshape(-1, k)  # [M * G, K]: each group's row rounded on its own, as the reference does
        codes = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
        x_scales = torch.empty((rows.shape[0], scale.shape[1]), dtype=torch.float32, device=x.device)
        launcher(act_quant_launch(rows, codes, x_scales, launch))
        x = codes.view(x.shape)
    if launch.split_k == 1 or _folds(launch):
        launcher(gemm_launch(x, weight, scale, out, act_quant, launch, x_scales))
        return out
    partials = torch.empty((launch.split_k, m, n), dtype=torch.float32, device=x.device)
    launcher(gemm_launch(x, weight, scale, partials, act_quant, launch, x_scales))
    launcher(split_sum_launch(partials, out, launch))
    return out
