"""`dsv4c::compress_step_`: one KV compressor's step (model/attention.py `compress` after its two projections),
writing its rings and its packed cache in place.

    compress_step_(cache! uint8 [B, E + 1, R], kv_state! fp32 [B, C, F], score_state! fp32 [B, C, F],
                   kv fp32 [B, T, F], score fp32 [B, T, F], ape [ratio, F], norm_weight [width],
                   cos fp32 [B, T, r/2], sin fp32 [B, T, r/2], start int64 [B], ratio, eps, format, rounded, block,
                   rotate, dtype) -> cache

F is `coff * width`: coff 2 is the overlapping compressor (C4), whose window of 2 * ratio positions reads columns
[0, width) of its first `ratio` positions and [width, 2 * width) of the others; coff 1 reads `ratio` positions.
Rows of `cache` are `PackedLayout(format, width, rounded, block, dtype)` (codegen/kv_cache.py). Token t of
sequence b sits at p = start[b] + t; its score row is `score + ape[p % ratio]`. With every read seeing the state
as it was before the call:
- when (p + 1) % ratio == 0 the token completes entry i = p // ratio: softmax over its window's scores times its kv
  rows, summed (fp32), cast to `dtype`, RMSNorm (`norm_weight`, `eps`), the last r dims rotated by
  (cos[b, t], sin[b, t]) (the caller's RoPE angles: the model's are those of position i * ratio), with `rotate` the
  normalised Hadamard transform, then the model's rounding of the first `rounded` dims and `kv_pack`: the row is
  written at row min(i, E); every other token writes the packed zero row to the spill row E (`write_rows`);
- its (kv, score) rows go to slot p % C of `kv_state` / `score_state` (only the last C tokens when T > C).
The reference below is that math with the model's own functions, so a graph holding the op equals the model's
bit for bit on CPU. On CUDA tensors the Triton kernel of codegen/kernels/compressor.py runs instead: the same
roundings exactly, with other summation orders (softmax, norm), exp and fused multiply-adds; entries agree with
the reference within one rounding step of their format on a few elements (tests/test_compressor_fusion.py).

Why in place, and why not `custom_op`: the rings and the cache are state every step updates. A functional op
would return a new cache (up to max_seq_len / ratio rows) each step, and a step whose state is not written in place
cannot be replayed as a CUDA graph (runtime/step_runner.py). So the op writes its three state arguments and returns
the cache itself (schema `Tensor(a!) cache ... -> Tensor(a!)`, as aten's `scatter_` returns its self): the result
is the node every later reader of the cache (attention, the indexer) reads, which orders them after the write, and
passes/op_facts.py sees it as the cache's in-place result (mutated args, alias source), as it sees `scatter_`.
`torch.library.custom_op` cannot return an input, hence `torch.library.define` with that schema.

Why no online C128 variant (a running max, sum and weighted sum per sequence in place of the 128-slot rings): it
would move more bytes per step, not fewer (read and write three fp32 vectors of F every step, against writing two
rows of F and reading the window once a block), and it would fold rejected MTP drafts into its sums, which the
position-indexed rings never see (model/attention.py); its one gain, memory, would change the state layout.
"""

from __future__ import annotations

import torch

from dsv4c.codegen.cuda_impls import triton_kernels
from dsv4c.codegen.kv_cache import PackedLayout, pack_reference
from dsv4c.model.attention import ring_timeline, ring_write, token_windows
from dsv4c.model.layers import rms_norm
from dsv4c.model.quant import fake_quant_fp4, fake_quant_fp8, hadamard

KERNEL_MODULE = "dsv4c.codegen.kernels.compressor"
NAME = "dsv4c::compress_step_"
SCHEMA = ("(Tensor(a!) cache, Tensor(b!) kv_state, Tensor(c!) score_state, Tensor kv, Tensor score, Tensor ape, "
          "Tensor norm_weight, Tensor cos, Tensor sin, Tensor start, int ratio, float eps, str format, int rounded, "
          "int block, bool rotate, ScalarType dtype) -> Tensor(a!)")
ROUNDINGS = {"e4m3": fake_quant_fp8, "e2m1": fake_quant_fp4}


def check(cache: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor, kv: torch.Tensor,
          score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          start: torch.Tensor, ratio: int, format: str, rounded: int, block: int, dtype: torch.dtype) -> PackedLayout:
    """The cache's row layout, after checking shapes and dtypes (host metadata only)."""
    layout = PackedLayout(format, norm_weight.numel(), rounded, block, dtype)
    batch, steps, features = kv.shape
    coff = features // layout.width
    ok = (kv.dim() == 3 and features == coff * layout.width and coff in (1, 2) and ratio > 0
          and kv_state.shape == score_state.shape and kv_state.shape[::2] == (batch, features)
          and kv_state.shape[1] >= coff * ratio and score.shape == kv.shape and ape.shape == (ratio, features)
          and cos.shape == (batch, steps, cos.shape[-1]) and 0 < 2 * cos.shape[-1] <= layout.width
          and start.shape == (batch,) and start.dtype == torch.int64 and cache.dtype == torch.uint8 and cache.dim() == 3
          and cache.shape[0] == batch and cache.shape[2] == layout.row_bytes
          and all(t.dtype == torch.float32 for t in (kv_state, score_state, kv, score, cos)))
    ok = ok and sin.shape == cos.shape and sin.dtype == torch.float32
    if not ok:
        raise ValueError(f"compress_step_: cache {tuple(cache.shape)} {cache.dtype} (rows of {layout.row_bytes} B: "
                         f"{layout.describe()}), rings {tuple(kv_state.shape)} / {tuple(score_state.shape)}, kv "
                         f"{tuple(kv.shape)}, score {tuple(score.shape)}, ape {tuple(ape.shape)} (ratio {ratio}), "
                         f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, start {tuple(start.shape)} {start.dtype}: "
                         f"need fp32 rings, rows of coff * width with coff 1 or 2, int64 starts")
    return layout


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model/layers.py `apply_rope` with its angles' cos and sin given: the last `2 * cos.shape[-1]` dims of x rotated
    by interleaved pairs, in fp32, returned in x's dtype."""
    rope_dim = 2 * cos.shape[-1]
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)


def finish(x: torch.Tensor, layout: PackedLayout, rotate: bool) -> torch.Tensor:
    """The model's rounding of a cached row (model/attention.py `kv_rounding` / `indexer_rounding`)."""
    x = hadamard(x) if rotate else x
    rounded = ROUNDINGS[layout.format](x[..., :layout.rounded], layout.block)
    return torch.cat((rounded, x[..., layout.rounded:]), dim=-1)


def writes(cache: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor, kv: torch.Tensor,
           score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           start: torch.Tensor, ratio: int, eps: float, format: str, rounded: int, block: int, rotate: bool,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """model/attention.py `compress` from its projections on, as what the op writes: (cache row index `[B, T, R]`,
    packed rows `[B, T, R]` to scatter there, the new kv_state, the new score_state). Reads its arguments only."""
    layout = check(cache, kv_state, score_state, kv, score, ape, norm_weight, cos, sin, start, ratio, format,
                   rounded, block, dtype)
    width, steps = layout.width, kv.shape[1]
    coff = kv.shape[-1] // width
    positions = start.unsqueeze(1) + torch.arange(steps, device=kv.device)
    score = score + ape.float()[positions % ratio]
    kv_win = token_windows(ring_timeline(kv_state, kv, start), coff * ratio, steps)
    score_win = token_windows(ring_timeline(score_state, score, start), coff * ratio, steps)
    if coff == 2:
        kv_win = torch.cat((kv_win[:, :, :ratio, :width], kv_win[:, :, ratio:, width:]), dim=2)
        score_win = torch.cat((score_win[:, :, :ratio, :width], score_win[:, :, ratio:, width:]), dim=2)
    pooled = (score_win.softmax(dim=2) * kv_win).sum(dim=2).to(dtype)
    entry = positions // ratio
    rows = rotate_pairs(rms_norm(pooled, norm_weight, eps), cos, sin)
    done = (positions + 1) % ratio == 0
    packed = pack_reference(torch.where(done.unsqueeze(-1), finish(rows, layout, rotate), 0), format, rounded, block)
    spill = cache.shape[1] - 1
    target = torch.where(done, entry.clamp(max=spill), spill).unsqueeze(-1).expand(-1, -1, cache.shape[2])
    return target, packed, ring_write(kv_state, kv, start), ring_write(score_state, score, start)


def reference(cache: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The op's definition: `writes` made in place (the rings, then the cache's rows); returns the cache."""
    target, packed, new_kv_state, new_score_state = writes(cache, kv_state, score_state, *args, **kwargs)
    kv_state.copy_(new_kv_state)
    score_state.copy_(new_score_state)
    return cache.scatter_(1, target, packed)


def written_values(cache: torch.Tensor, kv_state: torch.Tensor, score_state: torch.Tensor, *args, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op as a function: the new (cache, kv_state, score_state), its arguments untouched (the ONNX export's
    body: an ONNX node returns new values)."""
    target, packed, new_kv_state, new_score_state = writes(cache, kv_state, score_state, *args, **kwargs)
    return cache.scatter(1, target, packed), new_kv_state, new_score_state


def fake(cache, kv_state, score_state, kv, score, ape, norm_weight, cos, sin, start, ratio, eps, format, rounded, block,
         rotate, dtype):
    """The shape function: the op returns its cache argument."""
    check(cache, kv_state, score_state, kv, score, ape, norm_weight, cos, sin, start, ratio, format, rounded, block,
          dtype)
    return cache


def cuda_impl(cache, kv_state, score_state, kv, score, ape, norm_weight, cos, sin, start, ratio, eps, format, rounded,
              block, rotate, dtype):
    """The Triton kernel (imported when the first CUDA call arrives; the reference where Triton is missing)."""
    args = (cache, kv_state, score_state, kv, score, ape, norm_weight, cos, sin, start, ratio, eps, format, rounded,
            block, rotate, dtype)
    kernels = triton_kernels(KERNEL_MODULE, NAME)
    if kernels is None:
        return reference(*args)
    check(*args[:10], ratio, format, rounded, block, dtype)
    return kernels.compress_step(*args)


torch.library.define(NAME, SCHEMA)
torch.library.impl(NAME, "CompositeExplicitAutograd")(reference)
torch.library.impl(NAME, "CUDA")(cuda_impl)
torch.library.register_fake(NAME)(fake)
compress_step_ = torch.ops.dsv4c.compress_step_.default
