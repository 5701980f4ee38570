"""The `dsv4c` command line: every subcommand runs for real; user errors are one line naming the flag or file,
exit 2, found before any work; Ctrl-C is one line, exit 130, and leaves nothing behind.

One test module fixture compiles (a one-layer model for h100, in a child process: Triton is imported there,
not here); every other check happens before a compile would start, so those tests take no compile time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv4c.compiler.cli import build_parser, main
from dsv4c.compiler.scoring import run_logits, step_schedule
from dsv4c.model.checkpoint import Checkpoint
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.model.step import dequantize_weights
from dsv4c.runtime.artifact import load_artifact, write_artifact

CHILD_LIMIT_S = 600  # a child's compile or its start on a loaded 2-core machine; far above what it takes


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["init-checkpoint", "--preset", "tiny", "--seed", "3", str(out)]) == 0
    return out


def _placeholder_artifact(path: Path) -> Path:
    """A real (empty) artifact: what `compile --overwrite` may replace."""
    fields = {"config": {}, "numerics": {}, "targets": [], "pass_log": [], "kernels": {}}
    return write_artifact(path, fields, {}, {"placeholder": torch.zeros(1)})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """`compile --overwrite --explain` of a one-layer model for h100 over an existing artifact, in a child
    process with Triton's FP-fusion setting unset (as a new user has it): (artifact path, the child's result)."""
    root = tmp_path_factory.mktemp("compiled")
    config = root / "config.json"
    config.write_text(json.dumps(tiny().replace(num_hidden_layers=1, compress_ratios=(4, 0), num_hash_layers=0)
                                 .to_dict()))
    assert main(["init-checkpoint", "--config", str(config), str(root / "ckpt")]) == 0
    art = _placeholder_artifact(root / "art")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION", "PYTHONWARNINGS")}
    result = subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", "compile", str(root / "ckpt"), "-o", str(art),
                             "--overwrite", "--explain", "--target", "h100", "--no-mtp", "--prefill-chunk", "2",
                             "--max-seq-len", "64", "--numerics", "plain", "--dtype", "fp32"],
                            capture_output=True, text=True, env=env, timeout=CHILD_LIMIT_S)
    return art, result


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_has_help_for_every_flag_with_its_default(capsys):
    parser = build_parser()
    commands = _subcommands(parser)
    assert set(commands) >= {"demo", "init-checkpoint", "info", "score", "compile", "generate", "inspect"}
    for name, command in [("dsv4c", parser), *commands.items()]:
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.dest} has no help"
        code, out, _ = _run([name, "--help"] if name in commands else ["--help"], capsys)
        assert code == 0 and out.startswith("usage: dsv4c")
        text = " ".join(out.split())
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, f"{name}: {action.dest} does not show its default"


def test_version_names_dsv4c_torch_and_triton(capsys):
    code, out, _ = _run(["--version"], capsys)
    triton = importlib.metadata.version("triton") if importlib.util.find_spec("triton") else "not installed"
    assert code == 0
    assert out.strip() == f"dsv4c {importlib.metadata.version('dsv4c')} (torch {torch.__version__}, triton {triton})"


def test_info_reports_pattern_and_counts(tiny_ckpt, capsys):
    assert main(["info", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "wCH|W" in out and "fp4" in out and "fp8" in out and "shards" in out


def test_init_checkpoint_from_a_config_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny().replace(num_hash_layers=0).to_dict()))
    assert main(["init-checkpoint", "--config", str(config), str(tmp_path / "ck")]) == 0
    assert Checkpoint.open(tmp_path / "ck").config.num_hash_layers == 0


def test_init_checkpoint_overwrite_replaces_only_a_checkpoint(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    code, _, err = _run(["init-checkpoint", "--preset", "tiny", "--overwrite", str(notes)], capsys)
    assert code == 2 and str(notes) in err and "not a checkpoint" in err
    assert [p.name for p in notes.iterdir()] == ["todo.txt"]
    ckpt = tmp_path / "ck"
    assert main(["init-checkpoint", "--preset", "tiny", "--seed", "1", str(ckpt)]) == 0
    before = Checkpoint.open(ckpt).get("embed.weight")
    assert main(["init-checkpoint", "--preset", "tiny", "--seed", "2", "--overwrite", str(ckpt)]) == 0
    assert not torch.equal(Checkpoint.open(ckpt).get("embed.weight"), before)


def test_score_prints_nll_and_saves_every_position(tiny_ckpt, tmp_path, capsys):
    ids = torch.randint(0, 1024, (70,))
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids.tolist())))
    out = tmp_path / "logits.safetensors"
    assert main(["score", str(tiny_ckpt), "--token-ids", str(tmp_path / "ids.txt"), "--decode-from", "60",
                 "--chunk", "32", "--numerics", "plain", "--dtype", "fp32", "--logits-out", str(out)]) == 0
    text = capsys.readouterr().out
    saved = load_file(str(out))
    assert saved["logits"].shape == (70, 1024) and torch.equal(saved["token_ids"], ids)
    nll = torch.nn.functional.cross_entropy(saved["logits"][:-1], ids[1:]).item()
    assert f"mean NLL {nll:.6f}" in text
    # the saved logits are the model's: recompute them in one shot
    ckpt = Checkpoint.open(tiny_ckpt)
    num = Numerics.plain(torch.float32)
    w = dequantize_weights({n: ckpt.get(n) for n in ckpt.headers}, num)
    one_shot = run_logits(w, ckpt.config, num, ids, chunk=70)
    assert torch.allclose(saved["logits"], one_shot, rtol=1e-3, atol=1e-3)


def test_step_schedule_prefills_in_chunks_then_decodes():
    assert step_schedule(10, 4, 6) == [(0, 4), (4, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
    assert step_schedule(5, 8, None) == [(0, 5)]


def test_missing_checkpoint_is_one_line(capsys):
    assert main(["info", "/nonexistent/ckpt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nonexistent/ckpt" in err[0]


def test_existing_output_is_refused(tiny_ckpt, capsys):
    assert main(["init-checkpoint", "--preset", "tiny", str(tiny_ckpt)]) == 2
    assert str(tiny_ckpt) in capsys.readouterr().err


def test_unknown_preset_is_a_usage_error(capsys):
    code, _, err = _run(["init-checkpoint", "--preset", "huge", "/tmp/x"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "huge" in err


def test_bad_token_file_names_the_file(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "ids.txt"
    bad.write_text("1 2 three")
    assert main(["score", str(tiny_ckpt), "--token-ids", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    bad.write_text("1 2 99999")
    assert main(["score", str(tiny_ckpt), "--token-ids", str(bad)]) == 2
    assert "1024" in capsys.readouterr().err


# Each bad value is refused before the work it would spoil: the checkpoint and artifact paths do not exist,
# so a later check would fail on them instead, with a message not naming the flag.
BAD_VALUES = {
    "empty-target": (["compile", "{none}", "-o", "{tmp}/a", "--target", ""], "--target"),
    "unknown-target": (["compile", "{none}", "-o", "{tmp}/a", "--target", "h100,tpu"], "--target"),
    "cache-of-0": (["compile", "{none}", "-o", "{tmp}/a", "--max-seq-len", "0"], "--max-seq-len"),
    "chunk-beyond-the-cache": (["compile", "{none}", "-o", "{tmp}/a", "--max-seq-len", "8", "--prefill-chunk", "16"],
                               "--max-seq-len"),
    "no-threads": (["compile", "{none}", "-o", "{tmp}/a", "--threads", "0"], "--threads"),
    "folder-as-config": (["init-checkpoint", "--config", "{tmp}", "{tmp}/ck"], "--config"),
    "folder-as-token-file": (["score", "{none}", "--token-ids", "{tmp}"], "--token-ids"),
    "one-token": (["score", "{none}", "--token-ids", "{one}"], "--token-ids"),
    "negative-decode-start": (["score", "{none}", "--token-ids", "{ids}", "--decode-from", "-3"], "--decode-from"),
    "decode-start-beyond": (["score", "{none}", "--token-ids", "{ids}", "--decode-from", "6"], "--decode-from"),
    "logits-into-a-missing-folder": (["score", "{none}", "--token-ids", "{ids}", "--logits-out", "{tmp}/no/l.st"],
                                     "--logits-out"),
    "negative-new-tokens": (["generate", "{none}", "--prompt-ids", "1 2", "--max-new-tokens", "-5"],
                            "--max-new-tokens"),
    "folder-as-prompt-file": (["generate", "{none}", "--prompt-ids", "@{tmp}"], "--prompt-ids"),
    "top-p-of-0": (["generate", "{none}", "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
    "NaN-temperature": (["generate", "{none}", "--prompt-ids", "1", "--temperature", "nan"], "--temperature"),
    "no-demo-tokens": (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
}


@pytest.mark.parametrize("argv, flag", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_one_line_naming_the_flag_before_any_work(argv, flag, tmp_path, capsys):
    (tmp_path / "ids.txt").write_text("1 2 3 4 5")
    (tmp_path / "one.txt").write_text("7")
    paths = {"none": "/nonexistent/input", "tmp": str(tmp_path), "ids": str(tmp_path / "ids.txt"),
             "one": str(tmp_path / "one.txt")}
    code, _, err = _run([arg.format(**paths) for arg in argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and flag in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "one.txt"]  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA: --device cuda is valid here")
def test_cuda_device_without_cuda_is_one_line(capsys):
    code, _, err = _run(["generate", "/nonexistent/art", "--prompt-ids", "1", "--device", "cuda"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--device" in err and "no CUDA" in err


def test_compile_refuses_an_output_that_is_not_an_artifact_before_any_work(tmp_path, capsys):
    """The checkpoint does not exist: an output check after opening it would name the checkpoint instead."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8")
    code, _, err = _run(["compile", "/nonexistent/ckpt", "-o", str(folder), "--overwrite"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{folder}: exists and is not a dsv4c artifact" in err
    assert [p.name for p in folder.iterdir()] == ["cat.jpg"]
    art = _placeholder_artifact(tmp_path / "art")
    code, _, err = _run(["compile", "/nonexistent/ckpt", "-o", str(art)], capsys)
    assert code == 2 and f"{art}: already exists" in err and "--overwrite" in err


@pytest.mark.parametrize("output, relation", [("{ckpt}", "is"), ("{ckpt}/art", "lies inside"),
                                              ("{parent}", "contains")])
def test_compile_never_writes_over_or_into_its_input(tiny_ckpt, output, relation, capsys):
    before = sorted(p.name for p in tiny_ckpt.parent.rglob("*"))
    out = output.format(ckpt=tiny_ckpt, parent=tiny_ckpt.parent)
    code, _, err = _run(["compile", str(tiny_ckpt), "-o", out, "--overwrite"], capsys)
    assert code == 2 and f"{out}: {relation} the input {tiny_ckpt}" in err
    assert sorted(p.name for p in tiny_ckpt.parent.rglob("*")) == before
    assert Checkpoint.open(tiny_ckpt).config.layer_pattern() == tiny().layer_pattern()


# What the `dsv4c` console script runs (pyproject.toml's entry point).
CONSOLE_SCRIPT = "import sys; from dsv4c.compiler.cli import main; sys.exit(main())"


def _interrupted_when_capturing(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI in a child (its progress drawn as on a terminal), send SIGINT once it says it is capturing a
    step variant, and return its exit code and stderr."""
    proc = subprocess.Popen([sys.executable, "-c", CONSOLE_SCRIPT, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "TTY_COMPATIBLE": "1", **env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, deadline = b"", time.monotonic() + CHILD_LIMIT_S
    try:
        while b"capturing" not in seen:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(proc.stdout.fileno(), 1 << 16) if ready else b""
            assert chunk, f"no capture started: {seen[-500:]!r}"
            seen += chunk
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=CHILD_LIMIT_S)
    finally:
        proc.kill()
    return proc.returncode, err.decode()


def test_ctrl_c_during_compile_is_one_line_and_leaves_nothing(tiny_ckpt, tmp_path):
    code, err = _interrupted_when_capturing(["compile", str(tiny_ckpt), "-o", str(tmp_path / "out" / "art")], {})
    assert code == 130 and err.strip().splitlines() == ["dsv4c compile: interrupted"], err
    assert list(tmp_path.iterdir()) == []


def test_demo_removes_its_temporary_folder(tmp_path):
    """Interrupted mid-compile, so its checkpoint is already written in the folder that must go."""
    code, err = _interrupted_when_capturing(["demo"], {"TMPDIR": str(tmp_path)})
    assert code == 130 and err.strip().splitlines() == ["dsv4c demo: interrupted"], err
    assert list(tmp_path.glob("dsv4c-demo-*")) == []


def test_compile_replaces_an_artifact_without_triton_warnings(compiled):
    art, result = compiled
    assert result.returncode == 0, result.stderr
    assert "FP_FUSION" not in result.stderr and "Warning" not in result.stderr, result.stderr
    artifact = load_artifact(art)
    assert "placeholder" not in artifact.weights and set(artifact.plans) == {"main_t1", "main_t2"}
    assert artifact.manifest["targets"] == ["sm_90a"] and artifact.manifest["kernels"]["sm_90a"]
    assert f"wrote {art}" in result.stdout
    for entry in artifact.manifest["pass_log"]:  # --explain
        assert f"{entry['variant']}: captured {entry['nodes_captured']} nodes" in result.stdout


def test_inspect_summarises_each_kernel_in_one_line_and_prints_all_as_json(compiled, capsys):
    art, _ = compiled
    code, out, _ = _run(["inspect", str(art)], capsys)
    kernel_lines = out.split("kernels:\n")[1].splitlines()
    manifest = load_artifact(art).manifest
    expected = [["sm_90a", k["name"], str(len(k["uses"]))] for k in manifest["kernels"]["sm_90a"]]
    assert code == 0 and [line.split()[:3] for line in kernel_lines] == expected
    assert max(len(line) for line in kernel_lines) < 120  # metadata stays out of the summary
    code, out, _ = _run(["inspect", str(art), "--json"], capsys)
    assert code == 0 and json.loads(out) == manifest


def test_generate_shows_progress_and_runs_on_one_thread_unless_told(compiled, monkeypatch, capsys):
    art, _ = compiled
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich draws progress as on a terminal
    argv = ["generate", str(art), "--prompt-ids", "1 2 3", "--max-new-tokens", "3"]
    try:
        torch.set_num_threads(2)
        code, out, _ = _run(argv, capsys)
        assert code == 0 and torch.get_num_threads() == 1
        assert "generating 3 tokens for 1 prompt(s)" in out
        assert len(out.split("1 2 3 -> ")[1].split()) == 3
        assert _run(argv + ["--threads", "2"], capsys)[0] == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_console_script_error_has_no_traceback(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"hidden_size": 5}')
    result = subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", "info", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
