"""The `dsv4c` command line's argument checks: each flag's value is refused at parse time, before any work, with
one line naming the flag (`OneLineParser`), and exit code 2.

Every `type=` function here takes the flag's text and returns its value or raises `ArgumentTypeError`, whose
message argparse prefixes with the flag's name.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch

from dsv4c.codegen.targets import target as lookup_target
from dsv4c.runtime.artifact import distribution_version

STDIN = "-"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (`dsv4c compile: error: argument ...`),
    exit code 2; `--help` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version_text() -> str:
    """`dsv4c X (torch Y, triton Z)`, read from the installed distributions (Triton is not imported)."""
    triton = distribution_version("triton") or "not installed"
    return f"dsv4c {distribution_version('dsv4c')} (torch {torch.__version__}, triton {triton})"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container's CPU set narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, allowed: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"got {value}; allowed: {allowed}")
    return value


MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def memory_size(text: str) -> int:
    """Bytes from `80GiB`, `512 MiB`, `1.5TB` or a plain byte count (binary units KiB..TiB, decimal KB..TB)."""
    number = text.strip().rstrip("iIbBkKmMgGtT ")
    unit = text.strip()[len(number):].strip().upper()
    try:
        value = float(number) * MEMORY_UNITS[unit]
    except (KeyError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a positive size such as 80GiB, 512MiB, 2TB or "
                                         f"a byte count")
    return int(value)


def temperature(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {text}; allowed: >= 0 (0 is greedy)")
    return value


def top_p(text: str) -> float:
    value = _finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"got {text}; allowed: 0 < top-p <= 1")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a finite number")
    return value


def targets(text: str) -> tuple[str, ...]:
    """Comma-separated target names, each one the target table knows (`h100`, `sm_90a`, ...)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: one or more comma-separated targets")
    for name in names:
        try:
            lookup_target(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def device(text: str) -> str:
    """`cpu`, or `cuda`/`cuda:N` where this torch sees that GPU."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: cpu, cuda, cuda:N") from None
    if parsed.type == "cpu":
        return text
    if parsed.type != "cuda":
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"got {text!r}, but this torch ({torch.__version__}) sees no CUDA GPU; "
                                         f"use cpu")
    if (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"got {text!r}; this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def input_file(text: str) -> str:
    """An existing file (not a folder)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def input_file_or_stdin(text: str) -> str:
    """An existing file, or '-' for stdin."""
    return text if text == STDIN else input_file(text)


def output_file(text: str) -> str:
    """A file to write: its folder exists and the path is not itself a folder (checked before any work)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file name")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: its folder {path.parent} does not exist")
    return text


def prompt_ids(text: str) -> list[int]:
    """Token ids from a whitespace- or comma-separated string, or from a file given as @FILE."""
    source = text
    if text.startswith("@"):
        source = Path(input_file(text[1:])).read_text()
    try:
        ids = [int(tok) for tok in source.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: token ids must be integers ({error})") from None
    if not ids:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: no token ids")
    return ids


def read_token_ids(path: str) -> torch.Tensor:
    """Whitespace-separated integer token ids from a file ('-' for stdin); ValueError naming the file."""
    text = sys.stdin.read() if path == STDIN else Path(path).read_text()
    try:
        ids = [int(tok) for tok in text.split()]
    except ValueError as error:
        raise ValueError(f"{path}: token ids must be whitespace-separated integers ({error})") from None
    if not ids:
        raise ValueError(f"{path}: no token ids")
    return torch.tensor(ids, dtype=torch.long)


def positive_int_list(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32): comma-separated positive integers."""
    return tuple(positive_int(part) for part in text.split(",") if part.strip()) or _no_values(text)


def non_negative_int_list(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1): comma-separated integers >= 0."""
    return tuple(non_negative_int(part) for part in text.split(",") if part.strip()) or _no_values(text)


def name_list(text: str) -> tuple[str, ...]:
    """'eager,inductor' -> ('eager', 'inductor'); an empty string gives ()."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _no_values(text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated values")
