"""The pass pipeline of each target: one short ordered list, each entry with the reason for its place.

Targets are data: `PIPELINES` maps each target-table name (codegen/targets.py; aliases resolve there) to a named
`Pipeline`. Today one pipeline, `common`, serves every target: cleanup, mhc_fusion (what its fused ops run on each
target is the target table's `mhc_lowering`), folding and planning. A target-specific lowering (the FP4 MoE, KV
compression) gets a pipeline of its own here; the driver optimises once per distinct pipeline and says in the pass
log which targets each one served.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Sequence

import torch.fx as fx

from dsv4c.passes.bf16_linear import bf16_linear
from dsv4c.passes.compressor_fusion import compressor_fusion
from dsv4c.passes.constant_folding import constant_folding
from dsv4c.passes.cse import cse
from dsv4c.passes.dead_code import dead_code
from dsv4c.passes.fp8_grouped_linear import fp8_grouped_linear
from dsv4c.passes.fp8_linear import fp8_linear
from dsv4c.passes.hadamard_rounding import hadamard_rounding
from dsv4c.passes.kv_compression import kv_compression
from dsv4c.passes.lightning_indexer import lightning_indexer
from dsv4c.passes.manager import PassContext, PassRecord, PipelineEntry, run_pipeline
from dsv4c.passes.memory_planning import memory_planning
from dsv4c.passes.mhc_fusion import mhc_fusion
from dsv4c.passes.moe_fp4 import moe_fp4
from dsv4c.passes.noop_removal import noop_removal
from dsv4c.passes.norm_rope_fusion import norm_rope_fusion
from dsv4c.passes.reinplace_state import reinplace_state
from dsv4c.passes.shape_propagation import shape_propagation
from dsv4c.passes.sparse_attention import sparse_attention
from dsv4c.codegen import targets as target_table

CLEANUP_AND_PLANNING = (
    PipelineEntry("noop_removal", noop_removal,
                  "first: ~700 metadata asserts and no-op casts hide duplicates and keep dead nodes alive"),
    PipelineEntry("dead_code", dead_code,
                  "drops what the asserts kept alive and the unused branches (MTP weights in the main step)"),
    PipelineEntry("cse", cse, "on the cleaned graph, so duplicates that differed by a no-op cast merge"),
    PipelineEntry("mhc_fusion", mhc_fusion,
                  "after cleanup (one node per value, no asserts between ops), before folding touches weights"),
    PipelineEntry("fp8_linear", fp8_linear,
                  "after CSE (one decode per weight, one rounding per activation), before folding and shapes"),
    PipelineEntry("fp8_grouped_linear", fp8_grouped_linear,
                  "right after fp8_linear (its parts are fp8_linear nodes on row slices); before folding and shapes"),
    PipelineEntry("moe_fp4", moe_fp4,
                  "after fp8_linear (the shared expert is three fp8_linear nodes); a no-op on cpu unless asked"),
    PipelineEntry("kv_compression", kv_compression,
                  "after cleanup (one rounding per value) and the fusions; before reinplace_state packs in place"),
    PipelineEntry("sparse_attention", sparse_attention,
                  "after kv_compression (reads its packed rows); exact on cpu (the op's reference is `attend`)"),
    PipelineEntry("lightning_indexer", lightning_indexer,
                  "after kv_compression (reads the packed FP4 keys); its ids feed sparse_attention's op either way"),
    PipelineEntry("compressor_fusion", compressor_fusion,
                  "after the packed caches' readers (they match kv_compression's row scatter); writes state in place"),
    PipelineEntry("bf16_linear", bf16_linear,
                  "after the fusions that read bf16-weight products in their patterns (router, compressor, indexer)"),
    PipelineEntry("hadamard_rounding", hadamard_rounding,
                  "after the fusions that read the roundings (indexer, compressor); before norm_rope_fusion"),
    PipelineEntry("norm_rope_fusion", norm_rope_fusion,
                  "after every other fusion (they match norms and ropes inside their own patterns); before folding"),
    PipelineEntry("constant_folding", constant_folding, "after CSE, so each duplicated table folds once"),
    PipelineEntry("dead_code_after_folding", dead_code, "removes folded subgraphs' leftovers and unused buffers"),
    PipelineEntry("reinplace_state", reinplace_state,
                  "after every rewrite of the state's readers: the write must follow its last reader"),
    PipelineEntry("shape_propagation", shape_propagation,
                  "after all rewrites: gives new nodes metadata, and every node sympy shapes in B"),
    PipelineEntry("memory_planning", memory_planning, "last: needs the final node order and shapes"),
)



@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A named, ordered list of passes."""

    name: str
    entries: tuple[PipelineEntry, ...]


COMMON = Pipeline("common", CLEANUP_AND_PLANNING)
PIPELINES: Mapping[str, Pipeline] = types.MappingProxyType({t.name: COMMON for t in target_table.TARGETS})


def canonical_target(target: str) -> str:
    """The target's architecture name (`h100` -> `sm_90a`); a clear error for an unknown one."""
    return target_table.target(target).name


def pipeline_of(target: str) -> Pipeline:
    """The pipeline that serves `target`."""
    return PIPELINES[canonical_target(target)]


def pipeline_for(target: str) -> list[PipelineEntry]:
    """The ordered (name, pass, reason) entries for `target`."""
    return list(pipeline_of(target).entries)


def targets_by_pipeline(targets: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Pipeline name -> the (canonical) targets it serves, in the order given; unknown targets raise."""
    groups: dict[str, tuple[str, ...]] = {}
    for name in dict.fromkeys(canonical_target(t) for t in targets):
        key = pipeline_of(name).name
        groups[key] = groups.get(key, ()) + (name,)
    return groups


def optimise(gm: fx.GraphModule, target: str, ctx: PassContext) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run `target`'s pipeline over `gm` (in place where the passes allow) with lint and checks."""
    return run_pipeline(gm, pipeline_for(target), ctx)
