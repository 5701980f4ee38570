"""Step variants run over the state pool, padded to batch buckets; on CUDA one graph replay a step.

`BucketRunner.run(variant, inputs)` answers the engine's step protocol (runtime/engine.py). When the inputs'
state is rows 0..n-1 of the pool (`StatePool.rows(n)`), the batch is padded up to its bucket (1, 2, 4, ... 128):
padding rows take token 0 at position 0 and write only their own, unused pool rows. On a CUDA device with
graphs on, each (variant, bucket) of the per-token variants (decode, MTP verification, MTP draft) is captured
once, at construction, into a CUDA graph over static token/position inputs and the pool's rows; a step then
copies its tokens in and replays. The prefill variants (whole prompt chunks and single tokens, main model and
MTP layer) are captured the same way once each over the pool's prefill row (`StatePool.prefill_row()`), where
every prompt is prefilled whichever slot it then takes. Other state (a row's own view, a private copy) and CPU
run the plan's executor directly, still in place. Graph and graph-free paths run the same ops on the same
buffers, so they give the same tokens (`--no-cuda-graphs` runs the second). Every step is batch-invariant
(runtime/batch_invariant.py): the graphs are captured inside `batch_invariant()` and the executor runs inside it;
a replay enters nothing (it dispatches no aten op).

A replay's outputs are the graph's static buffers: they hold until the same graph replays again, so a caller
keeps what it needs across steps of one variant by copying it (the engine's prefill does, chunk by chunk).

A variant is captured only if its plan writes every state tensor in place (each `state.*` output is its input);
a graph of a functional plan would leave its new state in graph-owned buffers the next replay never reads. A
prefill variant whose capture fails (an op that cannot be captured at a chunk's length) runs graph-free, the
reason in `skipped`.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Callable, Mapping

import torch

from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.executor import Executor
from dsv4c.runtime.state_pool import StatePool

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STATE = "state."
Progress = Callable[[str], None]


def bucket_for(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket holding `batch` sequences; ValueError above the largest."""
    index = bisect.bisect_left(buckets, batch)
    if index == len(buckets):
        raise ValueError(f"batch {batch}: above the largest batch bucket ({buckets[-1]})")
    return buckets[index]


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static, batch = bucket
    outputs: dict[str, torch.Tensor]
    keys: frozenset[str]  # every input the graph was captured with: a step replays it only with exactly these


class BucketRunner:
    """Runs plans' executors over a state pool; captures CUDA graphs per (variant, bucket) where it can."""

    def __init__(self, executors: Mapping[str, Executor], pool: StatePool, graph_variants: tuple[str, ...] = (),
                 cuda_graphs: bool = True, progress: Progress = lambda message: None,
                 prefill_variants: tuple[str, ...] = ()):
        self.executors, self.pool = dict(executors), pool
        self.buckets = tuple(b for b in BUCKETS if b <= pool.capacity)
        self._graphs: dict[tuple[str, int], _Graph] = {}
        self._prefill_graphs: dict[str, _Graph] = {}
        self.skipped: dict[str, str] = {}
        if cuda_graphs and pool.device.type == "cuda":
            with batch_invariant():  # the graphs hold the batch-invariant kernels the engine's steps run
                mempool = torch.cuda.graph_pool_handle()
                self._capture_all([v for v in graph_variants if v in self.executors], mempool, progress)
                self._capture_prefill([v for v in prefill_variants if v in self.executors], mempool, progress)

    @property
    def captured(self) -> list[tuple[str, int]]:
        """(variant, bucket) of every graph over the pool's rows."""
        return sorted(self._graphs)

    @property
    def captured_prefill(self) -> list[str]:
        """The variants captured over the prefill row."""
        return sorted(self._prefill_graphs)

    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        executor = self.executors.get(variant)
        if executor is None:
            raise KeyError(f"variant {variant!r}: not in this artifact (has {sorted(self.executors)})")
        n = self.pool.holds(inputs, STATE)
        if n is None:  # the prefill row (its graph, if captured), or state the pool does not hold
            graph = self._prefill_graphs.get(variant) if self.pool.holds_prefill_row(inputs, STATE) else None
            if graph is None or inputs.keys() != graph.keys:
                with batch_invariant():
                    return executor.run(inputs)
            return self._replay(graph, inputs, 1, 1)
        bucket = bucket_for(n, self.buckets)
        graph = self._graphs.get((variant, bucket))
        if graph is None or inputs.keys() != graph.keys:  # the executor pads, checks the names and runs
            with batch_invariant():
                return self._trimmed(executor.run(self._padded(inputs, n, bucket)), n)
        return self._replay(graph, inputs, n, bucket)

    def _replay(self, graph: _Graph, inputs: Mapping[str, torch.Tensor], n: int, bucket: int
                ) -> dict[str, torch.Tensor]:
        for name, static in graph.inputs.items():
            static[:n].copy_(inputs[name])
            if n < bucket:
                static[n:].zero_()
        graph.graph.replay()
        return dict(graph.outputs) if n == bucket else self._trimmed(graph.outputs, n)

    def _padded(self, inputs: Mapping[str, torch.Tensor], n: int, bucket: int) -> dict[str, torch.Tensor]:
        out = {STATE + k: v for k, v in self.pool.rows(bucket).items()}
        for name, value in inputs.items():
            if name not in out:  # the step's own inputs, and any the pool does not hold (the executor names them)
                pad = value.new_zeros((bucket - n, *value.shape[1:]))
                out[name] = torch.cat((value, pad)) if bucket > n else value
        return out

    @staticmethod
    def _trimmed(outputs: Mapping[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        return {name: value[:n] for name, value in outputs.items()}

    # ---- capture ----------------------------------------------------------------------------------------
    def _capture_all(self, variants: list[str], mempool, progress: Progress) -> None:
        for variant in variants:
            for bucket in sorted(self.buckets, reverse=True):  # largest first: later graphs reuse its memory
                progress(f"capturing {variant} at batch {bucket}")
                saved = {k: v.clone() for k, v in self.pool.rows(bucket).items()}
                graph = self._capture(variant, self.pool.rows(bucket), bucket, mempool)
                self._restore(saved)  # warm-up and capture wrote the padding step into the pool
                if graph is None:
                    break
                self._graphs[(variant, bucket)] = graph

    def _capture_prefill(self, variants: list[str], mempool, progress: Progress) -> None:
        """One graph per prefill variant over the prefill row (scratch: every prefill resets it first)."""
        for variant in variants:
            progress(f"capturing {variant} over the prefill row")
            try:
                graph = self._capture(variant, self.pool.prefill_row(), 1, mempool)
            except RuntimeError as error:  # the decode graphs stand; this variant's chunks run graph-free
                self.skipped[variant] = f"capture failed: {str(error).splitlines()[0] if str(error) else error!r}"
                progress(f"{variant}: not captured ({self.skipped[variant]}); its steps run graph-free")
                continue
            if graph is not None:
                self._prefill_graphs[variant] = graph

    def _capture(self, variant: str, state: Mapping[str, torch.Tensor], batch: int, mempool) -> _Graph | None:
        """The variant's graph over `state` (views of `batch` pool rows) and fresh static inputs, or None (with
        the reason in `skipped`) if its plan does not write the state in place."""
        executor = self.executors[variant]
        inputs = {STATE + k: v for k, v in state.items()}
        for spec in executor.plan.inputs:
            if spec.name not in inputs and spec.name in executor.run_inputs:
                shape = tuple(batch if d == "B" else d for d in spec.shape)
                inputs[spec.name] = torch.zeros(shape, dtype=spec.torch_dtype(), device=self.pool.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = executor.run(inputs)  # warm-up: Triton compiles, cuBLAS makes its handles
        torch.cuda.current_stream().wait_stream(stream)
        not_in_place = [k for k, v in outputs.items() if k.startswith(STATE) and v.data_ptr() != inputs[k].data_ptr()]
        if not_in_place:
            self.skipped[variant] = f"state not written in place: {', '.join(not_in_place[:3])}"
            return None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool):
            outputs = executor.run(inputs)
        return _Graph(graph, {k: v for k, v in inputs.items() if not k.startswith(STATE)}, outputs,
                      frozenset(inputs))

    def _restore(self, saved: Mapping[str, torch.Tensor]) -> None:
        for name, value in saved.items():
            self.pool.tensors[name][: value.shape[0]].copy_(value)
