"""Continuous batching over compiled step variants, with MTP speculative decoding of up to three drafts.

The engine never sees the model: it calls `runner.run(variant, inputs)` where a variant is `main_t{T}` or
`mtp_t{T}` (T tokens per sequence) and inputs/outputs are named tensors (`tokens`, `start`, `hidden`, `state.*`
in; `logits`, `hidden`, `state.*` out). Requests join (`add_request`) and leave (returned by `step` as they
finish) between steps; each is prefilled in the pool's prefill row (one fixed row, so the runner replays one
CUDA graph per prefill variant whatever the slot) and then owns a row ("slot") of the state pool, its prefilled
state copied in, until its last token; a step runs rows 0..n-1 where n - 1 is the highest slot in use (a free
slot in between is padding: token 0 at position 0, writing only its own row, which the next request to take it
overwrites).

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
own tokens only, and every step computes each row as it would alone (runtime/batch_invariant.py; the runner's
contract: `StepRunner`): a request's tokens do not depend on which others share its steps or on k (greedy).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Mapping, Protocol

import torch

from dsv4c.model.config import MAX_DRAFTS
from dsv4c.runtime.sampler import SamplingParams, draw, sample, target_probs, verify_draft
from dsv4c.runtime.state_pool import StatePool, StateSpec


class StepRunner(Protocol):
    """Runs a step variant on named inputs, each row as it would alone: BucketRunner's CUDA graphs hold the
    batch-invariant kernels and its executor runs inside `batch_invariant()`, as EagerRunner's reference does
    (the engine enters nothing itself: a graph replay dispatches no aten op, and registering the invariant kernels
    is host work a replay would pay for nothing)."""

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
            if new is not view and new.data_ptr() != view.data_ptr():
                view.copy_(new)

    def _run(self, kind: str, views: dict[str, torch.Tensor], tokens: torch.Tensor, start: torch.Tensor,
             hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of `kind` over the rows `views` hold; their state is updated; returns (logits, hidden)."""
        inputs = {f"state.{k}": v for k, v in views.items()}
        inputs.update(tokens=tokens.to(self.device), start=start.to(self.device))
        if hidden is not None:
            inputs["hidden"] = hidden
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
                      hidden: torch.Tensor | None, keep_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits of the last token [1, V], hidden streams of every token [1, L, n, D] if `keep_hidden`), copied
        out of the runner's outputs (a CUDA graph's buffers, which its next replay overwrites)."""
        logits, hiddens = None, []
        for a, b in self._chunks(tokens.shape[1]):
            h = None if hidden is None else hidden[:, a:b]
            step_logits, step_hidden = self._run(kind, views, tokens[:, a:b], torch.tensor([a]), h)
            logits = step_logits[:, -1].clone()
            if keep_hidden:
                hiddens.append(step_hidden.clone())
        return logits, torch.cat(hiddens, dim=1) if keep_hidden else None

    def _prefill(self, request: _Request) -> None:
        """The prompt through the main model (and the MTP layer) in the pool's prefill row, then copied into the
        request's slot; emits its first token."""
        pool = self._pool()
        views = pool.prefill_row()
        ids = torch.tensor([request.prompt], device=self.device)
        drafting = self.drafts > 0 and request.max_new_tokens > 1
        logits, hidden = self._prefill_kind("main", views, ids, None, keep_hidden=drafting)
        first = int(sample(logits, request.sampling, request.generator))
        request.emit(first)
        request.pos = len(request.prompt)
        request.drafted, request.accepted = [0] * self.drafts, [0] * self.drafts
        if self.drafts and not request.done:
            mtp_ids = torch.cat((ids[:, 1:], torch.tensor([[first]], device=self.device)), dim=1)
            draft_logits, draft_hidden = self._prefill_kind("mtp", views, mtp_ids, hidden, keep_hidden=True)
            request.draft_logits, request.draft_hidden = draft_logits[0], draft_hidden[0, -1]
        pool.commit_prefill(request.slot)

    def prefill_row(self) -> dict[str, torch.Tensor]:
        """The pool's prefill row, reset (a sequence's state for callers that step the runner themselves: the
        runner replays its prefill graphs over it; `StatePool.commit_prefill` copies it into a slot)."""
        return self._pool().prefill_row()

    # ---- decoding ---------------------------------------------------------------------------------
    # A step's tokens and positions are built on the host and sent in one copy each; greedy requests take their
    # tokens from one argmax over the step's logits and one transfer back. Only sampling requests are handled
    # one by one, each drawing from its own generator.
    def _step_inputs(self, batch: list[_Request], tokens: Mapping[int, list[int]],
                     start: Mapping[int, int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(rows, tokens [rows, width], start [rows]) for the slots up to the highest in use: request r's
        `tokens[r.id]` and `start[r.id]` in its slot's row, zeros in the rows of free slots."""
        rows = max(r.slot for r in batch) + 1
        token_rows, starts = [[0] * len(tokens[batch[0].id]) for _ in range(rows)], [0] * rows
        for r in batch:
            token_rows[r.slot], starts[r.slot] = tokens[r.id], start[r.id]
        return rows, torch.tensor(token_rows, device=self.device), torch.tensor(starts, device=self.device)

    @staticmethod
    def _argmax_rows(batch: list[_Request], logits: torch.Tensor) -> list | None:
        """The argmax of `logits` [rows, ..., V] as (nested) lists, in one transfer; None if no request of
        `batch` is greedy."""
        return logits.argmax(-1).tolist() if any(r.sampling.greedy for r in batch) else None

    @staticmethod
    def _sampled(r: _Request, logits: torch.Tensor) -> int:
        """A token drawn for r from logits [V] with its own sampling parameters and generator."""
        return int(sample(logits.view(1, -1), r.sampling, r.generator))

    def _decode(self, batch: list[_Request]) -> None:
        rows, tokens, start = self._step_inputs(batch, {r.id: [r.tokens[-1]] for r in batch},
                                                {r.id: r.pos for r in batch})
        logits, _ = self._run("main", self._pool().rows(rows), tokens, start)
        greedy = self._argmax_rows(batch, logits[:, 0])
        for r in batch:
            r.emit(greedy[r.slot] if r.sampling.greedy else self._sampled(r, logits[r.slot, 0]))
            r.pos += 1
            r.steps += 1

    def _speculate(self, batch: list[_Request]) -> None:
        k = self.drafts
        views = self._pool().rows(max(r.slot for r in batch) + 1)
        drafts, usable, draft_probs = self._draft(batch, views, k)
        starts = {r.id: r.pos for r in batch}
        _, tokens, start = self._step_inputs(batch, {r.id: [r.tokens[-1], *drafts[r.id]] for r in batch}, starts)
        logits, hidden = self._run("main", views, tokens, start)
        greedy = self._argmax_rows(batch, logits)
        emitted = {r.id: self._verify(r, drafts[r.id], usable[r.id], draft_probs[r.id], logits[r.slot],
                                      greedy[r.slot] if r.sampling.greedy else None) for r in batch}
        for r in batch:
            for token in emitted[r.id]:
                r.emit(token)
            r.steps += 1
        next_ids = {r.id: emitted[r.id] + [emitted[r.id][-1]] * (k + 1 - len(emitted[r.id])) for r in batch}
        _, next_tokens, _ = self._step_inputs(batch, next_ids, starts)
        mtp_logits, mtp_hidden = self._run("mtp", views, next_tokens, start, hidden)
        for r in batch:
            a = len(emitted[r.id]) - 1
            r.draft_logits, r.draft_hidden = mtp_logits[r.slot, a], mtp_hidden[r.slot, a]
            r.pos += a + 1

    def _draft(self, batch: list[_Request], views: dict[str, torch.Tensor], k: int
               ) -> tuple[dict[int, list[int]], dict[int, list[bool]], dict[int, list[torch.Tensor | None]]]:
        """Each request's k drafts, whether each came from finite logits, and (sampling requests) the
        distributions they were drawn from: the first from its stored MTP logits, the others from MTP steps on
        the MTP layer's own output (the draft before, at pos + j - 1). A draft from logits that are not finite
        is token 0, counted, and always rejected."""
        drafts: dict[int, list[int]] = {r.id: [] for r in batch}
        usable: dict[int, list[bool]] = {r.id: [] for r in batch}
        probs: dict[int, list[torch.Tensor | None]] = {r.id: [] for r in batch}
        logits = torch.stack([r.draft_logits for r in batch])  # [requests, V], batch order
        hidden = torch.stack([r.draft_hidden for r in batch])
        slots = torch.tensor([r.slot for r in batch], device=self.device)
        for j in range(k):
            picks = torch.where(torch.isfinite(logits).all(-1), logits.argmax(-1), -1).tolist()
            for i, r in enumerate(batch):
                finite = picks[i] >= 0
                r.rejected_nonfinite += not finite
                q = None if r.sampling.greedy else target_probs(logits[i], r.sampling)
                if not finite:
                    draft = 0
                else:
                    draft = picks[i] if r.sampling.greedy else int(draw(q.view(1, -1), r.generator))
                drafts[r.id].append(draft)
                usable[r.id].append(finite)
                probs[r.id].append(q)
            if j == k - 1:
                break
            rows, tokens, start = self._step_inputs(batch, {r.id: drafts[r.id][-1:] for r in batch},
                                                    {r.id: r.pos + j for r in batch})
            streams = hidden.new_zeros((rows, 1, *hidden.shape[1:]))
            streams[slots, 0] = hidden
            step_logits, step_hidden = self._run("mtp", views, tokens, start, streams)
            logits, hidden = step_logits[slots, 0], step_hidden[slots, 0]
        return drafts, usable, probs

    def _verify(self, r: _Request, drafts: list[int], usable: list[bool], draft_probs: list[torch.Tensor | None],
                logits: torch.Tensor, greedy: list[int] | None) -> list[int]:
        """The tokens one verification emits for request r: its accepted drafts, then the replacement of the
        first rejected one or the bonus token after all k (logits [k + 1, V] of the main step; `greedy` their
        argmax for a greedy request, which accepts a usable draft iff it is that argmax)."""
        emitted = []
        for j in range(len(drafts)):
            r.drafted[j] += 1
        for j, draft in enumerate(drafts):
            if greedy is not None:
                if not (usable[j] and draft == greedy[j]):
                    return emitted + [greedy[j]]
            else:
                p = target_probs(logits[j], r.sampling).view(1, -1)
                q = draft_probs[j] if usable[j] else torch.full_like(p, float("nan"))
                accepted, replacement = verify_draft(p, q.view(1, -1), torch.tensor([draft]), r.sampling,
                                                     r.generator)
                if not bool(accepted):
                    return emitted + [int(replacement)]
            r.accepted[j] += 1
            emitted.append(draft)
        return emitted + [greedy[len(drafts)] if greedy is not None else self._sampled(r, logits[len(drafts)])]

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
