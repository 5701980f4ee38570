"""Per-target pipelines, and the whole cpu pipeline on the captured tiny model in debug mode."""

import pytest
import torch

from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.model.step import dequantize_weights, forward
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes import MemoryPlan, PassContext, optimise, pipeline_for
from dsv4c.passes.manager import compare_values
from pass_graphs import step_input_maker

MAX_SEQ_LEN = 128


def test_every_target_has_an_ordered_list_with_reasons():
    names = [e.name for e in pipeline_for("cpu")]
    assert names[0] == "noop_removal" and names[-1] == "memory_planning"
    for target in ("cpu", "h100", "sm_90a", "b200", "sm_100a", "gb300", "sm_103a"):
        entries = pipeline_for(target)
        assert [e.name for e in entries] == names and all(e.reason for e in entries)
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        pipeline_for("tpu")


@pytest.fixture(scope="module")
def captured():
    cfg, num = tiny(), Numerics.plain(torch.float32)
    weights = dequantize_weights(dict(synthetic_tensors(cfg, 0)), num)
    step = capture(cfg, num, weights, StepVariant("main", 1), MAX_SEQ_LEN)
    return cfg, num, weights, step


def test_cpu_pipeline_on_tiny_model(captured):
    cfg, num, weights, step = captured
    make = step_input_maker(cfg, weights, step, MAX_SEQ_LEN)
    nodes_before = len(step.graph_module.graph.nodes)
    ctx = PassContext("cpu", True, make, 1e-5, (1, 3), tuple(step.output_names))
    gm, records = optimise(step.graph_module, "cpu", ctx)        # debug: each pass checked on fresh inputs

    assert [r.name for r in records] == [e.name for e in pipeline_for("cpu")]
    by_name = {r.name: r for r in records}
    assert by_name["noop_removal"].details["asserts"] > 500 and by_name["cse"].matches > 100
    assert len(gm.graph.nodes) < 0.7 * nodes_before

    inputs = make(2)
    got = gm(*[x.clone() for x in inputs])
    named = dict(zip(step.input_names, inputs))
    w = {k[len("weights."):]: v for k, v in named.items() if k.startswith("weights.")}
    state = {k[len("state."):]: v.clone() for k, v in named.items() if k.startswith("state.")}
    logits, hidden, new_state = forward(w, state, named["tokens"], named["start"], cfg, num)
    assert compare_values(got[0], logits, 1e-5) is None and compare_values(got[1], hidden, 1e-5) is None
    for name, value in zip(step.output_names[2:], got[2:]):
        assert compare_values(value, new_state[name[len("state."):]], 1e-5) is None, name

    plan = gm.meta["dsv4c_memory_plan"]
    peaks = [plan.peak_bytes(b) for b in (1, 8, 64)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert all(plan.live_bytes(b) <= plan.peak_bytes(b) < plan.no_reuse_bytes(b) / 2 for b in (1, 8, 64))
    assert MemoryPlan.from_json(plan.to_json()) == plan
