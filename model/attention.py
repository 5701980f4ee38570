"""DeepSeek-V4 attention for a step of T tokens per sequence: sliding window, compressors, indexer.

State is indexed by absolute position, never shifted, so a step is a pure function of
(weights, state, x, start) and a rejected speculative token leaves nothing a later step reads:
- a ring of C = W + S slots holds the raw per-token values of the last C positions, position p in slot p % C,
  where W is what one query reads (the window KV: W = sliding_window; each compressor's projections:
  W = coff * ratio, the positions one pooled entry reads) and S the slack of the state's shape
  (model/step.py RING_SLACK). A verification step of 1 + k tokens at `start` writes positions up to
  start + k; the next step starts at some start' > start, so the stale ones are p <= start' + k - 1, and slot
  p % C aliases position p - C < start' - W + 1, older than any position a later step reads, when S >= k - 1;
- compressed entry i (the pool of positions [i*ratio, (i+1)*ratio), plus the previous block's first half
  for the overlapping C4 compressor) lives at row i of its cache and is visible to a query at position q
  iff (i + 1) * ratio <= q + 1.
A step reads the ring as a timeline of positions `start - C .. start - 1`, appends its T new tokens, and
gives each new token its own window of the W positions ending on it (the window attention's keys and each
compressor's pooled rows), so a token's keys, their order and their masks are the same whatever T is (a row's
result does not depend on how many tokens its step holds); it pools every window that ends on a new token,
attends with masks by position, and then writes only what it filled: its tokens into their ring slots (the
last C of them when T > C) and each completed entry into its cache row. Every write is a `scatter` into the state tensor it updates, so a step's new state is the old one
with those slots replaced, and a compiler may perform the writes in place (passes/reinplace_state.py).
A compressed cache has one spill row past its capacity: tokens that complete no entry write there, so
no two writes of a step meet in a row that is ever read (the spill row is never visible).
"""

from __future__ import annotations

from typing import Callable

import torch

from dsv4c.model.config import ModelConfig
from dsv4c.model.layers import apply_rope, linear, rms_norm
from dsv4c.model.numerics import Numerics
from dsv4c.model import rounding_ops
from dsv4c.model.quant import hadamard

Weights = dict[str, torch.Tensor]
Rounding = Callable[[torch.Tensor], torch.Tensor]


# ---- position-indexed rings ----------------------------------------------------------------------
def ring_timeline(ring: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """ring `[B, C, F]` + new `[B, T, F]` -> `[B, C + T, F]` holding positions start-C .. start+T-1."""
    slots = ring.shape[1]
    positions = start.unsqueeze(1) - slots + torch.arange(slots, device=ring.device)
    old = ring.gather(1, (positions % slots).unsqueeze(-1).expand(-1, -1, ring.shape[-1]))
    return torch.cat((old, new.to(ring.dtype)), dim=1)


def token_windows(line: torch.Tensor, width: int, steps: int) -> torch.Tensor:
    """timeline `[B, L, F]` whose last `steps` entries are a step's tokens -> `[B, steps, width, F]`: each
    token's window of the `width` entries ending on it, oldest first."""
    return line.unfold(1, width, 1)[:, -steps:].transpose(-1, -2)


def ring_write(ring: torch.Tensor, new: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """ring `[B, C, F]` with the step's tokens new `[B, T, F]` (positions start .. start+T-1) written at slot
    p % C; when T > C only the last C tokens, so no slot is written twice."""
    slots, steps = ring.shape[1], new.shape[1]
    kept = min(steps, slots)
    positions = start.unsqueeze(1) + (steps - kept) + torch.arange(kept, device=ring.device)
    index = (positions % slots).unsqueeze(-1).expand(-1, -1, ring.shape[-1])
    return ring.scatter(1, index, new[:, steps - kept:].to(ring.dtype))


def write_rows(cache: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """cache `[B, E + 1, F]` (E entries and the spill row) with values `[B, T, F]` written at rows `[B, T]`
    where keep is true; the other tokens write zeros to the spill row, so it holds zeros whichever of its
    writes lands last."""
    spill = cache.shape[1] - 1
    target = torch.where(keep, rows.clamp(max=spill), spill)
    values = torch.where(keep.unsqueeze(-1), values.to(cache.dtype), 0)
    return cache.scatter(1, target.unsqueeze(-1).expand(-1, -1, cache.shape[2]), values)


# ---- compressor ----------------------------------------------------------------------------------
def compress(x: torch.Tensor, start: torch.Tensor, w: Weights, prefix: str, state: dict[str, torch.Tensor],
             ratio: int, width: int, inv_freq: torch.Tensor, finish: Rounding, cfg: ModelConfig,
             num: Numerics) -> dict[str, torch.Tensor]:
    """Gated pooling of every `ratio` tokens into one entry of `width` dims; returns the updated state.

    C4 (ratio 4) pools 8 rows: the previous block's tokens through the first half of the projections,
    the current block's through the second half. After pooling: RMSNorm, RoPE at the block's first
    position, then `finish` (the FP8 or Hadamard+FP4 rounding of the branch).
    """
    coff = 2 if ratio == 4 else 1
    slots = coff * ratio
    steps = x.shape[1]
    positions = start.unsqueeze(1) + torch.arange(steps, device=x.device)
    kv = x.float() @ w[prefix + "wkv.weight"].float().T
    score = x.float() @ w[prefix + "wgate.weight"].float().T + w[prefix + "ape"].float()[positions % ratio]
    kv_line = ring_timeline(state["kv_state"], kv, start)
    score_line = ring_timeline(state["score_state"], score, start)
    kv_win = token_windows(kv_line, slots, steps)  # [B, T, slots, coff*width]
    score_win = token_windows(score_line, slots, steps)
    if coff == 2:
        kv_win = torch.cat((kv_win[:, :, :ratio, :width], kv_win[:, :, ratio:, width:]), dim=2)
        score_win = torch.cat((score_win[:, :, :ratio, :width], score_win[:, :, ratio:, width:]), dim=2)
    pooled = (score_win.softmax(dim=2) * kv_win).sum(dim=2).to(num.dtype)
    entry = positions // ratio
    pooled = apply_rope(rms_norm(pooled, w[prefix + "norm.weight"], cfg.rms_norm_eps), entry * ratio, inv_freq)
    done = (positions + 1) % ratio == 0
    return {
        "kv_state": ring_write(state["kv_state"], kv, start),
        "score_state": ring_write(state["score_state"], score, start),
        "cache": write_rows(state["cache"], entry, finish(pooled), done),
    }


def kv_rounding(cfg: ModelConfig, num: Numerics) -> Rounding:
    """FP8 rounding of the no-RoPE dims in blocks of 64 (the model's QAT simulation), if enabled: one
    `dsv4c::fake_quant_fp8` node, so a compiler finds what a cache stores (passes/kv_compression.py)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        if not num.kv_fp8:
            return x
        nope = x[..., : cfg.nope_head_dim]
        return torch.cat((rounding_ops.fake_quant_fp8(nope, 64), x[..., cfg.nope_head_dim:]), dim=-1)
    return fn


def indexer_rounding(cfg: ModelConfig, num: Numerics) -> Rounding:
    """Normalised Hadamard rotation then FP4 rounding in blocks of 32 (one `dsv4c::fake_quant_fp4` node), if
    enabled."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        return rounding_ops.fake_quant_fp4(hadamard(x), 32) if num.indexer_fp4 else x
    return fn


# ---- selection and attention ---------------------------------------------------------------------
def visible_entries(positions: torch.Tensor, capacity: int, ratio: int) -> torch.Tensor:
    """`[B, T, E]` mask: entry i is complete for a query at position q iff (i + 1) * ratio <= q + 1."""
    entries = torch.arange(capacity, device=positions.device)
    return entries < ((positions + 1) // ratio).unsqueeze(-1)


def indexer_select(x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor, w: Weights, prefix: str,
                   keys: torch.Tensor, cfg: ModelConfig, inv_freq: torch.Tensor,
                   num: Numerics) -> tuple[torch.Tensor, torch.Tensor]:
    """Lightning Indexer: (entry ids `[B, T, k]`, valid `[B, T, k]`) of the top-k complete entries by
    `sum_h w[h] * relu(q_I[h] . K_I[entry])`."""
    heads, dim = cfg.index_n_heads, cfg.index_head_dim
    q = linear(qr, w[prefix + "wq_b.weight"], num, quantized=True).unflatten(-1, (heads, dim))
    q = indexer_rounding(cfg, num)(apply_rope(q, positions.unsqueeze(-1), inv_freq))
    head_w = linear(x, w[prefix + "weights_proj.weight"], num, quantized=False).float()
    head_w = head_w * (dim ** -0.5 * heads ** -0.5)
    logits = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu()
    scores = (logits * head_w.unsqueeze(-1)).sum(dim=2)
    scores = scores.masked_fill(~visible_entries(positions, keys.shape[1], 4), float("-inf"))
    top = scores.topk(min(cfg.index_topk, keys.shape[1]), dim=-1)
    return top.indices, top.values > float("-inf")


def attend(q: torch.Tensor, key_sets: list[tuple[torch.Tensor, torch.Tensor, str]], sink: torch.Tensor,
           scale: float, num: Numerics) -> torch.Tensor:
    """Softmax attention of q `[B, T, H, d]` over several key sets (K = V) in one softmax whose
    denominator also holds the per-head sink. A key set is (keys, mask, layout) with layout 'shared'
    (keys `[B, S, d]`, mask `[B, T, S]`) or 'per_query' (keys `[B, T, S, d]`, mask `[B, T, S]`)."""
    logits = []
    for keys, mask, layout in key_sets:
        pattern = "bthd,bsd->bths" if layout == "shared" else "bthd,btsd->bths"
        s = torch.einsum(pattern, q.float(), keys.float()) * scale
        logits.append(s.masked_fill(~mask.unsqueeze(2), float("-inf")))
    joined = torch.cat(logits, dim=-1)
    sink = sink.float().view(1, 1, -1, 1)
    peak = torch.maximum(joined.amax(-1, keepdim=True), sink)
    weights = torch.exp(joined - peak)
    probs = (weights / (weights.sum(-1, keepdim=True) + torch.exp(sink - peak))).to(num.dtype)
    out, offset = 0.0, 0
    for keys, _, layout in key_sets:
        p = probs[..., offset: offset + keys.shape[-2]].float()
        offset += keys.shape[-2]
        pattern = "bths,bsd->bthd" if layout == "shared" else "bths,btsd->bthd"
        out = out + torch.einsum(pattern, p, keys.float())
    return out.to(num.dtype)


def attention(x: torch.Tensor, start: torch.Tensor, layer: int, prefix: str, w: Weights,
              state: dict[str, torch.Tensor], cfg: ModelConfig, inv_freq: torch.Tensor,
              num: Numerics) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One attention sub-layer over x `[B, T, D]` (the normed block input); returns (output, new state)."""
    heads, dim, window = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    positions = start.unsqueeze(1) + torch.arange(x.shape[1], device=x.device)  # [B, T]
    qr = rms_norm(linear(x, w[prefix + "attn.wq_a.weight"], num, True), w[prefix + "attn.q_norm.weight"],
                  cfg.rms_norm_eps)
    q = rms_norm(linear(qr, w[prefix + "attn.wq_b.weight"], num, True).unflatten(-1, (heads, dim)), None,
                 cfg.rms_norm_eps)
    q = apply_rope(q, positions.unsqueeze(-1), inv_freq)
    kv = rms_norm(linear(x, w[prefix + "attn.wkv.weight"], num, True), w[prefix + "attn.kv_norm.weight"],
                  cfg.rms_norm_eps)
    kv = kv_rounding(cfg, num)(apply_rope(kv, positions, inv_freq))

    kv_line = ring_timeline(state["window_kv"], kv, start)  # positions start-C .. start+T-1
    window_keys = token_windows(kv_line, window, x.shape[1])  # query q: positions q-window+1 .. q
    key_pos = positions.unsqueeze(-1) - window + 1 + torch.arange(window, device=x.device)
    new_state = {"window_kv": ring_write(state["window_kv"], kv, start)}
    key_sets = [(window_keys, key_pos >= 0, "per_query")]

    ratio = cfg.compress_ratios[layer]
    if ratio:
        main = compress(x, start, w, prefix + "attn.compressor.", _sub(state, "compressor.", "compressed_kv"),
                        ratio, dim, inv_freq, kv_rounding(cfg, num), cfg, num)
        new_state.update(_unsub(main, "compressor.", "compressed_kv"))
        if ratio == 4:
            index = compress(x, start, w, prefix + "attn.indexer.compressor.",
                             _sub(state, "indexer.", "indexer_kv"), ratio, cfg.index_head_dim, inv_freq,
                             indexer_rounding(cfg, num), cfg, num)
            new_state.update(_unsub(index, "indexer.", "indexer_kv"))
            ids, valid = indexer_select(x, qr, positions, w, prefix + "attn.indexer.", index["cache"], cfg,
                                        inv_freq, num)
            chosen = main["cache"].unsqueeze(1).expand(-1, ids.shape[1], -1, -1)
            chosen = chosen.gather(2, ids.unsqueeze(-1).expand(-1, -1, -1, dim))
            key_sets.append((chosen, valid, "per_query"))
        else:
            key_sets.append((main["cache"], visible_entries(positions, main["cache"].shape[1], ratio), "shared"))

    out = attend(q, key_sets, w[prefix + "attn.attn_sink"], dim ** -0.5, num)
    out = apply_rope(out, positions.unsqueeze(-1), inv_freq, inverse=True)
    return output_projection(out, w, prefix, cfg, num), new_state


def output_projection(out: torch.Tensor, w: Weights, prefix: str, cfg: ModelConfig, num: Numerics) -> torch.Tensor:
    """Grouped low-rank projection: group g's slice of the output times its rows of `wo_a` (a plain fp32
    product, no activation rounding: DeepSeek's grouped einsum, one group at a time), then `wo_b`."""
    groups = cfg.o_groups
    grouped = out.flatten(-2).unflatten(-1, (groups, -1))  # [B, T, G, H*d/G]
    wo_a = w[prefix + "attn.wo_a.weight"]  # [G * o_lora, H*d/G], group g in rows g*o_lora .. (g+1)*o_lora
    rows = wo_a.shape[0] // groups
    mid = torch.cat([linear(grouped[..., g, :], wo_a[g * rows:(g + 1) * rows], num, quantized=False)
                     for g in range(groups)], dim=-1)
    return linear(mid, w[prefix + "attn.wo_b.weight"], num, quantized=True)


def _sub(state: dict[str, torch.Tensor], ring: str, cache: str) -> dict[str, torch.Tensor]:
    return {"kv_state": state[ring + "kv_state"], "score_state": state[ring + "score_state"], "cache": state[cache]}


def _unsub(part: dict[str, torch.Tensor], ring: str, cache: str) -> dict[str, torch.Tensor]:
    return {ring + "kv_state": part["kv_state"], ring + "score_state": part["score_state"], cache: part["cache"]}
