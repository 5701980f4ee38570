"""The runtime's generation loop on the reference model: MTP speculative decoding is lossless.

Random weights give an MTP head that almost never agrees with the main model, so drafts are also
supplied by oracles wrapping the runner: the true greedy continuation (every draft accepted), one that
is wrong at some positions (mixed), and one whose draft logits are NaN (always rejected, counted).
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

NUM = Numerics.plain(torch.float32)
MAX_LEN = 128


@pytest.fixture(scope="module")
def runner():
    cfg = tiny()
    return EagerRunner(dequantize_weights(dict(synthetic_tensors(cfg, seed=5)), NUM), cfg, NUM)


def engine(runner) -> Engine:
    return Engine(runner, state_specs(runner.cfg, MAX_LEN, NUM), prefill_chunk=16, max_seq_len=MAX_LEN)


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (21, 34)]


class OracleDrafts:
    """Replaces the MTP module's logits with a one-hot on a known sequence's token two positions ahead;
    `wrong(pos)` marks positions where the oracle lies, `nan` makes every draft NaN."""

    def __init__(self, inner, sequences, wrong=lambda pos: False, nan=False):
        self.inner, self.sequences, self.wrong, self.nan = inner, sequences, wrong, nan
        self.cfg = inner.cfg

    def run(self, variant, inputs):
        out = self.inner.run(variant, inputs)
        if not variant.startswith("mtp"):
            return out
        logits = torch.zeros_like(out["logits"])
        for row in range(logits.shape[0]):
            seq = self._sequence(row, inputs)
            for t in range(logits.shape[1]):
                pos = int(inputs["start"][row]) + t + 2
                token = seq[pos] if pos < len(seq) else 0
                logits[row, t, (token + 1) % 1024 if self.wrong(pos) else token] = 1.0
        out["logits"] = logits * float("nan") if self.nan else logits
        return out

    def _sequence(self, row, inputs):
        """Decode steps batch every sequence in order; prefill runs one prompt at a time, found by its
        tokens (the MTP step pairs position t with token t + 1)."""
        if inputs["tokens"].shape[0] == len(self.sequences):
            return self.sequences[row]
        start, ids = int(inputs["start"][row]), inputs["tokens"][row].tolist()
        return next(s for s in self.sequences if s[start + 1:start + 1 + len(ids)] == ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_mtp_reproduces_greedy_decoding(runner, seed):
    plain = engine(runner).generate(prompts(seed), 12)
    spec = engine(runner).generate(prompts(seed), 12, mtp=1)
    assert spec.tokens == plain.tokens
    assert spec.drafted > 0 and 0.0 <= spec.acceptance_rate <= 1.0


def test_accepted_and_rejected_drafts_leave_no_trace(runner):
    ps = prompts(2)
    plain = engine(runner).generate(ps, 12)
    full = [p + t for p, t in zip(ps, plain.tokens)]
    always = engine(OracleDrafts(runner, full)).generate(ps, 12, mtp=1)
    assert always.tokens == plain.tokens and always.acceptance_rate == 1.0
    assert always.steps < 8  # two tokens a step
    mixed = engine(OracleDrafts(runner, full, wrong=lambda pos: pos % 3 == 0)).generate(ps, 12, mtp=1)
    assert mixed.tokens == plain.tokens and 0.0 < mixed.acceptance_rate < 1.0


def test_nonfinite_drafts_are_rejected_and_counted(runner):
    ps = prompts(3)
    plain = engine(runner).generate(ps, 8)
    nan = engine(OracleDrafts(runner, [p + t for p, t in zip(ps, plain.tokens)], nan=True)).generate(ps, 8, mtp=1)
    assert nan.tokens == plain.tokens
    assert nan.accepted == 0 and nan.rejected_nonfinite == nan.drafted > 0


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


def test_capacity_is_checked(runner):
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine(runner).generate([[1] * 100], 40)
