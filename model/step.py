"""DeepSeek-V4's decode math in plain PyTorch: the semantic definition the compiler captures.

The step is functional: `forward(weights, state, tokens, start) -> (logits, hidden, new_state)` with
every piece of cache state an explicit tensor in a flat dict, for a batch of B sequences each taking
T tokens at positions `start[b] .. start[b] + T - 1`. Prefill is a step with many tokens, decode a step
with one (or 1 + drafts), so both run the same code. `mtp_forward` is the MTP module's step.

Weights are a flat dict keyed by the released checkpoint's names (section 5 of the spec) holding
exactly dequantised values (no `.scale` entries): see `dequantize_weights`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch

from dsv4c.model.attention import attention
from dsv4c.model.config import MAX_DRAFTS, ModelConfig
from dsv4c.model.layout import layer_prefix
from dsv4c.model.layers import (RoutedExperts, hc_head, hc_post, hc_pre, layer_inv_freq, linear, moe, rms_norm,
                                routed_experts)
from dsv4c.model.numerics import Numerics
from dsv4c.model.quant import dequant_fp4_weight, dequant_fp8_weight, fake_quant_fp4, fake_quant_fp8

Weights = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]

# Weights DeepSeek's reference keeps (or computes) in fp32 whatever the activation dtype.
_FP32_SUFFIXES = ("norm.weight", "attn_sink", "ape", "gate.weight", "gate.bias", "compressor.wkv.weight",
                  "compressor.wgate.weight")
_FP32_NAMES = ("head.weight",)


def _held_in_fp32(name: str) -> bool:
    return name.endswith(_FP32_SUFFIXES) or name in _FP32_NAMES or name.split(".")[-1].startswith("hc_")


Decoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dequantize_weights(raw: Mapping[str, torch.Tensor], num: Numerics, fp8: Decoder = dequant_fp8_weight,
                       fp4: Decoder = dequant_fp4_weight) -> Weights:
    """Release-format tensors -> the model's weights: FP8 (e4m3 + 128x128 e8m0 `.scale`) and MXFP4
    (int8 pairs + per-32 e8m0 `.scale`) decoded exactly by `fp8` / `fp4`; fp32-held weights in fp32,
    token tables as int64, everything else in the activation dtype (FP8 and FP4 values are exact in bf16)."""
    out: Weights = {}
    for name, tensor in raw.items():
        if name.endswith(".scale"):
            continue
        scale = raw.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
        if scale is not None and tensor.dtype == torch.int8:
            tensor = fp4(tensor, scale)
        elif scale is not None:
            tensor = fp8(tensor, scale)
        if name.endswith("tid2eid"):
            out[name] = tensor.to(torch.int64)
        else:
            out[name] = tensor.to(torch.float32 if _held_in_fp32(name) else num.dtype)
    return out


# ---- state -----------------------------------------------------------------------------------------
# A verification step over 1 + k tokens writes up to k - 1 positions past the next step's start that a rejection
# leaves stale; every ring carries that many slots of slack so a stale slot never aliases a position a later step
# reads (model/attention.py).
RING_SLACK = MAX_DRAFTS - 1


def state_shapes(cfg: ModelConfig, batch: int, max_seq_len: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, role) of every state tensor; role 'act' (activation dtype), 'kv' or 'score' (fp32,
    scores start at -inf). Rings hold the positions one step reads plus RING_SLACK slots."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for layer in range(cfg.n_layers_total):
        p = layer_prefix(cfg, layer)
        shapes[p + "window_kv"] = ((batch, cfg.sliding_window + RING_SLACK, cfg.head_dim), "act")
        ratio = cfg.compress_ratios[layer]
        if not ratio:
            continue
        coff = 2 if ratio == 4 else 1
        branches = [("compressor.", "compressed_kv", cfg.head_dim)]
        if ratio == 4:
            branches.append(("indexer.", "indexer_kv", cfg.index_head_dim))
        for ring, cache, width in branches:
            slots = coff * ratio + RING_SLACK
            shapes[p + ring + "kv_state"] = ((batch, slots, coff * width), "kv")
            shapes[p + ring + "score_state"] = ((batch, slots, coff * width), "score")
            shapes[p + cache] = ((batch, max_seq_len // ratio + 1, width), "act")  # + the spill row
    return shapes


@dataclasses.dataclass(frozen=True)
class CacheRounding:
    """How the model rounds every value it writes to one cache: the first `rounded` dims of each row to `format`
    ('e4m3' or 'e2m1') with a power-of-two scale per `block` dims (model/quant.py), the rest as they are."""

    format: str
    rounded: int
    block: int

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., width]` rounded as the model rounds what it writes to this cache."""
        fake = fake_quant_fp8 if self.format == "e4m3" else fake_quant_fp4
        return torch.cat((fake(x[..., :self.rounded], self.block), x[..., self.rounded:]), dim=-1)


def cache_roundings(cfg: ModelConfig, num: Numerics) -> dict[str, CacheRounding]:
    """State name -> the rounding of what the step writes there (model/attention.py `kv_rounding`,
    `indexer_rounding`): window and compressed KV with `kv_fp8`, indexer keys with `indexer_fp4`. A compiler may
    store these caches as codes and scales (passes/kv_compression.py); every other state holds raw values."""
    out: dict[str, CacheRounding] = {}
    for name in state_shapes(cfg, 1, cfg.sliding_window):
        if num.kv_fp8 and name.endswith(("window_kv", "compressed_kv")):
            out[name] = CacheRounding("e4m3", cfg.nope_head_dim, 64)
        elif num.indexer_fp4 and name.endswith("indexer_kv"):
            out[name] = CacheRounding("e2m1", cfg.index_head_dim, 32)
    return out


def init_state(cfg: ModelConfig, batch: int, max_seq_len: int, num: Numerics,
               device: torch.device | str = "cpu") -> State:
    """Empty caches for `batch` sequences of up to `max_seq_len` tokens."""
    state: State = {}
    for name, (shape, role) in state_shapes(cfg, batch, max_seq_len).items():
        if role == "score":
            state[name] = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
        else:
            state[name] = torch.zeros(shape, dtype=num.dtype if role == "act" else torch.float32, device=device)
    return state


def _layer_state(state: State, prefix: str) -> State:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---- the step --------------------------------------------------------------------------------------
def block(streams: torch.Tensor, tokens: torch.Tensor, start: torch.Tensor, layer: int, w: Weights,
          state: State, cfg: ModelConfig, num: Numerics,
          routed: RoutedExperts = routed_experts) -> tuple[torch.Tensor, State]:
    """One layer: mHC-pre, attn_norm, attention, mHC-post, then the same around the MoE (whose routed
    experts `routed` computes)."""
    p = layer_prefix(cfg, layer)
    block_in, post, comb = hc_pre(streams, w[p + "hc_attn_fn"], w[p + "hc_attn_base"], w[p + "hc_attn_scale"], cfg)
    x = rms_norm(block_in, w[p + "attn_norm.weight"], cfg.rms_norm_eps)
    out, layer_state = attention(x, start, layer, p, w, _layer_state(state, p), cfg, layer_inv_freq(cfg, layer), num)
    streams = hc_post(out, streams, post, comb)
    block_in, post, comb = hc_pre(streams, w[p + "hc_ffn_fn"], w[p + "hc_ffn_base"], w[p + "hc_ffn_scale"], cfg)
    x = rms_norm(block_in, w[p + "ffn_norm.weight"], cfg.rms_norm_eps)
    streams = hc_post(moe(x, tokens, w, p + "ffn.", cfg, cfg.is_hash_layer(layer), num, routed), streams, post, comb)
    return streams, {p + k: v for k, v in layer_state.items()}


def lm_head(streams: torch.Tensor, w: Weights, prefix: str, cfg: ModelConfig) -> torch.Tensor:
    """hc_head collapse, final RMSNorm, then the LM head in fp32: logits `[..., V]`."""
    x = hc_head(streams, w[prefix + "hc_head_fn"], w[prefix + "hc_head_base"], w[prefix + "hc_head_scale"], cfg)
    x = rms_norm(x, w[prefix + "norm.weight"], cfg.rms_norm_eps)
    return x.float() @ w["head.weight"].float().T


def _effective(cfg: ModelConfig, num: Numerics) -> Numerics:
    """Activation quantisation exists only where the weights are FP8/FP4."""
    return num if cfg.fp8_weights else num.replace(act_quant=False)


def forward(w: Weights, state: State, tokens: torch.Tensor, start: torch.Tensor, cfg: ModelConfig,
            num: Numerics, routed: RoutedExperts = routed_experts) -> tuple[torch.Tensor, torch.Tensor, State]:
    """The main model's step: tokens `[B, T]` at positions start `[B]` + 0..T-1 ->
    (logits `[B, T, V]` fp32, hidden streams before hc_head `[B, T, n, D]` for MTP, new state).
    `routed` computes the routed experts (layers.RoutedExperts; the compiler passes its fused op)."""
    num = _effective(cfg, num)
    h = w["embed.weight"][tokens].to(num.dtype)
    streams = h.unsqueeze(-2).expand(*h.shape[:-1], cfg.hc_mult, h.shape[-1]).contiguous()
    new_state = dict(state)
    for layer in range(cfg.num_hidden_layers):
        streams, layer_state = block(streams, tokens, start, layer, w, state, cfg, num, routed)
        new_state.update(layer_state)
    return lm_head(streams, w, "", cfg), streams, new_state


def mtp_forward(w: Weights, state: State, next_tokens: torch.Tensor, hidden: torch.Tensor, start: torch.Tensor,
                cfg: ModelConfig, num: Numerics,
                routed: RoutedExperts = routed_experts) -> tuple[torch.Tensor, torch.Tensor, State]:
    """The MTP module's step: hidden streams h_t `[B, T, n, D]` paired with token t+1 `[B, T]` at the
    positions of h_t -> (draft logits for token t+2 `[B, T, V]`, its output streams, new state).
    `routed` as in `forward`."""
    num = _effective(cfg, num)
    layer = cfg.num_hidden_layers
    p = layer_prefix(cfg, layer)
    e = rms_norm(w["embed.weight"][next_tokens].to(num.dtype), w[p + "enorm.weight"], cfg.rms_norm_eps)
    h = rms_norm(hidden.to(num.dtype), w[p + "hnorm.weight"], cfg.rms_norm_eps)
    streams = (linear(e, w[p + "e_proj.weight"], num, True).unsqueeze(-2).float()
               + linear(h, w[p + "h_proj.weight"], num, True).float()).to(num.dtype)
    streams, layer_state = block(streams, next_tokens, start, layer, w, state, cfg, num, routed)
    new_state = dict(state)
    new_state.update(layer_state)
    return lm_head(streams, w, p, cfg), streams, new_state
