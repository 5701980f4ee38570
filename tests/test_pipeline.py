"""End to end: checkpoint -> compile -> artifact -> runtime, against the eager reference model.

The artifact (tests/plain_artifact.py) is compiled once for the worker (capture is the slow part) from a tiny
checkpoint whose top-k selections keep every candidate, in fp32 without the step-function roundings: the graph computes
the routed experts densely where eager skips unselected ones, so the two differ by fp32 summation order
only, and the comparison can be tight (relative norm error 1e-5 over every position).

MTP on the artifact: its random-weight MTP module almost never drafts the right token, so the accepting
path runs with oracle drafts (tests/oracle_drafts.py) built from the artifact's own plain greedy tokens.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dsv4c.model.checkpoint import Checkpoint, write_synthetic
from dsv4c.compiler.cli import main
from dsv4c.model.step import dequantize_weights
from dsv4c.model.presets import tiny
from dsv4c.compiler.scoring import run_logits, runner_logits, score_logits
from dsv4c.runtime.artifact import load_artifact
from dsv4c.runtime.engine import Engine
from dsv4c.runtime.executor import resolve_op
from dsv4c.runtime.loader import load
from dsv4c.runtime.sampler import SamplingParams
from oracle_drafts import OracleDrafts, expected_counts
from plain_artifact import CFG, GROUP, NUM, plain_artifact

pytestmark = pytest.mark.xdist_group(GROUP)
TOL = 1e-5
# The batch every generation test runs (the CLI's --prompt-ids included) and the tokens each row generates.
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [700, 12, 88, 5, 1000, 44, 3, 9, 27, 512, 64, 8, 19, 1]]
NEW_TOKENS = 10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def checkpoint():
    return plain_artifact()[0]


@pytest.fixture(scope="module")
def artifact():
    return plain_artifact()[1]


@pytest.fixture(scope="module")
def greedy(artifact) -> list[list[int]]:
    """The artifact's plain greedy tokens for PROMPTS (no MTP)."""
    return load(artifact).generate(PROMPTS, NEW_TOKENS).tokens


@pytest.fixture(scope="module")
def eager(checkpoint):
    ckpt = Checkpoint.open(checkpoint)
    return dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, NUM)


def test_artifact_logits_equal_eager_over_prefill_and_50_decode_steps(artifact, eager):
    engine = load(artifact)
    tokens = torch.randint(0, CFG.vocab_size, (70,))
    compiled = runner_logits(engine.runner, engine.new_state(1), tokens, chunk=2, decode_from=20)
    reference = run_logits(eager, CFG, NUM, tokens, chunk=20, decode_from=20)
    assert rel_err(compiled[:20], reference[:20]) < TOL
    assert rel_err(compiled[20:], reference[20:]) < TOL  # the 50 decode steps


def test_every_plan_op_is_a_registered_op(artifact):
    loaded = load_artifact(artifact)
    assert set(loaded.plans) == {"main_t1", "main_t2", "mtp_t1", "mtp_t2"}
    for name, plan in loaded.plans.items():
        namespaces = {op.op.split("::")[0] for op in plan.ops}
        assert namespaces <= {"aten", "prims", "dsv4c", "operator"}, name
        assert any(op.op.startswith("dsv4c::routed_moe") for op in plan.ops), name
        for op in plan.ops:
            resolve_op(op.op)  # raises for anything that is not a registered op


def test_greedy_mtp_on_the_artifact_is_lossless(artifact, greedy):
    """The artifact's own MTP module drafts (almost all rejected on random weights): greedy's tokens."""
    spec = load(artifact).generate(PROMPTS, NEW_TOKENS, mtp=1)
    assert spec.tokens == greedy
    assert spec.drafted > 0 and spec.accepted <= spec.drafted and spec.rejected_nonfinite == 0


def oracle_engine(artifact, greedy, wrong=lambda k: False) -> Engine:
    """The artifact's engine with its MTP drafts replaced by oracle drafts (tests/oracle_drafts.py)."""
    engine = load(artifact)
    runner = OracleDrafts(engine.runner, PROMPTS, greedy, wrong=wrong)
    return Engine(runner, engine.state_specs, engine.prefill_chunk, engine.max_seq_len, engine.device,
                  engine.vocab_size, pool=engine.pool)


def test_right_drafts_on_the_artifact_are_all_accepted(artifact, greedy):
    """Drafts equal to greedy's next token: every one accepted, two tokens a step, greedy's tokens."""
    spec = oracle_engine(artifact, greedy).generate(PROMPTS, NEW_TOKENS, mtp=1)
    steps = math.ceil((NEW_TOKENS - 1) / 2)  # the prefill emits one token, each step two
    assert spec.tokens == greedy
    assert (spec.steps, spec.drafted, spec.accepted) == (steps, len(PROMPTS) * steps, len(PROMPTS) * steps)


def test_wrong_drafts_on_the_artifact_give_the_exact_accepted_count(artifact, greedy):
    """Drafts off by one token id at continuation indices 1, 4, 7 (the rest right): exactly those are
    rejected, and the tokens stay greedy's."""
    def wrong(k: int) -> bool:
        return k % 3 == 1

    spec = oracle_engine(artifact, greedy, wrong).generate(PROMPTS, NEW_TOKENS, mtp=1)
    steps, accepted = expected_counts(NEW_TOKENS, wrong)
    assert (steps, accepted) == (6, 3)  # drafts for k = 1 (wrong), 2, 4 (wrong), 5, 7 (wrong), 8
    assert spec.tokens == greedy
    assert (spec.steps, spec.drafted, spec.accepted) == (steps, len(PROMPTS) * steps, len(PROMPTS) * accepted)


def test_generate_cli_reports_tokens_and_acceptance(artifact, greedy, capsys):
    """The CLI's MTP tokens are plain greedy's, and its counts agree with each other."""
    argv = ["generate", str(artifact), "--max-new-tokens", str(NEW_TOKENS), "--mtp", "1", "--json"]
    for prompt in PROMPTS:
        argv += ["--prompt-ids", " ".join(map(str, prompt))]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == greedy
    assert report["steps"] > 0 and report["drafted"] == len(PROMPTS) * report["steps"]
    assert 0 <= report["accepted"] <= report["drafted"] and report["rejected_nonfinite"] == 0
    assert report["acceptance_rate"] == report["accepted"] / report["drafted"]


def test_generate_cli_samples_as_the_engine_does_with_the_seed(artifact, greedy, capsys):
    """--temperature, --top-p and --seed reach the engine: the CLI's tokens are the engine's for that seed."""
    sampling = SamplingParams(temperature=0.8, top_p=0.9)
    assert main(["generate", str(artifact), "--prompt-ids", "3 1 4 1 5", "--max-new-tokens", "6",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens == load(artifact).generate([PROMPTS[0]], 6, sampling, seed=7).tokens
    assert tokens != [greedy[0][:6]]  # sampled, not greedy (true for this seed and artifact)
    assert all(0 <= t < CFG.vocab_size for t in tokens[0])


def test_score_cli_accepts_the_artifact(artifact, eager, tmp_path, capsys):
    tokens = torch.randint(0, CFG.vocab_size, (30,))
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, tokens.tolist())))
    assert main(["score", str(artifact), "--token-ids", str(ids), "--decode-from", "10"]) == 0
    compiled = float(capsys.readouterr().out.split("mean NLL ")[1].split()[0])
    assert abs(compiled - score_logits(run_logits(eager, CFG, NUM, tokens), tokens).mean_nll) < 1e-5


def test_tampered_artifact_is_refused_by_the_cli(artifact, tmp_path, capsys):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifact, copy)
    plan = copy / "plans" / "main_t1.json"
    plan.write_bytes(plan.read_bytes().replace(b"aten::", b"aten:;", 1))
    assert main(["generate", str(copy), "--prompt-ids", "1 2"]) == 2
    assert "main_t1.json" in capsys.readouterr().err


# Runs the CLI's compile with the weight-shard writer wrapped: the real writer runs, then the process says
# where it is writing (a marker file) and waits to be killed, the artifact half written.
COMPILE_PAUSED_IN_THE_WRITE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dsv4c.compiler.cli import main
    from dsv4c.runtime import artifact

    marker, argv = Path(sys.argv[1]), sys.argv[2:]
    write_weight_shards = artifact.write_weight_shards

    def write_then_wait(root, tensors, shard_bytes):
        written = write_weight_shards(root, tensors, shard_bytes)
        marker.write_text(str(root))
        time.sleep(300)
        return written

    artifact.write_weight_shards = write_then_wait
    sys.exit(main(argv))
""")
WRITE_START_LIMIT_S = 600  # capture of a one-layer model; far above what it takes on a loaded machine


def test_killed_compile_leaves_no_artifact(tmp_path):
    """SIGKILL while the artifact is being written (plans and weights in the staging folder, no manifest):
    nothing appears at the target, only the hidden `.<name>.partial-*` staging folder."""
    cfg = tiny().replace(num_hidden_layers=1, compress_ratios=(0, 0), num_hash_layers=0)
    ckpt = write_synthetic(cfg, tmp_path / "ckpt", seed=4)
    target, marker = tmp_path / "art", tmp_path / "writing"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", COMPILE_PAUSED_IN_THE_WRITE, str(marker), "compile", str(ckpt),
                                 "-o", str(target), "--no-mtp", "--max-seq-len", "64", "--prefill-chunk", "2"],
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + WRITE_START_LIMIT_S
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            written = marker.exists() and marker.read_text()
            assert written, (f"the compile never started writing the artifact (exit code {proc.poll()}, "
                             f"{WRITE_START_LIMIT_S} s limit): {(tmp_path / 'stderr').read_text()[-2000:]}")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".art.partial-")]
    assert [str(p) for p in staging] == [written]
    assert (staging[0] / "weights").is_dir() and not (staging[0] / "manifest.json").exists()
    assert not target.exists()


def test_inspect_cli_describes_and_exports_onnx(artifact, tmp_path, capsys):
    import onnx

    out = tmp_path / "main_t1.onnx"
    assert main(["inspect", str(artifact), "--onnx", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mhc_fusion" in text and "memory plan" in text and "main_t2" in text
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert any(node.domain == "dsv4c" for node in model.graph.node)
