"""MTP with k = 1, 2, 3 drafts: greedy speculative decoding gives plain greedy decoding's tokens, in bf16 on the
compiled artifact (default numerics) and in fp32 on the reference model, with drafts accepted (an oracle drafter,
tests/oracle_drafts.py: random weights never accept) and rejected at known positions; rejection sampling with k
drafts keeps the target distribution (a bigram table model over three tokens).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import dequantize_weights
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.loader import load
from dsv4c.runtime.sampler import SamplingParams
from dsv4c.runtime.state_pool import StateSpec
from mtp_artifact import GROUP, bf16_artifact
from oracle_drafts import OracleDrafts

pytestmark = pytest.mark.xdist_group(GROUP)

FP32 = Numerics.plain(torch.float32)
NEW = 10
PROMPTS = [[5, 900, 17, 3, 64, 250, 8, 1000, 77], [42, 7, 7, 301, 12, 600]]


def wrong_every_third(k: int) -> bool:
    return k % 3 == 1


def expected_counts(new_tokens: int, drafts: int, wrong) -> tuple[int, list[int]]:
    """(rounds, accepted drafts by position) of one sequence under `OracleDrafts`: the prefill emits continuation
    token 0; a round drafts the next `drafts` tokens, accepts them up to the first wrong one and emits one more.
    Past the known continuation the oracle drafts token 0, which is wrong."""
    emitted, rounds, accepted = 1, 0, [0] * drafts
    while emitted < new_tokens:
        rounds += 1
        for j in range(drafts):
            if wrong(emitted + j) or emitted + j >= new_tokens:
                break
            accepted[j] += 1
        else:
            j = drafts
        emitted += j + 1
    return rounds, accepted


@pytest.fixture(scope="module")
def artifact_engine():
    return load(bf16_artifact(), max_batch=2)


@pytest.fixture(scope="module")
def fp32_runner():
    cfg = tiny()
    return EagerRunner(dequantize_weights(dict(synthetic_tensors(cfg, seed=5)), FP32), cfg, FP32)


def fp32_engine(runner) -> Engine:
    return Engine(runner, state_specs(tiny(), 64, FP32), prefill_chunk=4, max_seq_len=64)


def check_lossless(make_engine, k: int) -> None:
    plain = make_engine(None).generate(PROMPTS, NEW)
    assert plain.drafted == 0
    spec = make_engine(None).generate(PROMPTS, NEW, mtp=k)
    assert spec.tokens == plain.tokens
    right = make_engine(lambda inner: OracleDrafts(inner, PROMPTS, plain.tokens)).generate(PROMPTS, NEW, mtp=k)
    rounds, by_position = expected_counts(NEW, k, lambda i: False)
    assert right.tokens == plain.tokens
    assert right.steps == rounds and right.accepted_by_position == [2 * a for a in by_position]
    assert right.drafted_by_position == [2 * rounds] * k and min(by_position) > 0
    oracle = lambda inner: OracleDrafts(inner, PROMPTS, plain.tokens, wrong=wrong_every_third)
    mixed = make_engine(oracle).generate(PROMPTS, NEW, mtp=k)
    rounds, by_position = expected_counts(NEW, k, wrong_every_third)
    assert mixed.tokens == plain.tokens
    assert mixed.steps == rounds and mixed.accepted_by_position == [2 * a for a in by_position]
    assert mixed.accepted < mixed.drafted


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_mtp_equals_greedy_on_the_bf16_artifact(artifact_engine, k):
    """Default numerics (bf16, FP8 activation rounding, FP8 KV, FP4 indexer): the verification step over 1 + k
    tokens computes each row as the one-token step does (runtime/batch_invariant.py), so no near-tie flips."""
    runner = artifact_engine.runner

    def make(wrap):
        artifact_engine.set_drafts(0)
        artifact_engine.runner = runner if wrap is None else wrap(runner)
        return artifact_engine
    try:
        check_lossless(make, k)
    finally:
        artifact_engine.runner = runner


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_mtp_equals_greedy_in_fp32(fp32_runner, k):
    check_lossless(lambda wrap: fp32_engine(fp32_runner if wrap is None else wrap(fp32_runner)), k)


def test_nonfinite_drafts_are_rejected_and_counted(fp32_runner):
    plain = fp32_engine(fp32_runner).generate(PROMPTS, 6)
    nan = fp32_engine(OracleDrafts(fp32_runner, PROMPTS, plain.tokens, nan=True)).generate(PROMPTS, 6, mtp=2)
    assert nan.tokens == plain.tokens
    assert nan.accepted == 0 and nan.rejected_nonfinite == nan.drafted == 2 * 2 * 5  # 2 rows, 2 drafts, 5 rounds


def test_more_drafts_than_the_artifact_verifies_is_one_clear_error(fp32_runner):
    one_draft = Engine(fp32_runner, state_specs(tiny(), 64, FP32), 4, 64, max_drafts=1)
    with pytest.raises(ValueError, match=r"^mtp: got 2; this artifact drafts 0 to 1 tokens a step$"):
        one_draft.generate(PROMPTS, 4, mtp=2)


# ---- rejection sampling keeps the target distribution ---------------------------------------------------
VOCAB = 3
MAIN = torch.tensor([[2.0, 0.5, -1.0], [-0.5, 1.0, 0.3], [0.2, -1.2, 1.4]])  # next-token logits after token i
DRAFT = torch.tensor([[0.0, 1.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # a poor drafter's logits


class TableRunner:
    """A bigram model over three tokens as a step runner: the main step's logits at a token are MAIN[token], the
    MTP step's DRAFT[token] (it drafts from the token it is fed); no state but a placeholder."""

    def run(self, variant, inputs):
        tokens = inputs["tokens"]
        table = MAIN if variant.startswith("main") else DRAFT
        return {"logits": table[tokens], "hidden": torch.zeros((*tokens.shape, 1, 1)),
                "state.unused": inputs["state.unused"]}


def test_rejection_sampling_with_k_drafts_keeps_the_target_distribution():
    """3000 sequences of three tokens after the prompt [0]; the first is sampled from the prefill, the other two
    by one speculative round of two drafts (accepted, replaced or followed by the bonus token): their joint
    frequencies match the bigram chain's (chi-square over the 27 cells at the 0.999 quantile)."""
    draws, new, k = 3000, 3, 2
    engine = Engine(TableRunner(), {"unused": StateSpec((1,), torch.float32, 0.0)}, 4, 16, max_batch=128)
    result = engine.generate([[0]] * draws, new, SamplingParams(temperature=1.0), mtp=k, seed=100)
    assert result.accepted > 0 and result.accepted < result.drafted
    counts = torch.zeros([VOCAB] * new, dtype=torch.float64)
    for tokens in result.tokens:
        counts[tuple(tokens)] += 1
    step = MAIN.double().softmax(-1)
    expected = torch.zeros_like(counts)
    for seq in itertools.product(range(VOCAB), repeat=new):
        expected[seq] = math.prod(step[a, b] for a, b in zip((0,) + seq[:-1], seq)) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 54.05, chi2  # chi-square with 26 degrees of freedom, 0.999 quantile
