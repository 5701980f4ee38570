"""`dsv4c::routed_moe` in Triton: the selected experts' MXFP4 weights read through a table of their addresses.

The PyTorch twin is the op's reference implementation (codegen/routed_moe.py); tests/test_routed_moe.py runs
these kernels under Triton's interpreter against it. One call, for N tokens with k selections each:

(0) with act_quant, `_act_quant_kernel` rounds x to FP8 e4m3 per 128 values (ue8m0 scales), into fp32;
(1) `_gate_up_kernel`, grid (N*k selections, I / block_i): one program a selection and a tile of block_i
    hidden features. It reads the expert id and the routing weight, loads the expert's w1 / w3 / scale base
    addresses from the table, and accumulates `x @ W1.T` and `x @ W3.T` over D in fp32, decoding the packed
    e2m1 pairs and e8m0 scales in registers (the low nibble multiplies the even input, the high one the odd).
    Then, as `swiglu_expert`: gate and up rounded to the activation dtype, clamped to swiglu_limit, SwiGLU
    times the routing weight in fp32, rounded to the activation dtype: hidden [N*k, I];
(0') with act_quant, the hidden rows rounded to FP8 per 128 the same way;
(2) `_down_kernel`, grid (N, D / block_d): one program a token and a tile of block_d outputs. For each of
    the token's k selections in order, `hidden @ W2.T` of that expert, rounded to the activation dtype, added
    to an fp32 sum: a fixed order, no atomics, so the result is deterministic.
A decoded weight has 2 significant bits (times a power of two), so its product with an input of at most 22
(an FP8 value, a bf16 or fp16 activation) is exact in fp32, and the result differs from the reference only
by the order of the fp32 sums (and the last bits of exp in the SwiGLU); fp32 activations without the FP8
rounding also round their products. Nothing here reads a value on the host: the ids select the experts on
the GPU, so a call can be captured in a CUDA graph.

The table: int64 [6, E] of the data pointers of w1, s1, w3, s3, w2, s2, made once per weight set and kept
(`PointerTables`). Under CUDA-graph capture it must exist already: call once with the same tensors before
capturing. Every expert's tensors must have one shape, dtype and device; the first expert's are checked
against x at each call, all of them when the table is made.

bf16 is converted to fp32 right after each load, and rounding to bf16 is done by hand
(`number_formats.rounded_to`): Triton's CPU interpreter gets bf16 arithmetic and conversion wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from dsv4c.codegen.kernels.number_formats import e2m1_value, e4m3_grid, e8m0_byte, e8m0_values, pow2, rounded_to
from dsv4c.codegen.targets import Target, target_for_device

QUANT_BLOCK = 128  # values per FP8 scale of the activation rounding
FP4_BLOCK = 32  # values per e8m0 scale of an MXFP4 weight
POINTER_ALIGN = 16
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ---- kernels ------------------------------------------------------------------------------------------
@triton.jit
def _act_quant_kernel(src_ptr, dst_ptr, cols):
    """One block of 128 values of one row: `quant.fake_quant_fp8(row, 128)` in fp32. The scale is the
    smallest power of two s with amax / s <= 448 (amax floored at 1e-4), as `quant.power_of_two_scale` takes it
    (`number_formats.e8m0_byte`)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * 128 + tl.arange(0, 128)
    x = tl.load(src_ptr + row * cols + offs).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4)
    exponent = e8m0_byte(amax, 448.0) - 127
    y = e4m3_grid(tl.minimum(tl.maximum(x * pow2(-exponent), -448.0), 448.0)) * pow2(exponent)
    tl.store(dst_ptr + row * cols + offs, y)


@triton.jit
def _expert_ptr(table_ptr, row: tl.constexpr, n_experts, expert, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The base pointer of one expert's tensor: table[row, expert] as a pointer to DTYPE."""
    ptr = tl.load(table_ptr + row * n_experts + expert).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _fp4_tile_dot(w_ptr, s_ptr, rows, row_mask, x_ptr, group, n_groups, acc):
    """acc [R, G] += rows `rows` of an MXFP4 weight (n_groups groups of 16 packed bytes a row, one e8m0 scale
    each) times x, over the G groups `group`: each 16-byte group (32 values) is summed, then scaled.
    The low nibble of byte b multiplies x[2b], the high one x[2b + 1] (x fp32, or converted to it)."""
    byte = group[:, None] * 16 + tl.arange(0, 16)[None, :]
    group_mask = group < n_groups
    mask = row_mask[:, None, None] & group_mask[None, :, None]
    packed = tl.load(w_ptr + rows[:, None, None] * (n_groups * 16) + byte[None, :, :], mask=mask,
                     other=0).to(tl.int32) & 0xFF
    x_even = tl.load(x_ptr + 2 * byte, mask=group_mask[:, None], other=0.0).to(tl.float32)
    x_odd = tl.load(x_ptr + 2 * byte + 1, mask=group_mask[:, None], other=0.0).to(tl.float32)
    sums = tl.sum(e2m1_value(packed & 0xF) * x_even[None, :, :] + e2m1_value(packed >> 4) * x_odd[None, :, :], axis=2)
    scale = tl.load(s_ptr + rows[:, None] * n_groups + group[None, :], mask=row_mask[:, None] & group_mask[None, :],
                    other=127)
    return acc + sums * e8m0_values(scale.to(tl.int32))


@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, weights_ptr, table_ptr, hidden_ptr, D, I, K, E, limit,
                    BLOCK_I: tl.constexpr, BLOCK_G: tl.constexpr, CLAMP: tl.constexpr, ACT: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """hidden[sel, tile] = round(silu(clamp(round(x W1.T))) * clamp(round(x W3.T)) * weight) for selection
    sel = token * K + slot (x [N, D]: the FP8-rounded fp32 rows, or x itself)."""
    sel = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_mask = rows < I
    expert = tl.load(ids_ptr + sel)
    w1 = _expert_ptr(table_ptr, 0, E, expert, tl.int8, ALIGNED)
    s1 = _expert_ptr(table_ptr, 1, E, expert, tl.uint8, False)
    w3 = _expert_ptr(table_ptr, 2, E, expert, tl.int8, ALIGNED)
    s3 = _expert_ptr(table_ptr, 3, E, expert, tl.uint8, False)
    x_row = x_ptr + (sel // K).to(tl.int64) * D
    gate = tl.zeros([BLOCK_I, BLOCK_G], dtype=tl.float32)
    up = tl.zeros([BLOCK_I, BLOCK_G], dtype=tl.float32)
    for start in range(0, D // 32, BLOCK_G):
        group = start + tl.arange(0, BLOCK_G)
        gate = _fp4_tile_dot(w1, s1, rows, row_mask, x_row, group, D // 32, gate)
        up = _fp4_tile_dot(w3, s3, rows, row_mask, x_row, group, D // 32, up)
    g = rounded_to(tl.sum(gate, axis=1), ACT)
    u = rounded_to(tl.sum(up, axis=1), ACT)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g * tl.sigmoid(g) * u * tl.load(weights_ptr + sel)
    tl.store(hidden_ptr + sel.to(tl.int64) * I + rows, rounded_to(h, ACT), mask=row_mask)


@triton.jit
def _down_kernel(hidden_ptr, ids_ptr, table_ptr, out_ptr, D, I, K, E, BLOCK_D: tl.constexpr,
                 BLOCK_G: tl.constexpr, ACT: tl.constexpr, ALIGNED: tl.constexpr):
    """out[token, tile] = sum over the token's slots, in order, of round(hidden[sel] @ W2[expert].T)."""
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < D
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for slot in range(0, K):
        sel = token * K + slot
        expert = tl.load(ids_ptr + sel)
        w2 = _expert_ptr(table_ptr, 4, E, expert, tl.int8, ALIGNED)
        s2 = _expert_ptr(table_ptr, 5, E, expert, tl.uint8, False)
        h_row = hidden_ptr + sel.to(tl.int64) * I
        acc = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)
        for start in range(0, I // 32, BLOCK_G):
            acc = _fp4_tile_dot(w2, s2, rows, row_mask, h_row, start + tl.arange(0, BLOCK_G), I // 32, acc)
        total += rounded_to(tl.sum(acc, axis=1), ACT)
    tl.store(out_ptr + token.to(tl.int64) * D + rows, total, mask=row_mask)


# ---- launch heuristics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutedMoeLaunch:
    """block_i: hidden features a gate/up program computes; block_d: outputs a down program computes;
    block_g: scale groups (32 weights, 16 packed bytes) of a row a loop step reads; num_warps of both kernels."""

    block_i: int
    block_d: int
    block_g: int
    num_warps: int


def routed_moe_launch(t: Target, hidden: int, intermediate: int) -> RoutedMoeLaunch:
    """GPUs: 16-row tiles of 8 groups (128 bytes, a whole cache line of each row) a step, so a decode step's
    k selections x I / 16 gate/up programs and D / 16 down programs spread over every SM. cpu (Triton's
    interpreter, tests only): whole rows up to 256 values a step and up to 128 / 256 rows a program, since
    the interpreter pays per program and per operation, not per element."""
    if not t.is_gpu:
        return RoutedMoeLaunch(block_i=min(128, triton.next_power_of_2(intermediate)),
                               block_d=min(256, triton.next_power_of_2(hidden)),
                               block_g=min(8, triton.next_power_of_2(max(hidden, intermediate) // FP4_BLOCK)),
                               num_warps=4)
    return RoutedMoeLaunch(block_i=16, block_d=16, block_g=8, num_warps=4)


# ---- host wrapper -----------------------------------------------------------------------------------------
class PointerTables:
    """The pointer table of each weight set (int64 [6, E]: data pointers of w1, s1, w3, s3, w2, s2), keyed by
    the device and the pointers themselves, so a table depends on nothing but its key. Made on the first call
    with a weight set (which also checks every expert's tensors) and kept: a captured CUDA graph keeps reading
    its table, so none is ever dropped."""

    def __init__(self) -> None:
        self._tables: dict[tuple[torch.device, tuple[int, ...]], tuple[torch.Tensor, bool]] = {}

    def get(self, lists: Sequence[Sequence[torch.Tensor]], x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(table, whether every tensor (packed weights and scales) is 16-byte aligned) for the six lists, on x's
        device."""
        key = (x.device, tuple(t.data_ptr() for tensors in lists for t in tensors))
        if key not in self._tables:
            _check_weight_set(lists, x, every=True)
            aligned = all(t.data_ptr() % POINTER_ALIGN == 0 for tensors in lists for t in tensors)
            table = torch.tensor(key[1], dtype=torch.int64, device=x.device).view(len(lists), -1)
            self._tables[key] = table, aligned
        return self._tables[key]


POINTER_TABLES = PointerTables()  # the process's tables (the CUDA op's); tests pass their own


def _check_weight_set(lists: Sequence[Sequence[torch.Tensor]], x: torch.Tensor, every: bool) -> tuple[int, int]:
    """(D, I) from the first expert, checked against x; with `every`, every expert's tensors against the
    first's (shape, dtype, device, contiguity)."""
    d, i = x.shape[-1], lists[0][0].shape[0]
    expected = {"w1": ((i, d // 2), torch.int8), "s1": ((i, d // FP4_BLOCK), None), "w3": ((i, d // 2), torch.int8),
                "s3": ((i, d // FP4_BLOCK), None), "w2": ((d, i // 2), torch.int8), "s2": ((d, i // FP4_BLOCK), None)}
    for (name, (shape, dtype)), tensors in zip(expected.items(), lists):
        for e, tensor in enumerate(tensors if every else tensors[:1]):
            ok = (tuple(tensor.shape) == shape and tensor.device == x.device and tensor.is_contiguous()
                  and tensor.dtype == (dtype or tensors[0].dtype) and tensor.element_size() == 1)
            if not ok:
                raise ValueError(f"routed_moe: {name}[{e}] is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}"
                                 f" (contiguous: {tensor.is_contiguous()}); expected {shape} "
                                 f"{dtype or 'e8m0'} contiguous on {x.device}")
    return d, i


def _act_quant(x: torch.Tensor, launch: RoutedMoeLaunch) -> torch.Tensor:
    """`quant.fake_quant_fp8(x, 128)` of rows x [R, C] (C a multiple of 128) as fp32 [R, C]."""
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.numel():
        _act_quant_kernel[(x.shape[0], x.shape[1] // QUANT_BLOCK)](x, out, x.shape[1], num_warps=launch.num_warps)
    return out


def routed_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               lists: Sequence[Sequence[torch.Tensor]], swiglu_limit: float | None, act_quant: bool,
               launch: RoutedMoeLaunch | None = None, tables: PointerTables = POINTER_TABLES,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The op on flat inputs: x [N, D] (bf16, fp16 or fp32), ids [N, k] int64, weights [N, k] fp32, `lists`
    the six per-expert weight lists (w1, s1, w3, s3, w2, s2) -> fp32 [N, D], written into `out` if given
    (contiguous fp32 [N, D]). See the module docstring."""
    d, i = _check_weight_set(lists, x, every=False)
    launch = launch or routed_moe_launch(target_for_device(x.device), d, i)
    if act_quant and (d % QUANT_BLOCK or i % QUANT_BLOCK):
        raise ValueError(f"routed_moe: FP8 activation rounding needs D ({d}) and I ({i}) multiples of {QUANT_BLOCK}")
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(f"routed_moe: activation dtype {x.dtype} not supported (bf16, fp16, fp32)")
    n, k = ids.shape
    if out is None:
        out = torch.empty((n, d), dtype=torch.float32, device=x.device)
    elif out.shape != (n, d) or out.dtype != torch.float32 or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"routed_moe: out is {tuple(out.shape)} {out.dtype}; expected contiguous fp32 {(n, d)}")
    if n == 0:
        return out
    table, aligned = tables.get(lists, x)
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    act, limit = _TRITON_DTYPES[x.dtype], swiglu_limit if swiglu_limit is not None else 0.0
    hidden = torch.empty((n * k, i), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(n * k, triton.cdiv(i, launch.block_i))](
        _act_quant(x, launch) if act_quant else x, ids, weights, table, hidden, d, i, k, len(lists[0]), limit,
        BLOCK_I=launch.block_i, BLOCK_G=launch.block_g, CLAMP=swiglu_limit is not None, ACT=act, ALIGNED=aligned,
        num_warps=launch.num_warps)
    _down_kernel[(n, triton.cdiv(d, launch.block_d))](
        _act_quant(hidden, launch) if act_quant else hidden, ids, table, out, d, i, k, len(lists[0]),
        BLOCK_D=launch.block_d, BLOCK_G=launch.block_g, ACT=act, ALIGNED=aligned, num_warps=launch.num_warps)
    return out
