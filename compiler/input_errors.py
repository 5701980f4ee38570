"""What counts as bad input (a file, a tensor, a config field, a flag's value) and its one-line message: the CLI
prints these as `dsv4c COMMAND: error: ...` (exit code 2), and a variant worker reports them to the compile that
started it (compiler/variant_compile.py) rather than a traceback.

ArtifactError, PlanError, BenchError and SamplingParams' errors are ValueErrors; OSError is an unreadable or
unwritable file.
"""

from __future__ import annotations

from dsv4c.model.checkpoint import CheckpointError
from dsv4c.model.config import ConfigError

INPUT_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, KeyError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a KeyError's without the quotes `str` adds)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(line.strip() for line in str(message).splitlines())
