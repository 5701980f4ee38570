"""The engine's own cost a step: `Engine.step` around a runner that costs nothing, greedy, at MTP 0 to 3.

The runner returns the same preallocated logits and hidden streams every step (Flash's vocabulary and hidden
shape by default), so what is timed is the engine: building the step's inputs, the runner protocol, sampling and
verification, the transfers back to the host. On a GPU (`--device cuda`) that is the host time a serving step
adds to the compiled step's replay, and the device work it launches (argmaxes over the logits); on CPU the same
ops run on the host.

    python3 bench/engine_host_bench.py [--device cuda] [--batch 1 8 64] [--mtp 0 1 3] [--vocab 129280]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from dsv4c.runtime.engine import Engine
from dsv4c.runtime.state_pool import StateSpec


class FreeRunner:
    """Step outputs made once per shape: logits that favour token 7 everywhere (every greedy draft accepted),
    zero hidden streams of `streams` x `dim`; the state passes through."""

    def __init__(self, vocab: int, streams: int, dim: int, device: torch.device):
        self.vocab, self.streams, self.dim, self.device = vocab, streams, dim, device
        self._outputs: dict[tuple, dict[str, torch.Tensor]] = {}

    def run(self, variant, inputs):
        shape = tuple(inputs["tokens"].shape)
        if shape not in self._outputs:
            logits = torch.zeros(*shape, self.vocab, device=self.device)
            logits[..., 7] = 1.0
            hidden = torch.zeros(*shape, self.streams, self.dim, dtype=torch.bfloat16, device=self.device)
            self._outputs[shape] = {"logits": logits, "hidden": hidden}
        return {**self._outputs[shape], "state.slot": inputs["state.slot"]}


def step_ms(device: torch.device, vocab: int, batch: int, mtp: int, steps: int) -> float:
    """Median wall time of one `Engine.step` (synchronised) with `batch` greedy requests and `mtp` drafts."""
    engine = Engine(FreeRunner(vocab, 4, 4096, device), {"slot": StateSpec((1,), torch.float32, 0.0)}, 4,
                    1 << 20, device, max_batch=batch, max_drafts=3)
    engine.set_drafts(mtp)
    for seed in range(batch):
        engine.add_request([1, 2, 3, 4], 1 << 19, seed=seed)
    times = []
    for i in range(steps + 3):
        begin = time.perf_counter()
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # the first step prefills; two more warm up
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--mtp", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--vocab", type=int, default=129280)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    table = Table(title=f"Engine.step around a free runner, {device} ({torch.__version__}), vocabulary {args.vocab}")
    for column in ("batch", *(f"mtp {k} ms" for k in args.mtp)):
        table.add_column(column, justify="right")
    for batch in args.batch:
        table.add_row(str(batch), *(f"{step_ms(device, args.vocab, batch, k, args.steps):.3f}" for k in args.mtp))
    Console().print(table)


if __name__ == "__main__":
    main()
