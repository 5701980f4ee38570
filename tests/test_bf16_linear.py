"""`dsv4c::bf16_linear` (codegen/bf16_linear.py), its kernel (codegen/kernels/batch_invariant_matmul.py) and its pass
(passes/bf16_linear.py).

- The kernel under TRITON_INTERPRET=1 (a spawned child: tests/child_pool.py), through the op's CUDA implementation
  on CPU tensors: x bf16 and fp32, M = 1, 3, 64 (the 3 rows with leading dims), N = 1, 127, 300, K = 200 (not a
  multiple of the 64-wide K step), fp32 and bf16 outputs, against an fp64 reference; the rows of the 1- and 3-row
  calls equal the same rows of the 64-row call bit for bit. The interpreter multiplies as "ieee" (the weight
  widened in registers: it computes bf16 products wrongly); the GPU's "native" and "bf16x3" products are built for
  sm_90a here (PTX: bf16 wgmma, three a K step for bf16x3, no fp32 FMA) and checked on an H100 by
  bench/bf16_linear_bench.py. The launch's tiles and K split do not depend on M.
- The pass on small graphs: exact match counts, outputs bit-equal before and after at batches 1 and 3 on fresh
  inputs (the op's CPU reference is the graph's own math), near misses left alone.
- The captured tiny step (cut to two layers, faithful numerics) through the whole pipeline for cpu and h100 in debug
  mode (each pass checked against the graph before it on fresh inputs: this one bit-equal, the others at the
  compile's 1e-5): the LM head and the compressor, indexer and (on cpu) router products fused, no upcast of a bf16
  weight left in the plan.
- The op's ONNX body (hand-written, generic in every size: export/onnx_functions.py) against the plan executor.

Tolerances against fp64: fp32 outputs relative norm error 1e-6 (fp32 sums of 200 exact products); bf16 outputs
2^-8 (one rounding to bf16). NaN never passes.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import re

import pytest
import torch
import torch.nn.functional as F

from child_pool import child_pool, run_in
from dsv4c.codegen import bf16_linear as op
from dsv4c.codegen.kernels.batch_invariant_launch import bf16_weight_launch
from dsv4c.codegen.targets import target
from dsv4c.compiler.capture import StepVariant, capture
from dsv4c.compiler.lowering import plan_from_graph
from dsv4c.compiler.variant_compile import random_inputs
from dsv4c.model import layers
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import cache_roundings
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes.bf16_linear import bf16_linear
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.manager import PassContext, run_pipeline
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.pipeline import pipeline_for
from pass_graphs import check_pass, export_flat, targets

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -8}
ROWS, COLUMNS, K = (1, 3, 64), (1, 127, 300), 200
FUSED = "dsv4c.bf16_linear.default"
N, KP = 40, 96  # the small graphs' weight


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    return got.dtype == dtype and not got.isnan().any() and _rel(got, want) <= TOLERANCE[dtype]


# ---- the op ----------------------------------------------------------------------------------------------------
def test_op_is_the_graphs_math_and_names_a_bad_operand():
    x, weight = torch.randn(2, 3, KP).bfloat16(), torch.randn(N, KP).bfloat16()
    got = op.bf16_linear(x, weight, torch.bfloat16)
    assert torch.equal(got, (x.float() @ weight.float().T).to(torch.bfloat16)) and got.shape == (2, 3, N)
    torch.library.opcheck(op.bf16_linear, (x.float(), weight, torch.float32))  # the fake agrees with the reference
    bad = {"x must be": (x.half(), weight, torch.float32), "weight must be bfloat16": (x, weight.half(), torch.float32),
           "must match weight": (x[..., :-1], weight, torch.float32),
           "out_dtype must be": (x, weight, torch.float16)}
    for message, args in bad.items():
        with pytest.raises(ValueError, match=f"bf16_linear: .*{message}"):
            op.bf16_linear(*args)


# ---- the kernel ----------------------------------------------------------------------------------------------
def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _kernel_calls(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """{M: the CUDA implementation's output for the first M rows of x} (the 3 rows as [3, 1, K])."""
    from dsv4c.codegen import bf16_linear as impl  # in the interpreting child

    return {m: impl.cuda_impl(x[:m].view(m, 1, -1) if m == 3 else x[:m], weight, out_dtype) for m in ROWS}


@pytest.fixture(scope="module")
def interpreter(interpreter_pool):
    return run_in(interpreter_pool)


@needs_triton
@pytest.mark.parametrize("n", COLUMNS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_fp64_and_rows_do_not_depend_on_m(interpreter, x_dtype, n):
    x = (torch.randn(max(ROWS), K) * torch.logspace(-2, 2, K)).to(x_dtype)  # fresh each run; channels of all sizes
    weight = (torch.randn(n, K) * 0.05).to(torch.bfloat16)
    for out_dtype in (torch.float32, torch.bfloat16):
        calls = interpreter(_kernel_calls, x, weight, out_dtype)  # the kernel first: no earlier result to find
        want = x.double() @ weight.double().T
        assert calls[3].shape == (3, 1, n) and calls[1].shape == (1, n)
        for m, got in calls.items():
            assert _close(got.reshape(m, n), want[:m], out_dtype), (m, out_dtype, _rel(got.reshape(m, n), want[:m]))
            assert torch.equal(got.reshape(m, n), calls[64][:m]), f"rows of the {m}-row call differ from the 64-row's"


@pytest.mark.parametrize("n, k", [(129280, 4096), (1024, 4096), (64, 4096), (300, 200)])
def test_launch_depends_on_n_and_k_only(n, k):
    for t in (target("h100"), target("b200"), target("cpu")):
        for x_dtype in (torch.bfloat16, torch.float32):
            launches = {dataclasses.replace(bf16_weight_launch(t, m, n, k, x_dtype), fold_splits=False)
                        for m in (1, 2, 3, 8, 16, 17, 64, 65, 512)}
            assert len(launches) == 1, launches  # fold_splits adds the same slices in the same order
            (launch,) = launches
            launch.check(k)
            gpu = t.name != "cpu"
            assert launch.product == ("ieee" if not gpu else "native" if x_dtype == torch.bfloat16 else "bf16x3")


def _matmul_ptx(product: str, a: str) -> str:
    """The sm_90a PTX of the matmul kernel for `a` rows times a bf16 matrix, integer sizes and strides specialised
    as Triton's JIT does for the model's shapes (multiples of 16; the contiguous strides 1)."""
    import triton
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import batch_invariant_matmul
    from dsv4c.codegen.targets import triton_gpu_target

    fn = batch_invariant_matmul._matmul_kernel
    constexprs = dict(BLOCK_ROWS=16, BLOCK_COLS=64, BLOCK_K=64, BLOCKS_PER_SPLIT=64, SPLIT_OUT=False, FOLD=False,
                      NUM_STAGES=3, PRODUCT=product, sak=1, sbk=1)
    pointers = dict(a_ptr=a, b_ptr="*bf16", out_ptr="*fp32")
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names}
    aligned = set(pointers) | {"K", "N", "sag", "sam", "sbg", "sbn"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=triton_gpu_target(target("h100")),
                          options=dict(num_warps=4)).asm["ptx"]


@needs_triton
def test_gpu_products_build_for_the_h100_on_bf16_tensor_cores():
    with child_pool(_start_compiler) as pool:
        ptx = {p: pool.submit(_matmul_ptx, p, a).result()
               for p, a in (("native", "*bf16"), ("bf16x3", "*fp32"), ("ieee", "*fp32"))}
    bf16_mma = r"wgmma\.mma_async\.sync\.aligned\.m64n16k16\.f32\.bf16\.bf16"
    mma = {p: len(re.findall(bf16_mma, s)) for p, s in ptx.items()}
    assert mma["native"] > 0 and mma["bf16x3"] == 3 * mma["native"] and mma["ieee"] == 0
    assert "fma.rn.f32" not in ptx["bf16x3"] and "fma.rn.f32" in ptx["ieee"]  # fp32 x: split, not widened weights
    for s in ptx.values():  # the weight streams in 16-byte asynchronous copies, never one element at a time
        assert "cp.async.cg.shared.global" in s and "ld.global.b16" not in s


# ---- the pass on small graphs ---------------------------------------------------------------------------------
CLEANUP = [noop_removal, dead_code, cse]
BF16 = Numerics()


def _maker(x_dtype=torch.bfloat16, w_dtype=torch.bfloat16, w_shape=(N, KP), weights=1):
    return lambda batch: [torch.randn(batch, 3, KP).to(x_dtype)] + [torch.randn(w_shape).to(w_dtype)
                                                                   for _ in range(weights)]


def _run(fn, make):
    """Export fn (input 0 batched), clean it up as the pipeline does, run the pass with the outputs compared."""
    example = make(2)
    gm = export_flat(fn, example, [True] + [False] * (len(example) - 1))
    gm, _ = run_pipeline(gm, CLEANUP, PassContext())
    before = targets(gm)
    gm, record = check_pass(bf16_linear, gm, make)
    return gm, record, before


def _mm_between_views(m, x, w):
    """AOTAutograd's spelling: rows flattened, `mm` with `t(W)`, rows unflattened, then the cast."""
    return x.float().reshape(-1, KP).mm(w.float().t()).reshape(x.shape[0], 3, N).to(torch.bfloat16)


def _chained(m, x, w1, w2):
    return layers.linear(layers.linear(x, w1, BF16, False), w2, BF16, False)


FUSED_GRAPHS = {  # name -> (fn, inputs, {"bf16_x": n, "fp32_x": n}, out dtypes of the ops, ops left beside them)
    "model_linear": (lambda m, x, w: layers.linear(x, w, BF16, False), _maker(), {"bf16_x": 1}, [torch.bfloat16], []),
    "lm_head": (lambda m, x, w: x.float() @ w.float().T, _maker(), {"bf16_x": 1}, [torch.float32], []),
    "fp32_x": (lambda m, x, w: (x @ w.float().T).to(torch.bfloat16), _maker(torch.float32), {"fp32_x": 1},
               [torch.bfloat16], []),
    "fp16_x": (lambda m, x, w: x.float() @ w.float().T, _maker(torch.float16), {"fp32_x": 1}, [torch.float32],
               ["aten.to.dtype"]),  # the op takes x's exact fp32 upcast
    "mm_between_views": (_mm_between_views, _maker(), {"bf16_x": 1}, [torch.bfloat16], []),
    "permuted_weight": (lambda m, x, w: x.float() @ w.float().permute(1, 0), _maker(), {"bf16_x": 1}, [torch.float32],
                        []),
    "functional_linear": (lambda m, x, w: F.linear(x.float(), w.float()), _maker(), {"bf16_x": 1}, [torch.float32],
                          []),
    "weight_rounded_in_the_graph": (lambda m, x, w: x.float() @ w.to(torch.bfloat16).float().T,
                                    _maker(w_dtype=torch.float32), {"bf16_x": 1}, [torch.float32], ["aten.to.dtype"]),
    "chained": (_chained, _maker(w_shape=(KP, KP), weights=2), {"bf16_x": 2}, [torch.bfloat16] * 2, []),
    # fused, but what other nodes read stays for them
    "weight_upcast_read_elsewhere": (lambda m, x, w: (x.float() @ w.float().T, w.float().sum(0)), _maker(),
                                     {"bf16_x": 1}, [torch.float32], ["aten.to.dtype", "aten.sum.dim_IntList"]),
    "product_read_elsewhere": (lambda m, x, w: ((p := x.float() @ w.float().T).to(torch.bfloat16), p.sum(-1)),
                               _maker(), {"bf16_x": 1}, [torch.float32], ["aten.to.dtype", "aten.sum.dim_IntList"]),
    "product_cast_to_fp16": (lambda m, x, w: (x.float() @ w.float().T).to(torch.float16), _maker(), {"bf16_x": 1},
                             [torch.float32], ["aten.to.dtype"]),
}


@pytest.mark.parametrize("name", FUSED_GRAPHS)
def test_small_graphs_fuse_bit_exactly(name):
    fn, make, counts, out_dtypes, beside = FUSED_GRAPHS[name]
    gm, record, before = _run(fn, make)
    assert record.matches == sum(counts.values())
    assert {k: v for k, v in record.details.items() if k in ("bf16_x", "fp32_x") and v} == counts
    fused = [n for n in gm.graph.nodes if str(n.target) == FUSED]
    assert [n.args[2] for n in fused] == out_dtypes
    assert all(n.args[1].meta["val"].dtype == torch.bfloat16 for n in fused)  # the weight, read as bf16
    assert sorted(set(targets(gm)) - {FUSED}) == sorted(set(beside))
    assert record.details["widened_left"] == (1 if name == "weight_upcast_read_elsewhere" else 0)


NEAR_MISSES = {  # name -> (fn, inputs): nothing fused, the graph unchanged
    "fp16_weight": (lambda m, x, w: x.float() @ w.float().T, _maker(w_dtype=torch.float16)),
    "fp32_weight": (lambda m, x, w: x.float() @ w.T, _maker(w_dtype=torch.float32)),
    "weight_not_transposed": (lambda m, x, w: x.float() @ w.float(), _maker(w_shape=(KP, N))),
    "bf16_product": (lambda m, x, w: x @ w.T, _maker()),
    "batched_weight": (lambda m, x, w: x.float() @ w.float().transpose(-1, -2),
                       lambda batch: [torch.randn(batch, 3, KP).bfloat16(), torch.randn(batch, N, KP).bfloat16()]),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_near_misses_are_left_alone(name):
    fn, make = NEAR_MISSES[name]
    example = make(2)
    gm = export_flat(fn, example, [True] + [name == "batched_weight"] * (len(example) - 1))
    gm, _ = run_pipeline(gm, CLEANUP, PassContext())
    before = targets(gm)
    gm, record = check_pass(bf16_linear, gm, make)
    assert record.matches == 0 and targets(gm) == before


# ---- the captured tiny step through the whole pipeline ---------------------------------------------------------
MAX_SEQ_LEN = 64
PRODUCTS = {"head.weight", "layers.1.attn.compressor.wkv.weight", "layers.1.attn.compressor.wgate.weight",
            "layers.1.attn.indexer.compressor.wkv.weight", "layers.1.attn.indexer.compressor.wgate.weight",
            "layers.1.attn.indexer.weights_proj.weight"}
ROUTERS = {"layers.0.ffn.gate.weight", "layers.1.ffn.gate.weight"}  # on GPU targets inside moe_fp4's op


@pytest.fixture(scope="module")
def step():
    """Two layers (a C4 layer with its indexer), faithful numerics: bf16 LM head, compressor, indexer and router
    weights, as released."""
    cfg = tiny().replace(num_hidden_layers=2, compress_ratios=(0, 4, 0), hc_sinkhorn_iters=2)
    weights = dict(synthetic_tensors(cfg, 0))
    assert {weights[name].dtype for name in PRODUCTS | ROUTERS} == {torch.bfloat16}
    return cfg, capture(cfg, Numerics.faithful(), weights, StepVariant("main", 1), MAX_SEQ_LEN)


@pytest.mark.parametrize("target_name, fused", [("cpu", PRODUCTS | ROUTERS), ("h100", PRODUCTS)])
def test_captured_step_reads_bf16_weights_as_bf16(step, target_name, fused):
    cfg, captured = step
    roundings = cache_roundings(cfg, Numerics.faithful())
    entries = pipeline_for(target_name)
    at = [e.name for e in entries].index("bf16_linear")
    assert {"fp8_linear", "moe_fp4", "compressor_fusion", "lightning_indexer"} <= {e.name for e in entries[:at]}
    assert {"norm_rope_fusion", "constant_folding", "shape_propagation"} <= {e.name for e in entries[at:]}

    def checked(tolerance):  # debug mode: each pass against the graph before it, on fresh inputs
        return PassContext(target_name, True, lambda batch: random_inputs(captured, batch, roundings), tolerance,
                           (1, 3), tuple(captured.output_names), cache_roundings=roundings)

    gm, _ = run_pipeline(copy.deepcopy(captured.graph_module), entries[:at], checked(1e-5))  # the compile's
    gm, (record,) = run_pipeline(gm, entries[at:at + 1], checked(0.0))  # this pass: bit-equal
    gm, _ = run_pipeline(gm, entries[at + 1:], checked(1e-5))

    assert record.matches == len(fused) and record.details["bf16_x"] == len(fused)
    assert record.details["widened_left"] == 0
    name_of = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], captured.input_names))
    ops = [n for n in gm.graph.nodes if str(n.target) == FUSED]
    assert sorted(name_of[n.args[1]] for n in ops) == sorted(f"weights.{w}" for w in fused)
    plan = plan_from_graph(gm, captured.input_names, captured.output_names)
    bf16_weights = {i.name for i in plan.inputs if i.name.startswith("weights.") and i.torch_dtype() == torch.bfloat16}
    assert {f"weights.{w}" for w in PRODUCTS} <= bf16_weights
    widened = [o for o in plan.ops if o.op == "aten::to.dtype" and getattr(o.args[0], "name", None) in bf16_weights]
    assert not widened, widened  # the LM head above all: no per-step fp32 copy of any bf16 weight



# ---- ONNX ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_onnx_body_computes_the_op(x_dtype, out_dtype):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install dsv4c[onnx])")
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="feeding bf16 to onnx.reference needs ml_dtypes")
    from onnx.reference import ReferenceEvaluator

    from dsv4c.export.onnx_export import plan_to_onnx
    from dsv4c.runtime.executor import Executor
    from dsv4c.runtime.plan import Plan, PlanInput, PlanOp, Ref

    specs = (PlanInput("x", ("B", 2, KP), dtype_name(x_dtype)), PlanInput("w", (N, KP), "bfloat16"))
    plan = Plan(specs, {}, (PlanOp("dsv4c::bf16_linear.default", (Ref("x"), Ref("w"), out_dtype), {}, ("y",)),),
                (("y", "y"),))
    model = plan_to_onnx(plan, {})
    onnx.checker.check_model(model, full_check=True)
    assert {p.key: p.value for p in model.metadata_props}["dsv4c.opaque_ops"] == ""
    inputs = {"x": torch.randn(5, 2, KP).to(x_dtype), "w": torch.randn(N, KP).bfloat16()}
    feeds = {n: t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
             for n, t in inputs.items()}
    (got,) = ReferenceEvaluator(model).run(None, feeds)
    got = torch.from_numpy(got.astype("float32")).to(out_dtype)  # bf16 -> fp32 -> bf16: exact
    want = Executor(plan, {}, "cpu").run(inputs)["y"]
    assert got.shape == want.shape == (5, 2, N) and want.dtype == out_dtype
    assert _close(got, inputs["x"].double() @ inputs["w"].double().T, out_dtype)
    assert _close(want, inputs["x"].double() @ inputs["w"].double().T, out_dtype)
