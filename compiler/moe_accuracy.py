"""The accuracy delta of the W4A4 MoE against W4A8, measured at compile time for the manifest (`--moe w4a4`).

The compiled prefill variant `main_t{C}` (and `main_t1` for a last partial chunk) runs twice on CPU over one fixed
text from an empty state, through the plans' own op references: as lowered (every `dsv4c::moe_fp4` with W4A4
activations) and with each of those ops switched to W4A8 activations, everything else alike. Recorded: the share
of positions whose greedy next token agrees, and the mean over positions of KL(P_w4a8 || P_w4a4) of the
next-token distributions, in nats.

The text: for a checkpoint with the byte tokenizer, the embedded demo model's held-out bytes (the first bytes of
the held-out standard-library files its training.json lists, from this Python's standard library), `<|bos|>`
first; otherwise, or where this Python lacks those files, a fixed random token sequence over the model's
vocabulary (seeded), and the record says which and why. At most `TOKENS` tokens, and fewer than max_seq_len.
Cost: two CPU passes of the whole model over the text (about a second each for the embedded model).
"""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from dsv4c.codegen import moe_fp4
from dsv4c.compiler.scoring import runner_logits
from dsv4c.model.demo import demo_checkpoint
from dsv4c.model.tokenizer import BYTE_BOS_ID, byte_tokenizer
from dsv4c.runtime.batch_invariant import batch_invariant
from dsv4c.runtime.executor import Executor, weight_inputs
from dsv4c.runtime.plan import Plan, PlanOp
from dsv4c.runtime.state_pool import StatePool, StateSpec

FUSED_MOE = "dsv4c::moe_fp4.default"
ACTIVATIONS_ARG = [a.name for a in moe_fp4.moe_fp4._opoverload._schema.arguments].index("activations")
MEASURED, AGAINST = "w4a4", "w4a8"
TOKENS = 256
RANDOM_SEED = 0


@dataclasses.dataclass(frozen=True)
class Text:
    """The token ids measured on and what they are."""

    tokens: torch.Tensor  # int64 [n]
    description: str


def measure(plans: Mapping[str, Plan], weights: Mapping[str, torch.Tensor], specs: Mapping[str, StateSpec],
            text: Text, chunk: int) -> dict[str, Any]:
    """The manifest's `moe_accuracy` record for plans lowered with W4A4 MoE ops (`weights`: every tensor the
    plans read, by key; `specs`: their state); where no op was lowered to W4A4, a record that says so."""
    if not any(op.op == FUSED_MOE and op.args[ACTIVATIONS_ARG] == MEASURED for p in plans.values() for op in p.ops):
        return {"against": AGAINST, "not_measured": f"no MoE layer was lowered to {MEASURED}"}
    measured = _logits(plans, weights, specs, text.tokens, chunk)
    against = _logits({name: with_activations(p, AGAINST) for name, p in plans.items()}, weights, specs,
                      text.tokens, chunk)
    kl = F.kl_div(measured.log_softmax(-1), against.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    agreement = (measured.argmax(-1) == against.argmax(-1)).double().mean().item()
    return {"against": AGAINST, "top1_agreement": round(agreement, 6), "mean_kl": float(f"{kl.mean().item():.6g}"),
            "tokens": int(text.tokens.numel()), "text": text.description}


def with_activations(plan: Plan, activations: str) -> Plan:
    """`plan` with every W4A4 `moe_fp4` op's routed activations set to `activations`."""
    def switched(op: PlanOp) -> PlanOp:
        if op.op != FUSED_MOE or op.args[ACTIVATIONS_ARG] != MEASURED:
            return op
        args = (*op.args[:ACTIVATIONS_ARG], activations, *op.args[ACTIVATIONS_ARG + 1:])
        return dataclasses.replace(op, args=args)

    return dataclasses.replace(plan, ops=tuple(switched(op) for op in plan.ops))


class _PlanRunner:
    """Runs step variants by name through their plans' op references on CPU, batch-invariant as the runtime's
    runners step them."""

    def __init__(self, plans: Mapping[str, Plan], weights: Mapping[str, torch.Tensor]):
        self.executors = {name: Executor(plan, {key: weights[key] for key in set(plan.constants.values())}, "cpu",
                                         weight_inputs(plan, weights)) for name, plan in plans.items()}

    def run(self, variant: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with batch_invariant():
            return self.executors[variant].run(inputs)


def _logits(plans: Mapping[str, Plan], weights: Mapping[str, torch.Tensor], specs: Mapping[str, StateSpec],
            tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    """fp32 logits `[n, V]` of `tokens` from an empty state (whole chunks of `chunk`, then single tokens)."""
    steps = {f"main_t{chunk}", "main_t1"}
    state = StatePool(specs, 1, "cpu").reset(1)
    with torch.no_grad():
        return runner_logits(_PlanRunner({n: p for n, p in plans.items() if n in steps}, weights), state, tokens,
                             chunk)


def fixed_text(tokenizer: Tokenizer | None, vocab_size: int, max_seq_len: int) -> Text:
    """The text to measure on (the module docstring says which); `tokenizer` the checkpoint's, if any."""
    length = min(TOKENS, max_seq_len - 1)
    if tokenizer is None or tokenizer.get_vocab() != byte_tokenizer().get_vocab():
        why = "the checkpoint has no byte tokenizer"
    else:
        held = _held_out(length)
        if held is not None:
            return held
        why = "this Python's standard library lacks the demo model's held-out files"
    tokens = torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(RANDOM_SEED))
    return Text(tokens, f"random tokens (seed {RANDOM_SEED}) over the vocabulary of {vocab_size}: {why}")


def _held_out(length: int) -> Text | None:
    """`<|bos|>` + the demo model's held-out files' bytes, one file after the other, `length` tokens in all;
    None where this Python's standard library lacks them (token id b is byte b: model/tokenizer.py)."""
    files = json.loads((demo_checkpoint() / "training.json").read_text())["corpus"]["held_out_files"]
    root = Path(sysconfig.get_paths()["stdlib"])
    data, used = b"", []
    for rel in files:
        if len(data) >= length - 1:
            break
        if (root / rel).is_file():
            data, used = data + (root / rel).read_bytes(), used + [rel]
    if len(data) < length - 1:
        return None
    tokens = torch.tensor([BYTE_BOS_ID, *data[:length - 1]])
    return Text(tokens, f"held-out text of the embedded demo model: <|bos|> + the first {length - 1} bytes of "
                        f"{', '.join(used)} (this Python's standard library)")
