"""The transformers reference helper (tests/hf_reference.py): its config bridge, its loader (nothing left
randomly initialised, weights decoded exactly) and our use of transformers' cache (decode after prefill
equals one-shot logits in fp32)."""

from __future__ import annotations


import pytest
import torch
from transformers import DeepseekV4Config

from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.config import ModelConfig
from dsv4c.model.presets import PRESETS, flash_slice, tiny
from dsv4c.model.quant import dequant_fp4_weight, dequant_fp8_weight
from hf_reference import (load_transformers_model, read_checkpoint, to_transformers_config,
                          transformers_logits, transformers_model_from_tensors)

SAME_MATH_TOL = 2e-5  # relative norm error between two schedules of the same fp32 math


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic(tiny(), tmp_path_factory.mktemp("hf") / "tiny", seed=3)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_transformers_model(checkpoint)


# ---- config bridge -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_transformers_diff_dict(name):
    cfg = PRESETS[name]()
    assert ModelConfig.from_dict(to_transformers_config(cfg).to_diff_dict()) == cfg


def test_config_round_trips_through_transformers_full_dict():
    cfg = tiny()
    assert ModelConfig.from_dict(to_transformers_config(cfg).to_dict()) == cfg


def test_bridge_agrees_with_transformers_reading_of_the_released_config():
    """Where transformers can read the released config.json itself (HCA ratio 128), it means the same."""
    cfg = flash_slice()
    ours, theirs = to_transformers_config(cfg), DeepseekV4Config.from_dict(cfg.to_dict())
    for field in ("layer_types", "mlp_layer_types", "compress_rates", "qk_rope_head_dim", "sliding_window",
                  "quantization_config"):
        assert getattr(ours, field) == getattr(theirs, field), field
    strip = lambda params: {k: v for k, v in params.items() if k != "type"}  # noqa: E731
    for kind in ("main", "compress"):
        assert strip(ours.rope_parameters[kind]) == strip(theirs.rope_parameters[kind]), kind


# ---- loading -------------------------------------------------------------------------------------
def test_loader_decodes_every_weight_exactly(checkpoint, model):
    """Spot checks against compiler/quant.py's decoders, including an FP8 weight with a partial 128-block
    (tiny's wo_a is [128, 192]: transformers' own FP8 loader gets this one wrong)."""
    _, raw = read_checkpoint(checkpoint)
    layers = model.model.layers
    fp8 = lambda name: dequant_fp8_weight(raw[f"{name}.weight"], raw[f"{name}.scale"])  # noqa: E731
    fp4 = lambda name: dequant_fp4_weight(raw[f"{name}.weight"], raw[f"{name}.scale"])  # noqa: E731
    assert raw["layers.0.attn.wo_a.weight"].shape == (128, 192)
    assert torch.equal(layers[0].self_attn.o_a_proj.weight, fp8("layers.0.attn.wo_a"))
    assert torch.equal(layers[1].self_attn.compressor.indexer.q_b_proj.weight, fp8("layers.1.attn.indexer.wq_b"))
    assert torch.equal(layers[2].mlp.shared_experts.down_proj.weight, fp8("layers.2.ffn.shared_experts.w2"))
    for e in (0, 5):
        gate_up = torch.cat((fp4(f"layers.1.ffn.experts.{e}.w1"), fp4(f"layers.1.ffn.experts.{e}.w3")))
        assert torch.equal(layers[1].mlp.experts.gate_up_proj[e], gate_up)
        assert torch.equal(layers[1].mlp.experts.down_proj[e], fp4(f"layers.1.ffn.experts.{e}.w2"))
    assert torch.equal(layers[0].mlp.gate.tid2eid.long(), raw["layers.0.ffn.gate.tid2eid"].long())
    assert torch.equal(layers[2].mlp.gate.e_score_correction_bias, raw["layers.2.ffn.gate.bias"])
    assert torch.equal(layers[2].self_attn.compressor.position_bias, raw["layers.2.attn.compressor.ape"])
    assert torch.equal(layers[1].ffn_hc.fn, raw["layers.1.hc_ffn_fn"])
    assert torch.equal(model.model.hc_head.hc_scale, raw["hc_head_scale"])
    assert torch.equal(model.lm_head.weight, raw["head.weight"].float())
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("layers.1.attn.compressor.ape"), "missing_keys"),
    (lambda t: t.pop("layers.0.ffn.gate.tid2eid"), "missing_keys"),
    (lambda t: t.pop("layers.2.ffn.gate.bias"), "missing_keys"),
    (lambda t: t.pop("layers.0.attn.wq_a.scale"), "without its .scale"),
    (lambda t: t.update({"layers.0.attn.extra.weight": torch.zeros(2, 2)}), "unexpected_keys"),
])
def test_loader_refuses_an_incomplete_checkpoint(checkpoint, edit, message):
    cfg, tensors = read_checkpoint(checkpoint)
    edit(tensors)
    with pytest.raises((AssertionError, ValueError), match=message):
        transformers_model_from_tensors(cfg, tensors)


# ---- running -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefill", [128, 37])
def test_decode_after_prefill_matches_one_shot(model, prefill):
    """Windows wrap (32), HCA blocks (16) and C4 blocks complete in both prefill and decode, the indexer
    keeps 8 of up to 40 entries, and 37 leaves partial compressor blocks buffered across the switch."""
    ids = torch.randint(0, model.config.vocab_size, (2, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one_shot = model(input_ids=ids, use_cache=False).logits
    stepped = transformers_logits(model, ids, prefill)
    assert stepped.shape == one_shot.shape == (2, 160, model.config.vocab_size)
    assert rel_err(stepped, one_shot) < SAME_MATH_TOL


def test_the_bench_baseline_built_from_our_decoded_weights_is_the_reference_model(checkpoint, model):
    """`dsv4c bench --baselines transformers` hands transformers the weights our own decoder produced (fp32
    here); the model must be the one built from transformers' decoding: same logits over a prefill and a
    decode step through its cache, in chunks as the bench fills it."""
    from dsv4c.compiler.transformers_model import new_cache, step_logits, transformers_model
    from dsv4c.model.numerics import Numerics
    from dsv4c.model.step import dequantize_weights

    cfg, tensors = read_checkpoint(checkpoint)
    ours = transformers_model(cfg, dequantize_weights(tensors, Numerics(dtype=torch.float32)),
                              dtype=torch.float32, break_index_ties=True)
    ids = torch.randint(2, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    cache = new_cache(ours)
    got = torch.cat([step_logits(ours, ids[:, begin:begin + 16], cache) for begin in range(0, 40, 16)], dim=1)
    want = transformers_logits(model, ids, 40)
    assert rel_err(got.float(), want) < SAME_MATH_TOL
