"""sparse_attention: each attention core over packed caches becomes one `dsv4c::sparse_decode_attention`.

- small graphs built from the model's own ring, window and `attend` functions (window + C4-selected entries,
  window + all entries with visibility), run through kv_compression then the pass: exact match counts, no whole
  cache unpacked, the graph before and after on fresh random inputs (caches on the FP8 grid) equal bit for bit
  (the op's CPU reference is the same `attend` on the same rows);
- near misses: a window mask one position off, caches not stored packed;
- a tiny artifact compiled for `--target h100` (on CPU: the op runs its reference) against the eager model over a
  decode run crossing C4 and C16 block boundaries. MTP verification (T = 2..4) runs through the same pass in
  tests/test_mtp_k.py's artifact.
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv4c.codegen.kv_cache import kv_pack
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model import rounding_ops
from dsv4c.model.attention import attend, ring_timeline, ring_write, token_windows, visible_entries
from dsv4c.model.checkpoint import Checkpoint, write_synthetic
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import CacheRounding, dequantize_weights, forward, init_state
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.kv_compression import kv_compression
from dsv4c.passes.manager import PassContext, compare_values, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.sparse_attention import sparse_attention
from dsv4c.runtime.artifact import load_artifact
from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.loader import load
from pass_graphs import export_flat, targets

NUM = Numerics()
HEADS, WIDTH, ROUNDED, WINDOW, SLOTS, ENTRIES, STEPS, RATIO, TOPK = 2, 96, 64, 4, 6, 12, 2, 4, 5
FP8 = CacheRounding("e4m3", ROUNDED, 64)
NAMES = ("out", "state.ring", "state.cache")


def rounded_kv(x):
    return torch.cat((rounding_ops.fake_quant_fp8(x[..., :ROUNDED], 64), x[..., ROUNDED:]), dim=-1)


def window_set(ring, x, start, first_key=0):
    kv = rounded_kv(x)
    positions = start.unsqueeze(1) + torch.arange(STEPS)
    keys = token_windows(ring_timeline(ring, kv, start), WINDOW, STEPS)
    key_pos = positions.unsqueeze(-1) - WINDOW + 1 + torch.arange(WINDOW)
    return kv, positions, (keys, key_pos >= first_key, "per_query")


def all_entries(m, q, ring, cache, x, scores, sink, start, first_key=0):
    """Window + every visible entry (the C128 layers' form)."""
    kv, positions, window = window_set(ring, x, start, first_key)
    visible = (cache, visible_entries(positions, cache.shape[1], RATIO), "shared")
    return attend(q, [window, visible], sink, WIDTH ** -0.5, NUM), ring_write(ring, kv, start), cache


def selected_entries(m, q, ring, cache, x, scores, sink, start):
    """Window + the top-k entries of some scores (the C4 layers' form, as `indexer_select` builds it)."""
    kv, positions, window = window_set(ring, x, start)
    top = scores.masked_fill(~visible_entries(positions, cache.shape[1], RATIO), float("-inf")).topk(TOPK, dim=-1)
    chosen = cache.unsqueeze(1).expand(-1, STEPS, -1, -1).gather(2, top.indices.unsqueeze(-1).expand(-1, -1, -1, WIDTH))
    sets = [window, (chosen, top.values > float("-inf"), "per_query")]
    return attend(q, sets, sink, WIDTH ** -0.5, NUM), ring_write(ring, kv, start), cache


def shifted_window(m, q, ring, cache, x, scores, sink, start):
    """A near miss: the window's mask drops the oldest valid position (key_pos >= 1)."""
    return all_entries(m, q, ring, cache, x, scores, sink, start, first_key=1)


def make_inputs(batch):
    """q, ring and cache on the FP8 grid (as the model writes them), new rows, scores, sink, start."""
    on_grid = lambda *shape: rounded_kv(torch.randn(*shape, WIDTH) * 2).bfloat16()  # noqa: E731
    return [torch.randn(batch, STEPS, HEADS, WIDTH).bfloat16(), on_grid(batch, SLOTS), on_grid(batch, ENTRIES),
            torch.randn(batch, STEPS, WIDTH).bfloat16(), torch.randn(batch, STEPS, ENTRIES), torch.randn(HEADS),
            torch.randint(0, 40, (batch,))]


def passes(fn, roundings):
    """(graph before, graph after cleanup, kv_compression and the pass (the pipeline's order), its record)."""
    batched = [True] * 5 + [False, True]
    before = export_flat(fn, make_inputs(2), batched)
    gm = export_flat(fn, make_inputs(2), batched)
    ctx = PassContext(output_names=NAMES, cache_roundings=roundings)
    gm, records = run_pipeline(gm, [noop_removal, dead_code, cse, kv_compression, sparse_attention], ctx)
    record = records[-1]
    return before, gm, record


def packed(x):
    return kv_pack(x, "e4m3", ROUNDED, 64)


@pytest.mark.parametrize("fn,kind", [(selected_entries, "C4"), (all_entries, f"C{RATIO}")])
def test_the_core_becomes_one_op_reading_packed_rows_with_the_same_values(fn, kind):
    before, after, record = passes(fn, {"ring": FP8, "cache": FP8})
    assert record.matches == 1 and record.details["kinds"] == [kind]
    ops = targets(after)
    assert ops.count("dsv4c.sparse_decode_attention.default") == 1
    assert "dsv4c.kv_unpack.default" not in ops and "aten.einsum.default" not in ops
    for batch in (1, 3):
        q, ring, cache, x, scores, sink, start = make_inputs(batch)
        want = before(q, ring, cache, x, scores, sink, start)
        got = after(q, packed(ring), packed(cache), x, scores, sink, start)
        assert compare_values(got[0], want[0], 0.0) is None
        assert torch.equal(got[1], packed(want[1]))


@pytest.mark.parametrize("fn,roundings", [(shifted_window, {"ring": FP8, "cache": FP8}), (all_entries, {})])
def test_near_misses_are_left_alone(fn, roundings):
    """A window mask one position off; caches kv_compression did not pack."""
    _, after, record = passes(fn, roundings)
    assert record.matches == 0 and "0 attention cores read packed rows (none); 1 sink softmaxes left alone" \
        in record.description
    assert "dsv4c.sparse_decode_attention.default" not in targets(after)


# ---- a compiled artifact for h100 against the eager reference ------------------------------------------------
MAX_SEQ_LEN, LENGTH = 96, 90
# dsv4c ops without a CUDA kernel of their own: on a GPU their references run inside the step's captured CUDA graph,
# and tests/test_quant.py checks that those references make no tensor from Python data (which capture refuses)
REFERENCES_ON_CUDA = {"dsv4c::fake_quant_fp8", "dsv4c::fake_quant_fp4", "dsv4c::kv_pack", "dsv4c::kv_unpack"}


@pytest.fixture(scope="module")
def h100_artifact(tmp_path_factory):
    """(checkpoint, artifact) of the tiny model compiled for h100 with the default (faithful) numerics."""
    folder = tmp_path_factory.mktemp("h100")
    ckpt = write_synthetic(tiny(), folder / "ckpt", seed=11)
    return ckpt, compile_checkpoint(ckpt, folder / "art", CompileOptions(targets=("h100",), max_seq_len=MAX_SEQ_LEN,
                                                                         prefill_chunk=2, mtp=False))


def test_every_dsv4c_op_of_the_h100_steps_has_a_cuda_kernel_or_a_checked_reference(h100_artifact):
    """A new op whose CUDA path is its Python reference must be added to REFERENCES_ON_CUDA and to the capture
    check of tests/test_quant.py (the e2m1 table that broke flash-mini's CUDA-graph capture hid in such a one)."""
    plans = sorted((h100_artifact[1] / "plans").glob("*.json"))
    names = {op["op"].rsplit(".", 1)[0] for plan in plans for op in json.loads(plan.read_text())["ops"]
             if op["op"].startswith("dsv4c::")}
    assert plans and {"dsv4c::hadamard_fake_quant_fp4", "dsv4c::fp8_linear"} <= names, names
    without = {n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")}
    assert without <= REFERENCES_ON_CUDA, without - REFERENCES_ON_CUDA


def test_h100_artifact_equals_eager_across_c4_and_c16_boundaries(h100_artifact):
    cfg = tiny()
    ckpt, art = h100_artifact
    log = load_artifact(art).manifest["pass_log"]
    assert all(r["matches"] == 3 for entry in log for r in entry["passes"] if r["name"] == "sparse_attention")
    source = Checkpoint.open(ckpt)
    weights = dequantize_weights({n: source.get(n) for n in source.headers}, NUM)
    engine = load(art)
    tokens = torch.randint(0, cfg.vocab_size, (2, LENGTH))
    state, reference = engine.new_state(2), init_state(cfg, 2, MAX_SEQ_LEN, NUM)
    for a, b in [(0, 2), (2, 4), (4, 5)] + [(t, t + 1) for t in range(5, LENGTH)]:  # 21 C4, 5 C16 boundaries
        start = torch.full((2,), a)
        out = engine.runner.run(f"main_t{b - a}", {**{f"state.{k}": v for k, v in state.items()},
                                                   "tokens": tokens[:, a:b], "start": start})
        state = {k: out[f"state.{k}"] for k in state}
        with batch_invariant():  # as the runtime runs every step
            logits, _, reference = forward(weights, reference, tokens[:, a:b], start, cfg, NUM)
        assert compare_values(out["logits"].float(), logits.float(), 1e-5) is None, (a, b)
