"""`dsv4c bench`'s refusals (CPU): each a single line naming the flag, before any work."""

import pytest

from dsv4c.compiler.benchmark import BenchError, BenchOptions, validate
from dsv4c.compiler.cli import main

MANIFEST = {"max_seq_len": 4224, "mtp": True}


@pytest.mark.parametrize("options, flag", [
    (BenchOptions(batches=(1, 256)), "--batch"),
    (BenchOptions(context=4200), "--context"),
    (BenchOptions(mtp=(0, 2)), "--mtp"),
    (BenchOptions(baselines=("eager", "vllm")), "--baselines"),
])
def test_what_the_artifact_cannot_run_is_refused_naming_the_flag(options, flag):
    with pytest.raises(BenchError, match=flag):
        validate(MANIFEST, options)


def test_a_one_draft_artifact_refuses_more_drafts_and_a_draftless_one_any():
    validate(MANIFEST, BenchOptions(mtp=(0, 1)))
    with pytest.raises(BenchError, match="at most 0"):
        validate({"max_seq_len": 4224, "mtp": False}, BenchOptions(mtp=(1,)))


def test_bench_on_a_machine_without_a_gpu_says_what_it_needs(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1
