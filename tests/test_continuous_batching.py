"""Continuous batching: requests join and leave between steps (`Engine.add_request` / `Engine.step`), each with its
own prompt length, token budget, sampling parameters and seed, and each gets exactly the tokens it gets decoded
alone: greedy and seeded sampling, plain and with MTP, on the compiled bf16 artifact and on the fp32 reference.
A request the artifact cannot hold is refused alone."""

from __future__ import annotations

import pytest
import torch

from dsv4c.compiler.cli import main
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import dequantize_weights
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.runtime.eager_runner import EagerRunner, state_specs
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.loader import load
from dsv4c.runtime.sampler import SamplingParams
from mtp_artifact import GROUP, bf16_artifact

pytestmark = pytest.mark.xdist_group(GROUP)

FP32 = Numerics.plain(torch.float32)
GREEDY, HOT, NARROW = SamplingParams(), SamplingParams(temperature=0.9), SamplingParams(temperature=0.7, top_p=0.8)
# (step at which it joins, prompt, max_new_tokens, sampling, seed)
REQUESTS = [
    (0, [5, 900, 17, 3, 64, 250, 8, 1000, 77], 9, GREEDY, 0),
    (0, [42, 7, 7], 4, HOT, 1),
    (2, [301, 12, 600, 9, 9, 31], 7, NARROW, 2),
    (3, [11], 5, GREEDY, 3),
]


def run_joining(engine: Engine, requests, mtp: int) -> dict[int, list[int]]:
    """Requests added at their steps; returns each one's tokens by its index, checking it finishes once."""
    engine.set_drafts(mtp)
    ids, out, step = {}, {}, 0
    while len(out) < len(requests):
        for i, (joins, prompt, new, sampling, seed) in enumerate(requests):
            if joins == step:
                ids[engine.add_request(prompt, new, sampling, seed)] = i
        for done in engine.step():
            assert ids[done.id] not in out and len(done.tokens) == requests[ids[done.id]][2]
            out[ids[done.id]] = done.tokens
        step += 1
    assert engine.active == 0
    return out


def alone(make_engine, request, mtp: int) -> list[int]:
    _, prompt, new, sampling, seed = request
    return run_joining(make_engine(), [(0, prompt, new, sampling, seed)], mtp)[0]


@pytest.fixture(scope="module")
def fp32_runner():
    cfg = tiny()
    return EagerRunner(dequantize_weights(dict(synthetic_tensors(cfg, seed=5)), FP32), cfg, FP32)


@pytest.mark.parametrize("mtp", [0, 2])
def test_joining_and_leaving_equals_each_request_alone_fp32(fp32_runner, mtp):
    make = lambda: Engine(fp32_runner, state_specs(tiny(), 64, FP32), prefill_chunk=4, max_seq_len=64, max_batch=4)
    batched = run_joining(make(), REQUESTS, mtp)
    assert [batched[i] for i in range(len(REQUESTS))] == [alone(make, r, mtp) for r in REQUESTS]


@pytest.mark.parametrize("mtp", [0, 1])
def test_joining_and_leaving_equals_each_request_alone_on_the_bf16_artifact(mtp):
    """Slots are reused (two slots, four requests): a request takes a freed row, reset."""
    engine = load(bf16_artifact(), max_batch=2)
    batched = run_joining(engine, REQUESTS, mtp)
    assert [batched[i] for i in range(len(REQUESTS))] == [alone(lambda: engine, r, mtp) for r in REQUESTS]


def test_a_request_over_capacity_is_refused_alone(fp32_runner):
    engine = Engine(fp32_runner, state_specs(tiny(), 64, FP32), prefill_chunk=4, max_seq_len=64, max_batch=4)
    kept = engine.add_request([1, 2, 3], 3)
    with pytest.raises(ValueError, match="prompt of 70 tokens"):
        engine.add_request([1] * 70, 3)
    assert [done.id for done in engine.step() + engine.step() + engine.step()] == [kept]


def test_generate_on_the_command_line_refuses_bad_lines(capsys):
    art = str(bf16_artifact())
    assert main(["generate", art, "--prompt-ids", "1 2 3", "--mtp", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--mtp" in err[0] and "invalid choice: 4" in err[0]
    assert main(["generate", art, "--prompt-ids", " ".join(["1"] * 70), "--prompt-ids", "1 2 3",
                 "--max-new-tokens", "3", "--mtp", "3", "--json"]) == 1
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if "prompt 1" in line] == [
        "dsv4c generate: prompt 1: prompt of 70 tokens + max_new_tokens 3 = 73 positions; the artifact holds 64"]
    assert '"tokens": [[], [' in captured.out
