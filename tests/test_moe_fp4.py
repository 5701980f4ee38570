"""`dsv4c::moe_fp4` (codegen/moe_fp4.py): a MoE layer's routing, routed (MXFP4) and shared (FP8) experts as one op.

What is checked against what (the layer and its calls: tests/moe_layers.py):
- the op's reference against model/layers.py `moe` itself (the router, `route` and the experts), hash- and
  score-routed, faithful (W4A8) and plain (W4A16) numerics: the same math, bit-equal;
- the Triton kernels (codegen/kernels/moe_fp4.py, routing included) under Triton's interpreter, in a spawned
  child that sets TRITON_INTERPRET=1 before importing Triton, against the reference: W4A8, W4A16 (bf16 and
  fp32), W4A4 emulated and native (`tl.dot_scaled`, which the interpreter runs); hash- and score-routed layers;
  batches 1, 3, 64; an expert every token selects and one none does; the routed and the shared clamps binding
  on some values (checked); a launch with two router splits and a split down GEMM;
- the power-of-two scales: `number_formats.e8m0_byte` against `quant.power_of_two_scale` on amaxes at, just above and
  between powers of two; with the rounding up removed (monkeypatched to the e8m0 truncation behind the
  production bug) both that check and the kernel-against-reference check fail;
- the MXFP4 widening of the GEMM loops (codegen/kernels/moe_fp4_tiles.py `mxfp4_block`), bit for bit, on a
  weight holding every byte and scales holding every e8m0 byte, from aligned (word loads) and unaligned (byte
  loads) pointers: each code's e4m3 bits are its e2m1 value times 2^-6 at the documented MMA K position
  (`mma_order` too), each scale 2^(byte - 127) (2^-127 for 0, NaN for 255); and the whole op on expert
  tensors that are not 16-byte aligned (the byte-load path) against the reference.
(The routing alone and the batch invariance of the launches: tests/test_moe_fp4_routing.py.)

Tolerances (relative norm error against the reference; NaN never passes): fp32 without activation rounding
1e-5 (fp32 sums in another order, inexact fp32 products, routing weights a few ulps off); with bf16 activations
or FP8 / FP4 rounding 1e-3: every product is exact, so the kernels differ only where an fp32 difference (sum
order, the last bits of exp in the SwiGLU and the scores) moves a value across a bf16 or FP8 / FP4 rounding
boundary (one element by 2^-8 or more: ~1e-4 of the norm here; seen: 0), while a misplaced rounding (a scale
not rounded up) moves most: > 1e-2. Score-routed rows have clear selection margins (tests/moe_layers.py), so
the kernels select what the reference selects.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from child_pool import child_pool, start_interpreter
from moe_layers import (CFG, EVERY, NONE, PREFIX, ROUTED_LIMIT, ROUTING, SHARED_LIMIT, decoded, gen_for, layer_call,
                        layer_weights, op_operands, rel_err)

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.codegen.moe_fp4 import ROUNDINGS
from dsv4c.compiler.capture import PackedRoutedExperts
from dsv4c.model import layers, quant
from dsv4c.model.numerics import Numerics

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
D = CFG.hidden_size


# ---- the reference against the model's MoE ----------------------------------------------------------------
@pytest.mark.parametrize("hash_layer", [True, False], ids=["hash", "score"])
@pytest.mark.parametrize("num", [Numerics.faithful(), Numerics.plain(torch.float32)], ids=["w4a8-bf16", "w4a16-fp32"])
def test_reference_is_the_model_moe(hash_layer, num):
    gen = gen_for("model", hash_layer, str(num.dtype))
    w = layer_weights(gen, hash_layer)
    x = (torch.randn(5, D, generator=gen) * 3).to(num.dtype)
    tokens = torch.randint(0, CFG.vocab_size, (5,), generator=gen)
    want = layers.moe(x, tokens, decoded(w), PREFIX, CFG, hash_layer, num, routed=PackedRoutedExperts(w))
    lists, shared = op_operands(w)
    router, bias, table = w[f"{PREFIX}gate.weight"], w.get(f"{PREFIX}gate.bias"), w.get(f"{PREFIX}gate.tid2eid")
    got = torch.ops.dsv4c.moe_fp4(x, router, bias, table, tokens if hash_layer else None, *lists, shared,
                                  ROUTING.top_k, ROUTING.scoring, ROUTING.normalize, ROUTING.scale, CFG.swiglu_limit,
                                  CFG.swiglu_limit, "w4a8" if num.act_quant else "w4a16", num.act_quant)
    assert torch.equal(got, want)


# ---- the Triton kernels under the interpreter -----------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return interpreter_pool


def _run_kernels(call, activations, shared_act_quant, launch):
    from dsv4c.codegen.kernels import moe_fp4 as kernels
    from dsv4c.codegen.kernels.moe_fp4_launch import MoeFp4Launch

    launch = MoeFp4Launch(**launch) if launch else None
    return kernels.moe_fp4(*call.routing_operands(), ROUTING, call.lists, call.shared, ROUTED_LIMIT, SHARED_LIMIT,
                           activations, shared_act_quant, launch=launch, tables=kernels.PointerTables())


@dataclasses.dataclass(frozen=True)
class KernelCase:
    tokens: int
    hash_layer: bool
    dtype: torch.dtype
    activations: str
    shared_act_quant: bool
    launch: dict | None = None  # None: the cpu heuristic
    inter: int = CFG.moe_intermediate_size

    @property
    def tolerance(self) -> float:
        exact = self.dtype == torch.float32 and self.activations == "w4a16" and not self.shared_act_quant
        return 1e-5 if exact else 1e-3


CPU_LAUNCH = dict(block_m=16, block_n=128, split_k=1, router_block_e=16, router_splits=1, product="ieee",
                  native_fp4=False, shared_split=1, num_warps=4, num_stages=1)
KERNEL_CASES = {
    "w4a8-score-b3": KernelCase(3, False, torch.bfloat16, "w4a8", True),
    "w4a8-hash-b1": KernelCase(1, True, torch.bfloat16, "w4a8", True),
    "w4a8-score-b64": KernelCase(64, False, torch.bfloat16, "w4a8", True),
    "w4a8-fp32-hash-b3": KernelCase(3, True, torch.float32, "w4a8", True),
    "w4a16-fp32-b3": KernelCase(3, False, torch.float32, "w4a16", False),
    "w4a16-bf16-b3": KernelCase(3, True, torch.bfloat16, "w4a16", False),
    "w4a4-emulated-b3": KernelCase(3, False, torch.bfloat16, "w4a4", True),
    "w4a4-native-b3": KernelCase(3, True, torch.bfloat16, "w4a4", True,
                                 dict(CPU_LAUNCH, native_fp4=True)),
    # two N tiles of every GEMM, the down GEMM split over I (I = 256: two 128-column blocks, one a split), the
    # router's logits in two splits of D
    "w4a8-tiles-split": KernelCase(3, False, torch.bfloat16, "w4a8", True, dict(CPU_LAUNCH, split_k=2,
                                                                                 router_splits=2), inter=256),
}


def pre_clamp(x, lists, shared, ids, activations, shared_act_quant):
    """The gate and up projections (before the clamps) of the selected routed experts, and of the shared one."""
    routed = torch.cat([ROUNDINGS[activations](x).float() @ quant.dequant_fp4_weight(lists[j][e], lists[j + 1][e]).T
                        for e in ids.unique().tolist() for j in (0, 2)], dim=-1)
    own = ROUNDINGS["w4a8" if shared_act_quant else "w4a16"](x).float()
    return routed, torch.cat([own @ quant.dequant_fp8_weight(shared[j], shared[j + 1]).T for j in (0, 2)], dim=-1)


@needs_triton
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernels_equal_the_reference(interpreter, name):
    case = KERNEL_CASES[name]
    call = layer_call(name, case.tokens, case.hash_layer, case.dtype, case.inter)
    ids, _ = call.route()
    assert (ids == EVERY).any(-1).all() and not (ids == NONE).any()
    routed, own = pre_clamp(call.x, call.lists, call.shared, ids, case.activations, case.shared_act_quant)
    assert (routed.abs() > ROUTED_LIMIT).any() and (routed.abs() < ROUTED_LIMIT).any(), "the routed clamp must bind"
    assert (own.abs() > SHARED_LIMIT).any() and (own.abs() < SHARED_LIMIT).any(), "the shared clamp must bind"
    want = call.reference(case.activations, case.shared_act_quant)
    got = interpreter.submit(_run_kernels, call, case.activations, case.shared_act_quant, case.launch).result()
    assert got.shape == want.shape and got.dtype == call.x.dtype
    assert rel_err(got, want) <= case.tolerance


# ---- power-of-two scales ------------------------------------------------------------------------------------
def _define_probes() -> None:
    """Define the probe kernels, in the child only: this module is imported (to unpickle the initializer)
    before the initializer sets TRITON_INTERPRET, so it must not import Triton itself."""
    global triton, tl, moe_kernels, _scale_probe, _truncated_exponent
    import triton
    import triton.language as tl

    from dsv4c.codegen.kernels import moe_fp4 as moe_kernels

    @triton.jit
    def _scale_probe(amax_ptr, out_ptr, n, FMT_MAX: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        amax = tl.load(amax_ptr + i, mask=i < n, other=1.0)
        tl.store(out_ptr + i, moe_kernels.e8m0_byte(amax, FMT_MAX), mask=i < n)

    @triton.jit
    def _truncated_exponent(amax, FMT_MAX: tl.constexpr):
        """The production bug: the quotient's exponent bits packed into e8m0 as they are (rounded down)."""
        return (tl.math.div_rn(amax, FMT_MAX).to(tl.int32, bitcast=True) >> 23) & 0xFF


def _scale_bytes(amax: torch.Tensor, fmt_max: float, truncated: bool) -> torch.Tensor:
    _define_probes()
    if truncated:  # wherever the kernels take it from: their module, and number_formats' block_rounded
        from dsv4c.codegen.kernels import number_formats

        moe_kernels.e8m0_byte = number_formats.e8m0_byte = _truncated_exponent
    out = torch.empty(amax.shape, dtype=torch.int32)
    _scale_probe[(1,)](amax, out, amax.numel(), FMT_MAX=fmt_max, BLOCK=triton.next_power_of_2(amax.numel()))
    return out


def _truncated_run(amax, *kernel_args):
    """The probe's bytes and the kernels' output with the scales' rounding up removed (in a fresh child)."""
    bytes_ = _scale_bytes(amax, quant.FP8_MAX, True)
    return bytes_, _run_kernels(*kernel_args)


def amaxes(fmt_max: float) -> torch.Tensor:
    """amax / fmt_max at powers of two, one fp32 ulp above them, and in between; the format's amax floor."""
    powers = fmt_max * 2.0 ** torch.arange(-20, 8, dtype=torch.float32)
    above = torch.nextafter(powers, torch.tensor(float("inf")))
    between = powers * (1 + torch.rand(powers.shape, generator=gen_for("amax", fmt_max)))
    floor = quant.FP8_AMAX_FLOOR if fmt_max == quant.FP8_MAX else quant.FP4_AMAX_FLOOR
    return torch.cat((powers, above, between, torch.tensor([floor])))


def expected_bytes(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    return (torch.log2(quant.power_of_two_scale(amax, fmt_max)) + 127).to(torch.int32)


@needs_triton
@pytest.mark.parametrize("fmt_max", [quant.FP8_MAX, quant.FP4_MAX], ids=["fp8", "fp4"])
def test_scales_are_powers_of_two_rounded_up_from_the_amax(interpreter, fmt_max):
    """The kernels' e8m0 byte b of each amax: 2^(b - 127) is the smallest power of two with amax / 2^(b - 127)
    <= fmt_max (equal to quant.power_of_two_scale, checked from its definition too)."""
    amax = amaxes(fmt_max)
    got = interpreter.submit(_scale_bytes, amax, fmt_max, False).result()
    assert torch.equal(got, expected_bytes(amax, fmt_max))
    scale = torch.exp2(got.double() - 127)
    assert (amax.double() / scale <= fmt_max).all() and (amax.double() / (scale / 2) > fmt_max).all()


@needs_triton
def test_scales_not_rounded_up_are_caught(interpreter):
    """With the rounding up removed (the exponent bits packed as they are, in the kernels' module and in
    number_formats, whose block_rounded rounds the FP8 operands), the scale check and the kernels' comparison with
    the reference both fail. Each run is a fresh child: the monkeypatch dies with it."""
    amax = amaxes(quant.FP8_MAX)
    case = KERNEL_CASES["w4a8-score-b3"]
    call = layer_call("w4a8-score-b3", case.tokens, case.hash_layer, case.dtype)
    want = call.reference("w4a8", True)
    with child_pool(start_interpreter) as pool:
        truncated, got = pool.submit(_truncated_run, amax, call, "w4a8", True, None).result()
    assert not torch.equal(truncated, expected_bytes(amax, quant.FP8_MAX))
    assert rel_err(got, want) > 10 * case.tolerance


# ---- the MXFP4 widening and unaligned weights ---------------------------------------------------------------
WIDEN_ROWS, WIDEN_K = 32, 256  # 32 x 128 packed bytes (every byte 16 times), 32 x 8 scales (every byte once)


def mma_position(column: torch.Tensor) -> torch.Tensor:
    """The documented MMA K order: column 32g + 8q + 2i + h of a block sits at 32g + 16h + 4q + i."""
    g, q, i, h = column // 32, column % 32 // 8, column % 8 // 2, column % 2
    return 32 * g + 16 * h + 4 * q + i


def _define_widening_probe() -> None:
    """Define the widening probe, in the child only (see `_define_probes`)."""
    global triton, tl, tiles, _widening_probe
    import triton
    import triton.language as tl

    from dsv4c.codegen.kernels import moe_fp4_tiles as tiles

    @triton.jit
    def _widening_probe(w_ptr, s_ptr, bits_ptr, scale_ptr, order_ptr, KDIM, ROWS: tl.constexpr,
                        ALIGNED: tl.constexpr):
        rows = tl.arange(0, ROWS)
        k = tl.arange(0, 128)
        for kb in range(KDIM // 128):
            values, s0, s1, s2, s3 = tiles.mxfp4_block(w_ptr, s_ptr, rows, rows < ROWS, kb, KDIM, ROWS, ALIGNED)
            tl.store(bits_ptr + rows[:, None] * KDIM + kb * 128 + k[None, :], values.to(tl.uint8, bitcast=True))
            start = scale_ptr + rows * (KDIM // 32) + kb * 4
            tl.store(start, s0)
            tl.store(start + 1, s1)
            tl.store(start + 2, s2)
            tl.store(start + 3, s3)
        tl.store(order_ptr + k, tiles.mma_order(k))


def misplaced(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t starting `offset` bytes past a 16-byte boundary."""
    buffer = torch.empty(t.numel() * t.element_size() + 32, dtype=torch.uint8)
    start = (-buffer.data_ptr()) % 16 + offset
    return buffer[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)


def _widened(packed: torch.Tensor, scales: torch.Tensor, offset: int) -> tuple[torch.Tensor, ...]:
    """(widened e4m3 bits [rows, K], scales [rows, K / 32], mma_order(0 .. 127)) from `mxfp4_block` under the
    interpreter, its weight and scales `offset` bytes past a 16-byte boundary (0: the word loads)."""
    _define_widening_probe()
    bits = torch.empty((WIDEN_ROWS, WIDEN_K), dtype=torch.uint8)
    out_scales = torch.empty((WIDEN_ROWS, WIDEN_K // 32), dtype=torch.float32)
    order = torch.empty(128, dtype=torch.int32)
    _widening_probe[(1,)](misplaced(packed, offset), misplaced(scales, offset), bits, out_scales, order, WIDEN_K,
                          ROWS=WIDEN_ROWS, ALIGNED=offset == 0)
    return bits, out_scales, order


@needs_triton
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "unaligned"])
def test_mxfp4_widening_is_exact_for_every_byte(interpreter, offset):
    gen = gen_for("widen", offset)
    packed = torch.arange(256, dtype=torch.int32).repeat(WIDEN_ROWS * WIDEN_K // 2 // 256)
    packed = packed[torch.randperm(packed.numel(), generator=gen)].to(torch.uint8).view(torch.int8)
    packed = packed.view(WIDEN_ROWS, WIDEN_K // 2)
    scales = torch.randperm(256, generator=gen).to(torch.uint8).view(WIDEN_ROWS, WIDEN_K // 32)
    bits, got_scales, order = interpreter.submit(_widened, packed, scales, offset).result()
    codes = quant.unpack_fp4(packed)  # [rows, K]: element 2b the low nibble of byte b
    want = (quant.e2m1_to_float(codes) / 64).to(torch.float8_e4m3fn).view(torch.uint8)
    column = torch.arange(WIDEN_K)
    position = column // 128 * 128 + mma_position(column % 128)
    assert torch.equal(order.long(), mma_position(torch.arange(128)))
    assert torch.equal(bits[:, position], want)
    exponent = scales.to(torch.float64) - 127
    want_scales = torch.where(scales == 255, float("nan"), torch.exp2(exponent)).to(torch.float32)
    assert torch.equal(got_scales.isnan(), scales == 255)
    assert torch.equal(got_scales[scales != 255], want_scales[scales != 255])


def _run_unaligned(call, activations, shared_act_quant):
    """The kernels on copies of call's routed expert tensors that start 1 byte past a 16-byte boundary."""
    from dsv4c.codegen.kernels import moe_fp4 as kernels

    lists = [[misplaced(t, 1) for t in tensors] for tensors in call.lists]
    tables = kernels.PointerTables()
    assert not tables.get(lists, call.x)[1], "the copies must not be 16-byte aligned"
    return kernels.moe_fp4(*call.routing_operands(), ROUTING, lists, call.shared, ROUTED_LIMIT, SHARED_LIMIT,
                           activations, shared_act_quant, tables=tables)


@needs_triton
def test_kernels_on_unaligned_expert_tensors_equal_the_reference(interpreter):
    call = layer_call("unaligned", 3, False, torch.bfloat16)
    want = call.reference("w4a8", True)
    got = interpreter.submit(_run_unaligned, call, "w4a8", True).result()
    assert rel_err(got, want) <= 1e-3
