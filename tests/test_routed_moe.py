"""`dsv4c::routed_moe` (codegen/routed_moe.py): a MoE layer's routed experts, reading only the selected ones.

What is checked against what:
- the op (its reference, on CPU) inside the model's MoE, through the capture's adapter
  (compiler/capture.py `PackedRoutedExperts`, packed MXFP4 weights), against the model's own eager MoE on
  the decoded weights (model/layers.py `moe` with `routed_experts`); hash- and score-routed layers, batches
  1, 3, 64, a router that sends every token to one expert and none to another. The fixed-shape form the
  ONNX exporter traces (`every_expert`) is checked against the op on the same inputs.
- the reference never reads an expert no token chose: those experts' tensors are meta tensors, which raise
  when any value is read.
- the Triton kernels (codegen/kernels/routed_moe.py) under Triton's interpreter, in a child process that sets
  TRITON_INTERPRET=1 before importing Triton (see tests/test_mhc_kernels.py), against the reference, with
  the output filled with NaN before the kernels run and the SwiGLU clamp binding on some values;
- the kernels built for sm_90a (on any machine): the packed weights are read 16 bytes a thread a load;
- on a CUDA GPU (skipped without one): the kernels at Flash's sizes against the reference, and a CUDA-graph
  capture of the op replayed with other ids, inputs and routing weights (a host synchronisation would fail
  the capture);
- the captured step: one routed_moe node a MoE layer (main and MTP), its weight lists the step's packed
  weight inputs, no `dequant_fp4_weight` left; the graph, and the plan lowered from it, equal eager;
- the op's ONNX function (export/) against the plan executor.

Tolerances (relative norm error against the reference; NaN never passes):
- the op against the model's MoE, fp32: 1e-6 (the same fp32 math on the same values); faithful bf16: 1e-3
  (the MoE output is bf16: an fp32 difference may flip one element's rounding, 2^-8 of that element);
- kernels, fp32 without activation rounding: 1e-5 (fp32 sums in another order); with FP8 activation rounding
  or bf16 activations: 1e-3. Every product is exact, so they differ only where an fp32 difference moves a
  value across a bf16 or FP8 rounding boundary: 2^-8 or 2^-4 of that one element, ~1e-5 to 1e-4 of the norm
  here (seen: 0 and 4e-6), while a rounding misplaced (skipped, or by truncation) moves most elements:
  ~5e-3. At Flash's sizes on a GPU, 1e-3 too.
- ONNX against the executor: 1e-5 (the same fp32 ops in numpy's order).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import zlib

import pytest
import torch
from child_pool import child_pool, start_interpreter

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.codegen.routed_moe import every_expert, reference
from dsv4c.compiler.capture import PackedRoutedExperts, StepVariant, capture
from dsv4c.compiler.lowering import graph_constants, plan_from_graph
from dsv4c.model import quant
from dsv4c.model.layers import moe
from dsv4c.model.layout import tensor_specs
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import dequantize_weights, forward, init_state, mtp_forward
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.runtime.executor import Executor, weight_inputs
from dsv4c.runtime.plan import Plan, PlanInput, PlanOp, Ref

LISTS = ("w1", "s1", "w3", "s3", "w2", "s2")
FP32 = Numerics.plain(torch.float32)
FAITHFUL = Numerics.faithful()
# Two MoE layers (0 hash-routed, 1 score-routed), 256-wide with 128 hidden features, 8 experts, top 3.
CFG = tiny().replace(hidden_size=256, moe_intermediate_size=128, num_experts_per_tok=3, num_hidden_layers=2,
                     compress_ratios=(0, 0, 0))
FIRST, NEVER = 0, CFG.n_routed_experts - 1  # the expert every token selects, the one none does


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any() and not want.isnan().any(), "NaN never passes"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


# ---- the op inside the model's MoE ------------------------------------------------------------------
def moe_weights(layer: int, seed: int) -> dict[str, torch.Tensor]:
    """Layer `layer`'s MoE tensors in the release format, routed so that every token selects expert FIRST
    and none selects NEVER (a large or very negative router bias; a hash table built so)."""
    prefix = f"layers.{layer}.ffn."
    names = [name for name in tensor_specs(CFG) if name.startswith(prefix)]
    raw = dict(synthetic_tensors(CFG, seed, names))
    if CFG.is_hash_layer(layer):
        gen = _gen("tid2eid", seed)
        others = torch.stack([torch.randperm(NEVER - 1, generator=gen)[:CFG.num_experts_per_tok - 1] + 1
                              for _ in range(CFG.vocab_size)])
        raw[prefix + "gate.tid2eid"] = torch.cat((torch.full((CFG.vocab_size, 1), FIRST), others), 1).to(torch.int32)
    else:
        raw[prefix + "gate.bias"][FIRST], raw[prefix + "gate.bias"][NEVER] = 1e3, -1e3
    return raw


@pytest.mark.parametrize("layer", [0, 1], ids=["hash", "score"])
@pytest.mark.parametrize("num", [FP32, FAITHFUL], ids=["fp32", "faithful-bf16"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_op_in_the_moe_equals_the_model_moe(layer, num, batch):
    raw = moe_weights(layer, seed=layer)
    weights, prefix, gen = dequantize_weights(raw, num), f"layers.{layer}.ffn.", _gen("moe", layer, batch)
    x = (torch.randn(batch, 1, CFG.hidden_size, generator=gen) * 8).to(num.dtype)  # the clamp binds here and there
    tokens = torch.randint(0, CFG.vocab_size, (batch, 1), generator=gen)
    hash_layer = CFG.is_hash_layer(layer)
    want = moe(x, tokens, weights, prefix, CFG, hash_layer, num)
    got = moe(x, tokens, weights, prefix, CFG, hash_layer, num, routed=PackedRoutedExperts(raw))
    assert got.dtype == want.dtype == num.dtype
    assert rel_err(got, want) <= (1e-6 if num.dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("num", [FP32, FAITHFUL], ids=["fp32", "faithful-bf16"])
def test_every_expert_form_equals_the_op(num):
    """The fixed-shape form (the op's ONNX body) against the reference, with an expert left unselected."""
    x, ids, weights, lists = random_call(_gen("dense", str(num.dtype)), 5, 256, 128, 6, 3, num.dtype, scale=4.0)
    assert ids.unique().numel() < 6
    args = (x, ids, weights, *lists, 2.0, num.act_quant)
    assert rel_err(every_expert(*args), reference(*args)) <= 1e-6


class Untouchable(torch.Tensor):
    """An unselected expert's tensor: any torch function on it (a read, a view, a copy) raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"an unselected expert's tensor was touched: {getattr(func, '__name__', func)}")


def test_reference_reads_only_the_selected_experts():
    """The CPU implementation, called directly (through torch.ops the op call itself is a torch function)."""
    x, ids, weights, lists = random_call(_gen("poison"), 4, 256, 128, 8, 2, torch.float32)
    ids[:, 0], ids[:, 1] = 2, 5
    want = torch.ops.dsv4c.routed_moe(x, ids, weights, *lists, 10.0, False)
    poisoned = [[t if e in (2, 5) else torch.empty(0).as_subclass(Untouchable) for e, t in enumerate(ts)]
                for ts in lists]
    assert torch.equal(reference(x, ids, weights, *poisoned, 10.0, False), want)


# ---- the Triton kernels under the interpreter -------------------------------------------------------
def random_call(gen: torch.Generator, tokens: int, hidden: int, inter: int, experts: int, k: int, dtype: torch.dtype,
                scale: float = 1.0):
    """x [tokens, hidden], ids [tokens, k] (distinct per token), weights [tokens, k], the six weight lists."""
    lists: list[list[torch.Tensor]] = [[] for _ in LISTS]
    for _ in range(experts):
        for index, (rows, cols) in ((0, (inter, hidden)), (2, (inter, hidden)), (4, (hidden, inter))):
            weight, scales = quant.quantize_fp4_weight(torch.randn(rows, cols, generator=gen) * cols ** -0.5)
            lists[index].append(weight)
            lists[index + 1].append(scales)
    x = (torch.randn(tokens, hidden, generator=gen) * scale).to(dtype)
    ids = torch.stack([torch.randperm(experts - 1, generator=gen)[:k] for _ in range(tokens)])  # never the last
    return x, ids, torch.rand(tokens, k, generator=gen) + 0.5, lists


def _run_kernels(x, ids, weights, lists, limit, act_quant, launch, out):
    from dsv4c.codegen.kernels import routed_moe as kernels

    launch = kernels.RoutedMoeLaunch(**launch) if launch else None
    return kernels.routed_moe(x, ids, weights, lists, limit, act_quant, launch, kernels.PointerTables(), out)


def _table_reuse(lists, x):
    """Whether a table is made once per weight set and reused, and a new set gets its own."""
    from dsv4c.codegen.kernels.routed_moe import PointerTables

    tables = PointerTables()
    first, _ = tables.get(lists, x)
    again, _ = tables.get([list(ts) for ts in lists], x)
    other, _ = tables.get([[t.clone() for t in ts] for ts in lists], x)
    return first is again and other is not first and other.tolist() != first.tolist()


def _bad_expert_message(lists, x):
    from dsv4c.codegen.kernels.routed_moe import PointerTables

    lists[4][3] = lists[4][3][:, :-16].contiguous()
    try:
        PointerTables().get(lists, x)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.fixture(scope="module")
def interpreter():
    with child_pool(start_interpreter) as pool:
        yield pool


@dataclasses.dataclass(frozen=True)
class KernelCase:
    tokens: int
    inter: int
    k: int
    dtype: torch.dtype
    act_quant: bool
    limit: float | None
    launch: dict | None = None  # None: the cpu heuristic (one step, one tile at these sizes)


KERNEL_CASES = {
    "fp32-no-clamp": KernelCase(1, 128, 2, torch.float32, False, None),
    "bf16-faithful": KernelCase(5, 128, 3, torch.bfloat16, True, 1.5),
    "bf16": KernelCase(2, 128, 2, torch.bfloat16, False, 1.5),
    "fp32-act-quant": KernelCase(3, 128, 4, torch.float32, True, 1.5),
    # several tiles and loop steps, masked rows and groups (I = 96: a partial tile and a partial step)
    "fp32-tiles": KernelCase(3, 96, 2, torch.float32, False, 1.5, dict(block_i=64, block_d=64, block_g=2, num_warps=4)),
}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("name", list(KERNEL_CASES))
def test_kernels_equal_the_reference(interpreter, name):
    case = KERNEL_CASES[name]
    x, ids, weights, lists = random_call(_gen("kernel", name), case.tokens, 256, case.inter, 8, case.k, case.dtype,
                                         scale=4.0)
    ids[:, 0] = 1  # one expert every token selects
    want = reference(x, ids, weights, *lists, case.limit, case.act_quant)
    if case.limit is not None:
        gate = torch.cat([swiglu_gate(x, lists, e, case.act_quant) for e in ids.unique().tolist()])
        assert (gate.abs() > case.limit).any() and (gate.abs() < case.limit).any(), "the clamp must bind, not always"
    out = torch.full(want.shape, float("nan"))
    got = interpreter.submit(_run_kernels, x, ids, weights, lists, case.limit, case.act_quant, case.launch,
                             out).result()
    tolerance = 1e-5 if case.dtype == torch.float32 and not case.act_quant else 1e-3
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= tolerance


def swiglu_gate(x, lists, expert, act_quant):
    """The gate projection's values (before the clamp) of `expert` on every token."""
    source = quant.fake_quant_fp8(x, 128) if act_quant else x
    return source.float() @ quant.dequant_fp4_weight(lists[0][expert], lists[1][expert]).T


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_pointer_tables_are_made_once_and_check_every_expert(interpreter):
    x, _, _, lists = random_call(_gen("tables"), 1, 256, 128, 4, 2, torch.float32)
    assert interpreter.submit(_table_reuse, lists, x).result()
    message = interpreter.submit(_bad_expert_message, lists, x).result()
    assert "w2[3]" in message and "(256, 48)" in message


def _start_compiler():
    os.environ.pop("TRITON_INTERPRET", None)  # a compiling process: Triton builds PTX for a GPU it lacks
    torch.set_num_threads(1)


def _weight_loads_ptx(target_name):
    """The PTX global loads of the gate/up and down kernels built for `target_name` (faithful bf16 launch)."""
    import re

    import triton
    import triton.language as tl
    from triton.compiler import ASTSource

    from dsv4c.codegen.kernels import routed_moe as kernels
    from dsv4c.codegen.targets import target, triton_gpu_target

    def loads(fn, signature, constexprs):
        aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in signature.items()
                   if kind.startswith("*") or name in ("D", "I")}
        source = ASTSource(fn, {**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs, aligned)
        ptx = triton.compile(source, target=triton_gpu_target(target(target_name)), options={"num_warps": 4})
        return re.findall(r"ld\.global[.\w]*", ptx.asm["ptx"])

    launch = kernels.routed_moe_launch(target(target_name), 4096, 2048)
    scalars = {"D": "i32", "I": "i32", "K": "i32", "E": "i32"}
    gate_up = loads(kernels._gate_up_kernel,
                    {"x_ptr": "*fp32", "ids_ptr": "*i64", "weights_ptr": "*fp32", "table_ptr": "*i64",
                     "hidden_ptr": "*bf16", **scalars, "limit": "fp32"},
                    {"BLOCK_I": launch.block_i, "BLOCK_G": launch.block_g, "CLAMP": True, "ACT": tl.bfloat16,
                     "ALIGNED": True})
    down = loads(kernels._down_kernel,
                 {"hidden_ptr": "*fp32", "ids_ptr": "*i64", "table_ptr": "*i64", "out_ptr": "*fp32", **scalars},
                 {"BLOCK_D": launch.block_d, "BLOCK_G": launch.block_g, "ACT": tl.bfloat16, "ALIGNED": True})
    return gate_up, down


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_packed_weights_are_read_in_16_byte_loads_on_hopper():
    """Built for sm_90a (no GPU needed): each thread reads 16 packed bytes of a weight row at once (the
    aligned base pointers from the table are marked so), one load for w1, one for w3, one for w2."""
    with child_pool(_start_compiler) as pool:
        gate_up, down = pool.submit(_weight_loads_ptx, "h100").result()
    assert gate_up.count("ld.global.v4.b32") == 2 and down.count("ld.global.v4.b32") == 1, (gate_up, down)


# ---- on a GPU ---------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs a CUDA GPU and Triton")


def packed_random_call(gen, tokens, hidden, inter, experts, k, device):
    """Random MXFP4 codes and scales (2^-9 .. 2^-4) made on the device: Flash's 256 experts in seconds."""
    def expert_tensors(rows, cols):
        codes = torch.randint(-128, 128, (rows, cols // 2), dtype=torch.int8, device=device)
        scales = torch.randint(118, 124, (rows, cols // 32), dtype=torch.uint8, device=device)
        return codes, scales.view(torch.float8_e8m0fnu)

    lists: list[list[torch.Tensor]] = [[] for _ in LISTS]
    for _ in range(experts):
        for index, shape in ((0, (inter, hidden)), (2, (inter, hidden)), (4, (hidden, inter))):
            weight, scales = expert_tensors(*shape)
            lists[index].append(weight)
            lists[index + 1].append(scales)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    ids = torch.rand(tokens, experts, generator=gen).topk(k, dim=-1).indices.to(device)
    return x, ids, (torch.rand(tokens, k, generator=gen) + 0.5).to(device), lists


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 8, 64])
def test_cuda_kernels_at_flash_sizes(tokens):
    x, ids, weights, lists = packed_random_call(_gen("flash", tokens), tokens, 4096, 2048, 256, 6, "cuda")
    args = (x, ids, weights, *lists, 10.0, True)
    assert rel_err(torch.ops.dsv4c.routed_moe(*args), reference(*args)) <= 1e-3


@needs_cuda
def test_cuda_graph_replays_with_new_ids():
    x, ids, weights, lists = packed_random_call(_gen("graph"), 4, 512, 256, 16, 4, "cuda")
    args = (x, ids, weights, *lists, 10.0, True)
    torch.ops.dsv4c.routed_moe(*args)  # makes the pointer table (and compiles) before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.dsv4c.routed_moe(*args)
    new_x, new_ids, new_weights, _ = packed_random_call(_gen("graph", 2), 4, 512, 256, 16, 4, "cuda")
    x.copy_(new_x), ids.copy_(new_ids), weights.copy_(new_weights)
    graph.replay()
    assert rel_err(out, reference(*args)) <= 1e-3


# ---- the captured step --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["main", "mtp"])
def test_captured_step_calls_routed_moe_on_packed_weights(kind):
    """One routed_moe node a MoE layer (main: one hash-routed layer; MTP: one score-routed layer) reading the
    step's packed expert inputs, no FP4 decode left; the graph and its plan equal eager (faithful bf16)."""
    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0), hc_sinkhorn_iters=2)
    raw = dict(synthetic_tensors(cfg, seed=5))
    step = capture(cfg, FAITHFUL, raw, StepVariant(kind, 1), 64)
    nodes = [n for n in step.graph_module.graph.nodes if n.op == "call_function"]
    routed = [n for n in nodes if n.target == torch.ops.dsv4c.routed_moe.default]
    assert len(routed) == 1 and not [n for n in nodes if n.target == torch.ops.dsv4c.dequant_fp4_weight.default]
    name_of = dict(zip([n for n in step.graph_module.graph.nodes if n.op == "placeholder"], step.input_names))
    prefix = "weights.layers.0.ffn." if kind == "main" else "weights.mtp.0.ffn."
    for index, suffix in enumerate(("w1.weight", "w1.scale", "w3.weight", "w3.scale", "w2.weight", "w2.scale")):
        expected = [f"{prefix}experts.{e}.{suffix}" for e in range(cfg.n_routed_experts)]
        assert [name_of.get(a) for a in routed[0].args[3 + index]] == expected, suffix

    inputs, want = eager_step(cfg, raw, kind)
    got = step.graph_module(*[inputs[name] for name in step.input_names])
    assert rel_err(got[0], want[0]) <= 1e-6
    plan = plan_from_graph(step.graph_module, step.input_names, step.output_names)
    plan = Plan.from_json(plan.to_json())
    executor = Executor(plan, graph_constants(step.graph_module, plan), "cpu",
                        bound_inputs=weight_inputs(plan, raw))
    outputs = executor.run({k: inputs[k] for k in step.input_names if not k.startswith("weights.")})
    assert torch.equal(outputs["logits"], got[0])


def eager_step(cfg, raw, kind):
    """The step's inputs (batch 3, one token each, after a 5-token prefill) and the eager model's outputs."""
    gen, weights = _gen("step", kind), dequantize_weights(raw, FAITHFUL)
    state = init_state(cfg, 3, 64, FAITHFUL)
    _, _, state = forward(weights, state, torch.randint(0, cfg.vocab_size, (3, 5), generator=gen),
                          torch.zeros(3, dtype=torch.long), cfg, FAITHFUL)
    tokens, start = torch.randint(0, cfg.vocab_size, (3, 1), generator=gen), torch.full((3,), 5)
    hidden = torch.randn(3, 1, cfg.hc_mult, cfg.hidden_size, generator=gen).to(FAITHFUL.dtype)
    inputs = {**{f"weights.{k}": v for k, v in raw.items()}, **{f"state.{k}": v.clone() for k, v in state.items()},
              "tokens": tokens, "start": start, "hidden": hidden}
    if kind == "main":
        return inputs, forward(weights, state, tokens, start, cfg, FAITHFUL)
    return inputs, mtp_forward(weights, state, tokens, hidden, start, cfg, FAITHFUL)


# ---- ONNX -------------------------------------------------------------------------------------------------
def test_onnx_function_computes_the_op():
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="feeding bf16 / e8m0 to onnx.reference needs ml_dtypes")
    from onnx.reference import ReferenceEvaluator

    from dsv4c.export.onnx_export import plan_to_onnx

    x, ids, weights, lists = random_call(_gen("onnx"), 6, 128, 128, 3, 2, torch.bfloat16, scale=4.0)
    inputs = {"x": x.view(3, 2, 128), "ids": ids.view(3, 2, 2), "weights": weights.view(3, 2, 2)}
    specs = [PlanInput(name, ("B", 2, t.shape[-1]), str(t.dtype).removeprefix("torch.")) for name, t in inputs.items()]
    refs = []
    for name, tensors in zip(LISTS, lists):
        refs.append([Ref(f"{name}.{e}") for e in range(len(tensors))])
        for e, t in enumerate(tensors):
            inputs[f"{name}.{e}"] = t
            specs.append(PlanInput(f"{name}.{e}", tuple(t.shape), str(t.dtype).removeprefix("torch.")))
    op = PlanOp("dsv4c::routed_moe.default", (Ref("x"), Ref("ids"), Ref("weights"), *refs, 2.0, True), {}, ("y",))
    plan = Plan(tuple(specs), {}, (op,), (("y", "y"),))
    model = plan_to_onnx(plan, {})
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["routed_moe"] and len(model.graph.node[0].input) == 3 + 6 * 3
    feeds = {name: _numpy(t, ml_dtypes) for name, t in inputs.items()}
    got = torch.from_numpy(ReferenceEvaluator(model).run(None, feeds)[0].copy())
    assert rel_err(got, Executor(plan, {}, "cpu").run(inputs)["y"]) <= 1e-5


def _numpy(tensor: torch.Tensor, ml_dtypes):
    views = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e8m0fnu: ml_dtypes.float8_e8m0fnu}
    if tensor.dtype in views:
        return tensor.contiguous().view(torch.uint8).numpy().view(views[tensor.dtype])
    return tensor.numpy()
