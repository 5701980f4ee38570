"""Score a token sequence (reference model or compiled artifact): prefill in chunks, then decode token by token.

The logits of every position come from the step that consumed that position's token, so the same
function measures prefill/decode agreement as well as perplexity.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dsv4c.runtime.engine import StepRunner
from dsv4c.model.config import ModelConfig
from dsv4c.model.step import Weights, forward, init_state
from dsv4c.model.numerics import Numerics


@dataclasses.dataclass(frozen=True)
class Score:
    """Mean negative log-likelihood (nats) of tokens 1..T-1 given their prefixes, and its perplexity."""

    mean_nll: float
    perplexity: float
    predicted: int
    logits: torch.Tensor  # [T, V] fp32: position t's logits predict token t+1


def step_schedule(length: int, chunk: int, decode_from: int | None) -> list[tuple[int, int]]:
    """(start, stop) of each step: chunks of `chunk` tokens up to `decode_from`, then single tokens."""
    if chunk < 1:
        raise ValueError(f"chunk: got {chunk}; allowed: a positive integer")
    prefill_end = length if decode_from is None else max(0, min(decode_from, length))
    steps = [(s, min(s + chunk, prefill_end)) for s in range(0, prefill_end, chunk)]
    return steps + [(t, t + 1) for t in range(prefill_end, length)]


def run_logits(w: Weights, cfg: ModelConfig, num: Numerics, tokens: torch.Tensor, chunk: int = 256,
               decode_from: int | None = None) -> torch.Tensor:
    """Logits `[T, V]` of a 1-D token sequence under the reference model, step by step as `step_schedule`
    says."""
    _check_tokens(tokens, cfg.vocab_size)
    device = w["embed.weight"].device
    state = init_state(cfg, 1, _capacity(cfg, tokens.numel()), num, device)
    pieces = []
    for start, stop in step_schedule(tokens.numel(), chunk, decode_from):
        ids = tokens[start:stop].to(device).unsqueeze(0)
        logits, _, state = forward(w, state, ids, torch.tensor([start], device=device), cfg, num)
        pieces.append(logits[0].float().cpu())
    return torch.cat(pieces)


def runner_logits(runner: StepRunner, state: dict[str, torch.Tensor], tokens: torch.Tensor, chunk: int,
                  decode_from: int | None = None) -> torch.Tensor:
    """Logits `[T, V]` of a 1-D token sequence through a runner of compiled variants (`main_t{chunk}` for
    whole prefill chunks, `main_t1` for the rest), starting from an empty batch-1 `state`."""
    prefill_end = tokens.numel() if decode_from is None else max(0, min(decode_from, tokens.numel()))
    whole = prefill_end - prefill_end % chunk
    schedule = [(s, s + chunk) for s in range(0, whole, chunk)] + [(t, t + 1) for t in range(whole, tokens.numel())]
    device = next(iter(state.values())).device
    pieces = []
    for start, stop in schedule:
        inputs = {f"state.{k}": v for k, v in state.items()}
        inputs.update(tokens=tokens[start:stop].to(device).unsqueeze(0), start=torch.tensor([start], device=device))
        out = runner.run(f"main_t{stop - start}", inputs)
        state = {k: out[f"state.{k}"] for k in state}
        pieces.append(out["logits"][0].float().cpu())
    return torch.cat(pieces)


def score_logits(logits: torch.Tensor, tokens: torch.Tensor) -> Score:
    """Mean NLL and perplexity of tokens 1..T-1 under the logits of positions 0..T-2."""
    if tokens.numel() < 2:
        return Score(float("nan"), float("nan"), 0, logits)
    nll = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:].long(), reduction="mean").item()
    return Score(nll, math.exp(nll), tokens.numel() - 1, logits)


def score(w: Weights, cfg: ModelConfig, num: Numerics, tokens: torch.Tensor, chunk: int = 256,
          decode_from: int | None = None) -> Score:
    """Mean NLL and perplexity of `tokens` under the reference model, with every position's logits."""
    return score_logits(run_logits(w, cfg, num, tokens, chunk, decode_from), tokens)


def _check_tokens(tokens: torch.Tensor, vocab_size: int) -> None:
    if tokens.ndim != 1 or tokens.numel() == 0:
        raise ValueError("token ids: expected a non-empty 1-D sequence")
    if int(tokens.max()) >= vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"token ids: values must lie in [0, {vocab_size})")


def _capacity(cfg: ModelConfig, length: int) -> int:
    """Cache capacity for `length` tokens: rounded up to a whole number of the largest compression block."""
    block = max([r for r in cfg.compress_ratios if r] or [1])
    return max(block, -(-length // block) * block)
