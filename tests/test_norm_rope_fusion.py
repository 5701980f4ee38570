"""RMSNorm and RoPE as dsv4c ops: the row kernel under TRITON_INTERPRET=1, the fusion pass on small graphs (exact
op counts, outputs bit-equal before and after on fresh random inputs, near misses left alone) and on the captured
tiny step inside the cpu pipeline.

Tolerances.
- Pass: bit-equal. On CPU each op's reference is the model's own function (model/layers.py rms_norm, apply_rope),
  the same aten ops on the same operands as the chain it replaces.
- Kernel against an fp64 reference of the op's math (angles the fp32 product `position * inv_freq`, as the op
  defines them), relative norm error: fp32 1e-5 (measured ~1e-7: the mean's summation order, cos/sin in the last
  ulp), bf16 1e-2 (the roundings to bf16 the op makes, ~2e-3); in bf16 also at least 99% of the elements bit-equal
  to the op's CPU reference (the kernel rounds where the model does; measured 100%). Outputs are poisoned with NaN
  before the kernel runs; NaN fails.
The kernels run in a spawned child that sets TRITON_INTERPRET before importing Triton (tests/child_pool.py).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from child_pool import child_pool, run_in
from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.model import layers
from dsv4c.model.config import YarnScaling
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.manager import PassContext, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.norm_rope_fusion import norm_rope_fusion
from dsv4c.passes.pipeline import pipeline_for
from pass_graphs import check_pass, export_flat, step_input_maker, targets

EPS = 1e-6
KERNEL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
MIN_BF16_EQUAL = 0.99  # bf16 outputs bit-equal to the op's reference (a last fp32 bit rarely moves a bf16 rounding)
MAX_POSITION = 2 ** 17
FUSED = {"rms_norm": "dsv4c.rms_norm.default", "rope": "dsv4c.rope.default",
         "rms_norm_rope": "dsv4c.rms_norm_rope.default"}


# ---- the kernel, under the interpreter -----------------------------------------------------------------------
def _kernel(name, args, out):
    from dsv4c.codegen.kernels import norm_rope

    return getattr(norm_rope, name)(*args, out=out)


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return run_in(interpreter_pool, _kernel)


def fp64_norm(x, weight):
    xd = x.double()
    out = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + EPS)
    return out if weight is None else out * weight.double()


def fp64_rope(x, positions, inv_freq, inverse):
    angles = (positions.float().unsqueeze(-1) * inv_freq).double()
    cos, sin = angles.cos(), angles.sin() * (-1 if inverse else 1)
    r = 2 * inv_freq.numel()
    xd = x.double()
    even, odd = xd[..., -r::2], xd[..., -r + 1::2]
    return torch.cat((xd[..., :-r], torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)), -1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in the kernel's output"
    return float((got.double() - want).norm() / want.norm())


YARN = YarnScaling(factor=16, original_max_position_embeddings=65536, beta_fast=32, beta_slow=1)
KERNEL_CASES = {  # name: (op, x shape, positions shape, rope dims, weight, inverse, yarn)
    "norm_weighted": ("rms_norm", (2, 3, 96), None, 0, True, False, False),
    "norm_wide": ("rms_norm", (3, 4096), None, 0, False, False, False),
    "rope_query_heads": ("rope", (2, 3, 4, 96), (2, 3, 1), 32, False, False, True),
    "rope_inverse_whole_row": ("rope", (2, 3, 64), (2, 3), 64, False, True, False),
    "rope_positions_shared_by_batch": ("rope", (2, 3, 96), (3,), 32, False, False, False),
    "norm_rope_kv": ("rms_norm_rope", (2, 3, 96), (2, 3), 32, True, False, True),
    "norm_rope_query_inverse": ("rms_norm_rope", (2, 3, 4, 96), (2, 3, 1), 32, False, True, False),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_fp64_reference(interpreter, case, dtype):
    op, shape, pos_shape, rope_dim, weighted, inverse, yarn = KERNEL_CASES[case]
    storage = (torch.randn(*shape[:-1], shape[-1] + 32) * 3).to(dtype)
    x = storage[..., 16:16 + shape[-1]]  # rows strided inside a wider tensor
    weight = (torch.rand(shape[-1]) + 0.5).bfloat16() if weighted else None
    want = x.double() if op == "rope" else fp64_norm(x, weight)
    args = (x, weight, EPS)
    if rope_dim:
        positions = torch.randint(0, MAX_POSITION, pos_shape)
        inv_freq = layers.rope_inv_freq(rope_dim, 160000.0 if yarn else 10000.0, YARN if yarn else None)
        want = fp64_rope(want, positions, inv_freq, inverse)
        args = (x, positions, inv_freq, inverse) if op == "rope" else (x, weight, EPS, positions, inv_freq, inverse)
    out = torch.full(shape, float("nan"), dtype=dtype)
    got = interpreter(op, args, out)
    assert got.dtype == dtype and got.shape == shape
    assert relative_error(got, want) <= KERNEL_TOL[dtype]
    if dtype == torch.bfloat16:  # the op's roundings to bf16, where the reference makes them
        reference = getattr(torch.ops.dsv4c, op)(*args)
        assert (got == reference).float().mean() >= MIN_BF16_EQUAL


# ---- the pass on small graphs --------------------------------------------------------------------------------
WIDTH, ROPE_DIM, HEADS, STEPS = 48, 16, 4, 3
INV_FREQ = layers.rope_inv_freq(ROPE_DIM, 10000.0, None)


def _positions(start: torch.Tensor) -> torch.Tensor:
    return start.unsqueeze(1) + torch.arange(STEPS)  # [B, T], as model/attention.py builds them


def query(m, q, start, w):
    return (layers.apply_rope(layers.rms_norm(q, None, EPS), _positions(start).unsqueeze(-1), m.inv_freq),)


def kv_row(m, q, start, w):
    return (layers.apply_rope(layers.rms_norm(q[:, :, 0], w, EPS), _positions(start), m.inv_freq),)


def weighted_norm(m, q, start, w):
    return (layers.rms_norm(q, w, EPS),)


def inverse_rope(m, q, start, w):
    return (layers.apply_rope(q, _positions(start).unsqueeze(-1), m.inv_freq, inverse=True),)


def norm_read_twice(m, q, start, w):
    normed = layers.rms_norm(q, w, EPS)
    return layers.apply_rope(normed, _positions(start).unsqueeze(-1), m.inv_freq), normed


def norm_of_rope(m, q, start, w):
    return (layers.rms_norm(layers.apply_rope(q, _positions(start).unsqueeze(-1), m.inv_freq), w, EPS),)


def norm_cast_elsewhere(m, q, start, w):
    """A norm whose fp32 result is cast to another dtype than x's: the fp32 norm of x.float() fuses, the cast stays."""
    xf = q.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)).to(torch.float16),


GRAPHS = {  # builder: the ops it must become, in graph order
    query: ["rms_norm_rope"],
    kv_row: ["rms_norm_rope"],
    weighted_norm: ["rms_norm"],
    inverse_rope: ["rope"],
    norm_read_twice: ["rms_norm", "rope"],
    norm_of_rope: ["rope", "rms_norm"],
    norm_cast_elsewhere: ["rms_norm"],
}


def inputs_maker(dtype: torch.dtype, width: int = WIDTH):
    def make(batch: int) -> list[torch.Tensor]:
        return [(torch.randn(batch, STEPS, HEADS, width) * 3).to(dtype),
                torch.randint(0, MAX_POSITION, (batch,)), (torch.rand(width) + 0.5).bfloat16()]
    return make


def exported(builder, dtype: torch.dtype, width: int = WIDTH):
    """The builder's graph as the pass sees the captured step's: exported, then cleaned up (no metadata asserts,
    one node per value)."""
    make = inputs_maker(dtype, width)
    gm = export_flat(builder, make(2), [True, True, False], {"inv_freq": INV_FREQ})
    gm, _ = run_pipeline(gm, [noop_removal, dead_code, cse], PassContext())
    return gm, make


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("builder", GRAPHS, ids=lambda b: b.__name__)
def test_chains_become_their_ops_with_equal_outputs(builder, dtype):
    gm, make = exported(builder, dtype)
    gm, record = check_pass(norm_rope_fusion, gm, make)  # bit-equal at batches 1 and 3, and debug mode's check
    expected = GRAPHS[builder]
    fused = [t for t in targets(gm) if t in FUSED.values()]
    assert fused == [FUSED[name] for name in expected]
    assert record.matches == len(expected)
    assert {k: record.details[k] for k in FUSED} == {k: expected.count(k) for k in FUSED}
    assert record.details["inverse"] == (builder is inverse_rope)
    left = set(targets(gm))
    assert not left & {"aten.rsqrt.default", "aten.cos.default", "aten.sin.default", "aten.stack.default"}


# ---- near misses ---------------------------------------------------------------------------------------------
def eps_tensor(m, q, start, w):
    xf = q.float()
    return ((xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + w.float()[:1])).to(q.dtype),)


def mean_over_steps(m, q, start, w):
    xf = q.float()
    return ((xf * torch.rsqrt(xf.square().mean(-2, keepdim=True) + EPS)).to(q.dtype),)


def half_split_rope(m, q, start, w):
    """GPT-NeoX's rotation: the first and second halves of the rope dims pair, not interleaved neighbours."""
    angles = _positions(start).unsqueeze(-1).float().unsqueeze(-1) * m.inv_freq
    cos, sin = angles.cos(), angles.sin()
    rope_part = q[..., -ROPE_DIM:].float()
    first, second = rope_part[..., :ROPE_DIM // 2], rope_part[..., ROPE_DIM // 2:]
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), -1)
    return (torch.cat((q[..., :-ROPE_DIM], rotated.to(q.dtype)), -1),)


def two_angles(m, q, start, w):
    """cos and sin of different angles (sin at the next position)."""
    positions = _positions(start).unsqueeze(-1).float().unsqueeze(-1)
    cos, sin = (positions * m.inv_freq).cos(), ((positions + 1) * m.inv_freq).sin()
    rope_part = q[..., -ROPE_DIM:].float()
    even, odd = rope_part[..., 0::2], rope_part[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return (torch.cat((q[..., :-ROPE_DIM], rotated.to(q.dtype)), -1),)


NEAR_MISSES = [eps_tensor, mean_over_steps, half_split_rope, two_angles]


@pytest.mark.parametrize("builder", NEAR_MISSES, ids=lambda b: b.__name__)
def test_near_misses_are_left_alone(builder):
    gm, make = exported(builder, torch.bfloat16)
    before = targets(gm)
    gm, record = check_pass(norm_rope_fusion, gm, make)
    assert record.matches == 0 and targets(gm) == before


def test_rope_with_an_odd_unrotated_width_is_left_alone():
    """D - R odd: the op's contract (the kernel pairs the whole row) refuses it, so the chain stays."""
    gm, make = exported(inverse_rope, torch.bfloat16, width=WIDTH + 1)
    before = targets(gm)
    gm, record = check_pass(norm_rope_fusion, gm, make)
    assert record.matches == 0 and targets(gm) == before


# ---- the captured tiny step, in the cpu pipeline -------------------------------------------------------------
MAX_SEQ_LEN = 128


def test_captured_step_fuses_every_norm_and_rope_in_the_pipeline():
    cfg = tiny()
    weights = dict(synthetic_tensors(cfg, 0))
    step = capture(cfg, Numerics.faithful(), weights, StepVariant("main", 1), MAX_SEQ_LEN)
    entries = pipeline_for("cpu")
    at = [e.name for e in entries].index("norm_rope_fusion")
    assert entries[at + 1].name == "constant_folding"
    assert {"mhc_fusion", "fp8_linear", "compressor_fusion", "lightning_indexer", "sparse_attention"} \
        <= {e.name for e in entries[:at]}
    gm, _ = run_pipeline(step.graph_module, entries[:at], PassContext())
    gm, record = check_pass(norm_rope_fusion, gm, step_input_maker(cfg, weights, step, MAX_SEQ_LEN))
    gm, _ = run_pipeline(gm, entries[at + 1:], PassContext())

    # per layer (3): the query and the KV row are normed then rotated, q_norm is a norm alone, the attention output
    # rotates back; the C4 layer's indexer query rotates alone; on cpu the 3 compressors (C4, its indexer's, C16)
    # stay unfused and their pooled rows are normed then rotated
    assert record.details == {"rms_norm_rope": 3 + 3 + 3, "rms_norm": 3, "rope": 3 + 1, "inverse": 3}
    assert record.matches == 16
    left = targets(gm)
    assert not {"aten.rsqrt.default", "aten.cos.default", "aten.sin.default"} & set(left)


# ---- ahead of time, for the H100 (a compiling child) ---------------------------------------------------------
def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _h100_ptx() -> str:
    """The row kernel's PTX for sm_90a: the attention's query row (bf16, 512 dims: norm without weight, then the
    last 64 rotated), as the op launches it on CUDA."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import norm_rope
    from dsv4c.codegen.targets import target, triton_gpu_target

    fn = norm_rope._rows_kernel
    types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "pos_ptr": "*i64", "inv_ptr": "*fp32", "out_ptr": "*bf16",
             "x_stride": "i32", "rep": "i32", "eps": "fp32"}
    constexprs = dict(WIDTH=512, WIDTH_P2=512, HALF=32, HALF_P2=32, NORM=True, WEIGHT=False, ROPE=True,
                      INVERSE=False, BF16=True, PDL=True)
    assert list(types) + list(constexprs) == fn.arg_names
    source = ASTSource(fn, {**types, **dict.fromkeys(constexprs, "constexpr")}, constexprs)
    return triton.compile(source, target=triton_gpu_target(target("h100")), options={"num_warps": 4}).asm["ptx"]


def test_row_kernel_builds_for_h100_as_a_programmatic_dependent():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    with child_pool(_start_compiler) as pool:
        ptx = pool.submit(_h100_ptx).result()
    assert ".target sm_90a" in ptx and ".entry _rows_kernel" in ptx and "griddepcontrol.wait" in ptx
