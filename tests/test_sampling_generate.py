"""Temperature and top-p sampling through `Engine.generate` (the engine runs the reference model here; the
CLI's --temperature/--top-p/--seed on an artifact are checked against the engine in test_pipeline.py).

The model is tiny cut to one window layer: the tests run hundreds of sequences and only the engine's
sampling is under test. Sampling is seeded: one seed gives one token sequence, other seeds others. The
first sampled token of a batch of identical one-token prompts is drawn once a row from the sampler's
distribution (sampler.target_probs of the prompt's logits): its frequencies are checked with a chi-square
statistic over the kept tokens, and no token outside the top-p set may appear.
"""

from __future__ import annotations

import pytest
import torch

from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import dequantize_weights, forward, init_state
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.sampler import SamplingParams, target_probs

NUM = Numerics.plain(torch.float32)
CFG = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0), num_hash_layers=0)
MAX_LEN = 32
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6]]
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9)
# The distribution case: prompt [7] at temperature 0.3 and top-p 0.8 keeps 5 tokens of these weights.
NARROW = SamplingParams(temperature=0.3, top_p=0.8)
DRAWS = 1000
# The 0.999 quantile of chi-square with 4 degrees of freedom (5 kept tokens; fewer make the bound looser).
CHI2_BOUND = 18.47


@pytest.fixture(scope="module")
def weights():
    return dequantize_weights(dict(synthetic_tensors(CFG, seed=5)), NUM)


@pytest.fixture(scope="module")
def engine(weights) -> Engine:
    return Engine(EagerRunner(weights, CFG, NUM), state_specs(CFG, MAX_LEN, NUM), prefill_chunk=4,
                  max_seq_len=MAX_LEN, vocab_size=CFG.vocab_size)


@pytest.mark.parametrize("mtp", [0, 1], ids=["plain", "speculative"])
def test_same_seed_same_tokens_other_seeds_other_tokens(engine, mtp):
    """Plain decoding and speculative sampling (random-weight MTP drafts, accepted with min(1, p/q))."""
    runs = {seed: engine.generate(PROMPTS, 8, SAMPLING, mtp=mtp, seed=seed).tokens for seed in range(4)}
    assert engine.generate(PROMPTS, 8, SAMPLING, mtp=mtp, seed=0).tokens == runs[0]
    assert len({str(tokens) for tokens in runs.values()}) > 1
    rows = [row for tokens in runs.values() for row in tokens]
    assert all(len(row) == 8 and all(0 <= t < CFG.vocab_size for t in row) for row in rows)
    assert runs[0] != engine.generate(PROMPTS, 8, mtp=mtp).tokens  # sampled, not greedy


def test_first_sampled_tokens_follow_the_sampler_distribution(engine, weights):
    logits, _, _ = forward(weights, init_state(CFG, 1, MAX_LEN, NUM), torch.tensor([[7]]), torch.tensor([0]), CFG, NUM)
    p = target_probs(logits[0, -1], NARROW).double()
    kept = p.nonzero().flatten()
    assert 2 <= len(kept) <= 5
    drawn = torch.tensor([row[0] for row in engine.generate([[7]] * DRAWS, 1, NARROW, seed=11).tokens])
    assert torch.isin(drawn, kept).all(), "a token outside the top-p set was drawn"
    counts = torch.bincount(drawn, minlength=CFG.vocab_size)[kept].double()
    expected = DRAWS * p[kept]
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_BOUND, (counts.tolist(), expected.tolist())
