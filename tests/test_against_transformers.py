"""The reference model against transformers' `deepseek_v4`, an implementation written elsewhere.

Same checkpoint (written by our writer, loaded by transformers through its own name mapping), same
tokens, fp32 on both sides: a prefill of a few hundred tokens (completing C4 and C16 blocks, wrapping the
window) then token-by-token decode. Relative norm error of all logits under 1e-4.

Each intentional difference is a named switch, not a tolerance:
- `act_quant=False`: transformers multiplies dequantised weights without DeepSeek's FP8 activation rounding;
- `kv_fp8=False`: it does not round cached KV to FP8;
- `indexer_fp4=False`: it does not Hadamard-rotate and FP4-round the indexer's queries and keys;
- `shared_expert_clamp=True`: transformers 5.24 clamps the shared expert as DeepSeek's code does;
- MTP: transformers does not build the MTP module, so only the main model is compared.
Tight equality needs selections free of near-ties: `keep_everything` sets experts per token to the number
of routed experts and index_topk above the number of entries (transformers then matches DeepSeek's plain
math). Selection itself is compared separately on inputs with clear margins.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

from dsv4c.model.checkpoint import Checkpoint, write_synthetic
from dsv4c.model.layers import route
from dsv4c.model.step import dequantize_weights
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.compiler.scoring import run_logits
from hf_reference import load_transformers_model, to_transformers_config, transformers_logits

TRANSFORMERS_NUMERICS = Numerics(dtype=torch.float32, act_quant=False, kv_fp8=False, indexer_fp4=False,
                                 shared_expert_clamp=True)
TOLERANCE = 1e-4
PREFILL, LENGTH = 200, 224


def keep_everything(cfg):
    return cfg.replace(num_experts_per_tok=cfg.n_routed_experts, index_topk=4096)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("variant", ["tiny", "no-hash-layers", "C4-first"])
def test_logits_match_transformers(tmp_path, variant):
    cfg = keep_everything(tiny())
    if variant == "no-hash-layers":
        cfg = cfg.replace(num_hash_layers=0)
    elif variant == "C4-first":  # every layer compressed, two hash layers
        cfg = cfg.replace(compress_ratios=(4, 16, 4, 0), num_hash_layers=2)
    ckpt_dir = write_synthetic(cfg, tmp_path / "ckpt", seed=11)
    theirs_model = load_transformers_model(ckpt_dir)
    ckpt = Checkpoint.open(ckpt_dir)
    weights = dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, TRANSFORMERS_NUMERICS)
    tokens = torch.randint(0, cfg.vocab_size, (LENGTH,))
    theirs = transformers_logits(theirs_model, tokens.unsqueeze(0), prefill=PREFILL)[0]
    ours = run_logits(weights, cfg, TRANSFORMERS_NUMERICS, tokens, chunk=PREFILL, decode_from=PREFILL)
    assert rel_err(ours[:PREFILL], theirs[:PREFILL]) < TOLERANCE
    assert rel_err(ours[PREFILL:], theirs[PREFILL:]) < TOLERANCE


def test_transformers_loads_our_checkpoint_through_its_own_fp8_path(tmp_path):
    """transformers' own loader (FineGrainedFP8Config(dequantize=True): `.scale` names, e8m0 block scales,
    MXFP4 experts unpacked on CPU, its deepseek_v4 renames) reads what `init-checkpoint` wrote, leaves
    nothing missing or unexpected, and the model it builds gives our logits. Its FP8 decoder assumes
    whole 128-blocks (as every released dim is), so this config aligns tiny's dims to 128."""
    cfg = keep_everything(tiny().replace(head_dim=128, qk_rope_head_dim=64, index_head_dim=128))
    ckpt_dir = write_synthetic(cfg, tmp_path / "ckpt", seed=13)
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        ckpt_dir, config=to_transformers_config(cfg), dtype=torch.float32,
        quantization_config=FineGrainedFP8Config(dequantize=True), output_loading_info=True)
    assert not any(info.values()), info
    ckpt = Checkpoint.open(ckpt_dir)
    weights = dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, TRANSFORMERS_NUMERICS)
    tokens = torch.randint(0, cfg.vocab_size, (72,))
    theirs = transformers_logits(model.eval(), tokens.unsqueeze(0), prefill=64)[0]
    ours = run_logits(weights, cfg, TRANSFORMERS_NUMERICS, tokens, chunk=64, decode_from=64)
    assert rel_err(ours, theirs) < TOLERANCE


def test_a_dropped_switch_is_detected(tmp_path):
    """Turning a rounding simulation back on breaks the match: the comparison can fail."""
    cfg = keep_everything(tiny())
    ckpt_dir = write_synthetic(cfg, tmp_path / "ckpt", seed=12)
    theirs_model = load_transformers_model(ckpt_dir)
    ckpt = Checkpoint.open(ckpt_dir)
    num = TRANSFORMERS_NUMERICS.replace(kv_fp8=True)
    weights = dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, num)
    tokens = torch.randint(0, cfg.vocab_size, (40,))
    theirs = transformers_logits(theirs_model, tokens.unsqueeze(0), prefill=40)[0]
    ours = run_logits(weights, cfg, num, tokens, chunk=40)
    assert rel_err(ours, theirs) > 10 * TOLERANCE


def test_score_routing_selects_the_same_experts_as_transformers():
    """On scores with clear margins, top-k(score + bias) picks the same experts with the same weights."""
    cfg = tiny()
    router = DeepseekV4TopKRouter(to_transformers_config(cfg)).float()
    gate = torch.randn(cfg.n_routed_experts, cfg.hidden_size) * 0.3
    bias = torch.randn(cfg.n_routed_experts) * 0.5
    router.weight.data.copy_(gate)
    router.e_score_correction_bias.copy_(bias)
    x = torch.randn(64, cfg.hidden_size)
    _, their_weights, their_ids = router(x)
    ids, weights = route(x, torch.zeros(64, dtype=torch.long), {"gate.weight": gate, "gate.bias": bias}, "", cfg,
                         hash_layer=False)
    biased = torch.sqrt(torch.nn.functional.softplus(x @ gate.T)) + bias
    top = biased.topk(cfg.num_experts_per_tok + 1).values
    clear = (top[:, -2] - top[:, -1]) > 1e-3  # rows whose k-th and (k+1)-th candidates are well apart
    assert clear.sum() > 32
    ours_sorted, order = ids[clear].sort(-1)
    theirs_sorted, their_order = their_ids[clear].sort(-1)
    assert torch.equal(ours_sorted, theirs_sorted)
    assert torch.allclose(weights[clear].gather(-1, order), their_weights[clear].gather(-1, their_order), atol=1e-6)
