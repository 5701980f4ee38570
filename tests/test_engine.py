"""The runtime's generation loop on the reference model: MTP speculative decoding is lossless.

Random weights give an MTP head that almost never agrees with the main model, so drafts are also
supplied by oracles wrapping the runner (tests/oracle_drafts.py): the true greedy continuation (every draft
accepted), one that is wrong at known positions (mixed, with the exact accepted count), and one whose
draft logits are NaN (always rejected, counted).
"""

from __future__ import annotations

import pytest
import torch

from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.model.step import dequantize_weights
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.sampler import SamplingParams, target_probs, verify_draft
from oracle_drafts import OracleDrafts, expected_counts

NUM = Numerics.plain(torch.float32)
MAX_LEN = 128


@pytest.fixture(scope="module")
def runner():
    cfg = tiny()
    return EagerRunner(dequantize_weights(dict(synthetic_tensors(cfg, seed=5)), NUM), cfg, NUM)


def engine(runner) -> Engine:
    return Engine(runner, state_specs(tiny(), MAX_LEN, NUM), prefill_chunk=16, max_seq_len=MAX_LEN)


def every_third(k: int) -> bool:
    """The continuation indices where the mixed oracle's drafts are wrong."""
    return k % 3 == 0


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (21, 34)]


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_mtp_reproduces_greedy_decoding(runner, seed):
    plain = engine(runner).generate(prompts(seed), 12)
    spec = engine(runner).generate(prompts(seed), 12, mtp=1)
    assert spec.tokens == plain.tokens
    assert spec.drafted > 0 and spec.accepted <= spec.drafted and spec.rejected_nonfinite == 0


def test_accepted_and_rejected_drafts_leave_no_trace(runner):
    """Every draft right: two tokens a step, all accepted. Drafts wrong at every third continuation index:
    exactly those are rejected. Both rows of the batch (at different positions) keep greedy's tokens."""
    ps = prompts(2)
    plain = engine(runner).generate(ps, 12)
    always = engine(OracleDrafts(runner, ps, plain.tokens)).generate(ps, 12, mtp=1)
    assert always.tokens == plain.tokens
    assert expected_counts(12, lambda k: False) == (6, 6)  # 1 + 2 * 6 >= 12 tokens a row
    assert (always.steps, always.drafted, always.accepted) == (6, 2 * 6, 2 * 6)
    mixed = engine(OracleDrafts(runner, ps, plain.tokens, wrong=every_third)).generate(ps, 12, mtp=1)
    steps, accepted = expected_counts(12, every_third)
    assert (steps, accepted) == (7, 4)  # drafts for k = 1, 3 (wrong), 4, 6 (wrong), 7, 9 (wrong), 10
    assert mixed.tokens == plain.tokens
    assert (mixed.steps, mixed.drafted, mixed.accepted) == (steps, 2 * steps, 2 * accepted)


def test_a_finished_row_counts_no_drafts(runner):
    """Row 0's drafts are all right (it finishes after 6 steps), row 1's all wrong (11 steps): the padding
    steps of the finished row are not drafts."""
    ps = prompts(2)[:2]
    plain = engine(runner).generate(ps, 12)
    oracle = OracleDrafts(runner, ps, plain.tokens, wrong=lambda k: True, wrong_rows={1})
    result = engine(oracle).generate(ps, 12, mtp=1)
    right, wrong = expected_counts(12, lambda k: False), expected_counts(12, lambda k: True)
    assert result.tokens == plain.tokens
    assert (result.steps, result.drafted, result.accepted) == (wrong[0], right[0] + wrong[0], right[1])


class StaticOutputs:
    """Runs every step through `inner` and answers as a CUDA graph's replay does: the state written in place, the
    other outputs in buffers of the variant's own that its next step overwrites."""

    def __init__(self, inner):
        self.inner, self.buffers = inner, {}

    def run(self, variant: str, inputs):
        result = {}
        for name, value in self.inner.run(variant, inputs).items():
            if name.startswith("state."):
                inputs[name].copy_(value)
                result[name] = inputs[name]
                continue
            buffer = self.buffers.get((variant, name))
            if buffer is None or buffer.shape != value.shape:
                buffer = self.buffers[(variant, name)] = torch.empty_like(value)
            result[name] = buffer.copy_(value)
        return result


def test_prefill_keeps_what_it_needs_from_a_graph_runners_outputs(runner):
    """Prompts of two whole 16-token chunks and single tokens after: each chunk's hidden streams (the MTP layer's
    prefill input) and each request's draft logits must be copied out before the variant's next step overwrites
    them. The pool after admission and one speculative step equals the one a runner of fresh outputs leaves."""
    ps = prompts(5)
    fresh, static = engine(runner), engine(StaticOutputs(runner))
    for each in (fresh, static):
        each.set_drafts(1)
        for prompt in ps:
            each.add_request(prompt, 8)
        each.step()
    assert fresh.pool.capacity == static.pool.capacity
    for name, tensor in fresh.pool.tensors.items():
        assert torch.equal(static.pool.tensors[name], tensor), name


def test_nonfinite_drafts_are_rejected_and_counted(runner):
    ps = prompts(3)
    plain = engine(runner).generate(ps, 8)
    nan = engine(OracleDrafts(runner, ps, plain.tokens, nan=True)).generate(ps, 8, mtp=1)
    assert nan.tokens == plain.tokens
    assert nan.accepted == 0 and nan.rejected_nonfinite == nan.drafted == 2 * nan.steps == 2 * 7


def test_speculative_sampling_keeps_the_target_distribution():
    """Accept-with-min(1, p/q), else draw from (p - q)+: the emitted token is distributed as p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.1, 0.1, 0.1, 0.7])
    n = 40000
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    params = SamplingParams(temperature=1.0)
    accepted, replacement = verify_draft(p.expand(n, -1), q.expand(n, -1), draft, params, g)
    emitted = torch.where(accepted, draft, replacement)
    freq = torch.bincount(emitted, minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.015)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_a_prompt_over_capacity_is_refused_and_the_others_go_on(runner):
    """add_request refuses it with one line; generate reports it and decodes the others as it would alone."""
    with pytest.raises(ValueError, match="the artifact holds 128"):
        engine(runner).add_request([1] * 100, 40)
    ok = prompts(4)[0]
    result = engine(runner).generate([ok, [1] * 125, ok[:5]], 6)
    assert list(result.errors) == [1] and "125 tokens" in result.errors[1] and result.tokens[1] == []
    assert [result.tokens[0], result.tokens[2]] == engine(runner).generate([ok, ok[:5]], 6).tokens
