"""`torch.compile(model, backend="dsv4c")`: dsv4c's passes inside Inductor's pipeline.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml), so `backend="dsv4c"` works
without importing dsv4c. Dynamo hands the backend a torch-level graph (one per graph-break region);
Inductor's `compile_fx` lowers it with AOTAutograd to the aten graph our passes are written for, calls our
`inner_compile` on it (once for an inference graph, or for a forward and later a backward graph when
gradients are needed), where the target's pipeline runs, and then compiles what the passes left with
Inductor's own `compile_fx_inner`. Dynamic shapes pass through: the passes work on symbolic sizes, and
SymInt inputs stay placeholders (the passes never add, remove or reorder placeholders).

Choosing the target: `make_backend(target="h100")`, or `torch.compile(m, backend="dsv4c",
options={"target": "h100"})`; other `options` keys and `mode` are Inductor's (config patches).

What the passes did lands in a `BackendLog` (one `GraphLog` per aten graph) when one is passed to
`make_backend`; `DSV4C_DUMP=1` prints each pass as it runs.

AOTAutograd's cache is bypassed while we compile: its key does not include the inner compiler, so a
warm cache would hand back a graph compiled earlier by plain Inductor or for another target, with our
passes never run. Inductor's FX graph cache stays on: its key is the graph after our passes.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch._functorch.config
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from dsv4c.passes.manager import PassContext, PassRecord
from dsv4c.passes.pipeline import canonical_target, optimise

DEFAULT_TARGET = "cpu"
aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class GraphLog:
    """One aten graph Inductor handed us: what it held and what each pass did to it."""

    index: int
    kind: str  # "inference", "forward" or "backward"
    target: str
    inputs: int
    symbolic_inputs: int  # SymInt placeholders (dynamic sizes passed as values)
    symbols: tuple[str, ...]  # free symbols of the input sizes
    nodes_before: int  # before the passes
    nodes_after: int  # after the passes (before lift_constants)
    ops_before: int  # call_function nodes
    ops_after: int
    constants_lifted: int  # get_attr tensors then routed through aten.lift_fresh for Inductor
    records: tuple[PassRecord, ...]
    wall_s: float

    def matches(self) -> dict[str, int]:
        """Pass name -> matches on this graph."""
        return {r.name: r.matches for r in self.records}

    def summary(self) -> str:
        matched = ", ".join(f"{r.name} {r.matches}" for r in self.records if r.matches)
        return (f"graph {self.index} ({self.kind}, {self.target}): {self.inputs} inputs "
                f"({self.symbolic_inputs} SymInt; symbols {', '.join(self.symbols) or 'none'}), nodes "
                f"{self.nodes_before} -> {self.nodes_after}, ops {self.ops_before} -> {self.ops_after}; "
                f"matches: {matched or 'none'} ({self.wall_s * 1e3:.0f} ms)")


@dataclasses.dataclass
class BackendLog:
    """Every graph the backend compiled: `dynamo_graphs` counts Dynamo's graphs (one per region between
    graph breaks, and one per recompile); `dynamo_aborted` the compiles that raised, mostly Dynamo restarting
    its analysis (a Python float or an `.item()` it decided to specialise; real errors propagate);
    `graphs` holds one `GraphLog` per aten graph our passes ran on (a forward and a backward graph for a
    Dynamo graph that needs gradients)."""

    dynamo_graphs: int = 0
    dynamo_aborted: int = 0
    graphs: list[GraphLog] = dataclasses.field(default_factory=list)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, aborted: bool) -> None:
        with self._lock:
            if aborted:
                self.dynamo_aborted += 1
            else:
                self.dynamo_graphs += 1

    def add(self, **fields: Any) -> GraphLog:
        with self._lock:
            entry = GraphLog(index=len(self.graphs), **fields)
            self.graphs.append(entry)
            return entry

    def matches(self) -> dict[str, int]:
        """Pass name -> matches summed over every graph."""
        total: collections.Counter = collections.Counter()
        for graph in self.graphs:
            total.update(graph.matches())
        return dict(total)

    def summary(self) -> str:
        lines = [f"{self.dynamo_graphs} dynamo graphs ({self.dynamo_aborted} aborted compiles), "
                 f"{len(self.graphs)} aten graphs through dsv4c's passes"]
        return "\n".join(lines + [g.summary() for g in self.graphs])


def make_backend(target: str = DEFAULT_TARGET, log: BackendLog | None = None,
                 config_patches: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """A Dynamo backend running `target`'s pipeline (`cpu`, `h100`, `sm_90a`, `gb300`, ...) before
    Inductor; each graph's records land in `log` when one is given. `config_patches` are Inductor's."""
    canonical_target(target)  # an unknown target fails here, not at the first compile
    patches = dict(config_patches or {})

    def inner_compile(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        from torch._inductor.compile_fx import compile_fx_inner

        start = time.perf_counter()
        inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        nodes_before, ops_before = len(gm.graph.nodes), _ops(gm)
        with unset_fake_temporarily():  # AOTAutograd leaves its FakeTensorMode active: constant folding
            gm, records = optimise(gm, target, PassContext(target=target))  # must compute real values
        nodes_after, ops_after = len(gm.graph.nodes), _ops(gm)
        lifted = lift_constants(gm)
        if log is not None:
            log.add(kind=_kind(kwargs), target=target, inputs=len(inputs),
                    symbolic_inputs=sum(isinstance(n.meta.get("val"), torch.SymInt) for n in inputs),
                    symbols=_input_symbols(inputs), nodes_before=nodes_before, nodes_after=nodes_after,
                    ops_before=ops_before, ops_after=ops_after, constants_lifted=lifted, records=tuple(records),
                    wall_s=time.perf_counter() - start)
        return compile_fx_inner(gm, example_inputs, **kwargs)

    def backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                options: Mapping[str, Any] | None = None) -> Any:
        from torch._inductor.compile_fx import compile_fx

        extra = inductor_patches(mode, options, target)
        try:
            with torch._functorch.config.patch(enable_autograd_cache=False):
                compiled = compile_fx(gm, example_inputs, inner_compile=inner_compile,
                                      config_patches={**patches, **extra} or None)
        except Exception:
            if log is not None:
                log.count(aborted=True)
            raise
        if log is not None:
            log.count(aborted=False)
        return compiled

    backend.target = target  # type: ignore[attr-defined]
    return backend


def dsv4c_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                  options: Mapping[str, Any] | None = None) -> Any:
    """The registered backend: `options={"target": ...}` picks the target (default cpu); `mode` and the
    other `options` are Inductor's, as for `backend="inductor"`."""
    options = dict(options or {})
    target = options.pop("target", DEFAULT_TARGET)
    return make_backend(target, config_patches=inductor_patches(mode, options, target))(gm, example_inputs)


def inductor_patches(mode: str | None, options: Mapping[str, Any] | None, target: str) -> dict[str, Any]:
    """Inductor config patches from torch.compile's `mode` and `options` (as `backend="inductor"` reads
    them); a `target` in `options` must agree with the backend's own."""
    options = dict(options or {})
    asked = options.pop("target", target)
    if asked != target:
        raise ValueError(f"dsv4c backend: options target {asked!r} conflicts with the backend's {target!r}; "
                         f"pass the target to make_backend")
    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options
        patches.update(list_mode_options(mode))
    patches.update(options)
    return patches


def lift_constants(gm: fx.GraphModule) -> int:
    """Route every constant tensor (`get_attr`) that an op reads directly through `aten.lift_fresh`, the
    form AOTAutograd gives constants (`lift_fresh_copy` for 0-d ones): Inductor re-runs FakeTensorProp in a
    mode that refuses real tensors except through the lift ops, and lowers `lift_fresh` to nothing. Our
    passes leave bare constants: constant folding's new buffers, and noop_removal drops `lift_fresh_copy`
    of constants nobody writes. Returns how many constants were lifted."""
    lifted = 0
    lift_ops = (aten.lift_fresh.default, aten.lift_fresh_copy.default)
    for node in list(gm.graph.nodes):
        value = _fetch(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(value, torch.Tensor):
            continue
        readers = [u for u in node.users if not (u.op == "call_function" and u.target in lift_ops)]
        if not readers:
            continue
        # a 0-d constant becomes an inlined scalar in Inductor, which only lift_fresh_copy's lowering takes
        op = aten.lift_fresh_copy.default if value.dim() == 0 else aten.lift_fresh.default
        with gm.graph.inserting_after(node):
            lift = gm.graph.call_function(op, (node,))
        if "val" in node.meta:
            lift.meta["val"] = node.meta["val"]
        for user in readers:
            user.replace_input_with(node, lift)
        lifted += 1
    if lifted:
        gm.recompile()
    return lifted


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _kind(kwargs: Mapping[str, Any]) -> str:
    if kwargs.get("is_backward"):
        return "backward"
    return "inference" if kwargs.get("is_inference") else "forward"


def _ops(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def _input_symbols(inputs: list[fx.Node]) -> tuple[str, ...]:
    symbols: set[str] = set()
    for node in inputs:
        val = node.meta.get("val")
        sizes = [val] if isinstance(val, torch.SymInt) else list(val.shape) if isinstance(val, torch.Tensor) else []
        for size in sizes:
            if isinstance(size, torch.SymInt):
                symbols |= {str(s) for s in size.node.expr.free_symbols}
    return tuple(sorted(symbols))
