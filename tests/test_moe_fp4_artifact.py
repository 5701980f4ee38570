"""A compiled artifact with the fused MoE (`dsv4c::moe_fp4`) against the eager reference model, 50 decode steps.

The tiny preset (every layer kind; hash- and score-routed MoE layers) is compiled for h100 on this CPU machine:
the h100 pipeline lowers every MoE, routing included, to `moe_fp4` (its reference runs here), W4A16 on the
plain fp32 graph. In plain fp32 the op computes the model's own `moe` ops on the same values in the same order,
so the logits agree to fp32 summation order at most: relative norm error <= 1e-5 over every step (a dropped
shared expert or a wrong routing weight moves them by far more), and the same greedy token at every position.
Batch 2, as tests/test_faithful_artifact.py explains (one-row matrix-vector products sum in an
address-dependent order).
"""

from __future__ import annotations

import pytest
import torch

from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.checkpoint import Checkpoint, write_synthetic
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import dequantize_weights, forward, init_state
from dsv4c.runtime.artifact import load_artifact
from dsv4c.runtime.loader import load

NUM = Numerics.plain(torch.float32)
CFG = tiny()
MAX_SEQ_LEN, CHUNK, PREFILL, DECODE = 64, 2, 4, 50
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic(CFG, tmp_path_factory.mktemp("moe_fp4_artifact") / "ckpt", seed=11)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    options = CompileOptions(targets=("h100",), numerics=NUM, max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK, mtp=False)
    return compile_checkpoint(checkpoint, tmp_path_factory.mktemp("moe_fp4_artifact") / "art", options)


def schedule() -> list[tuple[int, int]]:
    """Prefill in chunks of CHUNK, then DECODE steps of one token."""
    return [(s, s + CHUNK) for s in range(0, PREFILL, CHUNK)] + [(t, t + 1) for t in range(PREFILL, PREFILL + DECODE)]


def test_fused_moe_artifact_equals_eager_through_50_decode_steps(checkpoint, artifact):
    engine = load(artifact)
    stored = load_artifact(artifact)
    ops = {op.op for plan in stored.plans.values() for op in plan.ops}
    assert "dsv4c::moe_fp4.default" in ops and "dsv4c::routed_moe.default" not in ops
    assert "aten::softplus.default" not in ops  # the router's score function is inside moe_fp4
    assert "moe_accuracy" not in stored.manifest  # measured for `--moe w4a4` only
    ckpt = Checkpoint.open(checkpoint)
    weights = dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, NUM)
    tokens = torch.randint(0, CFG.vocab_size, (2, PREFILL + DECODE), generator=torch.Generator().manual_seed(0))
    state, eager_state = engine.new_state(2), init_state(CFG, 2, MAX_SEQ_LEN, NUM)
    compiled, eager = [], []
    for a, b in schedule():
        start = torch.full((2,), a)
        out = engine.runner.run(f"main_t{b - a}", {**{f"state.{k}": v for k, v in state.items()},
                                                  "tokens": tokens[:, a:b], "start": start})
        state = {k: out[f"state.{k}"] for k in state}
        logits, _, eager_state = forward(weights, eager_state, tokens[:, a:b], start, CFG, NUM)
        compiled.append(out["logits"].float())
        eager.append(logits.float())
    got, want = torch.cat(compiled, 1)[:, PREFILL:], torch.cat(eager, 1)[:, PREFILL:]
    assert got.shape == (2, DECODE, CFG.vocab_size)
    assert rel_err(got, want) <= TOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))
