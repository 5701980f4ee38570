"""One compiled tiny artifact with MTP of up to three drafts (default numerics: bf16, faithful), shared by the MTP
and continuous-batching tests of one test process (compiling its eight step variants takes most of a minute; their
modules mark one xdist group, so one worker compiles it once)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.presets import tiny

MAX_SEQ_LEN, CHUNK = 64, 4  # chunk 4: the prefill variant is also the 3-draft verification's
GROUP = "mtp_artifact"  # the xdist group of the modules that use it


@functools.lru_cache(maxsize=None)
def bf16_artifact() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dsv4c-mtp-"))
    ckpt = write_synthetic(tiny(), root / "ckpt", seed=5)
    options = CompileOptions(max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK, max_drafts=3)
    return compile_checkpoint(ckpt, root / "art", options)
