"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched as its stream predecessor's dependent
(`launch_pdl`) is scheduled while the predecessor still runs, so its launch and prologue overlap the other's tail
instead of following it; inside a CUDA graph the edge between them becomes a programmatic one.

The contract every such kernel keeps: `after_predecessor(PDL)` is its first statement, before it reads or writes
any memory. `griddepcontrol.wait` returns once the predecessor grid has completed and its writes are visible, and
the predecessor did the same before touching memory, so every earlier kernel of the stream has completed: the
kernel sees what a plain launch would. It then lets its own dependent be scheduled (`launch_dependents`). A
predecessor that is not a PDL kernel (an aten kernel, a kernel built ahead of time) releases its dependent when it
completes, which is the plain order. On the CPU interpreter PDL is off (no such instructions)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def after_predecessor(PDL: tl.constexpr):
    """With PDL: wait for the predecessor grid, then let this grid's dependent be scheduled."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """The launch options of a kernel launched with `pdl` (Triton's `launch_pdl`)."""
    return {"launch_pdl": True} if pdl else {}
