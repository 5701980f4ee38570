"""Run graph passes under their names: lint after each, check numerics in debug mode, dump on request.

A pass is a function `(gm, ctx) -> (gm, PassRecord)` over a flat aten `torch.fx.GraphModule` (the capture
contract: placeholders are the named inputs, constants are `get_attr` buffers, the output is a flat tuple).
`run_pipeline` runs a list of them in order. After every pass the graph must still lint and hold only
OpOverloads, `operator.getitem` and SymInt arithmetic. With `ctx.debug` the graph runs before the first
pass and after each one on the same fresh random inputs (from `ctx.make_inputs`, at `ctx.check_batches`)
and every output is compared with the previous one, so a wrong rewrite is named by the pass that made it.

Debugging: `DSV4C_DUMP=1` prints each pass's match count, node counts and op-count diff to stderr
(read once per `run_pipeline` by `dump_enabled`; tests use `dump_env`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys
import time
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.fx as fx

from dsv4c.passes.op_facts import count_nodes, is_getitem, is_op, is_sym_op

DUMP_ENV = "DSV4C_DUMP"


class PassError(RuntimeError):
    """A pass broke the graph: it no longer lints, or its outputs changed. The message names the pass."""


# Node meta key of a placeholder (value: (encode, decode)) or of the output node (value: {output index: (encode,
# decode)}) whose storage a pass changed (passes/kv_compression.py): encode maps a value of the graph's original
# form to the stored one, decode maps it back. Debug mode's check runs every graph on the original form.
STORED_AS = "dsv4c_stored_as"

@dataclasses.dataclass(frozen=True)
class PassContext:
    """What passes may know: the target, whether to check numerics, how to make inputs, the tolerance.

    `make_inputs(batch)` returns fresh random inputs in placeholder order (None: no numeric checks).
    `output_names` (optional) names the outputs in error messages.
    """

    target: str = "cpu"
    debug: bool = False
    make_inputs: Callable[[int], list[torch.Tensor]] | None = None
    tolerance: float = 1e-5
    check_batches: tuple[int, ...] = (1, 3)
    output_names: tuple[str, ...] | None = None
    moe: str | None = None  # `dsv4c compile --moe` (None: the target table's default, codegen/targets.py)
    cache_roundings: Mapping[str, object] | None = None  # state name -> model/step.py CacheRounding (kv_compression)

    def __post_init__(self) -> None:
        if self.tolerance < 0 or not self.check_batches:
            raise ValueError(f"pass context: tolerance {self.tolerance} must be >= 0 and check_batches non-empty")


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """What one pass did: how many places it matched, node counts, a short description, wall time."""

    name: str
    matches: int
    nodes_before: int
    nodes_after: int
    description: str
    wall_s: float = 0.0
    details: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"details": dict(self.details)}


GraphPass = Callable[[fx.GraphModule, PassContext], "tuple[fx.GraphModule, PassRecord]"]


class PipelineEntry(NamedTuple):
    """One pass of a pipeline with the reason for its place (a `(name, fn, reason)` tuple)."""

    name: str
    fn: GraphPass
    reason: str = ""


def make_record(name: str, nodes_before: int, gm: fx.GraphModule, matches: int, description: str,
                **details: object) -> PassRecord:
    """A record for a pass that has just run on `gm` (the manager fills in the wall time)."""
    return PassRecord(name, matches, nodes_before, count_nodes(gm), description, 0.0, details)


def dump_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `DSV4C_DUMP` asks for per-pass dumps (any value but '', '0', 'false')."""
    return environ.get(DUMP_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def dump_env(enabled: bool = True) -> Iterator[None]:
    """Set or clear `DSV4C_DUMP` for the duration of a block (for tests and notebooks)."""
    old = os.environ.get(DUMP_ENV)
    os.environ[DUMP_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(DUMP_ENV, None)
        else:
            os.environ[DUMP_ENV] = old


def run_pipeline(gm: fx.GraphModule, passes: Sequence[PipelineEntry | tuple | GraphPass],
                 ctx: PassContext) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `passes` (entries, `(name, fn[, reason])` tuples or bare functions) in order; lint after each;
    in debug mode check the outputs after each pass against those before it (the same fresh inputs for
    the whole run, so the first pass whose outputs move is the one named)."""
    dump = dump_enabled()
    entries = [PipelineEntry(*p) if isinstance(p, tuple) else PipelineEntry(p.__name__, p) for p in passes]
    lint_graph(gm, "the input graph")
    checker = _EquivalenceChecker(gm, ctx) if ctx.debug and ctx.make_inputs is not None else None
    records = []
    for entry in entries:
        histogram = op_histogram(gm) if dump else None
        start = time.perf_counter()
        try:
            gm, record = entry.fn(gm, ctx)
        except PassError:
            raise
        except Exception as err:
            raise PassError(f"pass {entry.name}: {type(err).__name__}: {err}") from err
        gm.recompile()
        record = dataclasses.replace(record, name=entry.name, wall_s=time.perf_counter() - start)
        lint_graph(gm, f"pass {entry.name}")
        if checker is not None:
            checker.check(gm, entry.name)
        if dump:
            print(format_dump(record, histogram, op_histogram(gm)), file=sys.stderr)
        records.append(record)
    return gm, records


def lint_graph(gm: fx.GraphModule, where: str) -> None:
    """fx's lint plus the contract: only OpOverloads, getitem and SymInt arithmetic are called, and the
    higher-order ops AOTAutograd leaves in torch.compile graphs (`cond`, `auto_functionalized`, ...), which
    every pass treats as impure and opaque."""
    try:
        gm.graph.lint()
    except Exception as err:
        raise PassError(f"{where}: graph does not lint: {err}") from err
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_method"):
            raise PassError(f"{where}: node {node.name} is a {node.op} ({node.target}); graphs must be flat aten")
        if node.op == "call_function" and not (is_op(node) or is_getitem(node) or is_sym_op(node)
                                               or isinstance(node.target, torch._ops.HigherOrderOperator)):
            raise PassError(f"{where}: node {node.name} calls {node.target!r}, not an aten OpOverload")


def op_histogram(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(_op_name(n) for n in gm.graph.nodes)


def format_dump(record: PassRecord, before: collections.Counter, after: collections.Counter) -> str:
    """One pass's dump: header line, then op counts that changed (largest change first)."""
    lines = [f"[dsv4c] {record.name}: {record.matches} matches, nodes {record.nodes_before} -> "
             f"{record.nodes_after} ({record.wall_s * 1e3:.1f} ms): {record.description}"]
    changes = sorted(((after[k] - before[k], k) for k in before.keys() | after.keys() if after[k] != before[k]),
                     key=lambda c: (-abs(c[0]), c[1]))
    lines += [f"    {delta:+6d}  {name}" for delta, name in changes]
    return "\n".join(lines)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return str(getattr(node.target, "__name__", node.target)) if not is_op(node) else str(node.target)
    return node.op


class _EquivalenceChecker:
    """Holds fresh inputs per batch size and the latest outputs; compares each new graph with them."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        self.ctx = ctx
        self.inputs = {b: list(ctx.make_inputs(b)) for b in ctx.check_batches}
        self.outputs = {b: self._run(gm, b, "the input graph") for b in ctx.check_batches}
        for batch, outs in self.outputs.items():
            for i, out in enumerate(outs):
                if isinstance(out, torch.Tensor) and out.is_floating_point() and torch.isnan(out).any():
                    raise PassError(f"the input graph: {self._name(gm, i)} has NaN at batch {batch}; "
                                    f"make_inputs must give inputs the graph is defined on")

    def check(self, gm: fx.GraphModule, pass_name: str) -> None:
        for batch in self.ctx.check_batches:
            outs = self._run(gm, batch, f"pass {pass_name}")
            ref = self.outputs[batch]
            if len(outs) != len(ref):
                raise PassError(f"pass {pass_name}: {len(outs)} outputs, expected {len(ref)}")
            for i, (got, want) in enumerate(zip(outs, ref)):
                problem = compare_values(got, want, self.ctx.tolerance)
                if problem:
                    raise PassError(f"pass {pass_name}: {self._name(gm, i)} changed at batch {batch}: {problem}")
            self.outputs[batch] = outs

    def _run(self, gm: fx.GraphModule, batch: int, where: str) -> list:
        """The graph's outputs on this batch's inputs, both in the input graph's form: a placeholder or output
        whose storage a pass changed (meta `STORED_AS`: encode, decode) is encoded going in, decoded coming out."""
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in self.inputs[batch]]
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for i, node in enumerate(placeholders):
            if STORED_AS in node.meta:
                args[i] = node.meta[STORED_AS][0](args[i])
        try:
            with torch.no_grad():
                out = gm(*args)
        except Exception as err:
            raise PassError(f"{where}: graph fails to run at batch {batch}: {type(err).__name__}: {err}") from err
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        for i, (_, decode) in gm.graph.output_node().meta.get(STORED_AS, {}).items():
            outs[i] = decode(outs[i])
        return outs

    def _name(self, gm: fx.GraphModule, index: int) -> str:
        names = self.ctx.output_names
        if names is not None and index < len(names):
            return f"output {index} ({names[index]})"
        return f"output {index}"


def compare_values(got: object, want: object, tolerance: float) -> str | None:
    """None when equal: floats by relative norm error <= tolerance (NaN fails), the rest exactly."""
    if not isinstance(want, torch.Tensor):
        return None if got == want else f"value {got!r} != {want!r}"
    if not isinstance(got, torch.Tensor):
        return f"got {type(got).__name__}, expected a tensor"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"shape/dtype {tuple(got.shape)} {got.dtype} != {tuple(want.shape)} {want.dtype}"
    if not (want.is_floating_point() or want.is_complex()):
        return None if torch.equal(got, want) else f"{int((got != want).sum())} elements differ (exact compare)"
    if torch.isnan(got).any():
        return "NaN in output"
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(got[~finite], want[~finite]):
        return "infinities differ"
    diff = (got[finite].double() - want[finite].double()).norm()
    scale = want[finite].double().norm()
    error = float(diff / scale) if scale > 0 else float(diff)
    return None if error <= tolerance else f"relative norm error {error:.3g} > {tolerance:g}"
