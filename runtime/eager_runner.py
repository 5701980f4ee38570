"""The reference model as a runtime step runner: the baseline every compiled artifact is checked against.

`EagerRunner.run(variant, inputs)` answers the same named-tensor protocol as the artifact's executor
(`main_t{T}` / `mtp_t{T}`; `tokens`, `start`, `hidden`, `state.*` in; `logits`, `hidden`, `state.*` out)
by calling the reference model directly, for any T.
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import torch

from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.state_pool import StateSpec
from dsv4c.model.config import ModelConfig
from dsv4c.model.step import Weights, forward, init_state, mtp_forward
from dsv4c.model.numerics import Numerics


def state_specs(cfg: ModelConfig, max_seq_len: int, num: Numerics) -> dict[str, StateSpec]:
    """Per-sequence shape, dtype and initial fill of every state tensor of the reference model."""
    example = init_state(cfg, 1, max_seq_len, num, device="meta")
    fills = {name: float("-inf") if name.endswith("score_state") else 0.0 for name in example}
    return {name: StateSpec(tuple(t.shape[1:]), t.dtype, fills[name]) for name, t in example.items()}


class EagerRunner:
    """Runs step variants with the reference model on its weights: inside `batch_invariant()` (each row as it
    would be alone, the engine's contract), or with `invariant=False` on PyTorch's own kernels (the eager baseline
    `dsv4c bench` times)."""

    def __init__(self, weights: Weights, cfg: ModelConfig, num: Numerics, invariant: bool = True):
        self.weights, self.cfg, self.num, self.invariant = weights, cfg, num, invariant

    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kind = variant.split("_t")[0]
        state = {k[len("state."):]: v for k, v in inputs.items() if k.startswith("state.")}
        with batch_invariant() if self.invariant else contextlib.nullcontext():
            if kind == "main":
                logits, hidden, new = forward(self.weights, state, inputs["tokens"], inputs["start"], self.cfg,
                                              self.num)
            else:
                logits, hidden, new = mtp_forward(self.weights, state, inputs["tokens"], inputs["hidden"],
                                                  inputs["start"], self.cfg, self.num)
        return {"logits": logits, "hidden": hidden, **{f"state.{k}": v for k, v in new.items()}}
