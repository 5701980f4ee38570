"""`dsv4c::fp8_linear` (codegen/fp8_linear.py) and its Triton kernel (codegen/kernels/fp8_gemm.py).

The kernel runs under Triton's CPU interpreter in a child process (the `interpreter` fixture sets
TRITON_INTERPRET=1 before it imports Triton; see tests/test_mhc_kernels.py for why not here). The
interpreter runs the kernel's e4m3 dots as the GPU's code does (its dot widens e4m3 to fp16 and sums in
fp32: exact products), so nothing is upcast for it; the e4m3 rounding of the activations is the kernel's
own fp32 arithmetic (`number_formats.e4m3_grid`), the same on every backend. Plain numerics (no act_quant) multiply in
fp32 under the interpreter ("ieee"), exact bf16 parts on GPUs (checked by bench/fp8_gemm_bench.py).
A second child (`compiler`, no interpreter) builds the kernel ahead of time for sm_90a, sm_100a and sm_103a
and reads its PTX. This process never imports Triton.

Every kernel case draws fresh random inputs, poisons the output with NaN first, and compares with the
reference op and with an fp64 product of the same exact values. Tolerances: fp32 output, normwise relative
error 1e-6 against both (the kernel sums the same exact products in another fp32 order; seen: 1e-8 with
act_quant, 3e-7 plain fp32) and every element within 1e-5 of the largest; bf16 output, every element within
one bf16 step (2^-7 relative, plus 1e-6 of the largest for values near zero) of the reference's bf16 output
and at most 1% + 1 of them different (an fp32 order difference flips a rounding only where the fp32 value
sits next to a bf16 tie). The rounding of the
activations is checked bit for bit through an identity weight, in the GEMM and in its own kernel (`prequantise`,
past 32 rows), and the two placements against each other.
"""

import dataclasses
import importlib.util
import os
import re
import zlib

import pytest
import torch
from child_pool import child_pool, run_in

from dsv4c.codegen import fp8_linear as op
from dsv4c.codegen.kernels.fp8_gemm_launch import Fp8GemmLaunch, fp8_gemm_launch, split_blocks
from dsv4c.codegen.targets import target
from dsv4c.model import layers, quant
from dsv4c.model.numerics import Numerics

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

# DeepSeek-V4-Flash's FP8 linears (N, K): wq_a, wq_b, wkv, wo_b, indexer wq_b, shared w1/w3, w2, MTP projections
FLASH_SHAPES = [(1024, 4096), (32768, 1024), (512, 4096), (4096, 8192), (8192, 1024), (2048, 4096), (4096, 2048),
                (4096, 4096)]


# ---- the interpreter and compiler processes -----------------------------------------------------------
def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _kernel_linear(x, weight, scale, act_quant, out_dtype, launch_fields, out):
    from dsv4c.codegen.kernels import fp8_gemm

    launch = Fp8GemmLaunch(**launch_fields) if launch_fields else None
    return fp8_gemm.fp8_linear(x, weight, scale, act_quant, out_dtype, launch=launch, out=out)


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    run = run_in(interpreter_pool, _kernel_linear)
    return lambda *args, launch=None, out=None: run(*args, launch, out)


@pytest.fixture(scope="module")
def compiler():
    with child_pool(_start_compiler) as pool:
        yield pool


# ---- inputs and checks ----------------------------------------------------------------------------------
def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _inputs(m, n, k, x_dtype, *key):
    """x O(1) with a few large channels (block scales then differ), and a weight quantised like the release's."""
    gen = _gen(m, n, k, str(x_dtype), *key)
    x = torch.randn(m, k, generator=gen)
    x[:, torch.randint(0, k, (3,), generator=gen)] *= 30
    weight, scale = quant.quantize_fp8_weight(torch.randn(n, k, generator=gen) * 0.05)
    return x.to(x_dtype), weight, scale


def _fp64(x, weight, scale, act_quant):
    values = op.fake_quant_rows(x) if act_quant else x.float()
    return values.double() @ quant.dequant_fp8_weight(weight, scale).double().T


def _rel(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _check(got, x, weight, scale, act_quant, out_dtype):
    expected = op.reference(x, weight, scale, act_quant, out_dtype)
    assert got.dtype == out_dtype and got.shape == expected.shape
    assert not got.isnan().any(), "an output element was not written (or is NaN)"
    if out_dtype == torch.float32:
        assert _rel(got, expected) <= 1e-6 and _rel(got, _fp64(x, weight, scale, act_quant)) <= 1e-6
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    else:
        step = expected.float().abs() * 2.0 ** -7 + 1e-6 * expected.float().abs().max()  # near zero: fp32 order
        assert ((got.float() - expected.float()).abs() <= step).all(), "a bf16 output more than one step off"
        assert (got != expected).sum() <= 1 + got.numel() // 100


def _poisoned(m, n, dtype):
    return torch.full((m, n), float("nan"), dtype=dtype)


# ---- the kernel against the reference (interpreter) ---------------------------------------------------
CASES = [  # (M, N, K, x dtype, out dtype, act_quant): decode, MTP-sized and prefill rows; K off the 128 grid
    (1, 127, 300, torch.bfloat16, torch.bfloat16, True),
    (1, 4096, 256, torch.bfloat16, torch.bfloat16, True),
    (3, 1, 200, torch.float32, torch.float32, True),
    (3, 127, 100, torch.bfloat16, torch.float32, True),  # one K block: no split, the output written directly
    (64, 256, 384, torch.bfloat16, torch.float32, True),
    (64, 130, 250, torch.float32, torch.bfloat16, True),
    (3, 127, 300, torch.float32, torch.float32, False),
    (64, 130, 256, torch.bfloat16, torch.bfloat16, False),
]


@needs_triton
@pytest.mark.parametrize("m, n, k, x_dtype, out_dtype, act_quant", CASES)
def test_kernel_equals_reference(interpreter, m, n, k, x_dtype, out_dtype, act_quant):
    x, weight, scale = _inputs(m, n, k, x_dtype)
    got = interpreter(x, weight, scale, act_quant, out_dtype, out=_poisoned(m, n, out_dtype))
    _check(got, x, weight, scale, act_quant, out_dtype)


@needs_triton
@pytest.mark.parametrize("m, n, k", [(1, 200, 1000), (20, 64, 520)])
def test_gpu_launch_under_the_interpreter(interpreter, m, n, k):
    """The H100 launch (64-row weight tiles, 16-row activation tiles, split-K with the split sum) computes the
    same function: split-K on several splits of uneven K, rows of N and M past the tiles masked."""
    launch = fp8_gemm_launch(target("h100"), m, n, k)
    assert launch.block_n == 64 and launch.split_k > 2
    fields = {name: getattr(launch, name) for name in Fp8GemmLaunch.__dataclass_fields__}
    fields.update(product="fp8", pdl=False)
    x, weight, scale = _inputs(m, n, k, torch.bfloat16, "gpu")
    got = interpreter(x, weight, scale, True, torch.float32, launch=fields, out=_poisoned(m, n, torch.float32))
    _check(got, x, weight, scale, True, torch.float32)


@needs_triton
def test_gpu_prequantised_launch_under_the_interpreter(interpreter):
    """The H100 launch past 32 rows computes the same function: x rounded by its own kernel, 64-row weight tiles
    spanning two 128-row scale blocks (one scale a tile), K and N on the tile grid (no masks), split-K."""
    m, n, k = 64, 320, 1024
    launch = fp8_gemm_launch(target("h100"), m, n, k)
    assert launch.prequantise and launch.block_n == 64 and launch.split_k > 1 and n % 128 and not n % 64
    x, weight, scale = _inputs(m, n, k, torch.bfloat16, "gpu prequantised")
    got = interpreter(x, weight, scale, True, torch.float32, launch=dataclasses.asdict(dataclasses.replace(
        launch, pdl=False)), out=_poisoned(m, n, torch.float32))
    _check(got, x, weight, scale, True, torch.float32)


def _rounding_rows(k: int) -> torch.Tensor:
    """Rows that hit the quantiser's edges, K = 200 (blocks of 128 and 72 columns): a block amax of exactly
    448 x 2^-3 (scale 2^-3 exactly) and one fp32 step above it (scale 2^-2); every e4m3 midpoint (ties go to
    the even code) and its two fp32 neighbours, at scale 1 (448 in each block); magnitudes under the 1e-4 amax
    floor; values that round to e4m3 subnormals; a partial block whose amax is far from the full one's (first:
    a kernel reading past K would take the next row's -56 into it)."""
    codes = torch.arange(128, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = codes[torch.isfinite(codes)]
    mids = (grid[1:] + grid[:-1]) / 2
    ties = torch.cat([mids, torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(-1e9))])
    ties = ties * torch.where(torch.arange(ties.numel()) % 2 == 0, 1.0, -1.0)
    rows = torch.zeros(7, k)
    rows[0, :128] = 1000.0
    rows[0, 128:] = torch.linspace(-0.7, 0.3, k - 128)
    rows[1, :128] = torch.linspace(-56, 56, 128)  # amax 56 = 448 x 2^-3
    rows[1, 10:30] = torch.linspace(0.002, 0.0038, 20)  # e4m3 normals at scale 2^-3, subnormals at 2^-2
    rows[2] = rows[1]
    rows[2, 7] = torch.nextafter(torch.tensor(56.0), torch.tensor(1e9))
    slots = torch.cat([torch.arange(1, 128), torch.arange(129, k)])  # columns 0 and 128 hold 448: scale 1
    rows[3:5, 0] = rows[3:5, 128] = 448.0
    rows[3, slots] = ties[:slots.numel()]
    rows[4, slots[:ties.numel() - slots.numel()]] = ties[slots.numel():]
    # amax floored at 1e-4: scale 2^-22, under which the smallest of these round to e4m3 subnormals (the scale
    # changes a value's rounding only where it saturates or falls below e4m3's normal range)
    rows[5] = torch.logspace(-10, -5.5, k) * torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
    rows[6] = torch.linspace(-1.37, 1.37, k) * 2.0 ** -8  # scale 2^-2 (anchor 112): |x / s| up to 1.37 x 2^-6
    rows[6, 0] = rows[6, 128] = 112.0
    return rows


@needs_triton
def test_activation_rounding_is_bit_exact(interpreter):
    """Through an identity weight (e4m3 1.0, scale 2^0) the kernel's fp32 output is the rounded activations
    themselves: they must equal the reference's rounding bit for bit."""
    k = 200
    x = _rounding_rows(k)
    weight = torch.eye(k).to(torch.float8_e4m3fn)
    scale = torch.full((2, 2), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert 2 * (k - 2) >= 3 * 126  # the tie rows hold every midpoint
    got = interpreter(x, weight, scale, True, torch.float32, out=_poisoned(x.shape[0], k, torch.float32))
    assert torch.equal(got, op.fake_quant_rows(x))


@needs_triton
def test_prequantised_rounding_is_bit_exact(interpreter):
    """The rounding kernel (`prequantise`), through an identity weight: its e4m3 codes times its scales, as the
    GEMM reads them, are the reference's rounded activations bit for bit (the edge rows above)."""
    k = 200
    x = _rounding_rows(k)
    weight = torch.eye(k).to(torch.float8_e4m3fn)
    scale = torch.full((2, 2), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    launch = dataclasses.replace(fp8_gemm_launch(target("cpu"), x.shape[0], k, k), prequantise=True)
    got = interpreter(x, weight, scale, True, torch.float32, launch=dataclasses.asdict(launch),
                      out=_poisoned(x.shape[0], k, torch.float32))
    assert torch.equal(got, op.fake_quant_rows(x))


@needs_triton
@pytest.mark.parametrize("m, n, k, x_dtype", [(64, 130, 250, torch.bfloat16), (65, 256, 1024, torch.float32)])
def test_where_x_is_rounded_changes_no_bit(interpreter, m, n, k, x_dtype):
    """The default launch past 32 rows (x rounded by its own kernel) and the same launch rounding in the GEMM
    give the same fp32 output bit for bit (batch invariance: the choice follows M), and the reference's values."""
    launch = fp8_gemm_launch(target("cpu"), m, n, k, True, x_dtype)
    assert launch.prequantise and launch.split_k > 1
    x, weight, scale = _inputs(m, n, k, x_dtype, "placement")
    got = {pre: interpreter(x, weight, scale, True, torch.float32,
                            launch=dataclasses.asdict(dataclasses.replace(launch, prequantise=pre)),
                            out=_poisoned(m, n, torch.float32)) for pre in (True, False)}
    _check(got[True], x, weight, scale, True, torch.float32)
    assert torch.equal(got[True], got[False])


# ---- the reference op ---------------------------------------------------------------------------------
def test_partial_last_block_takes_its_own_amax():
    """fake_quant_rows on K = 300 against the rounding rule applied to each block's slice as it is (two full
    blocks, then 44 columns), written here without padding."""
    x = torch.randn(5, 300, generator=_gen("partial")) * torch.tensor([1.0, 3.0, 0.01]).repeat_interleave(
        torch.tensor([128, 128, 44]))
    expected = []
    for piece in x.split(128, dim=-1):
        s = quant.power_of_two_scale(piece.abs().amax(-1, keepdim=True).clamp_min(quant.FP8_AMAX_FLOOR), 448.0)
        expected.append((piece / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s)
    assert torch.equal(op.fake_quant_rows(x), torch.cat(expected, dim=-1))


@pytest.mark.parametrize("num", [Numerics.faithful(), Numerics.plain(), Numerics.plain(torch.bfloat16),
                                 Numerics(dtype=torch.float32)], ids=["faithful", "plain", "plain-bf16", "fp32"])
def test_op_equals_model_linear(num):
    """The registered op (CPU: the reference) equals model/layers.py's linear on the dequantised weight, bit
    for bit, leading dims included."""
    from dsv4c.codegen import ops  # noqa: F401 -- registers the dsv4c ops, fp8_linear among them

    x, weight, scale = _inputs(6, 96, 384, num.dtype, "model")
    x = x.reshape(2, 3, 384)
    dense = quant.dequant_fp8_weight(weight, scale).to(num.dtype)
    expected = layers.linear(x, dense, num, quantized=True)
    got = torch.ops.dsv4c.fp8_linear(x, weight, scale, num.act_quant, num.dtype)
    assert got.shape == (2, 3, 96) and torch.equal(got, expected)


def test_op_fake_and_dispatch():
    """opcheck of the registered op on a partial K block: its fake (meta) function agrees with the real one,
    and it traces through AOT dispatch. (opcheck's schema test compares tensors with ops torch lacks for e4m3.)"""
    x, weight, scale = _inputs(3, 130, 200, torch.bfloat16, "opcheck")
    for act_quant in (True, False):
        torch.library.opcheck(op.fp8_linear, (x, weight, scale, act_quant, torch.bfloat16),
                              test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("change, message", [
    (dict(weight=torch.zeros(8, 128, dtype=torch.float8_e4m3fn)), "weight must be float8_e4m3fn \\[N, K=200\\]"),
    (dict(scale=torch.zeros(1, 1, dtype=torch.float8_e8m0fnu)), "scale must be float8_e8m0fnu \\(1, 2\\)"),
    (dict(x=torch.zeros(2, 200, dtype=torch.float16)), "x must be a float32 or bfloat16"),
    (dict(out_dtype=torch.float16), "out_dtype must be float32 or bfloat16"),
])
def test_bad_operands_are_named(change, message):
    args = dict(x=torch.zeros(2, 200), weight=torch.zeros(8, 200, dtype=torch.float8_e4m3fn),
                scale=torch.zeros(1, 2, dtype=torch.float8_e8m0fnu), act_quant=True, out_dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        op.fp8_linear(**{**args, **change})


# ---- launch heuristics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpu", "h100", "b200", "gb300"])
def test_launches_cover_k_and_fill_the_gpu(name):
    t = target(name)
    for n, k in FLASH_SHAPES + [(1, 100), (127, 300)]:
        for m in (1, 3, 8, 32, 64, 128):
            launch = fp8_gemm_launch(t, m, n, k)
            launch.check(k)
            if t.is_gpu and (n, k) in FLASH_SHAPES:
                programs = -(-n // launch.block_n) * -(-m // launch.block_m) * launch.split_k
                assert programs >= t.sm_count, (n, k, m, launch)


def test_launch_validation():
    with pytest.raises(ValueError, match="power of two"):
        Fp8GemmLaunch(block_m=24, block_n=64, split_k=1, blocks_per_split=1, product="fp8")
    with pytest.raises(ValueError, match="product"):
        Fp8GemmLaunch(block_m=16, block_n=64, split_k=1, blocks_per_split=1, product="tf32")
    with pytest.raises(ValueError, match="do not partition"):
        Fp8GemmLaunch(block_m=16, block_n=64, split_k=3, blocks_per_split=2, product="fp8").check(4 * 128)
    # 8 blocks: 3 wanted -> 3 + 3 + 2; 7 wanted -> 4 x 2 (equal slices, none empty); one block -> one split
    assert split_blocks(1000, 3) == (3, 3) and split_blocks(1000, 7) == (4, 2) and split_blocks(100, 4) == (1, 1)


def test_h100_split_follows_the_shape_alone():
    """Batch invariance on h100: every M from 1 to 256 gets the same K split of each Flash shape (and of shapes
    off the tile grid); x is rounded by its own kernel exactly past 32 rows (act_quant only), and an
    activation tile holds at most 128 rows (64 where the GEMM rounds or widens x itself)."""
    t = target("h100")
    for n, k in FLASH_SHAPES + [(127, 300), (70, 390)]:
        launches = {m: fp8_gemm_launch(t, m, n, k) for m in range(1, 257)}
        assert len({(la.split_k, la.blocks_per_split) for la in launches.values()}) == 1, (n, k)
        assert all(la.prequantise == (m > 32) for m, la in launches.items()), (n, k)
        assert all(min(m, 16) <= la.block_m <= (128 if la.prequantise else 64) for m, la in launches.items())
        plain = fp8_gemm_launch(t, 256, n, k, act_quant=False)
        assert not plain.prequantise and plain.block_m == 64
        assert (plain.split_k, plain.blocks_per_split) == (launches[1].split_k, launches[1].blocks_per_split)


def test_prequantise_needs_fp8_products():
    with pytest.raises(ValueError, match="prequantise"):
        Fp8GemmLaunch(block_m=64, block_n=64, split_k=1, blocks_per_split=1, product="bf16x1", prequantise=True)


# ---- ahead of time, for the GPU targets (compiler process) ----------------------------------------------
def _recorded_launches(t, m, n, k) -> list:
    """The launches of the wrapper's default launch on target `t` (act_quant, bf16 in and out), recorded: the
    wrapper runs on meta tensors with a recording launcher."""
    from dsv4c.codegen.kernels import fp8_gemm

    meta, launches = dict(device="meta"), []
    fp8_gemm.fp8_linear(torch.empty(m, k, dtype=torch.bfloat16, **meta),
                        torch.empty(n, k, dtype=torch.float8_e4m3fn, **meta),
                        torch.empty(-(-n // 128), -(-k // 128), dtype=torch.float8_e8m0fnu, **meta), True,
                        torch.bfloat16, launch=fp8_gemm_launch(t, m, n, k), launcher=launches.append)
    return launches


def _compiled_ptx(launch, t) -> str:
    """PTX of one recorded launch for target `t`: integer arguments divisible by 16 are marked so, as Triton's
    JIT specialises them (an unmarked K leaves the weight rows' alignment unknown and the loads unpipelined);
    launch_pdl is a launch attribute, not a compile option."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.targets import triton_gpu_target

    types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8"}
    signature = {name: "constexpr" if name in launch.constexprs else
                 types[launch.args[name].dtype] if isinstance(launch.args[name], torch.Tensor) else "i32"
                 for name in launch.fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(launch.fn.arg_names)
             if signature[name] != "constexpr" and (signature[name].startswith("*") or launch.args[name] % 16 == 0)}
    options = {key: value for key, value in launch.options.items() if key != "launch_pdl"}
    compiled = triton.compile(ASTSource(launch.fn, signature, launch.constexprs, attrs),
                              target=triton_gpu_target(t), options=options)
    return compiled.asm["ptx"]


def _ptx(target_name, m, n, k):
    """(PTX of the first kernel of the wrapper's default launch on `target_name`, facts about the launches)."""
    t = target(target_name)
    launches = _recorded_launches(t, m, n, k)
    return _compiled_ptx(launches[0], t), {"split_k": launches[0].grid[2], "kernels": len(launches)}


def _kernel_ptx(target_name, m, n, k) -> dict[str, str]:
    """{kernel name: PTX} of every launch of the wrapper's default launch on `target_name`, in launch order."""
    t = target(target_name)
    return {launch.fn.__name__: _compiled_ptx(launch, t) for launch in _recorded_launches(t, m, n, k)}


@needs_triton
@pytest.mark.parametrize("name, arch, mma", [
    ("h100", "sm_90a", r"wgmma\.mma_async\.sync\.aligned\.m64n16k32\.f32\.e4m3\.e4m3"),
    ("b200", "sm_100a", r"tcgen05\.mma\.cta_group::1\.kind::f8f6f4"),
    ("gb300", "sm_103a", r"tcgen05\.mma\.cta_group::1\.kind::f8f6f4")])
def test_kernel_builds_for_gpu_targets(compiler, name, arch, mma):
    """A decode launch (M = 1, wq_a's 4096 -> 1024) built without a GPU (Blackwell never run here): the PTX
    targets the arch and multiplies e4m3 on the tensor cores (Hopper: wgmma with the 16 activation rows as its
    N side; Blackwell: tcgen05 kind::f8f6f4), and the weight tiles stream through cp.async (pipelined)."""
    ptx, facts = compiler.submit(_ptx, name, 1, 1024, 4096).result()
    assert facts["split_k"] > 1 and facts["kernels"] == 2
    assert re.findall(r"^\.target (\S+)", ptx, re.M) == [arch]
    assert re.search(mma, ptx), sorted(set(re.findall(r"(?:wgmma|tcgen05\.mma|mma\.sync)[\w.:]*", ptx)))
    assert "cp.async" in ptx


@needs_triton
def test_rows_past_32_are_rounded_once_for_sm_90a(compiler):
    """wq_a (4096 -> 1024) at 64 rows for sm_90a: a rounding kernel converts x with the hardware's
    cvt.rn.satfinite alone (no clamp or rounding by hand: `min.NaN`, `add.f32`) and lets the GEMM launch early
    (PDL); the GEMM waits for it, multiplies its codes (wgmma m64n64k32 e4m3, cp.async copies) and rounds
    nothing to e4m3 itself; the split sum follows."""
    ptx = compiler.submit(_kernel_ptx, "h100", 64, 1024, 4096).result()
    assert list(ptx) == ["_act_quant_kernel", "_fp8_gemm_kernel", "_split_sum_kernel"]
    rounding, gemm = ptx["_act_quant_kernel"], ptx["_fp8_gemm_kernel"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in rounding and "min.NaN" not in rounding and "add.f32" not in rounding
    assert "griddepcontrol.launch_dependents" in rounding and "griddepcontrol.wait" in gemm
    assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n64k32\.f32\.e4m3\.e4m3", gemm)
    assert "cvt.rn.satfinite.e4m3x2" not in gemm and "cp.async" in gemm


@needs_triton
def test_decode_gemm_rounds_with_the_hardware_conversion(compiler):
    """At one row (wq_a, sm_90a) the GEMM rounds its x tiles itself: the hardware's cvt.rn.satfinite, no clamp
    or rounding by hand (`min.NaN`, `add.f32`: the interpreter's path)."""
    ptx = compiler.submit(_kernel_ptx, "h100", 1, 1024, 4096).result()
    assert list(ptx) == ["_fp8_gemm_kernel", "_split_sum_kernel"]
    gemm = ptx["_fp8_gemm_kernel"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in gemm and "min.NaN" not in gemm and "add.f32" not in gemm


def test_this_process_never_imports_triton():
    import sys

    assert "dsv4c.codegen.kernels.fp8_gemm" not in sys.modules
