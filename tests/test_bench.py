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


def test_a_plot_without_matplotlib_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "matplotlib" else find_spec(name, *rest))
    assert main(["bench", str(tmp_path), "--plot", str(tmp_path / "step.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot: matplotlib is not installed" in err and len(err.strip().splitlines()) == 1


def test_timed_runs_warmup_then_steps_and_takes_medians(monkeypatch):
    """`timed` (what every bench row goes through) calls the step warmup + steps times, in order, and returns
    the medians of the timed calls only (device events stubbed on this GPU-less machine: 2 ms each)."""
    import torch

    from dsv4c.compiler.benchmark import timed

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            pass

        def elapsed_time(self, other):
            return 2.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []
    device_ms, host_ms = timed(calls.append, steps=4, warmup=3)
    assert calls == list(range(7)) and device_ms == 2.0 and 0 <= host_ms < 1000
