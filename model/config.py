"""The model configuration: DeepSeek-V4's released config.json, validated into a frozen dataclass.

`ModelConfig.from_dict` takes the field names of DeepSeek's released config.json (`compress_ratios`,
`num_hash_layers`, `rope_scaling`, `qk_rope_head_dim`, `quantization_config`, `expert_dtype`) and the
names transformers' `DeepseekV4Config` uses for the same things (`layer_types`, `mlp_layer_types`,
`compress_rates`, `partial_rotary_factor`, `rope_parameters` split into `main` / `compress`).
Every check names the field it rejects and the values it allows, in a `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

_TRANSFORMERS_LAYER_TYPE = {
    "sliding_attention": "window",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
_SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
_EXPERT_DTYPES = ("fp4", "fp8")
MAX_DRAFTS = 3  # the most MTP drafts one step verifies (the MTP layer applied recursively); rings are sized for it
_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


class ConfigError(ValueError):
    """A config field is missing or holds a value the model cannot take; the message names the field."""


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """YaRN frequency interpolation, applied to the RoPE of compressed layers only."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V4's shape and numerics, named as in the released config.json.

    `compress_ratios` has one entry per main layer plus one per MTP layer: 0 is a sliding-window-only
    layer, 4 a compressed sparse (CSA) layer with overlapping windows and the Lightning Indexer, and any
    larger ratio a heavily compressed (HCA) layer (128 in the released models).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    num_hash_layers: int
    compress_ratios: tuple[int, ...]
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    sliding_window: int = 128
    num_key_value_heads: int = 1
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: YarnScaling | None = None
    num_nextn_predict_layers: int = 1
    max_position_embeddings: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    fp8_weights: bool = True
    expert_dtype: str = "fp4"

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def n_layers_total(self) -> int:
        """Main layers plus MTP layers: the length of `compress_ratios`."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def attention_kind(self, layer: int) -> str:
        """'window', 'csa' or 'hca' for layer `layer` (MTP layers follow the main ones)."""
        ratio = self.compress_ratios[layer]
        return "window" if ratio == 0 else "csa" if ratio == 4 else "hca"

    def is_hash_layer(self, layer: int) -> bool:
        """Whether layer `layer` routes by the token-id table (never an MTP layer)."""
        return layer < min(self.num_hash_layers, self.num_hidden_layers)

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def hc_mix_dim(self) -> int:
        """Rows of `hc_*_fn`: n pre weights, n post weights and the n x n combination matrix."""
        return (2 + self.hc_mult) * self.hc_mult

    def layer_pattern(self) -> str:
        """One letter a layer, W / C / H, with lower case for hash-routed layers; MTP after '|'."""
        letters = {"window": "W", "csa": "C", "hca": "H"}
        main = "".join(
            letters[self.attention_kind(i)].lower() if self.is_hash_layer(i) else letters[self.attention_kind(i)]
            for i in range(self.num_hidden_layers)
        )
        mtp = "".join(letters[self.attention_kind(i)] for i in range(self.num_hidden_layers, self.n_layers_total))
        return f"{main}|{mtp}" if mtp else main

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        """Read a released config.json dict, or one with transformers' `DeepseekV4Config` names."""
        try:
            return cls(**_normalise(dict(raw)))
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The released config.json form: `from_dict(to_dict())` gives back an equal config."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for field in dataclasses.fields(self):
            if field.name in ("fp8_weights", "rope_scaling", "compress_ratios"):
                continue
            out[field.name] = getattr(self, field.name)
        out["compress_ratios"] = list(self.compress_ratios)
        out["rope_scaling"] = (
            None if self.rope_scaling is None else {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        )
        if self.fp8_weights:
            out["quantization_config"] = {"activation_scheme": "dynamic", **_QUANTIZATION}
        out["tie_word_embeddings"] = False
        out["hidden_act"] = "silu"
        out["topk_method"] = "noaux_tc"
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ---- reading either naming scheme -------------------------------------------------------------
_IGNORED = {
    "architectures", "model_type", "attention_bias", "attention_dropout", "hidden_act", "initializer_range",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "topk_method", "tie_word_embeddings",
    "pad_token_id", "mlp_bias", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "auto_map", "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
}


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    """Map either naming scheme onto ModelConfig's fields; unknown fields are an error, not ignored."""
    out: dict[str, Any] = {}
    _fold_layer_types(raw, out)
    _fold_rope(raw, out)
    _fold_quantization(raw, out)
    if raw.get("tie_word_embeddings", False):
        raise ConfigError("tie_word_embeddings: DeepSeek-V4 has untied embeddings; allowed: false")
    if raw.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"topk_method: got {raw['topk_method']!r}; allowed: 'noaux_tc'")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act: got {raw['hidden_act']!r}; allowed: 'silu'")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in raw.items():
        if key in _IGNORED:
            continue
        if key not in names:
            raise ConfigError(f"{key}: unknown field")
        out[key] = value
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(out.get(key), list):
            out[key] = out[key][0]
    missing = sorted(f.name for f in dataclasses.fields(ModelConfig)
                     if f.default is dataclasses.MISSING and f.name not in out)
    if missing:
        raise ConfigError(f"{missing[0]}: required field is missing")
    return out


def _fold_layer_types(raw: dict[str, Any], out: dict[str, Any]) -> None:
    """transformers' `layer_types` + `compress_rates` + `mlp_layer_types` -> ratios and hash count."""
    layer_types = raw.pop("layer_types", None)
    rates = raw.pop("compress_rates", None) or {}
    mlp_types = raw.pop("mlp_layer_types", None)
    if layer_types is not None and "compress_ratios" not in raw:
        ratio_of = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        ratio_of.update(rates)
        for i, kind in enumerate(layer_types):
            if kind not in _TRANSFORMERS_LAYER_TYPE:
                raise ConfigError(f"layer_types[{i}]: got {kind!r}; allowed: {sorted(_TRANSFORMERS_LAYER_TYPE)}")
        # transformers does not build MTP layers; the released MTP layer is window-only.
        mtp = [0] * int(raw.get("num_nextn_predict_layers", 1))
        out["compress_ratios"] = tuple(ratio_of[k] for k in layer_types) + tuple(mtp)
    if mlp_types is not None and "num_hash_layers" not in raw:
        n_hash = 0
        for i, kind in enumerate(mlp_types):
            if kind not in ("hash_moe", "moe"):
                raise ConfigError(f"mlp_layer_types[{i}]: got {kind!r}; allowed: ['hash_moe', 'moe']")
            if kind == "hash_moe" and i != n_hash:
                raise ConfigError(f"mlp_layer_types[{i}]: hash_moe layers must come first")
            n_hash += kind == "hash_moe"
        out["num_hash_layers"] = n_hash
    if "compress_ratios" in raw:
        ratios = raw.pop("compress_ratios")
        if not isinstance(ratios, (list, tuple)):
            raise ConfigError("compress_ratios: expected a list of integers")
        out["compress_ratios"] = tuple(ratios)


def _fold_rope(raw: dict[str, Any], out: dict[str, Any]) -> None:
    """`rope_scaling` (released) or `rope_parameters` main/compress (transformers) -> YarnScaling."""
    if "partial_rotary_factor" in raw and "qk_rope_head_dim" not in raw:
        factor = raw.pop("partial_rotary_factor")
        if factor is not None:
            out["qk_rope_head_dim"] = int(round(raw.get("head_dim", 512) * factor))
    raw.pop("partial_rotary_factor", None)
    params = raw.pop("rope_parameters", None)
    scaling = raw.pop("rope_scaling", None)
    if isinstance(params, dict) and "main" in params:
        out["rope_theta"] = params["main"].get("rope_theta", raw.get("rope_theta", 10000.0))
        compress = params.get("compress", {})
        raw.pop("rope_theta", None)
        out["compress_rope_theta"] = compress.get("rope_theta", raw.pop("compress_rope_theta", 160000.0))
        raw.pop("compress_rope_theta", None)
        scaling = compress if compress.get("rope_type", compress.get("type")) == "yarn" else scaling
    elif isinstance(params, dict) and params:
        scaling = params
    out["rope_scaling"] = _yarn(scaling)


def _yarn(scaling: Any) -> YarnScaling | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ConfigError("rope_scaling: expected an object or null")
    kind = scaling.get("type", scaling.get("rope_type", "yarn"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"rope_scaling.type: got {kind!r}; allowed: 'yarn'")
    if "attention_factor" in scaling and scaling["attention_factor"] not in (None, 1.0):
        raise ConfigError("rope_scaling.attention_factor: DeepSeek-V4 applies no mscale; allowed: 1.0")
    try:
        return YarnScaling(
            factor=float(scaling["factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
            beta_fast=float(scaling.get("beta_fast", 32)),
            beta_slow=float(scaling.get("beta_slow", 1)),
        )
    except KeyError as err:
        raise ConfigError(f"rope_scaling.{err.args[0]}: required field is missing") from None


def _fold_quantization(raw: dict[str, Any], out: dict[str, Any]) -> None:
    quant = raw.pop("quantization_config", None)
    expert_dtype = raw.pop("expert_dtype", None)
    if isinstance(quant, dict) and expert_dtype is None:
        expert_dtype = quant.get("expert_dtype")
    out["fp8_weights"] = quant is not None
    if quant is not None:
        if not isinstance(quant, dict):
            raise ConfigError("quantization_config: expected an object")
        for key, want in _QUANTIZATION.items():
            got = quant.get(key)
            if key == "weight_block_size" and isinstance(got, (list, tuple)):
                got = list(got)
            if got != want:
                raise ConfigError(f"quantization_config.{key}: got {got!r}; allowed: {want!r}")
        scheme = quant.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ConfigError(f"quantization_config.activation_scheme: got {scheme!r}; allowed: 'dynamic'")
    out["expert_dtype"] = expert_dtype if expert_dtype is not None else ("fp4" if quant is not None else "fp8")


# ---- validation --------------------------------------------------------------------------------
def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {message}")


def _positive_int(cfg: ModelConfig, name: str) -> None:
    value = getattr(cfg, name)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
             f"got {value!r}; allowed: a positive integer")


def _validate(cfg: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "index_n_heads", "index_head_dim",
                 "index_topk", "sliding_window", "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings"):
        _positive_int(cfg, name)
    _require(cfg.num_key_value_heads == 1, "num_key_value_heads",
             f"got {cfg.num_key_value_heads!r}; allowed: 1 (one shared KV head)")
    _require(cfg.n_shared_experts == 1, "n_shared_experts", f"got {cfg.n_shared_experts!r}; allowed: 1")
    _require(cfg.scoring_func in _SCORING_FUNCS, "scoring_func",
             f"got {cfg.scoring_func!r}; allowed: {list(_SCORING_FUNCS)}")
    _require(cfg.expert_dtype in _EXPERT_DTYPES, "expert_dtype",
             f"got {cfg.expert_dtype!r}; allowed: {list(_EXPERT_DTYPES)}")
    _require(cfg.expert_dtype == "fp8" or cfg.fp8_weights, "expert_dtype",
             "fp4 experts need quantization_config (the FP8 release format)")
    _require(cfg.qk_rope_head_dim % 2 == 0 and cfg.qk_rope_head_dim < cfg.head_dim, "qk_rope_head_dim",
             f"got {cfg.qk_rope_head_dim}; allowed: an even number below head_dim ({cfg.head_dim})")
    _require(cfg.nope_head_dim % 64 == 0, "head_dim",
             f"head_dim - qk_rope_head_dim = {cfg.nope_head_dim}; allowed: a multiple of 64 (FP8 KV blocks)")
    _require(cfg.index_head_dim % 32 == 0 and _power_of_two(cfg.index_head_dim), "index_head_dim",
             f"got {cfg.index_head_dim}; allowed: a power of two, at least 32 (Hadamard, FP4 blocks of 32)")
    _require(cfg.index_head_dim > cfg.qk_rope_head_dim, "index_head_dim",
             f"got {cfg.index_head_dim}; allowed: larger than qk_rope_head_dim ({cfg.qk_rope_head_dim})")
    for name in ("hidden_size", "q_lora_rank", "moe_intermediate_size"):
        _require(getattr(cfg, name) % 128 == 0, name,
                 f"got {getattr(cfg, name)}; allowed: a multiple of 128 (activation quantisation blocks)")
    _require((cfg.num_attention_heads * cfg.head_dim) % cfg.o_groups == 0 and
             cfg.num_attention_heads % cfg.o_groups == 0, "o_groups",
             f"got {cfg.o_groups}; allowed: a divisor of num_attention_heads ({cfg.num_attention_heads})")
    _require((cfg.o_groups * cfg.o_lora_rank) % 128 == 0, "o_lora_rank",
             "o_groups * o_lora_rank must be a multiple of 128 (activation quantisation blocks)")
    _require(cfg.num_experts_per_tok <= cfg.n_routed_experts, "num_experts_per_tok",
             f"got {cfg.num_experts_per_tok}; allowed: at most n_routed_experts ({cfg.n_routed_experts})")
    _require(isinstance(cfg.num_hash_layers, int) and 0 <= cfg.num_hash_layers <= cfg.num_hidden_layers,
             "num_hash_layers", f"got {cfg.num_hash_layers!r}; allowed: 0..num_hidden_layers")
    _require(isinstance(cfg.num_nextn_predict_layers, int) and cfg.num_nextn_predict_layers in (0, 1),
             "num_nextn_predict_layers", f"got {cfg.num_nextn_predict_layers!r}; allowed: 0 or 1")
    _require(len(cfg.compress_ratios) == cfg.n_layers_total, "compress_ratios",
             f"has {len(cfg.compress_ratios)} entries; allowed: num_hidden_layers + num_nextn_predict_layers"
             f" = {cfg.n_layers_total}")
    for i, ratio in enumerate(cfg.compress_ratios):
        _require(isinstance(ratio, int) and (ratio in (0, 4) or (ratio > 4 and _power_of_two(ratio))),
                 f"compress_ratios[{i}]", f"got {ratio!r}; allowed: 0, 4 or a power of two above 4 (e.g. 128)")
    for i in range(cfg.num_hidden_layers, cfg.n_layers_total):
        _require(cfg.compress_ratios[i] == 0, f"compress_ratios[{i}]", "the MTP layer is window-only; allowed: 0")
    for name in ("hc_eps", "rms_norm_eps", "rope_theta", "compress_rope_theta", "routed_scaling_factor"):
        value = getattr(cfg, name)
        _require(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name,
                 f"got {value!r}; allowed: a positive number")
    _require(cfg.swiglu_limit is None or cfg.swiglu_limit > 0, "swiglu_limit",
             f"got {cfg.swiglu_limit!r}; allowed: a positive number")


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
