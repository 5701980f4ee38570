"""The compiler driver: checkpoint -> captured step variants -> passes -> plans -> artifact.

This module (with the CLI and the torch.compile backend) is the only one that sees every folder; it wires
the checkpoint reader, capture, the target's pass pipeline, lowering and the artifact writer together.

Variants compiled (T = tokens per sequence): `main_t1` (decode), `main_t2` (MTP verification: the newest
token plus one draft), `main_t{C}` (prefill chunks), and with MTP `mtp_t1`, `mtp_t2`, `mtp_t{C}`.
For GPU targets the artifact also holds the mHC kernels the plans launch, built ahead of time for each
target (codegen/aot.py).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch

from dsv4c.codegen.aot import build_kernels, mhc_norm_dtypes, mhc_ops_in
from dsv4c.passes.manager import PassContext
from dsv4c.passes.pipeline import canonical_target, optimise, targets_by_pipeline
from dsv4c.runtime.artifact import check_output_path, describe_numerics, encode_state, write_artifact
from dsv4c.compiler.capture import CapturedStep, StepVariant, capture
from dsv4c.model.checkpoint import Checkpoint
from dsv4c.runtime.eager_runner import state_specs
from dsv4c.compiler.lowering import graph_constants, plan_from_graph
from dsv4c.model.numerics import Numerics

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What to compile: targets, numerics, cache capacity, prefill chunk, whether to include MTP."""

    targets: tuple[str, ...] = ("cpu",)
    numerics: Numerics = Numerics.faithful()
    max_seq_len: int = 4096
    prefill_chunk: int = 32
    mtp: bool = True
    debug: bool = False
    kernel_batches: tuple[int, ...] = (1,)  # batch sizes the GPU targets' mHC kernels are built for (codegen/aot.py)

    def variants(self) -> list[StepVariant]:
        sizes = sorted({1, 2, self.prefill_chunk})
        kinds = ("main", "mtp") if self.mtp else ("main",)
        return [StepVariant(kind, t) for kind in kinds for t in sizes]


def compile_checkpoint(checkpoint: str | Path, out: str | Path, options: CompileOptions = CompileOptions(),
                       progress: Progress = lambda message: None, overwrite: bool = False) -> Path:
    """Compile a checkpoint directory into an artifact folder at `out` (written atomically)."""
    check_output_path(out, overwrite, inputs=(checkpoint,))  # before any work: never the input, only an artifact
    pipeline = _one_pipeline(options.targets)  # unknown targets fail before any work
    ckpt = Checkpoint.open(checkpoint)
    cfg = ckpt.config
    if options.mtp and cfg.num_nextn_predict_layers == 0:
        raise ValueError(f"{checkpoint}: the config has no MTP layer (num_nextn_predict_layers = 0); compile without MTP")
    progress("reading weights")
    weights = {name: ckpt.get(name) for name in ckpt.headers}
    plans, constants, pass_log = {}, {}, []
    for variant in options.variants():
        progress(f"capturing {variant.name}")
        started = time.perf_counter()
        step = capture(cfg, options.numerics, weights, variant, options.max_seq_len)
        capture_s = time.perf_counter() - started
        nodes_captured = len(step.graph_module.graph.nodes)  # the passes rewrite the graph in place
        progress(f"optimising {variant.name}")
        gm, records = optimise(step.graph_module, options.targets[0], _context(step, options))  # serves them all
        _namespace_constants(gm, variant.name)
        plan = plan_from_graph(gm, step.input_names, step.output_names)
        plans[variant.name] = plan
        constants.update(graph_constants(gm, plan))
        pass_log.append({"variant": variant.name, "pipeline": pipeline.name, "serves": list(pipeline.targets),
                         "capture_s": round(capture_s, 3),
                         "nodes_captured": nodes_captured,
                         "passes": [r.to_json() for r in records]})
    kernel_files, kernels = build_kernels(
        options.targets, hidden=cfg.hidden_size, hc=cfg.hc_mult, iters=cfg.hc_sinkhorn_iters,
        dtype=options.numerics.dtype, ops=mhc_ops_in(plans),
        norm_dtypes=mhc_norm_dtypes(plans, options.numerics.dtype),
        variant_tokens=[v.tokens for v in options.variants()], batch_buckets=options.kernel_batches,
        progress=progress)
    progress("writing artifact")
    fields = {
        "config": cfg.to_dict(), "numerics": describe_numerics(options.numerics),
        "targets": [canonical_target(t) for t in options.targets], "pass_log": pass_log, "kernels": kernels,
        "state": encode_state(state_specs(cfg, options.max_seq_len, options.numerics)),
        "max_seq_len": options.max_seq_len, "prefill_chunk": options.prefill_chunk, "mtp": options.mtp,
    }
    return write_artifact(out, fields, plans, {**weights, **constants}, kernel_files, overwrite=overwrite)


@dataclasses.dataclass(frozen=True)
class _ServingPipeline:
    name: str
    targets: tuple[str, ...]


def _one_pipeline(targets: tuple[str, ...]) -> _ServingPipeline:
    """The one pass pipeline serving every requested target (an artifact holds one plan per variant)."""
    groups = targets_by_pipeline(targets)
    if len(groups) > 1:
        raise ValueError(f"targets {', '.join(targets)}: they need different pass pipelines "
                         f"({', '.join(f'{k}: {v}' for k, v in groups.items())}); compile one artifact per pipeline")
    (name, served), = groups.items()
    return _ServingPipeline(name, served)


def _context(step: CapturedStep, options: CompileOptions) -> PassContext:
    """Debug mode checks every pass's graph against the previous one on fresh random inputs."""
    make_inputs = (lambda batch: random_inputs(step, batch)) if options.debug else None
    return PassContext(target=options.targets[0], debug=options.debug, make_inputs=make_inputs,
                       output_names=tuple(step.output_names))


def random_inputs(step: CapturedStep, batch: int) -> list[torch.Tensor]:
    """Fresh random inputs in placeholder order: weights with healthy random values (packed formats as
    random bytes, scales near 2^-6), state as written by earlier steps (score rings hold -inf where empty),
    tokens and positions in range."""
    out = []
    capacity = step.max_seq_len
    for name in step.input_names:
        spec = step.input_specs[name]
        shape = spec.concrete(batch)
        if name == "start":
            out.append(torch.randint(0, capacity - step.variant.tokens, shape))
        elif spec.dtype in (torch.int64, torch.int32):
            high = 8 if name.endswith("tid2eid") else 64
            out.append(torch.randint(0, high, shape, dtype=spec.dtype))
        elif spec.dtype == torch.float8_e8m0fnu:
            out.append(torch.randint(117, 124, shape, dtype=torch.uint8).view(torch.float8_e8m0fnu))
        elif spec.dtype == torch.int8:
            out.append(torch.randint(-128, 128, shape, dtype=torch.int8))
        elif spec.dtype == torch.float8_e4m3fn:  # any byte but the NaN codes 0x7f and 0xff
            magnitude = torch.randint(0, 0x7F, shape, dtype=torch.uint8)
            out.append((magnitude | (torch.randint(0, 2, shape, dtype=torch.uint8) << 7)).view(spec.dtype))
        else:
            out.append((torch.randn(shape) * 0.5).to(spec.dtype))
    return out


def _namespace_constants(gm: torch.fx.GraphModule, variant: str) -> None:
    """Give every graph constant a name unique to its variant, so variants share one weights store."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not node.target.startswith(f"{variant}__"):
            name = f"{variant}__{node.target.replace('.', '_')}"
            gm.register_buffer(name, getattr(gm, node.target))
            node.target = name
    gm.recompile()
