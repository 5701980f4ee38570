"""The `dsv4c` command line: every subcommand runs for real, and user errors are one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dsv4c.model.checkpoint import Checkpoint
from dsv4c.compiler.cli import build_parser, main
from dsv4c.model.step import dequantize_weights
from dsv4c.model.numerics import Numerics
from dsv4c.model.presets import tiny
from dsv4c.compiler.scoring import run_logits, step_schedule


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["init-checkpoint", "--preset", "tiny", "--seed", "3", str(out)]) == 0
    return out


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for command in ("init-checkpoint", "info", "score"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "not implemented" not in capsys.readouterr().out


def test_info_reports_pattern_and_counts(tiny_ckpt, capsys):
    assert main(["info", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "wCH|W" in out and "fp4" in out and "fp8" in out and "shards" in out


def test_init_checkpoint_from_a_config_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny().replace(num_hash_layers=0).to_dict()))
    assert main(["init-checkpoint", "--config", str(config), str(tmp_path / "ck")]) == 0
    assert Checkpoint.open(tmp_path / "ck").config.num_hash_layers == 0


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
    with pytest.raises(SystemExit) as exit_info:
        main(["init-checkpoint", "--preset", "huge", "/tmp/x"])
    assert exit_info.value.code == 2 and "huge" in capsys.readouterr().err


def test_bad_token_file_names_the_file(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "ids.txt"
    bad.write_text("1 2 three")
    assert main(["score", str(tiny_ckpt), "--token-ids", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    bad.write_text("1 2 99999")
    assert main(["score", str(tiny_ckpt), "--token-ids", str(bad)]) == 2
    assert "1024" in capsys.readouterr().err


def test_console_script_error_has_no_traceback(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"hidden_size": 5}')
    result = subprocess.run([sys.executable, "-m", "dsv4c.compiler.cli", "info", str(broken)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
