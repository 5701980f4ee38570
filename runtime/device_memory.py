"""How much memory a device has for a step: what CUDA reports free, or the machine's RAM (Linux `/proc/meminfo`).

The arithmetic on those figures is runtime/capacity.py's; this module only asks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4c.runtime.capacity import MemoryBudget

MEMINFO = Path("/proc/meminfo")


def ram_bytes(field: str, meminfo: Path = MEMINFO) -> int | None:
    """A `/proc/meminfo` figure in bytes (`MemTotal`, `MemAvailable`), or None where the file or field is missing."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if name == field and parts and parts[0].isdigit():
            return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return None


def free_bytes(device: torch.device) -> int | None:
    """Memory free on `device` now: CUDA's free figure, or on cpu the RAM available to new allocations."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return ram_bytes("MemAvailable") if device.type == "cpu" else None


def default_budget() -> MemoryBudget | None:
    """The budget `dsv4c inspect` reports against without `--memory`: the current GPU's free memory, else this
    machine's RAM; None where neither is known."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        return MemoryBudget(torch.cuda.mem_get_info(device)[0], f"free on {device}")
    total = ram_bytes("MemTotal")
    return MemoryBudget(total, "this machine's RAM") if total is not None else None
