"""The indexer queries' rotation and rounding as one op: `dsv4c::hadamard_fake_quant_fp4`'s Triton kernel
(codegen/kernels/hadamard_rounding.py) under Triton's interpreter, in a spawned child that sets TRITON_INTERPRET=1
before importing Triton, against the op's reference (model/quant.py `fake_quant_fp4(hadamard(x))`); the pass
(passes/hadamard_rounding.py) on small graphs and on the captured tiny step.

Tolerances: bit-equal everywhere. The kernel makes the model's fp32 operations on the same operands in the same
order (the butterflies' additions, the product by 1/sqrt(N), the cast, the block rounding); NaN only where the
reference has NaN (a row holding a NaN or an inf is NaN throughout). The pass's op runs the model's functions on
CPU, so the graph after equals the graph before bit for bit (`check_pass`).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from child_pool import child_pool, run_in
from dsv4c.codegen import ops  # noqa: F401  (registers the ops and their CUDA kernels)
from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.model import quant, rounding_ops
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.hadamard_rounding import hadamard_rounding
from dsv4c.passes.manager import PassContext, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.pipeline import pipeline_for
from pass_graphs import check_pass, export_flat, random_inputs, step_input_maker, targets

OP = "dsv4c.hadamard_fake_quant_fp4.default"


def reference(x: torch.Tensor, block: int) -> torch.Tensor:
    return quant.fake_quant_fp4(quant.hadamard(x), block)


# ---- the kernel, under the interpreter -----------------------------------------------------------------------
def _kernel(x, block):
    from dsv4c.codegen.kernels.hadamard_rounding import hadamard_fake_quant_fp4

    return hadamard_fake_quant_fp4(x, block)


@pytest.fixture(scope="module")
def kernel(interpreter_pool):
    return run_in(interpreter_pool, _kernel)


# Blocks whose amax lies below the FP4 floor (scale 2^-126) and whose 0.6 rounds to e2m1's 0.5: outputs of 2^-127,
# a subnormal in fp32 and bf16 alike
SUBNORMAL_OUTPUTS = torch.tensor([0.6, -3.0, 5.5, -0.6]) * 2.0 ** -126


def hard_rows(leading: tuple[int, ...], width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of random magnitudes from 2^-30 to 2^60 a row; row 0 zeros, row 1 tiny (bf16 subnormals after the
    rotation), row 2 a NaN, row 3 an inf, row 4 one spike (the rotation spreads it evenly: rounding ties), row 5 a
    rotated pattern whose rounded outputs include the subnormal 2^-127 (SUBNORMAL_OUTPUTS)."""
    rows = int(torch.tensor(leading).prod())
    x = torch.randn(rows, width) * 2.0 ** torch.randint(-30, 60, (rows, 1)).float()
    x[0] = 0.0
    x[1] = torch.randn(width) * 2.0 ** -124  # some bf16 subnormals among them; blocks above the FP4 amax floor
    x[2, 3] = float("nan")
    x[3, width - 1] = float("inf")
    x[4] = 0.0
    x[4, 5] = 3.0 * width ** 0.5
    x[5] = quant.hadamard(SUBNORMAL_OUTPUTS.repeat(width // 4))  # the rotation undoes itself: about the pattern back
    return x.to(dtype).view(*leading, width)


@pytest.mark.parametrize("width, block", [(128, 32), (64, 32), (256, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernel_equals_the_reference_bit_for_bit(kernel, width, block, dtype):
    x = hard_rows((3, 1, 4), width, dtype)  # indexer queries [B, T, H, d]
    want = reference(x, block)
    got = kernel(x, block)
    assert got.dtype == dtype and got.shape == x.shape
    flat = want.view(-1, width)
    assert flat[2].isnan().all() and flat[3].isnan().all() and not flat[4:].isnan().any()
    assert (flat[1] != 0).any() and (flat[4] != 0).any()  # the tiny row and the spike are not flushed to zero
    assert (flat[5].abs() == 2.0 ** -127).any()  # subnormal outputs (the interpreter's own conversion flushes them)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_bad_operands_are_refused_naming_them(kernel):
    with pytest.raises(ValueError, match="power of two"):
        kernel(torch.zeros(2, 96), 32)
    with pytest.raises(ValueError, match="block 48"):
        kernel(torch.zeros(2, 128), 48)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        kernel(torch.zeros(2, 128, dtype=torch.float16), 32)


def test_the_op_has_its_cuda_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dsv4c::hadamard_fake_quant_fp4", "CUDA")


# ---- the pass on small graphs --------------------------------------------------------------------------------
WIDTH, HEADS = 64, 4


def indexer_query(m, q):
    """The model's own functions (model/attention.py `indexer_rounding`) on a RoPE'd query [B, 1, H, d]."""
    return (rounding_ops.fake_quant_fp4(quant.hadamard(q * 2.0), 32),)


def scaled_otherwise(m, q):
    """A rotation normalised by 1/N, not 1/sqrt(N)."""
    return (rounding_ops.fake_quant_fp4(quant.hadamard(q) * (WIDTH ** -0.5), 32),)


def no_rotation(m, q):
    return (rounding_ops.fake_quant_fp4(q * 2.0, 32),)


def half_rotation(m, q):
    """The rotation of each half of the row alone: every stage but the last."""
    halves = q.unflatten(-1, (2, WIDTH // 2))
    return (rounding_ops.fake_quant_fp4(quant.hadamard(halves).flatten(-2), 32),)


def exported(builder):
    make = random_inputs([(2, 1, HEADS, WIDTH)], dtypes=[torch.bfloat16])
    gm = export_flat(builder, make(2))
    gm, _ = run_pipeline(gm, [noop_removal, dead_code, cse], PassContext())
    return gm, make


def test_a_rotation_and_its_rounding_become_the_op_with_equal_outputs():
    gm, make = exported(indexer_query)
    assert targets(gm).count("aten.stack.default") == 6
    gm, record = check_pass(hadamard_rounding, gm, make)  # bit-equal at batches 1 and 3, and debug mode's check
    left = targets(gm)
    assert record.matches == 1 and left.count(OP) == 1
    assert not {"aten.stack.default", "aten.sub.Tensor", "dsv4c.fake_quant_fp4.default"} & set(left)
    assert "aten.mul.Tensor" in left  # the rotation's input, q * 2, stays


@pytest.mark.parametrize("builder", [scaled_otherwise, no_rotation, half_rotation], ids=lambda b: b.__name__)
def test_near_misses_are_left_alone(builder):
    gm, make = exported(builder)
    before = targets(gm)
    gm, record = check_pass(hadamard_rounding, gm, make)
    assert record.matches == 0 and targets(gm) == before


# ---- the captured tiny step, in the cpu pipeline -------------------------------------------------------------
MAX_SEQ_LEN = 128


def test_the_captured_steps_indexer_query_rounding_becomes_the_op():
    cfg = tiny()
    weights = dict(synthetic_tensors(cfg, 0))
    step = capture(cfg, Numerics.faithful(), weights, StepVariant("main", 1), MAX_SEQ_LEN)
    entries = pipeline_for("cpu")
    at = [e.name for e in entries].index("hadamard_rounding")
    assert {"lightning_indexer", "compressor_fusion"} <= {e.name for e in entries[:at]}
    gm, _ = run_pipeline(step.graph_module, entries[:at], PassContext())
    # each C4 layer's indexer query; on cpu the compressors stay unfused, so also each indexer key's rotation
    c4_layers = sum(1 for ratio in cfg.compress_ratios[:cfg.num_hidden_layers] if ratio == 4)
    assert c4_layers >= 1 and targets(gm).count("dsv4c.fake_quant_fp4.default") == 2 * c4_layers
    gm, record = check_pass(hadamard_rounding, gm, step_input_maker(cfg, weights, step, MAX_SEQ_LEN))
    gm, _ = run_pipeline(gm, entries[at + 1:], PassContext())
    left = targets(gm)
    assert record.matches == 2 * c4_layers and left.count(OP) == 2 * c4_layers
    assert "dsv4c.fake_quant_fp4.default" not in left and "aten.stack.default" not in left


# ---- ahead of time, for the H100 (a compiling child) ---------------------------------------------------------
def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _h100_ptx(width: int, block: int) -> str:
    """The kernel's PTX for sm_90a on bf16 rows of `width`."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import hadamard_rounding as kernels
    from dsv4c.codegen.targets import target, triton_gpu_target

    fn = kernels._hadamard_fp4_kernel
    types = {"x_ptr": "*bf16", "out_ptr": "*bf16", "normalisation": "fp32"}
    constexprs = dict(N=width, STAGES=width.bit_length() - 1, BLOCK=block, FMT_MAX=quant.FP4_MAX,
                      AMAX_FLOOR=quant.FP4_AMAX_FLOOR, PDL=True)
    assert list(types) + list(constexprs) == fn.arg_names
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.endswith("_ptr")}
    source = ASTSource(fn, {**types, **dict.fromkeys(constexprs, "constexpr")}, constexprs, attrs)
    return triton.compile(source, target=triton_gpu_target(target("h100")), options={"num_warps": 4}).asm["ptx"]


def test_kernel_builds_for_h100_at_the_indexer_width():
    """What the interpreter cannot check: the kernel compiles for the H100 (Flash's indexer: 128 dims, block 32)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    with child_pool(_start_compiler) as pool:
        ptx = pool.submit(_h100_ptx, 128, 32).result()
    assert ".target sm_90a" in ptx and ".entry _hadamard_fp4_kernel" in ptx
    assert "griddepcontrol.wait" in ptx  # launched as its predecessor's programmatic dependent
