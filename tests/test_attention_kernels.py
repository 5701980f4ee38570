"""The sparse decode attention kernel (codegen/kernels/attention.py) under TRITON_INTERPRET=1 against its op's
reference (codegen/sparse_attention.py: the model's `attend` on unpacked rows), and its sm_90a build.

Reference: at Flash's row layout (512 dims, 448 e4m3 + 64 bf16, window 128) with 16 heads: contexts 1, 127,
128, 129 and 1000, 1 and 4 query tokens (4 fold on the interpreter's 8 SMs), C4 with more ids than entries
(and none at all) and C128 with no complete entry yet; then 20 heads (one 64-head program, padded) and tiny's
rows (96 dims, 64 e4m3 + 32 bf16, 130-byte rows, window 32, 4 heads). Tolerance 1e-2 relative norm error: the
kernel rounds the online softmax's unnormalised probabilities to bf16, the reference its normalised ones, and
both round the output to bf16 (measured 2.5e-3 to 3.2e-3).

One range over many tiles (no processors to fill: one split), with window keys flat or growing so fast that
every tile's maximum passes the running one by far more than the rescale slack: the lazily rescaled online
softmax matches the reference in both. Keys that do not count (ring slots of no position yet, cache rows past
the visible entries, ids of -1) read other rows; with 0xFF bytes in theirs (NaN codes, an infinite scale) the
kernel still equals the reference on clean rows.

Probabilities: the interpreter's products ("ieee", fp32) round the probabilities to bf16 as the GPU's bf16
products do. With one tile of keys in one range, the kernel equals that computation done in float64 but for at
most 8 of the 8192 outputs, each one bf16 step away (fp32 against float64 at a rounding boundary; measured over
30 seeds: 0 to 2 outputs, relative error at most 1.2e-4); unrounded probabilities are 6e-4 to 1.2e-3 away.

sm_90a (built without a GPU, in a child without TRITON_INTERPRET): at Flash's 64 heads the split and the folded
kernel multiply on wgmma (M = 64: the program's heads) with bf16 operands and fp32 accumulators; a 16-head
program has too few rows for wgmma and runs on mma.sync, bf16 too. "ieee" products would have no MMA at all.
At 64 heads the rows arrive only by asynchronous copies (no plain byte load: the scales come as one 8-byte word)
and the codes are decoded by the hardware e4m3 conversion and a bf16 multiply-add.

The kernels run in spawned children that set (or clear) TRITON_INTERPRET before importing Triton
(tests/child_pool.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import pytest
import torch

from child_pool import child_pool, run_in
from dsv4c.codegen import sparse_attention
from dsv4c.codegen.kv_cache import kv_pack, unpack_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
TOL = 1e-2
MMA = re.compile(r"(wgmma\.mma_async[.\w]*|mma\.sync[.\w]*)")
DECODE_AND_READS = re.compile(r"(cvt\.rn\.f16x2\.e4m3x2|fma\.rn\.bf16|ld\.global[.\w]*|cp\.async\.\w+\.shared\.global)")


@dataclasses.dataclass(frozen=True)
class Rows:
    """A query's heads and the packed rows it reads: `width` dims, the first `rounded` e4m3 (scale block 64)."""

    heads: int
    width: int = 512
    rounded: int = 448
    window: int = 128
    slots: int = 130

    def pack(self, values: torch.Tensor) -> torch.Tensor:
        return kv_pack(values, "e4m3", self.rounded, 64)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        return unpack_reference(rows, "e4m3", self.width, self.rounded, 64, torch.bfloat16)

    def random(self, *shape: int) -> torch.Tensor:
        return self.pack((torch.randn(*shape, self.width) * 2).bfloat16())


FLASH_ROWS = Rows(16)
WIDE = Rows(20)  # more than 16 heads: one 64-head program, 44 rows padding
TINY = Rows(4, width=96, rounded=64, window=32, slots=34)


def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _kernel(*args):
    from dsv4c.codegen.kernels import attention

    return attention.sparse_decode_attention(*args)


def _kernel_in_one_range(*args):
    """The kernel with every key of a query in one range (no processors to fill: one split), so that one program
    walks all the tiles and its online softmax meets each tile's maximum."""
    from dsv4c.codegen.kernels import attention

    q, cache, ids, window, ratio = args[0], args[3], args[4], args[8], args[9]
    keys = window + (ids.shape[-1] if ratio and ids.shape[-1] else cache.shape[1] if ratio else 0)
    launch = attention.attention_launch(q.shape[0] * q.shape[1], q.shape[2], keys, 0, "ieee")
    assert launch.splits == 1 and launch.keys_per_split >= 4 * launch.block_n, launch
    return attention.sparse_decode_attention(*args, launch=launch)


def _launches(tokens: list[int], heads: int, keys: int, sms: int) -> list:
    from dsv4c.codegen.kernels import attention

    return [attention.attention_launch(t, heads, keys, sms) for t in tokens]


def _bf16_products_on_cpu(*args) -> str:
    """The error the kernel gives for bf16 products on the interpreter."""
    from dsv4c.codegen.kernels import attention

    launch = dataclasses.replace(attention.attention_launch(1, args[0].shape[2], 1, 8), product="bf16")
    try:
        attention.sparse_decode_attention(*args, launch=launch)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return run_in(interpreter_pool)


def inputs(context: int, steps: int, ratio: int, topk: int, rows: Rows = FLASH_ROWS):
    """Two sequences whose last query sits at position context - 1 (the second one step behind)."""
    entries = 1000 // max(ratio, 1) + 1
    start = torch.tensor([context - steps, max(context - steps - 1, 0)])
    ids = torch.zeros(2, steps, 0, dtype=torch.int64)
    if topk:  # every complete entry of each query, padded with -1 up to topk: more ids than entries
        visible = (start.unsqueeze(1) + torch.arange(steps) + 1) // ratio
        ids = torch.where(torch.arange(topk) < visible.unsqueeze(-1), torch.arange(topk), -1)
    q = torch.randn(2, steps, rows.heads, rows.width).bfloat16()
    return (q, rows.random(2, steps), rows.random(2, rows.slots), rows.random(2, entries), ids, start,
            torch.randn(rows.heads), rows.width ** -0.5, rows.window, ratio, rows.rounded, 64)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any() and got.dtype == want.dtype and got.shape == want.shape
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


KERNEL_CASES = [(context, steps, ratio, topk) for context in (1, 127, 128, 129, 1000)
                for steps, ratio, topk in ((1, 4, 300), (4, 4, 300), (1, 128, 0), (4, 0, 0))
                if steps <= context]  # a step's tokens start at position 0 or later


@pytest.mark.parametrize("context,steps,ratio,topk", KERNEL_CASES)
def test_kernel_matches_the_reference(interpreter, context, steps, ratio, topk):
    args = inputs(context, steps, ratio, topk)
    error = relative_error(interpreter(_kernel, *args), sparse_attention.reference(*args))
    assert error <= TOL, error


@pytest.mark.parametrize("rows", [WIDE, TINY], ids=["20 heads", "tiny rows"])
@pytest.mark.parametrize("context,steps,ratio,topk", [(129, 4, 4, 40), (200, 1, 16, 0)])
def test_kernel_matches_the_reference_at_other_shapes(interpreter, rows, context, steps, ratio, topk):
    args = inputs(context, steps, ratio, topk, rows)
    error = relative_error(interpreter(_kernel, *args), sparse_attention.reference(*args))
    assert error <= TOL, error


def _one_tile(rounded_probabilities: bool, q, keys, sink, scale) -> torch.Tensor:
    """The kernel's computation for keys that fill one tile of one range, in float64: scores, their maximum m,
    p = exp(s - m) (rounded to bf16 where asked) times the keys, over the sum of p and the sink's share."""
    s = torch.einsum("hd,nd->hn", q.double(), keys.double()) * scale
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    weights = p.float().bfloat16().double() if rounded_probabilities else p
    peak = torch.maximum(m, sink.double().unsqueeze(-1))
    total = torch.exp(sink.double().unsqueeze(-1) - peak) + p.sum(-1, keepdim=True) * torch.exp(m - peak)
    return (weights @ keys.double() * torch.exp(m - peak) / total).bfloat16()


def test_interpreter_products_round_the_probabilities_to_bf16(interpreter):
    """One query at position 20 over a window of 8 (one tile, one range): its step's row and 7 ring rows."""
    rows, window, position = FLASH_ROWS, 8, 20
    values = rows.random(1, position + 1)
    ring = torch.zeros(1, 32, values.shape[-1], dtype=torch.uint8)
    ring[0, torch.arange(position) % 32] = values[0, :position]
    q, sink, scale = torch.randn(1, 1, rows.heads, rows.width).bfloat16(), torch.randn(rows.heads), 0.1
    args = (q, values[:, position:], ring, rows.random(1, 1), torch.zeros(1, 1, 0, dtype=torch.int64),
            torch.tensor([position]), sink, scale, window, 0, rows.rounded, 64)
    got = interpreter(_kernel, *args)[0, 0]
    keys = rows.unpack(values[0, position - window + 1:])
    rounded, unrounded = (_one_tile(r, q[0, 0], keys, sink, scale) for r in (True, False))
    assert not torch.isnan(got).any()
    apart = got != rounded
    one_step = 2.0 ** (torch.frexp(rounded[apart].float()).exponent - 8)  # a bf16 step at the value's binade
    assert apart.sum() <= 8 and ((got[apart].float() - rounded[apart].float()).abs() <= one_step).all()
    assert relative_error(got, rounded) <= 2e-4 and relative_error(got, unrounded) >= 5e-4


def _ring_positions(start: torch.Tensor, slots: int) -> torch.Tensor:
    """[sequence, slot]: the position a ring slot holds before a step from `start` (the latest below start with
    that residue; negative where none was written yet)."""
    slot = torch.arange(slots)
    return start.unsqueeze(1) - 1 - (start.unsqueeze(1) - 1 - slot) % slots


@pytest.mark.parametrize("growth", [0.0, 0.5], ids=["flat", "rising past the slack"])
def test_one_range_over_many_tiles_matches_the_reference(interpreter, growth):
    """One program over 136 keys (5 tiles: 4 of the window, then C128's entries). With the window's keys grown
    by 1 + growth x (their rank in the window), each tile's maximum passes the running one by far more than the
    rescale slack and the output must be rescaled tile after tile; flat keys stay within it."""
    rows = FLASH_ROWS
    q, new, _, cache, ids, start, sink, scale, window, ratio, rounded, block = inputs(1000, 1, 128, 0)
    positions = _ring_positions(start, rows.slots)
    rank = (positions - (start.unsqueeze(1) - window)).clamp(min=0)  # 0 for the oldest key of the window
    values = torch.randn(2, rows.slots, rows.width) * 2 * (1 + growth * rank).unsqueeze(-1)
    ring = rows.pack(values.bfloat16())
    args = (q, new, ring, cache, ids, start, sink, scale, window, ratio, rounded, block)
    error = relative_error(interpreter(_kernel_in_one_range, *args), sparse_attention.reference(*args))
    assert error <= TOL, error


@pytest.mark.parametrize("steps,ratio,topk", [(1, 4, 300), (1, 128, 0)], ids=["C4", "C128"])
def test_keys_that_do_not_count_never_weigh_whatever_their_bytes(interpreter, steps, ratio, topk):
    """At position 40 of a window of 128: the ring slots of no position yet, the cache rows past the visible
    entries (and the ids' -1 padding) hold 0xFF bytes (NaN codes, an infinite scale, NaN RoPE dims). The kernel
    on those rows equals the reference on clean ones: a key that does not count is never weighed."""
    rows = FLASH_ROWS
    args = list(inputs(40, steps, ratio, topk))
    clean = sparse_attention.reference(*args)
    ring, cache, start = args[2].clone(), args[3].clone(), args[5]
    ring[_ring_positions(start, rows.slots) < 0] = 255
    cache[:, 40 // ratio:] = 255
    args[2], args[3] = ring, cache
    error = relative_error(interpreter(_kernel, *args), clean)
    assert error <= TOL, error


def test_bf16_products_are_refused_on_the_interpreter(interpreter):
    assert "need a GPU" in interpreter(_bf16_products_on_cpu, *inputs(129, 1, 4, 40))


def test_launch_holds_a_token_s_heads_and_cuts_ranges_without_the_tokens(interpreter):
    """64 heads a program from 17 heads on (wgmma's M), 16 below; the key ranges never depend on the tokens."""
    for heads, block_h in ((4, 16), (16, 16), (20, 64), (64, 64), (128, 64)):
        launches = interpreter(_launches, [1, 3, 66, 1000], heads, 640, 132)
        assert {la.block_h for la in launches} == {block_h}, (heads, launches)
        assert {la.block_n for la in launches} == {64 if block_h == 64 else 32}, (heads, launches)
        assert len({(la.splits, la.keys_per_split) for la in launches}) == 1, (heads, launches)
        assert [la.fold for la in launches] == [False, False, heads > 64, True], (heads, launches)


# ---- sm_90a build ----------------------------------------------------------------------------------------------
POINTER_TYPES = {"q_ptr": "*bf16", "out_ptr": "*bf16", "new_ptr": "*u8", "ring_ptr": "*u8", "cache_ptr": "*u8",
                 "ids_ptr": "*i64", "start_ptr": "*i64", "sink_ptr": "*fp32", "acc_ptr": "*fp32", "ml_ptr": "*fp32",
                 "merged_ptr": "*fp32"}


def _sm90a_build(kernel: str, heads: int) -> tuple[list[str], str, set[str], int, bool]:
    """The distinct MMA instructions of `kernel` built for sm_90a with h100's launch at Flash's sizes (C4, top-512
    and a window of 128: 640 keys; 584-byte rows), the PTX's `.target` line, its distinct decode instructions and
    global reads (DECODE_AND_READS), the shared memory a program takes, and whether it waits for its predecessor
    grid (launched as a programmatic dependent: `griddepcontrol.wait`)."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import attention
    from dsv4c.codegen.targets import target, triton_gpu_target

    launch = attention.attention_launch(1, heads, 640, target("h100").sm_count)
    constexprs = {**attention.kernel_constexprs(128, 4, True, 512, 448, 64, 584, launch), "PDL": True}
    fn = getattr(attention, kernel)
    scalar = {"scale": "fp32"}  # the other scalars are sizes and strides
    signature = {name: "constexpr" if name in constexprs else POINTER_TYPES.get(name, scalar.get(name, "i32"))
                 for name in fn.arg_names}
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in POINTER_TYPES
               if name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs, aligned),
                              target=triton_gpu_target(target("h100")), options=launch.options())
    ptx = compiled.asm["ptx"]
    return (sorted(set(MMA.findall(ptx))), next(line for line in ptx.splitlines() if line.startswith(".target")),
            set(DECODE_AND_READS.findall(ptx)), compiled.metadata.shared, "griddepcontrol.wait" in ptx)


@pytest.fixture(scope="module")
def sm90a():
    with child_pool(_start_compiler) as pool:
        yield {key: pool.submit(_sm90a_build, *key).result()
               for key in (("_split_kernel", 64), ("_folded_kernel", 64), ("_split_kernel", 16))}


@pytest.mark.parametrize("kernel", ["_split_kernel", "_folded_kernel"])
def test_sm90a_multiplies_64_heads_on_bf16_wgmma(sm90a, kernel):
    mmas, target_line, _, _, waits = sm90a[kernel, 64]
    assert target_line == ".target sm_90a" and waits
    assert mmas and all(m.startswith("wgmma.mma_async") and ".m64n" in m and m.endswith(".f32.bf16.bf16")
                        for m in mmas), mmas


def test_sm90a_multiplies_16_heads_on_bf16_mma_sync(sm90a):
    mmas, _, _, _, _ = sm90a["_split_kernel", 16]
    assert mmas and all(m.startswith("mma.sync") and ".f32.bf16.bf16.f32" in m for m in mmas), mmas


@pytest.mark.parametrize("key", [("_split_kernel", 64), ("_folded_kernel", 64), ("_split_kernel", 16)])
def test_sm90a_programs_fit_the_h100s_shared_memory(sm90a, key):
    """A program's pipelined tiles fit the shared memory an H100 block may opt into (a launch past it fails on
    the GPU with OutOfResources: three stages of 64-key tiles took 321 KiB)."""
    from dsv4c.codegen.targets import target

    assert 0 < sm90a[key][3] <= target("h100").smem_bytes, sm90a[key][3]


@pytest.mark.parametrize("kernel", ["_split_kernel", "_folded_kernel"])
def test_sm90a_reads_rows_by_async_copies_and_decodes_on_the_fp8_conversion(sm90a, kernel):
    """Flash's rows (scales in one 8-byte word) reach the program only through asynchronous copies, pipelined a
    tile ahead: no byte is read by a plain load, whose latency each tile would wait out. The codes go through
    the hardware e4m3 conversion and one bf16 multiply-add with the scale and the RoPE dims."""
    _, _, found, _, _ = sm90a[kernel, 64]
    assert {"cp.async.ca.shared.global", "cvt.rn.f16x2.e4m3x2", "fma.rn.bf16"} <= found, found
    assert not {op for op in found if op.startswith("ld.global") and op.endswith("8")}, found
