"""The shared expert's rows split over two programs in the fused MoE's GEMMs (`MoeFp4Launch.shared_split`,
codegen/kernels/moe_fp4.py; the layer and its calls: tests/moe_layers.py).

- the launch: `shared_split` other than 1 or 2 is refused; every GPU target splits (the cpu target does not),
  and at Flash's shape a one-token step's gate/up and down programs, the shared expert's two programs a grid
  column included, still fit one wave of the target's SMs;
- the tile list `_prepare_kernel` writes (under Triton's interpreter), against one built in Python from the
  documented layout: each expert's selections in tiles of block_m (in selection order, -1 padding), an expert
  no token chose absent, each shared tile twice in a row with ids E and E + 1, the count exact; at one token
  and at 20 (the shared expert's 20 selections: a full tile and a partial one);
- the whole op under the interpreter with shared_split 2 against shared_split 1 on the same call, and both
  within the reference's tolerance; W4A8 (the shared expert's inputs rounded: its split gate/up programs write
  unrounded rows the down GEMM rounds on load) bit-equal (torch.equal); W4A16 (fp32, not rounded) to 1e-6
  (relative norm error): the split changes a shared dot's M side (64 rows, not 128; 128, not 256), and the
  interpreter's fp32 dots are numpy's BLAS sgemm, whose sum order changes with the shape (seen: 2e-7), while
  it multiplies FP8 operands (W4A8's shared dots) as float16 in numpy's own loop, one order whatever the shape.
  On a GPU the MMA's order of a row's K sum does not depend on M. Hash- and score-routed, one token and 20
  (tiles of several selections), and a layer of two gate/up columns with the down GEMM split over I.
Mutations run: both shared programs computing the first half of the rows (`_shared_rows` without its
`part * rows`): every split-against-unsplit case fails; the down GEMM's shared loop not rounding on load (ROUND
"none" in its split branch): the W4A8 cases fail; the shared tile's copies all given id E, or the shared tiles
not repeated in the count (`_group`): the tile-list tests and every split-against-unsplit case fail.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from moe_layers import NONE, ROUTED_LIMIT, ROUTING, SHARED_LIMIT, layer_call, rel_err

from dsv4c.codegen.kernels.moe_fp4_launch import DOWN_ROWS, K_COLUMNS, MoeFp4Launch, moe_fp4_launch
from dsv4c.codegen.targets import TARGETS, target
from dsv4c.model.presets import flash

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
LAUNCH = dict(block_m=16, block_n=128, split_k=1, router_block_e=16, router_splits=1, product="ieee",
              native_fp4=False, shared_split=1, num_warps=4, num_stages=1)


# ---- the launch ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [0, 3, 4])
def test_launch_refuses_other_splits(split):
    with pytest.raises(ValueError, match="shared_split"):
        MoeFp4Launch(**dict(LAUNCH, shared_split=split))


@pytest.mark.parametrize("t", [t for t in TARGETS if t.is_gpu], ids=lambda t: t.name)
def test_gpu_launches_split_the_shared_expert_within_one_wave(t):
    cfg = flash()
    e, k, d, i = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    launch = moe_fp4_launch(t, e, k, d, i, "w4a8", True)
    assert launch.shared_split == 2, launch
    gate_up = (k + launch.shared_split) * (i // K_COLUMNS)
    down = (k + launch.shared_split) * (d // DOWN_ROWS) * launch.split_k
    assert gate_up <= t.sm_count and down <= t.sm_count, (gate_up, down, t.sm_count)


def test_cpu_launch_does_not_split():
    assert moe_fp4_launch(target("cpu"), 8, 3, 256, 128, "w4a8", True).shared_split == 1


# ---- the tile list ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return interpreter_pool


def _tile_list(ids: torch.Tensor, experts: int, block_m: int, shared_split: int) -> tuple[int, list, list]:
    """(tile count, each tile's expert id, each tile's selections) from `_prepare_kernel` under the interpreter."""
    import triton

    from dsv4c.codegen.kernels import moe_fp4 as kernels

    n, k = ids.shape
    s, d = n * (k + 1), K_COLUMNS
    most = triton.cdiv(s, block_m) + min(experts + 1, s) + (shared_split - 1) * triton.cdiv(n, block_m)
    order = torch.full((most * block_m,), -2, dtype=torch.int32)
    tile_expert = torch.full((most,), -2, dtype=torch.int32)
    count = torch.empty(1, dtype=torch.int32)
    x = torch.randn(n, d)
    kernels._prepare_kernel[(experts + 1,)](
        ids, order, tile_expert, count, x, torch.empty_like(x), x, n, s, d, k, experts, BLOCK_M=block_m,
        BLOCK_S=triton.next_power_of_2(s), BLOCK_E=triton.next_power_of_2(experts + 2),
        BLOCK_T=triton.next_power_of_2(max(triton.cdiv(s, block_m), shared_split * triton.cdiv(n, block_m))),
        ROUTED_ACT="none", SHARED_ACT="none", NATIVE_FP4=False, SHARED_SPLIT=shared_split, PDL=False)
    tiles = int(count)
    return tiles, tile_expert[:tiles].tolist(), order[:tiles * block_m].view(tiles, block_m).tolist()


def expected_tile_list(ids: torch.Tensor, experts: int, block_m: int, shared_split: int) -> tuple[int, list, list]:
    """The documented layout: experts in order, each one's selections in selection order in tiles of block_m
    (-1 padding); the shared expert (E) last, each of its tiles shared_split times, copy q with id E + q."""
    n, k = ids.shape
    chosen = [[] for _ in range(experts + 1)]
    for token in range(n):
        for slot in range(k):
            chosen[int(ids[token, slot])].append(token * (k + 1) + slot)
        chosen[experts].append(token * (k + 1) + k)
    tile_ids, rows = [], []
    for e, selections in enumerate(chosen):
        for start in range(0, len(selections), block_m):
            tile = selections[start:start + block_m]
            for copy in range(shared_split if e == experts else 1):
                tile_ids.append(e + copy)
                rows.append(tile + [-1] * (block_m - len(tile)))
    return len(tile_ids), tile_ids, rows


@needs_triton
@pytest.mark.parametrize("tokens", [1, 20])
def test_shared_tiles_appear_once_a_slice(interpreter, tokens):
    experts, k, block_m = 8, 3, 16
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts - 1, generator=gen)[:k] for _ in range(tokens)]).to(torch.int32)
    assert not (ids == experts - 1).any()  # an expert no token chose: no tile
    got = interpreter.submit(_tile_list, ids, experts, block_m, 2).result()
    assert got == expected_tile_list(ids, experts, block_m, 2)
    assert got[1].count(experts) == got[1].count(experts + 1) == -(-tokens // block_m)


# ---- split against unsplit, bit for bit ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SplitCase:
    tokens: int
    hash_layer: bool
    dtype: torch.dtype
    activations: str
    shared_act_quant: bool
    inter: int = 128
    split_k: int = 1


UNROUNDED_TOLERANCE = 1e-6  # W4A16: the interpreter's fp32 dots sum in an order that depends on M (above)
SPLIT_CASES = {
    "w4a8-score-t1": SplitCase(1, False, torch.bfloat16, "w4a8", True),
    "w4a8-hash-t20": SplitCase(20, True, torch.bfloat16, "w4a8", True),
    "w4a16-fp32-hash-t1": SplitCase(1, True, torch.float32, "w4a16", False),
    "w4a16-fp32-score-t20": SplitCase(20, False, torch.float32, "w4a16", False),
    # two gate/up grid columns (I = 256), the down GEMM split over I
    "w4a8-score-t20-columns": SplitCase(20, False, torch.bfloat16, "w4a8", True, inter=256, split_k=2),
}


def _split_and_unsplit(call, case: SplitCase) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's kernels on `call` with shared_split 2, then 1 (the LAUNCH otherwise)."""
    from dsv4c.codegen.kernels import moe_fp4 as kernels

    tables = kernels.PointerTables()
    return tuple(kernels.moe_fp4(*call.routing_operands(), ROUTING, call.lists, call.shared, ROUTED_LIMIT,
                                 SHARED_LIMIT, case.activations, case.shared_act_quant,
                                 launch=MoeFp4Launch(**dict(LAUNCH, shared_split=split, split_k=case.split_k)),
                                 tables=tables)
                 for split in (2, 1))


@needs_triton
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split_shared_expert_is_bit_equal_to_unsplit(interpreter, name):
    case = SPLIT_CASES[name]
    call = layer_call(name, case.tokens, case.hash_layer, case.dtype, case.inter)
    assert not (call.route()[0] == NONE).any()
    split, unsplit = interpreter.submit(_split_and_unsplit, call, case).result()
    if case.shared_act_quant:
        assert not split.isnan().any() and torch.equal(split, unsplit)
    else:
        assert rel_err(split, unsplit) <= UNROUNDED_TOLERANCE
    assert rel_err(split, call.reference(case.activations, case.shared_act_quant)) <= 1e-3
