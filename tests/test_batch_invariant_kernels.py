"""Batch invariance of dsv4c's own kernels under TRITON_INTERPRET=1: a row's output is the same bits whichever
rows share its call.

- FP8 GEMM (codegen/kernels/fp8_gemm.py): rows of calls with M in {1, 2, 3, 8, 64, 65, 130} and at other
  offsets equal the same rows of one 130-row call, with the launch `fp8_gemm_launch` picks for each M on an
  H100-like target of 4 SMs (so that M crosses the fold: split programs below, folded splits above) and the
  interpreter's products; a folded launch equals the split one. The activation tile (`block_m`) is held at 16:
  the interpreter's dot is numpy's matmul, which sums a 16-column product in another order than a 64-column
  one; whether an H100's MMA does is for bench/batch_invariance_check.py, which checks the launches as they are.
- Sparse decode attention (codegen/kernels/attention.py): a query computed in a step of 4 tokens equals the
  same query computed in a one-token step (the ring then holds the earlier tokens), and a sequence computed
  beside two others equals it alone (the step's tokens cross the fold: 12 tokens fold on the interpreter's 8
  SMs, 1 or 3 do not).

The GEMM writes fp32 (x fp32 for plain products), where a changed order of summation shows in the last bits
(a bf16 output would hide most of it, and FP8 products of bf16 inputs often sum exactly). Each case also checks
the call against the op's reference (FP8: relative norm error 1e-6 and every element within 1e-5 of the
largest, as tests/test_fp8_linear.py; attention: relative norm error 1e-2, as tests/test_attention_kernels.py),
so equal means equal and right. The kernels run in a spawned child that sets TRITON_INTERPRET before importing
Triton (tests/child_pool.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from child_pool import child_pool
from dsv4c.codegen import fp8_linear, sparse_attention
from dsv4c.codegen.kernels.fp8_gemm_launch import fp8_gemm_launch
from dsv4c.codegen.kv_cache import kv_pack
from dsv4c.codegen.targets import target
from dsv4c.model import quant

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

SMALL_GPU = dataclasses.replace(target("h100"), sm_count=4)  # few SMs: small shapes cross the fold
GEMM_ROWS = (1, 2, 3, 8, 64, 65, 130)
HEADS, WIDTH, ROUNDED, WINDOW, SLOTS, RAW_BLOCK = 16, 512, 448, 64, 66, 64


def _start_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)


def _fp8_rows(x, weight, scale, act_quant, calls):
    """{label: the kernel's fp32 output for rows offset .. offset + M - 1 of x} for calls {label: (offset, M,
    launch)}."""
    from dsv4c.codegen.kernels import fp8_gemm

    return {label: fp8_gemm.fp8_linear(x[offset:offset + m], weight, scale, act_quant, torch.float32, launch=launch)
            for label, (offset, m, launch) in calls.items()}


def _attention(*args):
    from dsv4c.codegen.kernels import attention

    return attention.sparse_decode_attention(*args)


def _attention_launches(tokens: list[int], keys: int):
    from dsv4c.codegen.kernels import attention

    return [attention.attention_launch(t, HEADS, keys, 8) for t in tokens]


@pytest.fixture(scope="module")
def child():
    with child_pool(_start_interpreter) as pool:
        yield lambda fn, *args: pool.submit(fn, *args).result()


# ---- FP8 GEMM --------------------------------------------------------------------------------------------------
def _gemm_launch(m, n, k, act_quant):
    launch = dataclasses.replace(fp8_gemm_launch(SMALL_GPU, m, n, k, act_quant, torch.float32), block_m=16)
    return launch if act_quant else dataclasses.replace(launch, product="ieee")  # the interpreter's fp32 dot


@pytest.mark.parametrize("act_quant", [True, False])
def test_fp8_gemm_rows_do_not_depend_on_m(child, act_quant):
    n, k, rows = 70, 390, max(GEMM_ROWS)
    gen = torch.Generator().manual_seed(16 + act_quant)
    x = torch.randn(rows, k, generator=gen) * (1 + 30 * (torch.rand(k, generator=gen) < 0.01))
    weight, scale = quant.quantize_fp8_weight(torch.randn(n, k, generator=gen) * 0.05)
    calls = {f"rows 0..{m - 1}": (0, m, _gemm_launch(m, n, k, act_quant)) for m in GEMM_ROWS}
    calls.update({f"rows {o}..{o + m - 1}": (o, m, _gemm_launch(m, n, k, act_quant)) for o, m in ((7, 1), (61, 65))})
    launches = [launch for _, _, launch in calls.values()]
    assert {la.fold_splits for la in launches} == {False, True}, "the calls must cross the fold"
    assert len({(la.split_k, la.blocks_per_split) for la in launches}) == 1 and launches[0].split_k > 1
    one, whole = calls["rows 0..0"][2], calls[f"rows 0..{rows - 1}"][2]
    calls["rows 0..0, folded"] = (0, 1, dataclasses.replace(one, fold_splits=True))
    calls["all rows, split"] = (0, rows, dataclasses.replace(whole, fold_splits=False, pdl=False))
    got = child(_fp8_rows, x, weight, scale, act_quant, calls)
    full = got[f"rows 0..{rows - 1}"]
    expected = fp8_linear.reference(x, weight, scale, act_quant, torch.float32)
    error = ((full.double() - expected.double()).norm() / expected.double().norm()).item()
    assert not full.isnan().any() and error <= 1e-6 and (full - expected).abs().max() <= 1e-5 * expected.abs().max()
    for label, (offset, m, _) in calls.items():
        assert torch.equal(got[label], full[offset:offset + m]), f"{label}: differs from the same rows of the whole"


# ---- sparse decode attention -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Timeline:
    """Three sequences' packed key rows, queries and top-k ids by position, and their compressed cache."""

    rows: torch.Tensor  # [3, P, R] uint8
    queries: torch.Tensor  # [3, P, H, D] bf16
    ids: torch.Tensor  # [3, P, topk] int64
    cache: torch.Tensor  # [3, E, R] uint8
    ratio: int

    def step(self, seqs: list[int], start: list[int], steps: int) -> tuple:
        """The op's arguments for a step of `steps` tokens of sequences `seqs` at positions `start`: this step's
        rows in `new`, every earlier position in the ring at its slot."""
        new = torch.stack([self.rows[s, p:p + steps] for s, p in zip(seqs, start)])
        ring = torch.zeros(len(seqs), SLOTS, self.rows.shape[-1], dtype=torch.uint8)
        for i, (s, p) in enumerate(zip(seqs, start)):
            for pos in range(max(0, p - SLOTS), p):
                ring[i, pos % SLOTS] = self.rows[s, pos]
        q = torch.stack([self.queries[s, p:p + steps] for s, p in zip(seqs, start)])
        ids = torch.stack([self.ids[s, p:p + steps] for s, p in zip(seqs, start)])
        sink = torch.linspace(-1, 1, HEADS)
        return (q, new, ring, self.cache[seqs], ids, torch.tensor(start), sink, WIDTH ** -0.5, WINDOW, self.ratio,
                ROUNDED, RAW_BLOCK)


def _timeline(ratio: int, topk: int, positions: int = 80) -> Timeline:
    gen = torch.Generator().manual_seed(ratio * 100 + topk)
    pack = lambda *shape: kv_pack((torch.randn(*shape, WIDTH, generator=gen) * 2).bfloat16(), "e4m3",  # noqa: E731
                                  ROUNDED, RAW_BLOCK)
    entries = positions // max(ratio, 1) + 1
    visible = (torch.arange(positions) + 1) // max(ratio, 1)
    order = torch.stack([torch.randperm(topk, generator=gen) for _ in range(3 * positions)]).view(3, positions, topk)
    ids = torch.where(order < visible[None, :, None], order, -1) if topk else torch.zeros(3, positions, 0).long()
    return Timeline(pack(3, positions), torch.randn(3, positions, HEADS, WIDTH, generator=gen).bfloat16(), ids,
                    pack(3, entries), ratio)


@pytest.mark.parametrize("ratio, topk", [(4, 32), (16, 0)])
def test_attention_rows_do_not_depend_on_the_step(child, ratio, topk):
    """Sequences at positions 70, 71, 69; a 4-token step against one-token steps and a sequence alone."""
    t = _timeline(ratio, topk)
    start, steps = [66, 67, 65], 4
    keys = WINDOW + (topk or t.cache.shape[1])
    launches = child(_attention_launches, [3 * steps, 3, 1], keys)
    assert [la.fold for la in launches] == [True, False, False] and len({la.splits for la in launches}) == 1
    args = t.step([0, 1, 2], start, steps)
    whole = child(_attention, *args)
    want = sparse_attention.reference(*args)
    error = ((whole.double() - want.double()).norm() / want.double().norm()).item()
    assert not whole.isnan().any() and error <= 1e-2, error
    for j in (0, steps - 1):
        one = child(_attention, *t.step([0, 1, 2], [p + j for p in start], 1))
        assert torch.equal(one[:, 0], whole[:, j]), f"token {j} of the 4-token step differs from its own step"
    alone = child(_attention, *t.step([1], start[1:2], steps))
    assert torch.equal(alone[0], whole[1]), "a sequence alone differs from the same sequence beside two others"


@pytest.mark.parametrize("name", ["h100", "gb300"])
def test_mhc_sums_are_the_same_program_from_one_to_eight_tokens(name):
    """The mHC launch decides a token's summation order by its column chunks, splits, program shape and product
    kind; from 1 to 8 tokens a step (a decode step and an MTP verification of up to 3 drafts at batch 1 or 2)
    it must not change with the token count. Beyond 8 tokens the tuned tensor-core launches take over."""
    from dsv4c.codegen.kernels.mhc_launch import mhc_launch

    def order(tokens):
        launch = mhc_launch(target(name), tokens, 4096, 4)
        return launch.block_t, launch.block_d, launch.chunks, launch.split_k, launch.dot, launch.precision

    assert {order(tokens) for tokens in range(1, 9)} == {order(1)}
