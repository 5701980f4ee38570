"""ONNX bodies of the packed-cache ops: `dsv4c::kv_pack`, `dsv4c::kv_unpack` (codegen/kv_cache.py) and
`dsv4c::sparse_decode_attention` (codegen/sparse_attention.py), traced from their references
(export/onnx_reference.py), with the two translation rules they need: `view.dtype` (export/onnx_bitcast.py: opset 24
has no bit cast) and `arange`. onnx's ReferenceEvaluator (numpy; onnxruntime is not a test dependency) runs them
against the plan executor, which runs the ops' PyTorch references.

Tolerances: the bit casts, kv_pack and kv_unpack are bit-exact (the same integer and power-of-two arithmetic); the
attention's output is q's dtype (bf16) after fp32 sums that numpy may order differently from torch: relative norm
error <= 2^-8, one bf16 rounding step (measured: 0.0).

A faithful tiny artifact (FP8 KV, FP4 indexer keys, bf16) exported by `dsv4c inspect ART --onnx FILE` carries these
ops with their bodies; each call's body, taken out of that file with its function, computes what the op computes
on rows packed as the artifact packs them. (The whole graph is not run: other fused ops of that graph are exported
without a body, and onnx.reference ignores function overloads, which the inliner resolves, so bodies run inlined.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install dsv4c[onnx])")
ml_dtypes = pytest.importorskip("ml_dtypes", reason="feeding bf16/fp8 to onnx.reference needs ml_dtypes")
from onnx import helper  # noqa: E402
from onnx.inliner import inline_local_functions  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from dsv4c.codegen import ops  # noqa: E402, F401  (registers the dsv4c ops)
from dsv4c.codegen.kv_cache import pack_reference  # noqa: E402
from dsv4c.compiler.cli import main  # noqa: E402
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint  # noqa: E402
from dsv4c.export.onnx_bitcast import FLOAT_FORMATS  # noqa: E402
from dsv4c.export.onnx_export import plan_to_onnx  # noqa: E402
from dsv4c.export.onnx_graph import ONNX_DTYPES, NotExpressible  # noqa: E402
from dsv4c.model.checkpoint import write_synthetic  # noqa: E402
from dsv4c.model.numerics import Numerics  # noqa: E402
from dsv4c.model.presets import tiny  # noqa: E402
from dsv4c.runtime.artifact import load_artifact  # noqa: E402
from dsv4c.runtime.executor import Executor  # noqa: E402
from dsv4c.runtime.plan import Plan, PlanInput, PlanOp, Ref  # noqa: E402

NUMPY_VIEWS = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn"}
BF16_TOLERANCE = 2.0 ** -8
KV_OPS = ("kv_pack", "kv_unpack", "sparse_decode_attention")


def to_numpy(t: torch.Tensor):
    """numpy feeds; bf16 and fp8 cross as ml_dtypes views of their bytes."""
    t = t.contiguous()
    return t.view(torch.uint8).numpy().view(getattr(ml_dtypes, NUMPY_VIEWS[t.dtype])) if t.dtype in NUMPY_VIEWS \
        else t.numpy()


def to_torch(value, dtype: torch.dtype) -> torch.Tensor:
    if dtype in NUMPY_VIEWS:
        return torch.from_numpy(value.view("uint8").copy()).view(dtype)
    return torch.from_numpy(value.copy())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all() and torch.isfinite(want).all(), "NaN never passes"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def onnx_and_executor(op: str, args: tuple, specs: dict[str, tuple], inputs: dict[str, torch.Tensor]):
    """(ONNX output, executor output) of a one-op plan; its model passes the full check with no opaque op."""
    plan = Plan(tuple(PlanInput(n, shape, dtype) for n, (shape, dtype) in specs.items()), {},
                (PlanOp(op, args, {}, ("y",)),), (("y", "y"),))
    model = plan_to_onnx(plan, {})
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props}["dsv4c.opaque_ops"] == ""
    want = Executor(plan, {}, "cpu").run(inputs)["y"]
    (got,) = ReferenceEvaluator(inline_local_functions(model)).run(None, {n: to_numpy(t) for n, t in inputs.items()})
    return to_torch(got, want.dtype), want


# ---- view.dtype ----------------------------------------------------------------------------------------
def bit_cast(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    spec = {"x": (("B", *x.shape[1:]), str(x.dtype).removeprefix("torch."))}
    return onnx_and_executor("aten::view.dtype", (Ref("x"), dtype), spec, {"x": x})


def every_pattern(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of a 1- or 2-byte dtype, as [2, n, 2] of it."""
    bits = 8 * dtype.itemsize
    patterns = torch.arange(2 ** bits, dtype=torch.int32)
    signed = torch.where(patterns >= 2 ** (bits - 1), patterns - 2 ** bits, patterns)
    return signed.to(torch.int8 if bits == 8 else torch.int16).view(dtype).view(2, -1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8])
def test_every_pattern_casts_to_bytes_and_back(dtype):
    """Bit for bit, except that a NaN becomes its format's quiet NaN."""
    x = every_pattern(dtype)
    got, want = bit_cast(x, torch.uint8)
    nan = x.isnan() if dtype.is_floating_point else torch.zeros_like(x, dtype=torch.bool)
    nan_bytes = nan.repeat_interleave(dtype.itemsize, -1)
    assert torch.equal(got[~nan_bytes], want[~nan_bytes])
    if nan.any():
        quiet = torch.tensor([FLOAT_FORMATS[dtype].nan], dtype=torch.int32).to(
            torch.int8 if dtype.itemsize == 1 else torch.int16).view(torch.uint8)
        assert torch.equal(got[nan_bytes].view(-1, dtype.itemsize), quiet.expand(int(nan.sum()), -1))
    back, want = bit_cast(want, dtype)
    assert torch.equal(back.view(torch.uint8)[~nan_bytes], want.view(torch.uint8)[~nan_bytes])
    assert torch.equal(back[nan].isnan() if nan.any() else back[nan], want[nan].isnan() if nan.any() else want[nan])


def test_float32_edge_values_cast_to_bytes_and_back():
    """Zeros of both signs, the smallest and largest subnormals and normals, infinities, and random values over
    76 decades."""
    tiny_, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    edges = torch.tensor([0.0, -0.0, 2 ** -149, -(2 ** -149), tiny_ - 2 ** -149, tiny_, -tiny_, big, -big,
                          float("inf"), float("-inf"), 1.0, -1.5, 3 * 2 ** -149])
    x = torch.cat((edges, torch.randn(50) * torch.logspace(-38, 38, 50))).view(2, -1, 4)
    got, want = bit_cast(x, torch.uint8)
    assert torch.equal(got, want)
    back, want = bit_cast(want, torch.float32)
    assert torch.equal(back.view(torch.int32), x.view(torch.int32))


def test_a_dtype_without_a_bit_cast_is_named():
    with pytest.raises(NotExpressible, match="float64"):
        bit_cast(torch.zeros(2, 4, dtype=torch.float64), torch.uint8)


def test_arange_follows_the_batch():
    plan = Plan((PlanInput("x", ("B", 3), "float32"),), {},
                (PlanOp("aten::sym_size.int", (Ref("x"), 0), {}, ("n",)),
                 PlanOp("aten::arange.default", (Ref("n"),), {}, ("y",)),
                 PlanOp("aten::arange.start_step", (1, 10, 3), {"dtype": torch.float32}, ("z",))),
                (("y", "y"), ("z", "z")))
    model = plan_to_onnx(plan, {})
    onnx.checker.check_model(model, full_check=True)
    y, z = ReferenceEvaluator(model).run(None, {"x": torch.zeros(5, 3).numpy()})
    assert y.tolist() == list(range(5)) and z.dtype.name == "float32" and z.tolist() == [1.0, 4.0, 7.0]


def test_a_bf16_number_becomes_a_bf16_scalar_constant():
    """Packed caches come with bf16 graphs, whose numbers (`where(keep, v, 0)`, `x + 1.5`) are 0-dim constants."""
    x = torch.randn(3, 4).to(torch.bfloat16)
    got, want = onnx_and_executor("aten::add.Tensor", (Ref("x"), 1.5), {"x": (("B", 4), "bfloat16")}, {"x": x})
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


# ---- the ops, one at a time ------------------------------------------------------------------------------
def rows(shape: tuple[int, ...], width: int, fmt: str, rounded: int, block: int, dtype: torch.dtype,
         gen: torch.Generator) -> torch.Tensor:
    """Packed rows of random values over six decades (so blocks take different scales)."""
    values = torch.randn((*shape, width), generator=gen) * torch.logspace(-3, 3, width)
    return pack_reference(values.to(dtype), fmt, rounded, block)


@pytest.mark.parametrize("fmt,width,rounded,block,dtype", [("e4m3", 96, 64, 64, torch.bfloat16),
                                                           ("e4m3", 96, 64, 32, torch.float32),
                                                           ("e2m1", 64, 64, 32, torch.bfloat16)])
def test_kv_pack_and_unpack_bodies_are_bit_exact(fmt, width, rounded, block, dtype):
    gen = torch.Generator().manual_seed(width + block)
    x = (torch.randn(3, 2, width, generator=gen) * torch.logspace(-3, 3, width)).to(dtype)
    x[0, 0] = 0  # the amax floor
    name = str(dtype).removeprefix("torch.")
    got, want = onnx_and_executor("dsv4c::kv_pack.default", (Ref("x"), fmt, rounded, block),
                                  {"x": (("B", 2, width), name)}, {"x": x})
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    packed = rows((3, 5), width, fmt, rounded, block, dtype, gen)
    got, want = onnx_and_executor("dsv4c::kv_unpack.default", (Ref("p"), fmt, width, rounded, block, dtype),
                                  {"p": (("B", 5, packed.shape[-1]), "uint8")}, {"p": packed})
    assert got.dtype == dtype and torch.equal(got, want)


H, D, C, E, T = 4, 96, 34, 17, 2


def attention_inputs(gen: torch.Generator, k: int) -> dict[str, torch.Tensor]:
    pack = lambda n: rows((3, n), D, "e4m3", 64, 64, torch.bfloat16, gen)  # noqa: E731
    return {"q": torch.randn(3, T, H, D, generator=gen).to(torch.bfloat16) * 0.05, "new": pack(T), "ring": pack(C),
            "cache": pack(E), "ids": torch.randint(-1, E, (3, T, k), generator=gen),
            "start": torch.tensor([0, 5, 60]), "sink": torch.randn(H, generator=gen)}


@pytest.mark.parametrize("ratio,k", [(4, 8), (16, 0), (0, 0)])  # C4 (selected ids, some -1), C16 (all), window
def test_sparse_decode_attention_body_computes_the_reference(ratio, k):
    inputs = attention_inputs(torch.Generator().manual_seed(ratio), k)
    specs = {"q": (("B", T, H, D), "bfloat16"), "new": (("B", T, 130), "uint8"), "ring": (("B", C, 130), "uint8"),
             "cache": (("B", E, 130), "uint8"), "ids": (("B", T, k), "int64"), "start": (("B",), "int64"),
             "sink": ((H,), "float32")}
    args = (*(Ref(n) for n in specs), 0.1, 32, ratio, 64, 64)
    got, want = onnx_and_executor("dsv4c::sparse_decode_attention.default", args, specs, inputs)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= BF16_TOLERANCE


# ---- a faithful artifact's export ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny cut to its C4 layer, compiled with the default numerics (the caches stored packed), main_t1 exported
    through the CLI."""
    root = tmp_path_factory.mktemp("onnx_kv")
    write_synthetic(tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0), root / "ckpt",
                    seed=3)
    options = CompileOptions(numerics=Numerics(), max_seq_len=64, prefill_chunk=2, mtp=False)
    artifact = load_artifact(compile_checkpoint(root / "ckpt", root / "art", options))
    path = root / "main_t1.onnx"
    with warnings.catch_warnings():  # ops of other passes may have no body yet: checked below, never these ones
        warnings.simplefilter("ignore", UserWarning)
        assert main(["inspect", str(artifact.path), "--onnx", str(path)]) == 0
    return onnx.load(path)


def test_the_export_carries_the_packed_cache_ops_with_bodies(exported):
    onnx.checker.check_model(exported, full_check=True)
    opaque = {p.key: p.value for p in exported.metadata_props}["dsv4c.opaque_ops"]
    calls = [n for n in exported.graph.node if n.domain == "dsv4c" and n.op_type in KV_OPS]
    assert {n.op_type for n in calls} >= {"kv_pack", "sparse_decode_attention"}
    assert not any(op in opaque for op in KV_OPS), opaque
    bodies = {(f.name, f.overload) for f in exported.functions}
    assert all((n.op_type, n.overload) in bodies for n in calls)
    states = {i.name: i.type.tensor_type.elem_type for i in exported.graph.input if i.name.startswith("state.")}
    assert states["state.layers.0.compressed_kv"] == onnx.TensorProto.UINT8


def one_call(model, node) -> onnx.ModelProto:
    """The node alone, with its inputs and output typed as in `model`, and the model's functions."""
    types = {v.name: v for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    graph = helper.make_graph([node], "one_call", [types[i] for i in node.input if i], [types[node.output[0]]])
    return helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions,
                             ir_version=model.ir_version)


def call_inputs(node, model, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """Batch-2 inputs of an exported call, packed as its attributes say, and its attributes by name."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    types = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.value_info]}
    dtype_of = {code: dtype for dtype, code in ONNX_DTYPES.items()}
    inputs = {}
    for name in node.input:
        tensor = types[name]
        shape = [2 if d.dim_param else d.dim_value for d in tensor.shape.dim]
        dtype = dtype_of[tensor.elem_type]
        if dtype == torch.uint8:  # packed rows of the call's layout
            fmt = attrs.get("format", "e4m3")
            width = attrs["width"] if "width" in attrs else exported_width(node, model)
            value = rows(tuple(shape[:-1]), width, fmt, attrs["rounded"], attrs["block"], torch.bfloat16, gen)
            assert list(value.shape) == shape
        elif dtype == torch.int64 and len(shape) == 1:  # start
            value = torch.tensor([3, 21])
        elif dtype == torch.int64:
            value = torch.randint(-1, 8, shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen).to(dtype)
        inputs[name] = value
    return inputs, attrs


def exported_width(node, model) -> int:
    """The row width of an attention call: its query's last dim."""
    types = {v.name: v.type.tensor_type for v in [*model.graph.input, *model.graph.value_info]}
    return types[node.input[0]].shape.dim[-1].dim_value


def test_each_exported_call_computes_its_op(exported):
    gen = torch.Generator().manual_seed(0)
    calls = [n for n in exported.graph.node if n.domain == "dsv4c" and n.op_type in KV_OPS]
    for node in calls:
        inputs, attrs = call_inputs(node, exported, gen)
        (got,) = ReferenceEvaluator(inline_local_functions(one_call(exported, node))).run(
            None, {n: to_numpy(t) for n, t in inputs.items()})
        op = getattr(torch.ops.dsv4c, node.op_type)
        if node.op_type == "kv_pack":
            want = op(*inputs.values(), attrs["format"], attrs["rounded"], attrs["block"])
            assert torch.equal(to_torch(got, want.dtype), want), node.output[0]
        elif node.op_type == "kv_unpack":
            dtype = {code: d for d, code in ONNX_DTYPES.items()}[attrs["dtype"]]
            want = op(*inputs.values(), attrs["format"], attrs["width"], attrs["rounded"], attrs["block"], dtype)
            assert torch.equal(to_torch(got, want.dtype), want), node.output[0]
        else:
            want = op(*inputs.values(), *(attrs[k] for k in ("scale", "window", "ratio", "rounded", "block")))
            assert rel_err(to_torch(got, want.dtype), want) <= BF16_TOLERANCE, node.output[0]


def test_the_compressor_call_returns_its_three_writes(exported):
    """`compress_step_` writes its cache and both rings in place. Its ONNX node returns the three new values
    (its body is the op's writes as a function, codegen/compressor.py `written_values`), and the step's new rings
    are those values, not its old inputs."""
    calls = [n for n in exported.graph.node if n.domain == "dsv4c" and n.op_type == "compress_step_"]
    assert len(calls) == 2  # the C4 layer's main and indexer compressors
    for node in calls:
        assert len(node.output) == 3
        assert "compress_step_" not in {p.key: p.value for p in exported.metadata_props}["dsv4c.opaque_ops"]
        consumers = {name for n in exported.graph.node for name in n.input} | {o.name for o in exported.graph.output}
        assert all(out in consumers for out in node.output[1:])  # the new rings reach the step's outputs
        types = {v.name: v for v in [*exported.graph.input, *exported.graph.value_info, *exported.graph.output]}
        outs = [types[node.output[0]]] + [helper.make_tensor_value_info(out, types[src].type.tensor_type.elem_type,
                                                                        [d.dim_param or d.dim_value for d in
                                                                         types[src].type.tensor_type.shape.dim])
                                          for out, src in zip(node.output[1:], node.input[1:3])]
        graph = helper.make_graph([node], "one_call", [types[i] for i in node.input if i], outs)
        model = helper.make_model(graph, opset_imports=exported.opset_import, functions=exported.functions,
                                  ir_version=exported.ir_version)
        gen = torch.Generator().manual_seed(1)
        dtype_of = {code: dtype for dtype, code in ONNX_DTYPES.items()}
        inputs = {}
        for name in node.input:
            tensor = types[name].type.tensor_type
            shape, dtype = [2 if d.dim_param else d.dim_value for d in tensor.shape.dim], dtype_of[tensor.elem_type]
            if dtype == torch.uint8:  # packed cache rows: the op only writes rows, any bytes do
                inputs[name] = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
            elif dtype == torch.int64:  # start
                inputs[name] = torch.tensor([3, 21])
            else:
                inputs[name] = torch.randn(shape, generator=gen).to(dtype)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        attrs["dtype"] = dtype_of[attrs["dtype"]]
        got = ReferenceEvaluator(inline_local_functions(model)).run(None, {n: to_numpy(t) for n, t in inputs.items()})
        from dsv4c.codegen.compressor import written_values
        want = written_values(*inputs.values(), **attrs)
        for g, w, name in zip(got, want, node.output):
            assert torch.equal(to_torch(g, w.dtype), w), name
        assert not torch.equal(want[1], inputs[node.input[1]])  # the ring was written: the check can see a stale one


def test_every_dsv4c_op_of_the_packed_step_has_a_body(exported):
    """The faithful C4 step holds the indexer and the compressors too: no dsv4c op of it is exported opaque."""
    assert {p.key: p.value for p in exported.metadata_props}["dsv4c.opaque_ops"] == ""
    assert {"lightning_indexer", "compress_step_"} <= {n.op_type for n in exported.graph.node if n.domain == "dsv4c"}
