"""The reference model against itself: decode equals prefill, chunking and batching change nothing,
selection keeps the right entries, and the mHC pieces hold their contracts.

Tolerances (relative norm error, fp32 throughout): 2e-5 between two schedules of the same math (the
only differences are fp32 summation orders). Schedules are compared on `KEEP_ALL`, where every top-k
keeps all candidates: with random weights, top-k near-ties (and the indexer's exact-zero scores) are
common, and a tie broken differently by two schedules is not a bug. Selection is tested on its own, on
inputs with clear margins.
"""

from __future__ import annotations

import pytest
import torch

from dsv4c.model import layers
from dsv4c.model.attention import indexer_select, ring_timeline, ring_write, write_rows
from dsv4c.model.step import dequantize_weights, forward, init_state, mtp_forward
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors

EXACT_FP32 = Numerics.plain(torch.float32)  # no step-function roundings
KV_INDEXER_FP32 = EXACT_FP32.replace(kv_fp8=True, indexer_fp4=True)  # the cached-value roundings only
FAITHFUL_FP32 = Numerics.faithful().replace(dtype=torch.float32)
SAME_MATH_TOL = 2e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


KEEP_ALL = tiny().replace(num_experts_per_tok=tiny().n_routed_experts, index_topk=4096)


@pytest.fixture(scope="module")
def raw_tiny():
    return dict(synthetic_tensors(KEEP_ALL, seed=1))


def run(w, cfg, num, tokens, schedule, max_len=512):
    """Logits of tokens `[B, T]` computed in steps of the given (start, stop) ranges."""
    state = init_state(cfg, tokens.shape[0], max_len, num)
    out = []
    for start, stop in schedule:
        begin = torch.full((tokens.shape[0],), start, dtype=torch.long)
        logits, _, state = forward(w, state, tokens[:, start:stop], begin, cfg, num)
        out.append(logits)
    return torch.cat(out, dim=1), state


def decode_and_prefill(raw, num, length=150, decode_from=118):
    cfg = KEEP_ALL
    w = dequantize_weights(raw, num)
    tokens = torch.randint(0, cfg.vocab_size, (2, length))
    full, _ = run(w, cfg, num, tokens, [(0, length)])
    steps = [(0, decode_from)] + [(t, t + 1) for t in range(decode_from, length)]
    return run(w, cfg, num, tokens, steps)[0], full


def test_decode_equals_prefill(raw_tiny):
    """Without the discontinuous roundings the two schedules compute the same function; the decode
    steps wrap the 32-slot window and complete C4 and C16 blocks."""
    stepwise, full = decode_and_prefill(raw_tiny, EXACT_FP32)
    assert rel_err(stepwise, full) < SAME_MATH_TOL
    assert rel_err(stepwise[:, -1], full[:, -1]) < SAME_MATH_TOL


@pytest.mark.parametrize("num, tol", [(KV_INDEXER_FP32, 1e-3), (FAITHFUL_FP32, 1.5e-2)],
                         ids=["kv-indexer-rounding", "faithful"])
def test_decode_matches_prefill_with_roundings(raw_tiny, num, tol):
    """The FP8/FP4 roundings are step functions: an fp32 summation-order difference between the two
    schedules can move a value across a rounding boundary (one e4m3 step, 2^-3 relative), so the bound
    is that of a few flipped elements, far under what a misplaced cache entry or position gives. Which
    elements flip depends on the BLAS's summation order, and so on its thread count: faithful numerics
    measured 8.2e-3 in one CI run, under 5e-3 in others."""
    stepwise, full = decode_and_prefill(raw_tiny, num)
    assert rel_err(stepwise, full) < tol
    assert (stepwise.argmax(-1) == full.argmax(-1)).float().mean() > 0.97


def test_chunked_prefill_equals_one_shot(raw_tiny):
    cfg = KEEP_ALL
    w = dequantize_weights(raw_tiny, EXACT_FP32)
    tokens = torch.randint(0, cfg.vocab_size, (1, 131))
    full, state_full = run(w, cfg, EXACT_FP32, tokens, [(0, 131)])
    chunks = [(s, min(s + 13, 131)) for s in range(0, 131, 13)]
    chunked, state_chunked = run(w, cfg, EXACT_FP32, tokens, chunks)
    assert rel_err(chunked, full) < SAME_MATH_TOL
    for name in state_full:  # the caches themselves agree (score rings hold -inf where never written)
        a, b = state_full[name], state_chunked[name]
        finite = torch.isfinite(a)
        assert torch.equal(finite, torch.isfinite(b)), name
        assert torch.allclose(a[finite], b[finite], rtol=1e-4, atol=1e-5), name


def test_batch_rows_are_independent_at_different_positions(raw_tiny):
    """Two sequences at different positions in one step give what each gives alone."""
    cfg = KEEP_ALL
    w = dequantize_weights(raw_tiny, EXACT_FP32)
    a, b = torch.randint(0, cfg.vocab_size, (1, 90)), torch.randint(0, cfg.vocab_size, (1, 90))
    alone_a, state_a = run(w, cfg, EXACT_FP32, a, [(0, 60)])
    alone_b, state_b = run(w, cfg, EXACT_FP32, b, [(0, 45)])
    state = {k: torch.cat((state_a[k], state_b[k])) for k in state_a}
    tokens = torch.cat((a[:, 60:63], b[:, 45:48]))
    joint, _, _ = forward(w, state, tokens, torch.tensor([60, 45]), cfg, EXACT_FP32)
    ref_a, _, _ = forward(w, state_a, a[:, 60:63], torch.tensor([60]), cfg, EXACT_FP32)
    ref_b, _, _ = forward(w, state_b, b[:, 45:48], torch.tensor([45]), cfg, EXACT_FP32)
    assert rel_err(joint[:1], ref_a) < SAME_MATH_TOL
    assert rel_err(joint[1:], ref_b) < SAME_MATH_TOL


def test_mtp_decode_equals_prefill(raw_tiny):
    cfg = KEEP_ALL
    w = dequantize_weights(raw_tiny, EXACT_FP32)
    tokens = torch.randint(0, cfg.vocab_size, (1, 51))
    state = init_state(cfg, 1, 512, EXACT_FP32)
    _, hidden, state = forward(w, state, tokens[:, :50], torch.tensor([0]), cfg, EXACT_FP32)
    full, _, _ = mtp_forward(w, state, tokens[:, 1:51], hidden, torch.tensor([0]), cfg, EXACT_FP32)
    part, _, state2 = mtp_forward(w, state, tokens[:, 1:31], hidden[:, :30], torch.tensor([0]), cfg, EXACT_FP32)
    steps = [part]
    for t in range(30, 50):
        logits, _, state2 = mtp_forward(w, state2, tokens[:, t + 1:t + 2], hidden[:, t:t + 1], torch.tensor([t]),
                                        cfg, EXACT_FP32)
        steps.append(logits)
    assert full.shape == (1, 50, cfg.vocab_size)
    assert rel_err(torch.cat(steps, 1), full) < SAME_MATH_TOL


def test_faithful_rounding_changes_the_result(raw_tiny):
    """The switches are live (a switch that does nothing would make the transformers comparison
    meaningless): KV rounding and activation quantisation move the logits; the indexer rounding moves
    the cached indexer keys (the logits move only where it changes a selection). Plain numerics apply none."""
    cfg = KEEP_ALL
    tokens = torch.randint(0, cfg.vocab_size, (1, 48))
    assert EXACT_FP32.roundings() == ()
    base, base_state = run(dequantize_weights(raw_tiny, EXACT_FP32), cfg, EXACT_FP32, tokens, [(0, 48)])
    kv = EXACT_FP32.replace(kv_fp8=True)
    assert rel_err(run(dequantize_weights(raw_tiny, kv), cfg, kv, tokens, [(0, 48)])[0], base) > 1e-4
    fp4 = EXACT_FP32.replace(indexer_fp4=True)
    _, state = run(dequantize_weights(raw_tiny, fp4), cfg, fp4, tokens, [(0, 48)])
    assert rel_err(state["layers.1.indexer_kv"], base_state["layers.1.indexer_kv"]) > 1e-2
    act = EXACT_FP32.replace(act_quant=True)
    assert rel_err(run(dequantize_weights(raw_tiny, act), cfg, act, tokens, [(0, 48)])[0], base) > 1e-3
    faithful, _ = run(dequantize_weights(raw_tiny, FAITHFUL_FP32), cfg, FAITHFUL_FP32, tokens, [(0, 48)])
    assert rel_err(faithful, base) > 1e-3


def test_ring_timeline_orders_positions_and_keeps_the_last():
    slots, start = 4, torch.tensor([6, 2])
    ring = torch.full((2, slots, 1), -1.0)
    ring[0, :, 0] = torch.tensor([4.0, 5.0, 2.0, 3.0])  # positions 2..5 at slots p % 4
    ring[1, :, 0] = torch.tensor([0.0, 1.0, -1.0, -1.0])  # positions 0, 1; slots 2, 3 never written
    new = torch.stack((torch.tensor([6.0, 7.0, 8.0]), torch.tensor([2.0, 3.0, 4.0]))).unsqueeze(-1)
    line = ring_timeline(ring, new, start)
    assert line[0, :, 0].tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert line[1, :, 0].tolist() == [-1, -1, 0, 1, 2, 3, 4]
    kept = ring_write(ring, new, start)
    assert kept[0, :, 0].tolist() == [8, 5, 6, 7]
    assert kept[1, :, 0].tolist() == [4, 1, 2, 3]


def test_ring_write_keeps_only_the_last_slots_when_a_step_outgrows_the_ring():
    ring = torch.full((1, 4, 1), -1.0)
    new = torch.arange(10.0, 16.0).view(1, 6, 1)  # positions 3..8: the last four (5..8) survive
    kept = ring_write(ring, new, torch.tensor([3]))
    assert kept[0, :, 0].tolist() == [15, 12, 13, 14]


def test_write_rows_sends_unkept_tokens_to_the_spill_row():
    cache = torch.full((1, 3 + 1, 1), 3.0)  # three entries and the spill row
    rows, keep = torch.tensor([[1, 1, 2]]), torch.tensor([[False, True, False]])
    out = write_rows(cache, rows, torch.tensor([[[5.0], [7.0], [9.0]]]), keep)
    assert out[0, :, 0].tolist() == [3, 7, 3, 0]  # the spill row holds zeros


def test_indexer_keeps_the_highest_scoring_complete_entries():
    """Entries with clear score margins: the top-k are the k largest among complete ones, and entries
    whose block is not complete are never chosen."""
    cfg = tiny().replace(index_topk=3)
    num = EXACT_FP32
    heads, dim = cfg.index_n_heads, cfg.index_head_dim
    w = {"i.wq_b.weight": torch.zeros(heads * dim, cfg.q_lora_rank),
         "i.weights_proj.weight": torch.zeros(heads, cfg.hidden_size)}
    w["i.wq_b.weight"][:, 0] = 1.0  # every query head = e_0 direction over all dims
    w["i.weights_proj.weight"][:, 0] = 1.0
    qr = torch.zeros(1, 1, cfg.q_lora_rank)
    qr[..., 0] = 1.0
    x = torch.zeros(1, 1, cfg.hidden_size)
    x[..., 0] = 1.0
    strengths = torch.tensor([0.1, 5.0, 0.3, 3.0, 0.2, 4.0, 9.0, 8.0])  # entries 6, 7 incomplete at pos 23
    keys = strengths.view(1, -1, 1) * torch.ones(1, 8, dim)
    inv_freq = torch.zeros(cfg.qk_rope_head_dim // 2)  # no rotation: scores are the strengths' order
    ids, valid = indexer_select(x, qr, torch.tensor([[23]]), w, "i.", keys, cfg, inv_freq, num)
    assert sorted(ids[0, 0].tolist()) == [1, 3, 5] and valid.all()


def test_sinkhorn_is_doubly_stochastic():
    """The last normalisation is over columns (exact); rows are close after 20 iterations."""
    c = layers.sinkhorn(torch.randn(50, 4, 4), iters=20, eps=1e-6)
    assert torch.allclose(c.sum(-1), torch.ones(50, 4), atol=2e-2)
    assert torch.allclose(c.sum(-2), torch.ones(50, 4), atol=1e-5)


def test_hc_post_mixes_with_the_transpose_of_comb():
    streams = torch.randn(3, 4, 8)
    comb = torch.rand(3, 4, 4)
    post = torch.rand(3, 4)
    out = torch.randn(3, 8)
    got = layers.hc_post(out, streams, post, comb)
    for k in range(4):
        want = post[:, k:k + 1] * out + sum(comb[:, j, k:k + 1] * streams[:, j] for j in range(4))
        assert torch.allclose(got[:, k], want, atol=1e-5)


def test_inverse_rope_undoes_rope():
    x = torch.randn(5, 3, 96)
    pos = torch.arange(5).view(5, 1) * 37
    inv = layers.rope_inv_freq(32, 160000.0, tiny().rope_scaling)
    there = layers.apply_rope(x, pos, inv)
    assert not torch.allclose(there, x)
    assert torch.allclose(layers.apply_rope(there, pos, inv, inverse=True), x, atol=1e-5)
