"""transformers' `DeepseekV4ForCausalLM` built from this project's weights: the config bridge and the model.

Used by the tests as an independent reference (tests/hf_reference.py decodes the released tensors with
transformers' own dequantiser, then calls `transformers_model`) and by `dsv4c bench --baselines transformers`
(which hands it the bf16 weights the eager baseline already decoded). transformers builds no MTP module:
`mtp.*` tensors are dropped. `transformers_model` fails unless every other weight is loaded exactly once
(`from_pretrained` would leave a missing weight randomly initialised and only list it).

A released config.json whose HCA ratio is not 128 cannot be read by `DeepseekV4Config` (its legacy
`compress_ratios` path maps only 0/4/128: KeyError 16 for `tiny`), so the config always comes from
`to_transformers_config`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer

from dsv4c.model.config import ModelConfig

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


def transformers_model(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], *, dtype: torch.dtype,
                       device: torch.device | str = "cpu", break_index_ties: bool = False) -> DeepseekV4ForCausalLM:
    """An eval-mode model in `dtype` on `device` from dequantised weights under their released names (no
    `.scale`s; `mtp.*` are dropped). `break_index_ties`: order the Lightning Indexer's exactly-zero scores by
    entry index, lowest first (see `_lowest_index_wins`)."""
    state = {name: t for name, t in weights.items() if not name.startswith("mtp.")}
    config = to_transformers_config(cfg.replace(fp8_weights=False, expert_dtype="fp8"))  # already dequantised
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise ValueError(f"transformers did not load the weights exactly: {problems}")
    if break_index_ties:
        for module in model.modules():
            if isinstance(module, DeepseekV4IndexerScorer):
                module.register_forward_hook(_lowest_index_wins)
    return model.to(device).eval().requires_grad_(False)


def new_cache(model: DeepseekV4ForCausalLM) -> DynamicCache:
    """An empty cache of transformers' own kind for `model` (sliding window plus compressor states)."""
    return DynamicCache(config=model.config)


@torch.no_grad()
def step_logits(model: DeepseekV4ForCausalLM, token_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Logits `[B, T, V]` of `token_ids` `[B, T]` appended to what `cache` holds (the cache grows by T)."""
    return model(input_ids=token_ids, cache=cache, use_cache=True).logits


def _lowest_index_wins(module: torch.nn.Module, args: tuple, scores: torch.Tensor) -> torch.Tensor:
    """Indexer scores `[B, S, T]` with exact zeros replaced by -index * 1e-30: among zero scores the lowest
    entry index now ranks first, and they still rank above every negative score."""
    index = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    return torch.where(scores == 0, index * -1e-30, scores)
