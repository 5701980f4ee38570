"""The pass pipeline of each target: one short ordered list, each entry with the reason for its place.

Targets are data: `PIPELINES` maps a target name (and its aliases) to its list. For now every target runs
the same passes: cleanup, mhc_fusion (its ops' lowering per target comes from the target table), folding and
planning; moe_fp4 and kv_compression will slot in between CSE/constant folding and shape propagation.
"""

from __future__ import annotations

import torch.fx as fx

from dsv4c.passes.constant_folding import constant_folding
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.manager import PassContext, PassRecord, PipelineEntry, run_pipeline
from dsv4c.passes.memory_planning import memory_planning
from dsv4c.passes.mhc_fusion import mhc_fusion
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.shape_propagation import shape_propagation
from dsv4c.codegen import targets as target_table

CLEANUP_AND_PLANNING = (
    PipelineEntry("noop_removal", noop_removal,
                  "first: ~700 metadata asserts and no-op casts hide duplicates and keep dead nodes alive"),
    PipelineEntry("dead_code", dead_code,
                  "drops what the asserts kept alive and the unused branches (MTP weights in the main step)"),
    PipelineEntry("cse", cse, "on the cleaned graph, so duplicates that differed by a no-op cast merge"),
    PipelineEntry("mhc_fusion", mhc_fusion,
                  "after cleanup (one node per value, no asserts between ops), before folding touches weights"),
    PipelineEntry("constant_folding", constant_folding, "after CSE, so each duplicated table folds once"),
    PipelineEntry("dead_code_after_folding", dead_code, "removes folded subgraphs' leftovers and unused buffers"),
    PipelineEntry("shape_propagation", shape_propagation,
                  "after all rewrites: gives new nodes metadata, and every node sympy shapes in B"),
    PipelineEntry("memory_planning", memory_planning, "last: needs the final node order and shapes"),
)

TARGET_ALIASES = target_table.alias_table()  # codegen/targets.py is the source of truth for names and aliases

PIPELINES: dict[str, tuple[PipelineEntry, ...]] = {
    "cpu": CLEANUP_AND_PLANNING,
    "sm_90a": CLEANUP_AND_PLANNING,
    "sm_100a": CLEANUP_AND_PLANNING,
    "sm_103a": CLEANUP_AND_PLANNING,
}


def canonical_target(target: str) -> str:
    """The target's architecture name (`h100` -> `sm_90a`); a clear error for an unknown one."""
    return target_table.target(target).name


def pipeline_for(target: str) -> list[PipelineEntry]:
    """The ordered (name, pass, reason) entries for `target`."""
    return list(PIPELINES[canonical_target(target)])


def optimise(gm: fx.GraphModule, target: str, ctx: PassContext) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `target`'s pipeline over `gm` (in place where the passes allow) with lint and checks."""
    return run_pipeline(gm, pipeline_for(target), ctx)
