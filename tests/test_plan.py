"""Plans: the lowered graph as JSON data, and the executor that runs it.

The executor calls the graph's own ops in the graph's order, so it must equal `gm(*inputs)` bit for bit
(fp32, CPU); a plan survives a JSON round trip unchanged; the builder refuses what the runtime could not
run (a Python function, a second symbolic size) naming the node or input.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
from torch.export import Dim, export

from dsv4c.compiler.capture import StepVariant, flat_graph_module, capture
from dsv4c.compiler.lowering import graph_constants, plan_from_graph
from dsv4c.model.step import dequantize_weights, forward, init_state
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.runtime.artifact import describe_numerics, load_artifact, write_artifact
from dsv4c.runtime.executor import Executor, ExecutorError, weight_inputs
from dsv4c.runtime.plan import Plan, PlanError, PlanInput, PlanOp, Ref, decode_value, encode_value

FP32 = Numerics.plain(torch.float32)
MAX_LEN = 128
PREFILL = 24


@pytest.fixture(scope="module")
def tiny_step():
    """The tiny model's MTP step (the cheapest real capture), its weights and its plan."""
    cfg = tiny()
    weights = dequantize_weights(dict(synthetic_tensors(cfg, seed=3)), FP32)
    step = capture(cfg, FP32, weights, StepVariant("mtp", 1), MAX_LEN)
    plan = plan_from_graph(step.graph_module, step.input_names, step.output_names)
    return cfg, weights, step, plan


def tiny_inputs(cfg, weights, step, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs after a prefill of PREFILL tokens, so the caches hold real entries."""
    g = torch.Generator().manual_seed(seed)
    state = init_state(cfg, batch, MAX_LEN, FP32)
    prompt = torch.randint(0, cfg.vocab_size, (batch, PREFILL), generator=g)
    _, _, state = forward(weights, state, prompt, torch.zeros(batch, dtype=torch.long), cfg, FP32)
    values = {**{f"weights.{k}": t for k, t in weights.items()}, **{f"state.{k}": t for k, t in state.items()},
              "tokens": torch.randint(0, cfg.vocab_size, (batch, 1), generator=g),
              "start": torch.full((batch,), PREFILL, dtype=torch.long),
              "hidden": torch.randn(batch, 1, cfg.hc_mult, cfg.hidden_size, generator=g)}
    return {name: values[name] for name in step.input_names}


def assert_same_outputs(outputs: dict, reference: tuple, names: list[str]) -> None:
    assert list(outputs) == names
    for name, ref in zip(names, reference):
        assert not (ref.is_floating_point() and ref.isnan().any()), f"{name}: NaN never passes"
        assert torch.equal(outputs[name], ref), f"output {name} differs from the fx graph"


@pytest.mark.parametrize("batch", [1, 3])
def test_executor_equals_graph_on_tiny_model(tiny_step, batch):
    cfg, weights, step, plan = tiny_step
    inputs = tiny_inputs(cfg, weights, step, batch, seed=batch)
    reference = step.graph_module(*[t.clone() for t in inputs.values()])
    executor = Executor(Plan.from_json(plan.to_json()), graph_constants(step.graph_module, plan), "cpu",
                        bound_inputs=weight_inputs(plan, weights))
    run_inputs = {k: t.clone() for k, t in inputs.items() if not k.startswith("weights.")}
    assert_same_outputs(executor.run(run_inputs), reference, step.output_names)


def test_artifact_round_trip_runs_tiny_model(tiny_step, tmp_path):
    cfg, weights, step, plan = tiny_step
    fields = {"config": cfg.to_dict(), "numerics": describe_numerics(FP32), "targets": ["cpu"],
              "pass_log": [], "kernels": {}}
    tensors = {**weights, **graph_constants(step.graph_module, plan)}
    art = load_artifact(write_artifact(tmp_path / "tiny.dsv4c", fields, {step.variant.name: plan}, tensors))
    loaded = art.plans[step.variant.name]
    assert loaded == plan and art.manifest["config"] == cfg.to_dict()
    everything = art.weights.load_all()
    executor = Executor(loaded, everything, "cpu", bound_inputs=weight_inputs(loaded, everything))
    inputs = tiny_inputs(cfg, weights, step, 2, seed=7)
    reference = step.graph_module(*[t.clone() for t in inputs.values()])
    outputs = executor.run({k: t for k, t in inputs.items() if not k.startswith("weights.")})
    assert_same_outputs(outputs, reference, step.output_names)


def test_plan_json_round_trip(tiny_step):
    plan = tiny_step[3]
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    assert {op.op.split("::")[0] for op in plan.ops} <= {"aten", "operator"}


def test_every_dead_buffer_is_freed_once(tiny_step):
    plan = tiny_step[3]
    outputs = {buf for _, buf in plan.outputs}
    defined = [name for op in plan.ops for name in op.outputs if name is not None]
    freed = [name for op in plan.ops for name in op.free]
    assert len(freed) == len(set(freed))
    assert set(defined) - outputs <= set(freed)
    assert not set(freed) & outputs


class Toy(torch.nn.Module):
    """Constants, SymInt arithmetic, multi-output and list-output ops, an in-place op, -inf, passthrough."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.tensor([0.5, -1.0, float("inf"), 2.0]))

    def forward(self, x, idx):
        b = x.shape[0]
        y = x.reshape(b * 2, -1) + torch.tensor([1.0, 2.0, 3.0, 4.0])
        values, ids = torch.topk(y, 2, dim=-1)
        first, rest = torch.split(y, [1, 3], dim=-1)
        acc = torch.zeros(b * 2, 3, device=x.device)
        acc.add_(rest)
        t = self.table[idx].clamp(max=1.0).masked_fill(idx == 3, float("-inf"))
        return values.sum(-1).reshape(b, 2) + acc.sum(-1).reshape(b, 2) + t[:, None], ids, first, x


@pytest.fixture(scope="module")
def toy():
    batch = Dim("batch", min=1, max=64)
    program = export(Toy(), (torch.randn(2, 8), torch.tensor([0, 3])), dynamic_shapes=({0: batch}, {0: batch}),
                     strict=False)
    gm = flat_graph_module(program)
    return gm, plan_from_graph(gm, ["x", "idx"], ["out", "ids", "first", "x"])


@pytest.mark.parametrize("batch", [1, 3])
def test_executor_equals_graph_on_toy(toy, batch):
    gm, plan = toy
    plan = Plan.from_json(plan.to_json())
    names = {op.op for op in plan.ops}
    assert {"operator::mul", "operator::getitem", "aten::topk.default", "aten::add_.Tensor"} <= names
    x, idx = torch.randn(batch * 1, 8), torch.tensor([0, 1, 3])[:batch]
    outputs = Executor(plan, graph_constants(gm, plan), "cpu").run({"x": x, "idx": idx})
    assert_same_outputs(outputs, gm(x, idx), ["out", "ids", "first", "x"])


def python_helper(x):
    return x * 2


def test_builder_refuses_python_function():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3)
    y = graph.call_function(python_helper, (x,))
    graph.output((y,))
    with pytest.raises(PlanError, match=r"node python_helper.*'python_helper'.*cannot call Python"):
        plan_from_graph(torch.fx.GraphModule(torch.nn.Module(), graph), ["x"], ["y"])


def test_builder_refuses_call_method_and_missing_meta():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_method("relu", (x,)),))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(PlanError, match="input 'x'.*meta"):
        plan_from_graph(gm, ["x"], ["y"])
    x.meta["val"] = torch.empty(2)
    with pytest.raises(PlanError, match="node relu: call_method"):
        plan_from_graph(gm, ["x"], ["y"])


def test_value_encoding_round_trip():
    values = [math.inf, -math.inf, -0.0, 1e-30, 3, True, None, "mean", (1, [2, (3,)]), [Ref("a"), 4.5],
              torch.bfloat16, torch.float8_e4m3fn, torch.device("cpu"), torch.strided, torch.channels_last]
    for value in values:
        assert decode_value(encode_value(value)) == value
    assert math.isnan(decode_value(encode_value(math.nan)))
    with pytest.raises(PlanError, match="unknown dtype 'float99'"):
        decode_value({"dtype": "float99"})
    with pytest.raises(PlanError, match="cannot encode"):
        encode_value(slice(1, 2))


def two_op_plan(ops) -> dict:
    plan = Plan((PlanInput("x", ("B", 4), "float32"),), {}, tuple(ops), (("y", "y"),))
    return plan.to_dict()


def test_plan_validation_names_the_problem():
    neg = PlanOp("aten::neg.default", (Ref("x"),), {}, ("t",), ("x",))
    use_freed = PlanOp("aten::add.Tensor", (Ref("t"), Ref("x")), {}, ("y",))
    with pytest.raises(PlanError, match="op 1 .*'x' is freed before"):
        Plan.from_dict(two_op_plan([neg, use_freed]), "p.json")
    undefined = PlanOp("aten::neg.default", (Ref("z"),), {}, ("y",))
    with pytest.raises(PlanError, match="'z' is not defined before"):
        Plan.from_dict(two_op_plan([undefined]))
    raw = two_op_plan([PlanOp("aten::neg.default", (Ref("x"),), {}, ("y",))])
    Plan.from_dict(raw)
    with pytest.raises(PlanError, match="p.json: field 'format_version' is 2"):
        Plan.from_dict({**raw, "format_version": 2}, "p.json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{", "p.json")
    with pytest.raises(PlanError, match="namespace must be one of"):
        Plan.from_dict(two_op_plan([PlanOp("builtins::eval.default", (Ref("x"),), {}, ("y",))]))


def test_executor_refuses_unknown_op_at_load():
    for name in ("aten::no_such_op.default", "dsv4c::not_registered.default", "aten::neg.no_such_overload"):
        plan = Plan.from_dict(two_op_plan([PlanOp(name, (Ref("x"),), {}, ("y",))]))
        with pytest.raises(ExecutorError, match=f"op 0: op '{name}' is not registered"):
            Executor(plan, {}, "cpu")


def test_executor_checks_inputs():
    plan = Plan.from_dict(two_op_plan([PlanOp("aten::neg.default", (Ref("x"),), {}, ("y",))]))
    executor = Executor(plan, {}, "cpu")
    assert torch.equal(executor.run({"x": torch.ones(3, 4)})["y"], -torch.ones(3, 4))
    with pytest.raises(ExecutorError, match=r"missing \['x'\]"):
        executor.run({})
    with pytest.raises(ExecutorError, match="input 'x': dtype torch.float64"):
        executor.run({"x": torch.ones(3, 4, dtype=torch.float64)})
    with pytest.raises(ExecutorError, match="input 'x': shape"):
        executor.run({"x": torch.ones(3, 5)})


def test_device_arguments_follow_the_executor(toy):
    """The plan's baked capture device (`zeros(device=cpu)`) becomes the executor's: run on `meta`."""
    gm, plan = toy
    constants = graph_constants(gm, plan)
    executor = Executor(plan, constants, "meta")
    outputs = executor.run({"x": torch.empty(4, 8, device="meta"), "idx": torch.empty(4, dtype=torch.long,
                                                                                       device="meta")})
    assert outputs["out"].device.type == "meta" and outputs["out"].shape == (4, 2)
    assert outputs["ids"].shape == (8, 2) and outputs["first"].shape == (8, 1)
    with pytest.raises(ExecutorError, match="input 'x': on cpu, executor runs on meta"):
        executor.run({"x": torch.ones(4, 8), "idx": torch.zeros(4, dtype=torch.long, device="meta")})
    with pytest.raises(ExecutorError, match="input 'idx': batch size 2, but other inputs have 4"):
        executor.run({"x": torch.empty(4, 8, device="meta"), "idx": torch.empty(2, dtype=torch.long,
                                                                                 device="meta")})
