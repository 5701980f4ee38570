"""`dsv4c inspect`: describe() on a compiled artifact, and its graphs exported to ONNX.

The ONNX checks are structural (checker full check with shape inference, dsv4c-domain nodes, a dynamic
batch) and numeric: onnx's own ReferenceEvaluator (numpy, shipped with onnx; onnxruntime is not needed)
runs the exported graph and must agree with the plan executor. A wrong translation rule shows up as a
shape-inference error or as a numeric difference; the rule tests below pin the edge values.
"""

from __future__ import annotations

import math

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install dsv4c[onnx])")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="feeding bf16/fp8 to onnx.reference needs ml_dtypes")
import onnx.inliner  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from dsv4c.model.checkpoint import write_synthetic  # noqa: E402
from dsv4c.export.inspect_artifact import describe, export_onnx  # noqa: E402
from dsv4c.model.numerics import Numerics  # noqa: E402
from dsv4c.export.onnx_export import plan_to_onnx  # noqa: E402
from dsv4c.export.onnx_graph import NotExpressible  # noqa: E402
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint  # noqa: E402
from dsv4c.model.presets import tiny  # noqa: E402
from dsv4c.runtime.artifact import load_artifact  # noqa: E402
from dsv4c.runtime.executor import Executor  # noqa: E402
from dsv4c.runtime.plan import Plan, PlanInput, PlanOp, Ref  # noqa: E402

NUMPY_VIEWS = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn",
               torch.float8_e8m0fnu: "float8_e8m0fnu"}
FP32_TOLERANCE = 1e-5  # relative norm error: the same fp32 ops in numpy's order instead of torch's


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """One layer (C4 with the indexer: FP8 KV and FP4 indexer roundings) keeps the compile short."""
    root = tmp_path_factory.mktemp("inspect")
    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0)
    write_synthetic(cfg, root / "ckpt", seed=0)
    options = CompileOptions(numerics=Numerics.plain(torch.float32), max_seq_len=64, prefill_chunk=2, mtp=False)
    return load_artifact(compile_checkpoint(root / "ckpt", root / "art", options))


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "main_t2.onnx"
    export_onnx(artifact, "main_t2", path)
    return path


def test_describe_names_every_variant_and_its_passes(artifact):
    lines = describe(artifact)
    text = "\n".join(lines)
    assert all(isinstance(line, str) and "\n" not in line for line in lines)
    for entry in artifact.manifest["pass_log"]:
        section = text.split(f"variant {entry['variant']}:")[1].split("\nvariant ")[0]
        for record in entry["passes"]:
            assert f"{record['name']} " in section
            assert f"{record['nodes_before']:>6} -> {record['nodes_after']}" in section
        assert "memory plan: peak" in section and "dsv4c::routed_moe.default" in section
    assert set(artifact.plans) == {"main_t1", "main_t2"}
    assert "targets: cpu" in text and "kernels:" in text


def test_onnx_passes_the_full_check_with_dsv4c_nodes_and_a_dynamic_batch(artifact, exported):
    model = onnx.load(exported)
    onnx.checker.check_model(model, full_check=True)
    custom = {n.op_type for n in model.graph.node if n.domain == "dsv4c"}
    assert custom >= {"fp8_linear", "routed_moe"} and "dequant_fp8_weight" not in custom  # nothing decoded per step
    assert {(o.domain, o.version) for o in model.opset_import} >= {("dsv4c", 1)}
    # every fused op carries its reference body; routed_moe's decodes its experts with dequant_fp4_weight
    assert {f.name for f in model.functions} - custom <= {"dequant_fp4_weight", "dequant_fp8_weight"}
    assert custom <= {f.name for f in model.functions}
    assert {p.key: p.value for p in model.metadata_props}["dsv4c.opaque_ops"] == ""
    plan = artifact.plans["main_t2"]
    inputs = {i.name: i for i in model.graph.input}
    assert list(inputs) == plan.input_names  # weights are inputs, in plan order; nothing is embedded
    for spec in plan.inputs:
        dims = inputs[spec.name].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == list(spec.shape)
    assert inputs["tokens"].type.tensor_type.shape.dim[0].dim_param == "B"
    assert sum(t.ByteSize() for t in model.graph.initializer) < 100_000
    assert "new_state.layers.0.window_kv" in [o.name for o in model.graph.output]


def test_full_check_compares_onnx_shapes_with_torch_shapes(exported):
    """The model carries torch's shape for every buffer, so a rule emitting a wrong shape fails the check."""
    model = onnx.load(exported)
    info = next(v for v in model.graph.value_info if v.name.startswith("einsum"))  # (the linears are dsv4c ops)
    info.type.tensor_type.shape.dim[-1].dim_value += 1
    with pytest.raises(onnx.shape_inference.InferenceError, match="differ in dimension"):
        onnx.checker.check_model(model, full_check=True)


def test_onnx_graph_computes_what_the_plan_computes(artifact, exported):
    plan = artifact.plans["main_t2"]
    torch.manual_seed(0)
    inputs = {}
    for spec in plan.inputs:
        if spec.name.startswith("weights."):
            inputs[spec.name] = artifact.weights[spec.name.removeprefix("weights.")]
        elif spec.name in ("tokens", "start"):
            inputs[spec.name] = torch.randint(0, 40, [2 if d == "B" else d for d in spec.shape])
        else:
            inputs[spec.name] = torch.randn([2 if d == "B" else d for d in spec.shape]).to(spec.torch_dtype())
    constants = {key: artifact.weights[key] for key in plan.constants.values()}
    expected = Executor(plan, constants, "cpu").run(inputs)
    got = run_onnx(onnx.load(exported), inputs)
    for (name, _), value in zip(plan.outputs, got):
        assert value.shape == expected[name].shape, name
        assert relative_error(value, expected[name]) < FP32_TOLERANCE, name


def test_unknown_variant_is_named(artifact, tmp_path):
    with pytest.raises(KeyError, match="main_t7.*main_t1"):
        export_onnx(artifact, "main_t7", tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


# ---- translation rules on edge values (hand-written plans, no compile) ----------------------------
def one_op_plan(op: str, args: tuple, inputs: dict[str, tuple], outputs: tuple[str, ...] = ("y",),
                kwargs: dict | None = None) -> Plan:
    specs = tuple(PlanInput(name, shape, dtype) for name, (shape, dtype) in inputs.items())
    return Plan(specs, {}, (PlanOp(op, args, kwargs or {}, outputs),), tuple((o, o) for o in outputs))


def check_against_executor(plan: Plan, inputs: dict[str, torch.Tensor]) -> None:
    """Bit-exact agreement (NaN where torch has NaN), outputs in plan order."""
    model = plan_to_onnx(plan, {})
    onnx.checker.check_model(model, full_check=True)
    expected = Executor(plan, {}, "cpu").run(inputs)
    for (name, _), value in zip(plan.outputs, run_onnx(model, inputs)):
        want = expected[name]
        assert value.dtype == want.dtype and value.shape == want.shape, name
        assert torch.equal(value.isnan(), want.isnan()), name
        assert torch.equal(value[~value.isnan()], want[~want.isnan()]), (name, value, want)


def test_frexp_is_exact_on_edge_values():
    values = [0.0, -0.0, 1.0, -1.0, 0.5, 8.0, 3.0, -3.0, 1 - 2**-24, 2**-126, 1e-40, 2**-149, 3.4e38,
              -3.4e38, math.inf, -math.inf, math.nan, 0.1, -7.25e-20]
    x = torch.tensor(values, dtype=torch.float32)
    plan = one_op_plan("aten::frexp.Tensor", (Ref("x"),), {"x": (("B",), "float32")}, ("m", "e"))
    check_against_executor(plan, {"x": x})


@pytest.mark.parametrize("op", ["aten::floor_divide.default", "aten::remainder.Tensor"])
def test_integer_division_rounds_like_python(op):
    a = torch.tensor([7, -7, 7, -7, 0, 9, -9], dtype=torch.int64)
    b = torch.tensor([2, 2, -2, -2, 3, 4, 4], dtype=torch.int64)
    plan = one_op_plan(op, (Ref("a"), Ref("b")), {"a": (("B",), "int64"), "b": (("B",), "int64")})
    check_against_executor(plan, {"a": a, "b": b})


@pytest.mark.filterwarnings("ignore:overflow encountered in reciprocal")
def test_signbit_sees_negative_zero():
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, 1e-45, -1e-45])
    check_against_executor(one_op_plan("aten::signbit.default", (Ref("x"),), {"x": (("B",), "float32")}), {"x": x})


def test_unfold_and_gather_with_a_smaller_index():
    x = torch.randn(3, 9, 4)
    plan = one_op_plan("aten::unfold.default", (Ref("x"), 1, 4, 2), {"x": (("B", 9, 4), "float32")})
    check_against_executor(plan, {"x": x})
    index = torch.randint(0, 9, (3, 5, 2))
    plan = one_op_plan("aten::gather.default", (Ref("x"), 1, Ref("i")),
                       {"x": (("B", 9, 4), "float32"), "i": (("B", 5, 2), "int64")})
    check_against_executor(plan, {"x": x, "i": index})


@pytest.mark.parametrize("op,shape,scale_shape", [("dsv4c::dequant_fp8_weight.default", (200, 130), (2, 2)),
                                                  ("dsv4c::dequant_fp4_weight.default", (6, 32), (6, 2))])
def test_dequant_functions_match_the_reference(op, shape, scale_shape):
    """The ONNX function bodies of the fused ops against their PyTorch reference, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if "fp8" in op:
        raw[(raw & 0x7F) == 0x7F] = 0  # e4m3's NaN codes
        weight, dtype = raw.view(torch.float8_e4m3fn), "float8_e4m3fn"
    else:
        weight, dtype = raw.view(torch.int8), "int8"
    scale = torch.randint(100, 140, scale_shape, dtype=torch.uint8, generator=generator).view(torch.float8_e8m0fnu)
    plan = one_op_plan(op, (Ref("w"), Ref("s"), torch.float32),
                       {"w": (shape, dtype), "s": (scale_shape, "float8_e8m0fnu")})
    check_against_executor(plan, {"w": weight, "s": scale})


def test_an_op_without_a_rule_is_named():
    plan = one_op_plan("aten::cumsum.default", (Ref("x"), 0), {"x": ((4,), "float32")})
    with pytest.raises(NotExpressible, match=r"op 0 \(aten::cumsum.default.*no ONNX translation rule"):
        plan_to_onnx(plan, {})


def test_an_in_place_write_to_a_value_read_later_is_refused():
    spec = (PlanInput("x", ("B",), "float32"),)
    ops = (PlanOp("aten::mul.Tensor", (Ref("x"), 2.0), {}, ("t",)),
           PlanOp("aten::add_.Tensor", (Ref("t"), 1.0), {}, ("u",)),
           PlanOp("aten::add.Tensor", (Ref("t"), Ref("u")), {}, ("y",)))
    with pytest.raises(NotExpressible, match="in place"):
        plan_to_onnx(Plan(spec, {}, ops, (("y", "y"),)), {})


# ---- helpers ---------------------------------------------------------------------------------------
def run_onnx(model, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Run `model` with onnx.reference; narrow floats cross as ml_dtypes views of their bytes."""
    feeds = {}
    for name, tensor in inputs.items():
        if tensor.dtype in NUMPY_VIEWS:
            numpy_dtype = getattr(ml_dtypes, NUMPY_VIEWS[tensor.dtype])
            feeds[name] = tensor.contiguous().view(torch.uint8).numpy().view(numpy_dtype)
        else:
            feeds[name] = tensor.numpy()
    # onnx.reference keys local functions by (domain, name) and so ignores overloads (an op traced for two call
    # signatures): inline them first, as a runtime without dsv4c kernels does
    inlined = onnx.inliner.inline_local_functions(model)
    return [torch.from_numpy(out.copy()) for out in ReferenceEvaluator(inlined).run(None, feeds)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any() and not want.isnan().any()
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
