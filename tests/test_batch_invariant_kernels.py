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
- mHC (codegen/kernels/mhc.py) as the runtime runs it: the CUDA implementations the loader binds for the
  executors (`mhc_implementations`), run on CPU tensors, give a token the same bits in steps of 1, 3, 9 and 17
  tokens (hc_pre, hc_post_pre, hc_head, fp32 streams), with the same launches (one token a program, D's split by
  its size) at every count: the launches are compared too, since the interpreter's numpy sums give a row the
  same bits whatever its token block (a D split that follows the token count does show in the bits). The loader
  binds them on every GPU kernel plan but the reference one. Off the GPU the ops' tuned launch is the
  interpreter's, so the invariant launch is exercised by calling those implementations themselves.

The GEMM writes fp32 (x fp32 for plain products), where a changed order of summation shows in the last bits
(a bf16 output would hide most of it, and FP8 products of bf16 inputs often sum exactly). Each case also checks
the call against the op's reference (FP8: relative norm error 1e-6 and every element within 1e-5 of the
largest, as tests/test_fp8_linear.py; attention: relative norm error 1e-2, as tests/test_attention_kernels.py;
mHC: relative norm error 1e-5 against the float64 spec, outputs NaN-poisoned, as tests/test_mhc_cuda_wrappers.py),
so equal means equal and right. The kernels run in a spawned child that sets TRITON_INTERPRET before importing
Triton (tests/child_pool.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import mhc_spec as spec
from child_pool import run_in
from dsv4c.codegen import fp8_linear, sparse_attention
from dsv4c.codegen.kernels.fp8_gemm_launch import fp8_gemm_launch
from dsv4c.codegen.kv_cache import kv_pack
from dsv4c.codegen.targets import target
from dsv4c.model import quant

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

SMALL_GPU = dataclasses.replace(target("h100"), sm_count=4)  # few SMs: small shapes cross the fold
GEMM_ROWS = (1, 2, 3, 8, 64, 65, 130)
HEADS, WIDTH, ROUNDED, WINDOW, SLOTS, RAW_BLOCK = 16, 512, 448, 64, 66, 64


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
def child(interpreter_pool):
    return run_in(interpreter_pool)


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
    it must not change with the token count. Beyond 8 tokens the tuned tensor-core launches take over (outside
    runtime/batch_invariant.py's block; inside it, the next test)."""
    from dsv4c.codegen.kernels.mhc_launch import mhc_launch

    def order(tokens):
        launch = mhc_launch(target(name), tokens, 4096, 4)
        return launch.block_t, launch.block_d, launch.chunks, launch.split_k, launch.dot, launch.precision

    assert {order(tokens) for tokens in range(1, 9)} == {order(1)}


def test_mhc_block_launch_sums_alike_at_every_token_count():
    """`batch_invariant_launch`, the mHC launch inside the block: what decides a token's sums (token and column
    blocks, chunks, splits, product kind, which kernel sums the squares) is the same at every token count on
    every target; up to 8 tokens on GPUs it is the tuned launch itself (decode and small MTP steps keep theirs)."""
    from dsv4c.codegen.kernels.mhc_launch import batch_invariant_launch, mhc_launch

    def order(launch):
        return (launch.block_t, launch.block_d, launch.chunks, launch.split_k, launch.dot, launch.precision,
                launch.collapse_t, launch.collapse_sums_squares)

    for name in ("cpu", "h100", "b200", "gb300"):
        for hidden in (72, 4096, 7168):
            counts = (1, 2, 3, 8, 9, 16, 17, 64, 65, 256, 1024)
            assert len({order(batch_invariant_launch(target(name), tokens, hidden, 4)) for tokens in counts}) == 1
    for name in ("h100", "gb300"):
        for tokens in range(1, 9):
            assert batch_invariant_launch(target(name), tokens, 4096, 4) == mhc_launch(target(name), tokens, 4096, 4)


# ---- mHC inside the block --------------------------------------------------------------------------------------
MHC_STEPS = ((0, 1), (16, 17), (0, 3), (8, 11), (5, 14), (0, 17))  # steps of 1, 3, 9 and 17 tokens (the whole)
MHC_TOKEN_ARGS = {"hc_pre": 1, "hc_post_pre": 4, "hc_head": 1}  # leading arguments with a token dim
MHC_N, MHC_HIDDEN, MHC_TOL = 4, 72, 1e-5  # D = 72: three 32-column splits, the last one masked
MHC_ITERS = 3  # Sinkhorn iterations: the interpreter's time is mostly the Sinkhorn's; any count shows the order


class _RecordingJit:
    """A launcher (codegen/kernels/launcher.py) that runs each launch with Triton's JIT and keeps the constants
    that decide a token's sums: the kernel, its token block, column block, chunks, splits and product kind."""

    def __init__(self):
        self.orders: set[tuple] = set()

    def __call__(self, launch) -> None:
        from dsv4c.codegen.kernels.launcher import JIT

        self.orders.add((launch.fn.__name__, *(launch.constexprs.get(name) for name in
                                               ("BLOCK_T", "BLOCK_D", "CHUNKS", "SPLIT", "DOT", "SQ", "OWN_SQ"))))
        JIT(launch)


def _mhc_as_run(op: str, args: tuple, poisoned: tuple):
    """In the child: ({step: (outputs, launch orders)} of the runtime's CUDA implementation of `op` on each step's
    tokens, the whole step through the host wrapper with the invariant launch choice into `poisoned` outputs)."""
    from dsv4c.codegen.kernels import mhc
    from dsv4c.codegen.kernels.mhc_launch import batch_invariant_launch
    from dsv4c.runtime.loader import mhc_implementations

    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    steps, impl, lead = {}, mhc_implementations(None)[f"dsv4c::{op}"], MHC_TOKEN_ARGS[op]
    for lo, hi in MHC_STEPS:
        recorder = _RecordingJit()
        out = impl(*(a[lo:hi] for a in args[:lead]), *args[lead:], launcher=recorder)
        steps[(lo, hi)] = (as_tuple(out), recorder.orders)
    whole = getattr(mhc, op)(*args, launch_choice=batch_invariant_launch,
                             out=poisoned if len(poisoned) > 1 else poisoned[0])
    return steps, as_tuple(whole)


def _mhc_expected(op: str, x: dict) -> tuple:
    """The float64 spec's outputs of `op` (tests/mhc_spec.py), normed after the RMSNorm."""
    norm = lambda block: spec.rms_norm(block, x["norm_weight"], spec.RMS_EPS)  # noqa: E731
    if op == "hc_head":
        head = (x["fn"][:MHC_N], x["base"][:MHC_N], x["scale"][:1])
        return (norm(spec.hc_head(x["streams"], *head, spec.RMS_EPS, spec.HC_EPS)),)
    streams = x["streams"].double()
    if op == "hc_post_pre":
        streams = spec.hc_post(x["block_out"], x["streams"], x["post"], x["comb"])
    block, post, comb = spec.hc_pre(streams, x["fn"], x["base"], x["scale"], spec.RMS_EPS, spec.HC_EPS, MHC_ITERS)
    return ((streams,) if op == "hc_post_pre" else ()) + (norm(block), post, comb)


def _mhc_args(op: str, x: dict) -> tuple:
    if op == "hc_head":
        return (x["streams"], x["fn"][:MHC_N], x["base"][:MHC_N], x["scale"][:1], x["norm_weight"], spec.RMS_EPS,
                spec.HC_EPS)
    mix = (x["fn"], x["base"], x["scale"], x["norm_weight"], spec.RMS_EPS, spec.HC_EPS, MHC_ITERS)
    if op == "hc_post_pre":
        return (x["block_out"], x["streams"], x["post"], x["comb"], *mix)
    return (x["streams"], *mix)


@pytest.mark.parametrize("op", ["hc_pre", "hc_post_pre", "hc_head"])
def test_mhc_rows_do_not_depend_on_the_step_as_the_runtime_runs_them(child, op):
    """A token computed in steps of 1, 3, 9 and 17 tokens by the runtime's mHC implementation: the same bits, the
    same launch orders (one token a program: BLOCK_T 1), and the whole step right against the float64 spec."""
    tokens = MHC_STEPS[-1][1]
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # fresh each run
    x = spec.slow_sinkhorn_inputs(gen, (tokens,), MHC_N, MHC_HIDDEN)
    x.update(block_out=torch.randn(tokens, MHC_HIDDEN, generator=gen),
             post=torch.rand(tokens, MHC_N, generator=gen) * 2,
             comb=torch.rand(tokens, MHC_N, MHC_N, generator=gen) / MHC_N)
    expected = _mhc_expected(op, x)
    poisoned = tuple(torch.full(e.shape, float("nan")) for e in expected)
    steps, whole = child(_mhc_as_run, op, _mhc_args(op, x), poisoned)
    for got, want in zip(whole, expected):
        assert not got.isnan().any(), "an output element was not written (or is NaN)"
        error = ((got.double() - want).norm() / want.norm()).item()
        assert got.shape == want.shape and error <= MHC_TOL, (op, error)
    orders = {step: order for step, (_, order) in steps.items()}
    assert len({frozenset(order) for order in orders.values()}) == 1, orders
    assert all(order[1] == 1 for order in orders[(0, tokens)]), "one token a program"
    full, _ = steps[(0, tokens)]
    assert all(torch.equal(a, b) for a, b in zip(full, whole)), "the runtime's implementation differs from the wrapper"
    for (lo, hi), (outputs, _) in steps.items():
        for index, (got, all_rows) in enumerate(zip(outputs, full)):
            assert torch.equal(got, all_rows[lo:hi]), f"{op} output {index}: tokens {lo}..{hi - 1} differ in their step"


def test_executors_run_the_mhc_ops_with_the_batch_invariant_launch(monkeypatch):
    """The loader's executors call the mHC ops' CUDA implementations bound to the batch-invariant launch choice
    and to the kernel plan's launcher (stored binaries, or None: Triton's JIT) on every GPU plan, and the
    registered ops (the references) on the reference plan."""
    import types

    from dsv4c.codegen import cuda_impls
    from dsv4c.codegen.kernels.mhc_launch import batch_invariant_launch
    from dsv4c.runtime import loader
    from dsv4c.runtime.stored_kernels import KernelPlan

    seen = {}
    monkeypatch.setattr(loader, "Executor", lambda plan, constants, device, weights, implementations:
                        seen.setdefault("implementations", implementations))
    monkeypatch.setattr(loader, "weight_inputs", lambda plan, weights: {})
    artifact = types.SimpleNamespace(plans={"main_t1": types.SimpleNamespace(constants={}, tensor_keys=set())},
                                     weights=types.SimpleNamespace(read=lambda keys, device: {}))
    launcher = object()
    for mode, plan_launcher in (("stored", launcher), ("none", None), ("compile", None), ("installed", None)):
        seen.clear()
        loader.plan_executors(artifact, torch.device("cpu"), KernelPlan(mode, "", plan_launcher))
        implementations = seen["implementations"]
        assert sorted(implementations) == sorted(f"dsv4c::{name}" for name in cuda_impls.IMPLS), mode
        assert all(impl.keywords == {"launcher": plan_launcher, "launch_choice": batch_invariant_launch}
                   for impl in implementations.values()), mode
    seen.clear()
    loader.plan_executors(artifact, torch.device("cpu"), KernelPlan("reference", ""))
    assert seen["implementations"] is None
