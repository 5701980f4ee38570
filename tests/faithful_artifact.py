"""One compiled tiny artifact with the default numerics (`Numerics()`: bf16 activations, FP8 activation rounding,
FP8 cached KV, Hadamard + FP4 indexer keys; caches packed) for the CPU, no MTP variants, and its checkpoint: shared
by the faithful-artifact and KV-compression tests of one test process (their modules mark one xdist group, so one
worker compiles it once)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.presets import tiny

MAX_SEQ_LEN, CHUNK = 96, 2
GROUP = "faithful_artifact"  # the xdist group of the modules that use it


@functools.lru_cache(maxsize=None)
def faithful_artifact() -> tuple[Path, Path]:
    """(checkpoint, artifact) of tiny() with seed 8."""
    root = Path(tempfile.mkdtemp(prefix="dsv4c-faithful-"))
    checkpoint = write_synthetic(tiny(), root / "ckpt", seed=8)
    options = CompileOptions(max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK, mtp=False)
    return checkpoint, compile_checkpoint(checkpoint, root / "art", options)
