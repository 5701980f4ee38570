"""Small graphs for pass tests: torch.export of tiny functions in the capture contract's form.

`export_flat` gives what `compiler.capture` gives for the model: user inputs as the only placeholders (dim 0
of each batched input one symbolic batch size), constants as `get_attr` buffers, a flat output tuple,
FakeTensor `meta["val"]` on every node. `check_pass` runs a pass through the manager in debug mode and
also compares the outputs before and after itself on fresh random inputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch.export import Dim, export

from dsv4c.passes.manager import PassContext, PassRecord, compare_values, run_pipeline


class _Wrap(torch.nn.Module):
    def __init__(self, fn: Callable, buffers: dict[str, torch.Tensor]):
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, *args):
        return self.fn(self, *args)


def export_flat(fn: Callable, example: Sequence[torch.Tensor], batched: Sequence[bool] | None = None,
                buffers: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """Export `fn(module, *inputs)`; `batched[i]` makes dim 0 of input i the shared batch dim."""
    batched = [True] * len(example) if batched is None else list(batched)
    batch = Dim("batch", min=1, max=1024)
    dynamic = tuple({0: batch} if b else None for b in batched)
    program = export(_Wrap(fn, buffers or {}), tuple(example), dynamic_shapes=(dynamic,), strict=False)
    return _flat(program)


def _flat(program: torch.export.ExportedProgram) -> fx.GraphModule:
    gm = program.graph_module
    sig = program.graph_signature
    constant_of = {**sig.inputs_to_lifted_tensor_constants, **sig.inputs_to_buffers, **sig.inputs_to_parameters}
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or node.name not in constant_of:
            continue
        target = constant_of[node.name]
        value = program.constants.get(target, program.state_dict.get(target))
        attr = target.replace(".", "_")
        gm.register_buffer(attr, value.detach().clone())
        with gm.graph.inserting_before(node):
            replacement = gm.graph.get_attr(attr)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def random_inputs(shapes: Sequence[tuple[int, ...]], batched: Sequence[bool] | None = None,
                  dtypes: Sequence[torch.dtype] | None = None) -> Callable[[int], list[torch.Tensor]]:
    """`make_inputs(batch)`: fresh normal inputs; batched inputs get `batch` as dim 0 instead of theirs."""
    batched = [True] * len(shapes) if batched is None else list(batched)
    dtypes = [torch.float32] * len(shapes) if dtypes is None else list(dtypes)

    def make(batch: int) -> list[torch.Tensor]:
        out = []
        for shape, b, dtype in zip(shapes, batched, dtypes):
            size = (batch,) + tuple(shape[1:]) if b else tuple(shape)
            out.append(torch.randn(size).to(dtype) if dtype.is_floating_point else torch.randint(0, 4, size, dtype=dtype))
        return out
    return make


def examples(make: Callable[[int], list[torch.Tensor]]) -> list[torch.Tensor]:
    return make(2)


def check_pass(pass_fn, gm: fx.GraphModule, make_inputs: Callable[[int], list[torch.Tensor]],
               batches: Sequence[int] = (1, 3)) -> tuple[fx.GraphModule, PassRecord]:
    """Run one pass (debug mode checks too) and assert bit-equal outputs before/after on fresh inputs."""
    inputs = {batch: make_inputs(batch) for batch in batches}
    want = {batch: gm(*[x.clone() for x in inputs[batch]]) for batch in batches}
    ctx = PassContext("cpu", True, make_inputs, 0.0, tuple(batches))
    gm, (record,) = run_pipeline(gm, [pass_fn], ctx)
    for batch in batches:
        got = gm(*[x.clone() for x in inputs[batch]])
        assert len(got) == len(want[batch])
        for i, (g, w) in enumerate(zip(got, want[batch])):
            problem = compare_values(g, w, 0.0)
            assert problem is None, f"output {i} at batch {batch}: {problem}"
    return gm, record


def targets(gm: fx.GraphModule) -> list[str]:
    """The call_function targets in graph order, as short strings (for exact structural asserts)."""
    return [str(getattr(n.target, "__name__", n.target)) if not isinstance(n.target, torch._ops.OpOverload)
            else str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def step_input_maker(cfg, weights, step, max_seq_len: int) -> Callable[[int], list[torch.Tensor]]:
    """Fresh inputs for a captured model step at any batch: the given weights, random tokens and positions
    in range, random state."""
    def make(batch: int) -> list[torch.Tensor]:
        values = []
        for name in step.input_names:
            spec = step.input_specs[name]
            if name.startswith("weights."):
                values.append(weights[name[len("weights."):]])
            elif name == "tokens":
                values.append(torch.randint(0, cfg.vocab_size, spec.concrete(batch)))
            elif name == "start":
                values.append(torch.randint(0, max_seq_len - 1, spec.concrete(batch)))
            else:
                values.append(torch.randn(spec.concrete(batch), dtype=spec.dtype))
        return values
    return make
