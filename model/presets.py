"""Named model configurations: the released DeepSeek-V4 Flash and Pro, a Flash slice, a Flash mini, and `tiny`.

`tiny` is small enough for CPU tests (a few MB) yet has every layer kind (window, C4 with the Lightning
Indexer, a heavily compressed layer with ratio 16 so its blocks complete within a few hundred tokens),
hash and score-routed MoE layers, and the MTP layer; its 32-token window wraps early.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

from dsv4c.model.config import ConfigError, ModelConfig, YarnScaling

_YARN = YarnScaling(factor=16.0, original_max_position_embeddings=65536, beta_fast=32.0, beta_slow=1.0)


def _alternating(first: int, count: int) -> tuple[int, ...]:
    """count ratios alternating 4, 128, 4, ... (or 128, 4, ... when first is 128)."""
    other = 128 if first == 4 else 4
    return tuple(first if i % 2 == 0 else other for i in range(count))


def flash() -> ModelConfig:
    """DeepSeek-V4-Flash as released (284B total, 13B active)."""
    return ModelConfig(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, n_routed_experts=256,
        num_experts_per_tok=6, moe_intermediate_size=2048, routed_scaling_factor=1.5, num_hash_layers=3,
        compress_ratios=(0, 0) + _alternating(4, 41) + (0,), index_n_heads=64, index_head_dim=128,
        index_topk=512, rope_scaling=_YARN,
    )


def pro() -> ModelConfig:
    """DeepSeek-V4-Pro (1.6T total, 49B active)."""
    return ModelConfig(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024, n_routed_experts=384,
        num_experts_per_tok=6, moe_intermediate_size=3072, routed_scaling_factor=2.5, num_hash_layers=3,
        compress_ratios=(128, 128) + _alternating(4, 59) + (0,), index_n_heads=64, index_head_dim=128,
        index_topk=1024, rope_scaling=_YARN,
    )


def flash_slice() -> ModelConfig:
    """Flash dimensions, its first 4 layers (window, window, C4, C128; the first three hash-routed) plus MTP."""
    return flash().replace(num_hidden_layers=4, compress_ratios=(0, 0, 4, 128, 0))


def flash_mini() -> ModelConfig:
    """flash-slice with 16 routed experts and an 8K vocabulary: a token's step reads what flash-slice's layers read
    (six routed experts, the shared expert, attention, mHC) at a tenth of the checkpoint (2.8B parameters, 1.8 GiB,
    against 34B, 18.6 GiB), so it writes and compiles in seconds; its LM head and embedding are 16x smaller."""
    return flash_slice().replace(n_routed_experts=16, vocab_size=8192)


def tiny() -> ModelConfig:
    """A few-MB model with every layer kind, both router kinds and MTP, for CPU tests and the demo."""
    return ModelConfig(
        vocab_size=1024, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, head_dim=96,
        qk_rope_head_dim=32, q_lora_rank=128, o_groups=2, o_lora_rank=64, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=128, routed_scaling_factor=1.5, num_hash_layers=1,
        compress_ratios=(0, 4, 16, 0), index_n_heads=4, index_head_dim=64, index_topk=8,
        sliding_window=32, max_position_embeddings=2048,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=512, beta_fast=32.0, beta_slow=1.0),
    )


PRESETS: Mapping[str, Callable[[], ModelConfig]] = MappingProxyType(
    {"tiny": tiny, "flash": flash, "flash-slice": flash_slice, "flash-mini": flash_mini, "pro": pro}
)


def preset(name: str) -> ModelConfig:
    """The preset called `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"preset: got {name!r}; allowed: {sorted(PRESETS)}") from None
