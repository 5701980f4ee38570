"""kv_compression: caches the model rounds are stored as codes and scales, exactly.

- the packed row layouts (bit-exact against model/quant.py's roundings; 584 and 68 bytes a token at Flash size);
- the pass on small graphs built from the model's own ring and cache functions: exact match counts, the graph
  before and after on fresh random inputs (the before-graph reads the packed state's values), near misses;
- a compiled tiny artifact (default numerics: FP8 KV, FP4 indexer) against the eager reference model over a
  prefill that ends mid-block and 83 decode steps crossing 21 C4 and 5 C16 block boundaries and wrapping the
  window: cached values equal bit for bit, logits within TOL (the faithful artifact's bound, tests/
  test_faithful_artifact.py says why); its manifest, state pool and `inspect` show the packed layouts.
"""

from __future__ import annotations

import pytest
import torch

from dsv4c.codegen.kv_cache import PackedLayout, kv_pack, kv_unpack
from dsv4c.export.inspect_artifact import describe
from dsv4c.model import quant, rounding_ops
from dsv4c.model.attention import ring_timeline, ring_write, write_rows
from dsv4c.model.checkpoint import Checkpoint
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import flash_slice, tiny
from dsv4c.model.step import CacheRounding, cache_roundings, dequantize_weights, forward, init_state, state_shapes
from dsv4c.passes.kv_compression import kv_compression
from dsv4c.passes.manager import PassContext, PassError, compare_values, run_pipeline
from dsv4c.runtime.artifact import decode_state, load_artifact
from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.loader import load
from faithful_artifact import GROUP, MAX_SEQ_LEN, faithful_artifact
from pass_graphs import export_flat, targets

NUM, CFG = Numerics(), tiny()
pytestmark = pytest.mark.xdist_group(GROUP)
TOL = 1e-5


def layout_of(rounding: CacheRounding, shape: tuple[int, ...], dtype: torch.dtype) -> PackedLayout:
    return PackedLayout(rounding.format, shape[-1], rounding.rounded, rounding.block, dtype)


def packed(x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    return kv_pack(x, layout.format, layout.rounded, layout.block)


def unpacked(p: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    return kv_unpack(p, layout.format, layout.width, layout.rounded, layout.block, layout.dtype)


# ---- layouts ---------------------------------------------------------------------------------------------
def test_flash_rows_are_584_bytes_of_main_kv_and_68_of_indexer_key():
    cfg = flash_slice()
    shapes = state_shapes(cfg, 1, 1024)
    rows = {name.split(".")[-1]: layout_of(r, shapes[name][0], torch.bfloat16).row_bytes
            for name, r in cache_roundings(cfg, NUM).items()}
    assert rows == {"window_kv": 584, "compressed_kv": 584, "indexer_kv": 68}
    assert cache_roundings(cfg, Numerics.plain()) == {}  # nothing rounded, nothing packed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pack_then_unpack_is_the_models_rounding_bit_for_bit(dtype):
    """Magnitudes over 22 binades, exact zeros and negative zeros, a row at the amax floor; and packing rounded
    values again gives them back (what the pass relies on)."""
    x = torch.randn(4, 3, 512) * torch.logspace(-9, 4, 512)[torch.randperm(512)]
    x[0, 0, :64], x[0, 1, 64:128], x[1, 0, :448] = 0.0, -0.0, 1e-6
    x = x.to(dtype)
    main = PackedLayout("e4m3", 512, 448, 64, dtype)
    rounded = torch.cat((quant.fake_quant_fp8(x[..., :448], 64), x[..., 448:]), dim=-1)
    index = PackedLayout("e2m1", 128, 128, 32, dtype)
    keys = quant.fake_quant_fp4(quant.hadamard(x[..., :128]), 32)
    for layout, value, want in ((main, x, rounded), (index, quant.hadamard(x[..., :128]), keys)):
        row = packed(value, layout)
        assert row.dtype == torch.uint8 and row.shape[-1] == layout.row_bytes
        for got in (unpacked(row, layout), unpacked(packed(want, layout), layout)):
            assert torch.equal(got.view(torch.uint8 if dtype == torch.bfloat16 else torch.int32),
                               want.view(torch.uint8 if dtype == torch.bfloat16 else torch.int32))
    assert not unpacked(torch.zeros(2, main.row_bytes, dtype=torch.uint8), main).any()  # the pool's fill


# ---- the pass on small graphs ----------------------------------------------------------------------------
WIDTH, ROUNDED = 96, 64
FP8 = CacheRounding("e4m3", ROUNDED, 64)


def rounded_kv(x):
    return torch.cat((rounding_ops.fake_quant_fp8(x[..., :ROUNDED], 64), x[..., ROUNDED:]), dim=-1)


def ring_and_cache(m, ring, cache, x, start):
    """A window ring read as a timeline and written, a cache of completed entries written then read by rows and
    whole: the model's functions, as attention uses them."""
    kv = rounded_kv(x)
    line = ring_timeline(ring, kv, start)
    positions = start.unsqueeze(1) + torch.arange(x.shape[1])
    done = (positions + 1) % 2 == 0
    new_cache = write_rows(cache, positions // 2, kv, done)
    picked = new_cache.gather(1, (positions // 2 % 3).unsqueeze(-1).expand(-1, -1, WIDTH))
    out = line.float().sum(1) + picked.float().sum(1) + new_cache.float().sum(1)
    return out, ring_write(ring, kv, start), new_cache


def make_inputs(batch):
    return [torch.randn(batch, 6, WIDTH).bfloat16(), torch.randn(batch, 4, WIDTH).bfloat16(),
            torch.randn(batch, 3, WIDTH).bfloat16() * 4, torch.randint(0, 40, (batch,))]


def run_pass(fn, names, roundings):
    gm = export_flat(fn, make_inputs(2))
    before = export_flat(fn, make_inputs(2))
    gm, (record,) = run_pipeline(gm, [kv_compression], PassContext(output_names=names, cache_roundings=roundings))
    return before, gm, record


def test_the_pass_stores_both_caches_packed_and_computes_the_same_values():
    names = ("out", "state.ring", "state.cache")
    before, after, record = run_pass(ring_and_cache, names, {"ring": FP8, "cache": FP8})
    assert record.matches == 2 and record.details["row_bytes"] == {"ring": 130, "cache": 130}
    assert "2 caches written packed, 0 passed through; 2 row reads" in record.description
    ops = targets(after)
    assert ops.count("dsv4c.kv_pack.default") == 2 and ops.count("dsv4c.kv_unpack.default") == 3
    assert ops.count("aten.scatter.src") == 2  # reinplace_state then writes them in place
    layout = PackedLayout("e4m3", WIDTH, ROUNDED, 64, torch.bfloat16)
    for batch in (1, 3):
        ring, cache, x, start = make_inputs(batch)
        ring_p, cache_p = packed(ring, layout), packed(cache, layout)
        want = before(unpacked(ring_p, layout), unpacked(cache_p, layout), x, start)
        got = after(ring_p, cache_p, x, start)
        assert compare_values(got[0], want[0], 0.0) is None
        for g, w in zip(got[1:], want[1:]):
            assert g.dtype == torch.uint8 and torch.equal(unpacked(g, layout), w)


def rounding_not_cached(m, ring, cache, x, start):
    """A near miss: the rounding feeds an output that is no state; the ring stores raw values (not declared)."""
    return rounded_kv(x).float().sum(1), ring_write(ring, x, start), cache


def test_a_rounding_that_reaches_no_declared_cache_is_left_alone():
    names = ("out", "state.ring", "state.cache")
    before, after, record = run_pass(rounding_not_cached, names, {"cache": FP8})
    assert record.matches == 0 and "0 caches written packed, 1 passed through" in record.description
    assert targets(after) == targets(before)


def unrounded_write(m, ring, cache, x, start):
    return x.float().sum(1), ring_write(ring, x, start), cache


def rounded_by_32(m, ring, cache, x, start):
    kv = torch.cat((rounding_ops.fake_quant_fp8(x[..., :ROUNDED], 32), x[..., ROUNDED:]), dim=-1)
    return x.float().sum(1), ring_write(ring, kv, start), cache


@pytest.mark.parametrize("fn", [unrounded_write, rounded_by_32])
def test_a_declared_cache_written_with_other_values_is_refused_by_name(fn):
    with pytest.raises(PassError, match=r"state\.ring is written with values not proven rounded to e4m3"):
        run_pass(fn, ("out", "state.ring", "state.cache"), {"ring": FP8})


# ---- a compiled artifact against the eager reference -----------------------------------------------------
PREFILL, LENGTH = 7, 90


@pytest.fixture(scope="module")
def compiled():
    ckpt, art = faithful_artifact()  # max_seq_len 96, prefill chunks of 2, tiny(): every layer kind
    source = Checkpoint.open(ckpt)
    return art, dequantize_weights({n: source.get(n) for n in source.headers}, NUM)


def schedule() -> list[tuple[int, int]]:
    """Prefill chunks of 2 and one single token (ending at 7: mid C4 and C16 block), then one token a step."""
    return [(0, 2), (2, 4), (4, 6), (6, 7)] + [(t, t + 1) for t in range(PREFILL, LENGTH)]


def test_compressed_artifact_equals_eager_in_cached_values_and_logits(compiled):
    art, weights = compiled
    engine = load(art)
    tokens = torch.randint(0, CFG.vocab_size, (2, LENGTH))
    state, reference = engine.new_state(2), init_state(CFG, 2, MAX_SEQ_LEN, NUM)
    layouts = {n: layout_of(r, reference[n].shape, NUM.dtype) for n, r in cache_roundings(CFG, NUM).items()}
    for a, b in schedule():
        start = torch.full((2,), a)
        out = engine.runner.run(f"main_t{b - a}", {**{f"state.{k}": v for k, v in state.items()},
                                                   "tokens": tokens[:, a:b], "start": start})
        state = {k: out[f"state.{k}"] for k in state}
        with batch_invariant():  # as the runtime runs every step
            logits, _, reference = forward(weights, reference, tokens[:, a:b], start, CFG, NUM)
        assert not torch.isnan(out["logits"]).any()
        assert compare_values(out["logits"].float(), logits.float(), TOL) is None, (a, b)
    for name, want in reference.items():
        got = unpacked(state[name], layouts[name]) if name in layouts else state[name]
        assert torch.equal(got, want), name


def test_manifest_pool_and_inspect_show_the_packed_layouts(compiled):
    art, _ = compiled
    engine = load(art)
    artifact = load_artifact(art)
    specs = decode_state(artifact.manifest)
    reference = state_shapes(CFG, 1, MAX_SEQ_LEN)
    for name, rounding in cache_roundings(CFG, NUM).items():
        layout = layout_of(rounding, reference[name][0], NUM.dtype)
        assert specs[name].dtype == torch.uint8 and specs[name].shape[-1] == layout.row_bytes
        assert engine.pool.tensors[name].dtype == torch.uint8
    assert specs["layers.1.compressor.kv_state"].dtype == torch.float32  # compressor rings stay raw
    text = "\n".join(describe(artifact))
    assert "layers.1.indexer_kv     [25, 34] uint8: e2m1[64]/32 = 34 B (128 B raw)" in text
    assert "context bytes per token: C4 41.0 B (1 layer, 41.0 B each); C16 8.1 B (1 layer, 8.1 B each)" in text


def test_a_debug_compile_checks_every_pass_through_the_packed_caches(tmp_path):
    """`dsv4c compile --debug` runs the graph before and after every pass on the same random inputs; after
    kv_compression the caches are packed, and the check follows them (inputs packed, outputs unpacked)."""
    from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
    from dsv4c.model.checkpoint import write_synthetic
    from dsv4c.model.presets import tiny
    from dsv4c.runtime.artifact import load_artifact

    ckpt = write_synthetic(tiny(), tmp_path / "ckpt", seed=2)
    options = CompileOptions(targets=("h100",), max_seq_len=64, prefill_chunk=2, mtp=False, debug=True)
    art = compile_checkpoint(ckpt, tmp_path / "art", options)
    log = load_artifact(art).manifest["pass_log"]
    records = [r for entry in log for r in entry["passes"] if r["name"] == "kv_compression"]
    assert records and all(r["matches"] > 0 for r in records)
