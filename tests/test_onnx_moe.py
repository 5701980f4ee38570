"""The ONNX body of `dsv4c::moe_fp4` (export/onnx_reference.py traces codegen/moe_fp4.py `every_expert`).

- One op: its exported model passes onnx.checker's full check with no opaque op, and onnx's ReferenceEvaluator
  (numpy) computes what the plan executor (the op's reference) does, for W4A8 and W4A4 (W4A16: the artifact
  below), score-routed (the bias-shifted top-k) and hash-routed (the table row of each token id), with both
  clamps binding and an expert no token selects. Tolerance: relative norm error 1e-5; every product is of exact
  decoded values, so the two differ only by fp32 summation order and the few values such a difference moves
  across an FP8 / FP4 rounding boundary (none seen here); the k-th and (k+1)-th biased scores of every token
  are at least 1e-3 apart (checked), so both select the same experts.
- A whole artifact compiled for h100 on CPU (its plans hold moe_fp4): `dsv4c inspect ART --onnx FILE` writes a
  model that passes the full check, with moe_fp4 in the dsv4c domain and its body, and that ReferenceEvaluator
  runs to the plan's outputs (same tolerance; onnxruntime is not needed).
"""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install dsv4c[onnx])")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="feeding fp8 to onnx.reference needs ml_dtypes")
import onnx.inliner  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from dsv4c.codegen import ops  # noqa: E402, F401  (registers the dsv4c ops)
from dsv4c.compiler.cli import main  # noqa: E402
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint  # noqa: E402
from dsv4c.export.onnx_export import plan_to_onnx  # noqa: E402
from dsv4c.model import layers, quant  # noqa: E402
from dsv4c.model.checkpoint import write_synthetic  # noqa: E402
from dsv4c.model.numerics import Numerics  # noqa: E402
from dsv4c.model.presets import tiny  # noqa: E402
from dsv4c.runtime.artifact import load_artifact  # noqa: E402
from dsv4c.runtime.executor import Executor  # noqa: E402
from dsv4c.runtime.plan import Plan, PlanInput, PlanOp, Ref  # noqa: E402

NUMPY_VIEWS = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e8m0fnu: "float8_e8m0fnu",
               torch.bfloat16: "bfloat16"}
TOLERANCE = 1e-5
D, I, E, K, V = 128, 128, 4, 2, 16
ROUTED_LIMIT, SHARED_LIMIT = 1.0, 0.75
LISTS = ("w1", "s1", "w3", "s3", "w2", "s2")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all() and torch.isfinite(want).all(), "NaN never passes"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def feeds(inputs: dict[str, torch.Tensor]) -> dict:
    """numpy feeds; narrow floats cross as ml_dtypes views of their bytes."""
    return {n: t.contiguous().view(torch.uint8).numpy().view(getattr(ml_dtypes, NUMPY_VIEWS[t.dtype]))
            if t.dtype in NUMPY_VIEWS else t.numpy() for n, t in inputs.items()}


def operands(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Routed experts (MXFP4, `LISTS[i]_<e>`) and the shared expert (FP8, `shared_<j>`) by plan input name."""
    named = {}
    for e in range(E):
        for w, s, (rows, cols) in (("w1", "s1", (I, D)), ("w3", "s3", (I, D)), ("w2", "s2", (D, I))):
            named[f"{w}_{e}"], named[f"{s}_{e}"] = quant.quantize_fp4_weight(torch.randn(rows, cols, generator=gen))
    for j, (rows, cols) in zip((0, 2, 4), ((I, D), (I, D), (D, I))):
        named[f"shared_{j}"], named[f"shared_{j + 1}"] = quant.quantize_fp8_weight(
            torch.randn(rows, cols, generator=gen) * cols ** -0.5)
    return named


def routing_inputs(gen: torch.Generator, hash_layer: bool, batch: int) -> dict[str, torch.Tensor]:
    """The router (bf16) and, by plan input name, the bias spaced 0.5 apart with expert E - 1 far below every
    other (score-routed), or a table without expert E - 1 and the token ids (hash-routed)."""
    named = {"router": (torch.randn(E, D, generator=gen) * D ** -0.5).to(torch.bfloat16)}
    if hash_layer:
        named["table"] = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(V)]).to(torch.int32)
        named["tokens"] = torch.randint(0, V, (batch, 2), generator=gen)
    else:
        named["bias"] = torch.randperm(E, generator=gen).float() * 0.5
        named["bias"][E - 1] = -100.0
    return named


@pytest.mark.parametrize("hash_layer", [False, True], ids=["score", "hash"])
@pytest.mark.parametrize("activations,shared_act_quant", [("w4a8", True), ("w4a4", True)])
def test_one_op_body_computes_the_reference(activations, shared_act_quant, hash_layer):
    gen = torch.Generator().manual_seed(len(activations) + shared_act_quant + 2 * hash_layer)
    batch = 3
    named = {**routing_inputs(gen, hash_layer, batch), **operands(gen)}
    x = torch.randn(batch, 2, D, generator=gen)
    specs = [PlanInput("x", ("B", 2, D), "float32")]
    specs += [PlanInput(n, ("B", 2) if n == "tokens" else tuple(t.shape), str(t.dtype).removeprefix("torch."))
              for n, t in named.items()]
    routing = [Ref(n) if n in named else None for n in ("router", "bias", "table", "tokens")]
    args = (Ref("x"), *routing, *[[Ref(f"{n}_{e}") for e in range(E)] for n in LISTS],
            [Ref(f"shared_{j}") for j in range(6)], K, "sqrtsoftplus", True, 1.5, ROUTED_LIMIT, SHARED_LIMIT,
            activations, shared_act_quant)
    plan = Plan(tuple(specs), {}, (PlanOp("dsv4c::moe_fp4.default", args, {}, ("y",)),), (("y", "y"),))
    model = plan_to_onnx(plan, {})
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props}["dsv4c.opaque_ops"] == ""
    assert "moe_fp4" in {f.name for f in model.functions}
    if not hash_layer:
        biased = layers.router_scores(x.view(-1, D), named["router"], "sqrtsoftplus") + named["bias"]
        top = biased.topk(K + 1, dim=-1).values
        assert (top[:, K - 1] - top[:, K] > 1e-3).all(), "clear selection margins"
    inputs = {"x": x, **named}
    want = Executor(plan, {}, "cpu").run(inputs)["y"]
    (got,) = ReferenceEvaluator(model).run(None, feeds(inputs))
    assert rel_err(torch.from_numpy(got.copy()), want) <= TOLERANCE
    # both clamps bind on these values (the gates of expert 0 and of the shared expert)
    for gate, limit in ((quant.dequant_fp4_weight(named["w1_0"], named["s1_0"]), ROUTED_LIMIT),
                        (quant.dequant_fp8_weight(named["shared_0"], named["shared_1"]), SHARED_LIMIT)):
        values = x.view(-1, D) @ gate.T
        assert values.max() > limit and (values.abs() < limit).any()


@pytest.fixture(scope="module")
def gpu_artifact(tmp_path_factory):
    """tiny cut to one layer, compiled for h100 on this CPU machine in plain fp32 (every op of it has an ONNX
    body)."""
    root = tmp_path_factory.mktemp("onnx_moe")
    write_synthetic(tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0)), root / "ckpt", seed=2)
    options = CompileOptions(targets=("h100",), numerics=Numerics.plain(torch.float32), max_seq_len=64,
                             prefill_chunk=2, mtp=False)
    return load_artifact(compile_checkpoint(root / "ckpt", root / "art", options))


def test_inspect_exports_a_gpu_artifact_that_computes_its_plan(gpu_artifact, tmp_path, capsys):
    plan = gpu_artifact.plans["main_t1"]
    assert any(op.op == "dsv4c::moe_fp4.default" for op in plan.ops)
    path = tmp_path / "main_t1.onnx"
    assert main(["inspect", str(gpu_artifact.path), "--onnx", str(path)]) == 0
    assert "main_t1 exported" in capsys.readouterr().out
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert "moe_fp4" in {n.op_type for n in model.graph.node if n.domain == "dsv4c"}
    assert "moe_fp4" in {f.name for f in model.functions}
    assert {p.key: p.value for p in model.metadata_props}["dsv4c.opaque_ops"] == ""
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for spec in plan.inputs:
        shape = [2 if d == "B" else d for d in spec.shape]
        if spec.name.startswith("weights."):
            inputs[spec.name] = gpu_artifact.weights[spec.name.removeprefix("weights.")]
        elif spec.name in ("tokens", "start"):
            inputs[spec.name] = torch.randint(0, 40, shape, generator=gen)
        else:
            inputs[spec.name] = torch.randn(shape, generator=gen).to(spec.torch_dtype())
    want = Executor(plan, {key: gpu_artifact.weights[key] for key in plan.constants.values()}, "cpu").run(inputs)
    # a dsv4c op traced at two shapes has two bodies of one name, which ReferenceEvaluator does not tell apart
    # (it ignores function overloads): inline them first, as a runtime without dsv4c kernels does
    got = ReferenceEvaluator(onnx.inliner.inline_local_functions(model)).run(None, feeds(inputs))
    for (name, _), value in zip(plan.outputs, got):
        assert rel_err(torch.from_numpy(value.copy()), want[name]) <= TOLERANCE, name
