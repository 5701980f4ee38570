"""transformers' `DeepseekV4ForCausalLM` (5.24.0) as an independent fp32 reference for tests.

API: `to_transformers_config(cfg)`, `load_transformers_model(ckpt_dir)`, `transformers_logits(model, ids,
prefill)`; `transformers_model_from_tensors(cfg, tensors)` is the loader's core, for tests that edit tensors.

How a released-layout checkpoint gets in (facts checked against transformers 5.24.0 on CPU):
- transformers' own route, `from_pretrained(dir, quantization_config=FineGrainedFP8Config(dequantize=True))`,
  needs `accelerate` (ImportError "Loading an FP8 quantized model requires accelerate" without it; a
  `device_map` needs it too). With it, it loads the released names (its FP8 quantizer renames `.scale` to
  `weight_scale_inv`) and dequantises FP8 and MXFP4 (int8 weights are unpacked as e2m1, low nibble first),
  but `Fp8Dequantize` derives the block size as `dim // scale_dim`, so a dim that is not a multiple of 128
  with more than one block is dequantised with the wrong blocks, silently (tiny's `wo_a`, in = 192), or
  raises "not divisible by scale grid"; and a weight whose `.scale` is missing is loaded as raw e4m3 codes
  with no report. Released Flash/Pro dims are all multiples of 128, so only small configs are hit.
- So this module dequantises itself, with transformers' own `Fp8Dequantize._dequantize_one` on weights
  zero-padded to whole 128x128 blocks (FP4's [1, 32] blocks are always whole), and loads the dequantised
  tensors under their released names through `from_pretrained(state_dict=...)`, which applies the
  `deepseek_v4` conversion mapping (renames, per-expert w1/w3 -> gate_up_proj, w2 -> down_proj). No
  `accelerate` needed. transformers does not build MTP: `mtp.*` tensors are dropped before loading.
- `from_pretrained` leaves a missing weight randomly initialised and only lists it in `missing_keys`; the
  loader here fails on any missing, unexpected or mismatched key, and on any FP8/FP4 weight without scale.
- A released config.json whose HCA ratio is not 128 cannot be read by `DeepseekV4Config` (its legacy
  `compress_ratios` path maps only 0/4/128: KeyError 16 for `tiny`), so the config always comes from
  `to_transformers_config`.

Top-k ties: the Lightning Indexer's score `sum_h w[h] * relu(q_h . k)` is exactly 0 whenever every head's
dot product is negative, frequent with tiny's 4 index heads; `torch.topk` then picks among equal scores in
an implementation-defined order that changes with the tensor length (prefill-vs-one-shot logits differed by
0.74 on tiny). `load_transformers_model(..., break_index_ties=True)` (default) adds a forward hook to each
indexer scorer that orders exactly-zero scores by entry index (lowest wins); other scores are untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer

from dsv4c.model.config import ModelConfig

FP8_BLOCK = 128
_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention"}


# ---- config --------------------------------------------------------------------------------------
def to_transformers_config(cfg: ModelConfig) -> DeepseekV4Config:
    """The `DeepseekV4Config` of `cfg` (main layers only: transformers does not build MTP)."""
    layers = cfg.num_hidden_layers
    ratios = cfg.compress_ratios[:layers]
    hca = sorted({r for r in ratios if r not in _LAYER_TYPE})
    if len(hca) > 1:
        raise ValueError(f"compress_ratios: transformers takes one HCA ratio, got {hca}")
    rotary = cfg.qk_rope_head_dim / cfg.head_dim
    compress = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        y = cfg.rope_scaling
        compress = {"rope_type": "yarn", "factor": y.factor, "beta_fast": y.beta_fast, "beta_slow": y.beta_slow,
                    "original_max_position_embeddings": y.original_max_position_embeddings,
                    "attention_factor": 1.0}  # DeepSeek applies no YaRN mscale to cos/sin
    extra = {}
    if cfg.fp8_weights:
        extra["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128],
            "activation_scheme": "dynamic", "expert_dtype": cfg.expert_dtype}
    return DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, partial_rotary_factor=rotary, q_lora_rank=cfg.q_lora_rank,
        o_groups=cfg.o_groups, o_lora_rank=cfg.o_lora_rank, sliding_window=cfg.sliding_window,
        layer_types=[_LAYER_TYPE.get(r, "heavily_compressed_attention") for r in ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128},
        index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim, index_topk=cfg.index_topk,
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(layers)],
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        routed_scaling_factor=cfg.routed_scaling_factor, scoring_func=cfg.scoring_func,
        norm_topk_prob=cfg.norm_topk_prob, swiglu_limit=cfg.swiglu_limit,
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={
            "main": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": rotary},
            "compress": {**compress, "rope_theta": cfg.compress_rope_theta, "partial_rotary_factor": rotary}},
        max_position_embeddings=cfg.max_position_embeddings,
        num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, tie_word_embeddings=False, **extra)


# ---- loading -------------------------------------------------------------------------------------
def read_checkpoint(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """config.json and every tensor of a released-layout checkpoint (sharded with an index, or one file)."""
    root = Path(ckpt_dir)
    cfg = ModelConfig.from_json(root / "config.json")
    index = root / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(root / file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return cfg, tensors


def dequantize(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released tensors -> fp32 `.weight`s without `.scale`s, decoded by transformers' `Fp8Dequantize`
    (FP8 weights padded to whole 128x128 blocks first). Other tensors pass through unchanged."""
    decoder = Fp8Dequantize(None)
    scales = {name for name in tensors if name.endswith(".scale")}
    out = {}
    for name, tensor in tensors.items():
        if name in scales:
            if name.removesuffix(".scale") + ".weight" not in tensors:
                raise AssertionError(f"{name}: a scale without its weight")
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".scale") if name.endswith(".weight") else None
        if scale is None:
            if tensor.dtype in (torch.float8_e4m3fn, torch.int8):
                raise AssertionError(f"{name}: {tensor.dtype} weight without its .scale")
            out[name] = tensor
        elif tensor.dtype == torch.int8:  # MXFP4: [out, in/2] with [out, in/32] scales
            if tuple(scale.shape) != (tensor.shape[0], tensor.shape[1] * 2 // 32):
                raise AssertionError(f"{name}: FP4 scale shape {tuple(scale.shape)} for weight {tuple(tensor.shape)}")
            out[name] = decoder._dequantize_one(tensor, scale, torch.float32)
        else:  # FP8 e4m3 with [ceil(out/128), ceil(in/128)] scales
            rows, cols = tensor.shape
            if tuple(scale.shape) != (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)):
                raise AssertionError(f"{name}: FP8 scale shape {tuple(scale.shape)} for weight {(rows, cols)}")
            padded = tensor.new_zeros(scale.shape[0] * FP8_BLOCK, scale.shape[1] * FP8_BLOCK)
            padded[:rows, :cols] = tensor
            out[name] = decoder._dequantize_one(padded, scale, torch.float32)[:rows, :cols].contiguous()
    return out


def transformers_model_from_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], *,
                                    break_index_ties: bool = True) -> DeepseekV4ForCausalLM:
    """An fp32 eval-mode model from released-layout tensors; fails unless every weight is loaded exactly
    once (anything missing, unexpected or mismatched, apart from the dropped `mtp.*`)."""
    weights = {name: t for name, t in dequantize(tensors).items() if not name.startswith("mtp.")}
    config = to_transformers_config(cfg.replace(fp8_weights=False, expert_dtype="fp8"))  # already dequantised
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        None, config=config, state_dict=weights, dtype=torch.float32, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise AssertionError(f"transformers did not load the checkpoint exactly: {problems}")
    if break_index_ties:
        for module in model.modules():
            if isinstance(module, DeepseekV4IndexerScorer):
                module.register_forward_hook(_lowest_index_wins)
    return model.eval().requires_grad_(False)


def load_transformers_model(ckpt_dir: str | Path, *, break_index_ties: bool = True) -> DeepseekV4ForCausalLM:
    """transformers' DeepSeek-V4 in fp32 from a released-layout checkpoint directory (see module doc)."""
    cfg, tensors = read_checkpoint(ckpt_dir)
    return transformers_model_from_tensors(cfg, tensors, break_index_ties=break_index_ties)


def _lowest_index_wins(module: torch.nn.Module, args: tuple, scores: torch.Tensor) -> torch.Tensor:
    """Indexer scores `[B, S, T]` with exact zeros replaced by -index * 1e-30: among zero scores the lowest
    entry index now ranks first, and they still rank above every negative score."""
    index = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    return torch.where(scores == 0, index * -1e-30, scores)


# ---- running -------------------------------------------------------------------------------------
@torch.no_grad()
def transformers_logits(model: DeepseekV4ForCausalLM, token_ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits `[B, T, V]` (fp32) for every position: the first `prefill` tokens in one call, then one token
    per call through transformers' cache (sliding window plus compressor states)."""
    batch, length = token_ids.shape
    if not 1 <= prefill <= length:
        raise ValueError(f"prefill: got {prefill}; allowed: 1..{length}")
    cache = DynamicCache(config=model.config)
    logits = [model(input_ids=token_ids[:, :prefill], cache=cache, use_cache=True).logits]
    for t in range(prefill, length):
        logits.append(model(input_ids=token_ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert cache.get_seq_length() == length
    return torch.cat(logits, dim=1).float()
