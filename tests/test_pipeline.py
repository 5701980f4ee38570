"""End to end: checkpoint -> compile -> artifact -> runtime, against the eager reference model.

The artifact is compiled once for the module (capture is the slow part) from a tiny checkpoint whose
top-k selections keep every candidate, in fp32 without the step-function roundings: the graph computes
the routed experts densely where eager skips unselected ones, so the two differ by fp32 summation order
only, and the comparison can be tight (relative norm error 1e-5 over every position).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from dsv4c.model.checkpoint import Checkpoint, write_synthetic
from dsv4c.compiler.cli import main
from dsv4c.model.step import dequantize_weights
from dsv4c.model.numerics import Numerics
from dsv4c.compiler.pipeline import CompileOptions, compile_checkpoint
from dsv4c.model.presets import tiny
from dsv4c.compiler.scoring import run_logits, runner_logits, score_logits
from dsv4c.runtime.artifact import load_artifact
from dsv4c.runtime.executor import resolve_op
from dsv4c.runtime.loader import load

NUM = Numerics(dtype=torch.float32, act_quant=False, kv_fp8=False, indexer_fp4=False)
CFG = tiny().replace(num_experts_per_tok=tiny().n_routed_experts, index_topk=4096)
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any() and not torch.isnan(b).any(), "NaN never passes"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic(CFG, tmp_path_factory.mktemp("pipe") / "ckpt", seed=21)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "art"
    options = CompileOptions(numerics=NUM, max_seq_len=128, prefill_chunk=2, mtp=True)
    return compile_checkpoint(checkpoint, out, options)


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
        assert any(op.op.startswith("dsv4c::dequant_fp4_weight") for op in plan.ops), name
        for op in plan.ops:
            resolve_op(op.op)  # raises for anything that is not a registered op


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_mtp_on_the_artifact_is_lossless(artifact, seed):
    engine = load(artifact)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (9, 14, 5)]
    plain = engine.generate(prompts, 10)
    spec = engine.generate(prompts, 10, mtp=1)
    assert spec.tokens == plain.tokens
    assert spec.drafted > 0 and 0.0 <= spec.acceptance_rate <= 1.0


def test_generate_cli_reports_tokens_and_acceptance(artifact, capsys):
    assert main(["generate", str(artifact), "--prompt-ids", "3 1 4 1 5", "--prompt-ids", "9,2,6",
                 "--max-new-tokens", "6", "--mtp", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [len(t) for t in report["tokens"]] == [6, 6]
    assert report["drafted"] > 0 and report["accepted"] <= report["drafted"]


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


def test_killed_compile_leaves_no_artifact(checkpoint, tmp_path):
    target = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-m", "dsv4c.compiler.cli", "compile", str(checkpoint), "-o", str(target),
                             "--no-mtp", "--max-seq-len", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
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
