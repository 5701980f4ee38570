"""compressor_fusion: each KV compressor's step becomes one `dsv4c::compress_step_` writing its rings and packed cache.

- the kernel (codegen/kernels/compressor.py) under TRITON_INTERPRET=1 against the op's reference: C4 with its
  overlapping halves (FP8 rows, and the indexer's Hadamard + FP4 rows), C16 and C128 (Flash's 512-dim rows), bf16 and
  fp32 rows, steps of 1 to 4 tokens and a prefill longer than the ring, positions near 0 and far ones. Rings and
  every row the step does not write: bit for bit. Written rows, unpacked, by relative norm error: 2e-2 for e4m3
  (the kernel's sums and exp may move a bf16 value by one step, which flips an FP8 code rarely), 1e-1 for e2m1
  (one FP4 step is up to a third of a value, and one input's step moves every Hadamard output); under the
  interpreter every case here is bit for bit. And the kernel builds to PTX for sm_90a at Flash sizes (no GPU);
- the pass on graphs of the model's own `compress` (a C4 layer's two compressors and a C16 one), run through
  kv_compression then the pass: exact match counts, no aten compressor op left, rings returned as the inputs the op
  wrote; the graphs before and after over a prefill longer than the rings that ends mid-block, then MTP-like decode
  steps of 1 to 4 tokens of which 1 to all are accepted, crossing many C4 and C16 block boundaries: every state bit
  for bit (on CPU the op runs its reference);
- near misses: caches not stored packed, the old ring read by another output, a transform other than Hadamard
  before the FP4 rounding, entries written one token early.
Compiled artifacts run the pass through the whole pipeline in tests/test_kv_compression.py (cached values and
logits against eager), tests/test_sparse_attention_pass.py and tests/test_mtp_k.py (MTP verification steps).
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from child_pool import child_pool, run_in
from dsv4c.codegen import compressor
from dsv4c.codegen.kv_cache import PackedLayout, kv_pack, pack_reference, unpack_reference
from dsv4c.model import rounding_ops
from dsv4c.model.attention import (compress, indexer_rounding, kv_rounding, ring_timeline, ring_write,
                                   token_windows, write_rows)
from dsv4c.model.layers import apply_rope, layer_inv_freq, rms_norm
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import RING_SLACK, CacheRounding
from dsv4c.passes.compressor_fusion import compressor_fusion
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.kv_compression import kv_compression
from dsv4c.passes.manager import PassContext, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from pass_graphs import export_flat, targets

TRITON = importlib.util.find_spec("triton") is not None
TOLERANCE = {"e4m3": 2e-2, "e2m1": 1e-1}


# ---- the kernel under the interpreter ------------------------------------------------------------------------
def _kernel(*args):
    from dsv4c.codegen.kernels import compressor as kernels

    returned = kernels.compress_step(*args)
    return list(args[:3]), returned is args[0]


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return run_in(interpreter_pool, _kernel)


def op_inputs(ratio, coff, width, rope, layout_args, steps, starts, entries, dtype):
    """Fresh rings and cache (rows of random values: a kernel that skips a write leaves them), projections and
    angles for sequences at `starts`."""
    fmt, rounded, block, rotate = layout_args
    batch, features, slots = len(starts), coff * width, coff * ratio + RING_SLACK
    score_state = torch.randn(batch, slots, features)
    score_state[0, ::3] = float("-inf")  # slots no token has written yet
    angles = torch.randn(batch, steps, rope // 2) * 100
    state = [pack_reference((torch.randn(batch, entries + 1, width) * 3).to(dtype), fmt, rounded, block),
             torch.randn(batch, slots, features), score_state]
    rest = [torch.randn(batch, steps, features), torch.randn(batch, steps, features) * 2, torch.randn(ratio, features),
            torch.rand(width) + 0.5, angles.cos(), angles.sin(), torch.tensor(starts), ratio, 1e-6, fmt, rounded,
            block, rotate, dtype]
    return state, rest


FP8_96, FP4_64 = ("e4m3", 64, 64, False), ("e2m1", 64, 32, True)
FP8_512, FP4_128 = ("e4m3", 448, 64, False), ("e2m1", 128, 32, True)
KERNEL_CASES = {  # ratio, coff, width, rope dims, layout, steps, starts, cache entries, dtype
    "c4 decode": (4, 2, 96, 32, FP8_96, 1, [3, 9], 12, torch.bfloat16),
    "c4 mtp at 0": (4, 2, 96, 32, FP8_96, 4, [0, 6], 12, torch.bfloat16),
    "c4 indexer": (4, 2, 64, 32, FP4_64, 3, [1, 38], 12, torch.bfloat16),
    "c16 mtp": (16, 1, 96, 32, FP8_96, 4, [13, 60], 6, torch.bfloat16),
    "c16 prefill past the ring": (16, 1, 96, 32, FP8_96, 21, [0, 11], 6, torch.bfloat16),
    "c4 fp32 rows": (4, 2, 96, 32, FP8_96, 2, [2, 7], 12, torch.float32),
    "flash c4": (4, 2, 512, 64, FP8_512, 2, [2, 4094], 1030, torch.bfloat16),
    "flash c4 indexer": (4, 2, 128, 64, FP4_128, 2, [6, 1002], 300, torch.bfloat16),
    "flash c128": (128, 1, 512, 64, FP8_512, 2, [126, 4094], 33, torch.bfloat16),
}


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_matches_the_reference(interpreter, case):
    ratio, coff, width, rope, layout_args, steps, starts, entries, dtype = KERNEL_CASES[case]
    state, rest = op_inputs(ratio, coff, width, rope, layout_args, steps, starts, entries, dtype)
    want = [t.clone() for t in state]
    compressor.reference(*want, *rest)
    (cache, kv_state, score_state), returns_the_cache = interpreter(*state, *rest)
    assert returns_the_cache and torch.equal(kv_state, want[1]) and torch.equal(score_state, want[2])
    written = torch.zeros(cache.shape[:2], dtype=torch.bool)
    for b, start in enumerate(starts):
        written[b, [p // ratio for p in range(start, start + steps) if (p + 1) % ratio == 0]] = True
    assert written.any() and torch.equal(cache[~written], want[0][~written])  # untouched rows and the spill row
    fmt, rounded, block, _ = layout_args
    got_rows, want_rows = (unpack_reference(c[written], fmt, width, rounded, block, dtype).double()
                           for c in (cache, want[0]))
    assert not torch.isnan(got_rows).any()
    error = ((got_rows - want_rows).norm() / want_rows.norm()).item()
    assert error <= TOLERANCE[fmt], error


def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _flash_ptx(ratio: int, width: int, layout_args: tuple) -> str:
    """The kernel's PTX for sm_90a at a Flash compressor's sizes (bf16 rows, 64 RoPE dims)."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import compressor as kernels
    from dsv4c.codegen.targets import target, triton_gpu_target

    fmt, rounded, block, rotate = layout_args
    coff, layout = (2 if ratio == 4 else 1), PackedLayout(fmt, width, rounded, block, torch.bfloat16)
    launch = kernels.compressor_launch(coff * ratio, width)
    fn = kernels._compress_kernel
    pointers = dict(zip(fn.arg_names[:11], ["*u8", "*i16"] + ["*fp32"] * 8 + ["*i64"]))
    scalars = {name: "fp32" if name in ("eps", "hadamard_scale") else "i32" for name in fn.arg_names[11:27]}
    constexprs = dict(WIDTH=width, WIDTH_P2=width, FEATURES_P2=coff * width, RATIO=ratio, COFF=coff, HALF_ROPE=32,
                      ROUNDED=rounded, BLOCK=block, FP4=fmt == "e2m1", ROTATE=rotate, STAGES=width.bit_length() - 1,
                      BF16=True, CODE_BYTES=layout.code_bytes, RAW_ITEM=2, SCALE_OFF=layout.scale_offset,
                      PAD=layout.row_bytes - layout.scale_offset - layout.scale_bytes, BLOCK_S=launch.block_s,
                      PDL=True)
    assert list(pointers) + list(scalars) + list(constexprs) == fn.arg_names
    source = ASTSource(fn, {**pointers, **scalars, **dict.fromkeys(constexprs, "constexpr")}, constexprs)
    return triton.compile(source, target=triton_gpu_target(target("h100")),
                          options={"num_warps": launch.num_warps, "enable_fp_fusion": False}).asm["ptx"]


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
def test_kernel_builds_for_h100_at_flash_sizes():
    """What the interpreter cannot check: the kernel compiles to PTX (C4, its indexer, C128; the interpreter runs
    what the compiler refuses, such as globals that are not constexpr)."""
    with child_pool(_start_compiler) as pool:
        for ratio, width, layout_args in ((4, 512, FP8_512), (4, 128, FP4_128), (128, 512, FP8_512)):
            ptx = pool.submit(_flash_ptx, ratio, width, layout_args).result()
            assert ".target sm_90a" in ptx and ".entry _compress_kernel" in ptx, (ratio, width)
            assert "griddepcontrol.wait" in ptx, (ratio, width)  # launched as its predecessor's dependent


# ---- the pass on graphs of the model's compressors -----------------------------------------------------------
CFG, NUM = tiny(), Numerics()
INPUT, MAX_SEQ_LEN, PREFILL, STEPS = 32, 128, 21, 48
COMPRESSORS = {  # name: ratio, width, the model's rounding, its cache rounding, the pass's kind
    "c4": (4, CFG.head_dim, kv_rounding(CFG, NUM), CacheRounding("e4m3", CFG.nope_head_dim, 64), "C4 e4m3"),
    "index": (4, CFG.index_head_dim, indexer_rounding(CFG, NUM), CacheRounding("e2m1", CFG.index_head_dim, 32),
              "C4 e2m1 hadamard"),
    "c16": (16, CFG.head_dim, kv_rounding(CFG, NUM), CacheRounding("e4m3", CFG.nope_head_dim, 64), "C16 e4m3"),
}
PARTS = ("kv_state", "score_state", "cache")
NAMES = tuple(f"state.{name}.{part}" for name in COMPRESSORS for part in PARTS)
ROUNDINGS = {f"{name}.cache": spec[3] for name, spec in COMPRESSORS.items()}
BATCHED = [True, True] + [False, False, False, False, True, True, True] * len(COMPRESSORS)


def model_compress(m, x, start, name, wkv, wgate, ape, norm, kv_state, score_state, cache, rounding=None):
    """The model's `compress` of compressor `name` over x (with another rounding if given): its new state."""
    ratio, width, model_rounding, _, _ = COMPRESSORS[name]
    w = {"wkv.weight": wkv, "wgate.weight": wgate, "ape": ape, "norm.weight": norm}
    state = {"kv_state": kv_state, "score_state": score_state, "cache": cache}
    new = compress(x, start, w, "", state, ratio, width, m.inv_freq, rounding or model_rounding, CFG, NUM)
    return tuple(new[part] for part in PARTS)


def compressors(m, x, start, *tensors):
    """Every compressor of COMPRESSORS over the same x: their new states, in order."""
    parts = [tensors[7 * i: 7 * i + 7] for i in range(len(COMPRESSORS))]
    return sum((model_compress(m, x, start, name, *part) for name, part in zip(COMPRESSORS, parts)), ())


def weights() -> list[list[torch.Tensor]]:
    out = []
    for ratio, width, *_ in COMPRESSORS.values():
        features = (2 if ratio == 4 else 1) * width
        out.append([torch.randn(features, INPUT) / 4, torch.randn(features, INPUT) / 4, torch.randn(ratio, features),
                    torch.rand(width) + 0.5])
    return out


def empty_state(batch: int) -> list[list[torch.Tensor]]:
    """As model/step.py `init_state` makes it: zero rings, -inf scores, zero caches (+ the spill row)."""
    out = []
    for ratio, width, *_ in COMPRESSORS.values():
        coff = 2 if ratio == 4 else 1
        ring = (batch, coff * ratio + RING_SLACK, coff * width)
        out.append([torch.zeros(ring), torch.full(ring, float("-inf")),
                    torch.zeros(batch, MAX_SEQ_LEN // ratio + 1, width, dtype=NUM.dtype)])
    return out


def flat(weight_sets, states, x, start) -> list[torch.Tensor]:
    return [x, start] + [t for w, s in zip(weight_sets, states) for t in w + s]


def example(steps: int, names: tuple[str, ...] = tuple(COMPRESSORS)) -> list[torch.Tensor]:
    """Inputs of a graph of the compressors `names`."""
    chosen = [list(COMPRESSORS).index(name) for name in names]
    pick = lambda sets: [sets[i] for i in chosen]  # noqa: E731
    return flat(pick(weights()), pick(empty_state(2)), torch.randn(2, steps, INPUT).bfloat16(),
                torch.zeros(2, dtype=torch.int64))


def optimised(gm, names=NAMES, roundings=ROUNDINGS):
    """(graph after cleanup, kv_compression and the pass (the pipeline's order), the pass's record)."""
    ctx = PassContext(output_names=names, cache_roundings=roundings)
    gm, records = run_pipeline(gm, [noop_removal, dead_code, cse, kv_compression, compressor_fusion], ctx)
    return gm, records[-1]


def export(fn, steps: int, names: tuple[str, ...] = tuple(COMPRESSORS)):
    return export_flat(fn, example(steps, names), BATCHED[:2 + 7 * len(names)],
                       buffers={"inv_freq": layer_inv_freq(CFG, 1)})


@pytest.fixture(scope="module")
def step_graphs():
    """steps -> (the model's graph, the fused graph, the pass's record)."""
    out = {}
    for steps in (1, 2, 3, 4, PREFILL):
        before = export(compressors, steps)
        out[steps] = (before, *optimised(copy.deepcopy(before)))
    return out


def test_each_compressor_becomes_one_op_that_writes_its_state_in_place(step_graphs):
    for steps, (_, after, record) in step_graphs.items():
        assert record.matches == 3 and record.details["kinds"] == [spec[4] for spec in COMPRESSORS.values()], steps
        ops = targets(after)
        assert ops.count("dsv4c.compress_step_.default") == 3
        for gone in ("aten.softmax.int", "aten.unfold.default", "aten.gather.default", "aten.scatter.src",
                     "dsv4c.kv_pack.default", "dsv4c.fake_quant_fp8.default", "dsv4c.fake_quant_fp4.default"):
            assert gone not in ops, (steps, gone)
        outputs = after.graph.output_node().args[0]
        assert all(node.op == "placeholder" for node, name in zip(outputs, NAMES) if not name.endswith("cache"))


def packed_caches(states):
    out = []
    for name, (kv, score, cache) in zip(COMPRESSORS, states):
        rounding = ROUNDINGS[f"{name}.cache"]
        out.append([kv, score, kv_pack(cache, rounding.format, rounding.rounded, rounding.block)])
    return out


def test_fused_graphs_equal_the_model_over_a_prefill_and_mtp_like_decode(step_graphs):
    """Sequences at different positions; each step's tokens after the accepted ones are rejected, so the next step
    starts before the step's end and overwrites them, as MTP verification does."""
    weight_sets, batch = weights(), 2
    model_state, fused_state = empty_state(batch), packed_caches(empty_state(batch))
    start, schedule = torch.tensor([0, 5]), [(PREFILL, torch.tensor([PREFILL, PREFILL]))]
    for _ in range(STEPS):
        steps = int(torch.randint(1, 5, ()))
        schedule.append((steps, torch.randint(1, steps + 1, (batch,))))
    for steps, accepted in schedule:
        if int(start.max()) + steps > MAX_SEQ_LEN:
            break
        before, after, _ = step_graphs[steps]
        x = torch.randn(batch, steps, INPUT).bfloat16()
        want = before(*flat(weight_sets, model_state, x, start))
        got = after(*flat(weight_sets, fused_state, x, start))
        model_state = [list(want[3 * i: 3 * i + 3]) for i in range(len(COMPRESSORS))]
        fused_state = [list(got[3 * i: 3 * i + 3]) for i in range(len(COMPRESSORS))]
        for name, wanted, fused in zip(COMPRESSORS, packed_caches(model_state), fused_state):
            for part, a, b in zip(PARTS, wanted, fused):
                assert torch.equal(a, b), (name, part, steps, start.tolist())
        start = start + accepted
    assert (start >= 4 * 16).all()  # several C16 blocks and many C4 blocks completed


# ---- near misses ---------------------------------------------------------------------------------------------
def one_compressor(m, x, start, *tensors):
    return model_compress(m, x, start, "c4", *tensors)


def old_ring_read_too(m, x, start, *tensors):
    """The C4 compressor, and an output that reads the old kv ring: writing it in place would change that output."""
    return (*model_compress(m, x, start, "c4", *tensors), tensors[4].sum(-1))


def permuted_indexer(m, x, start, *tensors):
    """The indexer's compressor with a reversal of the dims in place of the Hadamard transform."""
    flipped = lambda v: rounding_ops.fake_quant_fp4(v.flip(-1), 32)  # noqa: E731
    return model_compress(m, x, start, "index", *tensors, rounding=flipped)


def early_entries(m, x, start, wkv, wgate, ape, norm, kv_state, score_state, cache):
    """model/attention.py `compress` (C4) with one change: a block's entry is written by its second-to-last token."""
    ratio, width, steps = 4, CFG.head_dim, x.shape[1]
    positions = start.unsqueeze(1) + torch.arange(steps)
    kv = x.float() @ wkv.float().T
    score = x.float() @ wgate.float().T + ape.float()[positions % ratio]
    kv_win = token_windows(ring_timeline(kv_state, kv, start), 2 * ratio, steps)
    score_win = token_windows(ring_timeline(score_state, score, start), 2 * ratio, steps)
    kv_win = torch.cat((kv_win[:, :, :ratio, :width], kv_win[:, :, ratio:, width:]), dim=2)
    score_win = torch.cat((score_win[:, :, :ratio, :width], score_win[:, :, ratio:, width:]), dim=2)
    pooled = (score_win.softmax(dim=2) * kv_win).sum(dim=2).to(NUM.dtype)
    entry = positions // ratio
    pooled = apply_rope(rms_norm(pooled, norm, CFG.rms_norm_eps), entry * ratio, m.inv_freq)
    done = (positions + 2) % ratio == 0
    return (ring_write(kv_state, kv, start), ring_write(score_state, score, start),
            write_rows(cache, entry, kv_rounding(CFG, NUM)(pooled), done))


C4_NAMES = NAMES[:3]
C4_ROUNDINGS = {"c4.cache": ROUNDINGS["c4.cache"]}
INDEX_ROUNDING = {"c4.cache": ROUNDINGS["index.cache"]}


@pytest.mark.parametrize("fn,names,roundings,candidates", [
    (one_compressor, C4_NAMES, {}, 0),
    (old_ring_read_too, C4_NAMES + ("ring_total",), C4_ROUNDINGS, 1),
    (permuted_indexer, C4_NAMES, INDEX_ROUNDING, 1),
    (early_entries, C4_NAMES, C4_ROUNDINGS, 1),
], ids=["cache not packed", "old ring read elsewhere", "not hadamard", "entries one token early"])
def test_near_misses_are_left_alone(fn, names, roundings, candidates):
    after, record = optimised(export(fn, 2, ("index",) if fn is permuted_indexer else ("c4",)), names, roundings)
    assert record.matches == 0
    assert f"0 compressors write their rings and packed cache in one op (none); {candidates} cache row writes left " \
           f"alone" in record.description
    assert "dsv4c.compress_step_.default" not in targets(after)

