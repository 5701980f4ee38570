"""`--moe w4a4`: the compile measures the W4A4 MoE against W4A8 (compiler/moe_accuracy.py) into the manifest.

On tiny cut to one layer (no tokenizer: a fixed random token sequence, said so in the record) and on the embedded
demo model (its byte tokenizer: its held-out text; hash- and score-routed layers), each compiled for cpu with
`--moe w4a4`, no MTP, max_seq_len 32 (31 tokens; the compiles dominate the time):
the record's fields and text, `dsv4c inspect` printing it, and (on tiny) its numbers recomputed here from the
artifact's own plans through the runtime's runner (the W4A4 plans as stored, the same plans with every moe_fp4
switched to W4A8): equal, since both runs are the same CPU references on the same values, batch-invariant both.
W4A4 rounds every activation of the routed experts to e2m1, so the two distributions differ (KL > 0) but not by
everything (agreement well above chance). (A compile without `--moe w4a4` records nothing: tests/test_moe_fp4_artifact.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv4c.compiler.moe_accuracy import AGAINST, with_activations
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.compiler.scoring import runner_logits
from dsv4c.export.inspect_artifact import describe
from dsv4c.model.checkpoint import write_synthetic
from dsv4c.model.demo import demo_checkpoint
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.runtime.artifact import load_artifact
from dsv4c.runtime.executor import Executor, weight_inputs
from dsv4c.runtime.loader import load

MAX_SEQ_LEN, CHUNK = 32, 2
TINY = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0))


@pytest.fixture(scope="module", params=["tiny", "demo"])
def artifact(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"accuracy_{request.param}")
    checkpoint = demo_checkpoint() if request.param == "demo" else write_synthetic(TINY, root / "ckpt", seed=4)
    options = CompileOptions(numerics=Numerics.plain(torch.float32), max_seq_len=MAX_SEQ_LEN, prefill_chunk=CHUNK,
                             mtp=False, moe="w4a4")
    return request.param, compile_checkpoint(checkpoint, root / "art", options)


def recomputed(path, text_tokens: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL) from the stored plans, through the runtime's own runner (W4A4 as stored)."""
    artifact, engine, logits = load_artifact(path), load(path), []
    for plans in (artifact.plans, {n: with_activations(p, AGAINST) for n, p in artifact.plans.items()}):
        for name, plan in plans.items():
            constants = {key: artifact.weights[key] for key in set(plan.constants.values())}
            engine.runner.executors[name] = Executor(plan, constants, "cpu", weight_inputs(plan, artifact.weights))
        logits.append(runner_logits(engine.runner, engine.new_state(1), text_tokens, CHUNK))
    measured, against = logits
    kl = F.kl_div(measured.log_softmax(-1), against.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return (measured.argmax(-1) == against.argmax(-1)).double().mean().item(), kl.mean().item()


def test_w4a4_compile_records_its_accuracy_against_w4a8(artifact):
    name, path = artifact
    record = load_artifact(path).manifest["moe_accuracy"]
    assert set(record) == {"against", "top1_agreement", "mean_kl", "tokens", "text"}
    assert record["against"] == "w4a8" and record["tokens"] == MAX_SEQ_LEN - 1
    assert 0.5 < record["top1_agreement"] <= 1 and 0 < record["mean_kl"] < 1
    text = "\n".join(describe(load_artifact(path)))
    assert f"moe accuracy against w4a8: top-1 agreement {record['top1_agreement']}, mean KL {record['mean_kl']}" in text
    if name == "demo":
        assert record["text"].startswith("held-out text of the embedded demo model")
        assert "__future__.py" in record["text"]  # the first held-out file, longer than the 30 bytes read
        return
    assert record["text"].startswith("random tokens (seed 0)") and "no byte tokenizer" in record["text"]
    tokens = torch.randint(0, TINY.vocab_size, (MAX_SEQ_LEN - 1,), generator=torch.Generator().manual_seed(0))
    agreement, kl = recomputed(path, tokens)
    assert record["top1_agreement"] == pytest.approx(agreement, abs=1e-6)
    assert record["mean_kl"] == pytest.approx(kl, rel=1e-4)
