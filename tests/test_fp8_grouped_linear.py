"""`dsv4c::fp8_grouped_linear` (codegen/fp8_grouped_linear.py) and the grouped launch of the FP8 GEMM
(codegen/kernels/fp8_gemm.py).

The kernel runs under Triton's CPU interpreter in a spawned child (tests/child_pool.py); this process never
imports Triton. Each case draws fresh inputs, poisons the output with NaN and compares with the op's reference
(fp8_linear's reference per group, concatenated). Tolerances, as tests/test_fp8_linear.py's (the kernel sums
the same exact products in another fp32 order): fp32 output, normwise relative error 1e-6 against the
reference and every element within 1e-5 of the largest; bf16 output, every element within one bf16 step of
the reference and at most 1% + 1 of them different. Bit-equal where every sum is exact (small integers:
any order gives the same bits), and for one group, which is fp8_linear's launch itself.
"""

import dataclasses
import importlib.util
import zlib

import pytest
import torch

from dsv4c.codegen import fp8_grouped_linear as op
from dsv4c.codegen import fp8_linear
from dsv4c.codegen.kernels.fp8_gemm_launch import fp8_gemm_launch
from dsv4c.codegen.targets import target
from dsv4c.model import quant

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")


# ---- the interpreter process --------------------------------------------------------------------------
def _kernel_grouped(x, weight, scale, act_quant, out_dtype, launch, out):
    from dsv4c.codegen.kernels import fp8_gemm

    return fp8_gemm.fp8_grouped_linear(x, weight, scale, act_quant, out_dtype, launch=launch, out=out)


def _one_group_both_ways(x, weight, scale, act_quant, out_dtype):
    """(fp8_grouped_linear of x [M, 1, K], fp8_linear of x [M, K], the launches each recorded)."""
    from dsv4c.codegen.kernels import fp8_gemm
    from dsv4c.codegen.kernels.launcher import JIT

    runs = []
    for fn, operand in ((fp8_gemm.fp8_grouped_linear, x[:, None]), (fp8_gemm.fp8_linear, x)):
        launches = []
        record = lambda launch: (launches.append((launch.fn.__name__, launch.grid, dict(launch.args),
                                                   dict(launch.constexprs))), JIT(launch))
        runs.append((fn(operand, weight, scale, act_quant, out_dtype, launcher=record), launches))
    return runs


def _misfit_launch(x, weight, scale):
    """The grouped wrapper's error for a launch whose weight tiles span two groups."""
    from dsv4c.codegen.kernels import fp8_gemm

    launch = dataclasses.replace(fp8_gemm_launch(target("cpu"), 1, weight.shape[0], x.shape[-1], False,
                                                 torch.float32), block_n=256)
    try:
        fp8_gemm.fp8_grouped_linear(x, weight, scale, False, torch.float32, launch=launch)
    except ValueError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return interpreter_pool


def _run(pool, x, weight, scale, act_quant, out_dtype, launch=None):
    out = torch.full((x.shape[0], weight.shape[0]), float("nan"), dtype=out_dtype)
    return pool.submit(_kernel_grouped, x, weight, scale, act_quant, out_dtype, launch, out).result()


# ---- inputs and checks ----------------------------------------------------------------------------------
def _inputs(m, groups, n, k, x_dtype, *key):
    """x O(1) with a few large channels (block scales then differ), a [groups * n, k] weight quantised like the
    release's, each group's rows at their own magnitude (a wrong group's rows would show)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((m, groups, n, k, str(x_dtype), *key)).encode()))
    x = torch.randn(m, groups, k, generator=gen)
    x[..., torch.randint(0, k, (3,), generator=gen)] *= 30
    magnitude = torch.arange(1, groups + 1).repeat_interleave(n)[:, None] * 0.05
    weight, scale = quant.quantize_fp8_weight(torch.randn(groups * n, k, generator=gen) * magnitude)
    return x.to(x_dtype), weight, scale


def _check(got, x, weight, scale, act_quant, out_dtype):
    expected = op.reference(x, weight, scale, act_quant, out_dtype)
    assert got.dtype == out_dtype and got.shape == expected.shape
    assert not got.isnan().any(), "an output element was not written (or is NaN)"
    if out_dtype == torch.float32:
        rel = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
        assert rel <= 1e-6 and (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    else:
        step = expected.float().abs() * 2.0 ** -7 + 1e-6 * expected.float().abs().max()
        assert ((got.float() - expected.float()).abs() <= step).all(), "a bf16 output more than one step off"
        assert (got != expected).sum() <= 1 + got.numel() // 100


# ---- the kernel against the reference (interpreter) ---------------------------------------------------
CASES = [  # (M, x dtype, out dtype, act_quant), each for G = 1, 2, 8; K off the 128 grid in half of them
    (1, torch.bfloat16, torch.bfloat16, True, 300),
    (5, torch.float32, torch.float32, True, 256),
    (1, torch.float32, torch.bfloat16, False, 256),
    (5, torch.bfloat16, torch.float32, False, 200),
]


@needs_triton
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("m, x_dtype, out_dtype, act_quant, k", CASES)
def test_kernel_equals_reference(interpreter, groups, m, x_dtype, out_dtype, act_quant, k):
    x, weight, scale = _inputs(m, groups, 128, k, x_dtype)
    _check(_run(interpreter, x, weight, scale, act_quant, out_dtype), x, weight, scale, act_quant, out_dtype)


@needs_triton
@pytest.mark.parametrize("groups, rows, act_quant", [(2, 64, True), (4, 32, False)])
def test_groups_inside_one_scale_block(interpreter, groups, rows, act_quant):
    """Groups of 64 or 32 rows (tiny's wo_a: 64): several groups share a 128-row scale block, each tile one group."""
    x, weight, scale = _inputs(5, groups, rows, 300, torch.bfloat16, "inside a block")
    assert scale.shape[0] == -(-groups * rows // 128)
    _check(_run(interpreter, x, weight, scale, act_quant, torch.float32), x, weight, scale, act_quant, torch.float32)


@needs_triton
@pytest.mark.parametrize("act_quant", [True, False])
def test_exact_sums_are_bit_equal(interpreter, act_quant):
    """Small integers times e4m3 integers at scale 1: every product and partial sum is an exact fp32 integer
    (the rounding of x, by 2^-6, is exact too), so the kernel's order gives the reference's bits."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-4, 5, (5, 4, 384), generator=gen).float()
    weight = torch.randint(-8, 9, (4 * 256, 384), generator=gen).float().to(torch.float8_e4m3fn)
    scale = torch.full((8, 3), 1.0).to(torch.float8_e8m0fnu)
    got = _run(interpreter, x, weight, scale, act_quant, torch.float32)
    assert torch.equal(got, op.reference(x, weight, scale, act_quant, torch.float32))


@needs_triton
def test_rows_past_32_are_rounded_per_group_by_the_rounding_kernel(interpreter):
    """40 rows with act_quant: x [M, G, K] is rounded by its own kernel as M * G rows, the GEMM reads each
    group's codes and scales (one launch of the rounding kernel: `prequantise`)."""
    launch = fp8_gemm_launch(target("cpu"), 40, 2 * 128, 300, True, torch.float32, group_rows=128)
    assert launch.prequantise
    x, weight, scale = _inputs(40, 2, 128, 300, torch.float32)
    _check(_run(interpreter, x, weight, scale, True, torch.float32), x, weight, scale, True, torch.float32)


@needs_triton
def test_gpu_launch_under_the_interpreter(interpreter):
    """The H100 launch of a grouped GEMM (64-row weight tiles, split K and the split sum) computes the same
    function: each tile reads its own group's x row."""
    m, groups, n, k = 3, 4, 128, 1000
    launch = fp8_gemm_launch(target("h100"), m, groups * n, k, True, torch.bfloat16, group_rows=n)
    assert launch.block_n == 64 and launch.split_k > 2
    launch = dataclasses.replace(launch, pdl=False)
    x, weight, scale = _inputs(m, groups, n, k, torch.bfloat16, "gpu")
    got = _run(interpreter, x, weight, scale, True, torch.float32, launch=launch)
    _check(got, x, weight, scale, True, torch.float32)


@needs_triton
@pytest.mark.parametrize("act_quant", [True, False])
def test_one_group_is_fp8_linear_launch_for_launch(interpreter, act_quant):
    """G = 1 runs fp8_linear's launches (the same kernels, grid, arguments and constexprs) and gives its bits."""
    x, weight, scale = _inputs(3, 1, 256, 300, torch.bfloat16, "one group")
    (grouped, grouped_launches), (plain, plain_launches) = interpreter.submit(
        _one_group_both_ways, x[:, 0], weight, scale, act_quant, torch.bfloat16).result()
    assert torch.equal(grouped, plain) and not grouped.isnan().any()
    assert [launch[:2] + (launch[3],) for launch in grouped_launches] == \
        [launch[:2] + (launch[3],) for launch in plain_launches]
    assert all(launch[3].get("GROUPED") is not True for launch in grouped_launches)


@needs_triton
def test_launch_whose_tiles_span_two_groups_is_refused(interpreter):
    x, weight, scale = _inputs(1, 2, 128, 256, torch.float32, "misfit")
    message = interpreter.submit(_misfit_launch, x, weight, scale).result()
    assert message is not None and "block_n must divide the 128 weight rows of a group" in message


# ---- the op ---------------------------------------------------------------------------------------------
def test_reference_is_fp8_linear_per_group():
    """Group g of the output is fp8_linear of x's group g on its rows of the weight and of the scales, bit for
    bit (leading dims kept)."""
    x, weight, scale = _inputs(6, 3, 256, 200, torch.bfloat16, "reference")
    x = x.reshape(2, 3, 3, 200)
    got = torch.ops.dsv4c.fp8_grouped_linear(x, weight, scale, True, torch.bfloat16)
    assert got.shape == (2, 3, 3 * 256)
    for g in range(3):
        part = fp8_linear.reference(x[..., g, :], weight[g * 256:(g + 1) * 256], scale[g * 2:(g + 1) * 2], True,
                                    torch.bfloat16)
        assert torch.equal(got[..., g * 256:(g + 1) * 256], part)


def test_op_fake_and_dispatch():
    x, weight, scale = _inputs(3, 2, 128, 200, torch.bfloat16, "opcheck")
    for act_quant in (True, False):
        torch.library.opcheck(op.fp8_grouped_linear, (x, weight, scale, act_quant, torch.bfloat16),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.zeros(192, 200, dtype=torch.float8_e4m3fn), scale=torch.zeros(2, 2, dtype=torch.float8_e8m0fnu)),
     "fp8_grouped_linear: weight must be \\[G\\*N, K\\] with G=2"),  # 96 rows a group: group 1 across blocks 0, 1
    (dict(weight=torch.zeros(16, 200, dtype=torch.float8_e4m3fn), scale=torch.zeros(1, 2, dtype=torch.float8_e8m0fnu)),
     "fp8_grouped_linear: weight must be \\[G\\*N, K\\] with G=2"),  # 8 rows a group: below the smallest tile
    (dict(weight=torch.zeros(384, 200, dtype=torch.float8_e4m3fn), scale=torch.zeros(3, 2, dtype=torch.float8_e8m0fnu)),
     "fp8_grouped_linear: weight must be \\[G\\*N, K\\] with G=2"),  # 3 blocks in 2 groups
    (dict(scale=torch.zeros(1, 2, dtype=torch.float8_e8m0fnu)), "fp8_grouped_linear: scale must be"),
    (dict(x=torch.zeros(2, 2, 100)), "fp8_grouped_linear: weight must be float8_e4m3fn \\[N, K=100\\]"),
    (dict(x=torch.zeros(200)), "fp8_grouped_linear: x must be a \\[..., G, K\\]"),
    (dict(out_dtype=torch.float16), "fp8_grouped_linear: out_dtype"),
])
def test_bad_operands_are_named(change, message):
    args = dict(x=torch.zeros(2, 2, 200), weight=torch.zeros(256, 200, dtype=torch.float8_e4m3fn),
                scale=torch.zeros(2, 2, dtype=torch.float8_e8m0fnu), act_quant=False, out_dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        op.fp8_grouped_linear(**{**args, **change})


# ---- launch -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpu", "h100", "b200"])
@pytest.mark.parametrize("groups, rows", [(2, 128), (8, 1024), (4, 384), (2, 64), (8, 16)])
def test_weight_tiles_lie_in_one_group(name, groups, rows):
    for m in (1, 5, 64):
        launch = fp8_gemm_launch(target(name), m, groups * rows, 4096, False, torch.bfloat16, group_rows=rows)
        assert rows % launch.block_n == 0
        launch.check(4096)


def test_flash_wo_a_is_one_launch_over_the_whole_weight():
    """Flash's wo_a at decode (M = 1, G = 8, N = 1024, K = 4096) on an H100: 64-row weight tiles, 128 of them,
    K in 3 splits of 11 blocks (the split follows (G*N, K) as fp8_linear's does), the split sum after."""
    launch = fp8_gemm_launch(target("h100"), 1, 8 * 1024, 4096, False, torch.bfloat16, group_rows=1024)
    assert (launch.block_n, launch.block_m, launch.split_k, launch.blocks_per_split) == (64, 16, 3, 11)
    assert launch.product == "bf16x1" and not launch.fold_splits and launch.pdl
    assert launch == fp8_gemm_launch(target("h100"), 1, 8 * 1024, 4096, False, torch.bfloat16)


def test_this_process_never_imports_triton():
    import sys

    assert "dsv4c.codegen.kernels.fp8_gemm" not in sys.modules
