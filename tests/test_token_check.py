"""The bench's correctness check (compiler/token_check.py) and how the bench feeds it (compiler/benchmark.py): the
comparison of two runners' logits, the rows' own first tokens, and decoding along another runner's tokens.
CPU: the decoding runs the reference model (EagerRunner) on the tiny preset cut to one window layer, fp32."""

from __future__ import annotations

import pytest
import torch

from dsv4c.compiler.benchmark import BenchError, decode_logits, filled_state, row_tokens
from dsv4c.compiler.token_check import CLEAR_MARGIN, check_logits
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import dequantize_weights
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.runtime.engine import Engine

NUM = Numerics.plain(torch.float32)
CFG = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0), num_hash_layers=0)
MAX_LEN, CONTEXT, STEPS = 32, 6, 4


def clear_logits(steps: int, rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits whose top-1 leads by 1.0 at every selection (clear), elsewhere random in [0, 0.5)."""
    logits = torch.rand(steps, rows, vocab, generator=torch.Generator().manual_seed(seed)) * 0.5
    top = torch.randint(0, vocab, (steps, rows), generator=torch.Generator().manual_seed(seed + 1))
    logits.scatter_(-1, top.unsqueeze(-1), 1.5)
    return logits


def test_small_differences_pass_and_a_clear_disagreement_fails():
    reference = clear_logits(3, 5, 50, seed=0)
    check = check_logits(reference + 0.01, reference)
    assert check.passed and check.clear == 15 and check.agree == 15 and check.near_ties == 0
    assert check.max_abs_diff == pytest.approx(0.01, abs=1e-6) and check.rel_diff > 0
    wrong = reference.clone()
    wrong[1, 2] = wrong[1, 2].flip(-1)  # one row's logits moved to other tokens: its top-1 is another token
    check = check_logits(wrong, reference)
    assert check.passed is False and check.agree == 14 and check.clear == 15


def test_near_ties_are_not_checked_but_counted():
    reference = clear_logits(2, 3, 40, seed=1)
    top = reference[0, 0].argmax()
    runner_up = (top + 1) % 40
    reference[0, 0, runner_up] = reference[0, 0, top] - CLEAR_MARGIN / 2  # a near tie at (0, 0)
    ours = reference.clone()
    ours[0, 0, runner_up] += CLEAR_MARGIN  # ours picks the runner-up there: either token is right
    check = check_logits(ours, reference)
    assert check.passed and check.near_ties == 1 and check.clear == 5


def test_nan_never_passes_and_no_clear_selection_cannot_tell():
    reference = clear_logits(2, 2, 30, seed=2)
    ours = reference.clone()
    ours[1, 1, 3] = float("nan")
    assert check_logits(ours, reference).passed is False
    assert check_logits(reference, ours).passed is False
    flat = torch.zeros(2, 2, 30)
    assert check_logits(flat, flat).passed is None
    with pytest.raises(ValueError, match="token check"):
        check_logits(reference[:1], reference)


def test_row_tokens_are_distinct_and_a_row_keeps_its_token_whatever_the_batch():
    tokens = row_tokens(1000, 64, seed=0)
    assert tokens.unique().numel() == 64 and int(tokens.min()) >= 2 and int(tokens.max()) < 1000
    assert torch.equal(row_tokens(1000, 8, seed=0), tokens[:8])
    with pytest.raises(BenchError, match="--batch"):
        row_tokens(10, 9, seed=0)


@pytest.fixture(scope="module")
def filled():
    weights = dequantize_weights(dict(synthetic_tensors(CFG, seed=5)), NUM)
    runner = EagerRunner(weights, CFG, NUM)
    engine = Engine(runner, state_specs(CFG, MAX_LEN, NUM), prefill_chunk=4, max_seq_len=MAX_LEN,
                    vocab_size=CFG.vocab_size, max_batch=3)
    return runner, filled_state(engine, runner, 3, CONTEXT, seed=0)


def test_decoding_along_given_tokens_follows_them(filled):
    """Greedy decoding, then decoding fed its own greedy tokens, give the same logits; fed other tokens, the
    first step (the rows' own first tokens) is unchanged and the next steps differ."""
    runner, state = filled
    first = row_tokens(CFG.vocab_size, 3, seed=0)
    greedy = decode_logits(runner, state, first, CONTEXT, STEPS)
    assert greedy.shape == (STEPS, 3, CFG.vocab_size) and not greedy.isnan().any()
    assert not torch.equal(greedy[0, 0], greedy[0, 1])  # each row decodes its own token
    assert torch.equal(decode_logits(runner, state, first, CONTEXT, STEPS, forced=greedy.argmax(-1)), greedy)
    other = (greedy.argmax(-1) + 1) % CFG.vocab_size
    forced = decode_logits(runner, state, first, CONTEXT, STEPS, forced=other)
    assert torch.equal(forced[0], greedy[0]) and not torch.equal(forced[1:], greedy[1:])
