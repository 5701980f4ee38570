"""The runtime's step runner on CPU: the compiled steps over the state pool, padded to batch buckets, in place.

The artifact (tests/plain_artifact.py, shared with the end-to-end tests) is compiled from a tiny checkpoint whose
top-k keep every candidate, in fp32 with no rounding, so compiled and eager differ by fp32 summation order only (relative norm error under 1e-5 over every position).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dsv4c.compiler.benchmark import dequantised_weights
from dsv4c.compiler.scoring import runner_logits
from dsv4c.model.checkpoint import Checkpoint
from dsv4c.model.step import dequantize_weights
from dsv4c.runtime import capacity
from dsv4c.runtime.artifact import load_artifact
from dsv4c.runtime.eager_runner import EagerRunner
from dsv4c.runtime.executor import ExecutorError
from dsv4c.runtime.loader import load
from dsv4c.runtime import step_runner
from dsv4c.runtime.step_runner import BUCKETS, bucket_for
from plain_artifact import CFG, GROUP, NUM, plain_artifact

PREFILL, DECODE = 20, 50
pytestmark = pytest.mark.xdist_group(GROUP)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def checkpoint():
    return plain_artifact()[0]


@pytest.fixture(scope="module")
def artifact():
    return plain_artifact()[1]


@pytest.fixture(scope="module")
def eager(checkpoint):
    ckpt = Checkpoint.open(checkpoint)
    return EagerRunner(dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, NUM), CFG, NUM)


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 100, 128)] == [1, 2, 4, 8, 128, 128]
    with pytest.raises(ValueError, match="largest batch bucket"):
        bucket_for(BUCKETS[-1] + 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_steps_equal_eager_over_prefill_and_decode(artifact, eager, batch):
    """Batch 3 pads up to bucket 4: the padding row must not disturb the others."""
    engine = load(artifact, max_batch=4)
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, CFG.vocab_size, (batch, PREFILL + DECODE), generator=gen)
    state = engine.new_state(batch)
    before = {k: v.data_ptr() for k, v in state.items()}
    outputs = []
    for row in range(batch):  # prefill each row through its own view, then decode the batch together
        rows = {k: v[row:row + 1] for k, v in state.items()}
        runner_logits(engine.runner, rows, tokens[row, :PREFILL], engine.prefill_chunk, PREFILL)
    reference = EagerRunner(eager.weights, CFG, NUM)
    ref_state = {k: v.clone() for k, v in state.items()}
    for step in range(PREFILL, PREFILL + DECODE):
        inputs = {"tokens": tokens[:, step:step + 1], "start": torch.full((batch,), step)}
        out = engine.runner.run("main_t1", {**inputs, **{f"state.{k}": v for k, v in state.items()}})
        ref = reference.run("main_t1", {**inputs, **{f"state.{k}": v for k, v in ref_state.items()}})
        ref_state = {k[len("state."):]: v for k, v in ref.items() if k.startswith("state.")}
        state = {k[len("state."):]: v for k, v in out.items() if k.startswith("state.")}
        outputs.append((out["logits"], ref["logits"]))
        assert {k: v.data_ptr() for k, v in state.items()} == before, "a state tensor was reallocated"
    got, want = torch.cat([o for o, _ in outputs], 1), torch.cat([r for _, r in outputs], 1)
    assert rel_err(got, want) < 1e-5


def test_state_outside_the_pool_runs_the_plan_directly(artifact):
    """A state the pool does not hold (here a private copy) is stepped as given, in place."""
    engine = load(artifact, max_batch=2)
    state = {k: v.clone() for k, v in engine.new_state(2).items()}
    out = engine.runner.run("main_t1", {"tokens": torch.tensor([[3], [4]]), "start": torch.tensor([0, 0]),
                                        **{f"state.{k}": v for k, v in state.items()}})
    assert out["state.layers.0.window_kv"].data_ptr() == state["layers.0.window_kv"].data_ptr()
    assert state["layers.0.window_kv"][:, 0].abs().sum() > 0  # position 0's KV written into the given state


class _Replay:
    """A stand-in for a captured CUDA graph (none on CPU): a replay writes 1 into its logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def replay(self) -> None:
        self.logits.fill_(1.0)


def test_only_executed_steps_enter_batch_invariant(artifact, monkeypatch):
    """The executor's steps run inside `batch_invariant()` (registering the invariant kernels); a graph replay
    dispatches no aten op, so it enters nothing (the registration would be host work for nothing)."""
    engine = load(artifact, max_batch=2)
    entered = []

    @contextlib.contextmanager
    def counted():
        entered.append(True)
        yield

    monkeypatch.setattr(step_runner, "batch_invariant", counted)
    state = {f"state.{k}": v for k, v in engine.new_state(2).items()}
    inputs = {"tokens": torch.tensor([[3], [4]]), "start": torch.tensor([0, 0]), **state}
    engine.runner.run("main_t1", inputs)
    assert len(entered) == 1
    logits = torch.zeros(2, 1, CFG.vocab_size)
    statics = {"tokens": torch.zeros(2, 1, dtype=torch.int64), "start": torch.zeros(2, dtype=torch.int64)}
    engine.runner._graphs[("main_t1", 2)] = step_runner._Graph(_Replay(logits), statics, {"logits": logits},
                                                               frozenset(inputs))
    out = engine.runner.run("main_t1", inputs)
    assert len(entered) == 1 and torch.equal(out["logits"], torch.ones(2, 1, CFG.vocab_size))
    assert torch.equal(statics["tokens"], inputs["tokens"])
    logits.zero_()
    with pytest.raises(ExecutorError, match="unexpected \\['extra'\\]"):  # not the graph's inputs: the executor says so
        engine.runner.run("main_t1", {**inputs, "extra": torch.zeros(2)})
    assert not logits.any()


def test_prefill_row_steps_replay_the_prefill_graph(artifact):
    """A step over the pool's prefill row replays its variant's prefill graph (none on CPU: a stand-in), with the
    step's tokens copied into the graph's static inputs; the same step over slot 0 does not."""
    engine = load(artifact, max_batch=2)
    row = {f"state.{k}": v for k, v in engine.prefill_row().items()}
    inputs = {"tokens": torch.tensor([[3, 4]]), "start": torch.tensor([0]), **row}
    logits = torch.zeros(1, 2, CFG.vocab_size)
    statics = {"tokens": torch.zeros(1, 2, dtype=torch.int64), "start": torch.zeros(1, dtype=torch.int64)}
    engine.runner._prefill_graphs["main_t2"] = step_runner._Graph(_Replay(logits), statics, {"logits": logits},
                                                                  frozenset(inputs))
    out = engine.runner.run("main_t2", inputs)
    assert out["logits"] is logits and torch.equal(logits, torch.ones_like(logits))
    assert torch.equal(statics["tokens"], inputs["tokens"])
    logits.zero_()
    slot = {f"state.{k}": v for k, v in engine.new_state(1).items()}
    out = engine.runner.run("main_t2", {**inputs, **slot})
    assert not logits.any() and out["logits"].shape == (1, 2, CFG.vocab_size)


def test_a_state_input_the_pool_does_not_hold_is_named_not_dropped(artifact):
    """Pool rows plus a `state.*` input the plan does not take: the padded run passes it on and the executor
    names it."""
    engine = load(artifact, max_batch=4)
    inputs = {"tokens": torch.tensor([[3], [4], [5]]), "start": torch.tensor([0, 0, 0]),
              **{f"state.{k}": v for k, v in engine.new_state(3).items()}, "state.bogus": torch.zeros(3)}
    with pytest.raises(ExecutorError, match=r"unexpected \['state.bogus'\]"):
        engine.runner.run("main_t1", inputs)


def test_the_memory_plan_sizes_the_pool(artifact):
    """The loader's capacity check evaluates the memory-planning pass's peak; it equals the pass's own figures."""
    manifest = load_artifact(artifact).manifest
    record = next(r for r in manifest["pass_log"][0]["passes"] if r["name"] == "memory_planning")
    for batch, peak in record["details"]["bytes_at"].items():
        assert capacity.activation_bytes(manifest, manifest["pass_log"][0]["variant"], int(batch)) == peak
    per_token = ("main_t1",)
    one = capacity.step_bytes(manifest, per_token, 1, 1000)
    assert capacity.largest_fitting(manifest, per_token, BUCKETS, 1000, one) == 1
    assert capacity.largest_fitting(manifest, per_token, BUCKETS, 1000, one - 1) is None
    assert capacity.largest_fitting(manifest, per_token, BUCKETS, 1000, 10**15) == BUCKETS[-1]


def test_weights_are_read_at_aligned_addresses(artifact):
    """CPU matmul libraries choose their summation order by operand alignment: every weight the runtime reads
    sits at a 64-byte boundary, as a freshly allocated tensor would."""
    store = load_artifact(artifact).weights
    assert all(store[name].data_ptr() % 64 == 0 for name in store)


def test_every_variant_binds_one_copy_of_the_weights(artifact):
    """Each weight is read from the artifact once and bound by every variant's executor: a Flash-size artifact's
    ten variants take its bytes once, not ten times (which an 80 GB card cannot hold)."""
    engine = load(artifact, "cpu")
    executors = list(engine.runner.executors.values())
    assert len(executors) >= 2
    shared = 0
    for name, tensor in executors[0].bound_inputs.items():
        for other in executors[1:]:
            if name in other.bound_inputs:
                assert other.bound_inputs[name].data_ptr() == tensor.data_ptr(), name
                shared += 1
    assert shared >= len(executors[0].bound_inputs)


def test_the_bench_baselines_decode_the_checkpoint_weights(artifact, checkpoint):
    """The eager baselines' weights, decoded a file at a time from the artifact's store, are the checkpoint's
    weights decoded whole."""
    ckpt = Checkpoint.open(checkpoint)
    want = dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, NUM)
    got = dequantised_weights(load_artifact(artifact).weights, NUM, "cpu", decode_on="cpu")
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
