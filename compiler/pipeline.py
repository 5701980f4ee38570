"""The compiler driver: checkpoint -> captured step variants -> passes -> plans -> artifact.

This module (with compiler/variant_compile.py, which captures, optimises and lowers each variant, in worker
processes with `jobs` > 1, the CLI and the torch.compile backend) is the only one that sees every folder; it
wires the checkpoint reader, the variants' compiles, the AOT kernels and the artifact writer together.

Variants compiled (T = tokens per sequence): `main_t1` (decode), `main_t{C}` (prefill chunks), `main_t2`, and with
MTP of up to k = `max_drafts` drafts `main_t2 .. main_t{k+1}` (verification: the newest token plus the drafts) and
`mtp_t1 .. mtp_t{k+1}`, `mtp_t{C}` (drafting on the MTP layer's own output, the MTP step after a verification,
the MTP prefill). The manifest records `max_drafts` (0 without MTP).
With `--moe w4a4` the manifest also records `moe_accuracy`: the W4A4 MoE's top-1 agreement and mean KL
against W4A8 on a fixed text, measured on CPU after lowering (compiler/moe_accuracy.py).
For GPU targets the artifact also holds the mHC kernels the plans launch, built ahead of time for each
target (codegen/aot.py). A checkpoint's tokenizer.json is copied into the artifact (and hashed in its manifest).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from dsv4c.codegen.aot import build_kernels, mhc_norm_dtypes, mhc_ops_in
from dsv4c.passes.pipeline import canonical_target, targets_by_pipeline
from dsv4c.runtime.artifact import (check_output_path, describe_numerics, encode_state, plan_state_specs,
                                    write_artifact)
from dsv4c.compiler.compile_options import DEFAULT_MAX_SEQ_LEN, CompileOptions
from dsv4c.compiler.variant_compile import compile_variants
from dsv4c.compiler.moe_accuracy import fixed_text, measure as measure_moe_accuracy
from dsv4c.model.checkpoint import Checkpoint
from dsv4c.model.tokenizer import TOKENIZER_NAME, folder_tokenizer
from dsv4c.runtime.eager_runner import state_specs

Progress = Callable[[str], None]


def compile_checkpoint(checkpoint: str | Path, out: str | Path, options: CompileOptions = CompileOptions(),
                       progress: Progress = lambda message: None, overwrite: bool = False) -> Path:
    """Compile a checkpoint directory into an artifact folder at `out` (written atomically)."""
    check_output_path(out, overwrite, inputs=(checkpoint,))  # before any work: never the input, only an artifact
    pipeline = _one_pipeline(options.targets)  # unknown targets fail before any work
    ckpt = Checkpoint.open(checkpoint)
    cfg = ckpt.config
    if options.max_seq_len is None:
        options = dataclasses.replace(options, max_seq_len=min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings))
    if options.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-seq-len {options.max_seq_len}: above the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings} ({checkpoint}); allowed: up to {cfg.max_position_embeddings}")
    if options.mtp and cfg.num_nextn_predict_layers == 0:
        raise ValueError(f"{checkpoint}: the config has no MTP layer (num_nextn_predict_layers = 0); compile without MTP")
    tokenizer = checkpoint_tokenizer_file(ckpt)
    compiled = compile_variants(ckpt, options, pipeline.name, pipeline.targets, progress)
    plans = {c.log["variant"]: c.plan for c in compiled}
    constants = {k: v for c in compiled for k, v in c.constants.items()}
    pass_log = [c.log for c in compiled]
    progress("reading weights")
    weights = {name: ckpt.get(name) for name in ckpt.headers}
    kernel_files, kernels = build_kernels(
        options.targets, hidden=cfg.hidden_size, hc=cfg.hc_mult, iters=cfg.hc_sinkhorn_iters,
        dtype=options.numerics.dtype, ops=mhc_ops_in(plans),
        norm_dtypes=mhc_norm_dtypes(plans, options.numerics.dtype),
        variant_tokens=[v.tokens for v in options.variants()], batch_buckets=options.kernel_batches,
        progress=progress)
    specs = plan_state_specs(state_specs(cfg, options.max_seq_len, options.numerics), plans)
    accuracy = {}
    if options.moe == "w4a4":  # opt-in numerics: how far they move the next-token distribution, in the manifest
        progress("measuring the W4A4 MoE against W4A8")
        text = fixed_text(folder_tokenizer(ckpt.path, cfg.vocab_size), cfg.vocab_size, options.max_seq_len)
        accuracy["moe_accuracy"] = measure_moe_accuracy(plans, {**weights, **constants}, specs, text,
                                                        options.prefill_chunk)
    progress("writing artifact")
    fields = {
        "config": cfg.to_dict(), "numerics": describe_numerics(options.numerics),
        "targets": [canonical_target(t) for t in options.targets], "pass_log": pass_log, "kernels": kernels,
        "state": encode_state(specs),
        "max_seq_len": options.max_seq_len, "prefill_chunk": options.prefill_chunk, "mtp": options.mtp,
        "moe": options.moe or "default",
        "max_drafts": options.drafts, **accuracy,
    }
    return write_artifact(out, fields, plans, {**weights, **constants}, {**kernel_files, **tokenizer},
                          overwrite=overwrite)


def checkpoint_tokenizer_file(ckpt: Checkpoint) -> dict[str, bytes]:
    """{tokenizer.json: its bytes} when the checkpoint has one (checked to fit its vocab_size first, so a bad one
    is refused before any work), else nothing; the artifact carries it as it is, hashed like every file."""
    if folder_tokenizer(ckpt.path, ckpt.config.vocab_size) is None:
        return {}
    return {TOKENIZER_NAME: (ckpt.path / TOKENIZER_NAME).read_bytes()}


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


