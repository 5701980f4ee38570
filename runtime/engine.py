"""Batched generation over compiled step variants, with MTP speculative decoding (one draft token).

The engine never sees the model: it calls `runner.run(variant, inputs)` where a variant is
`main_t{T}` or `mtp_t{T}` (T tokens per sequence) and inputs/outputs are named tensors (`tokens`,
`start`, `hidden`, `state.*` in; `logits`, `hidden`, `state.*` out). Cache state is indexed by absolute
position, so a rejected draft needs no rollback: the position it wrote is rewritten by the next step
before anything reads it (one position of overshoot, which a draft of one token never exceeds).

Speculative loop, per sequence, with `last` the newest emitted token at position `pos`:
  verify: main step over [last, draft] at pos -> p(pos), p(pos + 1)
  accept the draft with the sampler's rule; accepted: emit draft and a token from p(pos + 1); rejected:
  emit the replacement. Then one MTP step over the (hidden, next token) pairs at pos, pos + 1 drafts the
  token after the newest one (a rejected row's second pair is padding at an unused position).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol

import torch

from dsv4c.runtime.sampler import SamplingParams, sample, target_probs, verify_draft
from dsv4c.runtime.state_pool import StatePool, StateSpec


class StepRunner(Protocol):
    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    drafted: int = 0
    accepted: int = 0
    rejected_nonfinite: int = 0
    steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


class Engine:
    """Generates for a batch of prompts with a runner of compiled steps and a pool of cache state."""

    def __init__(self, runner: StepRunner, state_specs: Mapping[str, StateSpec], prefill_chunk: int,
                 max_seq_len: int, device: torch.device | str = "cpu", vocab_size: int | None = None,
                 pool: StatePool | None = None):
        """`pool`: the state of every batch (rows 0..n-1), allocated once; without one, each batch gets its own."""
        self.runner, self.state_specs = runner, dict(state_specs)
        self.prefill_chunk, self.max_seq_len, self.device = prefill_chunk, max_seq_len, torch.device(device)
        self.vocab_size, self.pool = vocab_size, pool

    # ---- state pool -------------------------------------------------------------------------------
    def new_state(self, batch: int) -> dict[str, torch.Tensor]:
        """Fresh state for `batch` sequences: the pool's first rows, reset, or new tensors without a pool."""
        if self.pool is not None:
            return self.pool.reset(batch)
        return StatePool(self.state_specs, batch, self.device).rows(batch)

    @staticmethod
    def _rows(state: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
        return {k: v[row:row + 1] for k, v in state.items()}

    def _step(self, kind: str, state: dict[str, torch.Tensor], tokens: torch.Tensor, start: torch.Tensor,
              hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        inputs = {f"state.{k}": v for k, v in state.items()}
        inputs.update(tokens=tokens.to(self.device), start=start.to(self.device))
        if hidden is not None:
            inputs["hidden"] = hidden
        out = self.runner.run(f"{kind}_t{tokens.shape[1]}", inputs)
        new_state = {k: out[f"state.{k}"] for k in state}
        return out["logits"], out["hidden"], new_state

    # ---- prefill ----------------------------------------------------------------------------------
    def _chunks(self, length: int) -> list[tuple[int, int]]:
        """Whole chunks of the prefill variant, then single tokens for the remainder."""
        whole = length - length % self.prefill_chunk
        steps = [(s, s + self.prefill_chunk) for s in range(0, whole, self.prefill_chunk)]
        return steps + [(t, t + 1) for t in range(whole, length)]

    def _prefill(self, kind: str, state: dict[str, torch.Tensor], tokens: torch.Tensor,
                 hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits, hiddens = [], []
        for a, b in self._chunks(tokens.shape[1]):
            h = None if hidden is None else hidden[:, a:b]
            step_logits, step_hidden, state = self._step(kind, state, tokens[:, a:b], torch.tensor([a]), h)
            logits.append(step_logits[:, -1])
            hiddens.append(step_hidden)
        return logits[-1], torch.cat(hiddens, dim=1), state

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 mtp: int = 0, seed: int | None = None) -> GenerationResult:
        """Generate `max_new_tokens` for each prompt; `mtp` 1 drafts one token a step with the MTP module."""
        if mtp not in (0, 1):
            raise ValueError(f"mtp: got {mtp}; allowed: 0 or 1 (one draft token)")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts: every prompt needs at least one token")
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for p in prompts for t in p):
            raise ValueError(f"prompts: token ids must lie in [0, {self.vocab_size})")
        longest = max(len(p) for p in prompts) + max_new_tokens + 1
        if longest > self.max_seq_len:
            raise ValueError(f"max_new_tokens: prompt + new tokens reach {longest} positions; "
                             f"the artifact holds {self.max_seq_len}")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(0 if seed is None else seed)
        state = self.new_state(len(prompts))
        result = GenerationResult(tokens=[[] for _ in prompts])
        firsts, hiddens, drafts = [], [], []
        for row, prompt in enumerate(prompts):
            rows = self._rows(state, row)
            ids = torch.tensor([prompt], device=self.device)
            logits, hidden, rows = self._prefill("main", rows, ids, None)
            first = sample(logits, sampling, generator)
            if mtp:
                mtp_ids = torch.cat((ids[:, 1:], first.view(1, 1)), dim=1)
                draft_logits, _, rows = self._prefill("mtp", rows, mtp_ids, hidden)
                drafts.append(draft_logits)
            for k in state:
                if rows[k].data_ptr() != state[k][row:row + 1].data_ptr():  # a step that returned new state
                    state[k][row:row + 1] = rows[k]
            firsts.append(first)
            hiddens.append(hidden[:, -1])
        last = torch.cat(firsts)
        pos = torch.tensor([len(p) for p in prompts], device=self.device)
        for row in range(len(prompts)):
            result.tokens[row].append(int(last[row]))
        if mtp:
            self._speculate(state, last, pos, torch.cat(drafts), max_new_tokens, sampling, generator, result)
        else:
            self._decode(state, last, pos, max_new_tokens, sampling, generator, result)
        for row in range(len(prompts)):
            result.tokens[row] = result.tokens[row][:max_new_tokens]
        return result

    def _decode(self, state, last, pos, max_new_tokens, sampling, generator, result) -> None:
        while min(len(t) for t in result.tokens) < max_new_tokens:
            logits, _, state = self._step("main", state, last.view(-1, 1), pos)
            last = sample(logits[:, 0], sampling, generator)
            pos = pos + 1
            result.steps += 1
            for row, token in enumerate(last.tolist()):
                result.tokens[row].append(token)

    def _speculate(self, state, last, pos, draft_logits, max_new_tokens, sampling, generator, result) -> None:
        while min(len(t) for t in result.tokens) < max_new_tokens:
            q = target_probs(draft_logits, sampling)
            finite = torch.isfinite(draft_logits).all(-1)
            draft = torch.where(finite, sample(torch.nan_to_num(draft_logits), sampling, generator), 0)
            logits, hidden, state = self._step("main", state, torch.stack((last, draft), 1), pos)
            accepted, replacement = verify_draft(target_probs(logits[:, 0], sampling), q, draft, sampling, generator)
            bonus = sample(logits[:, 1], sampling, generator)
            active = torch.tensor([len(t) < max_new_tokens for t in result.tokens], device=pos.device)
            result.steps += 1
            result.drafted += int(active.sum())  # a finished row's draft is padding, not a draft
            result.accepted += int((accepted & active).sum())
            result.rejected_nonfinite += int((~finite & active).sum())
            first = torch.where(accepted, draft, replacement)
            newest = torch.where(accepted, bonus, first)
            for row in active.nonzero().flatten().tolist():
                emitted = [int(first[row]), int(bonus[row])] if accepted[row] else [int(first[row])]
                result.tokens[row].extend(emitted)
            next_ids = torch.stack((first, newest), 1)
            mtp_logits, _, state = self._step("mtp", state, next_ids, pos, hidden)
            # a finished row stays where it is: re-feeding its position rewrites the same values
            draft_logits = torch.where((accepted & active).unsqueeze(-1), mtp_logits[:, 1], mtp_logits[:, 0])
            pos = pos + active.long() * (1 + accepted.long())
            last = torch.where(active, newest, last)
