"""Memory planning: reuse intermediate buffers over the graph order, with sizes symbolic in the batch.

Pattern: every intermediate tensor that owns its storage (a `call_function` result that is not a view of,
or an in-place write into, another node's storage) is a buffer. Views and in-place results are aliases:
they extend their owner's live range. Buffers that are, or are aliased by, graph outputs are not planned
(they live in the caller's output buffers), nor are inputs, weights and constant buffers.
Each buffer lives from its defining node (for a getitem, the multi-output op) to its family's last reader.
Buffers go in graph order to pool slots: a slot is free once its last tenant's range has ended; a free slot
is taken when its size is provably >= the buffer's for every B >= 1 (best fit), grown when the buffer is
provably >= the slot, otherwise a new slot opens. Sizes are `numel * itemsize` as sympy polynomials in B.

The plan (`MemoryPlan`, JSON-serialisable) goes to `gm.meta["dsv4c_memory_plan"]`; the graph is unchanged.
Before: shape_propagation (its work is redone here if it has not run or a later pass added nodes). Where: last - any later rewrite invalidates it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import sympy
import torch
import torch.fx as fx

from dsv4c.passes.manager import PassContext, PassRecord, make_record
from dsv4c.passes.op_facts import MAY_ALIAS_OR_COPY, alias_source, count_nodes, is_getitem, tensor_val
from dsv4c.passes.shape_propagation import BATCH, annotate_shapes, nodes_without_val, refresh_fake_values

REPORT_BATCHES = (1, 8, 64)


@dataclasses.dataclass(frozen=True)
class Buffer:
    """An intermediate that owns storage: its size in bytes and live range [start, end] in node order."""

    size: sympy.Expr
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Which pool slot holds each buffer, the slot sizes, and peak bytes with and without reuse."""

    slot_of: dict[str, int]
    slot_sizes: tuple[sympy.Expr, ...]
    buffers: dict[str, Buffer]
    peak: sympy.Expr
    no_reuse: sympy.Expr
    batch_symbol: str = str(BATCH)

    def peak_bytes(self, batch: int) -> int:
        return _at(self.peak, batch)

    def no_reuse_bytes(self, batch: int) -> int:
        return _at(self.no_reuse, batch)

    def live_bytes(self, batch: int) -> int:
        """The most bytes live at once: a lower bound for any plan of this order."""
        events: dict[int, int] = {}
        for b in self.buffers.values():
            size = _at(b.size, batch)
            events[b.start] = events.get(b.start, 0) + size
            events[b.end + 1] = events.get(b.end + 1, 0) - size
        live = peak = 0
        for position in sorted(events):
            live += events[position]
            peak = max(peak, live)
        return peak

    def to_json(self) -> dict[str, Any]:
        return {"batch_symbol": self.batch_symbol, "slot_of": dict(self.slot_of),
                "slot_sizes": [str(s) for s in self.slot_sizes], "peak": str(self.peak),
                "no_reuse": str(self.no_reuse),
                "buffers": {k: [str(b.size), b.start, b.end] for k, b in self.buffers.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MemoryPlan":
        parse = _parser(data["batch_symbol"])
        buffers = {k: Buffer(parse(s), start, end) for k, (s, start, end) in data["buffers"].items()}
        return cls(dict(data["slot_of"]), tuple(parse(s) for s in data["slot_sizes"]), buffers,
                   parse(data["peak"]), parse(data["no_reuse"]), data["batch_symbol"])

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def memory_planning(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PassRecord]:
    """Plan buffer reuse and store the plan on `gm.meta["dsv4c_memory_plan"]`."""
    before = count_nodes(gm)
    if nodes_without_val(gm):
        refresh_fake_values(gm)
    if any(tensor_val(n) is not None and "dsv4c_shape" not in n.meta for n in gm.graph.nodes):
        annotate_shapes(gm)
    others = sorted(map(str, set().union(*(b.size.free_symbols for b in find_buffers(gm).values())) - {BATCH}))
    if others:  # torch.compile graphs: several dynamic dims, unbacked sizes; a plan is a polynomial in B only
        gm.meta.pop("dsv4c_memory_plan", None)
        return gm, make_record("memory_planning", before, gm, 0,
                               f"skipped: buffer sizes depend on {', '.join(others)} besides {BATCH}",
                               skipped=others)
    plan = plan_memory(gm)
    gm.meta["dsv4c_memory_plan"] = plan
    at = {b: (plan.peak_bytes(b), plan.no_reuse_bytes(b)) for b in REPORT_BATCHES}
    numbers = ", ".join(f"B={b}: {p} vs {n} bytes" for b, (p, n) in at.items())
    return gm, make_record("memory_planning", before, gm, len(plan.buffers),
                           f"{len(plan.buffers)} buffers in {len(plan.slot_sizes)} slots, peak {plan.peak} "
                           f"bytes ({numbers} without reuse)",
                           slots=len(plan.slot_sizes), peak=str(plan.peak), no_reuse=str(plan.no_reuse),
                           peak_polynomial=peak_polynomial(plan),
                           bytes_at={b: p for b, (p, _) in at.items()},
                           no_reuse_bytes_at={b: n for b, (_, n) in at.items()})


def peak_polynomial(plan: MemoryPlan) -> list[int]:
    """The peak bytes as integer coefficients of 1, B, B^2, ... (the runtime evaluates it without sympy)."""
    return [int(c) for c in reversed(sympy.Poly(plan.peak, BATCH).all_coeffs())]


def plan_memory(gm: fx.GraphModule) -> MemoryPlan:
    """Buffers and their live ranges, then greedy-by-size slot assignment (largest buffers first)."""
    buffers = find_buffers(gm)
    slots: list[_Slot] = []
    slot_of: dict[str, int] = {}
    for name, buf in sorted(buffers.items(), key=lambda kv: _largest_first(kv[1], kv[0])):
        slot_of[name] = _take_slot(slots, buf)
    sizes = tuple(s.size for s in slots)
    return MemoryPlan(slot_of, sizes, buffers, sympy.expand(sum(sizes, sympy.Integer(0))),
                      sympy.expand(sum((b.size for b in buffers.values()), sympy.Integer(0))))


def _largest_first(buf: Buffer, name: str) -> tuple:
    return (-_at(buf.size, REPORT_BATCHES[-1]), -_at(buf.size, 1), buf.start, name)


def find_buffers(gm: fx.GraphModule) -> dict[str, Buffer]:
    """Name -> Buffer for every planned intermediate (storage owners not reachable from the output)."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    owner: dict[fx.Node, fx.Node] = {}
    end: dict[fx.Node, int] = {}
    for node in nodes:
        owner[node] = _owner(node, owner)
        root = owner[node]
        last = max((order[u] for u in node.users), default=order[node])
        end[root] = max(end.get(root, order[root]), last)
    output = next(n for n in reversed(nodes) if n.op == "output")
    escaping = {owner[n] for n in output.all_input_nodes}
    buffers = {}
    for node in nodes:
        if owner[node] is node and node.op == "call_function" and node not in escaping and tensor_val(node) is not None:
            start = order[node.args[0]] if is_getitem(node) else order[node]
            buffers[node.name] = Buffer(_bytes(node), start, end[node])
    return buffers


def _owner(node: fx.Node, owner: dict[fx.Node, fx.Node]) -> fx.Node:
    """The storage owner: views and in-place results share their source's; a may-alias op (`to`,
    `reshape`, `contiguous`) does when its FakeTensor shares the source's storage."""
    source = alias_source(node)
    if source is None or source not in owner:
        return node
    if node.op == "call_function" and node.target in MAY_ALIAS_OR_COPY:
        mine, theirs = tensor_val(node), tensor_val(source)
        if mine is not None and theirs is not None and (mine.dtype != theirs.dtype or not _same_storage(mine, theirs)):
            return node
    return owner[source]


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage()._cdata == b.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return True  # unknown: assume the schema's alias is real (keeps the owner alive longer, safe)


def _bytes(node: fx.Node) -> sympy.Expr:
    shape = node.meta.get("dsv4c_shape")
    val = tensor_val(node)
    numel = sympy.Mul(*shape) if shape else sympy.Integer(1)
    return sympy.expand(numel * val.element_size())


@dataclasses.dataclass
class _Slot:
    """A pool slot while planning: its size (and its polynomial form) and the ranges of its tenants."""

    size: sympy.Expr
    coefficients: tuple[int, ...] | None
    ranges: list[tuple[int, int]]

    def free_during(self, buf: Buffer) -> bool:
        return all(end < buf.start or buf.end < start for start, end in self.ranges)


def _take_slot(slots: list[_Slot], buf: Buffer) -> int:
    """The first slot free during the buffer's range that provably fits it for all B >= 1, else a new one.

    Buffers come largest first, so earlier slots are the larger ones and first fit is close to best fit.
    """
    need = _coefficients(buf.size)
    for index, slot in enumerate(slots):
        if slot.free_during(buf) and _provably_ge(slot.coefficients, need, slot.size, buf.size):
            slot.ranges.append((buf.start, buf.end))
            return index
    slots.append(_Slot(buf.size, need, [(buf.start, buf.end)]))
    return len(slots) - 1


def _coefficients(size: sympy.Expr) -> tuple[int, ...] | None:
    """Integer coefficients of `size` as a polynomial in x = B - 1 (lowest first), or None if not one."""
    if size.free_symbols - {BATCH}:
        return None
    try:
        poly = sympy.Poly(sympy.expand(size.subs(BATCH, BATCH + 1)), BATCH)
    except sympy.PolynomialError:
        return None
    coeffs = poly.all_coeffs()[::-1]
    return tuple(int(c) for c in coeffs) if all(c.is_integer for c in coeffs) else None


def _provably_ge(a: tuple[int, ...] | None, b: tuple[int, ...] | None, a_expr: sympy.Expr,
                 b_expr: sympy.Expr) -> bool:
    """a >= b for every B >= 1: all coefficients of a - b in (B - 1) are >= 0 (or the exprs are equal)."""
    if a is None or b is None:
        return a_expr == b_expr
    width = max(len(a), len(b))
    return all(x - y >= 0 for x, y in zip(a + (0,) * (width - len(a)), b + (0,) * (width - len(b))))


def _at(expr: sympy.Expr, batch: int) -> int:
    return int(expr.xreplace({BATCH: sympy.Integer(batch)}))


_SAFE_EXPR = re.compile(r"[0-9B+\-*/() ]*")


def _parser(batch_symbol: str):
    """Parse size expressions back; only integer arithmetic in B is accepted (sympify evaluates code)."""
    if batch_symbol != str(BATCH):
        raise ValueError(f"memory plan: batch symbol {batch_symbol!r}, expected {BATCH}")

    def parse(text: str) -> sympy.Expr:
        if not isinstance(text, str) or not _SAFE_EXPR.fullmatch(text):
            raise ValueError(f"memory plan: size expression {text!r} is not integer arithmetic in {BATCH}")
        return sympy.sympify(text, locals={str(BATCH): BATCH})
    return parse
