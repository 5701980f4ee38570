"""compiler/profile_attribution.py on a CPU profile (the bench passes device times on the GPU): a fused op's inner
aten ops are charged to it, the graph's own aten ops to the graph, each counted at its outermost aten op."""

import torch
from torch.profiler import ProfilerActivity, profile

from dsv4c.codegen import ops  # noqa: F401  (registers the dsv4c ops)
from dsv4c.compiler.profile_attribution import GRAPH, aten_by_caller


def test_aten_ops_are_charged_to_the_fused_op_or_the_graph_that_called_them():
    x, weight = torch.randn(4, 64), torch.ones(64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            y = torch.ops.dsv4c.rms_norm(x, weight, 1e-6)
            y.clamp(max=1.0)
    lines = aten_by_caller(prof.events(), lambda e: e.cpu_time_total, top=50)
    pairs = {(line.split()[2], line.split(" in ", 1)[1]): int(line.split()[1]) for line in lines}
    assert pairs[("aten::clamp", GRAPH)] == 3
    assert pairs[("aten::rsqrt", "dsv4c::rms_norm")] == 3  # model/layers' RMSNorm, run by the op's CPU kernel
    assert not any(name in ("aten::copy_", "aten::_to_copy") for name, _ in pairs)  # inner ops count for aten::to
    assert all(float(line.split()[0]) > 0 for line in lines)
