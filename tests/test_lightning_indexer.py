"""The Lightning Indexer: `dsv4c::lightning_indexer`, its Triton kernels and the pass that emits it.

- kernels (codegen/kernels/lightning_indexer.py) under TRITON_INTERPRET=1 in a spawned child (tests/child_pool.py)
  at Flash's indexer sizes (64 heads of 128 dims, 68-byte rows), two sequences one step apart: contexts 1, 127,
  128, 129 and 1000, T = 1 and 4 (2 and 3 for the `tl.dot_scaled` decode, 1 and 3 with scores split over several
  programs), top-k larger than the entries, an empty cache; the GPU launch's ranges. Scores against an fp64
  evaluation of the op's formula: relative norm error <= 1e-5 (products are exact, only the fp32 sums' order
  differs), -inf exactly where the reference has it. The selected set equals the reference's in every row whose
  k-th and k+1-th scores are further apart than 1e-5 of its largest score; ties and the order of ids are the
  kernels' own definition, checked exactly on scores with many ties;
- the top-k spread over several programs a row (the launch batch 1 gets at long context, forced here on small rows):
  exactly the one-program select and the contract's ranking (score descending, entry ascending) on rows of ties in
  blocks, -0.0 beside +0.0, -inf, values told apart by their lowest bits only, E on and around chunk and span
  boundaries, k = E, B = 1 and 3, T = 1 to 4; and through the whole op (k above E; context 1000); the GPU launch's
  spans;
- the pass on a small graph built from the model's own `indexer_select` feeding a C4 attention, through
  kv_compression and sparse_attention in both orders: one match each, no indexer key unpacked, the graph before and
  after equal bit for bit on fresh random inputs (the op's CPU reference is the same math and the same `topk`);
  near misses: a mask one position off, keys not stored packed, top-k values read for more than their validity.
The compiled tiny artifact that runs the pass in the whole pipeline is tests/test_sparse_attention_pass.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import os
import re
import types

import pytest
import torch

from child_pool import child_pool, run_in
from dsv4c.codegen.kernels.lightning_indexer_launch import indexer_launch
from dsv4c.codegen.kv_cache import kv_pack, unpack_reference
from dsv4c.codegen.targets import target
from dsv4c.model import quant, rounding_ops
from dsv4c.model.attention import (attend, indexer_rounding, indexer_select, ring_timeline, ring_write, token_windows,
                                   visible_entries)
from dsv4c.model.layers import apply_rope, layer_inv_freq, linear
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import CacheRounding
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.kv_compression import kv_compression
from dsv4c.passes.lightning_indexer import lightning_indexer as lightning_indexer_pass
from dsv4c.passes.manager import PassContext, compare_values, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.sparse_attention import sparse_attention
from pass_graphs import export_flat, targets

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
SCORE_TOL = 1e-5
HEADS, DIM, BLOCK, RATIO = 64, 128, 32, 4


# ---- kernels under the interpreter -----------------------------------------------------------------------------
def _run(name, args, launch_changes):
    """In the child: codegen/kernels/lightning_indexer.py's `name` with the cpu launch, fields replaced."""
    from dsv4c.codegen.kernels import lightning_indexer as kernels

    if name == "select_topk":
        scores, k = args
        launch = indexer_launch(target("cpu"), 1, 1, 1, scores.shape[-1], BLOCK)
        return kernels.select_topk(scores, k, dataclasses.replace(launch, **launch_changes))
    q, head_w, cache, start, ratio, topk, block = args
    launch = indexer_launch(target("cpu"), q.shape[0], q.shape[1], q.shape[2], cache.shape[1], block)
    launch = dataclasses.replace(launch, **launch_changes)
    scores = kernels.indexer_scores(q, head_w, cache, start, ratio, block, launch) if cache.shape[1] else None
    return scores, kernels.lightning_indexer(*args, launch=launch)


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return run_in(interpreter_pool, _run)


def inputs(context: int, steps: int, topk: int, entries: int = 1000 // RATIO + 1):
    """Two sequences whose last query sits at position context - 1 (the second one step behind): FP4-rounded
    queries, head weights with their scale, packed keys on the FP4 grid (as the model writes them)."""
    q = quant.fake_quant_fp4(quant.hadamard(torch.randn(2, steps, HEADS, DIM)), BLOCK).bfloat16()
    head_w = torch.randn(2, steps, HEADS) * (DIM ** -0.5 * HEADS ** -0.5)
    keys = quant.fake_quant_fp4(quant.hadamard(torch.randn(2, entries, DIM) * 2), BLOCK).bfloat16()
    start = torch.tensor([context - steps, max(context - steps - 1, 0)])
    return q, head_w, kv_pack(keys, "e2m1", DIM, BLOCK), start, RATIO, topk, BLOCK


def fp64_scores(q, head_w, cache, start, ratio, topk, block):
    """The op's scores, evaluated in fp64 on the unpacked keys."""
    keys = unpack_reference(cache, "e2m1", DIM, DIM, block, q.dtype).double()
    logits = torch.einsum("bthd,bsd->bths", q.double(), keys).relu()
    total = (logits * head_w.double().unsqueeze(-1)).sum(dim=2)
    positions = start.unsqueeze(1) + torch.arange(q.shape[1])
    return total.masked_fill(~visible_entries(positions, cache.shape[1], ratio), float("-inf"))


def assert_same_selection(ids, valid, scores, k):
    """Per query row: ids in ascending order, valid exactly where the score is finite, as many valid as the
    reference has, and the reference's set unless its k-th and k+1-th scores lie within the rounding."""
    assert ids.dtype == torch.int64 and valid.dtype == torch.bool and ids.shape == valid.shape == (*scores.shape[:2], k)
    for row_ids, row_valid, row in zip(ids.flatten(0, 1), valid.flatten(0, 1), scores.flatten(0, 1)):
        assert torch.equal(row_ids, row_ids.sort().values) and row_ids.unique().numel() == k
        assert torch.equal(row_valid, torch.isfinite(row[row_ids]))
        top = row.topk(min(k + 1, row.numel()))
        assert int(row_valid.sum()) == int(torch.isfinite(top.values[:k]).sum())
        scale = row[torch.isfinite(row)].abs().max() if torch.isfinite(row).any() else 0.0
        if k == row.numel() or top.values[k - 1] - top.values[k] > SCORE_TOL * scale:
            want = top.indices[:k][torch.isfinite(top.values[:k])]
            assert set(row_ids[row_valid].tolist()) == set(want.tolist())


SPLIT = {"block_e": 32, "entries_per_split": 96, "splits": 3}  # 251 entries over 3 programs, a partial last tile
TOKEN_BLOCKS = {"block_t": 2}  # 3 tokens over 2 programs, a partial last block (a prefill chunk's launch)
CASES = [(context, steps, {}) for context in (1, 127, 128, 129, 1000) for steps in (1, 4) if steps <= context] + [
    (129, 2, {"decode": "mxfp"}), (1000, 3, {"decode": "mxfp"}), (129, 3, SPLIT), (1000, 1, SPLIT),
    (1000, 3, TOKEN_BLOCKS), (129, 3, {**SPLIT, **TOKEN_BLOCKS})]


@needs_triton
@pytest.mark.parametrize("context,steps,changes", CASES)
def test_kernels_select_the_reference_set(interpreter, context, steps, changes):
    args = inputs(context, steps, topk=16)
    scores, (ids, valid) = interpreter("lightning_indexer", args, changes)
    want = fp64_scores(*args)
    assert not torch.isnan(scores).any() and torch.equal(torch.isinf(scores), torch.isinf(want))
    finite = torch.isfinite(want)
    if finite.any():
        error = (scores[finite].double() - want[finite]).norm() / want[finite].norm()
        assert error <= SCORE_TOL, error.item()
    assert_same_selection(ids, valid, want, 16)


@needs_triton
def test_topk_larger_than_the_entries_and_an_empty_cache(interpreter):
    args = inputs(context=200, steps=2, topk=512, entries=60)  # 49 or 50 visible of 60, k = 60
    _, (ids, valid) = interpreter("lightning_indexer", args, {})
    assert_same_selection(ids, valid, fp64_scores(*args), 60)
    assert valid.sum(-1).tolist() == [[49, 50], [49, 49]]
    empty = inputs(context=9, steps=3, topk=512, entries=0)
    _, (ids, valid) = interpreter("lightning_indexer", empty, {})
    assert ids.shape == valid.shape == (2, 3, 0)


@needs_triton
def test_topk_takes_ties_lowest_entry_first(interpreter):
    """The first k entries by (score descending, entry ascending), in entry order, over several chunks: many ties,
    -0.0 equal to +0.0, negative scores, rows with fewer finite scores than k."""
    scores = torch.randint(-4, 5, (4, 600)).float() / 2
    scores[0, ::3] = float("-inf")
    scores[1], scores[1, ::2] = -0.0, 0.0
    scores[2, 5:] = float("-inf")
    ranked = torch.sort(-scores, dim=-1, stable=True).indices  # score descending, ties by entry
    for k, chunk in ((300, 128), (600, 1024), (7, 64)):
        ids, valid = interpreter("select_topk", (scores, k), {"chunk": chunk})
        assert torch.equal(ids, ranked[:, :k].sort(dim=-1).values)
        assert torch.equal(valid, scores.gather(1, ids) > float("-inf"))


def ranked_topk(scores, k):
    """The top-k contract: the first k entries by (score descending, entry ascending), in entry order, valid where
    the score is above -inf."""
    ids = torch.sort(-scores, dim=-1, stable=True).indices[..., :k].sort(dim=-1).values
    return ids, scores.gather(-1, ids) > float("-inf")


def hard_scores(batch, steps, entries, seed):
    """[batch, steps, entries] scores that exercise every digit and the tie rule across spans, row r of kind r % 4:
    a few values in blocks of 7 equal entries (-0.0 beside +0.0, every fifth -inf); values 1 + j * 2^-23 (only the
    lowest digit tells them apart); normal values; 3 finite scores, the rest -inf."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(-3, 4, (batch * steps, -(-entries // 7)), generator=g).float() / 2
    rows = blocks.repeat_interleave(7, dim=-1)[:, :entries].clone()
    rows[:, ::5] = float("-inf")
    rows[:, 1::11] = -0.0
    rows[1::4] = 1 + torch.randint(0, 40, rows[1::4].shape, generator=g).float() * 2.0 ** -23
    rows[2::4] = torch.randn(rows[2::4].shape, generator=g)
    rows[3::4, 3:] = float("-inf")
    return rows.view(batch, steps, entries)


PARALLEL = [  # (batch, steps, entries, k, launch fields): spans of whole chunks, E around their boundaries
    (1, 1, 129, 40, {"chunk": 64, "topk_spans": 3, "topk_span": 64}),
    (3, 2, 256, 256, {"chunk": 64, "topk_spans": 4, "topk_span": 64}),
    (1, 4, 257, 100, {"chunk": 64, "topk_spans": 3, "topk_span": 128}),
    (3, 1, 383, 7, {"chunk": 32, "topk_spans": 4, "topk_span": 96}),
    (1, 3, 1000, 512, {"chunk": 128, "topk_spans": 8, "topk_span": 128}),
]


@needs_triton
@pytest.mark.parametrize("batch,steps,entries,k,changes", PARALLEL)
def test_topk_over_several_programs_a_row_selects_what_one_program_does(interpreter, batch, steps, entries, k,
                                                                        changes):
    """The multi-program select (each row's entries over spans, chunk- and span-boundary sizes, k = E included)
    against the contract's ranking and against the one-program select, exactly: ids, their order and validity."""
    scores = hard_scores(batch, steps, entries, seed=entries + k)
    want = ranked_topk(scores, k)
    parallel = interpreter("select_topk", (scores, k), changes)
    one_program = interpreter("select_topk", (scores, k), {})
    for got in (parallel, one_program):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_topk_over_several_programs_through_the_op(interpreter):
    """The whole op with the multi-program top-k: top-k above the entries (k = E, most of them masked for the
    earlier tokens) and a top-16 of 251 entries at context 1000, against the fp64 reference's selection."""
    spread = {"chunk": 16, "topk_spans": 4, "topk_span": 16}
    args = inputs(context=200, steps=2, topk=512, entries=60)
    _, (ids, valid) = interpreter("lightning_indexer", args, spread)
    assert_same_selection(ids, valid, fp64_scores(*args), 60)
    assert valid.sum(-1).tolist() == [[49, 50], [49, 49]]
    args = inputs(context=1000, steps=3, topk=16)
    scores, (ids, valid) = interpreter("lightning_indexer", args, {"chunk": 32, "topk_spans": 3, "topk_span": 96})
    assert_same_selection(ids, valid, fp64_scores(*args), 16)
    assert torch.equal(ids, ranked_topk(scores, 16)[0])


@pytest.mark.parametrize("batch,steps,entries", [(1, 1, 65_537), (32, 1, 65_537), (128, 1, 1025), (1, 1, 1),
                                                  (3, 1, 251), (1, 32, 16_385), (4, 32, 1025)])
def test_gpu_launch_covers_every_entry_once_and_fills_the_gpu(batch, steps, entries):
    """Flash sizes on H100: split ranges of whole tiles that cover the entries, none empty, at least one program
    an SM (two where the tiles allow) and at most two, counting a prefill chunk's token blocks."""
    launch = indexer_launch(target("h100"), batch, steps, HEADS, entries, BLOCK)
    tiles = -(-entries // launch.block_e)
    programs = batch * -(-steps // launch.block_t) * launch.splits
    assert launch.splits * launch.entries_per_split >= entries > (launch.splits - 1) * launch.entries_per_split
    assert min(2 * 132, programs // launch.splits * tiles) // 2 <= programs <= max(2 * 132, programs // launch.splits)


def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _topk_ptx(chunk: int) -> dict[str, str]:
    """In the child: the PTX of each top-k kernel built for H100 (sm_90a) with 8 warps, by name."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import lightning_indexer_topk as topk
    from dsv4c.codegen.targets import target, triton_gpu_target

    pointers = {"scores_ptr": "*fp32", "hist_ptr": "*i32", "bounds_ptr": "*i32", "ids_ptr": "*i64", "valid_ptr": "*u8"}
    kernels = {"one program": (topk._topk_kernel, {"CHUNK": chunk, "PDL": True}),
               "write": (topk._topk_write_kernel, {"SPANS": 512, "CHUNK": chunk, "PDL": True}),
               **{f"pass {shift}": (topk._radix_pass_kernel, {"SHIFT": shift, "CHUNK": chunk, "PDL": True})
                  for shift in (24, 0)}}
    ptx = {}
    for name, (fn, constexprs) in kernels.items():
        signature = {arg: pointers.get(arg, "i32") for arg in fn.arg_names if arg not in constexprs}
        source = ASTSource(fn, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs)
        built = triton.compile(source, target=triton_gpu_target(target("h100")), options={"num_warps": 8})
        ptx[name] = built.asm["ptx"]
    return ptx


def _scores_builds() -> dict[str, int]:
    """In the child: the scores kernel built for H100 (sm_90a) with each product and h100's launch for 1, 4 and
    32 tokens (decode, MTP verification, a prefill chunk) of Flash's 64 indexer heads of 128 dims: its shared
    memory by (decode, product, tokens). At 32 tokens the launch's token blocks (4 tokens) build what 4 tokens
    build: the case checks that cap."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import lightning_indexer as indexer
    from dsv4c.codegen.targets import target, triton_gpu_target

    pointers = {"q_ptr": "*bf16", "w_ptr": "*fp32", "cache_ptr": "*u8", "start_ptr": "*i64", "scores_ptr": "*fp32"}
    shared = {}
    for (decode, product), tokens in itertools.product((("registers", "bf16"), ("registers", "ieee")), (1, 4, 32)):
        launch = indexer_launch(target("h100"), 1, tokens, 64, 16_384, 32)
        constexprs = dict(RATIO=4, D=128, QBLOCK=32, BLOCK_T=launch.block_t, BLOCK_H=64, BLOCK_E=launch.block_e,
                          DECODE=decode, PRODUCT=product, PDL=True)
        signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "i32") for arg in
                     indexer._scores_kernel.arg_names}
        built = triton.compile(ASTSource(indexer._scores_kernel, signature, constexprs),
                               target=triton_gpu_target(target("h100")), options={"num_warps": launch.scores_warps})
        assert ".target sm_90a" in built.asm["ptx"] and "griddepcontrol.wait" in built.asm["ptx"]
        shared[f"{decode} {product} {tokens}"] = built.metadata.shared
    return shared


@needs_triton
def test_scores_kernel_builds_for_h100():
    """Every product of the scores kernel builds for sm_90a (Triton 3.6, the GPU image's, refused the bf16 one
    while an early `return` in a constexpr branch left the fp32 product after it to be type-checked), within the
    shared memory an H100 block may use, a prefill chunk's tokens too (all 32 in one program asked for 544 KB)."""
    from dsv4c.codegen.targets import target

    with child_pool(_start_compiler) as pool:
        shared = pool.submit(_scores_builds).result()
    assert len(shared) == 6 and all(0 < v <= target("h100").smem_bytes for v in shared.values()), shared


@needs_triton
def test_topk_kernels_build_for_h100():
    """The interpreter runs what the GPU compiler may refuse (a loop-carried constant, say): every top-k kernel
    builds for sm_90a, the histogram passes add into the row's histogram with relaxed global atomics, and neither
    the write nor the one-program kernel touches global memory atomically."""
    with child_pool(_start_compiler) as pool:
        ptx = pool.submit(_topk_ptx, 1024).result()
    atomic = re.compile(r"(?:red|atom)\.global\.[\w.]*add")
    assert all(".target sm_90a" in text for text in ptx.values())
    assert all(re.search(r"(?:red|atom)\.global\.gpu\.relaxed\.add", ptx[f"pass {s}"]) for s in (24, 0))
    assert not atomic.search(ptx["write"]) and not atomic.search(ptx["one program"])


@pytest.mark.parametrize("batch,steps,entries,spread", [
    (1, 1, 16_384, True), (1, 4, 262_145, True), (2, 1, 65_537, True),  # batch 1-2 at 64K-1M context
    (32, 1, 65_537, True), (8, 4, 16_385, True),  # batch 8-32 at 64K-256K context
    (1, 1, 1025, False), (64, 1, 65_537, False), (128, 1, 16_384, False)])  # 4K context; rows that fill the GPU
def test_gpu_launch_spreads_the_topk_of_few_long_rows(batch, steps, entries, spread):
    """Flash sizes on H100: the top-k of few long rows over spans of whole chunks covering the row, none empty, at
    most two programs an SM; short rows and batches of 64 rows and more keep one program a row."""
    launch = indexer_launch(target("h100"), batch, steps, HEADS, entries, BLOCK)
    assert launch.topk_spans * launch.topk_span >= entries > (launch.topk_spans - 1) * launch.topk_span
    assert launch.topk_span % launch.chunk == 0 and (launch.topk_spans > 1) == spread
    assert batch * steps * launch.topk_spans <= max(2 * 132, batch * steps)


# ---- the pass ---------------------------------------------------------------------------------------------------
CFG, NUM = tiny(), Numerics()
WIDTH, ROUNDED, WINDOW, SLOTS, ENTRIES, STEPS = 96, 64, 4, 6, 12, 2
FP8, FP4 = CacheRounding("e4m3", ROUNDED, 64), CacheRounding("e2m1", CFG.index_head_dim, 32)
NAMES = ("out", "state.ring", "state.cache", "state.keys")
ROUNDINGS = {"ring": FP8, "cache": FP8, "keys": FP4}


def rounded_kv(x):
    return torch.cat((rounding_ops.fake_quant_fp8(x[..., :ROUNDED], 64), x[..., ROUNDED:]), dim=-1)


def buffers():
    return {"wq_b": torch.randn(CFG.index_n_heads * CFG.index_head_dim, CFG.q_lora_rank) * 0.1,
            "weights_proj": torch.randn(CFG.index_n_heads, CFG.hidden_size) * 0.1, "inv_freq": layer_inv_freq(CFG, 1)}


def c4_attention(m, x, qr, q, ring, cache, keys, new, sink, start, *, select=indexer_select, shift=0):
    """The model's indexer selection (C4 keys, `keys`) feeding a window + selected-entries attention."""
    positions = start.unsqueeze(1) + torch.arange(STEPS)
    w = {"wq_b.weight": m.wq_b, "weights_proj.weight": m.weights_proj}
    ids, valid = select(x, qr, positions + shift, w, "", keys, CFG, m.inv_freq, NUM)
    kv = rounded_kv(new)
    window = token_windows(ring_timeline(ring, kv, start), WINDOW, STEPS)
    key_pos = positions.unsqueeze(-1) - WINDOW + 1 + torch.arange(WINDOW)
    chosen = cache.unsqueeze(1).expand(-1, STEPS, -1, -1).gather(2, ids.unsqueeze(-1).expand(-1, -1, -1, WIDTH))
    out = attend(q, [(window, key_pos >= 0, "per_query"), (chosen, valid, "per_query")], sink, WIDTH ** -0.5, NUM)
    return out, ring_write(ring, kv, start), cache, keys


def mask_one_off(m, *args):
    return c4_attention(m, *args, shift=1)


def selection_reading_values(x, qr, positions, w, prefix, keys, cfg, inv_freq, num):
    """`indexer_select` whose top-k values are also read for their size, not only compared with -inf."""
    heads, dim = cfg.index_n_heads, cfg.index_head_dim
    q = linear(qr, w["wq_b.weight"], num, quantized=True).unflatten(-1, (heads, dim))
    q = indexer_rounding(cfg, num)(apply_rope(q, positions.unsqueeze(-1), inv_freq))
    head_w = linear(x, w["weights_proj.weight"], num, quantized=False).float() * (dim ** -0.5 * heads ** -0.5)
    logits = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu()
    scores = (logits * head_w.unsqueeze(-1)).sum(dim=2)
    top = scores.masked_fill(~visible_entries(positions, keys.shape[1], 4), float("-inf")).topk(cfg.index_topk)
    return top.indices, (top.values > float("-inf")) & (top.values < 1e4)


def values_read(m, *args):
    return c4_attention(m, *args, select=selection_reading_values)


def make_inputs(batch):
    """Activations, the attention query, ring and cache on the FP8 grid, indexer keys on the FP4 grid, new rows,
    sink, start."""
    on_grid = lambda *shape: rounded_kv(torch.randn(*shape, WIDTH) * 2).bfloat16()  # noqa: E731
    keys = FP4.apply(quant.hadamard(torch.randn(batch, ENTRIES, CFG.index_head_dim))).bfloat16()
    return [torch.randn(batch, STEPS, CFG.hidden_size).bfloat16(),
            torch.randn(batch, STEPS, CFG.q_lora_rank).bfloat16(),
            torch.randn(batch, STEPS, 2, WIDTH).bfloat16(), on_grid(batch, SLOTS), on_grid(batch, ENTRIES), keys,
            torch.randn(batch, STEPS, WIDTH).bfloat16(), torch.randn(2), torch.randint(0, 40, (batch,))]


def packed(ring, cache, keys):
    """The ring, the cache and the indexer keys as kv_compression stores them."""
    return [kv_pack(t, r.format, r.rounded, r.block) for t, r in ((ring, FP8), (cache, FP8), (keys, FP4))]


def packed_inputs(values):
    """The after-graph's inputs: the caches the pass stores packed, packed."""
    x, qr, q, ring, cache, keys, new, sink, start = values
    return [x, qr, q, *packed(ring, cache, keys), new, sink, start]


def passes(fn, roundings, indexer_first=False):
    """(fn on its weights, its graph after cleanup, kv_compression, sparse_attention and the pass, records by name)."""
    weights = buffers()
    gm = export_flat(fn, make_inputs(2), [True] * 7 + [False, True], weights)
    fusions = [sparse_attention, lightning_indexer_pass]
    fusions = fusions[::-1] if indexer_first else fusions
    ctx = PassContext(output_names=NAMES, cache_roundings=roundings)
    gm, records = run_pipeline(gm, [noop_removal, dead_code, cse, kv_compression, *fusions], ctx)
    return functools.partial(fn, types.SimpleNamespace(**weights)), gm, {r.name: r for r in records}


@pytest.mark.parametrize("indexer_first", [False, True])
def test_the_selection_becomes_one_op_reading_packed_keys_with_the_same_values(indexer_first):
    before, after, records = passes(c4_attention, ROUNDINGS, indexer_first)
    assert records["lightning_indexer"].matches == 1 and records["sparse_attention"].details["kinds"] == ["C4"]
    assert records["lightning_indexer"].details["kinds"] == [f"top-{CFG.index_topk} of {ENTRIES}"]
    ops = targets(after)
    assert ops.count("dsv4c.lightning_indexer.default") == 1 and ops.count("dsv4c.sparse_decode_attention.default") == 1
    assert not {"dsv4c.kv_unpack.default", "aten.einsum.default", "aten.topk.default"} & set(ops)
    for batch in (1, 3):
        values = make_inputs(batch)
        want, got = before(*values), after(*packed_inputs(values))
        assert compare_values(got[0], want[0], 0.0) is None
        assert [torch.equal(g, w) for g, w in zip(got[1:], packed(*want[1:]))] == [True] * 3


@pytest.mark.parametrize("fn,roundings", [(mask_one_off, ROUNDINGS), (values_read, ROUNDINGS),
                                          (c4_attention, {"ring": FP8, "cache": FP8})])
def test_near_misses_are_left_alone(fn, roundings):
    """A visibility mask one position off; top-k values read for more than their validity; keys not packed."""
    _, after, records = passes(fn, roundings)
    assert records["lightning_indexer"].matches == 0
    description = records["lightning_indexer"].description
    assert "0 indexer selections read packed FP4 keys (none); 1 top-k left alone" in description
    assert "dsv4c.lightning_indexer.default" not in targets(after)

