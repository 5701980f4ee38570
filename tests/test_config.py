"""The config reader: the released config.json as it is, transformers' names, presets, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4c.model.config import ConfigError, ModelConfig
from dsv4c.model.presets import PRESETS, flash, flash_slice, preset, pro, tiny

RELEASED = Path(__file__).resolve().parents[2] / "shared" / "data" / "deepseek-v4-flash" / "config.json"


@pytest.mark.skipif(not RELEASED.exists(), reason="the published config.json lives in ../shared/data beside the checkout")
def test_released_flash_config_reads_as_is():
    cfg = ModelConfig.from_json(RELEASED)
    assert cfg == flash()
    assert cfg.compress_ratios[:4] == (0, 0, 4, 128) and len(cfg.compress_ratios) == 44
    assert cfg.rope_scaling.factor == 16 and cfg.rope_scaling.original_max_position_embeddings == 65536
    assert cfg.expert_dtype == "fp4" and cfg.fp8_weights and cfg.num_hash_layers == 3


def test_presets_have_the_documented_shapes():
    assert flash().layer_pattern().startswith("wwcHCH") and flash().layer_pattern().endswith("C|W")
    assert pro().layer_pattern().startswith("hhcHC") and pro().num_hidden_layers == 61
    assert flash_slice().layer_pattern() == "wwcH|W" and flash_slice().hidden_size == 4096
    kinds = {tiny().attention_kind(i) for i in range(tiny().num_hidden_layers)}
    assert kinds == {"window", "csa", "hca"}
    assert tiny().is_hash_layer(0) and not tiny().is_hash_layer(1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_released_form_round_trips(name):
    cfg = preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_transformers_names_are_read():
    raw = {k: v for k, v in flash_slice().to_dict().items()
           if k not in ("compress_ratios", "num_hash_layers", "rope_scaling", "qk_rope_head_dim")}
    raw.update(
        layer_types=["sliding_attention", "sliding_attention", "compressed_sparse_attention",
                     "heavily_compressed_attention"],
        mlp_layer_types=["hash_moe", "hash_moe", "hash_moe", "moe"],
        partial_rotary_factor=0.125,
        rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0},
                         "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16,
                                      "original_max_position_embeddings": 65536, "beta_fast": 32,
                                      "beta_slow": 1, "attention_factor": 1.0}},
    )
    assert ModelConfig.from_dict(raw) == flash_slice()


@pytest.mark.parametrize("change, field", [
    ({"compress_ratios": [0, 0, 4, 7, 0]}, "compress_ratios[3]"),
    ({"compress_ratios": [0, 0, 4, 128]}, "compress_ratios"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"expert_dtype": "int3"}, "expert_dtype"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"hidden_size": 4000}, "hidden_size"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "scale_fmt": "ue8m0",
                              "weight_block_size": [128, 128]}}, "quantization_config.fmt"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
    ({"num_hash_layers": 9}, "num_hash_layers"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"not_a_field": 1}, "not_a_field"),
])
def test_invalid_fields_are_named_with_allowed_values(change, field):
    raw = flash_slice().to_dict() | change
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(raw)
    assert field in str(err.value)


def test_missing_field_is_named():
    raw = flash_slice().to_dict()
    del raw["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_dict(raw)


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=str(path)):
        ModelConfig.from_json(path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="flash-slice"):
        preset("nope")
