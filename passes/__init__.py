"""Graph passes over the captured step: cleanup, shape propagation, memory planning (one pass a file).

Each pass is `(gm, ctx) -> (gm, PassRecord)`; `pipeline_for(target)` lists them in order with reasons and
`optimise(gm, target, ctx)` runs them under `run_pipeline` (lint after each, numeric checks in debug mode,
`DSV4C_DUMP=1` to print what each changed).
"""

from dsv4c.passes.manager import GraphPass, PassContext, PassError, PassRecord, PipelineEntry, dump_env, run_pipeline
from dsv4c.passes.memory_planning import MemoryPlan
from dsv4c.passes.pipeline import optimise, pipeline_for

__all__ = ["GraphPass", "MemoryPlan", "PassContext", "PassError", "PassRecord", "PipelineEntry", "dump_env",
           "optimise", "pipeline_for", "run_pipeline"]
