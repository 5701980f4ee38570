"""Continuous batching over compiled step variants, with MTP speculative decoding of up to three drafts.

The engine never sees the model: it calls `runner.run(variant, inputs)` where a variant is `main_t{T}` or
`mtp_t{T}` (T tokens per sequence) and inputs/outputs are named tensors (`tokens`, `start`, `hidden`, `state.*`
in; `logits`, `hidden`, `state.*` out). Requests join (`add_request`) and leave (returned by `step` as they
finish) between steps; each owns a row ("slot") of the state pool from its prefill to its last token, and a
step runs rows 0..n-1 where n - 1 is the highest slot in use (a free slot in between is padding: token 0 at
position 0, writing only its own row, which the next request to take it resets).

Rollback: cache state is indexed by absolute position, so a rejected draft needs none. A verification step
over 1 + k tokens at `pos` writes positions pos .. pos + k; the positions past the new start are stale, and
every ring has k - 1 slots of slack so that no later step reads them before the step that covers their
position again rewrites them (model/attention.py; the same holds for the MTP layer's own ring and its draft
steps, which write at most the positions the next verification covers).

Speculative loop with k drafts, per sequence, `last` the newest emitted token at position `pos`, the MTP
layer having run up to pos - 1 (its output streams g and its logits q1 for the token at pos + 1):
  draft: d1 ~ q1; then k - 1 MTP steps on the MTP's own output, (g, d_j) at pos + j - 1 -> q_{j+1}, d_{j+1}
  verify: one main step over [last, d1 .. dk] at pos -> p_0 .. p_k
  accept d_j in order with the sampler's rule against p_{j-1} (greedy: d_j is its argmax); the first
  rejection emits a replacement from p_{j-1}, all accepted emit a bonus token from p_k
  MTP: one step over the main hidden h_pos .. h_{pos+k} paired with the next tokens (the accepted drafts, then
  the new token; padding after) at pos -> row a (a drafts accepted) gives the next q1 and g.
Each request samples with its own generator (seeded by its seed), consuming it in an order that depends on its
own tokens only, and every step computes each row as it would alone (runtime/batch_invariant.py): a
request's tokens do not depend on which others share its steps or on k (greedy).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Mapping, Protocol

import torch

from dsv4c.model.config import MAX_DRAFTS
from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.sampler import SamplingParams, sample, target_probs, verify_draft
from dsv4c.runtime.state_pool import StatePool, StateSpec


class StepRunner(Protocol):
    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclasses.dataclass
class Finished:
    """A request's result: its emitted tokens and its drafts' fate by draft position (0 = first draft)."""

    id: int
    prompt: list[int]
    tokens: list[int]
    drafted: list[int]
    accepted: list[int]
    rejected_nonfinite: int = 0
    steps: int = 0


@dataclasses.dataclass
class GenerationResult:
    """`tokens[i]` for prompt i ([] where `errors` names why it was refused); draft counts summed over requests,
    by draft position in `drafted_by_position` / `accepted_by_position`; `steps` is the number of batch steps."""

    tokens: list[list[int]]
    drafted: int = 0
    accepted: int = 0
    rejected_nonfinite: int = 0
    steps: int = 0
    drafted_by_position: list[int] = dataclasses.field(default_factory=list)
    accepted_by_position: list[int] = dataclasses.field(default_factory=list)
    errors: dict[int, str] = dataclasses.field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def acceptance_by_position(self) -> list[float]:
        return [a / d if d else float("nan") for a, d in zip(self.accepted_by_position, self.drafted_by_position)]


@dataclasses.dataclass
class _Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    generator: torch.Generator
    slot: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)
    pos: int = 0  # position of tokens[-1], the newest emitted token (not yet fed to the main model)
    draft_logits: torch.Tensor | None = None  # q1's logits [V]: the MTP layer at pos - 1
    draft_hidden: torch.Tensor | None = None  # its output streams [n, D]
    drafted: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)
    rejected_nonfinite: int = 0
    steps: int = 0
    on_token: Callable[[int], None] | None = None  # hears each emitted token as it is emitted (streaming)

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens

    def emit(self, token: int) -> None:
        if not self.done:
            self.tokens.append(token)
            if self.on_token is not None:
                self.on_token(token)

    def finished(self) -> Finished:
        return Finished(self.id, self.prompt, self.tokens[:self.max_new_tokens], self.drafted, self.accepted,
                        self.rejected_nonfinite, self.steps)


class Engine:
    """Generates for requests that join and leave between steps, with a runner of compiled steps and a pool of
    cache state (module docstring)."""

    def __init__(self, runner: StepRunner, state_specs: Mapping[str, StateSpec], prefill_chunk: int,
                 max_seq_len: int, device: torch.device | str = "cpu", vocab_size: int | None = None,
                 pool: StatePool | None = None, max_drafts: int = MAX_DRAFTS, max_batch: int = 64):
        """`pool`: the state of every slot, allocated once (without one, a pool of `max_batch` rows is made on first
        use); `max_drafts`: the most drafts the runner's variants verify (an artifact's manifest says)."""
        self.runner, self.state_specs = runner, dict(state_specs)
        self.prefill_chunk, self.max_seq_len, self.device = prefill_chunk, max_seq_len, torch.device(device)
        self.vocab_size, self.pool, self.max_drafts, self.max_batch = vocab_size, pool, max_drafts, max_batch
        self.drafts = 0
        self._ids = itertools.count()
        self._waiting: list[_Request] = []
        self._slots: list[_Request | None] = []
        self.steps = 0

    # ---- state pool -------------------------------------------------------------------------------
    def _pool(self) -> StatePool:
        if self.pool is None:
            self.pool = StatePool(self.state_specs, self.max_batch, self.device)
        return self.pool

    def new_state(self, batch: int) -> dict[str, torch.Tensor]:
        """Rows 0..batch-1 of the pool, reset (a fresh batch for callers that step the runner themselves)."""
        return self._pool().reset(batch)

    def _store(self, views: dict[str, torch.Tensor], out: Mapping[str, torch.Tensor]) -> None:
        """Copy a step's new state into the pool's views where the runner did not write it in place."""
        for name, view in views.items():
            new = out[f"state.{name}"]
            if new.data_ptr() != view.data_ptr():
                view.copy_(new)

    def _run(self, kind: str, views: dict[str, torch.Tensor], tokens: torch.Tensor, start: torch.Tensor,
             hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of `kind` over the rows `views` hold; their state is updated; returns (logits, hidden)."""
        inputs = {f"state.{k}": v for k, v in views.items()}
        inputs.update(tokens=tokens.to(self.device), start=start.to(self.device))
        if hidden is not None:
            inputs["hidden"] = hidden
        with batch_invariant():
            out = self.runner.run(f"{kind}_t{tokens.shape[1]}", inputs)
        self._store(views, out)
        return out["logits"], out["hidden"]

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                    seed: int = 0, on_token: Callable[[int], None] | None = None) -> int:
        """Queue a request; it joins the batch at the next `step`. Returns its id. `on_token` hears each token the
        request emits, as it is emitted. A prompt the artifact cannot
        hold (or with ids outside the vocabulary) is refused here with a ValueError naming the limit."""
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: got {max_new_tokens}; allowed: >= 1")
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in prompt):
            raise ValueError(f"prompt: token ids must lie in [0, {self.vocab_size})")
        need = len(prompt) + max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} = {need} positions; "
                             f"the artifact holds {self.max_seq_len}")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        request = _Request(next(self._ids), list(prompt), max_new_tokens, sampling, generator, on_token=on_token)
        self._waiting.append(request)
        return request.id

    def set_drafts(self, drafts: int) -> None:
        """MTP drafts per step for the requests to come (0: plain decoding); only while no request is active."""
        if not 0 <= drafts <= self.max_drafts:
            raise ValueError(f"mtp: got {drafts}; this artifact drafts 0 to {self.max_drafts} tokens a step")
        if self.active:
            raise ValueError("mtp: the draft count changes only between batches (requests are active)")
        self.drafts = drafts

    @property
    def active(self) -> int:
        """Requests waiting or in the batch."""
        return len(self._waiting) + sum(r is not None for r in self._slots)

    def step(self) -> list[Finished]:
        """Admit waiting requests into free slots (prefill), then one decode or speculative step for the batch;
        returns the requests that finished in it."""
        done = self._admit()
        batch = [r for r in self._slots if r is not None]
        if batch:
            self.steps += 1
            (self._speculate if self.drafts else self._decode)(batch)
            done += [r for r in batch if r.done]
        for request in done:
            if 0 <= request.slot < len(self._slots) and self._slots[request.slot] is request:
                self._slots[request.slot] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        return [r.finished() for r in done]

    # ---- prefill ----------------------------------------------------------------------------------
    def _admit(self) -> list[_Request]:
        """Prefill waiting requests while slots are free; returns those already finished (one new token)."""
        finished = []
        while self._waiting:
            slot = self._free_slot()
            if slot is None:
                break
            request = self._waiting.pop(0)
            request.slot = slot
            self._prefill(request)
            if request.done:
                finished.append(request)
            else:
                self._slots += [None] * (slot + 1 - len(self._slots))
                self._slots[slot] = request
        return finished

    def _free_slot(self) -> int | None:
        for slot in range(self._pool().capacity):
            if slot >= len(self._slots) or self._slots[slot] is None:
                return slot
        return None

    def _chunks(self, length: int) -> list[tuple[int, int]]:
        """Whole chunks of the prefill variant, then single tokens for the remainder."""
        whole = length - length % self.prefill_chunk
        steps = [(s, s + self.prefill_chunk) for s in range(0, whole, self.prefill_chunk)]
        return steps + [(t, t + 1) for t in range(whole, length)]

    def _prefill_kind(self, kind: str, views: dict[str, torch.Tensor], tokens: torch.Tensor,
                      hidden: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the last token [1, V], hidden streams of every token [1, L, n, D])."""
        logits, hiddens = None, []
        for a, b in self._chunks(tokens.shape[1]):
            h = None if hidden is None else hidden[:, a:b]
            step_logits, step_hidden = self._run(kind, views, tokens[:, a:b], torch.tensor([a]), h)
            logits = step_logits[:, -1]
            hiddens.append(step_hidden)
        return logits, torch.cat(hiddens, dim=1)

    def _prefill(self, request: _Request) -> None:
        """The prompt through the main model (and the MTP layer) in the request's slot; emits its first token."""
        slot = request.slot
        pool = self._pool()
        for name, tensor in pool.tensors.items():
            tensor[slot].fill_(pool.specs[name].fill)
        views = {k: v[slot:slot + 1] for k, v in pool.tensors.items()}
        ids = torch.tensor([request.prompt], device=self.device)
        logits, hidden = self._prefill_kind("main", views, ids, None)
        first = int(sample(logits, request.sampling, request.generator))
        request.emit(first)
        request.pos = len(request.prompt)
        request.drafted, request.accepted = [0] * self.drafts, [0] * self.drafts
        if self.drafts and not request.done:
            mtp_ids = torch.cat((ids[:, 1:], torch.tensor([[first]], device=self.device)), dim=1)
            draft_logits, draft_hidden = self._prefill_kind("mtp", views, mtp_ids, hidden)
            request.draft_logits, request.draft_hidden = draft_logits[0], draft_hidden[0, -1]

    # ---- decoding ---------------------------------------------------------------------------------
    def _batch_inputs(self, batch: list[_Request], width: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(rows, tokens [rows, width] zeros, start [rows] zeros) for the slots up to the highest in use."""
        rows = max(r.slot for r in batch) + 1
        return (rows, torch.zeros(rows, width, dtype=torch.long, device=self.device),
                torch.zeros(rows, dtype=torch.long, device=self.device))

    def _decode(self, batch: list[_Request]) -> None:
        rows, tokens, start = self._batch_inputs(batch, 1)
        for r in batch:
            tokens[r.slot, 0], start[r.slot] = r.tokens[-1], r.pos
        logits, _ = self._run("main", self._pool().rows(rows), tokens, start)
        for r in batch:
            r.emit(int(sample(logits[r.slot:r.slot + 1, 0], r.sampling, r.generator)))
            r.pos += 1
            r.steps += 1

    def _speculate(self, batch: list[_Request]) -> None:
        k = self.drafts
        views = self._pool().rows(max(r.slot for r in batch) + 1)
        drafts, draft_probs = self._draft(batch, views, k)
        rows, tokens, start = self._batch_inputs(batch, k + 1)
        for r in batch:
            tokens[r.slot] = torch.tensor([r.tokens[-1], *drafts[r.id]])
            start[r.slot] = r.pos
        logits, hidden = self._run("main", views, tokens, start)
        next_ids = torch.zeros_like(tokens)
        accepted_counts = {}
        for r in batch:
            emitted = self._verify(r, drafts[r.id], draft_probs[r.id], logits[r.slot])
            accepted_counts[r.id] = len(emitted) - 1
            next_ids[r.slot] = torch.tensor(emitted + [emitted[-1]] * (k + 1 - len(emitted)))
            for token in emitted:
                r.emit(token)
            r.steps += 1
        mtp_logits, mtp_hidden = self._run("mtp", views, next_ids, start, hidden)
        for r in batch:
            a = accepted_counts[r.id]
            r.draft_logits, r.draft_hidden = mtp_logits[r.slot, a], mtp_hidden[r.slot, a]
            r.pos += a + 1

    def _draft(self, batch: list[_Request], views: dict[str, torch.Tensor],
               k: int) -> tuple[dict[int, list[int]], dict[int, list[torch.Tensor]]]:
        """Each request's k drafts and the distributions they were drawn from: the first from its stored MTP
        logits, the others from MTP steps on the MTP layer's own output (the draft before, at pos + j - 1)."""
        drafts: dict[int, list[int]] = {r.id: [] for r in batch}
        probs: dict[int, list[torch.Tensor]] = {r.id: [] for r in batch}
        logits = {r.id: r.draft_logits for r in batch}
        hidden = {r.id: r.draft_hidden for r in batch}
        for j in range(k):
            for r in batch:
                q = target_probs(logits[r.id], r.sampling)
                finite = bool(torch.isfinite(logits[r.id]).all())
                draft = int(sample(logits[r.id].view(1, -1), r.sampling, r.generator)) if finite else 0
                r.rejected_nonfinite += not finite
                drafts[r.id].append(draft)
                probs[r.id].append(q if finite else torch.full_like(q, float("nan")))
            if j == k - 1:
                break
            rows, tokens, start = self._batch_inputs(batch, 1)
            streams = torch.zeros((rows, 1, *batch[0].draft_hidden.shape), dtype=batch[0].draft_hidden.dtype,
                                  device=self.device)
            for r in batch:
                tokens[r.slot, 0], start[r.slot] = drafts[r.id][-1], r.pos + j
                streams[r.slot, 0] = hidden[r.id]
            step_logits, step_hidden = self._run("mtp", views, tokens, start, streams)
            for r in batch:
                logits[r.id], hidden[r.id] = step_logits[r.slot, 0], step_hidden[r.slot, 0]
        return drafts, probs

    def _verify(self, r: _Request, drafts: list[int], draft_probs: list[torch.Tensor],
                logits: torch.Tensor) -> list[int]:
        """The tokens one verification emits for request r: its accepted drafts, then the replacement of the
        first rejected one or the bonus token after all k (logits [k + 1, V] of the main step)."""
        emitted = []
        for j in range(len(drafts)):
            r.drafted[j] += 1
        for j, (draft, q) in enumerate(zip(drafts, draft_probs)):
            p = target_probs(logits[j], r.sampling).view(1, -1)
            accepted, replacement = verify_draft(p, q.view(1, -1), torch.tensor([draft]), r.sampling, r.generator)
            if not bool(accepted):
                return emitted + [int(replacement)]
            r.accepted[j] += 1
            emitted.append(draft)
        return emitted + [int(sample(logits[len(drafts)].view(1, -1), r.sampling, r.generator))]

    # ---- whole batches ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                 mtp: int = 0, seed: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
        """`max_new_tokens` for each prompt through `add_request` and `step` (request i seeded with seed + i;
        `on_token(i, token)` hears prompt i's tokens as they come);
        `mtp` drafts a step (0 to `max_drafts`). A prompt refused by `add_request` gets its error in
        `errors` and no tokens; the others go on."""
        if not prompts:
            raise ValueError("prompts: at least one prompt")
        self.set_drafts(mtp)
        base = 0 if seed is None else seed
        result = GenerationResult(tokens=[[] for _ in prompts], drafted_by_position=[0] * mtp,
                                  accepted_by_position=[0] * mtp)
        rows = {}
        for i, prompt in enumerate(prompts):
            try:
                hear = None if on_token is None else functools.partial(on_token, i)
                rows[self.add_request(prompt, max_new_tokens, sampling, base + i, hear)] = i
            except ValueError as error:
                result.errors[i] = str(error)
        first_step = self.steps
        while self.active:
            for done in self.step():
                result.tokens[rows[done.id]] = done.tokens
                result.rejected_nonfinite += done.rejected_nonfinite
                for j in range(mtp):
                    result.drafted_by_position[j] += done.drafted[j]
                    result.accepted_by_position[j] += done.accepted[j]
        result.steps = self.steps - first_step
        result.drafted, result.accepted = sum(result.drafted_by_position), sum(result.accepted_by_position)
        return result
