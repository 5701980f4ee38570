"""One compiled tiny artifact in plain fp32 numerics (no rounding) whose top-k selections keep every candidate, with
MTP of one draft, and its checkpoint: shared by the end-to-end and step-runner tests of one test process (their
modules mark one xdist group, so one worker compiles it once). The graph computes the routed experts densely where
eager skips unselected ones, so the two differ by fp32 summation order only."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny

NUM = Numerics.plain(torch.float32)
CFG = tiny().replace(num_experts_per_tok=tiny().n_routed_experts, index_topk=4096)
MAX_SEQ_LEN, CHUNK = 128, 2
GROUP = "plain_artifact"  # the xdist group of the modules that use it


@functools.lru_cache(maxsize=None)
def plain_artifact() -> tuple[Path, Path]:
    """(checkpoint, artifact)."""
    root = Path(tempfile.mkdtemp(prefix="dsv4c-plain-"))
    checkpoint = write_synthetic(CFG, root / "ckpt", seed=21)
    options = CompileOptions(numerics=NUM, max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK, mtp=True, max_drafts=1)
    return checkpoint, compile_checkpoint(checkpoint, root / "art", options)
