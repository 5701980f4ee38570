"""A step runner whose MTP drafts are known: the engine's speculative loop with drafts that ARE accepted.

Random weights give an MTP head that almost never agrees with the main model, so a test of the loop on
them only ever runs the rejection path. `OracleDrafts` wraps a real runner (the reference model's or an
artifact's) and replaces the logits of every `mtp_t*` step with a one-hot on the token that plain greedy
decoding put at the drafted position; `expected_counts` says what the loop must then report.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch


class OracleDrafts:
    """Runs every step through `inner`; an `mtp_t*` step's logits become a one-hot on the drafted token
    (the MTP step at position p, fed token p + 1, drafts position p + 2).

    `prompts` and `continuations` (their plain greedy tokens) in batch order. `wrong(k)` marks the
    continuation indices k whose draft is off by one token id (greedy verification rejects it), in the
    sequences `wrong_rows` names (default: every row, which then accept and reject at the same steps).
    `nan` makes every draft's logits NaN."""

    def __init__(self, inner, prompts: list[list[int]], continuations: list[list[int]],
                 wrong: Callable[[int], bool] = lambda k: False, nan: bool = False,
                 wrong_rows: set[int] | None = None):
        self.inner, self.wrong, self.nan = inner, wrong, nan
        self.wrong_rows = set(range(len(prompts))) if wrong_rows is None else set(wrong_rows)
        self.prompt_lengths = [len(p) for p in prompts]
        self.sequences = [p + c for p, c in zip(prompts, continuations)]

    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.inner.run(variant, inputs)
        if not variant.startswith("mtp"):
            return out
        logits = torch.zeros_like(out["logits"])
        vocab = logits.shape[-1]
        for row in range(logits.shape[0]):
            which = self._which(row, inputs)
            seq = self.sequences[which]
            for t in range(logits.shape[1]):
                pos = int(inputs["start"][row]) + t + 2
                token = seq[pos] if pos < len(seq) else 0
                off = which in self.wrong_rows and self.wrong(pos - self.prompt_lengths[which])
                logits[row, t, (token + 1) % vocab if off else token] = 1.0
        out["logits"] = logits * float("nan") if self.nan else logits
        return out

    def _which(self, row: int, inputs: Mapping[str, torch.Tensor]) -> int:
        """Decode steps batch every sequence in order; prefill runs one prompt at a time, found by its tokens
        (the MTP step pairs position t with token t + 1), which must name exactly one sequence."""
        if inputs["tokens"].shape[0] == len(self.sequences):
            return row
        start, ids = int(inputs["start"][row]), inputs["tokens"][row].tolist()
        found = [i for i, s in enumerate(self.sequences) if s[start + 1:start + 1 + len(ids)] == ids]
        if len(found) != 1:
            raise AssertionError(f"prefill tokens {ids} at {start + 1} match {len(found)} known sequences")
        return found[0]


def expected_counts(new_tokens: int, wrong: Callable[[int], bool]) -> tuple[int, int]:
    """(steps, accepted drafts) of greedy speculative decoding of one sequence with `OracleDrafts` drafts;
    one draft a step.

    The prefill emits continuation token 0; each step then drafts token k = the number emitted so far: a
    right draft is accepted and emits two tokens (the draft and the main model's next), a wrong one emits
    the main model's replacement only."""
    emitted, steps, accepted = 1, 0, 0
    while emitted < new_tokens:
        steps += 1
        if wrong(emitted):
            emitted += 1
        else:
            accepted += 1
            emitted += 2
    return steps, accepted
