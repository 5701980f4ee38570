"""The small building blocks of DeepSeek-V4's decode math, as plain functions over tensors.

Every function takes its weights as arguments (no module state), so the step that uses them can be
captured as one graph with the weights as inputs. Shapes use `...` for any leading batch/token dims.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from dsv4c.model.config import ModelConfig, YarnScaling
from dsv4c.model.numerics import Numerics
from dsv4c.model import rounding_ops


# ---- norms and linears ---------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 (weight optional), returned in x's dtype."""
    xf = x.float()
    out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, num: Numerics, quantized: bool) -> torch.Tensor:
    """`x @ weight.T` accumulated in fp32, returned in the activation dtype.

    `quantized` marks a weight released in FP8 or FP4: in faithful numerics its input is first rounded
    to FP8 e4m3 per token in blocks of 128, as DeepSeek's reference does before such matmuls (one
    `dsv4c::fake_quant_fp8` op, so a compiler finds the rounding as one node: model/rounding_ops.py).
    """
    if quantized and num.act_quant:
        x = rounding_ops.fake_quant_fp8(x, 128)
    return (x.float() @ weight.float().T).to(num.dtype)


# ---- RoPE ----------------------------------------------------------------------------------------
def rope_inv_freq(rope_dim: int, theta: float, yarn: YarnScaling | None) -> torch.Tensor:
    """Inverse frequencies of RoPE over `rope_dim` dims, with YaRN interpolation when given (no mscale)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn is None:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 keeps the original (extrapolated) frequency, 0 interpolates it by `factor`
    return inv_freq / yarn.factor * (1 - keep) + inv_freq * keep


def layer_inv_freq(cfg: ModelConfig, layer: int) -> torch.Tensor:
    """Compressed layers use compress_rope_theta with YaRN; window-only layers plain rope_theta."""
    if cfg.attention_kind(layer) == "window":
        return rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, None)
    return rope_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last `2 * len(inv_freq)` dims of x by interleaved pairs (x[2i], x[2i+1]).

    positions broadcasts against x's leading dims (x: [..., dim]; positions: [...] without dim).
    `inverse` rotates by the conjugate angle (used to rotate the attention output back).
    """
    rope_dim = 2 * inv_freq.numel()
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(x.device)
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    nope, rope = x[..., :-rope_dim], x[..., -rope_dim:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((nope, rotated.to(x.dtype)), dim=-1)


# ---- mHC -----------------------------------------------------------------------------------------
def hc_mixes(streams: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """`(x @ fn.T) * rsqrt(mean(x^2) + eps)` over the flattened streams `[..., n*D]`, in fp32."""
    x = streams.flatten(-2).float()
    return (x @ fn.float().T) * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project `[..., n, n]` logits towards a doubly stochastic matrix (softmax, then alternating norms)."""
    c = logits.softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def hc_pre(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC before a sub-layer: streams `[..., n, D]` -> (block input `[..., D]`, post `[..., n]`,
    comb `[..., n, n]`). The block input is `sum_j pre[j] * streams[j]` in fp32, cast to streams' dtype."""
    n = cfg.hc_mult
    mixes = hc_mixes(streams, fn, cfg.rms_norm_eps)
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + cfg.hc_eps
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb_logits = mixes[..., 2 * n:].unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)
    comb = sinkhorn(comb_logits, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    block_input = (pre.unsqueeze(-1) * streams.float()).sum(-2)
    return block_input.to(streams.dtype), post, comb


def hc_post(block_output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor) -> torch.Tensor:
    """mHC after a sub-layer: `new[k] = post[k] * f(a) + sum_j comb[j, k] * streams[j]` (fp32 inside)."""
    mixed = comb.transpose(-1, -2) @ streams.float()
    return (post.unsqueeze(-1) * block_output.float().unsqueeze(-2) + mixed).to(streams.dtype)


def hc_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            cfg: ModelConfig) -> torch.Tensor:
    """The final collapse of the streams: `sum_j (sigmoid(mixes * scale + base) + eps)[j] * streams[j]`."""
    mixes = hc_mixes(streams, fn, cfg.rms_norm_eps)
    pre = torch.sigmoid(mixes * scale.float()[0] + base.float()) + cfg.hc_eps
    return (pre.unsqueeze(-1) * streams.float()).sum(-2).to(streams.dtype)


# ---- MoE -----------------------------------------------------------------------------------------
def router_scores(x: torch.Tensor, gate: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Per-expert affinity scores in fp32 from `x.float() @ gate.float().T`."""
    logits = x.float() @ gate.float().T
    if scoring_func == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    if scoring_func == "sigmoid":
        return torch.sigmoid(logits)
    return logits.softmax(-1)


def route(x: torch.Tensor, tokens: torch.Tensor, w: dict[str, torch.Tensor], prefix: str,
          cfg: ModelConfig, hash_layer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids `[N, k]`, routing weights `[N, k]` fp32) for flattened tokens x `[N, D]`.

    Score routing selects `topk(scores + bias)` (the bias only selects); hash routing looks the ids
    up in `tid2eid[token]`. Weights are the selected scores, normalised, times routed_scaling_factor.
    """
    scores = router_scores(x, w[f"{prefix}gate.weight"], cfg.scoring_func)
    if hash_layer:
        ids = w[f"{prefix}gate.tid2eid"][tokens].long()
    else:
        ids = (scores + w[f"{prefix}gate.bias"].float()).topk(cfg.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(-1, ids)
    if cfg.norm_topk_prob and cfg.scoring_func != "softmax":
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * cfg.routed_scaling_factor


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, scale: torch.Tensor | None,
                  limit: float | None, num: Numerics) -> torch.Tensor:
    """`w2(silu(clamp(w1 x, max=limit)) * clamp(w3 x, -limit, limit) * scale)`; the SwiGLU and the
    routing weight in fp32, cast to the activation dtype before w2."""
    gate = linear(x, w1, num, quantized=True).float()
    up = linear(x, w3, num, quantized=True).float()
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    hidden = F.silu(gate) * up
    if scale is not None:
        hidden = hidden * scale.unsqueeze(-1)
    return linear(hidden.to(num.dtype), w2, num, quantized=True)


def routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w: dict[str, torch.Tensor],
                   prefix: str, cfg: ModelConfig, num: Numerics) -> torch.Tensor:
    """Sum over each token's selected experts of routing weight x expert output, in fp32 `[..., D]` for
    x `[..., D]`, ids and weights `[..., k]`: the definition every `RoutedExperts` computes.

    Eagerly only the experts some token selected run, each on its tokens. Traced by Dynamo
    (torch.compile of this model) the set of selected experts is data the graph cannot branch on, so
    every expert runs on every token with a routing weight of zero where it was not selected: the same
    function, as a graph of fixed shape. (The compiler's capture passes its own `RoutedExperts`.)
    """
    shape, k = x.shape, ids.shape[-1]
    flat, ids, weights = x.reshape(-1, shape[-1]), ids.reshape(-1, k), weights.reshape(-1, k)
    out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    if torch.compiler.is_compiling():
        combine = torch.zeros(flat.shape[0], cfg.n_routed_experts, dtype=torch.float32, device=flat.device)
        combine = combine.scatter(1, ids, weights)
        for expert in range(cfg.n_routed_experts):
            e = f"{prefix}experts.{expert}."
            y = swiglu_expert(flat, w[e + "w1.weight"], w[e + "w2.weight"], w[e + "w3.weight"], combine[:, expert],
                              cfg.swiglu_limit, num)
            out = out + y.float()
        return out.reshape(shape)
    for expert in ids.unique().tolist():
        rows, slot = (ids == expert).nonzero(as_tuple=True)
        e = f"{prefix}experts.{expert}."
        y = swiglu_expert(flat[rows], w[e + "w1.weight"], w[e + "w2.weight"], w[e + "w3.weight"],
                          weights[rows, slot], cfg.swiglu_limit, num)
        out.index_add_(0, rows, y.float())
    return out.reshape(shape)


# routed(x [..., D], ids [..., k], weights [..., k] fp32, w, prefix, cfg, num) -> fp32 [..., D]: what
# `routed_experts` computes, by any means (the compiler's capture passes one that calls its fused op).
RoutedExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], str, ModelConfig,
                          Numerics], torch.Tensor]


def moe(x: torch.Tensor, tokens: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig,
        hash_layer: bool, num: Numerics, routed: RoutedExperts = routed_experts) -> torch.Tensor:
    """Routed experts (weighted, computed by `routed`) plus the shared expert (unweighted) for x `[..., D]`."""
    shape = x.shape
    flat, flat_tokens = x.reshape(-1, shape[-1]), tokens.reshape(-1)
    ids, weights = route(flat, flat_tokens, w, prefix, cfg, hash_layer)
    lead = shape[:-1]
    routed_out = routed(x, ids.unflatten(0, lead), weights.unflatten(0, lead), w, prefix, cfg, num)
    s = f"{prefix}shared_experts."
    limit = cfg.swiglu_limit if num.shared_expert_clamp else None
    shared = swiglu_expert(flat, w[s + "w1.weight"], w[s + "w2.weight"], w[s + "w3.weight"], None, limit, num)
    return (routed_out.reshape(flat.shape) + shared.float()).to(num.dtype).reshape(shape)
