"""Which fused op (or the step's graph itself) launched the step's small aten kernels: the profile lines of
`dsv4c bench --profile` that say where the time outside the fused ops comes from.

An aten op counts where it is outermost (its caller is not an aten op: the kernels of `aten::to`'s inner
`aten::copy_` count for `aten::to`); its caller is its nearest `dsv4c::` ancestor in the profile's call tree, or
"the graph" where the plan called it directly. Works on any torch.profiler event list: the GPU bench passes each
event's device time, the CPU test its CPU time."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

GRAPH = "the graph"


def _caller(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("dsv4c::"):
            return parent.name
        parent = parent.cpu_parent
    return GRAPH


def aten_by_caller(events: Iterable, time_of: Callable[[object], float], top: int = 12) -> list[str]:
    """Lines `us calls aten-op  in caller`, most time first: the outermost aten ops of `events` (FunctionEvents)
    summed by (op, caller), `time_of(event)` an event's time including its children's, in us."""
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for event in events:
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        spent = time_of(event)
        if spent > 0:
            entry = totals[(event.name, _caller(event))]
            entry[0] += spent
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:top]
    return [f"  {us:10.1f}  {int(calls):5d}  {name} in {caller}" for (name, caller), (us, calls) in ranked]
