"""`torch.compile(model, backend="dsv4c")`: dsv4c's passes inside Inductor, on models with and without
dsv4c's patterns, with dynamic shapes.

Every compiled model is compared with the same model run eagerly, in fp32, by relative norm error
<= TOL = 1e-5 (Inductor reorders fp32 sums; the errors seen are ~3e-7); NaN never passes. Each model is
compiled once with `dynamic=True` and called at two batch sizes (both >= 2: Dynamo specialises size 1),
and the tests check that the second call reused the graph (no recompile).

Inductor on CPU compiles C++ per graph (tens of seconds here), so the models are small: the reference
model and transformers' DeepSeek-V4 use one heavily compressed layer (ratio 16) with a score-routed MoE of
2 experts and 2 Sinkhorn iterations, and Inductor compiles the larger graphs' C++ at -O0 without vector
code (FAST_CPP). The MoE's top-k keeps both experts, so no near-tie can be broken differently by two fp32
summation orders (see test_model.py). Python floats of
the configs are specialised (`specialize_float`), which spares Dynamo one restart of its analysis per
model; the restart path itself is exercised in test_gpt2_block_dynamic_batch_and_length and
test_graph_break_on_item.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dsv4c.compiler import backend as backend_module
from dsv4c.compiler.backend import BackendLog, lift_constants, make_backend
from dsv4c.model.step import dequantize_weights, forward, init_state
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.synthetic import synthetic_tensors
from dsv4c.passes import optimise, pipeline_for
from dsv4c.passes.manager import PassContext
from dsv4c.passes.memory_planning import memory_planning

TOL = 1e-5
EXACT_FP32 = Numerics.plain(torch.float32).replace(kv_fp8=False, indexer_fp4=False)
# One heavily compressed layer (ratio 16: compressor rings, compressed cache) and a score-routed MoE; no MTP.
SMALL = tiny().replace(num_hidden_layers=1, compress_ratios=(16,), num_nextn_predict_layers=0, num_hash_layers=0,
                       n_routed_experts=2, num_experts_per_tok=2, hc_sinkhorn_iters=2)
MAX_SEQ_LEN = 64
# For the GPT-2 block and the DeepSeek models: one C++ file per graph, scalar loops, -O0. Inductor's graph
# handling is the same; its C++ compile (minutes at -O3 with vector code on a loaded 2-core machine) becomes
# tens of seconds. The MLPs and the cache test compile with Inductor's defaults.
FAST_CPP = {"cpp_wrapper": True, "cpp.simdlen": 0, "aot_inductor.debug_compile": True}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in the compiled output"
    assert not torch.isnan(want).any(), "NaN in the eager output"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def assert_passes_ran(log: BackendLog, target: str, graphs: int | None = None) -> None:
    """Every aten graph went through the whole pipeline of `target`, and Dynamo compiled no more graphs
    than expected (dynamic shapes: no recompile for the second batch size)."""
    names = [e.name for e in pipeline_for(target)]
    assert log.graphs, "the backend compiled no graph with dsv4c's passes"
    for graph in log.graphs:
        assert [r.name for r in graph.records] == names and graph.target == target
    if graphs is not None:
        assert log.dynamo_graphs == graphs and len(log.graphs) == graphs, log.summary()


def assert_every_mhc_boundary_fused(log: BackendLog, layers: int) -> None:
    """The mhc_fusion pass's own counts, summed over the graphs: a model of `layers` layers has the first
    layer's attention pre, a post+pre between each two sub-layers, the last sub-layer's post and the head."""
    records = [r for graph in log.graphs for r in graph.records if r.name == "mhc_fusion"]
    fused = {kind: sum(r.details[kind] for r in records) for kind in ("hc_pre", "hc_post_pre", "hc_post", "hc_head")}
    assert fused == {"hc_pre": 1, "hc_post_pre": 2 * layers - 1, "hc_post": 1, "hc_head": 1}, log.summary()
    assert sum(r.matches for r in records) == 2 * layers + 2, log.summary()


# ---- registration -----------------------------------------------------------------------------------
FRESH_PROCESS = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    listed = "dsv4c" in torch._dynamo.list_backends()
    imported_before = sorted(m for m in sys.modules if m.startswith("dsv4c"))
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    compiled = torch.compile(mlp, backend="dsv4c", dynamic=True)
    errors = []
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 16)
            got, want = compiled(x), mlp(x)
            errors.append(None if torch.isnan(got).any() else ((got - want).norm() / want.norm()).item())
    print(json.dumps({"listed": listed, "imported_before": imported_before, "errors": errors,
                      "backend_loaded": "dsv4c.compiler.backend" in sys.modules}))
""")


def test_entry_point_registers_the_backend_without_an_import():
    """In a fresh process: listed by Dynamo before any dsv4c import, then `backend="dsv4c"` compiles an
    MLP (no dsv4c pattern in it) whose outputs equal eager at two batch sizes from one compile."""
    env = dict(os.environ, DSV4C_DUMP="1")
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["listed"] and result["imported_before"] == [] and result["backend_loaded"]
    assert all(e is not None and e <= TOL for e in result["errors"]), result["errors"]
    first = pipeline_for("cpu")[0].name
    assert run.stderr.count(f"[dsv4c] {first}:") == 1, run.stderr[-3000:]  # one graph, passes ran once


def test_target_is_chosen_by_make_backend_or_options(monkeypatch):
    assert make_backend("h100").target == "h100"
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        make_backend("tpu")
    calls = []
    monkeypatch.setattr(backend_module, "make_backend",
                        lambda target, config_patches: calls.append((target, config_patches)) or (lambda g, i: g))
    backend_module.dsv4c_backend(None, [], options={"target": "gb300", "max_autotune": False})
    backend_module.dsv4c_backend(None, [])
    assert calls == [("gb300", {"max_autotune": False}), ("cpu", {})]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="options target 'cpu' conflicts with the backend's 'h100'"):
        make_backend("h100")(None, [], options={"target": "cpu"})


# ---- models without dsv4c patterns --------------------------------------------------------------------
class GPT2Block(torch.nn.Module):
    """LayerNorm, causal self-attention with softmax, tanh-GELU MLP, residuals (GPT-2's block)."""

    def __init__(self, width: int = 32, heads: int = 4, context: int = 16):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.c_attn, self.c_proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(4 * width, width))
        self.register_buffer("bias", torch.tril(torch.ones(context, context)).view(1, 1, context, context))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in self.c_attn(x).split(c, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = F.softmax(att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf")), dim=-1)
        return self.c_proj((att @ v).transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def test_gpt2_block_dynamic_batch_and_length():
    """Batch and sequence length both symbolic; the h100 target's pipeline (the same cleanup passes)."""
    torch.manual_seed(0)
    block = GPT2Block().eval()
    log = BackendLog()
    compiled = torch.compile(block, backend=make_backend("h100", log, config_patches=FAST_CPP), dynamic=True)
    with torch.no_grad():
        for shape in ((2, 8, 32), (3, 5, 32)):
            x = torch.randn(shape)
            assert rel_err(compiled(x), block(x)) <= TOL
    assert_passes_ran(log, "h100", graphs=1)
    assert len(log.graphs[0].symbols) >= 2, log.summary()


def test_mlp_training_forward_and_backward():
    """With gradients Inductor hands a forward graph (saving activations) and later a backward graph."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    log = BackendLog()
    compiled = torch.compile(mlp, backend=make_backend(log=log), dynamic=True)
    x = torch.randn(6, 8)
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    mlp(x).square().sum().backward()
    for g, w in zip(got, (p.grad for p in mlp.parameters())):
        assert rel_err(g, w) <= TOL
    assert [g.kind for g in log.graphs] == ["forward", "backward"], log.summary()


# ---- the project's reference model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_raw():
    return dict(synthetic_tensors(SMALL, seed=3))


class ReferenceStep(torch.nn.Module):
    """compiler/model.py's functional decode step with the dequantised weights held as buffers."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(weights)
        for i, name in enumerate(self.names):
            self.register_buffer(f"w{i}", weights[name])

    def forward(self, state: dict[str, torch.Tensor], tokens: torch.Tensor, start: torch.Tensor):
        weights = {name: getattr(self, f"w{i}") for i, name in enumerate(self.names)}
        logits, _, new_state = forward(weights, state, tokens, start, SMALL, EXACT_FP32)
        return logits, new_state


def prefilled_state(weights, lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Each sequence prefilled alone (eagerly) with its own prompt length, then stacked into one batch."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for length in lengths:
        state = init_state(SMALL, 1, MAX_SEQ_LEN, EXACT_FP32)
        prompt = torch.randint(0, SMALL.vocab_size, (1, length), generator=gen)
        _, _, state = forward(weights, state, prompt, torch.tensor([0]), SMALL, EXACT_FP32)
        states.append(state)
    return {name: torch.cat([s[name] for s in states]) for name in states[0]}


def test_reference_model_decode_step(small_raw):
    """One decode step (T=1) from prefilled caches at per-sequence positions: logits and every state
    tensor (window ring, compressed caches, compressor rings with their -inf scores) equal eager."""
    weights = dequantize_weights(small_raw, EXACT_FP32)
    step = ReferenceStep(weights).eval()
    log = BackendLog()
    with torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(step, backend=make_backend(log=log, config_patches=FAST_CPP), dynamic=True)
        for seed, lengths in enumerate(([37, 21], [30, 17, 50])):
            state = prefilled_state(weights, lengths, seed)
            gen = torch.Generator().manual_seed(9)
            tokens = torch.randint(0, SMALL.vocab_size, (len(lengths), 1), generator=gen)
            start = torch.tensor(lengths)
            with torch.no_grad():
                got_logits, got_state = compiled({k: v.clone() for k, v in state.items()}, tokens, start)
                want_logits, want_state = step({k: v.clone() for k, v in state.items()}, tokens, start)
            assert rel_err(got_logits, want_logits) <= TOL
            assert got_state.keys() == want_state.keys()
            for name, want in want_state.items():
                got, finite = got_state[name], torch.isfinite(want)
                assert torch.equal(torch.isfinite(got), finite), name
                assert rel_err(got[finite], want[finite]) <= TOL, name
    assert_passes_ran(log, "cpu", graphs=1)
    graph = log.graphs[0]
    assert graph.kind == "inference" and graph.symbolic_inputs >= 1 and graph.matches()["cse"] > 0, graph.summary()
    assert_every_mhc_boundary_fused(log, SMALL.num_hidden_layers)
    print(log.summary())


# ---- transformers' DeepseekV4ForCausalLM --------------------------------------------------------------
def test_transformers_deepseek_v4_prompt(small_raw):
    """transformers' model (independent code, its own caches and routing) over a 40-token prompt."""
    from hf_reference import transformers_model_from_tensors

    model = transformers_model_from_tensors(SMALL, small_raw)
    log = BackendLog()
    with torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(model, backend=make_backend(log=log, config_patches=FAST_CPP), dynamic=True)
        for batch in (2, 3):
            ids = torch.randint(0, SMALL.vocab_size, (batch, 40), generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                want = model(input_ids=ids).logits
                got = compiled(input_ids=ids).logits
            assert rel_err(got, want) <= TOL
    assert_passes_ran(log, "cpu")
    assert all(g.kind == "inference" for g in log.graphs), log.summary()
    assert_every_mhc_boundary_fused(log, SMALL.num_hidden_layers)
    assert log.dynamo_graphs == len(log.graphs), log.summary()  # graph breaks allowed, recompiles not
    print(log.summary())


# ---- what torch.compile graphs bring that captured steps do not ---------------------------------------
def test_aot_autograd_cache_does_not_skip_the_passes():
    """A graph plain Inductor compiled first is in AOTAutograd's cache under the same key; our passes
    must still run on it (and on every later compile)."""
    def f(x):
        return torch.sin(x) * 2 + 1

    x = torch.randn(5, 3)
    torch.compile(f, backend="inductor")(x)
    torch._dynamo.reset()
    log = BackendLog()
    got = torch.compile(f, backend=make_backend(log=log))(x)
    assert rel_err(got, f(x)) <= TOL
    assert_passes_ran(log, "cpu", graphs=1)


def test_graph_break_on_item():
    """`.item()` breaks the graph; Dynamo may restart the analysis of the graph after it (torch 2.13
    specialises the float and aborts one backend call, counted in `dynamo_aborted`). Every graph that
    did compile went through the passes, and the results stay right."""
    def f(x):
        scale = float(x.sum().item() > 0) + 1.0
        return x * scale

    log = BackendLog()
    compiled = torch.compile(f, backend=make_backend(log=log), dynamic=True)
    x = torch.randn(4, 3)
    assert rel_err(compiled(x), f(x)) <= TOL
    assert log.dynamo_graphs == len(log.graphs) >= 1, log.summary()


def test_in_place_update_returning_nothing():
    """A function that only writes into its input: the aten graph returns the new value for AOTAutograd
    to copy back; the passes must keep that write (and the input's SymInt sizes) intact."""
    def f(acc, x):
        acc.add_(x.relu() * 2)

    log = BackendLog()
    compiled = torch.compile(f, backend=make_backend(log=log), dynamic=True)
    for rows in (3, 6):
        acc, x = torch.randn(rows, 4), torch.randn(rows, 4)
        want = acc.clone()
        f(want, x)
        assert compiled(acc, x) is None
        assert rel_err(acc, want) <= TOL
    assert_passes_ran(log, "cpu", graphs=1)


def test_memory_planning_skips_graphs_with_sizes_beyond_the_batch():
    """torch.compile graphs often have several dynamic sizes; a plan is a polynomial in B only."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda a, b: (a @ b).relu() + 1, tracing_mode="symbolic")(torch.randn(3, 4), torch.randn(4, 5))
    gm, record = memory_planning(gm, PassContext())
    assert record.matches == 0 and record.description.startswith("skipped"), record
    assert "dsv4c_memory_plan" not in gm.meta


def test_higher_order_ops_pass_lint_and_constants_are_lifted():
    """`torch.cond` stays an opaque higher-order op through the pipeline; the folded constant ends up
    behind `aten.lift_fresh`, the form Inductor's FakeTensor propagation accepts."""
    class M(torch.nn.Module):
        def forward(self, x):
            table = torch.arange(4.0) / 4  # folded by constant_folding
            return torch.cond(x.sum() > 0, lambda y: y.sin(), lambda y: y.cos(), (x * table,))

    x = torch.randn(3, 4)
    gm = torch.export.export(M(), (x,)).graph_module
    gm, records = optimise(gm, "cpu", PassContext())
    assert {r.name: r.matches for r in records}["constant_folding"] >= 1
    assert lift_constants(gm) >= 1
    assert any(n.target is torch.ops.aten.lift_fresh.default for n in gm.graph.nodes)
    assert rel_err(gm(x)[0], M()(x)) <= TOL
