"""Capture the reference model's step into a flat torch.fx graph with torch.export.

Weights enter in the release's packed formats (FP8 e4m3 / MXFP4 int8 with e8m0 `.scale`s): the step
begins by decoding them, so the graph holds the whole computation from the bytes on disk, and later passes
can fuse each decode into the matmul that consumes it instead of keeping dequantised copies. MXFP4 routed
experts are never decoded in the graph: each MoE layer's routed experts are one `dsv4c::routed_moe` call on
the packed per-expert tensors (codegen/routed_moe.py), which reads only the experts the tokens selected.
Routed experts given otherwise (FP8, bf16, or weights already decoded) run as the model's own
`routed_experts` traces: every expert on every token, with a routing weight of zero where not selected.

A `CapturedStep` is one compiled variant: the main step with T tokens per sequence (1 for plain decode,
1 + k for MTP verification, a chunk for prefill) or the MTP module's step. Its graph is flat:
- placeholders, in `input_names` order: `weights.<checkpoint name>`, `state.<state name>`, `tokens`,
  `start` (and `hidden` for the MTP step);
- constants the model creates (lookup tables) are `get_attr` buffers of the GraphModule;
- the output is a tuple in `output_names` order: `logits`, `hidden`, `state.<state name>`.
The batch size is one symbolic dimension (a sympy symbol in every `meta["val"]`); T is fixed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import torch
from torch.export import Dim, export

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops the captured graph calls)
from dsv4c.model.config import ModelConfig
from dsv4c.model.step import dequantize_weights, forward, init_state, mtp_forward, state_shapes
from dsv4c.model.numerics import Numerics

MAX_BATCH = 4096
STEP_KINDS = ("main", "mtp")
ROUTED_EXPERT_TENSOR = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.(weight|scale)$")


@dataclasses.dataclass(frozen=True)
class StepVariant:
    """Which step a graph computes: `kind` main or mtp, with `tokens` tokens per sequence."""

    kind: str
    tokens: int

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS or self.tokens < 1:
            raise ValueError(f"step variant: got {self.kind!r} x {self.tokens}; allowed: {STEP_KINDS} x >= 1")

    @property
    def name(self) -> str:
        return f"{self.kind}_t{self.tokens}"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: its shape with `None` for the batch dim, its dtype."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d is None else d for d in self.shape)


@dataclasses.dataclass
class CapturedStep:
    """A captured step variant: the flat graph, its input/output names and the input specs."""

    variant: StepVariant
    graph_module: torch.fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    input_specs: dict[str, InputSpec]
    max_seq_len: int


class _Step(torch.nn.Module):
    """The functional step as a module for torch.export (weights and state arrive as dicts). With
    `packed_experts` the routed experts are `dsv4c::routed_moe` calls on their MXFP4 tensors."""

    def __init__(self, cfg: ModelConfig, num: Numerics, variant: StepVariant, packed_experts: bool):
        super().__init__()
        self.cfg, self.num, self.variant, self.packed_experts = cfg, num, variant, packed_experts

    def forward(self, packed, state, tokens, start, hidden=None):
        kernels = {}
        if self.packed_experts:
            kernels["routed"] = PackedRoutedExperts(packed)
            packed = {k: v for k, v in packed.items() if not ROUTED_EXPERT_TENSOR.search(k)}
        weights = dequantize_weights(packed, self.num, fp8=_fp8_op, fp4=_fp4_op)
        if self.variant.kind == "main":
            return forward(weights, state, tokens, start, self.cfg, self.num, **kernels)
        return mtp_forward(weights, state, tokens, hidden, start, self.cfg, self.num, **kernels)


def has_packed_experts(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether `weights` hold the routed experts in MXFP4 (int8 with e8m0 `.scale`s), which
    `dsv4c::routed_moe` reads (not when they are FP8, bf16, or already decoded)."""
    names = [name for name in weights if ROUTED_EXPERT_TENSOR.search(name) and name.endswith(".weight")]
    return bool(names) and all(weights[name].dtype == torch.int8 and name[:-len("weight")] + "scale" in weights
                               for name in names)


@dataclasses.dataclass(frozen=True)
class PackedRoutedExperts:
    """The model's `RoutedExperts` (model/layers.py) as one `dsv4c::routed_moe` call a layer, on the packed
    MXFP4 tensors of `packed` (the step's weight inputs, by checkpoint name)."""

    packed: Mapping[str, torch.Tensor]

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w: Mapping[str, torch.Tensor],
                 prefix: str, cfg: ModelConfig, num: Numerics) -> torch.Tensor:
        experts = [f"{prefix}experts.{e}." for e in range(cfg.n_routed_experts)]
        lists = [[self.packed[e + name] for e in experts]
                 for name in ("w1.weight", "w1.scale", "w3.weight", "w3.scale", "w2.weight", "w2.scale")]
        return torch.ops.dsv4c.routed_moe(x, ids, weights, *lists, cfg.swiglu_limit, num.act_quant)


def _fp8_op(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.dsv4c.dequant_fp8_weight(weight, scale, torch.float32)


def _fp4_op(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.dsv4c.dequant_fp4_weight(weight, scale, torch.float32)


def input_specs(cfg: ModelConfig, num: Numerics, weights: Mapping[str, torch.Tensor], variant: StepVariant,
                max_seq_len: int) -> dict[str, InputSpec]:
    """Name -> spec of every graph input, in placeholder order."""
    specs = {f"weights.{k}": InputSpec(tuple(v.shape), v.dtype) for k, v in weights.items()}
    example = init_state(cfg, 1, max_seq_len, num, device="meta")
    for name in state_shapes(cfg, 1, max_seq_len):
        specs[f"state.{name}"] = InputSpec((None,) + tuple(example[name].shape[1:]), example[name].dtype)
    specs["tokens"] = InputSpec((None, variant.tokens), torch.int64)
    specs["start"] = InputSpec((None,), torch.int64)
    if variant.kind == "mtp":
        specs["hidden"] = InputSpec((None, variant.tokens, cfg.hc_mult, cfg.hidden_size), num.dtype)
    return specs


def capture(cfg: ModelConfig, num: Numerics, weights: Mapping[str, torch.Tensor], variant: StepVariant,
            max_seq_len: int) -> CapturedStep:
    """Export one step variant with a symbolic batch size. `weights` are the checkpoint's tensors in their
    release formats (as `Checkpoint.get` returns them); they only lend their shapes and dtypes."""
    specs = input_specs(cfg, num, weights, variant, max_seq_len)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    example = {name: _example(spec, name) for name, spec in specs.items()}
    w = {n[len("weights."):]: t for n, t in example.items() if n.startswith("weights.")}
    s = {n[len("state."):]: t for n, t in example.items() if n.startswith("state.")}
    args = (w, s, example["tokens"], example["start"])
    dynamic = ({k: None for k in w}, {k: {0: batch} for k in s}, {0: batch}, {0: batch})
    if variant.kind == "mtp":
        args, dynamic = args + (example["hidden"],), dynamic + ({0: batch},)
    step = _Step(cfg, num, variant, has_packed_experts(weights))
    program = export(step, args, dynamic_shapes=dynamic, strict=False)
    state_names = list(s)
    outputs = ["logits", "hidden"] + [f"state.{k}" for k in state_names]
    return CapturedStep(variant, flat_graph_module(program), list(specs), outputs, specs, max_seq_len)


def _example(spec: InputSpec, name: str) -> torch.Tensor:
    """An example input of batch 2 (export specialises sizes 0 and 1). Export traces shapes on fake tensors and
    reads no value: weights are left unwritten (a checkpoint's worth of untouched pages, not 18 GB of zeros at
    Flash size), the rest are zeros (token ids, positions and expert ids always in range)."""
    if name.startswith("weights."):
        return torch.empty(spec.concrete(2), dtype=spec.dtype)
    return torch.zeros(spec.concrete(2), dtype=spec.dtype)


def flat_graph_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The exported graph with user inputs as the only placeholders and lifted constants as buffers."""
    gm = program.graph_module
    signature = program.graph_signature
    constant_of = dict(signature.inputs_to_lifted_tensor_constants)
    constant_of.update(signature.inputs_to_buffers)
    constant_of.update(signature.inputs_to_parameters)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "placeholder" or node.name not in constant_of:
            continue
        target = constant_of[node.name]
        value = program.constants.get(target)
        if value is None:
            value = program.state_dict[target]
        attr = target.replace(".", "_")
        gm.register_buffer(attr, value.detach().clone())
        with graph.inserting_before(node):
            replacement = graph.get_attr(attr)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    _flatten_output(graph)
    gm.recompile()
    return gm


def _flatten_output(graph: torch.fx.Graph) -> None:
    """Make the output a flat tuple (export flattens already; this keeps the contract explicit)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = output.args[0]
    flat, _ = torch.utils._pytree.tree_flatten(values)
    output.args = (tuple(flat),)
